"""Gradients through a fit (implicit function theorem) against central differences of refitted estimates."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jreml
from jreml.covariance import KernelMatrix, ScalarMatrix

TIGHT = dict(tol_score=1e-11, tol_delta=1e-10, tol_loglik=1e-13, max_iter=500)


def central_difference(f, x, direction, h):
    return (np.asarray(f(x + h * direction)) - np.asarray(f(x - h * direction))) / (2 * h)


def estimates(result):
    return jnp.concatenate([result.theta, result.beta])


@pytest.fixture(scope="module")
def spatial():
    rng = np.random.default_rng(5)
    x = np.sort(rng.uniform(0, 10, 40))
    y = 1.0 + 0.3 * x + np.sin(x) + 0.3 * rng.normal(size=40)
    X = np.column_stack([np.ones(40), x])
    model = KernelMatrix(x, lengthscale=1.5, kernel="matern52") + ScalarMatrix(40)
    return model, jnp.asarray(y), jnp.asarray(X)


CASES = ["machines", "sleepstudy", "kernel"]


def _case(name, spatial):
    if name == "kernel":
        return spatial
    ex = jreml.example(name)
    return ex.model, jnp.asarray(ex.y), jnp.asarray(ex.X)


@pytest.mark.parametrize("name", CASES)
def test_gradient_with_respect_to_y(name, spatial):
    model, y, X = _case(name, spatial)
    direction = jnp.asarray(np.random.default_rng(1).normal(size=y.shape))
    weights = jnp.linspace(1.0, 2.0, model.num_free_params + X.shape[1])

    def objective(yy):
        return jnp.dot(weights, estimates(jreml.estimate(model, yy, X, **TIGHT)))

    grad = jax.grad(objective)(y)
    fd = central_difference(objective, y, direction, 1e-4 * float(jnp.std(y)))
    np.testing.assert_allclose(float(jnp.dot(grad, direction)), fd, rtol=1e-5)
    # Forward mode agrees with reverse mode.
    _, tangent = jax.jvp(objective, (y,), (direction,))
    np.testing.assert_allclose(float(tangent), float(jnp.dot(grad, direction)), rtol=1e-9)


@pytest.mark.parametrize("name", ["machines", "kernel"])
def test_jacobian_with_respect_to_X(name, spatial):
    model, y, X = _case(name, spatial)
    direction = jnp.zeros_like(X).at[:, -1].set(jnp.asarray(np.random.default_rng(2).normal(size=y.shape[0])))

    def theta_beta(XX):
        return estimates(jreml.estimate(model, y, XX, **TIGHT))

    _, tangent = jax.jvp(theta_beta, (X,), (direction,))
    fd = central_difference(theta_beta, X, direction, 1e-5)
    np.testing.assert_allclose(np.asarray(tangent), fd, rtol=1e-5, atol=1e-7)


def test_gradient_with_respect_to_a_kernel_length_scale(spatial):
    model, y, X = spatial

    def fitted(lengthscale):
        m = eqx.tree_at(lambda mm: mm.terms[0].lengthscale, model, lengthscale)
        result = jreml.estimate(m, y, X, **TIGHT)
        blups = result.predict()
        return jnp.concatenate([estimates(result), blups[:3]])

    ls = jnp.asarray(1.5)
    jac = jax.jacrev(fitted)(ls)
    fd = central_difference(fitted, ls, 1.0, 1e-5)
    np.testing.assert_allclose(np.asarray(jac), fd, rtol=1e-5, atol=1e-8)
    # Gradients reach the module's array leaves directly too.
    grads = jax.grad(lambda m: jreml.estimate(m, y, X, **TIGHT).params["term0.variance"])(model)
    expected = float(jac[0]) * float(jnp.exp(fitted(ls)[0]))  # d exp(θ0)/dℓ
    np.testing.assert_allclose(float(grads.terms[0].lengthscale), expected, rtol=1e-7)


def test_a_variance_at_its_boundary_has_zero_sensitivity():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(6, 5))
    e -= e.mean(axis=1, keepdims=True)
    y = jnp.asarray((10.0 + e).ravel())
    g = np.repeat(np.arange(6), 5)
    model = jreml.covariance.CovariancePropagation(jreml.covariance.DummyMatrix(g), ScalarMatrix(6)) + ScalarMatrix(30)
    X = jnp.ones((30, 1))
    jac = jax.jacrev(lambda yy: jreml.estimate(model, yy, X).theta)(y)
    assert bool(jnp.all(jnp.isfinite(jac)))
    assert float(jnp.max(jnp.abs(jac[0]))) == 0.0


@pytest.mark.parametrize("name", ["machines", "sleepstudy"])
@pytest.mark.parametrize("reml", [True, False])
def test_closed_form_observed_information_matches_autodiff(name, reml):
    from jreml._backends.dense.implicit import observed_information_at

    ex = jreml.example(name)
    theta = ex.model.default_theta(jnp.asarray(float(np.var(ex.y)))) + 0.3
    # each side as one compiled program, not op by op (hundreds of small compilations)
    got = jax.jit(observed_information_at, static_argnums=4)(
        theta, ex.model, jnp.asarray(ex.y), jnp.asarray(ex.X), reml
    )
    method = "reml" if reml else "ml"
    expected = jax.jit(lambda t, y, X, m: jreml.observed_information(t, y, X, m, method=method))(
        theta, jnp.asarray(ex.y), jnp.asarray(ex.X), ex.model
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-9, atol=1e-9 * float(jnp.max(expected)))


def _outputs(result):
    """Everything the closed-form tangent rule of the dense final evaluation moves."""
    parts = [result.theta, result.natural_params, result.beta, result.loglik[None], result.p_y[:5], result.se_beta]
    return jnp.concatenate(parts)


@pytest.mark.parametrize("method", ["reml", "ml"])
@pytest.mark.parametrize("name", ["machines", "kernel"])
def test_dense_final_evaluation_tangents_match_refits(name, method, spatial):
    """θ̂, β̂, ℓ, Py and SE(β̂) of the dense path moved along y and X at once, against refits."""
    model, y, X = _case(name, spatial)
    rng = np.random.default_rng(7)
    d_y = jnp.asarray(rng.normal(size=y.shape)) * float(jnp.std(y))
    d_X = jnp.zeros_like(X).at[:, -1].set(jnp.asarray(rng.normal(size=y.shape[0])))

    def fitted(t):
        return _outputs(jreml.estimate(model, y + t * d_y, X + t * d_X, method=method, backend="dense", **TIGHT))

    zero = jnp.zeros(())
    _, tangent = jax.jvp(fitted, (zero,), (jnp.ones(()),))
    fd = central_difference(fitted, zero, jnp.ones(()), 1e-5)
    np.testing.assert_allclose(np.asarray(tangent), fd, rtol=2e-5, atol=1e-7 * float(np.max(np.abs(fd))))
    # Reverse mode is the transpose of the same rule.
    weights = jnp.asarray(rng.normal(size=tangent.shape))
    grad = jax.grad(lambda t: jnp.dot(weights, fitted(t)))(zero)
    np.testing.assert_allclose(float(grad), float(jnp.dot(weights, tangent)), rtol=1e-9)


@pytest.mark.parametrize("method", ["reml", "ml"])
def test_dense_tangents_along_a_fixed_relationship_matrix(method):
    """A FixedMatrix leaf (the relationship matrix itself) moved: θ̂, β̂ and ℓ against refits."""
    rng = np.random.default_rng(11)
    n = 30
    w = rng.normal(size=(n, 8))
    K = w @ w.T / 8 + 0.1 * np.eye(n)
    d_K = rng.normal(size=(n, n))
    d_K = jnp.asarray(0.5 * (d_K + d_K.T))
    X = jnp.asarray(np.column_stack([np.ones(n), rng.normal(size=n)]))
    y = X @ jnp.array([1.0, 0.5]) + jnp.asarray(np.linalg.cholesky(K + np.eye(n)) @ rng.normal(size=n))

    def fitted(t):
        model = jreml.covariance.FixedMatrix(jnp.asarray(K) + t * d_K) + ScalarMatrix(n)
        r = jreml.estimate(model, y, X, method=method, **TIGHT)
        return jnp.concatenate([r.theta, r.beta, r.loglik[None]])

    zero = jnp.zeros(())
    _, tangent = jax.jvp(fitted, (zero,), (jnp.ones(()),))
    fd = central_difference(fitted, zero, jnp.ones(()), 1e-5)
    np.testing.assert_allclose(np.asarray(tangent), fd, rtol=2e-5, atol=1e-8)
