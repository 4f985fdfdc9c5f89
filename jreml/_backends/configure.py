"""From ``select_backend``'s choice to a back-end object: what a back end decides on the host before tracing
(``host_configuration``) and its construction with a fit's options (``backend_for``)."""

from __future__ import annotations

from .base import AbstractBackend
from .dense import DenseBackend
from .equations import EQUATIONS, EquationsBackend
from .mme import mme_structure, static_block_diagonal
from .sparse import check_memory, sparse_pattern, sparse_structure


def host_configuration(name: str, model, p: int, traced: bool):
    """(block_diagonal, pattern) of back end ``name`` for ``model`` with p fixed effects: the q×q equations'
    static block decision (``mme.static_block_diagonal``; None when the model's arrays are traced) and the blocked
    equations' sparse L₂₁ pattern (``sparse.sparse_pattern``, after ``sparse.check_memory`` refused a model whose
    blocks would not fit; None under a transform of the model, then L₂₁ is dense)."""
    block_diagonal = pattern = None
    if name == "mme" and not traced:
        block_diagonal = static_block_diagonal(mme_structure(model))
    if name == "sparse":
        blocked_form = sparse_structure(model)
        check_memory(blocked_form, p, model.num_free_params)
        pattern = sparse_pattern(blocked_form)
    return block_diagonal, pattern


def backend_for(name: str, *, derivatives: str = "auto", dv_builder=None, block_diagonal=None, pattern=None):
    """The ``AbstractBackend`` named ``name`` ("dense", "mme" or "sparse") with a fit's options."""
    backend: AbstractBackend
    if name in EQUATIONS:
        backend = EquationsBackend(
            name, block_diagonal if name == "mme" else None, pattern if name == "sparse" else None
        )
    else:
        backend = DenseBackend(derivatives, dv_builder)
    return backend
