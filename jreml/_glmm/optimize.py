r"""The outer optimisation of a GLMM's Laplace deviance, in lme4's two stages, with exact gradients.

Stage 1 (lme4's nAGQ = 0): minimise D₀(θ) = D(θ, β̂(θ)) with β a PIRLS unknown (``joint=True``), from the
variances G_j = I (lme4's θ = 1) and β from one weighted least-squares step at R's ``mustart``. Stage 2
(nAGQ = 1): minimise D(θ, β) jointly from stage 1's (θ, β). θ is jreml's unconstrained parameter of each
random term's G (log-variances, log-Cholesky factors), so a variance on the boundary (0) is reached only as
θ → −∞ (lme4 optimises its Cholesky factor with a bound at 0 instead).

Both stages use scipy's BFGS on the host (``scipy.optimize.minimize(method="BFGS")``) with the value and the exact
gradient from one compiled program per evaluation (``eqx.filter_jit`` of ``jax.value_and_grad`` of the Laplace
deviance: reverse mode through the factor, implicit derivatives through the PIRLS fixed point, no finite
differences). PIRLS is warm-started at the previous evaluation's modes. The Hessian at the optimum (for the
standard errors, as lme4's ``vcov`` uses the Hessian of the deviance) is ``jax.hessian`` of the same function.
With a quadrature ``rule`` (nAGQ > 1, one scalar term) stage 2 minimises the adaptive Gauss–Hermite criterion of
``laplace.quadrature_parts`` instead, as lme4 does.
"""

from __future__ import annotations

from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from .laplace import criterion_parts, laplace_parts
from .pirls import CONVERGED, Problem

GTOL = 1e-7
NEWTON_STEPS = 3
MAX_ITER = 500


@eqx.filter_jit
def _stage1(theta, x0, problem: Problem):
    beta = jnp.zeros((problem.X.shape[1],), theta.dtype)

    def f(th):
        value, status, modes, _, _ = laplace_parts(th, beta, x0, problem, joint=True)
        return value, (status, modes.x)

    (value, (status, x)), grad = jax.value_and_grad(f, has_aux=True)(theta)
    return value, grad, status, x


@eqx.filter_jit
def _stage2(params, x0, problem: Problem, rule=None):
    k = problem.n_theta

    def f(p):
        value, status, modes, _, _ = criterion_parts(p[:k], p[k:], x0, problem, rule)
        return value, (status, modes.x)

    (value, (status, x)), grad = jax.value_and_grad(f, has_aux=True)(params)
    return value, grad, status, x


@eqx.filter_jit
def stage2_hessian(params, x0, problem: Problem, rule=None):
    """∂²D/∂(θ, β)² at ``params`` (forward over reverse mode through the implicit derivatives)."""
    k = problem.n_theta
    return jax.hessian(lambda p: criterion_parts(p[:k], p[k:], x0, problem, rule)[0])(params)


@dataclass
class StageResult:
    params: np.ndarray
    value: float
    x: np.ndarray
    status: int  # PIRLS status at the optimum
    success: bool
    message: str
    evaluations: int
    iterations: int


def _minimise(fun, start, x0) -> StageResult:
    state = {"x0": jnp.asarray(x0), "count": 0, "best": (np.inf, None, None, None)}

    def objective(p):
        value, grad, status, x = fun(jnp.asarray(p), state["x0"])
        value, status = float(value), int(status)
        state["count"] += 1
        if status == CONVERGED and np.isfinite(value):
            state["x0"] = x
            if value < state["best"][0]:
                state["best"] = (value, np.array(p), np.asarray(x), status)
        grad = np.asarray(grad)
        if not np.isfinite(value) or not np.all(np.isfinite(grad)):
            return np.inf, np.zeros_like(grad)
        return value, grad

    out = scipy.optimize.minimize(
        objective, np.asarray(start, dtype=float), jac=True, method="BFGS", options={"gtol": GTOL, "maxiter": MAX_ITER}
    )
    value, params, x, status = state["best"]
    if params is None:
        return StageResult(np.asarray(start), np.inf, np.asarray(x0), 2, False, str(out.message), out.nfev, out.nit)
    # BFGS stops with "precision loss" when the line search cannot improve D at rounding level: accept when the
    # gradient is small relative to D's scale.
    _, grad = objective(params)
    success = bool(out.success) or float(np.max(np.abs(grad))) <= 1e-4 * max(1.0, abs(value)) ** 0.5
    return StageResult(params, value, x, status, success, str(out.message), state["count"], int(out.nit))


def newton_polish(problem: Problem, stage: StageResult, steps: int = NEWTON_STEPS, rule=None):
    """Up to ``steps`` Newton steps p ← p − H⁻¹∇D from BFGS's end, each kept only if D does not increase; returns
    (stage, Hessian at its params). BFGS stops once the line search cannot resolve D's decrease at rounding
    level; Newton's quadratic convergence then takes (θ, β) to the optimum to about √ε of D's scale."""
    params, x = jnp.asarray(stage.params), jnp.asarray(stage.x)
    value = stage.value
    hessian = np.asarray(stage2_hessian(params, x, problem, rule))
    for _ in range(steps):
        _, grad, _, _ = _stage2(params, x, problem, rule)
        try:
            step = np.linalg.solve(0.5 * (hessian + hessian.T), np.asarray(grad))
        except np.linalg.LinAlgError:
            break
        trial = params - jnp.asarray(step)
        new_value, _, status, new_x = _stage2(trial, x, problem, rule)
        if int(status) != CONVERGED or not float(new_value) <= value:
            break
        params, x, value = trial, new_x, float(new_value)
        hessian = np.asarray(stage2_hessian(params, x, problem, rule))
        if float(np.max(np.abs(step))) < 1e-10:
            break
    polished = StageResult(
        np.asarray(params),
        value,
        np.asarray(x),
        stage.status,
        stage.success,
        stage.message,
        stage.evaluations,
        stage.iterations,
    )
    return polished, hessian


def optimise(problem: Problem, theta0, beta0, stages: int = 2, rule=None):
    """(stage 1 result, stage 2 result or None) of the module docstring's two stages."""
    q, p = problem.structure.q, problem.X.shape[1]
    x0 = jnp.concatenate([jnp.zeros((q,)), jnp.asarray(beta0)])
    first = _minimise(lambda th, x: _stage1(th, x, problem), theta0, x0)
    if stages == 1:
        return first, None
    start = np.concatenate([first.params, first.x[q : q + p]])
    second = _minimise(lambda par, x: _stage2(par, x, problem, rule), start, first.x[:q])
    return first, second
