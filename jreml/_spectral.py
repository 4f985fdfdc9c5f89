"""Spectral fast path for V = σ²_k·K + σ²_e·I (one known kernel plus an iid residual).

K is eigendecomposed once, K = U diag(λ) Uᵀ. Rotating the data (ỹ = Uᵀy, X̃ = UᵀX) makes V diagonal,
d = σ²_k·λ + σ²_e, so each log-likelihood evaluation costs O(n·p²) instead of O(n³):

    ℓ_REML = −½[Σ log d + log|X̃ᵀD⁻¹X̃| + (n−p)·log 2π + r̃ᵀD⁻¹r̃]   (lme4's convention, as ``estimate``)

The fit is an AI-REML iteration on θ (the model's own unconstrained parameters: σ² = exp(power·θ)) inside one
``lax.while_loop`` with step-halving, an active set at the lower bounds and the same start, bounds and singular
threshold as :func:`jreml.estimate`; it is written for one response and ``jax.vmap``-ed over responses.

Kernels recognised (one of them plus a ``ScalarMatrix`` residual, in either order): ``FixedMatrix(K)``,
``ScalarMatrix`` (a second iid term), and ``CovariancePropagation(Z, G)`` with a parameter-free Z (a
``DummyMatrix`` or a fixed array) and G a ``FixedMatrix`` or ``ScalarMatrix`` (kernel Z·K_G·Zᵀ, e.g.
K[codes][:, codes]).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from ._config import as_float_array
from ._covariance.base import AbstractCovariance
from ._covariance.basic import FixedMatrix, ScalarMatrix
from ._covariance.compose import CovariancePropagation, Sum
from ._covariance.transforms import Exp
from ._estimate import BOUNDARY_RELATIVE_VARIANCE, SINGULAR_RELATIVE_VARIANCE, _pseudo_inverse
from ._likelihood import check_method
from ._solvers.loop import CONVERGED, MAX_ITER, MAX_LOG_STEP, RUNNING, STALLED

__all__ = ["SpectralForm", "SpectralFit", "spectral_form", "decompose", "fit_spectral", "fit_rotated"]


class SpectralForm(NamedTuple):
    """A model V = σ²_k·K + σ²_e·I: the kernel, θ positions of the two variances and their transform powers."""

    kernel: np.ndarray
    kernel_index: int
    residual_index: int
    powers: tuple[float, float]  # (kernel, residual)
    param_names: tuple[str, ...]


class SpectralDesign(NamedTuple):
    """The eigendecomposition of a kernel and the rotated fixed design (computed once, reused for all y)."""

    form: SpectralForm
    U: np.ndarray
    lam: np.ndarray
    Xt: np.ndarray
    base_theta: np.ndarray  # model.default_theta(1): θ for unit variances (start/bounds shift by log(scale)/power)


def _exp_power(module) -> float | None:
    transform = getattr(module, "transform", None)
    return float(transform.power) if isinstance(transform, Exp) else None


def _kernel_term(term: AbstractCovariance) -> float | None:
    """The transform power of a one-variance linear term σ²·K (None if the term is not of that form)."""
    if isinstance(term, FixedMatrix | ScalarMatrix):
        return _exp_power(term)
    if isinstance(term, CovariancePropagation) and term.Z.num_free_params == 0:
        if isinstance(term.G, FixedMatrix | ScalarMatrix):
            return _exp_power(term.G)
    return None


def spectral_form(model: AbstractCovariance) -> SpectralForm | None:
    """Return the :class:`SpectralForm` of ``model`` if it is σ²_k·K + σ²_e·I, else ``None``."""
    if not isinstance(model, Sum) or len(model.terms) != 2:
        return None
    if any(t.num_free_params != 1 for t in model.terms):
        return None
    for e_index in (1, 0):
        k_index = 1 - e_index
        resid, term = model.terms[e_index], model.terms[k_index]
        if not isinstance(resid, ScalarMatrix):
            continue
        p_e, p_k = _exp_power(resid), _kernel_term(term)
        if p_e is None or p_k is None:
            continue
        kernel = np.asarray(term(jnp.zeros((1,), jnp.result_type(float))), dtype=float)
        return SpectralForm(kernel, k_index, e_index, (p_k, p_e), model.param_names)
    return None


def decompose(model: AbstractCovariance, X) -> SpectralDesign:
    """Eigendecompose the model's kernel (once) and rotate X. Raises if the model is not spectral."""
    form = spectral_form(model)
    if form is None:
        raise ValueError("the model is not of the form sigma2_k * K + sigma2_e * I (one kernel + ScalarMatrix)")
    K = 0.5 * (form.kernel + form.kernel.T)
    lam, U = np.linalg.eigh(K)
    lam = np.maximum(lam, 0.0)  # a PSD kernel's rounding-level negative eigenvalues
    X = np.asarray(X, dtype=float)
    base = np.asarray(model.default_theta(jnp.asarray(1.0)), dtype=float)
    return SpectralDesign(form, U, lam, U.T @ X, base)


#: Up to this many fixed effects the p×p Cholesky factor and solves are unrolled into elementwise operations
#: (batched LAPACK calls on tiny matrices dominate the cost of a vmapped fit on CPU).
SMALL_P = 6


def _cholesky(C):
    p = C.shape[0]
    if p > SMALL_P:
        return jnp.linalg.cholesky(C)
    L = [[None] * p for _ in range(p)]
    for j in range(p):
        diag = C[j, j] - sum((L[j][m] ** 2 for m in range(j)), jnp.zeros((), C.dtype))
        L[j][j] = jnp.sqrt(diag)
        for i in range(j + 1, p):
            off = C[i, j] - sum((L[i][m] * L[j][m] for m in range(j)), jnp.zeros((), C.dtype))
            L[i][j] = off / L[j][j]
    zero = jnp.zeros((), C.dtype)
    return jnp.stack([jnp.stack([L[i][j] if j <= i else zero for j in range(p)]) for i in range(p)])


def _cho_solve(L, b):
    """Solve (L Lᵀ) x = b for b of shape (p,) or (p, m)."""
    p = L.shape[0]
    if p > SMALL_P:
        return jax.scipy.linalg.cho_solve((L, True), b)
    z = []
    for i in range(p):
        acc = b[i] - sum((L[i, m] * z[m] for m in range(i)), jnp.zeros_like(b[i]))
        z.append(acc / L[i, i])
    x = [None] * p
    for i in reversed(range(p)):
        acc = z[i] - sum((L[m, i] * x[m] for m in range(i + 1, p)), jnp.zeros_like(b[i]))
        x[i] = acc / L[i, i]
    return jnp.stack(x)


class SpectralFit(eqx.Module):
    """Result of :func:`fit_spectral` (every leaf gains a leading batch axis when fitted to many responses)."""

    theta: Float[Array, " k"]
    natural_params: Float[Array, " k"]
    beta: Float[Array, " p"]
    vcov_beta: Float[Array, "p p"]
    se_beta: Float[Array, " p"]
    loglik: Float[Array, ""]
    converged: Bool[Array, ""]
    n_iter: Int[Array, ""]
    status: Int[Array, ""]
    singular: Bool[Array, ""]
    at_boundary: Bool[Array, " k"]
    score: Float[Array, " k"]
    information: Float[Array, "k k"]
    vcov_theta: Float[Array, "k k"]
    h2: Float[Array, ""]
    h2_se: Float[Array, ""]
    param_names: tuple[str, ...] = eqx.field(static=True)
    method: str = eqx.field(static=True, default="reml")

    @property
    def params(self) -> dict[str, Float[Array, "..."]]:
        return {name: self.natural_params[..., i] for i, name in enumerate(self.param_names)}


class _Eval(NamedTuple):
    loglik: Array
    beta: Array
    chol_c: Array
    w: Array
    p_y: Array
    ok: Array


class _Options(eqx.Module):
    """Static options of the compiled loop."""

    k_index: int = eqx.field(static=True)
    e_index: int = eqx.field(static=True)
    powers: tuple[float, float] = eqx.field(static=True)
    reml: bool = eqx.field(static=True)
    max_iter: int = eqx.field(static=True)
    max_halvings: int = eqx.field(static=True)
    min_iter: int = eqx.field(static=True)


def _variances(theta, opts: _Options):
    s2k = jnp.exp(opts.powers[0] * theta[opts.k_index])
    s2e = jnp.exp(opts.powers[1] * theta[opts.e_index])
    return s2k, s2e


def _diag(theta, lam, opts):
    s2k, s2e = _variances(theta, opts)
    return s2k * lam + s2e


def _evaluate(theta, yt, Xt, lam, opts: _Options) -> _Eval:
    n, p = Xt.shape
    d = _diag(theta, lam, opts)
    ok = jnp.all(d > 0) & jnp.all(jnp.isfinite(d))
    d_safe = jnp.where(ok, d, 1.0)
    w = 1.0 / d_safe
    wx = Xt * w[:, None]
    C = Xt.T @ wx
    chol_c = _cholesky(C)
    beta = _cho_solve(chol_c, wx.T @ yt)
    r = yt - Xt @ beta
    p_y = w * r
    quad = r @ p_y
    if opts.reml:
        loglik = -0.5 * (
            jnp.sum(jnp.log(d_safe))
            + 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol_c)))
            + (n - p) * math.log(2 * math.pi)
            + quad
        )
    else:
        loglik = -0.5 * (jnp.sum(jnp.log(d_safe)) + n * math.log(2 * math.pi) + quad)
    ok = ok & jnp.isfinite(loglik)
    return _Eval(jnp.where(ok, loglik, -jnp.inf), beta, chol_c, w, p_y, ok)


def _loglik(theta, yt, Xt, lam, opts):
    return _evaluate(theta, yt, Xt, lam, opts).loglik


def _score_and_ai(theta, yt, Xt, lam, opts: _Options, ev: _Eval):
    """Score (autodiff) and average information ½ (V_i P y)ᵀ P (V_j P y) in the rotated basis."""
    score = jax.grad(lambda t: _evaluate(t, yt, Xt, lam, opts).loglik)(theta)
    dd = jax.jacfwd(_diag)(theta, lam, opts)  # (n, k): ∂d/∂θ_j
    u = dd * ev.p_y[:, None]  # columns V_j P y
    wu = u * ev.w[:, None]
    if opts.reml:
        xtwu = Xt.T @ wu
        proj = _cho_solve(ev.chol_c, xtwu)
        pu = wu - (Xt * ev.w[:, None]) @ proj
    else:
        pu = wu
    ai = 0.5 * (u.T @ pu)
    ai = 0.5 * (ai + ai.T)
    ok = ev.ok & jnp.all(jnp.isfinite(score)) & jnp.all(jnp.isfinite(ai))
    return jnp.where(ok, score, 0.0), jnp.where(ok, ai, 0.0)


def _direction(score, ai, free):
    k = score.shape[0]
    both = free[:, None] & free[None, :]
    eye = jnp.eye(k, dtype=score.dtype)
    a = jnp.where(both, ai, eye)
    s = jnp.where(free, score, 0.0)
    scale = jnp.sqrt(jnp.maximum(jnp.diagonal(a), jnp.finfo(a.dtype).tiny))
    a_scaled = a / scale[:, None] / scale[None, :]
    g = s / scale
    if k == 2:  # closed form (unit diagonal): eigenvalues 1 ± r, floored as in the general case
        r = jnp.clip(a_scaled[0, 1], -1.0, 1.0)
        det = jnp.maximum(1.0 - r * r, 1e-10 * (1.0 + jnp.abs(r)))
        step = jnp.stack([g[0] - r * g[1], g[1] - r * g[0]]) / det / scale
    else:
        vals, vecs = jnp.linalg.eigh(a_scaled)
        top = jnp.max(jnp.abs(vals))
        vals = jnp.maximum(vals, 1e-10 * top + jnp.finfo(a.dtype).tiny)
        step = (vecs @ ((vecs.T @ g) / vals)) / scale
    step = jnp.where(free, step, 0.0)
    longest = jnp.max(jnp.abs(step))
    step = step * jnp.minimum(1.0, MAX_LOG_STEP / jnp.maximum(longest, MAX_LOG_STEP))
    return jnp.where(jnp.all(jnp.isfinite(step)), step, 0.0)


class _State(NamedTuple):
    theta: Array
    ev: _Eval
    score: Array
    ai: Array
    n_iter: Array
    status: Array


def _fit_one(yt, Xt, lam, base_theta, tol, opts: _Options):
    """AI-REML for one rotated response; returns a :class:`SpectralFit` (without param_names)."""
    n, p = Xt.shape
    dtype = yt.dtype
    beta_ols = _cho_solve(_cholesky(Xt.T @ Xt), Xt.T @ yt)
    resid = yt - Xt @ beta_ols
    scale = resid @ resid / (n - p)
    scale = jnp.where(scale > 0, scale, 1.0)
    powers = jnp.zeros_like(base_theta)
    powers = powers.at[opts.k_index].set(opts.powers[0]).at[opts.e_index].set(opts.powers[1])
    theta0 = base_theta + jnp.log(scale) / powers
    lb = base_theta + jnp.log(scale * BOUNDARY_RELATIVE_VARIANCE) / powers
    snap = base_theta + jnp.log(scale * SINGULAR_RELATIVE_VARIANCE) / powers
    tol_score, tol_delta, tol_loglik = tol[0], tol[1], tol[2]
    rounding = 4 * jnp.finfo(dtype).eps

    def derivs(theta, ev):
        return _score_and_ai(theta, yt, Xt, lam, opts, ev)

    ev0 = _evaluate(theta0, yt, Xt, lam, opts)
    s0, a0 = derivs(theta0, ev0)
    init = _State(theta0, ev0, s0, a0, jnp.asarray(0), jnp.where(ev0.ok, RUNNING, STALLED))

    def cond(st: _State):
        return st.status == RUNNING

    def body(st: _State):
        free = ~((st.theta <= lb) & (st.score < 0))
        step = _direction(st.score, st.ai, free)
        ll = st.ev.loglik

        def candidate(length):
            cand = jnp.maximum(st.theta + step * length, lb)
            return jnp.where(cand < snap, lb, cand)

        def h_cond(carry):
            j, _, accepted = carry
            return (~accepted) & (j < opts.max_halvings)

        def h_body(carry):
            j, length, _ = carry
            ll_c = _loglik(candidate(length), yt, Xt, lam, opts)
            accepted = ll_c >= ll - rounding * (1.0 + jnp.abs(ll))
            return j + 1, jnp.where(accepted, length, 0.5 * length), accepted

        start = (jnp.asarray(0), jnp.asarray(1.0, dtype), jnp.asarray(False))
        _, length, accepted = jax.lax.while_loop(h_cond, h_body, start)
        new_theta = jnp.where(accepted, candidate(length), st.theta)
        ev = _evaluate(new_theta, yt, Xt, lam, opts)
        score, ai = derivs(new_theta, ev)
        n_iter = st.n_iter + 1
        new_free = ~((new_theta <= lb) & (score < 0))
        score_ok = jnp.sqrt(jnp.sum(jnp.where(new_free, score, 0.0) ** 2)) < tol_score
        delta_ok = jnp.max(jnp.abs(new_theta - st.theta)) < tol_delta
        loglik_ok = jnp.abs(ev.loglik - ll) < tol_loglik
        done = score_ok & delta_ok & loglik_ok & (n_iter >= opts.min_iter)
        status = jnp.where(done, CONVERGED, RUNNING)
        status = jnp.where(~done & ~accepted, jnp.where(score_ok, CONVERGED, STALLED), status)
        status = jnp.where((status == RUNNING) & (n_iter >= opts.max_iter), MAX_ITER, status)
        return _State(new_theta, ev, score, ai, n_iter, status)

    st = jax.lax.while_loop(cond, body, init)
    theta, ev = st.theta, st.ev
    eye = jnp.eye(p, dtype=dtype)
    chol_inv = jax.scipy.linalg.solve_triangular(ev.chol_c, eye, lower=True)
    vcov_beta = chol_inv.T @ chol_inv
    information = jnp.where(ev.ok, st.ai, 0.0)
    vcov_theta = _pseudo_inverse(information)
    s2k, s2e = _variances(theta, opts)
    natural = jnp.zeros_like(theta).at[opts.k_index].set(s2k).at[opts.e_index].set(s2e)

    def h2_of(t):
        a, b = _variances(t, opts)
        return a / (a + b)

    h2 = h2_of(theta)
    g = jax.grad(h2_of)(theta)
    h2_se = jnp.sqrt(jnp.maximum(g @ vcov_theta @ g, 0.0))
    at_boundary = theta <= jnp.maximum(snap, lb)
    return dict(
        theta=theta,
        natural_params=natural,
        beta=ev.beta,
        vcov_beta=vcov_beta,
        se_beta=jnp.sqrt(jnp.diagonal(vcov_beta)),
        loglik=ev.loglik,
        converged=st.status == CONVERGED,
        n_iter=st.n_iter,
        status=st.status,
        singular=jnp.any(at_boundary),
        at_boundary=at_boundary,
        score=st.score,
        information=information,
        vcov_theta=vcov_theta,
        h2=h2,
        h2_se=h2_se,
    )


@eqx.filter_jit
def _fit_batch_jit(Yt, Xt, lam, base_theta, tol, opts):
    return jax.vmap(lambda yt: _fit_one(yt, Xt, lam, base_theta, tol, opts))(Yt)


def _options(form: SpectralForm, method: str, max_iter: int, max_halvings: int, min_iter: int) -> _Options:
    return _Options(
        form.kernel_index,
        form.residual_index,
        form.powers,
        check_method(method),
        int(max_iter),
        int(max_halvings),
        int(min_iter),
    )


def fit_rotated(
    design: SpectralDesign,
    Yt,
    *,
    method: str = "reml",
    max_iter: int = 200,
    max_halvings: int = 30,
    min_iter: int = 1,
    tol_score: float = 1e-8,
    tol_delta: float = 1e-6,
    tol_loglik: float = 1e-10,
    place=None,
) -> SpectralFit:
    """Fit already-rotated responses ``Yt`` (T, n) (rows Uᵀy). ``place`` optionally shards the arrays."""
    Yt = as_float_array(Yt, "Yt")
    if Yt.ndim != 2:
        raise ValueError(f"Yt must be 2-D (batch, n), got shape {Yt.shape}")
    if place is not None:
        Yt = place(Yt)
    dtype = Yt.dtype
    opts = _options(design.form, method, max_iter, max_halvings, min_iter)
    tol = jnp.asarray([tol_score, tol_delta, tol_loglik], dtype)
    out = _fit_batch_jit(
        Yt,
        jnp.asarray(design.Xt, dtype),
        jnp.asarray(design.lam, dtype),
        jnp.asarray(design.base_theta, dtype),
        tol,
        opts,
    )
    return SpectralFit(**out, param_names=design.form.param_names, method="reml" if opts.reml else "ml")


def rotate(design: SpectralDesign, Y) -> np.ndarray:
    """Rotate responses: ``Y`` (T, n) or (n,) → rows Uᵀy (T, n)."""
    Y = np.atleast_2d(np.asarray(Y, dtype=float))
    return Y @ design.U


def fit_spectral(model: AbstractCovariance, Y, X=None, *, design: SpectralDesign | None = None, **options):
    """Fit V = σ²_k·K + σ²_e·I to one response (n,) or many (T, n) by the spectral AI-REML iteration.

    Returns a :class:`SpectralFit`; with a 2-D ``Y`` every leaf has a leading batch axis. ``options``:
    ``method`` ("reml"/"ml"), ``max_iter``, ``max_halvings``, ``min_iter``, ``tol_score``, ``tol_delta``,
    ``tol_loglik``.
    """
    Y = np.asarray(Y, dtype=float)
    single = Y.ndim == 1
    Y2 = np.atleast_2d(Y)
    n = Y2.shape[1]
    if X is None:
        X = np.ones((n, 1))
    if design is None:
        design = decompose(model, X)
    if not np.all(np.isfinite(Y2)):
        raise ValueError("Y has non-finite values; fit_batch fits responses with missing values on their rows")
    out = fit_rotated(design, rotate(design, Y2), **options)
    if single:
        out = jax.tree_util.tree_map(lambda a: a[0], out)
    return out
