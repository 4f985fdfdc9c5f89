"""Stationary kernels on coordinates: σ²·k(‖xᵢ − xⱼ‖/ℓ) with a differentiable length-scale ℓ."""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._config import as_float_array
from .base import AbstractCovariance
from .transforms import Exp

KERNELS = ("rbf", "matern12", "matern32", "matern52")


def _kernel_values(kind: str, r: Float[Array, "n n"]) -> Float[Array, "n n"]:
    """k(r) for scaled distances r ≥ 0 (Rasmussen & Williams 2006, eqs. 4.9, 4.14, 4.17)."""
    if kind == "rbf":
        return jnp.exp(-0.5 * r * r)
    if kind == "matern12":
        return jnp.exp(-r)
    if kind == "matern32":
        s = jnp.sqrt(3.0) * r
        return (1.0 + s) * jnp.exp(-s)
    s = jnp.sqrt(5.0) * r
    return (1.0 + s + s * s / 3.0) * jnp.exp(-s)


def _distances(coords: Float[Array, "n d"], lengthscale) -> Float[Array, "n n"]:
    # Squared differences first, then the length-scale: derivatives in ℓ never touch an n×n×d tensor.
    diff = coords[:, None, :] - coords[None, :, :]
    if jnp.ndim(lengthscale) == 0:
        sq = jnp.sum(diff * diff, axis=-1) / (lengthscale * lengthscale)
    else:
        inv_sq = jnp.broadcast_to(1.0 / (lengthscale * lengthscale), coords.shape[-1:])
        sq = jnp.einsum("ijd,d->ij", diff * diff, inv_sq)
    # sqrt has an infinite derivative at 0: differentiate through a safe value on the diagonal.
    safe = jnp.where(sq > 0, sq, 1.0)
    return jnp.where(sq > 0, jnp.sqrt(safe), 0.0)


class KernelMatrix(AbstractCovariance):
    """σ²·k(‖xᵢ − xⱼ‖/ℓ) on coordinates x (n×d): RBF or Matérn ν = 1/2, 3/2, 5/2.

    θ = (log σ²) by default. The length-scale ℓ (scalar or one per dimension) is an array *leaf*, not a
    parameter: it is held fixed by ``estimate`` and gradients flow to it (through the REML loss, or
    through a fit by implicit differentiation). ``learn_lengthscale=True`` makes log ℓ part of θ instead.
    """

    coords: Float[Array, "n d"]
    lengthscale: Float[Array, "..."]
    kernel: str = eqx.field(static=True, default="rbf")
    learn_lengthscale: bool = eqx.field(static=True, default=False)
    name: str | None = eqx.field(static=True, default=None)
    transform: Exp = Exp()

    def __init__(self, coords, lengthscale=1.0, kernel: str = "rbf", learn_lengthscale: bool = False, name=None):
        coords = as_float_array(coords, "KernelMatrix coords")
        if coords.ndim == 1:
            coords = coords[:, None]
        if coords.ndim != 2:
            raise ValueError(f"KernelMatrix coords must be (n,) or (n, d), got shape {coords.shape}")
        if kernel not in KERNELS:
            raise ValueError(f"KernelMatrix kernel must be one of {KERNELS}, got {kernel!r}")
        self.coords = coords
        self.lengthscale = as_float_array(lengthscale, "KernelMatrix lengthscale")
        self.kernel = kernel
        self.learn_lengthscale = learn_lengthscale
        self.name = name
        self.transform = Exp()

    num_free_params = property(lambda self: 2 if self.learn_lengthscale else 1)
    shape = property(lambda self: (self.coords.shape[0], self.coords.shape[0]))
    scale_mask = property(lambda self: (True, False) if self.learn_lengthscale else (True,))

    def _scale(self, theta):
        return jnp.exp(theta[1]) if self.learn_lengthscale else self.lengthscale.astype(theta.dtype)

    def __call__(self, theta):
        theta = self._check_theta(theta)
        variance = self.transform.forward(theta[0])
        return variance * _kernel_values(self.kernel, _distances(self.coords.astype(theta.dtype), self._scale(theta)))

    def _local_names(self):
        return ("variance", "lengthscale") if self.learn_lengthscale else ("variance",)

    def build_params(self, theta):
        theta = self._check_theta(theta)
        values = [self.transform.forward(theta[0])]
        if self.learn_lengthscale:
            values.append(jnp.exp(theta[1]))
        return jnp.stack(values)

    def default_theta(self, variance):
        first = jnp.reshape(self.transform.inverse(variance), (1,))
        if not self.learn_lengthscale:
            return first
        return jnp.concatenate([first, jnp.reshape(jnp.log(jnp.mean(self.lengthscale)), (1,)).astype(first.dtype)])

    def em_plan(self):
        return None if self.learn_lengthscale else ((self.coords.shape[0], self.transform.power),)
