"""Thousands of fits: fit_batch (spectral path) vs a loop of single fits vs statsmodels; optional dense batch.

    python benchmarks/bench_batch.py                      # (a): 10,000 traits on the 400x400 kinship example
    python benchmarks/bench_batch.py --n-loop 100 --n-statsmodels 100 --dense   # also (b), n = 2,000, two kernels
    python benchmarks/bench_batch.py --skip-a --missing   # (c): 200 traits, 5 % of values missing at random
    python benchmarks/bench_batch.py --skip-a --missing-mme --n-loop 20   # (d): random slopes, missing values, lme4

(a) simulates traits y = Xb + g + e, g ~ N(0, h2 K), e ~ N(0, (1 - h2) I) with h2 uniform on (0, 0.9), fits them
with ``fit_batch`` (spectral AI-REML, vmapped; timed after a compiling warm-up run), with a Python loop of
``jreml.estimate`` on the first ``--n-loop`` traits and with statsmodels' MixedLM (the same REML model: one group,
variance component with design L, K = L Lᵀ) on the first ``--n-statsmodels`` traits, and prints traits/s and
ratios. (b) fits ``--dense-traits`` traits with V = s1 K1 + s2 K2 + s_e I (n = ``--dense-n``) with ``fit_batch``
(no spectral form: whatever back end ``estimate`` picks), ``--dense-kernels lowrank`` (default; K1 of rank 50, K2 a
100-group kernel: ``fit_batch`` fits them through their factors with the mixed-model-equations back end),
``mixed`` (a 5,000-marker GRM and the 100-group kernel: the data rotated into the GRM's eigenbasis, then the
mixed-model-equations back end) or ``fullrank`` (the GRM and an RBF kernel: the dense n×n path); with fewer than
1,000 traits the time for 1,000 is projected linearly. The first ``--dense-check`` traits are refitted one by one
with ``jreml.fit`` (dense K) and the largest differences printed.
"""

from __future__ import annotations

import argparse
import time
import warnings

import jax
import numpy as np
import pandas as pd

import jreml
from jreml._backends.spectral import decompose, fit_rotated, rotate
from jreml._batch import batch_form, chunk_for, fit_batch, runs_dense
from jreml._design.build import build_design


def simulate(K, X, n_traits, rng):
    n = K.shape[0]
    w, U = np.linalg.eigh(K)
    L = U * np.sqrt(np.maximum(w, 0.0))
    h2 = rng.uniform(0.0, 0.9, n_traits)
    g = L @ rng.normal(size=(n, n_traits)) * np.sqrt(h2)
    e = rng.normal(size=(n, n_traits)) * np.sqrt(1.0 - h2)
    return X @ np.array([10.0, 0.5])[:, None] + g + e, L


def bench_kinship(args):
    ex = jreml.example("kinship")
    K = jreml.datasets.kinship_matrix()
    rng = np.random.default_rng(args.seed)
    Y, L = simulate(K, ex.X, args.traits, rng)
    ids = ex.data.id
    relmat = {"id": pd.DataFrame(K, index=ids, columns=ids)}
    data = ex.data[["id", "covariate"]]
    formula = "y ~ 1 + covariate + (1 | id)"

    t0 = time.perf_counter()
    fit_batch(formula, data, Y, relmat=relmat, chunk_size=args.chunk_size)  # compiles
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = fit_batch(formula, data, Y, relmat=relmat, chunk_size=args.chunk_size)
    t_batch = time.perf_counter() - t0

    # the fit alone, after the eigendecomposition and rotation
    design = decompose(ex.model, ex.X)
    t0 = time.perf_counter()
    Yt = rotate(design, Y.T)
    t_rotate = time.perf_counter() - t0
    size = min(args.chunk_size, args.traits)
    t0 = time.perf_counter()
    for start in range(0, args.traits, size):
        block = Yt[start : start + size]
        if block.shape[0] < size:
            block = np.concatenate([block, np.repeat(block[:1], size - block.shape[0], axis=0)])
        jax.block_until_ready(fit_rotated(design, block).loglik)
    t_fit = time.perf_counter() - t0
    rate_batch = args.traits / t_batch
    rate_fit = args.traits / (t_fit + t_rotate)
    print(f"(a) kinship n=400, {args.traits} traits")
    print(f"  fit_batch first call (compile + fit):   {t_first:8.2f} s")
    print(f"  fit_batch (formula, design, eigh, fit): {t_batch:8.2f} s  = {rate_batch:10.0f} traits/s")
    print(f"  spectral fit after eigendecomposition:  {t_fit + t_rotate:8.2f} s  = {rate_fit:10.0f} traits/s")
    print(
        f"  converged {out.converged.mean():.4f}, singular {out.singular.mean():.3f}, mean iter {out.n_iter.mean():.1f}"
    )

    single = jreml.estimate(ex.model, Y[:, 0], ex.X)  # compile
    t0 = time.perf_counter()
    loop_ll = []
    for j in range(args.n_loop):
        single = jreml.estimate(ex.model, Y[:, j], ex.X)
        loop_ll.append(float(single.loglik))
    t_loop = time.perf_counter() - t0
    rate_loop = args.n_loop / t_loop
    diff = np.max(np.abs(np.array(loop_ll) - out.loglik[: args.n_loop]))
    print(f"  loop of jreml.estimate ({args.n_loop} traits):    {t_loop:8.2f} s  = {rate_loop:10.1f} traits/s")
    print(f"    max |loglik difference| vs fit_batch: {diff:.2e}")
    print(
        f"  speed-up fit_batch / loop: {rate_batch / rate_loop:8.0f}x (spectral fit alone {rate_fit / rate_loop:.0f}x)"
    )

    if args.n_statsmodels > 0:
        from statsmodels.regression.mixed_linear_model import MixedLM, VCSpec

        n = K.shape[0]
        vc = VCSpec(["g"], [[f"c{j}" for j in range(n)]], [[L]])
        t0 = time.perf_counter()
        sm_ll = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for j in range(args.n_statsmodels):
                res = MixedLM(Y[:, j], ex.X, groups=np.zeros(n), exog_vc=vc).fit(reml=True)
                sm_ll.append(res.llf)
        t_sm = time.perf_counter() - t0
        rate_sm = args.n_statsmodels / t_sm
        gap = out.loglik[: args.n_statsmodels] - np.array(sm_ll)  # > 0: statsmodels stopped below jreml's optimum
        print(f"  statsmodels MixedLM ({args.n_statsmodels} traits):    {t_sm:8.2f} s  = {rate_sm:10.2f} traits/s")
        print(f"    loglik: statsmodels below fit_batch by > 1e-6 on {int(np.sum(gap > 1e-6))} traits (at most", end="")
        print(f" {max(gap.max(), 0.0):.2e}), above it by at most {max(-gap.min(), 0.0):.2e}")
        print(f"  speed-up fit_batch / statsmodels: {rate_batch / rate_sm:8.0f}x")


def bench_missing(args):
    """(c) Responses with missing values: each of ``--missing-traits`` kinship traits loses ``--missing-rate`` of its
    values at random (one missingness pattern per trait), fitted warm by fit_batch; every pattern needs its own
    design and eigendecomposition, and on the spectral path all share one compiled program."""
    ex = jreml.example("kinship")
    K = jreml.datasets.kinship_matrix()
    rng = np.random.default_rng(args.seed + 2)
    Y, _ = simulate(K, ex.X, args.missing_traits, rng)
    Y[rng.random(Y.shape) < args.missing_rate] = np.nan
    ids = ex.data.id
    relmat = {"id": pd.DataFrame(K, index=ids, columns=ids)}
    data = ex.data[["id", "covariate"]]
    formula = "y ~ 1 + covariate + (1 | id)"
    t0 = time.perf_counter()
    fit_batch(formula, data, Y, relmat=relmat)
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = fit_batch(formula, data, Y, relmat=relmat)
    t = time.perf_counter() - t0
    patterns = len({tuple(np.isfinite(Y[:, j])) for j in range(Y.shape[1])})
    print(f"(c) kinship n={K.shape[0]}, {Y.shape[1]} traits, {100 * args.missing_rate:g} % missing at random")
    print(f"    {patterns} missingness patterns ({len(set(out.n_obs))} numbers of rows): {t:.2f} s warm", end="")
    print(f" ({t_first:.2f} s with compilation)")
    print(f"    converged {out.converged.mean():.3f}, all on the spectral path: {bool(out.spectral.all())}")


LME4_LOOP = r"""
suppressMessages(library(lme4))
args <- commandArgs(trailingOnly = TRUE)
d <- read.csv(args[1])
responses <- grep("^y", names(d), value = TRUE)
ll <- numeric(length(responses))
elapsed <- system.time(for (j in seq_along(responses)) {
  f <- as.formula(paste(responses[j], "~ x + (x | g)"))
  ll[j] <- as.numeric(logLik(suppressMessages(lmer(f, data = d, REML = TRUE))))
})[["elapsed"]]
cat(sprintf("%.17g", c(elapsed, ll)), sep = "\n")
"""


def bench_missing_mme(args):
    """(d) Random slopes with missing values, the mixed-model-equations path: ``--missing-traits`` responses of
    y ~ x + (x | g) (60 groups of 10 rows), each losing ``--missing-rate`` of its values at random. fit_batch fits
    all missingness patterns in one compiled program (``ObservedRows``); the peers are a loop of ``jreml.fit`` (each
    number of rows compiles its own program) on the first ``--n-loop`` responses, scaled, and lme4's ``lmer`` on
    every response (timed inside R, with R's start-up left out)."""
    import os
    import shutil
    import subprocess
    import tempfile

    rng = np.random.default_rng(args.seed + 3)
    n_groups, per_group, T = 60, 10, args.missing_traits
    g = np.repeat(np.arange(n_groups), per_group)
    x = rng.normal(size=g.size)
    b = rng.multivariate_normal([0.0, 0.0], [[1.0, 0.3], [0.3, 0.5]], size=(n_groups, T))  # (groups, T, 2)
    Y = 1.0 + 0.5 * x[:, None] + b[g, :, 0] + b[g, :, 1] * x[:, None] + rng.normal(size=(g.size, T))
    Y[rng.random(Y.shape) < args.missing_rate] = np.nan
    data = pd.DataFrame({"x": x, "g": [f"g{j:02d}" for j in g]})
    formula = "y ~ x + (x | g)"
    t0 = time.perf_counter()
    fit_batch(formula, data, Y)
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = fit_batch(formula, data, Y)
    t_warm = time.perf_counter() - t0
    patterns = len({tuple(np.isfinite(Y[:, j])) for j in range(T)})
    print(f"(d) y ~ x + (x | g), n={g.size}, {T} responses, {100 * args.missing_rate:g} % missing at random")
    print(f"    {patterns} missingness patterns ({len(set(out.n_obs))} numbers of rows);", end="")
    print(f" converged {out.converged.mean():.3f}")
    print(f"  fit_batch: {t_first:.2f} s first call in the process, {t_warm:.2f} s repeated")
    n_loop = min(args.n_loop, T)
    t0 = time.perf_counter()
    loop_ll = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for j in range(n_loop):
            loop_ll.append(float(jreml.fit(formula, data.assign(y=Y[:, j])).loglik))
    t_loop = (time.perf_counter() - t0) * T / n_loop
    print(f"  loop of jreml.fit (first {n_loop}, scaled to {T}): {t_loop:.2f} s;", end="")
    print(f" fit_batch first call is {t_loop / t_first:.1f}x faster; |d loglik| <= ", end="")
    print(f"{np.max(np.abs(out.loglik[:n_loop] - np.array(loop_ll))):.1e}")
    rscript = shutil.which("Rscript")
    if rscript is None:
        print("  lme4: Rscript not on PATH")
        return
    with tempfile.TemporaryDirectory() as tmp:
        csv, script = os.path.join(tmp, "d.csv"), os.path.join(tmp, "loop.R")
        pd.concat([data, pd.DataFrame(Y, columns=[f"y{j}" for j in range(T)])], axis=1).to_csv(csv, index=False)
        with open(script, "w") as fh:
            fh.write(LME4_LOOP)
        proc = subprocess.run([rscript, script, csv], capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        print(f"  lme4: Rscript failed: {proc.stderr.strip()[-300:]}")
        return
    values = np.array(proc.stdout.split(), dtype=float)
    t_lme4, lme4_ll = values[0], values[1:]
    gap = out.loglik - lme4_ll  # > 0: lme4 stopped below jreml's optimum
    print(f"  lme4 lmer loop ({T} responses): {t_lme4:.2f} s; lme4 / fit_batch = {t_lme4 / t_first:.2f}", end="")
    print(f" (first call), {t_lme4 / t_warm:.1f} (repeated)")
    print(f"    loglik: fit_batch above lme4 by > 1e-6 on {int(np.sum(gap > 1e-6))} responses", end="")
    print(f" (at most {max(gap.max(), 0.0):.1e}), below it by > 1e-6 on {int(np.sum(gap < -1e-6))}", end="")
    print(f" (at most {max(-gap.min(), 0.0):.1e})")


def dense_kernels(n: int, kind: str, rng):
    """Two relationship matrices for (b). "lowrank": K1 = AAᵀ/50 (rank 50) and K2 = a 100-group indicator kernel
    (rank 100). "fullrank": a genomic relationship matrix of 5,000 markers and an RBF kernel on random 2-D
    coordinates (both of rank n). "mixed": that genomic relationship matrix and the 100-group kernel."""
    groups = rng.integers(0, 100, n)
    group_kernel = (groups[:, None] == groups[None, :]).astype(float)
    if kind == "lowrank":
        A = rng.normal(size=(n, 50))
        return A @ A.T / 50, group_kernel
    markers = rng.binomial(2, 0.3, (n, 5000)).astype(float)
    markers -= markers.mean(axis=0)
    K1 = markers @ markers.T / markers.shape[1]
    K1 = K1 / np.mean(np.diag(K1)) + 1e-4 * np.eye(n)
    if kind == "mixed":
        return K1, group_kernel
    coords = rng.uniform(0.0, 10.0, (n, 2))
    K2 = np.exp(-0.5 * np.sum((coords[:, None, :] - coords[None, :, :]) ** 2, axis=-1) / 1.5**2)
    return K1, K2 + 1e-6 * np.eye(n)


def bench_dense(args):
    n, T = args.dense_n, args.dense_traits
    rng = np.random.default_rng(args.seed + 1)
    K1, K2 = dense_kernels(n, args.dense_kernels, rng)
    X = np.column_stack([np.ones(n), rng.normal(size=n)])
    w1, U1 = np.linalg.eigh(K1)
    w2, U2 = np.linalg.eigh(K2)
    L1, L2 = U1 * np.sqrt(np.clip(w1, 0, None)), U2 * np.sqrt(np.clip(w2, 0, None))
    Y = X @ [1.0, 0.5] + (0.5 * L1 @ rng.normal(size=(n, T))).T + (0.3 * L2 @ rng.normal(size=(n, T))).T
    Y = Y.T + rng.normal(size=(n, T))
    data = pd.DataFrame({"x": X[:, 1], "a": np.arange(n).astype(str), "b": np.arange(n).astype(str)})
    levels = data.a.tolist()
    relmat = {"a": pd.DataFrame(K1, index=levels, columns=levels), "b": pd.DataFrame(K2, index=levels, columns=levels)}
    formula = "y ~ 1 + x + (1 | a) + (1 | b)"
    if args.dense_chunk == "auto":  # what fit_batch's chunk_size="auto" picks, so that the warm-up has that shape
        design = build_design(formula, data.assign(y=Y[:, 0]), relmat)
        fitted, _ = batch_form(design.model, spectral=False)
        chunk = chunk_for(fitted, design.X.shape[1], False, "auto", T, runs_dense(fitted, {}))
    else:
        chunk = min(int(args.dense_chunk), T)
    t0 = time.perf_counter()
    fit_batch(formula, data, Y[:, :chunk], relmat=relmat, chunk_size=chunk)
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = fit_batch(formula, data, Y, relmat=relmat, chunk_size=chunk, verbose=1)
    t = time.perf_counter() - t0
    per_trait = t / T
    print(f"(b) {args.dense_kernels} two-kernel model, n={n}, {T} traits (chunks of {chunk}): {t:.1f} s warm")
    print(f"    (first chunk, compilation included: {t_first:.1f} s); {T / t:.2f} traits/s;")
    print(f"    converged {out.converged.mean():.3f},", end="")
    print(f" mean iterations {out.n_iter.mean():.1f}, spectral path: {bool(out.spectral.any())}")
    how = "measured" if T >= 1000 else "projected (linear)"
    print(f"    1,000 traits: {1000 * per_trait:.0f} s {how}; target <= 60 s")
    # The batch against separate single fits (jreml.fit keeps K dense: no low-rank rewrite, no vmap).
    gaps = []
    for j in range(min(args.dense_check, T)):
        single = jreml.fit(formula, data.assign(y=Y[:, j]), relmat=relmat)
        relative = np.max(np.abs(out.params[j] / np.asarray(single.natural_params) - 1))
        gaps.append((abs(out.loglik[j] - float(single.loglik)), relative))
    if gaps:
        worst = np.max(np.asarray(gaps), axis=0)
        print(f"    first {len(gaps)} traits vs separate dense jreml.fit: |d loglik| <= {worst[0]:.1e}, ", end="")
        print(f"variance components within {worst[1]:.1e} relative")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--traits", type=int, default=10_000)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--n-loop", type=int, default=100)
    parser.add_argument("--n-statsmodels", type=int, default=100)
    parser.add_argument("--dense", action="store_true", help="also run (b), the dense two-kernel batch")
    parser.add_argument("--dense-n", type=int, default=2000)
    parser.add_argument("--dense-traits", type=int, default=1000)
    parser.add_argument("--dense-chunk", default="auto", help="(b): responses per chunk, or 'auto' (fit_batch's)")
    parser.add_argument("--dense-kernels", choices=("lowrank", "mixed", "fullrank"), default="lowrank")
    parser.add_argument("--dense-check", type=int, default=3, help="(b): traits cross-checked against single fits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-a", action="store_true", help="skip (a)")
    parser.add_argument("--missing", action="store_true", help="also run (c), responses with missing values")
    parser.add_argument(
        "--missing-mme", action="store_true", help="also run (d), random slopes with missing values (MME path)"
    )
    parser.add_argument("--missing-traits", type=int, default=200)
    parser.add_argument("--missing-rate", type=float, default=0.05)
    args = parser.parse_args()
    print(f"devices: {jax.devices()}")
    if not args.skip_a:
        bench_kinship(args)
    if args.dense:
        bench_dense(args)
    if args.missing:
        bench_missing(args)
    if args.missing_mme:
        bench_missing_mme(args)


if __name__ == "__main__":
    main()
