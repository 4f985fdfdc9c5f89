"""``jreml.gwas`` with the null model's covariance: each test against a numpy GLS of the same test, variant by
variant, on the bundled kinship data with simulated genotypes."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import jreml

N_VARIANTS = 1000
CAUSAL = 137


@pytest.fixture(scope="module")
def scan_data():
    df = jreml.datasets.load("kinship")
    K = jreml.datasets.kinship_matrix()
    levels = sorted(df["id"])
    rng = np.random.default_rng(11)
    freq = rng.uniform(0.05, 0.5, size=N_VARIANTS)
    dosages = rng.binomial(2, freq, size=(len(levels), N_VARIANTS)).astype(float)
    dosages[rng.uniform(size=dosages.shape) < 0.02] = np.nan
    dosages[:, 3] = 1.0  # constant: cannot be tested
    genotypes = pd.DataFrame(dosages, index=levels, columns=[f"rs{i}" for i in range(N_VARIANTS)])
    causal = genotypes[f"rs{CAUSAL}"].fillna(genotypes[f"rs{CAUSAL}"].mean())
    df = df.assign(trait=df["trait1"] + 0.6 * causal.loc[df["id"]].to_numpy())
    return df, genotypes, K


@pytest.fixture(scope="module")
def reference(scan_data):
    """Per test and variant: GLS of y on [X, g] with V̂ of the null REML fit, the statistics written out directly."""
    df, genotypes, K = scan_data
    null = jreml.fit("trait ~ 1 + covariate + (1 | id)", df, relmat={"id": K})
    V = np.asarray(null.model(null.theta))
    Vinv = np.linalg.inv(V)
    X, y = np.asarray(null.X), np.asarray(null.y)
    n, p = X.shape
    P0 = Vinv - Vinv @ X @ np.linalg.solve(X.T @ Vinv @ X, X.T @ Vinv)
    rss0 = y @ P0 @ y
    values = genotypes.to_numpy()
    values = np.where(np.isnan(values), np.nanmean(values, axis=0), values)[
        [list(genotypes.index).index(v) for v in df["id"]]
    ]
    Vinv_X, Vinv_G, Vinv_y, P0_G = Vinv @ X, Vinv @ values, Vinv @ y, P0 @ values
    out = {"wald": [], "lrt": [], "score": []}
    for k in range(values.shape[1]):
        g = values[:, k]
        if np.ptp(g) == 0:
            for rows in out.values():
                rows.append((np.nan, np.nan))
            continue
        X1, Vinv_X1 = np.column_stack([X, g]), np.column_stack([Vinv_X, Vinv_G[:, k]])
        information = X1.T @ Vinv_X1
        beta = np.linalg.solve(information, X1.T @ Vinv_y)
        r = y - X1 @ beta
        rss1 = r @ Vinv @ r
        wald = beta[-1] ** 2 / (rss1 / (n - p - 1) * np.linalg.inv(information)[-1, -1])
        out["wald"].append((wald, stats.f.sf(wald, 1, n - p - 1)))
        lrt = n * np.log(rss0 / rss1)
        out["lrt"].append((lrt, stats.chi2.sf(lrt, 1)))
        score = (P0_G[:, k] @ y) ** 2 / ((g @ P0_G[:, k]) * rss0 / (n - p))
        out["score"].append((score, stats.chi2.sf(score, 1)))
    return {test: np.array(rows) for test, rows in out.items()}


@pytest.mark.parametrize("test", ["wald", "lrt", "score"])
def test_scan_equals_a_gls_reference_variant_by_variant(scan_data, reference, test):
    df, genotypes, K = scan_data
    with pytest.warns(UserWarning, match=r"1 variant\(s\) cannot be tested.*'rs3'"):
        table = jreml.gwas(
            "trait ~ 1 + covariate + (1 | id)", df, genotypes, relmat={"id": K}, test=test, chunk_size=384
        )
    expected = reference[test]
    assert list(table.columns) == ["variant", "beta", "se", "stat", "p", "h2"]
    assert table["variant"].tolist() == list(genotypes.columns)
    # atol: the reference's n·log(RSS₀/RSS₁) loses digits to cancellation for a small statistic (RSS ≈ 400,
    # rounding ≈ 1e-13 each, times n = 400)
    np.testing.assert_allclose(table["stat"], expected[:, 0], rtol=1e-8, atol=1e-9)
    # p = 1 − O(√stat) near stat = 0, so the reference's absolute error in a tiny LRT statistic reaches p at 1e-8
    np.testing.assert_allclose(table["p"], expected[:, 1], rtol=1e-8, atol=1e-7 if test == "lrt" else 0)
    assert table["p"].isna().sum() == 1 and np.isnan(table.loc[3, "p"])
    assert table["p"].idxmin() == CAUSAL  # the simulated causal variant ranks first
    assert 0 < table["h2"].iloc[0] < 1


def test_scan_errors_name_their_cause(scan_data):
    df, genotypes, K = scan_data
    formula = "trait ~ 1 + covariate + (1 | id)"
    with pytest.raises(ValueError, match=r"no row for level\(s\) \['ind000'\]"):
        jreml.gwas(formula, df, genotypes.iloc[1:], relmat={"id": K})
    with pytest.raises(ValueError, match="test must be one of"):
        jreml.gwas(formula, df, genotypes, relmat={"id": K}, test="t")
    with pytest.raises(ValueError, match="has 3 rows but 'id' has 400 levels"):
        jreml.gwas(formula, df, genotypes.to_numpy()[:3], relmat={"id": K})
