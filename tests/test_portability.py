"""The numerically sensitive tests on another machine's rounding.

A test that pins a number which depends on the path of an iteration (where a stalled fit stops, an exact iteration
count) passes only on the CPU that wrote it. This reruns every test marked ``numerics`` in a fresh process whose
rounding differs from this one's, in three ways at once:

- another OpenBLAS kernel set (``OPENBLAS_CORETYPE=Sandybridge``: AVX without fused multiply-add), which changes
  every LAPACK factorisation and matrix product jaxlib runs on the CPU;
- another OpenBLAS thread count (two where the suite runs one: other blockings of the factorisations);
- responses perturbed at the level of rounding, y·(1 + 1e-15) (``conftest.PERTURBATION``).

XLA's flags stay as they are, so the rerun loads the programs the suite has compiled from the shared compilation
cache instead of compiling them again.

The marked tests assert properties of the method (a status, bounds on iterations, the optimum against lme4's),
so they must pass there too.
"""

import os
import pathlib
import subprocess
import sys

import pytest

TESTS = pathlib.Path(__file__).parent


def other_machine_environment() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}
    env.update(
        OPENBLAS_CORETYPE="Sandybridge",
        OPENBLAS_NUM_THREADS="2" if os.environ.get("OPENBLAS_NUM_THREADS") == "1" else "1",
        JREML_TEST_PERTURBATION="1e-15",
    )
    return env


@pytest.mark.slow
def test_numerically_sensitive_tests_pass_with_other_rounding():
    # one process (-n 0): the suite's other worker runs beside it
    command = [sys.executable, "-m", "pytest", "-m", "numerics", "-q", "-p", "no:cacheprovider", "-n", "0"]
    run = subprocess.run(
        command + [str(TESTS)], cwd=TESTS.parent, env=other_machine_environment(), capture_output=True, text=True
    )
    summary = run.stdout[-4000:]
    assert run.returncode == 0, summary + run.stderr[-2000:]
    assert " passed" in summary and " failed" not in summary, summary


def test_the_perturbation_reaches_the_data():
    """The portability run's perturbation changes the responses the marked tests read, by a few ulps."""
    code = (
        "import numpy as np, conftest; d = conftest.read_reference_data('singular_slopes3');"
        "import pandas as pd; raw = pd.read_csv(conftest.REFERENCE_DIR / 'singular_slopes3.csv');"
        "ratio = (d.y5 / raw.y5).to_numpy(); assert np.all(ratio != 1) and np.all(np.abs(ratio - 1) < 2e-15), ratio;"
        "assert conftest.perturbed(raw.y5.to_numpy())[0] != raw.y5[0]; print('ok')"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=TESTS, env=other_machine_environment(), capture_output=True, text=True
    )
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_the_other_environment_changes_the_rounding_of_a_factorisation():
    """The Cholesky factor of one matrix, in this suite's environment and in the portability run's: their bits
    differ, so the rerun really sees other rounding (not only the perturbed responses)."""
    code = (
        "import hashlib, numpy as np, jax; jax.config.update('jax_enable_x64', True); import jax.numpy as jnp;"
        "a = np.random.default_rng(0).normal(size=(300, 300)); s = a @ a.T + 300 * np.eye(300);"
        "print(hashlib.sha256(np.asarray(jnp.linalg.cholesky(jnp.asarray(s))).tobytes()).hexdigest())"
    )

    def factor_digest(env):
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-2000:]
        return run.stdout.strip()

    here = factor_digest(dict(os.environ))
    there = factor_digest(other_machine_environment())
    if here == there:
        pytest.skip("this CPU's OpenBLAS kernels round as Sandybridge's do: the rerun differs by the perturbation only")
    assert len(here) == len(there) == 64
