"""fit_optax (jreml._optax_fit): optax optimisers on the profiled likelihood reach the AI-REML optimum."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import load_reference

import jreml
from jreml._optax_fit import fit_optax

CASES = {"dyestuff": "dyestuff", "sleepstudy": "sleepstudy_corr", "penicillin": "penicillin"}


@pytest.mark.parametrize("name", list(CASES))
def test_lbfgs_reaches_reml_optimum(name):
    ex = jreml.example(name)
    fit = fit_optax(ex.model, ex.y, ex.X)
    assert bool(fit.converged) and int(fit.status) == 0 and 0 < int(fit.n_iter) < 100
    assert fit.algorithm == "optax" and fit.method == "reml"
    # jreml.estimate matches lme4's logLik to 1e-6 and never falls below it by more than 1e-9
    # (test_reference_fits): hold the optax fit to the same standard.
    ref = load_reference(CASES[name])["REML"]
    assert abs(float(fit.loglik) - ref["logLik"]) < 1e-6
    assert float(fit.loglik) > ref["logLik"] - 1e-9
    fixef = np.array([ref["fixef"][k] for k in ex.fixef_names])
    np.testing.assert_allclose(np.asarray(fit.beta), fixef, rtol=1e-5)


def test_ml_and_unprofiled():
    ex = jreml.example("dyestuff")
    ref = load_reference("dyestuff")["ML"]
    fit = fit_optax(ex.model, ex.y, ex.X, method="ml")
    assert bool(fit.converged) and fit.method == "ml"
    assert abs(float(fit.loglik) - ref["logLik"]) < 1e-6
    np.testing.assert_allclose(float(fit.se_beta[0]), ref["fixef_se"]["(Intercept)"], rtol=1e-4)
    lme4 = {row["group"]: row["vcov"] for row in ref["varcorr"]}
    np.testing.assert_allclose(np.asarray(fit.natural_params), [lme4["Batch"], lme4["Residual"]], rtol=1e-4)
    plain = fit_optax(ex.model, ex.y, ex.X, method="ml", profiled=False)
    assert bool(plain.converged)
    assert abs(float(plain.loglik) - float(fit.loglik)) < 1e-7


def test_adam_gets_close():
    ex = jreml.example("dyestuff")
    fit = fit_optax(ex.model, ex.y, ex.X, optimizer=optax.adam(0.05), max_steps=1500, tol=1e-6)
    ref = load_reference("dyestuff")["REML"]["logLik"]
    assert abs(float(fit.loglik) - ref) < 1e-3


def test_max_steps_reported():
    ex = jreml.example("dyestuff")
    fit = fit_optax(ex.model, ex.y, ex.X, max_steps=1)
    assert not bool(fit.converged) and int(fit.status) == 1 and int(fit.n_iter) == 1


def test_vmap_over_y():
    ex = jreml.example("dyestuff")
    y = jnp.asarray(ex.y)
    noise = np.random.default_rng(0).normal(0.0, 20.0, (3, y.shape[0]))
    batch = y[None, :] + jnp.asarray(noise)
    X = jnp.asarray(ex.X)
    fits = jax.vmap(lambda yy: fit_optax(ex.model, yy, X))(batch)
    assert fits.loglik.shape == (3,) and fits.theta.shape == (3, 2)
    assert bool(jnp.all(fits.converged))
    for i in range(3):
        single = fit_optax(ex.model, batch[i], X)
        assert abs(float(fits.loglik[i]) - float(single.loglik)) < 1e-8
        np.testing.assert_allclose(np.asarray(fits.theta[i]), np.asarray(single.theta), atol=1e-6)
