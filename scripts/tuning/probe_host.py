"""Probe (development tool): where the host spends a decode call, from the profiler's host events.

`probe_call` found that a call of the compiled decode loop costs ~2 ms more than its steps (B = 8 and 64 on the
H200), whatever the mode and with or without command buffers. This probe traces calls of k steps under
`jax.profiler.trace` and prints, per call: the host events by name (total and count; nested events are each
counted, so totals overlap), the longest host events in time order, and the GPU's idle time before its first
kernel, between steps and after its last kernel, measured against the call's own clock marks.

`--untraced R` first times R calls of each loop kind without the profiler, the kinds alternated (an A/B in one
process). `--loops while,fixed`: `while` is `models.decode` (its `lax.while_loop`, the condition read on the host
before each step); `fixed` the steps under a loop of static trip count (`lax.fori_loop`, no "all done" check: what
XLA does without a condition to read). Under the profiler the host's work runs several times slower than without
it: the traced calls show where the host's time goes, not how much of it the device waits for (on the H200 the
traced fixed loop ran 16 steps 9-21 % faster than the while loop; untraced, a loop reading the condition once
every 16 steps, since removed from `models.decode`, ran them 0.2-0.3 % faster at B = 8 and 32 layers:
experiments/PERF_NOTES.md). Run it
under other XLA_FLAGS to compare, e.g. `--xla_gpu_enable_command_buffer=`.

Usage: python -m scripts.tuning.probe_host [--batch 8] [--prefix 1024] [--layers 32] [--modes none,hydragen]
       [--steps 1,16] [--loops while,fixed] [--calls 3] [--untraced 0] [--tiny]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import importlib
import pathlib
import re
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp

import models
from experiments import model_api
from scripts import cli
from scripts.profile_decode import mode_state, model_shape

G = importlib.import_module("models.generate")  # the module (models.generate is also the function)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--prefix", type=int, default=1024)
  parser.add_argument("--layers", type=int, default=32)
  parser.add_argument("--modes", default="none,hydragen")
  parser.add_argument("--steps", default="1,16")
  parser.add_argument("--loops", default="while")
  parser.add_argument("--calls", type=int, default=3, help="traced calls of each loop kind (0: none)")
  parser.add_argument("--untraced", type=int, default=0, help="untraced calls of each loop kind, alternated")
  parser.add_argument("--at", type=int, default=32)
  parser.add_argument("--top", type=int, default=30)
  parser.add_argument("--tiny", action="store_true", help="a tiny model (a CPU check that the script runs)")
  args = parser.parse_args()
  ks = cli.listed(parser, "--steps", args.steps, int, low=1)
  modes = cli.listed(parser, "--modes", args.modes, choices=models.MODES)
  loops = cli.listed(parser, "--loops", args.loops, choices=("while", "fixed"))
  cli.at_least(parser, args, batch=1, prefix=1, layers=1, calls=0, untraced=0, at=0, top=0)
  shape = model_shape(args.layers, args.tiny)
  model, _ = model_api.build_model(shape, "bfloat16", seed=0)
  tree = model_api.synthetic_tree(args.batch, args.prefix, 1, shape["vocab_size"], seed=0)
  params = model.params()
  print(f"{args.layers} layers{' (tiny)' if args.tiny else ''}, B={args.batch} P={args.prefix}, from s={args.at}; "
        f"{len(jax.tree.leaves(params))} parameter arrays", flush=True)
  for mode in modes:
    state, org = mode_state(model, tree, args.at + max(ks) + 1, mode, None)
    print(f"[{mode}] {len(jax.tree.leaves(state))} state arrays", flush=True)
    for k in ks:
      fns = {loop: loop_fn(model, state, loop, k) for loop in loops}
      if args.untraced:
        state = alternate(fns, params, state, org, k, f"{mode} k={k}", args)
      for loop, fn in fns.items():
        if args.calls:
          state = probe(fn, params, state, org, k, f"{mode} {loop} k={k}", args)
    del state


def loop_fn(model, state, loop: str, k: int):
  """fn(params, state, num_steps) of a loop kind: `while` (`models.decode`'s loop) or `fixed` (exactly k steps under
  `lax.fori_loop`, num_steps ignored)."""
  if loop == "while":
    return model_api.compile_decode(model, state, None)[0]
  if loop == "fixed":
    fixed = fixed_decode(model, state, k)
    return lambda p, s, _: fixed(p, s)
  raise ValueError(f"--loops: unknown loop {loop!r} (while, fixed)")


def alternate(fns: dict, params, state, org, k: int, label: str, args):
  """Untraced wall time of a call of k steps for each loop kind, the kinds alternated call by call
  (`--untraced` rounds after one warm-up round); median ms a call."""
  walls = {loop: [] for loop in fns}
  for r in range(args.untraced + 1):
    for loop, fn in fns.items():
      s = jax.block_until_ready(model_api.at_step(state, org, args.at))
      start = time.perf_counter()
      state = jax.block_until_ready(fn(params, s, jnp.int32(k)))
      if r:
        walls[loop].append(time.perf_counter() - start)
  print(f"[{label}] untraced, alternated, median of {args.untraced}: "
        + ", ".join(f"{loop} {statistics.median(w) * 1e3:.2f} ms" for loop, w in walls.items()), flush=True)
  return state


def fixed_decode(model, state, k: int):
  """`k` decode steps under `lax.fori_loop` (static trip count), greedy, compiled: fn(params, state)."""
  B = state.tokens.shape[0]
  sampling = G.SamplingConfig.make("greedy")

  def impl(params, s):
    m = G.Llama(model.config, params, None)
    attend = G.make_attend(s.mode, jnp.ones((B,), jnp.int32), None, decode=True)
    step = lambda _, s: G._decode_step(m, s, attend, sampling.static(), *G._knobs(sampling))  # noqa: E731
    return jax.lax.fori_loop(0, k, step, s)

  fn = jax.jit(impl, donate_argnums=(1,), compiler_options=G.COMPILER_OPTIONS)
  return fn.lower(model.params(), state).compile()


def _name(event_name: str) -> str:
  """An event's name without ids and numbers (so that the same op in different layers groups together)."""
  return re.sub(r"[0-9]+", "#", event_name)[:90]


def probe(fn, params, state, org, k: int, label: str, args):
  held = [state]
  marks = []

  def call(annotate: bool = False):
    s = jax.block_until_ready(model_api.at_step(held[0], org, args.at))
    steps = jax.block_until_ready(jnp.int32(k))
    with jax.profiler.TraceAnnotation("probe_call") if annotate else contextlib.nullcontext():
      start = time.perf_counter_ns()
      out = fn(params, s, steps)
      returned = time.perf_counter_ns()
      held[0] = jax.block_until_ready(out)
      marks.append((start, returned, time.perf_counter_ns()))

  for _ in range(2):
    call()
  marks.clear()
  with tempfile.TemporaryDirectory() as tmp:
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0  # the host's C++ events only (XLA, PjRt, the runtime's thunks)
    options.host_tracer_level = 3
    with jax.profiler.trace(tmp, profiler_options=options):
      for _ in range(args.calls):
        call(annotate=True)
    host, gpu = [], []
    for f in pathlib.Path(tmp).rglob("*.xplane.pb"):
      data = jax.profiler.ProfileData.from_file(str(f))
      for plane in data.planes:
        pname = plane.name or ""
        for line in plane.lines:
          events = [(e.start_ns, e.duration_ns, e.name) for e in line.events]
          if pname.startswith("/host"):
            host += [(s, d, n, line.name) for s, d, n in events]
          elif pname.startswith("/device:GPU") and "stream" in line.name.lower():
            gpu += [(s, s + d, n) for s, d, n in events]
  windows = sorted((s, s + d) for s, d, n, _ in host if n == "probe_call")
  walls = [(r - s) / 1e3 for s, r, _ in marks]
  ends = [(e - s) / 1e3 for s, _, e in marks]
  print(f"[{label}] wall to return {', '.join(f'{w:.0f}' for w in walls)} us; to ready "
        f"{', '.join(f'{w:.0f}' for w in ends)} us", flush=True)
  for i, (w0, w1) in enumerate(windows[:args.calls]):
    inside = [(s, d, n, t) for s, d, n, t in host if w0 <= s < w1 and n != "probe_call"]
    kernels = sorted((s, e, n) for s, e, n in gpu if w0 <= s < w1)
    total, count = collections.Counter(), collections.Counter()
    for s, d, n, t in inside:
      total[_name(n)] += d
      count[_name(n)] += 1
    print(f"  call {i}: {(w1 - w0) / 1e3:.0f} us, {len(inside)} host events, {len(kernels)} GPU kernels", end="")
    if kernels:
      busy = sum(e - s for s, e, _ in kernels)
      gaps = sorted(((b[0] - a[1]), a[2][:40], b[2][:40]) for a, b in zip(kernels, kernels[1:]))[::-1]
      print(f" ({busy / 1e3:.0f} us busy); first kernel at +{(kernels[0][0] - w0) / 1e3:.0f} us, last ends "
            f"{(w1 - kernels[-1][1]) / 1e3:.0f} us before the end; largest gaps: "
            + "; ".join(f"{g / 1e3:.0f} us {a} -> {b}" for g, a, b in gaps[:4]), flush=True)
    else:
      print(flush=True)
    if i == 0:
      print("    host events by name (total us over the call, count):")
      for name, t in total.most_common(args.top):
        print(f"    {t / 1e3:10.1f}  {count[name]:5d}  {name}")
      print("    host events over 100 us, in time order (start offset, duration, thread):")
      for s, d, n, t in sorted(inside):
        if d > 100_000:
          print(f"    +{(s - w0) / 1e3:9.1f}  {d / 1e3:9.1f}  {t[:24]:24s} {n[:110]}")
  return held[0]


if __name__ == "__main__":
  main()
