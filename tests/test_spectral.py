"""Spectral fast path (V = s2g*K + s2e*I) against the dense estimate and the exact reference values."""

import numpy as np
import pandas as pd
import pytest

import jreml
from jreml._backends.spectral import decompose, fit_padded, fit_rotated, rotate, spectral_form, spectral_solve

TRAITS = [f"trait{i}" for i in range(1, 9)]
TIGHT = dict(tol_score=1e-10, tol_delta=1e-10, tol_loglik=1e-12)


@pytest.fixture(scope="module")
def kinship():
    ex = jreml.example("kinship")
    Y = ex.data[TRAITS].to_numpy(float).T
    return ex, Y, spectral_solve(ex.model, Y, ex.X)


def test_spectral_form_detection():
    ex = jreml.example("kinship")
    form = spectral_form(ex.model)
    assert form is not None and form.kernel_index == 0 and form.residual_index == 1
    np.testing.assert_allclose(form.kernel, jreml.datasets.kinship_matrix())
    assert spectral_form(jreml.example("dyestuff").model) is not None  # iid intercept: kernel Z Z'
    assert spectral_form(jreml.example("sleepstudy").model) is None
    assert spectral_form(jreml.example("penicillin").model) is None


def test_matches_reference(kinship, reference):
    ex, Y, fit = kinship
    ref = reference("kinship_visible")["traits"]
    assert bool(np.all(fit.converged))
    for i, trait in enumerate(TRAITS):
        r = ref[trait]
        s2g, s2e = np.asarray(fit.natural_params[i])
        np.testing.assert_allclose([s2g, s2e, float(fit.h2[i])], [r["s2g"], r["s2e"], r["h2"]], rtol=1e-5)
        np.testing.assert_allclose(float(fit.loglik[i]), r["reml_loglik"], atol=1e-6, rtol=0)
        np.testing.assert_allclose(np.asarray(fit.beta[i]), list(r["beta"].values()), rtol=1e-5)


def test_matches_dense_estimate(kinship):
    ex, Y, fit = kinship
    for i in range(len(TRAITS)):
        dense = jreml.estimate(ex.model, Y[i], ex.X, **TIGHT)
        np.testing.assert_allclose(float(fit.loglik[i]), float(dense.loglik), rtol=0, atol=1e-8)
        np.testing.assert_allclose(fit.natural_params[i], dense.natural_params, rtol=1e-8)
        np.testing.assert_allclose(fit.theta[i], dense.theta, rtol=0, atol=1e-8)
        np.testing.assert_allclose(fit.beta[i], dense.beta, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(fit.se_beta[i], dense.se_beta, rtol=1e-8)
        np.testing.assert_allclose(fit.vcov_theta[i], dense.vcov_theta, rtol=1e-7, atol=1e-9)
        # h2 SE: delta method on the inverse AI of the dense fit
        s2g, s2e = np.asarray(dense.natural_params)
        h2 = s2g / (s2g + s2e)
        grad = np.array([h2 * (1 - h2), -h2 * (1 - h2)])  # d h2 / d log-variances
        se = np.sqrt(grad @ np.asarray(dense.vcov_theta) @ grad)
        np.testing.assert_allclose(float(fit.h2_se[i]), se, rtol=1e-7)


def test_single_response_and_ml(kinship):
    ex, Y, _ = kinship
    one = spectral_solve(ex.model, Y[2], ex.X)
    assert one.loglik.shape == ()
    ml = spectral_solve(ex.model, Y[2], ex.X, method="ml")
    dense = jreml.estimate(ex.model, Y[2], ex.X, method="ml", **TIGHT)
    np.testing.assert_allclose(float(ml.loglik), float(dense.loglik), rtol=0, atol=1e-8)
    np.testing.assert_allclose(ml.natural_params, dense.natural_params, rtol=1e-7)


def test_boundary_and_iid_kernel():
    ex = jreml.example("kinship")
    rng = np.random.default_rng(1)
    y = ex.X @ np.array([1.0, 0.5]) + rng.normal(size=len(ex.y))  # no genetic variance at all
    fit = spectral_solve(ex.model, y, ex.X, design=decompose(ex.model, ex.X))
    dense = jreml.estimate(ex.model, y, ex.X, **TIGHT)
    assert bool(fit.converged)
    np.testing.assert_allclose(float(fit.loglik), float(dense.loglik), rtol=0, atol=1e-7)
    if bool(dense.singular):
        assert bool(fit.singular) and float(fit.h2) < 1e-6
    # dyestuff: random intercept = kernel Z Z'
    dy = jreml.example("dyestuff")
    fit = spectral_solve(dy.model, dy.y, dy.X)
    dense = jreml.estimate(dy.model, dy.y, dy.X, **TIGHT)
    np.testing.assert_allclose(float(fit.loglik), float(dense.loglik), rtol=0, atol=1e-8)
    np.testing.assert_allclose(fit.natural_params, dense.natural_params, rtol=1e-7)


def test_straggler_like_traits_converge_fast():
    """h2 ~ 1 (no residual noise beyond the kernel) and h2 = 0 traits in one batch with ordinary ones: each converges
    in a few iterations (a vmapped loop runs as long as its slowest response) and matches the dense fit.

    With h2 ~ 1 the REML surface is flat to rounding as s2e -> 0 (the kinship is centred, so the intercept lies in
    its null space): the dense fit stops anywhere below ~1e-8 s2g with a loglik known to ~1e-5, and the spectral
    fit holds s2e at 1e-8 s2g (singular)."""
    ex = jreml.example("kinship")
    K = jreml.datasets.kinship_matrix()
    rng = np.random.default_rng(7)
    w, U = np.linalg.eigh(K)
    L = U * np.sqrt(np.maximum(w, 0.0))
    mean = ex.X @ np.array([10.0, 0.5])
    n = len(mean)
    Y = np.stack(
        [
            mean + L @ rng.normal(size=n),  # h2 = 1
            mean + L @ rng.normal(size=n) + 1e-3 * rng.normal(size=n),  # h2 ~ 1 - 1e-6
            mean + rng.normal(size=n),  # h2 = 0
            mean + L @ rng.normal(size=n) + 0.5 * rng.normal(size=n),  # h2 ~ 0.8
            mean + 0.3 * L @ rng.normal(size=n) + rng.normal(size=n),  # h2 ~ 0.08
        ]
    )
    fit = spectral_solve(ex.model, Y, ex.X)
    assert bool(np.all(fit.converged)) and int(np.max(fit.n_iter)) <= 30
    for i in range(len(Y)):
        dense = jreml.estimate(ex.model, Y[i], ex.X, **TIGHT)
        if i < 2:  # h2 ~ 1
            assert bool(fit.singular[i]) and float(fit.h2[i]) > 1 - 1e-7
            assert float(fit.loglik[i]) > float(dense.loglik) - 5e-5
            np.testing.assert_allclose(fit.natural_params[i, 0], dense.natural_params[0], rtol=1e-3)
            assert float(fit.natural_params[i, 1]) < 1e-7 and float(dense.natural_params[1]) < 1e-7
            continue
        np.testing.assert_allclose(float(fit.loglik[i]), float(dense.loglik), rtol=0, atol=1e-8)
        assert bool(fit.singular[i]) == bool(dense.singular)
        if bool(dense.singular):
            np.testing.assert_allclose(fit.natural_params[i], dense.natural_params, rtol=1e-6)
        else:
            np.testing.assert_allclose(fit.natural_params[i], dense.natural_params, rtol=1e-7)
            np.testing.assert_allclose(fit.beta[i], dense.beta, rtol=1e-8, atol=1e-10)
            np.testing.assert_allclose(fit.vcov_theta[i], dense.vcov_theta, rtol=1e-6, atol=1e-9)


def _grid_max_profiled_reml(K, y):
    """Brute force: the largest profiled REML log-likelihood (intercept only, σ²_e profiled out) over a fine grid of
    log(σ²_k/σ²_e) from the lower bound (1e-14) to the singular threshold (1e8) — at most the global maximum."""
    n = len(y)
    lam, U = np.linalg.eigh(K)
    lam = np.maximum(lam, 0.0)
    x, r = U.T @ np.ones(n), U.T @ (y - y.mean())
    dl = np.exp(np.linspace(np.log(1e-14), np.log(1e8), 40_001))[:, None] * lam
    w = 1.0 / (dl + 1.0)
    C, b = w @ (x * x), w @ (x * r)
    Q = w @ (r * r) - b * b / C
    m = n - 1
    f = -0.5 * (m * (np.log(Q / m) + 1 + np.log(2 * np.pi)) + np.log1p(dl).sum(1) + np.log(C))
    return float(f.max())


def test_bimodal_profile_finds_global_maximum():
    """A trait whose profiled REML curve has a mode at s2g -> 0 and a narrower, higher interior mode between the
    points of a coarse start grid: Newton from the best grid point alone ended at the boundary (loglik 6e-3 below the
    global maximum); the fit must reach the global maximum."""
    n, T, seed, trait = 100, 200, 1, 55
    K = jreml.datasets.kinship_matrix()[:n, :n]
    L = np.linalg.cholesky(K + 1e-6 * np.eye(n))
    rng = np.random.default_rng(seed)
    h2 = rng.uniform(0.0, 0.3, T)
    Y = 10.0 + (L @ rng.normal(size=(n, T))) * np.sqrt(h2) + rng.normal(size=(n, T)) * np.sqrt(1 - h2)
    Y = Y[:, trait - 2 : trait + 3]  # the bimodal trait and four ordinary ones
    ids = [f"i{j}" for j in range(n)]
    fit = jreml.fit_batch(
        "y ~ 1 + (1 | id)", pd.DataFrame({"id": ids}), Y, relmat={"id": pd.DataFrame(K, index=ids, columns=ids)}
    )
    assert bool(fit.spectral.all()) and bool(fit.converged.all())
    for j in range(Y.shape[1]):
        best = _grid_max_profiled_reml(K, Y[:, j])
        assert float(fit.loglik[j]) >= best - 1e-7, (j, float(fit.loglik[j]), best)
        assert float(fit.loglik[j]) <= best + 1e-5  # the grid is fine enough to be close
    assert 0.01 < float(fit.h2[2]) < 0.3 and not bool(fit.singular[2])  # the interior mode, not the boundary


FLOAT32_SCRIPT = r"""
import json, sys
import numpy as np
import jreml
from jreml._backends.spectral import spectral_solve
from jreml.covariance import FixedMatrix, ScalarMatrix
assert jreml.float_dtype() == np.float32
K = jreml.datasets.kinship_matrix()
n = K.shape[0]
rng = np.random.default_rng(0)
L = np.linalg.cholesky(K + 1e-8 * np.eye(n))
Y = (L @ rng.normal(size=(n, 200))).T * 0.7 + rng.normal(size=(200, n))
out = spectral_solve(FixedMatrix(K) + ScalarMatrix(n), Y)
json.dump({"converged": np.asarray(out.converged).tolist(), "n_iter": np.asarray(out.n_iter).tolist(),
           "h2": np.asarray(out.h2, dtype=float).tolist()}, sys.stdout)
"""


def test_float32_fits_converge():
    """Convergence tests are floored at the dtype's rounding level: with float32 and the default tolerances,
    4 of these 200 traits used to run to max_iter (200 iterations)."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "JAX_ENABLE_X64": "0"}
    proc = subprocess.run([sys.executable, "-c", FLOAT32_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(out["converged"]) and max(out["n_iter"]) <= 20
    Y_h2 = np.asarray(out["h2"])
    assert np.all((Y_h2 >= 0) & (Y_h2 <= 1))


@pytest.mark.parametrize("method", ["reml", "ml"])
def test_padded_fits_equal_their_own_designs(kinship, method):
    """fit_padded: responses of designs with different numbers of rows (missingness patterns), zero-padded to one
    length in one program, fit exactly as each does alone with its own design."""
    ex, Y, _ = kinship
    rng = np.random.default_rng(0)
    designs, rotated, alone = [], np.zeros((3, 400)), []
    for t in range(3):
        keep = np.ones(400, bool)
        keep[rng.choice(400, 7 * t, replace=False)] = False
        K = np.asarray(ex.model.terms[0].K)[np.ix_(keep, keep)]  # the kinship model σ²_g·K + σ²_e·I on the kept rows
        model = jreml.covariance.FixedMatrix(K, name="g") + jreml.covariance.ScalarMatrix(
            int(keep.sum()), name="Residual"
        )
        design = decompose(model, np.asarray(ex.X)[keep])
        values = rotate(design, Y[t, keep])
        designs.append(design)
        rotated[t, : keep.sum()] = values[0]
        alone.append(fit_rotated(design, values, method=method))
    out = fit_padded(designs, rotated, method=method)
    for t, single in enumerate(alone):
        np.testing.assert_allclose(float(out.loglik[t]), float(single.loglik[0]), rtol=0, atol=1e-9)
        np.testing.assert_allclose(np.asarray(out.natural_params[t]), np.asarray(single.natural_params[0]), rtol=1e-10)
        np.testing.assert_allclose(np.asarray(out.vcov_theta[t]), np.asarray(single.vcov_theta[0]), rtol=1e-8)
        np.testing.assert_allclose(float(out.h2_se[t]), float(single.h2_se[0]), rtol=1e-8)
        # zero padding changes the order of the sums: a convergence test may pass one iteration apart
        assert abs(int(out.n_iter[t]) - int(single.n_iter[0])) <= 1
    with pytest.raises(ValueError, match="one design per response"):
        fit_padded(designs[:2], rotated)
    with pytest.raises(ValueError, match="one model form"):
        fit_padded(
            [designs[0], decompose(ex.model, ex.X)._replace(form=designs[0].form._replace(powers=(2.0, 1.0)))],
            rotated[:2],
        )


def test_fit_spectral_returns_the_fit_result_of_estimate():
    """The public ``jreml.fit_spectral`` gives the ``FitResult`` that ``estimate`` gives, with the same default
    tolerances: ℓ, θ̂, β̂, their covariances and P·y (so BLUPs and residuals) agree, one response or many."""
    ex = jreml.example("kinship")
    spectral = jreml.fit_spectral(ex.model, ex.y, ex.X)
    general = jreml.estimate(ex.model, ex.y, ex.X)
    assert type(spectral) is type(general) is jreml.FitResult
    assert spectral.algorithm == "spectral" and spectral.param_names == general.param_names
    assert bool(spectral.converged) and spectral.history.theta.shape == (1, ex.model.num_free_params)
    np.testing.assert_allclose(float(spectral.loglik), float(general.loglik), rtol=0, atol=1e-6)
    np.testing.assert_allclose(spectral.natural_params, general.natural_params, rtol=1e-4)
    np.testing.assert_allclose(spectral.beta, general.beta, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(spectral.p_y, general.p_y, rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(spectral.residuals(), general.residuals(), rtol=1e-4, atol=1e-6)
    Y = np.stack([ex.y, ex.y[::-1]])
    many = jreml.fit_spectral(ex.model, Y, ex.X)
    assert many.loglik.shape == (2,) and many.p_y.shape == Y.shape
    np.testing.assert_allclose(float(many.loglik[0]), float(spectral.loglik), rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="cannot take algorithm='fisher'"):
        jreml.fit_spectral(ex.model, ex.y, ex.X, algorithm="fisher")
