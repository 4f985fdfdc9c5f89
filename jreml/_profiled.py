r"""Profiled REML / ML objectives: φ ↦ −ℓ with β (and the residual variance σ²) profiled out.

``profiled_reml(model, y, X)`` and ``profiled_ml(model, y, X)`` return a :class:`ProfiledObjective`, a pure
callable (an ``equinox.Module``) φ ↦ −ℓ, ready for ``jax.value_and_grad`` and optax.

Residual scale. When the model is a :class:`Sum` with a :class:`ScalarMatrix` among its top-level terms, the
LAST such term is the residual σ²·I and V(θ) = σ²·V₀(φ), where V₀(φ) is the model evaluated with the residual
term at σ² = 1 and every other term at its *relative* parameters φ: the θ that gives that term's matrix divided
by σ². The map θ ↔ (φ, σ²) is exact, per module (``c = σ²``, applied to every non-residual term):

- ``Exp`` variances (ScalarMatrix, DiagonalMatrix, FixedMatrix, KnownDiagonalMatrix, the variance of AR1 /
  compound symmetry): φ = θ − log(c)/power (power 1: log-variance minus log σ²). Correlations are unchanged.
- ``UnstructuredMatrix`` (log-Cholesky): diagonal φ = θ − ½·log c, off-diagonal φ = θ / √c.
- ``CovariancePropagation``: its G is rescaled (Z unchanged); ``KroneckerProduct``: A if A has parameters,
  otherwise B; a nested ``Sum``: every term.
- Any other module (``CustomMatrix``, a parameter-free term) cannot be rescaled: a ``ValueError`` is raised and
  only β can be profiled (``profile_scale=False``).

φ has the model's θ layout with the residual entry removed. Given φ, σ² is profiled at its closed form
σ̂²(φ) = rᵀV₀⁻¹r/(n − p) (REML) or /n (ML), r = y − Xβ̂(φ), and (lme4's profiled deviance)

    −2ℓ_REML = log|V₀| + log|XᵀV₀⁻¹X| + (n − p)(1 + log(2π σ̂²))
    −2ℓ_ML   = log|V₀| + n(1 + log(2π σ̂²))

equal to −2ℓ(θ) at θ = ``to_theta(φ)``. Without a residual term, φ = θ and only β is profiled (−ℓ = −ℓ(θ)).
Only Cholesky factors and triangular solves are used. A V₀ that is not positive definite gives +inf.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular
from jaxtyping import Array, Float

from ._backends.dense.likelihood import core
from ._config import as_float_array
from ._covariance.base import AbstractCovariance
from ._covariance.compose import Sum
from ._covariance.queries import is_covariance, rescale_theta, residual_index
from ._likelihood import check_method


class ProfiledObjective(eqx.Module):
    """φ ↦ −ℓ (REML or ML) with β, and σ² where the model has a residual term, profiled out.

    Call it with φ (shape ``(num_params,)``); ``to_theta(phi)`` maps back to the model's θ (then
    ``model.build_params(theta)`` gives the variance components) and ``to_phi(theta)`` maps θ to φ.
    """

    model: AbstractCovariance
    y: Float[Array, " n"]
    X: Float[Array, "n p"]
    reml: bool = eqx.field(static=True)
    residual_position: int | None = eqx.field(static=True)  # index of the residual entry in θ, or None

    @property
    def profiles_scale(self) -> bool:
        return self.residual_position is not None

    @property
    def num_params(self) -> int:
        return self.model.num_free_params - (1 if self.profiles_scale else 0)

    def _residual(self) -> AbstractCovariance:
        return self.model.terms[residual_index(self.model)]

    def _rescale_others(self, phi, log_c):
        """Rescale the non-residual terms' θ entries (φ) by c = exp(log_c)."""
        i = residual_index(self.model)
        others = [t for j, t in enumerate(self.model.terms) if j != i]
        return rescale_theta(Sum(*others), phi, log_c) if others else phi

    def _insert(self, phi, value):
        r = self.residual_position
        return jnp.concatenate([phi[:r], jnp.reshape(value, (1,)).astype(phi.dtype), phi[r:]])

    def _pieces(self, phi, y, X):
        """log|V₀|, log|XᵀV₀⁻¹X|, rᵀV₀⁻¹r and the PD flag, with V₀ = model(φ with residual θ = 0)."""
        n = y.shape[0]
        v0 = self.model(self._insert(phi, 0.0))
        v0 = 0.5 * (v0 + v0.T)
        chol = jnp.linalg.cholesky(v0)
        ok_v = jnp.all(jnp.isfinite(chol))
        chol = jnp.where(ok_v, chol, jnp.eye(n, dtype=v0.dtype))
        y_t = solve_triangular(chol, y, lower=True)
        x_t = solve_triangular(chol, X, lower=True)
        xtx = x_t.T @ x_t
        chol_x = jnp.linalg.cholesky(0.5 * (xtx + xtx.T))
        ok_x = jnp.all(jnp.isfinite(chol_x))
        chol_x = jnp.where(ok_x, chol_x, jnp.eye(X.shape[1], dtype=v0.dtype))
        # β̂ = (X̃ᵀX̃)⁻¹X̃ᵀỹ; r̃ = ỹ − X̃β̂ and rᵀV₀⁻¹r = r̃ᵀr̃.
        u = solve_triangular(chol_x, x_t.T @ y_t, lower=True)
        beta = solve_triangular(chol_x.T, u, lower=False)
        r_t = y_t - x_t @ beta
        quad = r_t @ r_t
        logdet_v = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol)))
        logdet_x = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol_x)))
        return logdet_v, logdet_x, quad, ok_v & ok_x & (quad > 0)

    def _dof(self, y, X) -> int:
        n, p = X.shape
        return n - p if self.reml else n

    def sigma2(self, phi, y=None, X=None) -> Float[Array, ""]:
        """σ̂²(φ) = rᵀV₀⁻¹r/(n − p) (REML) or /n (ML)."""
        y, X = (self.y if y is None else y), (self.X if X is None else X)
        _, _, quad, _ = self._pieces(phi, y, X)
        return quad / self._dof(y, X)

    def __call__(self, phi: Float[Array, " k"]) -> Float[Array, ""]:
        """−ℓ at φ (+inf where V₀ is not positive definite)."""
        if not self.profiles_scale:
            loglik = core(phi, self.y, self.X, self.model, self.reml).loglik
            return -loglik
        y, X = self.y, self.X
        logdet_v, logdet_x, quad, ok = self._pieces(phi, y, X)
        dof = self._dof(y, X)
        safe_quad = jnp.where(ok, quad, 1.0)
        total = logdet_v + dof * (1.0 + math.log(2.0 * math.pi) + jnp.log(safe_quad / dof))
        if self.reml:
            total = total + logdet_x
        value = 0.5 * total
        return jnp.where(ok & jnp.isfinite(value), value, jnp.inf)

    def to_theta(self, phi: Float[Array, " k"], y=None, X=None) -> Float[Array, " K"]:
        """The model's θ at φ, with σ² = σ̂²(φ) (on y, X: default the objective's own data)."""
        phi = jnp.asarray(phi)
        if not self.profiles_scale:
            return phi
        log_s2 = jnp.log(self.sigma2(phi, y, X))
        others = self._rescale_others(phi, log_s2)
        return self._insert(others, log_s2 / self._residual().transform.power)

    def to_phi(self, theta: Float[Array, " K"]) -> Float[Array, " k"]:
        """φ of a full θ (the inverse of ``to_theta`` when σ² = σ̂²(φ))."""
        theta = jnp.asarray(theta)
        if not self.profiles_scale:
            return theta
        r = self.residual_position
        log_s2 = theta[r] * self._residual().transform.power
        others = jnp.concatenate([theta[:r], theta[r + 1 :]])
        return self._rescale_others(others, -log_s2)


def _profiled(v_builder, y, X, reml: bool, profile_scale: bool) -> ProfiledObjective:
    y = as_float_array(y, "y")
    X = jnp.ones((y.shape[0], 1), y.dtype) if X is None else as_float_array(X, "X")
    if not is_covariance(v_builder):
        raise TypeError("profiled objectives need a covariance module (wrap plain functions in CustomMatrix)")
    if v_builder.shape != (y.shape[0], y.shape[0]):
        raise ValueError(f"the covariance model is {v_builder.shape} but y has {y.shape[0]} observations")
    position = None
    index = residual_index(v_builder) if profile_scale else None
    if index is not None:
        position = sum(t.num_free_params for t in v_builder.terms[:index])
        # Fail now (not inside a trace) if some term cannot be rescaled.
        for j, term in enumerate(v_builder.terms):
            if j != index:
                rescale_theta(term, jnp.zeros(term.num_free_params, y.dtype), jnp.zeros((), y.dtype))
    return ProfiledObjective(v_builder, y, X, reml, position)


def profiled_reml(v_builder, y, X=None, *, profile_scale: bool = True) -> ProfiledObjective:
    """φ ↦ −ℓ_REML with β and (where the model has a residual ScalarMatrix term) σ² profiled out."""
    return _profiled(v_builder, y, X, True, profile_scale)


def profiled_ml(v_builder, y, X=None, *, profile_scale: bool = True) -> ProfiledObjective:
    """φ ↦ −ℓ_ML with β and (where the model has a residual ScalarMatrix term) σ² profiled out."""
    return _profiled(v_builder, y, X, False, profile_scale)


def profiled(v_builder, y, X=None, *, method: str = "reml", profile_scale: bool = True) -> ProfiledObjective:
    """``profiled_reml`` or ``profiled_ml`` by ``method``."""
    return _profiled(v_builder, y, X, check_method(method), profile_scale)
