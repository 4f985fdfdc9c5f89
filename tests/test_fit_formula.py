"""The formula interface ``fit``: lme4 reference fits, grammar vs hand-built models, NA handling, errors."""

import functools

import equinox as eqx
import numpy as np
import pandas as pd
import pytest
from conftest import REFERENCE_CASES, lme4_name, load_reference

import jreml
from jreml._covariance.basic import IdentityMatrix, ScalarMatrix, UnstructuredMatrix
from jreml._covariance.compose import CovariancePropagation, DummyMatrix, KroneckerProduct
from jreml._design.build import build_design
from jreml._design.formula import FormulaError, RandomSpec, parse_formula
from jreml._fit import fit


@functools.cache
def fitted(name: str, method: str):
    ex = jreml.example(name)
    return ex, fit(ex.formula, jreml.datasets.load(name), method=method)


def theta_for(model) -> np.ndarray:
    return np.linspace(-0.7, 0.6, model.num_free_params)


JITTED = (eqx.filter_jit(jreml.reml_loglik), eqx.filter_jit(jreml.ml_loglik))


def assert_same_loglik(design, model, y, X, theta=None, jit=False):
    """Same REML and ML log-likelihood at θ (``jit=True`` for large n, where eager evaluation is slow)."""
    theta = theta_for(model) if theta is None else theta
    np.testing.assert_allclose(design.y, y, rtol=0, atol=0)
    np.testing.assert_allclose(design.X, X, rtol=0, atol=0)
    for loglik in JITTED if jit else (jreml.reml_loglik, jreml.ml_loglik):
        got = float(loglik(theta, design.y, design.X, design.model))
        want = float(loglik(theta, y, X, model))
        assert np.isfinite(want)
        assert abs(got - want) < 1e-10, (got, want)


# --- the lme4 reference fits ------------------------------------------------------------------------
@pytest.mark.parametrize("name,method", [(n, m) for n in REFERENCE_CASES for m in ("reml", "ml")])
def test_reference_fit_through_formula(name, method):
    ex, result = fitted(name, method)
    ref = load_reference(REFERENCE_CASES[name])[method.upper()]
    assert bool(result.converged), result.message
    assert result.param_names == ex.model.param_names
    assert result.formula == ex.formula and result.n_dropped == 0
    # Same model as the hand-built one: identical log-likelihood at the fitted θ.
    loglik = jreml.reml_loglik if method == "reml" else jreml.ml_loglik
    assert abs(float(loglik(result.theta, ex.y, ex.X, ex.model)) - float(result.loglik)) < 1e-10
    assert abs(float(result.loglik) - ref["logLik"]) < 1e-6
    assert [lme4_name(n) for n in result.beta_names] == list(ex.fixef_names)
    for name_, value in result.fixef.items():
        np.testing.assert_allclose(value, ref["fixef"][lme4_name(name_)], rtol=1e-5, atol=1e-9)
    for name_, value in result.se.items():
        np.testing.assert_allclose(value, ref["fixef_se"][lme4_name(name_)], rtol=1e-4)


def test_summary_uses_names():
    _, result = fitted("machines", "reml")
    text = result.summary()
    assert "Machine[T.B]" in text and "(Intercept)" in text and "Formula: score ~ Machine" in text


# --- parser ------------------------------------------------------------------------------------------
def test_parse_formula_terms():
    p = parse_formula("y ~ x + f + (1 + x | g) + (0 + x | g) + (1 | a/b) + (x || h) + (1 | a:b)")
    assert p.response == "y" and p.fixed == "x + f"
    assert p.random == (
        RandomSpec("1 + x", ("g",)),
        RandomSpec("0 + x", ("g",)),
        RandomSpec("1", ("a",)),
        RandomSpec("1", ("a", "b")),
        RandomSpec("x", ("h",), correlated=False),
        RandomSpec("1", ("a", "b")),
    )
    assert parse_formula("y ~ (1 | g)").fixed == "1"
    assert [s.group for s in parse_formula("y ~ (1 | a/b/c)").random] == ["a", "a:b", "a:b:c"]


# --- grammar vs hand-built models at a fixed θ -------------------------------------------------------
@functools.cache
def sleep():
    df = jreml.datasets.load("sleepstudy")
    n = len(df)
    X = np.column_stack([np.ones(n), df.Days.to_numpy(float)])
    subjects = DummyMatrix(df.Subject)
    days_z = np.zeros((n, subjects.n_levels))
    days_z[np.arange(n), np.asarray(subjects.codes)] = df.Days.to_numpy(float)
    return df, X, subjects, days_z


@pytest.mark.parametrize(
    "formula", ["Reaction ~ Days + (Days | Subject)", "Reaction ~ 1 + Days + (1 + Days | Subject)"]
)
def test_correlated_slope_is_the_hand_built_model(formula):
    ex = jreml.example("sleepstudy")
    design = build_design(formula, ex.data)
    assert design.model.param_names == ex.model.param_names
    assert_same_loglik(design, ex.model, ex.y, ex.X)


@pytest.mark.parametrize(
    "formula", ["Reaction ~ Days + (Days || Subject)", "Reaction ~ Days + (1 | Subject) + (0 + Days | Subject)"]
)
def test_uncorrelated_and_repeated_factor_terms(formula):
    df, X, subjects, days_z = sleep()
    n = len(df)
    design = build_design(formula, df)
    assert [t.name for t in design.model.random_terms()] == ["Subject", "Subject.1"]
    assert design.model.param_names == ("Subject.variance", "Subject.1.variance[Days]", "Residual.variance")
    slope = KroneckerProduct(IdentityMatrix(subjects.n_levels), UnstructuredMatrix(1, labels=("Days",)))
    hand = (
        CovariancePropagation(subjects, ScalarMatrix(subjects.n_levels), name="Subject")
        + CovariancePropagation(days_z, slope, name="Subject.1")
        + ScalarMatrix(n, name="Residual")
    )
    y = df.Reaction.to_numpy(float)
    assert_same_loglik(design, hand, y, X)
    # Independently: the slope variance is exp(2θ) (log-Cholesky), i.e. a ScalarMatrix at 2θ.
    plain = (
        CovariancePropagation(subjects, ScalarMatrix(subjects.n_levels))
        + CovariancePropagation(days_z, ScalarMatrix(subjects.n_levels))
        + ScalarMatrix(n)
    )
    theta = theta_for(design.model)
    got = float(jreml.reml_loglik(theta, y, X, design.model))
    want = float(jreml.reml_loglik(theta * np.array([1.0, 2.0, 1.0]), y, X, plain))
    assert abs(got - want) < 1e-10


def test_slope_only_term():
    df, X, subjects, days_z = sleep()
    design = build_design("Reaction ~ Days + (0 + Days | Subject)", df)
    plain = CovariancePropagation(days_z, ScalarMatrix(subjects.n_levels)) + ScalarMatrix(len(df))
    theta = theta_for(design.model)
    y = df.Reaction.to_numpy(float)
    got = float(jreml.reml_loglik(theta, y, X, design.model))
    assert abs(got - float(jreml.reml_loglik(theta * np.array([2.0, 1.0]), y, X, plain))) < 1e-10


def test_nested_and_crossed_terms():
    df = jreml.datasets.load("john_alpha")
    n = len(df)
    design = build_design("yield ~ rep + (1 | gen) + (1 | rep/block)", df)

    def term(*cols):
        z = DummyMatrix(*(df[c] for c in cols))
        return CovariancePropagation(z, ScalarMatrix(z.n_levels), name=":".join(cols))

    hand = term("gen") + term("rep") + term("rep", "block") + ScalarMatrix(n, name="Residual")
    assert design.model.param_names == hand.param_names
    assert design.beta_names == ("(Intercept)", "rep[T.R2]", "rep[T.R3]")
    ex = jreml.example("john_alpha")
    assert_same_loglik(design, hand, ex.y, ex.X)
    # (1 | rep:block) alone is the example's model.
    assert_same_loglik(build_design(ex.formula, df), ex.model, ex.y, ex.X)
    # Crossed factors: penicillin.
    pen = jreml.example("penicillin")
    assert_same_loglik(build_design(pen.formula, pen.data), pen.model, pen.y, pen.X)


# --- missing values and aliasing ---------------------------------------------------------------------
def test_rows_with_missing_values_are_dropped():
    df = jreml.datasets.load("dyestuff").copy()
    df["unused"] = np.nan
    df.loc[[2, 7], "Yield"] = np.nan
    df.loc[11, "Batch"] = None
    design = build_design("Yield ~ 1 + (1 | Batch)", df)
    assert design.n_dropped == 3
    kept = df.drop(index=[2, 7, 11]).reset_index(drop=True)
    z = DummyMatrix(kept.Batch)
    hand = CovariancePropagation(z, ScalarMatrix(z.n_levels), name="Batch") + ScalarMatrix(len(kept), name="R")
    assert_same_loglik(design, hand, kept.Yield.to_numpy(float), np.ones((len(kept), 1)))
    result = fit("Yield ~ 1 + (1 | Batch)", df)
    assert result.n_dropped == 3 and result.nobs == 27 and bool(result.converged)
    assert "3 rows with missing values dropped" in result.summary()


def test_aliased_fixed_effect_is_dropped_with_warning():
    df = jreml.datasets.load("sleepstudy").copy()
    df["Days2"] = 2.0 * df.Days
    with pytest.warns(UserWarning, match="Days2"):
        design = build_design("Reaction ~ Days + Days2 + (1 | Subject)", df)
    assert design.beta_names == ("(Intercept)", "Days")
    assert design.X.shape[1] == 2


# --- relationship matrices ---------------------------------------------------------------------------
@functools.cache
def kinship():
    df = jreml.datasets.load("kinship")
    K = jreml.datasets.kinship_matrix()
    return df, K


def test_relmat_by_name_matches_hand_built_and_reference():
    df, K = kinship()
    ex = jreml.example("kinship")
    perm = np.random.default_rng(0).permutation(len(df))
    frame = pd.DataFrame(K[np.ix_(perm, perm)], index=df.id.to_numpy()[perm], columns=df.id.to_numpy()[perm])
    formula = "trait1 ~ 1 + covariate + (1 | id)"
    design = build_design(formula, df, relmat={"id": frame})
    assert design.model.param_names == ("id.variance", "Residual.variance")
    assert_same_loglik(design, ex.model, ex.y, ex.X, jit=True)
    # An array in sorted-level order (here the rows' order) gives the same model.
    assert_same_loglik(build_design(formula, df, relmat={"id": K}), ex.model, ex.y, ex.X, jit=True)
    # At the reference optimum (σ²_g, σ²_e) the log-likelihood is the reference one.
    ref = load_reference("kinship_visible")["traits"]["trait1"]
    theta = np.log([ref["s2g"], ref["s2e"]])
    assert abs(float(JITTED[0](theta, design.y, design.X, design.model)) - ref["reml_loglik"]) < 1e-6


# --- errors ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "formula,match",
    [
        ("Yield + (1 | Batch)", "response ~ terms"),
        ("Yield ~ 1 + (1 | Batch", "unbalanced"),
        ("Yield ~ 1 + 1 | Batch", "must be in parentheses"),
        ("Yield ~ 1 + (1 | )", "no grouping factor"),
        ("Yield ~ 1 + ( | Batch)", "empty left-hand side"),
        ("Yield ~ 1 + (1 | Batch + 2)", "not a column name"),
        ("Yield ~ 1 + + (1 | Batch)", "stray"),
    ],
)
def test_unparseable_formula(formula, match):
    with pytest.raises(FormulaError, match=match):
        build_design(formula, jreml.datasets.load("dyestuff"))


@pytest.mark.parametrize(
    "formula,culprit",
    [("Yield ~ x + (1 | Batch)", "x"), ("Yield ~ 1 + (1 | Plate)", "Plate"), ("Yld ~ 1 + (1 | Batch)", "Yld")],
)
def test_unknown_column(formula, culprit):
    with pytest.raises(KeyError, match=culprit):
        build_design(formula, jreml.datasets.load("dyestuff"))


def test_non_numeric_response():
    with pytest.raises(TypeError, match="response 'Batch' must be numeric"):
        build_design("Batch ~ 1 + (1 | Batch)", jreml.datasets.load("dyestuff"))


def test_grouping_factor_with_one_level():
    df = jreml.datasets.load("dyestuff").assign(one="a")
    with pytest.raises(ValueError, match="grouping factor 'one' has only 1 level"):
        build_design("Yield ~ 1 + (1 | one)", df)


def test_bad_relmat():
    df, K = kinship()
    formula = "trait1 ~ 1 + (1 | id)"
    ids = df.id.to_numpy()
    asym = K.copy()
    asym[0, 1] += 1.0
    with pytest.raises(ValueError, match="symmetric"):
        build_design(formula, df, relmat={"id": asym})
    with pytest.raises(ValueError, match="positive semi-definite"):
        build_design(formula, df, relmat={"id": K - 2.0 * np.eye(len(K)) * np.max(np.diag(K))})
    with pytest.raises(ValueError, match="ind000"):
        build_design(formula, df, relmat={"id": pd.DataFrame(K[1:, 1:], index=ids[1:], columns=ids[1:])})
    with pytest.raises(ValueError, match="must be 400x400"):
        build_design(formula, df, relmat={"id": K[1:, 1:]})
    with pytest.raises(ValueError, match="not a grouping factor"):
        build_design(formula, df, relmat={"family": K})


# --- repeated calls: cached model specs, numpy replay of simple specs, cached grouping factors ---------------
def design_frame(n: int = 40, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(
        {
            "x": rng.normal(size=n),
            "z": rng.integers(-3, 4, size=n),  # int64
            "f": np.array(["b", "a", "c"])[np.arange(n) % 3],
            "g": np.array(["u", "v"])[(np.arange(n) // 3) % 2],
            "k": (np.arange(n) % 4) + 1,
            "b": np.arange(n) % 2 == 0,
        }
    )
    df["c"] = pd.Categorical(df.f, categories=["c", "a", "b", "unused"])
    df["o"] = df.k.astype(object)  # Python ints in an object column: a factor with integer levels
    return df


EXPRESSIONS = [
    "1",
    "x",
    "0 + x",
    "x - 1",
    "f",
    "0 + f",
    "x + f",
    "x*f",
    "f:g",
    "f*g",
    "x:z",
    "x + z:f",
    "f*g*x",
    "b",
    "c",
    "0 + c + x",
    "o + x",
    "z + I(z**2)",  # a call: never replayed, formulaic every time
]


def formulaic_matrix(text: str, data: pd.DataFrame):
    from formulaic import model_matrix

    mm = model_matrix(text, data, na_action="raise", ensure_full_rank=True)
    return np.asarray(mm, dtype=float), tuple(str(c) for c in mm.columns)


@pytest.mark.parametrize("text", EXPRESSIONS)
def test_repeated_model_matrix_is_formulaics(text):
    from jreml._design import materialize

    df = design_frame()
    # Same signature (dtypes, distinct values in order of first appearance), other rows and values.
    longer = pd.concat([df, df.sample(frac=1.0, random_state=1)], ignore_index=True)
    longer["x"] = np.random.default_rng(2).normal(size=len(longer))
    materialize._CACHE.clear()
    for data in (df, df, longer, df):
        X, names, spec = materialize.model_matrix(text, data)
        want, want_names = formulaic_matrix(text, data)
        assert names == want_names
        assert X.dtype == np.float64
        np.testing.assert_array_equal(X, want)
        assert spec is not None
    entries = list(materialize._CACHE.values())
    if "(" in text:
        assert entries == []
    else:  # every expression here is simple enough to be replayed in numpy (the fast path is exercised)
        assert len(entries) == 1 and entries[0].plan is not None, text


def test_model_matrix_cache_follows_the_levels():
    """A cached spec is reused only for data whose factors have the same levels (and the same value types)."""
    from jreml._design import materialize

    df = design_frame()
    materialize._CACHE.clear()
    variants = [
        df,
        df[df.f != "c"].reset_index(drop=True),  # a level fewer
        df.assign(f=df.f.replace("a", "A")),  # a level renamed
        df.assign(f=np.where(np.arange(len(df)) == 0, "a", df.f)),  # same levels, another order of appearance
        df.assign(k=df.k.astype(str)),  # "1" instead of 1
        df.assign(x=df.x.astype(np.float32), z=df.z.astype(float)),  # other numeric dtypes
        df.assign(c=pd.Categorical(df.f, categories=["a", "b", "c", "unused"])),  # other category order
    ]
    for text in ("x + f", "k + x:f", "0 + c + z", "o"):
        for data in variants + variants[::-1]:
            X, names, _ = materialize.model_matrix(text, data)
            want, want_names = formulaic_matrix(text, data)
            assert names == want_names, (text, names, want_names)
            np.testing.assert_array_equal(X, want)


def test_repeated_fit_matches_first_fit():
    """A second fit (specs and grouping factors from the caches) equals a fit with cold caches."""
    from jreml._design import factors, materialize

    df = jreml.datasets.load("machines")
    formula = "score ~ Machine + (1 | Worker) + (1 | Worker:Machine)"
    first = fit(formula, df)
    again = fit(formula, df.copy())
    materialize._CACHE.clear()
    factors._CACHE.clear()
    cold = fit(formula, df)
    for result in (again, cold):
        assert result.beta_names == first.beta_names
        np.testing.assert_array_equal(np.asarray(result.X), np.asarray(first.X))
        np.testing.assert_allclose(float(result.loglik), float(first.loglik), rtol=1e-12)
        assert [t.levels for t in result.formula_info.terms] == [t.levels for t in first.formula_info.terms]
    pd.testing.assert_frame_equal(again.varcorr, first.varcorr)


def test_grouping_factor_cache():
    from jreml._design.factors import dummy_matrix

    df = design_frame()
    one = dummy_matrix([df.f])
    assert dummy_matrix([df.f.copy()]) is one
    swapped = df.f.copy()
    swapped.iloc[[0, 1]] = swapped.iloc[[1, 0]].to_numpy()
    for columns in ([df.f], [swapped], [df.k], [df.k.astype(str)], [df.o], [df.k.astype(float)], [df.f, df.g], [df.c]):
        got = dummy_matrix(columns)
        want = DummyMatrix(*columns)
        assert got.levels == want.levels
        np.testing.assert_array_equal(np.asarray(got.codes), np.asarray(want.codes))
        assert got.codes.dtype == want.codes.dtype
    assert dummy_matrix([swapped]) is not one
    with pytest.raises(ValueError, match="missing"):
        dummy_matrix([df.f.where(df.index != 3)])


def test_alias_check_fast_path_agrees_with_column_by_column_test():
    from jreml._design.build import ALIAS_TOLERANCE, _drop_aliased

    rng = np.random.default_rng(3)
    X = np.column_stack([np.ones(30), rng.normal(size=(30, 3))])
    assert _drop_aliased(X, tuple("abcd"))[1] == tuple("abcd")
    # Nearly aliased columns, on both sides of the tolerance: the column-by-column test decides.
    direction = rng.normal(size=30)
    direction -= X @ np.linalg.lstsq(X, direction, rcond=None)[0]
    direction /= np.linalg.norm(direction)
    for scale, kept in ((100 * ALIAS_TOLERANCE, True), (0.01 * ALIAS_TOLERANCE, False)):
        column = X[:, 1] + X[:, 2]
        near = np.column_stack([X, column + scale * np.linalg.norm(column) * direction])
        if kept:
            assert _drop_aliased(near, tuple("abcde"))[1] == tuple("abcde")
        else:
            with pytest.warns(UserWarning, match="'e'"):
                assert _drop_aliased(near, tuple("abcde"))[1] == tuple("abcd")
