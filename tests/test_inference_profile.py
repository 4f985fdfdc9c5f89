"""Profile confidence intervals against lme4's confint(method="profile") (tests/reference/inference.json)."""

import json
from pathlib import Path

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
