"""The torch_openreml-style facade ``REML``: same fits as ``jreml.estimate``, torch_openreml's documented calls
(its REML vignette, github.com/anu-aagi/torch-openreml docs/source/vig/vig_reml.rst), plain functions, errors."""

import dataclasses
import math

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest

import jreml
from jreml._facade import REML

LME4_LOGLIK = -46.5969101209899  # lme4 REML logLik of yield ~ rep + (1 | gen) + (1 | rep:block)
OPENREML_LOGLIK = 16.8099  # torch_openreml's number for the same fit (no log 2π constant), 4 decimals


@pytest.fixture(scope="module")
def example():
    return jreml.example("john_alpha")


@pytest.fixture(scope="module")
def dense(example):
    """Z of gen (72×24) and of rep:block (72×18) as dense 0/1 matrices, columns in sorted level order."""
    df = example.data
    gen_levels = sorted(df.gen.unique())
    z_gen = (df.gen.to_numpy()[:, None] == np.asarray(gen_levels)[None, :]).astype(float)
    blocks = list(zip(df.rep, df.block, strict=True))
    block_levels = sorted(set(blocks))
    z_block = np.array([[float(b == lvl) for lvl in block_levels] for b in blocks])
    return z_gen, z_block


@pytest.fixture(scope="module")
def module_fit(example):
    reml = REML(v_builder=example.model)
    out = reml.optimize(example.y, example.X, None)
    return reml, out


@pytest.fixture(scope="module")
def function_fit(example, dense):
    z_gen, z_block = dense
    k_gen, k_block = jnp.asarray(z_gen @ z_gen.T), jnp.asarray(z_block @ z_block.T)
    eye = jnp.eye(z_gen.shape[0])

    def map_theta_to_v(theta):
        return jnp.exp(theta[0]) * k_gen + jnp.exp(theta[1]) * k_block + jnp.exp(theta[2]) * eye

    def map_theta_to_dv(theta):
        return jnp.stack([jnp.exp(theta[0]) * k_gen, jnp.exp(theta[1]) * k_block, jnp.exp(theta[2]) * eye])

    q_gen, q_block = z_gen.shape[1], z_block.shape[1]

    def map_theta_to_g(theta_g):
        return jnp.diag(jnp.concatenate([jnp.full(q_gen, jnp.exp(theta_g[0])), jnp.full(q_block, jnp.exp(theta_g[1]))]))

    reml = REML(
        map_theta_to_v=map_theta_to_v,
        map_theta_to_dv=map_theta_to_dv,
        map_theta_to_g=map_theta_to_g,
        mask_theta_to_g=np.array([True, True, False]),
        z=np.hstack([z_gen, z_block]),
    )
    theta_start = example.model.default_theta(jnp.var(jnp.asarray(example.y)))
    out = reml.optimize(example.y, example.X, theta_start)
    return reml, out, theta_start


def test_module_facade_equals_estimate(example, module_fit):
    reml, (theta, beta, n_iter) = module_fit
    ref = jreml.estimate(example.model, example.y, example.X, tol_score=1e-4, tol_delta=1e-4, tol_loglik=1e-4)
    np.testing.assert_array_equal(theta, ref.theta)
    np.testing.assert_array_equal(beta, ref.beta)
    assert n_iter == int(ref.n_iter)
    assert reml.result.converged
    np.testing.assert_allclose(reml.blue(), ref.beta, rtol=1e-12)
    np.testing.assert_allclose(reml.loglik(), LME4_LOGLIK, atol=1e-6)
    np.testing.assert_allclose(reml.loglik_without_constant(), OPENREML_LOGLIK, atol=1e-4)  # 16.80985
    assert math.isclose(float(reml.loglik_without_constant() - reml.loglik()), 34.5 * math.log(2 * math.pi))
    # BLUPs: the concatenation of the terms' BLUPs, in term order (gen, then rep:block).
    blups = ref.blup()
    assert list(blups) == ["gen", "rep:block"]
    np.testing.assert_allclose(reml.blup(), np.concatenate([blups["gen"], blups["rep:block"]]), rtol=1e-10)
    np.testing.assert_allclose(reml.predict(), ref.predict(), rtol=1e-12)
    np.testing.assert_allclose(reml.marginal_predict(), example.X @ np.asarray(ref.beta), rtol=1e-12)
    np.testing.assert_allclose(reml.residual(), example.y - np.asarray(ref.predict()), atol=1e-12)
    np.testing.assert_allclose(reml.marginal_residual(), ref.marginal_residuals(), atol=1e-12)


def test_torch_openreml_method_calls(example, dense, module_fit):
    """torch_openreml's signatures: (y, X, theta) and (y, X, Z, theta, map_theta_to_g=, mask_theta_to_g=),
    evaluated at the θ given (here θ̂ and the start), G a covariance module as in torch_openreml's vignette."""
    reml, (theta_hat, beta_hat, _) = module_fit
    y, X = example.y, example.X
    np.testing.assert_allclose(reml.blue(y, X, theta_hat), beta_hat, rtol=1e-12)
    np.testing.assert_allclose(reml.loglik(y, X, theta_hat), LME4_LOGLIK, atol=1e-6)
    np.testing.assert_allclose(reml.marginal_predict(y, X, theta_hat), X @ np.asarray(beta_hat), rtol=1e-12)
    np.testing.assert_allclose(reml.marginal_residual(y, X, theta_hat), reml.marginal_residual(), atol=1e-12)
    theta0 = jnp.zeros(3)  # another θ: the methods evaluate there, not at the fit
    np.testing.assert_allclose(reml.loglik(y, X, theta0), jreml.reml_loglik(theta0, y, X, example.model), rtol=1e-12)
    assert float(reml.loglik(y, X, theta0)) < float(reml.loglik()) - 1.0
    V0 = np.asarray(example.model(theta0))
    gls = np.linalg.solve(X.T @ np.linalg.solve(V0, X), X.T @ np.linalg.solve(V0, y))
    np.testing.assert_allclose(reml.blue(y, X, theta0), gls, rtol=1e-10)
    u0 = reml.blup(None, None, None, theta0)  # torch_openreml's order (y, X, Z, theta); y, X default to the fit's
    p_y = np.linalg.solve(V0, y - X @ gls)
    np.testing.assert_allclose(u0, np.hstack(dense).T @ p_y, rtol=1e-10)  # G(0) = I: û = Zᵀ P y
    assert not np.allclose(u0, reml.blup(), atol=1e-3)

    gen = jreml.covariance.DummyMatrix(example.data.gen)
    mask = np.array([True, False, False])  # θ_G = θ_gen
    u_gen = reml.blup(y, X, gen(), theta_hat, map_theta_to_g=jreml.covariance.ScalarMatrix(24), mask_theta_to_g=mask)
    np.testing.assert_allclose(u_gen, reml.result.blup()["gen"], rtol=1e-10)
    fitted = reml.predict(y, X, gen, theta_hat, map_theta_to_g=jreml.covariance.ScalarMatrix(24), mask_theta_to_g=mask)
    np.testing.assert_allclose(fitted, X @ np.asarray(beta_hat) + gen() @ u_gen, rtol=1e-12)
    e = reml.residual(y, X, gen(), theta_hat, map_theta_to_g=jreml.covariance.ScalarMatrix(24), mask_theta_to_g=mask)
    np.testing.assert_allclose(e, y - fitted, atol=1e-12)
    # G and its mask given to the constructor, as REML(v_builder=V, map_theta_to_g=G, mask_theta_to_g=mask)
    with_g = REML(v_builder=example.model, map_theta_to_g=jreml.covariance.ScalarMatrix(24), mask_theta_to_g=mask)
    np.testing.assert_allclose(with_g.blup(y, X, gen(), theta_hat), u_gen, rtol=1e-12)


def test_history_is_a_dict_of_per_iteration_lists(module_fit):
    """torch_openreml's layout: history[key][j] for iteration j+1; θ after the step, ℓ/score/β before it."""
    reml, (theta, beta, n_iter) = module_fit
    history = reml.history
    assert set(history) == {"theta", "beta", "loglik", "score", "ai", "delta", "update"}
    assert {len(v) for v in history.values()} == {n_iter}
    record = reml.result.history
    np.testing.assert_array_equal(history["theta"][-1], theta)
    np.testing.assert_array_equal(history["theta"][0], record.theta[1])
    np.testing.assert_array_equal(history["loglik"][0], record.loglik[0])  # at the start θ_0
    np.testing.assert_array_equal(history["beta"][-1], record.beta[n_iter - 1])
    np.testing.assert_allclose(history["update"][0], record.theta[1] - record.theta[0], atol=1e-14)
    for s, a, d in zip(history["score"], history["ai"], history["delta"], strict=True):
        assert s.shape == (3,) and a.shape == (3, 3)
        np.testing.assert_allclose(a @ d, s, atol=1e-8)  # delta = AI⁻¹ score
    logliks = [ll.item() for ll in history["loglik"]]  # torch_openreml's idiom works on the numpy scalars
    assert np.all(np.diff(logliks) >= -1e-8)  # the loop only accepts steps that do not decrease ℓ


def test_history_after_the_newton_fallback(module_fit):
    """estimate's Newton fallback reports n_iter of both runs with the Newton run's history: the lists stop at
    the last recorded iterate, θ̂ (here simulated by adding 3 to n_iter of the fit)."""
    reml, (theta, beta, n_iter) = module_fit
    combined = REML(v_builder=reml.v_builder)
    combined._result = dataclasses.replace(reml.result, n_iter=reml.result.n_iter + 3, algorithm="ai+newton")
    assert {len(v) for v in combined.history.values()} == {n_iter}
    np.testing.assert_array_equal(combined.history["theta"][-1], theta)
    np.testing.assert_array_equal(combined.get_theta("last"), theta)
    np.testing.assert_array_equal(combined.get_beta("last"), beta)


def test_verbose_1_counts_iterations(example, capfd):
    """verbose=1: an iteration counter and torch_openreml's closing line, no bar scaled to max_iter."""
    REML(v_builder=example.model).optimize(example.y, example.X, None, verbose=1)
    out = capfd.readouterr().out
    assert "Iter" in out and "[#" not in out and "[." not in out
    assert "Converged at iteration" in out


# torch_openreml's "Complete example" and "Optimisation history" (vig_reml.rst), verbatim below the imports.
# Its imports become jreml's; torch itself is not a jreml dependency: the three constructors the example uses
# (and torch.norm) stand in as their JAX equivalents.
OPENREML_IMPORTS = """\
import types

import jax.numpy as jnp

from jreml import REML
from jreml.utils import augment, n_distinct

from jreml.covariance import (
    DummyMatrix,
    IdentityMatrix,
    ScalarMatrix,
    Sum,
    CovariancePropagation,
    KroneckerProduct,
)

from jreml.example_data import john_alpha

torch = types.SimpleNamespace(
    tensor=jnp.asarray, ones=lambda *shape: jnp.ones(shape), zeros=lambda *shape: jnp.zeros(shape), norm=jnp.linalg.norm
)
"""

OPENREML_EXAMPLE = """\
# --- response ---
y = torch.tensor(john_alpha["yield"].values)

# --- fixed effects ---
X = augment(
    torch.ones(len(john_alpha), 1),
    DummyMatrix(john_alpha["rep"], drop_first=True)()
)

# --- random effect design matrices ---
Z_gen = DummyMatrix(john_alpha["gen"])
Z_rep_block = DummyMatrix(john_alpha["rep"], john_alpha["block"])

# --- covariance components ---
G_gen = ScalarMatrix(n_distinct(john_alpha["gen"]))
G_rep = IdentityMatrix(n_distinct(john_alpha["rep"]))
G_block = ScalarMatrix(n_distinct(john_alpha["block"]))

R = ScalarMatrix(len(john_alpha))

# --- marginal covariance ---
V = Sum(
    CovariancePropagation(Z_gen, G_gen),
    CovariancePropagation(
        Z_rep_block,
        KroneckerProduct(G_rep, G_block)
    ),
    R
)

# --- REML fit ---
reml = REML(v_builder=V)

theta_start = torch.zeros(V.num_free_params)

theta_hat, beta_hat, n_iter = reml.optimize(
    y,
    X,
    theta_start,
    verbose=2,
)

# --- results ---
print("theta:", theta_hat)

print("variance components:", V.build_params(theta_hat))

print("fixed effects:", beta_hat)

print("loglik:", reml.loglik(y, X, theta_hat))
"""

OPENREML_HISTORY = """\
scores = [
    torch.norm(s).item()
    for s in reml.history["score"]
]

logliks = [
    ll.item()
    for ll in reml.history["loglik"]
]

print(
    "Score norms:",
    [f"{s:.6f}" for s in scores],
)

print(
    "Log-likelihoods:",
    [f"{ll:.4f}" for ll in logliks],
)
"""


def test_torch_openreml_john_alpha_example_runs_unchanged(capfd):
    namespace = {}
    exec(OPENREML_IMPORTS + OPENREML_EXAMPLE + OPENREML_HISTORY, namespace)  # noqa: S102
    out = capfd.readouterr().out
    assert "variance components:" in out and "Converged at iteration" in out and "Log-likelihoods:" in out
    reml, n_iter = namespace["reml"], namespace["n_iter"]
    assert reml.result.converged
    np.testing.assert_allclose(
        reml.loglik(namespace["y"], namespace["X"], namespace["theta_hat"]), LME4_LOGLIK, atol=1e-6
    )
    # lme4: σ²_gen 0.1429, σ²_rep:block 0.0702, σ²_residual 0.0816 (REML)
    np.testing.assert_allclose(namespace["V"].build_params(namespace["theta_hat"]), [0.1429, 0.0702, 0.0816], atol=1e-4)
    assert len(namespace["scores"]) == len(namespace["logliks"]) == n_iter


# The code of torch_openreml's vignette sections "Running the optimiser" to "Evaluating the log-likelihood"
# (vig_reml.rst), concatenated and verbatim below the imports; torch.randn draws from a seeded NumPy generator.
OPENREML_VIGNETTE_IMPORTS = """\
import types

import jax.numpy as jnp
import numpy as np

from jreml import REML
from jreml.covariance import (
    DummyMatrix,
    ScalarMatrix,
    CovariancePropagation,
    Sum,
)

_rng = np.random.default_rng(5)
torch = types.SimpleNamespace(
    randn=lambda *shape: jnp.asarray(_rng.standard_normal(shape)),
    zeros=lambda *shape: jnp.zeros(shape),
    tensor=jnp.asarray,
)
"""

OPENREML_VIGNETTE = """\
n, p = 50, 2

y = torch.randn(n)
X = torch.randn(n, p)

Z = DummyMatrix(["a", "b"] * 25)()

V = Sum(
    CovariancePropagation(
        Z,
        ScalarMatrix(2),
    ),
    ScalarMatrix(n),
)

reml = REML(v_builder=V)

theta_start = torch.zeros(V.num_free_params)

theta_hat, beta_hat, n_iter = reml.optimize(
    y,
    X,
    theta_start,
    verbose=2,
)
theta_last = reml.get_theta(select="last")
theta_best = reml.get_theta(select="best")

beta_last = reml.get_beta(select="last")
beta_best = reml.get_beta(select="best")
beta_hat = reml.blue(y, X, theta_hat)
b_hat = reml.blup(
    y,
    X,
    Z,
    theta_hat,
    map_theta_to_g=ScalarMatrix(2),
    mask_theta_to_g=torch.tensor([True, False]),
)
y_hat_marginal = reml.marginal_predict(
    y,
    X,
    theta_hat,
)

y_hat_conditional = reml.predict(
    y,
    X,
    Z,
    theta_hat,
    map_theta_to_g=ScalarMatrix(2),
    mask_theta_to_g=torch.tensor([True, False]),
)
e_marginal = reml.marginal_residual(
    y,
    X,
    theta_hat,
)

e_conditional = reml.residual(
    y,
    X,
    Z,
    theta_hat,
    map_theta_to_g=ScalarMatrix(2),
    mask_theta_to_g=torch.tensor([True, False]),
)
loglik = reml.loglik(y, X, theta_hat)
"""


def test_torch_openreml_vignette_calls_run_unchanged(capfd):
    ns = {}
    exec(OPENREML_VIGNETTE_IMPORTS + OPENREML_VIGNETTE, ns)  # noqa: S102
    assert "Converged at iteration" in capfd.readouterr().out
    reml, y, X, Z = ns["reml"], ns["y"], ns["X"], ns["Z"]
    assert reml.result.converged and float(ns["V"].build_params(ns["theta_hat"])[0]) > 0.01  # σ²_group inside
    np.testing.assert_array_equal(ns["theta_last"], ns["theta_hat"])
    np.testing.assert_allclose(ns["beta_hat"], reml.result.beta, rtol=1e-10)
    # G = ScalarMatrix(2) of θ[mask] with the dense Z is the module's own term: the same BLUPs
    np.testing.assert_allclose(ns["b_hat"], reml.blup(), rtol=1e-10)
    np.testing.assert_allclose(ns["y_hat_conditional"], X @ ns["beta_hat"] + Z @ ns["b_hat"], rtol=1e-12)
    np.testing.assert_allclose(ns["y_hat_conditional"], reml.predict(), rtol=1e-10)
    np.testing.assert_allclose(ns["e_conditional"], y - ns["y_hat_conditional"], atol=1e-12)
    np.testing.assert_allclose(ns["e_marginal"], y - ns["y_hat_marginal"], atol=1e-12)
    np.testing.assert_allclose(ns["loglik"], reml.result.loglik, rtol=1e-12)


# The same sections of the vignette's later revision (vig_reml.rst at torch-openreml commit 864c847): REML(V)
# positional, and G passed at call time as ``g=`` ("g receives the same flat parameter vector θ as v"), verbatim.
OPENREML_VIGNETTE_LATER = """\
n, p = 50, 2

y = torch.randn(n)
X = torch.randn(n, p)

Z = DummyMatrix(["a", "b"] * 25)()

V = Sum(
    CovariancePropagation(
        Z,
        ScalarMatrix(2),
    ),
    ScalarMatrix(n),
)

reml = REML(V)

theta_start = torch.zeros(V.num_free_params)

theta_hat, beta_hat, n_iter = reml.optimize(
    y,
    X,
    theta_start,
    verbose=2,
)
theta_last = reml.get_theta(select="last")
theta_best = reml.get_theta(select="best")

beta_last = reml.get_beta(select="last")
beta_best = reml.get_beta(select="best")
beta_hat = reml.blue(y, X, theta_hat)
G = ScalarMatrix(2)
b_hat = reml.blup(y, X, Z, theta_hat, g=G)
y_hat_marginal = reml.marginal_predict(
    y,
    X,
    theta_hat,
)

y_hat_conditional = reml.predict(y, X, Z, theta_hat, g=ScalarMatrix(2))
e_marginal = reml.marginal_residual(
    y,
    X,
    theta_hat,
)

e_conditional = reml.residual(y, X, Z, theta_hat, g=ScalarMatrix(2))
loglik = reml.loglik(y, X, theta_hat)
"""


def test_torch_openreml_later_vignette_g_keyword(capfd):
    ns = {}
    exec(OPENREML_VIGNETTE_IMPORTS + OPENREML_VIGNETTE_LATER, ns)  # noqa: S102
    assert "Converged at iteration" in capfd.readouterr().out
    reml, y, X, Z = ns["reml"], ns["y"], ns["X"], ns["Z"]
    assert reml.result.converged
    # g = ScalarMatrix(2) takes θ's leading entry, the group variance: the module's own term's BLUPs
    np.testing.assert_allclose(ns["b_hat"], reml.blup(), rtol=1e-10)
    np.testing.assert_allclose(ns["y_hat_conditional"], X @ ns["beta_hat"] + Z @ ns["b_hat"], rtol=1e-12)
    np.testing.assert_allclose(ns["e_conditional"], y - ns["y_hat_conditional"], atol=1e-12)
    np.testing.assert_allclose(ns["loglik"], reml.result.loglik, rtol=1e-12)
    with pytest.raises(ValueError, match="not both"):
        reml.blup(y, X, Z, ns["theta_hat"], map_theta_to_g=ns["G"], g=ns["G"])


def test_plain_functions_match_module(example, module_fit, function_fit):
    reml_m, (theta_m, beta_m, _) = module_fit
    reml_f, (theta_f, beta_f, _), _ = function_fit
    assert reml_f.result.converged
    np.testing.assert_allclose(theta_f, theta_m, atol=1e-6)
    np.testing.assert_allclose(beta_f, beta_m, atol=1e-6)
    np.testing.assert_allclose(reml_f.loglik(), reml_m.loglik(), atol=1e-6)
    np.testing.assert_allclose(reml_f.loglik(), LME4_LOGLIK, atol=1e-6)
    # BLUPs from map_theta_to_g / mask / z equal the module's FitResult.blup(), term by term.
    blups = reml_m.result.blup()
    np.testing.assert_allclose(reml_f.blup()[:24], blups["gen"], atol=1e-6)
    np.testing.assert_allclose(reml_f.blup()[24:], blups["rep:block"], atol=1e-6)
    np.testing.assert_allclose(reml_f.predict(), reml_m.predict(), atol=1e-6)
    np.testing.assert_allclose(reml_f.residual(), reml_m.residual(), atol=1e-6)
    np.testing.assert_allclose(reml_f.marginal_residual(), reml_m.marginal_residual(), atol=1e-6)


def test_index_mask_equals_boolean_mask(function_fit):
    reml, _, _ = function_fit
    by_index = REML(
        map_theta_to_v=reml.map_theta_to_v,
        map_theta_to_g=reml.map_theta_to_g,
        mask_theta_to_g=np.array([0, 1]),
        z=reml.z,
    )
    by_index._result = reml.result  # same fit, other θ_G selector
    np.testing.assert_allclose(by_index.blup(), reml.blup(), rtol=1e-12)


def test_get_theta_best_and_last(module_fit):
    reml, (theta, beta, n_iter) = module_fit
    np.testing.assert_array_equal(reml.get_theta(), theta)
    np.testing.assert_array_equal(reml.get_theta("last"), theta)
    np.testing.assert_array_equal(reml.get_beta("last"), beta)
    logliks = np.asarray(reml.result.history.loglik)[: n_iter + 1]
    best = int(np.argmax(logliks))
    np.testing.assert_array_equal(reml.get_theta("best"), reml.result.history.theta[best])
    # the loop's ℓ and loglik()'s fresh evaluation at the same θ̂ differ by rounding (1e-14 seen)
    assert logliks[best] >= float(reml.loglik()) - 1e-9 * (1 + abs(float(reml.loglik())))

    # Make an earlier iterate the best one: "best" must pick it, "last" must not.
    history = reml.result.history
    bumped = history.loglik.at[1].set(float(reml.loglik()) + 1.0)
    tweaked = REML(v_builder=reml.v_builder)
    tweaked._result = eqx.tree_at(lambda r: r.history.loglik, reml.result, bumped)
    np.testing.assert_array_equal(tweaked.get_theta("best"), history.theta[1])
    np.testing.assert_array_equal(tweaked.get_beta("best"), history.beta[1])
    np.testing.assert_array_equal(tweaked.get_theta("last"), theta)
    with pytest.raises(ValueError, match="select"):
        reml.get_theta("first")


def test_errors(example, function_fit):
    with pytest.raises(ValueError, match="v_builder .* or map_theta_to_v"):
        REML()
    with pytest.raises(ValueError, match="not both"):
        REML(map_theta_to_v=lambda t: t, v_builder=example.model)
    with pytest.raises(TypeError, match="covariance module"):
        REML(v_builder=lambda t: t)
    assert REML(example.model).v_builder is example.model  # REML(V): torch_openreml's positional v_builder
    with pytest.raises(ValueError, match="give map_theta_to_g too"):
        REML(map_theta_to_v=lambda t: t, z=np.ones((3, 2)))

    unfitted = REML(v_builder=example.model)
    with pytest.raises(RuntimeError, match="optimize"):
        _ = unfitted.result
    with pytest.raises(RuntimeError, match="optimize"):
        _ = unfitted.history
    for method in ("blue", "blup", "predict", "loglik", "residual", "marginal_predict", "marginal_residual"):
        with pytest.raises(RuntimeError, match="optimize"):
            getattr(unfitted, method)()
    with pytest.raises(RuntimeError, match="optimize"):
        unfitted.get_theta()
    # torch_openreml evaluates without a fit when y, X and theta are given
    theta0 = jnp.zeros(3)
    np.testing.assert_allclose(
        unfitted.loglik(example.y, example.X, theta0), jreml.reml_loglik(theta0, example.y, example.X, example.model)
    )
    with pytest.raises(ValueError, match="together"):
        unfitted.blue(example.y, None, theta0)

    plain = REML(map_theta_to_v=function_fit[0].map_theta_to_v)
    with pytest.raises(ValueError, match="theta_start"):
        plain.optimize(example.y, example.X, None)
    plain._result = function_fit[0].result
    with pytest.raises(ValueError, match="map_theta_to_g"):
        plain.blup()
    with pytest.raises(ValueError, match="map_theta_to_g"):
        plain.predict()
    with pytest.raises(ValueError, match="need Z"):
        plain.blup(map_theta_to_g=function_fit[0].map_theta_to_g)
    np.testing.assert_allclose(plain.marginal_residual(), function_fit[0].marginal_residual())


def test_torch_openreml_utils():
    from jreml.example_data import john_alpha
    from jreml.utils import augment, n_distinct

    assert n_distinct(["a", "b", "a", "c"]) == 3  # torch_openreml's docstring example
    assert n_distinct(john_alpha["gen"]) == 24 and n_distinct(("x", None, "x")) == 1
    ones, zeros = np.ones((4, 2)), np.zeros((4, 3))
    np.testing.assert_array_equal(augment(ones, zeros), np.hstack([ones, zeros]))
    with pytest.raises(ValueError, match="different numbers of rows"):
        augment(np.ones((4, 2)), np.ones((3, 1)))
    with pytest.raises(ValueError, match="2-D"):
        augment(np.ones(4))
    assert list(john_alpha.columns) == ["plot", "rep", "block", "gen", "yield", "row", "col"]
