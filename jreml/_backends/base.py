"""What every back end shares: the quantities at one θ (``Core``, ``Derivatives``), ℓ from its pieces, a checked
Cholesky factor, and the interface ``AbstractBackend`` that the fitting loop, ``estimate`` and the implicit
gradients call without knowing which back end runs.

A back end evaluates, for y ~ N(Xβ, V(θ)) (n observations, p fixed effects, k parameters), ℓ_REML or ℓ_ML in lme4's
convention, β̂, Py = V⁻¹(y − Xβ̂), the score ∂ℓ/∂θ (k) and an information matrix (k×k) — by its own factorisation
of V: the n×n Cholesky factor (``dense``), the mixed-model equations' q×q one (``mme``), the blocked sparse one
(``sparse``); the spectral path of σ²_k·K + σ²_e·I (``spectral``) has its own batched loop.
"""

from __future__ import annotations

import abc
import math
from typing import Any, NamedTuple

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

#: The information matrices a back end gives (``evaluate(information=)``).
INFORMATION = ("ai", "fisher", "observed", "none")


class Core(NamedTuple):
    """Quantities at one θ from a single factorisation of V.

    ``factor`` is the back end's factorisation: chol(V) (n×n) here; the mixed-model-equations back end keeps
    (σ², Λ, chol(A)) instead (``_backends.mme.MMEFactor``). The other fields mean the same for both.
    """

    ok: Bool[Array, ""]
    factor: Any
    v_inv_x: Float[Array, "n p"]
    chol_xvx: Float[Array, "p p"]
    beta: Float[Array, " p"]
    p_y: Float[Array, " n"]
    loglik: Float[Array, ""]


class Derivatives(NamedTuple):
    """Score and the requested information matrix at θ."""

    score: Float[Array, " k"]
    information: Float[Array, "k k"]


def gaussian_loglik(logdet_v, chol_xvx, quad, n: int, reml: bool):
    """ℓ from its pieces (lme4's convention, p = rank X): log|V|, chol(XᵀV⁻¹X) (p×p) and rᵀV⁻¹r, r = y − Xβ̂.

    ℓ_REML = −½[log|V| + log|XᵀV⁻¹X| + (n−p)·log 2π + rᵀV⁻¹r],   ℓ_ML = −½[log|V| + n·log 2π + rᵀV⁻¹r].
    """
    log2pi = math.log(2.0 * math.pi)
    if reml:
        p = chol_xvx.shape[0]
        logdet_x = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol_xvx)))
        return -0.5 * (logdet_v + logdet_x + (n - p) * log2pi + quad)
    return -0.5 * (logdet_v + n * log2pi + quad)


def _cholesky(matrix):
    factor = jnp.linalg.cholesky(matrix)
    ok = jnp.all(jnp.isfinite(factor))
    # Keep every downstream quantity finite when V is not positive definite; `ok` carries the failure.
    eye = jnp.eye(matrix.shape[0], dtype=matrix.dtype)
    return jnp.where(ok, factor, eye), ok


class AbstractBackend(eqx.Module):
    """The interface of a back end (an equinox Module: its fields are its static configuration).

    ``prepare`` computes the θ-independent pieces once per fit (ZᵀZ, ZᵀX, ... for the equations; nothing for the
    dense path); ``evaluate`` gives the ``Core`` and the score with the requested information at one θ (what each
    iteration of the loop needs); ``core`` the ``Core`` alone, differentiably in θ and the data; ``fitted`` the
    final, differentiable evaluation at θ̂ (θ̂ returned through the implicit function theorem, so that gradients
    of anything computed from a fit reach the data and the model's constants without unrolling the loop).
    """

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """The back end's name (``BackendChoice.name``)."""

    @abc.abstractmethod
    def prepare(self, model, y: Float[Array, " n"], X: Float[Array, "n p"]) -> Any:
        """θ-independent pieces (a pytree of arrays), computed once per fit."""

    @abc.abstractmethod
    def core(self, theta: Float[Array, " k"], model, y, X, state, *, reml: bool) -> Core:
        """ℓ, β̂, Py at θ (``ok`` False and ℓ = −inf where V(θ) is not positive definite)."""

    @abc.abstractmethod
    def evaluate(self, theta, model, y, X, state, *, reml: bool, information: str) -> tuple[Core, Derivatives]:
        """``core`` plus the score and the information matrix ``information`` (one of ``INFORMATION``)."""

    @abc.abstractmethod
    def fitted(self, theta_hat, free, model, y, X, state, *, reml: bool) -> tuple[Array, Core, Derivatives]:
        """(θ̂, core, score and AI) at the loop's θ̂, with θ̂'s derivatives from the implicit function theorem
        (``free``: the parameters off their bounds, the others held)."""
