r"""The weighted mixed-model equations of one PIRLS step, on the blocked sparse factor of ``_backends.sparse``.

With working weights W = diag(w) (n,), relative covariance factor Λ(θ) (G = ΛΛᵀ, no residual scale in a GLMM) and
the spherical random effects u (b = Λu), a PIRLS step solves

    A u = ΛᵀZᵀW t,        A = ΛᵀZᵀWZΛ + I  (q×q, = L Lᵀ)                            (β fixed)

or, with β among the unknowns (lme4's nAGQ = 0 stage),

    [ A        ΛᵀZᵀWX ] [u]   [ΛᵀZᵀW t]
    [ XᵀWZΛ    XᵀWX   ] [β] = [XᵀW t  ]

by block elimination: R = A⁻¹ΛᵀZᵀWX (q×p), M = XᵀWX − (ΛᵀZᵀWX)ᵀR = chol·cholᵀ (p×p), β = M⁻¹(XᵀWt −
(ΛᵀZᵀWX)ᵀA⁻¹ΛᵀZᵀWt), u = A⁻¹ΛᵀZᵀWt − Rβ (Bates, Mächler, Bolker & Walker 2015, J. Stat. Softw. 67(1),
sections 3.2–3.3, for the Gaussian case; the GLMM step is the same system with W the GLM working weights,
Bates, "Computational methods for mixed models", lme4 vignette, section 5).

A is factored by ``_backends.sparse``: the term with most random effects as L₁ independent b₁×b₁ blocks, the
others in a dense r×r Schur block, with L₂₁ sparse or dense; Z stays integer codes and values per row, so no n×q
and no q×q matrix is formed (the cross-products are segment sums, O(n·s²) per step with s = Σ_j b_j). θ here is
the model's full parameter vector with the Gaussian residual's parameter set so that σ² = 1.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax.scipy.linalg import cho_solve

from .._backends.base import _cholesky
from .._backends.mme import small_backward, small_forward
from .._backends.sparse import (
    SparseData,
    SparseFactor,
    SparseStructure,
    _factorise,
    _l21_times,
    _l21_transpose_times,
    _lams,
    cross_products,
    schur_solve,
    z_times,
    z_transpose,
)


class WeightedFactor(NamedTuple):
    """A = ΛᵀZᵀWZΛ + I factored at one W: the blocked factor, the cross-products it came from, log|A|, and
    whether every Cholesky factor was finite."""

    factor: SparseFactor
    data: SparseData
    logdet: jnp.ndarray
    ok: jnp.ndarray


def lams(theta, structure: SparseStructure):
    """Each term's λ blocks (L_j or 1, b_j, b_j), in the blocked order."""
    return _lams(theta, structure)


def lam_t(lam, structure: SparseStructure, v):
    """Λᵀ·v for v (q, c) in the blocked order."""
    out, at = [], 0
    for t, block in zip(structure.terms, lam, strict=True):
        part = v[at : at + t.q].reshape(t.levels, t.block, -1)
        out.append(jnp.einsum("gji,gjc->gic", jnp.broadcast_to(block, (t.levels, t.block, t.block)), part))
        at += t.q
    return jnp.concatenate([o.reshape(-1, v.shape[1]) for o in out], axis=0)


def lam_times(lam, structure: SparseStructure, u):
    """Λ·u for u (q, c) in the blocked order (b = Λu)."""
    out, at = [], 0
    for t, block in zip(structure.terms, lam, strict=True):
        part = u[at : at + t.q].reshape(t.levels, t.block, -1)
        out.append(jnp.einsum("gij,gjc->gic", jnp.broadcast_to(block, (t.levels, t.block, t.block)), part))
        at += t.q
    return jnp.concatenate([o.reshape(-1, u.shape[1]) for o in out], axis=0)


def z_lam(lam, structure: SparseStructure, u):
    """ZΛu for u (q,): (n,), a gather per term."""
    return z_times(structure, lam_times(lam, structure, u[:, None]))[:, 0]


def lam_t_z_t(lam, structure: SparseStructure, V):
    """ΛᵀZᵀV for V (n, c): (q, c), a segment sum per term."""
    return lam_t(lam, structure, z_transpose(structure, V))


def factorise(theta, structure: SparseStructure, pattern, w) -> WeightedFactor:
    """Factor A = ΛᵀZᵀWZΛ + I for the weights w (n,) at the full model θ (residual σ² = 1)."""
    dtype = w.dtype
    diagonal, cross, schur = cross_products(structure, w, dtype, pattern)
    empty = jnp.zeros((0,), dtype)
    data = SparseData(empty, empty, None, diagonal, cross, schur, None, pattern)
    factor, ok, logdet = _factorise(theta, structure, data)
    return WeightedFactor(factor, data, logdet, ok)


def solve_a(wf: WeightedFactor, structure: SparseStructure, v):
    """A⁻¹·v for v (q, c) in the blocked order: L w = v, then Lᵀ x = w, blockwise."""
    f, data = wf.factor, wf.data
    first, r = structure.terms[0], structure.rest
    q1, b1, c = first.q, first.block, v.shape[1]
    w1 = small_forward(f.chol11, v[:q1].reshape(first.levels, b1, c))
    if r == 0:
        return small_backward(f.chol11, w1).reshape(q1, c)
    x2 = schur_solve(f.schur, f.chol22, v[q1:] - _l21_times(f, data, w1, r))
    x1 = small_backward(f.chol11, w1 - _l21_transpose_times(f, data, x2, first.levels))
    return jnp.concatenate([x1.reshape(q1, c), x2], axis=0)


def solve_joint(wf: WeightedFactor, structure: SparseStructure, lam, X, w, t):
    """(u, β, ok) solving the joint system of the module docstring for the working response t (n,)."""
    wxt = w[:, None] * jnp.concatenate([X, t[:, None]], axis=1)
    rhs = lam_t_z_t(lam, structure, wxt)  # ΛᵀZᵀW[X, t] (q, p + 1)
    solved = solve_a(wf, structure, rhs)  # A⁻¹ΛᵀZᵀW[X, t]
    p = X.shape[1]
    xt_w = X.T @ wxt  # XᵀW[X, t] (p, p + 1)
    m = xt_w[:, :p] - rhs[:, :p].T @ solved[:, :p]
    chol, ok = _cholesky(0.5 * (m + m.T))
    beta = cho_solve((chol, True), xt_w[:, p] - rhs[:, :p].T @ solved[:, p])
    u = solved[:, p] - solved[:, :p] @ beta
    return u, beta, ok


def solve_joint_rhs(wf: WeightedFactor, structure: SparseStructure, lam, X, w, g_u, g_beta):
    """The inverse of the joint matrix of the module docstring applied to (g_u (q,), g_β (p,))."""
    wx = w[:, None] * X
    cross = lam_t_z_t(lam, structure, wx)  # ΛᵀZᵀWX (q, p)
    solved = solve_a(wf, structure, jnp.concatenate([cross, g_u[:, None]], axis=1))
    p = X.shape[1]
    m = X.T @ wx - cross.T @ solved[:, :p]
    chol, _ = _cholesky(0.5 * (m + m.T))
    beta = cho_solve((chol, True), g_beta - cross.T @ solved[:, p])
    return solved[:, p] - solved[:, :p] @ beta, beta


def conditional_variances(wf: WeightedFactor, structure: SparseStructure):
    """diag(ΛA⁻¹Λᵀ) (q,) in the blocked order: lme4's conditional variances of b given y at the mode.

    Squared column norms of L⁻¹Λᵀ, as ``_backends.sparse.conditional_variances`` computes them for the Gaussian
    factor (here with the PIRLS weights in A)."""
    import jax

    f = wf.factor
    first, r = structure.terms[0], structure.rest
    lam1 = jnp.broadcast_to(f.lam[0], (first.levels, first.block, first.block))
    m_top = small_forward(f.chol11, jnp.swapaxes(lam1, -1, -2))
    variances = [jnp.sum(m_top**2, axis=-2).reshape(first.q)]
    if r:
        if wf.data.pattern is not None:
            raise ValueError("conditional_variances needs the dense L21 (factorise with pattern=None)")
        below = jnp.einsum("gbr,gbk->rgk", f.l21, m_top).reshape(r, first.q)
        below = jax.scipy.linalg.solve_triangular(f.chol22, below, lower=True)
        variances[0] = variances[0] + jnp.sum(below**2, axis=0)
        eye = jnp.eye(r, dtype=f.chol22.dtype)
        rest, at = [], 0
        for t, block in zip(structure.terms[1:], f.lam[1:], strict=True):
            part = eye[at : at + t.q].reshape(t.levels, t.block, r)
            lam_b = jnp.broadcast_to(block, (t.levels, t.block, t.block))
            rest.append(jnp.einsum("gji,gjc->gic", lam_b, part).reshape(t.q, r))
            at += t.q
        rest = jnp.concatenate(rest, axis=0)  # Λ₂ᵀ (r, r): column c is Λ₂ᵀe_c
        variances.append(jnp.sum(jax.scipy.linalg.solve_triangular(f.chol22, rest, lower=True) ** 2, axis=0))
    return jnp.concatenate(variances)
