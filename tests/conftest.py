"""Test configuration: float64 on (importing jreml does it) and strict dtype promotion."""

import json
import pathlib

import jax
import pytest

import jreml  # noqa: F401  (turns on float64)

jax.config.update("jax_numpy_dtype_promotion", "strict")

REFERENCE_DIR = pathlib.Path(__file__).parent / "reference"


def load_reference(case: str) -> dict:
    with open(REFERENCE_DIR / f"{case}.json") as fh:
        return json.load(fh)


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
