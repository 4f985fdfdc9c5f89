r"""Penalised iteratively reweighted least squares (PIRLS): the conditional modes of a GLMM in one ``lax.while_loop``.

For θ (and β) the conditional mode û minimises the penalised deviance

    P(u) = Σ_i d(y_i, μ_i) + ‖u‖²,   η = offset + Xβ + ZΛ(θ)u,   μ = g⁻¹(η)            (u: q, η, μ: n)

(with β among the unknowns in lme4's nAGQ = 0 stage, ``joint=True``). Each step is Fisher scoring: working weights
w_i = wt_i·(dμ/dη)²/V(μ_i) and working residual t = ZΛu (+ Xβ) + (y − μ)/(dμ/dη) give the weighted mixed-model
equations of ``equations.py``, whose solution is the full step δ = u* − u; δ is halved (at most ``MAX_HALVINGS``
times) until P decreases. The loop stops when max|δ| ≤ ``TOLERANCE``·(1 + max|x|) (Bates et al. 2015, section
5, and the lme4 ``glmer`` documentation, describe the same iteration with this step-halving).

Derivatives: ``conditional_modes`` carries a ``custom_jvp`` by the implicit function theorem at the fixed point
F(x̂; p) = ∇ₓ ½P = 0: dx̂ = −H⁻¹ ∂F/∂p · dp, with H = ∂F/∂x the Hessian of ½P (for a canonical link exactly the
PIRLS matrix, ΛᵀZᵀWZΛ + I; otherwise solved by conjugate gradients with that matrix as the preconditioner), by
``lax.custom_linear_solve`` so that reverse mode transposes it. The loop is never differentiated.

Status codes (``Modes.status``): 0 converged, 1 iteration limit, 2 a Cholesky factor failed or P is not finite.
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax

from .._backends.sparse import SparseStructure
from .equations import factorise, lam_t_z_t, lams, solve_a, solve_joint, solve_joint_rhs, z_lam
from .family import AbstractFamily

MAX_ITER = 100
MAX_HALVINGS = 12
TOLERANCE = 1e-11

CONVERGED, MAX_ITERATIONS, FAILED = 0, 1, 2


class Problem(eqx.Module):
    """The data of one GLMM: response y (proportions for the binomial), prior weights wt, offset, X (n, p), the
    random terms' blocked structure (codes and values per row) and L₂₁'s sparsity pattern, the family, and the
    residual parameter value that makes the Gaussian residual σ² = 1 in the full θ."""

    y: jax.Array
    wt: jax.Array
    offset: jax.Array
    X: jax.Array
    structure: SparseStructure
    pattern: object
    family: AbstractFamily
    n_theta: int = eqx.field(static=True)
    residual_theta: float = eqx.field(static=True)

    def full_theta(self, theta):
        """The model's θ: the random terms' parameters, then the residual's (σ² = 1)."""
        return jnp.concatenate([theta, jnp.full((1,), self.residual_theta, theta.dtype)])


class Modes(NamedTuple):
    x: jax.Array  # û (q,), or (û, β̂) (q + p,) for joint=True
    status: jax.Array
    iterations: jax.Array


def linear_predictor(problem: Problem, lam, u, beta):
    return problem.offset + problem.X @ beta + z_lam(lam, problem.structure, u)


def _split(problem: Problem, x, beta, joint: bool):
    q = problem.structure.q
    return (x[:q], x[q:]) if joint else (x, beta)


def penalised_deviance(x, theta, beta, problem: Problem, joint: bool):
    """P = Σ d(y, μ) + ‖u‖² at x (u, or (u, β) with ``joint``)."""
    u, beta = _split(problem, x, beta, joint)
    lam = lams(problem.full_theta(theta), problem.structure)
    mu = problem.family.link.inverse(linear_predictor(problem, lam, u, beta))
    return jnp.sum(problem.family.unit_deviance(problem.y, mu, problem.wt)) + jnp.sum(u**2)


def working_weights(problem: Problem, eta):
    """(μ, dμ/dη, w = wt·(dμ/dη)²/V(μ)) at η."""
    fam = problem.family
    mu = fam.link.inverse(eta)
    d_mu = fam.link.derivative(eta)
    return mu, d_mu, problem.wt * d_mu**2 / fam.variance(mu)


def _step_target(x, theta, beta, problem: Problem, joint: bool):
    """The PIRLS solution x* at the weights of x, with the factor and whether it is valid."""
    u, beta = _split(problem, x, beta, joint)
    full = problem.full_theta(theta)
    lam = lams(full, problem.structure)
    eta = linear_predictor(problem, lam, u, beta)
    mu, d_mu, w = working_weights(problem, eta)
    resid = (problem.y - mu) / d_mu
    wf = factorise(full, problem.structure, problem.pattern, w)
    if joint:
        t = eta - problem.offset + resid
        u_new, beta_new, ok = solve_joint(wf, problem.structure, lam, problem.X, w, t)
        return jnp.concatenate([u_new, beta_new]), wf.ok & ok
    t = eta - problem.offset - problem.X @ beta + resid
    rhs = lam_t_z_t(lam, problem.structure, (w * t)[:, None])
    return solve_a(wf, problem.structure, rhs)[:, 0], wf.ok


def _pirls(theta, beta, x0, problem: Problem, joint: bool) -> Modes:
    def objective(x):
        return penalised_deviance(x, theta, beta, problem, joint)

    def cond(state):
        _, _, it, status, _ = state
        return (status < 0) & (it < MAX_ITER)

    def body(state):
        x, pdev, it, _, _ = state
        target, ok = _step_target(x, theta, beta, problem, joint)
        delta = target - x

        def halve_cond(s):
            k, _, p_try = s
            return (k < MAX_HALVINGS) & ~(p_try <= pdev)

        def halve_body(s):
            k, step, _ = s
            step = 0.5 * step
            return k + 1, step, objective(x + step * delta)

        _, step, p_try = lax.while_loop(halve_cond, halve_body, (0, jnp.ones((), x.dtype), objective(x + delta)))
        accept = p_try <= pdev
        x_new = jnp.where(accept, x + step * delta, x)
        p_new = jnp.where(accept, p_try, pdev)
        small = jnp.max(jnp.abs(delta)) <= TOLERANCE * (1.0 + jnp.max(jnp.abs(x)))
        failed = ~ok | ~jnp.isfinite(p_new) | ~jnp.all(jnp.isfinite(x_new))
        # no decrease at the smallest step: x is a minimum to rounding (P flat along δ)
        status = jnp.where(failed, FAILED, jnp.where(small | ~accept, CONVERGED, -1)).astype(jnp.int32)
        return x_new, p_new, it + 1, status, ok

    init = (x0, objective(x0), jnp.zeros((), jnp.int32), jnp.asarray(-1, jnp.int32), jnp.asarray(True))
    x, _, it, status, _ = lax.while_loop(cond, body, init)
    status = jnp.where(status < 0, MAX_ITERATIONS, status).astype(jnp.int32)
    return Modes(x, status, it)


@eqx.filter_custom_jvp
def conditional_modes(theta, beta, x0, problem: Problem, *, joint: bool) -> Modes:
    """The PIRLS fixed point x̂(θ, β) (see the module docstring), started at x0; differentiable in θ and β."""
    return _pirls(theta, beta, x0, problem, joint)


def _gradient(x, theta, beta, problem: Problem, joint: bool):
    return jax.grad(penalised_deviance)(x, theta, beta, problem, joint) * 0.5


@conditional_modes.def_jvp
def _conditional_modes_jvp(primals, tangents, *, joint: bool):
    theta, beta, x0, problem = primals
    joint_ = joint
    t_theta, t_beta = tangents[0], tangents[1]
    modes = conditional_modes(theta, beta, x0, problem, joint=joint_)
    x = modes.x
    t_theta = jnp.zeros_like(theta) if t_theta is None else t_theta
    t_beta = jnp.zeros_like(beta) if t_beta is None or joint_ else t_beta
    # the data's floating-point leaves (y, weights, X, offset) may carry tangents too (``implicit.py``)
    diff, static = eqx.partition(problem, eqx.is_inexact_array)
    t_diff = jax.tree_util.tree_map(_fill_tangent, tangents[3], problem, is_leaf=lambda v: v is None)

    def gradient(th, be, d):
        return _gradient(x, th, be, eqx.combine(d, static), joint_)

    _, d_f = jax.jvp(gradient, (theta, beta, diff), (t_theta, t_beta, t_diff))

    def matvec(v):
        return jax.jvp(lambda xx: _gradient(xx, theta, beta, problem, joint_), (x,), (v,))[1]

    precondition = _preconditioner(x, theta, beta, problem, joint_)

    def solve(mv, b):
        if problem.family.canonical:
            return precondition(b)
        out, _ = jax.scipy.sparse.linalg.cg(mv, b, M=precondition, tol=1e-13, maxiter=200)
        return out

    d_x = lax.custom_linear_solve(matvec, -d_f, solve, symmetric=True)
    return modes, Modes(d_x, _float0(modes.status), _float0(modes.iterations))


def _fill_tangent(t, p):
    """A leaf's tangent, zeros where a floating-point array was not differentiated (None), None elsewhere."""
    if eqx.is_inexact_array(p):
        return jnp.zeros_like(p) if t is None else t
    return None


def _float0(a):
    import numpy as np

    return np.zeros(a.shape, dtype=jax.dtypes.float0)


def _preconditioner(x, theta, beta, problem: Problem, joint: bool):
    """v ↦ (PIRLS matrix at x)⁻¹v: the Fisher-scoring Hessian of ½P (exact for a canonical link)."""
    u, beta_x = _split(problem, x, beta, joint)
    full = problem.full_theta(theta)
    lam = lams(full, problem.structure)
    _, _, w = working_weights(problem, linear_predictor(problem, lam, u, beta_x))
    wf = factorise(full, problem.structure, problem.pattern, w)
    q = problem.structure.q

    def apply(v):
        if joint:
            g_u, g_beta = solve_joint_rhs(wf, problem.structure, lam, problem.X, w, v[:q], v[q:])
            return jnp.concatenate([g_u, g_beta])
        return solve_a(wf, problem.structure, v[:, None])[:, 0]

    return apply
