"""Spectral fast path for V = σ²_k·K + σ²_e·I (one known kernel plus an iid residual).

K is eigendecomposed once, K = U diag(λ) Uᵀ. Rotating the data (ỹ = Uᵀy, X̃ = UᵀX) makes V diagonal,
d = σ²_k·λ + σ²_e, so each log-likelihood evaluation costs O(n·p²) instead of O(n³):

    ℓ_REML = −½[Σ log d + log|X̃ᵀD⁻¹X̃| + (n−p)·log 2π + r̃ᵀD⁻¹r̃]   (lme4's convention, as ``estimate``)

σ²_e is profiled out (σ²_e = Q/(n−p), FaST-LMM/GEMMA style) and the fit is a Newton iteration on the single
τ = log(σ²_k/σ²_e) inside one ``lax.while_loop``: exact first and second derivatives of the 1-D profiled
log-likelihood, step-halving, and the bounds / singular threshold of :func:`jreml.estimate` (a step towards σ²_k → 0
that Newton on δ puts past the threshold goes straight to the bound). Each step costs three weighted n-sums. The
profiled curve can be bimodal (a mode at σ²_k → 0 and a narrow interior one), so Newton starts at the best point of a
fine grid of τ (scaled to K's eigenvalues, evaluated for all responses at once) and, in the same loop, runs again
from the best other mode of the grid on either side, if any; the highest end point is kept. At the optimum the
variances, β, the log-likelihood, the full two-parameter average information (for ``vcov_theta``) and the h²
delta-method SE are computed as before. It is written for one response and ``jax.vmap``-ed over responses; every
response converges in a few iterations (a few more for the rare bimodal one), so a vmapped chunk is not held up by a
slow one.

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

from .._config import as_float_array
from .._covariance.base import AbstractCovariance
from .._covariance.queries import SpectralForm, spectral_form
from .._likelihood import check_method
from .._solvers.base import pseudo_inverse
from .._solvers.defaults import BOUNDARY_RELATIVE_VARIANCE, DEFAULTS, SINGULAR_RELATIVE_VARIANCE
from .._solvers.loop import CONVERGED, MAX_ITER, RUNNING, STALLED
from .select import spectral_options

__all__ = ["SpectralForm", "SpectralSolution", "spectral_form", "decompose", "fit_rotated", "fit_padded", "rotate"]


class SpectralDesign(NamedTuple):
    """The eigendecomposition of a kernel and the rotated fixed design (computed once, reused for all y)."""

    form: SpectralForm
    U: np.ndarray | None  # None once the responses are rotated (fit_batch's compact designs)
    lam: np.ndarray
    Xt: np.ndarray
    base_theta: np.ndarray  # model.default_theta(1): θ for unit variances (start/bounds shift by log(scale)/power)


def decompose(model: AbstractCovariance, X, form: SpectralForm | None = None) -> SpectralDesign:
    """Eigendecompose the model's kernel (once) and rotate X. Raises if the model is not spectral. ``form``: the
    model's ``spectral_form`` where the caller has it already (it builds the n×n kernel)."""
    form = spectral_form(model) if form is None else form
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


class SpectralSolution(eqx.Module):
    """What the spectral loop returns for a chunk of responses (every leaf with a leading batch axis); the batch
    engine copies it into ``BatchFit`` / ``BootstrapResult``, ``jreml.fit_spectral`` into ``FitResult``s."""

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


def _evaluate(theta, yt, Xt, lam, opts: _Options, n_obs=None) -> _Eval:
    """ℓ, β̂, Py at θ. ``n_obs``: the response's number of observations when its arrays are padded (with zeros: λ,
    X̃ rows, ỹ) to a common length; the padding contributes nothing then."""
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
    log_d = jnp.log(d_safe)
    if n_obs is not None:
        log_d = jnp.where(jnp.arange(n, dtype=n_obs.dtype) < n_obs, log_d, 0.0)
        n = n_obs
    if opts.reml:
        loglik = -0.5 * (
            jnp.sum(log_d) + 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol_c))) + (n - p) * math.log(2 * math.pi) + quad
        )
    else:
        loglik = -0.5 * (jnp.sum(log_d) + n * math.log(2 * math.pi) + quad)
    ok = ok & jnp.isfinite(loglik)
    return _Eval(jnp.where(ok, loglik, -jnp.inf), beta, chol_c, w, p_y, ok)


def _loglik(theta, yt, Xt, lam, opts):
    return _evaluate(theta, yt, Xt, lam, opts).loglik


def _score_and_ai(theta, yt, Xt, lam, opts: _Options, ev: _Eval, n_obs=None):
    """Score (autodiff) and average information ½ (V_i P y)ᵀ P (V_j P y) in the rotated basis."""
    score = jax.grad(lambda t: _evaluate(t, yt, Xt, lam, opts, n_obs).loglik)(theta)
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


#: The fit iterates on τ = log δ, δ = σ²_k/σ²_e, with σ²_e profiled out. τ is kept in [−LOG_RATIO_BOUND,
#: LOG_RATIO_SNAP]. Below, σ²_k at BOUNDARY_RELATIVE_VARIANCE·σ²_e; a step that crosses −LOG_RATIO_SNAP
#: (SINGULAR_RELATIVE_VARIANCE) goes straight to that bound, as ``estimate``'s ``snap`` does. Above, σ²_e is held
#: at SINGULAR_RELATIVE_VARIANCE·σ²_k: when X has a component in K's null space (a centred kinship and an
#: intercept) the weighted normal equations lose all precision as σ²_e → 0, and the REML surface is flat there
#: to rounding, so σ²_e is not driven further down (the fit is reported singular).
LOG_RATIO_BOUND = -math.log(BOUNDARY_RELATIVE_VARIANCE)
LOG_RATIO_SNAP = -math.log(SINGULAR_RELATIVE_VARIANCE)
#: Start grid: START_POINTS values of log δ evenly spaced from START_MARGIN below −log λ_max to START_MARGIN above
#: −log λ_min (λ_min: the smallest eigenvalue above START_RELATIVE_EIGENVALUE·λ_max), clipped to the bounds, and
#: the two bounds; evaluated for all responses at once (the weights are shared). The profiled log-likelihood changes
#: shape only where δ·λ_i ~ 1 for some eigenvalue (each eigenvalue's terms vary with log δ on a scale of about 1);
#: beyond that range it is a smooth function of δ (or 1/δ) near 0 that Newton follows from the grid's end. The
#: curve can be bimodal (an interior mode and one at σ²_k → 0, or at σ²_e → 0), with modes as narrow as ~0.5 in
#: log δ, so the grid is fine (spacing ≈ 0.15 for a kinship) and Newton runs from up to three starts: the best grid
#: point and, on each side of it, the best grid point that a dip separates from it (see ``_starts``).
START_POINTS = 128
START_MARGIN = 6.0
START_RELATIVE_EIGENVALUE = 1e-8
#: Longest Newton step on log δ.
MAX_RATIO_STEP = 3.0


def _forward(L, b):
    """Solve L z = b (L lower triangular, b of shape (p,) or (p, m))."""
    p = L.shape[0]
    if p > SMALL_P:
        return jax.scipy.linalg.solve_triangular(L, b, lower=True)
    z = []
    for i in range(p):
        acc = b[i] - sum((L[i, m] * z[m] for m in range(i)), jnp.zeros_like(b[i]))
        z.append(acc / L[i, i])
    return jnp.stack(z)


def _profiled(C, b, yy, sld, n, p: int, reml: bool):
    """Profiled log-likelihood (σ²_e = Q/(n−p), or Q/n for ML) from the D⁻¹-weighted moments, and Q."""
    L = _cholesky(C)
    z = _forward(L, b)
    Q = yy - z @ z
    Q_ok = Q > 0
    Q_safe = jnp.where(Q_ok, Q, 1.0)
    if reml:
        m = n - p
        f = -0.5 * (
            m * (jnp.log(Q_safe / m) + 1.0 + math.log(2 * math.pi)) + sld + 2.0 * jnp.sum(jnp.log(jnp.diagonal(L)))
        )
    else:
        f = -0.5 * (n * (jnp.log(Q_safe / n) + 1.0 + math.log(2 * math.pi)) + sld)
    f = jnp.where(Q_ok & jnp.isfinite(f), f, -jnp.inf)
    return f, Q


class _Moments(NamedTuple):
    """Per-response data of the profiled fit: OLS residual r̃, X̃·r̃ (n, p) and r̃²; shared X̃ outer products."""

    Xr: Array
    r2: Array
    XX: Array
    lam: Array


def _jet(tau, mom: _Moments, n, p: int, reml: bool):
    """Profiled log-likelihood at log δ = ``tau`` with its first two derivatives (exact).

    With w = 1/(δλ + 1) and v = δλ·w = 1 − w: dw/dτ = −w·v, d²w/dτ² = −w·v·(w − v); d log d/dτ = v,
    d² log d/dτ² = w·v. The weighted moments and their derivatives are three n-sums; the p×p part is
    differentiated by forward-mode autodiff of its second-order Taylor expansion in τ.
    """
    delta = jnp.exp(tau)
    dl = delta * mom.lam
    w = 1.0 / (dl + 1.0)
    v = dl * w
    w1 = -w * v
    w2 = w1 * (w - v)
    Wk = jnp.stack([w, w1, w2])  # (3, n)
    C = jnp.einsum("kn,nab->kab", Wk, mom.XX)
    b = Wk @ mom.Xr
    yy = Wk @ mom.r2
    sld = jnp.stack([jnp.sum(jnp.log1p(dl)), jnp.sum(v), jnp.sum(w * v)])

    def h(s):
        c = 0.5 * s * s
        return _profiled(
            C[0] + s * C[1] + c * C[2],
            b[0] + s * b[1] + c * b[2],
            yy[0] + s * yy[1] + c * yy[2],
            sld[0] + s * sld[1] + c * sld[2],
            n,
            p,
            reml,
        )[0]

    zero, one = jnp.zeros((), tau.dtype), jnp.ones((), tau.dtype)
    (f, g), (_, hh) = jax.jvp(lambda s: jax.jvp(h, (s,), (one,)), (zero,), (one,))
    ok = jnp.isfinite(f) & jnp.isfinite(g) & jnp.isfinite(hh)
    return jnp.where(ok, f, -jnp.inf), jnp.where(ok, g, 0.0), jnp.where(ok, hh, 0.0)


class _State(NamedTuple):
    tau: Array
    f: Array
    g: Array
    h: Array
    length: Array  # step-length factor (halved after a rejected step)
    it: Array  # iterations of the current run
    status: Array  # of the current run
    k: Array  # the current run's start (an index into the starts; len(starts) once the last run has ended)
    n_iter: Array  # iterations of all runs
    best_tau: Array  # the best ended run so far
    best_f: Array
    best_status: Array


#: A grid point is a separate mode when it is higher, by this many ulps of the log-likelihood, than the lowest grid
#: point between it and the best one (and a run from another start must beat the first by as much to replace it).
DIP_TOLERANCE = 1e4


def _start_grid(lam, lo, hi):
    """The log δ of the start grid (START_POINTS + 2 points, increasing) for the kernel eigenvalues ``lam``."""
    lam_max = jnp.max(lam)
    lam_max = jnp.where(lam_max > 0, lam_max, 1.0)
    lam_min = jnp.min(jnp.where(lam > START_RELATIVE_EIGENVALUE * lam_max, lam, lam_max))
    a = jnp.clip(-jnp.log(lam_max) - START_MARGIN, lo, hi)
    b = jnp.clip(-jnp.log(lam_min) + START_MARGIN, lo, hi)
    inner = a + (b - a) * jnp.linspace(0.0, 1.0, START_POINTS, dtype=lam.dtype)
    return jnp.concatenate([jnp.asarray([lo], lam.dtype), inner, jnp.asarray([hi], lam.dtype)])


def _starts(f):
    """Three Newton starts on a grid of profiled log-likelihoods ``f``: the best point and, on each side of it, the
    best point higher (by DIP_TOLERANCE ulps) than the lowest point between the two, i.e. the best other mode on that
    side. Returns their indices and whether each is one (the best point's index where there is none)."""
    i = jnp.argmax(f)
    idx = jnp.arange(f.shape[0])
    inf = jnp.asarray(jnp.inf, f.dtype)
    # lowest point between the best one and each point (both included)
    valley_right = jax.lax.cummin(jnp.where(idx >= i, f, inf))
    valley_left = jax.lax.cummin(jnp.where(idx <= i, f, inf), reverse=True)
    tol = DIP_TOLERANCE * jnp.finfo(f.dtype).eps * (1.0 + jnp.abs(f[i]))
    right = (idx > i) & (f > valley_right + tol)
    left = (idx < i) & (f > valley_left + tol)

    def best(mask):
        return jnp.where(jnp.any(mask), jnp.argmax(jnp.where(mask, f, -inf)), i)

    left_i, right_i = best(left), best(right)
    return jnp.stack([i, left_i, right_i]), jnp.stack([jnp.asarray(True), jnp.any(left), jnp.any(right)])


def _fit_one(yt, Xt, lam, base_theta, tol, opts: _Options, n_obs=None):
    """Profiled Newton fit on log(σ²_k/σ²_e) for one rotated response; then the full AI at the optimum.

    ``n_obs``: the number of observations when ``yt``, ``Xt`` and ``lam`` are padded with zeros to a common length
    (responses with different missing rows in one program); the padding then changes nothing. Returns the
    :class:`SpectralSolution` fields (without param_names) as a dict.
    """
    n, p = Xt.shape
    if n_obs is not None:
        n = n_obs
    dtype = yt.dtype
    beta_ols = _cho_solve(_cholesky(Xt.T @ Xt), Xt.T @ yt)
    r0 = yt - Xt @ beta_ols  # Q is unchanged by removing any X·c from y; this keeps it free of cancellation
    scale = r0 @ r0 / (n - p)
    scale = jnp.where(scale > 0, scale, 1.0)
    powers = jnp.zeros_like(base_theta)
    powers = powers.at[opts.k_index].set(opts.powers[0]).at[opts.e_index].set(opts.powers[1])
    lb = base_theta + jnp.log(scale * BOUNDARY_RELATIVE_VARIANCE) / powers
    snap = base_theta + jnp.log(scale * SINGULAR_RELATIVE_VARIANCE) / powers
    tol_score, tol_delta, tol_loglik = tol[0], tol[1], tol[2]
    rounding = 4 * jnp.finfo(dtype).eps
    lo, hi = -LOG_RATIO_BOUND, LOG_RATIO_SNAP
    mom = _Moments(Xt * r0[:, None], r0 * r0, Xt[:, :, None] * Xt[:, None, :], lam)

    def jet(tau):
        return _jet(tau, mom, n, p, opts.reml)

    # starts: the best point of the grid and the best other mode on each side (the grid's weights and X moments
    # are shared by all responses)
    grid = _start_grid(lam, lo, hi)
    dl = jnp.exp(grid)[:, None] * lam[None, :]
    Wg = 1.0 / (dl + 1.0)
    f_grid, _ = jax.vmap(lambda C, b, yy, sld: _profiled(C, b, yy, sld, n, p, opts.reml))(
        jnp.einsum("gn,nab->gab", Wg, mom.XX), Wg @ mom.Xr, Wg @ mom.r2, jnp.sum(jnp.log1p(dl), axis=1)
    )
    f_grid = jnp.where(jnp.isnan(f_grid), -jnp.inf, f_grid)
    starts, valid = _starts(f_grid)
    tau_starts = grid[starts]
    n_starts = tau_starts.shape[0]
    one = jnp.ones((), dtype)
    zero_i = jnp.asarray(0)
    tau0 = tau_starts[0]
    f0, g0, h0 = jet(tau0)
    status0 = jnp.where(jnp.isfinite(f0), RUNNING, STALLED)
    init = _State(tau0, f0, g0, h0, one, zero_i, status0, zero_i, zero_i, tau0, -jnp.inf * one, status0)

    def end_run(st: _State) -> _State:
        """Fold a run that has just ended into the best one (which a later run replaces only if clearly higher:
        among equal modes the first start's is kept) and move on to the next start that is a separate mode."""
        best_f = jnp.where(jnp.isfinite(st.best_f), st.best_f, -jnp.inf)
        margin = jnp.where(jnp.isfinite(best_f), DIP_TOLERANCE * jnp.finfo(dtype).eps * (1.0 + jnp.abs(best_f)), 0.0)
        better = (st.k == 0) | (st.f > best_f + margin)
        later = valid & (jnp.arange(n_starts) > st.k)
        return st._replace(
            k=jnp.where(jnp.any(later), jnp.argmax(later), n_starts),
            best_tau=jnp.where(better, st.tau, st.best_tau),
            best_f=jnp.where(better, st.f, st.best_f),
            best_status=jnp.where(better, st.status, st.best_status),
        )

    def free_gradient(tau, g):
        held = ((tau <= lo) & (g < 0)) | ((tau >= hi) & (g > 0))
        return jnp.where(held, 0.0, g)

    def cond(st: _State):
        return (st.status == RUNNING) | (st.k < n_starts)

    def body(st: _State):
        # a run that has ended (the loop goes on for another start): this iteration evaluates that start
        fresh = st.status != RUNNING
        tau, g, h = st.tau, st.g, st.h
        newton = jnp.where(h < 0, -g / jnp.where(h < 0, h, -1.0), jnp.sign(g) * MAX_RATIO_STEP)
        step = jnp.clip(newton, -MAX_RATIO_STEP, MAX_RATIO_STEP)
        cand = tau + st.length * step
        cand = jnp.where((cand < -LOG_RATIO_SNAP) & (step < 0), lo, cand)
        # A variance heading to 0 is approached only linearly by Newton on log δ; Newton on δ (or on 1/δ) shows
        # whether the optimum lies beyond the singular threshold: then try the bound at once.
        first = st.length == 1.0
        c_lo, c_hi = h - g, h + g  # d²ℓ/dδ²·δ², d²ℓ/dε²·ε² (ε = 1/δ)
        to_lo = (g < 0) & (c_lo < 0) & (1.0 - g / jnp.where(c_lo < 0, c_lo, -1.0) <= jnp.exp(-LOG_RATIO_SNAP - tau))
        to_hi = (g > 0) & (c_hi < 0) & (1.0 + g / jnp.where(c_hi < 0, c_hi, -1.0) <= jnp.exp(tau - LOG_RATIO_SNAP))
        cand = jnp.where(first & to_lo, lo, jnp.where(first & to_hi, hi, cand))
        cand = jnp.clip(cand, lo, hi)
        cand = jnp.where(fresh, tau_starts[jnp.minimum(st.k, n_starts - 1)], cand)
        f_c, g_c, h_c = jet(cand)
        accepted = fresh | (f_c >= st.f - rounding * (1.0 + jnp.abs(st.f)))
        new = st._replace(
            tau=jnp.where(accepted, cand, tau),
            f=jnp.where(accepted, f_c, st.f),
            g=jnp.where(accepted, g_c, g),
            h=jnp.where(accepted, h_c, h),
            length=jnp.where(accepted, one, 0.5 * st.length),
            it=jnp.where(fresh, 0, st.it + 1),
            n_iter=st.n_iter + 1,
        )
        # Floors at the dtype's rounding level: in float32 tolerances of 1e-8 or 1e-10 lie below
        # it and fits ran to max_iter; in float64 the floors are below the defaults for |ℓ| < 10⁴.
        noise = jnp.finfo(dtype).eps * (1.0 + jnp.abs(f_c))
        score_ok = jnp.abs(free_gradient(new.tau, new.g)) < jnp.maximum(tol_score, 64.0 * noise)
        delta_ok = jnp.abs(cand - tau) < jnp.maximum(tol_delta, jnp.sqrt(jnp.finfo(dtype).eps))
        loglik_ok = jnp.abs(f_c - st.f) < jnp.maximum(tol_loglik, 8.0 * noise)
        done = accepted & score_ok & delta_ok & loglik_ok & (new.it >= opts.min_iter)
        status = jnp.where(done, CONVERGED, RUNNING)
        gave_up = ~accepted & (new.length < 0.5**opts.max_halvings)
        status = jnp.where(gave_up, jnp.where(score_ok, CONVERGED, STALLED), status)
        status = jnp.where((status == RUNNING) & (new.it >= opts.max_iter), MAX_ITER, status)
        status = jnp.where(fresh, jnp.where(jnp.isfinite(f_c), RUNNING, STALLED), status)
        new = new._replace(status=status)
        return jax.lax.cond(status != RUNNING, end_run, lambda s: s, new)

    init = jax.lax.cond(init.status != RUNNING, end_run, lambda s: s, init)
    st = jax.lax.while_loop(cond, body, init)
    st = st._replace(tau=st.best_tau, f=st.best_f, status=st.best_status)
    # the variances at the optimum: σ²_e = Q/(n − p) (Q/n for ML), σ²_k = δ·σ²_e; a variance at its bound is set
    # to ``estimate``'s bound; then the full two-parameter evaluation, score and average information
    delta = jnp.exp(st.tau)
    wf = 1.0 / (delta * lam + 1.0)
    _, Q = _profiled(
        Xt.T @ (Xt * wf[:, None]), Xt.T @ (wf * r0), wf @ mom.r2, jnp.sum(jnp.log1p(delta * lam)), n, p, opts.reml
    )
    s2e = jnp.maximum(Q, jnp.finfo(dtype).tiny) / ((n - p) if opts.reml else n)
    s2k = delta * s2e
    log_var = jnp.zeros_like(base_theta).at[opts.k_index].set(jnp.log(s2k)).at[opts.e_index].set(jnp.log(s2e))
    theta = jnp.maximum(log_var / powers, lb)  # σ² = exp(power·θ), as in _variances
    at_lo = jnp.zeros_like(theta, bool).at[opts.k_index].set(st.tau <= lo)
    at_hi = jnp.zeros_like(theta, bool).at[opts.e_index].set(st.tau >= hi)
    theta = jnp.where(at_lo, lb, theta)  # σ²_k held at its bound: exactly ``estimate``'s bound
    theta = jnp.where(jnp.isfinite(st.f), theta, base_theta + jnp.log(scale) / powers)
    ev = _evaluate(theta, yt, Xt, lam, opts, n_obs)
    score, ai = _score_and_ai(theta, yt, Xt, lam, opts, ev, n_obs)
    eye = jnp.eye(p, dtype=dtype)
    chol_inv = jax.scipy.linalg.solve_triangular(ev.chol_c, eye, lower=True)
    vcov_beta = chol_inv.T @ chol_inv
    information = jnp.where(ev.ok, ai, 0.0)
    vcov_theta = pseudo_inverse(information)
    s2k, s2e = _variances(theta, opts)
    natural = jnp.zeros_like(theta).at[opts.k_index].set(s2k).at[opts.e_index].set(s2e)

    def h2_of(t):
        a, b = _variances(t, opts)
        return a / (a + b)

    h2 = h2_of(theta)
    g = jax.grad(h2_of)(theta)
    h2_se = jnp.sqrt(jnp.maximum(g @ vcov_theta @ g, 0.0))
    at_boundary = (theta <= jnp.maximum(snap, lb)) | at_hi
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
        score=score,
        information=information,
        vcov_theta=vcov_theta,
        h2=h2,
        h2_se=h2_se,
    )


@eqx.filter_jit
def _fit_batch_jit(Yt, Xt, lam, base_theta, tol, opts):
    return jax.vmap(lambda yt: _fit_one(yt, Xt, lam, base_theta, tol, opts))(Yt)


#: Programs traced by ``_fit_padded_jit`` (a test counts them: one per padded length, whatever the missingness).
PADDED_TRACES = [0]


@eqx.filter_jit
def _fit_padded_jit(Yt, Xt, lam, base_theta, n_obs, tol, opts):
    PADDED_TRACES[0] += 1
    return jax.vmap(lambda *a: _fit_one(*a[:4], tol, opts, a[4]))(Yt, Xt, lam, base_theta, n_obs)


def _settings(form: SpectralForm, dtype, *, method: str = "reml", **options) -> tuple[_Options, Array]:
    """The loop's static options and its tolerances (score, step, log-likelihood): the options of ``fit_rotated``
    and ``fit_padded``, with ``estimate``'s defaults (``_solvers.defaults.DEFAULTS``); options the spectral fit does
    not have are accepted at the values it matches (``select.spectral_options``)."""
    settings = DEFAULTS._replace(**spectral_options(options))
    opts = _Options(
        form.kernel_index,
        form.residual_index,
        form.powers,
        check_method(method),
        int(settings.max_iter),
        int(settings.max_halvings),
        int(settings.min_iter),
    )
    return opts, jnp.asarray([settings.tol_score, settings.tol_delta, settings.tol_loglik], dtype)


def fit_rotated(design: SpectralDesign, Yt, *, place=None, **options) -> SpectralSolution:
    """Fit already-rotated responses ``Yt`` (T, n) (rows Uᵀy). ``place`` optionally shards the arrays; ``options``:
    ``method``, ``max_iter``, ``max_halvings``, ``min_iter``, ``tol_score``, ``tol_delta``, ``tol_loglik``."""
    Yt = as_float_array(Yt, "Yt")
    if Yt.ndim != 2:
        raise ValueError(f"Yt must be 2-D (batch, n), got shape {Yt.shape}")
    if place is not None:
        Yt = place(Yt)
    dtype = Yt.dtype
    opts, tol = _settings(design.form, dtype, **options)
    out = _fit_batch_jit(
        Yt,
        jnp.asarray(design.Xt, dtype),
        jnp.asarray(design.lam, dtype),
        jnp.asarray(design.base_theta, dtype),
        tol,
        opts,
    )
    return SpectralSolution(**out, param_names=design.form.param_names, method="reml" if opts.reml else "ml")


def fit_padded(designs: list[SpectralDesign], Yt, *, place=None, **options) -> SpectralSolution:
    """Fit rotated responses of different designs in one program: ``Yt`` (T, N) holds response t's rotated values
    Uᵀy of ``designs[t]`` (n_t ≤ N observations) followed by zeros. Each design's λ and X̃ are padded with zeros to
    N as well; the likelihood counts the first n_t entries only, so every fit equals the one of ``fit_rotated``
    with its own design, while all missingness patterns share one compiled program per N. ``options`` as for
    ``fit_rotated``."""
    Yt = as_float_array(Yt, "Yt")
    T, N = Yt.shape
    if len(designs) != T or any(d.lam.shape[0] > N for d in designs):
        raise ValueError(f"fit_padded needs one design per response with at most {N} observations")
    forms = {(d.form.kernel_index, d.form.residual_index, d.form.powers, d.form.param_names) for d in designs}
    if len(forms) != 1:
        raise ValueError("fit_padded: the designs must share one model form (positions, transforms and names)")
    dtype = Yt.dtype
    p = designs[0].Xt.shape[1]
    Xt = np.zeros((T, N, p))
    lam = np.zeros((T, N))
    for t, d in enumerate(designs):
        Xt[t, : d.lam.shape[0]] = d.Xt
        lam[t, : d.lam.shape[0]] = d.lam
    arrays = [
        Yt,
        jnp.asarray(Xt, dtype),
        jnp.asarray(lam, dtype),
        jnp.asarray(np.stack([d.base_theta for d in designs]), dtype),
        jnp.asarray([d.lam.shape[0] for d in designs], dtype),  # a float count: n − p enters float arithmetic
    ]
    if place is not None:
        arrays = [place(a) for a in arrays]
    opts, tol = _settings(designs[0].form, dtype, **options)
    out = _fit_padded_jit(*arrays, tol, opts)
    return SpectralSolution(**out, param_names=designs[0].form.param_names, method="reml" if opts.reml else "ml")


def rotate(design: SpectralDesign, Y) -> np.ndarray:
    """Rotate responses: ``Y`` (T, n) or (n,) → rows Uᵀy (T, n)."""
    Y = np.atleast_2d(np.asarray(Y, dtype=float))
    return Y @ design.U


def spectral_solve(model: AbstractCovariance, Y, X=None, *, design: SpectralDesign | None = None, **options):
    """Fit V = σ²_k·K + σ²_e·I to one response (n,) or many (T, n) by the spectral iteration: the back end's own
    record (:class:`SpectralSolution`; with a 2-D ``Y`` every leaf has a leading batch axis). ``jreml.fit_spectral``
    returns the same fits as ``FitResult``s. ``options``: ``method`` ("reml"/"ml"), ``max_iter``,
    ``max_halvings``, ``min_iter``, ``tol_score``, ``tol_delta``, ``tol_loglik``.
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


def transformed_residuals(design: SpectralDesign, solution: SpectralSolution, Y) -> np.ndarray:
    """Py = V̂⁻¹(y − Xβ̂) (T, n) in the data's basis: U·diag(1/(σ²_k·λ + σ²_e))·Uᵀ(y − Xβ̂), per response."""
    form = design.form
    params = np.atleast_2d(np.asarray(solution.natural_params))
    beta = np.atleast_2d(np.asarray(solution.beta))
    rotated = rotate(design, Y) - beta @ design.Xt.T
    d = params[:, [form.kernel_index]] * design.lam[None, :] + params[:, [form.residual_index]]
    return (rotated / d) @ design.U.T
