"""What the fitting loop asks of an algorithm: which information matrix, and the step direction."""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float


def free_mask(theta, score, lb, ub) -> Bool[Array, " k"]:
    """Parameters not held at a bound (a bound is active when the score pushes through it)."""
    at_lower = (theta <= lb) & (score < 0)
    at_upper = (theta >= ub) & (score > 0)
    return ~(at_lower | at_upper)


def solve_information(info, rhs, *, absolute: bool = False, damping=0.0) -> Float[Array, " k"]:
    """(info + λ·diag|info|)⁻¹·rhs, Jacobi-scaled, by a symmetric eigendecomposition with eigenvalues floored at
    1e-10·max|λ|; ``damping`` λ ≥ 0 (default 0: the plain solve) is Marquardt's (see ``projected_solve``).

    The scaling D = diag(info)^½ makes the solve invariant to the parameters' units: a log-variance near its
    boundary has score and information of order σ² and σ⁴, and an unscaled floor would freeze it there.
    A near-singular (scaled) information gives a long step along the weak direction, which step-halving
    and the bounds then control, instead of a NaN. ``absolute=True`` uses |λ| (for an indefinite observed
    information: a Newton step that always ascends).
    """
    return solve_family(info, rhs, absolute=absolute)(damping)


def solve_family(info, rhs, *, absolute: bool = False):
    """λ ↦ (info + λ·diag|info|)⁻¹·rhs (``solve_information``) from one eigendecomposition: the steps of every
    damping λ for the cost of a k×k product each."""
    diag = jnp.abs(jnp.diagonal(info))
    scale = jnp.where(diag > 0, jnp.sqrt(diag), 1.0)
    eigvals, eigvecs = jnp.linalg.eigh(info / scale[:, None] / scale[None, :])
    eigvals = jnp.abs(eigvals) if absolute else eigvals
    top = jnp.max(jnp.abs(eigvals))
    eigvals = jnp.maximum(eigvals, 1e-10 * top + jnp.finfo(info.dtype).tiny)
    coefficients = eigvecs.T @ (rhs / scale)
    return lambda damping: (eigvecs @ (coefficients / (eigvals + damping))) / scale


def projected_solve(info, score, free, *, absolute: bool = False, damping=0.0):
    """The step (info + λ·diag|info|)⁻¹·score restricted to the free parameters (zero for those held at a bound).

    λ = ``damping`` ≥ 0 is Levenberg–Marquardt's, in Marquardt's scaling (Marquardt 1963, J. SIAM 11(2)): with
    λ = 0 the (projected) Newton step; as λ grows the step shortens towards score_i/(λ·info_ii), each parameter
    in its own units, and it stays an ascent direction for every λ.
    """
    return projected_family(info, score, free, absolute=absolute)(damping)


def projected_family(info, score, free, *, absolute: bool = False):
    """λ ↦ ``projected_solve(info, score, free, damping=λ)`` from one eigendecomposition."""
    both = free[:, None] & free[None, :]
    eye = jnp.eye(info.shape[0], dtype=info.dtype)
    family = solve_family(jnp.where(both, info, eye), jnp.where(free, score, 0.0), absolute=absolute)
    return lambda damping: jnp.where(free, family(damping), 0.0)


class AbstractAlgorithm(eqx.Module):
    """A step rule for the fitting loop: ``information`` names the matrix the loop evaluates."""

    information: ClassVar[str]
    name: ClassVar[str]
    #: Whether the loop adds a secant estimate of the curvature that ``information`` leaves out (``run``): for
    #: the average and the expected information, not for the observed one.
    secant: ClassVar[bool] = False

    #: Whether the step rule makes an indefinite information definite with |λ| (Newton on the observed one).
    absolute: ClassVar[bool] = False
    #: Whether the steps are EM-REML's (``em_direction`` from the model's ``em_plan``): always ascent, linearly
    #: convergent, so the loop neither falls back to EM nor ends a slow crawl for them.
    em_steps: ClassVar[bool] = False
    #: Whether ``information`` leaves out part of ℓ's curvature (the average and the expected information), so
    #: that a run of heavily halved steps ends the loop for a Newton continuation (``run``).
    approximate_curvature: ClassVar[bool] = False

    def directions(self, theta, score, info, free):
        """λ ↦ (info + λ·diag info)⁻¹·score over the free parameters: Levenberg–Marquardt's steps
        (``projected_solve``), λ = 0 the algorithm's own."""
        return projected_family(info, score, free, absolute=self.absolute)

    def direction(self, theta, score, info, free, damping=0.0):
        return self.directions(theta, score, info, free)(damping)


def em_direction(theta, score, free, plan) -> Float[Array, " k"]:
    """EM-REML step for V = Σ σ²_k K_k, σ²_k = exp(a_k θ_k), u_k of dimension q_k:

    σ²_k ← σ²_k + σ⁴_k [ (Py)ᵀK_k(Py) − tr(P K_k) ] / q_k   (Searle, Casella & McCulloch 1992, §8.3),
    i.e. θ_k ← θ_k + log(1 + 2 s_k / (a_k q_k)) / a_k with s the score in θ. Always an ascent step.
    """
    dims = jnp.asarray([d for d, _ in plan], dtype=theta.dtype)
    powers = jnp.asarray([a for _, a in plan], dtype=theta.dtype)
    ratio = 1.0 + 2.0 * score / (powers * dims)
    step = jnp.log(jnp.maximum(ratio, 1e-8)) / powers
    return jnp.where(free, step, 0.0)


def pseudo_inverse(information):
    """Inverse of the information; directions with (near-)zero information get zero variance, not inf/NaN."""
    if information.shape[0] == 0:
        return information
    eigvals, eigvecs = jnp.linalg.eigh(information)
    top = jnp.max(jnp.abs(eigvals))
    keep = eigvals > 1e-10 * top
    inv = jnp.where(keep, 1.0 / jnp.where(keep, eigvals, 1.0), 0.0)
    return (eigvecs * inv) @ eigvecs.T
