"""The CPU lowering that keeps jaxlib's batched LAPACK kernels from deadlocking (jreml/_lapack_guard.py)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.linalg import solve_triangular

from jreml import _lapack_guard

pytestmark = pytest.mark.skipif(not _lapack_guard.active(), reason="guard not installed (jaxlib >= 0.11.2)")

# Two lanes of a 600 × 600 dense fit hung in every run on jaxlib 0.10.2 before the guard (0 % CPU, both
# pool workers in jax::ParallelBatchMap). A subprocess with a timeout turns a hang into a failure.
HANG_REPRO = r"""
import jax, jax.numpy as jnp, numpy as np
import jreml
from jreml.covariance import FixedMatrix, ScalarMatrix
n = 600
rng = np.random.default_rng(0)
G = rng.standard_normal((n, 300)); K = G @ G.T / 300 + 1e-3 * np.eye(n)
model = FixedMatrix(jnp.asarray(K)) + ScalarMatrix(n)
X = jnp.ones((n, 1)); Y = jnp.asarray(rng.standard_normal((2, n)))
fit = jax.jit(jax.vmap(lambda y: jreml.estimate(model, y, X, max_iter=1, throw=False).loglik))
print(np.asarray(fit(Y)).tolist())
"""


def _spd_batch(lanes, m, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((lanes, m, m))
    return jnp.asarray(a @ a.transpose(0, 2, 1) + m * np.eye(m))


def test_lanes_per_call_keeps_calls_below_the_split():
    assert _lapack_guard.lanes_per_call(1, 10**9) == 1
    assert _lapack_guard.lanes_per_call(1000, 8) == 1000  # tiny matrices: one batched call
    work = _lapack_guard.per_matrix_work([(36, 36)])
    group = _lapack_guard.lanes_per_call(1000, work)
    assert 1 <= group < 1000 and group * work < 200_000
    assert _lapack_guard.lanes_per_call(4, _lapack_guard.per_matrix_work([(600, 600), (600, 1)])) == 1


def test_vmapped_dense_fit_no_longer_hangs():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", HANG_REPRO], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loglik = eval(proc.stdout.strip().splitlines()[-1])
    assert len(loglik) == 2 and all(np.isfinite(loglik))


def test_large_batched_call_is_lowered_as_a_loop_small_one_stays_batched():
    big = jax.jit(jax.vmap(jnp.linalg.cholesky)).lower(_spd_batch(3, 80)).as_text()
    small = jax.jit(jax.vmap(jnp.linalg.cholesky)).lower(_spd_batch(3, 4)).as_text()
    assert "while" in big and "tensor<80x80xf64>" in big
    assert "while" not in small and "tensor<3x4x4xf64>" in small


@pytest.mark.parametrize("m", [4, 60, 200])
def test_results_equal_the_unbatched_kernel_bit_for_bit(m):
    a = _spd_batch(5, m, seed=m)
    b = jnp.asarray(np.random.default_rng(1).standard_normal((5, m, 3)))

    def work(a, b):
        chol = jnp.linalg.cholesky(a)
        w, v = jnp.linalg.eigh(a)
        return chol, solve_triangular(chol, b, lower=True), w, jnp.abs(v), jnp.linalg.qr(a)[1]

    batched = jax.jit(jax.vmap(work))(a, b)
    single = jax.jit(work)
    for lane in range(5):
        expected = single(a[lane], b[lane])
        for got, want in zip(batched, expected, strict=True):
            np.testing.assert_array_equal(np.asarray(got[lane]), np.asarray(want))


def test_reverse_mode_through_the_looped_lowering():
    a = _spd_batch(4, 70, seed=3)

    def logdet(x):
        return 2.0 * jnp.sum(jnp.log(jnp.diagonal(jnp.linalg.cholesky(x))))

    grads = jax.jit(jax.vmap(jax.grad(logdet)))(a)
    for lane in range(4):
        np.testing.assert_allclose(np.asarray(grads[lane]), np.linalg.inv(np.asarray(a[lane])), rtol=1e-8, atol=1e-12)
