"""Fisher scoring: θ ← θ + η·F⁻¹·score with the expected information F_kl = ½ tr(P V_k P V_l)."""

from typing import ClassVar

from .base import AbstractAlgorithm


class Fisher(AbstractAlgorithm):
    """Forms ∂V/∂θ (k×n×n) and k products P·V_k: O(k·n³); meant for small and medium n."""

    information: ClassVar[str] = "fisher"
    name: ClassVar[str] = "fisher"
    secant: ClassVar[bool] = True
    approximate_curvature: ClassVar[bool] = True
