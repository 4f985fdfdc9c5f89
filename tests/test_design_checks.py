"""Designs whose variances cannot be identified, and data a model cannot use, are refused before any fit with a
message naming the cause (lme4's checks where lme4 has one). Only the design is built: nothing compiles."""

import numpy as np
import pandas as pd
import pytest

import jreml
from jreml._design.build import build_design

RNG = np.random.default_rng(0)
DATA = pd.DataFrame(
    {
        "y": RNG.normal(size=40),
        "x": RNG.normal(size=40),
        "g": np.repeat(list("abcdefgh"), 5),
        "rid": np.arange(40).astype(str),
    }
)


def test_one_level_per_row_is_lme4s_error():
    with pytest.raises(ValueError, match=r"must be < number of observations \(problems: 'rid' has 40 levels"):
        jreml.fit("y ~ 1 + (1 | rid)", DATA)
    with pytest.raises(ValueError, match=r"'g' has 2 levels for 2 rows"):
        jreml.fit("y ~ 1 + (1 | g)", DATA.iloc[[0, 5]])
    # a relationship matrix K ≠ I separates the term from the residual: one level per row is the usual GRM design
    K = np.eye(40) + 0.3 * np.ones((40, 40))
    assert not build_design(
        "y ~ 1 + (1 | rid)", DATA, relmat={"rid": pd.DataFrame(K, DATA.rid, DATA.rid)}
    ).unidentifiable


def test_as_many_random_effects_as_rows_is_refused():
    with pytest.raises(ValueError, match=r"number of observations \(16\) <= number of random effects \(16\)"):
        jreml.fit("y ~ 1 + (x | g)", DATA.iloc[:16].assign(g=np.repeat(list("abcdefgh"), 2)))


def test_a_zero_relationship_matrix_is_refused():
    with pytest.raises(ValueError, match=r"relmat\['g'\] is all zeros"):
        build_design("y ~ 1 + (1 | g)", DATA, relmat={"g": np.zeros((8, 8))})


@pytest.mark.parametrize("response", [np.full(40, 3.0), 2.0 + 0.5 * DATA["x"].to_numpy()])
def test_a_response_without_residual_variation_is_refused(response):
    with pytest.raises(ValueError, match=r"the response 'y' (is constant|is fitted exactly by the fixed effects)"):
        build_design("y ~ 1 + x + (1 | g)", DATA.assign(y=response))


def test_infinite_values_name_their_column_and_row():
    data = DATA.assign(x=np.where(np.arange(40) == 7, np.inf, DATA["x"]))
    with pytest.raises(ValueError, match=r"column 'x' holds inf in row 7"):
        build_design("y ~ 1 + (x | g)", data)  # x only in the random slope


def test_offset_is_a_clear_error():
    with pytest.raises(NotImplementedError, match=r"offset\(\) in .* is not supported yet"):
        build_design("y ~ x + offset(x) + (1 | g)", DATA)
