"""``REML``: torch_openreml's ``REML`` object interface, a thin layer over :func:`jreml.estimate`.

The calls follow torch_openreml's documentation (the "Introduction to REML Estimation" vignette,
``docs/source/vig/vig_reml.rst`` of github.com/anu-aagi/torch-openreml, and the ``REML`` class of
torch_openreml 0.1.0a0 on PyPI): ``optimize(y, X, theta)`` returns ``(theta_hat, beta_hat, n_iter)``;
``blue``, ``loglik``, ``marginal_predict``, ``marginal_residual`` take ``(y, X, theta)``; ``blup``, ``predict``,
``residual`` take ``(y, X, Z, theta, map_theta_to_g=None, mask_theta_to_g=None)`` (the vignette's later revision
passes G as ``g=``, accepted too); ``history`` is a dict of per-iteration lists. Here every argument of those
methods may be left out: y and X default to the data of the last ``optimize``, θ to its estimate, so
``reml.blue()`` is β̂ of the fit.

.. important::
   **Log-likelihood convention.** ``REML.loglik`` (like every log-likelihood in jreml) follows lme4's
   ``logLik``: it *includes* the constant −(n−p)/2·log 2π. torch_openreml omits that constant, so its values
   are larger by (n−p)/2·log 2π. Example, the ``john_alpha`` trial (n = 72, p = 3): torch_openreml reports
   16.8099, jreml and lme4 report −46.5969 (= 16.8099 − 34.5·log 2π). ``REML.loglik_without_constant``
   gives the torch_openreml number. Estimates (θ̂, β̂, BLUPs) do not depend on the constant.

The facade adds no numerics of its own: :meth:`REML.optimize` calls :func:`jreml.estimate` (REML, average
information, one compiled ``lax.while_loop``), available afterwards as ``REML.result`` (a
:class:`jreml.FitResult`); the methods evaluate V(θ) at the θ they are given with the likelihood's own
factorisation (one compiled call per method and shape).
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from ._backends.dense.likelihood import core
from ._config import as_float_array
from ._covariance.base import AbstractCovariance
from ._covariance.queries import is_covariance
from ._entry import estimate
from ._result.random_effects import random_effects as _random_effects

SELECT = ("last", "best")


@eqx.filter_jit
def _gls(v, y, X, theta, reml: bool):
    """(β̂, P y, ℓ) at θ from one factorisation of V(θ) (``v``: a covariance module or a function θ ↦ V)."""
    c = core(theta, y, X, v, reml)
    return c.beta, c.p_y, c.loglik


@eqx.filter_jit
def _module_random_effects(model, y, X, theta, reml: bool):
    """({term name: û}, Xβ̂ + Σ Z û) at θ for a covariance module's Z·G·Zᵀ terms."""
    c = core(theta, y, X, model, reml)
    blups, fitted, _ = _random_effects(model, theta, c.p_y, X, c.beta, y)
    return blups, fitted


def _response(y):
    y = as_float_array(y, "y")
    return y[:, 0] if y.ndim == 2 and y.shape[1] == 1 else y


def _design(Z, n: int):
    """Z as a dense (n, q) array; a jreml module without parameters (``DummyMatrix``) is called first."""
    if is_covariance(Z):
        if Z.num_free_params:
            raise ValueError(f"Z must be a matrix or a module without parameters, got {type(Z).__name__}")
        Z = Z(jnp.zeros((0,)))
    Z = as_float_array(Z, "Z")
    if Z.ndim != 2 or Z.shape[0] != n:
        raise ValueError(f"Z must be a design matrix with {n} rows (one per observation), got shape {Z.shape}")
    return Z


def _select(theta, mask, g_of=None):
    """θ_G = the entries of θ that ``mask_theta_to_g`` picks (a boolean mask or integer indices); all of θ
    without a mask (torch_openreml passes the whole θ to ``map_theta_to_g`` then), except that a covariance
    module G with fewer parameters than θ gets θ's leading ``G.num_free_params`` entries (torch_openreml's later
    ``g=`` argument: "g receives the same flat parameter vector θ as v", e.g. ``g=ScalarMatrix(2)`` for the
    first term of ``Sum(CovariancePropagation(Z, ScalarMatrix(2)), ScalarMatrix(n))``)."""
    if mask is None:
        if is_covariance(g_of) and 0 < g_of.num_free_params < theta.shape[0]:
            return theta[: g_of.num_free_params]
        return theta
    mask = np.asarray(mask)
    if mask.dtype == bool:
        if mask.shape != theta.shape:
            raise ValueError(f"mask_theta_to_g has shape {mask.shape}, theta has shape {theta.shape}")
        return theta[np.flatnonzero(mask)]
    if not np.issubdtype(mask.dtype, np.integer) or mask.ndim != 1:
        raise ValueError("mask_theta_to_g must be a boolean mask or a 1-D integer index array")
    return theta[mask]


class REML:
    """REML fit of y ~ N(Xβ, V(θ)) with torch_openreml's ``REML`` interface (see the module docstring; the
    log-likelihood is **lme4's, including −(n−p)/2·log 2π**; torch_openreml omits it).

    Args:
        map_theta_to_v: a pure JAX function θ (k,) ↦ V (n, n). Used when ``v_builder`` is not given; a covariance
            module given here is taken as ``v_builder`` (``REML(V)``, torch_openreml's first argument).
        map_theta_to_dv: optional analytic derivative θ ↦ ∂V/∂θ (k, n, n); then the fit uses
            ``derivatives="analytic"``. Without it, derivatives come from autodiff (``"auto"``).
        v_builder: a jreml covariance module (``jreml.covariance``); takes the place of ``map_theta_to_v``.
        map_theta_to_g: θ_G ↦ G (q, q), the covariance of the random effects u: a function or a jreml covariance
            module (torch_openreml accepts a callable or a covariance ``Matrix``). The default of ``blup``,
            ``predict`` and ``residual``.
        mask_theta_to_g: a boolean mask (k,) or an integer index array selecting θ_G from θ; without it
            ``map_theta_to_g`` gets the whole θ (as in torch_openreml).
        z: the random-effects design Z (n, q), the default Z of ``blup`` / ``predict`` / ``residual`` (jreml's
            addition; torch_openreml passes Z to each call).

    BLUPs: û = G(θ_G) Zᵀ P y. With a covariance module and no ``map_theta_to_g``, ``blup`` is the
    concatenation of the model's Z·G·Zᵀ terms' BLUPs, in the model's term order (``result.blup()`` gives them
    by term name), and ``predict`` is Xβ̂ + Σ Z û over those terms.

    Example (torch_openreml's calls)::

        reml = jreml.REML(v_builder=V)
        theta_hat, beta_hat, n_iter = reml.optimize(y, X, theta_start, verbose=2)
        reml.blue(y, X, theta_hat), reml.loglik(y, X, theta_hat), reml.history["loglik"]
        reml.blup(y, X, Z, theta_hat, map_theta_to_g=G, mask_theta_to_g=mask)
    """

    def __init__(
        self,
        map_theta_to_v: Callable | None = None,
        map_theta_to_dv: Callable | None = None,
        v_builder: AbstractCovariance | None = None,
        map_theta_to_g: Callable | None = None,
        mask_theta_to_g=None,
        z=None,
    ):
        if v_builder is None and is_covariance(map_theta_to_v):
            # REML(V): a covariance module as the first argument is torch_openreml's v_builder (REML(v_builder=None,
            # map_theta_to_v=None, ...) in torch_openreml 0.1.0a0, MarginalREML(v) later).
            v_builder, map_theta_to_v = map_theta_to_v, None
        if v_builder is None and map_theta_to_v is None:
            raise ValueError(
                "REML needs a covariance model: v_builder (a jreml covariance module) or "
                "map_theta_to_v (a function theta -> V)"
            )
        if v_builder is not None and map_theta_to_v is not None:
            raise ValueError("give either v_builder or map_theta_to_v, not both")
        if v_builder is not None and not is_covariance(v_builder):
            raise TypeError(
                f"v_builder must be a jreml covariance module, got {type(v_builder).__name__}; "
                "pass a plain function as map_theta_to_v"
            )
        if map_theta_to_v is not None and not callable(map_theta_to_v):
            raise TypeError("map_theta_to_v must be a function theta -> V")
        if map_theta_to_dv is not None and not callable(map_theta_to_dv):
            raise TypeError("map_theta_to_dv must be a function theta -> dV/dtheta (k, n, n)")
        if map_theta_to_g is not None and not callable(map_theta_to_g):
            raise TypeError("map_theta_to_g must be a function theta_g -> G")
        if map_theta_to_g is None and (mask_theta_to_g is not None or z is not None):
            raise ValueError("mask_theta_to_g and z are used with map_theta_to_g: give map_theta_to_g too")
        self.map_theta_to_v = map_theta_to_v
        self.map_theta_to_dv = map_theta_to_dv
        self.v_builder = v_builder
        self.map_theta_to_g = map_theta_to_g
        self.mask_theta_to_g = None if mask_theta_to_g is None else np.asarray(mask_theta_to_g)
        self.z = None if z is None else as_float_array(z, "z")
        if self.z is not None and self.z.ndim != 2:
            raise ValueError(f"z must be a 2-D design matrix (n, q), got shape {self.z.shape}")
        self._result = None

    # --- fitting ----------------------------------------------------------------------------------
    def optimize(
        self,
        y,
        X,
        theta_start=None,
        max_iter: int = 200,
        eta: float = 1.0,
        lb=None,
        ub=None,
        verbose: int = 0,
        check_score: bool = True,
        check_delta: bool = True,
        check_loglik: bool = True,
        tol_score: float = 1e-4,
        tol_delta: float = 1e-4,
        tol_loglik: float = 1e-4,
        **estimate_kwargs,
    ):
        """Fit by REML; returns ``(theta_hat, beta_hat, n_iter)`` (JAX arrays and an int), as torch_openreml's
        ``REML.optimize(y, x, theta, ...)``.

        ``theta_start`` is required with ``map_theta_to_v``; with ``v_builder`` it defaults to the model's
        start. The tolerances default to torch_openreml's (1e-4; ``jreml.estimate`` defaults are tighter).
        ``verbose``: 0 silent, 1 an iteration counter, 2 one line per iteration; with either, a last line says
        whether (and at which iteration) the fit converged, like torch_openreml's. Other keyword arguments
        (``algorithm``, ``method``, ``min_iter``, ...) go to :func:`jreml.estimate`.
        """
        y = _response(y)
        if self.v_builder is not None:
            model = self.v_builder
        else:
            if theta_start is None:
                raise ValueError("with map_theta_to_v, optimize needs theta_start (the number of parameters)")
            model = self.map_theta_to_v
        if self.map_theta_to_dv is not None:
            estimate_kwargs.setdefault("derivatives", "analytic")
            estimate_kwargs.setdefault("dv_builder", self.map_theta_to_dv)
        self._result = estimate(
            model,
            y,
            X,
            theta_start,
            max_iter=max_iter,
            eta=eta,
            lb=lb,
            ub=ub,
            verbose=verbose,
            check_score=check_score,
            check_delta=check_delta,
            check_loglik=check_loglik,
            tol_score=tol_score,
            tol_delta=tol_delta,
            tol_loglik=tol_loglik,
            **estimate_kwargs,
        )
        r = self._result
        if verbose:
            done = f"\u2713 Converged at iteration {int(r.n_iter)}" if bool(r.converged) else r.message
            print(f"\n{done}")
        return r.theta, r.beta, int(r.n_iter)

    # --- results of the fit -----------------------------------------------------------------------
    @property
    def result(self):
        """The :class:`jreml.FitResult` of the last ``optimize`` call."""
        if self._result is None:
            raise RuntimeError("no fit yet: call REML.optimize(y, X, theta_start) first")
        return self._result

    @property
    def history(self) -> dict[str, list]:
        """torch_openreml's optimisation history: a dict of per-iteration lists (numpy), one entry per
        iteration done. Entry j of ``beta``, ``loglik``, ``score`` and ``ai`` is at the iterate θ_j the
        iteration started from (θ_0 = the start), ``delta`` = AI⁻¹·score there (the undamped step, least
        squares as in torch_openreml), ``update`` the change of θ that was applied (halved, or projected onto
        ``lb``/``ub``, where jreml's step control did so) and ``theta`` = θ_{j+1}, the iterate it ended at; so
        ``history["theta"][-1]`` is θ̂. ``ai`` is the information matrix of the fit's algorithm (the average
        information by default). The complete per-iterate record is ``result.history``.
        """
        h, n = self.result.history, self._recorded()
        theta, step = np.asarray(h.theta)[: n + 1], np.asarray(h.step)[: n + 1]
        beta, loglik = np.asarray(h.beta)[:n], np.asarray(h.loglik)[:n]
        score, ai = np.asarray(h.score)[:n], np.asarray(h.information)[:n]
        delta = [np.linalg.lstsq(a, s, rcond=None)[0] for a, s in zip(ai, score, strict=True)]
        return {
            "theta": list(theta[1:]),
            "beta": list(beta),
            "loglik": list(loglik),
            "score": list(score),
            "ai": list(ai),
            "delta": delta,
            "update": list(step[1:]),
        }

    def _recorded(self) -> int:
        """The last row of ``result.history`` that holds an iterate: ``n_iter``, except after estimate's Newton
        fallback ("ai+newton"), whose n_iter counts both runs while the history is the Newton run's alone; its
        last iterate is θ̂ itself."""
        r = self.result
        theta = np.asarray(r.history.theta)
        n = min(int(r.n_iter), theta.shape[0] - 1)
        final = np.asarray(r.theta)
        while n > 0 and not np.array_equal(theta[n], final):
            n -= 1
        return n

    def _row(self, select: str) -> int:
        if select not in SELECT:
            raise ValueError(f"select must be one of {SELECT}, got {select!r}")
        n_iter = self._recorded()
        if select == "last":
            return n_iter
        # argmax takes the first of equal values: the earliest iterate with the highest log-likelihood.
        return int(np.argmax(np.asarray(self.result.history.loglik)[: n_iter + 1]))

    def get_theta(self, select: str = "last"):
        """θ of the last iterate (= ``result.theta``) or of the iterate with the highest log-likelihood."""
        return jnp.asarray(self.result.history.theta[self._row(select)])

    def get_beta(self, select: str = "last"):
        """β̂ (GLS) at the last iterate or at the iterate with the highest log-likelihood."""
        return jnp.asarray(self.result.history.beta[self._row(select)])

    # --- evaluation at a given θ (torch_openreml's methods) ---------------------------------------
    def _model(self):
        return self.v_builder if self.v_builder is not None else self.map_theta_to_v

    def _reml(self) -> bool:
        return self._result is None or self._result.method == "reml"

    def _inputs(self, y, X, theta):
        """y, X and θ as given; y and X default (together) to the last fit's data, θ to its estimate."""
        if (y is None) != (X is None):
            raise ValueError("give y and X together, or neither (then the data of the last optimize)")
        if y is None:
            y, X = self.result.y, self.result.X
        else:
            y, X = _response(y), as_float_array(X, "X")
            if X.ndim != 2 or X.shape[0] != y.shape[0]:
                raise ValueError(f"X must be (n, p) with n = len(y) = {y.shape[0]}, got shape {X.shape}")
        theta = self.result.theta if theta is None else as_float_array(theta, "theta")
        if theta.ndim != 1:
            raise ValueError(f"theta must be a 1-D parameter vector, got shape {theta.shape}")
        return y, X, theta

    def loglik(self, y=None, X=None, theta=None):
        """The REML log-likelihood at θ (ML after an ``optimize(..., method="ml")``), as torch_openreml's
        ``REML.loglik(y, x, theta)`` but in lme4's convention: it includes −(n−p)/2·log 2π."""
        y, X, theta = self._inputs(y, X, theta)
        return _gls(self._model(), y, X, theta, self._reml())[2]

    def loglik_without_constant(self, y=None, X=None, theta=None):
        """The log-likelihood as torch_openreml reports it: ``loglik + (n−p)/2·log 2π`` (ML: n/2·log 2π)."""
        y, X, theta = self._inputs(y, X, theta)
        n, p = X.shape
        dof = n - p if self._reml() else n
        return _gls(self._model(), y, X, theta, self._reml())[2] + 0.5 * dof * np.log(2.0 * np.pi)

    def blue(self, y=None, X=None, theta=None):
        """β̂ = (XᵀV⁻¹X)⁻¹XᵀV⁻¹y at θ, the best linear unbiased (GLS) estimate (torch_openreml's ``blue``)."""
        y, X, theta = self._inputs(y, X, theta)
        return _gls(self._model(), y, X, theta, self._reml())[0]

    def marginal_predict(self, y=None, X=None, theta=None):
        """Marginal predictions Xβ̂ at θ, fixed effects only (torch_openreml's ``marginal_predict``)."""
        y, X, theta = self._inputs(y, X, theta)
        return X @ _gls(self._model(), y, X, theta, self._reml())[0]

    def marginal_residual(self, y=None, X=None, theta=None):
        """Marginal residuals y − Xβ̂ at θ (torch_openreml's ``marginal_residual``)."""
        y, X, theta = self._inputs(y, X, theta)
        return y - X @ _gls(self._model(), y, X, theta, self._reml())[0]

    def _random_part(self, y, X, Z, theta, map_theta_to_g, mask_theta_to_g, g=None):
        """(û, Xβ̂ + Zû) at θ; G and Z from the call, else from the constructor, else the module's terms."""
        y, X, theta = self._inputs(y, X, theta)
        if g is not None:
            if map_theta_to_g is not None:
                raise ValueError("give g or map_theta_to_g, not both (g is torch_openreml's later name for it)")
            map_theta_to_g = g
        g_of = self.map_theta_to_g if map_theta_to_g is None else map_theta_to_g
        if g_of is not None:
            if not callable(g_of):
                raise TypeError("map_theta_to_g must be a function theta_g -> G")
            Z = self.z if Z is None else Z
            if Z is None:
                raise ValueError("BLUPs with map_theta_to_g need Z: pass it (blup(y, X, Z, theta)) or give z=")
            Z = _design(Z, y.shape[0])
            mask = self.mask_theta_to_g if mask_theta_to_g is None else mask_theta_to_g
            G = jnp.asarray(g_of(_select(theta, mask, g_of)))
            q = Z.shape[1]
            if G.shape != (q, q):
                raise ValueError(f"map_theta_to_g returned shape {G.shape}, expected ({q}, {q}) (Z has {q} columns)")
            beta, p_y, _ = _gls(self._model(), y, X, theta, self._reml())
            u = G @ (Z.T @ p_y)
            return u, X @ beta + Z @ u
        if self.v_builder is None:
            raise ValueError("BLUPs of a plain map_theta_to_v need map_theta_to_g (and Z): give them here or to REML")
        if Z is not None or mask_theta_to_g is not None:
            raise ValueError("Z and mask_theta_to_g are used with map_theta_to_g: give map_theta_to_g too")
        blups, fitted = _module_random_effects(self.v_builder, y, X, theta, self._reml())
        if not blups:
            raise ValueError("the covariance model has no Z·G·Zᵀ (CovariancePropagation) terms: no BLUPs")
        return jnp.concatenate(list(blups.values())), fitted

    def blup(self, y=None, X=None, Z=None, theta=None, map_theta_to_g=None, mask_theta_to_g=None, g=None):
        """BLUPs û = G(θ_G) Zᵀ P y at θ (torch_openreml's ``blup(y, x, z, theta, map_theta_to_g,
        mask_theta_to_g)``, and its later ``blup(y, x, z, theta, g=G)``: ``g`` is ``map_theta_to_g`` under its
        later name); ``map_theta_to_g``, ``mask_theta_to_g`` and Z default to the constructor's. Without any
        ``map_theta_to_g``, a covariance module's terms' BLUPs, concatenated in term order."""
        return self._random_part(y, X, Z, theta, map_theta_to_g, mask_theta_to_g, g)[0]

    def predict(self, y=None, X=None, Z=None, theta=None, map_theta_to_g=None, mask_theta_to_g=None, g=None):
        """Conditional predictions Xβ̂ + Zû at θ (torch_openreml's ``predict``; arguments as :meth:`blup`)."""
        return self._random_part(y, X, Z, theta, map_theta_to_g, mask_theta_to_g, g)[1]

    def residual(self, y=None, X=None, Z=None, theta=None, map_theta_to_g=None, mask_theta_to_g=None, g=None):
        """Conditional residuals y − Xβ̂ − Zû at θ (torch_openreml's ``residual``; arguments as :meth:`blup`)."""
        fitted = self._random_part(y, X, Z, theta, map_theta_to_g, mask_theta_to_g, g)[1]
        return (self.result.y if y is None else _response(y)) - fitted
