"""``estimate``: fit θ, β of y ~ N(Xβ, V(θ)) by REML or ML in one compiled program."""

from __future__ import annotations

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._config import as_float_array
from ._covariance.base import AbstractCovariance
from ._covariance.compose import CustomMatrix
from ._likelihood import DERIVATIVES, check_method, core, derivatives_at
from ._result import FitResult
from ._solvers.ai import AI
from ._solvers.base import AbstractAlgorithm
from ._solvers.em import EM
from ._solvers.fisher import Fisher
from ._solvers.loop import CONVERGED, INVALID_START, MAX_ITER, STATUS_MESSAGES, run
from ._solvers.newton import Newton

ALGORITHMS = {"ai": AI, "fisher": Fisher, "newton": Newton, "em": EM}

#: Lower bound of a variance, relative to the data's residual variance (θ is clipped there).
BOUNDARY_RELATIVE_VARIANCE = 1e-14
#: A variance below this fraction of the residual variance is reported as singular (lme4: relative SD 1e-4).
SINGULAR_RELATIVE_VARIANCE = 1e-8

# Incremented each time the fitting program is traced (tests check that vmap and refits compile once).
TRACE_COUNT = [0]


def _as_algorithm(algorithm) -> AbstractAlgorithm:
    if isinstance(algorithm, AbstractAlgorithm):
        return algorithm
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {tuple(ALGORITHMS)}, got {algorithm!r}")
    return ALGORITHMS[algorithm]()


def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _check_data(y, X, n_model: int):
    if y.ndim != 1:
        raise ValueError(f"y must be a 1-D response vector, got shape {y.shape}")
    n = y.shape[0]
    if X.ndim != 2 or X.shape[0] != n:
        raise ValueError(f"X must be a 2-D design matrix with {n} rows (len(y)), got shape {X.shape}")
    if n_model != n:
        raise ValueError(f"the covariance model is {n_model}x{n_model} but y has {n} observations")
    if X.shape[1] >= n:
        raise ValueError(f"X has {X.shape[1]} columns for {n} observations: REML needs n > p")
    if not _is_traced(y):
        bad = np.flatnonzero(~np.isfinite(np.asarray(y)))
        if bad.size:
            raise ValueError(f"y has non-finite values (NaN/inf) at rows {bad[:10].tolist()}")
    if not _is_traced(X):
        Xn = np.asarray(X)
        rows, cols = np.nonzero(~np.isfinite(Xn))
        if rows.size:
            where = list(zip(rows[:10].tolist(), cols[:10].tolist(), strict=True))
            raise ValueError(f"X has non-finite values at (row, column) {where}")
        rank = np.linalg.matrix_rank(Xn)
        if rank < Xn.shape[1]:
            raise ValueError(f"X is rank deficient (rank {rank} < {Xn.shape[1]} columns); drop aliased columns first")


def _ols_residual_variance(y, X):
    beta, *_ = jnp.linalg.lstsq(X, y)
    resid = y - X @ beta
    n, p = X.shape
    s2 = resid @ resid / (n - p)
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
    *,
    reml,
    algorithm,
    derivatives,
    dv_builder,
    max_iter,
    max_halvings,
    checks,
    min_iter,
    em_plan,
    verbose,
    throw,
) -> FitResult:
    TRACE_COUNT[0] += 1
    dtype = y.dtype
    scale = _ols_residual_variance(y, X)
    scale_mask = jnp.asarray(model.scale_mask, dtype=bool)
    if theta0 is None:
        theta0 = model.default_theta(scale)
    boundary = model.default_theta(scale * BOUNDARY_RELATIVE_VARIANCE)
    default_lb = jnp.where(scale_mask, boundary, -jnp.inf)
    lb = default_lb if lb is None else lb
    ub = jnp.full_like(theta0, jnp.inf) if ub is None else ub

    singular_threshold = model.default_theta(scale * SINGULAR_RELATIVE_VARIANCE)
    snap = jnp.where(scale_mask, singular_threshold, -jnp.inf)
    out = run(
        model,
        y,
        X,
        theta0.astype(dtype),
        lb.astype(dtype),
        ub.astype(dtype),
        snap.astype(dtype),
        scale_mask,
        tolerances,
        eta,
        reml=reml,
        algorithm=algorithm,
        derivatives=derivatives,
        dv_builder=dv_builder,
        max_iter=max_iter,
        max_halvings=max_halvings,
        checks=checks,
        min_iter=min_iter,
        em_plan=em_plan,
        verbose=verbose,
    )
    theta = out.theta
    if throw:
        theta = eqx.error_if(theta, out.status == INVALID_START, STATUS_MESSAGES[INVALID_START])

    c = core(theta, y, X, model, reml)
    final = derivatives_at(
        theta, y, X, model, c, reml=reml, information="ai", derivatives=derivatives, dv_builder=dv_builder
    )
    p = X.shape[1]
    chol_inv = jax.scipy.linalg.solve_triangular(c.chol_xvx, jnp.eye(p, dtype=dtype), lower=True)
    vcov_beta = chol_inv.T @ chol_inv
    information = jnp.where(c.ok, final.information, 0.0)
    vcov_theta = _pseudo_inverse(information)
    at_boundary = scale_mask & (theta <= jnp.maximum(singular_threshold, lb))
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
) -> FitResult:
    """Fit y ~ N(Xβ, V(θ)) by REML (default) or ML; one jit-compiled ``lax.while_loop``.

    Args:
        v_builder: a covariance module (``jreml.covariance``) or any function θ ↦ V (then ``theta0`` is
            required; it is wrapped in ``CustomMatrix``).
        y: response (n,). X: fixed-effects design (n, p) of full column rank; default an intercept.
        theta0: starting θ (k,). Default: the OLS residual variance split evenly over the model's terms.
        method: "reml" or "ml". algorithm: "ai" (average information, default), "fisher", "newton", "em".
        derivatives: "auto" | "jacfwd" | "jacrev" | "analytic" (with ``dv_builder(theta) -> (k, n, n)``).
        max_iter, eta: iteration cap and initial step length of θ ← θ + η·I⁻¹s (halved up to
            ``max_halvings`` times while ℓ would decrease or V is not PD).
        lb, ub: bounds on θ (default: variances ≥ 1e-14 × the residual variance, otherwise free).
        tol_score, tol_delta, tol_loglik / check_*: convergence needs every switched-on test to hold, after
            at least ``min_iter`` iterations: ‖projected score‖₂ < tol_score, max|Δθ| < tol_delta,
            |Δℓ| < tol_loglik.
        em_fallback: for variance-component models, try an EM-REML step when step-halving fails.
        verbose: 0 silent, 1 progress bar, 2 per-iteration table (host callbacks only when verbose > 0).
        throw: raise (``eqx.error_if``) when the start is invalid; otherwise report it in ``status``.

    Returns:
        :class:`FitResult`. Works under ``jax.vmap`` over ``y`` (or ``X``, ``theta0``): one compilation.
    """
    reml = check_method(method)
    algo = _as_algorithm(algorithm)
    if derivatives not in DERIVATIVES:
        raise ValueError(f"derivatives must be one of {DERIVATIVES}, got {derivatives!r}")
    y = as_float_array(y, "y")
    if X is None:
        X = jnp.ones((y.shape[0], 1), y.dtype)
    X = as_float_array(X, "X")
    if not isinstance(v_builder, AbstractCovariance):
        if theta0 is None:
            raise ValueError("a plain function v_builder needs theta0 (its number of parameters is unknown)")
        v_builder = CustomMatrix(v_builder, int(np.shape(theta0)[0]), shape=(y.shape[0], y.shape[0]))
    model = v_builder
    if model.shape[0] != model.shape[1]:
        raise ValueError(f"the covariance model must be square, got shape {model.shape}")
    _check_data(y, X, model.shape[0])
    k = model.num_free_params
    if theta0 is not None:
        theta0 = as_float_array(theta0, "theta0")
        if theta0.shape != (k,):
            raise ValueError(f"theta0 must have shape ({k},) for this model, got {theta0.shape}")
    bounds = []
    for name, b in (("lb", lb), ("ub", ub)):
        if b is not None:
            b = jnp.broadcast_to(as_float_array(b, name), (k,))
        bounds.append(b)
    em_plan = model.em_plan()
    if algo.name == "em" and em_plan is None:
        raise ValueError(
            'algorithm="em" needs a variance-component model V = sum of variance * known matrix '
            "(ScalarMatrix, FixedMatrix, CovariancePropagation of a fixed Z with one of those)"
        )
    if not em_fallback and algo.name != "em":
        em_plan = None
    if max_iter < 0 or max_halvings < 1 or min_iter < 0:
        raise ValueError("max_iter and min_iter must be >= 0 and max_halvings >= 1")
    result = _fit_jit(
        model,
        y,
        X,
        theta0,
        bounds[0],
        bounds[1],
        jnp.asarray([tol_score, tol_delta, tol_loglik], y.dtype),
        jnp.asarray(eta, y.dtype),
        reml=reml,
        algorithm=algo,
        derivatives=derivatives,
        dv_builder=dv_builder,
        max_iter=int(max_iter),
        max_halvings=int(max_halvings),
        checks=(bool(check_score), bool(check_delta), bool(check_loglik)),
        min_iter=int(min_iter),
        em_plan=em_plan,
        verbose=int(verbose),
        throw=bool(throw),
    )
    if verbose == 1 and not _is_traced(result.loglik):
        print()
    if not _is_traced(result.status) and int(result.status) == MAX_ITER:
        warnings.warn(f"jreml.estimate: {STATUS_MESSAGES[MAX_ITER]} ({max_iter})", stacklevel=2)
    return result
