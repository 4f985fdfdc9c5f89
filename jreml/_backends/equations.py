"""The mixed-model-equations back ends behind one class: ``EquationsBackend("mme")`` (dense q×q equations,
``_backends/mme.py``) and ``EquationsBackend("sparse")`` (the blocked sparse ones, ``_backends/sparse.py``).

Both structures (``mme.Structure``, ``sparse.SparseStructure``) answer ``prepare(y, X, extra)``,
``core(θ, y, X, reml, data)`` and ``evaluate(θ, y, X, reml=, information=, data=)``; this module turns them into
the ``AbstractBackend`` interface, and differentiates a fit by the implicit function theorem on their own
log-likelihood (no n×n matrix).
"""

from __future__ import annotations

from typing import Any

import equinox as eqx

from .base import AbstractBackend, Core, Derivatives
from .implicit import implicit_theta
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


class EquationsBackend(AbstractBackend):
    """V = Σ_j Z_j G_j Z_jᵀ + R by the mixed-model equations: ``kind`` "mme" (q×q factors, O(n·q² + q³)) or
    "sparse" (blocked factor, see ``_backends/sparse.py``).

    ``block_diagonal``: the q×q equations' static block decision (``mme.static_block_diagonal``); ``pattern``: the
    sparse L₂₁ pattern from concrete codes (``sparse.sparse_pattern``; arrays, traced with the data), or None.
    """

    kind: str = eqx.field(static=True)
    block_diagonal: bool | None = eqx.field(static=True, default=None)
    pattern: Any = None

    def __check_init__(self):
        if self.kind not in EQUATIONS:
            raise ValueError(f"kind must be one of {EQUATIONS}, got {self.kind!r}")

    @property
    def name(self) -> str:
        return self.kind

    def prepare(self, model, y, X):
        extra = self.pattern if self.kind == "sparse" else self.block_diagonal
        return equations_structure(model, self.kind).prepare(y, X, extra)

    def core(self, theta, model, y, X, state, *, reml: bool) -> Core:
        return equations_structure(model, self.kind).core(theta, y, X, reml, state)

    def evaluate(self, theta, model, y, X, state, *, reml: bool, information: str) -> tuple[Core, Derivatives]:
        return equations_structure(model, self.kind).evaluate(
            theta, y, X, reml=reml, information=information, data=state
        )

    def fitted(self, theta_hat, free, model, y, X, state, *, reml: bool):
        theta = implicit_theta(theta_hat, free, model, y, X, _EquationsLoglik(self.kind, self.block_diagonal, reml))
        c, d = self.evaluate(theta, model, y, X, state, reml=reml, information="ai")
        return theta, c, d


class _EquationsLoglik(eqx.Module):
    """ℓ(θ, model, y, X) of the equations (hashable by value: the implicit rule's static argument). The sparse L₂₁
    is dense here: its pattern's arrays cannot be static."""

    kind: str = eqx.field(static=True)
    block_diagonal: bool | None = eqx.field(static=True)
    reml: bool = eqx.field(static=True)

    def __call__(self, theta, model, y, X):
        structure = equations_structure(model, self.kind)
        return structure.core(theta, y, X, self.reml, structure.prepare(y, X, self.block_diagonal)).loglik
