"""Floating-point precision policy, and XLA's CPU compiler defaults.

jreml computes in float64 by default: REML log-likelihoods of a few hundred observations differ in the
6th significant digit between float32 and float64, and the AI update needs the extra digits.

Mechanism (documented in README.md, "Precision"):

- On import, jreml turns on JAX's ``jax_enable_x64`` flag **unless** the environment variable
  ``JAX_ENABLE_X64`` is set. An explicit environment setting is the user's choice and is left alone
  (``JAX_ENABLE_X64=0`` is the opt-in to float32).
- The change is an ordinary JAX config update and can be undone at any time with
  ``jax.config.update("jax_enable_x64", False)``; jreml then runs in float32 (explicit opt-in). jreml never
  touches the flag again after import.
- ``jreml.float_dtype()`` reports the dtype jreml currently computes in.

Compile time (README, "Compilation"): on import, before JAX has started a backend, jreml adds
``--xla_cpu_use_fusion_emitters=false`` to ``XLA_FLAGS`` unless that flag is set there already. XLA's CPU
compiler then emits its fused loops with the older LLVM loop emitter instead of the MLIR fusion emitters: a
fitting program compiles 30–45 % sooner and its loops run as fast (``benchmarks/bench_first_use.py`` measures
both settings in one run). The flag only concerns CPU compilation and every program of the process; setting it in
``XLA_FLAGS`` (``=true`` restores XLA's default) is the user's choice and is left alone, as is a backend that
JAX started before jreml was imported.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

_X64_ENV = "JAX_ENABLE_X64"
#: XLA flags jreml sets on import where ``XLA_FLAGS`` leaves them unset (see the module docstring).
XLA_CPU_DEFAULTS = {"xla_cpu_use_fusion_emitters": "false"}


def _apply_default_xla_flags() -> bool:
    """Add ``XLA_CPU_DEFAULTS`` to ``XLA_FLAGS`` for the flags it does not name, if no JAX backend has started
    yet (XLA reads the variable once, when the first backend starts). Returns True if ``XLA_FLAGS`` changed."""
    from jax._src import xla_bridge

    if getattr(xla_bridge, "_backends", None):
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    added = [f"--{name}={value}" for name, value in XLA_CPU_DEFAULTS.items() if f"--{name}" not in flags]
    if not added:
        return False
    os.environ["XLA_FLAGS"] = " ".join([flags.strip(), *added]).strip()
    return True


def _apply_default_precision() -> bool:
    """Turn on float64 unless the user has set ``JAX_ENABLE_X64`` explicitly. Returns True if changed."""
    if _X64_ENV in os.environ:
        return False
    if not jax.config.jax_enable_x64:
        jax.config.update("jax_enable_x64", True)
        return True
    return False


def float_dtype() -> jnp.dtype:
    """The floating dtype jreml computes in now: float64 unless x64 was switched off (float32 opt-in)."""
    return jnp.dtype(jnp.float64) if jax.config.jax_enable_x64 else jnp.dtype(jnp.float32)


def as_float_array(x, name: str = "array") -> jax.Array:
    """Convert ``x`` to a JAX array of jreml's float dtype; integer/bool inputs are cast, complex rejected."""
    if isinstance(x, jax.Array | jax.core.Tracer):
        arr = x
    else:
        arr = np.asarray(x)  # host data is cast on the host: no XLA program for the conversion
    if jnp.issubdtype(arr.dtype, jnp.complexfloating):
        raise TypeError(f"{name} must be real-valued, got dtype {arr.dtype}")
    if isinstance(arr, np.ndarray):
        return jax.device_put(arr.astype(float_dtype()))
    return jnp.asarray(arr).astype(float_dtype())
