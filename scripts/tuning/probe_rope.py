"""Two ways of writing RoPE's "rotate half" in the decode step, profiled in the model
(`scripts/profile_decode.py`): `concat` (x1·cos − x2·sin and x2·cos + x1·sin, concatenated:
`models.llama.apply_rope`) and `flip` (x·[cos, cos] + flip(x)·[−sin, sin] over the two halves: the same products,
no concatenate for XLA's fusions). On the H200 (2026-12-02) `flip`'s fusions ran faster but `none`'s GEMMs slower.

    python -m scripts.tuning.probe_rope --variants concat,flip -- --batch 512 --layers 8 --modes none,hydragen

Everything after `--` goes to `profile_decode`. Each variant replaces `models.llama.apply_rope` for its run.

`--soak SECONDS` times each variant's `none` decode loop instead (7B shape, `--layers`, `--batch`, P = 1K, 32 steps
a call from s = 64, back to back for SECONDS, `--rounds` times alternated) and prints `MARK` lines in local time, to
read beside a clock and power log taken meanwhile:

    nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active \
        --format=csv,noheader -lms 50 > smi.csv &
    python -m scripts.tuning.probe_rope --soak 4 --layers 8 --batch 512
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import models.llama as llama
from experiments import model_api
from scripts import profile_decode
from scripts import cli


def rope_flip(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, factor: float = 1.0) -> jax.Array:
  """`models.llama.apply_rope` (same arguments) written with a flip instead of the concatenate."""
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [B, T, D/2]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  if factor != 1.0:
    cos, sin = cos * factor, sin * factor
  c = jnp.stack([cos, cos], axis=-2)[:, :, None]  # [B, T, 1, 2, D/2]
  s = jnp.stack([-sin, sin], axis=-2)[:, :, None]
  halves = x.astype(jnp.float32).reshape(x.shape[:-1] + (2, -1))  # [B, T, H, 2, D/2]
  return (halves * c + jnp.flip(halves, axis=-2) * s).reshape(x.shape).astype(x.dtype)


VARIANTS = {"concat": llama.apply_rope, "flip": rope_flip}  # taken before any run replaces apply_rope


def soak(names: list[str], seconds: float, rounds: int, layers: int, batch: int, tiny: bool = False,
         prefix: int = 1024) -> dict[str, list[float]]:
  """`none`'s decode loop under each variant, timed back to back for `seconds` per variant and round: the
  median seconds a step of each (variant -> one per round)."""
  shape = profile_decode.model_shape(layers, tiny)
  model, _ = model_api.build_model(shape, "bfloat16", seed=0, tp=1)
  tree = model_api.synthetic_tree(batch, prefix, 1, shape["vocab_size"], seed=0)
  state, org = profile_decode.mode_state(model, tree, 128, "none", None)
  steps, at = (2, 2) if tiny else (32, 64)
  medians = {name: [] for name in names}
  for rnd in range(rounds):
    for name in names:
      llama.apply_rope = VARIANTS[name]
      jax.clear_caches()
      fn, _ = model_api.compile_decode(model, state, None)
      held = [state]  # the call donates its state: each one starts from the last one's

      def run():
        held[0] = fn(model.params(), model_api.at_step(held[0], org, at), jnp.int32(steps))
        return jax.block_until_ready(held[0])

      run()
      times, end = [], time.time() + seconds
      print(f"MARK start {name} {rnd} {time.strftime('%Y/%m/%d %H:%M:%S')}", flush=True)
      while time.time() < end or not times:
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) / steps)
      medians[name].append(float(np.median(times)))
      print(f"MARK end {name} {rnd} {time.strftime('%Y/%m/%d %H:%M:%S')} median {medians[name][-1] * 1e6:.0f} us "
            f"a step ({len(times)} calls)", flush=True)
      state = held[0]
  return medians


def main():
  argv = sys.argv[1:]
  rest = argv[argv.index("--") + 1:] if "--" in argv else []
  mine = argv[:argv.index("--")] if "--" in argv else argv
  parser = argparse.ArgumentParser()
  parser.add_argument("--variants", default="concat,flip")
  parser.add_argument("--soak", type=float, default=0.0, metavar="SECONDS",
                      help="time none's loop for SECONDS per variant instead of profiling (module docstring)")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--batch", type=int, default=512)
  parser.add_argument("--tiny", action="store_true", help="a tiny model (a CPU check that the script runs)")
  args = parser.parse_args(mine)
  variants = cli.listed(parser, "--variants", args.variants, choices=VARIANTS)
  cli.at_least(parser, args, soak=0, rounds=1, layers=1, batch=1)
  if args.soak:
    soak(variants, args.soak, args.rounds, args.layers, args.batch, args.tiny,
         prefix=16 if args.tiny else 1024)
    return
  for name in variants:
    print(f"=== rope {name}", flush=True)
    llama.apply_rope = VARIANTS[name]
    jax.clear_caches()  # the jitted decode step traced with the other variant must not be reused
    sys.argv = ["profile_decode", *rest]
    profile_decode.main()


if __name__ == "__main__":
  main()
