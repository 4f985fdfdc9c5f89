"""Hand-built models of the bundled data sets (the lme4 classic formulas, without the formula layer)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd

from . import datasets
from ._covariance.base import AbstractCovariance
from ._covariance.basic import FixedMatrix, IdentityMatrix, ScalarMatrix, UnstructuredMatrix
from ._covariance.compose import CovariancePropagation, DummyMatrix, KroneckerProduct


class Example(NamedTuple):
    """A ready-to-fit model: ``jreml.estimate(ex.model, ex.y, ex.X)``."""

    name: str
    formula: str
    model: AbstractCovariance
    y: np.ndarray
    X: np.ndarray
    fixef_names: tuple[str, ...]
    data: pd.DataFrame


def _treatment(column: pd.Series, prefix: str):
    levels = sorted(column.unique())
    cols = [(column == lvl).to_numpy(float) for lvl in levels[1:]]
    return cols, [f"{prefix}{lvl}" for lvl in levels[1:]]


def _intercept_factor(df, y_col, factor, factor_name):
    n = len(df)
    cols, names = _treatment(df[factor], factor_name)
    X = np.column_stack([np.ones(n), *cols])
    return df[y_col].to_numpy(float), X, ("(Intercept)", *names)


def example(name: str, trait: str = "trait1") -> Example:
    """The classic model of a bundled data set: dyestuff, sleepstudy, penicillin, machines, john_alpha, kinship."""
    df = datasets.load(name)
    n = len(df)
    key = name.lower()

    def resid():
        return ScalarMatrix(n, name="Residual")

    def intercept(*cols, label=None):
        z = DummyMatrix(*(df[c] for c in cols))
        return CovariancePropagation(z, ScalarMatrix(z.n_levels), name=label or ":".join(cols))

    if key == "dyestuff":
        return Example(
            key,
            "Yield ~ 1 + (1 | Batch)",
            intercept("Batch") + resid(),
            df.Yield.to_numpy(float),
            np.ones((n, 1)),
            ("(Intercept)",),
            df,
        )
    if key == "penicillin":
        model = intercept("plate") + intercept("sample") + resid()
        return Example(
            key,
            "diameter ~ 1 + (1 | plate) + (1 | sample)",
            model,
            df.diameter.to_numpy(float),
            np.ones((n, 1)),
            ("(Intercept)",),
            df,
        )
    if key == "machines":
        y, X, names = _intercept_factor(df, "score", "Machine", "Machine")
        model = intercept("Worker") + intercept("Worker", "Machine") + resid()
        return Example(key, "score ~ Machine + (1 | Worker) + (1 | Worker:Machine)", model, y, X, names, df)
    if key == "john_alpha":
        y, X, names = _intercept_factor(df, "yield", "rep", "rep")
        model = intercept("gen") + intercept("rep", "block") + resid()
        return Example(key, "yield ~ 1 + rep + (1 | gen) + (1 | rep:block)", model, y, X, names, df)
    if key == "sleepstudy":
        days = df.Days.to_numpy(float)
        subjects = DummyMatrix(df.Subject)
        m = subjects.n_levels
        codes = np.asarray(subjects.codes)
        # Columns ordered subject-major: (subject j, intercept) at 2j, (subject j, Days) at 2j + 1.
        Z = np.zeros((n, 2 * m))
        Z[np.arange(n), 2 * codes] = 1.0
        Z[np.arange(n), 2 * codes + 1] = days
        G = KroneckerProduct(IdentityMatrix(m), UnstructuredMatrix(2, labels=("(Intercept)", "Days")))
        model = CovariancePropagation(Z, G, name="Subject") + resid()
        X = np.column_stack([np.ones(n), days])
        return Example(
            key,
            "Reaction ~ Days + (Days | Subject)",
            model,
            df.Reaction.to_numpy(float),
            X,
            ("(Intercept)", "Days"),
            df,
        )
    if key == "kinship":
        K = datasets.kinship_matrix()
        model = FixedMatrix(K, name="g") + resid()
        X = np.column_stack([np.ones(n), df.covariate.to_numpy(float)])
        return Example(
            key,
            f"{trait} ~ 1 + covariate, V = s2g*K + s2e*I",
            model,
            df[trait].to_numpy(float),
            X,
            ("(Intercept)", "covariate"),
            df,
        )
    raise ValueError(f"no example model for {name!r}; available: {', '.join(datasets.list_datasets())}")
