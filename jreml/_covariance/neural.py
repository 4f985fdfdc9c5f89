"""A learned covariance: σ²·(ΦΦᵀ/d + jitter·I) with features Φ = mlp(x) from a neural network (deep kernel)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._config import as_float_array
from .base import AbstractCovariance
from .transforms import Exp


class FeatureMapKernel(AbstractCovariance):
    """σ²·(ΦΦᵀ/d + jitter·I), Φ = mlp(features) row by row (n×d), a positive semi-definite feature-map kernel.

    θ = (log σ²). The network (an ``equinox.nn.MLP`` or any equinox module mapping one feature row to a
    d-vector) is a module field: its weights are array *leaves*, not θ parameters. ``estimate`` holds them
    fixed; gradients flow to them through the REML loss (``jax.grad`` of ``jreml.reml_loglik`` with respect
    to the module, e.g. with ``eqx.filter_grad``) and through a fit by implicit differentiation, so optax can
    learn them. ``jitter`` (relative to σ²) keeps V positive definite when d < n and there is no residual
    term; 0 gives the exact rank-d kernel.
    """

    features: Float[Array, "n f"]
    mlp: eqx.Module
    jitter: float = eqx.field(static=True, default=1e-6)
    name: str | None = eqx.field(static=True, default=None)
    transform: Exp = Exp()

    def __init__(self, features, mlp, jitter: float = 1e-6, name: str | None = None):
        features = as_float_array(features, "FeatureMapKernel features")
        if features.ndim == 1:
            features = features[:, None]
        if features.ndim != 2:
            raise ValueError(f"FeatureMapKernel features must be (n,) or (n, f), got shape {features.shape}")
        if jitter < 0:
            raise ValueError(f"FeatureMapKernel jitter must be >= 0, got {jitter}")
        self.features = features
        self.mlp = mlp
        self.jitter = float(jitter)
        self.name = name
        self.transform = Exp()

    num_free_params = property(lambda self: 1)
    shape = property(lambda self: (self.features.shape[0], self.features.shape[0]))
    scale_mask = property(lambda self: (True,))

    def feature_map(self, dtype=None) -> Float[Array, "n d"]:
        """Φ = mlp(features), n×d (rows as 1-D outputs; a scalar output is one feature)."""
        # Feed the network its own float dtype (a float32 MLP in a float64 fit), return Φ in ``dtype``.
        weights = [leaf for leaf in jax.tree.leaves(self.mlp) if eqx.is_inexact_array(leaf)]
        features = self.features.astype(weights[0].dtype) if weights else self.features
        phi = jax.vmap(self.mlp)(features)
        phi = jnp.reshape(phi, (features.shape[0], -1))
        return phi if dtype is None else phi.astype(dtype)

    def _unit(self, dtype) -> Float[Array, "n n"]:
        """ΦΦᵀ/d + jitter·I (the matrix at σ² = 1)."""
        phi = self.feature_map(dtype)
        gram = phi @ phi.T / phi.shape[1]
        gram = 0.5 * (gram + gram.T)
        return gram + self.jitter * jnp.eye(phi.shape[0], dtype=dtype)

    def __call__(self, theta):
        theta = self._check_theta(theta)
        return self.transform.forward(theta[0]) * self._unit(theta.dtype)

    def _local_names(self):
        return ("variance",)

    def build_params(self, theta):
        return self.transform.forward(self._check_theta(theta))

    def default_theta(self, variance):
        variance = jnp.asarray(variance)
        scale = jnp.mean(jnp.diagonal(self._unit(variance.dtype)))
        scale = jnp.where(scale > 0, scale, 1.0)
        return jnp.reshape(self.transform.inverse(variance / scale), (1,))

    def em_plan(self):
        return None
