"""Probe (development tool): what a decode step's KV-cache writes cost, by cache layout, at a few batch sizes.

Issue 12's B = 64 and B = 8 steps spend 3.5-6.5 µs a layer on the cache writes (experiments/PERF_NOTES.md): XLA
writes k and v with a scatter each, two launch-bound fusions that also compute k's RoPE and slice v from the packed
q/k/v projection. With k and v in one cache array a layer (`[B, S, 2·Hkv, D]`: a slot's keys, then its values),
one scatter writes both. This probe times, per layer of a 7B-shaped step (the q/k/v GEMM, k's RoPE, the writes; q
and a residual carry the layers so that nothing is dead), `--steps` steps chained in one call:
  - `two`: k and v caches `[B, S, Hkv, D]`, one scatter each (jnp's `.at[].set`: `models.cache.scatter_write`);
  - `pair`: the same caches, both written by one variadic scatter (`models.pair_scatter`: `scatter_write`'s `pair`);
  - `one`: one cache `[B, S, 2·Hkv, D]`, one scatter of the step's keys and values;
  - `skip`: no write (k and v folded into the residual instead): the GEMM and RoPE alone.
The write costs are each variant's time less `skip`'s. The capacity S is small (`--capacity`): a scatter's cost does not
depend on it.

  python -m scripts.tuning.probe_kv_write [--batches 8,64,512] [--layers 8] [--steps 16]  # on the GPU
  python -m scripts.tuning.probe_kv_write --tiny                                          # anywhere

With `--` and `scripts/profile_decode.py`'s arguments, the models' step is profiled instead, once with each of
`--variants` two and pair (the device's tuning with `pair_write` off, then on: the decode loop's writes). This is
`profile_decode --field pair_write=false,true` (what it runs), kept for the commands the records cite:

  python -m scripts.tuning.probe_kv_write --variants two,pair -- --batch 64 --layers 8 --modes hydragen,standard
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import models.cache
from models import COMPILER_OPTIONS
from models.llama import apply_rope
from scripts import cli

VARIANTS = ("two", "pair", "one", "skip")


def make_run(variant: str, hkv: int, d: int, q_width: int, steps: int):
  """`run(x [B, hidden], ws (L of [hidden, q + 2·Hkv·D]), caches, pos0) -> (x, caches)`: `steps` steps of every
  layer, the step's position pos0 + i for every sequence."""
  inv_freq = 1.0 / (10000.0 ** (np.arange(0, d, 2, dtype=np.float64) / d))

  def run(x, ws, caches, pos0):
    b = x.shape[0]

    def body(i, carry):
      x, caches = carry
      positions = jnp.full((b, 1), pos0 + i, jnp.int32)
      new = []
      for w, cache in zip(ws, caches):
        qkv = x @ w
        q, k, v = qkv[:, :q_width], qkv[:, q_width:q_width + hkv * d], qkv[:, q_width + hkv * d:]
        k = apply_rope(k.reshape(b, 1, hkv, d), positions, inv_freq)
        v = v.reshape(b, 1, hkv, d)
        if variant in ("two", "pair"):
          cache = models.cache.scatter_write(*cache, k, v, positions, pair=variant == "pair")
        elif variant == "one":
          rows = jnp.arange(b)[:, None]
          cache = cache.at[rows, positions].set(jnp.concatenate([k, v], axis=2), mode="drop",
                                                indices_are_sorted=True, unique_indices=True)
        else:
          q = q + jnp.tile((k + v).reshape(b, hkv * d), q_width // (hkv * d))
        new.append(cache)
        x = x + q[:, :x.shape[1]] * 1e-3
      return x, tuple(new)

    return jax.lax.fori_loop(0, steps, body, (x, caches))

  return run


def caches_of(variant: str, layers: int, b: int, s: int, hkv: int, d: int, dtype):
  if variant in ("two", "pair"):
    return tuple((jnp.zeros((b, s, hkv, d), dtype), jnp.zeros((b, s, hkv, d), dtype)) for _ in range(layers))
  if variant == "one":
    return tuple(jnp.zeros((b, s, 2 * hkv, d), dtype) for _ in range(layers))
  return tuple(jnp.zeros((), dtype) for _ in range(layers))


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  rest = argv[argv.index("--") + 1:] if "--" in argv else None
  argv = argv[:argv.index("--")] if "--" in argv else argv
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batches", default="8,64,512")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--steps", type=int, default=16)
  parser.add_argument("--capacity", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--tiny", action="store_true", help="small shapes (any machine: the plumbing)")
  args = parser.parse_args(argv)
  allowed = ("two", "pair") if rest is not None else VARIANTS  # with `--`: the models' step, written either way
  variants = cli.listed(parser, "--variants", args.variants, choices=allowed)
  batches = cli.listed(parser, "--batches", args.batches, int, low=1)
  cli.at_least(parser, args, layers=1, steps=1, capacity=1, repeats=1)
  if rest is not None:  # profile_decode's own A/B of the tuning field, one value a variant
    from scripts import profile_decode  # noqa: PLC0415
    values = ",".join("true" if v == "pair" else "false" for v in variants)
    print(f"=== cache writes {', '.join(variants)}: profile_decode --field pair_write={values}", flush=True)
    sys.argv = ["profile_decode", *rest, "--field", f"pair_write={values}"]
    profile_decode.main()
    return
  hidden, hkv, d = (64, 2, 16) if args.tiny else (4096, 32, 128)
  layers, steps = (2, 2) if args.tiny else (args.layers, args.steps)
  dtype = jnp.bfloat16
  q_width = hidden
  keys = jax.random.split(jax.random.key(0), layers)
  ws = tuple((jax.random.normal(k, (hidden, q_width + 2 * hkv * d)) * hidden**-0.5).astype(dtype) for k in keys)
  print(f"{jax.devices()[0].device_kind}: {layers} layers, {steps} steps a call, capacity {args.capacity}", flush=True)
  for b in batches:
    x = jax.random.normal(jax.random.key(b), (b, hidden), dtype)
    per_layer = {}
    for variant in variants:
      run = jax.jit(make_run(variant, hkv, d, q_width, steps), donate_argnums=(2,))
      caches = caches_of(variant, layers, b, args.capacity, hkv, d, dtype)
      compiled = run.lower(x, ws, caches, jnp.int32(0)).compile(COMPILER_OPTIONS)
      times = []
      for r in range(args.repeats + 2):
        t0 = time.perf_counter()
        out, caches = compiled(x, ws, caches, jnp.int32(0))
        jax.block_until_ready((out, caches))
        if r >= 2:  # the first two: warm-up
          times.append(time.perf_counter() - t0)
      per_layer[variant] = statistics.median(times) / steps / layers * 1e6
      print(f"B {b:4d} {variant:5s}: {per_layer[variant]:7.2f} us a layer", flush=True)
    if "skip" in per_layer:
      extra = ", ".join(f"{v} {per_layer[v] - per_layer['skip']:+.2f}" for v in per_layer if v != "skip")
      print(f"B {b:4d} writes over skip (us a layer): {extra}", flush=True)


if __name__ == "__main__":
  main()
