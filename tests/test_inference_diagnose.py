"""fit.diagnose(): exact gradient and Hessian at θ̂ against finite differences of the public log-likelihood, the
converged / singular / stopped-early verdicts and their advice."""

import dataclasses
import pathlib
import warnings

import numpy as np
import pandas as pd
import pytest

import jreml

HERE = pathlib.Path(__file__).parent


@pytest.fixture(scope="module")
def sleepstudy():
    return jreml.fit("Reaction ~ Days + (Days | Subject)", jreml.datasets.load("sleepstudy"))


@pytest.fixture(scope="module")
def singular():
    data = pd.read_csv(HERE / "reference" / "singular_sleepstudy.csv")
    return jreml.fit("y0 ~ Days + (Days | Subject)", data)  # lme4: singular (the slope variance is 0)


def central_differences(f, x, h):
    out = []
    for i in range(x.size):
        e = np.zeros_like(x)
        e[i] = h
        out.append((f(x + e) - f(x - e)) / (2 * h))
    return np.stack(out)


def test_converged_fit_is_certified(sleepstudy):
    d = sleepstudy.diagnose()
    assert d.certified and d.negative_definite and d.fit_converged
    assert d.at_boundary == () and d.flat_directions == ()
    assert d.projected_gradient_norm < 1e-8 and d.newton_gain < 1e-12
    assert 1 <= d.condition < 100
    assert "converged" in d.advice[0]
    assert dataclasses.is_dataclass(d)
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.certified = False
    text = str(d)
    assert "certified local maximum: yes" in text and "Residual.variance" in text
    assert repr(d).startswith("Diagnosis(certified=True")


def test_derivatives_match_finite_differences(sleepstudy):
    """g and H by autodiff against central differences of jreml.reml_loglik and of its gradient."""
    d = sleepstudy.diagnose()
    fit = sleepstudy
    theta = np.asarray(fit.theta, float)

    def ell(t):
        return float(jreml.reml_loglik(t, fit.y, fit.X, fit.model))

    np.testing.assert_allclose(d.loglik, float(fit.loglik), rtol=1e-12)
    scale = np.max(np.abs(d.hessian))
    fd_grad = central_differences(ell, theta, 1e-5)
    np.testing.assert_allclose(d.gradient, fd_grad, atol=1e-6 * scale)
    # H by differences of ℓ itself: second differences, error O(h²) + rounding O(eps·|ℓ|/h²)
    h = 1e-4
    fd_hess = np.empty((theta.size, theta.size))
    for i in range(theta.size):
        for j in range(theta.size):
            ei, ej = np.eye(theta.size)[i] * h, np.eye(theta.size)[j] * h
            fd_hess[i, j] = (
                ell(theta + ei + ej) - ell(theta + ei - ej) - ell(theta - ei + ej) + ell(theta - ei - ej)
            ) / (4 * h * h)
    np.testing.assert_allclose(d.hessian, fd_hess, atol=1e-4 * scale)
    # and the package's observed information (its own autodiff route)
    observed = np.asarray(jreml.observed_information(fit.theta, fit.y, fit.X, fit.model))
    np.testing.assert_allclose(-d.hessian, observed, rtol=1e-9, atol=1e-12 * scale)


def test_singular_fit_flags_the_boundary(singular):
    assert bool(singular.singular)
    d = singular.diagnose()
    assert d.at_boundary == ("Subject.variance[Days]",)
    assert d.boundary_slope["Subject.variance[Days]"] < 0  # ℓ falls off the boundary: the zero is the estimate
    assert d.boundary_gain["Subject.variance[Days]"] == 0.0
    assert d.certified
    assert any(line.startswith("singular fit: Subject.variance[Days]") for line in d.advice)
    assert "yes" in [line.split()[-1] for line in str(d).splitlines() if "Subject.variance[Days]" in line]


def test_stopped_early_is_not_certified():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = jreml.fit("Reaction ~ Days + (Days | Subject)", jreml.datasets.load("sleepstudy"), max_iter=1)
    d = fit.diagnose()
    assert not d.certified and not d.fit_converged
    assert d.newton_gain > 1e-6
    assert any("not converged" in line or "not a maximum" in line for line in d.advice)


def test_satterthwaite_df_from_the_exact_hessian(sleepstudy):
    """Brute force: ν = 2 (cᵀΦc)² / (gᵀ(−H)⁻¹g) with H from diagnose (autodiff) and g by central differences of
    Φ(θ) = (XᵀV(θ)⁻¹X)⁻¹ built densely in numpy, against coef_table's closed-form Satterthwaite df."""
    fit = sleepstudy
    d = fit.diagnose()
    theta = np.asarray(fit.theta, float)
    X = np.asarray(fit.X)

    def phi(t):
        V = np.asarray(fit.model(t))
        return np.linalg.inv(X.T @ np.linalg.solve(V, X))

    dphi = central_differences(phi, theta, 1e-6)  # (k, p, p)
    acov = np.linalg.inv(-d.hessian)
    want = []
    for j in range(X.shape[1]):
        g = dphi[:, j, j]
        want.append(2 * phi(theta)[j, j] ** 2 / (g @ acov @ g))
    np.testing.assert_allclose(fit.coef_table("satterthwaite")["df"], want, rtol=1e-6)


def test_confounded_terms_show_a_flat_direction():
    """(1 | Batch) + (1 | Batch2) with Batch2 a copy of Batch: only the sum of the two variances is identified;
    the scaled Hessian has one eigenvalue ≈ 0 along their difference."""
    data = jreml.datasets.load("dyestuff")
    data["Batch2"] = data["Batch"]
    d = jreml.fit("Yield ~ 1 + (1 | Batch) + (1 | Batch2)", data).diagnose()
    assert len(d.flat_directions) == 1
    eigenvalue, direction = d.flat_directions[0]
    assert eigenvalue < 1e-8 and d.condition > 1e8
    assert direction["Batch.variance"] == pytest.approx(-direction["Batch2.variance"], rel=1e-3)
    assert abs(direction["Residual.variance"]) < 1e-3
    assert any("nearly flat along" in line and "Batch2.variance" in line for line in d.advice)
