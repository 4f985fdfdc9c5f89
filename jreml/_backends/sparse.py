r"""Blocked sparse mixed-model equations: V = Σ_j Z_j G_j Z_jᵀ + R(θ) with no n×q and no dense q×q matrix.

Each random term j keeps its integer codes c_j (n,) and its b_j values per row x_j (n, b_j) (1 for ``(1 | g)``):
Z_j[i, c_j[i]·b_j + k] = x_j[i, k], and G_j = I_{L_j} ⊗ B_j (or a scalar / per-level diagonal), so Λ = blockdiag
(I ⊗ λ_j) with λ_j λ_jᵀ = B_j. The terms are split as MixedModels.jl orders them (Bates et al., MixedModels.jl
documentation, "the blocked Cholesky factor"): term 1, the one with the most random effects q_1 = L_1·b_1, and
the rest (r = q − q_1 random effects). Then, with W = R⁻¹ (and the ``ObservedRows`` mask) and
A = ΛᵀZᵀWZΛ + I = L Lᵀ,

    A₁₁ = λ₁ᵀ(Z₁ᵀWZ₁)λ₁ + I     block diagonal: L₁ b₁×b₁ blocks, since each row has one level of term 1
    L₁₁ = chol(A₁₁)             L₁ independent b₁×b₁ factors (unrolled)
    L₂₁ = Λ₂ᵀ(Z₂ᵀWZ₁)Λ₁ L₁₁⁻ᵀ    r×q₁, from the cross-product C = Z₂ᵀWZ₁ (built once by segment sums)
    L₂₂ = chol(Λ₂ᵀ(Z₂ᵀWZ₂)Λ₂ + I − L₂₁L₂₁ᵀ)   the dense r×r Schur complement

and log|A| = 2Σ log diag L₁₁ + 2Σ log diag L₂₂; V⁻¹u = Wu − WZΛA⁻¹ΛᵀZᵀWu by two blocked triangular solves
(Woodbury; Henderson's equations as lme4 writes them, Bates, Mächler, Bolker & Walker 2015, J. Stat. Softw. 67(1),
section 3). Z·u and Zᵀv are gathers and segment sums over the codes, O(n·b).

Cost per evaluation, with s = Σ_j b_j: O(n·s + L₁·b₁³ + r·q₁·b₁ + r²·q₁ + r³) flops and O(r·q₁ + r²) memory;
the cross-products Z₁ᵀWZ₁ (L₁×b₁×b₁), C (r×q₁) and Z₂ᵀWZ₂ (r×r) cost O(n·s²) once per response (once per
evaluation for a heteroscedastic R). InstEval (n = 73,421; s: 2,972 levels in term 1; d and dept:service:
r = 1,156): C has 3.4·10⁶ entries (27 MB), L₂₁L₂₁ᵀ is a 1,156×2,972×1,156 product (4·10⁹ flops) and the Schur
factor 0.5·10⁹ flops per evaluation. A single term, ``(x | g)``, has r = 0: the whole factor is block diagonal and
an evaluation is O(n·b² + L·b³), linear in n.

Derivatives as ``_backends.mme``: the score by reverse mode through this function, the AI matrix from
V_k·Py = Z(∂G/∂θ_k)ZᵀPy (forward mode on q-vectors), the observed information by ``jax.hessian``.

Recognised models (``sparse_structure``): a top-level ``Sum`` of ``CovariancePropagation`` terms whose Z is a
``DummyMatrix`` (without a dropped level) or ``GroupedColumns`` and whose G is a ``ScalarMatrix``,
``DiagonalMatrix`` or ``IdentityMatrix`` on the levels (b = 1) or ``KroneckerProduct(IdentityMatrix(L), B)``
with B Scalar / Diagonal / Unstructured / Identity (b×b), plus one ``ScalarMatrix(n)`` residual and any
number of ``KnownDiagonalMatrix(d)`` terms; the same on some rows (``ObservedRows``). The shapes depend on the
model only (levels, b_j), not on the codes' values, so the codes may be traced (``vmap``, ``jit``).
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import cho_solve
from jaxtyping import Array, Bool, Float, Int

from .._covariance.basic import DiagonalMatrix, IdentityMatrix, KnownDiagonalMatrix, ScalarMatrix
from .._covariance.compose import CovariancePropagation, DummyMatrix, GroupedColumns, KroneckerProduct, Sum
from .._covariance.observed import ObservedRows
from .base import INFORMATION, Core, Derivatives, _cholesky
from .mme import (
    MAX_BLOCK,
    ResidualPart,
    _block_factor,
    _factorable,
    _part_variances,
    _residual,
    _small_cholesky,
    gls_core,
    small_backward,
    small_forward,
)


class BlockedTerm(NamedTuple):
    """One random term: Z from ``codes`` and ``values`` (None: all ones, b = 1), G = I_levels ⊗ λλᵀ."""

    codes: Int[Array, " n"]
    values: Float[Array, "n b"] | None
    G: object
    offset: int  # position of G's first parameter in θ
    size: int  # G's number of parameters
    levels: int
    block: int  # b

    @property
    def q(self) -> int:
        return self.levels * self.block


class SparseStructure(NamedTuple):
    """The blocked form of a model: ``terms[0]`` is the diagonal block, the others share the dense Schur block."""

    terms: tuple[BlockedTerm, ...]
    residual: tuple[ResidualPart, ...]
    n: int
    q: int
    observed: Bool[Array, " n"] | None = None

    @property
    def heteroscedastic(self) -> bool:
        return len(self.residual) > 1

    @property
    def rest(self) -> int:
        """r: the random effects of the dense Schur block."""
        return self.q - self.terms[0].q

    def prepare(self, y, X, pattern: Pattern | None = None) -> SparseData:
        return prepare(self, y, X, pattern)

    def core(self, theta, y, X, reml: bool, data: SparseData) -> Core:
        return sparse_core(theta, y, X, self, reml, data)

    def evaluate(self, theta, y, X, *, reml: bool, information: str, data: SparseData) -> tuple[Core, Derivatives]:
        return sparse_evaluate(theta, y, X, self, reml=reml, information=information, data=data)


def _term(term, offset: int) -> BlockedTerm | None:
    Z, G = term.Z, term.G
    if isinstance(Z, DummyMatrix) and not Z.drop_first:
        codes, values, levels, b = Z.codes, None, Z.n_levels, 1
    elif isinstance(Z, GroupedColumns):
        codes, values, levels, b = Z.codes, Z.values, Z.n_levels, Z.block
    else:
        return None
    if isinstance(G, ScalarMatrix | DiagonalMatrix | IdentityMatrix):
        if b != 1 or G.shape[0] != levels:
            return None
    elif isinstance(G, KroneckerProduct):
        if not isinstance(G.A, IdentityMatrix) or G.A.n != levels or G.B.shape[0] != b or not _factorable(G.B):
            return None
    else:
        return None
    return BlockedTerm(codes, values, G, offset, G.num_free_params, levels, b)


def sparse_structure(model) -> SparseStructure | None:
    """The model's blocked form, or None when it is not one (see the module docstring)."""
    if isinstance(model, ObservedRows):
        inner = sparse_structure(model.model)
        return None if inner is None else inner._replace(observed=model.observed)
    if not isinstance(model, Sum):
        return None
    n = model.shape[0]
    terms, residual, weighted, offset = [], None, [], 0
    for part in model.terms:
        if isinstance(part, ScalarMatrix):
            if residual is not None or part.n != n:
                return None
            residual = ResidualPart(part, offset)
        elif isinstance(part, KnownDiagonalMatrix):
            weighted.append(ResidualPart(part, offset))
        elif isinstance(part, CovariancePropagation):
            term = _term(part, offset + part.Z.num_free_params)
            if term is None:
                return None
            terms.append(term)
        else:
            return None
        offset += part.num_free_params
    if residual is None or not terms:
        return None
    diagonal = [t for t in terms if t.block <= MAX_BLOCK]
    if not diagonal:
        return None
    first = max(diagonal, key=lambda t: t.q)  # the most random effects: the largest block made diagonal
    rest = sorted((t for t in terms if t is not first), key=lambda t: -t.q)
    return SparseStructure((first, *rest), (residual, *weighted), n, sum(t.q for t in terms))


#: Bytes of the dense blocks an evaluation holds at once, per entry of C (r×q₁) and of the Schur block (r×r):
#: the block, its scaled copy, L₂₁, and the reverse-mode copies of the score.
_COPIES = 6


def sparse_bytes(structure: SparseStructure, p: int, k: int) -> int:
    """Working memory of one evaluation with its derivatives, in bytes (float64)."""
    r, q1, n = structure.rest, structure.terms[0].q, structure.n
    s = sum(t.block for t in structure.terms)
    return 8 * (_COPIES * (r * q1 + r * r) + (2 * p + 2 * k + 6 + s * s) * n + 4 * q1 * structure.terms[0].block)


def check_memory(structure: SparseStructure, p: int, k: int, available: int | None = None) -> None:
    """A clear error, before anything is allocated, when the dense blocks would not fit in memory."""
    need = sparse_bytes(structure, p, k)
    if available is None:
        try:
            available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # pragma: no cover - platforms without sysconf
            return
    if need > 0.8 * available:
        r, q1 = structure.rest, structure.terms[0].q
        raise MemoryError(
            f"the sparse mixed-model equations need about {need / 2**30:.3g} GiB ({available / 2**30:.3g} GiB "
            f"installed): the dense Schur block of the terms after the first has r = {r} random effects (r×r) and "
            f"its cross-product with the first term's {q1} is r×{q1}. Fewer levels in the crossed terms, or a "
            "grouping factor with more levels first, would shrink it"
        )


class Pattern(NamedTuple):
    """Where L₂₁ can be non-zero, from the codes (numpy, once per design; ``sparse_pattern``).

    Per Schur term j: ``entry[j]`` (n,) numbers the distinct (level of term 1, level of j) pairs of the rows; the
    pair e has ``level1[j][e]`` and ``level[j][e]``. L₂₁'s rows are kept as "row entries" s: b_j per pair (one for
    each of term j's b_j columns), each a b₁-vector at Schur row ``row[s]`` and first-term level ``column[s]``,
    sorted by ``column`` (``order`` takes them there from the terms' order). ``pair_a`` (sorted) / ``pair_b`` list
    every two row entries of the same first-term level, both ways round, and ``pair_at`` the flat index
    row_a·r + row_b of their product in L₂₁L₂₁ᵀ.
    """

    entry: tuple[Int[Array, " n"], ...]
    level1: tuple[Int[Array, " e"], ...]
    level: tuple[Int[Array, " e"], ...]
    order: Int[Array, " s"]
    row: Int[Array, " s"]
    column: Int[Array, " s"]
    pair_a: Int[Array, " pairs"]
    pair_b: Int[Array, " pairs"]
    pair_at: Int[Array, " pairs"]


#: The sparse L₂₁ is used when its pairs cost less than this fraction of the dense L₂₁L₂₁ᵀ product (r²·q₁ flops,
#: which run as one matrix product, several times faster per flop than the pairs' gathers and segment sums).
SPARSE_PAIR_FRACTION = 1 / 30
#: At most this many pairs (three int32 arrays of this length, 12 bytes a pair, stay on the device; InstEval-shaped
#: data at n = 10⁶ have 7.1·10⁷, where the dense product would be 2.9·10¹¹ flops and 0.9 GB per copy of L₂₁).
MAX_PAIRS = 200_000_000


#: Patterns of the last few designs, keyed by the identity of their codes arrays (held, so no id is reused).
_PATTERNS: dict = {}
_PATTERN_CACHE_SIZE = 8


def sparse_pattern(structure: SparseStructure, force: bool = False) -> Pattern | None:
    """L₂₁'s pattern from concrete codes, or None when the codes are traced, there is no Schur block, or the dense
    product is cheaper (``SPARSE_PAIR_FRACTION``, ``MAX_PAIRS``; ``force`` skips that rule). Remembered for the
    last ``_PATTERN_CACHE_SIZE`` designs (a refit of the same data does not recompute it)."""
    if len(structure.terms) < 2 or any(isinstance(t.codes, jax.core.Tracer) for t in structure.terms):
        return None
    key = (tuple(id(t.codes) for t in structure.terms), tuple((t.levels, t.block) for t in structure.terms), force)
    if key in _PATTERNS:
        return _PATTERNS[key][1]
    pattern = _pattern(structure, force)
    if len(_PATTERNS) >= _PATTERN_CACHE_SIZE:
        _PATTERNS.pop(next(iter(_PATTERNS)))
    _PATTERNS[key] = (tuple(t.codes for t in structure.terms), pattern)
    return pattern


def _pattern(structure: SparseStructure, force: bool) -> Pattern | None:
    first, rest = structure.terms[0], structure.terms[1:]
    c1 = np.asarray(first.codes, dtype=np.int64)
    entries, level1s, levels, rows, columns = [], [], [], [], []
    for t, offset in zip(rest, _offsets(structure), strict=True):
        key = c1 * t.levels + np.asarray(t.codes, dtype=np.int64)
        unique, entry = np.unique(key, return_inverse=True)
        level1, level = unique // t.levels, unique % t.levels
        entries.append(entry.reshape(-1).astype(np.int32))
        level1s.append(level1.astype(np.int32))
        levels.append(level.astype(np.int32))
        rows.append((offset + level[:, None] * t.block + np.arange(t.block)).reshape(-1))
        columns.append(np.repeat(level1, t.block))
    row, column = np.concatenate(rows), np.concatenate(columns)
    counts = np.bincount(column, minlength=first.levels)
    n_pairs = int(np.sum(counts.astype(np.int64) ** 2))
    r = structure.rest
    if not force and (n_pairs > MAX_PAIRS or n_pairs > SPARSE_PAIR_FRACTION * r * r * first.q):
        return None
    order = np.argsort(column, kind="stable")
    row, column = row[order], column[order]
    size = counts[column]  # the size of each row entry's group
    start = (np.cumsum(counts) - counts)[column]
    pair_a = np.repeat(np.arange(row.shape[0]), size)
    first_of = np.repeat(np.cumsum(size) - size, size)
    pair_b = np.repeat(start, size) + np.arange(n_pairs) - first_of
    device = functools.partial(jnp.asarray, dtype=jnp.int32)
    return Pattern(
        tuple(map(device, entries)),
        tuple(map(device, level1s)),
        tuple(map(device, levels)),
        device(order),
        device(row),
        device(column),
        device(pair_a),
        device(pair_b),
        device(row[pair_a] * r + row[pair_b]),
    )


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def pair_products(l21, pair_a, pair_b, pair_at, r: int):
    """L₂₁L₂₁ᵀ (r×r) from L₂₁'s row entries (s, b₁): Σ over the pattern's pairs of ⟨l_a, l_b⟩ at (row_a, row_b).

    Its tangent is M + Mᵀ with M = Σ ⟨dl_a, l_b⟩ (the pair list holds both orders of every pair), so reverse mode
    needs one gather and one (sorted) segment sum, not two of each."""
    pairs = jnp.sum(l21[pair_a] * l21[pair_b], axis=-1)
    return jax.ops.segment_sum(pairs, pair_at, num_segments=r * r).reshape(r, r)


@pair_products.defjvp
def _pair_products_jvp(r, primals, tangents):
    l21, pair_a, pair_b, pair_at = primals
    d_l21 = tangents[0]
    half = jnp.sum(d_l21[pair_a] * l21[pair_b], axis=-1)
    half = jax.ops.segment_sum(half, pair_at, num_segments=r * r).reshape(r, r)
    return pair_products(l21, pair_a, pair_b, pair_at, r), half + half.T


class SparseData(NamedTuple):
    """θ-independent pieces: the OLS start (b0, y0, as ``_backends.mme.Prepared``), the cross-products with
    W = mask (R⁻¹ = W/σ² for R = σ²I; None for a heteroscedastic R, rebuilt per evaluation) and ZᵀW·[X, y0]."""

    b0: Float[Array, " p"]
    y0: Float[Array, " n"]
    mask: Float[Array, " n"] | None
    diagonal: Float[Array, "l b b"] | None  # Z₁ᵀWZ₁'s L₁ diagonal blocks
    cross: Float[Array, "r q1"] | tuple | None  # C = Z₂ᵀWZ₁: dense, or per Schur term its pairs' blocks (e, b_j, b₁)
    schur: Float[Array, "r r"] | None  # Z₂ᵀWZ₂
    zt_w: Float[Array, "q c"] | None  # Zᵀ[X, y0] in the blocked order
    pattern: Pattern | None = None


def _values(term: BlockedTerm, dtype):
    if term.values is None:
        return jnp.ones((term.codes.shape[0], 1), dtype)
    return term.values.astype(dtype)


def _offsets(structure: SparseStructure) -> list[int]:
    """Start of each term after the first in the Schur block."""
    out, at = [], 0
    for t in structure.terms[1:]:
        out.append(at)
        at += t.q
    return out


def z_transpose(structure: SparseStructure, U, dtype=None):
    """Zᵀ·U for U (n, c), in the blocked order (term 1, then the Schur block's terms): (q, c)."""
    out = []
    for t in structure.terms:
        rows = _values(t, U.dtype)[:, :, None] * U[:, None, :]  # (n, b, c)
        out.append(jax.ops.segment_sum(rows, t.codes, num_segments=t.levels).reshape(t.q, U.shape[1]))
    return jnp.concatenate(out, axis=0)


def z_times(structure: SparseStructure, u):
    """Z·u for u (q, c) in the blocked order: (n, c)."""
    out, at = 0.0, 0
    for t in structure.terms:
        block = u[at : at + t.q].reshape(t.levels, t.block, -1)[t.codes]  # (n, b, c)
        out = out + jnp.einsum("nb,nbc->nc", _values(t, u.dtype), block)
        at += t.q
    return out


def cross_products(structure: SparseStructure, w, dtype, pattern: Pattern | None = None):
    """(Z₁ᵀWZ₁ blocks (L₁, b₁, b₁), Z₂ᵀWZ₁, Z₂ᵀWZ₂ (r, r)) for row weights w (n,), by segment sums; Z₂ᵀWZ₁ dense
    (r, q₁), or with a ``pattern`` the blocks (e, b_j, b₁) of its pairs, per Schur term."""
    first, rest = structure.terms[0], structure.terms[1:]
    x1 = _values(first, dtype)
    b1, q1, r = first.block, first.q, structure.rest
    w = jnp.broadcast_to(jnp.asarray(w, dtype), (structure.n,))
    wx1 = w[:, None] * x1
    diagonal = jax.ops.segment_sum(wx1[:, :, None] * x1[:, None, :], first.codes, num_segments=first.levels)
    if not rest:
        return diagonal, jnp.zeros((0, q1), dtype), jnp.zeros((0, 0), dtype)
    offsets = _offsets(structure)
    col1 = first.codes[:, None] * b1 + jnp.arange(b1)  # (n, b1): column of term 1
    rows = [off + t.codes[:, None] * t.block + jnp.arange(t.block) for t, off in zip(rest, offsets, strict=True)]
    xs = [_values(t, dtype) for t in rest]
    if pattern is not None:
        cross = tuple(
            jax.ops.segment_sum(x[:, :, None] * wx1[:, None, :], entry, num_segments=level1.shape[0])
            for x, entry, level1 in zip(xs, pattern.entry, pattern.level1, strict=True)
        )
    index, vals = [], []
    for row, x in zip(rows, xs, strict=True) if pattern is None else ():
        index.append((row[:, :, None] * q1 + col1[:, None, :]).reshape(-1))
        vals.append((x[:, :, None] * wx1[:, None, :]).reshape(-1))
    if pattern is None:
        cross = jax.ops.segment_sum(jnp.concatenate(vals), jnp.concatenate(index), num_segments=r * q1)
        cross = cross.reshape(r, q1)
    index, vals = [], []
    for row_a, x_a in zip(rows, xs, strict=True):
        for row_b, x_b in zip(rows, xs, strict=True):
            index.append((row_a[:, :, None] * r + row_b[:, None, :]).reshape(-1))
            vals.append((w[:, None, None] * x_a[:, :, None] * x_b[:, None, :]).reshape(-1))
    schur = jax.ops.segment_sum(jnp.concatenate(vals), jnp.concatenate(index), num_segments=r * r).reshape(r, r)
    return diagonal, cross, schur


def prepare(structure: SparseStructure, y, X, pattern: Pattern | None = None) -> SparseData:
    """The OLS start and, for R = σ²I, the cross-products (once per response); ``pattern`` from
    ``sparse_pattern`` keeps L₂₁ sparse."""
    dtype = y.dtype
    mask = None
    if structure.observed is not None:
        mask = structure.observed.astype(dtype)
        y = jnp.where(structure.observed, y, 0.0).astype(dtype)
        X = jnp.where(structure.observed[:, None], X, 0.0).astype(dtype)
    xtx = X.T @ X
    chol_xtx, _ = _cholesky(0.5 * (xtx + xtx.T))
    b0 = cho_solve((chol_xtx, True), X.T @ y)
    y0 = y - X @ b0
    if structure.heteroscedastic:
        return SparseData(b0, y0, mask, None, None, None, None, pattern)
    weights = jnp.ones((structure.n,), dtype) if mask is None else mask
    diagonal, cross, schur = cross_products(structure, weights, dtype, pattern)
    zt_w = z_transpose(structure, jnp.concatenate([X, y0[:, None]], axis=1))
    return SparseData(b0, y0, mask, diagonal, cross, schur, zt_w, pattern)


class SparseFactor(NamedTuple):
    """The blocked factor of A = ΛᵀZᵀWZΛ + I (``Core.factor`` of this back end)."""

    residual: Float[Array, ""] | Float[Array, " n"]  # σ², or R's diagonal
    lam: tuple[Float[Array, "l b b"], ...]  # each term's λ blocks (L_j, b_j, b_j)
    chol11: Float[Array, "l b b"]
    l21: Float[Array, "l b r"] | Float[Array, "s b"]  # L₂₁ᵀ by the first term's levels, or its row entries
    schur: Float[Array, "r r"]  # S = A₂₂ − L₂₁L₂₁ᵀ
    chol22: Float[Array, "r r"]  # chol(S) (``schur_logdet``, ``schur_solve``)


@jax.custom_jvp
def schur_logdet(schur, chol):
    """log|S| from its Cholesky factor ``chol`` = chol(S); d log|S| = tr(S⁻¹ dS) (``chol``'s tangent is not used).

    Differentiating through the factorisation instead costs about four r³ products in reverse mode (JAX's
    Cholesky rule, Murray 2016); this rule needs S⁻¹ once, two triangular solves."""
    return 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol)))


@schur_logdet.defjvp
def _schur_logdet_jvp(primals, tangents):
    schur, chol = primals
    d_schur, _ = tangents
    # S⁻¹ through ``schur_solve``, so that higher derivatives (the Hessian of the implicit gradients) see its
    # dependence on S.
    inverse = schur_solve(schur, chol, jnp.eye(chol.shape[0], dtype=chol.dtype))
    return schur_logdet(schur, chol), jnp.sum(inverse * d_schur)


@jax.custom_jvp
def schur_solve(schur, chol, rhs):
    """S⁻¹·rhs from S's Cholesky factor ``chol``; d(S⁻¹b) = S⁻¹(db − dS·S⁻¹b) (``chol``'s tangent is not used)."""
    return cho_solve((chol, True), rhs)


@schur_solve.defjvp
def _schur_solve_jvp(primals, tangents):
    schur, chol, rhs = primals
    d_schur, _, d_rhs = tangents
    x = schur_solve(schur, chol, rhs)
    return x, schur_solve(schur, chol, d_rhs - d_schur @ x)


def _lams(theta, structure: SparseStructure):
    return tuple(
        jnp.broadcast_to(
            _block_factor(t.G, theta[t.offset : t.offset + t.size], t.levels), (t.levels, t.block, t.block)
        )
        for t in structure.terms
    )


def _rest_lam_t(lams, structure: SparseStructure, M, transpose: bool = True):
    """Λ₂ᵀ·M (or Λ₂·M) for M (r, c): each Schur term's rows times its λ blocks."""
    out, at = [], 0
    spec = "gji,gjc->gic" if transpose else "gij,gjc->gic"
    for t, lam in zip(structure.terms[1:], lams[1:], strict=True):
        block = M[at : at + t.q].reshape(t.levels, t.block, -1)
        out.append(jnp.einsum(spec, lam, block).reshape(t.q, -1))
        at += t.q
    return jnp.concatenate(out, axis=0) if out else M


def _factorise(theta, structure: SparseStructure, data: SparseData):
    """(factor, ok, log|A|) of the blocked A at θ."""
    dtype = theta.dtype
    residual = _residual(theta, structure)
    if structure.heteroscedastic:
        w = 1.0 / residual if data.mask is None else data.mask / residual
        diagonal, cross, schur = cross_products(structure, w, dtype, data.pattern)
    else:
        diagonal, schur = data.diagonal / residual, data.schur / residual
        cross = jax.tree_util.tree_map(lambda c: c / residual, data.cross)
    lams = _lams(theta, structure)
    first = structure.terms[0]
    lam1 = lams[0]
    b1, r = first.block, structure.rest
    a11 = jnp.einsum("gji,gjk,gkl->gil", lam1, diagonal, lam1) + jnp.eye(b1, dtype=dtype)
    chol11 = _small_cholesky(0.5 * (a11 + jnp.swapaxes(a11, -1, -2)))
    ok = jnp.all(jnp.isfinite(chol11))
    chol11 = jnp.where(ok, chol11, jnp.eye(b1, dtype=dtype))
    logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol11, axis1=-2, axis2=-1)))
    if r == 0:
        l21t, empty = jnp.zeros((first.levels, b1, 0), dtype), jnp.zeros((0, 0), dtype)
        return SparseFactor(residual, lams, chol11, l21t, empty, empty), ok, logdet
    lam_schur = _rest_lam_t(lams, structure, _rest_lam_t(lams, structure, schur).T)
    if data.pattern is None:
        # C̃ᵀ = Λ₁ᵀ Cᵀ Λ₂ by the first term's levels: (L₁, b₁, r); then L₂₁ᵀ = L₁₁⁻¹ C̃ᵀ per level.
        scaled = _rest_lam_t(lams, structure, cross)  # Λ₂ᵀ C (r, q₁)
        scaled_t = jnp.einsum("gji,rgj->gir", lam1, scaled.reshape(r, first.levels, b1))
        l21t = small_forward(chol11, scaled_t)
        dense = l21t.reshape(first.q, r)
        product = dense.T @ dense
    else:
        pattern = data.pattern
        l21t = _sparse_l21(lams, chol11, cross, pattern)[pattern.order]
        product = pair_products(l21t, pattern.pair_a, pattern.pair_b, pattern.pair_at, r)
    s = lam_schur + jnp.eye(r, dtype=dtype) - product
    s = 0.5 * (s + s.T)
    # chol(S) stays differentiable for the higher derivatives (the backward pass of the rules below solves with
    # it); the rules themselves take every first derivative through S, so reverse mode never differentiates it.
    chol22, ok22 = _cholesky(s)
    logdet = logdet + schur_logdet(s, chol22)
    return SparseFactor(residual, lams, chol11, l21t, s, chol22), ok & ok22, logdet


def _sparse_l21(lams, chol11, cross, pattern: Pattern):
    """L₂₁'s row entries (s, b₁): per pair e of term j, (L₁₁⁻¹ λ₁ᵀ C_eᵀ λ_j)ᵀ at its first-term level."""
    out = []
    for lam, blocks, level1, level in zip(lams[1:], cross, pattern.level1, pattern.level, strict=True):
        lam1 = lams[0][level1]
        scaled_t = jnp.einsum("eji,ekj,ekl->eil", lam1, blocks, lam[level])  # (e, b₁, b_j)
        solved = small_forward(chol11[level1], scaled_t)
        out.append(jnp.swapaxes(solved, -1, -2).reshape(-1, solved.shape[1]))
    return jnp.concatenate(out, axis=0)


def _l21_times(f: SparseFactor, data: SparseData, w1, r: int):
    """L₂₁·w₁ for w₁ (L₁, b₁, c): (r, c)."""
    if data.pattern is None:
        return jnp.einsum("gbr,gbc->rc", f.l21, w1)
    rows = jnp.einsum("sb,sbc->sc", f.l21, w1[data.pattern.column])
    return jax.ops.segment_sum(rows, data.pattern.row, num_segments=r)


def _l21_transpose_times(f: SparseFactor, data: SparseData, x2, levels: int):
    """L₂₁ᵀ·x₂ for x₂ (r, c): (L₁, b₁, c)."""
    if data.pattern is None:
        return jnp.einsum("gbr,rc->gbc", f.l21, x2)
    rows = f.l21[:, :, None] * x2[data.pattern.row][:, None, :]
    return jax.ops.segment_sum(rows, data.pattern.column, num_segments=levels)


def _inner(f: SparseFactor, structure: SparseStructure, data: SparseData, v):
    """Λ A⁻¹ Λᵀ·v for v (q, c) in the blocked order, by the two blocked triangular solves."""
    first = structure.terms[0]
    q1, b1 = first.q, first.block
    c = v.shape[1]
    lam1 = f.lam[0]
    u1 = jnp.einsum("gji,gjc->gic", lam1, v[:q1].reshape(first.levels, b1, c))
    w1 = small_forward(f.chol11, u1)
    if structure.rest == 0:
        x1 = small_backward(f.chol11, w1)
        return jnp.einsum("gij,gjc->gic", lam1, x1).reshape(q1, c)
    u2 = _rest_lam_t(f.lam, structure, v[q1:])
    x2 = schur_solve(f.schur, f.chol22, u2 - _l21_times(f, data, w1, structure.rest))
    x1 = small_backward(f.chol11, w1 - _l21_transpose_times(f, data, x2, first.levels))
    out1 = jnp.einsum("gij,gjc->gic", lam1, x1).reshape(q1, c)
    return jnp.concatenate([out1, _rest_lam_t(f.lam, structure, x2, transpose=False)], axis=0)


def _v_inv(f: SparseFactor, structure: SparseStructure, data: SparseData, U, zt_u=None):
    """V⁻¹U = WU − W·Z Λ A⁻¹ Λᵀ Zᵀ W U for U (n, c) zero on the unobserved rows (W = mask/R)."""
    if f.residual.ndim == 0:
        zt_wu = (z_transpose(structure, U) if zt_u is None else zt_u) / f.residual
        correction = z_times(structure, _inner(f, structure, data, zt_wu)) / f.residual
        if data.mask is not None:
            correction = correction * data.mask[:, None]
        return U / f.residual - correction
    w = 1.0 / f.residual if data.mask is None else data.mask / f.residual
    wu = U * w[:, None]
    return wu - w[:, None] * z_times(structure, _inner(f, structure, data, z_transpose(structure, wu)))


def sparse_core(theta, y, X, structure: SparseStructure, reml: bool = True, data: SparseData | None = None) -> Core:
    """ℓ, β̂, Py at θ through the blocked equations; the same values as the dense ``core``."""
    if data is None:
        data = prepare(structure, y, X)
    if structure.observed is not None:
        X = jnp.where(structure.observed[:, None], X, 0.0).astype(X.dtype)
    factor, ok, logdet_a = _factorise(theta, structure, data)
    return gls_core(
        lambda W: _v_inv(factor, structure, data, W, data.zt_w),
        X,
        data.y0,
        data.b0,
        structure,
        factor,
        logdet_a,
        ok,
        reml,
    )


def _dv_times_py(theta, structure: SparseStructure, data: SparseData, p_y):
    """D[:, k] = V_k·Py = Z(∂G/∂θ_k)ZᵀPy + Σ_j (∂σ²_j/∂θ_k)·d_j∘Py, by forward mode on q-vectors (n×k)."""
    zt_py = z_transpose(structure, p_y[:, None])[:, 0]

    def g_times(t):
        out, at = [], 0
        for term, lam in zip(structure.terms, _lams(t, structure), strict=True):
            z = zt_py[at : at + term.q].reshape(term.levels, term.block, 1)
            out.append((lam @ (jnp.swapaxes(lam, -1, -2) @ z)).reshape(term.q))
            at += term.q
        return jnp.concatenate([*out, _part_variances(t, structure)])

    jac = jax.jacfwd(g_times)(theta)
    q = structure.q
    d = z_times(structure, jac[:q])
    if data.mask is not None:
        d = d * data.mask[:, None]
    d = d + jnp.outer(p_y, jac[q])
    for j, part in enumerate(structure.residual[1:], start=1):
        d = d + jnp.outer(part.module.d.astype(p_y.dtype) * p_y, jac[q + j])
    return d


def sparse_evaluate(
    theta, y, X, structure: SparseStructure, *, reml: bool, information: str, data: SparseData | None = None
) -> tuple[Core, Derivatives]:
    """Core quantities, score and information (``"ai"``, ``"observed"`` or ``"none"``) at θ."""
    if information not in INFORMATION or information == "fisher":
        raise ValueError(f"the sparse back end computes information 'ai', 'observed' or 'none', got {information!r}")
    if data is None:
        data = prepare(structure, y, X)

    def loglik(t):
        c = sparse_core(t, y, X, structure, reml, data)
        return c.loglik, c

    (_, c), score = jax.value_and_grad(loglik, has_aux=True)(theta)
    k = theta.shape[0]
    if information == "ai":
        D = _dv_times_py(theta, structure, data, c.p_y)
        m_d = _v_inv(c.factor, structure, data, D)
        if reml:
            m_d = m_d - c.v_inv_x @ cho_solve((c.chol_xvx, True), c.v_inv_x.T @ D)
        info = 0.5 * D.T @ m_d
    elif information == "observed":
        info = -jax.hessian(lambda t: sparse_core(t, y, X, structure, reml, data).loglik)(theta)
    else:
        info = jnp.zeros((k, k), theta.dtype)
    return c, Derivatives(score, 0.5 * (info + info.T))


def conditional_variances(
    theta, y, X, structure: SparseStructure, vcov_beta: Float[Array, "p p"] | None = None
) -> dict[int, Float[Array, " q_j"]]:
    r"""diag Var(u | y) of every random term from the blocked factor, by the offset of its G in θ.

    With G = ΛΛᵀ and A = ΛᵀZᵀWZΛ + I = LLᵀ (W = R⁻¹, masked), G − GZᵀV⁻¹ZG = ΛA⁻¹Λᵀ = MᵀM for M = L⁻¹Λᵀ, so
    each variance is a squared column norm of M (lme4's ``condVar``, Bates et al. 2015, section 3.3). With
    L = [[L₁₁, 0], [L₂₁, L₂₂]]: a column of term 1 (level g) is m = L₁₁,g⁻¹ λ₁,gᵀ e_k on top and −L₂₂⁻¹L₂₁m below;
    a column of the Schur terms is L₂₂⁻¹Λ₂ᵀe_c. Cost O(L₁b₁³ + r²q₁ + r³) and O(rq₁) memory (L₂₁ dense), the cost of
    one evaluation, with no n×q or q×q matrix.

    With ``vcov_beta`` = (XᵀV⁻¹X)⁻¹ the prediction-error variances G − GZᵀPZG instead (Henderson 1975): plus
    diag(H vcov_beta Hᵀ) for H = GZᵀV⁻¹X = ΛA⁻¹ΛᵀZᵀWX (q×p).
    """
    data = prepare(structure, y, X)
    f, _, _ = _factorise(theta, structure, data)
    first, r = structure.terms[0], structure.rest
    m_top = small_forward(f.chol11, jnp.swapaxes(f.lam[0], -1, -2))  # (L₁, b₁, b₁): column k of level g
    first_var = jnp.sum(m_top**2, axis=-2).reshape(first.q)
    variances = [first_var]
    if r:
        below = jnp.einsum("gbr,gbk->rgk", f.l21, m_top).reshape(r, first.q)
        below = jax.scipy.linalg.solve_triangular(f.chol22, below, lower=True)
        variances[0] = first_var + jnp.sum(below**2, axis=0)
        rest = _rest_lam_t(f.lam, structure, jnp.eye(r, dtype=theta.dtype))
        variances.append(jnp.sum(jax.scipy.linalg.solve_triangular(f.chol22, rest, lower=True) ** 2, axis=0))
    variances = jnp.concatenate(variances)
    if vcov_beta is not None:
        X = X if structure.observed is None else jnp.where(structure.observed[:, None], X, 0.0).astype(X.dtype)
        w = 1.0 / f.residual if data.mask is None else data.mask / f.residual
        h = _inner(f, structure, data, z_transpose(structure, X * jnp.broadcast_to(w, (structure.n,))[:, None]))
        variances = variances + jnp.sum((h @ vcov_beta) * h, axis=1)
    out, at = {}, 0
    for t in structure.terms:
        out[t.offset] = variances[at : at + t.q]
        at += t.q
    return out
