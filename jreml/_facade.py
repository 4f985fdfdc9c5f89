"""``REML``: a torch_openreml-style object interface, a thin layer over :func:`jreml.estimate`.

.. important::
   **Log-likelihood convention.** ``REML.loglik`` (like every log-likelihood in jreml) follows lme4's
   ``logLik``: it *includes* the constant −(n−p)/2·log 2π. torch_openreml omits that constant, so its values
   are larger by (n−p)/2·log 2π. Example, the ``john_alpha`` trial (n = 72, p = 3): torch_openreml reports
   16.8099, jreml and lme4 report −46.5969 (= 16.8099 − 34.5·log 2π). ``REML.loglik_without_constant``
   gives the torch_openreml number. Estimates (θ̂, β̂, BLUPs) do not depend on the constant.

The facade adds no numerics of its own: :meth:`REML.optimize` calls :func:`jreml.estimate` (REML, average
information, one compiled ``lax.while_loop``) and the attributes read the resulting :class:`jreml.FitResult`,
available as ``REML.result``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from ._config import as_float_array
from ._covariance.base import AbstractCovariance
from ._entry import estimate

SELECT = ("last", "best")


class REML:
    """REML fit of y ~ N(Xβ, V(θ)) with torch_openreml's interface (see the module docstring for the
    log-likelihood convention: **lme4's, including −(n−p)/2·log 2π**; torch_openreml omits it).

    Args:
        map_theta_to_v: a pure JAX function θ (k,) ↦ V (n, n). Used when ``v_builder`` is not given.
        map_theta_to_dv: optional analytic derivative θ ↦ ∂V/∂θ (k, n, n); then the fit uses
            ``derivatives="analytic"``. Without it, derivatives come from autodiff (``"auto"``).
        v_builder: a jreml covariance module (``jreml.covariance``); takes the place of ``map_theta_to_v``.
        map_theta_to_g: θ_G ↦ G (q, q), the covariance of the random effects u (for ``blup`` / ``predict``
            with plain functions).
        mask_theta_to_g: a boolean mask (k,) or an integer index array selecting θ_G from θ.
        z: the random-effects design Z (n, q).

    BLUPs: û = G(θ̂_G) Zᵀ P y with P y from the fit. With a covariance module and no ``map_theta_to_g``,
    ``blup`` is the concatenation of ``FitResult.blup()``'s per-term vectors, in the model's term order
    (``result.blup()`` gives them by term name). ``predict`` (conditional) is Xβ̂ + Zû.

    Example::

        reml = jreml.REML(v_builder=model)
        theta_hat, beta_hat, n_iter = reml.optimize(y, X, theta_start)
        reml.blue, reml.blup, reml.loglik, reml.result.summary()
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
        if v_builder is None and map_theta_to_v is None:
            raise ValueError(
                "REML needs a covariance model: v_builder (a jreml covariance module) or "
                "map_theta_to_v (a function theta -> V)"
            )
        if v_builder is not None and map_theta_to_v is not None:
            raise ValueError("give either v_builder or map_theta_to_v, not both")
        if v_builder is not None and not isinstance(v_builder, AbstractCovariance):
            raise TypeError(
                f"v_builder must be a jreml covariance module, got {type(v_builder).__name__}; "
                "pass a plain function as map_theta_to_v"
            )
        if map_theta_to_v is not None and not callable(map_theta_to_v):
            raise TypeError("map_theta_to_v must be a function theta -> V")
        if map_theta_to_dv is not None and not callable(map_theta_to_dv):
            raise TypeError("map_theta_to_dv must be a function theta -> dV/dtheta (k, n, n)")
        blup_parts = (map_theta_to_g, mask_theta_to_g, z)
        if any(p is not None for p in blup_parts) and any(p is None for p in blup_parts):
            raise ValueError("map_theta_to_g, mask_theta_to_g and z go together: give all three or none")
        if map_theta_to_g is not None and not callable(map_theta_to_g):
            raise TypeError("map_theta_to_g must be a function theta_g -> G")
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
        """Fit by REML; returns ``(theta_hat, beta_hat, n_iter)`` (JAX arrays and an int).

        ``theta_start`` is required with ``map_theta_to_v``; with ``v_builder`` it defaults to the model's
        start. The tolerances default to torch_openreml's (1e-4; ``jreml.estimate`` defaults are tighter).
        Other keyword arguments (``algorithm``, ``method``, ``min_iter``, ...) go to :func:`jreml.estimate`.
        """
        y = as_float_array(y, "y")
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
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
        return r.theta, r.beta, int(r.n_iter)

    # --- results ----------------------------------------------------------------------------------
    @property
    def result(self):
        """The :class:`jreml.FitResult` of the last ``optimize`` call."""
        if self._result is None:
            raise RuntimeError("no fit yet: call REML.optimize(y, X, theta_start) first")
        return self._result

    _HISTORY_FIELDS = ("theta", "beta", "loglik", "score", "step", "step_length")

    @property
    def history(self) -> list[dict]:
        """One dict per iteration (entry 0 = the start): theta, beta, loglik, score, step, step_length
        (numpy), trimmed to the iterations done. ``step`` is the accepted change of θ (0 at the start)."""
        h = self.result.history
        rows = int(self.result.n_iter) + 1
        arrays = {name: np.asarray(getattr(h, name))[:rows] for name in self._HISTORY_FIELDS}
        return [{"iteration": i, **{name: a[i] for name, a in arrays.items()}} for i in range(rows)]

    def _row(self, select: str) -> int:
        if select not in SELECT:
            raise ValueError(f"select must be one of {SELECT}, got {select!r}")
        n_iter = int(self.result.n_iter)
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

    @property
    def loglik(self):
        """REML log-likelihood at θ̂ in lme4's convention (includes −(n−p)/2·log 2π; torch_openreml does not)."""
        return self.result.loglik

    @property
    def loglik_without_constant(self):
        """The log-likelihood as torch_openreml reports it: ``loglik + (n−p)/2·log 2π`` (ML: n/2·log 2π)."""
        r = self.result
        n, p = r.X.shape
        dof = n - p if r.method == "reml" else n
        return r.loglik + 0.5 * dof * np.log(2.0 * np.pi)

    @property
    def blue(self):
        """β̂, the best linear unbiased (GLS) estimate of the fixed effects."""
        return self.result.beta

    @property
    def blup(self):
        """û = G Zᵀ P y: from ``map_theta_to_g``/``mask_theta_to_g``/``z`` if given, otherwise the
        concatenation of all terms of ``FitResult.blup()`` (module term order)."""
        r = self.result
        if self.map_theta_to_g is not None:
            return self._g_hat() @ (self._z_checked().T @ r.p_y)
        if self.v_builder is not None:
            parts = list(r.blup().values())
            if not parts:
                raise ValueError("the covariance model has no Z·G·Zᵀ (CovariancePropagation) terms: no BLUPs")
            return jnp.concatenate(parts)
        raise ValueError("BLUPs of a plain map_theta_to_v need map_theta_to_g, mask_theta_to_g and z")

    @property
    def predict(self):
        """Conditional predictions Xβ̂ + Zû on the fitted data."""
        r = self.result
        if self.map_theta_to_g is not None:
            return r.X @ r.beta + self._z_checked() @ self.blup
        if self.v_builder is not None:
            return r.predict()
        raise ValueError("conditional predictions of a plain map_theta_to_v need map_theta_to_g, mask_theta_to_g, z")

    @property
    def marginal_predict(self):
        """Marginal predictions Xβ̂ (fixed effects only)."""
        return self.result.marginal_predict()

    @property
    def residual(self):
        """Conditional residuals y − Xβ̂ − Zû."""
        return self.result.y - self.predict

    @property
    def marginal_residual(self):
        """Marginal residuals y − Xβ̂."""
        return self.result.marginal_residuals()

    # --- helpers ----------------------------------------------------------------------------------
    def _theta_g(self):
        theta = self.result.theta
        mask = self.mask_theta_to_g
        if mask.dtype == bool:
            if mask.shape != theta.shape:
                raise ValueError(f"mask_theta_to_g has shape {mask.shape}, theta has shape {theta.shape}")
            return theta[np.flatnonzero(mask)]
        if not np.issubdtype(mask.dtype, np.integer) or mask.ndim != 1:
            raise ValueError("mask_theta_to_g must be a boolean mask or a 1-D integer index array")
        return theta[mask]

    def _g_hat(self):
        g = jnp.asarray(self.map_theta_to_g(self._theta_g()))
        q = self._z_checked().shape[1]
        if g.shape != (q, q):
            raise ValueError(f"map_theta_to_g returned shape {g.shape}, expected ({q}, {q}) (z has {q} columns)")
        return g

    def _z_checked(self):
        n = self.result.y.shape[0]
        if self.z.shape[0] != n:
            raise ValueError(f"z has {self.z.shape[0]} rows but y has {n} observations")
        return self.z
