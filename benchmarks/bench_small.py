"""Wall time of whole REML fits on the small lme4 example data sets: jreml vs statsmodels (vs lme4 if available).

For each of dyestuff, sleepstudy, penicillin, machines and john_alpha (``jreml.example(name)``):

* ``jreml_first_s``: the first ``jreml.estimate(ex.model, ex.y, ex.X)`` in this process, compilation
  included (each example has its own shapes and model structure, so each one compiles once; JAX's backend
  is initialised before the first measurement).
* ``jreml_warm_ms``: the median of ``--repeats`` further calls of the same ``jreml.estimate(...)`` (served
  by the compiled program; each call ends with ``jax.block_until_ready`` on the log-likelihood). It includes
  everything a user pays per call: argument conversion and checks in Python, dispatch, the fit itself.
* ``jreml_min_ms``: ``jreml.estimate(..., max_iter=0)``, warm (median): the same Python work, dispatch and
  the evaluations at θ0 and at the end, but no iteration -- the fixed per-call cost.
* ``sm_ms``: the median of ``--sm-repeats`` ``statsmodels`` ``MixedLM.fit(reml=True)`` calls on the same model
  (model construction from the formula is done outside the timer). Crossed designs use one group holding
  every row and variance components (``vc_formula``), the documented statsmodels idiom.
* ``sm/jreml``: ``sm_ms / jreml_warm_ms`` (> 1: jreml is faster).
* ``lme4_ms``: if ``Rscript`` is on PATH and the R package lme4 is installed, the median elapsed time of
  ``lmer(formula, data, REML = TRUE)`` (formula parsing included, as lme4 always does it) in one R process
  started by this script; otherwise the column says ``-`` and the script says why.
* the REML log-likelihoods of all fits, to show the packages reach the same optimum (lme4's convention).
* ``fit2_ms``: the median of ``--repeats`` ``jreml.fit(ex.formula, df)`` calls after the first one (formula
  parsing and design construction included, compilation cached), and its ratio to ``lme4_ms``.
* the wall time of ``python -m jreml fit --example sleepstudy`` in a fresh process: without JAX's persistent
  compilation cache, with it on and empty (first-ever run) and with it filled by that run (``--no-cli`` skips).

``--blas-threads N`` sets the thread count of scipy's OpenBLAS, on which jaxlib runs its LAPACK/BLAS
custom calls (Cholesky, triangular solves); see benchmarks/README.md for why that matters here.

Run: ``python benchmarks/bench_small.py`` (≈ 1 min: most of it compiling). No timing is asserted; the
script always exits 0.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from _blas import blas_report, load_average

import jreml

EXAMPLES = ("dyestuff", "sleepstudy", "penicillin", "machines", "john_alpha")


def statsmodels_model(name: str, df: pd.DataFrame):
    """The statsmodels MixedLM of the example's lme4 formula (None where it is not expressible)."""
    import statsmodels.formula.api as smf

    ones = np.ones(len(df))
    if name == "dyestuff":  # Yield ~ 1 + (1 | Batch)
        return smf.mixedlm("Yield ~ 1", df, groups=df["Batch"])
    if name == "sleepstudy":  # Reaction ~ Days + (Days | Subject)
        return smf.mixedlm("Reaction ~ Days", df, groups=df["Subject"], re_formula="~Days")
    if name == "penicillin":  # diameter ~ 1 + (1 | plate) + (1 | sample): crossed
        vc = {"plate": "0 + C(plate)", "sample": "0 + C(sample)"}
        return smf.mixedlm("diameter ~ 1", df, groups=ones, re_formula="0", vc_formula=vc)
    if name == "machines":  # score ~ Machine + (1 | Worker) + (1 | Worker:Machine): nested in Worker
        vc = {"WorkerMachine": "0 + C(Machine)"}
        return smf.mixedlm("score ~ C(Machine)", df, groups=df["Worker"], re_formula="1", vc_formula=vc)
    if name == "john_alpha":  # yield ~ 1 + rep + (1 | gen) + (1 | rep:block): crossed
        vc = {"gen": "0 + C(gen)", "block": "0 + C(rep):C(block)"}
        return smf.mixedlm("Q('yield') ~ C(rep)", df, groups=ones, re_formula="0", vc_formula=vc)
    return None


# Columns lme4 must treat as factors, per example (the CSV round trip turns e.g. Worker 1..6 into integers).
R_FACTORS = {
    "dyestuff": ["Batch"],
    "sleepstudy": ["Subject"],
    "penicillin": ["plate", "sample"],
    "machines": ["Worker", "Machine"],
    "john_alpha": ["rep", "block", "gen"],
}

R_SCRIPT = r"""
suppressPackageStartupMessages(library(lme4))
args <- commandArgs(trailingOnly = TRUE)
dir <- args[1]
reps <- as.integer(args[2])
specs <- read.csv(file.path(dir, "specs.csv"), stringsAsFactors = FALSE)
for (i in seq_len(nrow(specs))) {
  d <- read.csv(file.path(dir, paste0(specs$name[i], ".csv")), stringsAsFactors = FALSE)
  for (f in strsplit(specs$factors[i], " ")[[1]]) d[[f]] <- factor(d[[f]])
  fml <- as.formula(specs$formula[i])
  fit <- lmer(fml, data = d, REML = TRUE)
  times <- sapply(seq_len(reps), function(j) {
    t0 <- Sys.time()
    lmer(fml, data = d, REML = TRUE)
    as.numeric(difftime(Sys.time(), t0, units = "secs"))
  })
  cat(sprintf("RESULT %s %.9g %.15g\n", specs$name[i], median(times), as.numeric(logLik(fit))))
}
"""


def run_lme4(examples, repeats: int, timeout: float):
    """{name: (median seconds, loglik)} from lme4, or (None, reason) when R/lme4 is unavailable."""
    rscript = shutil.which("Rscript")
    if rscript is None:
        return None, "Rscript not on PATH"
    check = subprocess.run(
        [rscript, "-e", 'if (!requireNamespace("lme4", quietly = TRUE)) quit(status = 3)'],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check.returncode != 0:
        return None, "the R package lme4 is not installed"
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for ex in examples:
            ex.data.to_csv(os.path.join(tmp, f"{ex.name}.csv"), index=False)
            rows.append({"name": ex.name, "formula": ex.formula, "factors": " ".join(R_FACTORS[ex.name])})
        pd.DataFrame(rows).to_csv(os.path.join(tmp, "specs.csv"), index=False)
        script = os.path.join(tmp, "bench_lme4.R")
        with open(script, "w") as fh:
            fh.write(R_SCRIPT)
        try:
            proc = subprocess.run([rscript, script, tmp, str(repeats)], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, f"lme4 run timed out after {timeout:.0f} s"
    out = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0] == "RESULT":
            out[parts[1]] = (float(parts[2]), float(parts[3]))
    if proc.returncode != 0 or not out:
        return None, f"Rscript failed (exit {proc.returncode}): {proc.stderr.strip()[-300:]}"
    return out, ""


def time_jreml(ex, repeats: int):
    """(first-call seconds, warm median seconds, max_iter=0 warm median seconds, fit)."""
    start = time.perf_counter()
    fit = jreml.estimate(ex.model, ex.y, ex.X)
    jax.block_until_ready(fit.loglik)
    first = time.perf_counter() - start
    warm = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(jreml.estimate(ex.model, ex.y, ex.X).loglik)
        warm.append(time.perf_counter() - start)
    fixed = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # max_iter=0 always ends with "max_iter reached"
        jax.block_until_ready(jreml.estimate(ex.model, ex.y, ex.X, max_iter=0).loglik)
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(jreml.estimate(ex.model, ex.y, ex.X, max_iter=0).loglik)
            fixed.append(time.perf_counter() - start)
    return first, statistics.median(warm), statistics.median(fixed), fit


def time_formula_fit(ex, repeats: int):
    """Median seconds of ``jreml.fit(formula, df)`` calls after the first (parsing included, compilation cached)."""
    formula = ex.formula
    data = ex.data.copy()
    for column in R_FACTORS[ex.name]:  # grouping columns as strings (the CSV round trip made some integers)
        data[column] = data[column].astype(str)
    jax.block_until_ready(jreml.fit(formula, data).loglik)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(jreml.fit(formula, data).loglik)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_cli(example: str, cache_dir: str | None):
    """Wall seconds of ``python -m jreml fit --example EXAMPLE`` in a fresh process (None if it failed).

    ``cache_dir`` is the command's persistent compilation cache (``JREML_CACHE_DIR``); None switches it off, so
    that everything is compiled from scratch (the default cache, ``~/.cache/jreml/jax``, would be warm after
    the first run on this machine).
    """
    import sys

    env = dict(os.environ, JREML_CACHE_DIR=cache_dir if cache_dir is not None else "off")
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "jreml", "fit", "--example", example], capture_output=True, text=True, env=env
    )
    elapsed = time.perf_counter() - start
    return elapsed if proc.returncode == 0 else None


def time_statsmodels(name: str, df: pd.DataFrame, repeats: int):
    """(median seconds of MixedLM.fit(reml=True), REML loglik, converged) or None if not expressible."""
    if statsmodels_model(name, df) is None:
        return None
    times, result = [], None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning / boundary warnings: reported via `converged`
        for _ in range(repeats):
            model = statsmodels_model(name, df)
            start = time.perf_counter()
            result = model.fit(reml=True)
            times.append(time.perf_counter() - start)
    return statistics.median(times), float(result.llf), bool(result.converged)


def plain_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Pandas string columns as plain object columns (what patsy expects)."""
    df = df.copy()
    for col in df.columns:
        if isinstance(df[col].dtype, pd.StringDtype):
            df[col] = df[col].astype(object)
    return df


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", nargs="+", default=list(EXAMPLES), choices=EXAMPLES)
    parser.add_argument("--repeats", type=int, default=20, help="warm jreml calls per example")
    parser.add_argument("--sm-repeats", type=int, default=5, help="statsmodels fits per example")
    parser.add_argument("--r-repeats", type=int, default=20, help="lme4 fits per example")
    parser.add_argument("--no-r", action="store_true", help="do not try Rscript/lme4")
    parser.add_argument(
        "--blas-threads", type=int, default=None, help="set OpenBLAS's thread count (default: leave it as is)"
    )
    parser.add_argument("--r-timeout", type=float, default=600.0, help="seconds allowed for the R run")
    parser.add_argument("--no-cli", action="store_true", help="skip the fresh-process `jreml fit` timings")
    args = parser.parse_args(argv)

    wall0 = time.perf_counter()
    try:
        import statsmodels

        sm_version = statsmodels.__version__
    except ImportError:
        sm_version = None
    print(
        f"jax {jax.__version__} ({jax.default_backend()}, {os.cpu_count()} CPU cores), jreml {jreml.__version__}, "
        f"statsmodels {sm_version or 'not installed'}, dtype {jreml.float_dtype()}"
    )
    print(blas_report(args.blas_threads))
    print(load_average())
    jax.block_until_ready(jnp.ones(3) + 1.0)  # backend initialisation, not charged to the first fit
    one_op = jax.jit(lambda v: v + 1.0)
    v = jnp.ones(3)
    one_op(v).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(200):
        one_op(v).block_until_ready()
    print(f"dispatch floor: a trivial jitted call takes {(time.perf_counter() - t0) / 200 * 1e6:.0f} µs")

    examples = [jreml.example(name) for name in args.examples]
    rows = []
    for ex in examples:
        first, warm, fixed, fit = time_jreml(ex, args.repeats)
        formula_fit = time_formula_fit(ex, args.repeats)
        sm = time_statsmodels(ex.name, plain_frame(ex.data), args.sm_repeats) if sm_version else None
        rows.append((ex, first, warm, fixed, fit, sm, formula_fit))

    lme4, why_not = (None, "--no-r given") if args.no_r else run_lme4(examples, args.r_repeats, args.r_timeout)
    cli = None
    if not args.no_cli:
        with tempfile.TemporaryDirectory() as cache:
            cli = (
                time_cli("sleepstudy", None),  # no persistent cache: compiles from scratch
                time_cli("sleepstudy", cache),  # persistent cache on, empty: the first-ever run
                time_cli("sleepstudy", cache),  # persistent cache on, filled by the run before
            )

    print()
    print(
        f"{'example':<11} {'n':>4} {'k':>2} {'p':>2} {'iter':>4} {'jreml_first_s':>13} {'jreml_warm_ms':>13} "
        f"{'jreml_min_ms':>12} {'sm_ms':>8} {'sm/jreml':>8} {'lme4_ms':>8} {'lme4/jreml':>10}"
    )
    for ex, first, warm, fixed, fit, sm, _ in rows:
        sm_ms = f"{sm[0] * 1e3:8.1f}" if sm else f"{'-':>8}"
        sm_ratio = f"{sm[0] / warm:8.3g}" if sm else f"{'-':>8}"
        r = lme4.get(ex.name) if lme4 else None
        r_ms = f"{r[0] * 1e3:8.1f}" if r else f"{'-':>8}"
        r_ratio = f"{r[0] / warm:10.3g}" if r else f"{'-':>10}"
        print(
            f"{ex.name:<11} {len(ex.y):4d} {ex.model.num_free_params:2d} {ex.X.shape[1]:2d} {int(fit.n_iter):4d} "
            f"{first:13.2f} {warm * 1e3:13.2f} {fixed * 1e3:12.2f} {sm_ms} {sm_ratio} {r_ms} {r_ratio}"
        )

    print()
    print("REML log-likelihoods (lme4 convention) at each package's optimum:")
    diff = "|diff|"
    print(f"{'example':<11} {'jreml':>18} {'converged':>9} {'statsmodels':>18} {diff:>9} {'lme4':>18} {diff:>9}")
    for ex, _, _, _, fit, sm, _ in rows:
        ll = float(fit.loglik)
        sm_ll = f"{sm[1]:18.8f} {abs(sm[1] - ll):9.1e}" if sm else f"{'-':>18} {'-':>9}"
        r = lme4.get(ex.name) if lme4 else None
        r_ll = f"{r[1]:18.8f} {abs(r[1] - ll):9.1e}" if r else f"{'-':>18} {'-':>9}"
        print(f"{ex.name:<11} {ll:18.8f} {str(bool(fit.converged)):>9} {sm_ll} {r_ll}")
    if sm_version:
        bad = [ex.name for ex, *_, sm, _ in rows if sm and not sm[2]]
        print(f"statsmodels converged: {'all' if not bad else 'NOT ' + ', '.join(bad)}")
    if lme4 is None:
        print(f"lme4: skipped ({why_not})")

    print()
    print("Targets (speed acceptance): warm estimate <= 1 ms (dyestuff), <= 2 ms (sleepstudy); second")
    print("jreml.fit(formula, df) <= 0.5 x lme4 lmer(); fresh-process `jreml fit --example sleepstudy` <= 4 s.")
    print(
        f"{'example':<11} {'warm_ms':>8} {'fit2_ms':>8} {'lme4_ms':>8} {'warm/lme4':>9} {'fit2/lme4':>9} {'sm_ms':>8}"
    )
    for ex, _, warm, _, _, sm, formula_fit in rows:
        r = lme4.get(ex.name) if lme4 else None
        r_ms = f"{r[0] * 1e3:8.1f}" if r else f"{'-':>8}"
        ratios = f"{warm / r[0]:9.3f} {formula_fit / r[0]:9.3f}" if r else f"{'-':>9} {'-':>9}"
        sm_ms = f"{sm[0] * 1e3:8.1f}" if sm else f"{'-':>8}"
        print(f"{ex.name:<11} {warm * 1e3:8.2f} {formula_fit * 1e3:8.2f} {r_ms} {ratios} {sm_ms}")
    if cli is not None:
        fmt = lambda t: f"{t:.2f} s" if t is not None else "failed"  # noqa: E731
        print(
            f"`jreml fit --example sleepstudy`, fresh process: no persistent cache {fmt(cli[0])}; persistent cache "
            f"cold (first-ever run) {fmt(cli[1])}; persistent cache warm {fmt(cli[2])}"
        )
    print()
    print(
        "jreml_warm_ms: median of warm jreml.estimate calls; jreml_min_ms: the same call with max_iter=0 "
        "(fixed per-call cost); sm_ms / lme4_ms: median fit times; ratios > 1 mean jreml is faster."
    )
    print(load_average())
    print(f"total wall time {time.perf_counter() - wall0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
