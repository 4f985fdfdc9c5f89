"""Design-matrix helpers with torch_openreml's names (``torch_openreml.utils.augment`` and ``n_distinct``), so
that code written for torch_openreml runs after changing its imports."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from ._config import as_float_array


def augment(*matrices) -> jax.Array:
    """The column-wise concatenation of two or more design matrices with the same number of rows, as
    torch_openreml's ``augment`` (``torch.cat(..., dim=1)``); e.g. ``augment(ones, DummyMatrix(rep)())``."""
    if not matrices:
        raise ValueError("augment needs at least one matrix")
    arrays = [as_float_array(m, f"augment argument {i}") for i, m in enumerate(matrices)]
    for i, a in enumerate(arrays):
        if a.ndim != 2:
            raise ValueError(f"augment argument {i} must be a 2-D matrix, got shape {a.shape}")
    rows = {a.shape[0] for a in arrays}
    if len(rows) != 1:
        raise ValueError(f"augment: the matrices have different numbers of rows {[a.shape[0] for a in arrays]}")
    return jnp.concatenate(arrays, axis=1)


def n_distinct(x) -> int:
    """The number of distinct values of a factor column (a list, tuple, pandas Series or 1-D array), as
    torch_openreml's ``n_distinct``; missing values are not counted."""
    values = x.to_numpy(dtype=object) if isinstance(x, pd.Series) else np.asarray(list(x), dtype=object)
    if values.ndim != 1:
        raise ValueError(f"n_distinct needs a 1-D column, got shape {values.shape}")
    return len({v for v in values.tolist() if not pd.isna(v)})
