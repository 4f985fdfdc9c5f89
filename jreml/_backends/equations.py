"""The mixed-model-equations back ends' structure query: the form a back end named by ``select_backend`` works on.

Both forms (``_backends.mme.Structure``: dense q×q equations; ``_backends.sparse.SparseStructure``: the blocked
sparse ones) answer ``prepare(y, X, block_diagonal)``, ``core(θ, y, X, reml, data)`` and
``evaluate(θ, y, X, reml=, information=, data=)``, so the solver loop, ``estimate`` and the implicit gradients
call them without knowing which one runs.
"""

from __future__ import annotations

from .mme import Structure, mme_structure
from .sparse import SparseStructure, sparse_structure

#: The back ends that solve the mixed-model equations, by ``BackendChoice.name``.
EQUATIONS = ("mme", "sparse")


def equations_structure(model, backend: str) -> Structure | SparseStructure:
    """The model's form for the equations back end ``backend`` ("mme" or "sparse")."""
    structure = sparse_structure(model) if backend == "sparse" else mme_structure(model)
    if structure is None:  # pragma: no cover - select_backend checked the form
        raise ValueError(f"the model has no {backend!r} form")
    return structure
