"""jreml.anova: likelihood-ratio tests between nested fits against lme4's anova (tests/reference/inference.json)."""

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

import jreml
from jreml._inference.lrt import boundary_pvalue

REFERENCE = json.loads((Path(__file__).parent / "reference" / "inference.json").read_text())


@pytest.fixture(scope="module")
def sleepstudy():
    return jreml.datasets.load("sleepstudy")


@pytest.fixture(scope="module")
def slope_fits(sleepstudy):
    ref = REFERENCE["sleepstudy_lrt_slope"]
    return jreml.fit(ref["null"], sleepstudy), jreml.fit(ref["alt"], sleepstudy)


def test_random_slope_lrt_matches_lme4(slope_fits):
    ref = REFERENCE["sleepstudy_lrt_slope"]
    null, alt = slope_fits
    table = jreml.anova(alt, null)  # sorted by npar, as lme4 does
    assert list(table.index) == [ref["null"].replace(" ", ""), ref["alt"].replace(" ", "")] or list(table.index) == [
        null.formula,
        alt.formula,
    ]
    assert list(table["npar"]) == [4, 6]
    assert table["logLik"].iloc[0] == pytest.approx(ref["loglik_null_reml"], abs=1e-6)
    assert table["logLik"].iloc[1] == pytest.approx(ref["loglik_alt_reml"], abs=1e-6)
    chisq = table["Chisq"].iloc[1]
    assert chisq == pytest.approx(ref["chisq"], abs=2e-6) and table["Df"].iloc[1] == ref["df"]
    assert table["Pr(>Chisq)"].iloc[1] == pytest.approx(stats.chi2.sf(ref["chisq"], 2), rel=1e-4)
    # the slope's variance at 0 is on the boundary: ½χ²₁ + ½χ²₂
    mixture = 0.5 * stats.chi2.sf(chisq, 1) + 0.5 * stats.chi2.sf(chisq, 2)
    assert table["Pr(>Chisq) boundary"].iloc[1] == pytest.approx(mixture, rel=1e-12)
    assert table["deviance"].iloc[1] == pytest.approx(-2 * ref["loglik_alt_reml"], abs=2e-6)
    assert np.isnan(table["Chisq"].iloc[0])


def test_reml_fits_with_other_fixed_effects_are_refitted_by_ml(sleepstudy, slope_fits, capsys):
    _, alt = slope_fits
    without_days = jreml.fit("Reaction ~ 1 + (Days | Subject)", sleepstudy)
    table = jreml.anova(without_days, alt)
    assert "refitting model(s) with ML" in capsys.readouterr().out
    ml = [jreml.fit(f, sleepstudy, method="ml") for f in ("Reaction ~ 1 + (Days | Subject)", alt.formula)]
    np.testing.assert_allclose(table["logLik"].to_numpy(), [float(f.loglik) for f in ml], atol=1e-6)
    assert table["Df"].iloc[1] == 1 and "Pr(>Chisq) boundary" not in table.columns


def test_boundary_mixture_of_one_variance_halves_the_p_value():
    assert boundary_pvalue(3.84, 1) == pytest.approx(0.5 * stats.chi2.sf(3.84, 1))
    assert boundary_pvalue(0.0, 1) == pytest.approx(1.0)


def test_fits_of_other_data_or_a_single_fit_are_refused(sleepstudy, slope_fits):
    null, _ = slope_fits
    with pytest.raises(ValueError, match="at least two"):
        jreml.anova(null)
    other = jreml.fit("Reaction ~ Days + (1 | Subject)", sleepstudy.iloc[:-10])
    with pytest.raises(ValueError, match="other data"):
        jreml.anova(null, other)
