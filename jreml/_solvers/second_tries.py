"""Second tries after a fit (``newton_fallback``, ``restart_edge``), decided in numpy on the first fit's results:
for one fit (``estimate``) or a batch of them (``refine_batch``, used by ``fit_batch`` and ``bootstrap``).

When average-information or Fisher scoring stalls or runs out of iterations, Newton–Raphson on the observed
information continues from there; a fit of a model with a log-Cholesky G that ends with a zero diagonal of L, or
without converging, starts again from G = 0.1·σ²_OLS·I and from its reflection, and the better optimum is kept.
"""

from __future__ import annotations

import numpy as np

from .loop import CONVERGED, INVALID_START, MAX_ITER, STALLED

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
