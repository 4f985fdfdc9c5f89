"""The blocked sparse mixed-model equations (jreml/_backends/sparse.py) against the dense n×n path and lme4."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_results_lme4 import CASES, lme4_fixef, lme4_varcorr, none_if_nan, reference

import jreml
from jreml._backends.dense.likelihood import core, derivatives_at, trace_weight
from jreml._backends.select import SPARSE_MIN_Q
from jreml._backends.sparse import (
    check_memory,
    conditional_variances,
    prepare,
    sparse_evaluate,
    sparse_pattern,
    sparse_structure,
)
from jreml._design.build import build_design
from jreml.covariance import (
    CovariancePropagation,
    DummyMatrix,
    FixedMatrix,
    GroupedColumns,
    IdentityMatrix,
    KnownDiagonalMatrix,
    KroneckerProduct,
    ObservedRows,
    ScalarMatrix,
    UnstructuredMatrix,
)

N = 48  # rows of the random designs
LEVELS = {"g": 8, "h": 5, "f": 6}  # fixed, so that each form compiles once; the drawn codes need not use them all


def drawn_codes(rng, levels: int):
    """N codes drawn at random in which every level occurs (a factor's levels are those it has: DummyMatrix of a
    draw that missed one would not match its G, a rare seed that made the test fail)."""
    codes = rng.integers(0, levels, N)
    codes[rng.choice(N, size=levels, replace=False)] = np.arange(levels)
    return codes


def random_model(codes, rng, form: str):
    """A model of the given form on N rows with the drawn codes (crossed or nested as they fall)."""
    g, h, f = (codes[name] for name in LEVELS)
    x = rng.normal(size=N)
    terms = [
        CovariancePropagation(DummyMatrix(g), ScalarMatrix(LEVELS["g"])),
        CovariancePropagation(DummyMatrix(h), ScalarMatrix(LEVELS["h"])),
    ]
    if form == "crossed":  # (1 | g) + (1 | h) + (0 + x | g): an uncorrelated slope, b = 1, on g's codes
        terms.append(CovariancePropagation(GroupedColumns(g, x[:, None], LEVELS["g"]), ScalarMatrix(LEVELS["g"])))
    else:  # (1 + x | f), b = 2: the most random effects, so the diagonal block is 6 blocks of 2×2
        values = np.stack([np.ones(N), x], axis=1)
        G = KroneckerProduct(IdentityMatrix(LEVELS["f"]), UnstructuredMatrix(2))
        terms.append(CovariancePropagation(GroupedColumns(f, values, LEVELS["f"]), G))
    model = jreml.covariance.Sum(*terms, ScalarMatrix(N))
    if form == "heteroscedastic":
        model = model + KnownDiagonalMatrix(rng.uniform(0.2, 2.0, size=N))
    return model


@eqx.filter_jit
def dense_reference(theta, y, X, model, reml):
    c = core(theta, y, X, model, reml)
    d = derivatives_at(theta, y, X, model, c, reml=reml, information="ai", derivatives="auto")
    return c.loglik, d.score, d.information, c.beta


@eqx.filter_jit
def sparse_values(theta, y, X, model, reml, pattern):
    structure = sparse_structure(model)
    data = prepare(structure, y, X, pattern)
    c, d = sparse_evaluate(theta, y, X, structure, reml=reml, information="ai", data=data)
    return c.loglik, d.score, d.information, c.beta


@eqx.filter_jit
def dense_conditional_variances(theta, y, X, model, prediction_error):
    """diag(G − GZᵀV⁻¹ZG) (or with P: the prediction-error variances) of each term, by the n×n formula."""
    c = core(theta, y, X, model, True)
    weight = trace_weight(c, reml=prediction_error)
    if isinstance(model, ObservedRows):  # V_m⁻¹ is I on the unobserved rows
        m = model.observed.astype(weight.dtype)
        weight = weight * m[:, None] * m[None, :]
    out = {}
    for term in model.random_terms():
        g = term.G(theta[term.offset : term.offset + term.G.num_free_params])
        zg = term.Z(theta[term.offset - term.Z.num_free_params : term.offset]) @ g
        out[term.offset] = jnp.diagonal(g) - jnp.sum(zg * (weight @ zg), axis=0)
    vcov_beta = jax.scipy.linalg.cho_solve((c.chol_xvx, True), jnp.eye(X.shape[1], dtype=X.dtype))
    return out, vcov_beta


blocked_conditional_variances = eqx.filter_jit(conditional_variances)


def relative(actual, desired):
    actual, desired = np.asarray(actual), np.asarray(desired)
    return np.max(np.abs(actual - desired)) / max(np.max(np.abs(desired)), 1e-300)


# (form, masked, REML)
FORMS = [("crossed", True, True), ("vector", False, False), ("heteroscedastic", True, True)]


@pytest.mark.parametrize("form,masked,reml", FORMS)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1))
def test_random_designs_match_the_dense_path(form, masked, reml, seed):
    """ℓ within 1e-9, score and AI within 1e-7 relative, with L₂₁ dense and with its sparse pattern."""
    rng = np.random.default_rng(seed)
    codes = {name: drawn_codes(rng, levels) for name, levels in LEVELS.items()}
    model = random_model(codes, rng, form)
    if masked:
        model = ObservedRows(model, rng.uniform(size=N) > 0.2)
    X = np.stack([np.ones(N), rng.normal(size=N)], axis=1)
    y = X @ np.array([1.0, 0.5]) + rng.normal(size=N)
    theta = model.default_theta(jnp.asarray(1.0)) + 0.4 * rng.normal(size=model.num_free_params)
    y, X, theta = jnp.asarray(y), jnp.asarray(X), jnp.asarray(theta)
    want = dense_reference(theta, y, X, model, reml)
    structure = sparse_structure(model)
    assert structure is not None
    pattern = sparse_pattern(structure, force=True)
    assert pattern is not None
    for got in (sparse_values(theta, y, X, model, reml, None), sparse_values(theta, y, X, model, reml, pattern)):
        assert abs(float(got[0]) - float(want[0])) < 1e-9, (got[0], want[0])
        assert relative(got[1], want[1]) < 1e-7
        assert relative(got[2], want[2]) < 1e-7
        assert relative(got[3], want[3]) < 1e-8
    # conditional variances of the random effects (ranef's SDs) from the blocked factor, no n×n matrix
    for prediction_error in (False, True):
        want, vcov_beta = dense_conditional_variances(theta, y, X, model, prediction_error)
        got = blocked_conditional_variances(theta, y, X, structure, vcov_beta if prediction_error else None)
        assert set(got) == set(want)
        for offset, variances in want.items():
            assert relative(got[offset], variances) < 1e-9, (offset, prediction_error)


def test_the_pattern_is_used_where_the_cross_block_is_sparse():
    rng = np.random.default_rng(1)
    n = 600
    g, h = rng.permutation(np.arange(n) % 200), rng.integers(0, 60, n)
    model = CovariancePropagation(DummyMatrix(g), ScalarMatrix(200)) + CovariancePropagation(
        DummyMatrix(h), ScalarMatrix(60)
    )
    model = model + ScalarMatrix(n)
    structure = sparse_structure(model)
    assert [t.levels for t in structure.terms] == [200, 60]  # the most levels first: the diagonal block
    pattern = sparse_pattern(structure)
    assert pattern is not None  # 600 row entries, about 2,000 pairs against 60²·200 for the dense product
    # every pair of row entries with the same level of g, and each row entry's distinct (g, h) pair
    pairs = pd.DataFrame({"g": g, "h": h}).drop_duplicates().groupby("g").size()
    assert pattern.pair_a.shape[0] == int((pairs**2).sum())
    assert pattern.row.shape[0] == int(pairs.sum())


@pytest.mark.parametrize("name,method", [(name, method) for name in CASES for method in ("reml", "ml")])
def test_lme4_references_through_the_sparse_back_end(name, method):
    formula = CASES[name][1]
    fit = jreml.fit(formula, jreml.datasets.load(name), method=method, backend="sparse")
    assert bool(fit.converged), fit.message
    ref = reference(name, method)
    assert abs(float(fit.loglik) - ref["logLik"]) < 1e-6
    fixef = lme4_fixef(ref)
    for value, key in zip(fit.fixef.values(), fixef, strict=True):
        np.testing.assert_allclose(value, fixef[key], rtol=1e-6, atol=1e-9, err_msg=key)
    for value, key in zip(fit.se.values(), ref["fixef_se"], strict=True):
        np.testing.assert_allclose(value, ref["fixef_se"][key], rtol=1e-4, err_msg=key)
    expected = lme4_varcorr(ref)
    for row in fit.varcorr.itertuples(index=False):
        key = (row.group, none_if_nan(row.term1), none_if_nan(row.term2))
        value = row.variance if key[2] is None else row.covariance
        np.testing.assert_allclose(value, expected[key][0], rtol=1e-4, atol=1e-10, err_msg=str(key))


def crossed_data(n, levels_g, levels_h, seed=0):
    rng = np.random.default_rng(seed)
    g, h = rng.integers(0, levels_g, n), rng.integers(0, levels_h, n)
    x = rng.normal(size=n)
    y = 1 + 0.5 * x + rng.normal(size=levels_g)[g] + 0.7 * rng.normal(size=levels_h)[h] + rng.normal(size=n)
    return pd.DataFrame({"y": y, "x": x, "g": g.astype(str), "h": h.astype(str)})


def test_auto_takes_the_sparse_back_end_for_many_levels_and_agrees_with_mme():
    data = crossed_data(900, SPARSE_MIN_Q, 40)
    formula = "y ~ x + (1 | g) + (1 | h)"
    design_model = build_design(formula, data).model
    assert jreml.select_backend(design_model).name == "sparse"
    sparse = jreml.fit(formula, data)
    mme = jreml.fit(formula, data, backend="mme")
    assert bool(sparse.converged)
    assert abs(float(sparse.loglik) - float(mme.loglik)) < 1e-8
    np.testing.assert_allclose(np.asarray(sparse.theta), np.asarray(mme.theta), rtol=1e-6, atol=1e-8)


def test_relationship_matrix_terms_are_not_the_blocked_form():
    ex = jreml.example("kinship")
    assert sparse_structure(ex.model) is None
    with pytest.raises(ValueError, match="sparse"):
        jreml.select_backend(ex.model, backend="sparse")
    n = 10
    term = CovariancePropagation(DummyMatrix(np.arange(n) % 2), FixedMatrix(np.eye(2)))
    assert sparse_structure(term + ScalarMatrix(n)) is None


def test_a_model_too_large_for_memory_is_refused_before_allocating():
    data = crossed_data(400, 60, 50)
    model = build_design("y ~ (1 | g) + (1 | h)", data).model
    structure = sparse_structure(model)
    with pytest.raises(MemoryError, match=r"GiB.*Schur block.* r = 50 random effects"):
        check_memory(structure, p=1, k=3, available=10_000)
    check_memory(structure, p=1, k=3, available=10**9)


def test_fit_batch_vmap_and_gradients_run_on_the_sparse_back_end():
    data = crossed_data(240, 30, 12, seed=3)
    rng = np.random.default_rng(4)
    for t in range(3):
        data[f"y{t}"] = data["y"] + rng.normal(size=len(data))
    data.loc[[5, 17], "y1"] = np.nan  # its own rows: ObservedRows
    formula = "~ x + (1 | g) + (1 | h)"
    batch = jreml.fit_batch(formula, data, ["y0", "y1", "y2"], backend="sparse", chunk_size=3)
    for t in range(3):
        single = jreml.fit(f"y{t} {formula}", data, backend="mme")
        assert abs(float(batch.loglik[t]) - float(single.loglik)) < 1e-7
    # gradient of the fitted β̂ in y through the implicit function theorem: the same on both back ends
    fit = jreml.fit("y0 ~ x + (1 | g) + (1 | h)", data)
    model, X = fit.model, fit.X

    def beta(y, backend):
        return jreml.estimate(model, y, X, backend=backend).beta[1]

    y = jnp.asarray(data["y0"].to_numpy())
    g_sparse = jax.grad(beta)(y, "sparse")
    g_mme = jax.grad(beta)(y, "mme")
    np.testing.assert_allclose(np.asarray(g_sparse), np.asarray(g_mme), rtol=1e-6, atol=1e-10)
