"""Simulates singular_slopes3.csv: 60 responses on 15 groups × 8 rows with two covariates,
y = 1 + 0.5·x1 − 0.3·x2 + b0 + b1·x1 + b2·x2 + e, (b0, b1, b2) ~ N(0, G), with G zero, of rank 1, of rank 2 or of
full rank (15 responses each, in that rotation). Run from tests/reference."""

import numpy as np
import pandas as pd


def main():
    rng = np.random.default_rng(7)
    groups, per_group = 15, 8
    g = np.repeat(np.arange(groups), per_group)
    x1 = rng.normal(size=groups * per_group)
    x2 = rng.uniform(0, 5, size=groups * per_group)
    columns = {"g": [f"g{i}" for i in g], "x1": np.round(x1, 6), "x2": np.round(x2, 6)}
    for j in range(60):
        sd_e = rng.uniform(0.5, 5)
        rank = j % 4  # 0: G = 0, 1: rank 1, 2: rank 2, 3: full rank
        factor = rng.normal(size=(3, 3)) * sd_e * rng.uniform(0.05, 0.8, size=3)[:, None]
        G = factor[:, :rank] @ factor[:, :rank].T
        eigenvalues, eigenvectors = np.linalg.eigh(G)
        b = rng.normal(size=(groups, 3)) @ (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))).T
        y = 1 + 0.5 * x1 - 0.3 * x2 + b[g, 0] + b[g, 1] * x1 + b[g, 2] * x2 + rng.normal(size=g.size) * sd_e
        columns[f"y{j}"] = np.round(y, 6)
    pd.DataFrame(columns).to_csv("singular_slopes3.csv", index=False)


if __name__ == "__main__":
    main()
