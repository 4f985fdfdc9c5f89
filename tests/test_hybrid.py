"""hybrid_estimate: optax steps into the basin, then AI; robust from bad starts where plain AI is not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jreml
from jreml._hybrid import HybridInfo, hybrid_estimate
from jreml.covariance import FixedMatrix, ScalarMatrix

N_DESIGNS, N = 50, 40
BAD_OFFSET = np.array([8.0, -8.0])  # log-variances: random effect ×e⁸, residual ×e⁻⁸ the default start


def _designs():
    """50 random-intercept designs (3–12 groups, n = 40): K = ZZᵀ stacked, y, and σ²_g of the simulation."""
    rng = np.random.default_rng(2024)
    Ks, ys = [], []
    for _ in range(N_DESIGNS):
        groups = int(rng.integers(3, 13))
        codes = np.concatenate([np.arange(groups), rng.integers(0, groups, N - groups)])
        Z = np.eye(groups)[codes]
        sigma_g = np.exp(rng.uniform(-2.0, 1.5))
        y = 2.0 + Z @ (sigma_g * rng.normal(size=groups)) + rng.normal(size=N)
        Ks.append(Z @ Z.T)
        ys.append(y)
    return jnp.asarray(np.stack(Ks)), jnp.asarray(np.stack(ys))


def _model(K):
    return FixedMatrix(K, name="group") + ScalarMatrix(N, name="residual")


def _default_theta(K, y, X):
    resid = y - X @ jnp.linalg.lstsq(X, y)[0]
    return _model(K).default_theta(resid @ resid / (N - X.shape[1]))


def _plain_ai(K, y, X, theta0, iterations=50):
    """AI without step control: θ ← θ + AI⁻¹s, η = 1, no halving, no bounds, no trust region."""
    model = _model(K)

    def step(theta, _):
        s = jreml.score(theta, y, X, model)
        info = jreml.average_information(theta, y, X, model)
        return theta + jnp.linalg.solve(info, s), None

    theta, _ = jax.lax.scan(step, theta0, None, length=iterations)
    return theta, jreml.reml_loglik(theta, y, X, model)


@pytest.fixture(scope="module")
def designs():
    Ks, ys = _designs()
    X = jnp.ones((N, 1))
    starts = jax.vmap(lambda K, y: _default_theta(K, y, X))(Ks, ys)
    reference = jax.vmap(lambda K, y, t: jreml.estimate(_model(K), y, X, theta0=t))(Ks, ys, starts)
    return Ks, ys, X, starts, reference


def test_hybrid_converges_from_bad_starts_where_plain_ai_fails(designs):
    Ks, ys, X, starts, reference = designs
    assert bool(jnp.all(reference.converged))
    bad = starts + BAD_OFFSET

    theta_ai, loglik_ai = jax.vmap(lambda K, y, t: _plain_ai(K, y, X, t))(Ks, ys, bad)
    failed = (
        ~jnp.isfinite(loglik_ai)
        | (loglik_ai < reference.loglik - 1e-3)
        | ~jnp.all(jnp.isfinite(theta_ai), axis=1)
        | jnp.any(jnp.abs(theta_ai) > 50.0, axis=1)
    )
    n_failed = int(jnp.sum(failed))

    result, info = jax.vmap(lambda K, y, t: hybrid_estimate(_model(K), y, X, theta0=t, full_output=True))(Ks, ys, bad)
    assert isinstance(info, HybridInfo)
    assert result.algorithm == "hybrid"
    gap = np.abs(np.asarray(result.loglik - reference.loglik))
    n_hybrid = int(np.sum((gap < 1e-6) & np.asarray(result.converged)))
    print(
        f"\nbad starts (θ0 = default + {BAD_OFFSET.tolist()}), {N_DESIGNS} designs: plain AI (η = 1, no step "
        f"control, 50 iterations) failed on {n_failed}; hybrid converged on {n_hybrid} "
        f"(max |Δℓ| {gap.max():.1e}, optax steps {int(info.optax_steps.min())}–{int(info.optax_steps.max())}, "
        f"AI iterations {int(result.n_iter.min())}–{int(result.n_iter.max())})"
    )
    assert n_hybrid == N_DESIGNS
    assert n_failed > 0  # the bad start really is bad for an uncontrolled AI iteration


@pytest.mark.parametrize("name", ["dyestuff", "sleepstudy"])
def test_hybrid_matches_estimate(name):
    ex = jreml.example(name)
    reference = jreml.estimate(ex.model, ex.y, ex.X)
    result = hybrid_estimate(ex.model, ex.y, ex.X)
    assert result.algorithm == "hybrid"
    assert bool(result.converged)
    np.testing.assert_allclose(float(result.loglik), float(reference.loglik), atol=1e-6)
    # A far start: the optax phase brings it back.
    far = reference.history.theta[0].at[0].add(8.0).at[-1].add(-8.0)
    result, info = hybrid_estimate(ex.model, ex.y, ex.X, theta0=far, full_output=True)
    assert bool(info.used_optax) and int(info.optax_steps) > 0
    np.testing.assert_allclose(float(result.loglik), float(reference.loglik), atol=1e-6)


def test_hybrid_gradient_and_options():
    ex = jreml.example("dyestuff")
    y = jnp.asarray(ex.y)
    grad_h = jax.grad(lambda yy: hybrid_estimate(ex.model, yy, ex.X).theta[0])(y)
    grad_e = jax.grad(lambda yy: jreml.estimate(ex.model, yy, ex.X).theta[0])(y)
    np.testing.assert_allclose(np.asarray(grad_h), np.asarray(grad_e), rtol=1e-5, atol=1e-10)
    result = hybrid_estimate(ex.model, ex.y, ex.X, optax_steps=0, method="ml")
    np.testing.assert_allclose(float(result.loglik), float(jreml.estimate(ex.model, ex.y, ex.X, method="ml").loglik))
    with pytest.raises(TypeError, match="algorithm"):
        hybrid_estimate(ex.model, ex.y, ex.X, algorithm="em")
    with pytest.raises(ValueError, match="optax_steps"):
        hybrid_estimate(ex.model, ex.y, ex.X, optax_steps=-1)


def test_estimate_and_fit_accept_algorithm_hybrid():
    ex = jreml.example("dyestuff")
    direct = jreml.estimate(ex.model, ex.y, ex.X)
    hybrid = jreml.estimate(ex.model, ex.y, ex.X, algorithm="hybrid")
    assert hybrid.algorithm == "hybrid" and bool(hybrid.converged)
    assert abs(float(hybrid.loglik) - float(direct.loglik)) < 1e-8
    formula_fit = jreml.fit("Yield ~ 1 + (1 | Batch)", jreml.datasets.load("dyestuff"), algorithm="hybrid")
    assert formula_fit.algorithm == "hybrid"
    assert abs(float(formula_fit.loglik) - float(direct.loglik)) < 1e-8
