"""The fields every batch of fits shares (``BatchFit`` of ``fit_batch``, ``BootstrapResult`` of ``bootstrap``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ManyFits:
    """Fits of one model along a leading axis (responses or replicates, T): θ̂ (T, k), natural-scale parameters
    (T, k) named by ``param_names``, β̂ (T, p) named by ``beta_names``, ℓ, ``converged``, ``n_iter``, ``status``
    (``RESULTS`` codes) and ``singular`` (T,)."""

    param_names: tuple[str, ...]
    beta_names: tuple[str, ...]
    theta: np.ndarray
    params: np.ndarray
    beta: np.ndarray
    loglik: np.ndarray
    converged: np.ndarray
    n_iter: np.ndarray
    status: np.ndarray
    singular: np.ndarray

    def __len__(self) -> int:
        return int(np.shape(self.loglik)[0])
