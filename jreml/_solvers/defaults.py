"""The fitting loop's default options, one set for every back end (``estimate``, ``fit_batch``, ``bootstrap`` and
the spectral path of the batches read them from here)."""

from __future__ import annotations

from typing import NamedTuple


class LoopDefaults(NamedTuple):
    """Iteration limits and convergence tolerances.

    A fit converges when, after at least ``min_iter`` iterations, the projected score's norm is below
    ``tol_score``, the largest step of θ below ``tol_delta`` and the change of ℓ below ``tol_loglik``; a step is
    halved at most ``max_halvings`` times and starts at length ``eta``.
    """

    max_iter: int = 200
    min_iter: int = 2
    max_halvings: int = 20
    eta: float = 1.0
    tol_score: float = 1e-6
    tol_delta: float = 1e-6
    tol_loglik: float = 1e-8


DEFAULTS = LoopDefaults()

#: Lower bound of a variance, relative to the data's residual variance (θ is clipped there).
BOUNDARY_RELATIVE_VARIANCE = 1e-14
#: A variance below this fraction of the residual variance is reported as singular (lme4: relative SD 1e-4).
SINGULAR_RELATIVE_VARIANCE = 1e-8

#: Options of ``estimate`` that the spectral path of a batch does not have, at the values it matches: a batch given
#: one of them at this value stays on the spectral path (an option's key never picks a path, only its value).
SPECTRAL_MATCHES = {
    "algorithm": "ai",
    "backend": "auto",
    "derivatives": "auto",
    "eta": DEFAULTS.eta,
    "verbose": 0,
    "check_score": True,
    "check_delta": True,
    "check_loglik": True,
    "em_fallback": True,
    "newton_fallback": True,
    "restart_edge": True,
}
