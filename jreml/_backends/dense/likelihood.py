r"""The dense back end: REML / ML log-likelihood, score and information matrices of y ~ N(Xβ, V(θ)) from the
n×n Cholesky factor of V, O(n³) per evaluation.

All functions are pure and jittable, take ``(theta, y, X, v_builder)`` and follow lme4's ``logLik``
convention (see README, "Log-likelihood convention"). With L = chol(V) (n×n), p = rank(X) and the GLS
estimate β̂ = (XᵀV⁻¹X)⁻¹XᵀV⁻¹y:

    ℓ_REML(θ) = −½ [ log|V| + log|XᵀV⁻¹X| + (n−p)·log 2π + rᵀV⁻¹r ],   r = y − Xβ̂
    ℓ_ML(θ)   = −½ [ log|V| + n·log 2π + rᵀV⁻¹r ]

Only Cholesky factors and triangular solves are used (never an explicit inverse of V); the trace terms
use P = V⁻¹ − V⁻¹X(XᵀV⁻¹X)⁻¹XᵀV⁻¹ built as ``cho_solve(L, I)`` minus a rank-p correction.

With V_k = ∂V/∂θ_k and M = P (REML) or V⁻¹ (ML), Py = V⁻¹r (Harville 1977, JASA 72:320; Gilmour,
Thompson & Cullis 1995, Biometrics 51:1440 for the average information):

    score_k  = ½ [ (Py)ᵀ V_k (Py) − tr(M V_k) ]
    AI_kl    = ½ (V_k Py)ᵀ M (V_l Py)
    Fisher_kl = ½ tr(M V_k M V_l)
    observed = −∂²ℓ/∂θ∂θᵀ (autodiff of the Cholesky-based ℓ)

Derivatives of V (``derivatives=``):
- ``"auto"`` (default): never forms the k×n×n tensor. The score is one reverse pass of the scalar
  θ' ↦ ½⟨(Py)(Py)ᵀ − M, V(θ')⟩, and V_k·Py comes from k sequential forward (JVP) passes of θ' ↦ V(θ')·Py.
- ``"jacfwd"`` / ``"jacrev"``: the full ∂V/∂θ (k×n×n) by forward / reverse mode (reverse mode costs n²
  reverse passes: use it only for small n).
- ``"analytic"``: a user function ``dv_builder(theta) -> (k, n, n)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_solve, solve_triangular
from jaxtyping import Array, Float

from ..._covariance.observed import observation_count, observed_data
from ..base import INFORMATION, Core, Derivatives, _cholesky, gaussian_loglik

#: The ways ∂V/∂θ is formed (``derivatives=`` of ``estimate``).
DERIVATIVES = ("auto", "jacfwd", "jacrev", "analytic")


def core(theta, y, X, v_builder, reml: bool = True) -> Core:
    """Factorise V(θ) and XᵀV⁻¹X once; GLS β̂, Py = V⁻¹(y − Xβ̂) and ℓ (−inf where V is not PD)."""
    y, X = observed_data(v_builder, y, X)
    n = observation_count(v_builder, X.shape[0])
    V = v_builder(theta)
    V = 0.5 * (V + V.T)
    chol_v, ok_v = _cholesky(V)
    v_inv_x = cho_solve((chol_v, True), X)
    v_inv_y = cho_solve((chol_v, True), y)
    xvx = X.T @ v_inv_x
    chol_xvx, ok_x = _cholesky(0.5 * (xvx + xvx.T))
    beta = cho_solve((chol_xvx, True), X.T @ v_inv_y)
    p_y = v_inv_y - v_inv_x @ beta
    resid = y - X @ beta
    quad = resid @ p_y
    logdet_v = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol_v)))
    loglik = gaussian_loglik(logdet_v, chol_xvx, quad, n, reml)
    ok = ok_v & ok_x & jnp.isfinite(loglik)
    loglik = jnp.where(ok, loglik, -jnp.inf)
    return Core(ok, chol_v, v_inv_x, chol_xvx, beta, p_y, loglik)


_BLOCK = 256


def _lower_triangular_inverse(L: Float[Array, "n n"]) -> Float[Array, "n n"]:
    """L⁻¹ of a lower-triangular L by recursive 2×2 blocking (LAPACK trtri's algorithm, matmul-rich):
    [[A, 0], [B, C]]⁻¹ = [[A⁻¹, 0], [−C⁻¹ B A⁻¹, C⁻¹]]."""
    n = L.shape[0]
    if n <= _BLOCK:
        return solve_triangular(L, jnp.eye(n, dtype=L.dtype), lower=True)
    h = n // 2
    a_inv = _lower_triangular_inverse(L[:h, :h])
    c_inv = _lower_triangular_inverse(L[h:, h:])
    lower_left = -(c_inv @ (L[h:, :h] @ a_inv))
    return jnp.block([[a_inv, jnp.zeros((h, n - h), L.dtype)], [lower_left, c_inv]])


def _lower_gram(T: Float[Array, "n n"]) -> Float[Array, "n n"]:
    """TᵀT for lower-triangular T, recursively (LAPACK lauum's algorithm):
    T = [[A, 0], [B, C]] ⇒ TᵀT = [[AᵀA + BᵀB, BᵀC], [CᵀB, CᵀC]]."""
    n = T.shape[0]
    if n <= _BLOCK:
        return T.T @ T
    h = n // 2
    A, B, C = T[:h, :h], T[h:, :h], T[h:, h:]
    off = C.T @ B
    return jnp.block([[_lower_gram(A) + B.T @ B, off.T], [off, _lower_gram(C)]])


def cholesky_inverse(chol: Float[Array, "n n"]) -> Float[Array, "n n"]:
    """V⁻¹ = L⁻ᵀL⁻¹ from V's Cholesky factor L (LAPACK potri's route: half the flops of cho_solve(L, I))."""
    return _lower_gram(_lower_triangular_inverse(chol))


def trace_weight(c: Core, reml: bool) -> Float[Array, "n n"]:
    """M = P (REML) or V⁻¹ (ML), from the Cholesky factors (no general matrix inverse)."""
    v_inv = cholesky_inverse(c.factor)
    if not reml:
        return v_inv
    # P = V⁻¹ − B Bᵀ with B = V⁻¹X · chol(XᵀV⁻¹X)⁻ᵀ.
    b = solve_triangular(c.chol_xvx, c.v_inv_x.T, lower=True).T
    return v_inv - b @ b.T


def dv_tensor(theta, v_builder, derivatives: str, dv_builder=None) -> Float[Array, "k n n"]:
    """∂V/∂θ as a k×n×n tensor (``jacfwd``, ``jacrev`` or a user's ``analytic`` function)."""
    if derivatives == "analytic":
        if dv_builder is None:
            raise ValueError('derivatives="analytic" needs dv_builder(theta) -> (k, n, n)')
        return jnp.asarray(dv_builder(theta))
    if derivatives == "jacfwd":
        return jnp.moveaxis(jax.jacfwd(v_builder)(theta), -1, 0)
    if derivatives == "jacrev":
        return jnp.moveaxis(jax.jacrev(v_builder)(theta), -1, 0)
    raise ValueError(f"derivatives must be one of {DERIVATIVES}, got {derivatives!r}")


def _score_vjp(theta, v_builder, weight, p_y):
    cotangent = 0.5 * (jnp.outer(p_y, p_y) - weight)
    _, pullback = jax.vjp(v_builder, theta)
    (grad,) = pullback(cotangent)
    return grad


def _dv_times(theta, v_builder, vector):
    """U[:, k] = V_k · vector, by k sequential JVPs (one n×n tangent alive at a time)."""

    def one(direction):
        return jax.jvp(lambda t: v_builder(t) @ vector, (theta,), (direction,))[1]

    basis = jnp.eye(theta.shape[0], dtype=theta.dtype)
    return jax.lax.map(one, basis).T


def derivatives_at(
    theta, y, X, v_builder, c: Core, *, reml: bool, information: str, derivatives: str, dv_builder=None
) -> Derivatives:
    """Score and information (``"ai"``, ``"fisher"``, ``"observed"`` or ``"none"``) given the core at θ."""
    if information not in INFORMATION:
        raise ValueError(f"information must be one of {INFORMATION}, got {information!r}")
    k = theta.shape[0]
    weight = trace_weight(c, reml)
    need_tensor = derivatives != "auto" or information == "fisher"
    dv = (
        dv_tensor(theta, v_builder, "jacfwd" if derivatives == "auto" else derivatives, dv_builder)
        if (need_tensor)
        else None
    )
    if dv is not None and derivatives != "auto":
        dv_py = jnp.einsum("kij,j->ik", dv, c.p_y)
        score = 0.5 * (dv_py.T @ c.p_y - jnp.einsum("ij,kji->k", weight, dv))
    else:
        score = _score_vjp(theta, v_builder, weight, c.p_y)
        dv_py = _dv_times(theta, v_builder, c.p_y) if information == "ai" else None
    if information == "ai":
        info = 0.5 * dv_py.T @ (weight @ dv_py)
    elif information == "fisher":
        m_dv = jnp.einsum("ij,kjl->kil", weight, dv)
        info = 0.5 * jnp.einsum("kij,lji->kl", m_dv, m_dv)
    elif information == "observed":
        info = -jax.hessian(lambda t: core(t, y, X, v_builder, reml).loglik)(theta)
    else:
        info = jnp.zeros((k, k), theta.dtype)
    return Derivatives(score, 0.5 * (info + info.T))
