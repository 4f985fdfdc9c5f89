"""Cost of one AI-REML iteration on a dense two-kernel model, against the dense linear-algebra floor.

Model, for each n in ``--sizes`` (default 500 1000 2000 4000)::

    V(θ) = s1·K1 + s2·K2 + s3·I      FixedMatrix(K1) + FixedMatrix(K2) + ScalarMatrix(n),  s = exp(θ)
    K1 = W Wᵀ / m                     genomic relationship matrix of m random, centred 0/1/2 markers
    K2 = exp(−(x_i − x_j)² / 2)       RBF kernel (length scale 1) of random coordinates x ~ U(0, 10)
    X = [1, x1],  y ~ N(Xβ, V(θ_true))

Measured, at the fixed θ = θ_true, each function jit-compiled once and then called warm; every call ends
with ``jax.block_until_ready`` and the figure is the median (and the minimum) over several calls:

* ``t_ai_iter``: one AI iteration = ``jreml._solvers.loop.evaluate(..., information="ai")`` (Cholesky of V,
  GLS β̂, ℓ, the trace weight P, the score by one VJP, V_k·Py by k JVPs, the k×k average information)
  followed by the k×k solve ``jreml._solvers.base.solve_information(AI, score)``.
* ``t_floor``: what any dense REML iteration must at least pay: one Cholesky of an n×n SPD matrix and the
  Cholesky-based inverse ``cho_solve((L, True), I)``, jitted on its own.
* ``ratio = t_ai_iter / t_floor`` (target: ≤ 1.5 at n ≥ 2000); ``ratio_min`` is the same ratio of the
  minima, which is less sensitive to other processes competing for the CPU.
* ``cores``: process CPU time / wall time during the timed calls (≈ how many threads XLA kept busy).

``--breakdown`` also times the pieces of the AI iteration separately (building V, Cholesky, the trace
weight, the score VJP, the JVPs, ...) to show where the time above the floor goes.

The Cholesky factorisation and triangular solves are LAPACK/BLAS custom calls that jaxlib runs on scipy's
OpenBLAS, which has its own thread pool next to XLA's. On a machine shared with other processes, its
default threading can stall single calls by up to ~1 s; ``--blas-threads 1`` sets OpenBLAS to one thread
(the script prints the setting in use).

Run: ``python benchmarks/bench_dense.py`` (≈ 1–3 min on 2 CPU cores) or ``--sizes 500 1000`` for a quick run.
No timing is asserted; the script always exits 0.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from _blas import blas_report, load_average
from jax.scipy.linalg import cho_solve

import jreml
from jreml._backends.dense import DenseBackend
from jreml._backends.dense.likelihood import _dv_times, _score_vjp, core, derivatives_at, trace_weight
from jreml._solvers.base import solve_information
from jreml._solvers.loop import evaluate
from jreml.covariance import FixedMatrix, ScalarMatrix

TARGET_RATIO = 1.5
TARGET_MIN_N = 2000
TRUE_VARIANCES = (0.5, 0.3, 1.0)  # s1 (markers), s2 (RBF), s3 (residual)


def default_repeats(n: int) -> int:
    """Fewer timed calls at large n (the floor alone is ~1 s at n = 4000 on 2 cores)."""
    if n <= 500:
        return 15
    if n <= 1000:
        return 9
    if n <= 2000:
        return 5
    return 3


def simulate(n: int, markers: int, seed: int):
    """K1 (markers), K2 (RBF), X, y and θ_true for one problem size."""
    rng = np.random.default_rng(seed + n)
    freq = rng.uniform(0.05, 0.5, size=markers)
    W = rng.binomial(2, freq, size=(n, markers)).astype(np.float64)
    W -= W.mean(axis=0)
    K1 = W @ W.T / markers
    K1 = 0.5 * (K1 + K1.T)
    coords = rng.uniform(0.0, 10.0, size=n)
    K2 = np.exp(-0.5 * (coords[:, None] - coords[None, :]) ** 2)
    K2 = 0.5 * (K2 + K2.T)
    X = np.column_stack([np.ones(n), rng.normal(size=n)])
    s1, s2, s3 = TRUE_VARIANCES
    V = s1 * K1 + s2 * K2 + s3 * np.eye(n)
    y = X @ np.array([1.0, 0.5]) + np.linalg.cholesky(V) @ rng.normal(size=n)
    theta = np.log(np.asarray(TRUE_VARIANCES))
    model = FixedMatrix(K1, name="markers") + FixedMatrix(K2, name="rbf") + ScalarMatrix(n, name="Residual")
    return model, jnp.asarray(y), jnp.asarray(X), jnp.asarray(theta), jnp.asarray(V)


class Timing(NamedTuple):
    first: float  # seconds of the first call (compilation included)
    median: float
    min: float
    cores: float  # process CPU seconds / wall seconds over the timed calls


def timed(*calls, repeats: int) -> list[Timing]:
    """Time each ``(fn, args)`` in ``calls``: one first (compiling) call, then ``repeats`` warm rounds.

    The calls are interleaved round by round (a, b, a, b, ...), so that a burst of load from another
    process hits all of them alike and their ratio stays meaningful on a shared machine.
    """
    firsts = []
    for fn, args in calls:
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        firsts.append(time.perf_counter() - start)
    walls = [[] for _ in calls]
    cpus = [[] for _ in calls]
    for _ in range(repeats):
        for i, (fn, args) in enumerate(calls):
            c0, w0 = time.process_time(), time.perf_counter()
            jax.block_until_ready(fn(*args))
            walls[i].append(time.perf_counter() - w0)
            cpus[i].append(time.process_time() - c0)
    return [
        Timing(f, statistics.median(w), min(w), sum(c) / max(sum(w), 1e-12))
        for f, w, c in zip(firsts, walls, cpus, strict=True)
    ]


@eqx.filter_jit
def ai_iteration(model, theta, y, X):
    ev = evaluate(theta, y, X, model, reml=True, information="ai", backend=DenseBackend(), state=None)
    return ev.loglik, theta + solve_information(ev.information, ev.score)


@jax.jit
def floor(A):
    L = jnp.linalg.cholesky(A)
    return cho_solve((L, True), jnp.eye(A.shape[0], dtype=A.dtype))


# ----- pieces of the AI iteration (for --breakdown); each takes precomputed inputs -----


@eqx.filter_jit
def piece_build_v(model, theta):
    V = model(theta)
    return 0.5 * (V + V.T)


@jax.jit
def piece_cholesky(V):
    return jnp.linalg.cholesky(V)


@jax.jit
def piece_cho_solve_identity(L):
    return cho_solve((L, True), jnp.eye(L.shape[0], dtype=L.dtype))


@eqx.filter_jit
def piece_core(model, theta, y, X):
    return core(theta, y, X, model, True)


@jax.jit
def piece_trace_weight(c):
    return trace_weight(c, True)


@eqx.filter_jit
def piece_score_vjp(model, theta, weight, p_y):
    return _score_vjp(theta, model, weight, p_y)


@eqx.filter_jit
def piece_dv_times(model, theta, p_y):
    return _dv_times(theta, model, p_y)


@jax.jit
def piece_ai_product(weight, dv_py):
    return 0.5 * dv_py.T @ (weight @ dv_py)


@eqx.filter_jit
def piece_derivatives(model, theta, y, X, c):
    return derivatives_at(theta, y, X, model, c, reml=True, information="ai", derivatives="auto")


def breakdown(model, theta, y, X, V, repeats: int):
    """Time the pieces of one AI iteration (interleaved with the whole iteration and the floor)."""
    c = piece_core(model, theta, y, X)
    L = piece_cholesky(V)
    weight = piece_trace_weight(c)
    dv_py = piece_dv_times(model, theta, c.p_y)
    rows = [
        ("one AI iteration (evaluate + solve)", ai_iteration, (model, theta, y, X)),
        ("floor: cholesky + cho_solve(L, I)", floor, (V,)),
        ("build V = Σ s_k K_k, symmetrise", piece_build_v, (model, theta)),
        ("cholesky(V)", piece_cholesky, (V,)),
        ("core(): build V + chol + GLS + loglik", piece_core, (model, theta, y, X)),
        ("cho_solve(L, I)", piece_cho_solve_identity, (L,)),
        ("trace_weight(): cho_solve(L, I) - B Bᵀ", piece_trace_weight, (c,)),
        ("score: VJP of θ ↦ V(θ)", piece_score_vjp, (model, theta, weight, c.p_y)),
        ("V_k·Py: k JVPs (lax.map)", piece_dv_times, (model, theta, c.p_y)),
        ("AI = ½ Uᵀ P U", piece_ai_product, (weight, dv_py)),
        ("derivatives_at(): all but core()", piece_derivatives, (model, theta, y, X, c)),
    ]
    timings = timed(*[(fn, args) for _, fn, args in rows], repeats=repeats)
    total = timings[0].min
    print(f"    {'piece':<42} {'median_s':>9} {'min_s':>9} {'min, % of AI iter':>17}")
    for (name, _, _), t in zip(rows, timings, strict=True):
        print(f"    {name:<42} {t.median:9.4f} {t.min:9.4f} {100 * t.min / total:16.1f}%")


def environment_report(blas_threads: int | None):
    dev = jax.devices()[0]
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = f"jax {jax.__version__}, jreml {jreml.__version__}, numpy {np.__version__}"
    print(f"{versions}, python {platform.python_version()}")
    print(f"backend: {jax.default_backend()}, device: {dev.device_kind} ({dev.platform}), count: {len(jax.devices())}")
    print(f"CPU: {platform.machine()}, os.cpu_count() = {os.cpu_count()}, usable cores = {affinity}")
    print(f"dtype: {jreml.float_dtype()}; XLA_FLAGS = {os.environ.get('XLA_FLAGS', '(unset)')!r}")
    print(
        "threading: XLA:CPU runs its own ops (fusions, dots) on an intra-op pool of one thread per usable core "
        "(--xla_cpu_multi_thread_eigen defaults to true); cholesky/triangular solves are LAPACK/BLAS custom calls"
    )
    print(f"  {blas_report(blas_threads)}")
    m = 2000
    A = jnp.asarray(np.random.default_rng(0).normal(size=(m, m)))
    (t,) = timed((jax.jit(lambda a: a @ a), (A,)), repeats=5)
    print(
        f"  measured: {m}x{m} float64 matmul {t.median * 1e3:.1f} ms (median) = "
        f"{2 * m**3 / t.median / 1e9:.1f} GFLOP/s, {t.cores:.2f} cores busy"
    )
    print(f"  {load_average()}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 1000, 2000, 4000], help="values of n")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per size (default: 15/9/5/3 by n)")
    parser.add_argument("--markers", type=int, default=1000, help="number of markers m in K1 = W Wᵀ/m")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--breakdown", action="store_true", help="also time the pieces of the AI iteration")
    parser.add_argument(
        "--blas-threads", type=int, default=None, help="set OpenBLAS's thread count (default: leave it as is)"
    )
    args = parser.parse_args(argv)

    wall0 = time.perf_counter()
    environment_report(args.blas_threads)
    print()
    header = (
        f"{'n':>6} {'t_ai_iter_s':>12} {'t_floor_s':>10} {'ratio':>6} {'ratio_min':>9} "
        f"{'min_ai_s':>9} {'min_floor_s':>11} {'cores_ai':>8} {'cores_fl':>8} {'compile_s':>9} {'reps':>4}"
    )
    print("t_* = median of warm calls; ratio = t_ai_iter / t_floor; ratio_min = min_ai / min_floor")
    print(header)
    results = []
    for n in args.sizes:
        repeats = args.repeats or default_repeats(n)
        model, y, X, theta, V = simulate(n, args.markers, args.seed)
        ai, fl = timed((ai_iteration, (model, theta, y, X)), (floor, (V,)), repeats=repeats)
        ratio, ratio_min = ai.median / fl.median, ai.min / fl.min
        results.append((n, ratio, ratio_min))
        print(
            f"{n:6d} {ai.median:12.4f} {fl.median:10.4f} {ratio:6.2f} {ratio_min:9.2f} "
            f"{ai.min:9.4f} {fl.min:11.4f} {ai.cores:8.2f} {fl.cores:8.2f} {ai.first:9.2f} {repeats:4d}",
            flush=True,
        )
        if args.breakdown:
            breakdown(model, theta, y, X, V, repeats)
        del model, y, X, theta, V
    print()
    print(f"target: ratio <= {TARGET_RATIO} at n >= {TARGET_MIN_N}")
    checked = [r for r in results if r[0] >= TARGET_MIN_N]
    for n, ratio, ratio_min in checked:
        verdict = "meets" if ratio <= TARGET_RATIO else "MISSES"
        print(f"  n = {n}: ratio {ratio:.2f} (of minima {ratio_min:.2f}) -> {verdict} the target")
    if not checked:
        print(f"  (no size >= {TARGET_MIN_N} was run)")
    print(load_average())
    print(f"total wall time {time.perf_counter() - wall0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
