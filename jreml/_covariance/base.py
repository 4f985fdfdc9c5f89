"""The covariance-module interface: a pure function θ ↦ matrix with names, defaults and structure."""

from __future__ import annotations

import abc
from typing import NamedTuple

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float


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
        from .compose import Sum

        return Sum(self, other)

    def __radd__(self, other):
        from .compose import Sum

        return Sum(other, self)


def mean_diagonal(matrix) -> float:
    """Mean of the diagonal of a square matrix (as a Python float where concrete)."""
    return jnp.mean(jnp.diagonal(matrix))
