"""Fuzzing random designs (hypothesis): crossed, nested and random-slope models, true variances of exactly 0,
unbalanced groups, responses scaled by 10^-8 … 10^8.

Each example fits y and s·y. Checked: no silent NaN (a fit either raises a ValueError that says why or returns
finite ℓ, β̂ and variance components); the variance components are scale-equivariant, σ̂²(s·y) = s²·σ̂²(y), to 1e-8
relative to the largest component; β̂(s·y) = s·β̂(y); ℓ shifts by exactly −(n − p)·log s (REML: the density of s·y
is that of y divided by s^(n−p) in the n − p error contrasts); and ``fit.diagnose()`` certifies the fit of y as a
(constrained) local maximum from the exact gradient and Hessian.

Shapes are fixed per design (n = 48, every level present), so each design compiles once per process and the
examples only change values.
"""

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jreml

N = 48
DESIGNS = {
    "crossed": "y ~ x + (1 | a) + (1 | b)",
    "nested": "y ~ x + (1 | a/b)",
    "slopes": "y ~ x + (x | g)",
}


def labels(rng, n_levels: int) -> np.ndarray:
    """Unbalanced labels with every level present: one row per level, the rest drawn with unequal weights."""
    weights = rng.dirichlet(np.full(n_levels, 0.7))
    rest = rng.choice(n_levels, size=N - n_levels, p=weights)
    out = np.concatenate([np.arange(n_levels), rest])
    rng.shuffle(out)
    return out


def simulate(design: str, seed: int, variances) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    a, b, g = labels(rng, 6), labels(rng, 4), labels(rng, 8)
    x = rng.standard_normal(N)
    va, vb, vslope = variances
    y = 1.0 + 0.5 * x + rng.standard_normal(N)
    if design == "crossed":
        y += math.sqrt(va) * rng.standard_normal(6)[a] + math.sqrt(vb) * rng.standard_normal(4)[b]
    elif design == "nested":
        y += math.sqrt(va) * rng.standard_normal(6)[a] + math.sqrt(vb) * rng.standard_normal((6, 4))[a, b]
    else:
        y += math.sqrt(va) * rng.standard_normal(8)[g] + math.sqrt(vslope) * rng.standard_normal(8)[g] * x
    return pd.DataFrame(
        {"y": y, "x": x, "a": [f"a{i}" for i in a], "b": [f"b{i}" for i in b], "g": [f"g{i}" for i in g]}
    )


def fit_or_error(formula, data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return jreml.fit(formula, data), None
        except ValueError as err:
            return None, err


variance = st.sampled_from([0.0, 0.0, 0.05, 0.5, 2.0])


@pytest.mark.slow
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    design=st.sampled_from(["crossed", "nested"]),
    seed=st.integers(0, 2**31 - 1),
    variances=st.tuples(variance, variance, variance),
    exponent=st.integers(-8, 8),
)
def test_random_designs_are_scale_equivariant(design, seed, variances, exponent):
    check_equivariance(design, seed, variances, exponent)


@pytest.mark.slow
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    variances=st.tuples(variance, variance, variance),
    exponent=st.integers(-8, 8),
)
def test_random_slopes_are_scale_equivariant(seed, variances, exponent):
    # the case hypothesis found (shrunk): it stalled 11 below the optimum from y·1e5 on until the loop ran on y/s
    check_equivariance("slopes", 0, (0.0, 0.0, 0.0), 5)
    check_equivariance("slopes", seed, variances, exponent)


def check_equivariance(design, seed, variances, exponent):
    data = simulate(design, seed, variances)
    scale = 10.0**exponent
    scaled = data.assign(y=data["y"] * scale)
    base, err = fit_or_error(DESIGNS[design], data)
    other, err_scaled = fit_or_error(DESIGNS[design], scaled)
    if err is not None or err_scaled is not None:  # an error must name its cause, and not depend on the units
        assert err is not None and err_scaled is not None, (err, err_scaled)
        assert str(err) and str(err) == str(err_scaled)
        return
    for f in (base, other):
        values = [np.asarray(f.loglik), np.asarray(f.beta), np.asarray(f.natural_params)]
        assert all(np.all(np.isfinite(v)) for v in values), f"silent non-finite result in {design}"
    variances_hat = np.asarray(base.natural_params, float)
    is_scale = np.asarray(base.model.scale_mask, bool)
    want = np.where(is_scale, variances_hat * scale**2, variances_hat)  # correlations-like entries are unit-free
    got = np.asarray(other.natural_params, float)
    biggest = np.max(np.abs(want[is_scale]))
    np.testing.assert_allclose(got[is_scale], want[is_scale], rtol=0, atol=1e-8 * biggest)
    np.testing.assert_allclose(np.asarray(other.beta), scale * np.asarray(base.beta), rtol=1e-8, atol=1e-8 * scale)
    n, p = np.asarray(base.X).shape
    np.testing.assert_allclose(float(other.loglik), float(base.loglik) - (n - p) * math.log(scale), atol=1e-6)
    # and the fit is a (constrained) local maximum by the exact derivatives: a Newton step gains < 1e-6 in ℓ, the
    # Hessian's free block is negative definite, ℓ does not rise off any boundary
    diagnosis = base.diagnose()
    assert diagnosis.certified, str(diagnosis)
