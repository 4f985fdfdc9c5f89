"""The ``jreml`` command, run in a subprocess as a user would (and in-process via ``main`` for cheap checks)."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import REFERENCE_CASES, lme4_name, load_reference

import jreml
from jreml.__main__ import EXAMPLE_FORMULAS, main

KEYS = ["method", "nobs", "loglik", "aic", "bic", "converged", "singular", "n_iter", "fixef", "se", "varcorr"]
KEYS += ["sigma2", "time_s"]


def run(*args, command=(sys.executable, "-m", "jreml")):
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def csv_dir(tmp_path_factory):
    """The bundled data sets written as plain CSV files (grouping codes as they are in the files: numbers too)."""
    folder = tmp_path_factory.mktemp("data")
    for name in REFERENCE_CASES:
        jreml.datasets.load(name).to_csv(folder / f"{name}.csv", index=False)
    return folder


def check_against_lme4(got: dict, case: str, method: str):
    from test_results_lme4 import lme4_fixef, lme4_varcorr

    ref = load_reference(case)[method]
    assert list(got) == KEYS
    assert got["method"] == method and got["nobs"] == ref["nobs"] and got["converged"] is True
    assert got["singular"] is False and isinstance(got["n_iter"], int) and got["time_s"] > 0
    assert abs(got["loglik"] - ref["logLik"]) < 1e-6
    fixef = lme4_fixef(ref)
    assert [lme4_name(k) for k in got["fixef"]] == list(ref["fixef"])
    for key, value in got["fixef"].items():
        np.testing.assert_allclose(value, fixef[lme4_name(key)], rtol=1e-6, atol=1e-9, err_msg=key)
    for key, value in got["se"].items():
        np.testing.assert_allclose(value, ref["fixef_se"][lme4_name(key)], rtol=1e-4, err_msg=key)
    expected = lme4_varcorr(ref)
    rows = {(r["group"], r["term1"], r["term2"]): r for r in got["varcorr"]}
    assert set(rows) == set(expected)
    for key, (value, sdcor) in expected.items():
        row = rows[key]
        if key[2] is None:
            assert row["covariance"] is None and row["corr"] is None
            np.testing.assert_allclose([row["variance"], row["sd"]], [value, sdcor], rtol=1e-4, err_msg=str(key))
        else:
            assert row["variance"] is None and row["sd"] is None
            np.testing.assert_allclose([row["covariance"], row["corr"]], [value, sdcor], rtol=1e-4, err_msg=str(key))
    assert got["varcorr"][-1]["group"] == "Residual" and got["varcorr"][-1]["term1"] is None
    np.testing.assert_allclose(got["sigma2"], expected[("Residual", None, None)][0], rtol=1e-4)


def test_fit_csv_json_matches_lme4(csv_dir):
    out = run("fit", str(csv_dir / "sleepstudy.csv"), EXAMPLE_FORMULAS["sleepstudy"], "--json")
    assert out.returncode == 0, out.stderr
    check_against_lme4(json.loads(out.stdout), "sleepstudy_corr", "REML")


@pytest.mark.slow
@pytest.mark.parametrize("name,method", [(n, m) for n in REFERENCE_CASES for m in ("REML", "ML")])
def test_fit_csv_json_every_reference_case(csv_dir, name, method):
    args = ["fit", str(csv_dir / f"{name}.csv"), EXAMPLE_FORMULAS[name], "--json"]
    out = run(*args, *(["--ml"] if method == "ML" else []))
    assert out.returncode == 0, out.stderr
    check_against_lme4(json.loads(out.stdout), REFERENCE_CASES[name], method)


def test_fit_example_prints_an_lme4_summary_and_datasets_lists_formulas():
    out = run("fit", "--example", "penicillin", "--ml")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Linear mixed model fit by maximum likelihood ['lmerMod']")
    assert "Formula: diameter ~ 1 + (1 | plate) + (1 | sample)" in out.stdout
    assert "Number of obs: 144, groups:  plate, 24; sample, 6" in out.stdout
    ref = load_reference("penicillin")["ML"]
    assert f"{ref['logLik']:.4f}" in out.stdout
    listing = run("datasets")
    assert listing.returncode == 0
    for name, formula in EXAMPLE_FORMULAS.items():
        assert re.search(rf"^{name}\s+{re.escape(formula)}", listing.stdout, re.MULTILINE), name


@pytest.mark.slow
def test_kinship_example_uses_the_relationship_matrix(capsys):
    assert main(["fit", "--example", "kinship", "--trait", "trait3", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    ref = load_reference("kinship_visible")["traits"]["trait3"]
    variances = {r["group"]: r["variance"] for r in got["varcorr"]}
    np.testing.assert_allclose([variances["id"], variances["Residual"]], [ref["s2g"], ref["s2e"]], rtol=1e-5)
    np.testing.assert_allclose(got["loglik"], ref["reml_loglik"], atol=1e-6)


def test_relmat_files_with_header_or_as_plain_matrix(tmp_path, capsys, csv_dir):
    """K = I: both file layouts give the plain (1 | Batch) fit; the header layout matches levels by name."""
    levels = sorted(jreml.datasets.load("dyestuff").Batch.unique())
    shuffled = levels[::-1]
    K = pd.DataFrame(np.eye(len(levels)), index=shuffled, columns=shuffled)
    K.to_csv(tmp_path / "K_named.csv")
    np.savetxt(tmp_path / "K_plain.csv", np.eye(len(levels)), delimiter=",")
    ref = load_reference("dyestuff")["REML"]
    data = str(csv_dir / "dyestuff.csv")
    for path in ("K_named.csv", "K_plain.csv"):
        assert main(["fit", data, "Yield ~ 1 + (1 | Batch)", "--relmat", f"Batch={tmp_path / path}", "--json"]) == 0
        got = json.loads(capsys.readouterr().out)
        assert abs(got["loglik"] - ref["logLik"]) < 1e-6, path


@pytest.mark.parametrize(
    "args,message",
    [
        (["fit", "{data}", "Yield ~ 1 + (1 | Bat)"], "['Bat'] not in the data"),
        (["fit", "{data}", "Yield ~ (1 | Batch"], "unbalanced '('"),
        (["fit", "{data}", "Yield (1 | Batch)"], "must have the form 'response ~ terms'"),
        (["fit", "missing.csv", "Yield ~ 1 + (1 | Batch)"], "data file 'missing.csv' not found"),
        (["fit", "{data}", "Yield ~ 1 + (1 | Batch)", "--relmat", "Batch"], "--relmat expects GROUP=FILE.csv"),
        (["fit", "{data}", "Yield ~ 1 + (1 | Batch)", "--relmat", "Batch=nope.csv"], "relmat file 'nope.csv'"),
        (["fit", "{data}", "Yield ~ 1 + (1 | Batch)", "--relmat", "{bad_k}"], "must be 6x6"),
        (["fit", "{data}", "Yield ~ 1 + (1 | Batch)", "--relmat", "{nonsym_k}"], "must be symmetric"),
        (["fit", "{data}", "Yield ~ 1 + (1 | Batch)", "--relmat", "Other={nonsym_k_path}"], "not a grouping factor"),
        (["fit", "{data}", "Yield ~ 1 + (1 | Batch)", "--algorithm", "foo"], "invalid choice: 'foo'"),
        (["fit", "{data}"], "needs DATA.csv and FORMULA"),
        (["fit", "--example", "nope"], "unknown data set 'nope'"),
        (["fit", "--example", "kinship", "--trait", "trait99"], "unknown trait 'trait99'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_user_errors_are_one_line_with_exit_status_2(args, message, tmp_path, csv_dir, capsys):
    np.savetxt(tmp_path / "bad.csv", np.eye(3), delimiter=",")
    nonsym = np.eye(6)
    nonsym[0, 1] = 0.5
    np.savetxt(tmp_path / "nonsym.csv", nonsym, delimiter=",")
    values = {
        "data": str(csv_dir / "dyestuff.csv"),
        "bad_k": f"Batch={tmp_path / 'bad.csv'}",
        "nonsym_k": f"Batch={tmp_path / 'nonsym.csv'}",
        "nonsym_k_path": str(tmp_path / "nonsym.csv"),
    }
    argv = [a.format(**values) for a in args]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("jreml: error: ") and message in lines[0], captured.err


def test_errors_from_the_command_line_have_no_traceback(csv_dir):
    for args in (
        ["fit", str(csv_dir / "dyestuff.csv"), "Yield ~ 1 + (1 | Bat)"],
        ["fit", "--example", "nope"],
        ["fit", str(csv_dir / "dyestuff.csv"), "Yield ~ 1 + (1 | Batch)", "--ml", "--bogus"],
    ):
        out = run(*args)
        assert out.returncode == 2, args
        assert len(out.stderr.splitlines()) == 1 and "Traceback" not in out.stderr, out.stderr
        assert out.stdout == ""


# The console script on PATH, or next to this interpreter (a virtual environment that is not activated).
JREML = shutil.which("jreml", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))


@pytest.mark.skipif(JREML is None, reason="the jreml console script is not installed")
def test_console_script():
    out = run("datasets", command=(JREML,))
    assert out.returncode == 0 and "sleepstudy" in out.stdout
    out = run("fit", "--example", "nope", command=(JREML,))
    assert out.returncode == 2 and out.stderr.startswith("jreml: error: unknown data set 'nope'")


def test_closed_output_pipe_exits_quietly():
    """`jreml ... | head -1`: no traceback and no "Exception ignored" when the reader has gone away."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the command writes: every write meets a closed pipe
    try:
        command = [sys.executable, "-m", "jreml", "datasets"]
        out = subprocess.run(command, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write_end)
    assert out.stderr == "" and out.returncode == 141  # 128 + SIGPIPE, as a shell reports `yes | head -1`
    piped = subprocess.run(
        f"{shlex.quote(sys.executable)} -m jreml datasets | head -1", shell=True, capture_output=True, text=True
    )
    assert piped.returncode == 0 and piped.stderr == "", piped.stderr
    assert len(piped.stdout.splitlines()) == 1 and piped.stdout.startswith("dyestuff")


def test_version():
    out = run("--version")
    assert out.returncode == 0 and out.stdout == f"jreml {jreml.__version__}\n" and out.stderr == ""


@pytest.mark.parametrize("sep,written", [("\\t", "\t"), ("tab", "\t"), (";", ";"), ("\t", "\t")])
def test_sep_reads_other_separators(sep, written, tmp_path, capsys):
    path = tmp_path / "dyestuff.txt"
    jreml.datasets.load("dyestuff").to_csv(path, sep=written, index=False)
    assert main(["fit", str(path), EXAMPLE_FORMULAS["dyestuff"], "--sep", sep, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert abs(got["loglik"] - load_reference("dyestuff")["REML"]["logLik"]) < 1e-6
    # without --sep the file is one comma-free column: a one-line input error
    assert main(["fit", str(path), EXAMPLE_FORMULAS["dyestuff"]]) == 2
    assert "not in the data" in capsys.readouterr().err
    assert main(["fit", "--example", "dyestuff", "--sep", ";"]) == 2
    assert "--sep applies to DATA.csv" in capsys.readouterr().err
