"""The dense back end: every model, by the n×n Cholesky factor of V(θ) (``likelihood.py``: ℓ, score, information;
``implicit.py``: the closed-form derivatives of a fit)."""

from __future__ import annotations

import equinox as eqx

from ..base import AbstractBackend, Core, Derivatives
from .implicit import fitted_core
from .likelihood import DERIVATIVES, core, derivatives_at


class DenseBackend(AbstractBackend):
    """Every model, by the n×n Cholesky factor of V(θ): O(n³) per evaluation and n² memory.

    ``derivatives``: how ∂V/∂θ is formed (``DERIVATIVES``; "auto" never forms the k×n×n tensor), ``dv_builder``:
    the user's ∂V/∂θ for ``derivatives="analytic"``.
    """

    derivatives: str = eqx.field(static=True, default="auto")
    dv_builder: object = eqx.field(static=True, default=None)

    @property
    def name(self) -> str:
        return "dense"

    def __check_init__(self):
        if self.derivatives not in DERIVATIVES:
            raise ValueError(f"derivatives must be one of {DERIVATIVES}, got {self.derivatives!r}")

    def prepare(self, model, y, X) -> None:
        return None

    def core(self, theta, model, y, X, state, *, reml: bool) -> Core:
        return core(theta, y, X, model, reml)

    def evaluate(self, theta, model, y, X, state, *, reml: bool, information: str) -> tuple[Core, Derivatives]:
        c = core(theta, y, X, model, reml)
        return c, self._derivatives(theta, model, y, X, c, reml, information)

    def _derivatives(self, theta, model, y, X, c, reml, information):
        return derivatives_at(
            theta,
            y,
            X,
            model,
            c,
            reml=reml,
            information=information,
            derivatives=self.derivatives,
            dv_builder=self.dv_builder,
        )

    def fitted(self, theta_hat, free, model, y, X, state, *, reml: bool):
        theta, c = fitted_core(theta_hat, free, model, y, X, reml)
        return theta, c, self._derivatives(theta, model, y, X, c, reml, "ai")
