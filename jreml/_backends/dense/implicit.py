r"""The dense back end's derivatives through a fit by the implicit function theorem (not by unrolling the iterations).

At an interior optimum the score vanishes: s(θ̂(p); p) = 0 for the data and model arrays p = (model leaves φ,
y, X). Differentiating, with H = −∂s/∂θ the observed information at θ̂,

    dθ̂ = H⁻¹ · (∂s/∂p) dp,

restricted to the free parameters (those held at a bound, e.g. a variance at 0, have dθ̂ = 0). The final
evaluation at θ̂ (Cholesky factor of V, GLS β̂, Py, ℓ) is differentiated in the same rule, in closed form.

Everything is one ``jax.custom_jvp`` whose tangent is linear in dp and is written with the primal
matrices already at hand (M, M·V_k, the Cholesky factors), so that ``jax.grad`` — JAX's transpose of the
rule — costs one n×n matrix product, a few matrix–vector products and one pullback of the covariance module,
never a reverse pass through a Cholesky factorisation. With u = Py, M = P (REML) or V⁻¹ (ML),
V_k = ∂V/∂θ_k, A = XᵀV⁻¹X, B = V⁻¹X·A⁻¹ and dV the change of V from dφ at fixed θ:

    du    = P(dy − dV·u − dX·β̂) − B·dXᵀu
    ds_k  = (V_k u)ᵀ du + ½ tr(M dV M V_k) + ½⟨uuᵀ − M, dV_k⟩ + [REML] ⟨dX, P V_k B⟩
    dβ̂    = A⁻¹ [dXᵀu + (V⁻¹X)ᵀ(dy − dX·β̂ − dV_tot·u)],      dV_tot = dV + Σ_k V_k dθ̂_k
    dℓ    = −uᵀdy + uᵀdX·β̂ − ½⟨M, dV_tot⟩ + ½ uᵀ dV_tot u − [REML] ⟨dX, B⟩

(Harville 1977, JASA 72:320 for the derivatives of P; implicit differentiation of optimisation layers:
Blondel et al. 2022, "Efficient and modular implicit differentiation", NeurIPS.)

The other back ends use the general form of the theorem (``_backends.implicit.implicit_theta``): s and H by
autodiff of their own log-likelihood, so that no n×n matrix is formed.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jax.scipy.linalg import cho_solve, solve_triangular

from ..base import Core
from ..implicit import implicit_step, instantiate, is_zero
from .likelihood import core, trace_weight


class _Curvature(NamedTuple):
    """Primal quantities at θ̂ shared by the information matrix and the tangent rule."""

    weight: jax.Array  # M (n, n)
    dv: jax.Array  # V_k (k, n, n)
    m_dv: jax.Array  # M V_k (k, n, n)
    dv_u: jax.Array  # V_k u as columns (n, k)
    b: jax.Array  # B = V⁻¹X A⁻¹ (n, p)
    information: jax.Array  # −∂²ℓ/∂θ∂θᵀ (k, k)


def _apply_projection(c: Core, weight, b, reml: bool, r):
    """P·r; for ML (M = V⁻¹) as V⁻¹r − B·(V⁻¹X)ᵀr, without forming P."""
    if reml:
        return weight @ r
    return weight @ r - b @ (c.v_inv_x.T @ r)


def _curvature(theta, model, y, X, c: Core, reml: bool) -> _Curvature:
    """M, V_k, M·V_k and the observed information from one factorisation (no derivative of the Cholesky factor):

        −H_kl = (V_k u)ᵀ P (V_l u) − ½ tr(M V_k M V_l) − ½ ⟨uuᵀ − M, V_kl⟩,

    with the V_kl term as the Hessian of the cheap scalar θ' ↦ ½⟨W, V(θ')⟩ at fixed W (Harville 1977, §4; the
    same algebra as the AI matrix).
    """
    weight = trace_weight(c, reml)
    b = cho_solve((c.chol_xvx, True), c.v_inv_x.T).T
    dv = jnp.moveaxis(jax.jacfwd(model)(theta), -1, 0)
    dv_u = jnp.einsum("kij,j->ik", dv, c.p_y)
    m_dv = jnp.stack([_times(weight, dv_k) for dv_k in dv])
    # tr(M V_k M V_l) = ⟨M V_k, (M V_l)ᵀ⟩ as one k×n² by n²×k product.
    flat = m_dv.reshape(m_dv.shape[0], -1)
    flat_t = jnp.swapaxes(m_dv, 1, 2).reshape(m_dv.shape[0], -1)
    fisher = 0.5 * flat @ flat_t.T
    w = jnp.outer(c.p_y, c.p_y) - weight
    curvature = jax.hessian(lambda t: 0.5 * jnp.sum(w * model(t)))(theta)
    info = dv_u.T @ _apply_projection(c, weight, b, reml, dv_u) - fisher - curvature
    return _Curvature(weight, dv, m_dv, dv_u, b, 0.5 * (info + info.T))


def _times(matrix, dv_k):
    """matrix·V_k; a diagonal V_k (a residual variance, say) scales columns instead of a matrix product."""
    diagonal = jnp.diagonal(dv_k)
    index = jnp.arange(dv_k.shape[0])
    is_diagonal = jnp.all((dv_k == 0) | (index[:, None] == index[None, :]))
    return jax.lax.cond(is_diagonal, lambda: matrix * diagonal[None, :], lambda: matrix @ dv_k)


def observed_information_at(theta, model, y, X, reml: bool):
    """−∂²ℓ/∂θ∂θᵀ (k, k) at θ, in closed form (see :func:`_curvature`)."""
    return _curvature(theta, model, y, X, core(theta, y, X, model, reml), reml).information


def fitted_core(theta_hat, free, model, y, X, reml: bool) -> tuple[jax.Array, Core]:
    """(θ̂, core at θ̂) as differentiable functions of (model arrays, y, X); ``theta_hat`` is the solver's answer."""
    dynamic, static = eqx.partition(model, eqx.is_array)
    return _fitted(static, reml, jax.lax.stop_gradient(theta_hat), free, dynamic, y, X)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _fitted(static, reml, theta_hat, free, dynamic, y, X):
    return theta_hat, core(theta_hat, y, X, eqx.combine(dynamic, static), reml)


def _cholesky_tangent(chol, d_matrix):
    """dL for L = chol(A): L·Φ(L⁻¹ dA L⁻ᵀ), Φ = lower triangle with half the diagonal (Murray 2016, eq. 10)."""
    inner = solve_triangular(chol, solve_triangular(chol, d_matrix, lower=True).T, lower=True).T
    phi = jnp.tril(inner) - 0.5 * jnp.diag(jnp.diagonal(inner))
    return chol @ phi


def _fitted_jvp(static, reml, primals, tangents):
    theta, free, dynamic, y, X = primals
    _, _, d_dynamic, d_y, d_X = tangents
    model = eqx.combine(dynamic, static)
    c = core(theta, y, X, model, reml)
    curv = _curvature(theta, model, y, X, c, reml)
    u, beta, weight, b = c.p_y, c.beta, curv.weight, curv.b
    d_y = jnp.zeros_like(y) if isinstance(d_y, SymbolicZero) else d_y
    d_X = jnp.zeros_like(X) if isinstance(d_X, SymbolicZero) else d_X

    def project(r):
        return _apply_projection(c, weight, b, reml, r)

    # ∂s/∂p · dp at fixed θ.
    residual = d_y - d_X @ beta
    d_score = curv.dv_u.T @ (project(residual) - b @ (d_X.T @ u))
    if reml:
        d_score = d_score + jnp.einsum("ij,kij->k", d_X, jnp.einsum("kij,jp->kip", curv.m_dv, b))
    model_moves = not is_zero(d_dynamic)
    if model_moves:
        d_dynamic = instantiate(d_dynamic)
        w = jnp.outer(u, u) - weight

        def matrix_and_half_contraction(dyn):
            # V and ∇_θ ½⟨W, V(θ)⟩ from one evaluation of the module, so that their tangents share it.
            matrix, pullback = jax.vjp(eqx.combine(dyn, static), theta)
            return matrix, pullback(0.5 * w)[0]

        # Modules return symmetric matrices, so dV is symmetric too (core's symmetrisation is a no-op on it).
        _, (d_v, d_mixed) = jax.jvp(matrix_and_half_contraction, (dynamic,), (d_dynamic,))
        d_score = (
            d_score - curv.dv_u.T @ project(d_v @ u) + 0.5 * jnp.einsum("ij,kji->k", weight @ d_v, curv.m_dv) + d_mixed
        )
    d_theta = implicit_step(curv.information, free, d_score)

    # The final evaluation at θ̂, moved by dθ̂ and dp. dV_tot = Σ_k V_k dθ̂_k + dV enters only through
    # products with u, V⁻¹X and M, taken term by term so that no n×n tangent is formed for them.
    d_v_u = curv.dv_u @ d_theta
    d_v_vx = jnp.einsum("kip,k->ip", jnp.einsum("kij,jp->kip", curv.dv, c.v_inv_x), d_theta)
    d_trace = jnp.einsum("kij,ij->k", curv.dv, weight) @ d_theta
    if model_moves:
        d_v_u = d_v_u + d_v @ u
        d_v_vx = d_v_vx + d_v @ c.v_inv_x
        d_trace = d_trace + jnp.sum(weight * d_v)
    moved = residual - d_v_u
    d_beta = cho_solve((c.chol_xvx, True), d_X.T @ u + c.v_inv_x.T @ moved)
    d_u = project(moved) - b @ (d_X.T @ u)
    d_loglik = -u @ residual - 0.5 * d_trace + 0.5 * u @ d_v_u
    if reml:
        d_loglik = d_loglik - jnp.sum(d_X * b)
    d_v_inv_x = cho_solve((c.factor, True), d_X - d_v_vx)
    d_xvx = d_X.T @ c.v_inv_x + c.v_inv_x.T @ d_X - c.v_inv_x.T @ d_v_vx
    # The whole n×n tangent only for chol(V) (JAX drops it unless something downstream uses the factor).
    d_v_total = jnp.einsum("kij,k->ij", curv.dv, d_theta)
    d_v_total = 0.5 * (d_v_total + d_v_total.T) + (d_v if model_moves else 0.0)
    d_core = Core(
        ok=np.zeros(c.ok.shape, dtype=jax.dtypes.float0),
        factor=jnp.where(c.ok, _cholesky_tangent(c.factor, d_v_total), 0.0),
        v_inv_x=d_v_inv_x,
        chol_xvx=_cholesky_tangent(c.chol_xvx, d_xvx),
        beta=d_beta,
        p_y=d_u,
        loglik=jnp.where(c.ok, d_loglik, 0.0),
    )
    return (theta, c), (d_theta, d_core)


_fitted.defjvp(_fitted_jvp, symbolic_zeros=True)
