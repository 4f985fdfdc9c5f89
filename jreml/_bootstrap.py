"""Parametric bootstrap of a fit: simulate y* ~ N(Xβ̂, V(θ̂)), refit the replicates in chunks (one vmapped call each)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from ._backends.spectral import decompose, fit_rotated, rotate, spectral_form
from ._batch import DENSE_CPU_CHUNK, MAX_AUTO_CHUNK, batch_form, runs_dense, takes_spectral_path
from ._estimate import estimate
from ._result import register_refitting, simulate
from ._result.many import ManyFits
from ._sharding import device_count, in_pieces, on_cpu, pad_batch, padded_size, shard_batch
from ._solvers.second_tries import BATCH_FIELDS, refine_batch

__all__ = ["BootstrapResult", "bootstrap", "simulate"]


@dataclass
class BootstrapResult(ManyFits):
    """Refits of ``n_boot`` simulated responses: the fields of every batch of fits (``ManyFits``), arrays with a
    leading replicate axis, and ``estimate``, the original fit's parameters by name."""

    estimate: dict

    def to_frame(self) -> pd.DataFrame:
        """One row per replicate: variance components (by parameter name), fixed effects, loglik, converged."""
        cols = {name: self.params[:, j] for j, name in enumerate(self.param_names)}
        cols.update({name: self.beta[:, j] for j, name in enumerate(self.beta_names)})
        cols["loglik"] = self.loglik
        cols["converged"] = self.converged
        return pd.DataFrame(cols)

    def ci(self, level: float = 0.95, converged_only: bool = True) -> pd.DataFrame:
        """Percentile intervals of every parameter (rows: parameters; columns: estimate, lower, upper).

        Replicates that did not converge are left out unless ``converged_only=False``.
        """
        if not 0 < level < 1:
            raise ValueError(f"level must be in (0, 1), got {level}")
        frame = self.to_frame()
        if converged_only:
            frame = frame[frame.converged]
        names = [*self.param_names, *self.beta_names]
        alpha = (1.0 - level) / 2.0
        values = frame[names].to_numpy(float)
        lower = np.quantile(values, alpha, axis=0) if len(values) else np.full(len(names), np.nan)
        upper = np.quantile(values, 1.0 - alpha, axis=0) if len(values) else np.full(len(names), np.nan)
        pct = f"{100 * alpha:g} %", f"{100 * (1 - alpha):g} %"
        return pd.DataFrame(
            {"estimate": [self.estimate[n] for n in names], pct[0]: lower, pct[1]: upper}, index=pd.Index(names)
        )


#: Replicates per vmapped call and device when ``chunk_size="auto"``. A vmapped while-loop runs every replicate
#: of a chunk until its slowest one stops, so on CPU (where a batched iteration costs about B single ones) small
#: chunks waste least: sleepstudy, 1,000 replicates on 2 cores, warm: 0.18-0.19 s with chunks of 8-16, 0.2 s (32),
#: 0.3 s (128), 0.65 s (all 1,000 at once). Large CPU chunks also risk a deadlock of XLA's CPU thread pool in
#: jaxlib 0.10's batched LAPACK kernels (seen with penicillin, chunks of 128, 2 cores). On an accelerator a
#: batched iteration costs about as much as one.
CPU_CHUNK = 16
ACCELERATOR_CHUNK = 1024


@eqx.filter_jit
def _refit(model, Ystar, X, theta0, method, algorithm, options):
    """Vmapped ``estimate`` of the replicates Ystar (B, n) from θ₀ (B, k)."""

    def one(y, start):
        fit = estimate(model, y, X, start, method=method, algorithm=algorithm, throw=False, **dict(options))
        # Only what BootstrapResult keeps (and refine_batch reads): the per-iteration history and the final
        # information are left out of the program (dead-code elimination) instead of being carried through every
        # vmapped iteration.
        return {field: getattr(fit, field) for field in BATCH_FIELDS}

    return jax.vmap(one)(Ystar, theta0)


def _refit_all(model, Ystar, X, fit, size: int, options: tuple) -> dict:
    """All replicates Ystar (B, n) refitted from θ̂ in padded chunks of ``size``, then ``estimate``'s second tries
    (``refine_batch``) for the replicates that need them, gathered into as few chunks: each replicate's fit is the
    one ``estimate`` keeps on its own."""
    algorithm = fit.algorithm.split("+")[0]  # "ai+newton": the fit's own algorithm was AI
    padded = padded_size(size)

    def run(index, theta0, algorithm):
        def piece(start, stop):
            sub = pad_batch(Ystar[index[start:stop]], padded)
            begin = pad_batch(np.asarray(theta0[start:stop]), padded)
            res = _refit(
                model, shard_batch(jnp.asarray(sub)), X, shard_batch(jnp.asarray(begin)), fit.method, algorithm, options
            )
            return {key: np.asarray(value)[: stop - start] for key, value in res.items()}

        return in_pieces(len(index), size, piece)

    everyone = np.arange(len(Ystar))
    first = run(everyone, np.broadcast_to(np.asarray(fit.theta), (len(Ystar), np.shape(fit.theta)[0])), algorithm)
    flags = dict(options)
    return refine_batch(
        run, first, model, algorithm, Ystar, X,
        newton_fallback=flags.get("newton_fallback", True), restart_edge=flags.get("restart_edge", True),
    )  # fmt: skip


def _chunk(chunk_size, n_boot: int, spectral: bool = False, dense: bool = False) -> int:
    """Replicates per call; ``dense``: the model runs on the dense n×n path (``_batch.runs_dense``)."""
    if chunk_size is None:
        return n_boot
    if isinstance(chunk_size, str):
        if chunk_size != "auto":
            raise ValueError(f'chunk_size must be a positive integer, None or "auto", got {chunk_size!r}')
        if spectral:  # every replicate converges in a few cheap iterations: as fit_batch's spectral chunks
            return min(MAX_AUTO_CHUNK, n_boot)
        if not on_cpu():
            per_device = ACCELERATOR_CHUNK
        else:  # as fit_batch's dense chunks (kinship example, backend="dense": 23.5 ms per replicate, 49.6 ms in 16s)
            per_device = DENSE_CPU_CHUNK if dense else CPU_CHUNK
        return min(per_device * device_count(), n_boot)
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return min(int(chunk_size), n_boot)


def bootstrap(fit, n_boot: int, seed: int = 0, *, chunk_size: int | str | None = "auto", **options) -> BootstrapResult:
    """Parametric bootstrap of a :class:`jreml.FitResult` (from ``estimate`` or ``fit``).

    Simulates ``n_boot`` responses from the fitted model (:func:`simulate`) and refits them with vmapped
    :func:`jreml.estimate` calls started at θ̂ (same method and algorithm; ``options`` go to ``estimate``),
    spread over all devices: each replicate's fit is the one ``estimate`` gives on its own. The model is fitted in
    the form ``fit_batch`` fits it (``_batch.batch_form``): low-rank relationship matrices through their factors,
    one full-rank kernel beside other random effects in its eigenbasis; and a model σ²_k·K + σ²_e·I (with only
    options the spectral path knows) by the spectral path, whose global search over σ²_k/σ²_e can find a higher
    mode than a local fit from θ̂. ``chunk_size`` replicates go into one call (all of them for None): ``"auto"``
    takes ``CPU_CHUNK`` per device on CPU, where a chunk costs its size times its slowest replicate's iterations,
    ``ACCELERATOR_CHUNK`` elsewhere, ``DENSE_CPU_CHUNK`` per CPU device on the dense n×n path, and up to 256 on the
    spectral path.
    """
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    n_boot = int(n_boot)
    spectral = takes_spectral_path(fit.model, options)
    form = spectral_form(fit.model) if spectral else None
    Ystar = np.asarray(simulate(fit, n_boot, seed))
    opts = tuple(sorted(options.items()))
    if spectral:
        size = _chunk(chunk_size, n_boot, spectral=True)
        design = decompose(fit.model, fit.X, form)
        Ystar = rotate(design, Ystar)
    else:
        model, rotation = batch_form(fit.model, spectral=False)
        size = _chunk(
            chunk_size, n_boot, dense=runs_dense(model, {"algorithm": fit.algorithm.split("+")[0], **options})
        )
        X = fit.X
        if rotation is not None:  # Uᵀy*, UᵀX: the same likelihood in the kernel's eigenbasis
            Ystar, X = rotation.apply(Ystar, X)
    padded = padded_size(size)
    if spectral:
        parts = []
        for start in range(0, n_boot, size):
            out = fit_rotated(design, pad_batch(Ystar[start : start + size], padded), method=fit.method,
                              place=shard_batch, **options)  # fmt: skip
            m = min(size, n_boot - start)
            res = (out.theta, out.natural_params, out.beta, out.loglik, out.converged, out.n_iter, out.status)
            res += (out.singular,)
            parts.append(jax.tree_util.tree_map(lambda a, m=m: np.asarray(a)[:m], res))
        columns = [np.concatenate(a) for a in zip(*parts, strict=True)]
    else:
        res = _refit_all(model, np.asarray(Ystar), X, fit, size, opts)
        fields = ("theta", "natural_params", "beta", "loglik", "converged", "n_iter", "status")
        columns = [res[field] for field in fields] + [np.any(res["at_boundary"], axis=-1)]
    theta, params, beta, loglik, converged, n_iter, status, singular = columns
    beta_names = fit.beta_names or tuple(f"beta{j}" for j in range(fit.X.shape[1]))
    values = dict(zip(fit.param_names, np.asarray(fit.natural_params).tolist(), strict=True))
    values.update(zip(beta_names, np.asarray(fit.beta).tolist(), strict=True))
    return BootstrapResult(
        param_names=fit.param_names,
        beta_names=tuple(beta_names),
        theta=theta,
        params=params,
        beta=beta,
        loglik=loglik,
        converged=converged,
        n_iter=n_iter,
        status=status,
        singular=singular,
        estimate=values,
    )


def refit(fit, y, **options):
    """lme4's ``refit(fit, newresp)``: the same model and fixed-effects design fitted to another response ``y`` (n,)
    of the fit's rows (same method and algorithm; ``options`` go to :func:`jreml.estimate`), with the fit's names."""
    y = np.asarray(y, dtype=float)
    n = fit.y.shape[-1]
    if y.shape != (n,):
        raise ValueError(f"refit: the new response must have the fit's {n} rows, got shape {y.shape}")
    bad = np.flatnonzero(~np.isfinite(y))
    if bad.size:
        raise ValueError(f"refit: the new response is not finite at row {int(bad[0])} ({bad.size} rows in all)")
    new = estimate(fit.model, y, fit.X, method=fit.method, algorithm=fit.algorithm.split("+")[0], **options)
    return dataclasses.replace(
        new, beta_names=fit.beta_names, formula=fit.formula, n_dropped=fit.n_dropped, formula_info=fit.formula_info
    )


register_refitting(bootstrap=bootstrap, refit=refit)
