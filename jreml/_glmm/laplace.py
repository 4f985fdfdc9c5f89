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

import jax.numpy as jnp

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
