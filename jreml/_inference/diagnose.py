"""Convergence diagnostics of a fit from the exact derivatives of its log-likelihood (``FitResult.diagnose``).

Notation: θ̂ (k,) the fitted covariance parameters, ℓ(θ) = ``reml_loglik`` or ``ml_loglik`` (lme4's convention),
g = ∇ℓ(θ̂) (k,) and H = ∇²ℓ(θ̂) (k, k), both by automatic differentiation of the scalar ℓ (``jax.grad`` and
``jax.hessian``, i.e. forward-over-reverse mode): exact to rounding, where lme4's convergence checks use finite
differences of the deviance (its ``checkConv``, the source of most of its convergence warnings).

F is the set of free parameters (those not at a boundary, ``fit.at_boundary``); g_F, H_FF their blocks.

* projected gradient: g with the components of boundary parameters that push further into the bound (g_i < 0 at a
  lower bound) set to 0 (the KKT conditions of a bound-constrained maximum; Nocedal & Wright 2006, §12.3, §16.7).
* Newton gain δ = ½ g_Fᵀ (−H_FF)⁻¹ g_F: the increase of ℓ a Newton step would bring, in log-likelihood units
  (half the squared Newton decrement; Boyd & Vandenberghe 2004, §9.5.1). Unlike the size of g it does not depend on
  the parametrisation or on the units of y. It is reported as ``newton_gain``; ``certified`` requires δ ≤ ``tol``
  (default 1e-6) and −H_FF positive definite.
* curvature: the eigen-decomposition of the Jacobi-scaled matrix C = D^{-½}(−H_FF)D^{-½}, D = diag|H_FF|, whose
  eigenvalues do not depend on the units of each parameter; ``condition`` = λ_max / λ_min of C (inf when
  λ_min ≤ 0). Directions whose scaled eigenvalue is ≤ ``flat`` (default 1e-6) · λ_max are reported as nearly flat
  (weakly identified combinations of parameters), with their components by name.
* boundary: for each scale parameter at its bound (variance-like v = exp(θ/s), s the parameter's scale power, as the
  fit's own loop uses), the one-sided slope ∂ℓ/∂v (reported times a typical fitted variance, so in ℓ units) and the
  gain ½ (∂ℓ/∂v)² / (−∂²ℓ/∂v²) that moving v off the boundary could bring when the slope is positive
  (:func:`_boundary_gain`). A slope ≤ 0 means the boundary is the constrained maximum (a singular fit, as lme4's
  ``isSingular``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from .._likelihood import loglik

__all__ = ["Diagnosis", "diagnose"]


@dataclass(frozen=True)
class Diagnosis:
    """The result of ``fit.diagnose()``: exact derivatives at θ̂ and what they say, in plain words (``advice``)."""

    method: str
    param_names: tuple[str, ...]
    theta: np.ndarray  # (k,) θ̂
    loglik: float
    gradient: np.ndarray  # (k,) ∂ℓ/∂θ at θ̂
    hessian: np.ndarray  # (k, k) ∂²ℓ/∂θ∂θᵀ at θ̂
    projected_gradient: np.ndarray  # (k,)
    newton_gain: float  # ½ g_Fᵀ(−H_FF)⁻¹g_F, log-likelihood units
    at_boundary: tuple[str, ...]  # names of the parameters at their bound
    boundary_slope: dict  # name → ∂ℓ/∂v at the bound (v the variance-like quantity)
    boundary_gain: dict  # name → ℓ gained by leaving the bound (0 where the slope is ≤ 0)
    eigenvalues: np.ndarray  # (|F|,) of the Jacobi-scaled −H_FF, ascending
    condition: float
    flat_directions: tuple  # ((scaled eigenvalue, {name: component}), ...)
    negative_definite: bool  # −H_FF positive definite
    certified: bool  # a (constrained) local maximum to within ``tol``
    fit_converged: bool
    advice: tuple[str, ...] = field(default=())

    @property
    def projected_gradient_norm(self) -> float:
        """max |projected gradient| (θ's units)."""
        return float(np.max(np.abs(self.projected_gradient))) if self.projected_gradient.size else 0.0

    def __str__(self) -> str:
        lines = [f"Diagnosis of a {self.method.upper()} fit: ℓ = {self.loglik:.10g}"]
        width = max((len(n) for n in self.param_names), default=4)
        lines.append(f"  {'parameter':<{width}}  {'theta':>12}  {'gradient':>10}  boundary")
        for i, name in enumerate(self.param_names):
            mark = "yes" if name in self.at_boundary else ""
            lines.append(f"  {name:<{width}}  {self.theta[i]:12.6g}  {self.gradient[i]:10.2e}  {mark}")
        lines.append(
            f"  projected gradient (max abs) {self.projected_gradient_norm:.2e}; Newton step gain in ℓ "
            f"{self.newton_gain:.2e}; scaled Hessian condition {self.condition:.3g}"
        )
        lines.append(f"  certified local maximum: {'yes' if self.certified else 'no'}")
        lines += [f"  - {line}" for line in self.advice]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"Diagnosis(certified={self.certified}, newton_gain={self.newton_gain:.2e}, "
            f"projected_gradient_norm={self.projected_gradient_norm:.2e}, condition={self.condition:.3g}, "
            f"at_boundary={self.at_boundary!r})"
        )


def _derivatives(theta, y, X, model, method):
    def f(t):
        return loglik(t, y, X, model, method=method)

    value, grad = jax.value_and_grad(f)(theta)
    return value, grad, jax.hessian(f)(theta)


_derivatives_jit = jax.jit(_derivatives, static_argnames="method")


def _boundary_gain(grad_at, theta, i: int, g_i: float, s: float, reference: float) -> tuple[float, float]:
    """(∂ℓ/∂v · reference, the ℓ gained by leaving the bound) for scale parameter i, v = exp(θᵢ/s) at its bound.

    ∂ℓ/∂v = gᵢ·s/v (chain rule, accurate in relative terms however small v is). The curvature ∂²ℓ/∂v² is a
    difference of slopes at v̂ and v̂ + δ, δ = 1e-4·``reference`` (a typical fitted variance): the chain rule for it
    in θ cancels catastrophically near v = 0. Gain = ½ (∂ℓ/∂v)² / (−∂²ℓ/∂v²) when the slope is positive (the
    quadratic model's rise from v̂ to its maximum), else 0; inf when the curvature does not bound it.
    """
    v = math.exp(float(theta[i]) / s)
    slope = g_i * s / v
    if slope <= 0:
        return slope * reference, 0.0
    delta = 1e-4 * reference
    g2 = float(grad_at(theta.at[i].set(s * math.log(v + delta)))[i])
    slope2 = g2 * s / (v + delta)
    curvature = -(slope2 - slope) / delta
    return slope * reference, (0.5 * slope * slope / curvature) if curvature > 0 else math.inf


def _direction_text(components: dict) -> str:
    parts = sorted(components.items(), key=lambda kv: -abs(kv[1]))
    parts = [(n, c) for n, c in parts if abs(c) >= 0.1] or parts[:1]
    return " ".join(f"{'+' if c >= 0 else '−'}{abs(c):.2f}·{n}" for n, c in parts).lstrip("+")


def diagnose(fit, tol: float = 1e-6, flat: float = 1e-6) -> Diagnosis:
    """Exact gradient and Hessian of ℓ at θ̂ and the checks of the module docstring; ``fit`` a single FitResult."""
    if np.ndim(fit.loglik) != 0:
        raise ValueError("diagnose needs a single fit, not a batch (index the batch first)")
    names = tuple(fit.param_names)
    theta = jnp.asarray(fit.theta)
    value, grad, hess = _derivatives_jit(theta, fit.y, fit.X, fit.model, fit.method)
    value, g, H = float(value), np.asarray(grad, float), np.asarray(hess, float)
    theta_np = np.asarray(theta, float)
    at_bound = np.asarray(fit.at_boundary, bool)
    free = ~at_bound
    advice: list[str] = []
    if not (np.isfinite(value) and np.all(np.isfinite(g)) and np.all(np.isfinite(H))):
        advice.append(
            "the log-likelihood or its derivatives are not finite at θ̂ (V(θ̂) is not positive definite or "
            "overflows): the fit is not usable; refit with another start (theta0) or rescale y"
        )
        return Diagnosis(
            fit.method, names, theta_np, value, g, H, g.copy(), math.inf, (), {}, {}, np.array([]), math.inf,
            (), False, False, bool(fit.converged), tuple(advice),
        )  # fmt: skip
    projected = np.where(at_bound & (g < 0), 0.0, g)

    # Newton gain and curvature on the free block
    gf, Hf = g[free], -H[np.ix_(free, free)]
    d = np.sqrt(np.maximum(np.abs(np.diagonal(Hf)), np.finfo(float).tiny))
    C = Hf / np.outer(d, d)
    evals, evecs = np.linalg.eigh(C) if gf.size else (np.array([]), np.zeros((0, 0)))
    positive = bool(gf.size == 0 or evals[0] > 0)
    if gf.size == 0:
        gain, condition = 0.0, 1.0
    else:
        step = (evecs @ ((evecs.T @ (gf / d)) / np.where(evals > 0, evals, np.nan))) / d
        gain = 0.5 * float(gf @ step) if positive else math.inf
        condition = float(evals[-1] / evals[0]) if positive else math.inf
    free_names = [n for n, f in zip(names, free, strict=True) if f]
    flat_dirs = []
    for lam, vec in zip(evals, evecs.T, strict=True):
        if lam <= flat * evals[-1]:
            comp = vec / d
            comp = comp / np.max(np.abs(comp))
            flat_dirs.append((float(lam), {n: float(c) for n, c in zip(free_names, comp, strict=True)}))

    # boundary parameters: one-sided slope in the variance-like quantity
    scale_mask = np.asarray(fit.model.scale_mask, bool) if len(names) else np.zeros(0, bool)
    one = jnp.asarray(1.0, dtype=theta.dtype)
    powers = np.asarray(fit.model.default_theta(one * math.e) - fit.model.default_theta(one), float)
    fitted_v = [math.exp(theta_np[j] / powers[j]) for j in np.flatnonzero(scale_mask & free)]
    reference = float(np.median(fitted_v)) if fitted_v else 1.0
    slopes, gains = {}, {}
    for i in np.flatnonzero(at_bound):
        if scale_mask[i]:

            def grad_at(t):
                return _derivatives_jit(t, fit.y, fit.X, fit.model, fit.method)[1]

            slope, gained = _boundary_gain(grad_at, theta, int(i), g[i], powers[i], reference)
        else:
            slope, gained = g[i], 0.0
        slopes[names[i]], gains[names[i]] = float(slope), float(gained)
    boundary_ok = all(v <= tol for v in gains.values())
    certified = bool(positive and gain <= tol and boundary_ok)

    # advice in plain words
    kind = fit.method.upper()
    if certified:
        where = "a local maximum" if not at_bound.any() else "a local maximum on the boundary"
        advice.append(
            f"converged: θ̂ is {where} of the {kind} log-likelihood (exact gradient and Hessian: a Newton step "
            f"would raise ℓ by {gain:.1e}, the free block of the Hessian is negative definite)"
        )
        if not bool(fit.converged):
            advice.append(f"the fit itself reported '{fit.message}', but the derivatives show it is at the optimum")
    elif not positive:
        j = 0
        direction = _direction_text({n: float(c) for n, c in zip(free_names, evecs[:, j] / d, strict=True)})
        advice.append(
            f"not a maximum: ℓ curves upward (or is flat) along {direction} (scaled eigenvalue {evals[0]:.2e}); "
            "θ̂ is a saddle point or the fit stopped early: refit with another start (theta0) or more iterations"
        )
    elif gain > tol:
        advice.append(
            f"not converged: a Newton step would raise ℓ by {gain:.2e} (> {tol:g}); refit with more iterations "
            "(max_iter) or from θ̂ (theta0=fit.theta)"
        )
    for name in slopes:
        if gains[name] > tol:
            advice.append(
                f"{name} is at its boundary but ℓ increases off it (by up to {gains[name]:.2e}): the fit stopped "
                "at the boundary too early; refit with theta0 away from zero"
            )
    if slopes and boundary_ok:
        listed = ", ".join(slopes)
        advice.append(
            f"singular fit: {listed} at the boundary (a variance of 0 or a correlation of ±1), and ℓ does not "
            "increase off it, so the boundary is the estimate; the random-effect structure is probably richer "
            "than the data support (consider removing the term or its correlation)"
        )
    if positive and flat_dirs:
        for lam, comp in flat_dirs:
            advice.append(
                f"ℓ is nearly flat along {_direction_text(comp)} (scaled eigenvalue {lam:.1e}): those parameters "
                "are weakly identified; standard errors and Satterthwaite/Kenward-Roger df that use them are unreliable"
            )
    elif positive and condition > 1e8:
        advice.append(f"the scaled Hessian's condition is {condition:.2g}: some parameters are nearly confounded")
    return Diagnosis(
        method=fit.method,
        param_names=names,
        theta=theta_np,
        loglik=value,
        gradient=g,
        hessian=H,
        projected_gradient=projected,
        newton_gain=float(gain),
        at_boundary=tuple(n for n, b in zip(names, at_bound, strict=True) if b),
        boundary_slope=slopes,
        boundary_gain=gains,
        eigenvalues=evals,
        condition=float(condition),
        flat_directions=tuple(flat_dirs),
        negative_definite=positive,
        certified=certified,
        fit_converged=bool(fit.converged),
        advice=tuple(advice),
    )
