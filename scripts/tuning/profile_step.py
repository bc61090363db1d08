"""Where a Hydragen decode step spends its GPU time (development tool): kernel-by-kernel durations from a profile.

Runs `hydragen_attention` (the public API, default heuristics) for some seed configs at s = 1, out/2, out under
`jax.profiler.trace`, reads the trace back with `jax.profiler.ProfileData`, and prints, per step, the time of each
GPU kernel (averaged over the traced steps) next to the wall time per step.
Usage: python -m scripts.tuning.profile_step [--configs 0,1,7] [--steps 20]
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp

import hydragen_jax as hj
from experiments import floor
from scripts import cli
from scripts.tuning.sweep_kernels import SEED, inputs


def kernel_events(call, repeats: int, device: str = "/device:GPU") -> tuple[list[tuple[int, int, str]], float]:
  """Runs `call()` `repeats` times under `jax.profiler.trace`: every GPU kernel as (start_ns, end_ns, name), sorted
  by start, on the profiler planes whose name starts with `device` (default: every GPU; "/device:GPU:0" for the
  first one alone), and the wall time per call (s)."""
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      start = time.perf_counter()
      for _ in range(repeats):
        out = call()
      jax.block_until_ready(out)
      wall = (time.perf_counter() - start) / repeats
    events = []
    for f in pathlib.Path(tmp).rglob("*.xplane.pb"):
      data = jax.profiler.ProfileData.from_file(str(f))
      for plane in data.planes:
        name = plane.name.split()[0] if plane.name else ""
        if not (name == device or (device == "/device:GPU" and name.startswith(device))):
          continue
        for line in plane.lines:
          if "stream" in line.name.lower():
            events += [(e.start_ns, e.start_ns + e.duration_ns, e.name[:70]) for e in line.events]
  return sorted(events), wall


def gpu_kernel_ns(call, repeats: int, device: str = "/device:GPU") -> tuple[collections.Counter, float,
                                                                          collections.Counter]:
  """`kernel_events` summed per kernel name: total GPU time (ns, over all repeats), the wall time per call (s) and
  the launches (over all repeats)."""
  events, wall = kernel_events(call, repeats, device)
  total, launches = per_kernel(events)
  return total, wall, launches


def per_kernel(events: list[tuple[int, int, str]]) -> tuple[collections.Counter, collections.Counter]:
  """Total time (ns) and launches per kernel name of `kernel_events`' events."""
  total, launches = collections.Counter(), collections.Counter()
  for start, end, name in events:
    total[name] += end - start
    launches[name] += 1
  return total, launches


def idle_gaps(events: list[tuple[int, int, str]]) -> list[tuple[int, str]]:
  """The stretches with no kernel running between the first kernel's start and the last one's end, as
  (nanoseconds, name of the kernel that ends the stretch), in order; kernels that overlap (several streams) count
  as one busy stretch. `events`: one device's (`kernel_events` with one device's plane), sorted by start."""
  gaps, busy_until = [], None
  for start, end, name in events:  # sorted by start
    if busy_until is not None and start > busy_until:
      gaps.append((start - busy_until, name))
    busy_until = end if busy_until is None else max(busy_until, end)
  return gaps


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--configs", default="0,1,7")
  parser.add_argument("--steps", type=int, default=20)
  args = parser.parse_args()
  configs = cli.seed_configs(parser, "--configs", args.configs, len(SEED))
  cli.at_least(parser, args, steps=1)
  for i in configs:
    b, p, out, hq, hkv = SEED[i]
    q, pk, pv, sk, sv = inputs(i)
    step = jax.jit(lambda q, pk, pv, sk, sv, n: hj.hydragen_attention(q, pk[0], pv[0], sk, sv, suffix_lengths=n,
                                                                      backend="pallas"))
    for s in floor.simpson_points(out):
      n = jnp.full((b,), s, jnp.int32)
      jax.block_until_ready(step(q, pk, pv, sk, sv, n))
      jax.block_until_ready(step(q, pk, pv, sk, sv, n))
      total, wall, _ = gpu_kernel_ns(lambda: step(q, pk, pv, sk, sv, n), args.steps)
      kernels = sum(total.values()) / args.steps / 1e3
      print(f"[{i}] {SEED[i]} s={s}: wall {wall * 1e6:.1f} us/step, GPU kernels {kernels:.1f} us/step", flush=True)
      for name, ns in total.most_common(8):
        print(f"      {ns / args.steps / 1e3:8.1f} us  {name}", flush=True)


if __name__ == "__main__":
  main()
