"""FitResult: an immutable pytree with estimates, standard errors, BLUE/BLUP, predictions and history (formula
metadata and prediction on new data in ``formula_info.py``, random effects in ``random_effects.py``, the text in
``tables.py``)."""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jaxtyping import Array, Bool, Float, Int

from .._backends.dense.likelihood import core, trace_weight
from .._backends.sparse import sparse_structure
from .._covariance.base import AbstractCovariance
from .._covariance.queries import kernel_variance_index, observed_mask
from .._inference import anova_table, check_ddf, coef_table
from .._inference.ddf import Pieces
from .._solvers.loop import History
from .._solvers.results import status_message
from .formula_info import FormulaInfo, fixed_only, new_matrix, new_random_part
from .random_effects import blocked_conditional_variances, leading_blocks, random_effects, simulate
from .tables import json_float, summary

#: What refits a result (``FitResult.bootstrap`` / ``refit``): the batch engine, which sits above this layer because
#: it fits through ``estimate``, which builds ``FitResult``s. ``_bootstrap`` registers its functions here when it is
#: imported (``jreml/__init__`` imports it), so the dependency points downwards at import time.
_REFITTING: dict = {}


def register_refitting(**functions) -> None:
    """Give ``FitResult`` the functions it refits with (``bootstrap``, ``refit``); called by ``_bootstrap``."""
    _REFITTING.update(functions)


def _refitting(name: str):
    try:
        return _REFITTING[name]
    except KeyError:  # pragma: no cover - jreml/__init__ imports _bootstrap
        raise RuntimeError(f"FitResult.{name} needs jreml's batch engine: import jreml first") from None


class Estimate(NamedTuple):
    """A derived quantity and its delta-method standard error (``FitResult.delta``, ``FitResult.h2``)."""

    value: float
    se: float


class FitResult(eqx.Module):
    """The result of :func:`jreml.estimate` (works under ``jax.vmap``: every array leaf gains a batch axis).

    Fields: ``theta`` (θ̂), ``natural_params`` (``params``: name → natural-scale value), ``beta`` (β̂, the BLUE),
    ``vcov_beta`` = (XᵀV̂⁻¹X)⁻¹, ``se_beta``, ``loglik`` (lme4 convention), ``converged``, ``n_iter``, ``status``,
    ``singular`` (some variance at its lower boundary), ``score``, ``information`` (AI at θ̂),
    ``vcov_theta`` (inverse AI, pseudo-inverse where singular), ``history`` and the data (``model``, ``y``, ``X``).
    """

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
    history: History
    p_y: Float[Array, " n"]
    model: AbstractCovariance
    y: Float[Array, " n"]
    X: Float[Array, "n p"]
    method: str = eqx.field(static=True)
    algorithm: str = eqx.field(static=True)
    param_names: tuple[str, ...] = eqx.field(static=True)
    beta_names: tuple[str, ...] | None = eqx.field(static=True, default=None)
    formula: str | None = eqx.field(static=True, default=None)
    n_dropped: int = eqx.field(static=True, default=0)
    formula_info: FormulaInfo | None = eqx.field(static=True, default=None)

    @property
    def params(self) -> dict[str, Float[Array, "..."]]:
        """Natural-scale parameters (variances, covariances, correlations) by name, in θ's order."""
        values = self.natural_params
        if not isinstance(values, jax.core.Tracer):
            values = np.asarray(values)  # slicing on the host: no small XLA program per name
            return {name: jax.device_put(values[..., i]) for i, name in enumerate(self.param_names)}
        return {name: values[..., i] for i, name in enumerate(self.param_names)}

    @property
    def fixef(self) -> dict[str, float]:
        """β̂ by fixed-effect name (fits from :func:`jreml.fit`, which record ``beta_names``)."""
        return self._by_beta_name(self.beta)

    @property
    def se(self) -> dict[str, float]:
        """Standard errors of β̂ by fixed-effect name (fits from :func:`jreml.fit`)."""
        return self._by_beta_name(self.se_beta)

    def _by_beta_name(self, values) -> dict[str, float]:
        if self.beta_names is None:
            raise AttributeError("this fit has no fixed-effect names (beta_names); use .beta / .se_beta")
        return {name: float(v) for name, v in zip(self.beta_names, np.asarray(values), strict=True)}

    @property
    def nobs(self) -> int:
        """Observations the fit used: y's rows, or the observed ones of an ``ObservedRows`` model."""
        observed = observed_mask(self.model)
        if observed is not None:
            counts = np.sum(np.asarray(observed), axis=-1)
            return int(counts) if counts.ndim == 0 else counts
        return self.y.shape[-1]

    @property
    def num_params(self) -> int:
        """Degrees of freedom of the log-likelihood as lme4 counts them: p fixed + k covariance parameters."""
        return self.X.shape[-1] + self.theta.shape[-1]

    @property
    def aic(self):
        return -2.0 * self.loglik + 2.0 * self.num_params

    @property
    def bic(self):
        return -2.0 * self.loglik + math.log(self.nobs) * self.num_params

    @property
    def message(self) -> str:
        return status_message(self.status)

    # --- BLUE / BLUP / predictions -------------------------------------------------------------------
    def _random_effects(self):
        """({term name: û}, Xβ̂ + Σ Z û, y − Xβ̂ − Σ Z û) in one compiled call (op by op, it compiled ~25)."""
        return random_effects(self.model, self.theta, self.p_y, self.X, self.beta, self.y)

    def blup(self, with_sd: bool = False, prediction_error: bool = False):
        """BLUPs û = G Zᵀ P y of every Z·G·Zᵀ term, as {term name: (q,) array}.

        With ``with_sd=True`` returns {name: (û, sd)}: by default sd² = diag(G − G Zᵀ V⁻¹ Z G), the conditional
        variance of u given y at β = β̂ (lme4's ``condVar``); with ``prediction_error=True``
        sd² = diag(G − G Zᵀ P Z G), the prediction-error variance that also counts the uncertainty of β̂
        (Henderson 1975; ASReml's "PEV").
        """
        blups = self._random_effects()[0]
        if not with_sd:
            return blups
        structure = sparse_structure(self.model)
        if structure is not None:
            vcov = self.vcov_beta if prediction_error else None
            variances = blocked_conditional_variances(self.theta, self.y, self.X, structure, vcov)
            return {
                term.name: (blups[term.name], jnp.sqrt(jnp.maximum(variances[term.offset], 0.0)))
                for term in self.model.random_terms()
            }
        # other models (relationship matrices, kernels): the dense n×n formula
        out = {}
        weight = None
        for term in self.model.random_terms():
            theta_g = self.theta[term.offset : term.offset + term.G.num_free_params]
            theta_z = self.theta[term.offset - term.Z.num_free_params : term.offset]
            u = blups[term.name]
            if weight is None:
                c = core(self.theta, self.y, self.X, self.model, self.method == "reml")
                weight = trace_weight(c, reml=prediction_error)
                observed = observed_mask(self.model)
                if observed is not None:  # V_m⁻¹ is I on the unobserved rows: only M·V_m⁻¹·M weighs Z's rows
                    m = jnp.asarray(observed, weight.dtype)
                    weight = weight * m[:, None] * m[None, :]
            g = term.G(theta_g)
            zg = term.Z(theta_z) @ g
            cond_var = jnp.diagonal(g) - jnp.sum(zg * (weight @ zg), axis=0)
            out[term.name] = (u, jnp.sqrt(jnp.maximum(cond_var, 0.0)))
        return out

    def bootstrap(self, n_boot: int, seed: int = 0, **options):
        """Parametric bootstrap: ``n_boot`` responses simulated from the fit, refitted in one vmapped program
        (see :func:`jreml.bootstrap`)."""
        return _refitting("bootstrap")(self, n_boot, seed, **options)

    def simulate(self, nsim: int = 1, seed: int = 0) -> Float[Array, "nsim n"]:
        """lme4's ``simulate(fit, nsim, seed)``: (nsim, n) responses y* = Xβ̂ + chol(V(θ̂))·z, z ~ N(0, I) from
        ``jax.random.key(seed)`` (the draws ``bootstrap`` refits)."""
        if int(nsim) < 1:
            raise ValueError(f"nsim must be >= 1, got {nsim!r}")
        return simulate(self, int(nsim), seed)

    def refit(self, y, **options):
        """lme4's ``refit(fit, newresp)``: this model fitted to the response ``y`` (the fit's rows), names kept."""
        return _refitting("refit")(self, y, **options)

    def fitted(self):
        """Conditional fitted values Xβ̂ + Σ Z û (lme4's ``fitted``)."""
        return self._random_effects()[1]

    def delta(self, fn) -> Estimate:
        """A function of the parameters with its delta-method standard error.

        ``fn(p)`` gets ``p``: the natural parameters by name (``params``) and the fixed effects by name
        (``fixef``; ``beta[j]`` without a formula), and returns a scalar built with ``jax.numpy``. Its SE is
        sqrt(∇_θgᵀ·vcov_theta·∇_θg + ∇_βgᵀ·vcov_beta·∇_βg): θ̂ and β̂ are asymptotically independent under ML and
        REML, and the gradients come from autodiff through the parametrisation θ → natural parameters.
        """
        if np.ndim(self.loglik) != 0:
            raise ValueError("delta needs a single fit, not a batch")
        beta_names = self.beta_names or tuple(f"beta[{j}]" for j in range(self.beta.shape[-1]))

        def g(theta, beta):
            natural = self.model.build_params(theta)
            values = {name: natural[i] for i, name in enumerate(self.param_names)}
            values.update({name: beta[j] for j, name in enumerate(beta_names)})
            return jnp.asarray(fn(values), dtype=theta.dtype).reshape(())

        value, (g_theta, g_beta) = jax.value_and_grad(g, argnums=(0, 1))(self.theta, self.beta)
        var = g_theta @ self.vcov_theta @ g_theta + g_beta @ self.vcov_beta @ g_beta
        return Estimate(float(value), float(jnp.sqrt(jnp.maximum(var, 0.0))))

    @property
    def h2(self) -> Estimate:
        """Heritability h² = σ²_K / Σσ² of the single relationship-matrix term (GCTA's V(G)/Vp) with its
        delta-method SE; models with another structure raise AttributeError."""
        found = kernel_variance_index(self.model)
        if found is None:
            raise AttributeError("h2 needs a variance-component model with exactly one relationship-matrix term")
        index = found[0]
        names = list(self.param_names)
        return self.delta(lambda p: p[names[index]] / sum(p[name] for name in names))

    def coef(self) -> dict[str, pd.DataFrame]:
        """lme4's ``coef(fit)``: per grouping factor, a DataFrame by level with every fixed effect, plus that
        level's conditional mode where the factor has a random effect of the same name."""
        fixef = self.fixef
        out = {}
        for group, frame in self.ranef.items():
            table = pd.DataFrame({name: np.full(len(frame), value) for name, value in fixef.items()}, index=frame.index)
            for column in frame.columns:
                if column.endswith("_sd"):
                    continue
                label = column.split(":")[-1] if column not in table.columns else column
                table[label] = table[label] + frame[column] if label in table.columns else frame[column]
            out[group] = table
        return out

    def marginal_predict(self, X=None):
        """Xβ̂ (fixed effects only); ``X`` defaults to the fitted design."""
        return (self.X if X is None else jnp.asarray(X)) @ self.beta

    def predict(self, newdata=None, re_form=None):
        """Conditional predictions Xβ̂ + Σ_terms Z û (lme4's ``predict``).

        ``re_form=None`` uses every random term; ``re_form=False`` (or ``"~0"``, ``"NA"``, as lme4's
        ``re.form = NA``) gives the fixed effects alone, Xβ̂. ``newdata`` (formula fits only) is a DataFrame: X is
        rebuilt with the fit's fixed-effects model spec (same contrasts and levels) and each random term adds
        Z·û for the levels seen in the fit; a level not seen in the fit contributes 0.
        """
        fixed = fixed_only(re_form)
        if newdata is None:
            if fixed:
                return self.X @ self.beta
            return self._random_effects()[1]
        info = self._info("predict(newdata=...)")
        if not isinstance(newdata, pd.DataFrame):
            raise TypeError(f"newdata must be a pandas DataFrame, got {type(newdata).__name__}")
        if len(newdata) == 0:  # lme4 returns numeric(0)
            return jnp.zeros((0,), dtype=self.beta.dtype)
        X = new_matrix(info.fixed_spec, newdata, "fixed part")[:, list(info.fixed_columns)]
        fitted = X @ np.asarray(self.beta)
        if fixed:
            return jnp.asarray(fitted)
        blups = self.blup()
        for term_info in info.terms:
            u = np.asarray(blups[term_info.name]).reshape(len(term_info.levels), len(term_info.labels))
            fitted = fitted + new_random_part(term_info, u, newdata)
        return jnp.asarray(fitted)

    def residuals(self):
        """Conditional residuals y − Xβ̂ − Σ Z û."""
        return self._random_effects()[2]

    def marginal_residuals(self):
        """Marginal residuals y − Xβ̂."""
        return self.y - self.X @ self.beta

    # --- lme4-style accessors (fits from jreml.fit) ---------------------------------------------------
    def _info(self, what: str) -> FormulaInfo:
        if self.formula_info is None:
            raise AttributeError(f"{what} needs a fit from jreml.fit (a formula); this result has no formula")
        if np.ndim(self.loglik) != 0:
            raise ValueError(f"{what} needs a single fit, not a batch of {np.shape(self.loglik)} fits")
        return self.formula_info

    @property
    def sigma2(self) -> float:
        """The residual variance σ̂² (the ``Residual.variance`` parameter)."""
        if "Residual.variance" not in self.param_names:
            raise AttributeError("this model has no 'Residual.variance' parameter")
        return float(self.params["Residual.variance"])

    def _ordered_terms(self):
        """(term info, G block m×m) per random term, in lme4's order (more levels first, stable)."""
        info = self._info("the random-effects summary")
        sizes = tuple((term_info.name, len(term_info.labels)) for term_info in info.terms)
        blocks = leading_blocks(self.model, self.theta, sizes)
        out = [(term_info, np.asarray(blocks[term_info.name])) for term_info in info.terms]
        order = sorted(range(len(out)), key=lambda i: -len(out[i][0].levels))
        return [out[i] for i in order]

    @property
    def ngroups(self) -> dict[str, int]:
        """Number of levels of each grouping factor (lme4's ``ngrps``), more levels first."""
        out: dict[str, int] = {}
        for term_info, _ in self._ordered_terms():
            out.setdefault(term_info.group, len(term_info.levels))
        return out

    def _varcorr_rows(self) -> list[dict]:
        rows = []
        for term_info, block in self._ordered_terms():
            labels = term_info.labels
            sd = np.sqrt(np.maximum(np.diagonal(block), 0.0))
            for i, label in enumerate(labels):
                rows.append(
                    dict(
                        group=term_info.name,
                        term1=label,
                        term2=None,
                        variance=float(block[i, i]),
                        covariance=None,
                        sd=float(sd[i]),
                        corr=None,
                    )
                )
            for i in range(len(labels)):
                for j in range(i + 1, len(labels)):
                    denom = sd[i] * sd[j]
                    corr = float(block[i, j] / denom) if denom > 0 else float("nan")
                    rows.append(
                        dict(
                            group=term_info.name,
                            term1=labels[i],
                            term2=labels[j],
                            variance=None,
                            covariance=float(block[i, j]),
                            sd=None,
                            corr=corr,
                        )
                    )
        s2 = self.sigma2
        rows.append(
            dict(
                group="Residual",
                term1=None,
                term2=None,
                variance=s2,
                covariance=None,
                sd=math.sqrt(max(s2, 0.0)),
                corr=None,
            )
        )
        return rows

    @property
    def varcorr(self) -> pd.DataFrame:
        """Variance components in the layout of lme4's ``as.data.frame(VarCorr(fit))``.

        Columns group, term1, term2, variance, covariance, sd, corr: one row per variance (variance and sd), one
        per covariance of a correlated term (covariance and corr; term2 set), and the ``Residual`` row.
        """
        columns = ["group", "term1", "term2", "variance", "covariance", "sd", "corr"]
        frame = pd.DataFrame(self._varcorr_rows(), columns=columns)
        for c in columns[1:3]:
            frame[c] = frame[c].astype(object).where(frame[c].notna(), None)
        for c in columns[3:]:
            frame[c] = frame[c].astype(float)
        return frame

    @property
    def ranef(self) -> dict[str, pd.DataFrame]:
        """Conditional modes by grouping factor (lme4's ``ranef(fit, condVar = TRUE)``).

        ``{group: DataFrame}`` indexed by level, one column per term and a ``<term>_sd`` column with the
        conditional standard deviation of each mode.
        """
        info = self._info("ranef")
        blups = self.blup(with_sd=True)
        frames: dict[str, pd.DataFrame] = {}
        for term_info in info.terms:
            u, sd = (np.asarray(a).reshape(len(term_info.levels), len(term_info.labels)) for a in blups[term_info.name])
            frame = frames.get(term_info.group)
            if frame is None:
                frame = pd.DataFrame(index=pd.Index(list(term_info.levels), name=term_info.group))
            for k, label in enumerate(term_info.labels):
                column = label if label not in frame.columns else f"{term_info.name}:{label}"
                frame[column] = pd.Series(u[:, k], index=list(term_info.levels))
                frame[f"{column}_sd"] = pd.Series(sd[:, k], index=list(term_info.levels))
            frames[term_info.group] = frame
        # modes first, then their SDs
        out = {}
        for group, frame in frames.items():
            modes = [c for c in frame.columns if not c.endswith("_sd")]
            out[group] = frame[modes + [f"{c}_sd" for c in modes]]
        return out

    def to_dict(self) -> dict:
        """The fit as a JSON-ready dict (the ``jreml fit --json`` object without ``time_s``)."""
        self._info("to_dict")
        return {
            "method": self.method.upper(),
            "nobs": int(self.nobs),
            "loglik": float(self.loglik),
            "aic": float(self.aic),
            "bic": float(self.bic),
            "converged": bool(self.converged),
            "singular": bool(self.singular),
            "n_iter": int(self.n_iter),
            "fixef": self.fixef,
            "se": self.se,
            "varcorr": [
                {k: (json_float(v) if isinstance(v, float) else v) for k, v in row.items()}
                for row in self._varcorr_rows()
            ],
            "sigma2": self.sigma2,
        }

    # --- inference on fixed effects (lmerTest / pbkrtest) ---------------------------------------------
    def _ddf_pieces(self):
        if np.ndim(self.loglik) != 0:
            raise ValueError("degrees of freedom need a single fit, not a batch")
        if self.method != "reml":
            warnings.warn("Satterthwaite / Kenward-Roger degrees of freedom assume a REML fit", stacklevel=3)
        return Pieces(self.theta, self.y, self.X, self.model, self.at_boundary)

    def coef_table(self, ddf: str | None = "satterthwaite") -> pd.DataFrame:
        """t-tests of each fixed effect: DataFrame indexed by name with columns estimate, se, df, t, p.

        ``ddf``: "satterthwaite" (lmerTest's default), "kenward-roger" (se from pbkrtest's adjusted covariance
        Φ_A, df by its per-coefficient rule), "residual" (df = n − rank X) or None (z-tests, df = inf).
        Formulas and references: :mod:`jreml._inference.ddf`.
        """
        ddf = check_ddf(ddf)
        names = list(self.beta_names) if self.beta_names else [f"beta[{i}]" for i in range(self.beta.shape[-1])]
        return coef_table(self.beta, self.X, names, ddf, self._ddf_pieces, self.vcov_beta)

    def confint(
        self, method: str = "profile", level: float = 0.95, parm=None, n_boot: int = 500, seed: int = 0
    ) -> pd.DataFrame:
        """lme4's ``confint(fit, method, level, oldNames = FALSE)``: DataFrame lower, upper, rows sd_…, cor_…,
        sigma, then the fixed effects (see :mod:`jreml._inference.profile`).

        ``method``: "profile" (likelihood profile, lme4's default), "wald" (β̂ ± z·se; NaN for the variance rows,
        as lme4) or "bootstrap" (percentile intervals of ``n_boot`` parametric bootstrap refits, lme4's "boot").
        """
        from .._inference.profile import bootstrap_confint, profile_confint, wald_confint

        methods = {"profile": profile_confint, "wald": wald_confint, "bootstrap": bootstrap_confint}
        key = method.lower() if isinstance(method, str) else method
        key = "bootstrap" if key == "boot" else key
        if key not in methods:
            raise ValueError(f"method must be one of {sorted(methods)}, got {method!r}")
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must lie in (0, 1), got {level!r}")
        self._info("confint")
        if key == "bootstrap":
            return bootstrap_confint(self, level=level, parm=parm, n_boot=n_boot, seed=seed)
        return methods[key](self, level=level, parm=parm)

    def profile(self, parm=None, n_points: int = 13) -> pd.DataFrame:
        """The likelihood profile (parameter, value, zeta), as lme4's ``as.data.frame(profile(fit))``."""
        from .._inference.profile import profile_table

        self._info("profile")
        return profile_table(self, parm=parm, n_points=n_points)

    def anova(self, ddf: str = "satterthwaite") -> pd.DataFrame:
        """lmerTest's type III F-tests of each fixed-effect term of a formula fit (intercept left out).

        Columns ``Sum Sq, Mean Sq, NumDF, DenDF, F value, Pr(>F)``; a term's columns are tested jointly, which
        is lmerTest's type III hypothesis for models without interactions (with treatment-coded factors in an
        interaction, lmerTest's type III contrasts differ: a warning says so).
        """
        ddf = check_ddf(ddf, allow_none=False)
        info = self._info("anova")
        columns = list(info.fixed_columns)
        terms: dict[str, list[int]] = {}
        for term, spec_cols in info.fixed_spec.term_indices.items():
            name = str(term)
            cols = [i for i, c in enumerate(columns) if c in spec_cols]
            if name != "1" and cols:
                terms[name] = cols
        factors = [set(str(t).split(":")) for t in terms]
        if any(a < b for a in factors for b in factors):
            warnings.warn(
                "anova: a term is contained in an interaction; its columns are tested jointly, which is not "
                "lmerTest's type III contrast for treatment-coded factors",
                stacklevel=2,
            )
        return anova_table(self.beta, terms, ddf, self._ddf_pieces, self.sigma2)

    # --- display ----------------------------------------------------------------------------------
    def summary(self, beta_names=None, ddf=None) -> str:
        """A plain-text summary: lme4's ``summary(fit)`` layout for :func:`jreml.fit` results, else a short one."""
        return summary(self, beta_names, ddf)

    def __str__(self) -> str:
        return self.summary()

    def diagnose(self, tol: float = 1e-6, flat: float = 1e-6):
        """Exact gradient and Hessian of ℓ at θ̂, boundary parameters, curvature and advice in plain words
        (a frozen :class:`jreml._inference.diagnose.Diagnosis`; see that module for the checks)."""
        from .._inference.diagnose import diagnose

        return diagnose(self, tol=tol, flat=flat)
