"""ObservedRows: a model kept at n rows but fitted on its observed rows gives the fit of those rows alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jreml
from jreml._estimate import TRACE_COUNT
from jreml.covariance import (
    CovariancePropagation,
    DummyMatrix,
    KnownDiagonalMatrix,
    ObservedRows,
    ScalarMatrix,
    Sum,
)


def _intercept_model(codes, weights=None):
    """(1 | g) on the levels present in ``codes`` plus σ²I (and σ²_w·diag(weights) when given)."""
    Z = DummyMatrix(codes)
    terms = [CovariancePropagation(Z, ScalarMatrix(Z.shape[1]), name="g"), ScalarMatrix(len(codes), name="Residual")]
    if weights is not None:
        terms.append(KnownDiagonalMatrix(weights, name="w"))
    return Sum(*terms)


@pytest.fixture(scope="module")
def grouped():
    """60 rows in 8 groups, a quarter of the rows unobserved and group 3 without any observed row."""
    rng = np.random.default_rng(3)
    n, n_levels = 60, 8
    codes = rng.integers(0, n_levels, n)
    x = rng.normal(size=n)
    X = np.column_stack([np.ones(n), x])
    y = X @ np.array([1.0, 2.0]) + 0.8 * rng.normal(size=n_levels)[codes] + rng.normal(size=n)
    observed = rng.random(n) > 0.25
    observed[codes == 3] = False
    weights = rng.uniform(0.5, 2.0, n)
    return codes, X, y, observed, weights


@pytest.mark.parametrize("backend", ["dense", "mme"])
@pytest.mark.parametrize("method", ["reml", "ml"])
def test_fit_equals_the_fit_of_the_observed_rows_alone(grouped, backend, method):
    codes, X, y, observed, _ = grouped
    model = ObservedRows(_intercept_model(codes), observed)
    masked = jreml.estimate(model, np.where(observed, y, np.nan), X, method=method, backend=backend)
    alone = jreml.estimate(_intercept_model(codes[observed]), y[observed], X[observed], method=method)
    assert bool(masked.converged) and masked.nobs == observed.sum() and model.param_names == alone.param_names
    np.testing.assert_allclose(float(masked.loglik), float(alone.loglik), rtol=0, atol=1e-9)
    np.testing.assert_allclose(masked.natural_params, alone.natural_params, rtol=1e-8)
    np.testing.assert_allclose(masked.beta, alone.beta, rtol=1e-9)
    np.testing.assert_allclose(masked.se_beta, alone.se_beta, rtol=1e-8)
    np.testing.assert_allclose(masked.vcov_theta, alone.vcov_theta, rtol=1e-6, atol=1e-10)
    # Py is that of the observed rows, and 0 on the placeholders
    np.testing.assert_allclose(np.asarray(masked.p_y)[observed], alone.p_y, rtol=1e-7, atol=1e-12)
    assert np.all(np.asarray(masked.p_y)[~observed] == 0)


@pytest.mark.filterwarnings("ignore:jreml.estimate. did not converge")
def test_heteroscedastic_residual_on_the_mixed_model_equations(grouped):
    """R = σ²I + σ²_w·diag(w): the log-determinant counts the observed rows' variances only."""
    codes, X, y, observed, weights = grouped
    model = ObservedRows(_intercept_model(codes, weights), observed)
    alone_model = _intercept_model(codes[observed], weights[observed])
    theta = np.array([0.1, -0.3, -1.0])
    for backend in ("mme", "dense"):
        masked = jreml.estimate(model, y, X, theta, backend=backend, max_iter=0)
        alone = jreml.estimate(alone_model, y[observed], X[observed], theta, backend=backend, max_iter=0)
        np.testing.assert_allclose(float(masked.loglik), float(alone.loglik), rtol=0, atol=1e-9)
        np.testing.assert_allclose(masked.score, alone.score, rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(masked.information, alone.information, rtol=1e-8, atol=1e-10)


def test_log_likelihood_and_its_gradient_at_fixed_theta(grouped):
    codes, X, y, observed, _ = grouped
    model = ObservedRows(_intercept_model(codes), observed)
    alone = _intercept_model(codes[observed])
    theta = jnp.array([0.3, -0.2])
    value, grad = jax.value_and_grad(jreml.reml_loglik)(theta, y, X, model)
    value_alone, grad_alone = jax.value_and_grad(jreml.reml_loglik)(theta, y[observed], X[observed], alone)
    np.testing.assert_allclose(float(value), float(value_alone), rtol=0, atol=1e-10)
    np.testing.assert_allclose(grad, grad_alone, rtol=1e-9)
    # the unobserved rows' values do not enter
    dy = jax.grad(jreml.reml_loglik, argnums=1)(theta, y, X, model)
    assert np.all(np.asarray(dy)[~observed] == 0)


def test_vmap_over_responses_and_masks_compiles_once():
    """Random slopes (a log-Cholesky G): each response on its own rows, one program for all of them."""
    ex = jreml.example("sleepstudy")
    n = len(ex.y)
    rng = np.random.default_rng(4)
    masks = np.ones((4, n), bool)
    for t in range(1, 4):
        masks[t, rng.choice(n, 3 * t, replace=False)] = False
    Y = np.asarray(ex.y)[None, :] + rng.normal(0.0, 5.0, (4, n))
    before = TRACE_COUNT[0]
    batched = jax.vmap(lambda y, m: jreml.estimate(ObservedRows(ex.model, m), y, ex.X, throw=False))(Y, masks)
    assert TRACE_COUNT[0] - before == 1
    for t in range(4):
        rows = masks[t]
        data = ex.data.assign(y=Y[t])[rows]
        alone = jreml.fit("y ~ Days + (Days | Subject)", data)
        assert bool(batched.converged[t])
        np.testing.assert_allclose(float(batched.loglik[t]), float(alone.loglik), rtol=0, atol=1e-7)
        np.testing.assert_allclose(batched.natural_params[t], alone.natural_params, rtol=1e-5)
        np.testing.assert_allclose(batched.beta[t], alone.beta, rtol=1e-7)


def test_bad_masks_and_data_are_named(grouped):
    codes, X, y, observed, _ = grouped
    inner = _intercept_model(codes)
    with pytest.raises(ValueError, match=r"observed must have shape \(60,\)"):
        ObservedRows(inner, observed[:-1])
    with pytest.raises(TypeError, match="boolean mask"):
        ObservedRows(inner, observed.astype(int))
    with pytest.raises(TypeError, match="combine the two masks"):
        ObservedRows(ObservedRows(inner, observed), observed)
    model = ObservedRows(inner, observed)
    row = int(np.flatnonzero(observed)[5])
    with pytest.raises(ValueError, match=rf"non-finite values \(NaN/inf\) at rows \[{row}\]"):
        jreml.estimate(model, np.where(np.arange(60) == row, np.nan, y), X)
    # a covariate that is constant on the observed rows makes X rank deficient there, not on all rows
    x_const = np.where(observed, 1.0, np.arange(60.0))
    with pytest.raises(ValueError, match="rank deficient"):
        jreml.estimate(model, y, np.column_stack([np.ones(60), x_const]))
    few = np.zeros(60, bool)
    few[:2] = True
    with pytest.raises(ValueError, match="2 columns for 2 observations"):
        jreml.estimate(ObservedRows(inner, few), y, X)
    with pytest.raises(ValueError, match='derivatives="analytic"'):
        jreml.estimate(model, y, X, derivatives="analytic", dv_builder=lambda t: None)


@pytest.mark.parametrize("backend", ["dense", "mme"])
def test_gradient_through_the_fit_is_that_of_the_observed_rows(grouped, backend):
    """Implicit differentiation of θ̂(y): the observed rows' gradient equals that of the fit on them alone, and
    the unobserved rows' values have none."""
    codes, X, y, observed, _ = grouped
    model = ObservedRows(_intercept_model(codes), observed)
    alone = _intercept_model(codes[observed])
    masked = jax.grad(lambda v: jreml.estimate(model, v, X, backend=backend).natural_params[0])(y)
    single = jax.grad(lambda v: jreml.estimate(alone, v, X[observed], backend=backend).natural_params[0])(y[observed])
    np.testing.assert_allclose(np.asarray(masked)[observed], single, rtol=1e-7, atol=1e-12)
    assert np.all(np.asarray(masked)[~observed] == 0)
