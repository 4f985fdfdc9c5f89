"""Parametric bootstrap: the vmapped refits equal a slow loop of separate estimate fits."""

import numpy as np
import pytest

import jreml
from jreml._bootstrap import bootstrap, simulate


def test_sleepstudy_bootstrap_matches_loop():
    ex = jreml.example("sleepstudy")
    fit = jreml.estimate(ex.model, ex.y, ex.X)
    boot = bootstrap(fit, 20, seed=3)
    assert len(boot) == 20
    frame = boot.to_frame()
    assert list(frame.columns) == [*fit.param_names, "beta0", "beta1", "loglik", "converged"]
    Ystar = np.asarray(simulate(fit, 20, seed=3))
    assert Ystar.shape == (20, len(ex.y))
    loop = [jreml.estimate(ex.model, y, ex.X, fit.theta, throw=False) for y in Ystar]
    np.testing.assert_allclose(boot.loglik, [float(f.loglik) for f in loop], rtol=0, atol=1e-8)
    np.testing.assert_allclose(boot.params, np.stack([f.natural_params for f in loop]), rtol=1e-7, atol=1e-9)
    np.testing.assert_array_equal(boot.converged, [bool(f.converged) for f in loop])
    ci = boot.ci(0.9)
    values = np.column_stack([np.stack([f.natural_params for f in loop]), np.stack([f.beta for f in loop])])
    values = values[np.array([bool(f.converged) for f in loop])]
    np.testing.assert_allclose(ci.iloc[:, 1], np.quantile(values, 0.05, axis=0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ci.iloc[:, 2], np.quantile(values, 0.95, axis=0), rtol=1e-6, atol=1e-9)
    assert (ci.iloc[:, 1] <= ci.iloc[:, 2]).all()
    np.testing.assert_allclose(ci.estimate.to_numpy()[-2:], np.asarray(fit.beta))
    # replicates of a correctly specified model scatter around the estimate
    assert abs(frame.beta1.mean() - float(fit.beta[1])) < 3 * float(fit.se_beta[1])


def test_singular_replicates_converge_like_separate_fits():
    """Replicates 42 and 44 (seed 0) have a singular optimum (intercept-slope correlation ±1). Each used to stop
    at max_iter: the vanishing variance's huge step shrank every other parameter's step to nothing."""
    ex = jreml.example("sleepstudy")
    fit = jreml.estimate(ex.model, ex.y, ex.X)
    boot = bootstrap(fit, 48, seed=0)
    assert boot.converged.all() and boot.n_iter.max() < 30
    Ystar = np.asarray(simulate(fit, 48, seed=0))
    for i in (42, 44):
        single = jreml.estimate(ex.model, Ystar[i], ex.X, fit.theta)
        other_start = jreml.estimate(ex.model, Ystar[i], ex.X)  # the default start reaches the same optimum
        for f in (single, other_start):
            assert bool(f.converged) and bool(f.singular)
            np.testing.assert_allclose(float(f.loglik), boot.loglik[i], rtol=0, atol=1e-8)
        np.testing.assert_allclose(boot.params[i], np.asarray(single.natural_params), rtol=1e-7, atol=1e-9)
        var0, cov, var1 = boot.params[i, :3]
        np.testing.assert_allclose(abs(cov) / np.sqrt(var0 * var1), 1.0, atol=1e-6)


def test_chunk_size_does_not_change_the_refits():
    ex = jreml.example("sleepstudy")
    fit = jreml.estimate(ex.model, ex.y, ex.X)
    auto = bootstrap(fit, 20, seed=1)
    for chunk_size in (7, None):
        other = bootstrap(fit, 20, seed=1, chunk_size=chunk_size)
        np.testing.assert_allclose(other.loglik, auto.loglik, rtol=0, atol=1e-9)
        np.testing.assert_allclose(other.params, auto.params, rtol=1e-9)
        # another chunk width may round differently (batched kernels): a convergence test within rounding of its
        # tolerance may then pass one iteration apart
        assert np.abs(other.n_iter - auto.n_iter).max() <= 1
    for bad in (0, "fast"):
        with pytest.raises(ValueError, match="chunk_size"):
            bootstrap(fit, 5, chunk_size=bad)


def test_auto_chunks_on_cpu_are_narrow_on_the_dense_path():
    """chunk_size="auto" on CPU: CPU_CHUNK replicates per device, DENSE_CPU_CHUNK on the dense n×n path (as
    fit_batch: a dense lane gains little from vmap and waits for the slowest), 256 on the spectral path."""
    from jreml._batch import DENSE_CPU_CHUNK, runs_dense
    from jreml._bootstrap import CPU_CHUNK, _chunk
    from jreml._sharding import device_count

    assert _chunk("auto", 1000) == CPU_CHUNK * device_count()
    assert _chunk("auto", 1000, dense=True) == DENSE_CPU_CHUNK * device_count()
    assert _chunk("auto", 1000, spectral=True) == 256 and _chunk(None, 1000) == 1000
    sleepstudy = jreml.example("sleepstudy").model  # the mixed-model equations, unless asked for dense
    assert not runs_dense(sleepstudy, {}) and runs_dense(sleepstudy, {"backend": "dense"})


def _loop(fit, model, X, Ystar):
    fits = [jreml.estimate(model, y, X, fit.theta, throw=False) for y in Ystar]
    return np.array([float(f.loglik) for f in fits]), np.stack([np.asarray(f.natural_params) for f in fits])


def test_kinship_bootstrap_takes_the_spectral_path():
    """σ²_g·K + σ²_e·I: replicates are refitted by the spectral path (one eigendecomposition). Its global search
    reaches the local fit from θ̂ or a higher mode, never a lower one; with an estimate option it does not know, the
    bootstrap refits with estimate itself."""
    ex = jreml.example("kinship")
    fit = jreml.estimate(ex.model, ex.y, ex.X)
    boot = bootstrap(fit, 24, seed=2)
    Ystar = np.asarray(simulate(fit, 24, seed=2))
    loglik, params = _loop(fit, ex.model, ex.X, Ystar)
    assert boot.converged.all()
    gap = boot.loglik - loglik
    assert gap.min() > -1e-8
    same = gap < 1e-8
    assert same.sum() >= 20
    np.testing.assert_allclose(boot.params[same], params[same], rtol=1e-6, atol=1e-9)
    for i in np.flatnonzero(~same):  # a higher mode: a real likelihood value at the reported θ
        at = jreml.reml_loglik(boot.theta[i], Ystar[i], ex.X, ex.model)
        np.testing.assert_allclose(float(at), boot.loglik[i], rtol=1e-10)
    dense = bootstrap(fit, 24, seed=2, backend="dense")
    np.testing.assert_allclose(dense.loglik, loglik, rtol=0, atol=1e-8)


def test_grm_plus_group_bootstrap_is_refitted_in_the_eigenbasis():
    """A genomic relationship matrix plus a grouping factor: the replicates are fitted in the GRM's eigenbasis
    through the mixed-model equations (fit_batch's form), with the same fits as separate dense estimate calls."""
    import pandas as pd

    from jreml._batch import batch_form

    rng = np.random.default_rng(11)
    n = 100
    markers = rng.binomial(2, 0.4, (n, 300)).astype(float)
    markers -= markers.mean(axis=0)
    K = markers @ markers.T / 300 + 1e-3 * np.eye(n)
    ids = [f"i{j:03d}" for j in range(n)]
    data = pd.DataFrame({"id": ids, "g": (np.arange(n) % 8).astype(str), "x": rng.normal(size=n)})
    data["y"] = 0.5 * data.x + np.linalg.cholesky(K) @ rng.normal(size=n) + rng.normal(size=8)[np.arange(n) % 8]
    data["y"] += rng.normal(size=n)
    fit = jreml.fit("y ~ x + (1 | id) + (1 | g)", data, relmat={"id": pd.DataFrame(K, index=ids, columns=ids)})
    assert batch_form(fit.model, spectral=False)[1] is not None
    boot = bootstrap(fit, 12, seed=4)
    loglik, params = _loop(fit, fit.model, fit.X, np.asarray(simulate(fit, 12, seed=4)))
    np.testing.assert_allclose(boot.loglik, loglik, rtol=0, atol=1e-8)
    # Two runs of the loop from different bases stop within its tolerance (tol_delta = 1e-6 in log-variance).
    np.testing.assert_allclose(boot.params, params, rtol=5e-6, atol=1e-9)
