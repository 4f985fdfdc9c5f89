"""``RESULTS``: how a fit ended, one code per outcome with its message (as optimistix's ``RESULTS``).

A fit's ``status`` is one of these integers (an int array under ``jax.vmap``); ``FitResult.message`` prints the
sentence. Failures inside a compiled fit become a code, never an exception (``throw=True`` raises for
``INVALID_START`` only).
"""

from __future__ import annotations

import enum


class RESULTS(enum.IntEnum):
    """The outcome codes of every fitting loop (``estimate``, ``fit_optax``, the spectral path)."""

    RUNNING = -1
    CONVERGED = 0
    MAX_ITER = 1
    STALLED = 2
    INVALID_START = 3
    NONFINITE = 4

    @property
    def message(self) -> str:
        return _MESSAGES[self]


_MESSAGES = {
    RESULTS.RUNNING: "still running",
    RESULTS.CONVERGED: "converged",
    RESULTS.MAX_ITER: "did not converge: max_iter iterations reached",
    RESULTS.STALLED: (
        "stopped: no step (step-halving, EM) increased the log-likelihood while the convergence tests still failed"
    ),
    RESULTS.INVALID_START: (
        "V(theta0) is not positive definite (its Cholesky factorisation failed) or the log-likelihood is "
        "not finite at the starting values; check the data for NaN/inf and pass another theta0"
    ),
    RESULTS.NONFINITE: "stopped: the objective or its gradient became non-finite (NaN or inf) during the steps",
}


def status_message(status) -> str:
    """The sentence for a status code (an int or a 0-d array)."""
    code = int(status)
    try:
        return RESULTS(code).message
    except ValueError:
        return f"status {code}"
