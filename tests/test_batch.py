"""fit_batch: many responses, one right-hand side (spectral and dense vmapped paths)."""

import equinox as eqx
import numpy as np
import pandas as pd
import pytest
from conftest import load_reference, read_reference_data

import jreml
from jreml._batch import fit_batch

TRAITS = [f"trait{i}" for i in range(1, 9)]
FORMULA = "trait ~ 1 + covariate + (1 | id)"
TIGHT = dict(tol_score=1e-10, tol_delta=1e-10, tol_loglik=1e-12)


@pytest.fixture(scope="module")
def kinship():
    ex = jreml.example("kinship")
    K = jreml.datasets.kinship_matrix()
    ids = ex.data.id
    return ex, {"id": pd.DataFrame(K, index=ids, columns=ids)}


@pytest.fixture(scope="module")
def batch(kinship):
    ex, relmat = kinship
    return fit_batch(FORMULA, ex.data, TRAITS, relmat=relmat)


def test_kinship_matches_reference(batch, reference):
    ref = reference("kinship_visible")["traits"]
    frame = batch.to_frame()
    assert list(frame.columns) == [
        "response",
        "n_obs",
        "loglik",
        "converged",
        "n_iter",
        "singular",
        "id.variance",
        "Residual.variance",
        "(Intercept)",
        "covariate",
        "h2",
        "h2_se",
    ]
    assert frame.converged.all() and batch.spectral.all() and (frame.n_obs == 400).all()
    for _, row in frame.iterrows():
        r = ref[row.response]
        np.testing.assert_allclose(
            [row["id.variance"], row["Residual.variance"], row.h2], [r["s2g"], r["s2e"], r["h2"]], rtol=1e-5
        )
        np.testing.assert_allclose(row.loglik, r["reml_loglik"], rtol=0, atol=1e-6)
        np.testing.assert_allclose([row["(Intercept)"], row.covariate], list(r["beta"].values()), rtol=1e-5)


def test_kinship_matches_separate_estimates(batch, kinship):
    ex, _ = kinship
    for i, trait in enumerate(TRAITS):
        single = jreml.estimate(ex.model, ex.data[trait].to_numpy(float), ex.X, **TIGHT)
        np.testing.assert_allclose(batch.loglik[i], float(single.loglik), rtol=0, atol=1e-8)
        np.testing.assert_allclose(batch.params[i], single.natural_params, rtol=1e-8)
        np.testing.assert_allclose(batch.beta[i], single.beta, rtol=1e-8)
        np.testing.assert_allclose(batch.se_beta[i], single.se_beta, rtol=1e-8)


def test_missing_values_and_chunks(batch, kinship):
    ex, relmat = kinship
    data = ex.data.copy()
    data.loc[[3, 10, 50, 399], "trait3"] = np.nan
    data["few"] = np.nan
    data.loc[:1, "few"] = [1.0, 2.0]  # two rows only: fails alone
    Y = data[[*TRAITS, "few"]].to_numpy(float)
    out = fit_batch(FORMULA, data, Y, relmat=relmat, chunk_size=3, verbose=1)
    frame = out.to_frame()
    assert list(frame.response) == [f"y{j}" for j in range(9)]
    assert frame.n_obs.tolist()[:8] == [400, 400, 396, 400, 400, 400, 400, 400]
    assert not frame.converged.iloc[8] or "y8" in out.errors
    keep = [0, 1, 3, 4, 5, 6, 7]
    np.testing.assert_allclose(out.loglik[keep], batch.loglik[keep], rtol=0, atol=1e-10)
    np.testing.assert_allclose(out.params[keep], batch.params[keep], rtol=1e-10)
    single = jreml.fit("trait3 ~ 1 + covariate + (1 | id)", data, relmat=relmat, **TIGHT)
    assert single.n_dropped == 4
    np.testing.assert_allclose(out.loglik[2], float(single.loglik), rtol=0, atol=1e-8)
    np.testing.assert_allclose(out.params[2], single.natural_params, rtol=1e-8)
    np.testing.assert_allclose(out.beta[2], single.beta, rtol=1e-8)


def test_many_missingness_patterns_share_one_spectral_program(batch, kinship):
    """Traits with different missing rows (one pattern each) go through one padded spectral program (fit_padded)
    instead of one compilation per number of rows, and still equal separate fits on each trait's complete rows."""
    from jreml._backends.spectral import PADDED_TRACES

    ex, relmat = kinship
    data = ex.data.copy()
    rng = np.random.default_rng(3)
    for j, trait in enumerate(TRAITS[:5]):
        data.loc[rng.choice(len(data), 3 * j + 1, replace=False), trait] = np.nan
    before = PADDED_TRACES[0]
    out = fit_batch(FORMULA, data, TRAITS, relmat=relmat, chunk_size=4)
    assert PADDED_TRACES[0] - before == 1  # 6 patterns, 2 chunks: one program
    assert out.n_obs.tolist() == [399, 396, 393, 390, 387, 400, 400, 400]
    assert out.spectral.all() and out.converged.all()
    np.testing.assert_allclose(out.loglik[5:], batch.loglik[5:], rtol=0, atol=1e-10)
    for j in (0, 4):
        single = jreml.fit(FORMULA.replace("trait", TRAITS[j], 1), data, relmat=relmat, **TIGHT)
        np.testing.assert_allclose(out.loglik[j], float(single.loglik), rtol=0, atol=1e-8)
        np.testing.assert_allclose(out.params[j], single.natural_params, rtol=1e-7)
        np.testing.assert_allclose(out.beta[j], single.beta, rtol=1e-8)
        assert out.h2_se[j] > 0


def test_dense_vmapped_path_sleepstudy(capsys):
    """A random-slope model: the mixed-model equations by default, the dense path with backend="dense" (the verbose
    line names the path that runs); both equal separate fits."""
    ex = jreml.example("sleepstudy")
    base = jreml.estimate(ex.model, ex.y, ex.X)
    rng = np.random.default_rng(0)
    L = np.linalg.cholesky(np.asarray(ex.model(base.theta)))
    Y = (ex.X @ np.asarray(base.beta))[:, None] + L @ rng.normal(size=(len(ex.y), 5))
    data = ex.data.assign(**{f"r{j}": Y[:, j] for j in range(5)})
    names = [f"r{j}" for j in range(5)]
    out = fit_batch("Reaction ~ Days + (Days | Subject)", data, names, verbose=1)
    assert not out.spectral.any() and out.h2 is None
    assert "mixed-model equations path" in capsys.readouterr().out
    dense = fit_batch("Reaction ~ Days + (Days | Subject)", data, names, backend="dense", verbose=1)
    assert "dense path, chunks of 1" in capsys.readouterr().out
    np.testing.assert_allclose(dense.loglik, out.loglik, rtol=0, atol=1e-8)
    frame = out.to_frame()
    assert "Subject.(Intercept):Days" in frame.columns or len(out.param_names) == 4
    for j, name in enumerate(names):
        single = jreml.fit(f"{name} ~ Days + (Days | Subject)", data)
        assert single.param_names == out.param_names
        np.testing.assert_allclose(out.loglik[j], float(single.loglik), rtol=0, atol=1e-8)
        np.testing.assert_allclose(out.params[j], single.natural_params, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(out.beta[j], single.beta, rtol=1e-8)
        # a vmapped lane rounds as its own fit up to the BLAS kernels' order of operations: a convergence test within
        # rounding of its tolerance may pass one iteration apart
        assert abs(int(out.n_iter[j]) - int(single.n_iter)) <= 1 and out.converged[j] == bool(single.converged)


def _two_kernel_data(n=120, rank=8, n_groups=10, T=3, seed=5):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(n, rank))
    groups = rng.integers(0, n_groups, n)
    markers = rng.normal(size=(n, 3 * n))
    K_low, K_groups, K_full = (
        A @ A.T / rank,
        (groups[:, None] == groups[None, :]).astype(float),
        markers @ markers.T / (3 * n),
    )
    x = rng.normal(size=n)
    g = A @ rng.normal(size=(rank, T)) / np.sqrt(rank) + 0.6 * rng.normal(size=(n_groups, T))[groups]
    Y = 1.0 + 0.5 * x[:, None] + g + rng.normal(size=(n, T))
    ids = [f"i{j:03d}" for j in range(n)]
    data = pd.DataFrame({"x": x, "a": ids, "b": ids})
    frame = lambda K: pd.DataFrame(K, index=ids, columns=ids)  # noqa: E731
    return data, Y, frame(K_low), frame(K_groups), frame(K_full)


def test_low_rank_relationship_matrices_are_fitted_through_their_factor():
    """fit_batch rewrites a low-rank relmat term as (Z L)·σ²I_r·(Z L)ᵀ: the same V(θ) and names, the MME back end,
    and the same fits as separate dense jreml.fit calls; a full-rank K is left alone."""
    import jax.numpy as jnp

    from jreml._backends.rewrites import low_rank_kernels as _low_rank_kernels
    from jreml._backends.select import equations_form
    from jreml._design.build import build_design

    def _mme_q(model):
        return equations_form(model)[0]

    data, Y, K_low, K_groups, K_full = _two_kernel_data()
    formula = "y ~ 1 + x + (1 | a) + (1 | b)"
    model = build_design(formula, data.assign(y=Y[:, 0]), {"a": K_low, "b": K_groups}).model
    rewritten = _low_rank_kernels(model)
    assert rewritten.param_names == model.param_names and _mme_q(model) is None and _mme_q(rewritten) == 8 + 10
    for theta in (jnp.asarray([0.3, -0.2, 0.1]), jnp.asarray([-1.0, 0.5, 0.0])):
        np.testing.assert_allclose(np.asarray(rewritten(theta)), np.asarray(model(theta)), rtol=0, atol=1e-9)
    full = build_design(formula, data.assign(y=Y[:, 0]), {"a": K_full, "b": K_groups}).model
    assert _mme_q(_low_rank_kernels(full)) is None  # one term full rank: not through a factor
    # a low-rank K with a negative eigenvalue is not rewritten: dropping its negative part would change V
    v = np.linalg.svd(K_low.to_numpy())[0][:, -1]  # orthogonal to K_low's range
    indefinite = eqx.tree_at(lambda m: m.terms[0].G.K, model, jnp.asarray(K_low.to_numpy() - 0.1 * np.outer(v, v)))
    assert _low_rank_kernels(indefinite).terms[0] is indefinite.terms[0]

    relmat = {"a": K_low, "b": K_groups}
    out = fit_batch(formula, data, Y, relmat=relmat)
    assert out.converged.all() and not out.spectral.any()
    for j in range(Y.shape[1]):
        single = jreml.fit(formula, data.assign(y=Y[:, j]), relmat=relmat)
        np.testing.assert_allclose(out.loglik[j], float(single.loglik), rtol=1e-10)
        np.testing.assert_allclose(out.params[j], np.asarray(single.natural_params), rtol=1e-6)
        np.testing.assert_allclose(out.beta[j], np.asarray(single.beta), rtol=1e-7)


def test_auto_chunks_bound_the_working_memory(capsys):
    """chunk_size="auto" sizes chunks from bytes_per_response, which XLA's memory analysis of the vmapped dense
    program confirms (memory per extra response, within 25 %), and on CPU fits the dense path one response per
    device; verbose=1 states the figure."""
    import jax
    import jax.numpy as jnp

    from jreml._batch import (
        CHUNK_MEMORY_BYTES,
        DENSE_CPU_CHUNK,
        _auto_chunk,
        bytes_per_response,
        chunk_for,
        runs_dense,
    )
    from jreml._design.build import build_design
    from jreml._sharding import device_count

    data, Y, _, _, K_full = _two_kernel_data(n=150, T=8)
    formula = "y ~ 1 + x + (1 | a) + (1 | b)"
    relmat = {"a": K_full, "b": K_full**2}  # two full-rank kernels (Schur product): the dense path
    design = build_design(formula, data.assign(y=Y[:, 0]), relmat)
    model, X = design.model, design.X
    n, k = 150, model.num_free_params
    estimate_bytes = bytes_per_response(model, X.shape[1], spectral=False)
    assert estimate_bytes == 8 * (4 + 3 * k) * n * n

    def fields(y):
        r = jreml.estimate(model, y, X, throw=False)
        return r.theta, r.natural_params, r.vcov_theta, r.beta, r.se_beta, r.loglik, r.converged, r.status

    temp = {}
    for lanes in (4, 8):
        compiled = jax.jit(jax.vmap(fields)).lower(jnp.asarray(Y.T[:lanes])).compile()
        temp[lanes] = compiled.memory_analysis().temp_size_in_bytes
    measured = (temp[8] - temp[4]) / 4
    assert 0.75 * estimate_bytes <= measured <= 1.25 * estimate_bytes, (measured, estimate_bytes)
    # n = 2,000, three variance components: 5 responses per chunk, not the 256 that used to be the default
    assert _auto_chunk(8 * 13 * 2000 * 2000) == CHUNK_MEMORY_BYTES // (8 * 13 * 2000 * 2000) == 5
    assert _auto_chunk(bytes_per_response(model, 2, spectral=True)) == 256

    # On CPU the dense path takes DENSE_CPU_CHUNK responses per device and call, whatever the memory allows; the
    # mixed-model equations keep the memory rule, and an explicit chunk_size is kept.
    assert (
        chunk_for(model, X.shape[1], False, "auto", 8, runs_dense(model, {})) == DENSE_CPU_CHUNK * device_count() == 1
    )
    assert chunk_for(model, X.shape[1], False, 3, 8, runs_dense(model, {})) == 3
    slopes = build_design("y ~ x + (x | a)", data.assign(y=Y[:, 0], a=np.arange(150) % 10)).model
    assert not runs_dense(slopes, {}) and runs_dense(slopes, {"backend": "dense"})
    assert (
        chunk_for(slopes, 2, False, "auto", 500, runs_dense(slopes, {}))
        == _auto_chunk(bytes_per_response(slopes, 2, False))
        > 1
    )

    out = fit_batch(formula, data, Y, relmat=relmat, verbose=1)
    assert out.converged.all()
    printed = capsys.readouterr().out
    assert "dense path" in printed and "MiB working memory per response" in printed and "chunks of 1" in printed


def test_one_full_rank_kernel_is_fitted_in_its_eigenbasis(capsys):
    """A full-rank relmat plus q ≤ n/2 other random effects (a low-rank relmat, a grouping factor): fit_batch fits
    Uᵀy with V rotated by K's eigenvectors, σ²_K·diag(λ) + (UᵀZ) G (UᵀZ)ᵀ + σ²_e·I, through the mixed-model
    equations; the same fits as separate dense jreml.fit calls, a missingness pattern included."""
    import jax.numpy as jnp

    from jreml._backends.mme import mme_structure
    from jreml._batch import batch_form
    from jreml._design.build import build_design

    data, Y, _, K_groups, K_full = _two_kernel_data(T=4)
    data["g"] = (np.arange(len(data)) % 7).astype(str)
    Y[:6, 1] = np.nan
    formula = "y ~ 1 + x + (1 | a) + (1 | b) + (1 | g)"
    relmat = {"a": K_full, "b": K_groups}
    model = build_design(formula, data.assign(y=Y[:, 0]), relmat).model
    fitted, rotation = batch_form(model, spectral=False)
    structure = mme_structure(fitted)
    assert rotation is not None and structure.heteroscedastic and structure.q == 10 + 7
    assert fitted.param_names == model.param_names
    U = rotation.U
    for theta in (jnp.asarray([0.3, -0.2, 0.1, 0.0]), jnp.asarray([-1.0, 0.5, 0.0, 1.0])):
        np.testing.assert_allclose(np.asarray(fitted(theta)), U.T @ np.asarray(model(theta)) @ U, atol=1e-10)
    two_full = build_design(formula, data.assign(y=Y[:, 0]), {"a": K_full, "b": K_full**2}).model
    assert batch_form(two_full, spectral=False)[1] is None  # two full-rank kernels: the dense path
    # an indefinite K (a negative eigenvalue) is left to the dense path: clipping it would change V
    shift = np.linalg.eigvalsh(K_full.to_numpy())[0] + 0.05
    indefinite = eqx.tree_at(lambda m: m.terms[0].G.K, model, jnp.asarray(K_full.to_numpy() - shift * np.eye(120)))
    assert batch_form(indefinite, spectral=False)[1] is None

    out = fit_batch(formula, data, Y, relmat=relmat, verbose=1)
    assert "mixed-model equations (in the kernel's eigenbasis) path" in capsys.readouterr().out
    assert out.converged.all() and not out.spectral.any()
    assert out.h2 is None  # two relationship matrices: no single h²
    assert list(out.n_obs) == [120, 114, 120, 120]
    for j in range(Y.shape[1]):
        single = jreml.fit(formula, data.assign(y=Y[:, j]), relmat=relmat)
        assert int(single.nobs) == out.n_obs[j]
        np.testing.assert_allclose(out.loglik[j], float(single.loglik), rtol=0, atol=1e-8)
        np.testing.assert_allclose(out.params[j], np.asarray(single.natural_params), rtol=1e-6)
        np.testing.assert_allclose(out.beta[j], np.asarray(single.beta), rtol=1e-7)
        np.testing.assert_allclose(out.se_beta[j], np.asarray(single.se_beta), rtol=1e-6)


@pytest.mark.numerics
def test_singular_random_slope_traits_get_the_second_tries_of_single_fits(monkeypatch):
    """fit_batch applies ``estimate``'s Newton fallback and restart at the edge to the responses that need them
    (``refine_batch``): each response's fit is the one ``jreml.fit`` keeps on its own (here, lme4's optimum). On
    CPU the second tries run one response per device and call (``_rerun_width``), not padded to the chunk."""
    import jreml._batch as batch_module
    from jreml._sharding import device_count

    widths, first_fit = [], batch_module._dense_batch

    def recording(model, Yc, X, method, options, theta0, observed=None):
        if theta0 is not None:
            widths.append(Yc.shape[0])
        return first_fit(model, Yc, X, method, options, theta0, observed)

    monkeypatch.setattr(batch_module, "_dense_batch", recording)
    data = read_reference_data("singular_sleepstudy")
    lme4 = load_reference("singular_sleepstudy")["fits"]
    names = ["y2", "y20", "y50", "y54", "y3", "y7"]  # four that need a second try, two that do not
    batch = fit_batch("y ~ Days + (Days | Subject)", data, names)
    assert widths and set(widths) == {device_count()}, widths
    assert batch.converged.all(), batch.to_frame()
    for j, name in enumerate(names):
        single = jreml.fit(f"{name} ~ Days + (Days | Subject)", data)
        np.testing.assert_allclose(batch.loglik[j], float(single.loglik), rtol=0, atol=1e-6)
        assert batch.loglik[j] > lme4[name]["loglik"] - 1e-6, name


def test_missingness_patterns_share_one_program_on_the_mixed_model_equations(capsys):
    """Responses with different missing rows (a whole subject among them) share one design and one compiled
    program (``ObservedRows``), not one per number of complete rows; each fit is that of its own rows alone."""
    from jreml._estimate import TRACE_COUNT

    ex = jreml.example("sleepstudy")
    rng = np.random.default_rng(11)
    n, T = len(ex.data), 8
    Y = np.asarray(ex.y)[:, None] + rng.normal(0.0, 20.0, (n, T))
    for t in range(1, T):
        Y[rng.choice(n, 2 * t, replace=False), t] = np.nan
    Y[ex.data.Subject.to_numpy() == ex.data.Subject.iloc[0], 3] = np.nan  # no row of the first subject
    data = ex.data.assign(**{f"r{t}": Y[:, t] for t in range(T)})
    names = [f"r{t}" for t in range(T)]
    before = TRACE_COUNT[0]
    out = fit_batch("Reaction ~ Days + (Days | Subject)", data, names, verbose=1)
    # the first fit, and at most the restart's (θ₀ given) and Newton's programs: not one per pattern
    assert TRACE_COUNT[0] - before <= 3
    assert f"{T} responses of {T} missingness patterns fitted together" in capsys.readouterr().out
    assert out.converged.all() and not out.errors
    np.testing.assert_array_equal(out.n_obs, np.isfinite(Y).sum(axis=0))
    for t in (0, 3, 7):  # complete, a whole subject missing, the most rows missing (each single fit compiles)
        name = names[t]
        single = jreml.fit(f"{name} ~ Days + (Days | Subject)", data)
        assert out.n_obs[t] == int(single.nobs) == np.isfinite(Y[:, t]).sum()
        np.testing.assert_allclose(out.loglik[t], float(single.loglik), rtol=0, atol=1e-7)
        np.testing.assert_allclose(out.params[t], single.natural_params, rtol=1e-6)
        np.testing.assert_allclose(out.beta[t], single.beta, rtol=1e-8)
        np.testing.assert_allclose(out.se_beta[t], single.se_beta, rtol=1e-6)


def test_missingness_patterns_share_one_program_on_the_dense_path(capsys):
    """Two full-rank relationship matrices (the dense path): the same sharing through ObservedRows' masked V."""
    data, Y, _, _, K_full = _two_kernel_data(n=40, T=4, seed=2)
    for t in range(1, 4):
        Y[np.arange(t) * 7, t] = np.nan
    formula = "y ~ 1 + x + (1 | a) + (1 | b)"
    relmat = {"a": K_full, "b": K_full**2}
    out = fit_batch(formula, data, Y, relmat=relmat, verbose=1)
    assert "4 responses of 4 missingness patterns fitted together, n = 40, dense path" in capsys.readouterr().out
    for t in range(4):
        single = jreml.fit(formula, data.assign(y=Y[:, t]), relmat=relmat)
        assert out.n_obs[t] == int(single.nobs) == 40 - t and out.converged[t] == bool(single.converged)
        np.testing.assert_allclose(out.loglik[t], float(single.loglik), rtol=0, atol=1e-7)
        np.testing.assert_allclose(out.params[t], single.natural_params, rtol=1e-5, atol=1e-9)


def test_a_pattern_that_loses_a_fixed_effect_keeps_a_design_of_its_own():
    """A response without any row of a fixed factor's level would make the shared X rank deficient: it keeps its
    own design, whose fixed effects differ (reported in ``errors``, as before); the others are fitted together."""
    ex = jreml.example("sleepstudy")
    rng = np.random.default_rng(12)
    n = len(ex.data)
    data = ex.data.assign(half=np.where(ex.data.Days < 5, "early", "late"))
    Y = np.asarray(ex.y)[:, None] + rng.normal(0.0, 20.0, (n, 3))
    Y[:5, 1] = np.nan
    Y[data.half.to_numpy() == "late", 2] = np.nan
    formula = "y ~ half + (1 | Subject)"
    out = fit_batch(formula, data, Y)
    assert list(out.errors) == ["y2"] and "different model" in out.errors["y2"]
    assert out.converged[:2].all() and np.isnan(out.loglik[2])
    for t in range(2):
        single = jreml.fit(formula, data.assign(y=Y[:, t]))
        np.testing.assert_allclose(out.loglik[t], float(single.loglik), rtol=0, atol=1e-8)
        np.testing.assert_allclose(out.params[t], single.natural_params, rtol=1e-6)


def test_refine_batch_continues_fits_that_stall_or_run_out_of_iterations():
    """``refine_batch`` gives Newton continuations to the responses whose AI fit stalled or reached max_iter (in the
    60 three-by-three responses of ``singular_slopes3``, one vmapped AI fit crawled along a ridge of ℓ to max_iter
    and ended 9.7e-4 below lme4 before this), and keeps a continuation only where its ℓ is not lower."""
    from jreml._solvers.loop import CONVERGED, INVALID_START, MAX_ITER, STALLED
    from jreml._solvers.second_tries import refine_batch

    model = jreml.example("dyestuff").model  # no log-Cholesky block: no restarts
    status = np.array([CONVERGED, STALLED, MAX_ITER, INVALID_START, MAX_ITER])
    results = {
        "theta": np.zeros((5, 2)),
        "natural_params": np.ones((5, 2)),
        "beta": np.zeros((5, 1)),
        "loglik": np.array([-10.0, -10.0, -10.0, -np.inf, -10.0]),
        "converged": status == CONVERGED,
        "n_iter": np.full(5, 200),
        "status": status,
        "at_boundary": np.zeros((5, 2), bool),
    }
    calls = []

    def run(index, theta0, algorithm):
        calls.append((algorithm, list(index)))
        out = {key: np.array(value)[index] for key, value in results.items()}
        out.update(
            status=np.full(len(index), CONVERGED), converged=np.ones(len(index), bool), n_iter=np.full(len(index), 7)
        )
        out["loglik"] = np.array([-9.0, -9.0, -11.0])[: len(index)]  # the last one lower: not kept
        return out

    merged = refine_batch(run, results, model, "ai", np.zeros((5, 3)), np.ones((3, 1)))
    assert calls == [("newton", [1, 2, 4])]
    np.testing.assert_array_equal(merged["status"], [CONVERGED, CONVERGED, CONVERGED, INVALID_START, MAX_ITER])
    np.testing.assert_array_equal(merged["n_iter"], [200, 207, 207, 200, 200])
    calls.clear()
    refine_batch(run, results, model, "ai", np.zeros((5, 3)), np.ones((3, 1)), newton_fallback=False)
    assert calls == []
