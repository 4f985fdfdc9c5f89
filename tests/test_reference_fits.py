"""REML and ML fits of the bundled lme4 examples against lme4's reference fits (tests/reference/)."""

import functools

import numpy as np
import pytest
from conftest import REFERENCE_CASES, load_reference, perturbed

import jreml

# lme4's optima, reached from data perturbed at the level of rounding in the portability run
pytestmark = pytest.mark.numerics


@functools.cache
def fitted(name: str, method: str):
    ex = jreml.example(name)
    return ex, jreml.estimate(ex.model, perturbed(ex.y), ex.X, method=method)


def lme4_components(block: dict) -> dict[str, float]:
    """lme4's variance components, from the tightened re-fit where the reference has one.

    lme4's θ are relative Cholesky factors: G = σ²·ΛΛᵀ per term (column-wise lower triangle).
    """
    tight = block.get("optimum_check", {}).get("nloptwrap_tight")
    if tight is None:
        out = {}
        for row in block["varcorr"]:
            if row["group"] == "Residual":
                out["Residual.variance"] = row["vcov"]
            elif row.get("term2") is None:
                term = row.get("term1")
                out[f"{row['group']}.variance" + (f"[{term}]" if term and term != "(Intercept)" else "")] = row["vcov"]
        return out
    s2, theta = tight["sigma2"], tight["theta"]
    out = {"Residual.variance": s2}
    if "Subject.Days" in theta:
        l11, l21, l22 = theta["Subject.(Intercept)"], theta["Subject.Days.(Intercept)"], theta["Subject.Days"]
        out["Subject.variance[(Intercept)]"] = s2 * l11**2
        out["Subject.covariance[(Intercept),Days]"] = s2 * l11 * l21
        out["Subject.variance[Days]"] = s2 * (l21**2 + l22**2)
        return out
    for key, value in theta.items():
        out[key.replace(".(Intercept)", ".variance")] = s2 * value**2
    return out


PARAMS = [(name, method) for name in REFERENCE_CASES for method in ("reml", "ml")]


@pytest.mark.parametrize("name,method", PARAMS)
def test_loglik_and_fixed_effects(name, method):
    ref = load_reference(REFERENCE_CASES[name])[method.upper()]
    ex, fit = fitted(name, method)
    assert bool(fit.converged), fit.message
    assert not bool(fit.singular)
    # lme4's optimum is accurate to ~1e-7: jreml may only beat it, by at most that.
    assert abs(float(fit.loglik) - ref["logLik"]) < 1e-6
    assert float(fit.loglik) > ref["logLik"] - 1e-9
    fixef = np.array([ref["fixef"][k] for k in ex.fixef_names])
    se = np.array([ref["fixef_se"][k] for k in ex.fixef_names])
    np.testing.assert_allclose(np.asarray(fit.beta), fixef, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(np.asarray(fit.se_beta), se, rtol=1e-4)
    if "AIC" in ref:
        np.testing.assert_allclose(float(fit.aic), ref["AIC"], atol=2e-6)
        np.testing.assert_allclose(float(fit.bic), ref["BIC"], atol=2e-6)


@pytest.mark.parametrize("name,method", PARAMS)
def test_variance_components(name, method):
    ref = load_reference(REFERENCE_CASES[name])[method.upper()]
    _, fit = fitted(name, method)
    expected = lme4_components(ref)
    assert set(expected) == set(fit.param_names)
    for key, value in expected.items():
        np.testing.assert_allclose(float(fit.params[key]), value, rtol=1e-5, err_msg=key)


@pytest.mark.parametrize("name", ["dyestuff", "penicillin", "machines", "sleepstudy"])
def test_blups_match_lme4_conditional_modes(name):
    ref = load_reference(REFERENCE_CASES[name])["REML"]["ranef"]
    ex, fit = fitted(name, "reml")
    blups = fit.blup(with_sd=True)
    for group, block in ref.items():
        modes, sd = (np.asarray(a) for a in blups[group])
        terms = block["terms"]
        if name == "sleepstudy":
            # Columns are subject-major: (subject j, term t) at position 2j + t.
            levels = sorted(block["modes"])
            modes, sd = modes.reshape(-1, 2), sd.reshape(-1, 2)
        else:
            levels = list(ex.model.terms[[t.name for t in ex.model.terms].index(group)].Z.levels)
            modes, sd = modes[:, None], sd[:, None]
        expected = np.array([[block["modes"][lvl][t] for t in terms] for lvl in levels])
        expected_sd = np.array([[block["cond_sd"][lvl][t] for t in terms] for lvl in levels])
        scale = np.max(np.abs(expected))
        np.testing.assert_allclose(modes, expected, rtol=1e-4, atol=1e-4 * scale, err_msg=group)
        np.testing.assert_allclose(sd, expected_sd, rtol=1e-4, err_msg=group)


def test_predictions_and_residuals_are_consistent():
    ex, fit = fitted("penicillin", "reml")
    pred = np.asarray(fit.predict())
    np.testing.assert_allclose(pred + np.asarray(fit.residuals()), ex.y, rtol=0, atol=1e-10)
    np.testing.assert_allclose(np.asarray(fit.marginal_predict()), ex.X @ np.asarray(fit.beta), atol=1e-10)
    np.testing.assert_allclose(np.asarray(fit.marginal_residuals()), ex.y - ex.X @ np.asarray(fit.beta), atol=1e-10)
    # Conditional residuals are the residual-variance share of V·Py: ε̂ = σ̂²·Py.
    np.testing.assert_allclose(
        np.asarray(fit.residuals()), float(fit.params["Residual.variance"]) * np.asarray(fit.p_y), atol=1e-8
    )


@pytest.mark.parametrize("trait", [f"trait{i}" for i in range(1, 9)])
def test_kinship_traits(trait):
    ref = load_reference("kinship_visible")["traits"][trait]
    ex = jreml.example("kinship", trait=trait)
    fit = jreml.estimate(ex.model, perturbed(ex.y), ex.X)
    assert bool(fit.converged)
    s2g, s2e = float(fit.params["g.variance"]), float(fit.params["Residual.variance"])
    np.testing.assert_allclose(s2g, ref["s2g"], rtol=1e-5)
    np.testing.assert_allclose(s2e, ref["s2e"], rtol=1e-5)
    np.testing.assert_allclose(s2g / (s2g + s2e), ref["h2"], rtol=1e-5)
    assert abs(float(fit.loglik) - ref["reml_loglik"]) < 1e-6
    np.testing.assert_allclose(np.asarray(fit.beta), [ref["beta"]["(Intercept)"], ref["beta"]["covariate"]], rtol=1e-5)
