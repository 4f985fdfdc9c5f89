"""Model matrices of formula expressions with formulaic, made cheap on repeated calls.

``jreml.fit`` is often called again on data of the same shape (refits, simulations, a notebook cell run
twice). formulaic's ``model_matrix`` spends most of its time parsing, planning and encoding factors through
pandas, which dominates a small fit. Two levels of reuse, both keyed on a signature of the data that fixes
formulaic's encoding (every used column's dtype and, for non-numeric columns, its distinct values):

* the ``ModelSpec`` of the first materialisation is kept, so formulaic's parsing and planning are skipped;
* for the common expressions -- sums and products of plain column names, numeric columns passed through,
  categorical columns with default treatment contrasts -- the spec is compiled to a *plan* (per output
  column: the numeric columns and category levels whose product it is), evaluated with numpy. A plan is used
  only if its column names are exactly formulaic's and it reproduces formulaic's matrix bit for bit on the
  data it was made from; anything else falls back to ``spec.get_model_matrix``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pandas as pd

#: Cached entries; cleared when full (the keys embed data signatures, so an unbounded dict would grow).
_CACHE: dict = {}
_CACHE_LIMIT = 256


@dataclass(frozen=True)
class _Factor:
    """One factor of a plan column: a numeric column (``level is None``) or the indicator ``column == level``."""

    column: str
    level: int | None = None


@dataclass(frozen=True)
class _Entry:
    spec: object
    names: tuple[str, ...]
    #: per output column, the factors whose product it is (``()``: the intercept); None: replay the spec.
    plan: tuple[tuple[_Factor, ...], ...] | None
    #: per categorical column: {distinct value: index of its level in formulaic's level order}.
    level_index: dict


@functools.lru_cache(maxsize=256)
def _required_variables(text: str) -> frozenset[str] | None:
    from formulaic import Formula  # imported on first use: formulaic costs ~0.4 s to import

    try:
        return frozenset(str(v) for v in Formula(text).required_variables)
    except Exception:  # formulaic raises several parser error types; model_matrix will report them
        return None


def _is_numeric(dtype) -> bool:
    return pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype)


def _inspect(text: str, data: pd.DataFrame):
    """(cache key, {column: factorize codes}, {column: distinct values}) of ``text`` on ``data``.

    The key is None where a cached spec could encode differently: expressions with calls (``C(x)``,
    ``center(x)``: stateful transforms keep data-dependent state) or backticks, unknown columns, missing
    values (left to formulaic, which raises).
    """
    if "(" in text or "`" in text:
        return None, None, None
    variables = _required_variables(text)
    if variables is None:
        return None, None, None
    parts, codes, uniques = [], {}, {}
    for name in sorted(variables):
        if name not in data.columns:
            return None, None, None
        column = data[name]
        dtype = column.dtype
        if _is_numeric(dtype):
            parts.append((name, str(dtype)))
            continue
        column_codes, distinct = pd.factorize(column)
        if column_codes.size and column_codes.min() < 0:
            return None, None, None
        distinct = tuple(distinct)
        categories = tuple(dtype.categories) if isinstance(dtype, pd.CategoricalDtype) else None
        # The types too: True == 1 and 1 == 1.0, but formulaic names the levels differently.
        parts.append((name, str(dtype), categories, distinct, tuple(type(v) for v in distinct)))
        codes[name], uniques[name] = column_codes, distinct
    return (text, tuple(parts)), codes, uniques


def _compile(spec, names: tuple[str, ...], data: pd.DataFrame, uniques: dict):
    """The plan of ``spec`` and each categorical column's level lookup, or (None, {}) outside the simple cases."""
    from formulaic.parser.types import Factor
    from formulaic.transforms.contrasts import ContrastsState, TreatmentContrasts
    from formulaic.utils.sentinels import UNSET

    if spec.output != "pandas" or spec.transform_state:
        return None, {}
    levels_of: dict[str, list] = {}
    for name, (kind, state) in spec.encoder_state.items():
        dtype = data[name].dtype if name in data.columns else None
        if kind.value == "numerical" and isinstance(dtype, np.dtype) and dtype.kind in "biuf":  # bool: 0/1
            continue
        contrasts = state.get("contrasts") if kind.value == "categorical" else None
        if not (
            isinstance(contrasts, ContrastsState)
            and type(contrasts.contrasts) is TreatmentContrasts
            and contrasts.contrasts.base is UNSET
            and name in uniques
        ):
            return None, {}
        levels_of[name] = list(contrasts.levels)
    level_index = {}
    for name, levels in levels_of.items():
        lookup = {}
        for value in uniques[name]:
            value = _plain(value)
            matches = [i for i, level in enumerate(levels) if type(_plain(level)) is type(value) and level == value]
            if len(matches) != 1:
                return None, {}
            lookup[value] = matches[0]
        level_index[name] = lookup
    plan, plan_names = [], []
    for structure in spec.structure:
        for scoped in structure.scoped_terms:
            if scoped.scale != 1:
                return None, {}
            # Per factor: its columns as (name, _Factor); the first factor varies fastest, as in formulaic.
            choices = []
            for scoped_factor in scoped.factors:
                factor = scoped_factor.factor.factor
                name = factor.expr
                if factor.eval_method is not Factor.EvalMethod.LOOKUP or name not in spec.encoder_state:
                    return None, {}
                if name not in levels_of:
                    choices.append([(name, _Factor(name))])
                    continue
                levels = levels_of[name]
                start, fmt = (1, "{}[T.{}]") if scoped_factor.reduced else (0, "{}[{}]")
                choices.append([(fmt.format(name, levels[j]), _Factor(name, j)) for j in range(start, len(levels))])
            if not choices:
                plan_names.append("Intercept")
                plan.append(())
                continue
            for combo in _products(choices):
                plan_names.append(":".join(label for label, _ in combo))
                plan.append(tuple(f for _, f in combo))
    if tuple(plan_names) != tuple(str(c) for c in names):
        return None, {}
    return tuple(plan), level_index


def _plain(value):
    """A numpy scalar as the Python scalar it equals (levels and values may come as either)."""
    return value.item() if isinstance(value, np.generic) else value


def _products(choices: list[list]):
    """All combinations of one entry per factor, the first factor varying fastest (formulaic's column order)."""
    out = [[]]
    for options in choices:
        out = [[*combo, option] for option in options for combo in out]
    return out


def _evaluate(entry: _Entry, data: pd.DataFrame, codes: dict, uniques: dict) -> np.ndarray | None:
    """The plan's matrix on ``data`` (None where a numeric column has missing values: formulaic reports them)."""
    level_codes = {}
    for name, lookup in entry.level_index.items():
        # factorize codes number the distinct values in order of appearance; map them to formulaic's levels.
        level_codes[name] = np.asarray([lookup[_plain(v)] for v in uniques[name]], dtype=np.int64)[codes[name]]
    numeric = {}
    X = np.empty((len(data), len(entry.plan)))
    for j, factors in enumerate(entry.plan):
        if not factors:
            X[:, j] = 1.0
            continue
        # Numeric columns multiplied in formula order (as formulaic does, so rounding agrees), then the 0/1
        # indicators, which are exact.
        value = None
        for factor in factors:
            if factor.level is None:
                if factor.column not in numeric:
                    values = data[factor.column].to_numpy()
                    if values.dtype.kind == "f" and np.isnan(values).any():
                        return None
                    numeric[factor.column] = values
                value = numeric[factor.column] if value is None else value * numeric[factor.column]
        for factor in factors:
            if factor.level is not None:
                indicator = (level_codes[factor.column] == factor.level).astype(float)
                value = indicator if value is None else value * indicator
        X[:, j] = value
    return X


def model_matrix(text: str, data: pd.DataFrame) -> tuple[np.ndarray, tuple[str, ...], object]:
    """(n×p float matrix, formulaic's column names, ModelSpec) of the expression ``text`` on ``data``.

    As ``formulaic.model_matrix(text, data, na_action="raise", ensure_full_rank=True)``; formulaic's
    exceptions propagate.
    """
    from formulaic import model_matrix as formulaic_matrix

    key, codes, uniques = _inspect(text, data)
    entry = _CACHE.get(key) if key is not None else None
    if entry is not None:
        if entry.plan is not None:
            X = _evaluate(entry, data, codes, uniques)
            if X is not None:
                return X, entry.names, entry.spec
        mm = entry.spec.get_model_matrix(data, na_action="raise")
        return _dense(mm, len(data)), entry.names, entry.spec
    mm = formulaic_matrix(text, data, na_action="raise", ensure_full_rank=True)
    X = _dense(mm, len(data))
    names = tuple(str(c) for c in mm.columns)
    if key is not None:
        spec = mm.model_spec
        try:
            plan, level_index = _compile(spec, names, data, uniques)
        except Exception:  # _compile reads formulaic internals; if they change, replay the spec instead
            plan, level_index = None, {}
        entry = _Entry(spec, names, plan, level_index)
        if plan is not None:
            replayed = _evaluate(entry, data, codes, uniques)
            if replayed is None or replayed.shape != X.shape or not np.array_equal(replayed, X):
                entry = _Entry(spec, names, None, {})
        if len(_CACHE) >= _CACHE_LIMIT:
            _CACHE.clear()
        _CACHE[key] = entry
    return X, names, mm.model_spec


def _dense(mm, n: int) -> np.ndarray:
    return np.asarray(mm, dtype=float).reshape(n, len(mm.columns))
