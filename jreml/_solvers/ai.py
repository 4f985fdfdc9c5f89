"""Average-information REML (Gilmour, Thompson & Cullis 1995): θ ← θ + η·AI⁻¹·score."""

from typing import ClassVar

from .base import AbstractAlgorithm


class AI(AbstractAlgorithm):
    """AI_kl = ½ (V_k Py)ᵀ P (V_l Py): costs O(n²k) beyond the factorisation, no k×n×n tensor."""

    information: ClassVar[str] = "ai"
    name: ClassVar[str] = "ai"
    secant: ClassVar[bool] = True
    approximate_curvature: ClassVar[bool] = True
