"""fit_batch: many responses, one right-hand side (spectral and dense vmapped paths)."""

import numpy as np
import pandas as pd
import pytest

import jreml
from jreml._batch import fit_batch

TRAITS = [f"trait{i}" for i in range(1, 9)]
FORMULA = "trait ~ 1 + covariate + (1 | id)"
TIGHT = dict(tol_score=1e-10, tol_delta=1e-10, tol_loglik=1e-12)


@pytest.fixture(scope="module")
def kinship():
    ex = jreml.example("kinship")
    K = jreml.datasets.kinship_matrix()
    ids = ex.data.id
    return ex, {"id": pd.DataFrame(K, index=ids, columns=ids)}


@pytest.fixture(scope="module")
def batch(kinship):
    ex, relmat = kinship
    return fit_batch(FORMULA, ex.data, TRAITS, relmat=relmat)


def test_kinship_matches_reference(batch, reference):
    ref = reference("kinship_visible")["traits"]
    frame = batch.to_frame()
    assert list(frame.columns) == [
        "response",
        "n_obs",
        "loglik",
        "converged",
        "n_iter",
        "singular",
        "id.variance",
        "Residual.variance",
        "(Intercept)",
        "covariate",
        "h2",
        "h2_se",
    ]
    assert frame.converged.all() and batch.spectral.all() and (frame.n_obs == 400).all()
    for _, row in frame.iterrows():
        r = ref[row.response]
        np.testing.assert_allclose(
            [row["id.variance"], row["Residual.variance"], row.h2], [r["s2g"], r["s2e"], r["h2"]], rtol=1e-5
        )
        np.testing.assert_allclose(row.loglik, r["reml_loglik"], rtol=0, atol=1e-6)
        np.testing.assert_allclose([row["(Intercept)"], row.covariate], list(r["beta"].values()), rtol=1e-5)


def test_kinship_matches_separate_estimates(batch, kinship):
    ex, _ = kinship
    for i, trait in enumerate(TRAITS):
        single = jreml.estimate(ex.model, ex.data[trait].to_numpy(float), ex.X, **TIGHT)
        np.testing.assert_allclose(batch.loglik[i], float(single.loglik), rtol=0, atol=1e-8)
        np.testing.assert_allclose(batch.params[i], single.natural_params, rtol=1e-8)
        np.testing.assert_allclose(batch.beta[i], single.beta, rtol=1e-8)
        np.testing.assert_allclose(batch.se_beta[i], single.se_beta, rtol=1e-8)


def test_missing_values_and_chunks(batch, kinship):
    ex, relmat = kinship
    data = ex.data.copy()
    data.loc[[3, 10, 50, 399], "trait3"] = np.nan
    data["few"] = np.nan
    data.loc[:1, "few"] = [1.0, 2.0]  # two rows only: fails alone
    Y = data[[*TRAITS, "few"]].to_numpy(float)
    out = fit_batch(FORMULA, data, Y, relmat=relmat, chunk_size=3, verbose=1)
    frame = out.to_frame()
    assert list(frame.response) == [f"y{j}" for j in range(9)]
    assert frame.n_obs.tolist()[:8] == [400, 400, 396, 400, 400, 400, 400, 400]
    assert not frame.converged.iloc[8] or "y8" in out.errors
    keep = [0, 1, 3, 4, 5, 6, 7]
    np.testing.assert_allclose(out.loglik[keep], batch.loglik[keep], rtol=0, atol=1e-10)
    np.testing.assert_allclose(out.params[keep], batch.params[keep], rtol=1e-10)
    single = jreml.fit("trait3 ~ 1 + covariate + (1 | id)", data, relmat=relmat, **TIGHT)
    assert single.n_dropped == 4
    np.testing.assert_allclose(out.loglik[2], float(single.loglik), rtol=0, atol=1e-8)
    np.testing.assert_allclose(out.params[2], single.natural_params, rtol=1e-8)
    np.testing.assert_allclose(out.beta[2], single.beta, rtol=1e-8)


def test_dense_vmapped_path_sleepstudy():
    ex = jreml.example("sleepstudy")
    base = jreml.estimate(ex.model, ex.y, ex.X)
    rng = np.random.default_rng(0)
    L = np.linalg.cholesky(np.asarray(ex.model(base.theta)))
    Y = (ex.X @ np.asarray(base.beta))[:, None] + L @ rng.normal(size=(len(ex.y), 5))
    data = ex.data.assign(**{f"r{j}": Y[:, j] for j in range(5)})
    names = [f"r{j}" for j in range(5)]
    out = fit_batch("Reaction ~ Days + (Days | Subject)", data, names)
    assert not out.spectral.any() and out.h2 is None
    frame = out.to_frame()
    assert "Subject.(Intercept):Days" in frame.columns or len(out.param_names) == 4
    for j, name in enumerate(names):
        single = jreml.fit(f"{name} ~ Days + (Days | Subject)", data)
        assert single.param_names == out.param_names
        np.testing.assert_allclose(out.loglik[j], float(single.loglik), rtol=0, atol=1e-8)
        np.testing.assert_allclose(out.params[j], single.natural_params, rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(out.beta[j], single.beta, rtol=1e-8)
        assert out.n_iter[j] == int(single.n_iter) and out.converged[j] == bool(single.converged)
