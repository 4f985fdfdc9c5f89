"""Wall time of small-sample inference after a REML fit: jreml vs lmerTest / pbkrtest / lme4 in the same run.

Three data sets: sleepstudy (``Reaction ~ Days + (Days | Subject)``), Machines (``score ~ Machine + (1 | Worker) +
(1 | Worker:Machine)``) and the simulated unbalanced design of tests/reference/kenward_roger.R
(``y ~ x + trt + (1 + x | g) + (1 | h)``, 110 rows). For each one, the fit is done once outside the timers and then:

* ``satterthwaite``: jreml ``fit.coef_table(ddf="satterthwaite")``; R: ``coef(summary(as_lmerModLmerTest(m),
  ddf = "Satterthwaite"))`` on an lme4 fit ``m`` -- ``as_lmerModLmerTest`` is where lmerTest computes the
  Hessian of the deviance and the Jacobian of vcov(β) that its df need (``lmerTest::lmer`` does it inside the
  fit), so both sides time the same work: derivatives at θ̂ plus the table.
* ``kenward-roger``: jreml ``fit.coef_table(ddf="kenward-roger")``; R: ``coef(summary(mt, ddf = "Kenward-Roger"))``
  on a fitted ``lmerModLmerTest`` ``mt`` (it calls pbkrtest's ``vcovAdj`` each time).
* ``profile confint`` (sleepstudy only): jreml ``fit.confint(method="profile")``; R: lme4's
  ``confint(m, method = "profile", oldNames = FALSE)``.

jreml: ``first`` is the first call in this process (XLA compilation of the derivative program included; the fit's
own compilation is not), ``warm`` the median of ``--repeats`` further calls. R: the median of ``--r-repeats`` calls
in one Rscript process started by this script, after one untimed call. ``R / jreml`` is R's median over jreml's
warm median (> 1: jreml is faster; the target is ≥ 5). The largest differences in df and in the interval limits
between the two are printed beside the timings, to show both computed the same thing.

Run: ``OPENBLAS_NUM_THREADS=1 python benchmarks/bench_inference.py`` from the repository root (the script puts the
checkout first on ``sys.path``; without the thread limit OpenBLAS's threads fight over a shared 2-core machine and
jreml's 5 ms tables take 0.5 s) (≈ 1–2 min). No timing is asserted; the script always exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
import pandas as pd
from _blas import blas_report, have_lme4, load_average

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's jreml, not another one installed in the environment

import jreml  # noqa: E402

CASES = {
    "sleepstudy": ("Reaction ~ Days + (Days | Subject)", ["Subject"]),
    "machines": ("score ~ Machine + (1 | Worker) + (1 | Worker:Machine)", ["Worker", "Machine"]),
    "kr_unbalanced": ("y ~ x + trt + (1 + x | g) + (1 | h)", ["trt", "g", "h"]),
}

R_SCRIPT = r"""
suppressPackageStartupMessages({library(lme4); library(lmerTest); library(pbkrtest); library(jsonlite)})
options(contrasts = c("contr.treatment", "contr.poly"))
args <- commandArgs(trailingOnly = TRUE)
dir <- args[1]
reps <- as.integer(args[2])
profile_reps <- as.integer(args[3])
specs <- read.csv(file.path(dir, "specs.csv"), stringsAsFactors = FALSE)
timed <- function(n, f) {
  f()
  median(sapply(seq_len(n), function(j) {
    t0 <- Sys.time(); f(); as.numeric(difftime(Sys.time(), t0, units = "secs"))
  }))
}
out <- list()
for (i in seq_len(nrow(specs))) {
  d <- read.csv(file.path(dir, paste0(specs$name[i], ".csv")), stringsAsFactors = FALSE)
  for (f in strsplit(specs$factors[i], " ")[[1]]) d[[f]] <- factor(as.character(d[[f]]))
  fml <- as.formula(specs$formula[i])
  m <- lme4::lmer(fml, data = d, REML = TRUE)
  mt <- lmerTest::as_lmerModLmerTest(m)
  entry <- list(
    satterthwaite_s = timed(reps, function() coef(summary(lmerTest::as_lmerModLmerTest(m), ddf = "Satterthwaite"))),
    kenward_roger_s = timed(reps, function() coef(summary(mt, ddf = "Kenward-Roger"))),
    satterthwaite_df = unname(coef(summary(mt, ddf = "Satterthwaite"))[, "df"]),
    kenward_roger_df = unname(coef(summary(mt, ddf = "Kenward-Roger"))[, "df"])
  )
  if (specs$name[i] == "sleepstudy") {
    entry$profile_s <- timed(profile_reps, function() confint(m, method = "profile", oldNames = FALSE))
    ci <- confint(m, method = "profile", oldNames = FALSE)
    entry$profile_ci <- list(rows = rownames(ci), lower = unname(ci[, 1]), upper = unname(ci[, 2]))
  }
  out[[specs$name[i]]] <- entry
}
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA), file.path(dir, "r_out.json"))
"""


def load(name: str) -> pd.DataFrame:
    if name == "kr_unbalanced":
        return pd.read_csv(ROOT / "tests" / "reference" / "kr_unbalanced.csv")
    return jreml.datasets.load(name)


def run_r(data: dict, repeats: int, profile_repeats: int, timeout: float):
    """R's timings and results per case, or (None, reason)."""
    if not have_lme4():
        return None, "Rscript or the R package lme4 is not available"
    rscript = shutil.which("Rscript")
    check = subprocess.run(
        [rscript, "-e", "quit(status = 3 * !all(sapply(c('lmerTest','pbkrtest','jsonlite'), requireNamespace)))"],
        capture_output=True,
        text=True,
    )
    if check.returncode != 0:
        return None, "the R packages lmerTest / pbkrtest / jsonlite are not all installed"
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for name, df in data.items():
            df.to_csv(os.path.join(tmp, f"{name}.csv"), index=False)
            rows.append({"name": name, "formula": CASES[name][0], "factors": " ".join(CASES[name][1])})
        pd.DataFrame(rows).to_csv(os.path.join(tmp, "specs.csv"), index=False)
        script = os.path.join(tmp, "bench_inference.R")
        pathlib.Path(script).write_text(R_SCRIPT)
        try:
            proc = subprocess.run(
                [rscript, script, tmp, str(repeats), str(profile_repeats)],
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return None, f"the R run timed out after {timeout:.0f} s"
        path = pathlib.Path(tmp) / "r_out.json"
        if proc.returncode != 0 or not path.exists():
            return None, f"Rscript failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}"
        return json.loads(path.read_text()), ""


def time_calls(fn, repeats: int, settle: int = 2):
    """(first-call seconds, warm median seconds, warm best seconds, the first call's value); ``settle`` untimed
    calls between the first and the timed ones."""
    start = time.perf_counter()
    value = fn()
    first = time.perf_counter() - start
    for _ in range(settle):
        fn()
    warm = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        warm.append(time.perf_counter() - start)
    return first, statistics.median(warm), min(warm), value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=20, help="warm jreml calls per table")
    parser.add_argument("--r-repeats", type=int, default=10, help="R calls per table")
    parser.add_argument("--profile-repeats", type=int, default=3, help="profile confint calls (each side)")
    parser.add_argument("--no-r", action="store_true", help="do not run R")
    parser.add_argument("--r-timeout", type=float, default=600.0)
    parser.add_argument("--blas-threads", type=int, default=None, help="OpenBLAS threads (default: leave)")
    args = parser.parse_args(argv)

    print(blas_report(args.blas_threads))
    print(load_average())
    data = {name: load(name) for name in CASES}
    fits = {name: jreml.fit(CASES[name][0], df) for name, df in data.items()}

    rows = []  # (case, what, first, warm, jreml values)
    for name, fit in fits.items():
        for ddf in ("satterthwaite", "kenward-roger"):
            first, warm, best, table = time_calls(lambda fit=fit, ddf=ddf: fit.coef_table(ddf=ddf), args.repeats)
            rows.append((name, ddf, first, warm, best, table["df"].to_numpy()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first, warm, best, ci = time_calls(
            lambda: fits["sleepstudy"].confint(method="profile"), max(args.profile_repeats - 1, 1), settle=0
        )
    rows.append(("sleepstudy", "profile confint", first, warm, best, ci))

    r_out, why = (None, "--no-r") if args.no_r else run_r(data, args.r_repeats, args.profile_repeats, args.r_timeout)
    print()
    header = (
        f"{'data':<14} {'computation':<16} {'jreml first':>11} {'jreml warm':>10} {'(best)':>9} {'R':>10} "
        f"{'R / jreml':>9}  agreement"
    )
    print(header)
    print("-" * len(header))
    for name, what, first, warm, best, value in rows:
        r_s, ratio, agree = "-", "-", ""
        if r_out is not None:
            entry = r_out[name]
            key = {"satterthwaite": "satterthwaite", "kenward-roger": "kenward_roger", "profile confint": "profile"}[
                what
            ]
            seconds = entry[f"{key}_s"]
            r_s, ratio = f"{seconds * 1e3:8.1f}ms", f"{seconds / warm:8.1f}×"
            if what == "profile confint":
                ref = pd.DataFrame(
                    {"lower": entry["profile_ci"]["lower"], "upper": entry["profile_ci"]["upper"]},
                    index=entry["profile_ci"]["rows"],
                )
                diff = np.abs(value.loc[ref.index].to_numpy() - ref.to_numpy()) / np.maximum(np.abs(ref.to_numpy()), 1)
                agree = f"limits within {np.nanmax(diff):.1e} (relative)"
            else:
                ref = np.asarray(entry[f"{key}_df"], float)
                agree = f"df within {np.max(np.abs(value / ref - 1)):.1e} (relative)"
        line = f"{name:<14} {what:<16} {first:10.3f}s {warm * 1e3:8.1f}ms {best * 1e3:7.1f}ms {r_s:>10} {ratio:>9}"
        print(f"{line}  {agree}")
    if r_out is None:
        print(f"R: skipped ({why})")
    print()
    print("R: Satterthwaite = lmerTest as_lmerModLmerTest + summary; Kenward-Roger = lmerTest summary(ddf=KR)")
    print("(pbkrtest vcovAdj); profile = lme4 confint(method='profile'). Target: R / jreml >= 5 for each row.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
