"""Timing of jitted functions: AOT compile timed separately, warm-up, median of repeats, block_until_ready.

Very short kernels (a few microseconds) would be dominated by Python dispatch if each call were timed alone, so one
repeat launches the compiled function `inner` times back to back and blocks once on the last output; `inner` is
calibrated from the warm-up so that a repeat lasts at least `min_repeat_s` (capped by `max_inner`). The reported
time is the median over repeats of (repeat time / inner).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Any, Callable, Sequence

import jax


@dataclasses.dataclass
class Timing:
    compile_s: float
    median_s: float
    times_s: list[float]
    inner: int
    output: Any = dataclasses.field(default=None, repr=False)

    def as_dict(self) -> dict:
        return {
            "compile_s": self.compile_s,
            "median_s": self.median_s,
            "min_s": min(self.times_s),
            "max_s": max(self.times_s),
            "repeats": len(self.times_s),
            "inner": self.inner,
        }


def compile_aot(fn: Callable, args: Sequence[Any], *, static_argnames=None) -> tuple[Callable, float]:
    """`jax.jit(fn).lower(*args).compile()`, returning the executable and its wall time in seconds."""
    start = time.perf_counter()
    compiled = jax.jit(fn, static_argnames=static_argnames).lower(*args).compile()
    return compiled, time.perf_counter() - start


def _run(compiled: Callable, args: Sequence[Any], inner: int) -> tuple[float, Any]:
    start = time.perf_counter()
    out = None
    for _ in range(inner):
        out = compiled(*args)
    jax.block_until_ready(out)
    return time.perf_counter() - start, out


def time_compiled(compiled: Callable, args: Sequence[Any], *, warmup: int = 2, repeats: int = 5,
                  min_repeat_s: float = 0.0, max_inner: int = 1, compile_s: float = 0.0) -> Timing:
    """Time an already compiled function on inputs that are already on the device."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    single, out = _run(compiled, args, 1)  # first call: includes any lazy initialisation, never reported
    for _ in range(warmup):
        single, out = _run(compiled, args, 1)
    inner = 1
    if min_repeat_s > 0 and max_inner > 1:
        inner = int(min(max_inner, max(1, math.ceil(min_repeat_s / max(single, 1e-9)))))
    times = []
    for _ in range(repeats):
        elapsed, out = _run(compiled, args, inner)
        times.append(elapsed / inner)
    return Timing(compile_s=compile_s, median_s=statistics.median(times), times_s=times, inner=inner, output=out)


def time_fn(fn: Callable, args: Sequence[Any], *, warmup: int = 2, repeats: int = 5, min_repeat_s: float = 0.0,
            max_inner: int = 1) -> Timing:
    """Compile `fn` ahead of time for `args`, then time it (see `time_compiled`)."""
    compiled, compile_s = compile_aot(fn, args)
    return time_compiled(compiled, args, warmup=warmup, repeats=repeats, min_repeat_s=min_repeat_s,
                         max_inner=max_inner, compile_s=compile_s)


def timing_options(timing_table: dict) -> dict:
    """Keyword arguments of `time_fn` from a config's [timing] table."""
    return {
        "warmup": timing_table["warmup"],
        "repeats": timing_table["repeats"],
        "min_repeat_s": timing_table.get("min_repeat_s", 0.0),
        "max_inner": timing_table.get("max_inner", 1),
    }
