"""Block-size sweep for the two halves of a Hydragen decode step, on the GPU (development tool).

For the seed configs of BRIEF.md at suffix length out/2, times the prefix half (`ops.batched`, all B·g queries
against the shared prefix) and the suffix half (`ops.per_sequence`) under several tilings, and prints each
half's best tiling with its fraction of that half's own floor. Usage: python scripts/sweep_blocks.py [seconds] [prefix,suffix]
"""

from __future__ import annotations

import itertools
import sys
import time

import jax
import jax.numpy as jnp

from hydragen_jax.kernels import ops
from hydragen_jax.kernels.flash import BlockConfig
from scripts.quick_bench import D, SEED, machine_rates, timeit

PREFIX_TILES = [BlockConfig(m, k, sp, w, st) for (m, k), sp, w, st in itertools.product(
    [(64, 64), (128, 64), (128, 32), (64, 128)], [1, 2, 4], [4, 8], [2, 3])]
SUFFIX_TILES = [BlockConfig(16, k, sp, w, st) for k, sp, w, st in itertools.product(
    [32, 64, 128], [1, 2], [4, 8], [3, 4])]


HALVES = ("prefix", "suffix")


def main():
  global HALVES
  budget = float(sys.argv[1]) if len(sys.argv) > 1 else 300
  if len(sys.argv) > 2:
    HALVES = tuple(sys.argv[2].split(","))
  t_end = time.time() + budget
  bw, flops = machine_rates()
  print(f"copy {bw / 1e12:.2f} TB/s, matmul {flops / 1e12:.0f} TFLOP/s", flush=True)
  seen = set()
  for i, (b, p, out, hq, hkv) in enumerate(SEED):
    s = out // 2
    keys = jax.random.split(jax.random.PRNGKey(i), 5)
    q = jax.random.normal(keys[0], (b, 1, hq, D), jnp.bfloat16)
    pk = jax.random.normal(keys[1], (1, p, hkv, D), jnp.bfloat16)
    pv = jax.random.normal(keys[2], (1, p, hkv, D), jnp.bfloat16)
    sk = jax.random.normal(keys[3], (b, out, hkv, D), jnp.bfloat16)
    sv = jax.random.normal(keys[4], (b, out, hkv, D), jnp.bfloat16)
    zeros = jnp.zeros((b,), jnp.int32)
    halves = {
        "prefix": (PREFIX_TILES, (b, p, hq, hkv),
                   lambda blk: jax.jit(lambda q, k, v: ops.run(q, [ops.batched(
                       q, k, v, jnp.array([p]), zeros, max_group=None, causal=False, block=blk)],
                       scale=0.088, interpret=False)), (q, pk, pv),
                   max(2 * p * hkv * D * 2 / bw, 4 * D * hq * b * p / flops),
                   ops.choose_block(b * hq // hkv, b * hq // hkv, 1, hkv, p, D)),
        "suffix": (SUFFIX_TILES, (b, out, s, hq, hkv),
                   lambda blk: jax.jit(lambda q, k, v: ops.run(q, [ops.per_sequence(
                       q, k, v, jnp.full((b,), s), jnp.arange(b), causal=True, block=blk)],
                       scale=0.088, interpret=False)), (q, sk, sv),
                   2 * b * s * hkv * D * 2 / bw,
                   ops.choose_block(hq // hkv, b * hq // hkv, b, hkv, out, D)),
    }
    for name, (tiles, shape_key, make, args, floor, default) in halves.items():
      if name not in HALVES:
        continue
      if (name, shape_key) in seen:
        continue
      seen.add((name, shape_key))
      results = []
      for blk in [default] + tiles:
        if time.time() > t_end:
          break
        try:
          results.append((timeit(make(blk), *args, repeats=10), blk))
        except Exception as e:  # noqa: BLE001 - a tiling that does not compile (shared memory) is skipped
          print(f"  {name} {blk}: {type(e).__name__}", flush=True)
      if not results:
        continue
      best_t, best = min(results, key=lambda r: r[0])
      print(f"{name} {shape_key}: default {results[0][0] * 1e6:.1f} us ({floor / results[0][0]:.2f} of floor); "
            f"best {best_t * 1e6:.1f} us ({floor / best_t:.2f}) with {best}", flush=True)
      for t, blk in sorted(results, key=lambda r: r[0])[:3]:
        print(f"    {t * 1e6:8.1f} us  {blk}", flush=True)


if __name__ == "__main__":
  main()
