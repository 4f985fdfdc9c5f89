"""``jreml.select_backend``: the one decision point that estimate, fit_batch, bootstrap and the memory estimate ask."""

import numpy as np
import pytest

import jreml
from jreml._backends.memory import bytes_per_response
from jreml._backends.select import SPECTRAL_OPTIONS
from jreml._batch import runs_dense, takes_spectral_path


@pytest.fixture(scope="module")
def examples():
    return {name: jreml.example(name) for name in ("sleepstudy", "penicillin", "kinship", "dyestuff")}


def test_rules_on_the_bundled_models(examples):
    sleep, kinship = examples["sleepstudy"].model, examples["kinship"].model
    choice = jreml.select_backend(sleep)
    assert choice.name == "mme" and choice.q == 36 and "36" in choice.reason
    assert jreml.select_backend(examples["penicillin"].model).name == "mme"
    assert jreml.select_backend(sleep, algorithm="fisher").name == "dense"
    assert jreml.select_backend(sleep, derivatives="jacfwd").name == "dense"
    assert jreml.select_backend(sleep, backend="dense").name == "dense"
    assert jreml.select_backend(sleep, algorithm="newton").name == "mme"
    # a kernel σ²K + σ²I: dense for one fit, spectral in a batch unless an option the spectral fit lacks is given
    assert jreml.select_backend(kinship).name == "dense"
    assert jreml.select_backend(kinship, batch_options={}).name == "spectral"
    assert jreml.select_backend(kinship, batch_options={"tol_score": 1e-6}).name == "spectral"
    # an option's key never picks the path: at the value the spectral fit matches it stays there (issue 14)
    assert jreml.select_backend(kinship, batch_options={"verbose": 0, "algorithm": "ai"}).name == "spectral"
    assert jreml.select_backend(kinship, batch_options={"check_score": False}).name == "dense"
    assert jreml.select_backend(kinship, batch_options={"verbose": 1}).name == "dense"
    # models of the equations' form stay there in a batch
    assert jreml.select_backend(sleep, batch_options={}).name == "mme"


def test_errors_name_the_argument(examples):
    with pytest.raises(ValueError, match="backend"):
        jreml.select_backend(examples["sleepstudy"].model, backend="sparse")
    with pytest.raises(ValueError, match='backend="mme"'):
        jreml.select_backend(examples["kinship"].model, backend="mme")
    with pytest.raises(ValueError, match="algorithm"):
        jreml.select_backend(examples["sleepstudy"].model, algorithm="gauss")


def test_as_many_random_effects_as_rows_run_dense():
    n = 30
    data = jreml.datasets.load("dyestuff").head(n).assign(row=np.arange(n), g=np.arange(n) % 5)
    from jreml._design.build import build_design

    model = build_design("Yield ~ 1 + (1 | row) + (1 | g)", data, {}).model
    choice = jreml.select_backend(model)
    assert choice.name == "dense" and choice.q == n + 5 and "q >= n" in choice.reason
    assert jreml.select_backend(model, backend="mme").name == "mme"


def test_the_batch_engine_and_the_memory_estimate_ask_it(examples):
    sleep, kinship = examples["sleepstudy"].model, examples["kinship"].model
    for model in (sleep, kinship):
        for options in ({}, {"algorithm": "fisher"}, {"backend": "dense"}, {"verbose": 1}):
            batch = jreml.select_backend(model, batch_options=options, **_estimate_options(options))
            single = jreml.select_backend(model, **_estimate_options(options))
            assert takes_spectral_path(model, options) == (batch.name == "spectral")
            assert runs_dense(model, options) == single.dense
    n, k = sleep.shape[0], sleep.num_free_params
    assert (
        bytes_per_response(sleep, 2, False) < bytes_per_response(sleep, 2, False, dense=True) == 8 * (4 + 3 * k) * n**2
    )
    assert SPECTRAL_OPTIONS == {"max_iter", "max_halvings", "min_iter", "tol_score", "tol_delta", "tol_loglik"}


def _estimate_options(options):
    return {key: options[key] for key in ("backend", "algorithm", "derivatives") if key in options}
