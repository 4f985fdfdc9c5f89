"""FitResult: an immutable pytree with estimates, standard errors, BLUE/BLUP, predictions and history."""

from __future__ import annotations

import itertools
import math
import re
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jaxtyping import Array, Bool, Float, Int

from ._backends.sparse import conditional_variances, sparse_structure
from ._covariance.base import AbstractCovariance
from ._covariance.queries import kernel_variance_index, observed_mask
from ._inference import anova_table, check_ddf, coef_table
from ._inference.ddf import Pieces
from ._likelihood import core, trace_weight
from ._solvers.loop import History
from ._solvers.results import status_message


@dataclass(frozen=True)
class RandomTermInfo:
    """What the formula layer knows about one random term, for ``varcorr``, ``ranef`` and ``predict(newdata)``.

    ``name`` is the term's (lme4) name (``"Subject"``, ``"Subject.1"`` for a second term on the same factor),
    ``factors`` the grouping columns, ``labels`` the term's columns (``("(Intercept)", "Days")``), ``levels``
    the factor's levels in the fit (the order of û), ``spec`` formulaic's model spec of the term's expression
    (``None`` for an intercept-only term) and ``columns`` which of its columns the term uses (``(x || g)``).
    """

    name: str
    factors: tuple[str, ...]
    labels: tuple[str, ...]
    levels: tuple[str, ...]
    spec: Any = None
    columns: tuple[int, ...] | None = None

    @property
    def group(self) -> str:
        return ":".join(self.factors)


@dataclass(frozen=True, eq=False)
class FormulaInfo:
    """The formula layer's metadata of a :func:`jreml.fit` result (fixed-part model spec, random terms).

    Stored as a static field of :class:`FitResult`, which must be hashable; formulaic's ``ModelSpec`` is not, so
    this class compares and hashes by identity (``eq=False``). A jitted function that takes a formula fit
    therefore recompiles for each new fit; ``estimate`` results (``formula_info=None``) are unaffected.
    """

    text: str
    fixed_spec: Any
    fixed_columns: tuple[int, ...]
    terms: tuple[RandomTermInfo, ...]


def _level_names(column) -> list[str]:
    """Each value of a factor column as ``DummyMatrix`` names its level (ints as ints, floats as floats)."""
    values = pd.Series(column).to_numpy(dtype=object).tolist()
    if values and all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in values):
        return [str(int(v)) for v in values]
    if values and all(isinstance(v, float | np.floating) for v in values):
        return [str(float(v)) for v in values]
    return [str(v) for v in values]


def _level_candidates(column) -> list[tuple[str, ...]]:
    """The names a value of a ``newdata`` factor column may have among the fit's levels, matched by value: the
    fit names ints as ints and floats as floats (``_level_names``), so 308 and 308.0 name the same level whichever
    dtype each frame has (a NaN in an int column makes it float); a missing value has none (its row falls back to
    the fixed effects)."""
    out = []
    for v in pd.Series(column).to_numpy(dtype=object).tolist():
        if v is None or (isinstance(v, float | np.floating) and np.isnan(v)) or v is pd.NA:
            out.append(())
        elif isinstance(v, int | np.integer) and not isinstance(v, bool):
            out.append((str(int(v)), str(float(v))))
        elif isinstance(v, float | np.floating):
            out.append((str(int(v)), str(float(v))) if float(v).is_integer() else (str(float(v)),))
        else:
            out.append((str(v),))
    return out


def _find_level(position: dict[str, int], parts: tuple[tuple[str, ...], ...]) -> int:
    """The fit's level index of one row's factor values (their candidate names joined by ":"), or −1."""
    for combination in itertools.product(*parts):
        index = position.get(":".join(combination))
        if index is not None:
            return index
    return -1


def _abbreviate(name: str, minlength: int = 6) -> str:
    """R's ``abbreviate``, simplified: drop lower-case vowels, then lower-case letters, from the right.

    formulaic's treatment columns are first written as lme4 does (``Machine[T.B]`` → ``MachineB`` → ``MachnB``).
    """
    match = re.match(r"^(.+)\[T\.(.+)\]$", name)
    chars = list(match.group(1) + match.group(2) if match else name)
    for pattern in ("aeiou", "abcdefghijklmnopqrstuvwxyz"):
        i = len(chars) - 1
        while len(chars) > minlength and i > 0:
            if chars[i] in pattern and chars[i - 1] not in " ":
                del chars[i]
            i -= 1
    return "".join(chars[:minlength]) if len(chars) > minlength else "".join(chars)


def _column(values, digits: int = 4) -> list[str]:
    """Format a column as R does: one number of decimals for all, enough for ``digits`` significant digits."""
    finite = [abs(v) for v in values if np.isfinite(v) and v != 0]
    if not finite:
        return [f"{v:.{digits}g}" for v in values]
    magnitude = math.floor(math.log10(min(max(finite), 1e300)))
    smallest = math.floor(math.log10(min(finite)))
    decimals = max(0, digits - 1 - min(magnitude, max(smallest, magnitude - digits)))
    decimals = min(decimals, 8)
    return [f"{v:.{decimals}f}" if np.isfinite(v) else str(v) for v in values]


def _table(header: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    """A text table: the first ``left`` columns left-aligned, the others right-aligned."""
    widths = [max(len(r[j]) for r in [header, *rows]) for j in range(len(header))]
    out = []
    for r in [header, *rows]:
        cells = [c.ljust(w) if j < left else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths, strict=True))]
        out.append(" ".join(cells).rstrip())
    return out


def _json_float(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


@eqx.filter_jit
def _random_effects(model, theta, p_y, X, beta, y):
    """BLUPs û = G Zᵀ P y of every Z·G·Zᵀ term, the conditional fitted values Xβ̂ + Σ_terms Z û (n,) and the
    conditional residuals y − fitted (n,)."""
    blups, fitted = {}, X @ beta
    for term in model.random_terms():
        theta_g = theta[term.offset : term.offset + term.G.num_free_params]
        theta_z = theta[term.offset - term.Z.num_free_params : term.offset]
        u = term.G(theta_g) @ term.Z.transpose_times(theta_z, p_y)
        blups[term.name] = u
        fitted = fitted + term.Z.times(theta_z, u)
    return blups, fitted, y - fitted


_blocked_conditional_variances = eqx.filter_jit(conditional_variances)


@eqx.filter_jit
def _leading_blocks(model, theta, sizes: tuple[tuple[str, int], ...]):
    """Per named term, the m×m covariance of one group's random effects (the leading block of G(θ))."""
    by_name = {t.name: t for t in model.random_terms()}
    out = {}
    for name, m in sizes:
        term = by_name[name]
        theta_g = theta[term.offset : term.offset + term.G.num_free_params]
        if m == 1:
            out[name] = term.G.build_params(theta_g)[:1].reshape(1, 1)
        else:
            out[name] = term.G(theta_g)[:m, :m]
    return out


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
        return _random_effects(self.model, self.theta, self.p_y, self.X, self.beta, self.y)

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
            variances = _blocked_conditional_variances(self.theta, self.y, self.X, structure, vcov)
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
        from ._bootstrap import bootstrap  # _bootstrap imports _estimate, which imports this module

        return bootstrap(self, n_boot, seed, **options)

    def simulate(self, nsim: int = 1, seed: int = 0):
        """lme4's ``simulate(fit, nsim, seed)``: (nsim, n) responses y* = Xβ̂ + chol(V(θ̂))·z, z ~ N(0, I) from
        ``jax.random.key(seed)`` (the draws ``bootstrap`` refits)."""
        from ._bootstrap import simulate  # _bootstrap imports _estimate, which imports this module

        if int(nsim) < 1:
            raise ValueError(f"nsim must be >= 1, got {nsim!r}")
        return simulate(self, int(nsim), seed)

    def refit(self, y, **options):
        """lme4's ``refit(fit, newresp)``: this model fitted to the response ``y`` (the fit's rows), names kept."""
        from ._bootstrap import refit  # _bootstrap imports _estimate, which imports this module

        return refit(self, y, **options)

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
        fixed_only = _fixed_only(re_form)
        if newdata is None:
            if fixed_only:
                return self.X @ self.beta
            return self._random_effects()[1]
        info = self._info("predict(newdata=...)")
        if not isinstance(newdata, pd.DataFrame):
            raise TypeError(f"newdata must be a pandas DataFrame, got {type(newdata).__name__}")
        if len(newdata) == 0:  # lme4 returns numeric(0)
            return jnp.zeros((0,), dtype=self.beta.dtype)
        X = self._new_matrix(info.fixed_spec, newdata, "fixed part")[:, list(info.fixed_columns)]
        fitted = X @ np.asarray(self.beta)
        if fixed_only:
            return jnp.asarray(fitted)
        blups = self.blup()
        for term_info in info.terms:
            u = np.asarray(blups[term_info.name]).reshape(len(term_info.levels), len(term_info.labels))
            fitted = fitted + self._new_random_part(term_info, u, newdata)
        return jnp.asarray(fitted)

    @staticmethod
    def _new_matrix(spec, newdata: pd.DataFrame, what: str) -> np.ndarray:
        from formulaic.errors import DataMismatchWarning

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", DataMismatchWarning)
                mm = spec.get_model_matrix(newdata, na_action="raise")
        except DataMismatchWarning as err:
            raise ValueError(f"newdata: the {what} has a factor level not seen in the fit: {err}") from err
        except Exception as err:  # formulaic raises several error types for missing columns and values
            raise ValueError(f"newdata: cannot build the {what}: {err}") from err
        return np.asarray(mm, dtype=float).reshape(len(newdata), -1)

    def _new_random_part(self, info: RandomTermInfo, u: np.ndarray, newdata: pd.DataFrame) -> np.ndarray:
        missing = [f for f in info.factors if f not in newdata.columns]
        if missing:
            raise ValueError(f"newdata has no column {missing} (grouping factor of the term {info.name!r})")
        if info.spec is None:
            M = np.ones((len(newdata), 1))
        else:
            M = self._new_matrix(info.spec, newdata, f"random term {info.name!r}")
            if info.columns is not None:
                M = M[:, list(info.columns)]
        names = [_level_candidates(newdata[f]) for f in info.factors]
        position = {level: j for j, level in enumerate(info.levels)}
        rows = np.array([_find_level(position, parts) for parts in zip(*names, strict=True)], dtype=np.int64)
        seen = rows >= 0
        contribution = np.zeros(len(newdata))
        contribution[seen] = np.sum(M[seen] * u[rows[seen]], axis=1)
        return contribution

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
        blocks = _leading_blocks(self.model, self.theta, sizes)
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
                {k: (_json_float(v) if isinstance(v, float) else v) for k, v in row.items()}
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
        from ._inference.profile import bootstrap_confint, profile_confint, wald_confint

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
        from ._inference.profile import profile_table

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
        if np.ndim(self.loglik) != 0:
            return f"FitResult batched over {np.shape(self.loglik)} fits ({self.method.upper()}, {self.algorithm})"
        if ddf is not None:
            ddf = check_ddf(ddf, allow_none=False)
        if self.formula_info is not None and beta_names is None:
            return self._lme4_summary(ddf)
        lines = [f"Formula: {self.formula}"] if self.formula else []
        lines += [
            f"Linear mixed model fit by {self.method.upper()} ({self.algorithm}), "
            f"n = {self.nobs}, {self.message} after {int(self.n_iter)} iterations"
            + (f" ({self.n_dropped} rows with missing values dropped)" if self.n_dropped else ""),
            f"  logLik {float(self.loglik):.4f}   AIC {float(self.aic):.4f}   BIC {float(self.bic):.4f}"
            + ("   (singular: a variance is at its boundary)" if bool(self.singular) else ""),
            "Covariance parameters:",
        ]
        width = max([len(n) for n in self.param_names] + [10])
        se = np.sqrt(np.maximum(np.diagonal(np.asarray(self.vcov_theta)), 0.0))
        for name, theta_se in zip(self.param_names, se, strict=True):
            lines.append(f"  {name:<{width}} {float(self.params[name]):14.6g}   (SE of theta {theta_se:.3g})")
        lines.append("Fixed effects:")
        names = beta_names or self.beta_names or [f"beta[{i}]" for i in range(self.beta.shape[0])]
        width = max([len(n) for n in names] + [10])
        lines.append(f"  {'':<{width}} {'Estimate':>14} {'Std. Error':>12} {'t value':>9}")
        for name, b, s in zip(names, np.asarray(self.beta), np.asarray(self.se_beta), strict=True):
            lines.append(f"  {name:<{width}} {b:14.6g} {s:12.6g} {b / s:9.3f}")
        return "\n".join(lines)

    def _lme4_summary(self, ddf=None) -> str:
        reml = self.method == "reml"
        loglik = float(self.loglik)
        lines = [
            "Linear mixed model fit by " + ("REML" if reml else "maximum likelihood") + " ['lmerMod']",
            f"Formula: {self.formula}",
        ]
        if self.n_dropped:
            lines.append(f"  ({self.n_dropped} rows with missing values dropped)")
        lines.append("")
        if reml:
            lines.append(f"REML criterion at convergence: {-2.0 * loglik:.4f}")
        else:
            values = [float(self.aic), float(self.bic), loglik, -2.0 * loglik]
            cells = [f"{v:.4f}" for v in values] + [str(self.nobs - self.num_params)]
            lines += _table(["AIC", "BIC", "logLik", "deviance", "df.resid"], [cells], left=0)
        if not bool(self.converged):
            lines.append(f"Warning: not converged ({self.message} after {int(self.n_iter)} iterations)")
        if bool(self.singular):
            lines.append("boundary (singular) fit: a variance is at its lower bound")
        lines += ["", "Scaled residuals:"]
        scaled = np.asarray(self.residuals()) / math.sqrt(self.sigma2)
        quantiles = np.quantile(scaled, [0.0, 0.25, 0.5, 0.75, 1.0])
        lines += _table(["Min", "1Q", "Median", "3Q", "Max"], [[f"{q:.4f}" for q in quantiles]], left=0)
        lines += ["", "Random effects:"]
        lines += self._random_effects_table()
        groups = "; ".join(f"{g}, {n}" for g, n in self.ngroups.items())
        lines.append(f"Number of obs: {self.nobs}, groups:  {groups}")
        lines += ["", "Fixed effects:"] if ddf is None else ["", f"Fixed effects ({ddf} df):"]
        if ddf is not None:
            lines += self._ddf_fixed_block(ddf)
        beta, se = np.asarray(self.beta, dtype=float), np.asarray(self.se_beta, dtype=float)
        names = list(self.beta_names)
        columns = [_column(beta.tolist()), _column(se.tolist()), [f"{t:.3f}" for t in (beta / se).tolist()]]
        rows = [[name, *(c[i] for c in columns)] for i, name in enumerate(names)]
        if ddf is None:
            lines += _table(["", "Estimate", "Std. Error", "t value"], rows)
        if len(names) > 1:
            vcov = np.asarray(self.vcov_beta, dtype=float)
            d = np.sqrt(np.diagonal(vcov))
            corr = vcov / np.outer(d, d)
            short = [_abbreviate(n) for n in names]
            rows = [
                [names[i]] + [f"{corr[i, j]:.3f}" if j < i else "" for j in range(len(names) - 1)]
                for i in range(1, len(names))
            ]
            lines += ["", "Correlation of Fixed Effects:"]
            lines += _table(["", *short[:-1]], rows)
        return "\n".join(lines)

    def _ddf_fixed_block(self, ddf: str) -> list[str]:
        """lmerTest's fixed-effects block: Estimate, Std. Error, df, t value, Pr(>|t|)."""
        table = self.coef_table(ddf)
        columns = [
            _column(table["estimate"].tolist()),
            _column(table["se"].tolist()),
            [f"{d:.3f}" for d in table["df"]],
            [f"{t:.3f}" for t in table["t"]],
            [f"{p:.3g}" for p in table["p"]],
        ]
        rows = [[name, *(c[i] for c in columns)] for i, name in enumerate(table.index)]
        return _table(["", "Estimate", "Std. Error", "df", "t value", "Pr(>|t|)"], rows)

    def _random_effects_table(self) -> list[str]:
        blocks = self._ordered_terms()
        any_corr = any(len(info.labels) > 1 for info, _ in blocks)
        rows = []
        for info, block in blocks:
            sd = np.sqrt(np.maximum(np.diagonal(block), 0.0))
            for i, label in enumerate(info.labels):
                row = [info.name if i == 0 else "", label, float(block[i, i]), float(sd[i])]
                corr = []
                for j in range(i):
                    denom = sd[i] * sd[j]
                    corr.append(f"{block[i, j] / denom:.2f}" if denom > 0 else "NaN")
                rows.append((row, corr))
        s2 = self.sigma2
        rows.append((["Residual", "", s2, math.sqrt(max(s2, 0.0))], []))
        variances = _column([r[2] for r, _ in rows])
        sds = _column([r[3] for r, _ in rows])
        width = max([len(c) for _, c in rows] + [0])
        header = ["Groups", "Name", "Variance", "Std.Dev."] + (["Corr"] + [""] * (width - 1) if any_corr else [])
        table = []
        for (row, corr), v, s in zip(rows, variances, sds, strict=True):
            cells = [row[0], row[1], v, s]
            if any_corr:
                cells += corr + [""] * (max(width, 1) - len(corr))
            table.append(cells)
        return [" " + line for line in _table(header, table, left=2)]

    def __str__(self) -> str:
        return self.summary()

    def diagnose(self, tol: float = 1e-6, flat: float = 1e-6):
        """Exact gradient and Hessian of ℓ at θ̂, boundary parameters, curvature and advice in plain words
        (a frozen :class:`jreml._inference.diagnose.Diagnosis`; see that module for the checks)."""
        from ._inference.diagnose import diagnose

        return diagnose(self, tol=tol, flat=flat)


def _fixed_only(re_form) -> bool:
    """lme4's ``re.form``: None → all random terms; False / NA / ``~0`` → none."""
    if re_form is None:
        return False
    if re_form is False:
        return True
    if isinstance(re_form, str) and re_form.replace(" ", "") in ("~0", "NA", "0"):
        return True
    raise ValueError(f"re_form={re_form!r}: only None (all random terms) and False / '~0' (none) are supported")
