"""Spread a batch axis over all devices (``jax.sharding.Mesh`` / ``NamedSharding``)."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["device_count", "in_pieces", "on_cpu", "padded_size", "pad_batch", "shard_batch"]


def device_count() -> int:
    return len(jax.devices())


def on_cpu() -> bool:
    """Whether the default devices are CPUs (where a vmapped lane costs about as much as a call of its own)."""
    return jax.devices()[0].platform == "cpu"


def in_pieces(count: int, width: int, piece) -> dict:
    """``piece(start, stop)`` (a dict of arrays with stop − start rows) for consecutive pieces of ``width`` of
    ``count`` rows, concatenated field by field."""
    parts = [piece(start, min(start + width, count)) for start in range(0, count, width)]
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def padded_size(size: int, multiple: int | None = None) -> int:
    """``size`` rounded up to a multiple of the device count (or of ``multiple``)."""
    m = device_count() if multiple is None else int(multiple)
    return -(-int(size) // m) * m


def pad_batch(x: np.ndarray, size: int) -> np.ndarray:
    """Pad the leading (batch) axis to ``size`` rows by repeating the first row (padding rows are discarded)."""
    x = np.asarray(x)
    if x.shape[0] >= size:
        return x
    pad = np.repeat(x[:1], size - x.shape[0], axis=0)
    return np.concatenate([x, pad], axis=0)


def batch_sharding(ndim: int) -> NamedSharding:
    mesh = Mesh(np.asarray(jax.devices()), ("batch",))
    return NamedSharding(mesh, PartitionSpec("batch", *([None] * (ndim - 1))))


def shard_batch(x):
    """Put ``x`` on all devices, split along its leading axis (whose size must be a multiple of the device count).

    With a single device the array is returned unchanged.
    """
    if device_count() == 1:
        return x
    if x.shape[0] % device_count():
        raise ValueError(f"batch size {x.shape[0]} is not a multiple of the device count {device_count()}")
    return jax.device_put(x, batch_sharding(np.ndim(x)))
