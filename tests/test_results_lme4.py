"""The lme4-style result of ``jreml.fit``: VarCorr, ranef, summary, predict and to_dict against lme4."""

import functools
import json
import re

import equinox as eqx
import numpy as np
import pandas as pd
import pytest
from conftest import load_reference

import jreml

CASES = {
    "dyestuff": ("dyestuff", "Yield ~ 1 + (1 | Batch)"),
    "sleepstudy": ("sleepstudy_corr", "Reaction ~ Days + (Days | Subject)"),
    "penicillin": ("penicillin", "diameter ~ 1 + (1 | plate) + (1 | sample)"),
    "machines": ("machines", "score ~ Machine + (1 | Worker) + (1 | Worker:Machine)"),
    "john_alpha": ("john_alpha", "yield ~ 1 + rep + (1 | gen) + (1 | rep:block)"),
}
PARAMS = [(name, method) for name in CASES for method in ("reml", "ml")]


@functools.cache
def fitted(name: str, method: str):
    return jreml.fit(CASES[name][1], jreml.datasets.load(name), method=method)


def reference(name: str, method: str) -> dict:
    return load_reference(CASES[name][0])[method.upper()]


def lme4_name(name: str) -> str:
    """formulaic's treatment column ``Machine[T.B]`` as lme4 spells it (``MachineB``)."""
    return re.sub(r"^(.+)\[T\.(.+)\]$", r"\1\2", name)


def lme4_varcorr(block: dict) -> dict[tuple, tuple[float, float]]:
    """{(group, term1, term2): (variance or covariance, sd or corr)}, from lme4's tightened re-fit if present.

    lme4's θ are relative Cholesky factors, column-wise: G = σ²·ΛΛᵀ per group, with θ named
    ``group.term`` on the diagonal and ``group.row_term.column_term`` below it.
    """
    rows = block["varcorr"]
    tight = block.get("optimum_check", {}).get("nloptwrap_tight")
    if tight is None:
        out = {}
        for row in rows:
            if row["group"] == "Residual":
                out[("Residual", None, None)] = (row["vcov"], row["sdcor"])
            else:
                out[(row["group"], row.get("term1") or "(Intercept)", row.get("term2"))] = (row["vcov"], row["sdcor"])
        return out
    s2, theta = tight["sigma2"], tight["theta"]
    out = {("Residual", None, None): (s2, np.sqrt(s2))}
    groups: dict[str, list[str]] = {}
    for row in rows:
        if row["group"] != "Residual" and row["term2"] is None:
            groups.setdefault(row["group"], []).append(row["term1"])
    for group, terms in groups.items():
        m = len(terms)
        lam = np.zeros((m, m))
        for j in range(m):
            for i in range(j, m):
                key = f"{group}.{terms[i]}" if i == j else f"{group}.{terms[i]}.{terms[j]}"
                lam[i, j] = theta[key]
        G = s2 * lam @ lam.T
        sd = np.sqrt(np.diagonal(G))
        for i in range(m):
            out[(group, terms[i], None)] = (G[i, i], sd[i])
            for j in range(i + 1, m):
                out[(group, terms[i], terms[j])] = (G[i, j], G[i, j] / (sd[i] * sd[j]))
    return out


def lme4_fixef(block: dict) -> dict[str, float]:
    tight = block.get("optimum_check", {}).get("nloptwrap_tight")
    return (tight or block)["fixef"]


def none_if_nan(v):
    return None if v is None or (isinstance(v, float) and np.isnan(v)) else v


@pytest.mark.parametrize("name,method", PARAMS)
def test_varcorr_matches_lme4(name, method):
    fit = fitted(name, method)
    assert bool(fit.converged), fit.message
    vc = fit.varcorr
    assert list(vc.columns) == ["group", "term1", "term2", "variance", "covariance", "sd", "corr"]
    expected = lme4_varcorr(reference(name, method))
    got = {}
    for row in vc.itertuples(index=False):
        key = (row.group, none_if_nan(row.term1), none_if_nan(row.term2))
        if key[2] is None:
            assert np.isnan(row.covariance) and np.isnan(row.corr)
            got[key] = (row.variance, row.sd)
        else:
            assert np.isnan(row.variance) and np.isnan(row.sd)
            got[key] = (row.covariance, row.corr)
    assert set(got) == set(expected)
    for key, (value, sdcor) in expected.items():
        np.testing.assert_allclose(got[key][0], value, rtol=1e-4, err_msg=str(key))
        np.testing.assert_allclose(got[key][1], sdcor, rtol=1e-4, err_msg=str(key))
    assert vc.iloc[-1]["group"] == "Residual"
    np.testing.assert_allclose(fit.sigma2, expected[("Residual", None, None)][0], rtol=1e-4)


@pytest.mark.parametrize("name,method", PARAMS)
def test_fixef_and_se_match_lme4(name, method):
    fit = fitted(name, method)
    ref = reference(name, method)
    fixef = lme4_fixef(ref)
    assert [lme4_name(k) for k in fit.fixef] == list(ref["fixef"])
    for key, value in fit.fixef.items():
        np.testing.assert_allclose(value, fixef[lme4_name(key)], rtol=1e-6, atol=1e-9, err_msg=key)
    for key, value in fit.se.items():
        np.testing.assert_allclose(value, ref["fixef_se"][lme4_name(key)], rtol=1e-4, err_msg=key)
    assert abs(float(fit.loglik) - ref["logLik"]) < 1e-6
    assert fit.nobs == ref["nobs"]


@pytest.mark.parametrize("name,method", [p for p in PARAMS if p[0] != "john_alpha"])
def test_ranef_matches_lme4_conditional_modes(name, method):
    fit = fitted(name, method)
    ref = reference(name, method)["ranef"]
    ranef = fit.ranef
    assert set(ranef) == set(ref)
    for group, block in ref.items():
        frame = ranef[group]
        terms = block["terms"]
        assert list(frame.columns) == terms + [f"{t}_sd" for t in terms]
        assert sorted(frame.index) == sorted(block["modes"])
        levels = list(block["modes"])
        modes = frame.loc[levels, terms].to_numpy()
        sd = frame.loc[levels, [f"{t}_sd" for t in terms]].to_numpy()
        expected = np.array([[block["modes"][lvl][t] for t in terms] for lvl in levels])
        expected_sd = np.array([[block["cond_sd"][lvl][t] for t in terms] for lvl in levels])
        scale = np.max(np.abs(expected))
        np.testing.assert_allclose(modes, expected, rtol=1e-4, atol=1e-4 * scale, err_msg=group)
        np.testing.assert_allclose(sd, expected_sd, rtol=1e-4, err_msg=group)


@pytest.mark.parametrize("name,method", PARAMS)
def test_summary_is_laid_out_like_lme4(name, method):
    fit = fitted(name, method)
    text = str(fit)
    assert text == fit.summary()
    lines = text.splitlines()
    if method == "reml":
        assert lines[0] == "Linear mixed model fit by REML ['lmerMod']"
        assert f"REML criterion at convergence: {-2 * float(fit.loglik):.4f}" in text
    else:
        assert lines[0] == "Linear mixed model fit by maximum likelihood ['lmerMod']"
        header = lines.index(next(line for line in lines if line.split()[:2] == ["AIC", "BIC"]))
        assert lines[header].split() == ["AIC", "BIC", "logLik", "deviance", "df.resid"]
        values = [float(v) for v in lines[header + 1].split()]
        np.testing.assert_allclose(
            values[:4], [float(fit.aic), float(fit.bic), float(fit.loglik), -2 * float(fit.loglik)], atol=1e-4
        )
        assert values[4] == fit.nobs - fit.num_params
    assert lines[1] == f"Formula: {CASES[name][1]}"
    for section in ("Scaled residuals:", "Random effects:", "Fixed effects:"):
        assert section in lines
    assert " Groups" in text and "Variance" in text and "Std.Dev." in text
    groups = "; ".join(f"{g}, {n}" for g, n in fit.ngroups.items())
    assert f"Number of obs: {fit.nobs}, groups:  {groups}" in text
    # Scaled residuals: min and max of the conditional residuals over σ̂.
    scaled = np.asarray(fit.residuals()) / np.sqrt(fit.sigma2)
    row = lines[lines.index("Scaled residuals:") + 2].split()
    np.testing.assert_allclose([float(row[0]), float(row[-1])], [scaled.min(), scaled.max()], atol=1e-4)
    # Random-effects table: each variance to the printed precision.
    table = lines[lines.index("Random effects:") + 1 : next(i for i, ln in enumerate(lines) if ln.startswith("Number"))]
    residual = next(ln for ln in table if ln.split()[0] == "Residual").split()
    np.testing.assert_allclose(float(residual[1]), fit.sigma2, rtol=1e-3)
    # Fixed effects: estimate and t value per name.
    start = lines.index("Fixed effects:") + 2
    for i, (key, value) in enumerate(fit.fixef.items()):
        cells = lines[start + i].split()
        assert cells[0] == key
        np.testing.assert_allclose(float(cells[1]), value, rtol=1e-3)
        np.testing.assert_allclose(float(cells[3]), value / fit.se[key], atol=1e-3)
    assert ("Correlation of Fixed Effects:" in lines) == (len(fit.fixef) > 1)


def test_summary_correlation_of_fixed_effects():
    fit = fitted("sleepstudy", "reml")
    lines = fit.summary().splitlines()
    i = lines.index("Correlation of Fixed Effects:")
    assert lines[i + 1].split() == ["(Intr)"]
    assert lines[i + 2].split() == ["Days", "-0.138"]  # lme4's printed value
    assert "Subject  (Intercept)" in fit.summary() and "0.07" in fit.summary()


def test_to_dict_is_the_json_object():
    fit = fitted("sleepstudy", "reml")
    out = fit.to_dict()
    assert list(out) == [
        "method", "nobs", "loglik", "aic", "bic", "converged", "singular", "n_iter", "fixef", "se", "varcorr", "sigma2",
    ]  # fmt: skip
    assert json.loads(json.dumps(out)) == out
    assert out["method"] == "REML" and out["nobs"] == 180 and out["converged"] is True
    assert isinstance(out["n_iter"], int) and isinstance(out["singular"], bool)
    keys = {"group", "term1", "term2", "variance", "covariance", "sd", "corr"}
    assert all(set(row) == keys for row in out["varcorr"])
    assert out["varcorr"][-1] == {
        "group": "Residual",
        "term1": None,
        "term2": None,
        "variance": fit.sigma2,
        "covariance": None,
        "sd": np.sqrt(fit.sigma2),
        "corr": None,
    }
    cov = next(r for r in out["varcorr"] if r["term2"] is not None)
    assert cov["variance"] is None and cov["sd"] is None and abs(cov["corr"] - 0.0655512382381282) < 1e-4


def test_ngroups_nobs_sigma2():
    assert fitted("machines", "reml").ngroups == {"Worker:Machine": 18, "Worker": 6}
    assert fitted("penicillin", "reml").ngroups == {"plate": 24, "sample": 6}
    assert fitted("dyestuff", "reml").nobs == 30


@pytest.mark.parametrize("name", ["sleepstudy", "machines", "john_alpha"])
def test_predict_on_the_training_data_as_newdata(name):
    fit = fitted(name, "reml")
    df = jreml.datasets.load(name)
    np.testing.assert_allclose(np.asarray(fit.predict(newdata=df)), np.asarray(fit.predict()), rtol=0, atol=1e-9)
    marginal = np.asarray(fit.marginal_predict())
    for re_form in (False, "~0", "NA"):
        np.testing.assert_allclose(np.asarray(fit.predict(re_form=re_form)), marginal, atol=1e-12)
        np.testing.assert_allclose(np.asarray(fit.predict(newdata=df, re_form=re_form)), marginal, atol=1e-9)
    np.testing.assert_allclose(
        np.asarray(fit.residuals()),
        df[fit.formula.split("~")[0].strip()].to_numpy() - np.asarray(fit.predict()),
        atol=1e-9,
    )


def test_new_levels_predict_from_fixed_effects_alone():
    fit = fitted("sleepstudy", "reml")
    new = pd.DataFrame({"Subject": ["new", "308", "new"], "Days": [0.0, 3.0, 5.0]})
    pred = np.asarray(fit.predict(newdata=new))
    beta = fit.fixef
    np.testing.assert_allclose(pred[[0, 2]], beta["(Intercept)"] + beta["Days"] * np.array([0.0, 5.0]), rtol=1e-12)
    u = fit.ranef["Subject"].loc["308"]
    want = beta["(Intercept)"] + u["(Intercept)"] + 3.0 * (beta["Days"] + u["Days"])
    np.testing.assert_allclose(pred[1], want, rtol=1e-12)
    # An interaction level: a new worker-machine pair keeps its worker's effect.
    machines = fitted("machines", "reml")
    new = pd.DataFrame({"Worker": ["1", "9"], "Machine": ["A", "B"]})
    pred = np.asarray(machines.predict(newdata=new))
    fe = machines.fixef
    ranef = machines.ranef
    want0 = (
        fe["(Intercept)"] + ranef["Worker"].loc["1", "(Intercept)"] + ranef["Worker:Machine"].loc["1:A", "(Intercept)"]
    )
    np.testing.assert_allclose(pred, [want0, fe["(Intercept)"] + fe["Machine[T.B]"]], rtol=1e-12)


def test_predict_matches_levels_by_value_whatever_the_column_dtype():
    """A grouping column of ints in the fit and floats in newdata (or a NaN, which makes an int column float)
    names the same levels: each row keeps its random effects; only the missing level's row falls back to the
    fixed effects (it silently dropped every random effect)."""
    data = jreml.datasets.load("machines")
    data["Worker"] = data["Worker"].astype(int)
    fit = jreml.fit("score ~ Machine + (1 | Worker) + (1 | Worker:Machine)", data)
    want = np.asarray(fit.predict(newdata=data.head(6)))
    as_float = data.head(6).assign(Worker=data["Worker"].head(6).astype(float))
    np.testing.assert_allclose(np.asarray(fit.predict(newdata=as_float)), want, rtol=1e-12)
    with_nan = as_float.copy()
    with_nan.loc[2, "Worker"] = np.nan
    got = np.asarray(fit.predict(newdata=with_nan))
    np.testing.assert_allclose(np.delete(got, 2), np.delete(want, 2), rtol=1e-12)
    fe = fit.fixef
    machine = data.loc[2, "Machine"]
    np.testing.assert_allclose(got[2], fe["(Intercept)"] + fe.get(f"Machine[T.{machine}]", 0.0), rtol=1e-12)


def test_predict_errors():
    fit = fitted("machines", "reml")
    with pytest.raises(ValueError, match="not seen in the fit"):
        fit.predict(newdata=pd.DataFrame({"Worker": ["1"], "Machine": ["Z"]}))
    with pytest.raises(ValueError, match="re_form"):
        fit.predict(re_form="~(1 | Worker)")
    with pytest.raises(ValueError, match="Worker"):
        fit.predict(newdata=pd.DataFrame({"Machine": ["A"]}))
    assert np.asarray(fit.predict(newdata=jreml.datasets.load("machines").head(0))).shape == (0,)  # lme4: numeric(0)
    with pytest.raises(ValueError, match="responses is empty"):
        jreml.fit_batch("~ Machine + (1 | Worker)", jreml.datasets.load("machines"), [])
    ex = jreml.example("dyestuff")
    plain = jreml.estimate(ex.model, ex.y, ex.X)
    with pytest.raises(AttributeError, match="jreml.fit"):
        plain.varcorr  # noqa: B018


def test_uncorrelated_terms_and_metadata_are_static():
    df = jreml.datasets.load("sleepstudy")
    fit = jreml.fit("Reaction ~ Days + (Days || Subject)", df)
    vc = fit.varcorr
    assert list(vc.group) == ["Subject", "Subject.1", "Residual"]
    assert list(vc.term1[:2]) == ["(Intercept)", "Days"]
    assert list(fit.ranef) == ["Subject"]
    assert list(fit.ranef["Subject"].columns) == ["(Intercept)", "Days", "(Intercept)_sd", "Days_sd"]
    assert fit.ngroups == {"Subject": 18}
    np.testing.assert_allclose(np.asarray(fit.predict(newdata=df)), np.asarray(fit.predict()), atol=1e-9)
    # The formula metadata is a static, hashable field: a formula fit passes through filter_jit.
    hash(fit.formula_info)
    np.testing.assert_allclose(np.asarray(eqx.filter_jit(lambda r: r.beta * 2.0)(fit)), 2.0 * np.asarray(fit.beta))
