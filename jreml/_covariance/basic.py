"""Leaf covariance modules: identity, scalar, diagonal, unstructured, AR(1), compound symmetry, fixed K, known
diagonal."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._config import as_float_array
from .base import AbstractCovariance, AbstractKnownMatrix  # noqa: F401  (also imported from here)
from .transforms import BoundedSigmoid, Exp, LogCholesky


def _check_size(n, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise ValueError(f"{what} must be a positive integer, got {n!r}")
    return int(n)


def _check_labels(labels, m: int, what: str) -> tuple[str, ...] | None:
    if labels is None:
        return None
    labels = tuple(str(x) for x in labels)
    if len(labels) != m:
        raise ValueError(f"{what}: got {len(labels)} labels for a {m}x{m} matrix")
    return labels


def _label(labels, i: int) -> str:
    return labels[i] if labels is not None else str(i)


class IdentityMatrix(AbstractKnownMatrix):
    """I_n: no parameters (a known identity, e.g. the kernel of an iid random effect)."""

    n: int = eqx.field(static=True)
    name: str | None = eqx.field(static=True, default=None)

    def __init__(self, n: int, name: str | None = None):
        self.n = _check_size(n, "IdentityMatrix size n")
        self.name = name

    shape = property(lambda self: (self.n, self.n))

    def __call__(self, theta):
        theta = self._check_theta(theta)
        return jnp.eye(self.n, dtype=theta.dtype)


class AbstractScaledMatrix(AbstractCovariance):
    """σ²·M for a known matrix M (n×n), σ² = ``transform``(θ): one parameter, ``variance``."""

    num_free_params = property(lambda self: 1)
    scale_mask = property(lambda self: (True,))

    def _variance(self, theta):
        return self.transform.forward(self._check_theta(theta)[0])

    def _local_names(self):
        return ("variance",)

    def build_params(self, theta):
        return self.transform.forward(self._check_theta(theta))

    def em_plan(self):
        # M is taken as full rank (dimension n): with a lower rank the EM step is damped, not wrong.
        return ((self.shape[0], self.transform.power),)


class ScalarMatrix(AbstractScaledMatrix):
    """σ²·I_n with σ² = transform(θ) (default ``Exp()``: σ² = exp(θ)). One parameter: ``variance``."""

    n: int = eqx.field(static=True)
    name: str | None = eqx.field(static=True, default=None)
    transform: Exp = Exp()

    def __init__(self, n: int, name: str | None = None, transform: Exp | None = None):
        self.n = _check_size(n, "ScalarMatrix size n")
        self.name = name
        self.transform = Exp() if transform is None else transform

    shape = property(lambda self: (self.n, self.n))

    def __call__(self, theta):
        return self._variance(theta) * jnp.eye(self.n, dtype=jnp.asarray(theta).dtype)

    def default_theta(self, variance):
        return jnp.reshape(self.transform.inverse(variance), (1,))


class DiagonalMatrix(AbstractCovariance):
    """diag(σ²_1, …, σ²_n), heterogeneous variances, σ²_i = exp(θ_i)."""

    n: int = eqx.field(static=True)
    labels: tuple[str, ...] | None = eqx.field(static=True, default=None)
    name: str | None = eqx.field(static=True, default=None)
    transform: Exp = Exp()

    def __init__(self, n: int, labels=None, name: str | None = None, transform: Exp | None = None):
        self.n = _check_size(n, "DiagonalMatrix size n")
        self.labels = _check_labels(labels, self.n, "DiagonalMatrix")
        self.name = name
        self.transform = Exp() if transform is None else transform

    num_free_params = property(lambda self: self.n)
    shape = property(lambda self: (self.n, self.n))
    scale_mask = property(lambda self: (True,) * self.n)

    def __call__(self, theta):
        return jnp.diag(self.transform.forward(self._check_theta(theta)))

    def _local_names(self):
        return tuple(f"variance[{_label(self.labels, i)}]" for i in range(self.n))

    def build_params(self, theta):
        return self.transform.forward(self._check_theta(theta))

    def default_theta(self, variance):
        return jnp.full((self.n,), self.transform.inverse(variance))


class UnstructuredMatrix(AbstractCovariance):
    """A full m×m covariance G = L Lᵀ (log-Cholesky, see :class:`LogCholesky`).

    Natural parameters, in θ's order: for each row i of L, the covariances G[i, j] (j < i) then the
    variance G[i, i] — names ``covariance[a,b]`` and ``variance[a]``.
    """

    m: int = eqx.field(static=True)
    labels: tuple[str, ...] | None = eqx.field(static=True, default=None)
    name: str | None = eqx.field(static=True, default=None)

    def __init__(self, m: int, labels=None, name: str | None = None):
        self.m = _check_size(m, "UnstructuredMatrix size m")
        self.labels = _check_labels(labels, self.m, "UnstructuredMatrix")
        self.name = name

    @property
    def transform(self) -> LogCholesky:
        return LogCholesky(self.m)

    num_free_params = property(lambda self: self.m * (self.m + 1) // 2)
    shape = property(lambda self: (self.m, self.m))

    @property
    def scale_mask(self):
        diag = set(self.transform.diagonal_positions)
        return tuple(i in diag for i in range(self.num_free_params))

    def __call__(self, theta):
        return self.transform.forward(self._check_theta(theta))

    @property
    def cholesky_blocks(self):
        return ((0, self.m),)

    def _local_names(self):
        names = []
        for i, j in zip(*np.tril_indices(self.m), strict=True):
            a, b = _label(self.labels, j), _label(self.labels, i)
            names.append(f"variance[{a}]" if i == j else f"covariance[{a},{b}]")
        return tuple(names)

    def build_params(self, theta):
        g = self(theta)
        rows, cols = np.tril_indices(self.m)
        return g[rows, cols]

    def default_theta(self, variance):
        log_sd = 0.5 * jnp.log(variance)
        mask = jnp.asarray(self.scale_mask)
        return jnp.where(mask, log_sd, jnp.zeros((), jnp.result_type(log_sd)))


def _distance_matrix(n: int) -> np.ndarray:
    idx = np.arange(n)
    return np.abs(idx[:, None] - idx[None, :]).astype(np.float64)


class AbstractVarianceCorrelation(AbstractCovariance):
    """σ²·R(ρ) with θ = (θ₀, θ₁): σ² = ``transform``(θ₀), ρ = ``correlation``(θ₁); names "variance", "correlation"."""

    num_free_params = property(lambda self: 2)
    scale_mask = property(lambda self: (True, False))

    def _variance_correlation(self, theta):
        """(σ², ρ) at θ (checked)."""
        theta = self._check_theta(theta)
        return self.transform.forward(theta[0]), self.correlation.forward(theta[1])

    def _local_names(self):
        return ("variance", "correlation")

    def build_params(self, theta):
        return jnp.stack(self._variance_correlation(theta))

    def default_theta(self, variance):
        """θ of σ² = ``variance`` and ρ = 0."""
        return jnp.stack([self.transform.inverse(variance), self.correlation.inverse(jnp.zeros_like(variance))])


class AR1Matrix(AbstractVarianceCorrelation):
    """σ²·ρ^|i−j| (first-order autoregressive), σ² = exp(θ₀), ρ = tanh-like map of θ₁ onto (−1, 1)."""

    n: int = eqx.field(static=True)
    name: str | None = eqx.field(static=True, default=None)
    transform: Exp = Exp()
    correlation: BoundedSigmoid = BoundedSigmoid(-1.0, 1.0)

    def __init__(self, n: int, name: str | None = None):
        self.n = _check_size(n, "AR1Matrix size n")
        self.name = name
        self.transform = Exp()
        self.correlation = BoundedSigmoid(-1.0, 1.0)

    shape = property(lambda self: (self.n, self.n))

    def __call__(self, theta):
        variance, rho = self._variance_correlation(theta)
        lags = _distance_matrix(self.n).astype(np.int64)
        # ρ^lag by gathering from the cumulative product [1, ρ, ρ², …]: exact signs for ρ < 0, lag 0 gives
        # exactly 1, and value and gradient stay finite at ρ = 0 (the default start).
        steps = jnp.concatenate([jnp.ones((1,), variance.dtype), jnp.broadcast_to(rho, (self.n - 1,))])
        return variance * jnp.cumprod(steps)[lags]


class CompoundSymmetricMatrix(AbstractVarianceCorrelation):
    """σ²·[(1−ρ)·I + ρ·11ᵀ], ρ ∈ (−1/(n−1), 1) so that the matrix stays positive definite."""

    n: int = eqx.field(static=True)
    name: str | None = eqx.field(static=True, default=None)
    transform: Exp = Exp()
    correlation: BoundedSigmoid = BoundedSigmoid(-1.0, 1.0)

    def __init__(self, n: int, name: str | None = None):
        self.n = _check_size(n, "CompoundSymmetricMatrix size n")
        self.name = name
        self.transform = Exp()
        lo = -1.0 / (self.n - 1) if self.n > 1 else -1.0
        self.correlation = BoundedSigmoid(lo, 1.0)

    shape = property(lambda self: (self.n, self.n))

    def __call__(self, theta):
        variance, rho = self._variance_correlation(theta)
        eye = jnp.eye(self.n, dtype=variance.dtype)
        return variance * ((1.0 - rho) * eye + rho * jnp.ones_like(eye))


def _mean_positive(values):
    """The mean of a vector (a matrix's diagonal, say), or 1 where it is not positive. Computed on the host when the
    vector is concrete: ``fit_batch`` meets new shapes with every missingness pattern, and JAX compiles for each."""
    if isinstance(values, jax.core.Tracer):
        mean = jnp.mean(values)
        return jnp.where(mean > 0, mean, 1.0)
    mean = float(np.mean(np.asarray(values)))
    return mean if mean > 0 else 1.0


def _diagonal(K):
    return jnp.diagonal(K) if isinstance(K, jax.core.Tracer) else np.diagonal(np.asarray(K))


class FixedMatrix(AbstractScaledMatrix):
    """σ²·K for a known symmetric matrix K (a genomic or pedigree relationship matrix); σ² = exp(θ)."""

    K: Float[Array, "n n"]
    name: str | None = eqx.field(static=True, default=None)
    transform: Exp = Exp()

    def __init__(self, K, name: str | None = None, transform: Exp | None = None):
        K = as_float_array(K, "FixedMatrix K")
        if K.ndim != 2 or K.shape[0] != K.shape[1]:
            raise ValueError(f"FixedMatrix K must be a square matrix, got shape {K.shape}")
        self.K = K
        self.name = name
        self.transform = Exp() if transform is None else transform

    def __check_init__(self):
        if isinstance(self.K, jax.core.Tracer):
            return
        K = np.asarray(self.K)  # on the host: JAX would compile the check anew for every shape of K
        asym = float(np.max(np.abs(K - K.T)))
        scale = float(np.max(np.abs(K))) or 1.0
        if asym > 1e-8 * scale:
            raise ValueError(f"FixedMatrix K must be symmetric: max |K - K.T| = {asym:.3g}")

    shape = property(lambda self: self.K.shape)

    def __call__(self, theta):
        return self._variance(theta) * self.K.astype(jnp.asarray(theta).dtype)

    def default_theta(self, variance):
        return jnp.reshape(self.transform.inverse(variance / _mean_positive(_diagonal(self.K))), (1,))


class KnownDiagonalMatrix(AbstractScaledMatrix):
    """σ²·diag(d) for a known vector d ≥ 0 (n,), σ² = exp(θ): known relative variances (inverse prior weights, as
    lme4's ``weights``: d = 1/w), or a kernel's eigenvalues after its eigenvectors rotated the data (``fit_batch``).

    Paired with a ``ScalarMatrix`` residual, the mixed-model-equations back end treats it as part of a diagonal
    (heteroscedastic) residual covariance R(θ) = σ²_e·I + σ²·diag(d).
    """

    d: Float[Array, " n"]
    name: str | None = eqx.field(static=True, default=None)
    transform: Exp = Exp()

    def __init__(self, d, name: str | None = None, transform: Exp | None = None):
        d = as_float_array(d, "KnownDiagonalMatrix d")
        if d.ndim != 1 or d.shape[0] < 1:
            raise ValueError(f"KnownDiagonalMatrix d must be a non-empty vector, got shape {d.shape}")
        self.d = d
        self.name = name
        self.transform = Exp() if transform is None else transform

    def __check_init__(self):
        if isinstance(self.d, jax.core.Tracer):
            return
        d = np.asarray(self.d)
        bad = np.flatnonzero(~np.isfinite(d) | (d < 0))
        if bad.size:
            raise ValueError(
                f"KnownDiagonalMatrix d must be finite and >= 0: entry {int(bad[0])} is {float(d[bad[0]])}"
                + (f" ({bad.size} such entries)" if bad.size > 1 else "")
            )

    shape = property(lambda self: (self.d.shape[0], self.d.shape[0]))

    def __call__(self, theta):
        return jnp.diag(self._variance(theta) * self.d.astype(jnp.asarray(theta).dtype))

    def default_theta(self, variance):
        return jnp.reshape(self.transform.inverse(variance / _mean_positive(self.d)), (1,))
