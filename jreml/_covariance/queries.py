"""Structure queries: what the back ends, the batch engine and the profiled objectives ask of a model.

Every question about a model's *form* (which term is the residual, whether V = σ²_k·K + σ²_e·I, which terms are
known kernels, how θ moves when V is rescaled, which rows a model observes) is answered here, in one place, so
that the layers above never test a covariance class themselves (as lineax's ``is_diagonal``/``is_symmetric``
queries do for its operators). A query returns ``None`` for a model outside the form it asks about.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from .base import AbstractCovariance
from .basic import (
    AR1Matrix,
    CompoundSymmetricMatrix,
    DiagonalMatrix,
    FixedMatrix,
    KnownDiagonalMatrix,
    ScalarMatrix,
    UnstructuredMatrix,
)
from .compose import ConstantMatrix, CovariancePropagation, CustomMatrix, DummyMatrix, KroneckerProduct, Sum, _split
from .observed import ObservedRows
from .transforms import Exp

# --------------------------------------------------------------------------------------------------------------
# Terms of a model
# --------------------------------------------------------------------------------------------------------------


def top_level_terms(model: AbstractCovariance) -> tuple[AbstractCovariance, ...]:
    """The terms of a top-level ``Sum`` (a model that is not a sum is one term)."""
    return model.terms if isinstance(model, Sum) else (model,)


def residual_index(model: AbstractCovariance) -> int | None:
    """The residual term σ²·I of a model: the index, in its top-level ``Sum``, of the last ``ScalarMatrix`` term
    (the one rule every back end uses), or None when the model is not a sum or has no such term."""
    if not isinstance(model, Sum):
        return None
    found = [i for i, term in enumerate(model.terms) if isinstance(term, ScalarMatrix)]
    return found[-1] if found else None


def observed_mask(model: AbstractCovariance):
    """The rows an ``ObservedRows`` model keeps (a boolean n-vector, possibly traced), or None for a model on all
    of its rows."""
    return model.observed if isinstance(model, ObservedRows) else None


def as_covariance(v_builder, theta0, n: int, what: str = "v_builder") -> AbstractCovariance:
    """A covariance module: ``v_builder`` itself, or a plain function θ ↦ V (n×n) wrapped in ``CustomMatrix``
    (which needs ``theta0`` for its number of parameters)."""
    if isinstance(v_builder, AbstractCovariance):
        return v_builder
    if not callable(v_builder):
        raise TypeError(f"{what} must be a covariance module or a function theta -> V, got {type(v_builder).__name__}")
    if theta0 is None:
        raise ValueError(f"a plain function {what} needs theta0 (its number of parameters is unknown)")
    return CustomMatrix(v_builder, int(np.shape(theta0)[0]), shape=(n, n))


def is_covariance(value) -> bool:
    """Whether ``value`` is a covariance module (not a plain function or array)."""
    return isinstance(value, AbstractCovariance)


# --------------------------------------------------------------------------------------------------------------
# Known kernels: one-variance terms σ²·K with K fixed
# --------------------------------------------------------------------------------------------------------------


def variance_power(module: AbstractCovariance) -> float | None:
    """p of a module whose variance is σ² = exp(p·θ) (an ``Exp`` transform), else None."""
    transform = getattr(module, "transform", None)
    return float(transform.power) if isinstance(transform, Exp) else None


def one_variance_power(term: AbstractCovariance) -> float | None:
    """The transform power of a one-variance linear term σ²·K — ``FixedMatrix(K)``, ``ScalarMatrix`` or
    Z·(σ²K or σ²I)·Zᵀ with a parameter-free Z — or None for any other term."""
    if isinstance(term, FixedMatrix | ScalarMatrix):
        return variance_power(term)
    if isinstance(term, CovariancePropagation) and term.Z.num_free_params == 0:
        if isinstance(term.G, FixedMatrix | ScalarMatrix):
            return variance_power(term.G)
    return None


def kernel_on_rows(term: AbstractCovariance) -> np.ndarray:
    """The known matrix of a one-variance term σ²·K (K, I, or Z·K·Zᵀ with a fixed Z) on the observations, n×n, in
    numpy (no JAX operations: ``fit_batch`` calls this once per missingness pattern, and JAX would compile a new
    program for every new shape)."""
    inner = term.G if isinstance(term, CovariancePropagation) else term
    K = np.asarray(inner.K, dtype=float) if isinstance(inner, FixedMatrix) else np.eye(inner.shape[0])
    if not isinstance(term, CovariancePropagation):
        return K
    if isinstance(term.Z, DummyMatrix) and not term.Z.drop_first:
        codes = np.asarray(term.Z.codes)
        return K[np.ix_(codes, codes)]
    z = np.asarray(term.Z(jnp.zeros((0,))), dtype=float)
    return z @ K @ z.T


class KnownKernel(NamedTuple):
    """A relationship-matrix term σ²·K or Z·σ²K·Zᵀ (``FixedMatrix`` K, parameter-free Z) of a model."""

    index: int  # position in the model's top-level terms
    label: str | None  # the variance's label (term and G names joined by ".")
    transform: object  # σ²'s transform


def known_kernels(model: AbstractCovariance) -> tuple[KnownKernel, ...]:
    """The relationship-matrix terms of a model's top-level sum (``known_kernel_on_rows`` gives each one's n×n
    matrix)."""
    found = []
    for i, term in enumerate(top_level_terms(model)):
        if isinstance(term, FixedMatrix):
            found.append(KnownKernel(i, term.label, term.transform))
        elif isinstance(term, CovariancePropagation) and isinstance(term.G, FixedMatrix) and not term.Z.num_free_params:
            label = ".".join(part for part in (term.label, term.G.label) if part)
            found.append(KnownKernel(i, label or None, term.G.transform))
    return tuple(found)


def kernel_variance_index(model: AbstractCovariance) -> tuple[int, tuple[float, ...]] | None:
    """(θ index of the single relationship-matrix variance, every θ entry's variance power), for h²; None unless
    the model is a variance-component sum (``em_plan()``) with exactly one term built on a ``FixedMatrix``."""
    plan = model.em_plan()
    if plan is None or not isinstance(model, Sum):
        return None
    hits, offset = [], 0
    for term in model.terms:
        inner = term.G if isinstance(term, CovariancePropagation) else term
        if isinstance(inner, FixedMatrix):
            hits.append(offset + term.num_free_params - 1)
        offset += term.num_free_params
    if len(hits) != 1:
        return None
    return hits[0], tuple(float(power) for _, power in plan)


class FactorKernel(NamedTuple):
    """A term Z·σ²K·Zᵀ whose Z is a factor's incidence matrix (``DummyMatrix`` codes without a dropped level)."""

    index: int  # position in the model's top-level terms
    K: np.ndarray  # (q, q)
    codes: np.ndarray  # (n,) the factor's level of each row
    transform: object
    name: str | None


def factor_kernels(model: AbstractCovariance) -> tuple[FactorKernel, ...]:
    """Every relationship-matrix term on a factor, Z·σ²K·Zᵀ with Z = ``DummyMatrix`` (K in numpy), of a top-level
    sum: the terms a low-rank K can replace by its factor."""
    if not isinstance(model, Sum):
        return ()
    found = []
    for i, term in enumerate(model.terms):
        if (
            isinstance(term, CovariancePropagation)
            and isinstance(term.Z, DummyMatrix)
            and not term.Z.drop_first
            and isinstance(term.G, FixedMatrix)
        ):
            K = np.asarray(term.G.K, dtype=float)
            found.append(FactorKernel(i, K, np.asarray(term.Z.codes), term.G.transform, term.name))
    return tuple(found)


def fixed_design(term: AbstractCovariance) -> np.ndarray | None:
    """Z (n×q, numpy) of a term Z·G·Zᵀ with a parameter-free Z, or None for any other term."""
    if not isinstance(term, CovariancePropagation) or term.Z.num_free_params:
        return None
    return np.asarray(term.Z(jnp.zeros((0,))), dtype=float)


def with_terms(model: AbstractCovariance, replaced: dict) -> Sum:
    """The top-level sum with the terms at the given indices replaced (``{index: new term}``), its name kept."""
    return Sum(*(replaced.get(i, term) for i, term in enumerate(model.terms)), name=model.name)


def loaded_variance_term(loadings: np.ndarray, transform, name: str | None) -> CovariancePropagation:
    """L·σ²I·Lᵀ for fixed loadings L (n×r): a kernel term through its factor."""
    G = ScalarMatrix(loadings.shape[1], transform=transform)
    return CovariancePropagation(ConstantMatrix(loadings), G, name=name)


def rotated_term(term: CovariancePropagation, U: np.ndarray) -> CovariancePropagation:
    """(UᵀZ)·G·(UᵀZ)ᵀ of a fixed-Z term (``fixed_design``), the data rotated by U."""
    return CovariancePropagation(ConstantMatrix(U.T @ fixed_design(term)), term.G, name=term.name)


def known_diagonal_term(d: np.ndarray, name: str | None, transform) -> KnownDiagonalMatrix:
    """σ²·diag(d) for a known d ≥ 0."""
    return KnownDiagonalMatrix(d, name=name, transform=transform)


# --------------------------------------------------------------------------------------------------------------
# The spectral form V = σ²_k·K + σ²_e·I
# --------------------------------------------------------------------------------------------------------------


class SpectralForm(NamedTuple):
    """A model V = σ²_k·K + σ²_e·I: the kernel, θ positions of the two variances and their transform powers."""

    kernel: np.ndarray | None  # None in the compact designs fit_batch keeps per missingness pattern
    kernel_index: int
    residual_index: int
    powers: tuple[float, float]  # (kernel, residual)
    param_names: tuple[str, ...]


def spectral_terms(model: AbstractCovariance) -> tuple[int, int, tuple[float, float]] | None:
    """(kernel term index, residual term index, (kernel, residual) variance powers) when the model is
    σ²_k·K + σ²_e·I — two one-variance terms, the residual a ``ScalarMatrix`` (``residual_index``'s rule) — else
    None. Builds no matrix."""
    if not isinstance(model, Sum) or len(model.terms) != 2:
        return None
    if any(t.num_free_params != 1 for t in model.terms):
        return None
    e_index = residual_index(model)
    if e_index is None:
        return None
    k_index = 1 - e_index
    p_e, p_k = variance_power(model.terms[e_index]), one_variance_power(model.terms[k_index])
    if p_e is None or p_k is None:
        return None
    return k_index, e_index, (p_k, p_e)


def spectral_form(model: AbstractCovariance) -> SpectralForm | None:
    """The :class:`SpectralForm` of ``model`` (with its n×n kernel) if it is σ²_k·K + σ²_e·I, else ``None``."""
    terms = spectral_terms(model)
    if terms is None:
        return None
    k_index, e_index, powers = terms
    return SpectralForm(kernel_on_rows(model.terms[k_index]), k_index, e_index, powers, model.param_names)


# --------------------------------------------------------------------------------------------------------------
# Rescaling V by a constant (profiled likelihoods)
# --------------------------------------------------------------------------------------------------------------


def rescale_theta(module: AbstractCovariance, theta, log_c):
    """θ' with module(θ') = exp(log_c)·module(θ); ValueError naming the term when the module cannot be rescaled."""
    if isinstance(module, ScalarMatrix | DiagonalMatrix | FixedMatrix | KnownDiagonalMatrix):
        return theta + log_c / module.transform.power
    if isinstance(module, AR1Matrix | CompoundSymmetricMatrix):
        return jnp.concatenate([theta[:1] + log_c / module.transform.power, theta[1:]])
    if isinstance(module, UnstructuredMatrix):
        diag = np.zeros(module.num_free_params, dtype=bool)
        diag[list(module.transform.diagonal_positions)] = True
        half = 0.5 * log_c
        return jnp.where(jnp.asarray(diag), theta + half, theta * jnp.exp(half))
    if isinstance(module, CovariancePropagation):
        theta_z, theta_g = module.split(theta)
        return jnp.concatenate([theta_z, rescale_theta(module.G, theta_g, log_c)])
    if isinstance(module, KroneckerProduct):
        theta_a, theta_b = module.split(theta)
        if module.A.num_free_params:
            return jnp.concatenate([rescale_theta(module.A, theta_a, log_c), theta_b])
        return jnp.concatenate([theta_a, rescale_theta(module.B, theta_b, log_c)])
    if isinstance(module, ObservedRows):  # its placeholders' unit variance does not enter ℓ
        return rescale_theta(module.model, theta, log_c)
    if isinstance(module, Sum):
        parts = _split(theta, [t.num_free_params for t in module.terms])
        return jnp.concatenate([rescale_theta(t, part, log_c) for t, part in zip(module.terms, parts, strict=True)])
    kind = "a CustomMatrix" if isinstance(module, CustomMatrix) else type(module).__name__
    raise ValueError(
        f"cannot profile the residual variance: {kind} term {module.label or ''!r} cannot be rescaled by σ² "
        "(use profile_scale=False to profile only β)"
    )
