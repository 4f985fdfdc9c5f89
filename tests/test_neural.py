"""FeatureMapKernel: a covariance σ²·ΦΦᵀ/d whose feature map Φ is an MLP learned through the REML loss."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jreml
from jreml._covariance.neural import FeatureMapKernel
from jreml.covariance import ScalarMatrix

N = 30


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(3)
    x = np.sort(rng.uniform(-2.0, 2.0, N))
    y = 0.5 + np.sin(2.0 * x) + 0.3 * rng.normal(size=N)
    mlp = eqx.nn.MLP(1, 4, width_size=8, depth=1, activation=jnp.tanh, key=jax.random.PRNGKey(0))
    kernel = FeatureMapKernel(x, mlp, name="neural")
    return kernel, jnp.asarray(y), jnp.ones((N, 1))


def test_psd_names_defaults(data):
    kernel, y, X = data
    assert kernel.num_free_params == 1 and kernel.shape == (N, N)
    assert kernel.param_names == ("neural.variance",)
    assert kernel.scale_mask == (True,) and kernel.em_plan() is None
    V = kernel(jnp.asarray([0.3]))
    np.testing.assert_allclose(V, V.T)
    assert float(jnp.min(jnp.linalg.eigvalsh(V))) > 0
    np.testing.assert_allclose(kernel.build_params(jnp.asarray([0.3])), [np.exp(0.3)])
    theta = kernel.default_theta(jnp.asarray(2.0))
    np.testing.assert_allclose(float(jnp.mean(jnp.diagonal(kernel(theta)))), 2.0, rtol=1e-12)
    # A fit works: the MLP weights are held fixed, only σ² (and the residual) are estimated.
    result = jreml.estimate(kernel + ScalarMatrix(N), y, X)
    assert bool(result.converged)
    with pytest.raises(ValueError, match="jitter"):
        FeatureMapKernel(np.zeros(N), kernel.mlp, jitter=-1.0)


def test_gradient_wrt_mlp_weight_matches_finite_difference(data):
    kernel, y, X = data
    model = kernel + ScalarMatrix(N)
    theta = jnp.asarray([0.2, -1.0])

    def loss(m):
        return jreml.reml_loglik(theta, y, X, m)

    grads = eqx.filter_grad(loss)(model)
    where = lambda m: m.terms[0].mlp.layers[0].weight  # noqa: E731
    analytic = float(where(grads)[2, 0])
    h = 1e-5
    w = where(model)
    plus = eqx.tree_at(where, model, w.at[2, 0].add(h))
    minus = eqx.tree_at(where, model, w.at[2, 0].add(-h))
    fd = (float(loss(plus)) - float(loss(minus))) / (2 * h)
    assert abs(analytic) > 1e-6
    np.testing.assert_allclose(analytic, fd, rtol=1e-6)


def test_optax_learns_theta_and_weights_jointly(data):
    kernel, y, X = data
    model = kernel + ScalarMatrix(N)
    # Trainable: θ and the MLP's arrays; the features are data.
    spec = jax.tree.map(lambda _: False, model)
    spec = eqx.tree_at(lambda m: m.terms[0].mlp, spec, replace=jax.tree.map(eqx.is_inexact_array, model.terms[0].mlp))
    params = (jnp.asarray([0.0, -1.0]), eqx.filter(model, spec))
    static = eqx.filter(model, spec, inverse=True)

    def loss(p):
        theta, dynamic = p
        return -jreml.reml_loglik(theta, y, X, eqx.combine(dynamic, static))

    optimizer = optax.adam(0.05)
    # optax mixes int32 counters with float64 values: its own code runs under standard dtype promotion.
    with jax.numpy_dtype_promotion("standard"):
        state = optimizer.init(params)

    @eqx.filter_jit
    def step(p, s):
        value, grads = eqx.filter_value_and_grad(loss)(p)
        with jax.numpy_dtype_promotion("standard"):
            updates, s = optimizer.update(grads, s, p)
        return eqx.apply_updates(p, updates), s, value

    values = []
    for _ in range(25):
        params, state, value = step(params, state)
        values.append(float(value))
    assert np.all(np.isfinite(values))
    assert values[-1] < values[0] - 1.0
    # The learned weights moved.
    before = model.terms[0].mlp.layers[0].weight
    after = params[1].terms[0].mlp.layers[0].weight
    assert float(jnp.max(jnp.abs(after - before))) > 1e-3
