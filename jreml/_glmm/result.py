r"""The result of a GLMM fit: estimates, the Laplace criterion, random effects, predictions, glmer's summary.

Definitions as lme4 reports a ``glmer`` fit (Bates et al. 2015; lme4's ``summary.merMod``): with D the minimised
Laplace criterion (``laplace.py``, −2 log p(y | μ̂) + ‖û‖² + log|L|²) and k = p + (number of θ),
logLik = −D/2, deviance = D (= −2 logLik), AIC = D + 2k, BIC = D + k·log n, df.resid = n − k; fixed effects with
z = β̂/SE and two-sided normal p-values, SE from the β block of 2·H⁻¹ (H = ∂²D/∂(θ, β)², lme4's ``use.hessian``);
random effects b̂ = Λû with conditional SDs √diag(ΛA⁻¹Λᵀ) (lme4's ``condVar``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import norm


@dataclass(frozen=True)
class VarianceComponent:
    """One random term: its name, grouping factor(s), column labels and covariance G (b×b)."""

    name: str
    group: str
    labels: tuple[str, ...]
    covariance: np.ndarray

    @property
    def variances(self) -> np.ndarray:
        return np.diagonal(self.covariance).copy()

    @property
    def sds(self) -> np.ndarray:
        return np.sqrt(self.variances)


@dataclass(frozen=True, eq=False)
class GLMMResult:
    """A fitted generalized linear mixed model (``jreml.fit(..., family=...)``)."""

    formula: str
    family: str
    link: str
    nagq: int
    beta: np.ndarray
    beta_names: tuple[str, ...]
    vcov_beta: np.ndarray
    theta: np.ndarray
    components: tuple[VarianceComponent, ...]
    objective: float
    deviance_residuals: float
    loglik: float
    aic: float
    bic: float
    nobs: int
    df_resid: int
    n_dropped: int
    ranef: dict[str, pd.DataFrame]
    eta: np.ndarray
    mu: np.ndarray
    converged: bool
    message: str
    evaluations: int
    fixed_spec: Any = None
    fixed_columns: tuple[int, ...] | None = None
    info: Any = field(default=None, repr=False)

    @property
    def deviance(self) -> float:
        """−2·logLik, as glmer's summary prints it (the Laplace criterion D)."""
        return self.objective

    @property
    def se(self) -> np.ndarray:
        return np.sqrt(np.diagonal(self.vcov_beta))

    @property
    def fixef(self) -> pd.Series:
        return pd.Series(self.beta, index=list(self.beta_names))

    def coef_table(self) -> pd.DataFrame:
        """Estimate, Std. Error, z value, Pr(>|z|) per fixed effect (glmer's layout)."""
        z = self.beta / self.se
        return pd.DataFrame(
            {"Estimate": self.beta, "Std. Error": self.se, "z value": z, "Pr(>|z|)": 2.0 * norm.sf(np.abs(z))},
            index=list(self.beta_names),
        )

    @property
    def varcorr(self) -> pd.DataFrame:
        """One row per random-effect variance: Groups, Name, Variance, Std.Dev. (lme4's ``VarCorr``)."""
        rows = []
        for c in self.components:
            for label, v in zip(c.labels, c.variances, strict=True):
                rows.append({"Groups": c.name, "Name": label, "Variance": float(v), "Std.Dev.": float(np.sqrt(v))})
        return pd.DataFrame(rows)

    @property
    def ngroups(self) -> dict[str, int]:
        return {name: len(frame) for name, frame in self.ranef.items()}

    def predict(self, newdata: pd.DataFrame | None = None, type: str = "link") -> np.ndarray:  # noqa: A002
        """η̂ = Xβ̂ + Zb̂ (``type="link"``) or μ̂ = g⁻¹(η̂) (``type="response"``), on the fitted rows or on
        ``newdata`` (levels not in the fit get b = 0, lme4's ``allow.new.levels=TRUE``)."""
        if type not in ("link", "response"):
            raise ValueError(f"type must be 'link' or 'response', got {type!r}")
        if newdata is None:
            return self.eta.copy() if type == "link" else self.mu.copy()
        eta = self._eta_new(newdata)
        if type == "link":
            return eta
        import jax.numpy as jnp

        from .family import as_family

        return np.asarray(as_family(self.family, self.link).link.inverse(jnp.asarray(eta)))

    def _eta_new(self, newdata: pd.DataFrame) -> np.ndarray:
        if self.fixed_spec is None or self.info is None:
            raise ValueError("predict(newdata) needs a fit made from a formula")
        X = np.asarray(self.fixed_spec.get_model_matrix(newdata), dtype=float)[:, list(self.fixed_columns)]
        eta = X @ self.beta
        for term in self.info.terms:
            frame = self.ranef[term.name]
            keys = (
                newdata[list(term.factors)].astype(str).agg(":".join, axis=1)
                if len(term.factors) > 1
                else (newdata[term.factors[0]].astype(str))
            )
            position = {str(level): i for i, level in enumerate(frame.index)}
            rows = np.array([position.get(k, -1) for k in keys])
            modes = frame[list(term.labels)].to_numpy()
            b = np.where(rows[:, None] >= 0, modes[np.maximum(rows, 0)], 0.0)
            if term.spec is None:
                values = np.ones((len(newdata), 1))
            else:
                values = np.asarray(term.spec.get_model_matrix(newdata), dtype=float)
                if term.columns is not None:
                    values = values[:, list(term.columns)]
            eta = eta + np.sum(values * b, axis=1)
        return eta

    def summary(self) -> str:
        """The fit in the layout of lme4's ``summary(glmer(...))``."""
        lines = [
            "Generalized linear mixed model fit by maximum likelihood (Laplace Approximation) ['glmerMod']"
            if self.nagq == 1
            else "Generalized linear mixed model fit by maximum likelihood (Adaptive Gauss-Hermite Quadrature, "
            f"nAGQ = {self.nagq}) ['glmerMod']",
            f" Family: {self.family}  ( {self.link} )",
            f"Formula: {self.formula}",
            "",
            f"{'AIC':>10}{'BIC':>10}{'logLik':>10}{'deviance':>10}{'df.resid':>10}",
            f"{self.aic:10.1f}{self.bic:10.1f}{self.loglik:10.1f}{self.deviance:10.1f}{self.df_resid:10d}",
            "",
            "Random effects:",
        ]
        vc = self.varcorr
        lines.append(f" {'Groups':<12}{'Name':<14}{'Variance':>10}{'Std.Dev.':>10}")
        for _, row in vc.iterrows():
            lines.append(f" {row['Groups']:<12}{row['Name']:<14}{row['Variance']:10.4g}{row['Std.Dev.']:10.4g}")
        groups = "; ".join(f"{k}, {v}" for k, v in self.ngroups.items())
        lines += [f"Number of obs: {self.nobs}, groups:  {groups}", "", "Fixed effects:"]
        table = self.coef_table()
        width = max(len(n) for n in table.index) + 1
        lines.append(f"{'':<{width}}{'Estimate':>10}{'Std. Error':>12}{'z value':>9}{'Pr(>|z|)':>11}")
        for name, row in table.iterrows():
            lines.append(
                f"{name:<{width}}{row['Estimate']:10.5f}{row['Std. Error']:12.5f}{row['z value']:9.3f}"
                f"{row['Pr(>|z|)']:11.3g}"
            )
        if not self.converged:
            lines += ["", f"Warning: the optimisation did not converge ({self.message})"]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()
