"""Log-likelihoods against brute-force numpy and lme4's criterion; derivatives against finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_reference
from hypothesis import given, settings
from hypothesis import strategies as st

import jreml
from jreml.covariance import (
    AR1Matrix,
    CompoundSymmetricMatrix,
    CovariancePropagation,
    DiagonalMatrix,
    DummyMatrix,
    FixedMatrix,
    IdentityMatrix,
    KroneckerProduct,
    ScalarMatrix,
    UnstructuredMatrix,
)

LOG2PI = np.log(2 * np.pi)


def brute_force_loglik(V, y, X, reml=True):
    """Textbook dense evaluation with explicit inverses (numpy, float64) — the reference, not the method."""
    V, y, X = (np.asarray(a, dtype=np.float64) for a in (V, y, X))
    n, p = X.shape
    Vi = np.linalg.inv(V)
    xvx = X.T @ Vi @ X
    beta = np.linalg.solve(xvx, X.T @ Vi @ y)
    r = y - X @ beta
    out = np.linalg.slogdet(V)[1] + r @ Vi @ r
    if reml:
        return -0.5 * (out + np.linalg.slogdet(xvx)[1] + (n - p) * LOG2PI)
    return -0.5 * (out + n * LOG2PI)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(6, 14),
    p=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
    log_var=st.tuples(st.floats(-3, 3), st.floats(-3, 3)),
    reml=st.booleans(),
)
def test_loglik_matches_brute_force_on_random_designs(n, p, seed, log_var, reml):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(n, 3))
    K = W @ W.T / 3
    X = np.column_stack([np.ones(n), rng.normal(size=(n, p - 1))])
    y = rng.normal(size=n) * 2 + 1
    model = FixedMatrix(K) + ScalarMatrix(n)
    theta = jnp.asarray(log_var)
    V = np.exp(log_var[0]) * K + np.exp(log_var[1]) * np.eye(n)
    got = jreml.reml_loglik(theta, y, X, model) if reml else jreml.ml_loglik(theta, y, X, model)
    np.testing.assert_allclose(float(got), brute_force_loglik(V, y, X, reml), rtol=1e-10, atol=1e-9)


def test_loglik_is_minus_inf_when_v_is_not_positive_definite():
    n = 5
    model = jreml.covariance.CustomMatrix(lambda t: t[0] * jnp.eye(n), 1)
    X = np.ones((n, 1))
    assert float(jreml.reml_loglik(jnp.array([-1.0]), np.arange(5.0), X, model)) == -np.inf


def theta_from_components(name: str, components: dict[str, float]):
    """Our θ (log-variances; log-Cholesky for sleepstudy's 2×2 G) from named variance components."""
    ex = jreml.example(name)
    if name == "sleepstudy":
        g = np.array(
            [
                [components["Subject.variance[(Intercept)]"], components["Subject.covariance[(Intercept),Days]"]],
                [components["Subject.covariance[(Intercept),Days]"], components["Subject.variance[Days]"]],
            ]
        )
        L = np.linalg.cholesky(g)
        theta = [np.log(L[0, 0]), L[1, 0], np.log(L[1, 1]), np.log(components["Residual.variance"])]
        return ex, jnp.asarray(theta)
    return ex, jnp.asarray([np.log(components[k]) for k in ex.model.param_names])


def varcorr_components(rows):
    out = {}
    for row in rows:
        if row["group"] == "Residual":
            out["Residual.variance"] = row["vcov"]
        elif row["kind"] == "covariance":
            out[f"{row['group']}.covariance[{row['term1']},{row['term2']}]"] = row["vcov"]
        elif row["term1"] == "(Intercept)" and row["group"] != "Subject":
            out[f"{row['group']}.variance"] = row["vcov"]
        else:
            out[f"{row['group']}.variance[{row['term1']}]"] = row["vcov"]
    return out


CHECK_CASES = [
    ("dyestuff", "dyestuff"),
    ("sleepstudy", "sleepstudy_corr"),
    ("penicillin", "penicillin"),
    ("machines", "machines"),
]


@pytest.mark.parametrize("name,case", CHECK_CASES)
@pytest.mark.parametrize("method", ["REML", "ML"])
def test_loglik_matches_lme4_criterion_at_fixed_theta(name, case, method):
    checks = load_reference(case)[method]["objective_checks"]
    for label, check in checks.items():
        ex, theta = theta_from_components(name, varcorr_components(check["varcorr"]))
        got = (
            jreml.reml_loglik(theta, ex.y, ex.X, ex.model)
            if method == "REML"
            else jreml.ml_loglik(theta, ex.y, ex.X, ex.model)
        )
        np.testing.assert_allclose(float(got), check["logLik"], rtol=0, atol=1e-7, err_msg=label)


# ---------------------------------------------------------------------------------------------------
# Derivatives


def _models():
    rng = np.random.default_rng(0)
    n = 12
    groups = np.repeat(np.arange(4), 3)
    Z = np.column_stack([np.eye(4)[groups], np.eye(4)[groups] * rng.normal(size=(n, 1))])
    Z = Z[:, np.ravel(np.column_stack([np.arange(4), np.arange(4) + 4]))]  # subject-major
    W = rng.normal(size=(n, 4))
    return (
        {
            "random_intercept": (
                CovariancePropagation(DummyMatrix(groups), ScalarMatrix(4)) + ScalarMatrix(n),
                jnp.array([0.3, -0.2]),
            ),
            "slopes_unstructured": (
                CovariancePropagation(Z, KroneckerProduct(IdentityMatrix(4), UnstructuredMatrix(2))) + ScalarMatrix(n),
                jnp.array([0.1, 0.4, -0.3, 0.2]),
            ),
            "ar1": (AR1Matrix(n) + ScalarMatrix(n), jnp.array([0.5, 0.7, -1.0])),
            "compound_symmetry_kernel": (
                CompoundSymmetricMatrix(n) + FixedMatrix(W @ W.T / 4) + DiagonalMatrix(n),
                jnp.concatenate([jnp.array([0.2, 0.3, -0.1]), jnp.linspace(-0.5, 0.5, n)]),
            ),
        },
        rng.normal(size=n) * 3 + 2,
        np.column_stack([np.ones(n), np.arange(n) / n]),
    )


MODELS, Y, X = _models()


def _fd_gradient(f, theta, h=1e-5):
    theta = np.asarray(theta, dtype=np.float64)
    out = []
    for k in range(theta.size):
        e = np.zeros_like(theta)
        e[k] = h
        out.append((f(theta + e) - f(theta - e)) / (2 * h))
    return np.stack(out)


def _dv(model, theta, h=1e-6):
    """∂V/∂θ_k by central finite differences (independent of JAX's autodiff)."""
    theta = np.asarray(theta, dtype=np.float64)
    out = []
    for k in range(theta.size):
        e = np.zeros_like(theta)
        e[k] = h
        out.append((np.asarray(model(jnp.asarray(theta + e))) - np.asarray(model(jnp.asarray(theta - e)))) / (2 * h))
    return np.stack(out)


def _dense_pieces(model, theta, reml):
    V = np.asarray(model(theta))
    Vi = np.linalg.inv(V)
    M = Vi - Vi @ X @ np.linalg.solve(X.T @ Vi @ X, X.T @ Vi) if reml else Vi
    beta = np.linalg.solve(X.T @ Vi @ X, X.T @ Vi @ Y)
    return M, Vi @ (Y - X @ beta)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("method", ["reml", "ml"])
def test_score_matches_finite_differences_in_every_derivative_mode(name, method):
    model, theta = MODELS[name]
    loglik = lambda t: float(jreml._likelihood.loglik(jnp.asarray(t), Y, X, model, method))  # noqa: E731
    expected = _fd_gradient(loglik, theta)
    dv_builder = lambda t: jnp.moveaxis(jax.jacfwd(model)(t), -1, 0)  # noqa: E731
    for mode in ("auto", "jacfwd", "jacrev", "analytic"):
        got = jreml.score(theta, Y, X, model, method=method, derivatives=mode, dv_builder=dv_builder)
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-6, err_msg=mode)
    np.testing.assert_allclose(
        np.asarray(jreml.score(theta, Y, X, model, method=method)),
        np.asarray(jax.grad(lambda t: jreml._likelihood.loglik(t, Y, X, model, method))(theta)),
        rtol=1e-9,
        atol=1e-10,
    )


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("method", ["reml", "ml"])
def test_information_matrices_match_dense_definitions(name, method):
    model, theta = MODELS[name]
    reml = method == "reml"
    M, py = _dense_pieces(model, theta, reml)
    dV = _dv(model, theta)
    U = np.stack([d @ py for d in dV], axis=1)
    ai = 0.5 * U.T @ M @ U
    fisher = 0.5 * np.array([[np.trace(M @ a @ M @ b) for b in dV] for a in dV])
    for mode in ("auto", "jacfwd", "jacrev"):
        got_ai = jreml.average_information(theta, Y, X, model, method=method, derivatives=mode)
        np.testing.assert_allclose(np.asarray(got_ai), ai, rtol=1e-6, atol=1e-8, err_msg=mode)
        got_f = jreml.fisher_information(theta, Y, X, model, method=method, derivatives=mode)
        np.testing.assert_allclose(np.asarray(got_f), fisher, rtol=1e-6, atol=1e-8, err_msg=mode)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("method", ["reml", "ml"])
def test_observed_information_matches_finite_differences_of_the_score(name, method):
    model, theta = MODELS[name]
    score = lambda t: np.asarray(jreml.score(jnp.asarray(t), Y, X, model, method=method))  # noqa: E731
    expected = -_fd_gradient(score, theta)
    got = np.asarray(jreml.observed_information(theta, Y, X, model, method=method))
    np.testing.assert_allclose(got, 0.5 * (expected + expected.T), rtol=1e-5, atol=1e-6)
    # The AI matrix is the average of observed and expected information up to a term that vanishes in
    # expectation; at any θ it must at least be symmetric positive semi-definite.
    ai = np.asarray(jreml.average_information(theta, Y, X, model, method=method))
    assert np.min(np.linalg.eigvalsh(ai)) > -1e-10 * np.max(np.abs(ai))


def test_derivative_mode_errors():
    model, theta = MODELS["random_intercept"]
    with pytest.raises(ValueError, match="dv_builder"):
        jreml.score(theta, Y, X, model, derivatives="analytic")
    with pytest.raises(ValueError, match="derivatives must be one of"):
        jreml.score(theta, Y, X, model, derivatives="numeric")
    with pytest.raises(ValueError, match="method must be one of"):
        jreml.score(theta, Y, X, model, method="mle")


@pytest.mark.parametrize("n", [7, 256, 300, 613])
def test_cholesky_inverse_matches_numpy(n):
    from jreml._backends.dense.likelihood import cholesky_inverse

    A = np.random.default_rng(n).normal(size=(n, n))
    V = A @ A.T / n + np.eye(n)
    inv = np.asarray(cholesky_inverse(jnp.linalg.cholesky(jnp.asarray(V))))
    np.testing.assert_allclose(inv, np.linalg.inv(V), rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(inv, inv.T)
