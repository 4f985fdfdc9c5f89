r"""Mixed-model-equations (MME) back end: V = Σ_j Z_j G_j(θ_j) Z_jᵀ + R(θ) without any n×n matrix.

With Z = [Z_1 … Z_m] (n×q), G = blockdiag(G_j) = Λ Λᵀ (Λ lower triangular, built from each G_j's own
factor) and A = ΛᵀZᵀZΛ/σ² + I_q = L Lᵀ (q×q), Woodbury and the matrix-determinant lemma give
(lme4's formulation, Bates, Mächler, Bolker & Walker 2015, J. Stat. Softw. 67(1), section 3):

    log|V| = n·log σ² + 2·log|L|
    V⁻¹u   = (u − ZΛ A⁻¹ ΛᵀZᵀu / σ²) / σ²          (O(nq) per vector once ZᵀZ, ZᵀX, Zᵀy are known)

Everything else (XᵀV⁻¹X, β̂, Py, ℓ_REML / ℓ_ML) is computed exactly as the dense ``core`` does, so both
back ends evaluate the same function of θ. One evaluation costs O(q³ + nq(p + 1) + np²).

Heteroscedastic residual: R(θ) = σ²·I + Σ_j σ²_j·diag(d_j) with known d_j ≥ 0 (``KnownDiagonalMatrix`` terms,
e.g. a kernel's eigenvalues once its eigenvectors rotated the data, or inverse prior weights). Then
A = ΛᵀZᵀR⁻¹ZΛ + I, log|V| = Σ_i log r_i + 2·log|L| and V⁻¹u = R⁻¹u − R⁻¹ZΛ A⁻¹ ΛᵀZᵀR⁻¹u. ZᵀR⁻¹Z changes with θ,
so an evaluation costs O(nq² + q³) instead of O(q³) once ZᵀZ is known; the block-diagonal path is not used.

Derivatives: the score is ``jax.grad`` of this log-likelihood (reverse mode through q×q factorisations
only); the AI matrix ½(V_k Py)ᵀ M (V_l Py) takes V_k·Py = Z·(∂G/∂θ_k)·ZᵀPy + (∂σ²/∂θ_k)·Py by forward
mode on q-vectors and applies M = P (REML) or V⁻¹ (ML) by the Woodbury solve plus the rank-p correction;
the observed information is −``jax.hessian`` of the log-likelihood. Fisher information is left to the
dense path.

Block-diagonal fast path: with a single random term whose G is I_m ⊗ B (b×b, b ≤ ``MAX_BLOCK``) or a
scalar / diagonal / identity matrix (b = 1), Λ = blockdiag(Λ_g), and when in addition ZᵀZ has no entries
outside its m diagonal b×b blocks (every observation belongs to one group: ``(x | g)`` terms), A is block
diagonal too. Then A's factorisation, log-determinant and solves are m independent b×b problems, unrolled into
elementwise operations: O(m·b³) instead of O(q³), also for the score (reverse mode) and the observed
information. Whether ZᵀZ is block diagonal depends on Z's values. ``estimate`` decides it in numpy before
tracing when Z is concrete (``static_block_diagonal``), so only one path is compiled; when Z is traced,
``prepare`` tests it inside the program and ``mme_core`` / ``mme_evaluate`` pick the path with ``lax.cond``.
Both paths compute the same function of θ.

Recognised models (``mme_structure``): a top-level ``Sum`` of ``CovariancePropagation`` terms whose Z is a
``DummyMatrix`` or a ``ConstantMatrix`` and whose G is built from ``ScalarMatrix``, ``DiagonalMatrix``,
``UnstructuredMatrix``, ``IdentityMatrix`` and ``KroneckerProduct`` (so that its Cholesky factor is known in
closed form), plus exactly one ``ScalarMatrix(n)`` residual and any number of ``KnownDiagonalMatrix(d)`` terms.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import block_diag, cho_solve
from jaxtyping import Array, Bool, Float

from .._covariance.basic import DiagonalMatrix, IdentityMatrix, KnownDiagonalMatrix, ScalarMatrix, UnstructuredMatrix
from .._covariance.compose import (
    ConstantMatrix,
    CovariancePropagation,
    DummyMatrix,
    GroupedColumns,
    KroneckerProduct,
    Sum,
)
from .._covariance.observed import ObservedRows
from .base import INFORMATION, Core, Derivatives, _cholesky, gaussian_loglik


class Term(NamedTuple):
    Z: object  # DummyMatrix, GroupedColumns or ConstantMatrix (no parameters)
    G: object  # a module whose Cholesky factor _factor knows
    offset: int  # position of G's first parameter in θ
    size: int  # G's number of parameters
    q: int  # number of random effects (columns of Z)


class ResidualPart(NamedTuple):
    """One variance of the diagonal residual R(θ): σ²·I (a ``ScalarMatrix``) or σ²·diag(d) (``KnownDiagonalMatrix``)."""

    module: ScalarMatrix | KnownDiagonalMatrix
    offset: int  # position of its parameter in θ


class Structure(NamedTuple):
    """The recognised form of a model: its random terms and the parts of its diagonal residual (the
    ``ScalarMatrix`` first)."""

    terms: tuple[Term, ...]
    residual: tuple[ResidualPart, ...]
    n: int
    q: int
    observed: Bool[Array, " n"] | None = None  # the rows an ``ObservedRows`` model keeps (None: all)

    @property
    def heteroscedastic(self) -> bool:
        """Whether R(θ) has ``KnownDiagonalMatrix`` parts (then it is an n-vector, not σ²·I)."""
        return len(self.residual) > 1

    def prepare(self, y, X, block_diagonal: bool | None = None) -> Prepared:
        return prepare(self, y, X, block_diagonal)

    def core(self, theta, y, X, reml: bool, data: Prepared) -> Core:
        return mme_core(theta, y, X, self, reml, data)

    def evaluate(self, theta, y, X, *, reml: bool, information: str, data: Prepared) -> tuple[Core, Derivatives]:
        return mme_evaluate(theta, y, X, self, reml=reml, information=information, data=data)


def _factorable(G) -> bool:
    if isinstance(G, ScalarMatrix | DiagonalMatrix | UnstructuredMatrix | IdentityMatrix):
        return True
    if isinstance(G, KroneckerProduct):
        return _factorable(G.A) and _factorable(G.B)
    return False


def mme_structure(model) -> Structure | None:
    """The model's MME structure, or None when it is not Σ_j Z_j G_j Z_jᵀ + σ²I (+ Σ σ²_j·diag(d_j)) with fixed Z_j
    (or such a model on some of its rows, ``ObservedRows``: then Z's other rows count as zero)."""
    if isinstance(model, ObservedRows):
        inner = mme_structure(model.model)
        return None if inner is None else inner._replace(observed=model.observed)
    if not isinstance(model, Sum):
        return None
    n = model.shape[0]
    terms, residual, weighted = [], None, []
    offset = 0
    for term in model.terms:
        if isinstance(term, ScalarMatrix):
            if residual is not None or term.n != n:
                return None
            residual = ResidualPart(term, offset)
        elif isinstance(term, KnownDiagonalMatrix):
            weighted.append(ResidualPart(term, offset))
        elif isinstance(term, CovariancePropagation):
            Z, G = term.Z, term.G
            fixed_design = isinstance(Z, DummyMatrix | GroupedColumns | ConstantMatrix) and not Z.num_free_params
            if not fixed_design or not _factorable(G):
                return None
            terms.append(Term(Z, G, offset, G.num_free_params, Z.shape[1]))
        else:
            return None
        offset += term.num_free_params
    if residual is None or not terms:
        return None
    return Structure(tuple(terms), (residual, *weighted), n, sum(t.q for t in terms))


def _factor(G, theta):
    """Lower-triangular Λ with Λ Λᵀ = G(θ), in closed form (no Cholesky factorisation)."""
    if isinstance(G, ScalarMatrix):
        return jnp.sqrt(G.transform.forward(theta[0])) * jnp.eye(G.n, dtype=theta.dtype)
    if isinstance(G, DiagonalMatrix):
        return jnp.diag(jnp.sqrt(G.transform.forward(theta)))
    if isinstance(G, UnstructuredMatrix):
        return G.transform.cholesky_factor(theta)
    if isinstance(G, IdentityMatrix):
        return jnp.eye(G.n, dtype=theta.dtype)
    if isinstance(G, KroneckerProduct):
        theta_a, theta_b = G.split(theta)
        return jnp.kron(_factor(G.A, theta_a), _factor(G.B, theta_b))
    raise TypeError(f"no closed-form Cholesky factor for {type(G).__name__}")


class Prepared(NamedTuple):
    """θ-independent quantities, computed once per fit (O(nq² + nqp)).

    ``y0`` = y − X·b0 with b0 the OLS fit: ℓ, Py and β̂ − b0 do not depend on b0, and working with the
    (small) OLS residuals instead of y avoids the cancellation of the large V⁻¹y and V⁻¹Xβ̂ in Py, which
    would otherwise add rounding noise of order eps·|y|/|r| to ℓ.
    """

    Z: Float[Array, "n q"]
    ztz: Float[Array, "q q"]
    ztx: Float[Array, "q p"]
    b0: Float[Array, " p"]
    y0: Float[Array, " n"]
    zty0: Float[Array, " q"]
    blocks: Blocks | None = None  # for models with a block layout (``block_layout``)
    # ``ObservedRows``: 1 on the observed rows, 0 elsewhere. Z stays the model's own (shared by the responses of a
    # vmapped batch, so its products stay matrix-matrix); the mask acts on the vectors instead, as R⁻¹ = M/σ².
    mask: Float[Array, " n"] | None = None


class Blocks(NamedTuple):
    """ZᵀZ's m diagonal b×b blocks, and whether it has nothing else (then A is block diagonal)."""

    ztz: Float[Array, "m b b"]
    diagonal: Bool[Array, ""] | bool  # a Python True when known before tracing


#: Largest block of Λ (random effects per group) that the block-diagonal path unrolls.
MAX_BLOCK = 8


def block_layout(structure: Structure) -> tuple[int, int] | None:
    """(m, b) when Λ is block diagonal with m blocks of size b (a single term, G = I_m ⊗ B or diagonal)."""
    if len(structure.terms) != 1 or structure.heteroscedastic:
        return None
    G = structure.terms[0].G
    if isinstance(G, ScalarMatrix | DiagonalMatrix | IdentityMatrix):
        return G.shape[0], 1
    if isinstance(G, KroneckerProduct) and isinstance(G.A, IdentityMatrix) and G.B.shape[0] <= MAX_BLOCK:
        return G.A.n, G.B.shape[0]
    return None


def static_block_diagonal(structure: Structure | None) -> bool | None:
    """Whether ZᵀZ has nothing outside its diagonal b×b blocks, decided in numpy from a concrete Z.

    True when every observation's non-zero entries of Z lie in one group's b columns (always so for an
    ``(x | g)`` term); False otherwise, which can only miss an exact cancellation and then costs speed, not
    correctness (both paths compute the same function). None when the model has no block layout or Z is
    traced: ``prepare`` then tests ZᵀZ inside the program and the two paths meet in a ``lax.cond``.
    """
    if structure is None:
        return None
    layout = block_layout(structure)
    if layout is None:
        return None
    Z = structure.terms[0].Z
    if isinstance(Z, DummyMatrix | GroupedColumns):  # one level per row: its non-zeros lie in one block
        width = Z.block if isinstance(Z, GroupedColumns) else 1
        return None if isinstance(Z.codes, jax.core.Tracer) else layout[1] == width
    if isinstance(Z.matrix, jax.core.Tracer):
        return None
    non_zero = np.asarray(Z.matrix) != 0
    block_of_column = np.arange(non_zero.shape[1]) // layout[1]
    first = np.where(non_zero, block_of_column, np.iinfo(np.int64).max).min(axis=1)
    last = np.where(non_zero, block_of_column, -1).max(axis=1)
    return bool(np.all((last == -1) | (first == last)))


def prepare(structure: Structure, y, X, block_diagonal: bool | None = None) -> Prepared:
    """Data-only pieces of the MME (Z, ZᵀZ, ZᵀX, ...); ``block_diagonal`` from ``static_block_diagonal``."""
    dtype = y.dtype
    empty = jnp.zeros((0,), dtype)
    Z = jnp.concatenate([t.Z(empty).astype(dtype) for t in structure.terms], axis=1)
    mask = None
    if structure.observed is not None:
        mask = structure.observed.astype(dtype)
        y = jnp.where(structure.observed, y, 0.0).astype(dtype)
        X = jnp.where(structure.observed[:, None], X, 0.0).astype(dtype)
    xtx = X.T @ X
    chol_xtx, _ = _cholesky(0.5 * (xtx + xtx.T))
    b0 = cho_solve((chol_xtx, True), X.T @ y)
    y0 = y - X @ b0
    ztz = Z.T @ Z if mask is None else Z.T @ (Z * mask[:, None])  # ZᵀMZ
    layout = block_layout(structure)
    blocks = None
    if layout is not None and block_diagonal is not False:
        m, b = layout
        groups = jnp.arange(m)
        if block_diagonal is None:
            # Decided on the model's own ZᵀZ: with a mask, ZᵀMZ has no entries outside those blocks either, and the
            # decision stays shared by a vmapped batch (a lax.cond that runs one branch, not both).
            shared = (Z.T @ Z if mask is not None else ztz).reshape(m, b, m, b)
            outside = jnp.where(jnp.eye(m, dtype=bool)[:, None, :, None], 0.0, shared)
            block_diagonal = jnp.all(outside == 0.0)
        blocks = Blocks(ztz.reshape(m, b, m, b)[groups, :, groups, :], block_diagonal)
    return Prepared(Z, ztz, Z.T @ X, b0, y0, Z.T @ y0, blocks, mask)


def _masked(data: Prepared, rows):
    """M·rows: the unobserved rows of an n×r product set to zero (``ObservedRows``; unchanged otherwise)."""
    return rows if data.mask is None else rows * (data.mask if rows.ndim == 1 else data.mask[:, None])


class MMEFactor(NamedTuple):
    """The MME back end's factorisation of V, held in ``Core.factor``: R, Λ and L = chol(A), A = ΛᵀZᵀR⁻¹ZΛ + I.

    R is σ² (a scalar: R = σ²·I) or, for a heteroscedastic residual, its diagonal (n,). Λ and L are q×q matrices,
    or, on the block-diagonal path, stacks (m, b, b) of their diagonal blocks.
    """

    residual: Float[Array, ""] | Float[Array, " n"]
    lam: Float[Array, "q q"] | Float[Array, "m b b"]
    chol_a: Float[Array, "q q"] | Float[Array, "m b b"]


def _lambda(theta, structure: Structure):
    return block_diag(*[_factor(t.G, theta[t.offset : t.offset + t.size]) for t in structure.terms])


def _part_variances(theta, structure: Structure):
    """The residual's variances (σ², σ²_1, …) at θ, in ``structure.residual``'s order."""
    return jnp.stack([p.module.transform.forward(theta[p.offset]) for p in structure.residual])


def _sigma2(theta, structure: Structure):
    return _part_variances(theta, structure)[0]


def _residual(theta, structure: Structure):
    """R(θ): σ² (a scalar) or, for a heteroscedastic residual, σ² + Σ_j σ²_j·d_j (n,)."""
    variances = _part_variances(theta, structure)
    if not structure.heteroscedastic:
        return variances[0]
    weighted = zip(variances[1:], structure.residual[1:], strict=True)
    return variances[0] + sum(v * part.module.d.astype(theta.dtype) for v, part in weighted)


def _inner(f: MMEFactor, zt_u):
    """Λ A⁻¹ Λᵀ z (q×r) for z = ZᵀR⁻¹U (q×r): the q×q part of the Woodbury solve."""
    if f.lam.ndim == 3:  # m independent b×b problems
        m, b, _ = f.lam.shape
        zt_u = zt_u.reshape(m, b, -1)
        solved = _small_cho_solve(f.chol_a, jnp.einsum("gji,gjr->gir", f.lam, zt_u))
        return jnp.einsum("gij,gjr->gir", f.lam, solved).reshape(m * b, -1)
    return f.lam @ cho_solve((f.chol_a, True), f.lam.T @ zt_u)


def _v_inv(f: MMEFactor, data: Prepared, U, zt_u=None):
    """V⁻¹U for an n×r matrix U (Woodbury): R⁻¹U − R⁻¹Z·Λ A⁻¹ Λᵀ·ZᵀR⁻¹U; ``zt_u`` = ZᵀU where already known
    (used when R = σ²·I). With a mask, R⁻¹ = M/σ² and U is zero on the unobserved rows."""
    if f.residual.ndim == 0:
        zt_u = data.Z.T @ U if zt_u is None else zt_u
        return (U - _masked(data, data.Z @ (_inner(f, zt_u) / f.residual))) / f.residual
    r_inv_u = U / f.residual[:, None]
    return r_inv_u - _masked(data, data.Z @ _inner(f, data.Z.T @ r_inv_u)) / f.residual[:, None]


def _dense_solver(theta, structure: Structure, data: Prepared):
    """(factor, ok, log|A|) through the dense q×q factorisation of A."""
    residual = _residual(theta, structure)
    lam = _lambda(theta, structure)
    if structure.heteroscedastic:
        a = lam.T @ (data.Z.T @ _masked(data, data.Z / residual[:, None])) @ lam
    else:
        a = lam.T @ data.ztz @ lam / residual
    a = a + jnp.eye(structure.q, dtype=theta.dtype)
    chol_a, ok_a = _cholesky(0.5 * (a + a.T))
    return MMEFactor(residual, lam, chol_a), ok_a, 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol_a)))


def _block_factor(G, theta, m: int):
    """Λ's diagonal blocks (m or 1 (shared), b, b) for a ``block_layout`` G."""
    if isinstance(G, KroneckerProduct):  # I_m ⊗ B: the identity has no parameters
        return _factor(G.B, G.split(theta)[1])[None]
    if isinstance(G, ScalarMatrix):
        return jnp.sqrt(G.transform.forward(theta[0])).reshape(1, 1, 1)
    if isinstance(G, DiagonalMatrix):
        return jnp.sqrt(G.transform.forward(theta)).reshape(m, 1, 1)
    return jnp.ones((1, 1, 1), theta.dtype)  # IdentityMatrix


def _small_cholesky(a):
    """Lower Cholesky factors of a stack (..., b, b) of small SPD matrices, unrolled into elementwise operations
    (NaN where a matrix is not positive definite)."""
    b = a.shape[-1]
    factor = [[None] * b for _ in range(b)]
    for j in range(b):
        d = jnp.sqrt(a[..., j, j] - sum((factor[j][k] ** 2 for k in range(j)), 0.0))
        factor[j][j] = d
        for i in range(j + 1, b):
            factor[i][j] = (a[..., i, j] - sum((factor[i][k] * factor[j][k] for k in range(j)), 0.0)) / d
    zero = jnp.zeros_like(a[..., 0, 0])
    rows = [jnp.stack([factor[i][j] if j <= i else zero for j in range(b)], axis=-1) for i in range(b)]
    return jnp.stack(rows, axis=-2)


def small_forward(chol, rhs):
    """L⁻¹·rhs for stacks of small lower-triangular L (..., b, b) and rhs (..., b, r), unrolled."""
    b = chol.shape[-1]
    out = []
    for i in range(b):
        s = rhs[..., i, :] - sum((chol[..., i, k, None] * out[k] for k in range(i)), 0.0)
        out.append(s / chol[..., i, i, None])
    return jnp.stack(out, axis=-2)


def small_backward(chol, rhs):
    """L⁻ᵀ·rhs for stacks of small lower-triangular L (..., b, b) and rhs (..., b, r), unrolled."""
    b = chol.shape[-1]
    out = [None] * b
    for i in reversed(range(b)):
        s = rhs[..., i, :] - sum((chol[..., k, i, None] * out[k] for k in range(i + 1, b)), 0.0)
        out[i] = s / chol[..., i, i, None]
    return jnp.stack(out, axis=-2)


def _small_cho_solve(chol, rhs):
    """(L Lᵀ)⁻¹·rhs for stacks of small lower-triangular L (..., b, b) and rhs (..., b, r), unrolled."""
    return small_backward(chol, small_forward(chol, rhs))


def _dense_blocks(blocks):
    """blockdiag of a stack (m, b, b) as a dense (m·b)×(m·b) matrix."""
    m, b, _ = blocks.shape
    eye = jnp.eye(m, dtype=blocks.dtype)
    return jnp.einsum("gij,gh->gihj", blocks, eye).reshape(m * b, m * b)


def _block_solver(theta, structure: Structure, data: Prepared):
    """``_dense_solver``'s (factor, ok, log|A|) when ZᵀZ and Λ are block diagonal: m independent b×b problems."""
    m, b = block_layout(structure)
    term = structure.terms[0]
    sigma2 = _sigma2(theta, structure)
    lam = jnp.broadcast_to(_block_factor(term.G, theta[term.offset : term.offset + term.size], m), (m, b, b))
    a = jnp.einsum("gji,gjk,gkl->gil", lam, data.blocks.ztz, lam) / sigma2 + jnp.eye(b, dtype=theta.dtype)
    chol = _small_cholesky(0.5 * (a + jnp.swapaxes(a, -1, -2)))
    ok_a = jnp.all(jnp.isfinite(chol))
    chol = jnp.where(ok_a, chol, jnp.eye(b, dtype=theta.dtype))
    logdet_a = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)))
    return MMEFactor(sigma2, lam, chol), ok_a, logdet_a


def _on_path(data: Prepared, fn, theta):
    """``fn(θ, block)`` on the path ``prepare`` chose: the block-diagonal one, the dense q×q one, or, when ZᵀZ's
    structure is known only inside the program, both behind a ``lax.cond`` (the block branch's factor is then
    made dense, so that both branches return the same shapes)."""
    use_blocks = None if data.blocks is None else data.blocks.diagonal
    if use_blocks is None or use_blocks is True:
        return fn(theta, use_blocks is True)

    def densify(x):
        if isinstance(x, MMEFactor) and x.lam.ndim == 3:
            return x._replace(lam=_dense_blocks(x.lam), chol_a=_dense_blocks(x.chol_a))
        return x

    def blocks_as_dense(t):
        return jax.tree_util.tree_map(densify, fn(t, True), is_leaf=lambda x: isinstance(x, MMEFactor))

    return jax.lax.cond(use_blocks, blocks_as_dense, lambda t: fn(t, False), theta)


def mme_core(theta, y, X, structure: Structure, reml: bool = True, data: Prepared | None = None) -> Core:
    """ℓ, β̂, Py (and XᵀV⁻¹X's factor) at θ through the q×q mixed-model equations; same values as ``core``."""
    if data is None:
        data = prepare(structure, y, X)
    return _on_path(data, lambda t, block: _core(t, y, X, structure, reml, data, block), theta)


def _core(theta, y, X, structure: Structure, reml: bool, data: Prepared, block: bool) -> Core:
    if structure.observed is not None:
        X = jnp.where(structure.observed[:, None], X, 0.0).astype(X.dtype)
    factor, ok_a, logdet_a = (_block_solver if block else _dense_solver)(theta, structure, data)
    zt_w = None if structure.heteroscedastic else jnp.concatenate([data.ztx, data.zty0[:, None]], axis=1)
    return gls_core(
        lambda W: _v_inv(factor, data, W, zt_w), X, data.y0, data.b0, structure, factor, logdet_a, ok_a, reml
    )


def gls_core(v_inv, X, y0, b0, structure, factor, logdet_a, ok_a, reml: bool) -> Core:
    """ℓ, β̂ and Py from a back end's Woodbury solve ``v_inv`` (n×r ↦ V⁻¹·(n×r)) and log|A| (A = ΛᵀZᵀR⁻¹ZΛ + I), shared
    by the equations' back ends: log|V| = log|R| + log|A|, and the GLS on the OLS residuals y0 = y − X·b0.
    ``structure`` gives ``observed`` and the residual parts; ``factor.residual`` is R (σ², or its diagonal)."""
    n, p = X.shape
    v_inv_w = v_inv(jnp.concatenate([X, y0[:, None]], axis=1))
    v_inv_x, v_inv_y0 = v_inv_w[:, :p], v_inv_w[:, p]
    xvx = X.T @ v_inv_x
    chol_xvx, ok_x = _cholesky(0.5 * (xvx + xvx.T))
    delta = cho_solve((chol_xvx, True), X.T @ v_inv_y0)  # β̂ − b0
    p_y = v_inv_y0 - v_inv_x @ delta
    resid = y0 - X @ delta
    quad = resid @ p_y
    if structure.observed is not None:  # ``ObservedRows``: only the observed rows count
        n = jnp.sum(structure.observed, dtype=X.dtype)
    if factor.residual.ndim == 1:
        log_r = jnp.log(factor.residual)
        logdet_r = jnp.sum(log_r if structure.observed is None else jnp.where(structure.observed, log_r, 0.0))
    else:
        logdet_r = n * jnp.log(factor.residual)
    loglik = gaussian_loglik(logdet_r + logdet_a, chol_xvx, quad, n, reml)
    ok = ok_a & ok_x & jnp.all(factor.residual > 0) & jnp.isfinite(loglik)
    loglik = jnp.where(ok, loglik, -jnp.inf)
    return Core(ok, factor, v_inv_x, chol_xvx, b0 + delta, p_y, loglik)


def _dv_times_py(theta, structure: Structure, data: Prepared, p_y, block: bool = False):
    """D[:, k] = V_k·Py = Z·(∂G/∂θ_k)·ZᵀPy + Σ_j (∂σ²_j/∂θ_k)·d_j∘Py (d = 1 for σ²·I), by forward mode on
    q-vectors (n×k)."""
    zt_py = data.Z.T @ p_y

    if block:  # G = blockdiag(Λ_g Λ_gᵀ): m products of b×b blocks
        m, b = block_layout(structure)
        term = structure.terms[0]

        def g_times(t):
            lam = jnp.broadcast_to(_block_factor(term.G, t[term.offset : term.offset + term.size], m), (m, b, b))
            g_zt_py = (lam @ (jnp.swapaxes(lam, -1, -2) @ zt_py.reshape(m, b, 1))).reshape(m * b)
            return jnp.concatenate([g_zt_py, _part_variances(t, structure)])

    else:

        def g_times(t):
            blocks = [t_.G(t[t_.offset : t_.offset + t_.size]) for t_ in structure.terms]
            return jnp.concatenate([block_diag(*blocks) @ zt_py, _part_variances(t, structure)])

    jac = jax.jacfwd(g_times)(theta)  # (q + number of residual parts) × k
    q = structure.q
    d = _masked(data, data.Z @ jac[:q]) + jnp.outer(p_y, jac[q])
    for j, part in enumerate(structure.residual[1:], start=1):
        d = d + jnp.outer(part.module.d.astype(p_y.dtype) * p_y, jac[q + j])
    return d


def mme_evaluate(
    theta, y, X, structure: Structure, *, reml: bool, information: str, data: Prepared | None = None
) -> tuple[Core, Derivatives]:
    """Core quantities, score and information (``"ai"``, ``"observed"`` or ``"none"``) at θ."""
    if information not in INFORMATION or information == "fisher":
        raise ValueError(f"the MME back end computes information 'ai', 'observed' or 'none', got {information!r}")
    if data is None:
        data = prepare(structure, y, X)
    return _on_path(data, lambda t, block: _evaluate(t, y, X, structure, reml, information, data, block), theta)


def _evaluate(theta, y, X, structure: Structure, reml: bool, information: str, data: Prepared, block: bool):
    def loglik(t):
        c = _core(t, y, X, structure, reml, data, block)
        return c.loglik, c

    (_, c), score = jax.value_and_grad(loglik, has_aux=True)(theta)
    k = theta.shape[0]
    if information == "ai":
        D = _dv_times_py(theta, structure, data, c.p_y, block)
        m_d = _v_inv(c.factor, data, D)
        if reml:
            # P·D = V⁻¹D − V⁻¹X (XᵀV⁻¹X)⁻¹ (V⁻¹X)ᵀD.
            m_d = m_d - c.v_inv_x @ cho_solve((c.chol_xvx, True), c.v_inv_x.T @ D)
        info = 0.5 * D.T @ m_d
    elif information == "observed":
        info = -jax.hessian(lambda t: _core(t, y, X, structure, reml, data, block).loglik)(theta)
    else:
        info = jnp.zeros((k, k), theta.dtype)
    return c, Derivatives(score, 0.5 * (info + info.T))
