"""The fitting loop: one ``lax.while_loop`` with step-halving, bounds, an EM fallback and a fixed-size history.

Every iteration (i) computes a direction d from the score and the algorithm's information matrix (for AI and
Fisher scoring plus a secant estimate of the curvature they leave out, ``_secant_update``), with parameters held
at an active bound removed (a log-variance whose step ends below ``snap`` is held at its bound for the other
parameters' step, or moved along a variance-scale arc, see ``body``) and Levenberg–Marquardt damping where a
log-variance would move by more than ``MAX_LOG_STEP``; (ii) tries θ + η·2⁻ʲ·d,
j = 0, 1, …, ``max_halvings``−1, clipped to [lb, ub], accepting the first candidate whose V is positive definite
and whose log-likelihood does not decrease; (iii) if none is accepted and the model is a variance-component
model, tries one EM-REML step (always an ascent step); (iv) tests convergence, and stops a loop that no longer
makes progress (``IDLE_LIMIT``) or crawls (``CRAWL_WINDOW``, ``HALVED_STEP``). A variance stepping below ``snap``
(the singular threshold) is moved to its lower bound at once. Everything is traced once; under ``jax.vmap`` the loop
runs until every batch member is done.
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from .base import AbstractAlgorithm, em_direction, free_mask, projected_solve
from .results import RESULTS

RUNNING, CONVERGED, MAX_ITER, STALLED, INVALID_START = (int(r) for r in RESULTS if r != RESULTS.NONFINITE)
#: Largest change of a log-variance in one iteration (before the step length η).
MAX_LOG_STEP = 5.0
#: Largest step (−d) of a log-variance that is taken along the variance-scale arc (see ``run``).
MAX_ARC_STEP = 1024.0
#: Levenberg–Marquardt damping of the trust region (``run``): searched by bisection in log scale over this range of
#: λ (relative to the Jacobi-scaled information, whose diagonal is 1), this many halvings of the interval.
DAMPING_RANGE = (1e-10, 1e10)
DAMPING_BISECTIONS = 40
#: Accepted steps in a row that leave ℓ unchanged (within rounding) before the loop stops (``run``).
IDLE_LIMIT = 5
#: Iterations over which ℓ must gain at least tol_loglik, or the loop stops as it does without progress (``run``).
CRAWL_WINDOW = 10
#: AI or Fisher steps halved this many times or more throughout CRAWL_WINDOW iterations also end the loop (``run``).
HALVED_STEP = 8
#: The message of each code the loop ends with (``RESULTS``).
STATUS_MESSAGES = {code: RESULTS(code).message for code in (CONVERGED, MAX_ITER, STALLED, INVALID_START)}


class Evaluation(NamedTuple):
    ok: Bool[Array, ""]
    loglik: Float[Array, ""]
    beta: Float[Array, " p"]
    score: Float[Array, " k"]
    information: Float[Array, "k k"]


def evaluate(theta, y, X, model, *, reml, information, backend, state) -> Evaluation:
    """ℓ, β̂, score and information at θ by ``backend`` (an ``AbstractBackend``; ``state``: what its ``prepare``
    gave); score and information are zero where V is not PD."""
    c, d = backend.evaluate(theta, model, y, X, state, reml=reml, information=information)
    ok = c.ok & jnp.all(jnp.isfinite(d.score)) & jnp.all(jnp.isfinite(d.information))
    zero = jnp.zeros((), theta.dtype)
    return Evaluation(
        ok,
        jnp.where(ok, c.loglik, -jnp.inf),
        c.beta,
        jnp.where(ok, d.score, zero),
        jnp.where(ok, d.information, zero),
    )


class History(eqx.Module):
    """Per-iteration record, row 0 = the start; rows after ``n_iter`` are zero (fixed size inside jit).

    ``score_norm`` (the projected score's norm the convergence test uses) and ``tries`` (the step lengths tried,
    1 for a full step) are what ``verbose`` prints: it prints them from here after the fit, not from inside the
    program, so that ``verbose`` does not change the compiled program (see ``print_history``)."""

    theta: Float[Array, "m k"]
    beta: Float[Array, "m p"]
    loglik: Float[Array, " m"]
    score: Float[Array, "m k"]
    information: Float[Array, "m k k"]
    step: Float[Array, "m k"]
    step_length: Float[Array, " m"]
    score_norm: Float[Array, " m"]
    tries: Int[Array, " m"]

    def record(self, i, theta, ev: Evaluation, step, step_length, score_norm=0.0, tries=0) -> History:
        return History(
            self.theta.at[i].set(theta),
            self.beta.at[i].set(ev.beta),
            self.loglik.at[i].set(jnp.where(ev.ok, ev.loglik, 0.0)),
            self.score.at[i].set(ev.score),
            self.information.at[i].set(ev.information),
            self.step.at[i].set(step),
            self.step_length.at[i].set(step_length),
            self.score_norm.at[i].set(score_norm),
            self.tries.at[i].set(tries),
        )


def empty_history(rows: int, k: int, p: int, dtype) -> History:
    z = lambda *shape: jnp.zeros(shape, dtype)  # noqa: E731
    tries = jnp.zeros(rows, jnp.asarray(0).dtype)
    return History(z(rows, k), z(rows, p), z(rows), z(rows, k), z(rows, k, k), z(rows, k), z(rows), z(rows), tries)


#: Rows of the history of every fit with max_iter ≤ 200 (``history_rows``).
DEFAULT_HISTORY_ROWS = 201


def history_rows(max_iter: int) -> int:
    """Rows of the history a program is compiled for: ``DEFAULT_HISTORY_ROWS`` (201, that of ``estimate``'s
    default max_iter = 200) for max_iter ≤ 200, else the smallest power of two ≥ max_iter + 1.

    ``max_iter`` is a run-time value of the loop, but the history's size is part of the program: sizing it in
    buckets lets a new ``max_iter`` reuse the compiled program (any max_iter up to 200, and then each doubling,
    compiles one program), at most twice the default's memory; the default needs no trimming afterwards
    (``estimate`` returns exactly max_iter + 1 rows). At least CRAWL_WINDOW + 1 rows: the loop reads them back."""
    if max_iter + 1 <= DEFAULT_HISTORY_ROWS:
        return DEFAULT_HISTORY_ROWS
    return 1 << int(max_iter).bit_length()


class LoopResult(NamedTuple):
    theta: Float[Array, " k"]
    evaluation: Evaluation
    n_iter: Int[Array, ""]
    status: Int[Array, ""]
    history: History


def _print_iteration(verbose, max_iter, i, loglik, score_norm, step_norm, halvings):
    i = int(i)
    if verbose >= 2:
        if i == 1:
            print(f"{'iter':>5} {'loglik':>18} {'|score|':>11} {'|step|':>11} {'halvings':>8}")
        print(f"{i:5d} {float(loglik):18.10f} {float(score_norm):11.3e} {float(step_norm):11.3e} {int(halvings):8d}")
    else:
        # A counter, not a bar: the number of iterations is not known ahead (a bar scaled to max_iter sat near
        # empty at convergence). torch_openreml's verbose=1 shows "Iter i" likewise.
        print(f"\rIter {i:4d} (max_iter {max_iter}) loglik {float(loglik):.8f} |score| {float(score_norm):.2e}", end="")


def print_history(history: History, n_iter: int, verbose: int, max_iter: int) -> None:
    """``verbose``'s lines for the iterations 1..n_iter of a finished fit, from its history.

    Printed after the fit rather than from inside the loop: a host callback in the program would make ``verbose``
    part of the program (a new compilation for each setting), and JAX (0.10) writes no persistent-cache entry for
    a program with a host callback. The cost: no live progress while a long fit runs. verbose=1 prints the
    counter's last state, verbose=2 the table."""
    if verbose <= 0 or n_iter <= 0:
        return
    loglik, score_norm = np.asarray(history.loglik), np.asarray(history.score_norm)
    step, tries = np.asarray(history.step), np.asarray(history.tries)
    rows = range(1, n_iter + 1) if verbose >= 2 else (n_iter,)
    for i in rows:
        step_norm = float(np.max(np.abs(step[i]), initial=0.0))
        _print_iteration(verbose, max_iter, i, loglik[i], score_norm[i], step_norm, tries[i])


def _augmented(information, secant, use_secant, free):
    """information + S on the free parameters when the last step chose the augmented model and it is positive
    definite there (its Jacobi-scaled eigenvalues above 1e-8 of the largest), else the information itself."""
    both = free[:, None] & free[None, :]
    augmented = information + jnp.where(both, secant, 0.0)
    trial = jnp.where(both, augmented, jnp.eye(free.shape[0], dtype=information.dtype))
    diag = jnp.diagonal(trial)
    scale = jnp.sqrt(jnp.where(diag > 0, diag, 1.0))
    eigenvalues = jnp.linalg.eigvalsh(trial / scale[:, None] / scale[None, :])
    definite = jnp.all(diag > 0) & (eigenvalues[0] > 1e-8 * eigenvalues[-1])
    return jnp.where(use_secant & definite, augmented, information)


def _secant_update(secant, use_secant, step, ev, new_ev, clean):
    """The structured secant estimate S of −∂²ℓ/∂θ∂θᵀ − information after a step s, and which model (the
    information alone, or information + S) predicted the step's gain in ℓ better (used for the next step).

    The average and the expected information leave out Σ_k (∂ℓ/∂φ_k)·∂²φ_k/∂θ∂θᵀ, the curvature of a nonlinear
    parametrization φ(θ) (a log-Cholesky factor, a correlation): zero where V is linear in θ and the natural
    parameters' score vanishes, large at a singular fit, where a covariance matrix sits on the boundary of the
    positive semidefinite cone with a non-zero score (AI-REML then converges linearly and stalls). S is updated
    as in NL2SOL (Dennis, Gay & Welsch 1981, ACM TOMS 7(3), 348–368): with y = −(s₁ − s₀) the change of the
    gradient of −ℓ and y# = y − I₁·s, S is sized by min(1, |sᵀy#| / |sᵀSs|) and then
        S ← S + (r yᵀ + y rᵀ)/(yᵀs) − (rᵀs)·y yᵀ/(yᵀs)²,   r = y# − S s,
    the symmetric update closest to S with (I₁ + S)·s = y; skipped unless yᵀs > √ε·‖y‖‖s‖. The model for the
    next step is the one whose predicted gain sᵀs₀ − ½sᵀMs was closer to the actual one (NL2SOL's rule).
    """
    dtype = step.dtype
    y = -(new_ev.score - ev.score)
    y = jnp.where(step != 0.0, y, 0.0)
    ys = y @ step
    sharp = y - jnp.where(step != 0.0, new_ev.information @ step, 0.0)
    s_secant_s = step @ secant @ step
    size = jnp.where(jnp.abs(s_secant_s) > 0.0, jnp.minimum(1.0, jnp.abs(step @ sharp) / jnp.abs(s_secant_s)), 1.0)
    sized = size * secant
    r = sharp - sized @ step
    safe_ys = jnp.where(ys > 0.0, ys, 1.0)
    update = (jnp.outer(r, y) + jnp.outer(y, r)) / safe_ys - (r @ step) * jnp.outer(y, y) / safe_ys**2
    curved = ys > jnp.sqrt(jnp.finfo(dtype).eps) * jnp.linalg.norm(y) * jnp.linalg.norm(step)
    new_secant = jnp.where(clean & curved, sized + update, secant)
    gain = new_ev.loglik - ev.loglik
    predicted = ev.score @ step - 0.5 * step @ ev.information @ step
    better = jnp.abs(gain - (predicted - 0.5 * s_secant_s)) <= jnp.abs(gain - predicted)
    new_use = jnp.where(clean & jnp.any(step != 0.0), better, use_secant)
    return new_secant, new_use


def run(
    model,
    y,
    X,
    theta0,
    lb,
    ub,
    snap,
    log_scale: Bool[Array, " k"],
    powers: Float[Array, " k"],
    tolerances: Float[Array, " 3"],
    eta: Float[Array, ""],
    *,
    reml: bool,
    algorithm: AbstractAlgorithm,
    backend,
    state,
    max_iter: Int[Array, ""],
    max_halvings: Int[Array, ""],
    checks: tuple[bool, bool, bool],
    min_iter: Int[Array, ""],
    em_plan,
    history_rows: int,
) -> LoopResult:
    """``backend``: the ``AbstractBackend`` that evaluates the model, ``state`` what its ``prepare`` gave.
    ``powers``: p with variance = e^{p·θ} for each log-scale parameter (1 for a log-variance, 2 for a log standard
    deviation or a log-Cholesky diagonal; 1 elsewhere). ``max_iter``, ``max_halvings``, ``min_iter`` are run-time
    values (changing them compiles nothing new); ``history_rows`` (≥ max_iter + 1, ``history_rows()``) is the
    history's compiled size."""
    ev_kwargs = dict(reml=reml, information=algorithm.information, backend=backend, state=state)
    k, p = theta0.shape[0], X.shape[1]
    dtype = theta0.dtype
    tol_score, tol_delta, tol_loglik = tolerances[0], tolerances[1], tolerances[2]
    use_em_fallback = em_plan is not None and not algorithm.em_steps
    last_try = max_halvings + (1 if use_em_fallback else 0)

    theta0 = jnp.clip(theta0, lb, ub)
    ev0 = evaluate(theta0, y, X, model, **ev_kwargs)
    history = empty_history(history_rows, k, p, dtype).record(0, theta0, ev0, jnp.zeros(k, dtype), 0.0)
    status0 = jnp.where(ev0.ok, RUNNING, INVALID_START)

    def cond(state):
        return (state[3] == RUNNING) & (max_iter > 0)

    def body(state):
        i, theta, ev, status, history, secant, use_secant, idle = state
        free = free_mask(theta, ev.score, lb, ub)
        information = ev.information
        if algorithm.secant:
            information = _augmented(information, secant, use_secant, free)
        no = jnp.zeros_like(free)
        if algorithm.em_steps:
            direction, hold, arc = em_direction(theta, ev.score, free, em_plan), no, no
            capped = log_scale
        else:
            solve = lambda mask: algorithm.directions(theta, ev.score, information, mask)(0.0)  # noqa: E731
            # A log-variance whose step ends below the singular threshold ``snap``: its information vanishes
            # with the variance, so its step is huge, and left as it is (in the trust region below) it shrinks
            # every other parameter's step to nothing: a fit stuck for max_iter iterations at, or next to, a
            # singular optimum (e.g. a correlation of ±1).
            # Held (projected Newton): one at its bound already (below the threshold), then one whose score
            # pushes it down as well, goes to its bound (``snap`` in ``try_body``), and the other parameters
            # take the step of the problem with it held there. Those at the bound go first: their
            # near-singular rows would distort everybody else's step.
            direction = solve(free)
            hold = log_scale & free & (theta <= snap) & (direction < 0)
            direction = jnp.where(hold, direction, solve(free & ~hold))
            crossing = log_scale & free & ~hold & (direction < 0) & (theta + direction < snap)
            hold = hold | (crossing & (ev.score <= 0))
            rest = free & ~hold
            damped = algorithm.directions(theta, ev.score, information, rest)  # λ ↦ step, one eigendecomposition
            direction = jnp.where(hold, direction, damped(0.0))
            # Arc: one whose score pushes it up (the step comes from its coupling to the others) moves in the
            # variance scale, e^{pθ}·(1 + p·η·d), projected onto its bound where that is not positive: tangent to
            # the step (an ascent for a short enough η), outside the trust region. Only where step-halving
            # soon reaches η·|d| < 1: a longer step comes from an ill-conditioned information, and the trust
            # region takes it.
            arc = log_scale & free & ~hold & (direction < 0) & (theta + direction < snap) & (direction > -MAX_ARC_STEP)
            # Rise: one at or below the threshold whose step goes up moves in the variance scale too. Its log-scale
            # step is the variance-scale Newton step divided by a variance near 0, so the trust region would let
            # it climb back from its bound by only MAX_LOG_STEP per iteration (six iterations of InstEval's
            # fit, whose first step sent a small variance to its bound).
            arc = arc | (log_scale & free & ~hold & (theta <= snap) & (direction > 0))
            capped = log_scale & ~hold & ~arc
            # Trust region on log-variances: a variance changes by at most a factor e^MAX_LOG_STEP per iteration.
            # A log-variance near 0 has a tiny information and a huge Newton step. The step of the others is
            # damped (Levenberg–Marquardt) until the longest capped one fits: a uniform shrink of the whole step
            # instead would freeze every well-determined parameter (a residual variance with a large score stuck
            # beside a random-effect variance on its way to 0), and the arc's steps must be damped with the
            # others, or the combined step need not ascend.
            longest = lambda d: jnp.max(jnp.where(capped, jnp.abs(d), 0.0), initial=0.0)  # noqa: E731

            def bisect(_, interval):
                lo, hi = interval
                mid = jnp.sqrt(lo * hi)
                too_long = longest(damped(mid)) > MAX_LOG_STEP
                return jnp.where(too_long, mid, lo), jnp.where(too_long, hi, mid)

            needs_damping = longest(direction) > MAX_LOG_STEP
            interval = (jnp.asarray(DAMPING_RANGE[0], dtype), jnp.asarray(DAMPING_RANGE[1], dtype))
            damping = jnp.where(needs_damping, jax.lax.fori_loop(0, DAMPING_BISECTIONS, bisect, interval)[1], 0.0)
            direction = jnp.where(hold, direction, damped(damping))
        # What the damping left too long (or EM's step) is shrunk as a whole: still an ascent direction.
        longest_capped = jnp.max(jnp.where(capped, jnp.abs(direction), 0.0), initial=0.0)
        shrink = jnp.minimum(1.0, MAX_LOG_STEP / jnp.maximum(longest_capped, MAX_LOG_STEP))
        direction = jnp.where(hold, direction, direction * shrink)
        em_step = em_direction(theta, ev.score, free, em_plan) if use_em_fallback else None
        # Only rounding-level decreases are accepted: a looser tolerance lets an over-long step cycle.
        accept_tol = 4.0 * jnp.finfo(dtype).eps * (1.0 + jnp.abs(ev.loglik))

        def try_cond(carry):
            j, _, _, accepted, _ = carry
            return ~accepted & (j < last_try)

        def try_body(carry):
            j, _, _, _, _ = carry
            length = eta * jnp.exp2(-j.astype(dtype))
            step = length * direction
            # variance e^{pθ} ← e^{pθ}·(1 + p·step): θ ← θ + log(1 + p·step)/p
            arc_step = jnp.log(jnp.maximum(1.0 + powers * step, jnp.finfo(dtype).tiny)) / powers
            step = jnp.where(arc, arc_step, step)
            if use_em_fallback:
                step = jnp.where(j < max_halvings, step, em_step)
                length = jnp.where(j < max_halvings, length, 0.0)
            candidate = theta + step
            # A variance heading below the singular threshold goes straight to its bound: in log scale the
            # boundary is at −∞ and Newton would otherwise creep towards it one unit per iteration.
            candidate = jnp.where((candidate < snap) & (step < 0), lb, candidate)
            candidate = jnp.clip(candidate, lb, ub)
            cand_ev = evaluate(candidate, y, X, model, **ev_kwargs)
            accepted = cand_ev.ok & (cand_ev.loglik >= ev.loglik - accept_tol)
            return j + 1, candidate, cand_ev, accepted, length

        init = (jnp.asarray(0), theta, ev, jnp.asarray(False), jnp.zeros((), dtype))
        halvings, cand_theta, cand_ev, accepted, length = jax.lax.while_loop(try_cond, try_body, init)
        new_theta = jnp.where(accepted, cand_theta, theta)
        new_ev = jax.tree.map(lambda a, b: jnp.where(accepted, a, b), cand_ev, ev)

        i = i + 1
        step = new_theta - theta
        if algorithm.secant:
            # Only steps of the parameters the model's direction moved (none held, snapped or clipped to a bound)
            # are secant pairs of that model.
            modelled = rest & ~arc & (new_theta > lb) & (new_theta < ub)
            clean = accepted & jnp.all(jnp.where(modelled, True, step == 0.0))
            secant, use_secant = _secant_update(secant, use_secant, jnp.where(modelled, step, 0.0), ev, new_ev, clean)
        projected = jnp.where(free_mask(new_theta, new_ev.score, lb, ub), new_ev.score, 0.0)
        score_norm = jnp.linalg.norm(projected)
        step_norm = jnp.max(jnp.abs(step)) if k else jnp.zeros((), dtype)
        # Floors at the dtype's rounding level (as the spectral path's): in float32 the default tolerances lie below
        # it and fits ran to max_iter; in float64 the floors are below the defaults for |ℓ| < 10⁴.
        noise = jnp.finfo(dtype).eps * (1.0 + jnp.abs(new_ev.loglik))
        score_tol = jnp.maximum(tol_score, 64.0 * noise)
        score_ok = (score_norm < score_tol) | (not checks[0])
        delta_ok = (step_norm < jnp.maximum(tol_delta, jnp.sqrt(jnp.finfo(dtype).eps))) | (not checks[1])
        loglik_ok = (jnp.abs(new_ev.loglik - ev.loglik) < jnp.maximum(tol_loglik, 8.0 * noise)) | (not checks[2])
        any_check = checks[0] or checks[1] or checks[2]
        converged = (i >= min_iter) & score_ok & delta_ok & loglik_ok & any_check
        # Accepted steps that leave ℓ unchanged (within rounding) IDLE_LIMIT times in a row are no progress either:
        # at a singular fit, the score of a parameter whose effect is scaled by a variance at its bound can stay
        # above tol_score while its steps, and those of a log-variance whose rounding-level score flips sign at
        # the bound, go back and forth (the loop ran to max_iter there).
        flat = jnp.abs(new_ev.loglik - ev.loglik) <= 8.0 * noise
        idle = jnp.where(accepted & flat, idle + 1, 0)
        # A crawl: ℓ gained less than tol_loglik over the last CRAWL_WINDOW iterations, whose steps are accepted but
        # the score and step tests still fail: along a ridge that is flat in one direction (a log-Cholesky column
        # below a zero diagonal is redundant with the columns after it) AI and Newton took 100-300 such iterations
        # (singular_slopes3 y5: 1e-11 per iteration). It ends like a loop without progress: converged where the
        # score test or the quadratic model says ℓ is at its optimum, else stalled, for estimate's second tries.
        # Not for EM, whose slow linear convergence is its nature, not a sign of a bad model of ℓ.
        window_start = history.loglik[jnp.maximum(i - CRAWL_WINDOW, 0)]
        crawling = (i >= CRAWL_WINDOW) & (new_ev.loglik - window_start < jnp.maximum(tol_loglik, 8.0 * noise))
        crawling = crawling & (not algorithm.em_steps)
        if algorithm.approximate_curvature:
            # Or the information is a poor model of ℓ's curvature: every step of the window (and this one) was halved
            # HALVED_STEP times or more (singular_slopes3 y34: 2⁻⁸–2⁻¹⁵ for 120 AI iterations). Newton, which has
            # that curvature, continues (``newton_fallback``).
            lengths = jax.lax.dynamic_slice_in_dim(history.step_length, jnp.maximum(i - CRAWL_WINDOW, 0), CRAWL_WINDOW)
            short = jnp.exp2(-float(HALVED_STEP)) * eta
            halved = (i > CRAWL_WINDOW) & jnp.all(lengths <= short) & (length <= short)
            crawling = crawling | (halved & (max_iter > CRAWL_WINDOW))
        progress = accepted & (((idle < IDLE_LIMIT) & ~crawling) | (i < min_iter))
        # Nothing improves ℓ any more: converged if the score test (when on) says we are at the optimum, or the
        # gain in ℓ that the quadratic model predicts, ½ sᵀI⁻¹s, is below tol_loglik.
        at_optimum = score_norm < score_tol
        if algorithm.information != "none":
            free_new = free_mask(new_theta, new_ev.score, lb, ub)
            newton = projected_solve(new_ev.information, new_ev.score, free_new, absolute=True)
            at_optimum = at_optimum | (0.5 * projected @ newton < jnp.maximum(tol_loglik, 8.0 * noise))
        stalled_at_optimum = ~progress & (i >= min_iter) & at_optimum & checks[0]
        status = jnp.where(
            converged | stalled_at_optimum,
            CONVERGED,
            jnp.where(~progress, STALLED, jnp.where(i >= max_iter, MAX_ITER, RUNNING)),
        )
        history = history.record(i, new_theta, new_ev, step, jnp.where(accepted, length, 0.0), score_norm, halvings)
        return i, new_theta, new_ev, status, history, secant, use_secant, idle

    secant0 = (jnp.zeros((k, k), dtype), jnp.asarray(False))
    state = (jnp.asarray(0), theta0, ev0, status0, history, *secant0, jnp.asarray(0))
    state = jax.lax.while_loop(cond, body, state)
    i, theta, ev, status, history, _, _, _ = state
    status = jnp.where(status == RUNNING, MAX_ITER, status)
    return LoopResult(theta, ev, i, status, history)
