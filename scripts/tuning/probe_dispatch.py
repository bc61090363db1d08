"""Probe (development tool): how much of a timed decode step is host dispatch?

Times a trivial jitted op and the Hydragen step (Pallas and the jnp reference) of some seed configs at s = 1 and
(out + 1)/2 (suffix caches of `out` tokens, s valid, as the benchmark's), one step per call (calls launched back to back, as `experiments.timing` does) and 16 steps chained per call
(`experiments.timing.chain_steps`, as the benchmark now does). Run it under different XLA_FLAGS to compare, e.g.
`--xla_gpu_enable_command_buffer=`. Results: experiments/PERF_NOTES.md (session 4).
Usage: python -m scripts.tuning.probe_dispatch [--configs 0,1,6]
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp

import hydragen_jax as hj
from experiments import floor, timing
from scripts import cli
from scripts.tuning.sweep_kernels import SEED, inputs

TIMING = dict(warmup=2, repeats=7, min_repeat_s=0.02, max_inner=200)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--configs", default="0,1,6")
  args = parser.parse_args()
  configs = cli.seed_configs(parser, "--configs", args.configs, len(SEED))
  x = jnp.ones((64, 32, 128), jnp.bfloat16)
  for steps in (1, 16):
    t = timing.time_fn(timing.chain_steps(lambda a: a + 1, steps), (x,), **TIMING)
    print(f"x + 1, {steps} a call: {t.median_s / steps * 1e6:.1f} us a step", flush=True)
  for i in configs:
    b, p, out, hq, hkv = SEED[i]
    q, pk, pv, sk, sv = inputs(i)
    for s in floor.simpson_points(out)[:2]:  # caches of `out` tokens, s valid: as the benchmark's
      lengths = jnp.full((b,), s, jnp.int32)
      for backend in ("pallas", "xla"):
        def step(q, pk, pv, sk, sv, n, backend=backend):
          return hj.hydragen_attention(q, pk[0], pv[0], sk, sv, suffix_lengths=n, backend=backend)
        for steps in (1, 16):
          t = timing.time_fn(timing.chain_steps(step, steps), (q, pk, pv, sk, sv, lengths), **TIMING)
          print(f"[{i}] {SEED[i]} s={s} {backend}, {steps} a call: {t.median_s / steps * 1e6:.1f} us a step "
                f"(repeats {min(t.times_s) / steps * 1e6:.1f}-{max(t.times_s) / steps * 1e6:.1f})", flush=True)


if __name__ == "__main__":
  main()
