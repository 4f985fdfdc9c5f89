"""FitResult: an immutable pytree with estimates, standard errors, BLUE/BLUP, predictions and history."""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from ._covariance.base import AbstractCovariance
from ._covariance.compose import DummyMatrix
from ._likelihood import core, trace_weight
from ._solvers.loop import STATUS_MESSAGES, History


class FitResult(eqx.Module):
    """The result of :func:`jreml.estimate` (works under ``jax.vmap``: every array leaf gains a batch axis).

    Fields: ``theta`` (θ̂), ``natural_params`` (``params``: name → natural-scale value), ``beta`` (β̂, the BLUE),
    ``vcov_beta`` = (XᵀV̂⁻¹X)⁻¹, ``se_beta``, ``loglik`` (lme4 convention), ``converged``, ``n_iter``, ``status``,
    ``singular`` (some variance at its lower boundary), ``score``, ``information`` (AI at θ̂),
    ``vcov_theta`` (inverse AI, pseudo-inverse where singular), ``history`` and the data (``model``, ``y``, ``X``).
    """

    theta: Float[Array, " k"]
    natural_params: Float[Array, " k"]
    beta: Float[Array, " p"]
    vcov_beta: Float[Array, "p p"]
    se_beta: Float[Array, " p"]
    loglik: Float[Array, ""]
    converged: Bool[Array, ""]
    n_iter: Int[Array, ""]
    status: Int[Array, ""]
    singular: Bool[Array, ""]
    at_boundary: Bool[Array, " k"]
    score: Float[Array, " k"]
    information: Float[Array, "k k"]
    vcov_theta: Float[Array, "k k"]
    history: History
    p_y: Float[Array, " n"]
    model: AbstractCovariance
    y: Float[Array, " n"]
    X: Float[Array, "n p"]
    method: str = eqx.field(static=True)
    algorithm: str = eqx.field(static=True)
    param_names: tuple[str, ...] = eqx.field(static=True)
    beta_names: tuple[str, ...] | None = eqx.field(static=True, default=None)
    formula: str | None = eqx.field(static=True, default=None)
    n_dropped: int = eqx.field(static=True, default=0)

    @property
    def params(self) -> dict[str, Float[Array, "..."]]:
        """Natural-scale parameters (variances, covariances, correlations) by name, in θ's order."""
        return {name: self.natural_params[..., i] for i, name in enumerate(self.param_names)}

    @property
    def fixef(self) -> dict[str, float]:
        """β̂ by fixed-effect name (fits from :func:`jreml.fit`, which record ``beta_names``)."""
        return self._by_beta_name(self.beta)

    @property
    def se(self) -> dict[str, float]:
        """Standard errors of β̂ by fixed-effect name (fits from :func:`jreml.fit`)."""
        return self._by_beta_name(self.se_beta)

    def _by_beta_name(self, values) -> dict[str, float]:
        if self.beta_names is None:
            raise AttributeError("this fit has no fixed-effect names (beta_names); use .beta / .se_beta")
        return {name: float(v) for name, v in zip(self.beta_names, np.asarray(values), strict=True)}

    @property
    def nobs(self) -> int:
        return self.y.shape[-1]

    @property
    def num_params(self) -> int:
        """Degrees of freedom of the log-likelihood as lme4 counts them: p fixed + k covariance parameters."""
        return self.X.shape[-1] + self.theta.shape[-1]

    @property
    def aic(self):
        return -2.0 * self.loglik + 2.0 * self.num_params

    @property
    def bic(self):
        return -2.0 * self.loglik + math.log(self.nobs) * self.num_params

    @property
    def message(self) -> str:
        return STATUS_MESSAGES.get(int(self.status), f"status {int(self.status)}")

    # --- BLUE / BLUP / predictions -------------------------------------------------------------------
    def _term_parts(self, term):
        theta_g = self.theta[term.offset : term.offset + term.G.num_free_params]
        theta_z = self.theta[term.offset - term.Z.num_free_params : term.offset]
        return term.Z, term.Z(theta_z) if not isinstance(term.Z, DummyMatrix) else None, term.G(theta_g)

    def _z_transpose(self, Z, z_dense, vector):
        if z_dense is None:
            summed = jax.ops.segment_sum(vector, Z.codes, num_segments=Z.n_levels)
            return summed[1:] if Z.drop_first else summed
        return z_dense.T @ vector

    def _z_times(self, Z, z_dense, u):
        if z_dense is None:
            full = jnp.concatenate([jnp.zeros((1,), u.dtype), u]) if Z.drop_first else u
            return full[Z.codes]
        return z_dense @ u

    def blup(self, with_sd: bool = False, prediction_error: bool = False):
        """BLUPs û = G Zᵀ P y of every Z·G·Zᵀ term, as {term name: (q,) array}.

        With ``with_sd=True`` returns {name: (û, sd)}: by default sd² = diag(G − G Zᵀ V⁻¹ Z G), the conditional
        variance of u given y at β = β̂ (lme4's ``condVar``); with ``prediction_error=True``
        sd² = diag(G − G Zᵀ P Z G), the prediction-error variance that also counts the uncertainty of β̂
        (Henderson 1975; ASReml's "PEV").
        """
        out = {}
        weight = None
        for term in self.model.random_terms():
            Z, z_dense, g = self._term_parts(term)
            u = g @ self._z_transpose(Z, z_dense, self.p_y)
            if not with_sd:
                out[term.name] = u
                continue
            if weight is None:
                c = core(self.theta, self.y, self.X, self.model, self.method == "reml")
                weight = trace_weight(c, reml=prediction_error)
            z = z_dense if z_dense is not None else Z(jnp.zeros((0,), self.theta.dtype))
            zg = z @ g
            cond_var = jnp.diagonal(g) - jnp.sum(zg * (weight @ zg), axis=0)
            out[term.name] = (u, jnp.sqrt(jnp.maximum(cond_var, 0.0)))
        return out

    def marginal_predict(self, X=None):
        """Xβ̂ (fixed effects only); ``X`` defaults to the fitted design."""
        return (self.X if X is None else jnp.asarray(X)) @ self.beta

    def predict(self):
        """Conditional predictions Xβ̂ + Σ_terms Z û on the fitted data."""
        fitted = self.X @ self.beta
        for term in self.model.random_terms():
            Z, z_dense, g = self._term_parts(term)
            u = g @ self._z_transpose(Z, z_dense, self.p_y)
            fitted = fitted + self._z_times(Z, z_dense, u)
        return fitted

    def residuals(self):
        """Conditional residuals y − Xβ̂ − Σ Z û."""
        return self.y - self.predict()

    def marginal_residuals(self):
        """Marginal residuals y − Xβ̂."""
        return self.y - self.X @ self.beta

    # --- display ----------------------------------------------------------------------------------
    def summary(self, beta_names=None) -> str:
        """A plain-text summary (lme4-like: criterion, variance parameters, fixed effects)."""
        if np.ndim(self.loglik) != 0:
            return f"FitResult batched over {np.shape(self.loglik)} fits ({self.method.upper()}, {self.algorithm})"
        lines = [f"Formula: {self.formula}"] if self.formula else []
        lines += [
            f"Linear mixed model fit by {self.method.upper()} ({self.algorithm}), "
            f"n = {self.nobs}, {self.message} after {int(self.n_iter)} iterations"
            + (f" ({self.n_dropped} rows with missing values dropped)" if self.n_dropped else ""),
            f"  logLik {float(self.loglik):.4f}   AIC {float(self.aic):.4f}   BIC {float(self.bic):.4f}"
            + ("   (singular: a variance is at its boundary)" if bool(self.singular) else ""),
            "Covariance parameters:",
        ]
        width = max([len(n) for n in self.param_names] + [10])
        se = np.sqrt(np.maximum(np.diagonal(np.asarray(self.vcov_theta)), 0.0))
        for name, theta_se in zip(self.param_names, se, strict=True):
            lines.append(f"  {name:<{width}} {float(self.params[name]):14.6g}   (SE of theta {theta_se:.3g})")
        lines.append("Fixed effects:")
        names = beta_names or self.beta_names or [f"beta[{i}]" for i in range(self.beta.shape[0])]
        width = max([len(n) for n in names] + [10])
        lines.append(f"  {'':<{width}} {'Estimate':>14} {'Std. Error':>12} {'t value':>9}")
        for name, b, s in zip(names, np.asarray(self.beta), np.asarray(self.se_beta), strict=True):
            lines.append(f"  {name:<{width}} {b:14.6g} {s:12.6g} {b / s:9.3f}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()
