"""What a formula fit records beside the numbers (``FormulaInfo``: fixed-effects columns, random terms, levels) and
what it needs to predict on new data: levels matched by value, the fit's model specs applied to ``newdata``."""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class RandomTermInfo:
    """What the formula layer knows about one random term, for ``varcorr``, ``ranef`` and ``predict(newdata)``.

    ``name`` is the term's (lme4) name (``"Subject"``, ``"Subject.1"`` for a second term on the same factor),
    ``factors`` the grouping columns, ``labels`` the term's columns (``("(Intercept)", "Days")``), ``levels``
    the factor's levels in the fit (the order of û), ``spec`` formulaic's model spec of the term's expression
    (``None`` for an intercept-only term) and ``columns`` which of its columns the term uses (``(x || g)``).
    """

    name: str
    factors: tuple[str, ...]
    labels: tuple[str, ...]
    levels: tuple[str, ...]
    spec: Any = None
    columns: tuple[int, ...] | None = None

    @property
    def group(self) -> str:
        return ":".join(self.factors)


@dataclass(frozen=True, eq=False)
class FormulaInfo:
    """The formula layer's metadata of a :func:`jreml.fit` result (fixed-part model spec, random terms).

    Stored as a static field of :class:`FitResult`, which must be hashable; formulaic's ``ModelSpec`` is not, so
    this class compares and hashes by identity (``eq=False``). A jitted function that takes a formula fit
    therefore recompiles for each new fit; ``estimate`` results (``formula_info=None``) are unaffected.
    """

    text: str
    fixed_spec: Any
    fixed_columns: tuple[int, ...]
    terms: tuple[RandomTermInfo, ...]


def level_names(column) -> list[str]:
    """Each value of a factor column as ``DummyMatrix`` names its level (ints as ints, floats as floats)."""
    values = pd.Series(column).to_numpy(dtype=object).tolist()
    if values and all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in values):
        return [str(int(v)) for v in values]
    if values and all(isinstance(v, float | np.floating) for v in values):
        return [str(float(v)) for v in values]
    return [str(v) for v in values]


def _level_candidates(column) -> list[tuple[str, ...]]:
    """The names a value of a ``newdata`` factor column may have among the fit's levels, matched by value: the
    fit names ints as ints and floats as floats (``_level_names``), so 308 and 308.0 name the same level whichever
    dtype each frame has (a NaN in an int column makes it float); a missing value has none (its row falls back to
    the fixed effects)."""
    out = []
    for v in pd.Series(column).to_numpy(dtype=object).tolist():
        if v is None or (isinstance(v, float | np.floating) and np.isnan(v)) or v is pd.NA:
            out.append(())
        elif isinstance(v, int | np.integer) and not isinstance(v, bool):
            out.append((str(int(v)), str(float(v))))
        elif isinstance(v, float | np.floating):
            out.append((str(int(v)), str(float(v))) if float(v).is_integer() else (str(float(v)),))
        else:
            out.append((str(v),))
    return out


def _find_level(position: dict[str, int], parts: tuple[tuple[str, ...], ...]) -> int:
    """The fit's level index of one row's factor values (their candidate names joined by ":"), or −1."""
    for combination in itertools.product(*parts):
        index = position.get(":".join(combination))
        if index is not None:
            return index
    return -1


def new_matrix(spec, newdata: pd.DataFrame, what: str) -> np.ndarray:
    from formulaic.errors import DataMismatchWarning

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DataMismatchWarning)
            mm = spec.get_model_matrix(newdata, na_action="raise")
    except DataMismatchWarning as err:
        raise ValueError(f"newdata: the {what} has a factor level not seen in the fit: {err}") from err
    except Exception as err:  # formulaic raises several error types for missing columns and values
        raise ValueError(f"newdata: cannot build the {what}: {err}") from err
    return np.asarray(mm, dtype=float).reshape(len(newdata), -1)


def new_random_part(info: RandomTermInfo, u: np.ndarray, newdata: pd.DataFrame) -> np.ndarray:
    missing = [f for f in info.factors if f not in newdata.columns]
    if missing:
        raise ValueError(f"newdata has no column {missing} (grouping factor of the term {info.name!r})")
    if info.spec is None:
        M = np.ones((len(newdata), 1))
    else:
        M = new_matrix(info.spec, newdata, f"random term {info.name!r}")
        if info.columns is not None:
            M = M[:, list(info.columns)]
    names = [_level_candidates(newdata[f]) for f in info.factors]
    position = {level: j for j, level in enumerate(info.levels)}
    rows = np.array([_find_level(position, parts) for parts in zip(*names, strict=True)], dtype=np.int64)
    seen = rows >= 0
    contribution = np.zeros(len(newdata))
    contribution[seen] = np.sum(M[seen] * u[rows[seen]], axis=1)
    return contribution


def fixed_only(re_form) -> bool:
    """lme4's ``re.form``: None → all random terms; False / NA / ``~0`` → none."""
    if re_form is None:
        return False
    if re_form is False:
        return True
    if isinstance(re_form, str) and re_form.replace(" ", "") in ("~0", "NA", "0"):
        return True
    raise ValueError(f"re_form={re_form!r}: only None (all random terms) and False / '~0' (none) are supported")
