r"""The Laplace approximation to a GLMM's deviance, lme4's ``glmer(nAGQ = 1)`` criterion.

With û the conditional mode at (θ, β) (``pirls.conditional_modes``), μ̂ = g⁻¹(offset + Xβ + ZΛû) and
A = ΛᵀZᵀŴZΛ + I = LLᵀ at the working weights of û,

    D(θ, β) = −2 Σ_i log p(y_i | μ̂_i) + ‖û‖² + log|L|²                                   (scalar)

which is −2 × the Laplace approximation of the log-likelihood log ∫ p(y | u) φ(u) du (Bates et al. 2015,
section 5; lme4's ``devcomp$cmp["dev"]``, and −2·``logLik`` of a ``glmer`` fit). MixedModels.jl's GLMM
``deviance`` uses the unit deviances Σ d(y_i, μ̂_i) in place of −2 Σ log p, which differs by a constant of the data
(zero for 0/1 responses). With ``joint=True`` β is a PIRLS unknown too (lme4's nAGQ = 0 stage: D is then a
function of θ alone).

Its gradient is exact: reverse mode through the factor at û, and through û by the implicit derivative of
``conditional_modes``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .equations import factorise, lams
from .pirls import FAILED, Problem, conditional_modes, linear_predictor, working_weights


def laplace_parts(theta, beta, x0, problem: Problem, joint: bool):
    """(D, status, x̂, β at x̂, weighted factor at x̂); D = +inf where PIRLS or a Cholesky factor failed."""
    modes = conditional_modes(theta, beta, x0, problem, joint=joint)
    q = problem.structure.q
    u = modes.x[:q]
    beta_hat = modes.x[q:] if joint else beta
    full = problem.full_theta(theta)
    lam = lams(full, problem.structure)
    eta = linear_predictor(problem, lam, u, beta_hat)
    mu, _, w = working_weights(problem, eta)
    wf = factorise(full, problem.structure, problem.pattern, w)
    value = -2.0 * jnp.sum(problem.family.log_density(problem.y, mu, problem.wt)) + jnp.sum(u**2) + wf.logdet
    status = jnp.where(wf.ok & jnp.isfinite(value), modes.status, FAILED)
    value = jnp.where(status == FAILED, jnp.inf, value)
    return value, status, modes, beta_hat, wf


def laplace_deviance(theta, beta, problem: Problem, x0=None):
    """D(θ, β) of the module docstring (PIRLS started at u = 0 unless ``x0`` is given)."""
    if x0 is None:
        x0 = jnp.zeros((problem.structure.q,), problem.y.dtype)
    return laplace_parts(theta, beta, x0, problem, joint=False)[0]


def gauss_hermite(n: int):
    """Nodes z_k and weights ω_k (Σω = 1) of the n-point Gauss–Hermite rule for the standard normal."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(n)
    return jnp.asarray(nodes), jnp.asarray(weights / weights.sum())


def quadrature_parts(theta, beta, x0, problem: Problem, rule):
    r"""Adaptive Gauss–Hermite quadrature of the likelihood for one scalar random term (lme4's nAGQ > 1).

    The integral factorises over the L levels g of the term; with the conditional mode û_g, the conditional SD
    s_g = A_gg^{-1/2} (A diagonal, A_gg = 1 + λ²Σ_{i∈g} w_i) and the rule (z_k, ω_k) for N(0, 1),

        D = Σ_g [ −2 log s_g − 2 log Σ_k ω_k exp(−½(d_g(û_g + s_g z_k) + (û_g + s_g z_k)² − z_k²)) ]

    with d_g(u) the sum of the unit deviances of level g's rows at u (Liu & Pierce 1994, Biometrika 81(3); the
    deviance-residual form lme4's ``glmer`` reports for nAGQ > 1). One node (z = 0, ω = 1) gives the Laplace
    criterion with Σ d in place of −2 Σ log p.
    """
    nodes, weights = rule
    modes = conditional_modes(theta, beta, x0, problem, joint=False)
    u = modes.x
    structure = problem.structure
    term = structure.terms[0]
    full = problem.full_theta(theta)
    lam = lams(full, structure)
    lam1 = jnp.broadcast_to(lam[0], (term.levels, 1, 1))[:, 0, 0]
    values = jnp.ones_like(problem.y) if term.values is None else term.values[:, 0]
    base = problem.offset + problem.X @ beta
    eta = base + (lam1 * u)[term.codes] * values
    _, _, w = working_weights(problem, eta)
    wf = factorise(full, structure, problem.pattern, w)
    s = 1.0 / wf.factor.chol11[:, 0, 0]

    def at_node(z):
        v = u + s * z
        mu = problem.family.link.inverse(base + (lam1 * v)[term.codes] * values)
        d = jax.ops.segment_sum(problem.family.unit_deviance(problem.y, mu, problem.wt), term.codes, term.levels)
        return d + v**2 - z**2

    q = jax.vmap(at_node)(nodes)  # (K, L)
    log_sum = jax.scipy.special.logsumexp(jnp.log(weights)[:, None] - 0.5 * q, axis=0)
    value = jnp.sum(-2.0 * jnp.log(s) - 2.0 * log_sum)
    status = jnp.where(wf.ok & jnp.isfinite(value), modes.status, FAILED)
    value = jnp.where(status == FAILED, jnp.inf, value)
    return value, status, modes, beta, wf


def criterion_parts(theta, beta, x0, problem: Problem, rule=None):
    """Laplace (``rule=None``) or adaptive Gauss–Hermite criterion at (θ, β), as ``laplace_parts``."""
    if rule is None:
        return laplace_parts(theta, beta, x0, problem, joint=False)
    return quadrature_parts(theta, beta, x0, problem, rule)
