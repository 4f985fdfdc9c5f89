"""Parameter transforms: unconstrained θ ↦ natural-scale parameters.

Every covariance module keeps its unconstrained parameters θ ∈ ℝᵏ and maps them through one of these
small modules. The maps are smooth bijections, so the AI / Fisher / Newton updates run unconstrained.

- :class:`Exp`: a variance σ² = exp(power·θ); default ``power=1`` (σ² = exp(θ), θ = log σ²).
- :class:`LogCholesky`: an m×m covariance G = L Lᵀ, L lower triangular with diagonal exp(θ_diag)
  (Pinheiro & Bates 1996, "Unconstrained parametrizations for variance-covariance matrices").
- :class:`BoundedSigmoid`: a correlation ρ = lo + (hi − lo)·sigmoid(θ) in (lo, hi).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float


class Exp(eqx.Module):
    """σ² = exp(power·θ). ``power=1``: θ is the log-variance; ``power=2``: θ is the log standard deviation."""

    power: float = eqx.field(static=True, default=1.0)

    def __check_init__(self):
        if not self.power > 0:
            raise ValueError(f"Exp transform needs power > 0, got {self.power}")

    def forward(self, theta: Float[Array, "..."]) -> Float[Array, "..."]:
        return jnp.exp(self.power * theta)

    def inverse(self, variance: Float[Array, "..."]) -> Float[Array, "..."]:
        return jnp.log(variance) / self.power


class BoundedSigmoid(eqx.Module):
    """x = lo + (hi − lo)·sigmoid(θ), a map of ℝ onto the open interval (lo, hi) (for correlations)."""

    lo: float = eqx.field(static=True, default=-1.0)
    hi: float = eqx.field(static=True, default=1.0)

    def __check_init__(self):
        if not self.hi > self.lo:
            raise ValueError(f"BoundedSigmoid needs lo < hi, got lo={self.lo}, hi={self.hi}")

    def forward(self, theta: Float[Array, "..."]) -> Float[Array, "..."]:
        return self.lo + (self.hi - self.lo) * jax.nn.sigmoid(theta)

    def inverse(self, x: Float[Array, "..."]) -> Float[Array, "..."]:
        u = (x - self.lo) / (self.hi - self.lo)
        return jnp.log(u) - jnp.log1p(-u)


class LogCholesky(eqx.Module):
    """G = L Lᵀ with L lower-triangular, L_ii = exp(θ), off-diagonals free; θ in row-major lower order.

    θ has m(m+1)/2 entries ordered (0,0), (1,0), (1,1), (2,0), ... (lme4 orders its relative Cholesky factor
    column-wise; the order only matters for reading θ).
    """

    m: int = eqx.field(static=True)

    def __check_init__(self):
        if self.m < 1:
            raise ValueError(f"LogCholesky needs m >= 1, got {self.m}")

    @property
    def num_params(self) -> int:
        return self.m * (self.m + 1) // 2

    @property
    def diagonal_positions(self) -> tuple[int, ...]:
        """Positions in θ of the log-diagonal entries of L."""
        return tuple(i * (i + 1) // 2 + i for i in range(self.m))

    def cholesky_factor(self, theta: Float[Array, " k"]) -> Float[Array, "m m"]:
        rows, cols = np.tril_indices(self.m)
        values = jnp.where(jnp.asarray(rows == cols), jnp.exp(theta), theta)
        # A gather from [values, 0] with a constant index matrix, not a scatter: far less program to compile
        # (the factor is built in every evaluation and derivative of a fit).
        index = np.full((self.m, self.m), rows.size)
        index[rows, cols] = np.arange(rows.size)
        return jnp.concatenate([values, jnp.zeros((1,), values.dtype)])[index]

    def forward(self, theta: Float[Array, " k"]) -> Float[Array, "m m"]:
        factor = self.cholesky_factor(theta)
        return factor @ factor.T
