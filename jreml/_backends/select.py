"""The one decision point: which back end evaluates a model (``select_backend``).

Every entry point asks it — ``estimate`` (and so ``fit``), ``fit_batch``, ``bootstrap`` and the batch memory
estimate — so a model runs on the same back end whichever way it is fitted, and a new back end is added here and in
its structure query only (see docs/architecture.md, "Adding a back end").
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from .._covariance.base import AbstractCovariance
from .._covariance.queries import spectral_terms
from .._solvers import as_algorithm
from .._solvers.defaults import SPECTRAL_MATCHES
from .mme import mme_structure
from .sparse import sparse_structure

#: The ``backend=`` values of ``estimate`` and ``fit``.
BACKENDS = ("auto", "dense", "mme", "sparse")

#: From this many random effects on, "auto" solves the equations of a model with the blocked form on the sparse
#: back end: the dense q×q factor of "mme" costs O(q³) per evaluation and n·q numbers of memory, the blocked one
#: O(r²·q₁ + r³) (r: the random effects outside the largest term). Below it both are a few milliseconds.
SPARSE_MIN_Q = 200

#: Options the spectral path of ``fit_batch``/``bootstrap`` has (with ``estimate``'s defaults,
#: ``_solvers.defaults.DEFAULTS``); a batch given another option runs on the general loop, unless the option has the
#: value the spectral path matches (``SPECTRAL_MATCHES``: ``algorithm="ai"``, ``verbose=0``, ...).
SPECTRAL_OPTIONS = frozenset({"max_iter", "max_halvings", "min_iter", "tol_score", "tol_delta", "tol_loglik"})


def _spectral_accepts(options: dict) -> bool:
    """Whether the spectral path honours every one of a batch's options."""
    for key, value in options.items():
        if key in SPECTRAL_OPTIONS:
            continue
        if key not in SPECTRAL_MATCHES:
            return False
        if key == "algorithm":
            value = as_algorithm(value).name
        if not isinstance(value, str | int | float) or value != SPECTRAL_MATCHES[key]:
            return False
    return True


def spectral_options(options: dict) -> dict:
    """The options of the spectral fit among ``options`` (``SPECTRAL_OPTIONS``); the others must have the values
    it matches (``SPECTRAL_MATCHES``), else a ValueError names the first that does not."""
    for key, value in options.items():
        if key not in SPECTRAL_OPTIONS and not _spectral_accepts({key: value}):
            matched = f"only {key}={SPECTRAL_MATCHES[key]!r}" if key in SPECTRAL_MATCHES else "no such option"
            raise ValueError(f"the spectral fit cannot take {key}={value!r} ({matched}); use fit_batch(spectral=False)")
    return {key: value for key, value in options.items() if key in SPECTRAL_OPTIONS}


_SPARSE_FORM = (
    'backend="sparse" needs V = sum_j Z_j G_j Z_j^T + residual with each Z_j a factor\'s codes (DummyMatrix or '
    "GroupedColumns) and G_j = I (x) B_j (Scalar, Diagonal, Identity, or Kronecker(Identity, B)): the random terms "
    "of an lme4 formula without relmat"
)

_MME_FORM = (
    'backend="mme" needs V = sum_j Z_j G_j Z_j^T + s2*I: a Sum of CovariancePropagation terms with a '
    "DummyMatrix or constant Z and a Scalar/Diagonal/Unstructured/Identity/Kronecker G, plus one "
    "ScalarMatrix(n) residual (and optionally KnownDiagonalMatrix(d) terms)"
)


class BackendChoice(NamedTuple):
    """The back end that evaluates a model, and why.

    ``name``: "dense" (Cholesky of the n×n V, O(n³) per evaluation), "mme" (the mixed-model equations, q×q
    factors, O(n·q² + q³)), "sparse" (the blocked equations: a diagonal block, a sparse cross block and a dense
    Schur block, see ``_backends.sparse``) or "spectral" (one eigendecomposition of the kernel, then O(n·p²) per
    evaluation; batches only). ``q``: the number of random effects of the mixed-model-equations form (None
    without that form).
    """

    name: Literal["dense", "mme", "sparse", "spectral"]
    reason: str
    q: int | None = None

    @property
    def dense(self) -> bool:
        return self.name == "dense"


def choose(
    backend: str,
    q: int | None,
    n: int,
    information: str,
    derivatives: str,
    spectral: bool = False,
    batch_options=None,
    blocked: bool = False,
) -> BackendChoice:
    """``select_backend``'s rules on what it has found out about the model (``q`` from ``mme_structure``,
    ``blocked`` from ``sparse_structure``, ``spectral`` from ``spectral_terms``), for callers that cache those
    (``estimate``)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "mme" and q is None:
        raise ValueError(_MME_FORM)
    if backend == "sparse" and not blocked:
        raise ValueError(_SPARSE_FORM)
    if batch_options is not None and spectral and _spectral_accepts(batch_options):
        return BackendChoice("spectral", "V = s2_k*K + s2_e*I fitted in batches: one eigendecomposition of K", q)
    if backend == "dense":
        return BackendChoice("dense", 'backend="dense" was asked for', q)
    if information == "fisher":
        return BackendChoice("dense", "the Fisher information needs the n x n matrices dV/dtheta", q)
    if derivatives != "auto":
        return BackendChoice("dense", f'derivatives="{derivatives}" builds the n x n matrices dV/dtheta', q)
    if q is None:
        return BackendChoice("dense", "the model is not sum_j Z_j G_j Z_j^T + residual with fixed Z_j", q)
    if backend == "auto" and q >= n:
        return BackendChoice("dense", f"q = {q} random effects for n = {n} observations (q >= n)", q)
    if backend == "sparse":
        return BackendChoice("sparse", 'backend="sparse" was asked for', q)
    if backend == "mme":
        return BackendChoice("mme", 'backend="mme" was asked for', q)
    if blocked and q >= SPARSE_MIN_Q:
        return BackendChoice("sparse", f"q = {q} >= {SPARSE_MIN_Q} random effects in the blocked form", q)
    return BackendChoice("mme", f"q = {q} random effects < n = {n} observations", q)


def equations_form(model) -> tuple[int | None, bool]:
    """The facts ``choose`` needs about a model's equations form: (q, the number of random effects when the q×q
    equations can evaluate it, else None; whether it has the blocked form of the sparse ones)."""
    structure = mme_structure(model)
    q = None if structure is None else structure.q
    return q, structure is not None and sparse_structure(model) is not None


def select_backend(
    model: AbstractCovariance,
    *,
    backend: str = "auto",
    algorithm="ai",
    derivatives: str = "auto",
    batch_options: dict | None = None,
) -> BackendChoice:
    """The back end that ``estimate``, ``fit``, ``fit_batch`` and ``bootstrap`` use for ``model``.

    Rules, in order (the first that applies decides):

    1. ``backend`` must be "auto", "dense", "mme" or "sparse"; "mme" or "sparse" for a model without that form is
       an error.
    2. In a batch (``batch_options``: the options given to ``fit_batch`` or ``bootstrap``, ``None`` for a single
       fit), a model V = σ²_k·K + σ²_e·I runs on the **spectral** path, unless an option outside
       ``SPECTRAL_OPTIONS`` is given at a value the spectral fit does not match (``algorithm="fisher"``,
       ``backend="dense"``, ``check_score=False``, ...: ``SPECTRAL_MATCHES`` lists the values it matches).
    3. ``backend="dense"``, ``algorithm="fisher"`` (the expected information needs every ∂V/∂θ as an n×n
       matrix) and ``derivatives`` other than "auto" run **dense**.
    4. A model Σ_j Z_j G_j Z_jᵀ + σ²I (+ known diagonals) with fixed Z_j and q = Σ q_j random effects runs on the
       **mixed-model equations** when q < n (or whenever ``backend="mme"`` / ``"sparse"``): on the blocked
       **sparse** ones when every Z_j is a factor's codes with G_j = I ⊗ B_j (``sparse_structure``: the terms of
       an lme4 formula without relmat) and q ≥ ``SPARSE_MIN_Q``, else on the dense q×q ones (**mme**).
    5. Anything else runs **dense**.

    Args:
        model: the covariance model (n×n).
        backend, algorithm, derivatives: the options of the same names of :func:`jreml.estimate`.
        batch_options: the options of a batched fit (``fit_batch``, ``bootstrap``), or None for a single fit.

    Returns:
        :class:`BackendChoice` (``name``, ``reason``, ``q``).
    """
    q, blocked = equations_form(model)
    spectral = batch_options is not None and spectral_terms(model) is not None
    information = as_algorithm(algorithm).information
    return choose(backend, q, model.shape[0], information, derivatives, spectral, batch_options, blocked)
