"""``fit_batch``: one right-hand side fitted to many responses (thousands of traits) at once."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import NamedTuple

import equinox as eqx
import jax
import numpy as np
import pandas as pd

from ._backends.memory import bytes_per_response
from ._backends.rewrites import KernelRotation, batch_form
from ._backends.select import select_backend
from ._backends.spectral import SpectralDesign, decompose, fit_padded, fit_rotated, rotate, spectral_form
from ._covariance.observed import ObservedRows
from ._covariance.queries import kernel_variance_index
from ._design.build import build_design
from ._estimate import estimate
from ._result.many import ManyFits
from ._sharding import device_count, in_pieces, on_cpu, pad_batch, padded_size, shard_batch
from ._solvers.loop import INVALID_START
from ._solvers.second_tries import refine_batch

__all__ = ["BatchFit", "fit_batch"]

_ROW = "__jreml_row__"


@dataclass
class BatchFit(ManyFits):
    """Per-response results of :func:`fit_batch`, arrays with a leading response axis (T, ...): the fields of every
    batch of fits (``ManyFits``) and ``responses``, ``se_beta``, ``n_obs``, ``h2``/``h2_se``, ``spectral``.

    A response that could not be fitted (too few complete rows, ...) has NaN estimates, ``converged=False``
    and its error in ``errors``.
    """

    responses: list[str]
    se_beta: np.ndarray
    n_obs: np.ndarray
    h2: np.ndarray | None
    h2_se: np.ndarray | None
    spectral: np.ndarray
    method: str
    errors: dict

    def __len__(self) -> int:
        return len(self.responses)

    def to_frame(self) -> pd.DataFrame:
        """One row per response: response, n_obs, loglik, converged, n_iter, singular, variance components
        (the model's parameter names), fixed effects (by name) and, with one known relationship matrix, h2 and
        h2_se."""
        cols: dict = {
            "response": list(self.responses),
            "n_obs": self.n_obs,
            "loglik": self.loglik,
            "converged": self.converged,
            "n_iter": self.n_iter,
            "singular": self.singular,
        }
        for j, name in enumerate(self.param_names):
            cols[name] = self.params[:, j]
        for j, name in enumerate(self.beta_names):
            cols[name] = self.beta[:, j]
        if self.h2 is not None:
            cols["h2"] = self.h2
            cols["h2_se"] = self.h2_se
        return pd.DataFrame(cols)


def _h2(theta, params, vcov_theta, index: int, powers):
    """h² = σ²_K / Σσ² and its delta-method SE from the inverse information of θ (σ²_i = exp(p_i θ_i))."""
    powers = np.asarray(powers)
    total = params.sum(axis=1)
    onehot = np.zeros(params.shape[1])
    onehot[index] = 1.0
    with np.errstate(invalid="ignore", divide="ignore"):
        h2 = params[:, index] / total
        grad = powers[None, :] * params * (onehot[None, :] - h2[:, None]) / total[:, None]
    var = np.einsum("ti,tij,tj->t", grad, vcov_theta, grad)
    return h2, np.sqrt(np.maximum(var, 0.0))


def _as_matrix(data: pd.DataFrame, responses) -> tuple[np.ndarray, list[str]]:
    if isinstance(responses, str):
        responses = [responses]
    if isinstance(responses, list | tuple | pd.Index) and all(isinstance(r, str) for r in responses):
        missing = [r for r in responses if r not in data.columns]
        if missing:
            raise KeyError(f"responses {missing[:10]} are not columns of the data")
        return data[list(responses)].to_numpy(dtype=float), [str(r) for r in responses]
    Y = np.asarray(responses, dtype=float)
    if Y.ndim == 1:
        Y = Y[:, None]
    if Y.ndim != 2 or Y.shape[0] != len(data):
        raise ValueError(f"responses must be column names or an (n, T) array with n = {len(data)} rows, got {Y.shape}")
    return Y, [f"y{j}" for j in range(Y.shape[1])]


def _rhs(formula: str) -> str:
    return formula.split("~", 1)[1].strip() if "~" in formula else formula.strip()


def _chunks(total: int, chunk_size: int):
    return [(s, min(s + chunk_size, total)) for s in range(0, total, chunk_size)]


def _progress(done: int, total: int, width: int = 30):
    filled = int(width * done / max(total, 1))
    sys.stdout.write(f"\rfit_batch [{'#' * filled}{'.' * (width - filled)}] {done}/{total} chunks")
    if done == total:
        sys.stdout.write("\n")
    sys.stdout.flush()


#: Working memory that ``chunk_size="auto"`` aims a chunk at, and the largest automatic chunk.
CHUNK_MEMORY_BYTES = 2 * 2**30
MAX_AUTO_CHUNK = 256


def _auto_chunk(per_response: int) -> int:
    return int(max(1, min(MAX_AUTO_CHUNK, CHUNK_MEMORY_BYTES // max(per_response, 1))))


#: Responses per CPU device in an automatic chunk of the dense path. A dense response's iteration is O(n³) BLAS-3
#: work already, which batching speeds up at most twofold (one evaluation at n = 100: 0.16 ms per lane in a
#: vmapped batch of 64, 0.36 ms alone), while a vmapped while-loop runs every lane until its slowest one stops and
#: ``refine_batch``'s second tries are padded to the chunk. Warm fit_batch, two kernels, 2 cores, seconds per
#: response in chunks of 1 / 8 / all: n = 2,000: 1.95 / 3.8 / - ; n = 800: 0.35 / 0.63 / - ; n = 300: 0.030 /
#: 0.086 / 0.14 (32); n = 100: 0.006 / 0.016 / 0.073 (64); with few singular fits, n = 100: 0.0029 / 0.0030 /
#: 0.0047 and n = 30: 0.0009 / 0.0005 / 0.0006.
DENSE_CPU_CHUNK = 1


def _rerun_width(chunk: int) -> int:
    """Responses per call of ``refine_batch``'s second tries (Newton continuations, restarts) of a chunk: on CPU one
    per device, since the few fits that need them are the long ones (a crawl to a singular G), and a vmapped lane
    costs about as much as a fit alone there (sixty 3×3 random-slope responses, warm: 19 s with second tries padded
    to the chunk of 60, 5 s one at a time); on an accelerator the chunk's own width (its compiled shape)."""
    return device_count() if on_cpu() else chunk


def runs_dense(model, fit_kwargs: dict) -> bool:
    """Whether ``estimate`` with these options evaluates the model on the dense n×n path (``select_backend``)."""
    return select_backend(
        model,
        backend=fit_kwargs.get("backend", "auto"),
        algorithm=fit_kwargs.get("algorithm", "ai"),
        derivatives=fit_kwargs.get("derivatives", "auto"),
    ).dense


def takes_spectral_path(model, options) -> bool:
    """Whether a batch of ``model`` with these options runs on the spectral path (``select_backend``)."""
    return (
        select_backend(
            model,
            backend=options.get("backend", "auto"),
            algorithm=options.get("algorithm", "ai"),
            derivatives=options.get("derivatives", "auto"),
            batch_options=options,
        ).name
        == "spectral"
    )


def chunk_for(model, p: int, spectral: bool, chunk_size, count: int, dense: bool) -> int:
    """Responses per compiled call for ``count`` responses of this model: ``chunk_size``, or for ``"auto"`` about
    ``CHUNK_MEMORY_BYTES`` of working memory (``bytes_per_response``) and, on the dense path (``dense``, from
    ``runs_dense``) on CPU, at most ``DENSE_CPU_CHUNK`` per device."""
    if chunk_size != "auto":
        return min(int(chunk_size), count)
    size = _auto_chunk(bytes_per_response(model, p, spectral, dense))
    if not spectral and dense and on_cpu():
        size = min(size, DENSE_CPU_CHUNK * device_count())
    return min(size, count)


class _Group(NamedTuple):
    """Responses of one missingness pattern: their columns, their complete rows and how to fit them.

    A spectral group keeps only its kernel's eigenvalues, the rotated X and the rotated responses (``spectral_design``
    without U, ``rotated``), not the design: with one pattern per response, designs and eigenvectors (n² numbers
    each) would otherwise all be held at once. Other groups keep their design and the model as fitted.
    """

    cols: list[int]
    rows: np.ndarray
    size: int  # responses per chunk
    spectral: bool
    design: object = None
    model: object = None  # the model as fitted (``batch_form``)
    rotation: KernelRotation | None = None
    spectral_design: SpectralDesign | None = None
    rotated: np.ndarray | None = None  # (T_g, n_g): Uᵀy of each response
    # (T_g, n_g): each response's observed rows, when the group's responses have several missingness patterns and
    # share one design of n_g rows (``_shared_design_group``); None when all are observed on all n_g rows.
    observed: np.ndarray | None = None
    patterns: int = 1
    dense: bool = False  # evaluated on the dense n×n path (``runs_dense``), not the mixed-model equations

    @property
    def chunks(self):
        return _chunks(len(self.cols), self.size)

    def describe(self) -> str:
        how = "spectral" if self.spectral else ("dense" if self.dense else "mixed-model equations")
        if self.rotation is not None:
            how += " (in the kernel's eigenbasis)"
        shared = "" if self.observed is None else f" of {self.patterns} missingness patterns fitted together"
        return f"{len(self.cols)} responses{shared}, n = {len(self.rows)}, {how} path, chunks of {self.size}"

    def run(self, Y, method: str, fit_kwargs: dict):
        """Fit the group chunk by chunk: yields (response indices, results, n_obs) per chunk."""
        if self.spectral:
            Yg, X = self.rotated, None
        else:
            Yg, X = Y[np.ix_(self.rows, self.cols)].T, self.design.X  # (T_g, n_g)
            if self.observed is not None:
                Yg = np.where(self.observed, Yg, 0.0)  # the unobserved rows' NaN: placeholders of ObservedRows
        if self.rotation is not None:
            Yg, X = self.rotation.apply(Yg, X)
        padded = padded_size(self.size)
        for start, stop in self.chunks:
            block = pad_batch(Yg[start:stop], padded)
            m = stop - start
            if self.spectral:
                res = fit_rotated(self.spectral_design, block, method=method, place=shard_batch, **fit_kwargs)
                yield np.asarray(self.cols[start:stop]), _fields(res, m), len(self.rows)
                continue
            masks = None if self.observed is None else pad_batch(self.observed[start:stop], padded)
            options = tuple(sorted(fit_kwargs.items()))
            fields = _fields(_dense_batch(self.model, shard_batch(block), X, method, options, None, _placed(masks)), m)

            def rerun(index, theta0, algorithm, block=block, masks=masks):
                """``estimate``'s second tries for some of the chunk's responses, in calls of ``_rerun_width``."""
                options = tuple(sorted({**fit_kwargs, "algorithm": algorithm}.items()))
                width = _rerun_width(padded)

                def piece(first, last):
                    part = index[first:last]
                    Y_sub, theta_sub = pad_batch(block[part], width), pad_batch(theta0[first:last], width)
                    masks_sub = None if masks is None else pad_batch(masks[part], width)
                    res = _dense_batch(
                        self.model, shard_batch(Y_sub), X, method, options, shard_batch(theta_sub), _placed(masks_sub)
                    )
                    return _fields(res, len(part))

                return in_pieces(len(index), width, piece)

            fields = refine_batch(
                rerun, fields, self.model, _algorithm_name(fit_kwargs), block[:m], X,
                observed=None if masks is None else masks[:m],
                newton_fallback=fit_kwargs.get("newton_fallback", True),
                restart_edge=fit_kwargs.get("restart_edge", True),
            )  # fmt: skip
            n_obs = len(self.rows) if self.observed is None else self.observed[start:stop].sum(axis=1)
            yield np.asarray(self.cols[start:stop]), fields, n_obs


def _design_on_rows(rhs, data, relmat, rows):
    """The design of the right-hand side on the data's rows where ``rows`` (n,) is true (and the covariates are
    complete): its y holds each kept row's index into the data."""
    row_index = np.where(rows, np.arange(len(data), dtype=float), np.nan)
    return build_design(f"{_ROW} ~ {rhs}", data.assign(**{_ROW: row_index}), relmat)


def _announce(group, per_response: int) -> None:
    print(f"fit_batch: {group.describe()}, ≈ {per_response / 2**20:.3g} MiB working memory per response")


def _shared_design_group(rhs, data, relmat, ok, patterns: list[list[int]], spectral, fit_kwargs, chunk_size):
    """(design, group, responses left) for the responses of several missingness patterns (``patterns``: the
    response columns of each) that can share one design: built on every row that some response observes, each
    response fitted on its own rows through ``ObservedRows`` (the same likelihood as a design of those rows alone),
    so that all of them run in one compiled program instead of one per number of complete rows. ``left`` holds
    the first response of each pattern whose rows leave X rank deficient (or n ≤ p): those keep designs of their
    own (a dropped level changes the fixed effects). None when the batch has one pattern, or the shared model
    takes the spectral path or a kernel's eigenbasis (rotations that depend on the rows)."""
    if len(patterns) < 2:
        return None
    try:
        design = _design_on_rows(rhs, data, relmat, ok[:, [cols[0] for cols in patterns]].any(axis=1))
    except Exception:  # the patterns' own designs report what is wrong
        return None
    if takes_spectral_path(design.model, fit_kwargs) if spectral is None else spectral:
        return None
    model, rotation = batch_form(design.model, False)
    if rotation is not None:
        return None
    rows = design.y.astype(int)
    X = np.asarray(design.X, dtype=float)
    p = X.shape[1]
    members, left, masks = [], set(), []
    for cols in patterns:
        observed = ok[rows, cols[0]]
        n_obs = int(observed.sum())
        if n_obs <= p or np.linalg.matrix_rank(X[observed]) < p:
            left.add(cols[0])
            continue
        members += cols
        masks.append(np.broadcast_to(observed, (len(cols), len(rows))))
    if not members:
        return None
    dense = runs_dense(model, fit_kwargs)
    size = chunk_for(model, p, False, chunk_size, len(members), dense)
    count = len(masks)
    group = _Group(
        members, rows, size, False, design, model, observed=np.concatenate(masks), patterns=count, dense=dense
    )
    return design, group, left


class _PaddedGroups(NamedTuple):
    """Spectral groups of several missingness patterns, fitted together: each response's rotated values padded with
    zeros to the longest pattern (``fit_padded``), one compiled program instead of one per number of rows."""

    groups: list[_Group]
    size: int
    spectral = True

    @property
    def chunks(self):
        return _chunks(sum(len(g.cols) for g in self.groups), self.size)

    def describe(self) -> str:
        return (
            f"the {sum(len(g.cols) for g in self.groups)} responses of {len(self.groups)} missingness patterns on the "
            f"spectral path fitted together (padded to n = {max(len(g.rows) for g in self.groups)}), chunks of "
            f"{self.size}"
        )

    def run(self, Y, method: str, fit_kwargs: dict):
        length = max(len(g.rows) for g in self.groups)
        columns, designs, rotated, counts = [], [], [], []
        for g in self.groups:
            rotated.append(np.pad(g.rotated, ((0, 0), (0, length - len(g.rows)))))
            columns += list(g.cols)
            designs += [g.spectral_design] * len(g.cols)
            counts += [len(g.rows)] * len(g.cols)
        rotated = np.concatenate(rotated)
        padded = padded_size(self.size)
        for start, stop in self.chunks:
            block = pad_batch(rotated[start:stop], padded)
            chunk_designs = designs[start:stop] + [designs[start]] * (padded - (stop - start))  # as pad_batch does
            res = fit_padded(chunk_designs, block, method=method, place=shard_batch, **fit_kwargs)
            yield np.asarray(columns[start:stop]), _fields(res, stop - start), np.asarray(counts[start:stop])


#: ``verbose=1`` describes at most this many groups of responses (missingness patterns).
MAX_GROUPS_SHOWN = 10


#: (BatchFit's array, the fit's field) copied per response.
_STORED = (
    ("theta", "theta"),
    ("params", "natural_params"),
    ("vcov_theta", "vcov_theta"),
    ("beta", "beta"),
    ("se_beta", "se_beta"),
    ("loglik", "loglik"),
    ("converged", "converged"),
    ("n_iter", "n_iter"),
    ("status", "status"),
    ("singular", "singular"),
)


def _fields(res, m: int) -> dict:
    """The first m responses' results of a chunk (padded rows dropped) as numpy arrays by field name (with
    ``at_boundary`` where the fit has it)."""
    names = [field for _, field in _STORED] + (["at_boundary"] if hasattr(res, "at_boundary") else [])
    return {name: np.asarray(getattr(res, name))[:m] for name in names}


def _store(out: dict, idx, fields: dict, n_obs, spectral: bool) -> None:
    """Copy one chunk's results (``_fields``) into the per-response arrays at ``idx``."""
    for key, field in _STORED:
        out[key][idx] = fields[field]
    out["n_obs"][idx] = n_obs
    out["spectral"][idx] = spectral


def _algorithm_name(fit_kwargs: dict) -> str:
    algorithm = fit_kwargs.get("algorithm", "ai")
    return algorithm if isinstance(algorithm, str) else algorithm.name


def _placed(masks):
    return None if masks is None else shard_batch(masks)


@eqx.filter_jit
def _dense_batch(model, Yc, X, reml_method, options, theta0, observed=None):
    """Vmapped ``estimate`` over the responses Yc (B, n), from θ₀ (B, k) or, with None, the default start; with
    ``observed`` (B, n), each response is fitted on its own rows (``ObservedRows``)."""

    def fit(y, t, rows):
        on_rows = model if rows is None else ObservedRows(model, rows)
        return estimate(on_rows, y, X, t, method=reml_method, throw=False, **dict(options))

    return jax.vmap(fit, in_axes=(0, None if theta0 is None else 0, None if observed is None else 0))(
        Yc, theta0, observed
    )


def fit_batch(
    formula: str,
    data: pd.DataFrame,
    responses,
    *,
    method: str = "reml",
    relmat: dict | None = None,
    chunk_size: int | str = "auto",
    spectral: bool | None = None,
    verbose: int = 0,
    **fit_kwargs,
) -> BatchFit:
    """Fit the right-hand side of ``formula`` to many responses; one compiled, vmapped program per shape.

    Args:
        formula: ``"y ~ x + (1 | g)"`` (the left-hand side is ignored) or just the right-hand side.
        data: a DataFrame with the covariates (and the responses, when given by name).
        responses: a list of column names, or an (n, T) array aligned with ``data``'s rows.
        relmat: as in :func:`jreml.fit` (``{"g": K}`` for ``(1 | g)``).
        chunk_size: responses per compiled call; chunks are padded to one shape. ``"auto"`` (default) keeps a
            chunk's working memory near 2 GiB (``bytes_per_response``): up to 256 responses, 5 for the dense
            path at n = 2,000 with three variance components; on CPU the dense path fits one response per device
            per call (``DENSE_CPU_CHUNK``: vmapped lanes would wait for the slowest, for little gain).
        spectral: ``None`` (default) uses the spectral fast path when the model is σ²_k·K + σ²_e·I and every
            option is one it understands; ``False`` forces the dense vmapped ``estimate``.
        verbose: 1 prints the path, the working memory per response and the chunk size of each group of
            responses, then a progress bar over chunks.
        fit_kwargs: options for :func:`jreml.estimate` (``max_iter``, ``tol_score``, ...).

    Paths, chosen per group of responses: the spectral one (σ²_k·K + σ²_e·I: one eigendecomposition, O(n·p²) per
    iteration); the mixed-model equations, after relationship matrices of rank ≤ q/2 are rewritten as their factors
    (``_low_rank_kernels``) and, where one full-rank kernel remains beside q ≤ n/2 other random effects, after the
    data are rotated into that kernel's eigenbasis (``_rotate_kernel``: one O(n³) eigendecomposition, then
    O(n·q² + q³) per iteration); otherwise the dense O(n³) path. All give the same fits as separate ``jreml.fit``
    calls.

    Responses with missing values are fitted on their own complete rows (``n_obs`` says how many). On the spectral
    path each missingness pattern gets its own eigendecomposition, and all patterns share one compiled program
    (their rotated data padded to one length, ``fit_padded``). On the mixed-model-equations and dense paths all
    patterns share one design, built on every row some response observes, and one compiled program: each response
    is fitted as ``ObservedRows(model, its rows)``, whose likelihood is that of its rows alone. A pattern whose rows
    leave X rank deficient (a fixed factor's level unobserved) keeps a design of its own, as do the patterns of a
    model fitted in a kernel's eigenbasis (the rotation depends on the rows). The batch axis is spread over all
    ``jax.devices()``.
    """
    if not isinstance(data, pd.DataFrame):
        raise TypeError(f"data must be a pandas DataFrame, got {type(data).__name__}")
    if chunk_size != "auto" and (not isinstance(chunk_size, int | np.integer) or chunk_size < 1):
        raise ValueError(f"chunk_size must be 'auto' or an integer >= 1, got {chunk_size!r}")
    Y, names = _as_matrix(data, responses)
    T = Y.shape[1]
    if T == 0:
        raise ValueError("fit_batch: responses is empty; give at least one (a column name, or an (n, T) array)")
    rhs = _rhs(formula)
    if _ROW in data.columns:
        raise ValueError(f"the data may not have a column named {_ROW!r}")
    ok = np.isfinite(Y)
    patterns: dict[bytes, list[int]] = {}
    for j in range(T):
        patterns.setdefault(np.packbits(ok[:, j]).tobytes(), []).append(j)

    # Several missingness patterns on the mixed-model-equations or dense path: one design on every row that some
    # response observes, each response fitted on its own rows of it (``ObservedRows``), one compiled program.
    first, failures, errors, plan = None, [], {}, []
    shared = _shared_design_group(rhs, data, relmat, ok, list(patterns.values()), spectral, fit_kwargs, chunk_size)
    if shared is not None:
        first, group, left = shared
        if verbose:
            _announce(group, bytes_per_response(group.model, group.design.X.shape[1], False, group.dense))
        plan.append(group)
        patterns = {key: cols for key, cols in patterns.items() if cols[0] in left}

    # One pass over the patterns: a spectral group is reduced to its rotated data at once (see ``_Group``).
    for cols in patterns.values():
        try:
            design = _design_on_rows(rhs, data, relmat, ok[:, cols[0]])
        except Exception as err:  # e.g. a pattern leaving too few rows or levels: these responses fail alone
            failures.append(err)
            errors.update({names[j]: str(err) for j in cols})
            continue
        if first is None:
            first = design
        elif design.model.param_names != first.model.param_names or design.beta_names != first.beta_names:
            errors.update(
                {names[j]: "its complete rows give a different model (parameters or fixed effects)" for j in cols}
            )
            continue
        rows = design.y.astype(int)
        use_spectral = takes_spectral_path(design.model, fit_kwargs) if spectral is None else spectral
        form = spectral_form(design.model) if use_spectral else None
        if use_spectral and form is None:
            raise ValueError("spectral=True needs a model sigma2_k * K + sigma2_e * I")
        fitted_model, rotation = batch_form(design.model, use_spectral)
        dense = not use_spectral and runs_dense(fitted_model, fit_kwargs)
        per_response = bytes_per_response(fitted_model, design.X.shape[1], use_spectral, dense)
        size = chunk_for(fitted_model, design.X.shape[1], use_spectral, chunk_size, len(cols), dense)
        if use_spectral:
            sdesign = decompose(design.model, design.X, form)
            rotated = rotate(sdesign, Y[np.ix_(rows, cols)].T)
            compact = sdesign._replace(U=None, form=sdesign.form._replace(kernel=None))  # no n_g² arrays kept
            group = _Group(cols, rows, size, True, spectral_design=compact, rotated=rotated)
        else:
            group = _Group(cols, rows, size, False, design, fitted_model, rotation, dense=dense)
        if verbose and len(plan) < MAX_GROUPS_SHOWN:
            _announce(group, per_response)
        plan.append(group)
    if first is None:
        raise ValueError(f"no response could be set up: {failures[0]}")
    k, p = first.model.num_free_params, first.X.shape[1]
    out = {
        "theta": np.full((T, k), np.nan),
        "params": np.full((T, k), np.nan),
        "vcov_theta": np.full((T, k, k), np.nan),
        "beta": np.full((T, p), np.nan),
        "se_beta": np.full((T, p), np.nan),
        "loglik": np.full(T, np.nan),
        "converged": np.zeros(T, bool),
        "n_iter": np.zeros(T, int),
        "status": np.full(T, INVALID_START),
        "singular": np.zeros(T, bool),
        "n_obs": np.zeros(T, int),
        "spectral": np.zeros(T, bool),
    }
    h2_info = kernel_variance_index(first.model)
    if verbose and len(plan) > MAX_GROUPS_SHOWN:
        print(f"fit_batch: … {len(plan) - MAX_GROUPS_SHOWN} more groups (missingness patterns)")
    # Several missingness patterns on the spectral path: one program for all of them, each response's rotated
    # values padded to the longest pattern (``fit_padded``), instead of one compilation per number of rows.
    spectral_groups = [group for group in plan if group.spectral]
    jobs: list[_Group | _PaddedGroups] = list(plan)
    if len(spectral_groups) > 1:
        jobs = [group for group in plan if not group.spectral]
        size = _auto_chunk(bytes_per_response(first.model, p, spectral=True)) if chunk_size == "auto" else chunk_size
        jobs.append(_PaddedGroups(spectral_groups, min(size, sum(len(g.cols) for g in spectral_groups))))
        if verbose:
            print(f"fit_batch: {jobs[-1].describe()}")
    total_chunks = sum(len(job.chunks) for job in jobs)
    done = 0
    for job in jobs:
        for idx, res, n_obs in job.run(Y, method, fit_kwargs):
            _store(out, idx, res, n_obs, job.spectral)
            done += 1
            if verbose:
                _progress(done, total_chunks)
    h2 = h2_se = None
    if h2_info is not None:
        h2, h2_se = _h2(out["theta"], out["params"], out["vcov_theta"], *h2_info)
    return BatchFit(
        responses=names,
        param_names=first.model.param_names,
        beta_names=first.beta_names,
        theta=out["theta"],
        params=out["params"],
        beta=out["beta"],
        se_beta=out["se_beta"],
        loglik=out["loglik"],
        converged=out["converged"],
        n_iter=out["n_iter"],
        status=out["status"],
        singular=out["singular"],
        n_obs=out["n_obs"],
        h2=h2,
        h2_se=h2_se,
        spectral=out["spectral"],
        method=method,
        errors=errors,
    )
