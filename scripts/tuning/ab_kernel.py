"""A/B of the Triton kernel body (`flash._attend`) of another revision against the current one, in one process on
the GPU: the step sweep of `sweep_kernels` (variant `auto`, 16 steps chained a call) over the seed configs, the
two kernels alternated `--rounds` times, so that both see the same GPU, clocks and floor.

    git show REV:hydragen_jax/kernels/flash.py > /tmp/old_flash.py
    python -m scripts.tuning.ab_kernel --old /tmp/old_flash.py [--configs 0,2,5,8] [--rounds 2]

The other revision's `_attend` must take the same arguments (the launch, tiling and schedule stay the current
ones). Used for 4b9d576 (the logit scale on the float32 scores instead of a 16-bit q): PERF_NOTES.md.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys

import jax

from experiments import device_rates
from hydragen_jax.kernels import flash
from scripts import cli
from scripts.tuning import sweep_kernels


def load_kernel_module(path: str, name: str = "ab_kernel_other"):
  """The flash.py at `path` as a module of its own (its globals apart from the current kernel's)."""
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses look their module up while the file runs
  spec.loader.exec_module(module)
  return module


@contextlib.contextmanager
def kernel_body(attend):
  """`flash._kernel` calls `attend` for each level's programs inside the block; jit caches are cleared on entry
  and exit so that no launch traced with the other body is reused."""
  current = flash._attend
  flash._attend = attend
  jax.clear_caches()
  try:
    yield
  finally:
    flash._attend = current
    jax.clear_caches()


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--old", required=True, help="another revision's hydragen_jax/kernels/flash.py")
  parser.add_argument("--configs", default="0,2,5,8", help="seed configs (bench_attention.toml's nine, 0-based)")
  parser.add_argument("--rounds", type=int, default=2)
  args = parser.parse_args()
  configs = cli.seed_configs(parser, "--configs", args.configs, len(sweep_kernels.SEED))
  cli.at_least(parser, args, rounds=1)
  other = load_kernel_module(args.old)
  rates = device_rates.measure(1 << 31, 8192, sweep_kernels.TIMING)
  print(f"bandwidth {rates['bandwidth_bytes_per_s'] / 1e12:.3f} TB/s, matmul "
        f"{rates['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s", flush=True)
  for rnd in range(args.rounds):
    for name, attend in (("old", other._attend), ("current", flash._attend)):
      print(f"=== {name} (round {rnd})", flush=True)
      with kernel_body(attend):
        sweep_kernels.sweep_steps(configs, ["auto"], rates, [])


if __name__ == "__main__":
  main()
