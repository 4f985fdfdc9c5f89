"""The numerator relationship matrix A of a pedigree, its sparse inverse and the inbreeding coefficients.

For an individual i with sire s and dam d (either may be unknown), in an order where parents precede offspring:

- A by the tabular method (Emik & Terrill 1949; Mrode 2014, *Linear Models for the Prediction of Animal Breeding
  Values*, §2.1): A_ij = ½(A_js + A_jd) for j older than i, A_ii = 1 + ½A_sd, with A_·u = 0 for an unknown parent u.
  Dense, n×n: built only when ``.A`` is asked for.
- Inbreeding F_i = ½A_sd without forming A: A = (I − P)⁻¹ D (I − P)⁻ᵀ (Henderson 1976), P holding ½ at each
  known parent, D_ii = 1 − ¼(1 + F_s) − ¼(1 + F_d) (the term of an unknown parent dropped: F_u = −1); column d of A
  by two sparse triangular solves (Colleau 2002, Genet. Sel. Evol. 34:409), generation by generation so that the
  parents' F are known when D is needed.
- A⁻¹ = Σ_i δ_i c_i c_iᵀ (Henderson 1976, with inbreeding as Quaas 1976), δ_i = 1/D_ii, c_i = e_i − ½e_s − ½e_d:
  sparse, at most 9 entries per individual.
"""

from __future__ import annotations

import collections
import dataclasses
import functools

import numpy as np
import pandas as pd
import scipy.sparse
import scipy.sparse.linalg

#: Parent codes read as "unknown" (besides missing values), compared after conversion to text.
UNKNOWN_PARENT = ("0", "", "NA", "na", "NaN", "nan", ".", "-", "None")


@dataclasses.dataclass(frozen=True, eq=False)
class Pedigree:
    """A checked pedigree in an order where parents precede offspring.

    Attributes:
        ids: the individuals' labels (text), parents not listed as individuals first (as founders), then the
            pedigree's rows in their order; the rows and columns of ``A`` and ``A_inverse`` follow it.
        sire, dam: for each individual the position of its parent in ``ids``, −1 where unknown.
        inbreeding: F per individual (a Series indexed by ``ids``).
    """

    ids: tuple[str, ...]
    sire: np.ndarray
    dam: np.ndarray
    order: np.ndarray  # positions in ``ids`` with parents before offspring
    inbreeding: pd.Series
    within_family: np.ndarray  # D_ii of A = L D Lᵀ, per individual in ``ids`` order

    @functools.cached_property
    def A(self) -> pd.DataFrame:
        """The numerator relationship matrix (n×n DataFrame indexed by ``ids``; pass it as ``relmat``)."""
        n = len(self.ids)
        A = np.zeros((n, n))
        for i in self.order:
            s, d = self.sire[i], self.dam[i]
            row = 0.5 * ((A[s] if s >= 0 else 0.0) + (A[d] if d >= 0 else 0.0))
            A[i, :] = row
            A[:, i] = row
            A[i, i] = 1.0 + (0.5 * A[s, d] if s >= 0 and d >= 0 else 0.0)
        return pd.DataFrame(A, index=list(self.ids), columns=list(self.ids))

    @functools.cached_property
    def A_inverse(self) -> scipy.sparse.csr_array:
        """A⁻¹ by Henderson's rules with inbreeding (sparse CSR, rows and columns in ``ids`` order)."""
        n = len(self.ids)
        rows, cols, vals = [], [], []
        for i in range(n):
            delta = 1.0 / self.within_family[i]
            members = [(i, 1.0)] + [(p, -0.5) for p in (self.sire[i], self.dam[i]) if p >= 0]
            for a, ca in members:
                for b, cb in members:
                    rows.append(a)
                    cols.append(b)
                    vals.append(delta * ca * cb)
        return scipy.sparse.coo_array((vals, (rows, cols)), shape=(n, n)).tocsr()


def pedigree_matrix(pedigree, id: str = "id", sire: str = "sire", dam: str = "dam") -> Pedigree:  # noqa: A002
    """Check a pedigree and give its relationship matrix A, A⁻¹ and inbreeding coefficients (module docstring).

    Args:
        pedigree: a DataFrame with columns ``id``, ``sire``, ``dam`` (or a sequence of (id, sire, dam) rows), in any
            order; an unknown parent is a missing value or one of ``UNKNOWN_PARENT`` (``0``, ``NA``, ``.``, ...).
            A parent that is not itself a row is added as a founder. Selfing (sire = dam) is allowed.
        id, sire, dam: the column names.

    Returns:
        A ``Pedigree``: ``.A`` (dense DataFrame, for ``relmat={"animal": ped.A}``), ``.A_inverse`` (scipy sparse),
        ``.inbreeding`` and ``.ids``.

    Raises:
        ValueError: naming the ids at fault: duplicated ids, an individual that is its own parent or ancestor
            (a cycle), missing columns.
    """
    frame = _as_frame(pedigree, id, sire, dam)
    ids = _labels(frame[id], id)
    if any(v is None for v in ids):
        rows = [int(i) for i, v in enumerate(ids) if v is None]
        raise ValueError(f"pedigree column {id!r} is missing (or an unknown-parent code) in row(s) {rows[:10]}")
    duplicated = sorted(v for v, count in collections.Counter(ids).items() if count > 1)
    if duplicated:
        raise ValueError(f"pedigree ids appear more than once: {duplicated[:10]}")
    sires, dams = _labels(frame[sire], sire), _labels(frame[dam], dam)
    listed = set(ids)
    founders = sorted({p for p in (*sires, *dams) if p is not None and p not in listed})
    all_ids = tuple(founders) + tuple(ids)
    position = {v: i for i, v in enumerate(all_ids)}
    n = len(all_ids)
    sire_pos = np.full(n, -1, dtype=np.int64)
    dam_pos = np.full(n, -1, dtype=np.int64)
    for k, (s, d) in enumerate(zip(sires, dams, strict=True)):
        i = len(founders) + k
        sire_pos[i] = position[s] if s is not None else -1
        dam_pos[i] = position[d] if d is not None else -1
    selfparent = [all_ids[i] for i in range(n) if i in (sire_pos[i], dam_pos[i])]
    if selfparent:
        raise ValueError(f"individual(s) {selfparent[:10]} are their own parent")
    order, depth = _parents_first(all_ids, sire_pos, dam_pos)
    inbreeding, within = _inbreeding(order, depth, sire_pos, dam_pos)
    return Pedigree(
        ids=all_ids,
        sire=sire_pos,
        dam=dam_pos,
        order=order,
        inbreeding=pd.Series(inbreeding, index=list(all_ids), name="F"),
        within_family=within,
    )


def _as_frame(pedigree, id: str, sire: str, dam: str) -> pd.DataFrame:  # noqa: A002
    if not isinstance(pedigree, pd.DataFrame):
        pedigree = pd.DataFrame(list(pedigree), columns=[id, sire, dam])
    absent = [c for c in (id, sire, dam) if c not in pedigree.columns]
    if absent:
        raise ValueError(f"pedigree has no column(s) {absent}; it has {list(pedigree.columns)}")
    if len(pedigree) == 0:
        raise ValueError("pedigree has no rows")
    return pedigree


def _labels(column: pd.Series, name: str) -> list[str | None]:
    """Each entry as text (integral floats without '.0', so 1.0 and 1 name the same individual); None if unknown."""
    out: list[str | None] = []
    for value in column.tolist():
        if value is None or (isinstance(value, float) and np.isnan(value)):
            out.append(None)
            continue
        if isinstance(value, float | np.floating) and float(value).is_integer():
            value = int(value)
        text = str(value).strip()
        out.append(None if text in UNKNOWN_PARENT else text)
    return out


def _parents_first(ids: tuple[str, ...], sire: np.ndarray, dam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions ordered by generation (parents before offspring, stable within one) and each one's generation
    (0 for founders); a cycle is named."""
    n = len(ids)
    depth = np.full(n, -1, dtype=np.int64)
    for start in range(n):
        if depth[start] >= 0:
            continue
        stack, on_path = [start], {start}
        while stack:
            i = stack[-1]
            pending = [p for p in (sire[i], dam[i]) if p >= 0 and depth[p] < 0]
            cycle = [p for p in pending if p in on_path]
            if cycle:
                path = stack[stack.index(cycle[0]) :]
                raise ValueError(f"the pedigree has a cycle: {[ids[j] for j in path]} (each a parent of the next)")
            if pending:
                stack.append(pending[0])
                on_path.add(pending[0])
                continue
            depth[i] = 1 + max((depth[p] for p in (sire[i], dam[i]) if p >= 0), default=-1)
            stack.pop()
            on_path.discard(i)
    return np.argsort(depth, kind="stable"), depth


def _inbreeding(
    order: np.ndarray, depth: np.ndarray, sire: np.ndarray, dam: np.ndarray, block: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Inbreeding coefficients F and D of A = (I − P)⁻¹ D (I − P)⁻ᵀ, one generation at a time.

    F_i = ½A_sd for both parents known. Column d of A is (I − P)⁻¹ D (I − P)⁻ᵀ e_d: two sparse triangular solves,
    which read D only at d's ancestors — all of an earlier generation, so known when i's generation is reached.
    Cost O(n) per inbred individual (O(n²) in all, in compiled solves), memory O(n·block).
    """
    n = len(order)
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    children, parents = [], []
    for i in range(n):
        for p in (sire[i], dam[i]):
            if p >= 0:
                children.append(rank[i])
                parents.append(rank[p])
    transmission = scipy.sparse.csc_array(
        (np.full(len(children), 0.5), (children, parents)), shape=(n, n)
    )  # P in generation order: row i holds ½ at each known parent (a selfed parent twice: 1)
    solver = scipy.sparse.linalg.splu(
        (scipy.sparse.eye_array(n, format="csc") - transmission).tocsc(),
        permc_spec="NATURAL",
        diag_pivot_thresh=0.0,
        options={"SymmetricMode": False},
    )
    inbreeding = np.zeros(n)  # in ``ids`` order
    within = np.zeros(n)  # D_ii in generation order; 0 until the generation is reached
    for generation in np.unique(depth):
        members = np.flatnonzero(depth == generation)
        for i in members:
            f_sire = inbreeding[sire[i]] if sire[i] >= 0 else -1.0
            f_dam = inbreeding[dam[i]] if dam[i] >= 0 else -1.0
            within[rank[i]] = 1.0 - 0.25 * (1.0 + f_sire) - 0.25 * (1.0 + f_dam)
        inbred = members[(sire[members] >= 0) & (dam[members] >= 0)]
        for start in range(0, len(inbred), block):
            chunk = inbred[start : start + block]
            unit = np.zeros((n, len(chunk)))
            unit[rank[dam[chunk]], np.arange(len(chunk))] = 1.0
            columns = solver.solve(within[:, None] * solver.solve(unit, trans="T"))
            inbreeding[chunk] = 0.5 * columns[rank[sire[chunk]], np.arange(len(chunk))]
    return inbreeding, within[rank]
