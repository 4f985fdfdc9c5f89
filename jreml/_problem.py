"""The fitting problem's normalisation, shared by ``estimate``, ``hybrid_estimate``, ``fit_optax`` and ``REML``:
input checks that name the row or column at fault, the OLS scale that sets the default start and bounds, and the
split of a model into values the loop runs on (no gradients) and the differentiable original."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._config import as_float_array, float_dtype
from ._covariance.observed import observation_count, observed_data
from ._covariance.queries import observed_mask


def is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def check_data(y, X, n_model: int, model=None):
    """Shapes, finiteness and the rank of X, on the rows the model observes (all, or an ``ObservedRows`` mask's)."""
    if y.ndim != 1:
        raise ValueError(f"y must be a 1-D response vector, got shape {y.shape}")
    n = y.shape[0]
    if X.ndim != 2 or X.shape[0] != n:
        raise ValueError(f"X must be a 2-D design matrix with {n} rows (len(y)), got shape {X.shape}")
    if n_model != n:
        raise ValueError(f"the covariance model is {n_model}x{n_model} but y has {n} observations")
    observed = None if model is None else observed_mask(model)
    if observed is not None:
        if is_traced(observed):  # which rows count is known only inside the program
            return
        observed = np.asarray(observed)
    n_obs = n if observed is None else int(observed.sum())
    if X.shape[1] >= n_obs:
        raise ValueError(f"X has {X.shape[1]} columns for {n_obs} observations: REML needs n > p")
    if not is_traced(y):
        bad = ~np.isfinite(np.asarray(y))
        bad = np.flatnonzero(bad if observed is None else bad & observed)
        if bad.size:
            raise ValueError(f"y has non-finite values (NaN/inf) at rows {bad[:10].tolist()}")
    if not is_traced(X):
        Xn = np.asarray(X) if observed is None else np.where(observed[:, None], np.asarray(X), 0.0)
        rows, cols = np.nonzero(~np.isfinite(Xn))
        if rows.size:
            where = list(zip(rows[:10].tolist(), cols[:10].tolist(), strict=True))
            raise ValueError(f"X has non-finite values at (row, column) {where}")
        rank = np.linalg.matrix_rank(Xn)
        if rank < Xn.shape[1]:
            raise ValueError(f"X is rank deficient (rank {rank} < {Xn.shape[1]} columns); drop aliased columns first")


def ols_residual_variance(y, X, model):
    """Σr²/(n − p) of the OLS fit, over the rows the model observes (all but an ``ObservedRows`` model's others)."""
    y, X = observed_data(model, y, X)
    beta, *_ = jnp.linalg.lstsq(X, y)
    resid = y - X @ beta
    s2 = resid @ resid / (observation_count(model, X.shape[0]) - X.shape[1])
    return jnp.where(s2 > 0, s2, 1.0)


def stop_gradient(tree):
    dynamic, static = eqx.partition(tree, eqx.is_array)
    return eqx.combine(jax.lax.stop_gradient(dynamic), static)


def as_input(x, name: str):
    """Like ``as_float_array`` without a copy or dispatch where ``x`` already has jreml's float dtype."""
    dtype = float_dtype()
    if isinstance(x, jax.Array):  # includes tracers
        return x if x.dtype == dtype else as_float_array(x, name)
    if isinstance(x, np.ndarray) and x.dtype.kind in "biuf":
        return x if x.dtype == dtype else x.astype(dtype)
    return as_float_array(x, name)
