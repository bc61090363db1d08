"""Probe (development tool): two Hopper settings chosen at run time by the step's load, against each alone.

A prefix-bound step (short suffixes) and a stream-bound one (long suffixes) want different tiles: 128-key prefix
tiles speed the pair's product by ~20 % at s = 1 on the GQA rows, but leave room only for 64-key suffix tiles,
which slow the suffix stream at s = out (session 39). This probe times, at several suffix lengths s, the step with
setting A, with setting B, and with `lax.cond` choosing B where the suffix stream's time (bytes at the bandwidth)
is under `ratio` times the prefix product's (FLOPs at the matmul rate), A elsewhere: what such a switch gains, what
the cond costs (`condA`: both branches A), and where the two settings cross. Measured on the H200 (session 39,
PERF_NOTES.md): the cond costs 19-28 µs a step (XLA's conditional reads its predicate on the host), more than
the switch gains on the GQA rows; the settings cross at s ≈ 64-256.
Usage: python -m scripts.tuning.probe_switch [--configs 5,6,7,8] [--a tuned] [--b tuned+prefix_keys=128+
suffix_keys=64] [--ratios 1.0,1.3] [--lengths 1,64,128,256,384,512]
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
from jax import lax

from experiments import device_rates, floor, timing
from scripts import cli
from scripts.quick_bench import D
from scripts.tuning.probe_hopper import TIMING, STEPS, known_variant, resolve, step
from scripts.tuning.sweep_kernels import CONFIGS, SEED, floor_s, inputs


def switched(cfg, a, b, ratio, rates):
  """The step with setting b where sum(lengths)·Hkv·D·4 bytes / bandwidth < ratio · prefix FLOPs / matmul rate."""
  bsz, p, _, hq, hkv = cfg
  step_a, step_b = step(a), step(b)
  prefix_s = 4 * bsz * hq * p * D / rates["matmul_flops_per_s"]

  def fn(q, pk, pv, sk, sv, lengths):
    suffix_s = jnp.sum(lengths).astype(jnp.float32) * hkv * D * 4 / rates["bandwidth_bytes_per_s"]
    return lax.cond(suffix_s < ratio * prefix_s, step_b, step_a, q, pk, pv, sk, sv, lengths)
  return fn


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--configs", default="5,6,7,8")
  parser.add_argument("--a", default="tuned")
  parser.add_argument("--b", default="tuned+prefix_keys=128+suffix_keys=64")
  parser.add_argument("--ratios", default="1.0,1.3")
  parser.add_argument("--lengths", default="1,64,128,256,384,512", help="suffix lengths s (capped at out)")
  args = parser.parse_args()
  configs = cli.seed_configs(parser, "--configs", args.configs, len(SEED))
  ratios = cli.listed(parser, "--ratios", args.ratios, float, low=0)
  lengths = cli.listed(parser, "--lengths", args.lengths, int, low=0)
  for option in ("a", "b"):
    cli.listed(parser, f"--{option}", getattr(args, option), known_variant)
  rates = device_rates.measure(1 << 31, 8192, TIMING)
  print(f"bandwidth {rates['bandwidth_bytes_per_s'] / 1e12:.3f} TB/s, matmul "
        f"{rates['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s", flush=True)
  for i in configs:
    cfg = CONFIGS[i]
    bsz, out = cfg[0], cfg[2]
    data = inputs(i)
    grid = sorted({min(s, out) for s in lengths} | set(floor.simpson_points(out)))
    a, b = resolve(args.a, cfg), resolve(args.b, cfg)
    variants = {"A": step(a), "B": step(b), "condA": switched(cfg, a, a, 1.0, rates)}
    variants |= {f"switch{r}": switched(cfg, a, b, float(r), rates) for r in ratios}
    print(f"[{i}] {cfg} A={args.a} B={args.b}; s = {grid}; floors "
          + " / ".join(f"{floor_s(cfg, s, rates) * 1e6:.0f}" for s in grid) + " us", flush=True)
    simpson_floor = floor.simpson(*(floor_s(cfg, s, rates) for s in floor.simpson_points(out)))
    for name, fn in variants.items():
      compiled, _ = timing.compile_aot(timing.chain_steps(fn, STEPS), (*data, jnp.ones((bsz,), jnp.int32)))
      times = {s: timing.time_compiled(compiled, (*data, jnp.full((bsz,), s, jnp.int32)), **TIMING).median_s / STEPS
               for s in grid}
      frac = simpson_floor / floor.simpson(*(times[s] for s in floor.simpson_points(out)))
      print(f"[{i}] {name:>10}: {frac:.3f} of floor; " + " / ".join(f"{times[s] * 1e6:.0f}" for s in grid) + " us",
            flush=True)


if __name__ == "__main__":
  main()
