"""``fit``: an lme4-style formula interface over :func:`jreml.estimate`."""

from __future__ import annotations

import dataclasses

import pandas as pd

from ._design.build import build_design
from ._estimate import estimate
from ._result import FitResult


def fit(
    formula: str,
    data: pd.DataFrame,
    *,
    method: str = "reml",
    algorithm="ai",
    relmat: dict | None = None,
    **options,
) -> FitResult:
    """Fit an lme4-style linear mixed model, e.g. ``fit("Reaction ~ Days + (Days | Subject)", df)``.

    Random terms: ``(1 | g)``, ``(x | g)`` (correlated intercept and slope), ``(0 + x | g)``, ``(x || g)``
    (uncorrelated: one term per column), ``(1 | a/b)`` = ``(1 | a) + (1 | a:b)``, ``(1 | a:b)``, crossed and
    repeated factors. The fixed part is expanded by formulaic (treatment contrasts, sorted levels); aliased
    columns are dropped with a warning. Rows with a missing value in any used column are dropped
    (``result.n_dropped``). ``relmat={"g": K}`` gives the term ``(1 | g)`` the covariance σ²·K, with K a
    DataFrame indexed by level names or an array in sorted-level order. Other keyword ``options`` go to
    :func:`jreml.estimate`.
    """
    design = build_design(formula, data, relmat)
    result = estimate(design.model, design.y, design.X, method=method, algorithm=algorithm, **options)
    return dataclasses.replace(
        result, beta_names=design.beta_names, formula=design.formula.text, n_dropped=design.n_dropped
    )
