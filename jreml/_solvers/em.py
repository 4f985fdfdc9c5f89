"""EM-REML for variance-component models V = Σ σ²_k K_k (see ``em_direction``)."""

from typing import ClassVar

from .base import AbstractAlgorithm


class EM(AbstractAlgorithm):
    """Monotone but linearly convergent; needs only the score. Models outside V = Σ σ²_k K_k are rejected."""

    information: ClassVar[str] = "none"
    name: ClassVar[str] = "em"
    em_steps: ClassVar[bool] = True
