"""Work-around for a deadlock in jaxlib's batched CPU LAPACK kernels (jaxlib < 0.11.2).

The bug: jaxlib 0.10.x splits a batched LAPACK call (``lapack_dpotrf_ffi``, ``lapack_dtrsm_ffi``, ``syevd``,
...) whose total work ``batch × per-matrix work`` reaches 200,000 into chunks, schedules them on XLA's
intra-op thread pool and blocks until they are done (``jax::ParallelBatchMap``). When XLA's thunk executor
is itself running that call on a pool worker, the chunks can be left in the blocked worker's queue while
the other workers sleep: the process hangs at 0 % CPU. It hit jreml's vmapped dense fits (two lanes at
n = 600 hang deterministically) and, at random, the test suite. jaxlib 0.11.2 compiles the parallel path
out of open-source builds.

The fix here changes only how such a call is *lowered on CPU*: a batched call whose work would be split is
emitted as a loop (``lax.map``) over groups of matrices small enough for jaxlib to run inline on the
calling thread. Results are bit-for-bit those of the batched kernel (the same LAPACK routine runs on each
matrix); differentiation and batching rules are untouched because lowering happens after every
transformation; GPU and TPU lowerings are not affected. The price on CPU is that the lanes of one large
batched factorization run one after another instead of on the pool's threads.

Installed once on import of jreml (``install()``) when jaxlib is older than 0.11.2. The environment
variable ``JREML_SEQUENTIAL_LAPACK=0`` turns it off; ``=1`` forces it on.
"""

from __future__ import annotations

import math
import os

from jax import lax
from jax._src.interpreters import mlir
from jax._src.lax import linalg as lax_linalg

# jaxlib splits a batched call once batch × work ≥ 200,000 (its kernels' constant); half of it leaves room
# for a per-matrix work measure that is cruder than the kernel's own.
_KERNEL_SPLIT_WORK = 200_000
_SAFE_GROUP_WORK = _KERNEL_SPLIT_WORK // 2
_ENV = "JREML_SEQUENTIAL_LAPACK"

# Primitive name → number of core (matrix) dimensions of each operand; the rest are leading batch dims.
_CORE_RANKS = {
    "cholesky": (2,),
    "triangular_solve": (2, 2),
    "eigh": (2,),
    "eig": (2,),
    "lu": (2,),
    "geqrf": (2,),
    "householder_product": (2, 1),
    "svd": (2,),
}

_installed = False


def _jaxlib_needs_guard() -> bool:
    import jaxlib

    version = tuple(int(part) for part in jaxlib.__version__.split(".")[:3] if part.isdigit())
    return version < (0, 11, 2)


def per_matrix_work(core_shapes: list[tuple[int, ...]]) -> int:
    """An upper bound on jaxlib's per-matrix work measure: the cube of the largest core dimension."""
    largest = max((d for shape in core_shapes for d in shape), default=1)
    return max(1, largest**3)


def lanes_per_call(batch: int, work: int) -> int:
    """Lanes per LAPACK call so that jaxlib runs the call inline; ``batch`` means no split is needed."""
    if batch < 2 or batch * work < _SAFE_GROUP_WORK:
        return batch
    return max(1, _SAFE_GROUP_WORK // work)


def _sequential_rule(prim, core_ranks, original_rule):
    def rule(ctx, *args, **params):
        avals = ctx.avals_in
        n_batch = avals[0].ndim - core_ranks[0]
        batch_shape = tuple(avals[0].shape[:n_batch])
        if not all(isinstance(d, int) for d in batch_shape):
            return original_rule(ctx, *args, **params)
        batch = math.prod(batch_shape)
        work = per_matrix_work([tuple(a.shape[a.ndim - r :]) for a, r in zip(avals, core_ranks, strict=True)])
        group = lanes_per_call(batch, work)
        if group >= batch:
            return original_rule(ctx, *args, **params)

        def looped(*operands):
            flat = [x.reshape((batch,) + x.shape[x.ndim - r :]) for x, r in zip(operands, core_ranks, strict=True)]

            def one_group(parts):
                out = prim.bind(*parts, **params)
                return tuple(out) if prim.multiple_results else out

            out = lax.map(one_group, tuple(flat), batch_size=None if group == 1 else group)
            unflatten = lambda y: y.reshape(batch_shape + y.shape[1:])  # noqa: E731
            return [unflatten(y) for y in out] if prim.multiple_results else unflatten(out)

        return mlir.lower_fun(looped, multiple_results=prim.multiple_results)(ctx, *args)

    return rule


def install() -> bool:
    """Register the CPU lowerings described in the module docstring. Returns True when they are active."""
    global _installed
    if _installed:
        return True
    setting = os.environ.get(_ENV, "").strip()
    if setting == "0" or (setting != "1" and not _jaxlib_needs_guard()):
        return False
    cpu_rules = mlir._platform_specific_lowerings["cpu"]
    for name, core_ranks in _CORE_RANKS.items():
        prim = getattr(lax_linalg, f"{name}_p", None)
        entry = cpu_rules.get(prim) if prim is not None else None
        if entry is None:
            continue
        mlir.register_lowering(prim, _sequential_rule(prim, core_ranks, entry.rule), platform="cpu")
    _installed = True
    return True


def active() -> bool:
    """Whether the sequential CPU lowering is installed in this process."""
    return _installed


__all__ = ["install", "active", "lanes_per_call", "per_matrix_work"]
