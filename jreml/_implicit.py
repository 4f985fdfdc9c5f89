r"""Derivatives of the fitted θ̂ by the implicit function theorem (not by unrolling the iterations).

At an interior optimum the score vanishes: s(θ̂(p); p) = 0 for the data and model arrays p = (model leaves,
y, X). Differentiating, with H = −∂s/∂θ the observed information at θ̂,

    dθ̂ = H⁻¹ · (∂s/∂p) dp,

restricted to the free parameters (those held at a bound, e.g. a variance at 0, have dθ̂ = 0).
The rule is a ``jax.custom_jvp`` whose tangent is linear in dp, so JAX transposes it for reverse mode:
``jax.jvp`` costs one JVP of the score plus a k×k solve; ``jax.grad`` one VJP of the score plus the
same solve. Everything downstream of θ̂ (β̂, BLUPs, variance components) is differentiated by ordinary
autodiff. (Implicit differentiation of optimisation layers: e.g. Blondel et al. 2022, "Efficient and
modular implicit differentiation", NeurIPS.)
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp

from ._likelihood import core, trace_weight


def _score(theta, dynamic, static, y, X, reml):
    model = eqx.combine(dynamic, static)
    return jax.grad(lambda t: core(t, y, X, model, reml).loglik)(theta)


def observed_information_at(theta, model, y, X, reml: bool):
    """−∂²ℓ/∂θ∂θᵀ from one factorisation, without differentiating through the Cholesky factor:

        −H_kl = (V_k Py)ᵀ P (V_l Py) − ½ tr(M V_k M V_l) − ½ ⟨(Py)(Py)ᵀ − M, V_kl⟩,

    with M = P (REML) or V⁻¹ (ML), V_k by forward mode and the V_kl term as the Hessian of the cheap scalar
    θ' ↦ ½⟨W, V(θ')⟩ at fixed W (Harville 1977, §4; the same algebra as the AI matrix).
    """
    c = core(theta, y, X, model, reml)
    weight = trace_weight(c, reml)
    projection = weight if reml else trace_weight(c, True)
    dv = jnp.moveaxis(jax.jacfwd(model)(theta), -1, 0)
    dv_py = jnp.einsum("kij,j->ik", dv, c.p_y)
    m_dv = jnp.einsum("ij,kjl->kil", weight, dv)
    fisher = 0.5 * jnp.einsum("kij,lji->kl", m_dv, m_dv)
    w = jnp.outer(c.p_y, c.p_y) - weight
    curvature = jax.hessian(lambda t: 0.5 * jnp.sum(w * model(t)))(theta)
    info = dv_py.T @ (projection @ dv_py) - fisher - curvature
    return 0.5 * (info + info.T)


def implicit_theta(theta_hat, free, model, y, X, reml: bool):
    """θ̂ as a differentiable function of (model arrays, y, X); ``theta_hat`` is the solver's answer."""
    dynamic, static = eqx.partition(model, eqx.is_array)
    return _implicit(static, reml, jax.lax.stop_gradient(theta_hat), free, dynamic, y, X)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _implicit(static, reml, theta_hat, free, dynamic, y, X):
    return theta_hat


@_implicit.defjvp
def _implicit_jvp(static, reml, primals, tangents):
    theta_hat, free, dynamic, y, X = primals
    _, _, d_dynamic, d_y, d_X = tangents
    _, d_score = jax.jvp(
        lambda dyn, yy, xx: _score(theta_hat, dyn, static, yy, xx, reml), (dynamic, y, X), (d_dynamic, d_y, d_X)
    )
    information = observed_information_at(theta_hat, eqx.combine(dynamic, static), y, X, reml)
    both = free[:, None] & free[None, :]
    information = jnp.where(both, information, jnp.eye(theta_hat.shape[0], dtype=theta_hat.dtype))
    # Eigen-solve with the information's pseudo-inverse: a flat direction gets no sensitivity, not inf.
    eigvals, eigvecs = jnp.linalg.eigh(information)
    keep = eigvals > 1e-12 * jnp.max(jnp.abs(eigvals))
    inv = jnp.where(keep, 1.0 / jnp.where(keep, eigvals, 1.0), 0.0)
    d_theta = eigvecs @ (inv * (eigvecs.T @ jnp.where(free, d_score, 0.0)))
    return theta_hat, jnp.where(free, d_theta, 0.0)
