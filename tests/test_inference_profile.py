"""Profile confidence intervals against lme4's confint(method="profile") (tests/reference/inference.json)."""

import json
from pathlib import Path

import numpy as np
import pytest

import jreml

REFERENCE = json.loads((Path(__file__).parent / "reference" / "inference.json").read_text())


@pytest.fixture(scope="module")
def dyestuff_fit():
    return jreml.fit("Yield ~ 1 + (1 | Batch)", jreml.datasets.load("dyestuff"))


def test_dyestuff_profile_ci_matches_lme4(dyestuff_fit):
    ci = dyestuff_fit.confint()
    assert list(ci.index) == [r["parameter"] for r in REFERENCE["dyestuff_profile_ci"]]
    for row in REFERENCE["dyestuff_profile_ci"]:
        lower, upper = ci.loc[row["parameter"]]
        assert lower == pytest.approx(row["lower"], rel=1e-3)
        assert upper == pytest.approx(row["upper"], rel=1e-3)


def test_confint_rejects_unknown_method(dyestuff_fit):
    with pytest.raises(ValueError, match="method"):
        dyestuff_fit.confint(method="nope")


@pytest.mark.slow
def test_sleepstudy_profile_ci_matches_lme4():
    """Every row of lme4's profile intervals for the correlated (Days | Subject) fit, the correlation's lower limit
    included: it was NaN while the constraint's gradient was NaN at negative covariances (jnp.where passed the sd
    branch's sqrt(max(cov, 0)) derivative on), so SLSQP stopped off the constraint."""
    fit = jreml.fit("Reaction ~ Days + (Days | Subject)", jreml.datasets.load("sleepstudy"))
    ci = fit.confint()
    assert list(ci.index) == [r["parameter"] for r in REFERENCE["sleepstudy_corr_profile_ci"]]
    for row in REFERENCE["sleepstudy_corr_profile_ci"]:
        lower, upper = ci.loc[row["parameter"]]
        assert lower == pytest.approx(row["lower"], rel=1e-3, abs=1e-4), row["parameter"]
        assert upper == pytest.approx(row["upper"], rel=1e-3, abs=1e-4), row["parameter"]


def test_wald_intervals_are_the_fixed_effects_normal_intervals(dyestuff_fit):
    ci = dyestuff_fit.confint(method="wald", level=0.9)
    assert list(ci.index) == [r["parameter"] for r in REFERENCE["dyestuff_profile_ci"]]
    beta, se = float(dyestuff_fit.beta[0]), float(dyestuff_fit.se_beta[0])
    lower, upper = ci.loc["(Intercept)"]
    assert lower == pytest.approx(beta - 1.6448536269514722 * se, rel=1e-12)
    assert upper == pytest.approx(beta + 1.6448536269514722 * se, rel=1e-12)
    assert ci.drop(index="(Intercept)").isna().all().all()  # lme4: NA for sd_ and sigma


def test_bootstrap_intervals_cover_the_estimates_and_follow_the_profile(dyestuff_fit):
    ci = dyestuff_fit.confint(method="bootstrap", n_boot=200, seed=1)
    profile = {r["parameter"]: r for r in REFERENCE["dyestuff_profile_ci"]}
    assert list(ci.index) == list(profile)
    estimates = {"(Intercept)": float(dyestuff_fit.beta[0]), "sigma": float(np.sqrt(dyestuff_fit.sigma2))}
    for name, value in estimates.items():
        assert ci.loc[name, "lower"] < value < ci.loc[name, "upper"], name
    # 200 replicates: the percentile limits of sigma and the intercept lie near the profile's (within 25 %)
    for name in estimates:
        for side in ("lower", "upper"):
            assert ci.loc[name, side] == pytest.approx(profile[name][side], rel=0.25), (name, side)
    assert ci.loc["sd_(Intercept)|Batch", "lower"] >= 0.0
    assert (ci["lower"] <= ci["upper"]).all()
