"""Cost of a gradient through a REML fit: implicit differentiation vs the fit itself vs unrolled iterations.

Model: V = σ²_k·RBF(coords; ℓ) + σ²_g·K + σ²_e·I (a spatial kernel, a fixed relationship matrix and a
residual), n observations, X = [1, x]. The scalar differentiated is Σθ̂ + Σβ̂, with respect to y and ℓ.

- fit: ``jreml.estimate`` (jitted, warm).
- implicit backward: ``jax.vjp`` of the fit is formed once (jitted forward), then the VJP function alone is
  timed (jitted): the backward part of a gradient through the fit.
- gradient overhead: (``jax.value_and_grad`` of the objective − the fit) / the fit, i.e. everything a gradient
  adds to a fit (the forward residuals of the implicit rule — M·V_k, the observed information — and the
  backward pass). Target: ≤ 0.5 at n = 2000 (the stricter of the two readings of "one implicit gradient
  relative to the fit"; the backward-only ratio is printed too).
- unrolled: the same number of AI iterations as the fit used, written as a ``lax.scan`` of
  ``jreml._solvers.loop.evaluate`` + ``solve_information`` (no step control), differentiated by ``jax.grad``
  (reverse mode through every iteration). Compared with ``jax.value_and_grad`` of the implicit version.

Peak memory is XLA's temp allocation of the compiled program (``memory_analysis().temp_size_in_bytes``).
Timings are warm medians with ``block_until_ready``.

    python benchmarks/bench_gradients.py --sizes 500 1000 2000 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jreml
from jreml._backends.dense import DenseBackend
from jreml._solvers.base import solve_information
from jreml._solvers.loop import evaluate
from jreml.covariance import FixedMatrix, KernelMatrix, ScalarMatrix

DENSE = DenseBackend()


def make_problem(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    coords = rng.uniform(0.0, 10.0, (n, 2))
    markers = rng.binomial(2, 0.3, (n, 200)).astype(float)
    markers -= markers.mean(axis=0)
    K = markers @ markers.T / markers.shape[1]
    K = K / np.mean(np.diag(K)) + 1e-3 * np.eye(n)
    d2 = np.sum((coords[:, None, :] - coords[None, :, :]) ** 2, axis=-1)
    spatial = np.exp(-0.5 * d2 / 1.5**2)
    X = np.column_stack([np.ones(n), coords[:, 0]])
    cov = 1.0 * spatial + 0.5 * K + 0.7 * np.eye(n)
    y = X @ np.array([1.0, 0.2]) + np.linalg.cholesky(cov) @ rng.normal(size=n)
    return jnp.asarray(coords), jnp.asarray(K), jnp.asarray(y), jnp.asarray(X)


def model_builder(coords, K):
    """ℓ ↦ model; the fixed terms are built once, outside any trace (FixedMatrix checks K's symmetry)."""
    fixed, residual = FixedMatrix(K), ScalarMatrix(coords.shape[0])
    return lambda ell: KernelMatrix(coords, ell) + fixed + residual


def timed(fn, *args, repeats: int):
    jax.block_until_ready(fn(*args))  # warm-up (compilation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed_together(calls, repeats: int):
    """Median wall times of several (fn, args) pairs called in turn, so that load from other processes hits all."""
    for fn, args in calls:
        jax.block_until_ready(fn(*args))  # warm-up (compilation)
    times = [[] for _ in calls]
    for _ in range(repeats):
        for (fn, args), bucket in zip(calls, times, strict=True):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            bucket.append(time.perf_counter() - start)
    return [statistics.median(bucket) for bucket in times]


def temp_bytes(jitted, *args):
    try:
        analysis = jitted.lower(*args).compile().memory_analysis()
        return getattr(analysis, "temp_size_in_bytes", None)
    except Exception:  # not every backend reports it
        return None


def fmt_bytes(b):
    return "n/a" if b is None else f"{b / 2**20:.1f} MiB"


def run(n: int, repeats: int):
    coords, K, y, X = make_problem(n)
    ell = jnp.asarray(1.5)
    model_for = model_builder(coords, K)

    def fit(yy, ll):
        return jreml.estimate(model_for(ll), yy, X)

    def objective(yy, ll):
        r = fit(yy, ll)
        return jnp.sum(r.theta) + jnp.sum(r.beta)

    fit_jit = jax.jit(lambda yy, ll: fit(yy, ll).theta)
    result = fit(y, ell)
    iterations = int(result.n_iter)

    forward = jax.jit(lambda yy, ll: jax.vjp(objective, yy, ll))
    _, vjp_fn = forward(y, ell)
    backward = jax.jit(lambda f, ct: f(ct))
    one = jnp.ones((), y.dtype)
    implicit_grad = jax.jit(jax.value_and_grad(objective, argnums=(0, 1)))
    t_fit, t_bwd, t_implicit = timed_together(
        [(fit_jit, (y, ell)), (backward, (vjp_fn, one)), (implicit_grad, (y, ell))], repeats=repeats
    )
    mem_implicit = temp_bytes(implicit_grad, y, ell)

    theta0 = result.history.theta[0]

    def unrolled(yy, ll):
        model = model_for(ll)

        def step(theta, _):
            ev = evaluate(theta, yy, X, model, reml=True, information="ai", backend=DENSE, state=None)
            return theta + solve_information(ev.information, ev.score), None

        theta, _ = jax.lax.scan(step, theta0, None, length=iterations)
        ev = evaluate(theta, yy, X, model, reml=True, information="none", backend=DENSE, state=None)
        return jnp.sum(theta) + jnp.sum(ev.beta)

    unrolled_grad = jax.jit(jax.value_and_grad(unrolled, argnums=(0, 1)))
    t_unrolled = timed(unrolled_grad, y, ell, repeats=repeats)
    mem_unrolled = temp_bytes(unrolled_grad, y, ell)

    (_, (gy_i, gl_i)), (_, (gy_u, gl_u)) = implicit_grad(y, ell), unrolled_grad(y, ell)
    agree = float(jnp.max(jnp.abs(gy_i - gy_u)) / jnp.max(jnp.abs(gy_i)))
    print(
        f"n={n:5d}  AI iterations {iterations:2d} | fit {t_fit * 1e3:9.1f} ms | implicit backward "
        f"{t_bwd * 1e3:8.1f} ms  ratio {t_bwd / t_fit:5.2f} | gradient overhead {(t_implicit - t_fit) / t_fit:5.2f} "
        f"| value_and_grad: implicit {t_implicit * 1e3:9.1f} ms "
        f"({fmt_bytes(mem_implicit)}), unrolled {t_unrolled * 1e3:9.1f} ms ({fmt_bytes(mem_unrolled)}) | "
        f"rel. diff of dy {agree:.1e}, dℓ {float(gl_i):.4g} vs {float(gl_u):.4g}",
        flush=True,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 1000, 2000])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs, load average {load:.2f}")
    for n in args.sizes:
        run(n, args.repeats)


if __name__ == "__main__":
    main()
