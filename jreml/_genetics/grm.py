"""Genomic relationship matrices from an n×m dosage matrix (individuals × variants).

Two estimators, both from allele dosages x_ij ∈ [0, 2] (the count of the coded allele; NaN where missing) and the
allele frequency p_i = mean_j(x_ij) / 2 over the individuals genotyped at variant i:

- ``method="vanraden"`` (VanRaden 2008, J. Dairy Sci. 91:4414, method 1):
  G = W Wᵀ / (2 Σ_i p_i(1 − p_i)) with W_ji = x_ji − 2p_i, a missing dosage imputed by its mean (W_ji = 0).
- ``method="gcta"`` (Yang et al. 2011, Am. J. Hum. Genet. 88:76, GCTA's ``--make-grm``):
  A_jk = (1/N_jk) Σ_i (x_ji − 2p_i)(x_ki − 2p_i) / (2p_i(1 − p_i)) for j ≠ k and
  A_jj = 1 + (1/N_jj) Σ_i (x_ji² − (1 + 2p_i)x_ji + 2p_i²) / (2p_i(1 − p_i)), where N_jk counts the variants
  genotyped in both j and k (a missing dosage adds nothing to the sums).

Variants whose minor-allele frequency min(p, 1 − p) is below ``maf``, and monomorphic ones always, are dropped.
The sums run over chunks of ``chunk_size`` variants in one compiled program (the last chunk padded with missing
columns), so an n×m matrix never needs to sit on the device at once: memory O(n² + n·chunk_size).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from jaxtyping import Array, Float

METHODS = ("gcta", "vanraden")


def grm(
    genotypes,
    method: str = "gcta",
    maf: float = 0.0,
    chunk_size: int = 4096,
) -> Float[np.ndarray, "n n"] | pd.DataFrame:
    """The genomic relationship matrix of n individuals from their n×m allele dosages.

    Args:
        genotypes: n×m dosages (rows individuals, columns variants), values in [0, 2] or NaN for missing; a
            DataFrame keeps its row labels on the result (so it can be passed as ``relmat={"id": G}``).
        method: ``"gcta"`` (standardised, Yang et al. 2011) or ``"vanraden"`` (VanRaden 2008, method 1); the
            formulas are in the module docstring.
        maf: drop variants with minor-allele frequency below this (monomorphic variants are always dropped).
        chunk_size: variants per device chunk.

    Returns:
        The n×n matrix (a DataFrame indexed and labelled by the rows of a DataFrame input).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not 0.0 <= float(maf) < 0.5:
        raise ValueError(f"maf must be in [0, 0.5), got {maf!r}")
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    labels = genotypes.index if isinstance(genotypes, pd.DataFrame) else None
    columns = list(genotypes.columns) if isinstance(genotypes, pd.DataFrame) else None
    dosages = np.asarray(genotypes.to_numpy(dtype=float) if labels is not None else genotypes, dtype=float)
    if dosages.ndim != 2:
        raise ValueError(f"genotypes must be an n×m matrix (individuals × variants), got shape {dosages.shape}")
    n, m = dosages.shape
    if n < 1 or m < 1:
        raise ValueError(f"genotypes must have at least one individual and one variant, got shape {dosages.shape}")
    _check_dosages(dosages, labels, columns)

    chunk = min(int(chunk_size), m)
    accumulate = _chunk_sums(n, chunk, method == "gcta")
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    cross = jnp.zeros((n, n), dtype)
    counts = jnp.zeros((n, n), dtype)
    diagonal = jnp.zeros((n,), dtype)
    scale = jnp.zeros((), dtype)
    for start in range(0, m, chunk):
        block = dosages[:, start : start + chunk]
        if block.shape[1] < chunk:  # pad with missing variants: they are dropped as monomorphic
            block = np.concatenate([block, np.full((n, chunk - block.shape[1]), np.nan)], axis=1)
        cross, counts, diagonal, scale = accumulate(
            cross, counts, diagonal, scale, jnp.asarray(block, dtype), jnp.asarray(maf, dtype)
        )
    used = int(round(float(jnp.max(counts)))) if method == "gcta" else None
    if method == "vanraden":
        if float(scale) == 0.0:
            raise ValueError(f"no variant passes the filter (maf ≥ {maf}, not monomorphic): the GRM is undefined")
        relationship = np.array(cross / scale)
    else:
        if used == 0:
            raise ValueError(f"no variant passes the filter (maf ≥ {maf}, not monomorphic): the GRM is undefined")
        untyped = np.flatnonzero(np.asarray(jnp.diagonal(counts)) == 0)
        if untyped.size:
            where = [labels[i] for i in untyped[:10]] if labels is not None else untyped[:10].tolist()
            raise ValueError(f"individual(s) {where} have no genotype at any variant that passes the filter")
        relationship = np.array(cross / jnp.maximum(counts, 1.0))
        np.fill_diagonal(relationship, 1.0 + np.asarray(diagonal) / np.diagonal(np.asarray(counts)))
    if labels is not None:
        return pd.DataFrame(relationship, index=labels, columns=labels)
    return relationship


def _check_dosages(dosages: np.ndarray, labels, columns) -> None:
    """Dosages in [0, 2] or NaN; the first offending entry is named by row and column."""
    bad = ~(np.isnan(dosages) | ((dosages >= 0.0) & (dosages <= 2.0)))
    if bad.any():
        i, k = (int(v[0]) for v in np.nonzero(bad))
        row = labels[i] if labels is not None else i
        col = columns[k] if columns is not None else k
        raise ValueError(
            f"genotypes must be allele dosages in [0, 2] or NaN (missing); row {row!r}, variant {col!r} "
            f"holds {float(dosages[i, k])!r}"
        )


@functools.cache
def _chunk_sums(n: int, chunk: int, standardised: bool):
    """One compiled update of the running sums with a chunk of ``chunk`` variants (cached per shape)."""

    @jax.jit
    def update(
        cross: Float[Array, "n n"],
        counts: Float[Array, "n n"],
        diagonal: Float[Array, " n"],
        scale: Float[Array, ""],
        block: Float[Array, "n c"],
        maf: Float[Array, ""],
    ):
        typed = ~jnp.isnan(block)
        observed = typed.astype(block.dtype)
        x = jnp.where(typed, block, 0.0)
        n_typed = observed.sum(axis=0)
        p = x.sum(axis=0) / (2.0 * jnp.maximum(n_typed, 1.0))
        minor = jnp.minimum(p, 1.0 - p)
        keep = (n_typed > 0) & (minor > 0) & (minor >= maf)
        variance = 2.0 * p * (1.0 - p)
        centred = jnp.where(typed & keep, x - 2.0 * p, 0.0)
        if not standardised:
            return cross + centred @ centred.T, counts, diagonal, scale + jnp.sum(jnp.where(keep, variance, 0.0))
        inv_sd = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, variance, 1.0)), 0.0)
        w = centred * inv_sd
        kept = observed * keep.astype(block.dtype)
        self_term = jnp.where(typed, x * x - (1.0 + 2.0 * p) * x + 2.0 * p * p, 0.0) * inv_sd**2
        return cross + w @ w.T, counts + kept @ kept.T, diagonal + self_term.sum(axis=1), scale

    return update
