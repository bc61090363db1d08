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
from scripts.tuning.sweep_kernels import SEED, inputs


def gpu_kernel_ns(call, repeats: int, device: str = "/device:GPU") -> tuple[collections.Counter, float,
                                                                          collections.Counter]:
  """Runs `call()` `repeats` times under `jax.profiler.trace`: total GPU time per kernel name (ns, over all
  repeats), the wall time per call (s) and the launches per kernel name (over all repeats), on the profiler planes
  whose name starts with `device` (default: every GPU; "/device:GPU:0" for the first one alone)."""
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      start = time.perf_counter()
      for _ in range(repeats):
        out = call()
      jax.block_until_ready(out)
      wall = (time.perf_counter() - start) / repeats
    total, launches = collections.Counter(), collections.Counter()
    for f in pathlib.Path(tmp).rglob("*.xplane.pb"):
      data = jax.profiler.ProfileData.from_file(str(f))
      for plane in data.planes:
        name = plane.name.split()[0] if plane.name else ""
        if not (name == device or (device == "/device:GPU" and name.startswith(device))):
          continue
        for line in plane.lines:
          if "stream" not in line.name.lower():
            continue
          for event in line.events:
            total[event.name[:70]] += event.duration_ns
            launches[event.name[:70]] += 1
  return total, wall, launches


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--configs", default="0,1,7")
  parser.add_argument("--steps", type=int, default=20)
  args = parser.parse_args()
  for i in map(int, args.configs.split(",")):
    b, p, out, hq, hkv = SEED[i]
    q, pk, pv, sk, sv = inputs(i)
    step = jax.jit(lambda q, pk, pv, sk, sv, n: hj.hydragen_attention(q, pk[0], pv[0], sk, sv, suffix_lengths=n,
                                                                      backend="pallas"))
    for s in (1, out // 2, out):
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
