r"""The public likelihood functions: ℓ_REML, ℓ_ML, the score and the information matrices of y ~ N(Xβ, V(θ)) at one
θ, evaluated by the dense back end (``_backends/dense.py``, where the formulas and their sources are), pure and
jittable, in lme4's log-likelihood convention (README, "Log-likelihood convention").
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._backends.dense import DERIVATIVES, core, derivatives_at

__all__ = [
    "DERIVATIVES",
    "METHODS",
    "average_information",
    "check_method",
    "fisher_information",
    "loglik",
    "ml_loglik",
    "observed_information",
    "reml_loglik",
    "score",
]

METHODS = ("reml", "ml")


def check_method(method: str) -> bool:
    """True for REML, False for ML; a clear error for anything else."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return method == "reml"


@eqx.filter_jit
def reml_loglik(
    theta: Float[Array, " k"], y: Float[Array, " n"], X: Float[Array, "n p"], v_builder
) -> Float[Array, ""]:
    """Restricted log-likelihood ℓ_REML(θ) in lme4's convention (−inf where V(θ) is not PD)."""
    return core(theta, y, X, v_builder, reml=True).loglik


def ml_loglik(theta: Float[Array, " k"], y: Float[Array, " n"], X: Float[Array, "n p"], v_builder) -> Float[Array, ""]:
    """Full (ML) log-likelihood ℓ_ML(θ) with β profiled at its GLS estimate (−inf where V is not PD)."""
    return core(theta, y, X, v_builder, reml=False).loglik


def loglik(theta, y, X, v_builder, method: str = "reml"):
    """ℓ_REML or ℓ_ML by ``method``."""
    return core(theta, y, X, v_builder, reml=check_method(method)).loglik


def _prepare(theta, y, X):
    return jnp.asarray(theta), jnp.asarray(y), jnp.asarray(X)


@eqx.filter_jit
def score(theta, y, X, v_builder, *, method="reml", derivatives="auto", dv_builder=None) -> Float[Array, " k"]:
    """∂ℓ/∂θ (k,) for ``method`` = "reml" or "ml"."""
    theta, y, X = _prepare(theta, y, X)
    reml = check_method(method)
    c = core(theta, y, X, v_builder, reml)
    return derivatives_at(
        theta,
        y,
        X,
        v_builder,
        c,
        reml=reml,
        information="none",
        derivatives=derivatives,
        dv_builder=dv_builder,
    ).score


@eqx.filter_jit
def _information(kind, theta, y, X, v_builder, method, derivatives, dv_builder):
    theta, y, X = _prepare(theta, y, X)
    reml = check_method(method)
    c = core(theta, y, X, v_builder, reml)
    return derivatives_at(
        theta, y, X, v_builder, c, reml=reml, information=kind, derivatives=derivatives, dv_builder=dv_builder
    ).information


def average_information(theta, y, X, v_builder, *, method="reml", derivatives="auto", dv_builder=None):
    """AI_kl = ½ (V_k Py)ᵀ M (V_l Py), the average of observed and expected information (k×k)."""
    return _information("ai", theta, y, X, v_builder, method, derivatives, dv_builder)


def fisher_information(theta, y, X, v_builder, *, method="reml", derivatives="auto", dv_builder=None):
    """Expected information ½ tr(M V_k M V_l) (k×k)."""
    return _information("fisher", theta, y, X, v_builder, method, derivatives, dv_builder)


def observed_information(theta, y, X, v_builder, *, method="reml", derivatives="auto", dv_builder=None):
    """Observed information −∂²ℓ/∂θ∂θᵀ (k×k), by autodiff of the Cholesky-based log-likelihood."""
    return _information("observed", theta, y, X, v_builder, method, derivatives, dv_builder)
