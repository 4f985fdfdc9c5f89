"""The ``jreml`` command, run in a subprocess as a user would."""

import json
import subprocess
import sys

from conftest import load_reference


def run(*args):
    return subprocess.run([sys.executable, "-m", "jreml", *args], capture_output=True, text=True, timeout=300)


def test_fit_example_json_matches_lme4():
    out = run("fit", "--example", "dyestuff", "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    ref = load_reference("dyestuff")["REML"]
    assert got["method"] == "REML" and got["nobs"] == 30 and got["converged"]
    assert abs(got["loglik"] - ref["logLik"]) < 1e-6
    assert abs(got["fixef"]["(Intercept)"] - ref["fixef"]["(Intercept)"]) < 1e-6


def test_fit_example_prints_a_summary_and_datasets_lists_them():
    out = run("fit", "--example", "penicillin", "--ml")
    assert out.returncode == 0, out.stderr
    assert "fit by ML" in out.stdout and "plate.variance" in out.stdout
    listing = run("datasets")
    assert listing.returncode == 0 and "sleepstudy" in listing.stdout and "kinship" in listing.stdout


def test_unknown_example_is_a_one_line_error_with_exit_status_2():
    out = run("fit", "--example", "nope")
    assert out.returncode == 2
    assert "unknown data set 'nope'" in out.stderr and "Traceback" not in out.stderr
