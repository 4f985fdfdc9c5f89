"""Working memory of one response in a vmapped chunk, per back end: the batch engine sizes its chunks by it
(``_batch.chunk_for``)."""

from __future__ import annotations

from .mme import mme_structure
from .select import select_backend
from .sparse import sparse_bytes, sparse_structure


def bytes_per_response(model, p: int, spectral: bool, dense: bool | None = None) -> int:
    """Working memory of one response in a vmapped chunk, in bytes (float64; a measured rule of thumb), on the
    spectral path (``spectral``), else on the back end ``select_backend`` chooses for the model (``dense``: whether
    that is the dense path, when the caller knows it already from the fit's options; None asks with the defaults).

    Spectral path: (p + 4)·n numbers (the rotated response and its moments). Mixed-model equations (q random
    effects): (4 + k)·q² + (2p + 2k + 4)·n; their blocked sparse form: ``sparse_bytes``. Dense path: (4 + 3k)·n²,
    V, its factor and inverse and, for each of the k parameters, ∂V/∂θ_j and the products that build it. XLA's
    memory analysis of the vmapped program, per extra response, for k = 3: 11.6–13.2 n² for relationship-matrix
    terms Z·σ²K·Zᵀ (n = 150–400), 5.1–6.2 n² for FixedMatrix terms (n = 300–600). The model's own constant
    matrices (K, Z) are shared and not counted.
    """
    n, k = model.shape[0], model.num_free_params
    if spectral:
        return 8 * (p + 4) * n
    choice = None if dense else select_backend(model)
    if dense is None:
        dense = choice.dense
    if choice is not None and choice.name == "sparse":  # the blocked equations (``_backends.sparse.sparse_bytes``)
        return sparse_bytes(sparse_structure(model), p, k)
    structure = None if dense else mme_structure(model)
    if structure is not None:
        q = structure.q
        # A heteroscedastic residual rebuilds ZᵀR⁻¹Z per evaluation from an n×q copy of Z scaled by R⁻¹.
        scaled_z = 2 * n * q if structure.heteroscedastic else 0
        return 8 * ((4 + k) * q * q + (2 * p + 2 * k + 4) * n + scaled_z)
    return 8 * (4 + 3 * k) * n * n
