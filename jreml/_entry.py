"""``jreml.estimate``: the fitting loop (``_estimate.estimate``), or for ``algorithm="hybrid"`` optax steps into
the basin first (``_hybrid.hybrid_estimate``, which itself finishes with the loop)."""

from __future__ import annotations

import functools

from ._estimate import estimate as _loop_estimate
from ._hybrid import hybrid_estimate


@functools.wraps(_loop_estimate)
def estimate(v_builder, y, X=None, theta0=None, *, algorithm="ai", **options):
    if isinstance(algorithm, str) and algorithm == "hybrid":
        return hybrid_estimate(v_builder, y, X, theta0, **options)
    return _loop_estimate(v_builder, y, X, theta0, algorithm=algorithm, **options)
