"""Relationship matrices: ``jreml.grm`` against the textbook formulas written as loops, and ``jreml.pedigree_matrix``
against Mrode's hand-worked example and exact rational arithmetic."""

from fractions import Fraction

import numpy as np
import pandas as pd
import pytest

import jreml


def _dosages(n=7, m=53, missing=0.1, seed=0):
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.02, 0.98, size=m)
    x = rng.binomial(2, p, size=(n, m)).astype(float)
    x[:, 5] = 2.0  # monomorphic: dropped
    x[rng.uniform(size=(n, m)) < missing] = np.nan
    return x


def _textbook(x, method, maf=0.0):
    """Yang et al. 2011 (GCTA) or VanRaden 2008 (method 1), one pair and one variant at a time."""
    n, m = x.shape
    freq = [np.nanmean(x[:, i]) / 2 for i in range(m)]
    keep = [i for i in range(m) if 0 < min(freq[i], 1 - freq[i]) and min(freq[i], 1 - freq[i]) >= maf]
    G = np.zeros((n, n))
    if method == "vanraden":
        scale = sum(2 * freq[i] * (1 - freq[i]) for i in keep)
        for j in range(n):
            for k in range(n):
                total = 0.0
                for i in keep:
                    a = 0.0 if np.isnan(x[j, i]) else x[j, i] - 2 * freq[i]
                    b = 0.0 if np.isnan(x[k, i]) else x[k, i] - 2 * freq[i]
                    total += a * b
                G[j, k] = total / scale
        return G
    for j in range(n):
        for k in range(n):
            total, count = 0.0, 0
            for i in keep:
                p = freq[i]
                if np.isnan(x[j, i]) or np.isnan(x[k, i]):
                    continue
                count += 1
                if j == k:
                    total += (x[j, i] ** 2 - (1 + 2 * p) * x[j, i] + 2 * p**2) / (2 * p * (1 - p))
                else:
                    total += (x[j, i] - 2 * p) * (x[k, i] - 2 * p) / (2 * p * (1 - p))
            G[j, k] = 1 + total / count if j == k else total / count
    return G


@pytest.mark.parametrize("method", ["gcta", "vanraden"])
@pytest.mark.parametrize("maf", [0.0, 0.2])
def test_grm_equals_the_textbook_formula_with_missing_genotypes(method, maf):
    x = _dosages()
    expected = _textbook(x, method, maf)
    got = jreml.grm(x, method=method, maf=maf, chunk_size=16)  # 53 variants: four chunks, the last padded
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(jreml.grm(x, method=method, maf=maf, chunk_size=1000), expected, rtol=1e-12, atol=1e-12)


def test_grm_keeps_the_labels_of_a_data_frame_and_plugs_into_relmat():
    x = _dosages(n=5, m=20, missing=0.0, seed=1)
    frame = pd.DataFrame(x, index=[f"ind{i}" for i in range(5)], columns=[f"rs{i}" for i in range(20)])
    G = jreml.grm(frame)
    assert list(G.index) == list(frame.index) and list(G.columns) == list(frame.index)
    np.testing.assert_allclose(G.to_numpy(), _textbook(x, "gcta"), rtol=1e-12)


def test_grm_errors_name_their_cause():
    x = _dosages(n=4, m=10, missing=0.0)
    bad = pd.DataFrame(x.copy(), index=list("abcd"), columns=[f"rs{i}" for i in range(10)])
    bad.iloc[2, 7] = 3.0
    with pytest.raises(ValueError, match=r"row 'c', variant 'rs7' holds 3\.0"):
        jreml.grm(bad)
    with pytest.raises(ValueError, match="no variant passes the filter"):
        jreml.grm(np.full((3, 4), 2.0))
    untyped = x.copy()
    untyped[1] = np.nan
    with pytest.raises(ValueError, match=r"individual\(s\) \[1\] have no genotype"):
        jreml.grm(untyped)
    with pytest.raises(ValueError, match="method must be one of"):
        jreml.grm(x, method="yang")
    with pytest.raises(ValueError, match="individuals × variants"):
        jreml.grm(x[0])


# Mrode (2014), Linear Models for the Prediction of Animal Breeding Values, example 2.1: animals 5 and 6 inbred.
MRODE = pd.DataFrame({"id": [1, 2, 3, 4, 5, 6], "sire": [0, 0, 1, 1, 4, 5], "dam": [0, 0, 2, 0, 3, 2]})
MRODE_A = np.array(
    [
        [1, 0, 1 / 2, 1 / 2, 1 / 2, 1 / 4],
        [0, 1, 1 / 2, 0, 1 / 4, 5 / 8],
        [1 / 2, 1 / 2, 1, 1 / 4, 5 / 8, 9 / 16],
        [1 / 2, 0, 1 / 4, 1, 5 / 8, 5 / 16],
        [1 / 2, 1 / 4, 5 / 8, 5 / 8, 9 / 8, 11 / 16],
        [1 / 4, 5 / 8, 9 / 16, 5 / 16, 11 / 16, 9 / 8],
    ]
)


def _exact_inverse(A: np.ndarray) -> np.ndarray:
    """Gauss–Jordan in rationals (A's entries are dyadic, so exact)."""
    n = len(A)
    M = [[Fraction(A[i, j]) for j in range(n)] + [Fraction(int(i == j)) for j in range(n)] for i in range(n)]
    for c in range(n):
        pivot = next(r for r in range(c, n) if M[r][c] != 0)
        M[c], M[pivot] = M[pivot], M[c]
        M[c] = [v / M[c][c] for v in M[c]]
        for r in range(n):
            if r != c and M[r][c] != 0:
                M[r] = [a - M[r][c] * b for a, b in zip(M[r], M[c], strict=True)]
    return np.array([[float(v) for v in row[n:]] for row in M])


def test_pedigree_matrix_matches_mrodes_hand_worked_example():
    ped = jreml.pedigree_matrix(MRODE)
    assert ped.ids == ("1", "2", "3", "4", "5", "6")
    np.testing.assert_array_equal(ped.A.to_numpy(), MRODE_A)  # dyadic fractions: exact in binary
    np.testing.assert_array_equal(ped.inbreeding.to_numpy(), [0, 0, 0, 0, 1 / 8, 1 / 8])
    np.testing.assert_allclose(ped.A_inverse.toarray(), _exact_inverse(MRODE_A), rtol=1e-13, atol=1e-13)
    assert ped.A_inverse.nnz <= 9 * len(MRODE)


def test_unsorted_input_unknown_codes_and_unlisted_parents():
    shuffled = MRODE.iloc[[5, 2, 4, 0, 3, 1]].astype({"sire": object, "dam": object}).reset_index(drop=True)
    shuffled.loc[shuffled["sire"] == 0, "sire"] = np.nan
    shuffled.loc[shuffled["dam"] == 0, "dam"] = "NA"
    ped = jreml.pedigree_matrix(shuffled)
    order = [ped.ids.index(str(v)) for v in range(1, 7)]
    np.testing.assert_array_equal(ped.A.to_numpy()[np.ix_(order, order)], MRODE_A)
    # founders 1 and 2 not listed as rows: added first, in sorted order
    ped = jreml.pedigree_matrix(MRODE.iloc[2:].rename(columns={"id": "animal"}), id="animal")
    assert ped.ids[:2] == ("1", "2")
    np.testing.assert_array_equal(ped.A.to_numpy(), MRODE_A)


def test_pedigree_errors_name_the_ids_at_fault():
    with pytest.raises(ValueError, match=r"cycle: \['a', 'b'\]|cycle: \['b', 'a'\]"):
        jreml.pedigree_matrix([("a", "b", None), ("b", "a", None)])
    with pytest.raises(ValueError, match=r"\['x'\] are their own parent"):
        jreml.pedigree_matrix([("x", "x", None)])
    with pytest.raises(ValueError, match=r"more than once: \['3'\]"):
        jreml.pedigree_matrix([(3, 0, 0), (3, 0, 0)])
    with pytest.raises(ValueError, match=r"no column\(s\) \['dam'\]"):
        jreml.pedigree_matrix(pd.DataFrame({"id": [1], "sire": [0]}))


def test_random_inbred_pedigrees_inverse_and_inbreeding():
    rng = np.random.default_rng(3)
    rows = [(i, 0, 0) for i in range(1, 6)]
    for i in range(6, 80):  # parents drawn from a few earlier animals: much inbreeding, some selfing
        s, d = rng.integers(1, i, size=2)
        rows.append((i, int(s) if rng.uniform() > 0.1 else 0, int(d) if rng.uniform() > 0.1 else 0))
    ped = jreml.pedigree_matrix(pd.DataFrame(rows, columns=["id", "sire", "dam"]).sample(frac=1.0, random_state=1))
    A = ped.A.to_numpy()
    assert ped.inbreeding.max() > 0.25
    np.testing.assert_allclose(ped.inbreeding.to_numpy(), np.diag(A) - 1.0, rtol=0, atol=1e-13)
    np.testing.assert_allclose(ped.A_inverse @ A, np.eye(len(A)), atol=1e-9)
