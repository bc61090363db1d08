"""Timing of jitted functions: AOT compile timed separately, warm-up, median of repeats, block_until_ready.

Very short kernels (a few microseconds) would be dominated by Python dispatch if each call were timed alone, so one
repeat launches the compiled function `inner` times back to back and blocks once on the last output; `inner` is
calibrated from the warm-up so that a repeat lasts at least `min_repeat_s` (capped by `max_inner`). The reported
time is the median over repeats of (repeat time / inner).

Back-to-back calls still pay the host's cost of one dispatch per call (30–150 µs for a trivial jitted op on the lent
machines' hosts: `dispatch_s` in experiments/README.md), which is more than the whole GPU work of a small decode
step. `chain_steps` runs several steps in one compiled call instead, as a jit-compiled decode loop does.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax


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


def chain_steps(fn: Callable, steps: int, copies: int = 1) -> Callable:
    """`steps` steps of `fn(q, *rest) -> out` in one call, each step's output the next step's query.

    As in a jit-compiled decode loop, the host dispatches once for all the steps, so a step costs its device work
    (and the launch gaps between its kernels), not a Python dispatch. The chain is a real data dependency (out has
    q's shape and dtype), so the steps run one after the other. The loop is unrolled by 4: its host cost per
    iteration (~10 µs on the lent H100's host) is shared by 4 steps, and the compiled program stays small.

    `copies` > 1: the chained function takes `copies` sets of `rest` one after the other (`q, *rest_1, ...,
    *rest_copies`) and step i reads set i mod copies, so that data smaller than the GPU's L2 cache is not served
    from L2 from step to step (a decode reads each layer's caches once a step; `steps` must be a multiple of
    `copies`).

    Caveat: work that depends on `rest` alone (a layout change or dtype conversion of a KV cache) may be hoisted
    out of the chain by XLA and then paid once per call instead of once per step. Each step passes (q, *rest)
    through an optimization barrier, meant to prevent that; measured, XLA-compiled attention still runs faster a
    step chained, most likely for that reason (on the H100, B=512 P=4096 s=256: the jnp reference 1246 µs a step
    one call per step, 885 chained; `jax.nn.dot_product_attention(implementation="xla")` on per-sequence KV 9632
    vs 3721 µs). Chained times of such functions are lower bounds on their step time. Functions that read their
    inputs in place (the Pallas kernels) have nothing to hoist: their chained and one-call times agree where the
    GPU bounds the step.

    Args:
      fn: `fn(q, *rest)` returning an array of q's shape (cast to q's dtype).
      steps: >= 1; 1 (with one copy) returns `fn` itself.
      copies: >= 1, dividing `steps`.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1; got {steps}.")
    if copies < 1 or steps % copies:
        raise ValueError(f"copies must be >= 1 and divide steps ({steps}); got {copies}.")
    if steps == 1:
        return fn

    def chained(q, *rest):
        if len(rest) % copies:
            raise ValueError(f"chain_steps: {len(rest)} arguments after q do not split into {copies} copies.")
        width = len(rest) // copies
        sets = [rest[i * width:(i + 1) * width] for i in range(copies)]

        def one(x, args):
            x, *args = lax.optimization_barrier((x, *args))
            out = fn(x, *args)
            if out.shape != x.shape:
                raise ValueError(f"chain_steps: fn returned shape {out.shape}; expected the query's {x.shape}.")
            return out.astype(x.dtype)

        def step(_, x):  # one step of each copy in turn
            for args in sets:
                x = one(x, args)
            return x

        rounds = steps // copies
        return lax.fori_loop(0, rounds, step, q, unroll=min(rounds, max(1, 4 // copies)))

    return chained


def fresh_copies(arrays: Sequence[Any], copies: int) -> list[tuple]:
    """`arrays` and copies - 1 copies of them in fresh device buffers (the sets `chain_steps`' copies read in
    turn): a list of `copies` tuples, the first the arrays themselves."""
    return [tuple(arrays)] + [tuple(jnp.copy(a) for a in arrays) for _ in range(copies - 1)]


def compile_aot(fn: Callable, args: Sequence[Any]) -> tuple[Callable, float]:
    """`jax.jit(fn).lower(*args).compile()`, returning the executable and its wall time in seconds."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - start


def calls_per_repeat(single_s: float, min_repeat_s: float, max_calls: int) -> int:
    """Calls back to back in one repeat so that it lasts at least `min_repeat_s` (one call took `single_s`), at most
    `max_calls`; 1 where `min_repeat_s` is 0."""
    if min_repeat_s <= 0 or max_calls <= 1:
        return 1
    return int(min(max_calls, max(1, math.ceil(min_repeat_s / max(single_s, 1e-9)))))


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
    inner = calls_per_repeat(single, min_repeat_s, max_inner)
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
