"""The mixed-model-equations back end (jreml/_backends/mme.py) against the dense n×n path."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jreml
from jreml._backends.dense.likelihood import core, derivatives_at
from jreml._backends.mme import (
    block_layout,
    mme_core,
    mme_evaluate,
    mme_structure,
    prepare,
    static_block_diagonal,
)
from jreml._backends.select import choose
from jreml.covariance import (
    CovariancePropagation,
    DiagonalMatrix,
    DummyMatrix,
    FixedMatrix,
    IdentityMatrix,
    KnownDiagonalMatrix,
    KroneckerProduct,
    ScalarMatrix,
    UnstructuredMatrix,
)

EXAMPLES = ["dyestuff", "sleepstudy", "penicillin", "machines", "john_alpha"]
RTOL = 1e-10


@functools.cache
def example(name):
    ex = jreml.example(name)
    return ex.model, jnp.asarray(ex.y), jnp.asarray(ex.X)


@functools.cache
def optimum(name, method):
    model, y, X = example(name)
    return jreml.estimate(model, y, X, method=method, backend="dense").theta


def thetas(name, method):
    model, y, X = example(name)
    start = model.default_theta(jnp.var(y))
    opt = optimum(name, method)
    perturbed = opt + 0.3 * jnp.sin(jnp.arange(1.0, opt.shape[0] + 1.0))
    return {"start": start, "optimum": opt, "perturbed": perturbed}


def assert_close(actual, desired, rtol=RTOL, atol=0.0):
    """Max-norm relative agreement: ‖actual − desired‖∞ ≤ rtol·‖desired‖∞ + atol."""
    actual, desired = np.asarray(actual), np.asarray(desired)
    assert actual.shape == desired.shape
    err = np.max(np.abs(actual - desired), initial=0.0)
    assert err <= rtol * np.max(np.abs(desired), initial=0.0) + atol, (err, actual, desired)


@pytest.mark.parametrize("name", EXAMPLES)
def test_examples_are_recognised(name):
    model, y, X = example(name)
    structure = mme_structure(model)
    assert structure is not None
    assert structure.n == y.shape[0]
    assert structure.q == sum(t.Z.shape[1] for t in model.random_terms())
    assert structure.q < structure.n


def test_other_models_are_not_recognised():
    ex = jreml.example("kinship")
    assert mme_structure(ex.model) is None  # FixedMatrix term: no Z
    n = 12
    z = DummyMatrix(np.arange(n) % 3)
    term = CovariancePropagation(z, ScalarMatrix(3))
    assert mme_structure(term) is None  # not a Sum
    assert mme_structure(term + term) is None  # no residual
    assert mme_structure(term + ScalarMatrix(n) + ScalarMatrix(n)) is None  # two residuals
    assert mme_structure(term + FixedMatrix(np.eye(n)) + ScalarMatrix(n)) is None
    assert mme_structure(term + ScalarMatrix(n)) is not None
    # A constant dense Z and an unstructured G are fine.
    zc = np.random.default_rng(0).normal(size=(n, 2))
    assert mme_structure(CovariancePropagation(zc, UnstructuredMatrix(2)) + ScalarMatrix(n)) is not None


@functools.partial(eqx.filter_jit)
def both_paths(theta, y, X, model, reml, informations):
    """Dense and MME quantities at θ (jit-compiled once per model and method; θ is traced)."""
    structure = mme_structure(model)
    data = prepare(structure, y, X)
    dense = core(theta, y, X, model, reml)
    mme = mme_core(theta, y, X, structure, reml, data)
    out = {
        "ok": (dense.ok, mme.ok),
        "loglik": (dense.loglik, mme.loglik),
        "beta": (dense.beta, mme.beta),
        "p_y": (dense.p_y, mme.p_y),
        "v_inv_x": (dense.v_inv_x, mme.v_inv_x),
        # (XᵀV⁻¹X)⁻¹ comes from the factor both back ends return.
        "xvx": (dense.chol_xvx @ dense.chol_xvx.T, mme.chol_xvx @ mme.chol_xvx.T),
    }
    for information in informations:
        d_dense = derivatives_at(theta, y, X, model, dense, reml=reml, information=information, derivatives="auto")
        c, d_mme = mme_evaluate(theta, y, X, structure, reml=reml, information=information, data=data)
        out[f"loglik_{information}"] = (dense.loglik, c.loglik)
        out[f"score_{information}"] = (d_dense.score, d_mme.score)
        out[f"information_{information}"] = (d_dense.information, d_mme.information)
    return out


#: The cases whose observed information is checked too (test_observed_information_matches_dense): their
#: program holds all three informations, compiled once for both tests.
OBSERVED_CASES = [("sleepstudy", "reml"), ("penicillin", "ml")]


def informations_of(name, method):
    return ("ai", "none", "observed") if (name, method) in OBSERVED_CASES else ("ai", "none")


@pytest.mark.parametrize("method", ["reml", "ml"])
@pytest.mark.parametrize("name", EXAMPLES)
def test_core_and_derivatives_match_dense(name, method):
    model, y, X = example(name)
    n = y.shape[0]
    for where, theta in thetas(name, method).items():
        out = both_paths(theta, y, X, model, method == "reml", informations_of(name, method))
        assert bool(out.pop("ok")[1]), where
        for key, (dense, mme) in out.items():
            if key.endswith("_observed"):  # test_observed_information_matches_dense
                continue
            # The score vanishes at the optimum: compare it on the scale of its terms (O(n)).
            atol = RTOL * n if key.startswith("score") else 0.0
            assert_close(mme, dense, atol=atol)


@pytest.mark.parametrize("name,method", OBSERVED_CASES)
def test_observed_information_matches_dense(name, method):
    model, y, X = example(name)
    for where, theta in thetas(name, method).items():
        out = both_paths(theta, y, X, model, method == "reml", informations_of(name, method))
        dense, mme = out["information_observed"]
        assert_close(mme, dense), where


def test_prepare_is_optional():
    model, y, X = example("penicillin")
    structure = mme_structure(model)
    theta = thetas("penicillin", "reml")["perturbed"]
    a = mme_core(theta, y, X, structure, True)
    b = mme_core(theta, y, X, structure, True, prepare(structure, y, X))
    assert float(a.loglik) == float(b.loglik)


def test_non_pd_residual_gives_minus_inf():
    model, y, X = example("dyestuff")
    structure = mme_structure(model)
    theta = jnp.asarray([1.0, -jnp.inf])
    c = mme_core(theta, y, X, structure, True)
    assert not bool(c.ok) and float(c.loglik) == -np.inf


def test_fisher_is_not_an_mme_information():
    model, y, X = example("dyestuff")
    with pytest.raises(ValueError, match="MME"):
        mme_evaluate(jnp.zeros(2), y, X, mme_structure(model), reml=True, information="fisher")


def _resolve_backend(backend, q, n, information, derivatives):
    return choose(backend, q, n, information, derivatives).name


def test_backend_resolution():
    assert _resolve_backend("auto", 36, 180, "ai", "auto") == "mme"
    assert _resolve_backend("auto", 36, 180, "observed", "auto") == "mme"
    assert _resolve_backend("auto", 36, 180, "none", "auto") == "mme"
    assert _resolve_backend("auto", 36, 180, "fisher", "auto") == "dense"
    assert _resolve_backend("auto", 36, 180, "ai", "jacfwd") == "dense"
    assert _resolve_backend("auto", 200, 180, "ai", "auto") == "dense"  # q ≥ n: the dense path is cheaper
    assert _resolve_backend("mme", 200, 180, "ai", "auto") == "mme"
    assert _resolve_backend("dense", 36, 180, "ai", "auto") == "dense"
    assert _resolve_backend("auto", None, 180, "ai", "auto") == "dense"
    with pytest.raises(ValueError, match="backend"):
        _resolve_backend("sparse", 36, 180, "ai", "auto")
    with pytest.raises(ValueError, match="mme"):
        _resolve_backend("mme", None, 180, "ai", "auto")


def test_estimate_rejects_mme_for_other_models():
    ex = jreml.example("kinship")
    with pytest.raises(ValueError, match="mme"):
        jreml.estimate(ex.model, ex.y, ex.X, backend="mme")
    with pytest.raises(ValueError, match="backend"):
        jreml.estimate(ex.model, ex.y, ex.X, backend="sparse")


FIELDS_TIGHT = ("loglik", "beta", "p_y", "vcov_beta", "se_beta", "information", "vcov_theta", "natural_params")


def assert_same_fit(a, b, rtol=1e-7):
    assert int(a.status) == int(b.status) == 0
    np.testing.assert_allclose(np.asarray(a.theta), np.asarray(b.theta), rtol=rtol, atol=1e-6)
    for field in FIELDS_TIGHT:
        np.testing.assert_allclose(
            np.asarray(getattr(a, field)), np.asarray(getattr(b, field)), rtol=1e-6, atol=1e-8, err_msg=field
        )
    np.testing.assert_allclose(float(a.loglik), float(b.loglik), rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(a.at_boundary), np.asarray(b.at_boundary))


@pytest.mark.parametrize("method", ["reml", "ml"])
@pytest.mark.parametrize("name", EXAMPLES)
def test_fits_match_dense(name, method):
    model, y, X = example(name)
    auto = jreml.estimate(model, y, X, method=method)
    mme = jreml.estimate(model, y, X, method=method, backend="mme")
    dense = jreml.estimate(model, y, X, method=method, backend="dense")
    assert_same_fit(mme, dense)
    assert_same_fit(auto, mme, rtol=0.0)
    assert auto.p_y.shape == y.shape


@pytest.mark.parametrize("algorithm", ["newton", "em", "fisher"])
def test_other_algorithms(algorithm):
    model, y, X = example("penicillin")
    kwargs = dict(algorithm=algorithm, max_iter=2000 if algorithm == "em" else 200)
    mme = jreml.estimate(model, y, X, backend="mme", **kwargs)
    dense = jreml.estimate(model, y, X, backend="dense", **kwargs)
    assert int(mme.status) == int(dense.status) == 0
    np.testing.assert_allclose(float(mme.loglik), float(dense.loglik), rtol=1e-10)
    np.testing.assert_allclose(np.asarray(mme.theta), np.asarray(dense.theta), atol=1e-4)


def test_vmap_over_y():
    model, y, X = example("sleepstudy")
    noise = jnp.asarray(np.random.default_rng(3).normal(size=(3, y.shape[0])))
    ys = y[None, :] + 5.0 * noise
    batched = jax.vmap(lambda yy: jreml.estimate(model, yy, X).loglik)(ys)
    single = [float(jreml.estimate(model, yy, X, backend="dense").loglik) for yy in ys]
    np.testing.assert_allclose(np.asarray(batched), single, rtol=1e-10)


def test_gradient_through_fit_matches_dense():
    model, y, X = example("dyestuff")
    direction = jnp.asarray(np.random.default_rng(1).normal(size=y.shape))

    def objective(yy, backend):
        fit = jreml.estimate(model, yy, X, backend=backend, tol_score=1e-10)
        return jnp.sum(fit.theta) + jnp.sum(fit.beta) + jnp.sum(fit.p_y)

    g_mme = jax.grad(objective)(y, "mme")
    g_dense = jax.grad(objective)(y, "dense")
    np.testing.assert_allclose(float(g_mme @ direction), float(g_dense @ direction), rtol=1e-7)


def _grouped(n, m, b, seed, overlap=False):
    """y, X and the model Σ Z(I_m ⊗ B)Zᵀ + σ²I with b random effects (intercept, covariates) per group.

    ``overlap``: every observation also loads on the next group's effects (ZᵀZ is not block diagonal).
    """
    rng = np.random.default_rng(seed)
    groups = np.arange(n) % m
    covariates = np.column_stack([np.ones(n), rng.normal(size=(n, b - 1))])
    Z = np.zeros((n, m * b))
    for j in range(b):
        Z[np.arange(n), b * groups + j] = covariates[:, j]
        if overlap:
            Z[np.arange(n), b * ((groups + 1) % m) + j] = 0.5 * covariates[:, j]
    G = KroneckerProduct(IdentityMatrix(m), UnstructuredMatrix(b))
    model = CovariancePropagation(Z, G) + ScalarMatrix(n)
    X = jnp.asarray(np.column_stack([np.ones(n), rng.normal(size=n)]))
    y = jnp.asarray(X @ np.array([1.0, 2.0]) + Z @ rng.normal(size=m * b) + rng.normal(size=n))
    return model, y, X


def _models_with_a_block_layout():
    n, m = 60, 10
    dummy = DummyMatrix(np.arange(n) % m)
    diagonal = CovariancePropagation(dummy, DiagonalMatrix(m)) + ScalarMatrix(n)
    X = jnp.ones((n, 1))
    y = jnp.asarray(np.random.default_rng(4).normal(size=n) + np.arange(n) % m)
    return {
        "b=3": (*_grouped(n, m, 3, 1), (m, 3), True),
        "overlapping groups": (*_grouped(n, m, 2, 2, overlap=True), (m, 2), False),
        "diagonal G": (diagonal, y, X, (m, 1), True),
    }


@pytest.mark.parametrize("name", ["sleepstudy", "dyestuff", "penicillin", "machines"])
def test_block_layout_of_the_examples(name):
    model, y, X = example(name)
    structure = mme_structure(model)
    data = prepare(structure, y, X)
    layout = {"sleepstudy": (18, 2), "dyestuff": (6, 1)}.get(name)
    assert block_layout(structure) == layout
    if layout is None:  # several random terms: the dense q×q path only
        assert data.blocks is None
    else:
        assert bool(data.blocks.diagonal)
        assert data.blocks.ztz.shape == (layout[0], layout[1], layout[1])


@pytest.mark.parametrize("case", ["b=3", "overlapping groups", "diagonal G"])
def test_block_path_and_its_fallback_match_dense(case):
    """Block-diagonal A (m b×b problems) where ZᵀZ is block diagonal, the dense q×q path where it is not."""
    model, y, X, layout, diagonal = _models_with_a_block_layout()[case]
    structure = mme_structure(model)
    assert block_layout(structure) == layout
    assert bool(prepare(structure, y, X).blocks.diagonal) == diagonal
    k = model.num_free_params
    for theta in (model.default_theta(jnp.var(y)), 0.4 * jnp.sin(jnp.arange(1.0, k + 1.0))):
        out = both_paths(theta, y, X, model, True, ("ai", "observed"))
        assert bool(out.pop("ok")[1])
        for key, (dense, mme) in out.items():
            assert_close(mme, dense, rtol=1e-9, atol=1e-9 * y.shape[0] if key.startswith("score") else 0.0)
    fit = jreml.estimate(model, y, X, throw=False)
    dense = jreml.estimate(model, y, X, backend="dense", throw=False)
    assert int(fit.status) == int(dense.status)
    np.testing.assert_allclose(float(fit.loglik), float(dense.loglik), rtol=1e-11)


@pytest.mark.parametrize("case", ["b=3", "overlapping groups", "diagonal G"])
def test_block_decision_before_tracing_matches_the_traced_test(case):
    """``estimate`` decides block diagonality on the concrete Z (one path compiled); it agrees with the test
    inside the program, and the fit equals the one through the lax.cond of both paths."""
    model, y, X, _, diagonal = _models_with_a_block_layout()[case]
    structure = mme_structure(model)
    assert static_block_diagonal(structure) is diagonal
    static_prepared = prepare(structure, y, X, block_diagonal=diagonal)
    assert (static_prepared.blocks is None) is (not diagonal)
    fit = jreml.estimate(model, y, X, throw=False)
    from jreml._estimate import _JITTED

    assert any(dict(key[2]).get("mme_blocks") is diagonal for key in _JITTED)
    traced = jax.jit(lambda yy: jreml.estimate(model, yy, X, throw=False))(y)  # y traced, Z concrete: same path
    np.testing.assert_allclose(float(traced.loglik), float(fit.loglik), rtol=1e-12)
    conditional = jax.jit(lambda m: jreml.estimate(m, y, X, throw=False).loglik)(model)  # Z traced: lax.cond
    np.testing.assert_allclose(float(conditional), float(fit.loglik), rtol=1e-11)


def test_block_decision_of_the_examples():
    assert static_block_diagonal(mme_structure(example("sleepstudy")[0])) is True
    assert static_block_diagonal(mme_structure(example("dyestuff")[0])) is True
    assert static_block_diagonal(mme_structure(example("penicillin")[0])) is None  # two terms: no block layout


def _n_by_n_values(jaxpr, n):
    """Shapes of every value in a jaxpr (sub-jaxprs included) with two axes of length ≥ n."""
    found = []

    def visit(jx):
        for eqn in jx.eqns:
            for var in eqn.outvars:
                shape = getattr(var.aval, "shape", ())
                if sum(d >= n for d in shape) >= 2:
                    found.append((eqn.primitive.name, shape))
            for param in eqn.params.values():
                for sub in param if isinstance(param, list | tuple) else [param]:
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        visit(inner)

    visit(jaxpr.jaxpr)
    return found


def _heteroscedastic(n=150, m=6, seed=3):
    """y, X and V = Z_g σ²_g Z_gᵀ + Z_c G Z_cᵀ + σ²I + σ²_1·diag(d_1) + σ²_2·diag(d_2): a grouping factor, two dense
    random effects with a dense Z, and two known diagonals (d_1 with zeros, as the eigenvalues of a singular kernel)."""
    rng = np.random.default_rng(seed)
    groups = np.arange(n) % m
    Zc = rng.normal(size=(n, 10))
    d1 = np.where(np.arange(n) < 10, 0.0, rng.uniform(0.0, 3.0, n))
    d2 = rng.exponential(1.0, n) ** 2
    model = (
        KnownDiagonalMatrix(d1, name="kernel")
        + CovariancePropagation(DummyMatrix(groups), ScalarMatrix(m), name="g")
        + CovariancePropagation(Zc, ScalarMatrix(10), name="dense")
        + ScalarMatrix(n, name="residual")
        + KnownDiagonalMatrix(d2, name="weights")
    )
    X = jnp.asarray(np.column_stack([np.ones(n), rng.normal(size=n)]))
    signal = np.sqrt(1.5 * d1 + 2.0 * d2) * rng.normal(size=n) + 0.8 * rng.normal(size=m)[groups]
    y = jnp.asarray(X @ np.array([1.0, -0.5]) + signal + 0.7 * Zc @ rng.normal(size=10) + rng.normal(size=n))
    return model, y, X


def test_heteroscedastic_residual_is_recognised():
    model, y, X = _heteroscedastic()
    structure = mme_structure(model)
    assert structure.heteroscedastic and structure.q == 6 + 10
    assert [part.offset for part in structure.residual] == [3, 0, 4]  # the ScalarMatrix first
    assert block_layout(structure) is None and static_block_diagonal(structure) is None
    assert not mme_structure(model.terms[2] + model.terms[3]).heteroscedastic
    # without a ScalarMatrix residual (R could be singular) it is not an MME model
    assert mme_structure(model.terms[1] + KnownDiagonalMatrix(np.ones(150))) is None


@pytest.mark.parametrize("method", ["reml", "ml"])
def test_heteroscedastic_core_and_derivatives_match_dense(method):
    model, y, X = _heteroscedastic()
    n = y.shape[0]
    optimum = jreml.estimate(model, y, X, method=method, backend="dense").theta
    for theta in (model.default_theta(jnp.var(y)), optimum, optimum + 0.3 * jnp.sin(jnp.arange(1.0, 6.0))):
        out = both_paths(theta, y, X, model, method == "reml", ("ai", "observed", "none"))
        assert bool(out.pop("ok")[1])
        for key, (dense, mme) in out.items():
            atol = RTOL * n if key.startswith("score") else 0.0
            assert_close(mme, dense, rtol=1e-9, atol=atol)


@pytest.mark.parametrize("method", ["reml", "ml"])
def test_heteroscedastic_fits_match_dense(method):
    model, y, X = _heteroscedastic()
    auto = jreml.estimate(model, y, X, method=method)
    mme = jreml.estimate(model, y, X, method=method, backend="mme")
    dense = jreml.estimate(model, y, X, method=method, backend="dense")
    assert_same_fit(mme, dense)
    assert_same_fit(auto, mme, rtol=0.0)


@pytest.mark.parametrize("case", ["sleepstudy", "b=3", "overlapping groups", "heteroscedastic"])
def test_gradient_through_mme_fit_has_no_n_by_n_matrix_and_matches_dense(case):
    """dθ̂ for the MME back end comes from autodiff of the MME log-likelihood (q×q), not the dense n×n rule."""
    if case == "sleepstudy":
        model, y, X = example("sleepstudy")
    elif case == "heteroscedastic":
        model, y, X = _heteroscedastic()
    else:
        model, y, X = _models_with_a_block_layout()[case][:3]
    n = y.shape[0]
    rng = np.random.default_rng(7)
    dy = jnp.asarray(rng.normal(size=n))
    dX = jnp.asarray(rng.normal(size=X.shape))
    weights = jnp.asarray(rng.normal(size=model.num_free_params))

    def objective(yy, XX, backend):
        fit = jreml.estimate(model, yy, XX, backend=backend, tol_score=1e-10, tol_delta=1e-10, tol_loglik=1e-12)
        return fit.theta @ weights + jnp.sum(fit.beta) + fit.loglik

    grads = {b: jax.grad(objective, argnums=(0, 1))(y, X, b) for b in ("mme", "dense")}
    for got, want in zip(grads["mme"], grads["dense"], strict=True):
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-8 * scale)
    # the directional derivative against a refit by central differences
    h = 1e-5
    fd = (objective(y + h * dy, X + h * dX, "mme") - objective(y - h * dy, X - h * dX, "mme")) / (2 * h)
    ad = grads["mme"][0] @ dy + jnp.sum(grads["mme"][1] * dX)
    np.testing.assert_allclose(float(ad), float(fd), rtol=2e-5)
    jaxpr = jax.make_jaxpr(jax.grad(lambda yy: objective(yy, X, "mme")))(y)
    assert _n_by_n_values(jaxpr, n) == []
