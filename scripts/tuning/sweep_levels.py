"""Per-device measurement of the models' cost model of a shared level: from how many readers a node on does reading
it batched (Hydragen: each node's queries stacked, the node read once) beat each sequence reading its node?

  python -m scripts.tuning.sweep_levels                      # on the GPU: writes batch_min_readers to the device's file
  python -m scripts.tuning.sweep_levels --tiny --out F.json  # anywhere: the plumbing (times mean nothing)

A decode step (T = 1) over one shared level of N nodes of L keys, each read by R sequences (B = N·R), and each
sequence's own suffix of `--suffix` keys: `tree_attention` with the level batched and read per sequence, 64 steps
chained in one call (the benchmark chains 16; these steps take ~20-40 us, and a call's fixed host cost, shared by 16,
was as large as the differences measured: session 11), median of repeats, at every (R, L, heads) of the grid; the
small heads and short nodes are where batching has least to gain (`validation.batching_pays`). `batch_min_readers`
is the least R from which the batched step is never slower than the per-sequence one (within --tolerance) at any
tested L and heads; the times go into the file's provenance (`fields.batch_min_readers`), with those of a few levels
of other shapes (`EXTRA`: the demo's) and the bytes each level saves batched, for a cost model beyond readers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import hydragen_jax as hj
from experiments import timing
from hydragen_jax import tuning as tuning_lib
from scripts.tuning import field_sweep

READERS = (2, 3, 4, 8)
NODE_KEYS = (16, 64, 256)
HEADS = ((8, 2, 32), (32, 8, 128))  # (Hq, Hkv, D): a small model's tiny heads (the demo's), a 7B-like GQA layer
# Levels of other shapes, timed and recorded beside the grid (not part of its verdict): the demo's (byte model, 32
# samples of 4 prompts: a root of 1131 tokens read by all 128 sequences, then 2 nodes of up to 75 tokens read by 64
# each, then 4 of up to 77 read by 32 each). (nodes, readers a node, keys a node, (Hq, Hkv, D))
EXTRA = ((1, 128, 1131, (8, 2, 32)), (2, 64, 75, (8, 2, 32)), (4, 32, 77, (8, 2, 32)))
TINY = dict(readers=(2, 3), node_keys=(16,), heads=((4, 2, 16),), nodes=2, suffix=8, extra=((1, 4, 24, (4, 2, 16)),))
TIMING = dict(warmup=2, repeats=9)


def step_inputs(nodes: int, readers: int, node_keys: int, heads: tuple[int, int, int], suffix: int, dtype):
  """q `[B, 1, Hq, D]` and the two levels (the shared one, N nodes; each sequence's own suffix)."""
  hq, hkv, d = heads
  b = nodes * readers
  keys = jax.random.split(jax.random.key(nodes * 1000 + readers * 10 + node_keys), 5)
  q = jax.random.normal(keys[0], (b, 1, hq, d), jnp.float32).astype(dtype)
  shared = hj.Level(jax.random.normal(keys[1], (nodes, node_keys, hkv, d), jnp.float32).astype(dtype),
                    jax.random.normal(keys[2], (nodes, node_keys, hkv, d), jnp.float32).astype(dtype),
                    jnp.full((nodes,), node_keys, jnp.int32), jnp.repeat(jnp.arange(nodes, dtype=jnp.int32), readers),
                    readers)
  own = hj.Level(jax.random.normal(keys[3], (b, suffix, hkv, d), jnp.float32).astype(dtype),
                 jax.random.normal(keys[4], (b, suffix, hkv, d), jnp.float32).astype(dtype),
                 jnp.full((b,), suffix, jnp.int32))
  return q, [shared, own]


def saved_bytes(nodes: int, readers: int, node_keys: int, heads: tuple[int, int, int], itemsize: int) -> int:
  """Bytes of K and V that reading the level batched does not read (each node once, not once a reader)."""
  _, hkv, d = heads
  return nodes * (readers - 1) * node_keys * 2 * hkv * d * itemsize


def time_step(q, levels, batched: bool, backend: str | None, steps: int) -> tuple[float, jax.Array]:
  def step(x, levels):
    return hj.tree_attention(x, levels, batch_shared=[batched], backend=backend)

  result = timing.time_fn(timing.chain_steps(step, steps), (q, levels), **TIMING)
  return result.median_s / steps, jax.jit(step)(q, levels)


def least_paying(pays: dict[int, bool]) -> int | None:
  """The least tested reader count from which batched pays at every higher tested count; None where it does not
  pay at the most readers tested."""
  least = None
  for readers in sorted(pays, reverse=True):
    if not pays[readers]:
      break
    least = readers
  return least


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  field_sweep.add_arguments(parser)
  parser.add_argument("--nodes", type=int, default=16, help="nodes of the shared level")
  parser.add_argument("--suffix", type=int, default=64, help="keys of each sequence's own suffix")
  parser.add_argument("--steps", type=int, default=64,
                      help="steps chained in one call (a call's fixed host cost is shared by them)")
  parser.add_argument("--tolerance", type=float, default=0.02, help="batched may be this much slower and count")
  parser.add_argument("--backend", default=None, help="attention backend (default: the device's)")
  parser.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU check)")
  args = parser.parse_args(argv)
  not_measured = ("--tiny" if args.tiny else None) or field_sweep.off_gpu()
  field_sweep.check_out(parser, args, not_measured)
  run = field_sweep.Run.begin("sweep_levels", argv)
  base_file = run.base
  grid = TINY if args.tiny else dict(readers=READERS, node_keys=NODE_KEYS, heads=HEADS, nodes=args.nodes,
                                     suffix=args.suffix, extra=EXTRA)
  dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16

  def timed(nodes: int, readers: int, node_keys: int, heads: tuple[int, int, int]) -> tuple[float, float]:
    q, levels = step_inputs(nodes, readers, node_keys, heads, grid["suffix"], dtype)
    (tb, ob), (ts, os_) = (time_step(q, levels, b, args.backend, args.steps) for b in (True, False))
    np.testing.assert_allclose(np.asarray(ob, np.float32), np.asarray(os_, np.float32), rtol=2e-2, atol=2e-2)
    saved = saved_bytes(nodes, readers, node_keys, heads, jnp.dtype(dtype).itemsize)
    print(f"  N={nodes} R={readers} L={node_keys} heads={heads} ({saved / 1e6:.1f} MB saved): batched "
          f"{tb * 1e6:.1f} us, per sequence {ts * 1e6:.1f} us ({ts / tb:.2f}x)", flush=True)
    return tb, ts

  times = {(r, l, h): timed(grid["nodes"], r, l, h)  # (R, L, heads) -> (batched s, per-sequence s)
           for r in grid["readers"] for l in grid["node_keys"] for h in grid["heads"]}
  extra = {config: timed(*config) for config in grid["extra"]}
  pays = {r: all(tb <= ts * (1 + args.tolerance) for (rr, _, _), (tb, ts) in times.items() if rr == r)
          for r in grid["readers"]}
  least = least_paying(pays)
  if least is None:  # not even the most readers tested pay: a measurement to look at, not a value to ship
    least = base_file.tuning.batch_min_readers
    verdict = f"batched slower at {max(pays)} readers too: the field keeps {least}"
  else:
    verdict = f"batched pays (within {args.tolerance:.0%}) from {least} readers a node"
  if any(pays[r] and not pays[q] for r in pays for q in pays if q > r):
    print(f"  note: not monotone in the readers ({pays}): look at the times", flush=True)
  table = {f"R={r} L={l} heads={h}": [round(tb * 1e6, 1), round(ts * 1e6, 1)] for (r, l, h), (tb, ts) in times.items()}
  others = {f"N={n} R={r} L={l} heads={h}": [round(tb * 1e6, 1), round(ts * 1e6, 1)]
            for (n, r, l, h), (tb, ts) in extra.items()}
  measured = (f"one shared level of {grid['nodes']} nodes and a {grid['suffix']}-key suffix, T = 1, us a step "
              f"batched / per sequence: {json.dumps(table)}; {verdict}; other levels (not in the verdict), us a "
              f"step batched / per sequence: {json.dumps(others)}")
  tune = dataclasses.replace(base_file.tuning, batch_min_readers=least)
  out = run.write(args, "batch_min_readers", tune, measured, not_measured)
  print(f"wrote {out}: batch_min_readers {least} ({time.time() - run.start:.0f} s)", flush=True)


if __name__ == "__main__":
  main()
