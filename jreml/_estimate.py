"""``estimate``: fit θ, β of y ~ N(Xβ, V(θ)) by REML or ML in one compiled program."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.errors import JaxRuntimeError
from jaxtyping import Array, Float

from ._backends.equations import EQUATIONS, equations_structure
from ._backends.mme import mme_structure, static_block_diagonal
from ._backends.select import choose
from ._backends.sparse import check_memory, sparse_pattern, sparse_structure
from ._config import as_float_array, float_dtype
from ._covariance.observed import observation_count, observed_data
from ._covariance.queries import as_covariance, observed_mask
from ._implicit import fitted_core, implicit_theta_mme
from ._likelihood import DERIVATIVES, check_method, derivatives_at
from ._result import FitResult
from ._solvers import as_algorithm
from ._solvers.base import free_mask
from ._solvers.loop import (
    CONVERGED,
    INVALID_START,
    MAX_ITER,
    STALLED,
    STATUS_MESSAGES,
    history_rows,
    print_history,
    run,
)
from ._timing import last_timing as last_timing  # re-exported: the timing of the last fit
from ._timing import timed

#: Lower bound of a variance, relative to the data's residual variance (θ is clipped there).
BOUNDARY_RELATIVE_VARIANCE = 1e-14
#: A variance below this fraction of the residual variance is reported as singular (lme4: relative SD 1e-4).
SINGULAR_RELATIVE_VARIANCE = 1e-8

# Incremented each time the fitting program is traced (tests check that vmap and refits compile once).
TRACE_COUNT = [0]


def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _check_data(y, X, n_model: int, model=None):
    """Shapes, finiteness and the rank of X, on the rows the model observes (all, or an ``ObservedRows`` mask's)."""
    if y.ndim != 1:
        raise ValueError(f"y must be a 1-D response vector, got shape {y.shape}")
    n = y.shape[0]
    if X.ndim != 2 or X.shape[0] != n:
        raise ValueError(f"X must be a 2-D design matrix with {n} rows (len(y)), got shape {X.shape}")
    if n_model != n:
        raise ValueError(f"the covariance model is {n_model}x{n_model} but y has {n} observations")
    observed = None if model is None else observed_mask(model)
    if observed is not None:
        if _is_traced(observed):  # which rows count is known only inside the program
            return
        observed = np.asarray(observed)
    n_obs = n if observed is None else int(observed.sum())
    if X.shape[1] >= n_obs:
        raise ValueError(f"X has {X.shape[1]} columns for {n_obs} observations: REML needs n > p")
    if not _is_traced(y):
        bad = ~np.isfinite(np.asarray(y))
        bad = np.flatnonzero(bad if observed is None else bad & observed)
        if bad.size:
            raise ValueError(f"y has non-finite values (NaN/inf) at rows {bad[:10].tolist()}")
    if not _is_traced(X):
        Xn = np.asarray(X) if observed is None else np.where(observed[:, None], np.asarray(X), 0.0)
        rows, cols = np.nonzero(~np.isfinite(Xn))
        if rows.size:
            where = list(zip(rows[:10].tolist(), cols[:10].tolist(), strict=True))
            raise ValueError(f"X has non-finite values at (row, column) {where}")
        rank = np.linalg.matrix_rank(Xn)
        if rank < Xn.shape[1]:
            raise ValueError(f"X is rank deficient (rank {rank} < {Xn.shape[1]} columns); drop aliased columns first")


def _ols_residual_variance(y, X, model):
    """Σr²/(n − p) of the OLS fit, over the rows the model observes (all but an ``ObservedRows`` model's others)."""
    y, X = observed_data(model, y, X)
    beta, *_ = jnp.linalg.lstsq(X, y)
    resid = y - X @ beta
    s2 = resid @ resid / (observation_count(model, X.shape[0]) - X.shape[1])
    return jnp.where(s2 > 0, s2, 1.0)


def _fit(
    model,
    y,
    X,
    theta0,
    lb,
    ub,
    tolerances,
    eta,
    limits,
    pattern=None,
    *,
    reml,
    algorithm,
    derivatives,
    dv_builder,
    checks,
    em_plan,
    history_rows,
    throw,
    backend="dense",
    mme_blocks=None,
) -> FitResult:
    TRACE_COUNT[0] += 1
    dtype = y.dtype
    y, X = observed_data(model, y, X)  # rows an ObservedRows model leaves out become 0
    # The loop runs on values only; derivatives of θ̂ come from the implicit function theorem below.
    model_values, y_values, X_values = _stop_gradient((model, y, X))
    scale = _ols_residual_variance(y_values, X_values, model)
    scale_mask = jnp.asarray(model.scale_mask, dtype=bool)
    if theta0 is None:
        theta0 = model.default_theta(scale)
    boundary = model.default_theta(scale * BOUNDARY_RELATIVE_VARIANCE)
    default_lb = jnp.where(scale_mask, boundary, -jnp.inf)
    lb = default_lb if lb is None else lb
    ub = jnp.full_like(theta0, jnp.inf) if ub is None else ub

    singular_threshold = model.default_theta(scale * SINGULAR_RELATIVE_VARIANCE)
    snap = jnp.where(scale_mask, singular_threshold, -jnp.inf)
    # variance = e^{p·θ} on the scale parameters: p = 1 / (θ(e·v) − θ(v))
    powers = jnp.where(scale_mask, 1.0 / (model.default_theta(scale * jnp.e) - model.default_theta(scale)), 1.0)
    mme = None
    if backend in EQUATIONS:
        # ZᵀZ, ZᵀX, … once, for the loop (values only) and the final differentiable evaluation.
        structure = equations_structure(model, backend)
        data = structure.prepare(y, X, pattern if backend == "sparse" else mme_blocks)
        mme = (equations_structure(model_values, backend), _stop_gradient(data))
    out = run(
        model_values,
        y_values,
        X_values,
        jax.lax.stop_gradient(theta0).astype(dtype),
        lb.astype(dtype),
        ub.astype(dtype),
        snap.astype(dtype),
        scale_mask,
        powers.astype(dtype),
        tolerances,
        eta,
        reml=reml,
        algorithm=algorithm,
        derivatives=derivatives,
        dv_builder=dv_builder,
        max_iter=limits[0],
        max_halvings=limits[2],
        checks=checks,
        min_iter=limits[1],
        em_plan=em_plan,
        history_rows=history_rows,
        mme=mme,
    )
    theta = out.theta
    if throw:
        theta = eqx.error_if(theta, out.status == INVALID_START, STATUS_MESSAGES[INVALID_START])
    at_boundary = scale_mask & (theta <= jnp.maximum(singular_threshold, lb))
    free = free_mask(theta, out.evaluation.score, lb, ub) & ~at_boundary
    if backend in EQUATIONS:
        theta = implicit_theta_mme(theta, free, model, y, X, reml, mme_blocks, backend)
        c, final = structure.evaluate(theta, y, X, reml=reml, information="ai", data=data)
    else:
        theta, c = fitted_core(theta, free, model, y, X, reml)
        final = derivatives_at(
            theta, y, X, model, c, reml=reml, information="ai", derivatives=derivatives, dv_builder=dv_builder
        )
    p = X.shape[1]
    chol_inv = jax.scipy.linalg.solve_triangular(c.chol_xvx, jnp.eye(p, dtype=dtype), lower=True)
    vcov_beta = chol_inv.T @ chol_inv
    information = jnp.where(c.ok, final.information, 0.0)
    vcov_theta = _pseudo_inverse(information)
    params = model.build_params(theta)
    return FitResult(
        theta=theta,
        natural_params=params,
        beta=c.beta,
        vcov_beta=vcov_beta,
        se_beta=jnp.sqrt(jnp.diagonal(vcov_beta)),
        loglik=c.loglik,
        converged=out.status == CONVERGED,
        n_iter=out.n_iter,
        status=out.status,
        singular=jnp.any(at_boundary),
        at_boundary=at_boundary,
        score=jnp.where(c.ok, final.score, 0.0),
        information=information,
        vcov_theta=vcov_theta,
        history=out.history,
        p_y=c.p_y,
        model=model,
        y=y,
        X=X,
        method="reml" if reml else "ml",
        algorithm=algorithm.name,
        param_names=model.param_names,
    )


def _stop_gradient(tree):
    dynamic, static = eqx.partition(tree, eqx.is_array)
    return eqx.combine(jax.lax.stop_gradient(dynamic), static)


def _pseudo_inverse(information):
    """Inverse of the information; directions with (near-)zero information get zero variance, not inf/NaN."""
    if information.shape[0] == 0:
        return information
    eigvals, eigvecs = jnp.linalg.eigh(information)
    top = jnp.max(jnp.abs(eigvals))
    keep = eigvals > 1e-10 * top
    inv = jnp.where(keep, 1.0 / jnp.where(keep, eigvals, 1.0), 0.0)
    return (eigvecs * inv) @ eigvecs.T


_fit_jit = eqx.filter_jit(_fit)

# ---------------------------------------------------------------------------------------------------------------
# Fast path. ``eqx.filter_jit`` re-partitions every argument pytree on each call (≈ 0.3 ms per call for these
# small models, more than a whole Dyestuff fit). Here the model is flattened once per call (a few µs), and one
# ``jax.jit``-compiled function of the array leaves only is kept per (model structure, static leaves, options).
# The semantics are those of ``_fit_jit``: array leaves (jax or numpy) are traced, everything else is static,
# and a new shape recompiles (``jax.jit``'s own cache). Models whose static parts are not hashable use
# ``_fit_jit``.
# ---------------------------------------------------------------------------------------------------------------

_CACHE_LIMIT = 128
# XLA compiler options of top-level fitting programs; the `jreml` command sets LLVM's optimisation level 0
# while it runs (see ``compiler_options``).
_COMPILER_OPTIONS: dict = {}
_JITTED: dict = {}  # (treedef, static leaves, option key) -> _Jitted
_MODEL_INFO: dict = {}  # (treedef, static leaves, leaf shapes) -> (shape, num_free_params, em_plan, mme q)


def clear_caches() -> None:
    """Drop every compiled fitting program (jreml's own caches and JAX's).

    Each compiled XLA CPU program holds memory mappings; a process that compiles thousands of distinct programs
    can reach the kernel's map limit (vm.max_map_count, 65,530 by default) and abort inside XLA. Long-running
    processes that fit many differently shaped models (a test suite) should call this now and then.
    """
    _JITTED.clear()
    _MODEL_INFO.clear()
    jax.clear_caches()


@contextlib.contextmanager
def compiler_options(options: dict):
    """XLA compiler options (e.g. ``{"xla_backend_optimization_level": 0}``) for the top-level fitting programs
    compiled inside the block; the previous options are restored on exit.

    For one-shot processes such as the ``jreml`` command, where compile time dominates: a program compiled at
    LLVM level 0 gives the same results, about a third sooner, and runs slower. Fits traced inside another
    ``jit`` or transform are compiled with their caller and ignore the options.
    """
    previous = dict(_COMPILER_OPTIONS)
    _COMPILER_OPTIONS.clear()
    _COMPILER_OPTIONS.update(options)
    try:
        yield
    finally:
        _COMPILER_OPTIONS.clear()
        _COMPILER_OPTIONS.update(previous)


def _remember(cache: dict, key, value):
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    cache[key] = value
    return value


class _Jitted:
    """``jax.jit`` of ``_fit`` over the array leaves of (model, y, X, θ₀, lb, ub, tolerances, η, limits)."""

    def __init__(self, treedef, static, options):
        self.treedef = treedef
        self.static = static  # ((position, leaf), ...) of the model's non-array leaves
        self.options = options
        self.n_leaves = treedef.num_leaves
        self.out = None  # (treedef, ((position, leaf), ...), number of leaves) of the result, set while tracing
        self.fn = jax.jit(self._traced)
        # jax.jit accepts compiler options only on a top-level (not nested) call: a second wrapper for those.
        self.fn_top = jax.jit(self._traced, compiler_options=dict(_COMPILER_OPTIONS)) if _COMPILER_OPTIONS else None

    def _merge(self, dynamic, static, n):
        leaves = [None] * n
        for position, leaf in static:
            leaves[position] = leaf
        it = iter(dynamic)
        for i in range(n):
            if leaves[i] is None:
                leaves[i] = next(it)
        return leaves

    def _traced(self, dynamic, y, X, theta0, lb, ub, tolerances, eta, limits, pattern):
        model = self.treedef.unflatten(self._merge(dynamic, self.static, self.n_leaves))
        result = _fit(model, y, X, theta0, lb, ub, tolerances, eta, limits, pattern, **dict(self.options))
        leaves, treedef = jax.tree_util.tree_flatten(result)
        arrays, static = [], []
        for i, leaf in enumerate(leaves):
            if eqx.is_array(leaf):
                arrays.append(leaf)
            else:
                static.append((i, leaf))
        self.out = (treedef, tuple(static), len(leaves))
        return arrays

    def __call__(self, dynamic, *args):
        nested = any(_is_traced(leaf) for leaf in jax.tree_util.tree_leaves((dynamic, args)))
        arrays = (self.fn if nested or self.fn_top is None else self.fn_top)(dynamic, *args)
        treedef, static, n = self.out
        return treedef.unflatten(self._merge(arrays, static, n))


def _split_model(model):
    """(treedef, static leaves, array leaves, structure key) of a model; None if the static part is unhashable."""
    leaves, treedef = jax.tree_util.tree_flatten(model)
    dynamic, static, shapes = [], [], []
    for i, leaf in enumerate(leaves):
        if eqx.is_array(leaf):
            dynamic.append(leaf)
            shapes.append((np.shape(leaf), leaf.dtype))
        else:
            static.append((i, leaf))
    static = tuple(static)
    try:
        hash((treedef, static))
    except TypeError:
        return None
    return treedef, static, dynamic, tuple(shapes)


def _mme_q(model):
    """Number of random effects q when the MME back end can evaluate the model, else None."""
    structure = mme_structure(model)
    return None if structure is None else structure.q


def _equations_form(model):
    """(q or None as ``_mme_q``, whether the model has the blocked form of the sparse back end)."""
    q = _mme_q(model)
    return q, q is not None and sparse_structure(model) is not None


def _model_info(model, split):
    """(shape, num_free_params, em_plan, ``_equations_form``) of the model, cached per structure and leaf shapes."""
    if split is None:
        return model.shape, model.num_free_params, model.em_plan(), _equations_form(model)
    treedef, static, _, shapes = split
    key = (treedef, static, shapes)
    info = _MODEL_INFO.get(key)
    if info is None:
        info = (tuple(model.shape), model.num_free_params, model.em_plan(), _equations_form(model))
        info = _remember(_MODEL_INFO, key, info)
    return info


# ---------------------------------------------------------------------------------------------------------------
# Second tries after a fit (``newton_fallback``, ``restart_edge``): decided in numpy on the first fit's results,
# for one fit (``estimate``) or a batch of them (``refine_batch``, used by ``fit_batch`` and ``bootstrap``).
# ---------------------------------------------------------------------------------------------------------------

#: Algorithms whose information leaves out curvature that Newton–Raphson's observed information has.
NEWTON_FALLBACK = ("ai", "fisher")
#: Their ends that Newton–Raphson continues: a stall, or a slow crawl that used up ``max_iter`` (linear convergence
#: along a ridge of ℓ, which the missing curvature also causes).
NEWTON_CONTINUES = (STALLED, MAX_ITER)
#: A log-Cholesky G is reset to this fraction of the OLS residual variance (times I) for the restart.
RESTART_VARIANCE = 0.1


def _rounding(loglik):
    loglik = np.asarray(loglik, dtype=float)
    return 8 * np.finfo(loglik.dtype).eps * (1 + np.abs(loglik))


def keep_newton(loglik, newton_loglik):
    """Whether the Newton continuation is kept: its ℓ is not lower than the first fit's (within rounding)."""
    return np.asarray(newton_loglik) >= np.asarray(loglik) - _rounding(loglik)


def needs_restart(model, algorithm_name: str, status, at_boundary):
    """Fits to start again (``restart_edge``): the model has a log-Cholesky G and the fit ended with a zero diagonal
    of L or without converging (not for an invalid start, nor for EM). Batched: a mask over the leading axis."""
    blocks = model.cholesky_blocks
    status = np.asarray(status)
    if not blocks or algorithm_name == "em":
        return np.zeros(status.shape, bool)
    diagonals = [start + i * (i + 1) // 2 + i for start, m in blocks for i in range(m)]
    at_edge = np.any(np.asarray(at_boundary)[..., diagonals], axis=-1)
    return (at_edge | (status != CONVERGED)) & (status != INVALID_START)


def restart_theta(model, theta, Y, X, observed=None):
    """θ with every log-Cholesky block of the model reset to G = 0.1·σ²_OLS·I (σ²_OLS of each response in Y
    (T, n), on its ``observed`` rows (T, n) where given): (T, k), in θ's dtype."""
    theta = np.array(theta, copy=True).reshape(len(Y), -1)
    Y, X = np.asarray(Y, dtype=float), np.asarray(X, dtype=float)
    if observed is None:
        coef, *_ = np.linalg.lstsq(X, Y.T, rcond=None)
        resid = Y.T - X @ coef
        scale = np.sum(resid**2, axis=0) / (X.shape[0] - X.shape[1])
    else:
        scale = np.empty(len(Y))
        for t, rows in enumerate(np.asarray(observed, bool)):
            coef, *_ = np.linalg.lstsq(X[rows], Y[t, rows], rcond=None)
            resid = Y[t, rows] - X[rows] @ coef
            scale[t] = resid @ resid / (rows.sum() - X.shape[1])
    log_sd = 0.5 * np.log(RESTART_VARIANCE * np.where(scale > 0, scale, 1.0))
    for start, m in model.cholesky_blocks:
        rows, cols = np.tril_indices(m)
        theta[:, start : start + rows.size] = np.where(rows == cols, log_sd[:, None], 0.0)
    return theta


def reflected_theta(model, theta, at_boundary):
    """θ (T, k) with the entries below the diagonal negated in every log-Cholesky column whose diagonal is at its
    bound, and which rows that changed. G = Σ_j c_j c_jᵀ does not change when a column with a zero diagonal changes
    sign, but the first-order effect of raising that diagonal does: a correlation of the wrong sign at a zero
    variance, which a log-scale step cannot cross, becomes one of the right sign."""
    theta = np.array(theta, copy=True)
    at_boundary = np.asarray(at_boundary)
    changed = np.zeros(theta.shape[0], bool)
    for start, m in model.cholesky_blocks:
        for j in range(m - 1):
            below = [start + i * (i + 1) // 2 + j for i in range(j + 1, m)]
            flip = at_boundary[:, start + j * (j + 1) // 2 + j] & np.any(theta[:, below] != 0, axis=1)
            theta[:, below] = np.where(flip[:, None], -theta[:, below], theta[:, below])
            changed |= flip
    return theta, changed


def keep_restart(loglik, status, other_loglik, other_status):
    """Whether the restarted fit is kept: it converged, and to a higher ℓ, or to the same ℓ (within rounding) where
    the first fit had not converged."""
    loglik, other_loglik = np.asarray(loglik), np.asarray(other_loglik)
    gain, rounding = other_loglik - loglik, _rounding(loglik)
    converged = np.asarray(other_status) == CONVERGED
    return converged & ((gain > rounding) | ((np.asarray(status) != CONVERGED) & (gain > -rounding)))


#: Fields ``refine_batch`` reads and merges.
BATCH_FIELDS = ("theta", "natural_params", "beta", "loglik", "converged", "n_iter", "status", "at_boundary")


def refine_batch(
    run, results: dict, model, algorithm_name: str, Y, X, *, observed=None, newton_fallback=True, restart_edge=True
):
    """The second tries of ``estimate`` for a batch of fits of one model: ``results`` maps field names (at least
    ``BATCH_FIELDS``) to arrays with a leading response axis (T, ...); ``run(index, theta0, algorithm)`` refits the
    responses ``index`` from ``theta0`` (len(index), k) and returns such a dict for them; ``observed`` (T, n) marks
    each response's observed rows when the fits were of ``ObservedRows(model, ·)``. Returns the merged dict: each
    response's fit is the one ``estimate`` would keep on its own."""
    results = {key: np.array(value, copy=True) for key, value in results.items()}

    def continue_with_newton(fits: dict, index):
        """Newton continuations of the fits in ``fits`` (those of responses ``index``) that stalled or ran out of
        iterations, merged in place where kept, their iterations added to the first fit's (as ``estimate`` does)."""
        if not (newton_fallback and algorithm_name in NEWTON_FALLBACK):
            return
        stalled = np.flatnonzero(np.isin(np.asarray(fits["status"]), NEWTON_CONTINUES))
        if not stalled.size:
            return
        newton = run(index[stalled], fits["theta"][stalled], "newton")
        keep = keep_newton(fits["loglik"][stalled], newton["loglik"])
        first_iter = fits["n_iter"][stalled[keep]].copy()
        for key, value in newton.items():
            if key in fits:
                fits[key][stalled[keep]] = np.asarray(value)[keep]
        fits["n_iter"][stalled[keep]] += first_iter

    continue_with_newton(results, np.arange(len(results["status"])))

    def restart(index, theta0):
        other = {key: np.array(value, copy=True) for key, value in run(index, theta0, algorithm_name).items()}
        continue_with_newton(other, index)
        keep = keep_restart(results["loglik"][index], results["status"][index], other["loglik"], other["status"])
        for key, value in other.items():
            if key in results:
                results[key][index[keep]] = value[keep]

    if restart_edge:
        index = np.flatnonzero(needs_restart(model, algorithm_name, results["status"], results["at_boundary"]))
        if index.size:
            rows = None if observed is None else np.asarray(observed)[index]
            restart(index, restart_theta(model, results["theta"][index], np.asarray(Y)[index], X, rows))
            reflected, changed = reflected_theta(model, results["theta"][index], results["at_boundary"][index])
            if changed.any():
                restart(index[changed], reflected[changed])
    return results


def _trim_history(result: FitResult, rows: int) -> FitResult:
    """``result`` with its history cut to ``rows`` = max_iter + 1 rows (the program's history has
    ``history_rows(max_iter)``). Concrete arrays through NumPy and one ``device_put`` (0.1 ms): slicing jax arrays
    eagerly compiles a small program for each new shape, which a new max_iter should not."""
    history = result.history
    if history.loglik.shape[0] == rows:
        return result
    if any(_is_traced(a) for a in jax.tree.leaves(history)):
        return dataclasses.replace(result, history=jax.tree.map(lambda a: a[:rows], history))
    return dataclasses.replace(result, history=jax.device_put(jax.tree.map(lambda a: np.asarray(a)[:rows], history)))


def _as_input(x, name: str):
    """Like ``as_float_array`` without a copy or dispatch where ``x`` already has jreml's float dtype."""
    dtype = float_dtype()
    if isinstance(x, jax.Array):  # includes tracers
        return x if x.dtype == dtype else as_float_array(x, name)
    if isinstance(x, np.ndarray) and x.dtype.kind in "biuf":
        return x if x.dtype == dtype else x.astype(dtype)
    return as_float_array(x, name)


def _report_timing(result, timing, args, kwargs) -> bool:
    """After an outermost ``estimate`` call: print its timing with ``verbose``; keep it unless traced."""
    if _is_traced(result.loglik):
        return False
    if kwargs.get("verbose", 0):
        print(f"jreml.estimate: {timing}")
    return True


@timed(_report_timing)
def estimate(
    v_builder,
    y: Float[Array, " n"],
    X: Float[Array, "n p"] | None = None,
    theta0: Float[Array, " k"] | None = None,
    *,
    method: str = "reml",
    algorithm="ai",
    derivatives: str = "auto",
    dv_builder=None,
    max_iter: int = 200,
    eta: float = 1.0,
    lb: Float[Array, " k"] | None = None,
    ub: Float[Array, " k"] | None = None,
    tol_score: float = 1e-6,
    tol_delta: float = 1e-6,
    tol_loglik: float = 1e-8,
    check_score: bool = True,
    check_delta: bool = True,
    check_loglik: bool = True,
    min_iter: int = 2,
    max_halvings: int = 20,
    em_fallback: bool = True,
    verbose: int = 0,
    throw: bool = True,
    backend: str = "auto",
    newton_fallback: bool = True,
    restart_edge: bool = True,
) -> FitResult:
    """Fit y ~ N(Xβ, V(θ)) by REML (default) or ML; one jit-compiled ``lax.while_loop``.

    Args:
        v_builder: a covariance module (``jreml.covariance``) or any function θ ↦ V (then ``theta0`` is
            required; it is wrapped in ``CustomMatrix``).
        y: response (n,). X: fixed-effects design (n, p) of full column rank; default an intercept.
        theta0: starting θ (k,). Default: the OLS residual variance split evenly over the model's terms.
        method: "reml" or "ml". algorithm: "ai" (average information, default), "fisher", "newton", "em",
            or "hybrid" (a few optax L-BFGS steps on the profiled objective, then AI; see ``hybrid_estimate``).
        derivatives: "auto" | "jacfwd" | "jacrev" | "analytic" (with ``dv_builder(theta) -> (k, n, n)``).
        max_iter, eta: iteration cap and initial step length of θ ← θ + η·I⁻¹s (halved up to
            ``max_halvings`` times while ℓ would decrease or V is not PD).
        lb, ub: bounds on θ (default: variances ≥ 1e-14 × the residual variance, otherwise free).
        tol_score, tol_delta, tol_loglik / check_*: convergence needs every switched-on test to hold, after
            at least ``min_iter`` iterations: ‖projected score‖₂ < tol_score, max|Δθ| < tol_delta,
            |Δℓ| < tol_loglik.
        em_fallback: for variance-component models, try an EM-REML step when step-halving fails.
        newton_fallback: when average-information or Fisher scoring stalls (no step increases ℓ while the
            convergence tests fail) or reaches ``max_iter`` without converging, go on with Newton–Raphson on the
            observed information from where it stopped, for up to ``max_iter`` more iterations (one compiled program
            per shape, whatever the first fit took), and keep that fit when its ℓ is not lower (it then reports
            ``algorithm="ai+newton"`` and the iterations of both, up to 2·``max_iter``; ``newton_fallback=False``
            keeps to ``max_iter``). Their information leaves out the curvature of a nonlinear parametrization, which
            a singular fit with a log-Cholesky G needs, and without it they can stall, or crawl along a ridge of ℓ.
            Only in calls with concrete arrays: under ``jit``/``vmap`` the first fit is returned as it is.
        restart_edge: for models with a log-Cholesky G (``UnstructuredMatrix``), when the fit ends with a zero
            diagonal of L (a singular G) or without converging, fit again from θ̂ with every such G reset to
            0.1·σ²_OLS·I, then from the best fit so far with the columns of L at a zero diagonal negated
            (``reflected_theta``), and keep the best fit (lme4's ``restart_edge``). At a singular G the log-Cholesky
            parametrization has stationary points that are not optima (a correlation of the wrong sign that can
            change sign only through a zero variance; L = 0), where a gradient-based fit can stop. Concrete
            calls only, as ``newton_fallback``.
        verbose: 0 silent, 1 the iteration counter's last line, 2 the per-iteration table, then a line with the
            compile and run seconds (``jreml.last_timing()``). Printed from the history after the fit, so that
            verbose compiles nothing new (nothing is printed under ``jit``/``vmap``).
        throw: raise (``eqx.error_if``) when the start is invalid; otherwise report it in ``status``.
        backend: "auto" (default), "dense", "mme" or "sparse" (see :func:`jreml.select_backend`). The
            mixed-model equations evaluate V = Σ_j Z_j G_j Z_jᵀ + σ²I (fixed Z_j, q random effects in all) without
            the n×n V: "mme" with dense q×q factors, O(nq² + q³); "sparse" with the blocked factor of lme4-style
            terms (a diagonal block for the term with most levels, a sparse cross block, a dense Schur block for
            the rest; linear in n for one term). "auto" uses "sparse" for lme4-style terms with q ≥ 200, "mme" for
            other such models when q < n; an explicit "mme" / "sparse" whenever the model has that form (an error
            otherwise). All give the same likelihood; algorithm="fisher" and derivatives other than "auto"
            always run dense.

    Returns:
        :class:`FitResult`. Works under ``jax.vmap`` over ``y`` (or ``X``, ``theta0``): one compilation.
    """
    reml = check_method(method)
    algo = as_algorithm(algorithm)
    if derivatives not in DERIVATIVES:
        raise ValueError(f"derivatives must be one of {DERIVATIVES}, got {derivatives!r}")
    y = _as_input(y, "y")
    if X is None:
        X = np.ones((y.shape[0], 1), y.dtype)
    X = _as_input(X, "X")
    model = as_covariance(v_builder, theta0, y.shape[0])
    split = _split_model(model)
    model_leaves = split[2] if split is not None else jax.tree_util.tree_leaves(model)
    traced = any(_is_traced(a) for a in (y, X, theta0, lb, ub, eta, *model_leaves))
    shape, k, em_plan, (mme_q, blocked) = _model_info(model, split)
    if shape[0] != shape[1]:
        raise ValueError(f"the covariance model must be square, got shape {shape}")
    _check_data(y, X, shape[0], model)
    if observed_mask(model) is not None and derivatives == "analytic":
        raise ValueError('derivatives="analytic" does not apply to ObservedRows: use derivatives="auto"')
    if theta0 is not None:
        theta0 = _as_input(theta0, "theta0")
        if theta0.shape != (k,):
            raise ValueError(f"theta0 must have shape ({k},) for this model, got {theta0.shape}")
    bounds = []
    for name, b in (("lb", lb), ("ub", ub)):
        if b is not None:
            b = jnp.broadcast_to(as_float_array(b, name), (k,))
        bounds.append(b)
    if algo.name == "em" and em_plan is None:
        raise ValueError(
            'algorithm="em" needs a variance-component model V = sum of variance * known matrix '
            "(ScalarMatrix, FixedMatrix, CovariancePropagation of a fixed Z with one of those)"
        )
    if not em_fallback and algo.name != "em":
        em_plan = None
    if max_iter < 0 or max_halvings < 1 or min_iter < 0:
        raise ValueError("max_iter and min_iter must be >= 0 and max_halvings >= 1")
    resolved_backend = choose(backend, mme_q, shape[0], algo.information, derivatives, blocked=blocked).name
    mme_blocks = None
    if resolved_backend == "mme" and not any(_is_traced(a) for a in model_leaves):
        mme_blocks = static_block_diagonal(mme_structure(model))
    pattern = None
    if resolved_backend == "sparse":
        blocked_form = sparse_structure(model)
        check_memory(blocked_form, X.shape[1], k)
        pattern = sparse_pattern(blocked_form)  # None under a transform of the model: then L₂₁ is dense
    options = (
        ("reml", reml),
        ("algorithm", algo),
        ("derivatives", derivatives),
        ("dv_builder", dv_builder),
        ("checks", (bool(check_score), bool(check_delta), bool(check_loglik))),
        ("em_plan", em_plan),
        # max_iter, min_iter, max_halvings, the tolerances and η are run-time values (``limits`` and the arrays
        # below): only the history's size is compiled in, in buckets of max_iter (``history_rows``).
        ("history_rows", history_rows(int(max_iter))),
        ("backend", resolved_backend),
        # Decided on the concrete Z so that the program holds one MME path, not both behind a lax.cond.
        ("mme_blocks", mme_blocks),
        # Concrete calls check an invalid start here, after the call: a program with eqx.error_if's host
        # callback cannot be stored in JAX's persistent compilation cache. Under a transform (vmap, grad)
        # the check stays inside the program.
        ("throw", bool(throw) and traced),
    )
    dtype = y.dtype
    tolerances = np.asarray([tol_score, tol_delta, tol_loglik], dtype)
    eta = np.asarray(eta, dtype)
    limits = np.asarray([max_iter, min_iter, max_halvings], jax.dtypes.canonicalize_dtype(np.int64))
    jitted = None
    if split is not None:
        treedef, static, dynamic, _ = split
        key = (treedef, static, options, theta0 is None, bounds[0] is None, bounds[1] is None)
        key += (tuple(sorted(_COMPILER_OPTIONS.items())),)
        try:
            jitted = _JITTED.get(key)
            if jitted is None:
                jitted = _remember(_JITTED, key, _Jitted(treedef, static, options))
        except TypeError:  # an unhashable option (e.g. a dv_builder that is not hashable)
            jitted = None
    try:
        if jitted is not None:
            result = jitted(dynamic, y, X, theta0, bounds[0], bounds[1], tolerances, eta, limits, pattern)
        else:
            result = _fit_jit(
                model, y, X, theta0, bounds[0], bounds[1], tolerances, eta, limits, pattern, **dict(options)
            )
        status = None if _is_traced(result.status) else int(result.status)
    except JaxRuntimeError as err:
        if jitted is not None and STATUS_MESSAGES[INVALID_START] in str(err):
            raise RuntimeError(f"jreml.estimate: {STATUS_MESSAGES[INVALID_START]}") from None
        raise
    if throw and status == INVALID_START:
        raise RuntimeError(f"jreml.estimate: {STATUS_MESSAGES[INVALID_START]}")
    result = _trim_history(result, int(max_iter) + 1)
    if status is not None:
        print_history(result.history, int(result.n_iter), verbose, max_iter)
        if verbose == 1:
            print()
    concrete = status is not None and not traced  # the second tries below decide in Python on the first fit
    options = dict(
        method=method, derivatives=derivatives, dv_builder=dv_builder, max_iter=max_iter, eta=eta, lb=lb, ub=ub,
        tol_score=tol_score, tol_delta=tol_delta, tol_loglik=tol_loglik, check_score=check_score,
        check_delta=check_delta, check_loglik=check_loglik, min_iter=min_iter, max_halvings=max_halvings,
        em_fallback=em_fallback, verbose=verbose, throw=False, backend=backend,
    )  # fmt: skip
    if concrete and newton_fallback and status in NEWTON_CONTINUES and algo.name in NEWTON_FALLBACK:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the fit that is kept warns below
            newton = estimate(model, y, X, result.theta, algorithm="newton", newton_fallback=False, **options)
        if keep_newton(result.loglik, newton.loglik):
            result = dataclasses.replace(newton, n_iter=newton.n_iter + result.n_iter, algorithm=f"{algo.name}+newton")
            status = int(result.status)
    if concrete and restart_edge and needs_restart(model, algo.name, result.status, result.at_boundary):
        for kind in ("reset", "reflect"):
            if kind == "reset":
                mask = observed_mask(model)
                observed = None if mask is None else np.asarray(mask)[None]
                start = restart_theta(model, result.theta, y[None], X, observed)[0]
            else:
                reflected, changed = reflected_theta(model, np.asarray(result.theta)[None], result.at_boundary[None])
                if not changed[0]:
                    continue
                start = reflected[0]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                other = estimate(
                    model, y, X, start.astype(y.dtype), algorithm=algorithm, newton_fallback=newton_fallback,
                    restart_edge=False, **options,
                )  # fmt: skip
            if keep_restart(result.loglik, result.status, other.loglik, other.status):
                result, status = other, int(other.status)
    if status == MAX_ITER:
        warnings.warn(f"jreml.estimate: {STATUS_MESSAGES[MAX_ITER]} ({max_iter})", stacklevel=3)  # past ``timed``
    return result
