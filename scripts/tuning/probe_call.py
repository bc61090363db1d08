"""Probe (development tool): what a decode call costs beyond its GPU kernels, per call and per step.

The e2e experiment times `steps_per_sample` decode steps per call (the compiled `lax.while_loop` of
`models.decode`), with the parameters and the state built before the clock starts. This probe times such calls for
several step counts k (wall time, median of repeats) and fits wall(k) = per_call + k * per_step; next to it the GPU
kernel time a step (profiled), so that per_step - GPU is what each loop iteration adds (the host's read of the loop
condition and its launches) and per_call what each call adds (dispatch, argument handling). Run it under different
XLA_FLAGS to compare, e.g. `--xla_gpu_enable_command_buffer=`.

How a call's state is made (`--reset`, each timed in turn): `fresh` (e2e's `model_api.at_step`: new arrays for the
counters, so the call's buffers differ from the previous call's and XLA updates its command buffers), `inplace` (the
same reset jitted with the state donated: the counters written into the previous call's buffers) and `chain` (the
previous call's output as it is, as `generate`'s chunks run: the steps move on, from `--at` for each k and for the
profile).

Usage: python -m scripts.tuning.probe_call [--batch 8] [--prefix 1024] [--layers 32] [--modes none,hydragen]
       [--steps 1,4,16,32] [--backend triton] [--gemm 0,64] [--reset fresh,inplace,chain]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import models
from experiments import model_api
from hydragen_jax import tuning as tuning_lib
from scripts import cli
from scripts.profile_decode import mode_state, model_shape, with_gemm_rows
from scripts.tuning.profile_step import gpu_kernel_ns


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--prefix", type=int, default=1024)
  parser.add_argument("--layers", type=int, default=32)
  parser.add_argument("--modes", default="none,hydragen")
  parser.add_argument("--steps", default="1,4,16,32")
  parser.add_argument("--at", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--backend", default=None)
  parser.add_argument("--gemm", default=None, metavar="ROWS[,ROWS...]",
                      help="the decode GEMM kernel (models.gemm) for products of 1 to ROWS rows, each timed in turn "
                           "(0: XLA's GEMMs)")
  parser.add_argument("--reset", default="fresh", help="how each call's state is made: fresh, inplace, chain "
                      "(comma-separated, each timed in turn)")
  parser.add_argument("--tiny", action="store_true", help="a tiny model (a CPU check that the script runs)")
  args = parser.parse_args()
  ks = cli.listed(parser, "--steps", args.steps, int, low=1)
  modes = cli.listed(parser, "--modes", args.modes, choices=models.MODES)
  gemm = cli.listed(parser, "--gemm", args.gemm, int, high=128) if args.gemm else [None]
  resets = cli.listed(parser, "--reset", args.reset, choices=("fresh", "inplace", "chain"))
  cli.at_least(parser, args, batch=1, prefix=1, layers=1, at=0, repeats=1)
  shape = model_shape(args.layers, args.tiny)
  model, _ = model_api.build_model(shape, "bfloat16", seed=0)
  tree = model_api.synthetic_tree(args.batch, args.prefix, 1, shape["vocab_size"], seed=0)
  # `chain` moves on by k steps a call from `--at` (reset there before each k and before the profile): room for the
  # warm-up and repeats of the largest k, or the profile's two calls of it
  generate = args.at + (max(args.repeats + 1, 2) if "chain" in resets else 1) * max(ks) + 1
  print(f"7B shape, {args.layers} layers, B={args.batch} P={args.prefix}, from s={args.at}, backend="
        f"{args.backend or 'default'}", flush=True)
  params = model.params()
  for mode in modes:
    state, org = mode_state(model, tree, generate, mode, args.backend)
    for rows in gemm:
      tune = None if rows is None else with_gemm_rows(tuning_lib.current(), int(rows))
      with tuning_lib.override(tune) if tune else contextlib.nullcontext():
        for reset in resets:
          label = (mode if rows is None else f"{mode} gemm<={rows}") + ("" if resets == ["fresh"] else f" {reset}")
          state = probe(model, params, state, org, label, ks, args, reset)
    del state


def probe(model, params, state, org, label: str, ks: list[int], args, reset: str = "fresh"):
  """Time the compiled decode of `state` for each step count, each call's state made as `reset` says; print the
  fit. Returns the last state (each call donates its input)."""
  fn, _ = model_api.compile_decode(model, state, args.backend)
  reset_jit = jax.jit(lambda s, *o: model_api.at_step(s, model_api.Origin(*o), args.at), donate_argnums=0)
  reset_inplace = lambda s, o: reset_jit(s, o.cache_lengths, o.positions, o.logits)  # noqa: E731
  held = [state]  # reset to `--at` before each k and before the profile (below)

  def make_state():
    if reset == "chain":
      return held[0]
    if reset == "inplace":
      return reset_inplace(held[0], org)
    return model_api.at_step(held[0], org, args.at)

  def call(k):
    s = jax.block_until_ready(make_state())
    before = int(s.step)
    start = time.perf_counter()
    out = fn(params, s, jnp.int32(k))
    dispatched = time.perf_counter()
    held[0] = jax.block_until_ready(out)
    elapsed = time.perf_counter() - start
    if (taken := int(held[0].step) - before) != k:  # e.g. a chain past the end of the generation's room
      raise RuntimeError(f"[{label}] a call took {taken} steps instead of {k} (from step {before})")
    return elapsed, dispatched - start

  walls, dispatch = {}, {}
  for k in ks:
    held[0] = reset_inplace(held[0], org)  # each k's chain starts at `--at`: the same suffix lengths as the others
    call(k)
    runs = [call(k) for _ in range(args.repeats)]
    walls[k] = statistics.median(r[0] for r in runs)
    dispatch[k] = statistics.median(r[1] for r in runs)
  per_step, per_call = np.polyfit(ks, [walls[k] for k in ks], 1)
  k_gpu = max(ks)
  held[0] = reset_inplace(held[0], org)
  total, _, _ = gpu_kernel_ns(lambda: call(k_gpu) and held[0], 2)
  gpu_step = sum(total.values()) / 2 / k_gpu / 1e9
  rows = ", ".join(f"k={k}: {walls[k] / k * 1e6:.0f} us/step (dispatch {dispatch[k] * 1e6:.0f} us)" for k in ks)
  g = tuning_lib.current().gemm
  print(f"[{label}] wall {rows} (gemm rows {g.min_rows}..{g.max_rows})", flush=True)
  print(f"[{label}] fit: per call {per_call * 1e6:.0f} us, per step {per_step * 1e6:.0f} us; GPU kernels "
        f"{gpu_step * 1e6:.0f} us a step: each step adds {(per_step - gpu_step) * 1e6:.0f} us", flush=True)
  return held[0]


if __name__ == "__main__":
  main()
