"""Association scan of a mixed model: one test per variant with the null model's covariance (EMMAX / FaST-LMM).

The null model y = Xβ + u + e is fitted once (REML by default); its marginal covariance V̂ (n×n) is kept for every
variant, up to a scale (Kang et al. 2010, Nat. Genet. 42:348; Lippert et al. 2011, Nat. Methods 8:833). With
L = chol(V̂), ỹ = L⁻¹y, X̃ = L⁻¹X, Q an orthonormal basis of X̃'s columns and, per variant, g̃ = L⁻¹g:

    y⊥ = ỹ − QQᵀỹ,  g⊥ = g̃ − QQᵀg̃,  β̂_g = g⊥ᵀy⊥ / g⊥ᵀg⊥,
    RSS₀ = y⊥ᵀy⊥,   RSS₁ = RSS₀ − (g⊥ᵀy⊥)² / g⊥ᵀg⊥        (the GLS fits of y on X and on [X, g]).

- ``test="wald"``: the scale re-estimated per variant, s² = RSS₁/(n − p − 1), se = √(s²/g⊥ᵀg⊥), stat = (β̂/se)²
  ~ F(1, n − p − 1) (EMMAX's test);
- ``test="lrt"``: the scale profiled by ML, stat = n·log(RSS₀/RSS₁) ~ χ²₁ (FaST-LMM with δ fixed);
- ``test="score"``: at the null, stat = (g⊥ᵀy⊥)² / (g⊥ᵀg⊥ · RSS₀/(n − p)) ~ χ²₁.

A missing dosage is replaced by the variant's mean over the rows (GEMMA's default). Cost: one n×n Cholesky, then
O(n²) per variant for L⁻¹g (a triangular solve per chunk of variants in one compiled program).
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import scipy.linalg
from jaxtyping import Array, Float

from .._design.build import build_design
from .._entry import estimate

TESTS = ("wald", "lrt", "score")
VARIANCES = ("null",)
#: Rows beyond which the dense n×n null covariance is refused (8·n² bytes: 3.2 GB at this size).
MAX_ROWS = 20_000


def gwas(
    formula: str,
    data: pd.DataFrame,
    genotypes,
    relmat: dict,
    *,
    test: str = "wald",
    variance: str = "null",
    by: str | None = None,
    method: str = "reml",
    chunk_size: int = 2048,
) -> pd.DataFrame:
    """Test each variant's additive effect on the response of ``formula`` (the module docstring has the tests).

    Args:
        formula: the null model, e.g. ``"trait ~ 1 + sex + (1 | id)"``.
        data: its data; rows with missing values in the formula's columns are dropped as in :func:`jreml.fit`.
        genotypes: dosages (or any numeric genotype scores; NaN missing) of the individuals × variants: a DataFrame
            indexed by the levels of ``by`` (columns name the variants), or an array whose rows are those levels in
            sorted order (as ``relmat`` arrays are).
        relmat: the relationship matrices of the null model, as in :func:`jreml.fit`.
        test: ``"wald"``, ``"lrt"`` or ``"score"``.
        variance: ``"null"``: the null model's covariance for every variant.
        by: the grouping column whose levels the genotype rows are; default the one ``relmat`` key.
        method: ``"reml"`` or ``"ml"`` for the null fit.
        chunk_size: variants per compiled step.

    Returns:
        One row per variant: ``variant, beta, se, stat, p`` and ``h2`` (the null model's h² = σ²_g / (σ²_g + σ²_e)
        when it has one relationship-matrix term). Variants that cannot be tested (constant on the rows, or
        collinear with X) get NaN in every column, with a warning that counts them.
    """
    if test not in TESTS:
        raise ValueError(f"test must be one of {TESTS}, got {test!r}")
    if variance not in VARIANCES:
        raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
    if not relmat:
        raise ValueError("relmat must give the null model's relationship matrix, e.g. relmat={'id': K}")
    if by is None:
        if len(relmat) != 1:
            raise ValueError(
                f"relmat has {len(relmat)} keys {sorted(relmat)}: say which one the genotypes follow (by=)"
            )
        by = next(iter(relmat))
    design = build_design(formula, data, relmat)
    n, p = design.X.shape
    if n > MAX_ROWS:
        gib = 8 * n * n / 2**30
        raise MemoryError(f"the null covariance would be {n}×{n} ({gib:.1f} GiB): at most {MAX_ROWS} rows")
    values, rows, variants = _rows_of(genotypes, design.data[by], by)
    m = values.shape[1]
    null = estimate(design.model, design.y, design.X, method=method)
    if not bool(null.converged):
        message = f"the null model did not converge ({null.message}); the tests use its last estimate"
        warnings.warn(message, stacklevel=2)

    factor = np.linalg.cholesky(np.asarray(null.model(null.theta)))
    X_tilde = scipy.linalg.solve_triangular(factor, design.X, lower=True)
    y_tilde = scipy.linalg.solve_triangular(factor, design.y, lower=True)
    basis, _ = np.linalg.qr(X_tilde)
    y_perp = y_tilde - basis @ (basis.T @ y_tilde)

    chunk = max(1, min(int(chunk_size), m))
    step = _scan_step(n, p, chunk)
    pieces = []
    for start in range(0, m, chunk):
        block = _chunk_rows(values, rows, start, min(start + chunk, m), variants)
        width = block.shape[1]
        if width < chunk:
            block = np.concatenate([block, np.zeros((n, chunk - width))], axis=1)
        sums = step(jnp.asarray(factor), jnp.asarray(basis), jnp.asarray(y_perp), jnp.asarray(block))
        pieces.append([np.asarray(v)[:width] for v in sums])
    gg, gy, norm = (np.concatenate(v) for v in zip(*pieces, strict=True))
    table = _statistics(gg, gy, norm, float(y_perp @ y_perp), n, p, test)
    table.insert(0, "variant", variants)
    untestable = table["p"].isna()
    if untestable.any():
        names = table.loc[untestable, "variant"].tolist()
        warnings.warn(
            f"{len(names)} variant(s) cannot be tested (constant on the {n} rows or collinear with the fixed "
            f"effects): {names[:5]}{' ...' if len(names) > 5 else ''}; their rows are NaN",
            stacklevel=2,
        )
    kernels = [name for name in null.param_names if name.removesuffix(".variance") in relmat]
    if len(kernels) == 1 and len(null.param_names) == 2:
        genetic, residual = (float(null.params[name]) for name in (kernels[0], "Residual.variance"))
        table["h2"] = genetic / (genetic + residual)
    return table


def _rows_of(genotypes, groups: pd.Series, by: str) -> tuple[np.ndarray, np.ndarray, list]:
    """The genotype matrix as given (individuals × variants, not copied), the genotype row of each data row, and
    the variants' names."""
    labels = groups.astype(str).to_numpy()
    if isinstance(genotypes, pd.DataFrame):
        index = [str(v) for v in genotypes.index]
        variants = list(genotypes.columns)
        values = genotypes.to_numpy()
    else:
        values = np.asarray(genotypes)
        if values.ndim != 2:
            raise ValueError(f"genotypes must be individuals × variants, got shape {values.shape}")
        index = sorted(set(labels))
        if values.shape[0] != len(index):
            raise ValueError(
                f"genotypes has {values.shape[0]} rows but {by!r} has {len(index)} levels; pass a DataFrame indexed "
                "by level to match by name"
            )
        variants = list(range(values.shape[1]))
    if values.dtype.kind not in "biuf":
        raise TypeError(f"genotypes must be numeric, got dtype {values.dtype}")
    position = {v: i for i, v in enumerate(index)}
    absent = sorted({v for v in labels if v not in position})
    if absent:
        raise ValueError(f"genotypes has no row for level(s) {absent[:10]} of {by!r}")
    return values, np.array([position[v] for v in labels]), variants


def _chunk_rows(values: np.ndarray, rows: np.ndarray, start: int, stop: int, variants: list) -> np.ndarray:
    """Variants start..stop on the data rows, as floats, a missing dosage replaced by its variant's mean."""
    block = values[:, start:stop].astype(float)[rows]
    if np.isinf(block).any():
        i, k = (int(v[0]) for v in np.nonzero(np.isinf(block)))
        raise ValueError(f"genotypes of data row {i} at variant {variants[start + k]!r} is infinite")
    missing = np.isnan(block)
    if missing.any():
        typed = (~missing).sum(axis=0)
        means = np.where(typed > 0, np.nansum(block, axis=0) / np.maximum(typed, 1), 0.0)
        block = np.where(missing, means, block)
    return block


@functools.cache
def _scan_step(n: int, p: int, chunk: int):
    """g⊥ᵀg⊥, g⊥ᵀy⊥ and g̃ᵀg̃ for a chunk of variants, one compiled program per (n, p, chunk)."""

    @jax.jit
    def step(
        factor: Float[Array, "n n"], basis: Float[Array, "n p"], y_perp: Float[Array, " n"], block: Float[Array, "n c"]
    ):
        whitened = jax.scipy.linalg.solve_triangular(factor, block, lower=True)
        residual = whitened - basis @ (basis.T @ whitened)
        return jnp.sum(residual * residual, axis=0), residual.T @ y_perp, jnp.sum(whitened * whitened, axis=0)

    return step


def _statistics(gg, gy, norm, rss0: float, n: int, p: int, test: str) -> pd.DataFrame:
    """β̂, se, statistic and p per variant from g⊥ᵀg⊥, g⊥ᵀy⊥ and g̃ᵀg̃ (module docstring); a variant with less than
    1e-10 of its whitened sum of squares left after projecting out X is collinear with X (or constant)."""
    from scipy import stats  # imported on first use: scipy.stats costs about a second to import

    testable = (gg > 1e-10 * norm) & (norm > 0) & (n - p - 1 > 0)
    gg_safe = np.where(testable, gg, 1.0)
    beta = gy / gg_safe
    rss1 = np.maximum(rss0 - gy * beta, 0.0)
    residual_df = n - p - 1
    s2 = rss1 / residual_df
    se = np.sqrt(s2 / gg_safe)
    if test == "wald":
        stat = beta**2 / np.where(se > 0, se**2, np.inf)
        pvalue = stats.f.sf(stat, 1, residual_df)
    elif test == "lrt":
        explained = np.minimum(gy * beta / rss0, 1.0 - np.finfo(float).eps)  # (RSS₀ − RSS₁)/RSS₀ without cancellation
        stat = -n * np.log1p(-explained)
        pvalue = stats.chi2.sf(stat, 1)
    else:
        stat = gy**2 / (gg_safe * rss0 / (n - p))
        pvalue = stats.chi2.sf(stat, 1)
    columns = {"beta": beta, "se": se, "stat": stat, "p": pvalue}
    return pd.DataFrame({name: np.where(testable, value, np.nan) for name, value in columns.items()})
