"""Two ways of writing RoPE's "rotate half" in the decode step, profiled in the model
(`scripts/profile_decode.py`): `concat` (x1·cos − x2·sin and x2·cos + x1·sin, concatenated:
`models.llama.apply_rope`) and `flip` (x·[cos, cos] + flip(x)·[−sin, sin] over the two halves: the same products,
no concatenate for XLA's fusions). On the H200 (2026-12-02) `flip`'s fusions ran faster but `none`'s GEMMs slower.

    python -m scripts.tuning.probe_rope --variants concat,flip -- --batch 512 --layers 8 --modes none,hydragen

Everything after `--` goes to `profile_decode`. Each variant replaces `models.llama.apply_rope` for its run.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

import models.llama as llama
from scripts import profile_decode


def rope_flip(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [B, T, D/2]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  c = jnp.stack([cos, cos], axis=-2)[:, :, None]  # [B, T, 1, 2, D/2]
  s = jnp.stack([-sin, sin], axis=-2)[:, :, None]
  halves = x.astype(jnp.float32).reshape(x.shape[:-1] + (2, -1))  # [B, T, H, 2, D/2]
  return (halves * c + jnp.flip(halves, axis=-2) * s).reshape(x.shape).astype(x.dtype)


VARIANTS = {"concat": llama.apply_rope, "flip": rope_flip}  # taken before any run replaces apply_rope


def main():
  argv = sys.argv[1:]
  rest = argv[argv.index("--") + 1:] if "--" in argv else []
  mine = argv[:argv.index("--")] if "--" in argv else argv
  parser = argparse.ArgumentParser()
  parser.add_argument("--variants", default="concat,flip")
  args = parser.parse_args(mine)
  for name in args.variants.split(","):
    print(f"=== rope {name}", flush=True)
    llama.apply_rope = VARIANTS[name]
    jax.clear_caches()  # the jitted decode step traced with the other variant must not be reused
    sys.argv = ["profile_decode", *rest]
    profile_decode.main()


if __name__ == "__main__":
  main()
