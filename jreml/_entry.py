"""The engine's entry points for arrays: ``jreml.estimate`` (the fitting loop, ``_estimate.estimate``, or for
``algorithm="hybrid"`` optax steps into the basin first, ``_hybrid.hybrid_estimate``) and ``jreml.fit_spectral``
(the spectral back end for V = σ²_k·K + σ²_e·I); both return ``FitResult``s."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from ._backends.spectral import SpectralDesign, decompose, spectral_solve, transformed_residuals
from ._estimate import estimate as _loop_estimate
from ._hybrid import hybrid_estimate
from ._result import FitResult
from ._solvers.loop import History


@functools.wraps(_loop_estimate)
def estimate(v_builder, y, X=None, theta0=None, *, algorithm="ai", **options):
    if isinstance(algorithm, str) and algorithm == "hybrid":
        return hybrid_estimate(v_builder, y, X, theta0, **options)
    return _loop_estimate(v_builder, y, X, theta0, algorithm=algorithm, **options)


def fit_spectral(model, Y, X=None, *, design: SpectralDesign | None = None, **options) -> FitResult:
    """Fit V = σ²_k·K + σ²_e·I to one response y (n,) or many Y (T, n) on the spectral back end: one
    eigendecomposition K = U·diag(λ)·Uᵀ, then O(n·p²) per iteration of each response's profiled REML (or ML).

    Returns the :class:`FitResult` that :func:`jreml.estimate` gives (with 2-D ``Y`` every array leaf but the
    model's has a leading response axis, as under ``jax.vmap``), with ``algorithm="spectral"`` and a history of one
    row, the optimum (the spectral iteration records none). ``design``: ``decompose(model, X)`` to reuse. ``options``:
    ``method`` ("reml"/"ml") and the loop's ``max_iter``, ``max_halvings``, ``min_iter``, ``tol_score``,
    ``tol_delta``, ``tol_loglik`` (``estimate``'s defaults); ``estimate``'s other options at their default values.
    """
    Y = np.asarray(Y, dtype=float)
    if X is None:
        X = np.ones((Y.shape[-1], 1))
    X = np.asarray(X, dtype=float)
    if design is None:
        design = decompose(model, X)
    solution = spectral_solve(model, Y, X, design=design, **options)
    p_y = transformed_residuals(design, solution, np.atleast_2d(Y))
    p_y = p_y[0] if Y.ndim == 1 else p_y

    def row(a):
        return jnp.expand_dims(jnp.asarray(a), Y.ndim - 1)

    history = History(
        row(solution.theta),
        row(solution.beta),
        row(solution.loglik),
        row(solution.score),
        row(solution.information),
        row(jnp.zeros_like(solution.theta)),
        row(jnp.zeros_like(solution.loglik)),
        row(jnp.linalg.norm(solution.score, axis=-1)),
        row(jnp.zeros_like(solution.n_iter)),
    )
    return FitResult(
        theta=solution.theta,
        natural_params=solution.natural_params,
        beta=solution.beta,
        vcov_beta=solution.vcov_beta,
        se_beta=solution.se_beta,
        loglik=solution.loglik,
        converged=solution.converged,
        n_iter=solution.n_iter,
        status=solution.status,
        singular=solution.singular,
        at_boundary=solution.at_boundary,
        score=solution.score,
        information=solution.information,
        vcov_theta=solution.vcov_theta,
        history=history,
        p_y=jnp.asarray(p_y),
        model=model,
        y=jnp.asarray(Y),
        X=jnp.asarray(X),
        method=solution.method,
        algorithm="spectral",
        param_names=solution.param_names,
    )
