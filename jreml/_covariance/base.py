"""The covariance-module interface (a pure function θ ↦ matrix with names, defaults and structure), the
parameter-free matrices and ``Sum``, which ``+`` builds."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import NamedTuple

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._config import as_float_array, float_dtype


class RandomTerm(NamedTuple):
    """Structured description of one Z·G·Zᵀ term of a model (for BLUPs and the large-data back ends).

    ``offset`` is the position of G's first parameter in the full θ of the model the term belongs to.
    """

    name: str
    Z: AbstractCovariance
    G: AbstractCovariance
    offset: int


class AbstractCovariance(eqx.Module):
    """A matrix-valued pure function of an unconstrained parameter vector θ ∈ ℝᵏ.

    Subclasses implement ``num_free_params``, ``shape``, ``__call__`` (the dense matrix),
    ``_local_names`` (natural-scale parameter names without the module's own ``name`` prefix),
    ``build_params`` (natural-scale values, one per name, same order as θ), ``default_theta``
    (θ whose matrix has mean diagonal ≈ ``variance``) and ``scale_mask`` (which θ entries are
    log-scales of a variance, i.e. reach the boundary 0 as θ → −∞).
    """

    # numpy must not broadcast `ndarray + module` element-wise: defer to __radd__ (which builds a Sum).
    __array_ufunc__ = None

    @property
    @abc.abstractmethod
    def num_free_params(self) -> int: ...

    @property
    @abc.abstractmethod
    def shape(self) -> tuple[int, int]: ...

    @abc.abstractmethod
    def __call__(self, theta: Float[Array, " k"]) -> Float[Array, "r c"]: ...

    @abc.abstractmethod
    def _local_names(self) -> tuple[str, ...]: ...

    @abc.abstractmethod
    def build_params(self, theta: Float[Array, " k"]) -> Float[Array, " k"]: ...

    @abc.abstractmethod
    def default_theta(self, variance: Float[Array, ""]) -> Float[Array, " k"]: ...

    @property
    @abc.abstractmethod
    def scale_mask(self) -> tuple[bool, ...]: ...

    @property
    def label(self) -> str | None:
        """The module's own name (prefix of its parameter names), if it has one."""
        return getattr(self, "name", None)

    @property
    def param_names(self) -> tuple[str, ...]:
        """Readable, path-like names of the natural-scale parameters (``"Batch.variance"``)."""
        local = self._local_names()
        if self.label:
            return tuple(f"{self.label}.{n}" for n in local)
        return local

    def em_plan(self) -> tuple[tuple[int, float], ...] | None:
        """For EM-REML: per θ entry (dimension of the random vector, Exp power), or None if V is not
        a sum of σ²_k·K_k terms with σ²_k = exp(power·θ_k) (then EM steps are not available)."""
        return None if self.num_free_params else ()

    @property
    def cholesky_blocks(self) -> tuple[tuple[int, int], ...]:
        """The log-Cholesky blocks in θ (``LogCholesky``): (position of the block's first entry, size m) for each
        m×m covariance G = L Lᵀ. ``estimate`` starts a fit again when it ends with a zero diagonal of L
        (``restart_edge``). Empty for other modules."""
        return ()

    def times(self, theta: Float[Array, " k"], u: Float[Array, " c"]) -> Float[Array, " r"]:
        """M(θ)·u for this module's matrix M (r×c): a design Z applied to random effects."""
        return self(theta) @ u

    def transpose_times(self, theta: Float[Array, " k"], v: Float[Array, " r"]) -> Float[Array, " c"]:
        """M(θ)ᵀ·v for this module's matrix M (r×c): a design Z's cross-product with a residual."""
        return self(theta).T @ v

    def random_terms(self, offset: int = 0) -> tuple[RandomTerm, ...]:
        """The Z·G·Zᵀ terms inside this module (empty for plain covariance matrices)."""
        return ()

    def _check_theta(self, theta: Float[Array, " k"]) -> Float[Array, " k"]:
        theta = jnp.asarray(theta)
        if theta.shape != (self.num_free_params,):
            raise ValueError(
                f"{type(self).__name__} expects theta of shape ({self.num_free_params},), got {theta.shape}"
            )
        return theta

    def __add__(self, other):
        return Sum(self, other)

    def __radd__(self, other):
        return Sum(other, self)


# The parameter-free matrices and the sum of modules live with the interface: ``+`` builds a Sum, and a plain
# array operand becomes a ConstantMatrix.


class AbstractKnownMatrix(AbstractCovariance):
    """A matrix without parameters (an identity, a fixed Z, a factor's incidence matrix): θ is empty."""

    num_free_params = property(lambda self: 0)
    scale_mask = property(lambda self: ())

    def _local_names(self):
        return ()

    def build_params(self, theta):
        return self._check_theta(theta)

    def default_theta(self, variance):
        return jnp.zeros((0,), float_dtype())


class ConstantMatrix(AbstractKnownMatrix):
    """A known matrix with no parameters (what a plain array operand becomes: a fixed Z, a known K)."""

    matrix: Float[Array, "r c"]
    name: str | None = eqx.field(static=True, default=None)

    def __init__(self, matrix, name: str | None = None):
        matrix = as_float_array(matrix, "matrix")
        if matrix.ndim != 2:
            raise ValueError(f"a matrix operand must be 2-D, got shape {matrix.shape}")
        self.matrix = matrix
        self.name = name

    shape = property(lambda self: self.matrix.shape)

    def __call__(self, theta):
        theta = self._check_theta(theta)
        return self.matrix.astype(theta.dtype)


def as_module(x, what: str = "operand") -> AbstractCovariance:
    """A covariance module as is; a plain array becomes a :class:`ConstantMatrix`."""
    if isinstance(x, AbstractCovariance):
        return x
    if callable(x) and not hasattr(x, "shape"):
        raise TypeError(f"{what}: a plain function needs CustomMatrix(fn, num_free_params); got {x!r}")
    return ConstantMatrix(x)


def _offset_blocks(parts) -> tuple[tuple[int, int], ...]:
    """The parts' ``cholesky_blocks`` in the θ of their concatenation."""
    out, offset = [], 0
    for part in parts:
        out += [(offset + start, m) for start, m in part.cholesky_blocks]
        offset += part.num_free_params
    return tuple(out)


def _split(theta, sizes: Sequence[int]):
    offsets = np.cumsum([0, *sizes])
    return [theta[offsets[i] : offsets[i + 1]] for i in range(len(sizes))]


def _prefixed(module: AbstractCovariance, fallback: str) -> tuple[str, ...]:
    names = module.param_names
    if module.label:
        return names
    return tuple(f"{fallback}.{n}" for n in names)


class Sum(AbstractCovariance):
    """V(θ) = Σ_i term_i(θ_i): θ is the concatenation of the terms' parameters, in order.

    Operands may be modules or plain arrays (fixed matrices). Unnamed terms are named ``term{i}``.
    """

    terms: tuple[AbstractCovariance, ...]
    name: str | None = eqx.field(static=True, default=None)

    def __init__(self, *terms, name: str | None = None):
        if not terms:
            raise ValueError("Sum needs at least one term")
        flat = []
        for t in terms:
            t = as_module(t, "Sum term")
            # Flatten unnamed nested sums so that A + B + C is one Sum with three terms.
            if isinstance(t, Sum) and t.name is None:
                flat.extend(t.terms)
            else:
                flat.append(t)
        shapes = {t.shape for t in flat}
        if len(shapes) != 1:
            raise ValueError(f"Sum terms must all have the same shape, got {[t.shape for t in flat]}")
        (shape,) = shapes
        if shape[0] != shape[1]:
            raise ValueError(f"Sum terms must be square covariance matrices, got shape {shape}")
        self.terms = tuple(flat)
        self.name = name

    num_free_params = property(lambda self: sum(t.num_free_params for t in self.terms))
    shape = property(lambda self: self.terms[0].shape)
    scale_mask = property(lambda self: sum((t.scale_mask for t in self.terms), ()))

    @property
    def cholesky_blocks(self):
        return _offset_blocks(self.terms)

    def __call__(self, theta):
        theta = self._check_theta(theta)
        parts = _split(theta, [t.num_free_params for t in self.terms])
        total = self.terms[0](parts[0])
        for term, part in zip(self.terms[1:], parts[1:], strict=True):
            total = total + term(part)
        return total

    def _local_names(self):
        names = sum((_prefixed(t, f"term{i}") for i, t in enumerate(self.terms)), ())
        if len(set(names)) != len(names):
            names = sum((tuple(f"term{i}.{n}" for n in t.param_names) for i, t in enumerate(self.terms)), ())
        return names

    def build_params(self, theta):
        theta = self._check_theta(theta)
        parts = _split(theta, [t.num_free_params for t in self.terms])
        built = [t.build_params(p) for t, p in zip(self.terms, parts, strict=True)]
        return jnp.concatenate(built) if built else theta

    def default_theta(self, variance):
        with_params = [t for t in self.terms if t.num_free_params > 0]
        share = variance / max(len(with_params), 1)
        return jnp.concatenate([t.default_theta(share) for t in self.terms])

    def em_plan(self):
        plans = [t.em_plan() for t in self.terms]
        return None if any(p is None for p in plans) else sum(plans, ())

    def random_terms(self, offset: int = 0):
        out = []
        for i, term in enumerate(self.terms):
            for rt in term.random_terms(offset):
                out.append(rt if rt.name else rt._replace(name=f"term{i}"))
            offset += term.num_free_params
        return tuple(out)


def mean_diagonal(matrix) -> float:
    """Mean of the diagonal of a square matrix (as a Python float where concrete)."""
    return jnp.mean(jnp.diagonal(matrix))
