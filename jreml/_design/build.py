"""From a data frame and a parsed formula to (y, X, covariance model), as lme4's ``lFormula`` does."""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .._covariance.base import AbstractCovariance
from .._covariance.basic import FixedMatrix, IdentityMatrix, ScalarMatrix, UnstructuredMatrix
from .._covariance.compose import CovariancePropagation, DummyMatrix, GroupedColumns, KroneckerProduct, Sum
from .factors import dummy_matrix
from .formula import FormulaError, ParsedFormula, RandomSpec, parse_formula
from .materialize import model_matrix

#: A column is aliased when its residual on the earlier columns is below this fraction of its norm.
ALIAS_TOLERANCE = 1e-7


@dataclass(frozen=True)
class Design:
    """What ``fit`` needs: response, fixed design and names, covariance model, dropped-row count."""

    formula: ParsedFormula
    y: np.ndarray
    X: np.ndarray
    beta_names: tuple[str, ...]
    model: AbstractCovariance
    n_dropped: int
    data: pd.DataFrame
    #: formulaic's ModelSpec of the fixed part and its column names before aliased columns were dropped.
    fixed_spec: object = None
    fixed_names: tuple[str, ...] = ()
    #: per ``formula.random`` entry: (ModelSpec of its ``expr``, column labels).
    random_specs: tuple = field(default=())
    #: random term name (``model``'s terms, after ``(x || g)`` expansion) → its factor's levels, in û's order.
    random_levels: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: why the variances cannot be identified (lme4's level and random-effect counts), empty when they can.
    unidentifiable: tuple[str, ...] = ()


def _column_name(name: str) -> str:
    return "(Intercept)" if name == "Intercept" else name


@functools.lru_cache(maxsize=256)
def _variables(text: str, what: str, formula: str) -> frozenset[str]:
    from formulaic import Formula  # imported on first use: formulaic costs ~0.4 s to import

    try:
        return frozenset(str(v) for v in Formula(text).required_variables)
    except Exception as err:  # formulaic raises several parser error types
        raise FormulaError(f"cannot parse the {what} {text!r} of formula {formula!r}: {err}") from err


def _matrix(text: str, data: pd.DataFrame, what: str, formula: str):
    """(matrix, column names, ModelSpec) of ``text`` on ``data``, with formulaic (cached: see ``materialize``)."""
    try:
        X, names, spec = model_matrix(text, data)
    except Exception as err:
        raise FormulaError(f"cannot build the {what} {text!r} of formula {formula!r}: {err}") from err
    return X, tuple(_column_name(c) for c in names), spec


def _drop_aliased(X: np.ndarray, names: tuple[str, ...]) -> tuple[np.ndarray, tuple[str, ...]]:
    """Drop columns that are (numerically) linear combinations of earlier ones, as lm/lmer do, with a warning."""
    # Fast path for the usual full-rank X: |R_jj| of a QR is column j's residual on the columns before it, so
    # when every one clears the tolerance with a wide margin (far beyond rounding), the column-by-column
    # least-squares test below would keep every column.
    norms = np.linalg.norm(X, axis=0)
    if X.shape[0] >= X.shape[1] > 1 and np.all(norms > 0.0):
        R = np.linalg.qr(X, mode="r")
        if np.all(np.abs(np.diagonal(R)) > 1e3 * ALIAS_TOLERANCE * norms):
            return X, names
    keep: list[int] = []
    for j in range(X.shape[1]):
        col = X[:, j]
        norm = np.linalg.norm(col)
        if norm == 0.0:
            continue
        if keep:
            basis = X[:, keep]
            coef, *_ = np.linalg.lstsq(basis, col, rcond=None)
            if np.linalg.norm(col - basis @ coef) <= ALIAS_TOLERANCE * norm:
                continue
        keep.append(j)
    if len(keep) < X.shape[1]:
        dropped = [names[j] for j in range(X.shape[1]) if j not in keep]
        warnings.warn(
            f"fixed-effect model matrix is rank deficient: dropping aliased column(s) {dropped}",
            UserWarning,
            stacklevel=4,
        )
    return X[:, keep], tuple(names[j] for j in keep)


def _response(parsed: ParsedFormula, data: pd.DataFrame) -> np.ndarray:
    name = parsed.response.strip("`")
    if name in data.columns:
        column = data[name]
        if not (pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)):
            raise TypeError(f"response {name!r} must be numeric, got dtype {column.dtype}")
        return column.to_numpy(dtype=float)
    from formulaic import model_matrix

    try:
        mm = model_matrix(f"{parsed.response} ~ 1", data, na_action="raise")
    except Exception as err:
        raise FormulaError(f"cannot evaluate the response {parsed.response!r}: {err}") from err
    lhs = np.asarray(mm.lhs, dtype=float)
    if lhs.ndim != 2 or lhs.shape[1] != 1:
        raise TypeError(f"response {parsed.response!r} must be one numeric column, got {lhs.shape[1]} columns")
    return lhs[:, 0]


def _unique_names(specs) -> list[str]:
    """lme4's group names: a repeated grouping factor gets ``.1``, ``.2``, ... (``(x || g)`` → g, g.1)."""
    seen: dict[str, int] = {}
    out = []
    for spec in specs:
        count = seen.get(spec.group, 0)
        out.append(spec.group if count == 0 else f"{spec.group}.{count}")
        seen[spec.group] = count + 1
    return out


def _relationship(K, levels: tuple[str, ...], group: str) -> np.ndarray:
    """K restricted to and ordered by ``levels``; checked symmetric PSD."""
    if isinstance(K, pd.DataFrame):
        index = [str(v) for v in K.index]
        missing = [lvl for lvl in levels if lvl not in set(index)]
        if missing:
            raise ValueError(f"relmat[{group!r}] has no rows for level(s) {missing[:10]} of {group!r}")
        position = {v: i for i, v in enumerate(index)}
        rows = [position[lvl] for lvl in levels]
        columns = [str(v) for v in K.columns]
        if set(levels) <= set(columns):
            cpos = {v: i for i, v in enumerate(columns)}
            cols = [cpos[lvl] for lvl in levels]
        else:
            cols = rows
        Kn = K.to_numpy(dtype=float)[np.ix_(rows, cols)]
    else:
        Kn = np.asarray(K, dtype=float)
        if Kn.shape != (len(levels), len(levels)):
            raise ValueError(
                f"relmat[{group!r}] must be {len(levels)}x{len(levels)} (the sorted levels of {group!r}), "
                f"got shape {Kn.shape}; pass a DataFrame indexed by level to match by name"
            )
    if not np.all(np.isfinite(Kn)):
        raise ValueError(f"relmat[{group!r}] has non-finite entries")
    if not np.any(Kn):
        raise ValueError(f"relmat[{group!r}] is all zeros: the variance of (1 | {group}) cannot be identified")
    scale = float(np.max(np.abs(Kn)))
    asym = float(np.max(np.abs(Kn - Kn.T)))
    if asym > 1e-8 * scale:
        raise ValueError(f"relmat[{group!r}] must be symmetric: max |K - K.T| = {asym:.3g}")
    Kn = 0.5 * (Kn + Kn.T)
    smallest = float(np.linalg.eigvalsh(Kn)[0])
    if smallest < -1e-8 * scale:
        raise ValueError(f"relmat[{group!r}] must be positive semi-definite: smallest eigenvalue {smallest:.3g}")
    return Kn


def _slope_term(M: np.ndarray, labels: tuple[str, ...], factor: DummyMatrix, name: str) -> CovariancePropagation:
    """Z = n×(q·m) level-major (column j·m + k is level j's k-th term), kept as codes and M (``GroupedColumns``);
    G = I_q ⊗ Unstructured(m)."""
    q = factor.n_levels
    Z = GroupedColumns(factor.codes, M, q)
    G = KroneckerProduct(IdentityMatrix(q), UnstructuredMatrix(M.shape[1], labels=labels))
    return CovariancePropagation(Z, G, name=name)


def _random_terms(specs: list[RandomSpec], data: pd.DataFrame, relmat: dict, formula: str) -> list:
    # (x || g): one uncorrelated term per column of x's model matrix.
    expanded: list[tuple[RandomSpec, np.ndarray, tuple[str, ...]]] = []
    model_specs = []
    for spec in specs:
        M, labels, model_spec = _matrix(spec.expr, data, f"random-effects term ({spec.expr} | {spec.group})", formula)
        model_specs.append((model_spec, labels))
        if M.shape[1] == 0:
            raise FormulaError(f"random-effects term ({spec.expr} | {spec.group}) has no columns in {formula!r}")
        if spec.correlated:
            expanded.append((spec, M, labels))
        else:
            expanded.extend((spec, M[:, [k]], (label,)) for k, label in enumerate(labels))
    names = _unique_names([spec for spec, _, _ in expanded])
    unused = set(relmat) - {spec.group for spec, _, _ in expanded}
    if unused:
        raise ValueError(f"relmat given for {sorted(unused)}, which is not a grouping factor of {formula!r}")
    terms, levels, unidentifiable = [], {}, []
    for (spec, M, labels), name in zip(expanded, names, strict=True):
        factor = dummy_matrix([data[f] for f in spec.factors])
        if factor.n_levels < 2:
            raise ValueError(f"grouping factor {spec.group!r} has only {factor.n_levels} level: it needs at least 2")
        levels[name] = factor.levels
        intercept_only = labels == ("(Intercept)",)
        n_rows = len(data)
        if spec.group not in relmat:
            # lme4's checks (lmerControl's check.nobs.vs.nlev / check.nobs.vs.nRE): with as many levels as rows, or as
            # many random effects as rows, the term's variance and the residual's are the same thing and cannot be
            # told apart. A relationship matrix K ≠ I separates them. ``fit`` refuses such a design.
            if factor.n_levels >= n_rows:
                unidentifiable.append(
                    f"number of levels of each grouping factor must be < number of observations (problems: "
                    f"{spec.group!r} has {factor.n_levels} levels for {n_rows} rows): its variance and the residual "
                    "variance cannot be identified"
                )
            elif factor.n_levels * M.shape[1] >= n_rows and not intercept_only:
                unidentifiable.append(
                    f"number of observations ({n_rows}) <= number of random effects ({factor.n_levels * M.shape[1]}) "
                    f"for term ({spec.expr} | {spec.group}): the random-effects parameters and the residual variance "
                    "cannot be identified"
                )
        if spec.group in relmat:
            if not intercept_only:
                raise NotImplementedError(f"relmat for {spec.group!r} is supported only with (1 | {spec.group})")
            K = _relationship(relmat[spec.group], factor.levels, spec.group)
            terms.append(CovariancePropagation(factor, FixedMatrix(K), name=name))
        elif intercept_only:
            terms.append(CovariancePropagation(factor, ScalarMatrix(factor.n_levels), name=name))
        else:
            terms.append(_slope_term(M, labels, factor, name))
    return terms, tuple(model_specs), levels, tuple(unidentifiable)


def _check_finite(data: pd.DataFrame, columns: list[str]) -> None:
    """±inf in a used numeric column is an error naming the column and the row (NaN rows were dropped)."""
    for c in columns:
        column = data[c]
        if pd.api.types.is_float_dtype(column):
            values = column.to_numpy(dtype=float)
            infinite = np.isinf(values)
            if infinite.any():
                row = int(np.flatnonzero(infinite)[0])
                raise ValueError(
                    f"column {c!r} holds {values[row]} in row {data.index[row]!r}: a model needs finite data"
                )


def _check_response_varies(y: np.ndarray, X: np.ndarray, response: str) -> None:
    """A response the fixed effects fit exactly (a constant y beside an intercept) leaves nothing to any variance."""
    coef, *_ = np.linalg.lstsq(X, y, rcond=None) if X.shape[1] else (np.zeros(0),)
    residual = y - X @ coef
    if np.linalg.norm(residual) <= 1e-12 * max(np.linalg.norm(y), np.finfo(float).tiny):
        what = "is constant" if np.ptp(y) == 0 else "is fitted exactly by the fixed effects"
        raise ValueError(
            f"the response {response!r} {what}: nothing is left for the random effects or the residual variance"
        )


def _complete_rows(data: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """The rows of ``data[columns]`` without missing values, indexed 0..n-1 (no copy when nothing is dropped)."""
    missing = None
    for c in columns:
        na = pd.isna(data[c].to_numpy())
        missing = na if missing is None else missing | na
    if missing is not None and not missing.any():
        index = data.index
        if isinstance(index, pd.RangeIndex) and index.start == 0 and index.step == 1:
            return data
        return data[columns].reset_index(drop=True)
    return data[columns].dropna().reset_index(drop=True)


def build_design(formula: str, data: pd.DataFrame, relmat: dict | None = None) -> Design:
    """Parse ``formula``, drop rows with missing values in used columns, and build y, X and the model."""
    parsed = parse_formula(formula)
    if not isinstance(data, pd.DataFrame):
        raise TypeError(f"data must be a pandas DataFrame, got {type(data).__name__}")
    relmat = dict(relmat or {})
    text = parsed.text
    used = set(_variables(f"{parsed.response} ~ {parsed.fixed}", "fixed part", text))
    for spec in parsed.random:
        used |= _variables(spec.expr, f"random-effects term ({spec.expr} | {spec.group})", text)
        used |= set(spec.factors)
    if "offset" in used and "offset" not in data.columns:
        raise NotImplementedError(
            f"offset() in {text!r} is not supported yet: subtract the offset from the response instead"
        )
    unknown = sorted(v for v in used if v not in data.columns)
    if unknown:
        raise KeyError(f"formula {text!r} uses column(s) {unknown} not in the data; columns: {list(data.columns)}")
    columns = [c for c in data.columns if c in used]
    _check_finite(data, columns)
    kept = _complete_rows(data, columns)
    n_dropped = len(data) - len(kept)
    if len(kept) == 0:
        raise ValueError(f"no complete rows left after dropping missing values in {columns}")
    y = _response(parsed, kept)
    X_full, full_names, fixed_spec = _matrix(parsed.fixed, kept, "fixed part", text)
    X, names = _drop_aliased(X_full, full_names)
    _check_response_varies(y, X, parsed.response)
    terms, random_specs, random_levels, unidentifiable = _random_terms(list(parsed.random), kept, relmat, text)
    model = Sum(*terms, ScalarMatrix(len(kept), name="Residual"))
    return Design(
        parsed, y, X, names, model, n_dropped, kept, fixed_spec, full_names, random_specs, random_levels, unidentifiable
    )
