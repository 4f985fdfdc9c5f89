"""The implicit function theorem for a fitted θ̂: derivatives of θ̂ without unrolling the fitting loop.

At an interior optimum the score vanishes, s(θ̂(p); p) = 0, for the data and model arrays p; so
dθ̂ = H⁻¹ (∂s/∂p) dp with H = −∂s/∂θ, restricted to the parameters off their bounds (Blondel et al. 2022,
"Efficient and modular implicit differentiation", NeurIPS). ``implicit_theta`` applies it with s and H by autodiff
of a back end's log-likelihood; the dense back end has a closed-form rule of its own (``dense/implicit.py``).
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero


def is_zero(tangent) -> bool:
    return all(isinstance(t, SymbolicZero) for t in jax.tree_util.tree_leaves(tangent))


def instantiate(tangent):
    def one(t):
        if not isinstance(t, SymbolicZero):
            return t
        if t.dtype == jax.dtypes.float0:
            return np.zeros(t.shape, dtype=jax.dtypes.float0)
        return jnp.zeros(t.shape, t.dtype)

    return jax.tree_util.tree_map(one, tangent, is_leaf=lambda t: isinstance(t, SymbolicZero))


def implicit_step(information, free, d_score):
    """dθ̂ = H⁻¹ ds on the free parameters, by the information's pseudo-inverse (a flat direction gets 0, not inf)."""
    both = free[:, None] & free[None, :]
    information = jnp.where(both, information, jnp.eye(information.shape[0], dtype=information.dtype))
    eigvals, eigvecs = jnp.linalg.eigh(information)
    keep = eigvals > 1e-12 * jnp.max(jnp.abs(eigvals))
    inv = jnp.where(keep, 1.0 / jnp.where(keep, eigvals, 1.0), 0.0)
    d_theta = eigvecs @ (inv * (eigvecs.T @ jnp.where(free, d_score, 0.0)))
    return jnp.where(free, d_theta, 0.0)


def implicit_theta(theta_hat, free, model, y, X, loglik):
    """θ̂ as a differentiable function of (model arrays, y, X), by the theorem with s and H from ``loglik``.

    ``loglik(θ, model, y, X) -> ℓ`` (hashable: a back end's bound method): ∂s/∂p·dp is a forward-mode product
    through the reverse-mode score and H = −∂s/∂θ its Jacobian in θ (k×k). For the equations' back ends no n×n
    matrix is formed (q×q factorisations, O(nq² + q³)), so a gradient through a fit scales like the fit.
    """
    dynamic, static = eqx.partition(model, eqx.is_array)
    return _theta(static, loglik, jax.lax.stop_gradient(theta_hat), free, dynamic, y, X)


def _loglik(theta, dynamic, y, X, static, config):
    return config(theta, eqx.combine(dynamic, static), y, X)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _theta(static, config, theta_hat, free, dynamic, y, X):
    return theta_hat


def _theta_jvp(static, config, primals, tangents):
    theta, free, dynamic, y, X = primals
    _, _, d_dynamic, d_y, d_X = tangents
    if is_zero((d_dynamic, d_y, d_X)):
        return theta, jnp.zeros_like(theta)
    d_dynamic, d_y, d_X = instantiate((d_dynamic, d_y, d_X))
    loglik = functools.partial(_loglik, static=static, config=config)
    information = -jax.hessian(loglik)(theta, dynamic, y, X)

    def score(dyn, yy, xx):
        return jax.grad(loglik)(theta, dyn, yy, xx)

    _, d_score = jax.jvp(score, (dynamic, y, X), (d_dynamic, d_y, d_X))
    return theta, implicit_step(0.5 * (information + information.T), free, d_score)


_theta.defjvp(_theta_jvp, symbolic_zeros=True)
