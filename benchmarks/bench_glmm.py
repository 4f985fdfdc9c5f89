"""Wall time of GLMM fits by the Laplace approximation: jreml vs lme4 ``glmer`` (nAGQ = 1) in the same run.

Data: ``tests/reference/glmm/`` (VerbAgg, grouseticks; written by ``make_glmm_reference.R``) and the bundled cbpp.
For each model:

* ``jreml_first_s``: the first ``jreml.fit(formula, data, family=...)`` in this process (compilation included).
* ``jreml_warm_s``: the median of ``--repeats`` further calls (formula parsing, design, both optimisation stages,
  the Hessian for the standard errors; compiled programs cached).
* ``glmer_s``: the median elapsed time of ``--repeats`` ``glmer(formula, data, family)`` calls with glmer's default
  control (formula parsing included), in one Rscript process started by this script (``-`` without lme4).
* ``ratio``: ``glmer_s / jreml_warm_s`` (> 1: jreml is faster; the issue's target for VerbAgg is ≥ 5).
* both criteria (−2 logLik) to show that the fits reach the same optimum.

``--blas-threads N`` sets scipy's OpenBLAS thread count (jaxlib's Cholesky runs on it; default 1, see
benchmarks/README.md). Run: ``python benchmarks/bench_glmm.py`` (≈ 2 min, most of it compiling). No timing is
asserted; the script always exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pandas as pd  # noqa: E402
from _blas import blas_report, have_lme4  # noqa: E402

import jreml  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
REF = ROOT / "tests" / "reference" / "glmm"

MODELS = {
    "verbagg": ("r2 ~ Anger + Gender + btype + situ + (1 | id) + (1 | item)", "bernoulli", "binomial"),
    "grouseticks": ("TICKS ~ YEAR + HEIGHT + (1 | BROOD) + (1 | INDEX) + (1 | LOCATION)", "poisson", "poisson"),
    "cbpp": ("cbind(incidence, size - incidence) ~ period + (1 | herd)", "binomial", "binomial"),
}

R_SCRIPT = r"""
suppressPackageStartupMessages({library(lme4); library(jsonlite)})
args <- commandArgs(TRUE)
d <- read.csv(args[1], stringsAsFactors = TRUE)
for (f in strsplit(args[4], ",")[[1]]) d[[f]] <- factor(as.character(d[[f]]))
if ("HEIGHT" %in% names(d)) d$HEIGHT <- as.numeric(scale(d$HEIGHT))
fam <- get(args[3])
reps <- as.integer(args[5])
times <- numeric(reps)
for (i in seq_len(reps)) times[i] <- system.time(m <- glmer(as.formula(args[2]), data = d, family = fam))[["elapsed"]]
cat(toJSON(list(seconds = median(times), m2ll = -2 * as.numeric(logLik(m))), auto_unbox = TRUE, digits = NA))
"""

FACTORS = {
    "verbagg": "Gender,item,id,btype,situ,mode",
    "grouseticks": "INDEX,BROOD,YEAR,LOCATION",
    "cbpp": "herd,period",
}


def load(name: str) -> tuple[pd.DataFrame, pathlib.Path]:
    if name == "cbpp":
        return jreml.datasets.load("cbpp"), ROOT / "jreml" / "datasets" / "cbpp.csv"
    path = REF / ("VerbAgg.csv" if name == "verbagg" else "grouseticks.csv")
    d = pd.read_csv(path, dtype={c: str for c in FACTORS[name].split(",")})
    if "HEIGHT" in d:
        d["HEIGHT"] = (d.HEIGHT - d.HEIGHT.mean()) / d.HEIGHT.std(ddof=1)
    return d, path


def glmer_time(path, formula, family, factors, repeats):
    with tempfile.NamedTemporaryFile("w", suffix=".R", delete=False) as f:
        f.write(R_SCRIPT)
    out = subprocess.run(
        ["Rscript", f.name, str(path), formula, family, factors, str(repeats)], capture_output=True, text=True
    )
    os.unlink(f.name)
    if out.returncode != 0:
        return None, f"Rscript failed: {out.stderr.strip()[-300:]}"
    return json.loads(out.stdout.strip().splitlines()[-1]), ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--blas-threads", type=int, default=1)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args(argv)
    print(blas_report(args.blas_threads))
    print(f"load average: {os.getloadavg()}")
    lme4 = have_lme4()
    if not lme4:
        print("lme4 not available (Rscript with the lme4 package): glmer columns are '-'")
    header = f"{'model':<12}{'n':>7}{'jreml_first_s':>15}{'jreml_warm_s':>14}{'glmer_s':>9}{'ratio':>8}"
    rows = [header + f"{'jreml_-2ll':>14}{'glmer_-2ll':>14}"]
    for name in args.models.split(","):
        formula, family, r_family = MODELS[name]
        data, path = load(name)
        t = time.perf_counter()
        fit = jreml.fit(formula, data, family=family)
        first = time.perf_counter() - t
        warm = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fit = jreml.fit(formula, data, family=family)
            warm.append(time.perf_counter() - t)
        warm_s = statistics.median(warm)
        glmer, note = glmer_time(path, formula, r_family, FACTORS[name], args.repeats) if lme4 else (None, "")
        if note:
            print(note)
        g_s = f"{glmer['seconds']:9.3f}" if glmer else f"{'-':>9}"
        ratio = f"{glmer['seconds'] / warm_s:8.1f}" if glmer else f"{'-':>8}"
        g_ll = f"{glmer['m2ll']:14.6f}" if glmer else f"{'-':>14}"
        rows.append(
            f"{name:<12}{fit.nobs:>7}{first:15.2f}{warm_s:14.3f}{g_s}{ratio}{fit.deviance:14.6f}{g_ll}"
            + ("" if fit.converged else "  (jreml: not converged)")
        )
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
