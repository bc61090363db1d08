"""A whole Hydragen step of one config, run a few times at given suffix lengths, for Nsight Compute.

    ncu --kernel-name regex:fused_levels --launch-skip 2 --launch-count 1 --section SpeedOfLight \
      --section Occupancy --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \
      python3 -m scripts.tuning.probe_ncu_step --shape 64x4096x128x32x32 --lengths 1,64

Each length runs 4 calls (so `--launch-skip 2` with `--launch-count 1` profiles the third call of the first
length; profile several with a larger count). The variant is one of `sweep_kernels.VARIANTS`; the "separate"
ones launch the kernel once a level, so a call is two launches there. `--hopper NAME` runs the Hopper kernel
instead (`probe_hopper.resolve`: a name of its VARIANTS, or `tuned`, the device's tuning for the shape, either with
overrides such as `+ek` or `+pair_registers=224`; `--variant` is then not used): profile it with `--kernel-name
regex:hydragen_hopper` (its Mosaic GPU kernel is named `hydragen_hopper_mosaic_gpu_kernel`).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from scripts import cli
from scripts.tuning import probe_hopper, sweep_kernels


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--shape", default="64x4096x128x32x32", help="B x P x OUT x HQ x HKV")
  parser.add_argument("--lengths", default="1,64")
  parser.add_argument("--variant", default="auto")
  parser.add_argument("--hopper", default="", help="a probe_hopper variant (`probe_hopper.resolve`: `tuned` is the "
                      "device's setting for the shape; overrides as `tuned+ek` or `tuned+prefix_keys=128`): the "
                      "Hopper kernel's step instead (--variant unused)")
  args = parser.parse_args()
  cfg = cli.listed(parser, "--shape", args.shape, sweep_kernels.parse_shape)[0]
  lengths = cli.listed(parser, "--lengths", args.lengths, int, low=0, high=cfg[2])
  if args.hopper:
    cli.listed(parser, "--hopper", args.hopper, probe_hopper.known_variant)
  else:
    cli.listed(parser, "--variant", args.variant, choices=sweep_kernels.VARIANTS)
  if args.hopper:
    config = probe_hopper.resolve(args.hopper, cfg)
    fn = probe_hopper.step(config)
    print(f"{cfg} Hopper kernel {args.hopper}: {config}", flush=True)
  else:
    fn, blocks = sweep_kernels.step_fn(cfg, sweep_kernels.VARIANTS[args.variant])
    print(f"{cfg} {args.variant}: prefix {blocks[0]}, suffix {blocks[1]}", flush=True)
  data = sweep_kernels.config_inputs(cfg, 0)
  step = jax.jit(fn)
  for s in lengths:
    lengths = jnp.full((cfg[0],), s, jnp.int32)
    for _ in range(4):
      jax.block_until_ready(step(*data, lengths))
    print(f"s = {s}: 4 calls", flush=True)


if __name__ == "__main__":
  main()
