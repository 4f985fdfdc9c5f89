"""Test configuration: float64 on (importing jreml does it) and strict dtype promotion; one OpenBLAS thread and a
compilation cache shared by the test processes; the reference data, and their perturbation for the portability run
(``test_portability.py``)."""

import json
import os
import pathlib
import re

REPOSITORY = pathlib.Path(__file__).parent.parent

# Set before SciPy's OpenBLAS loads (jaxlib's first LAPACK call) and inherited by the subprocesses the tests start
# (notebook kernels, the float32 and portability runs). One OpenBLAS thread: the suite runs one worker per core,
# and OpenBLAS's spin-waiting threads slow small factorisations many times over on a machine that is already busy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# One persistent compilation cache for the run's worker processes and subprocesses: each module frees its
# compiled programs (below) and each process compiles its own, so the same fitting programs would otherwise be
# compiled again and again. Deleting the folder only costs compile time; ``JAX_COMPILATION_CACHE_DIR`` overrides it.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPOSITORY / ".pytest_cache" / "jax-compilation-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")
# The suite's programs are small and run for milliseconds, so compiling them fast matters more than fast machine
# code: LLVM at level 0 (as the `jreml` command compiles), and XLA's CPU fusions emitted by the older loop emitter
# instead of the MLIR fusion emitters, which halves the compile time of a fitting program (test_likelihood and
# test_hybrid: 112 s -> 69 s) at the cost of slower loops on large data.
_SUITE_XLA_FLAGS = {"xla_backend_optimization_level": "0", "xla_cpu_use_fusion_emitters": "false"}
for _flag, _value in _SUITE_XLA_FLAGS.items():
    if _flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --{_flag}={_value}").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

import jreml  # noqa: E402, F401  (turns on float64)

jax.config.update("jax_numpy_dtype_promotion", "strict")
# (again, in case a plugin imported jax before the variables were set)
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update(
    "jax_persistent_cache_min_compile_time_secs", float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"])
)

REFERENCE_DIR = pathlib.Path(__file__).parent / "reference"

#: Relative perturbation of every response the tests marked ``numerics`` read (``JREML_TEST_PERTURBATION``, 0 by
#: default): ``test_portability.py`` reruns them with y·(1 + 1e-15) on another BLAS kernel set and thread count, a
#: proxy for another machine's rounding.
PERTURBATION = float(os.environ.get("JREML_TEST_PERTURBATION", "0"))


def perturbed(y):
    """y·(1 + ``PERTURBATION``): unchanged (the same object) unless the portability run sets it."""
    if not PERTURBATION:
        return y
    return np.asarray(y, dtype=float) * (1.0 + PERTURBATION)


def read_reference_data(name: str) -> pd.DataFrame:
    """``tests/reference/{name}.csv`` (the simulated data sets with lme4 fits), its responses y* ``perturbed``."""
    data = pd.read_csv(REFERENCE_DIR / f"{name}.csv")
    if PERTURBATION:
        responses = [c for c in data.columns if c.startswith("y") and data[c].dtype.kind == "f"]
        data[responses] = data[responses] * (1.0 + PERTURBATION)
    return data


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


#: Memory mappings of this process above which a finished test module's compiled programs are freed.
MAPPING_LIMIT = 30_000


def _mapping_count() -> int | None:
    try:
        with open("/proc/self/maps", "rb") as fh:
            return sum(1 for _ in fh)
    except OSError:
        return None


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Free the compiled programs after a test module when the process holds many memory mappings: every XLA CPU
    executable holds some, and a worker that kept them all would pass the kernel's vm.max_map_count (65,530) and
    abort inside XLA. Below the limit they are kept, so the next modules reuse them (where the count cannot be
    read, they are always freed)."""
    yield
    count = _mapping_count()
    if count is None or count > MAPPING_LIMIT:
        from jreml._estimate import clear_caches

        clear_caches()


#: The test modules by their time in a clean-clone run (longest first, sums of --durations=0 on 2 cores), started
#: in this order so that the workers finish together. pyproject's ``--no-loadscope-reorder`` keeps it: by default
#: pytest-xdist would hand out the modules by their number of tests instead, which left the long modules with few
#: tests (the portability rerun, the sharding subprocesses) for the end. Modules not listed follow, in file order.
LONGEST_MODULES = (
    "test_mme.py",
    "test_estimate.py",
    "test_batch.py",
    "test_sparse.py",
    "test_implicit.py",
    "test_cli.py",
    "test_portability.py",  # after test_estimate and test_batch: their numerics programs are in the cache
    "test_spectral.py",
    "test_observed.py",
    "test_likelihood.py",
    "test_notebooks.py",
    "test_bootstrap.py",
    "test_hybrid.py",
    "test_fit_formula.py",
    "test_optax_fit.py",
    "test_sharding.py",
    "test_results_lme4.py",
    "test_covariance.py",
    "test_facade.py",
    "test_reference_fits.py",
    "test_lapack_guard.py",
    "test_inference_ddf.py",
    "test_profiled.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
