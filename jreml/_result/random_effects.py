"""Random effects of a fit: the conditional modes û = G·Zᵀ·Py of every term, the fitted values and residuals they
give, the leading G blocks, and responses simulated from the fitted model."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._backends.sparse import conditional_variances


@eqx.filter_jit
def random_effects(model, theta, p_y, X, beta, y):
    """BLUPs û = G Zᵀ P y of every Z·G·Zᵀ term, the conditional fitted values Xβ̂ + Σ_terms Z û (n,) and the
    conditional residuals y − fitted (n,)."""
    blups, fitted = {}, X @ beta
    for term in model.random_terms():
        theta_g = theta[term.offset : term.offset + term.G.num_free_params]
        theta_z = theta[term.offset - term.Z.num_free_params : term.offset]
        u = term.G(theta_g) @ term.Z.transpose_times(theta_z, p_y)
        blups[term.name] = u
        fitted = fitted + term.Z.times(theta_z, u)
    return blups, fitted, y - fitted


blocked_conditional_variances = eqx.filter_jit(conditional_variances)


@eqx.filter_jit
def leading_blocks(model, theta, sizes: tuple[tuple[str, int], ...]):
    """Per named term, the m×m covariance of one group's random effects (the leading block of G(θ))."""
    by_name = {t.name: t for t in model.random_terms()}
    out = {}
    for name, m in sizes:
        term = by_name[name]
        theta_g = theta[term.offset : term.offset + term.G.num_free_params]
        if m == 1:
            out[name] = term.G.build_params(theta_g)[:1].reshape(1, 1)
        else:
            out[name] = term.G(theta_g)[:m, :m]
    return out


def simulate(fit, nsim: int, seed: int = 0) -> Float[Array, "nsim n"]:
    """(nsim, n) responses y* = Xβ̂ + L·z, L = chol(V(θ̂)), z ~ N(0, I) from ``jax.random.key(seed)``."""
    V = fit.model(fit.theta)
    L = jnp.linalg.cholesky(V)
    z = jax.random.normal(jax.random.key(seed), (int(nsim), V.shape[0]), dtype=V.dtype)
    return (fit.X @ fit.beta)[None, :] + z @ L.T
