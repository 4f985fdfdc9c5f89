"""Bundled example data sets (see PROVENANCE.md): ``load(name)`` returns a pandas DataFrame.

Grouping-factor columns are strings, so numeric-looking codes (sleepstudy's Subject, Machines' Worker)
are factors, as in R.
"""

from __future__ import annotations

from importlib import resources

import numpy as np
import pandas as pd

# name -> (file, grouping-factor columns, description)
_DATASETS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "dyestuff": ("Dyestuff.csv", ("Batch",), "Yield of dyestuff from 6 batches (lme4), 30 obs"),
    "sleepstudy": (
        "sleepstudy.csv",
        ("Subject",),
        "Reaction times of 18 subjects over 10 days of sleep deprivation (lme4)",
    ),
    "penicillin": ("Penicillin.csv", ("plate", "sample"), "Penicillin assay, 24 plates x 6 samples, crossed (lme4)"),
    "machines": (
        "Machines.csv",
        ("Worker", "Machine", "Worker_Machine"),
        "Productivity scores, 6 workers x 3 machines (nlme)",
    ),
    "john_alpha": (
        "john_alpha.csv",
        ("rep", "block", "gen"),
        "Alpha-lattice trial: 24 genotypes, 3 reps, 6 blocks/rep",
    ),
    "cbpp": (
        "cbpp.csv",
        ("herd", "period"),
        "Contagious bovine pleuropneumonia: incidence out of herd size, 15 herds x 4 periods (lme4), 56 obs",
    ),
    "kinship": (
        "kinship_visible_traits.csv",
        ("id",),
        "Simulated: 400 individuals, 8 traits, a genomic relationship matrix",
    ),
}


def list_datasets() -> dict[str, str]:
    """Names of the bundled data sets with a one-line description."""
    return {name: desc for name, (_, _, desc) in _DATASETS.items()}


def _path(filename: str):
    return resources.files(__name__).joinpath(filename)


def load(name: str) -> pd.DataFrame:
    """The bundled data set ``name`` (see :func:`list_datasets`) as a DataFrame; factor columns as strings."""
    key = name.lower()
    if key not in _DATASETS:
        raise ValueError(f"unknown data set {name!r}; available: {', '.join(_DATASETS)}")
    filename, factors, _ = _DATASETS[key]
    with _path(filename).open("r") as fh:
        frame = pd.read_csv(fh, dtype={f: str for f in factors})
    return frame


def kinship_matrix() -> np.ndarray:
    """The 400×400 genomic relationship matrix of the ``kinship`` data set (rows in the traits' order)."""
    with _path("kinship_visible_K.csv").open("r") as fh:
        return np.loadtxt(fh, delimiter=",")
