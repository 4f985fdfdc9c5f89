"""Compile seconds and run seconds of a fit, apart (``last_timing``).

A first fit of a model structure spends most of its time in JAX and XLA (tracing the Python program, lowering it
to StableHLO, compiling it, or loading it from the persistent compilation cache); a later one only runs the
compiled program. ``estimate`` (and so ``jreml.fit``) records both for its outermost concrete call, second tries
(Newton continuation, restarts) included, and prints them with ``verbose``.

How: JAX reports the start and end of each of those phases through ``jax.monitoring`` (the events of
``jax._src.dispatch``: jaxpr tracing, lowering to an MLIR module, backend compilation); while a timed call runs,
their spans are collected and the compile time is the length of their union (nested tracing of inner ``jit``
functions is counted once). The run time is the rest of the call's wall time (running the programs, and jreml's
Python around them). The listeners are process-wide and cost one comparison per JAX event outside a timed call.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax

_TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
_LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_SPAN_EVENTS = frozenset({_TRACE_EVENT, _LOWER_EVENT, _COMPILE_EVENT})


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds of one ``estimate`` / ``jreml.fit`` call.

    ``compile_s``: tracing, lowering and XLA compilation (or loading from the persistent cache) of the programs
    the call needed; ``run_s``: the rest of the call's wall time (running them; jreml's Python around them);
    ``total_s`` = compile_s + run_s. ``programs``: XLA programs compiled or loaded for the call;
    ``cache_hits``: how many of those came from the persistent compilation cache."""

    compile_s: float
    run_s: float
    total_s: float
    programs: int
    cache_hits: int

    def __str__(self) -> str:
        loaded = f", {self.cache_hits} from the persistent cache" if self.cache_hits else ""
        plural = "" if self.programs == 1 else "s"
        return (
            f"compile {self.compile_s:.3f} s ({self.programs} program{plural}{loaded}), run {self.run_s:.3f} s, "
            f"total {self.total_s:.3f} s"
        )


class _Recorder:
    """Spans of compile-phase events and counts while ``depth`` > 0 (a timed call is running)."""

    def __init__(self):
        self.depth = 0
        self.spans: list[tuple[float, float]] = []
        self.programs = 0
        self.cache_hits = 0
        self.last: Timing | None = None
        self.registered = False

    def on_span(self, event, start, end, **_):
        if self.depth and event in _SPAN_EVENTS:
            self.spans.append((start, end))
            if event == _COMPILE_EVENT:
                self.programs += 1

    def on_event(self, event, **_):
        if self.depth and event == _CACHE_HIT_EVENT:
            self.cache_hits += 1

    def register(self):
        if not self.registered:
            jax.monitoring.register_event_time_span_listener(self.on_span)
            jax.monitoring.register_event_listener(self.on_event)
            self.registered = True


_RECORDER = _Recorder()


def _union_length(spans) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def timed(report):
    """Decorator: time the outermost call of ``fn`` and keep it for ``last_timing``; ``report(result, timing,
    args, kwargs)`` is called after it (``estimate`` prints the timing line with ``verbose``, and keeps no record
    of a call whose result is traced, under ``jit`` or ``vmap``)."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            recorder = _RECORDER
            if recorder.depth:
                return fn(*args, **kwargs)
            recorder.register()
            recorder.spans, recorder.programs, recorder.cache_hits = [], 0, 0
            recorder.depth = 1
            start = time.time()
            try:
                result = fn(*args, **kwargs)
            finally:
                recorder.depth = 0
            total = time.time() - start
            compile_s = min(_union_length(recorder.spans), total)
            timing = Timing(compile_s, total - compile_s, total, recorder.programs, recorder.cache_hits)
            if report(result, timing, args, kwargs):
                recorder.last = timing
            return result

        return inner

    return wrap


def last_timing() -> Timing | None:
    """The :class:`Timing` of the last concrete (not traced) call of ``jreml.estimate`` / ``jreml.fit`` (its
    compile seconds and run seconds apart), or None before the first."""
    return _RECORDER.last
