"""Simulates singular_sleepstudy.csv: 60 responses on the sleepstudy design (Days, Subject),
y = 250 + 10·Days + b0 + b1·Days + e, (b0, b1) ~ N(0, G), with G zero, of rank 1, tiny, regular, slope-only or
intercept-only (10 responses each, in that rotation). Run from tests/reference."""

import numpy as np
import pandas as pd

import jreml

KINDS = ["zero", "rank1", "tiny", "regular", "slope_only", "intercept_only"]


def covariance(kind: str, sd_e: float, rng) -> np.ndarray:
    if kind == "zero":
        return np.zeros((2, 2))
    if kind == "rank1":
        v = np.array([rng.uniform(0.2, 1.5), rng.choice([-1, 1]) * rng.uniform(0.02, 0.3)]) * sd_e
        return np.outer(v, v)
    if kind == "tiny":
        return np.diag([0.01, 0.0005]) * sd_e**2
    if kind == "regular":
        s = np.array([rng.uniform(0.5, 2), rng.uniform(0.05, 0.4)]) * sd_e
        r = rng.uniform(-0.6, 0.6)
        return np.array([[s[0] ** 2, r * s[0] * s[1]], [r * s[0] * s[1], s[1] ** 2]])
    if kind == "slope_only":
        return np.diag([0.0, (rng.uniform(0.05, 0.3) * sd_e) ** 2])
    return np.diag([(rng.uniform(0.3, 1.5) * sd_e) ** 2, 0.0])


def main():
    design = jreml.example("sleepstudy").data[["Days", "Subject"]].copy()
    rng = np.random.default_rng(20261122)
    days = design["Days"].to_numpy()
    subject = design["Subject"].astype("category").cat.codes.to_numpy()
    responses = {}
    for j in range(60):
        kind = KINDS[j % len(KINDS)]
        sd_e = rng.uniform(0.5, 30)
        eigenvalues, eigenvectors = np.linalg.eigh(covariance(kind, sd_e, rng))
        factor = eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))
        b = rng.normal(size=(subject.max() + 1, 2)) @ factor.T
        y = 250 + 10 * days + b[subject, 0] + b[subject, 1] * days + rng.normal(size=len(design)) * sd_e
        responses[f"y{j}"] = np.round(y, 6)
    pd.concat([design, pd.DataFrame(responses)], axis=1).to_csv("singular_sleepstudy.csv", index=False)


if __name__ == "__main__":
    main()
