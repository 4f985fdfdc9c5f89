"""Newton–Raphson on the observed information −∂²ℓ/∂θ∂θᵀ (autodiff of the Cholesky-based ℓ)."""

from typing import ClassVar

from .base import AbstractAlgorithm


class Newton(AbstractAlgorithm):
    """An indefinite Hessian is made definite with |λ| (the step still ascends); step-halving does the rest."""

    information: ClassVar[str] = "observed"
    name: ClassVar[str] = "newton"

    absolute: ClassVar[bool] = True
