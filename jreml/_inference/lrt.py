r"""Likelihood-ratio tests between nested fits: lme4's ``anova(fit0, fit1, ...)`` table.

For fits of one response, sorted by their number of parameters (fixed plus covariance, lme4's ``npar``), each row
after the first tests it against the row before: χ² = 2(ℓ₁ − ℓ₀) on Df = npar₁ − npar₀ degrees of freedom,
Pr(>Chisq) from χ²_Df. REML log-likelihoods are comparable only between fits with the same fixed effects; where
they differ and a fit is REML, every REML fit is refitted by ML first, with a message (lme4's
"refitting model(s) with ML (instead of REML)").

A variance tested at zero lies on the boundary of its parameter space, where χ²_Df is conservative. Between fits
with the same fixed effects the table adds ``Pr(>Chisq) boundary``: the mixture ½χ²_{Df−1} + ½χ²_Df (χ²₀ a point
mass at 0) of Self & Liang (1987, JASA 82:605) and Stram & Lee (1994, Biometrics 50:1171), exact for adding one
random effect with its covariances to the others (a variance alone: ½χ²₀ + ½χ²₁), an approximation otherwise.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd

__all__ = ["anova"]

COLUMNS = ["npar", "AIC", "BIC", "logLik", "deviance", "Chisq", "Df", "Pr(>Chisq)", "Pr(>Chisq) boundary"]


def _same_fixed_effects(fits) -> bool:
    first = fits[0]
    return all(f.X.shape == first.X.shape and np.array_equal(np.asarray(f.X), np.asarray(first.X)) for f in fits[1:])


def _refit_ml(fit):
    from .._entry import estimate  # the refit runs the fitting loop: imported on use, below the results layer

    refit = estimate(fit.model, fit.y, fit.X, method="ml")
    return dataclasses.replace(
        refit,
        beta_names=fit.beta_names,
        formula=fit.formula,
        n_dropped=fit.n_dropped,
        formula_info=fit.formula_info,
    )


def boundary_pvalue(chisq: float, df: int) -> float:
    """½·P(χ²_{df−1} > chisq) + ½·P(χ²_df > chisq), with χ²₀ a point mass at zero."""
    from scipy import stats

    if df < 1 or not np.isfinite(chisq):
        return math.nan
    lower = (1.0 if chisq <= 0 else 0.0) if df == 1 else float(stats.chi2.sf(chisq, df - 1))
    return 0.5 * lower + 0.5 * float(stats.chi2.sf(chisq, df))


def anova(*fits, names: list[str] | None = None, refit: bool = True) -> pd.DataFrame:
    """lme4's ``anova(fit0, fit1, ...)``: DataFrame indexed by model (its formula, or ``names``) with columns
    ``npar, AIC, BIC, logLik, deviance, Chisq, Df, Pr(>Chisq)`` and, between fits with the same fixed effects,
    ``Pr(>Chisq) boundary`` (module docstring). ``refit=False`` compares REML fits as they are (lme4's
    ``refit = FALSE``), which is only valid with the same fixed effects."""
    from scipy import stats

    if len(fits) < 2:
        raise ValueError(f"anova needs at least two fits to compare, got {len(fits)}")
    if names is None:
        names = [f.formula or f"model{i + 1}" for i, f in enumerate(fits)]
    if len(names) != len(fits) or len(set(names)) != len(names):
        raise ValueError(f"anova: names must be {len(fits)} distinct labels, got {names!r}")
    for i, f in enumerate(fits):
        if np.ndim(f.loglik) != 0:
            raise TypeError(f"anova compares single fits; fit {i + 1} ({names[i]}) is a batch")
    first = fits[0]
    for i, f in enumerate(fits[1:], start=2):
        if int(f.nobs) != int(first.nobs) or not np.array_equal(np.asarray(f.y), np.asarray(first.y)):
            raise ValueError(
                f"anova: fit {i} ({names[i - 1]}) was fitted to other data than fit 1 ({names[0]}) "
                f"({int(f.nobs)} vs {int(first.nobs)} observations or other responses)"
            )
    methods = {f.method for f in fits}
    same_fixed = _same_fixed_effects(fits)
    if refit and "reml" in methods and not same_fixed:
        print("refitting model(s) with ML (instead of REML)")
        fits = tuple(_refit_ml(f) if f.method == "reml" else f for f in fits)
    elif len({f.method for f in fits}) > 1:
        raise ValueError("anova: the fits mix REML and ML; pass ML fits (or REML fits with the same fixed effects)")
    order = sorted(range(len(fits)), key=lambda i: (fits[i].num_params, i))
    rows, previous = [], None
    for i in order:
        f = fits[i]
        loglik, npar = float(f.loglik), int(f.num_params)
        row = {"npar": npar, "AIC": float(f.aic), "BIC": float(f.bic), "logLik": loglik, "deviance": -2.0 * loglik}
        row.update({"Chisq": math.nan, "Df": math.nan, "Pr(>Chisq)": math.nan, "Pr(>Chisq) boundary": math.nan})
        if previous is not None:
            df = npar - previous[1]
            chisq = max(2.0 * (loglik - previous[0]), 0.0)
            row.update(Chisq=chisq, Df=float(df))
            if df > 0:
                row["Pr(>Chisq)"] = float(stats.chi2.sf(chisq, df))
                if same_fixed:
                    row["Pr(>Chisq) boundary"] = boundary_pvalue(chisq, df)
        rows.append(row)
        previous = (loglik, npar)
    table = pd.DataFrame(rows, index=pd.Index([names[i] for i in order]), columns=COLUMNS)
    if not same_fixed:
        table = table.drop(columns="Pr(>Chisq) boundary")
    return table
