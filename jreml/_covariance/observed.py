"""ObservedRows: a model on the observed rows of a longer design (a response with missing values)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool

from .._config import float_dtype
from .base import AbstractCovariance


class ObservedRows(AbstractCovariance):
    r"""V(θ) restricted to the observed rows of an n-row design, kept at n rows: with M = diag(m), m ∈ {0, 1}ⁿ,

        V_m(θ) = M·V(θ)·M + (I − M).

    The rows where m = 0 (a response's missing values) become independent placeholders of unit variance that no
    parameter touches. With y and X set to 0 on those rows (``estimate`` does it), V_m is block diagonal between
    the observed and the placeholder rows, so log|V_m| = log|V_oo|, yᵀV_m⁻¹y = y_oᵀV_oo⁻¹y_o, XᵀV_m⁻¹X = X_oᵀV_oo⁻¹X_o
    and ∂V_m/∂θ vanishes outside V_oo: REML and ML equal those of the observed rows alone, once the likelihood's
    constant counts n_o = Σm observations (``observation_count``) instead of n. This lets responses with
    different missing rows share one compiled program of one shape (``jax.vmap`` over y and m; ``fit_batch``).

    The mixed-model-equations back end takes the inner model's structure with the mask (``mme_structure``) and
    works as if Z's unobserved rows were zero, R⁻¹ = M/σ² (the mask multiplies Z's products, so that Z itself stays
    shared by a vmapped batch); nothing n×n is built there either. Random-effect levels without an observed row keep
    their columns: the likelihood does not change (their block of ΛᵀZᵀR⁻¹ZΛ + I is I), and their BLUPs are the
    prior mean 0. The EM fallback step keeps the inner model's dimensions (n for the residual), so its residual
    steps are shorter by n_o/n; they are still ascent directions.
    """

    model: AbstractCovariance
    observed: Bool[Array, " n"]

    def __init__(self, model: AbstractCovariance, observed):
        if not isinstance(model, AbstractCovariance):
            raise TypeError(f"ObservedRows needs a covariance module, got {type(model).__name__}")
        if isinstance(model, ObservedRows):
            raise TypeError("ObservedRows of an ObservedRows: combine the two masks instead")
        observed = observed if isinstance(observed, jnp.ndarray) else np.asarray(observed)
        if observed.dtype != bool:
            raise TypeError(f"observed must be a boolean mask over the rows, got dtype {observed.dtype}")
        self.model = model
        self.observed = observed

    def __check_init__(self):
        n = self.model.shape[0]
        if self.observed.shape != (n,):
            raise ValueError(f"observed must have shape ({n},) for a {n}x{n} model, got {self.observed.shape}")

    num_free_params = property(lambda self: self.model.num_free_params)
    shape = property(lambda self: self.model.shape)
    scale_mask = property(lambda self: self.model.scale_mask)
    cholesky_blocks = property(lambda self: self.model.cholesky_blocks)

    @property
    def n_observed(self):
        """n_o = Σm, the number of observed rows (a float array, as it enters the likelihood; traced under
        ``vmap``)."""
        return jnp.sum(self.observed, dtype=float_dtype())

    def __call__(self, theta):
        V = self.model(theta)
        m = self.observed.astype(V.dtype)
        return V * (m[:, None] * m[None, :]) + jnp.diag(1.0 - m)

    def _local_names(self):
        return self.model.param_names

    def build_params(self, theta):
        return self.model.build_params(theta)

    def default_theta(self, variance):
        return self.model.default_theta(variance)

    def em_plan(self):
        return self.model.em_plan()

    def random_terms(self, offset: int = 0):
        return self.model.random_terms(offset)


def observation_count(model, n: int):
    """The number of observations the likelihood's constant counts: Σm for :class:`ObservedRows`, else n."""
    return model.n_observed if isinstance(model, ObservedRows) else n


def observed_data(model, y, X):
    """y and X with the rows an :class:`ObservedRows` model leaves out set to 0 (unchanged for other models)."""
    if not isinstance(model, ObservedRows):
        return y, X
    observed = model.observed
    return jnp.where(observed, y, 0.0).astype(y.dtype), jnp.where(observed[:, None], X, 0.0).astype(X.dtype)
