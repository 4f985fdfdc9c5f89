"""``hybrid_estimate``: a few optax steps into the basin of the optimum, then average-information iterations.

Phase 1 minimises the profiled negative log-likelihood (:mod:`jreml._profiled`: β, and σ² where the model has
a residual ScalarMatrix term, profiled out; only β where the model cannot be rescaled) for at most
``optax_steps`` steps of an optax optimiser (default ``optax.lbfgs()`` with its zoom line search, which is
monotone and insensitive to the parameters' scale). A start far from the optimum (variances off by many orders
of magnitude) is where Newton-type AI steps overshoot; the profiled objective is smooth there and one
dimension smaller. Phase 2 is :func:`jreml.estimate` with ``algorithm="ai"`` from the phase-1 θ, which gives
the quadratic convergence, the convergence tests, the bounds and every :class:`FitResult` field.

The phase-1 θ is used only if it is finite and its objective is no worse than the start's (an optimiser such
as Adam with a large learning rate may leave the basin); otherwise phase 2 starts from ``theta0``.

The result is phase 2's :class:`FitResult` with ``algorithm == "hybrid"``: ``n_iter``, ``history``, ``status``
and ``converged`` are those of the AI phase (``history`` row 0 is the phase-1 θ). The optax phase is reported
by ``full_output=True`` as a :class:`HybridInfo`. Works under ``jax.vmap`` over ``y`` (and other array
inputs), and gradients through the result (implicit differentiation of θ̂) are those of :func:`jreml.estimate`.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ._config import as_float_array
from ._covariance.queries import as_covariance
from ._estimate import estimate
from ._likelihood import check_method
from ._optax_fit import _minimize_jit, default_optimizer
from ._problem import check_data, ols_residual_variance, stop_gradient
from ._profiled import _profiled
from ._result import FitResult

if TYPE_CHECKING:  # optax is imported where it is used: it adds to `import jreml`
    import optax


class HybridInfo(NamedTuple):
    """The optax phase of :func:`hybrid_estimate`.

    ``optax_steps``: optimiser steps taken; ``optax_status`` (``RESULTS``): 0 converged (‖∇‖ < ``optax_tol``),
    1 step cap reached, 4 non-finite objective; ``theta_optax``: θ after the optax phase; ``used_optax``: whether
    the AI phase started there (False: it started from ``theta0``).
    """

    optax_steps: Int[Array, ""]
    optax_status: Int[Array, ""]
    theta_optax: Float[Array, " k"]
    used_optax: Array


def _objective(model, y, X, reml):
    """The profiled objective, profiling σ² where the model allows it and only β otherwise."""
    try:
        return _profiled(model, y, X, reml, True)
    except ValueError:  # a term that cannot be rescaled by σ² (e.g. a CustomMatrix inside a Sum)
        return _profiled(model, y, X, reml, False)


def hybrid_estimate(
    v_builder,
    y: Float[Array, " n"],
    X: Float[Array, "n p"] | None = None,
    theta0: Float[Array, " k"] | None = None,
    *,
    method: str = "reml",
    optax_steps: int = 30,
    optimizer: optax.GradientTransformation | None = None,
    optax_tol: float = 1e-8,
    full_output: bool = False,
    **estimate_kwargs,
) -> FitResult | tuple[FitResult, HybridInfo]:
    """Fit y ~ N(Xβ, V(θ)) by REML or ML: ``optax_steps`` optax steps, then :func:`jreml.estimate` (AI).

    Args:
        v_builder: a covariance module, or a function θ ↦ V (then ``theta0`` is required).
        y, X: response (n,) and fixed-effects design (n, p) of full column rank (default: an intercept).
        theta0: starting θ; default as :func:`jreml.estimate` (the OLS residual variance spread over the terms).
        method: "reml" or "ml".
        optax_steps: at most this many optimiser steps on the profiled objective (0: plain ``estimate``).
        optimizer: any ``optax.GradientTransformation`` (default ``optax.lbfgs()``); pass the same object to
            reuse the compiled loop.
        optax_tol: the optax phase stops early once ‖∇(−ℓ)‖₂ < ``optax_tol``.
        full_output: also return a :class:`HybridInfo` describing the optax phase.
        **estimate_kwargs: passed to :func:`jreml.estimate` for the AI phase (``max_iter``, tolerances, bounds,
            ``verbose``, ...); ``algorithm`` is always "ai".

    Returns:
        The AI phase's :class:`FitResult` with ``algorithm == "hybrid"`` (``n_iter``, ``history``, ``status``:
        the AI phase only), or ``(result, HybridInfo)`` with ``full_output=True``.
    """
    if "algorithm" in estimate_kwargs:
        raise TypeError('hybrid_estimate always finishes with algorithm="ai"; do not pass algorithm')
    reml = check_method(method)
    if optax_steps < 0:
        raise ValueError(f"optax_steps must be >= 0, got {optax_steps}")
    y = as_float_array(y, "y")
    X = jnp.ones((y.shape[0], 1), y.dtype) if X is None else as_float_array(X, "X")
    model = as_covariance(v_builder, theta0, y.shape[0])
    check_data(y, X, model.shape[0], model)
    k = model.num_free_params
    if theta0 is None:
        theta0 = model.default_theta(ols_residual_variance(jax.lax.stop_gradient(y), jax.lax.stop_gradient(X), model))
    theta0 = jax.lax.stop_gradient(as_float_array(theta0, "theta0").astype(y.dtype))
    if theta0.shape != (k,):
        raise ValueError(f"theta0 must have shape ({k},) for this model, got {theta0.shape}")

    # Phase 1 only picks a starting point: no gradient flows through it (θ̂ is differentiated implicitly).
    model_v, y_v, X_v = stop_gradient((model, y, X))
    objective = _objective(model_v, y_v, X_v, reml)
    phi0 = objective.to_phi(theta0)
    optimizer = default_optimizer() if optimizer is None else optimizer
    phi, theta_optax, steps, status = _minimize_jit(
        objective, phi0, jnp.asarray(optax_tol, y.dtype), jnp.asarray(int(optax_steps)), optimizer
    )
    value0, value = objective(phi0), objective(phi)
    better = jnp.isfinite(value) & jnp.all(jnp.isfinite(theta_optax)) & ~(value > value0)
    start = jnp.where(better, theta_optax, theta0)

    result = estimate(model, y, X, theta0=start, method=method, algorithm="ai", **estimate_kwargs)
    result = dataclasses.replace(result, algorithm="hybrid")
    if full_output:
        return result, HybridInfo(steps, status, theta_optax, better)
    return result
