"""Probe (development tool): what "pallas" chooses for a shape, and whether the choice is the faster one.

For each shape (B, P, S, Hq, Hkv; D = 128, bf16, T = 1, suffixes half full) prints whether "pallas" takes the
Hopper kernel (`dispatch.hopper_pays`, from the device's tuning), then, through the public `hydragen_attention`,
the max error of "pallas" and "triton" against the jnp reference ("xla") and their times (compiled, warmed up,
median of repeats): the check of a tuning rule on the API path, which the probes of single kernels do not take.
Two times a backend: a step of 16 chained in one call (`timing.chain_steps`, the device's time, as in a jitted
decode loop) and one call a step (the host's dispatch included: what an eager loop pays).
Usage: python -m scripts.tuning.probe_choice [--shapes 128x16384x512x32x8,...] [--backends pallas,triton]
(off a GPU: --backends interpret for the plumbing).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import hydragen_jax as hj
from experiments import timing
from hydragen_jax import dispatch
from scripts import cli
from scripts.tuning.sweep_kernels import config_inputs, parse_shape

TIMING = dict(warmup=2, repeats=7, min_repeat_s=0.02, max_inner=50)
STEPS = 16


def check(shape: tuple[int, ...], backends: list[str], timing_kw=TIMING) -> dict:
  """The choice, each backend's max error against "xla" and its median times (s) on `shape`: a step chained
  (`<backend>_s`) and a call (`<backend>_call_s`)."""
  b, p, s, _, hkv = shape
  q, pk, pv, sk, sv = config_inputs(shape, seed=0)  # the prefix `[1, P, Hkv, D]`: the API takes `[P, Hkv, D]`
  lengths = jnp.full((b,), max(s // 2, 1), jnp.int32)
  steps = {be: lambda *a, be=be: hj.hydragen_attention(*a, suffix_lengths=lengths, backend=be)
           for be in [*backends, "xla"]}
  fns = {be: jax.jit(fn) for be, fn in steps.items()}
  args = (q, pk[0], pv[0], sk, sv)
  want = np.asarray(fns["xla"](*args), np.float32)
  row = {"shape": shape, "hopper": dispatch.hopper_pays(q, hkv, p, suffix_capacity=sk.shape[1])}
  for be in backends:
    row[f"{be}_err"] = float(np.abs(np.asarray(fns[be](*args), np.float32) - want).max())
    row[f"{be}_s"] = timing.time_fn(timing.chain_steps(steps[be], STEPS), args, **timing_kw).median_s / STEPS
    row[f"{be}_call_s"] = timing.time_fn(fns[be], args, **timing_kw).median_s
  return row


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument("--shapes", default="128x16384x512x32x8,64x16384x512x32x8,8x16384x512x32x8")
  parser.add_argument("--backends", default="pallas,triton")
  args = parser.parse_args(argv)
  backends = cli.listed(parser, "--backends", args.backends, choices=[b for b in dispatch.BACKENDS if b != "xla"])
  for shape in cli.listed(parser, "--shapes", args.shapes, parse_shape):
    row = check(shape, backends)
    print(f"{shape} hopper_pays {row['hopper']}; " + "; ".join(
        f"{be} err {row[be + '_err']:.4f} {row[be + '_s'] * 1e6:.0f} us a step chained "
        f"({row[be + '_call_s'] * 1e6:.0f} a call)" for be in backends), flush=True)


if __name__ == "__main__":
  main()
