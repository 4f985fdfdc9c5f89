"""Test configuration: float64 on (importing jreml does it) and strict dtype promotion."""

import json
import pathlib
import re

import jax
import pytest

import jreml  # noqa: F401  (turns on float64)

jax.config.update("jax_numpy_dtype_promotion", "strict")

REFERENCE_DIR = pathlib.Path(__file__).parent / "reference"

# The bundled examples (``jreml.example(name)``) with their lme4 reference case (``load_reference(case)``).
REFERENCE_CASES = {
    "dyestuff": "dyestuff",
    "sleepstudy": "sleepstudy_corr",
    "penicillin": "penicillin",
    "machines": "machines",
    "john_alpha": "john_alpha",
}


def load_reference(case: str) -> dict:
    with open(REFERENCE_DIR / f"{case}.json") as fh:
        return json.load(fh)


def lme4_name(name: str) -> str:
    """formulaic's treatment column ``Machine[T.B]`` as lme4 spells it (``MachineB``)."""
    return re.sub(r"^(.+)\[T\.(.+)\]$", r"\1\2", name)


@pytest.fixture(scope="session")
def reference():
    return load_reference


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Free each test module's compiled programs: every XLA CPU executable holds memory mappings, and the whole
    suite in one process would otherwise pass the kernel's vm.max_map_count (65,530) and abort inside XLA."""
    yield
    from jreml._estimate import clear_caches

    clear_caches()
