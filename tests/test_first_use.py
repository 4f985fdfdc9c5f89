"""First use (issue 16): options that do not change the program compile nothing new, nor does a second data set of
the same shape; ``last_timing`` reports compile and run seconds apart. The tests count compilations (JAX's
monitoring events), never seconds."""

import contextlib
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pandas as pd
import pytest

import jreml
from jreml._estimate import last_timing

TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def counting():
    """Counts of jaxpr traces and XLA compilations (or loads from the persistent cache) inside the block."""
    counts = {"traces": 0, "compiles": 0}

    def listener(event, duration, **_):
        if event == TRACE_EVENT:
            counts["traces"] += 1
        elif event == COMPILE_EVENT:
            counts["compiles"] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@pytest.fixture(scope="module")
def dyestuff():
    ex = jreml.example("dyestuff")
    jreml.estimate(ex.model, ex.y, ex.X)  # compiled once here
    return ex


@pytest.mark.parametrize(
    "options",
    [
        dict(verbose=1),
        dict(verbose=2),
        dict(tol_score=1e-3, tol_delta=1e-3, tol_loglik=1e-5),
        dict(max_iter=50),
        dict(max_iter=7, min_iter=3),
        dict(max_halvings=5),
        dict(eta=0.5),
    ],
)
def test_run_time_options_compile_nothing_new(dyestuff, options, capfd):
    ex = dyestuff
    reference = jreml.estimate(ex.model, ex.y, ex.X)
    with counting() as counts:
        fit = jreml.estimate(ex.model, ex.y, ex.X, **options)
    assert counts == {"traces": 0, "compiles": 0}
    assert bool(fit.converged), fit.message
    np.testing.assert_allclose(float(fit.loglik), float(reference.loglik), rtol=1e-7)
    # exactly max_iter + 1 rows of history, as before the history was sized in buckets
    assert fit.history.loglik.shape == (options.get("max_iter", 200) + 1,)
    assert fit.history.information.shape[0] == options.get("max_iter", 200) + 1
    capfd.readouterr()


def test_max_iter_still_caps_the_loop(dyestuff):
    ex = dyestuff
    with pytest.warns(UserWarning, match="max_iter"):
        fit = jreml.estimate(ex.model, ex.y, ex.X, max_iter=2, min_iter=0, tol_score=1e-12, newton_fallback=False)
    assert int(fit.n_iter) == 2 and not bool(fit.converged)
    assert fit.history.loglik.shape == (3,) and float(fit.history.loglik[2]) != 0.0
    with pytest.warns(UserWarning, match="max_iter"):
        start = jreml.estimate(ex.model, ex.y, ex.X, max_iter=0, min_iter=0, newton_fallback=False)
    assert int(start.n_iter) == 0 and start.history.theta.shape == (1, 2)


def test_verbose_prints_the_table_and_the_timing(dyestuff, capfd):
    ex = dyestuff
    fit = jreml.estimate(ex.model, ex.y, ex.X, verbose=2)
    out = capfd.readouterr().out
    rows = [line for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) == int(fit.n_iter)
    assert "compile 0.000 s (0 programs)" in out and "run" in out
    jreml.estimate(ex.model, ex.y, ex.X, verbose=1)
    out = capfd.readouterr().out
    assert f"Iter {int(fit.n_iter):4d}" in out


def _simulated(n, seed, levels=20):
    rng = np.random.default_rng(seed)
    g = rng.integers(0, levels, n)
    g[:levels] = np.arange(levels)  # every level present
    x = rng.normal(size=n)
    y = 1 + 0.5 * x + rng.normal(size=levels)[g] + rng.normal(size=n)
    return pd.DataFrame({"y": y, "x": x, "g": [f"g{i}" for i in g]})


def test_same_formula_on_a_second_data_set_of_the_same_shape_compiles_nothing_new():
    formula = "y ~ 1 + x + (1 | g)"
    first = jreml.fit(formula, _simulated(120, 0))
    with counting() as counts:
        second = jreml.fit(formula, _simulated(120, 1))
    assert counts == {"traces": 0, "compiles": 0}
    assert bool(first.converged) and bool(second.converged)
    assert float(first.loglik) != float(second.loglik)


def test_last_timing_reports_compile_and_run_apart(dyestuff):
    ex = dyestuff
    jreml.estimate(ex.model, ex.y, ex.X)
    warm = last_timing()
    assert warm.programs == 0 and warm.compile_s == 0.0 and warm.run_s > 0.0
    jreml.fit("y ~ 1 + x + (1 | g)", _simulated(77, 2, levels=7))  # a shape no other test fits: compiled here
    first = last_timing()
    assert first.programs >= 1 and first.compile_s > 0.0
    assert first.total_s == pytest.approx(first.compile_s + first.run_s)
    assert jreml.last_timing() is first


CACHE_SCRIPT = """
import os, jax, jreml
print(jax.config.jax_compilation_cache_dir)
if os.environ.get("FIT"):
    ex = jreml.example("dyestuff")
    jreml.estimate(ex.model, ex.y, ex.X)
"""


def _import_jreml(tmp_path, fit=False, **env):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JREML_CACHE"))}
    clean.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), **env)
    if fit:
        clean["FIT"] = "1"
    out = subprocess.run([sys.executable, "-c", CACHE_SCRIPT], env=clean, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()[0]


def test_the_persistent_cache_is_on_by_default_in_the_user_cache_directory(tmp_path):
    import jaxlib

    version = f"{jax.__version__}-{jaxlib.__version__}"
    folder = _import_jreml(tmp_path, fit=True)
    assert folder == str(tmp_path / "xdg" / "jreml" / "xla" / version)
    assert any(pathlib.Path(folder).iterdir())  # the fit's program was written there
    assert _import_jreml(tmp_path, JREML_CACHE_DIR="off") == "None"
    assert _import_jreml(tmp_path, JREML_CACHE_DIR=str(tmp_path / "moved")) == str(tmp_path / "moved" / version)
    mine = str(tmp_path / "mine")
    assert _import_jreml(tmp_path, JAX_COMPILATION_CACHE_DIR=mine, JREML_CACHE_DIR=str(tmp_path / "x")) == mine
