"""``fit_optax``: minimise the (profiled) negative log-likelihood with any optax optimiser, in one compiled loop.

The objective is :class:`jreml._profiled.ProfiledObjective` (β, and σ² where the model has a residual term,
profiled out; ``profiled=False`` profiles only β and optimises θ itself). The loop is a single jitted
``lax.while_loop`` that stops when ‖∇(−ℓ)‖₂ < ``tol`` (converged), after ``max_steps`` steps, or when the
objective or its gradient stops being finite. The estimate φ̂ is mapped back to θ̂ and handed to
:func:`jreml.estimate` with ``max_iter=0``, which computes every :class:`FitResult` field at θ̂ (β̂, standard
errors, AI, BLUP inputs); ``converged``, ``n_iter`` (optimiser steps) and ``status`` then describe the optax run,
``algorithm`` is ``"optax"`` and ``history`` holds the single row θ̂.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import TYPE_CHECKING

import equinox as eqx
import jax
import jax.numpy as jnp

from ._config import as_float_array
from ._covariance.queries import as_covariance
from ._estimate import estimate
from ._likelihood import check_method
from ._problem import check_data, ols_residual_variance
from ._profiled import ProfiledObjective, _profiled
from ._result import FitResult
from ._solvers.results import RESULTS

if TYPE_CHECKING:
    import optax

# optax is imported inside the functions that use it: importing it costs ~0.1 s, which every ``import jreml``
# (the command line included) would otherwise pay.

_DEFAULT_OPTIMIZER: list = []


def default_optimizer() -> optax.GradientTransformationExtraArgs:
    """``optax.lbfgs()``, built once (a new optimiser object would mean a new compilation)."""
    import optax

    if not _DEFAULT_OPTIMIZER:
        _DEFAULT_OPTIMIZER.append(optax.lbfgs())
    return _DEFAULT_OPTIMIZER[0]


def _minimize(objective: ProfiledObjective, phi0, tol, max_steps, optimizer):
    """One ``lax.while_loop`` of optax steps from φ₀; returns (φ̂, θ̂, steps, status)."""
    import optax

    opt = optax.with_extra_args_support(optimizer)
    # optax's L-BFGS mixes int32 and int64 counters, which strict dtype promotion rejects: trace optax's own
    # code under standard promotion (jreml's objective is strict-clean on its own).
    with jax.numpy_dtype_promotion("standard"):
        state0 = opt.init(phi0)
    # Line-search optimisers (L-BFGS) keep the value and gradient at the new iterate in their state.
    from_state = optax.tree.get(state0, "value") is not None
    value_and_grad = optax.value_and_grad_from_state(objective) if from_state else None

    def evaluate(phi, state):
        if from_state:
            return value_and_grad(phi, state=state)
        return jax.value_and_grad(objective)(phi)

    def grad_norm(grad):
        return jnp.sqrt(jnp.sum(grad * grad))

    def cond(carry):
        i, _, _, value, grad = carry
        return (i < max_steps) & jnp.isfinite(value) & (grad_norm(grad) >= tol)

    def body(carry):
        i, phi, state, value, grad = carry
        with jax.numpy_dtype_promotion("standard"):
            updates, state = opt.update(grad, state, phi, value=value, grad=grad, value_fn=objective)
            phi = optax.apply_updates(phi, updates)
        value, grad = evaluate(phi, state)
        return i + 1, phi, state, value, grad

    value0, grad0 = evaluate(phi0, state0)
    start = jnp.zeros((), max_steps.dtype)
    steps, phi, _, value, grad = jax.lax.while_loop(cond, body, (start, phi0, state0, value0, grad0))
    norm = grad_norm(grad)
    finite = jnp.isfinite(value) & jnp.isfinite(norm)
    status = jnp.where(
        finite & (norm < tol),
        int(RESULTS.CONVERGED),
        jnp.where(finite, int(RESULTS.MAX_ITER), int(RESULTS.NONFINITE)),
    )
    return phi, objective.to_theta(phi), steps, status


def _minimize_per_member(objective: ProfiledObjective, phi0, tol, max_steps, optimizer):
    """``_minimize``; under ``jax.vmap`` each batch member runs its own loop, one after another.

    A batched optax loop (L-BFGS's zoom line search nested in the step loop) keeps stepping members that have
    already stopped, on their stale state; with many members this was seen to run for minutes where each
    member alone takes milliseconds. ``sequential_vmap`` turns the batch into a ``lax.map`` of the
    unbatched loop instead: the same numbers as unbatched fits and still a single compilation.
    """
    dynamic, static = eqx.partition((objective, phi0, tol, max_steps), eqx.is_array)

    @jax.custom_batching.sequential_vmap
    def per_member(dynamic):
        objective, phi0, tol, max_steps = eqx.combine(dynamic, static)
        return _minimize(objective, phi0, tol, max_steps, optimizer)

    return per_member(dynamic)


_minimize_jit = eqx.filter_jit(_minimize_per_member)


def fit_optax(
    v_builder,
    y,
    X=None,
    theta0=None,
    *,
    method: str = "reml",
    optimizer: optax.GradientTransformation | None = None,
    max_steps: int = 500,
    tol: float = 1e-8,
    profiled: bool = True,
) -> FitResult:
    """Fit y ~ N(Xβ, V(θ)) by REML or ML with an optax optimiser (default ``optax.lbfgs()``).

    Args:
        v_builder: a covariance module, or a function θ ↦ V (then ``theta0`` is required; only β is profiled).
        y, X: response (n,) and fixed-effects design (n, p) of full column rank (default: an intercept).
        theta0: starting θ; default as :func:`jreml.estimate` (the OLS residual variance spread over the terms).
        method: "reml" or "ml".
        optimizer: any ``optax.GradientTransformation``; line-search ones get ``value``, ``grad`` and
            ``value_fn`` as optax requires. Pass the same object to reuse the compiled loop.
        max_steps, tol: stop after ``max_steps`` steps or when ‖∇(−ℓ)‖₂ < ``tol`` (the only ``converged``).
        profiled: profile σ² (and β) out of the objective where the model has a residual ScalarMatrix term.

    Returns:
        :class:`FitResult` at θ̂, as :func:`jreml.estimate` computes it; ``n_iter`` counts optimiser steps and
        ``status`` is ``RESULTS.CONVERGED`` (0), ``RESULTS.MAX_ITER`` (1, ``max_steps`` reached) or
        ``RESULTS.NONFINITE`` (4, a non-finite objective). Works under ``jax.vmap`` over ``y``.
    """
    check_method(method)
    if max_steps < 0:
        raise ValueError(f"max_steps must be >= 0, got {max_steps}")
    y = as_float_array(y, "y")
    X = jnp.ones((y.shape[0], 1), y.dtype) if X is None else as_float_array(X, "X")
    model = as_covariance(v_builder, theta0, y.shape[0])
    check_data(y, X, model.shape[0], model)
    k = model.num_free_params
    if theta0 is None:
        theta0 = model.default_theta(ols_residual_variance(y, X, model))
    theta0 = as_float_array(theta0, "theta0").astype(y.dtype)
    if theta0.shape != (k,):
        raise ValueError(f"theta0 must have shape ({k},) for this model, got {theta0.shape}")
    objective = _profiled(model, y, X, method == "reml", profiled)
    optimizer = default_optimizer() if optimizer is None else optimizer
    # tol and max_steps are traced: new values reuse the compiled loop.
    _, theta_hat, steps, status = _minimize_jit(
        objective, objective.to_phi(theta0), jnp.asarray(tol, y.dtype), jnp.asarray(int(max_steps)), optimizer
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # max_iter=0 always reports MAX_ITER: replaced below
        result = estimate(model, y, X, theta0=theta_hat, method=method, max_iter=0, min_iter=0)
    result = eqx.tree_at(
        lambda r: (r.converged, r.n_iter, r.status),
        result,
        (status == int(RESULTS.CONVERGED), steps.astype(result.n_iter.dtype), status.astype(result.status.dtype)),
    )
    return dataclasses.replace(result, algorithm="optax")
