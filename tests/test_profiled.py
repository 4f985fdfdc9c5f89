"""Profiled REML / ML objectives (jreml._profiled): identities, optimum and gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from conftest import load_reference

import jreml
from jreml._covariance.basic import FixedMatrix, ScalarMatrix
from jreml._covariance.compose import CustomMatrix
from jreml._profiled import profiled_ml, profiled_reml

CASES = {"dyestuff": "dyestuff", "sleepstudy": "sleepstudy_corr", "penicillin": "penicillin"}
BUILDERS = {"reml": profiled_reml, "ml": profiled_ml}
LOGLIK = {"reml": jreml.reml_loglik, "ml": jreml.ml_loglik}


@functools.cache
def objective(name, method):
    ex = jreml.example(name)
    return ex, BUILDERS[method](ex.model, ex.y, ex.X)


def random_phi(obj, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1.0, 0.5, obj.num_params))


@pytest.mark.parametrize("method", ["reml", "ml"])
@pytest.mark.parametrize("name", list(CASES))
def test_identity_and_roundtrip(name, method):
    ex, obj = objective(name, method)
    assert obj.profiles_scale and obj.num_params == ex.model.num_free_params - 1
    phi = random_phi(obj)
    theta = obj.to_theta(phi)
    # −ℓ_profiled(φ) = −ℓ(θ(φ)) at any φ, since θ(φ) carries σ̂²(φ).
    expected = -LOGLIK[method](theta, jnp.asarray(ex.y), jnp.asarray(ex.X), ex.model)
    np.testing.assert_allclose(float(obj(phi)), float(expected), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(obj.to_phi(theta)), np.asarray(phi), atol=1e-12)
    # V(θ(φ)) = σ̂²(φ)·V₀(φ), V₀ = the model with the residual entry at 0.
    r = obj.residual_position
    v0 = ex.model(jnp.concatenate([phi[:r], jnp.zeros(1), phi[r:]]))
    np.testing.assert_allclose(np.asarray(ex.model(theta)), float(obj.sigma2(phi)) * np.asarray(v0), rtol=1e-10)


@pytest.mark.parametrize("method", ["reml", "ml"])
@pytest.mark.parametrize("name", list(CASES))
def test_minimum_matches_reference(name, method):
    ex, obj = objective(name, method)
    value_and_grad = jax.jit(jax.value_and_grad(obj))

    def fun(x):
        v, g = value_and_grad(jnp.asarray(x))
        return float(v), np.asarray(g)

    opt = scipy.optimize.minimize(fun, np.zeros(obj.num_params), jac=True, method="BFGS", options={"gtol": 1e-9})
    ref = load_reference(CASES[name])[method.upper()]["logLik"]
    assert abs(-opt.fun - ref) < 1e-6
    assert -opt.fun > ref - 1e-9
    # At the optimum the profiled value is −ℓ(θ̂), and φ(θ̂) gives it back.
    theta_hat = obj.to_theta(jnp.asarray(opt.x))
    loglik = LOGLIK[method](theta_hat, jnp.asarray(ex.y), jnp.asarray(ex.X), ex.model)
    np.testing.assert_allclose(float(obj(obj.to_phi(theta_hat))), -float(loglik), rtol=1e-12)
    if name == "dyestuff":
        params = np.asarray(ex.model.build_params(theta_hat))
        block = load_reference("dyestuff")[method.upper()]["varcorr"]
        lme4 = {row["group"]: row["vcov"] for row in block}
        np.testing.assert_allclose(params, [lme4["Batch"], lme4["Residual"]], rtol=1e-4)


@pytest.mark.parametrize("method", ["reml", "ml"])
def test_gradient_matches_finite_differences(method):
    _, obj = objective("sleepstudy", method)
    phi = random_phi(obj, seed=1)
    grad = np.asarray(jax.jit(jax.grad(lambda p: obj(p)))(phi))
    f = jax.jit(lambda p: obj(p))
    h = 1e-6
    eye = jnp.eye(obj.num_params)
    fd = [(float(f(phi + h * e)) - float(f(phi - h * e))) / (2 * h) for e in eye]
    np.testing.assert_allclose(grad, fd, rtol=1e-6, atol=1e-6)


def test_without_residual_profiles_only_beta():
    ex = jreml.example("dyestuff")
    n = len(ex.y)
    model = ex.model.terms[0] + FixedMatrix(np.eye(n), name="Residual")
    obj = profiled_reml(model, ex.y, ex.X)
    assert not obj.profiles_scale and obj.num_params == 2
    theta = jnp.asarray([7.0, 7.5])
    expected = -jreml.reml_loglik(theta, jnp.asarray(ex.y), jnp.asarray(ex.X), model)
    np.testing.assert_allclose(float(obj(theta)), float(expected), rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(obj.to_theta(theta)), np.asarray(theta))


def test_unscalable_term_raises_unless_scale_not_profiled():
    ex = jreml.example("dyestuff")
    n = len(ex.y)
    custom = CustomMatrix(lambda t: jnp.exp(t[0]) * jnp.eye(n, dtype=t.dtype), 1, shape=(n, n))
    model = custom + ScalarMatrix(n, name="Residual")
    with pytest.raises(ValueError, match="cannot profile"):
        profiled_reml(model, ex.y, ex.X)
    obj = profiled_reml(model, ex.y, ex.X, profile_scale=False)
    assert obj.num_params == 2


def test_non_pd_gives_inf():
    ex = jreml.example("dyestuff")
    n = len(ex.y)
    negative = CustomMatrix(lambda t: -jnp.exp(t[0]) * jnp.eye(n, dtype=t.dtype), 1, shape=(n, n))
    obj = profiled_reml(negative + ScalarMatrix(n), ex.y, ex.X, profile_scale=False)
    assert float(obj(jnp.asarray([2.0, 0.0]))) == np.inf
