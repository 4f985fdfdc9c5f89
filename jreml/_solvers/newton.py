"""Newton–Raphson on the observed information −∂²ℓ/∂θ∂θᵀ (autodiff of the Cholesky-based ℓ)."""

from typing import ClassVar

from .base import AbstractAlgorithm, projected_solve


class Newton(AbstractAlgorithm):
    """An indefinite Hessian is made definite with |λ| (the step still ascends); step-halving does the rest."""

    information: ClassVar[str] = "observed"
    name: ClassVar[str] = "newton"

    def direction(self, theta, score, info, free, damping=0.0):
        return projected_solve(info, score, free, absolute=True, damping=damping)
