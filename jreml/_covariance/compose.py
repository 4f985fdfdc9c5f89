"""Design matrices and composition: DummyMatrix, Sum, CovariancePropagation, KroneckerProduct, CustomMatrix."""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jaxtyping import Array, Float, Int

from .._config import as_float_array, float_dtype
from .base import (  # noqa: F401  (ConstantMatrix, Sum, as_module and _split are imported from here too)
    AbstractCovariance,
    AbstractKnownMatrix,
    ConstantMatrix,
    RandomTerm,
    Sum,
    _offset_blocks,
    _prefixed,
    _split,
    as_module,
)


def _is_int(v) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _factor_codes(values, position: int) -> tuple[np.ndarray, list[str]]:
    """Integer codes and sorted level names of one factor column (strings, numbers or categoricals).

    Numbers sort numerically, everything else by its string's code points (Python's ``sorted``).
    """
    arr = np.asarray(pd.Series(values).to_numpy(dtype=object) if hasattr(values, "isna") else values)
    if arr.ndim != 1:
        raise ValueError(f"DummyMatrix factor {position} must be 1-D, got shape {arr.shape}")
    missing = np.flatnonzero(pd.isna(arr))
    if missing.size:
        raise ValueError(f"DummyMatrix factor {position} has missing values at rows {missing[:10].tolist()}")
    if arr.dtype == object and arr.size and all(_is_int(v) for v in arr.tolist()):
        arr = arr.astype(np.int64)  # a plain list of Python ints: sort its levels numerically, not as strings
    elif arr.dtype == object and arr.size and all(isinstance(v, float | np.floating) for v in arr.tolist()):
        arr = arr.astype(np.float64)
    if arr.dtype.kind in "iubf":
        levels, codes = np.unique(arr, return_inverse=True)
        names = [str(v) for v in levels.tolist()]
    else:
        as_str = np.array([str(v) for v in arr.tolist()], dtype=object)
        names = sorted(set(as_str.tolist()))
        index = {v: i for i, v in enumerate(names)}
        codes = np.array([index[v] for v in as_str.tolist()], dtype=np.int64)
    return codes.astype(np.int64).reshape(-1), names


class DummyMatrix(AbstractKnownMatrix):
    """The n×q incidence (design) matrix of one factor, or of the interaction of several factors.

    Levels are sorted (numerically for integer factors, by code point for strings); the interaction of
    several factors has one column per combination that occurs, ordered by the factors' level order,
    named ``"a:b"``. ``drop_first=True`` drops the first level's column (treatment coding).
    Stored as integer codes, never as a dense one-hot matrix: the dense matrix is built only on call.
    """

    codes: Int[Array, " n"]
    levels: tuple[str, ...] = eqx.field(static=True)
    drop_first: bool = eqx.field(static=True, default=False)
    name: str | None = eqx.field(static=True, default=None)

    def __init__(self, *factors, drop_first: bool = False, name: str | None = None):
        if not factors:
            raise ValueError("DummyMatrix needs at least one factor column")
        coded = [_factor_codes(f, i) for i, f in enumerate(factors)]
        lengths = {len(c) for c, _ in coded}
        if len(lengths) != 1:
            raise ValueError(f"DummyMatrix factors have different lengths: {[len(c) for c, _ in coded]}")
        stacked = np.stack([c for c, _ in coded], axis=1)
        combos, codes = np.unique(stacked, axis=0, return_inverse=True)
        level_names = tuple(":".join(coded[j][1][combo[j]] for j in range(len(coded))) for combo in combos.tolist())
        if drop_first and len(level_names) < 2:
            raise ValueError("DummyMatrix(drop_first=True) needs a factor with at least two levels")
        self.codes = jax.device_put(codes.reshape(-1))
        self.levels = level_names
        self.drop_first = drop_first
        self.name = name

    @property
    def n_levels(self) -> int:
        return len(self.levels)

    @property
    def column_levels(self) -> tuple[str, ...]:
        return self.levels[1:] if self.drop_first else self.levels

    shape = property(lambda self: (self.codes.shape[0], len(self.column_levels)))

    def __call__(self, theta=None):
        """The dense n×q 0/1 matrix. θ is empty and may be left out: ``DummyMatrix(f)()`` as in torch_openreml."""
        theta = self._check_theta(jnp.zeros((0,), float_dtype()) if theta is None else theta)
        onehot = jax.nn.one_hot(self.codes, self.n_levels, dtype=theta.dtype)
        return onehot[:, 1:] if self.drop_first else onehot

    def times(self, theta, u):
        """Z·u by a gather on the codes (no n×q matrix)."""
        full = jnp.concatenate([jnp.zeros((1,), u.dtype), u]) if self.drop_first else u
        return full[self.codes]

    def transpose_times(self, theta, v):
        """Zᵀ·v by a segment sum over the codes (no n×q matrix)."""
        summed = jax.ops.segment_sum(v, self.codes, num_segments=self.n_levels)
        return summed[1:] if self.drop_first else summed

    def mean_row_square_sum(self):
        if not self.drop_first:
            return jnp.asarray(1.0)
        return jnp.mean((self.codes != 0).astype(jnp.result_type(float)))


class GroupedColumns(AbstractKnownMatrix):
    """The n×(L·b) design of a vector-valued random term ``(x₁ + … + x_b | g)``: row i holds its b values
    ``values[i]`` in the columns of its level, Z[i, codes[i]·b + k] = values[i, k] (level-major, the layout of
    G = I_L ⊗ B). Stored as codes and values (n·b numbers), never as the dense n×(L·b) matrix, which is built only
    on call; ``times`` / ``transpose_times`` are gathers and segment sums, O(n·b).
    """

    codes: Int[Array, " n"]
    values: Float[Array, "n b"]
    n_levels: int = eqx.field(static=True)
    name: str | None = eqx.field(static=True, default=None)

    def __init__(self, codes, values, n_levels: int, name: str | None = None):
        codes = jnp.asarray(codes)
        values = as_float_array(values, "values")
        if codes.ndim != 1 or values.ndim != 2 or values.shape[0] != codes.shape[0]:
            raise ValueError(
                f"GroupedColumns needs codes (n,) and values (n, b), got shapes {codes.shape} and {values.shape}"
            )
        if not jnp.issubdtype(codes.dtype, jnp.integer):
            raise TypeError(f"GroupedColumns codes must be integers, got {codes.dtype}")
        if (
            not isinstance(codes, jax.core.Tracer)
            and codes.size
            and not (0 <= int(codes.min()) and int(codes.max()) < n_levels)
        ):
            low, high = int(codes.min()), int(codes.max())
            raise ValueError(f"GroupedColumns codes must lie in [0, {n_levels}), got {low}..{high}")
        self.codes = codes
        self.values = values
        self.n_levels = int(n_levels)
        self.name = name

    @property
    def block(self) -> int:
        """b, the columns per level."""
        return self.values.shape[1]

    shape = property(lambda self: (self.codes.shape[0], self.n_levels * self.values.shape[1]))

    def __call__(self, theta=None):
        theta = self._check_theta(jnp.zeros((0,), float_dtype()) if theta is None else theta)
        onehot = jax.nn.one_hot(self.codes, self.n_levels, dtype=theta.dtype)
        return (onehot[:, :, None] * self.values.astype(theta.dtype)[:, None, :]).reshape(self.shape)

    def times(self, theta, u):
        """Z·u (u of length L·b, or (L·b, r)) by a gather on the codes."""
        blocks = u.reshape(self.n_levels, self.block, *u.shape[1:])[self.codes]  # (n, b, ...)
        values = self.values.astype(u.dtype)
        return jnp.einsum("nb,nb...->n...", values, blocks)

    def transpose_times(self, theta, v):
        """Zᵀ·v (v of length n, or (n, r)) by a segment sum over the codes."""
        values = self.values.astype(v.dtype)
        rows = jnp.einsum("nb,n...->nb...", values, v)
        summed = jax.ops.segment_sum(rows, self.codes, num_segments=self.n_levels)
        return summed.reshape(self.n_levels * self.block, *v.shape[1:])

    def mean_row_square_sum(self):
        return jnp.mean(jnp.sum(self.values**2, axis=1))


class CovariancePropagation(AbstractCovariance):
    """V(θ) = Z(θ_Z) · G(θ_G) · Z(θ_Z)ᵀ: the covariance of Zu for a random effect u ~ N(0, G).

    θ = (θ_Z, θ_G). Z is usually a fixed design (array or :class:`DummyMatrix`, no parameters); when Z is a
    single-factor :class:`DummyMatrix` the product is a gather G[c][:, c] (O(n²), no n×q one-hot).
    The term's BLUP û = G Zᵀ P y comes out of a fit automatically (see ``FitResult.blup``).
    """

    Z: AbstractCovariance
    G: AbstractCovariance
    name: str | None = eqx.field(static=True, default=None)

    def __init__(self, Z, G, name: str | None = None):
        Z = as_module(Z, "CovariancePropagation Z")
        G = as_module(G, "CovariancePropagation G")
        if G.shape[0] != G.shape[1]:
            raise ValueError(f"CovariancePropagation G must be square, got shape {G.shape}")
        if Z.shape[1] != G.shape[0]:
            raise ValueError(f"CovariancePropagation: Z has {Z.shape[1]} columns but G is {G.shape[0]}x{G.shape[1]}")
        self.Z = Z
        self.G = G
        self.name = name

    num_free_params = property(lambda self: self.Z.num_free_params + self.G.num_free_params)
    shape = property(lambda self: (self.Z.shape[0], self.Z.shape[0]))
    scale_mask = property(lambda self: self.Z.scale_mask + self.G.scale_mask)

    @property
    def cholesky_blocks(self):
        return _offset_blocks((self.Z, self.G))

    def split(self, theta):
        return _split(theta, [self.Z.num_free_params, self.G.num_free_params])

    def __call__(self, theta):
        theta_z, theta_g = self.split(self._check_theta(theta))
        g = self.G(theta_g)
        if isinstance(self.Z, DummyMatrix) and not self.Z.drop_first:
            codes = self.Z.codes
            return g[codes][:, codes]
        z = self.Z(theta_z)
        return z @ g @ z.T

    def _local_names(self):
        return tuple(f"Z.{n}" for n in self.Z.param_names) + self.G.param_names

    def build_params(self, theta):
        theta_z, theta_g = self.split(self._check_theta(theta))
        return jnp.concatenate([self.Z.build_params(theta_z), self.G.build_params(theta_g)])

    def _z_scale(self):
        if isinstance(self.Z, DummyMatrix | GroupedColumns):
            return self.Z.mean_row_square_sum()
        z = self.Z(self.Z.default_theta(jnp.asarray(1.0)))
        return jnp.mean(jnp.sum(z * z, axis=1))

    def default_theta(self, variance):
        scale = self._z_scale()
        scale = jnp.where(scale > 0, scale, 1.0)
        return jnp.concatenate([self.Z.default_theta(jnp.ones_like(variance)), self.G.default_theta(variance / scale)])

    def em_plan(self):
        return None if self.Z.num_free_params else self.G.em_plan()

    def random_terms(self, offset: int = 0):
        return (RandomTerm(self.name or self.G.label or "", self.Z, self.G, offset + self.Z.num_free_params),)


class KroneckerProduct(AbstractCovariance):
    """V(θ) = A(θ_A) ⊗ B(θ_B), θ = (θ_A, θ_B) (e.g. a trait covariance ⊗ a relationship matrix)."""

    A: AbstractCovariance
    B: AbstractCovariance
    name: str | None = eqx.field(static=True, default=None)

    def __init__(self, A, B, name: str | None = None):
        self.A = as_module(A, "KroneckerProduct A")
        self.B = as_module(B, "KroneckerProduct B")
        self.name = name

    num_free_params = property(lambda self: self.A.num_free_params + self.B.num_free_params)
    shape = property(lambda self: (self.A.shape[0] * self.B.shape[0], self.A.shape[1] * self.B.shape[1]))
    scale_mask = property(lambda self: self.A.scale_mask + self.B.scale_mask)

    @property
    def cholesky_blocks(self):
        return _offset_blocks((self.A, self.B))

    def split(self, theta):
        return _split(theta, [self.A.num_free_params, self.B.num_free_params])

    def __call__(self, theta):
        theta_a, theta_b = self.split(self._check_theta(theta))
        return jnp.kron(self.A(theta_a), self.B(theta_b))

    def _local_names(self):
        # Prefix with A./B. only where both factors have parameters (otherwise the names are unambiguous).
        if self.A.num_free_params and self.B.num_free_params:
            return _prefixed(self.A, "A") + _prefixed(self.B, "B")
        return self.A.param_names + self.B.param_names

    def build_params(self, theta):
        theta_a, theta_b = self.split(self._check_theta(theta))
        return jnp.concatenate([self.A.build_params(theta_a), self.B.build_params(theta_b)])

    def default_theta(self, variance):
        # A parameter-free factor (an identity, a known K) passes the whole scale to the other factor;
        # when both have parameters, A carries the scale and B starts at mean diagonal one.
        if not self.A.num_free_params:
            a_scale = jnp.mean(jnp.diagonal(self.A(jnp.zeros((0,), float_dtype()))))
            return jnp.concatenate([self.A.default_theta(variance), self.B.default_theta(variance / a_scale)])
        if not self.B.num_free_params:
            b_scale = jnp.mean(jnp.diagonal(self.B(jnp.zeros((0,), float_dtype()))))
            return jnp.concatenate([self.A.default_theta(variance / b_scale), self.B.default_theta(variance)])
        return jnp.concatenate([self.A.default_theta(variance), self.B.default_theta(jnp.ones_like(variance))])


class CustomMatrix(AbstractCovariance):
    """Any user function θ ↦ matrix with ``num_free_params`` parameters (natural scale = θ itself).

    ``fn`` must be a pure JAX function. Give ``theta0`` to ``estimate``: the default start is θ = 0.
    ``shape`` is inferred by evaluating ``fn`` at θ = 0 when not given.
    """

    fn: Callable
    n_params: int = eqx.field(static=True)
    names: tuple[str, ...] = eqx.field(static=True)
    matrix_shape: tuple[int, int] = eqx.field(static=True)
    name: str | None = eqx.field(static=True, default=None)

    def __init__(self, fn: Callable, num_free_params: int, names=None, shape=None, name: str | None = None):
        if not callable(fn):
            raise TypeError(f"CustomMatrix fn must be callable, got {fn!r}")
        if isinstance(num_free_params, bool) or not isinstance(num_free_params, int | np.integer):
            raise TypeError(f"CustomMatrix num_free_params must be an int, got {num_free_params!r}")
        self.fn = fn
        self.n_params = int(num_free_params)
        if names is None:
            names = tuple(f"theta[{i}]" for i in range(self.n_params))
        names = tuple(str(n) for n in names)
        if len(names) != self.n_params:
            raise ValueError(f"CustomMatrix: {len(names)} names for {self.n_params} parameters")
        self.names = names
        if shape is None:
            shape = jax.eval_shape(fn, jax.ShapeDtypeStruct((self.n_params,), jnp.result_type(float))).shape
        if len(shape) != 2:
            raise ValueError(f"CustomMatrix fn must return a matrix, got shape {shape}")
        self.matrix_shape = tuple(int(s) for s in shape)
        self.name = name

    num_free_params = property(lambda self: self.n_params)
    shape = property(lambda self: self.matrix_shape)
    scale_mask = property(lambda self: (False,) * self.n_params)

    def __call__(self, theta):
        return self.fn(self._check_theta(theta))

    def _local_names(self):
        return self.names

    def build_params(self, theta):
        return self._check_theta(theta)

    def default_theta(self, variance):
        return jnp.zeros((self.n_params,), float_dtype())
