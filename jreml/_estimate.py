"""``estimate``: fit θ, β of y ~ N(Xβ, V(θ)) by REML or ML in one compiled program."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.errors import JaxRuntimeError
from jaxtyping import Array, Float

from ._backends.configure import backend_for, host_configuration
from ._backends.select import choose, equations_form
from ._config import as_float_array
from ._covariance.observed import observation_count, observed_data
from ._covariance.queries import as_covariance, observed_mask, rescale_theta
from ._likelihood import DERIVATIVES, check_method
from ._problem import as_input, check_data, is_traced, ols_residual_variance, stop_gradient
from ._result import FitResult
from ._solvers import as_algorithm
from ._solvers.base import free_mask, pseudo_inverse
from ._solvers.defaults import BOUNDARY_RELATIVE_VARIANCE, DEFAULTS, SINGULAR_RELATIVE_VARIANCE
from ._solvers.loop import CONVERGED, INVALID_START, MAX_ITER, STATUS_MESSAGES, history_rows, print_history, run
from ._solvers.second_tries import (
    NEWTON_CONTINUES,
    NEWTON_FALLBACK,
    keep_newton,
    keep_restart,
    needs_restart,
    reflected_theta,
    restart_theta,
)
from ._timing import last_timing as last_timing  # re-exported: the timing of the last fit
from ._timing import timed

# Incremented each time the fitting program is traced (tests check that vmap and refits compile once).
TRACE_COUNT = [0]


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
    model_values, y_values, X_values = stop_gradient((model, y, X))
    scale = ols_residual_variance(y_values, X_values, model)
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
    engine = backend_for(
        backend, derivatives=derivatives, dv_builder=dv_builder, block_diagonal=mme_blocks, pattern=pattern
    )
    # ZᵀZ, ZᵀX, … once, for the loop (values only) and the final differentiable evaluation.
    state = engine.prepare(model, y, X)
    # The loop runs on y/s (s² the OLS residual variance) with θ moved to match, so that its tests and step
    # limits see the same numbers whatever y's units (off-diagonal Cholesky entries carry them).
    unit = _UnitScale.of(model_values, scale)
    y_loop = y_values if unit is None else y_values / jnp.sqrt(scale)
    loop_state = state if unit is None else engine.prepare(model_values, y_loop, X_values)
    to_loop = (lambda t: t) if unit is None else unit.to_unit  # noqa: E731
    out = run(
        model_values,
        y_loop,
        X_values,
        to_loop(jax.lax.stop_gradient(theta0).astype(dtype)),
        to_loop(lb.astype(dtype)),
        to_loop(ub.astype(dtype)),
        to_loop(snap.astype(dtype)),
        scale_mask,
        powers.astype(dtype),
        tolerances,
        eta,
        reml=reml,
        algorithm=algorithm,
        backend=engine,
        state=stop_gradient(loop_state),
        max_iter=limits[0],
        max_halvings=limits[2],
        checks=checks,
        min_iter=limits[1],
        em_plan=em_plan,
        history_rows=history_rows,
    )
    history, theta, final_score = out.history, out.theta, out.evaluation.score
    if unit is not None:
        n_eff = observation_count(model, X.shape[0]) - (X.shape[1] if reml else 0)
        history = unit.history_back(history, out.n_iter, n_eff)
        theta, final_score = unit.from_unit(theta), unit.slope * final_score
    if throw:
        theta = eqx.error_if(theta, out.status == INVALID_START, STATUS_MESSAGES[INVALID_START])
    at_boundary = scale_mask & (theta <= jnp.maximum(singular_threshold, lb))
    free = free_mask(theta, final_score, lb, ub) & ~at_boundary
    theta, c, final = engine.fitted(theta, free, model, y, X, state, reml=reml)
    if unit is not None:  # the last iterate's β̂ and ℓ as the final evaluation gives them (not rescaled ones)
        history = eqx.tree_at(
            lambda h: (h.beta, h.loglik),
            history,
            (history.beta.at[out.n_iter].set(c.beta), history.loglik.at[out.n_iter].set(c.loglik)),
        )
    p = X.shape[1]
    chol_inv = jax.scipy.linalg.solve_triangular(c.chol_xvx, jnp.eye(p, dtype=dtype), lower=True)
    vcov_beta = chol_inv.T @ chol_inv
    information = jnp.where(c.ok, final.information, 0.0)
    vcov_theta = pseudo_inverse(information)
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
        history=history,
        p_y=c.p_y,
        model=model,
        y=y,
        X=X,
        method="reml" if reml else "ml",
        algorithm=algorithm.name,
        param_names=model.param_names,
    )


class _UnitScale(NamedTuple):
    """θ ↦ θ' with V(θ')·c = V(θ), c = s² the OLS residual variance (``rescale_theta``: log-variances shift by
    −log c / power, Cholesky entries below the diagonal scale by c^(-1/2)): the loop's coordinates for y/s. Every
    entry of θ' is an affine function of its entry of θ, with slope ``slope`` = ∂θ'/∂θ."""

    log_c: Array
    model: object
    slope: Array

    @classmethod
    def of(cls, model, scale):
        """The map for ``model``, or None for a model that cannot be rescaled (kernels with a length-scale, custom
        matrices): those run on y as it is."""
        log_c = jnp.log(scale)
        zero = jnp.zeros(model.num_free_params, scale.dtype)
        try:
            slope = rescale_theta(model, zero + 1.0, -log_c) - rescale_theta(model, zero, -log_c)
        except ValueError:
            return None
        return cls(log_c, model, slope)

    def to_unit(self, theta):
        return rescale_theta(self.model, theta, -self.log_c)

    def from_unit(self, theta):
        return rescale_theta(self.model, theta, self.log_c)

    def history_back(self, history, n_iter, n_eff):
        """The loop's history in y's units: θ, β = s·β', ℓ = ℓ' − n_eff·log s (n_eff = n − p for REML, n for ML),
        score J·s', information J·I'·J, steps Δθ'/J (J = ``slope``); rows after ``n_iter`` stay zero."""
        J = self.slope
        kept = jnp.arange(history.loglik.shape[0]) <= n_iter
        s = jnp.exp(0.5 * self.log_c)

        def rows(values):
            return jnp.where(kept.reshape((-1,) + (1,) * (values.ndim - 1)), values, 0.0)

        return eqx.tree_at(
            lambda h: (h.theta, h.beta, h.loglik, h.score, h.information, h.step),
            history,
            (
                rows(jax.vmap(self.from_unit)(history.theta)),
                rows(s * history.beta),
                rows(history.loglik - n_eff * 0.5 * self.log_c),
                rows(J * history.score),
                rows(J[:, None] * history.information * J[None, :]),
                rows(history.step / J),
            ),
        )


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
        nested = any(is_traced(leaf) for leaf in jax.tree_util.tree_leaves((dynamic, args)))
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


def _model_info(model, split):
    """(shape, num_free_params, em_plan, ``equations_form``) of the model, cached per structure and leaf shapes."""
    if split is None:
        return model.shape, model.num_free_params, model.em_plan(), equations_form(model)
    treedef, static, _, shapes = split
    key = (treedef, static, shapes)
    info = _MODEL_INFO.get(key)
    if info is None:
        info = (tuple(model.shape), model.num_free_params, model.em_plan(), equations_form(model))
        info = _remember(_MODEL_INFO, key, info)
    return info


def _trim_history(result: FitResult, rows: int) -> FitResult:
    """``result`` with its history cut to ``rows`` = max_iter + 1 rows (the program's history has
    ``history_rows(max_iter)``). Concrete arrays through NumPy and one ``device_put`` (0.1 ms): slicing jax arrays
    eagerly compiles a small program for each new shape, which a new max_iter should not."""
    history = result.history
    if history.loglik.shape[0] == rows:
        return result
    if any(is_traced(a) for a in jax.tree.leaves(history)):
        return dataclasses.replace(result, history=jax.tree.map(lambda a: a[:rows], history))
    return dataclasses.replace(result, history=jax.device_put(jax.tree.map(lambda a: np.asarray(a)[:rows], history)))


def _report_timing(result, timing, args, kwargs) -> bool:
    """After an outermost ``estimate`` call: print its timing with ``verbose``; keep it unless traced."""
    if is_traced(result.loglik):
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
    max_iter: int = DEFAULTS.max_iter,
    eta: float = DEFAULTS.eta,
    lb: Float[Array, " k"] | None = None,
    ub: Float[Array, " k"] | None = None,
    tol_score: float = DEFAULTS.tol_score,
    tol_delta: float = DEFAULTS.tol_delta,
    tol_loglik: float = DEFAULTS.tol_loglik,
    check_score: bool = True,
    check_delta: bool = True,
    check_loglik: bool = True,
    min_iter: int = DEFAULTS.min_iter,
    max_halvings: int = DEFAULTS.max_halvings,
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
    y = as_input(y, "y")
    if X is None:
        X = np.ones((y.shape[0], 1), y.dtype)
    X = as_input(X, "X")
    model = as_covariance(v_builder, theta0, y.shape[0])
    split = _split_model(model)
    model_leaves = split[2] if split is not None else jax.tree_util.tree_leaves(model)
    traced = any(is_traced(a) for a in (y, X, theta0, lb, ub, eta, *model_leaves))
    shape, k, em_plan, (mme_q, blocked) = _model_info(model, split)
    if shape[0] != shape[1]:
        raise ValueError(f"the covariance model must be square, got shape {shape}")
    check_data(y, X, shape[0], model)
    if observed_mask(model) is not None and derivatives == "analytic":
        raise ValueError('derivatives="analytic" does not apply to ObservedRows: use derivatives="auto"')
    if theta0 is not None:
        theta0 = as_input(theta0, "theta0")
        if theta0.shape != (k,):
            raise ValueError(f"theta0 must have shape ({k},) for this model, got {theta0.shape}")
    bounds = []
    for name, b in (("lb", lb), ("ub", ub)):
        if b is not None:
            b = jnp.broadcast_to(as_float_array(b, name), (k,))
        bounds.append(b)
    if algo.em_steps and em_plan is None:
        raise ValueError(
            'algorithm="em" needs a variance-component model V = sum of variance * known matrix '
            "(ScalarMatrix, FixedMatrix, CovariancePropagation of a fixed Z with one of those)"
        )
    if not em_fallback and not algo.em_steps:
        em_plan = None
    if max_iter < 0 or max_halvings < 1 or min_iter < 0:
        raise ValueError("max_iter and min_iter must be >= 0 and max_halvings >= 1")
    resolved_backend = choose(backend, mme_q, shape[0], algo.information, derivatives, blocked=blocked).name
    model_traced = any(is_traced(a) for a in model_leaves)
    mme_blocks, pattern = host_configuration(resolved_backend, model, X.shape[1], model_traced)
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
        status = None if is_traced(result.status) else int(result.status)
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
