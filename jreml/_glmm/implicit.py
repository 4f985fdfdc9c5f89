r"""Derivatives of a GLMM's fitted (θ̂, β̂) with respect to the data, by the implicit function theorem.

At the optimum p̂ = (θ̂, β̂) of the criterion D(p; data) (Laplace or adaptive Gauss–Hermite), g(p̂; data) =
∇_p D = 0, so for a perturbation of the data's floating-point leaves (y, prior weights, X, offset)

    dp̂ = −H⁻¹ · (∂g/∂data) · d(data),      H = ∂²D/∂p² at p̂                          (p: k + p_β)

``fitted_parameters`` returns p̂ unchanged with that ``custom_jvp``, so ``jax.grad`` / ``jax.jvp`` of any function
of the fitted values reach the data without differentiating the optimiser (scipy's BFGS on the host) or the PIRLS
loop (whose own implicit derivative, ``pirls.conditional_modes``, gives ∂g/∂data and H).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from .laplace import criterion_parts
from .pirls import Problem


def _criterion(params, problem: Problem, u0, rule):
    k = problem.n_theta
    return criterion_parts(params[:k], params[k:], u0, problem, rule)[0]


@eqx.filter_custom_jvp
def fitted_parameters(params, problem: Problem, u0, *, rule=None):
    """p̂ = (θ̂, β̂) of a fit of ``problem`` (``params``, e.g. ``np.concatenate([fit.theta, fit.beta])``), as a
    function of ``problem``'s data with the implicit derivative of the module docstring; ``u0`` warm-starts PIRLS
    (the modes of the fit)."""
    return params


@fitted_parameters.def_jvp
def _fitted_parameters_jvp(primals, tangents, *, rule=None):
    params, problem, u0 = primals
    t_problem = tangents[1]
    params = jax.lax.stop_gradient(params)
    if t_problem is None:
        return params, jnp.zeros_like(params)
    diff, static = eqx.partition(problem, eqx.is_inexact_array)

    def fill(t, p):  # a zero tangent where a data leaf was not differentiated (None)
        if eqx.is_inexact_array(p):
            return jnp.zeros_like(p) if t is None else t
        return None

    t_diff = jax.tree_util.tree_map(fill, t_problem, problem, is_leaf=lambda x: x is None)

    def grad_at(d):
        return jax.grad(_criterion)(params, eqx.combine(d, static), u0, rule)

    _, d_grad = jax.jvp(grad_at, (diff,), (t_diff,))
    hessian = jax.hessian(_criterion)(params, problem, u0, rule)
    return params, -jnp.linalg.solve(0.5 * (hessian + hessian.T), d_grad)
