"""Unit tests of the covariance modules and transforms against plain numpy constructions.

Shapes are kept tiny and few (most matrices are 4×4) so that the eager JAX ops compile only a handful of times.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jreml.covariance import (
    AbstractCovariance,
    AR1Matrix,
    BoundedSigmoid,
    CompoundSymmetricMatrix,
    ConstantMatrix,
    CovariancePropagation,
    CustomMatrix,
    DiagonalMatrix,
    DummyMatrix,
    Exp,
    FixedMatrix,
    IdentityMatrix,
    KnownDiagonalMatrix,
    KroneckerProduct,
    LogCholesky,
    RandomTerm,
    ScalarMatrix,
    Sum,
    UnstructuredMatrix,
)

N = 4
GROUPS = ["b", "a", "c", "a"]  # levels a, b, c -> codes 1, 0, 2, 0
GROUP_CODES = np.array([1, 0, 2, 0])
K2 = np.array([[2.0, 0.5], [0.5, 1.0]])
K4 = np.array(
    [
        [2.0, 0.4, 0.1, 0.0],
        [0.4, 1.5, 0.3, 0.2],
        [0.1, 0.3, 1.0, 0.1],
        [0.0, 0.2, 0.1, 1.5],
    ]
)
D4 = np.array([0.0, 0.5, 1.5, 2.0])  # known relative variances (a zero allowed)
Z_DENSE = np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 2.0], [0.3, 0.0, 1.0], [1.0, 1.0, 1.0]])
FEW = settings(max_examples=8, deadline=None, database=None)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def onehot(codes, q):
    return np.eye(q)[np.asarray(codes)]


def np_log_cholesky(theta, m):
    """G = L Lᵀ with θ filling the lower triangle row by row; diagonal entries exponentiated."""
    L = np.zeros((m, m))
    k = 0
    for i in range(m):
        for j in range(i + 1):
            L[i, j] = np.exp(theta[k]) if i == j else theta[k]
            k += 1
    return L @ L.T


def np_ar1(theta, n):
    s2, rho = np.exp(theta[0]), -1.0 + 2.0 * sigmoid(theta[1])
    lags = np.abs(np.subtract.outer(np.arange(n), np.arange(n)))
    return s2 * rho**lags


def np_cs(theta, n):
    lo = -1.0 / (n - 1)
    s2, rho = np.exp(theta[0]), lo + (1.0 - lo) * sigmoid(theta[1])
    return s2 * ((1 - rho) * np.eye(n) + rho * np.ones((n, n)))


def custom_fn(t):
    """A 4×4 PD matrix from 2 parameters: exp(t0)·I + t1²·11ᵀ."""
    return jnp.exp(t[0]) * jnp.eye(N) + t[1] ** 2 * jnp.ones((N, N))


def np_custom(t):
    return np.exp(t[0]) * np.eye(N) + t[1] ** 2 * np.ones((N, N))


def composite():
    """A mixed model with a random-slope-like term, an AR(1) residual and a nugget (7 parameters)."""
    return (
        CovariancePropagation(DummyMatrix(GROUPS), UnstructuredMatrix(3), name="Group")
        + AR1Matrix(N, name="AR")
        + ScalarMatrix(N, name="Residual")
    )


def np_composite(t):
    z = onehot(GROUP_CODES, 3)
    return z @ np_log_cholesky(t[:6], 3) @ z.T + np_ar1(t[6:8], N) + np.exp(t[8]) * np.eye(N)


# ---------------------------------------------------------------------------------------------------------------------
# Dense matrices against numpy: (module, numpy function of θ).
# ---------------------------------------------------------------------------------------------------------------------

DENSE_CASES = {
    "identity": (lambda: IdentityMatrix(N), lambda t: np.eye(N)),
    "scalar": (lambda: ScalarMatrix(N), lambda t: np.exp(t[0]) * np.eye(N)),
    "scalar_exp2": (lambda: ScalarMatrix(N, transform=Exp(2.0)), lambda t: np.exp(2 * t[0]) * np.eye(N)),
    "diagonal": (lambda: DiagonalMatrix(N), lambda t: np.diag(np.exp(t))),
    "diagonal_exp2": (lambda: DiagonalMatrix(N, transform=Exp(2.0)), lambda t: np.diag(np.exp(2 * t))),
    "unstructured": (lambda: UnstructuredMatrix(N), lambda t: np_log_cholesky(t, N)),
    "ar1": (lambda: AR1Matrix(N), lambda t: np_ar1(t, N)),
    "cs": (lambda: CompoundSymmetricMatrix(N), lambda t: np_cs(t, N)),
    "fixed": (lambda: FixedMatrix(K4), lambda t: np.exp(t[0]) * K4),
    "fixed_exp2": (lambda: FixedMatrix(K4, transform=Exp(2.0)), lambda t: np.exp(2 * t[0]) * K4),
    "known_diagonal": (lambda: KnownDiagonalMatrix(D4), lambda t: np.exp(t[0]) * np.diag(D4)),
    "constant": (lambda: ConstantMatrix(K4), lambda t: K4),
    "dummy": (lambda: DummyMatrix(GROUPS), lambda t: onehot(GROUP_CODES, 3)),
    "sum": (
        lambda: ScalarMatrix(N) + FixedMatrix(K4) + DiagonalMatrix(N),
        lambda t: np.exp(t[0]) * np.eye(N) + np.exp(t[1]) * K4 + np.diag(np.exp(t[2:])),
    ),
    "sum_with_constant": (lambda: ScalarMatrix(N) + K4, lambda t: np.exp(t[0]) * np.eye(N) + K4),
    "propagation_dummy": (
        lambda: CovariancePropagation(DummyMatrix(GROUPS), UnstructuredMatrix(3)),
        lambda t: onehot(GROUP_CODES, 3) @ np_log_cholesky(t, 3) @ onehot(GROUP_CODES, 3).T,
    ),
    "propagation_dummy_drop_first": (
        lambda: CovariancePropagation(DummyMatrix(GROUPS, drop_first=True), DiagonalMatrix(2)),
        lambda t: onehot(GROUP_CODES, 3)[:, 1:] @ np.diag(np.exp(t)) @ onehot(GROUP_CODES, 3)[:, 1:].T,
    ),
    "propagation_dense": (
        lambda: CovariancePropagation(Z_DENSE, UnstructuredMatrix(3)),
        lambda t: Z_DENSE @ np_log_cholesky(t, 3) @ Z_DENSE.T,
    ),
    "kron_identity_unstructured": (
        lambda: KroneckerProduct(IdentityMatrix(2), UnstructuredMatrix(2)),
        lambda t: np.kron(np.eye(2), np_log_cholesky(t, 2)),
    ),
    "kron_unstructured_fixed": (
        lambda: KroneckerProduct(UnstructuredMatrix(2), FixedMatrix(K2)),
        lambda t: np.kron(np_log_cholesky(t[:3], 2), np.exp(t[3]) * K2),
    ),
    "kron_array_operand": (
        lambda: KroneckerProduct(K2, ScalarMatrix(2)),
        lambda t: np.kron(K2, np.exp(t[0]) * np.eye(2)),
    ),
    "custom": (lambda: CustomMatrix(custom_fn, 2), np_custom),
    "composite": (composite, np_composite),
}


@pytest.mark.parametrize("case", sorted(DENSE_CASES))
def test_dense_matrix_matches_numpy(case):
    make, reference = DENSE_CASES[case]
    model = make()
    k = model.num_free_params
    theta = np.linspace(-0.7, 0.9, k) if k else np.zeros(0)
    out = model(jnp.asarray(theta))
    assert out.dtype == jnp.float64
    assert out.shape == model.shape
    np.testing.assert_allclose(np.asarray(out), reference(theta), rtol=1e-12, atol=1e-12)
    assert model.build_params(jnp.asarray(theta)).shape == (k,)
    assert len(model.param_names) == k
    assert len(model.scale_mask) == k


@pytest.mark.parametrize("case", sorted(DENSE_CASES))
def test_wrong_theta_length_is_rejected(case):
    model = DENSE_CASES[case][0]()
    bad = jnp.zeros((model.num_free_params + 1,))
    with pytest.raises(ValueError, match=rf"expects theta of shape \({model.num_free_params},\)"):
        model(bad)
    with pytest.raises(ValueError, match="expects theta of shape"):
        model.build_params(bad)


# ---------------------------------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_exp_transform_round_trip(power):
    tr = Exp(power)
    theta = jnp.array([-1.5, 0.0, 0.3, 2.0])
    np.testing.assert_allclose(tr.forward(theta), np.exp(power * np.asarray(theta)), rtol=1e-14)
    np.testing.assert_allclose(tr.inverse(tr.forward(theta)), theta, rtol=1e-14, atol=1e-15)
    variance = jnp.array([1e-3, 0.5, 1.0, 40.0])
    np.testing.assert_allclose(tr.forward(tr.inverse(variance)), variance, rtol=1e-13)


def test_exp_default_power_and_validation():
    assert Exp().power == 1.0
    with pytest.raises(ValueError, match="power > 0"):
        Exp(0.0)
    with pytest.raises(ValueError, match="power > 0"):
        Exp(-1.0)


@pytest.mark.parametrize("lo, hi", [(-1.0, 1.0), (-1.0 / 3.0, 1.0), (0.0, 5.0)])
def test_bounded_sigmoid_round_trip(lo, hi):
    tr = BoundedSigmoid(lo, hi)
    theta = jnp.array([-4.0, -0.5, 0.0, 0.7, 4.0])
    x = tr.forward(theta)
    np.testing.assert_allclose(x, lo + (hi - lo) * sigmoid(np.asarray(theta)), rtol=1e-14)
    assert np.all((np.asarray(x) > lo) & (np.asarray(x) < hi))
    np.testing.assert_allclose(tr.inverse(x), theta, rtol=1e-12, atol=1e-12)
    xs = jnp.asarray(lo + (hi - lo) * np.array([0.01, 0.25, 0.5, 0.8, 0.99]))
    np.testing.assert_allclose(tr.forward(tr.inverse(xs)), xs, rtol=1e-13, atol=1e-15)
    assert float(tr.forward(jnp.asarray(0.0))) == pytest.approx((lo + hi) / 2)


def test_bounded_sigmoid_validation():
    assert (BoundedSigmoid().lo, BoundedSigmoid().hi) == (-1.0, 1.0)
    with pytest.raises(ValueError, match="lo < hi"):
        BoundedSigmoid(1.0, 1.0)
    with pytest.raises(ValueError, match="lo < hi"):
        BoundedSigmoid(2.0, -1.0)


def test_log_cholesky():
    tr = LogCholesky(3)
    assert tr.num_params == 6
    assert tr.diagonal_positions == (0, 2, 5)
    theta = jnp.array([0.1, -0.4, 0.3, 0.8, -1.2, -0.2])
    L = np.asarray(tr.cholesky_factor(theta))
    expected_L = np.array([[np.exp(0.1), 0, 0], [-0.4, np.exp(0.3), 0], [0.8, -1.2, np.exp(-0.2)]])
    np.testing.assert_allclose(L, expected_L, rtol=1e-14)
    np.testing.assert_allclose(tr.forward(theta), expected_L @ expected_L.T, rtol=1e-14)
    # The Cholesky factor of the result is L itself (positive diagonal): the map is a bijection.
    np.testing.assert_allclose(np.linalg.cholesky(np.asarray(tr.forward(theta))), expected_L, rtol=1e-12)
    assert LogCholesky(1).diagonal_positions == (0,)
    with pytest.raises(ValueError, match="m >= 1"):
        LogCholesky(0)


# ---------------------------------------------------------------------------------------------------------------------
# Leaf modules: sizes, names, natural parameters, masks, defaults
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls", [IdentityMatrix, ScalarMatrix, DiagonalMatrix, UnstructuredMatrix, AR1Matrix, CompoundSymmetricMatrix]
)
@pytest.mark.parametrize("bad", [0, -2, 2.0, True, "3", None])
def test_bad_sizes_are_rejected(cls, bad):
    with pytest.raises(ValueError, match="must be a positive integer"):
        cls(bad)


def test_sizes_accept_numpy_integers():
    assert ScalarMatrix(np.int64(3)).shape == (3, 3)
    assert isinstance(ScalarMatrix(np.int64(3)).n, int)


def test_identity_matrix():
    m = IdentityMatrix(N, name="I")
    assert (m.num_free_params, m.shape, m.param_names, m.scale_mask) == (0, (N, N), (), ())
    assert m.default_theta(2.0).shape == (0,)
    assert m.build_params(jnp.zeros(0)).shape == (0,)
    assert m.em_plan() == ()
    assert m.random_terms() == ()
    assert m.label == "I"


def test_scalar_matrix():
    m = ScalarMatrix(N, name="Batch")
    assert (m.num_free_params, m.shape) == (1, (N, N))
    assert m.param_names == ("Batch.variance",)
    assert ScalarMatrix(N).param_names == ("variance",)
    assert m.scale_mask == (True,)
    np.testing.assert_allclose(m.build_params(jnp.array([0.4])), [np.exp(0.4)], rtol=1e-14)
    assert m.em_plan() == ((N, 1.0),)
    assert ScalarMatrix(N, transform=Exp(2.0)).em_plan() == ((N, 2.0),)
    np.testing.assert_allclose(ScalarMatrix(N, transform=Exp(2.0)).build_params(jnp.array([0.4])), [np.exp(0.8)])
    assert m.random_terms() == ()


def test_diagonal_matrix():
    m = DiagonalMatrix(3, labels=["x", "y", "z"], name="H")
    assert (m.num_free_params, m.shape) == (3, (3, 3))
    assert m.param_names == ("H.variance[x]", "H.variance[y]", "H.variance[z]")
    assert DiagonalMatrix(2).param_names == ("variance[0]", "variance[1]")
    assert m.scale_mask == (True, True, True)
    theta = jnp.array([0.1, -0.2, 0.3])
    np.testing.assert_allclose(m.build_params(theta), np.exp(theta), rtol=1e-14)
    # Each variance is a σ²_i·e_i e_iᵀ component: an EM plan, if given, has dimension one per entry.
    assert m.em_plan() in (None, ((1, 1.0),) * 3)
    with pytest.raises(ValueError, match="2 labels for a 3x3"):
        DiagonalMatrix(3, labels=["a", "b"])


def test_unstructured_matrix_names_and_params():
    m = UnstructuredMatrix(2, labels=["(Intercept)", "Days"], name="Subject")
    assert (m.num_free_params, m.shape) == (3, (2, 2))
    assert m.param_names == (
        "Subject.variance[(Intercept)]",
        "Subject.covariance[(Intercept),Days]",
        "Subject.variance[Days]",
    )
    assert UnstructuredMatrix(3).param_names == (
        "variance[0]",
        "covariance[0,1]",
        "variance[1]",
        "covariance[0,2]",
        "covariance[1,2]",
        "variance[2]",
    )
    assert UnstructuredMatrix(3).scale_mask == (True, False, True, False, False, True)
    theta = jnp.array([0.2, -0.5, 0.1])
    G = np_log_cholesky(np.asarray(theta), 2)
    np.testing.assert_allclose(m.build_params(theta), [G[0, 0], G[1, 0], G[1, 1]], rtol=1e-14)
    assert m.em_plan() is None
    assert UnstructuredMatrix(1).param_names == ("variance[0]",)
    with pytest.raises(ValueError, match="1 labels for a 2x2"):
        UnstructuredMatrix(2, labels=["a"])


def test_ar1_matrix_values_including_negative_rho():
    m = AR1Matrix(N, name="AR")
    assert (m.num_free_params, m.shape, m.scale_mask) == (2, (N, N), (True, False))
    assert m.param_names == ("AR.variance", "AR.correlation")
    assert m.em_plan() is None
    lags = np.abs(np.subtract.outer(np.arange(N), np.arange(N)))
    for rho in (-0.6, -0.95, 0.3, 0.9):
        theta = jnp.array([np.log(1.7), float(m.correlation.inverse(jnp.asarray(rho)))])
        np.testing.assert_allclose(m.build_params(theta), [1.7, rho], rtol=1e-12)
        np.testing.assert_allclose(m(theta), 1.7 * rho**lags, rtol=1e-12, atol=1e-15)
    neg = np.asarray(m(jnp.array([0.0, float(m.correlation.inverse(jnp.asarray(-0.5)))])))
    assert neg[0, 1] < 0 and neg[0, 2] > 0 and neg[0, 3] < 0


def test_ar1_finite_at_zero_correlation():
    """The default start has ρ = 0 exactly: value and gradient must stay finite (0⁰ = 1 on the diagonal)."""
    m = AR1Matrix(N)
    theta = m.default_theta(2.0)
    np.testing.assert_allclose(m.build_params(theta), [2.0, 0.0], atol=1e-15)
    np.testing.assert_allclose(m(theta), 2.0 * np.eye(N), atol=1e-15)
    jac = np.asarray(jax.jit(jax.jacfwd(lambda t: m(t)))(theta))
    assert np.all(np.isfinite(jac))
    # dV/dθ₁ at ρ = 0: σ²·dρ/dθ₁ = σ²·(hi − lo)·sigmoid'(0) = 2·2·¼ on the first off-diagonals, 0 elsewhere.
    expected = np.zeros((N, N))
    expected[np.abs(np.subtract.outer(np.arange(N), np.arange(N))) == 1] = 1.0
    np.testing.assert_allclose(jac[:, :, 1], expected, atol=1e-14)


def test_compound_symmetric_matrix():
    m = CompoundSymmetricMatrix(N, name="CS")
    assert (m.num_free_params, m.shape, m.scale_mask) == (2, (N, N), (True, False))
    assert m.param_names == ("CS.variance", "CS.correlation")
    assert m.correlation.lo == pytest.approx(-1.0 / (N - 1))
    theta = jnp.array([0.3, -0.4])
    np.testing.assert_allclose(m.build_params(theta), [np.exp(0.3), -1 / 3 + (4 / 3) * sigmoid(-0.4)], rtol=1e-14)
    assert m.em_plan() is None
    one = CompoundSymmetricMatrix(1)
    np.testing.assert_allclose(one(jnp.array([0.5, 1.0])), [[np.exp(0.5)]], rtol=1e-14)


@pytest.mark.parametrize("theta1", [-8.0, -20.0, -30.0])
def test_compound_symmetry_stays_positive_definite_near_lower_bound(theta1):
    m = CompoundSymmetricMatrix(N)
    theta = jnp.array([0.0, theta1])
    rho = float(m.build_params(theta)[1])
    assert rho > -1.0 / (N - 1)
    V = np.asarray(m(theta))
    eig = np.linalg.eigvalsh(V)
    assert eig.min() > 0
    np.testing.assert_allclose(eig.min(), 1.0 + (N - 1) * rho, rtol=1e-6, atol=1e-15)
    np.linalg.cholesky(V)


def test_fixed_matrix():
    m = FixedMatrix(K4, name="g")
    assert (m.num_free_params, m.shape, m.scale_mask) == (1, (N, N), (True,))
    assert m.param_names == ("g.variance",)
    assert m.K.dtype == jnp.float64
    np.testing.assert_allclose(m.build_params(jnp.array([-0.3])), [np.exp(-0.3)], rtol=1e-14)
    assert m.em_plan() == ((N, 1.0),)
    assert FixedMatrix(np.eye(3, dtype=np.int32)).K.dtype == jnp.float64


@pytest.mark.parametrize(
    "K, message",
    [
        (np.ones((2, 3)), "square"),
        (np.ones(3), "square"),
        (np.ones((2, 2, 2)), "square"),
        (np.array([[1.0, 0.2], [0.3, 1.0]]), "symmetric"),
    ],
)
def test_fixed_matrix_rejects_bad_K(K, message):
    with pytest.raises(ValueError, match=message):
        FixedMatrix(K)


def test_known_diagonal_matrix():
    m = KnownDiagonalMatrix(D4, name="k")
    assert (m.num_free_params, m.shape, m.scale_mask) == (1, (N, N), (True,))
    assert m.param_names == ("k.variance",)
    np.testing.assert_allclose(m.build_params(jnp.array([0.4])), [np.exp(0.4)], rtol=1e-14)
    assert m.em_plan() == ((N, 1.0),)
    # the default θ gives a mean diagonal equal to the variance asked for, as FixedMatrix's does
    np.testing.assert_allclose(np.mean(np.diag(m(m.default_theta(jnp.asarray(3.0))))), 3.0, rtol=1e-14)
    assert KnownDiagonalMatrix(np.zeros(3)).default_theta(jnp.asarray(2.0)).shape == (1,)


@pytest.mark.parametrize(
    "d, message",
    [
        (np.ones((2, 2)), "vector"),
        (np.ones(0), "vector"),
        (np.array([1.0, -0.5, 2.0]), "entry 1 is -0.5"),
        (np.array([1.0, np.nan, np.inf]), "entry 1 is nan .2 such entries"),
    ],
)
def test_known_diagonal_matrix_rejects_bad_d(d, message):
    with pytest.raises(ValueError, match=message):
        KnownDiagonalMatrix(d)


def test_fixed_matrix_rejects_complex_K():
    with pytest.raises(TypeError, match="real-valued"):
        FixedMatrix(np.eye(2) * (1 + 1j))


def test_constant_matrix():
    m = ConstantMatrix(Z_DENSE, name="Z")
    assert (m.num_free_params, m.shape, m.param_names, m.scale_mask) == (0, (N, 3), (), ())
    assert m.em_plan() == ()
    assert m.default_theta(1.0).shape == (0,)
    with pytest.raises(ValueError, match="2-D"):
        ConstantMatrix(np.ones(3))


# ---------------------------------------------------------------------------------------------------------------------
# DummyMatrix
# ---------------------------------------------------------------------------------------------------------------------


def test_dummy_matrix_strings():
    d = DummyMatrix(GROUPS, name="grp")
    assert d.levels == ("a", "b", "c")
    assert d.n_levels == 3 and d.column_levels == ("a", "b", "c")
    assert (d.num_free_params, d.shape, d.param_names, d.scale_mask) == (0, (N, 3), (), ())
    np.testing.assert_array_equal(d.codes, GROUP_CODES)
    np.testing.assert_array_equal(d(jnp.zeros(0)), onehot(GROUP_CODES, 3))
    assert d.em_plan() == ()
    # Code-point order: upper case before lower case.
    assert DummyMatrix(["b", "B", "a"]).levels == ("B", "a", "b")


@pytest.mark.parametrize("values", [[10, 2, 1, 2], np.array([10, 2, 1, 2]), np.array([10, 2, 1, 2], dtype=np.int32)])
def test_dummy_matrix_integers_sorted_numerically(values):
    d = DummyMatrix(values)
    assert d.levels == ("1", "2", "10")
    np.testing.assert_array_equal(d.codes, [2, 1, 0, 1])


def test_dummy_matrix_pandas_inputs():
    pd = pytest.importorskip("pandas")
    assert DummyMatrix(pd.Series(["y", "x", "y"])).levels == ("x", "y")
    assert DummyMatrix(pd.Series([3, 1, 20])).levels == ("1", "3", "20")
    with pytest.raises(ValueError, match="missing values at rows \\[1\\]"):
        DummyMatrix(pd.Series(["y", None, "y"]))


def test_dummy_matrix_interaction():
    f1 = ["a", "a", "b", "b", "a"]
    f2 = [1, 2, 1, 1, 1]
    d = DummyMatrix(f1, f2)
    # b:2 never occurs, so it gets no column.
    assert d.levels == ("a:1", "a:2", "b:1")
    np.testing.assert_array_equal(d.codes, [0, 1, 2, 2, 0])
    assert d.shape == (5, 3)
    # Ordering follows each factor's level order (numeric for the integer factor).
    d2 = DummyMatrix(["p", "p", "p"], np.array([10, 9, 10]))
    assert d2.levels == ("p:9", "p:10")


def test_dummy_matrix_drop_first():
    d = DummyMatrix(GROUPS, drop_first=True)
    assert d.levels == ("a", "b", "c")
    assert d.column_levels == ("b", "c")
    assert d.shape == (N, 2)
    np.testing.assert_array_equal(d(jnp.zeros(0)), onehot(GROUP_CODES, 3)[:, 1:])
    assert float(d.mean_row_square_sum()) == pytest.approx(0.5)
    assert float(DummyMatrix(GROUPS).mean_row_square_sum()) == 1.0
    with pytest.raises(ValueError, match="at least two levels"):
        DummyMatrix(["a", "a"], drop_first=True)


@pytest.mark.parametrize(
    "factors, message",
    [
        ((), "at least one factor"),
        ((["a", None, "b"],), "missing values at rows \\[1\\]"),
        ((np.array([1.0, np.nan, 2.0]),), "missing values"),
        ((["a", "b", "c"], ["x", "y"]), "different lengths"),
        ((np.ones((2, 2)),), "must be 1-D"),
    ],
)
def test_dummy_matrix_errors(factors, message):
    with pytest.raises(ValueError, match=message):
        DummyMatrix(*factors)


# ---------------------------------------------------------------------------------------------------------------------
# Sum
# ---------------------------------------------------------------------------------------------------------------------


def test_sum_flattening_and_operators():
    a, b, c = ScalarMatrix(N, name="a"), FixedMatrix(K4, name="b"), DiagonalMatrix(N, name="c")
    s = a + b + c
    assert isinstance(s, Sum) and len(s.terms) == 3
    assert s.terms == (a, b, c)
    assert len(Sum(a, Sum(b, c)).terms) == 3
    named = Sum(a, b, name="inner")
    outer = named + c
    assert len(outer.terms) == 2 and outer.terms[0] is named
    assert outer.param_names == ("inner.a.variance", "inner.b.variance") + tuple(f"c.variance[{i}]" for i in range(N))
    # Plain arrays become ConstantMatrix terms, on either side of `+`.
    left = a + K4
    assert isinstance(left.terms[1], ConstantMatrix)
    right = jnp.asarray(K4) + a
    assert isinstance(right, Sum) and isinstance(right.terms[0], ConstantMatrix)
    np.testing.assert_allclose(right(jnp.array([0.0])), K4 + np.eye(N), rtol=1e-14)
    assert (s.num_free_params, s.shape) == (2 + N, (N, N))


def test_sum_param_names():
    assert Sum(ScalarMatrix(N), ScalarMatrix(N)).param_names == ("term0.variance", "term1.variance")
    assert (ScalarMatrix(N, name="a") + ScalarMatrix(N)).param_names == ("a.variance", "term1.variance")
    # Duplicate names get every term prefixed.
    assert (ScalarMatrix(N, name="a") + ScalarMatrix(N, name="a")).param_names == (
        "term0.a.variance",
        "term1.a.variance",
    )
    model = CovariancePropagation(DummyMatrix(GROUPS), ScalarMatrix(3), name="Batch") + ScalarMatrix(N, name="Residual")
    assert model.param_names == ("Batch.variance", "Residual.variance")
    assert composite().param_names == (
        "Group.variance[0]",
        "Group.covariance[0,1]",
        "Group.variance[1]",
        "Group.covariance[0,2]",
        "Group.covariance[1,2]",
        "Group.variance[2]",
        "AR.variance",
        "AR.correlation",
        "Residual.variance",
    )


def test_sum_params_masks_and_plans():
    s = ScalarMatrix(N) + UnstructuredMatrix(N) + AR1Matrix(N)
    assert s.scale_mask == (True, True, False, True, False, False, True, False, False, False, True, True, False)
    theta = jnp.asarray(np.linspace(-0.5, 0.5, s.num_free_params))
    expected = np.concatenate(
        [
            [np.exp(theta[0])],
            np.asarray(UnstructuredMatrix(N).build_params(theta[1:11])),
            np.asarray(AR1Matrix(N).build_params(theta[11:])),
        ]
    )
    np.testing.assert_allclose(s.build_params(theta), expected, rtol=1e-14)
    assert s.em_plan() is None
    vc = ScalarMatrix(N) + FixedMatrix(K4, transform=Exp(2.0)) + IdentityMatrix(N)
    assert vc.em_plan() == ((N, 1.0), (N, 2.0))
    cp = CovariancePropagation(DummyMatrix(GROUPS), ScalarMatrix(3)) + ScalarMatrix(N)
    assert cp.em_plan() == ((3, 1.0), (N, 1.0))


@pytest.mark.parametrize(
    "terms, message",
    [
        ((ScalarMatrix(3), ScalarMatrix(N)), "same shape"),
        ((ConstantMatrix(np.ones((2, 3))),), "square"),
        ((), "at least one term"),
    ],
)
def test_sum_errors(terms, message):
    with pytest.raises(ValueError, match=message):
        Sum(*terms)


def test_plain_function_operand_is_rejected():
    with pytest.raises(TypeError, match="CustomMatrix"):
        Sum(ScalarMatrix(N), lambda t: jnp.eye(N))
    with pytest.raises(TypeError, match="CustomMatrix"):
        CovariancePropagation(lambda t: jnp.eye(N), ScalarMatrix(N))


# ---------------------------------------------------------------------------------------------------------------------
# CovariancePropagation
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("G", [UnstructuredMatrix(3), DiagonalMatrix(3), ScalarMatrix(3), FixedMatrix(K4[:3, :3])])
def test_propagation_gather_matches_dense_product(G):
    fast = CovariancePropagation(DummyMatrix(GROUPS), G)
    dense = CovariancePropagation(onehot(GROUP_CODES, 3), G)
    assert isinstance(dense.Z, ConstantMatrix)
    theta = jnp.asarray(np.linspace(-0.4, 0.6, G.num_free_params))
    np.testing.assert_allclose(fast(theta), dense(theta), rtol=1e-14, atol=1e-15)
    assert fast.shape == dense.shape == (N, N)


def test_propagation_interaction_dummy():
    f1, f2 = ["a", "a", "b", "b"], ["x", "y", "x", "x"]
    d = DummyMatrix(f1, f2)
    cp = CovariancePropagation(d, UnstructuredMatrix(3))
    theta = jnp.asarray(np.linspace(-0.4, 0.6, 6))
    z = onehot([0, 1, 2, 2], 3)
    np.testing.assert_allclose(cp(theta), z @ np_log_cholesky(np.asarray(theta), 3) @ z.T, rtol=1e-13)


def test_propagation_names_masks_and_params():
    cp = CovariancePropagation(DummyMatrix(GROUPS), UnstructuredMatrix(3, labels=["a", "b", "c"]), name="Subject")
    assert cp.param_names[:2] == ("Subject.variance[a]", "Subject.covariance[a,b]")
    assert cp.scale_mask == UnstructuredMatrix(3).scale_mask
    theta = jnp.asarray(np.linspace(-0.4, 0.6, 6))
    np.testing.assert_allclose(cp.build_params(theta), UnstructuredMatrix(3).build_params(theta), rtol=1e-14)
    assert cp.em_plan() is None
    assert CovariancePropagation(DummyMatrix(GROUPS), ScalarMatrix(3, name="Batch")).param_names == ("Batch.variance",)
    # Both named: a path through the term's name then G's name.
    assert CovariancePropagation(DummyMatrix(GROUPS), ScalarMatrix(3, name="U"), name="S").param_names == (
        "S.U.variance",
    )
    # A parametrised Z: its parameters come first and are prefixed "Z.".
    z = CustomMatrix(lambda t: jnp.asarray(Z_DENSE) * jnp.exp(t[0]), 1, names=["scale"])
    cpz = CovariancePropagation(z, ScalarMatrix(3), name="T")
    assert cpz.param_names == ("T.Z.scale", "T.variance")
    assert cpz.scale_mask == (False, True)
    assert cpz.em_plan() is None
    t = jnp.array([0.2, -0.1])
    np.testing.assert_allclose(cpz(t), np.exp(0.4 - 0.1) * Z_DENSE @ Z_DENSE.T, rtol=1e-13)
    np.testing.assert_allclose(cpz.build_params(t), [0.2, np.exp(-0.1)], rtol=1e-14)


def test_propagation_errors():
    with pytest.raises(ValueError, match="G must be square"):
        CovariancePropagation(Z_DENSE, np.ones((3, 2)))
    with pytest.raises(ValueError, match="Z has 3 columns but G is 2x2"):
        CovariancePropagation(Z_DENSE, ScalarMatrix(2))
    with pytest.raises(ValueError, match="Z has 2 columns but G is 3x3"):
        CovariancePropagation(DummyMatrix(GROUPS, drop_first=True), ScalarMatrix(3))


# ---------------------------------------------------------------------------------------------------------------------
# KroneckerProduct and CustomMatrix
# ---------------------------------------------------------------------------------------------------------------------


def test_kronecker_names_masks_and_params():
    both = KroneckerProduct(UnstructuredMatrix(2), FixedMatrix(K2))
    assert both.param_names == ("A.variance[0]", "A.covariance[0,1]", "A.variance[1]", "B.variance")
    assert both.scale_mask == (True, False, True, True)
    assert both.shape == (N, N)
    named = KroneckerProduct(UnstructuredMatrix(2, name="traits"), FixedMatrix(K2, name="g"), name="gen")
    assert named.param_names == (
        "gen.traits.variance[0]",
        "gen.traits.covariance[0,1]",
        "gen.traits.variance[1]",
        "gen.g.variance",
    )
    single = KroneckerProduct(IdentityMatrix(2), UnstructuredMatrix(2, name="U"))
    assert single.param_names == ("U.variance[0]", "U.covariance[0,1]", "U.variance[1]")
    assert KroneckerProduct(IdentityMatrix(2), ScalarMatrix(2)).param_names == ("variance",)
    theta = jnp.array([0.1, 0.5, -0.2, 0.3])
    expected = np.concatenate([np.asarray(UnstructuredMatrix(2).build_params(theta[:3])), [np.exp(0.3)]])
    np.testing.assert_allclose(both.build_params(theta), expected, rtol=1e-14)
    assert both.em_plan() is None
    assert KroneckerProduct(np.ones((2, 3)), np.ones((3, 1))).shape == (6, 3)


def test_custom_matrix():
    c = CustomMatrix(custom_fn, 2, names=["log_nugget", "loading"], name="C")
    assert (c.num_free_params, c.shape, c.scale_mask) == (2, (N, N), (False, False))
    assert c.param_names == ("C.log_nugget", "C.loading")
    assert CustomMatrix(custom_fn, 2).param_names == ("theta[0]", "theta[1]")
    theta = jnp.array([0.3, -0.7])
    np.testing.assert_allclose(c.build_params(theta), theta)
    np.testing.assert_array_equal(c.default_theta(5.0), [0.0, 0.0])
    assert c.em_plan() is None
    assert CustomMatrix(custom_fn, 2, shape=(N, N)).shape == (N, N)


@pytest.mark.parametrize(
    "args, kwargs, exc, message",
    [
        ((custom_fn, 2), {"names": ["a"]}, ValueError, "1 names for 2 parameters"),
        ((custom_fn, 2), {"names": ["a", "b", "c"]}, ValueError, "3 names for 2 parameters"),
        (("not callable", 2), {}, TypeError, "must be callable"),
        ((custom_fn, 2.0), {}, TypeError, "must be an int"),
        ((custom_fn, True), {}, TypeError, "must be an int"),
        ((lambda t: jnp.exp(t), 2), {}, ValueError, "must return a matrix"),
    ],
)
def test_custom_matrix_errors(args, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        CustomMatrix(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# default_theta: the matrix at the default start has mean diagonal ≈ the requested variance
# ---------------------------------------------------------------------------------------------------------------------

DEFAULT_CASES = {
    "scalar": lambda: ScalarMatrix(N),
    "scalar_exp2": lambda: ScalarMatrix(N, transform=Exp(2.0)),
    "diagonal": lambda: DiagonalMatrix(N),
    "unstructured": lambda: UnstructuredMatrix(N),
    "ar1": lambda: AR1Matrix(N),
    "cs": lambda: CompoundSymmetricMatrix(N),
    "fixed": lambda: FixedMatrix(K4),
    "sum": lambda: ScalarMatrix(N) + FixedMatrix(K4) + UnstructuredMatrix(N),
    "sum_ar1": lambda: ScalarMatrix(N) + AR1Matrix(N),
    "propagation_dummy": lambda: CovariancePropagation(DummyMatrix(GROUPS), UnstructuredMatrix(3)),
    "propagation_dummy_drop_first": lambda: CovariancePropagation(
        DummyMatrix(GROUPS, drop_first=True), ScalarMatrix(2)
    ),
    "propagation_dense": lambda: CovariancePropagation(Z_DENSE, ScalarMatrix(3)),
    "kron_identity_unstructured": lambda: KroneckerProduct(IdentityMatrix(2), UnstructuredMatrix(2)),
    "kron_fixed_scalar": lambda: KroneckerProduct(2.0 * np.eye(2), ScalarMatrix(2)),
    "kron_unstructured_fixed": lambda: KroneckerProduct(UnstructuredMatrix(2), FixedMatrix(K2)),
    "composite": composite,
}


@pytest.mark.parametrize("case", sorted(DEFAULT_CASES))
@pytest.mark.parametrize("variance", [2.5, jnp.asarray(0.3)])
def test_default_theta_mean_diagonal(case, variance):
    model = DEFAULT_CASES[case]()
    theta = model.default_theta(variance)
    assert theta.shape == (model.num_free_params,)
    assert theta.dtype == jnp.float64
    V = np.asarray(model(theta))
    assert np.all(np.isfinite(V))
    np.testing.assert_allclose(np.mean(np.diag(V)), float(variance), rtol=1e-12)


def test_default_theta_details():
    # Unstructured starts diagonal; correlations start at zero.
    np.testing.assert_allclose(UnstructuredMatrix(2)(UnstructuredMatrix(2).default_theta(3.0)), 3.0 * np.eye(2))
    np.testing.assert_allclose(
        CompoundSymmetricMatrix(N).build_params(CompoundSymmetricMatrix(N).default_theta(3.0)), [3.0, 0.0], atol=1e-15
    )
    # A Sum shares the variance equally among the terms that have parameters.
    s = ScalarMatrix(N) + IdentityMatrix(N) + FixedMatrix(K4)
    np.testing.assert_allclose(s.build_params(s.default_theta(4.0))[0], 2.0, rtol=1e-14)
    # A parameter-free factor of a Kronecker product passes the whole scale to the other factor.
    kr = KroneckerProduct(2.0 * np.eye(2), ScalarMatrix(2))
    np.testing.assert_allclose(kr.build_params(kr.default_theta(4.0)), [2.0], rtol=1e-14)
    kr = KroneckerProduct(ScalarMatrix(2), 2.0 * np.eye(2))
    np.testing.assert_allclose(kr.build_params(kr.default_theta(4.0)), [2.0], rtol=1e-14)


# ---------------------------------------------------------------------------------------------------------------------
# random_terms
# ---------------------------------------------------------------------------------------------------------------------


def test_random_terms_offsets_and_names():
    dz = DummyMatrix(GROUPS)
    g1, g2 = ScalarMatrix(3, name="Batch"), UnstructuredMatrix(3)
    t1 = CovariancePropagation(dz, g1)
    t2 = CovariancePropagation(Z_DENSE, g2)
    t3 = CovariancePropagation(dz, ScalarMatrix(3), name="Plate")
    model = AR1Matrix(N) + t1 + t2 + ScalarMatrix(N) + t3
    terms = model.random_terms()
    assert all(isinstance(t, RandomTerm) for t in terms)
    assert [t.name for t in terms] == ["Batch", "term2", "Plate"]
    assert [t.offset for t in terms] == [2, 3, 10]
    assert terms[0].Z is dz and terms[0].G is g1
    assert terms[1].G is g2 and isinstance(terms[1].Z, ConstantMatrix)
    theta = jnp.asarray(np.linspace(-0.5, 0.5, model.num_free_params))
    for t in terms:
        k = t.G.num_free_params
        np.testing.assert_allclose(
            model.build_params(theta)[t.offset : t.offset + k], t.G.build_params(theta[t.offset : t.offset + k])
        )
    # Standalone: the given offset is kept; a parametrised Z shifts G's offset.
    assert t1.random_terms(5)[0].offset == 5
    z = CustomMatrix(lambda t: jnp.asarray(Z_DENSE) * t[0], 1)
    assert CovariancePropagation(z, ScalarMatrix(3)).random_terms(2)[0].offset == 3
    assert CovariancePropagation(z, ScalarMatrix(3)).random_terms()[0].name == ""
    assert ScalarMatrix(N).random_terms() == ()
    assert KroneckerProduct(IdentityMatrix(2), ScalarMatrix(2)).random_terms() == ()
    # A named nested Sum keeps its own term numbering.
    nested = Sum(t2, ScalarMatrix(N), name="inner") + t1
    assert [(t.name, t.offset) for t in nested.random_terms()] == [("term0", 0), ("Batch", 7)]


# ---------------------------------------------------------------------------------------------------------------------
# Properties for random θ: symmetric positive (semi)definite
# ---------------------------------------------------------------------------------------------------------------------

PD_CASES = {
    "scalar": lambda: ScalarMatrix(N),
    "diagonal": lambda: DiagonalMatrix(N),
    "unstructured": lambda: UnstructuredMatrix(N),
    "ar1": lambda: AR1Matrix(N),
    "cs": lambda: CompoundSymmetricMatrix(N),
    "fixed": lambda: FixedMatrix(K4),
    "kron": lambda: KroneckerProduct(UnstructuredMatrix(2), FixedMatrix(K2)),
    "composite": composite,
    "propagation_plus_residual": lambda: CovariancePropagation(Z_DENSE, UnstructuredMatrix(3)) + ScalarMatrix(N),
}


@pytest.mark.parametrize("case", sorted(PD_CASES))
@FEW
@given(data=st.data())
def test_random_theta_gives_symmetric_positive_definite(case, data):
    model = PD_CASES[case]()
    k = model.num_free_params
    theta = np.array(data.draw(st.lists(st.floats(-2.0, 2.0), min_size=k, max_size=k)))
    V = np.asarray(model(jnp.asarray(theta)))
    np.testing.assert_allclose(V, V.T, rtol=0, atol=1e-12)
    assert np.linalg.eigvalsh(V).min() > 0


@FEW
@given(theta=st.lists(st.floats(-2.0, 2.0), min_size=6, max_size=6))
def test_propagation_with_dummy_is_positive_semidefinite(theta):
    cp = CovariancePropagation(DummyMatrix(GROUPS), UnstructuredMatrix(3))
    V = np.asarray(cp(jnp.asarray(theta)))
    np.testing.assert_allclose(V, V.T, rtol=0, atol=1e-12)
    assert np.linalg.eigvalsh(V).min() > -1e-10 * np.abs(V).max()
    # Rows of the same group are identical: the two "a" rows (1 and 3).
    np.testing.assert_allclose(V[1], V[3])


@FEW
@given(rho=st.floats(-0.99, 0.99), log_var=st.floats(-2.0, 2.0))
def test_ar1_matches_power_law(rho, log_var):
    m = AR1Matrix(N)
    theta = jnp.array([log_var, float(m.correlation.inverse(jnp.asarray(rho)))])
    lags = np.abs(np.subtract.outer(np.arange(N), np.arange(N)))
    np.testing.assert_allclose(m(theta), np.exp(log_var) * rho**lags, rtol=1e-9, atol=1e-14)


# ---------------------------------------------------------------------------------------------------------------------
# Transformations: jit, vmap, derivatives
# ---------------------------------------------------------------------------------------------------------------------

TRANSFORM_CASES = [
    "ar1",
    "cs",
    "custom",
    "composite",
    "kron_unstructured_fixed",
    "propagation_dummy_drop_first",
    "propagation_dense",
    "sum_with_constant",
]


@pytest.mark.parametrize("case", TRANSFORM_CASES)
def test_jit_and_vmap_over_theta(case):
    model = DENSE_CASES[case][0]()
    k = model.num_free_params
    thetas = jnp.asarray(np.linspace(-0.8, 0.8, 3 * k).reshape(3, k))
    eager = np.stack([np.asarray(model(t)) for t in thetas])
    np.testing.assert_allclose(jax.jit(lambda t: model(t))(thetas[0]), eager[0], rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(eqx.filter_jit(lambda m, t: m(t))(model, thetas[1]), eager[1], rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(jax.vmap(model)(thetas), eager, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(jax.jit(jax.vmap(model.build_params))(thetas)[2], model.build_params(thetas[2]))


def test_jacobian_matches_finite_differences():
    model = composite()
    theta = np.array([0.2, -0.3, 0.1, 0.4, 0.25, -0.2, 0.5, -0.6, -0.1])
    jac = np.asarray(jax.jit(jax.jacfwd(lambda t: model(t)))(jnp.asarray(theta)))
    assert jac.shape == (N, N, theta.size)
    h = 1e-6
    for i in range(theta.size):
        e = np.zeros_like(theta)
        e[i] = h
        fd = (np_composite(theta + e) - np_composite(theta - e)) / (2 * h)
        np.testing.assert_allclose(jac[:, :, i], fd, rtol=1e-6, atol=1e-8)
    # Reverse mode agrees with forward mode.
    grad = jax.jit(jax.grad(lambda t: jnp.sum(model(t) * jnp.asarray(K4))))(jnp.asarray(theta))
    np.testing.assert_allclose(grad, np.einsum("ijk,ij->k", jac, K4), rtol=1e-10)


def test_modules_are_abstract_covariances():
    for case in DENSE_CASES:
        assert isinstance(DENSE_CASES[case][0](), AbstractCovariance)
