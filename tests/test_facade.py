"""The torch_openreml-style facade ``REML``: same fits as ``jreml.estimate``, plain functions, errors."""

import math

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest

import jreml
from jreml._facade import REML

LME4_LOGLIK = -46.5969101209899  # lme4 REML logLik of yield ~ rep + (1 | gen) + (1 | rep:block)
OPENREML_LOGLIK = 16.8099  # torch_openreml's number for the same fit (no log 2π constant), 4 decimals


@pytest.fixture(scope="module")
def example():
    return jreml.example("john_alpha")


@pytest.fixture(scope="module")
def dense(example):
    """Z of gen (72×24) and of rep:block (72×18) as dense 0/1 matrices, columns in sorted level order."""
    df = example.data
    gen_levels = sorted(df.gen.unique())
    z_gen = (df.gen.to_numpy()[:, None] == np.asarray(gen_levels)[None, :]).astype(float)
    blocks = list(zip(df.rep, df.block, strict=True))
    block_levels = sorted(set(blocks))
    z_block = np.array([[float(b == lvl) for lvl in block_levels] for b in blocks])
    return z_gen, z_block


@pytest.fixture(scope="module")
def module_fit(example):
    reml = REML(v_builder=example.model)
    out = reml.optimize(example.y, example.X, None)
    return reml, out


@pytest.fixture(scope="module")
def function_fit(example, dense):
    z_gen, z_block = dense
    k_gen, k_block = jnp.asarray(z_gen @ z_gen.T), jnp.asarray(z_block @ z_block.T)
    eye = jnp.eye(z_gen.shape[0])

    def map_theta_to_v(theta):
        return jnp.exp(theta[0]) * k_gen + jnp.exp(theta[1]) * k_block + jnp.exp(theta[2]) * eye

    def map_theta_to_dv(theta):
        return jnp.stack([jnp.exp(theta[0]) * k_gen, jnp.exp(theta[1]) * k_block, jnp.exp(theta[2]) * eye])

    q_gen, q_block = z_gen.shape[1], z_block.shape[1]

    def map_theta_to_g(theta_g):
        return jnp.diag(jnp.concatenate([jnp.full(q_gen, jnp.exp(theta_g[0])), jnp.full(q_block, jnp.exp(theta_g[1]))]))

    reml = REML(
        map_theta_to_v=map_theta_to_v,
        map_theta_to_dv=map_theta_to_dv,
        map_theta_to_g=map_theta_to_g,
        mask_theta_to_g=np.array([True, True, False]),
        z=np.hstack([z_gen, z_block]),
    )
    theta_start = example.model.default_theta(jnp.var(jnp.asarray(example.y)))
    out = reml.optimize(example.y, example.X, theta_start)
    return reml, out, theta_start


def test_module_facade_equals_estimate(example, module_fit):
    reml, (theta, beta, n_iter) = module_fit
    ref = jreml.estimate(example.model, example.y, example.X, tol_score=1e-4, tol_delta=1e-4, tol_loglik=1e-4)
    np.testing.assert_array_equal(theta, ref.theta)
    np.testing.assert_array_equal(beta, ref.beta)
    assert n_iter == int(ref.n_iter)
    assert reml.result.converged
    np.testing.assert_array_equal(reml.blue, ref.beta)
    np.testing.assert_allclose(reml.loglik, LME4_LOGLIK, atol=1e-6)
    np.testing.assert_allclose(reml.loglik_without_constant, OPENREML_LOGLIK, atol=1e-4)  # 16.80985
    assert math.isclose(float(reml.loglik_without_constant - reml.loglik), 34.5 * math.log(2 * math.pi))
    # BLUPs: the concatenation of the terms' BLUPs, in term order (gen, then rep:block).
    blups = ref.blup()
    assert list(blups) == ["gen", "rep:block"]
    np.testing.assert_allclose(reml.blup, np.concatenate([blups["gen"], blups["rep:block"]]), rtol=1e-12)
    np.testing.assert_allclose(reml.predict, ref.predict(), rtol=1e-12)
    np.testing.assert_allclose(reml.marginal_predict, example.X @ np.asarray(ref.beta), rtol=1e-12)
    np.testing.assert_allclose(reml.residual, example.y - np.asarray(ref.predict()), atol=1e-12)
    np.testing.assert_allclose(reml.marginal_residual, ref.marginal_residuals(), atol=1e-12)


def test_history_is_trimmed_numpy(module_fit):
    reml, (theta, beta, n_iter) = module_fit
    history = reml.history
    assert len(history) == n_iter + 1
    assert [row["iteration"] for row in history] == list(range(n_iter + 1))
    for row in history:
        assert {"theta", "beta", "loglik", "score", "step"} <= set(row)
        assert isinstance(row["theta"], np.ndarray) and row["theta"].shape == (3,)
        assert row["beta"].shape == (3,)
    np.testing.assert_array_equal(history[-1]["theta"], theta)
    np.testing.assert_array_equal(history[0]["step"], np.zeros(3))
    logliks = np.array([row["loglik"] for row in history])
    assert np.all(np.diff(logliks) >= -1e-8)  # the loop only accepts steps that do not decrease ℓ
    np.testing.assert_allclose(history[1]["theta"] - history[0]["theta"], history[1]["step"], atol=1e-14)


def test_plain_functions_match_module(example, module_fit, function_fit):
    reml_m, (theta_m, beta_m, _) = module_fit
    reml_f, (theta_f, beta_f, _), _ = function_fit
    assert reml_f.result.converged
    np.testing.assert_allclose(theta_f, theta_m, atol=1e-6)
    np.testing.assert_allclose(beta_f, beta_m, atol=1e-6)
    np.testing.assert_allclose(reml_f.loglik, reml_m.loglik, atol=1e-6)
    np.testing.assert_allclose(reml_f.loglik, LME4_LOGLIK, atol=1e-6)
    # BLUPs from map_theta_to_g / mask / z equal the module's FitResult.blup(), term by term.
    blups = reml_m.result.blup()
    np.testing.assert_allclose(reml_f.blup[:24], blups["gen"], atol=1e-6)
    np.testing.assert_allclose(reml_f.blup[24:], blups["rep:block"], atol=1e-6)
    np.testing.assert_allclose(reml_f.predict, reml_m.predict, atol=1e-6)
    np.testing.assert_allclose(reml_f.residual, reml_m.residual, atol=1e-6)
    np.testing.assert_allclose(reml_f.marginal_residual, reml_m.marginal_residual, atol=1e-6)


def test_index_mask_equals_boolean_mask(function_fit):
    reml, _, _ = function_fit
    by_index = REML(
        map_theta_to_v=reml.map_theta_to_v,
        map_theta_to_g=reml.map_theta_to_g,
        mask_theta_to_g=np.array([0, 1]),
        z=reml.z,
    )
    by_index._result = reml.result  # same fit, other θ_G selector
    np.testing.assert_allclose(by_index.blup, reml.blup, rtol=1e-12)


def test_get_theta_best_and_last(module_fit):
    reml, (theta, beta, n_iter) = module_fit
    np.testing.assert_array_equal(reml.get_theta(), theta)
    np.testing.assert_array_equal(reml.get_theta("last"), theta)
    np.testing.assert_array_equal(reml.get_beta("last"), beta)
    logliks = np.asarray(reml.result.history.loglik)[: n_iter + 1]
    best = int(np.argmax(logliks))
    np.testing.assert_array_equal(reml.get_theta("best"), reml.result.history.theta[best])
    assert logliks[best] >= float(reml.loglik)

    # Make an earlier iterate the best one: "best" must pick it, "last" must not.
    history = reml.result.history
    bumped = history.loglik.at[1].set(float(reml.loglik) + 1.0)
    tweaked = REML(v_builder=reml.v_builder)
    tweaked._result = eqx.tree_at(lambda r: r.history.loglik, reml.result, bumped)
    np.testing.assert_array_equal(tweaked.get_theta("best"), history.theta[1])
    np.testing.assert_array_equal(tweaked.get_beta("best"), history.beta[1])
    np.testing.assert_array_equal(tweaked.get_theta("last"), theta)
    with pytest.raises(ValueError, match="select"):
        reml.get_theta("first")


def test_errors(example, function_fit):
    with pytest.raises(ValueError, match="v_builder .* or map_theta_to_v"):
        REML()
    with pytest.raises(ValueError, match="not both"):
        REML(map_theta_to_v=lambda t: t, v_builder=example.model)
    with pytest.raises(TypeError, match="covariance module"):
        REML(v_builder=lambda t: t)
    with pytest.raises(ValueError, match="all three or none"):
        REML(map_theta_to_v=lambda t: t, z=np.ones((3, 2)))

    unfitted = REML(v_builder=example.model)
    for attribute in ("result", "history", "blue", "blup", "predict", "loglik", "residual", "marginal_predict"):
        with pytest.raises(RuntimeError, match="optimize"):
            getattr(unfitted, attribute)
    with pytest.raises(RuntimeError, match="optimize"):
        unfitted.get_theta()

    plain = REML(map_theta_to_v=function_fit[0].map_theta_to_v)
    with pytest.raises(ValueError, match="theta_start"):
        plain.optimize(example.y, example.X, None)
    plain._result = function_fit[0].result
    with pytest.raises(ValueError, match="map_theta_to_g"):
        _ = plain.blup
    with pytest.raises(ValueError, match="map_theta_to_g"):
        _ = plain.predict
    np.testing.assert_allclose(plain.marginal_residual, function_fit[0].marginal_residual)
