"""Likelihood-profile confidence intervals (lme4's ``profile()`` / ``confint(method="profile")``).

For a scalar parameter ψ (a standard deviation, a correlation, σ, or a fixed effect) the profile deviance is
d(c) = min over the other parameters of the criterion −2ℓ with ψ held at c, and the signed root deviance is
ζ(c) = sign(c − ψ̂)·√(d(c) − d(ψ̂)). The level-(1 − α) interval is {c : |ζ(c)| ≤ z_{1−α/2}} (Bates et al. 2015,
"Fitting linear mixed-effects models using lme4", J. Stat. Softw. 67(1), §5.1; lme4's ``profile.merMod``).

Covariance parameters ψ(θ) are functions of the natural parameters (variances, covariances) of the fitted
model: sd = √variance, cor = cov/(sd·sd), sigma = √(Residual.variance). Each point of their profile is one
constrained fit, min −2ℓ(θ) subject to ψ(θ) = c (SLSQP on the compiled criterion and its gradient, started at the
previous point). A fixed effect β_j is profiled as lme4 does: the column x_j leaves X, y − c·x_j is the response,
and the criterion is minimised over θ; for a REML fit the reduced model's REML criterion is used (lme4 refits
``devfun`` on the reduced ``X``; its constant is that of n − p + 1 residual degrees of freedom).

Boundaries as lme4: a standard deviation whose ζ does not reach −z at (numerically) 0 gets the lower limit 0; a
correlation whose ζ does not reach ±z before ±1 gets the limit ±1.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from .._likelihood import loglik

__all__ = ["ProfileParameter", "lme4_parameters", "profile_confint", "profile_table"]


@dataclass(frozen=True)
class ProfileParameter:
    """One profiled parameter: lme4's name, its kind ("sd", "cor", "sigma", "beta") and where it lives."""

    name: str
    kind: str
    indices: tuple[int, ...]  # natural-parameter indices (sd/sigma: (var,), cor: (cov, var_i, var_j)); beta: (j,)


def _natural_index(param_names, term_name: str, labels, i: int, j: int | None) -> int:
    names = {name: k for k, name in enumerate(param_names)}
    if j is None:
        candidates = [f"{term_name}.variance[{labels[i]}]"] + ([f"{term_name}.variance"] if len(labels) == 1 else [])
    else:
        a, b = labels[min(i, j)], labels[max(i, j)]
        candidates = [f"{term_name}.covariance[{a},{b}]", f"{term_name}.covariance[{b},{a}]"]
    for c in candidates:
        if c in names:
            return names[c]
    raise ValueError(f"profile: no natural parameter named {candidates[0]!r} in {tuple(param_names)}")


def lme4_parameters(fit) -> list[ProfileParameter]:
    """The parameters of ``confint(fit, oldNames = FALSE)`` in lme4's order: per random term (lme4's order) the
    lower triangle of its covariance column by column (sd on the diagonal, cor below), then sigma, then β."""
    out: list[ProfileParameter] = []
    for term_info, _ in fit._ordered_terms():
        labels = term_info.labels
        m = len(labels)
        for col in range(m):
            var_col = _natural_index(fit.param_names, term_info.name, labels, col, None)
            out.append(ProfileParameter(f"sd_{labels[col]}|{term_info.group}", "sd", (var_col,)))
            for row in range(col + 1, m):
                cov = _natural_index(fit.param_names, term_info.name, labels, row, col)
                var_row = _natural_index(fit.param_names, term_info.name, labels, row, None)
                name = f"cor_{labels[row]}.{labels[col]}|{term_info.group}"
                out.append(ProfileParameter(name, "cor", (cov, var_col, var_row)))
    if "Residual.variance" not in fit.param_names:
        raise ValueError("profile needs a model with a 'Residual.variance' parameter")
    out.append(ProfileParameter("sigma", "sigma", (fit.param_names.index("Residual.variance"),)))
    names = fit.beta_names or tuple(f"beta[{j}]" for j in range(fit.beta.shape[-1]))
    out.extend(ProfileParameter(name, "beta", (j,)) for j, name in enumerate(names))
    return out


def _psi(kind: str, indices, natural):
    if kind in ("sd", "sigma"):
        return jnp.sqrt(jnp.maximum(natural[indices[0]], 0.0))
    cov, vi, vj = indices
    return natural[cov] / jnp.sqrt(natural[vi] * natural[vj])


class _ConstraintFailed(RuntimeError):
    pass


class _Profiler:
    """Compiled criterion −2ℓ(θ; y, X) and its gradient, and the constrained fits of one result."""

    def __init__(self, fit):
        self.fit = fit
        self.model = fit.model
        self.method = "ml"  # lme4's profile refits a REML fit by ML (``devfun2``: ``fm <- refitML(fm)``)
        self.y = np.asarray(fit.y)
        self.X = np.asarray(fit.X)
        self.theta_hat = np.asarray(fit.theta, dtype=float)
        model, method = self.model, self.method

        def deviance(theta, y, X):
            return -2.0 * loglik(theta, y, X, model, method=method)

        self._dev = jax.jit(jax.value_and_grad(deviance))

        def psi(theta, kind_code, i0, i1, i2):
            natural = model.build_params(theta)
            is_sd = kind_code == 0
            # each branch sees harmless inputs where it is not selected: jnp.where passes a NaN derivative of
            # the other branch on (sqrt(max(cov, 0)) at a negative covariance made the correlation's gradient NaN)
            sd = jnp.sqrt(jnp.where(is_sd, jnp.maximum(natural[i0], 0.0), 1.0))
            cor = natural[i0] / jnp.sqrt(jnp.where(is_sd, 1.0, natural[i1] * natural[i2]))
            return jnp.where(is_sd, sd, cor)

        self._psi = jax.jit(jax.value_and_grad(psi))
        if fit.method != "ml":
            self.theta_hat = self._minimise(self.theta_hat, self.y, self.X).x
        self.base = float(self._dev(jnp.asarray(self.theta_hat), self.y, self.X)[0])
        self.beta_hat = _gls_beta(model, self.theta_hat, self.y, self.X)

    def _psi_args(self, par: ProfileParameter):
        code = 0 if par.kind in ("sd", "sigma") else 1
        idx = tuple(par.indices) + (0,) * (3 - len(par.indices))
        return (code, *idx)

    def psi_hat(self, par: ProfileParameter) -> float:
        if par.kind == "beta":
            return float(self.beta_hat[par.indices[0]])
        return float(self._psi(jnp.asarray(self.theta_hat), *self._psi_args(par))[0])

    def _minimise(self, start, y, X, constraint=None):
        def fun(t):
            v, g = self._dev(jnp.asarray(t), y, X)
            return float(v), np.asarray(g, dtype=float)

        import scipy.optimize  # on first use: it would add to `import jreml`

        if constraint is None:
            res = scipy.optimize.minimize(fun, start, jac=True, method="L-BFGS-B", options=dict(gtol=1e-9, ftol=1e-15))
        else:
            res = scipy.optimize.minimize(
                fun, start, jac=True, method="SLSQP", constraints=[constraint], options=dict(ftol=1e-12, maxiter=500)
            )
        return res

    def deviance_at(self, par: ProfileParameter, c: float, start):
        """(d(c), θ at the constrained minimum)."""
        if par.kind == "beta":
            j = par.indices[0]
            X = np.delete(self.X, j, axis=1)
            y = self.y - c * self.X[:, j]
            res = self._minimise(start, y, X)
            return float(res.fun), res.x
        args = self._psi_args(par)

        def cfun(t):
            return float(self._psi(jnp.asarray(t), *args)[0]) - c

        def cjac(t):
            return np.asarray(self._psi(jnp.asarray(t), *args)[1], dtype=float)

        res = self._minimise(start, self.y, self.X, dict(type="eq", fun=cfun, jac=cjac))
        if abs(cfun(res.x)) > 1e-6 * max(1.0, abs(c)):
            # SLSQP can stop at a point off the constraint (seen for correlations): no silent wrong deviance
            raise _ConstraintFailed(f"profile of {par.name}: the constrained fit at {c:.6g} missed its constraint")
        return float(res.fun), res.x

    def base_for(self, par: ProfileParameter) -> float:
        return self.base

    def zeta(self, par, c, start, base, psi_hat):
        d, theta = self.deviance_at(par, c, start)
        return math.copysign(math.sqrt(max(d - base, 0.0)), c - psi_hat), theta


def _wald_scale(fit, profiler: _Profiler, par: ProfileParameter) -> float:
    if par.kind == "beta":
        return float(np.asarray(fit.se_beta)[par.indices[0]])
    args = profiler._psi_args(par)
    g = np.asarray(profiler._psi(jnp.asarray(profiler.theta_hat), *args)[1])
    var = float(g @ np.asarray(fit.vcov_theta) @ g)
    psi = abs(profiler.psi_hat(par))
    return math.sqrt(var) if np.isfinite(var) and var > 0 else max(psi, 1.0) * 0.5


def _one_side(profiler, par, target, base, psi_hat, scale, lo_limit, hi_limit):
    """The root of ζ(c) = target on one side of ψ̂, or the limit where ζ does not reach it."""
    import scipy.optimize  # on first use: it would add to `import jreml`

    direction = 1.0 if target > 0 else -1.0
    limit = hi_limit if direction > 0 else lo_limit
    start = profiler.theta_hat
    a = psi_hat
    step = scale
    for _ in range(80):
        b = a + direction * step
        if limit is not None:
            room = abs(limit - a)
            if room < 1e-7 * max(abs(psi_hat), 1.0):
                return float(limit)  # ζ does not reach the target before the boundary (lme4: the limit)
            b = a + direction * min(step, 0.5 * room)
        zb, theta_b = profiler.zeta(par, b, start, base, psi_hat)
        if direction * (zb - target) >= 0:
            break
        a, start = b, theta_b
        step = 1.6 * abs(b - psi_hat)
    else:
        return float("nan")
    warm = start

    def f(c):
        return profiler.zeta(par, c, warm, base, psi_hat)[0] - target

    return float(scipy.optimize.brentq(f, a, b, xtol=1e-10 * max(abs(psi_hat), 1.0), rtol=1e-10))


def _gls_beta(model, theta, y, X) -> np.ndarray:
    """β̂(θ) = (XᵀV⁻¹X)⁻¹XᵀV⁻¹y on the dense V (profiling is for models small enough to profile)."""
    V = np.asarray(model(jnp.asarray(theta)))
    solved = np.linalg.solve(V, np.column_stack([X, y]))
    return np.linalg.solve(X.T @ solved[:, :-1], X.T @ solved[:, -1])


def _guarded(side, *args) -> float:
    try:
        return side(*args)
    except _ConstraintFailed as err:
        warnings.warn(f"{err}; that limit is NaN", stacklevel=4)
        return float("nan")


def _limits(par):
    if par.kind in ("sd", "sigma"):
        return 0.0, None
    if par.kind == "cor":
        return -1.0, 1.0
    return None, None


def profile_confint(fit, level: float = 0.95, parm=None) -> pd.DataFrame:
    """lme4's ``confint(fit, method = "profile", level, oldNames = FALSE)``: DataFrame indexed by parameter name
    with columns lower, upper."""
    import scipy.stats  # on first use: it would add to `import jreml`

    z = float(scipy.stats.norm.ppf(0.5 + level / 2.0))
    profiler = _Profiler(fit)
    rows = {}
    for par in _select(lme4_parameters(fit), parm):
        psi_hat = profiler.psi_hat(par)
        base = profiler.base_for(par)
        scale = _wald_scale(fit, profiler, par)
        lo_limit, hi_limit = _limits(par)
        if par.kind in ("sd", "sigma") and psi_hat <= 1e-8 * max(scale, 1.0):
            lower = 0.0  # at the boundary: lme4 reports 0
        else:
            lower = _guarded(_one_side, profiler, par, -z, base, psi_hat, scale, lo_limit, hi_limit)
        upper = _guarded(_one_side, profiler, par, z, base, psi_hat, scale, lo_limit, hi_limit)
        rows[par.name] = (lower, upper)
    return pd.DataFrame.from_dict(rows, orient="index", columns=["lower", "upper"])


def profile_table(fit, parm=None, n_points: int = 13, zeta_max: float = 2.6) -> pd.DataFrame:
    """The profile for plotting (lme4's ``as.data.frame(profile(fit))``): long DataFrame with columns
    parameter, value, zeta — per parameter ``n_points`` values spanning |ζ| ≤ ``zeta_max``."""
    import scipy.stats  # on first use: it would add to `import jreml`

    level = 2.0 * scipy.stats.norm.cdf(zeta_max) - 1.0
    ci = profile_confint(fit, level=level, parm=parm)
    profiler = _Profiler(fit)
    records = []
    for par in _select(lme4_parameters(fit), parm):
        psi_hat = profiler.psi_hat(par)
        base = profiler.base_for(par)
        lower, upper = ci.loc[par.name]
        for c in np.linspace(lower, upper, n_points):
            if par.kind in ("sd", "sigma") and c <= 0:
                c = 1e-7 * max(abs(psi_hat), 1e-8)
            if par.kind == "cor":
                c = float(np.clip(c, -1 + 1e-7, 1 - 1e-7))
            zeta = profiler.zeta(par, float(c), profiler.theta_hat, base, psi_hat)[0]
            records.append(dict(parameter=par.name, value=float(c), zeta=zeta))
    return pd.DataFrame.from_records(records, columns=["parameter", "value", "zeta"])


def _select(params, parm):
    if parm is None:
        return params
    wanted = [parm] if isinstance(parm, str) else list(parm)
    known = {p.name: p for p in params}
    missing = [w for w in wanted if w not in known]
    if missing:
        raise ValueError(f"parm: unknown parameter(s) {missing}; known: {list(known)}")
    return [known[w] for w in wanted]


def _psi_values(par: ProfileParameter, natural: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """ψ of every replicate: natural (B, k) and beta (B, p) → (B,)."""
    if par.kind == "beta":
        return beta[:, par.indices[0]]
    return np.asarray(jax.vmap(lambda values: _psi(par.kind, par.indices, values))(jnp.asarray(natural)))


def wald_confint(fit, level: float = 0.95, parm=None) -> pd.DataFrame:
    """lme4's ``confint(fit, method = "Wald")``: β̂ ± z·se for the fixed effects; the sd_/cor_/sigma rows are NaN,
    as lme4 leaves them NA (a variance's sampling distribution is far from normal near its boundary)."""
    import scipy.stats  # on first use: it would add to `import jreml`

    z = float(scipy.stats.norm.ppf(0.5 + level / 2.0))
    beta, se = np.asarray(fit.beta, dtype=float), np.asarray(fit.se_beta, dtype=float)
    rows = {}
    for par in _select(lme4_parameters(fit), parm):
        if par.kind == "beta":
            j = par.indices[0]
            rows[par.name] = (beta[j] - z * se[j], beta[j] + z * se[j])
        else:
            rows[par.name] = (np.nan, np.nan)
    return pd.DataFrame.from_dict(rows, orient="index", columns=["lower", "upper"])


def bootstrap_confint(fit, level: float = 0.95, parm=None, n_boot: int = 500, seed: int = 0) -> pd.DataFrame:
    """lme4's ``confint(fit, method = "boot")`` (``boot.type = "perc"``): percentile intervals of every row from
    ``n_boot`` parametric bootstrap refits (``fit.bootstrap``; replicates that did not converge are left out)."""
    boot = fit.bootstrap(n_boot, seed=seed)
    keep = np.asarray(boot.converged, dtype=bool)
    if not keep.any():
        raise RuntimeError("confint(method='bootstrap'): no bootstrap refit converged")
    natural, beta = np.asarray(boot.params, dtype=float)[keep], np.asarray(boot.beta, dtype=float)[keep]
    alpha = (1.0 - level) / 2.0
    rows = {}
    for par in _select(lme4_parameters(fit), parm):
        values = _psi_values(par, natural, beta)
        values = values[np.isfinite(values)]
        rows[par.name] = tuple(np.quantile(values, [alpha, 1.0 - alpha])) if values.size else (np.nan, np.nan)
    return pd.DataFrame.from_dict(rows, orient="index", columns=["lower", "upper"])
