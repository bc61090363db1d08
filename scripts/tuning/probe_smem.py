"""Shared memory of the Triton kernel's tiles: each tile of `CONFIGS` launched once (one level, one program per row
block), its output checked against the reference, and `ops.tile_shared_memory`'s estimate printed beside it, so
that Nsight Compute's count of the same launches can be compared:

    ncu --kernel-name regex:hydragen_fused_levels --csv --log-file smem.csv \
      --metrics launch__shared_mem_per_block_dynamic,launch__shared_mem_per_block_static,launch__registers_per_thread \
      python3 -m scripts.tuning.probe_smem

A tile that does not fit fails to compile: its line carries the compiler's message (which names the bytes it asked
for) and it launches nothing, so the CSV's launches are the lines marked ok, in order. `--tiny` runs two small tiles
in the interpreter (a CPU check of the script).
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from hydragen_jax import reference
from hydragen_jax.kernels import ops
from hydragen_jax.kernels.flash import BlockConfig

# (dtype, head_dim, block_m, block_k, num_stages, heads)
CONFIGS = [
    ("bfloat16", 128, 64, 64, 3, 1), ("bfloat16", 128, 16, 64, 3, 16), ("bfloat16", 128, 128, 128, 3, 1),
    ("bfloat16", 128, 64, 128, 2, 1), ("bfloat16", 128, 32, 32, 4, 1), ("bfloat16", 128, 64, 64, 1, 1),
    ("bfloat16", 64, 64, 64, 3, 1), ("bfloat16", 64, 128, 128, 3, 1), ("bfloat16", 80, 64, 64, 3, 1),
    ("bfloat16", 256, 64, 32, 3, 1), ("bfloat16", 256, 64, 64, 3, 1), ("bfloat16", 256, 16, 16, 2, 1),
    ("float16", 128, 64, 64, 3, 1),
    ("float32", 128, 64, 64, 3, 1), ("float32", 128, 128, 64, 3, 1), ("float32", 128, 128, 64, 2, 1),
    ("float32", 128, 32, 64, 3, 1), ("float32", 64, 64, 64, 3, 1), ("float32", 64, 128, 64, 3, 1),
    ("float32", 256, 64, 32, 3, 1), ("float32", 256, 64, 32, 2, 1), ("float32", 256, 16, 32, 3, 1),
]
TINY = [("float32", 64, 16, 16, 2, 1), ("bfloat16", 32, 16, 16, 2, 4)]


def run_tile(dtype: str, head_dim: int, block_m: int, block_k: int, stages: int, heads: int,
             interpret: bool) -> float:
  """One level of one sequence whose rows fill one `block_m` tile (T·g = block_m, or one row of each of `heads`
  packed KV heads) over 4 key blocks; returns the largest error against the reference."""
  kv_heads = heads
  t = block_m if heads == 1 else 1
  keys = 4 * block_k // heads
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)
             for shape in ((1, t, kv_heads, head_dim), (1, keys, kv_heads, head_dim), (1, keys, kv_heads, head_dim)))
  lengths = jnp.array([keys], jnp.int32)
  block = BlockConfig(block_m=block_m, block_k=block_k, num_warps=4 if block_m <= 64 else 8, num_stages=stages,
                      heads=heads)
  plan = ops.per_sequence(q, k, v, lengths, causal=False, block=block)
  [(out, _)] = ops.run(q, [plan], scale=head_dim ** -0.5, interpret=interpret, launch="fused")
  ref, _ = reference.attention(q.astype(jnp.float32), k, v, lengths, causal=False, scale=head_dim ** -0.5)
  return float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--tiny", action="store_true", help="two small tiles in the interpreter (CPU)")
  args = parser.parse_args()
  configs = TINY if args.tiny else CONFIGS
  print(json.dumps({"device": jax.devices()[0].device_kind, "limit": ops.shared_memory_limit()}), flush=True)
  for dtype, d, bm, bk, stages, heads in configs:
    block = BlockConfig(block_m=bm, block_k=bk, num_stages=stages, heads=heads)
    row = dict(dtype=dtype, head_dim=d, block_m=bm, block_k=bk, stages=stages, heads=heads,
               estimate=ops.tile_shared_memory(block, d, jnp.dtype(dtype).itemsize))
    try:
      row["max_error"] = run_tile(dtype, d, bm, bk, stages, heads, interpret=args.tiny)
      row["ok"] = True
    except Exception as e:  # noqa: BLE001 (a tile that does not fit: the compiler's message is the measurement)
      row["ok"], row["error"] = False, f"{type(e).__name__}: {str(e)[:400]}"
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
