r"""From a formula and a data frame to a fitted GLMM: the response (``cbind``, proportions with weights, 0/1,
counts), the problem of ``pirls.Problem``, the two optimisation stages, and the result.

``_fit.fit(..., family=...)`` calls ``glmm_design`` (the design, as lme4's ``glFormula``) and then ``fit_glmm``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np
import pandas as pd

from .._backends.sparse import sparse_pattern, sparse_structure
from .._design.build import Design, _variables, build_design
from .._design.formula import cbind_arguments, parse_formula
from .equations import conditional_variances, factorise, lam_times, lams
from .family import AbstractFamily, Binomial, Poisson, as_family
from .laplace import gauss_hermite
from .optimize import newton_polish, optimise
from .pirls import Problem, linear_predictor
from .result import GLMMResult, VarianceComponent

#: the name of the response column ``glmm_design`` puts into the data it passes to ``build_design``.
_RESPONSE = "_jreml_glmm_response"


@dataclass(frozen=True)
class GLMMDesign:
    design: Design
    family: AbstractFamily
    y: np.ndarray  # proportions (binomial) or counts / 0-1
    wt: np.ndarray  # prior weights (binomial trials)
    n_dropped: int
    response: str


def _evaluate(expr: str, data: pd.DataFrame) -> np.ndarray:
    name = expr.strip().strip("`")
    if name in data.columns:
        return pd.to_numeric(data[name], errors="raise").to_numpy(dtype=float)
    try:
        return np.asarray(data.eval(expr), dtype=float)
    except Exception as err:
        raise ValueError(f"cannot evaluate {expr!r} of the response on the data: {err}") from err


def _used_columns(parsed, data: pd.DataFrame) -> list[str]:
    text = parsed.text
    used = set(_variables(f"{_RESPONSE} ~ {parsed.fixed}", "fixed part", text)) - {_RESPONSE}
    for spec in parsed.random:
        used |= _variables(spec.expr, f"random-effects term ({spec.expr} | {spec.group})", text)
        used |= set(spec.factors)
    unknown = sorted(v for v in used if v not in data.columns)
    if unknown:
        raise KeyError(f"formula {text!r} uses column(s) {unknown} not in the data; columns: {list(data.columns)}")
    return [c for c in data.columns if c in used]


def glmm_design(formula: str, data: pd.DataFrame, family, link=None, weights=None) -> GLMMDesign:
    """The response, prior weights and design of a GLMM (rows with a missing value in a used column dropped).

    Responses as lme4's ``glmer``: ``cbind(successes, failures)`` (binomial; y = successes / trials, wt = trials),
    a proportion with ``weights`` = trials, a 0/1 response (``bernoulli`` or ``binomial``), or counts (``poisson``).
    """
    fam = as_family(family, link)
    if not isinstance(data, pd.DataFrame):
        raise TypeError(f"data must be a pandas DataFrame, got {type(data).__name__}")
    parsed = parse_formula(formula)
    columns = _used_columns(parsed, data)
    counts = cbind_arguments(parsed.response)
    if counts is not None:
        if not isinstance(fam, Binomial):
            raise ValueError(f"a cbind() response is binomial; got family {fam.name!r}")
        if weights is not None:
            raise ValueError("weights cannot be given with a cbind(successes, failures) response")
        successes, failures = (_evaluate(e, data) for e in counts)
        trials = successes + failures
        with np.errstate(invalid="ignore", divide="ignore"):
            y = np.where(trials > 0, successes / np.where(trials > 0, trials, 1.0), 0.0)
        wt = trials
        bad = np.isnan(successes) | np.isnan(failures)
    else:
        y = _evaluate(parsed.response, data)
        wt = (
            np.ones_like(y)
            if weights is None
            else np.asarray(data[weights] if isinstance(weights, str) else weights, dtype=float)
        )
        if wt.shape != y.shape:
            raise ValueError(f"weights must have one value per row ({y.shape[0]}), got shape {wt.shape}")
        bad = np.isnan(y) | np.isnan(wt)
    for c in columns:
        bad |= pd.isna(data[c].to_numpy())
    keep = ~bad
    frame = data.loc[keep, columns].reset_index(drop=True)
    y, wt = y[keep], wt[keep]
    _check_response(fam, y, wt, parsed.response)
    frame[_RESPONSE] = y
    rhs = parsed.text.split("~", 1)[1]
    design = build_design(f"{_RESPONSE} ~ {rhs}", frame)
    return GLMMDesign(design, fam, y, wt, int(bad.sum()), parsed.response)


def _check_response(fam: AbstractFamily, y, wt, name: str) -> None:
    if not np.all(np.isfinite(y)) or not np.all(np.isfinite(wt)) or np.any(wt < 0):
        raise ValueError(f"the response {name!r} and its weights must be finite, weights non-negative")
    if isinstance(fam, Binomial):
        if np.any((y < 0) | (y > 1)):
            raise ValueError(f"a binomial response must lie in [0, 1] (or be cbind(successes, failures)): {name!r}")
        k = wt * y
        if np.any(np.abs(k - np.round(k)) > 1e-7 * np.maximum(1.0, np.abs(k))):
            warnings.warn("non-integer number of successes in a binomial GLMM", UserWarning, stacklevel=4)
    elif isinstance(fam, Poisson):
        if np.any(y < 0):
            raise ValueError(f"a Poisson response must be non-negative: {name!r}")
        if np.any(np.abs(y - np.round(y)) > 1e-7 * np.maximum(1.0, y)):
            warnings.warn("non-integer counts in a Poisson GLMM", UserWarning, stacklevel=4)


def build_problem(gd: GLMMDesign) -> tuple[Problem, np.ndarray]:
    """(Problem, θ start with every G_j = I) from a ``GLMMDesign``."""
    structure = sparse_structure(gd.design.model)
    if structure is None:
        raise NotImplementedError("GLMMs need random terms on grouping factors ((x | g) terms) without relmat")
    residual = structure.residual[0]
    n_theta = residual.offset
    if residual.offset != gd.design.model.num_free_params - 1:  # pragma: no cover - build_design puts it last
        raise RuntimeError("the residual is not the model's last parameter")
    theta0 = np.zeros(n_theta)
    for t in structure.terms:
        theta0[t.offset : t.offset + t.size] = np.asarray(t.G.default_theta(1.0))
    residual_theta = float(np.asarray(residual.module.default_theta(1.0))[0])
    pattern = sparse_pattern(structure)
    dtype = jnp.float64 if jnp.zeros(()).dtype == jnp.float64 else jnp.float32
    problem = Problem(
        jnp.asarray(gd.y, dtype),
        jnp.asarray(gd.wt, dtype),
        jnp.zeros(len(gd.y), dtype),
        jnp.asarray(gd.design.X, dtype),
        structure,
        pattern,
        gd.family,
        n_theta,
        residual_theta,
    )
    return problem, theta0


def start_beta(problem: Problem) -> np.ndarray:
    """β from one weighted least-squares step of the GLM at R's ``mustart`` (no random effects)."""
    fam = problem.family
    y, wt, X = np.asarray(problem.y), np.asarray(problem.wt), np.asarray(problem.X)
    mu = np.asarray(fam.mu_start(problem.y, problem.wt))
    eta = np.asarray(fam.link(jnp.asarray(mu)))
    d_mu = np.asarray(fam.link.derivative(jnp.asarray(eta)))
    w = wt * d_mu**2 / np.asarray(fam.variance(jnp.asarray(mu)))
    z = eta + (y - mu) / d_mu
    sw = np.sqrt(w)
    beta, *_ = np.linalg.lstsq(X * sw[:, None], z * sw, rcond=None)
    return beta


def fit_glmm(gd: GLMMDesign, info=None, *, nAGQ: int = 1) -> GLMMResult:  # noqa: N803 - lme4's name
    """Fit the GLMM of ``gd`` by the Laplace approximation (``nAGQ=1``), its nAGQ = 0 stage alone, or adaptive
    Gauss–Hermite quadrature with nAGQ nodes (one scalar random term)."""
    if not isinstance(nAGQ, int | np.integer) or nAGQ < 0:
        raise ValueError(f"nAGQ must be a non-negative integer, got {nAGQ!r}")
    problem, theta0 = build_problem(gd)
    rule = None
    if nAGQ > 1:
        terms = problem.structure.terms
        if len(terms) != 1 or terms[0].block != 1:
            raise ValueError("nAGQ > 1 needs a single scalar random-effects term, as in lme4 (e.g. (1 | g))")
        rule = gauss_hermite(int(nAGQ))
    beta0 = start_beta(problem)
    first, second = optimise(problem, theta0, beta0, stages=1 if nAGQ == 0 else 2, rule=rule)
    q, k = problem.structure.q, problem.n_theta
    if second is None:
        theta, beta, u = first.params, first.x[q:], first.x[:q]
        stage, value = first, first.value
        hessian = None
    else:
        theta, beta, u = second.params[:k], second.params[k:], second.x
        stage, value = second, second.value
        second, hessian = newton_polish(problem, second, rule=rule)
        theta, beta, u = second.params[:k], second.params[k:], second.x
        stage, value = second, second.value
    return assemble(gd, info, problem, theta, beta, u, value, stage, first, hessian, nAGQ)


def _vcov_beta(hessian, k: int, p: int):
    """Var(β̂) = the β block of 2·H⁻¹ (H the Hessian of D in (θ, β)), as lme4's ``vcov`` with ``use.hessian``."""
    if hessian is None or not np.all(np.isfinite(hessian)):
        return None
    try:
        inverse = np.linalg.inv(0.5 * (hessian + hessian.T))
    except np.linalg.LinAlgError:
        return None
    return 2.0 * inverse[k:, k:]


def assemble(gd, info, problem, theta, beta, u, value, stage, first, hessian, nagq) -> GLMMResult:
    structure = problem.structure
    full = problem.full_theta(jnp.asarray(theta))
    lam = lams(full, structure)
    eta = linear_predictor(problem, lam, jnp.asarray(u), jnp.asarray(beta))
    mu = problem.family.link.inverse(eta)
    d_mu = problem.family.link.derivative(eta)
    w = problem.wt * d_mu**2 / problem.family.variance(mu)
    b = np.asarray(lam_times(lam, structure, jnp.asarray(u)[:, None])[:, 0])
    cond_var = np.asarray(conditional_variances(factorise(full, structure, None, w), structure))
    p, k = len(beta), len(theta)
    vcov = _vcov_beta(hessian, k, p)
    if vcov is None:  # the nAGQ = 0 fit, or a singular Hessian: the Fisher information of β at the mode
        from .equations import lam_t_z_t, solve_a

        wf = factorise(full, structure, None, w)
        X = problem.X
        cross = lam_t_z_t(lam, structure, w[:, None] * X)
        m = X.T @ (w[:, None] * X) - cross.T @ solve_a(wf, structure, cross)
        vcov = np.linalg.inv(np.asarray(0.5 * (m + m.T)))
    design = gd.design
    terms_by_offset = {t.offset: (i, t) for i, t in enumerate(structure.terms)}
    names_by_offset = {rt.offset: rt.name for rt in design.model.random_terms()}
    info_terms = {t.name: t for t in info.terms} if info is not None else {}
    components, ranef, at = [], {}, {}
    position = 0
    for t in structure.terms:
        at[t.offset] = position
        position += t.q
    for offset in sorted(terms_by_offset):
        index, t = terms_by_offset[offset]
        name = names_by_offset.get(offset, f"term{offset}")
        term_info = info_terms.get(name)
        labels = term_info.labels if term_info is not None else tuple(f"x{i}" for i in range(t.block))
        levels = term_info.levels if term_info is not None else tuple(str(i) for i in range(t.levels))
        block = np.asarray(jnp.broadcast_to(lam[index], (t.levels, t.block, t.block))[0])
        G = block @ block.T
        group = term_info.factors if term_info is not None else (name,)
        components.append(VarianceComponent(name, ":".join(group), labels, G))
        start = at[offset]
        modes = b[start : start + t.q].reshape(t.levels, t.block)
        sds = np.sqrt(np.maximum(cond_var[start : start + t.q], 0.0)).reshape(t.levels, t.block)
        frame = pd.DataFrame(modes, index=pd.Index(levels, name=name), columns=list(labels))
        for j, label in enumerate(labels):
            frame[f"sd({label})"] = sds[:, j]
        ranef[name] = frame
    loglik = -0.5 * value
    n = len(gd.y)
    n_par = p + k
    return GLMMResult(
        formula=design.formula.text.replace(_RESPONSE, gd.response, 1),
        family=problem.family.name,
        link=problem.family.link.name,
        nagq=nagq,
        beta=np.asarray(beta),
        beta_names=tuple(design.beta_names),
        vcov_beta=np.asarray(vcov),
        theta=np.asarray(theta),
        components=tuple(components),
        objective=float(value),
        deviance_residuals=float(jnp.sum(problem.family.unit_deviance(problem.y, mu, problem.wt))),
        loglik=float(loglik),
        aic=float(value + 2 * n_par),
        bic=float(value + n_par * np.log(n)),
        nobs=n,
        df_resid=n - n_par,
        n_dropped=gd.n_dropped,
        ranef=ranef,
        eta=np.asarray(eta),
        mu=np.asarray(mu),
        converged=bool(stage.success and stage.status == 0),
        message=stage.message,
        evaluations=int(stage.evaluations + (first.evaluations if stage is not first else 0)),
        fixed_spec=info.fixed_spec if info is not None else None,
        fixed_columns=info.fixed_columns if info is not None else None,
        info=info,
    )
