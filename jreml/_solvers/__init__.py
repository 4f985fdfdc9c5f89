"""The fitting iteration: direction rules (AI, Fisher, Newton, EM) and the loop that runs them."""

from .ai import AI
from .base import AbstractAlgorithm
from .em import EM
from .fisher import Fisher
from .newton import Newton

#: The step rules by name (``algorithm=`` of ``estimate``; "hybrid" is ``hybrid_estimate``).
ALGORITHMS = {"ai": AI, "fisher": Fisher, "newton": Newton, "em": EM}
_INSTANCES: dict = {}


def as_algorithm(algorithm) -> AbstractAlgorithm:
    """The step rule named ``algorithm`` (one stateless instance per name), or ``algorithm`` itself."""
    if isinstance(algorithm, AbstractAlgorithm):
        return algorithm
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm must be one of {tuple(ALGORITHMS)}, got {algorithm!r}")
    instance = _INSTANCES.get(algorithm)
    if instance is None:
        instance = _INSTANCES[algorithm] = ALGORITHMS[algorithm]()
    return instance
