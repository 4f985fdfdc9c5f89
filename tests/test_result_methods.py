"""FitResult's lme4-style extras: coef, fitted, simulate, refit, delta and h2."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_reference

import jreml
from jreml._batch import _h2
from jreml._covariance.queries import kernel_variance_index


@pytest.fixture(scope="module")
def sleepstudy_fit():
    return jreml.fit("Reaction ~ Days + (Days | Subject)", jreml.datasets.load("sleepstudy"))


def test_coef_is_fixef_plus_lme4_modes(sleepstudy_fit):
    ref = load_reference("sleepstudy_corr")["REML"]
    table = sleepstudy_fit.coef()["Subject"]
    assert list(table.columns) == ["(Intercept)", "Days"] and len(table) == 18
    for level, modes in ref["ranef"]["Subject"]["modes"].items():
        for name, mode in modes.items():
            # the modes' tolerance of test_results_lme4 (1e-4 of their size), on fixef + mode
            tolerance = 1e-4 * (abs(ref["fixef"][name]) + abs(mode))
            assert table.loc[level, name] == pytest.approx(ref["fixef"][name] + mode, abs=tolerance), (level, name)


def test_fitted_plus_residuals_is_the_response(sleepstudy_fit):
    np.testing.assert_allclose(
        np.asarray(sleepstudy_fit.fitted() + sleepstudy_fit.residuals()), np.asarray(sleepstudy_fit.y), rtol=1e-12
    )


def test_simulate_and_refit(sleepstudy_fit):
    fit = sleepstudy_fit
    draws = np.asarray(fit.simulate(3, seed=7))
    assert draws.shape == (3, 180)
    np.testing.assert_array_equal(draws, np.asarray(fit.simulate(3, seed=7)))
    assert not np.allclose(draws, np.asarray(fit.simulate(3, seed=8)))
    again = fit.refit(np.asarray(fit.y))
    assert float(again.loglik) == pytest.approx(float(fit.loglik), abs=1e-8)
    assert again.fixef.keys() == fit.fixef.keys() and again.formula == fit.formula
    other = fit.refit(draws[0])
    assert bool(other.converged) and float(other.loglik) != float(fit.loglik)
    with pytest.raises(ValueError, match="180 rows"):
        fit.refit(draws[0, :-1])
    bad = draws[0].copy()
    bad[4] = np.nan
    with pytest.raises(ValueError, match="row 4"):
        fit.refit(bad)


def test_delta_method_matches_the_jacobian_by_finite_differences(sleepstudy_fit):
    fit = sleepstudy_fit
    ratio = fit.delta(lambda p: p["Subject.variance[Days]"] / p["Residual.variance"] + 0 * p["Days"])
    params = np.asarray(fit.natural_params)
    names = list(fit.param_names)
    i, j = names.index("Subject.variance[Days]"), names.index("Residual.variance")
    assert ratio.value == pytest.approx(params[i] / params[j], rel=1e-12)
    theta = np.asarray(fit.theta)
    jac = np.zeros(theta.shape[0])
    for k in range(theta.shape[0]):
        h = 1e-6 * max(1.0, abs(theta[k]))
        up, down = theta.copy(), theta.copy()
        up[k] += h
        down[k] -= h
        f_up, f_down = (np.asarray(fit.model.build_params(jnp.asarray(t))) for t in (up, down))
        jac[k] = (f_up[i] / f_up[j] - f_down[i] / f_down[j]) / (2 * h)
    se = np.sqrt(jac @ np.asarray(fit.vcov_theta) @ jac)
    assert ratio.se == pytest.approx(se, rel=1e-6)
    # a fixed effect: its own standard error
    assert fit.delta(lambda p: p["Days"]).se == pytest.approx(fit.se["Days"], rel=1e-12)


def test_h2_of_a_kinship_fit_and_its_refusal_elsewhere(sleepstudy_fit):
    ex = jreml.example("kinship")
    fit = jreml.estimate(ex.model, ex.y, ex.X)
    index, powers = kernel_variance_index(fit.model)
    want, want_se = _h2(
        np.asarray(fit.theta)[None],
        np.asarray(fit.natural_params)[None],
        np.asarray(fit.vcov_theta)[None],
        index,
        powers,
    )
    assert fit.h2.value == pytest.approx(float(want[0]), rel=1e-12)
    assert fit.h2.se == pytest.approx(float(want_se[0]), rel=1e-8)
    with pytest.raises(AttributeError, match="relationship-matrix"):
        _ = sleepstudy_fit.h2
