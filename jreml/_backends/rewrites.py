"""Exact rewrites of a model into a form a faster back end evaluates (same V(θ), same parameters and names).

- ``low_rank_kernels``: a relationship matrix K of rank r ≤ q/2 on a factor becomes its factor L (K = L Lᵀ), so
  that the mixed-model equations apply with r effects instead of the dense n×n path.
- ``rotate_kernel``: one full-rank kernel beside other random terms becomes a known diagonal in its eigenbasis,
  a heteroscedastic residual of the mixed-model equations.
- ``batch_form``: what ``fit_batch`` and ``bootstrap`` fit (the first where it applies, else the second).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .._covariance.compose import Sum
from .._covariance.queries import (
    factor_kernels,
    fixed_design,
    known_diagonal_term,
    known_kernels,
    loaded_variance_term,
    rotated_term,
    top_level_terms,
    with_terms,
)
from .._covariance.queries import kernel_on_rows as _kernel_on_rows
from .mme import mme_structure

#: A relationship matrix of rank r ≤ this fraction of its size is fitted through its factor (``low_rank_kernels``).
LOW_RANK_FRACTION = 0.5
#: Eigenvalues at or below this multiple of the largest count as zero when the rank of a relationship matrix is set.
RANK_TOLERANCE = 1e-10


def low_rank_kernels(model):
    """The model with every relationship-matrix term Z·σ²K·Zᵀ whose K (q×q) has rank r ≤ q/2 rewritten exactly as
    (Z L)·σ²I_r·(Z L)ᵀ, K = L Lᵀ with L = U_r Λ_r^½ from K's eigendecomposition (eigenvalues ≤ 1e-10·λ_max taken as
    zero, so V changes by at most that).

    Same V(θ), same parameters and names (both terms are σ² = exp(θ) "variance"), but the model now has the form of
    the mixed-model-equations back end: O(n r² + r³) per iteration instead of the dense O(n³), e.g. genomic
    relationship matrices from fewer markers than individuals, or kernels of group memberships. ``fit_batch``
    applies it to models without the spectral form; BLUPs would be of the r factors, which is why single fits
    keep K.
    """
    replaced = {}
    for kernel in factor_kernels(model):
        eigenvalues, eigenvectors = np.linalg.eigh(kernel.K)
        tolerance = RANK_TOLERANCE * max(float(eigenvalues[-1]), 0.0)
        keep = eigenvalues > tolerance
        rank = int(keep.sum())
        # An indefinite K (an eigenvalue below −tolerance) is left as it is: dropping its negative part would
        # change V.
        if 0 < rank <= LOW_RANK_FRACTION * eigenvalues.shape[0] and eigenvalues[0] >= -tolerance:
            factor = eigenvectors[:, keep] * np.sqrt(eigenvalues[keep])
            loadings = factor[kernel.codes]  # Z·L without forming the n×q incidence matrix
            replaced[kernel.index] = loaded_variance_term(loadings, kernel.transform, kernel.name)
    if not replaced:
        return model
    rewritten = with_terms(model, replaced)
    assert rewritten.param_names == model.param_names, (rewritten.param_names, model.param_names)
    return rewritten


class KernelRotation(NamedTuple):
    """A model rewritten in the eigenbasis of its one full-rank kernel (``rotate_kernel``): fit ``model`` to Uᵀy
    with fixed effects UᵀX."""

    model: Sum
    U: np.ndarray  # (n, n) eigenvectors of the kernel on the observations

    def apply(self, Y, X):
        """Responses (T, n) and fixed effects (n, p) in the kernel's eigenbasis: Y·U and UᵀX (X's dtype kept)."""
        X = np.asarray(X)
        return Y @ self.U, (self.U.T @ X).astype(X.dtype)


def rotate_kernel(model) -> KernelRotation | None:
    """The model σ²_K·K_n + Σ_j Z_j G_j Z_jᵀ + σ²_e·I, with one kernel K_n (n×n on the observations, any rank) and
    random terms of q = Σ q_j ≤ n/2 effects, rewritten exactly in K_n's eigenbasis K_n = U diag(λ) Uᵀ:

        Uᵀ V U = σ²_K·diag(λ) + σ²_e·I + Σ_j (UᵀZ_j) G_j (UᵀZ_j)ᵀ

    a heteroscedastic diagonal residual plus q random effects: the mixed-model-equations back end fits it in
    O(n q² + q³) per iteration instead of the dense O(n³), after one O(n³) eigendecomposition shared by all
    responses (e.g. a genomic relationship matrix plus a cage, batch or environment effect). The likelihood is
    unchanged by the orthogonal rotation (ỹ = Uᵀy, X̃ = UᵀX), and so are θ, β and their information; the
    parameters and their names stay the same. None when the model has another form or K_n is indefinite.
    """
    if not isinstance(model, Sum):
        return None
    n = model.shape[0]
    kernels = known_kernels(model)
    if len(kernels) != 1:
        return None
    (kernel,) = kernels
    terms = top_level_terms(model)
    others = [term for i, term in enumerate(terms) if i != kernel.index]
    rest = mme_structure(Sum(*others)) if len(others) > 1 else None
    if rest is None or rest.heteroscedastic or rest.q > LOW_RANK_FRACTION * n:
        return None
    K = _kernel_on_rows(terms[kernel.index])
    eigenvalues, U = np.linalg.eigh(0.5 * (K + K.T))
    tolerance = RANK_TOLERANCE * max(float(eigenvalues[-1]), 0.0)
    if eigenvalues[0] < -tolerance:  # indefinite: σ²_K·diag(λ) would not be a variance term; the dense path fits it
        return None
    # rounding-level negative eigenvalues (≥ −1e-10·λ_max) become 0: V changes by at most that
    replaced = {kernel.index: known_diagonal_term(np.clip(eigenvalues, 0.0, None), kernel.label, kernel.transform)}
    for i, term in enumerate(terms):
        if i != kernel.index and fixed_design(term) is not None:
            replaced[i] = rotated_term(term, U)
    rotated = with_terms(model, replaced)
    if rotated.param_names != model.param_names:
        return None
    return KernelRotation(rotated, U)


def batch_form(model, spectral: bool) -> tuple[object, KernelRotation | None]:
    """The model ``fit_batch`` fits, and the rotation of the data it needs (or None): the model itself on the
    spectral path, else low-rank kernels through their factors (``low_rank_kernels``) and, when that leaves no
    mixed-model-equations form, one full-rank kernel in its eigenbasis (``rotate_kernel``)."""
    if spectral:
        return model, None
    model = low_rank_kernels(model)
    rotation = None if mme_structure(model) is not None else rotate_kernel(model)
    return (model, None) if rotation is None else (rotation.model, rotation)
