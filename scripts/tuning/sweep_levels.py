"""Per-device measurement of the models' cost model of a shared level: where does reading it batched (Hydragen: each
node's queries stacked, the node read once) beat each sequence reading its node?

  python -m scripts.tuning.sweep_levels                      # on the GPU: writes the two fields to the device's file
  python -m scripts.tuning.sweep_levels --tiny --out F.json  # anywhere: the plumbing (times mean nothing)

A decode step (T = 1) over one shared level of N nodes of L keys, each read by R sequences (B = N·R), and each
sequence's own suffix of `--suffix` keys: `tree_attention` with the level batched and read per sequence, 64 steps
chained in one call (these steps take ~10-40 us; a call's fixed host cost, shared by 16 steps, was as large as the
differences measured: session 11), median of repeats, at every (R, L, heads) of the grid and at a few levels of
other shapes (`EXTRA`: the demo's). The node map is static, as in the models (a tuple in `models.cache.LevelCache`:
the sequences are grouped on the host); a traced map would time a device sort and count in every step.

The cost model (`dispatch.batching_pays`) batches a level whose nodes have at least `batch_min_readers` readers
on average and which saves at least `batch_min_saved_bytes` of K and V a layer. `fit_rule` picks the two from the
measured levels: the pair whose choices give the least total time over them (ties: the rule that batches more),
taken from the reader counts and byte counts measured (a byte count above the largest: no measured level batched). The times, the bytes each level saves and the rule's
mistakes go into the file's provenance (`fields.batch_min_readers`, `fields.batch_min_saved_bytes`).
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
from hydragen_jax import dispatch
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
                    jnp.full((nodes,), node_keys, jnp.int32), np.repeat(np.arange(nodes, dtype=np.int32), readers),
                    readers)  # a numpy node map: static in the step (`time_step`), as the models' is
  own = hj.Level(jax.random.normal(keys[3], (b, suffix, hkv, d), jnp.float32).astype(dtype),
                 jax.random.normal(keys[4], (b, suffix, hkv, d), jnp.float32).astype(dtype),
                 jnp.full((b,), suffix, jnp.int32))
  return q, [shared, own]


def saved_bytes(nodes: int, readers: int, node_keys: int, heads: tuple[int, int, int], itemsize: int) -> int:
  """Bytes of K and V of one layer's level that reading it batched does not read (`dispatch.batching_saves`,
  a node's K and V being ``2 · L · Hkv · D · itemsize``, as `models.cache.level_node_bytes` counts them)."""
  _, hkv, d = heads
  return dispatch.batching_saves(nodes * readers, nodes, 2 * node_keys * hkv * d * itemsize)


def make_step(levels, batched: bool, backend: str | None):
  """(step(q, arrays), arrays): one decode step over `levels` with the shared level batched or not. The levels'
  node maps stay static (numpy constants of the traced step, not arguments), as in the models."""
  maps = [(level.seq_to_node, level.max_group) for level in levels]

  def step(x, arrays):
    rebuilt = [hj.Level(k, v, n, s2n, group) for (k, v, n), (s2n, group) in zip(arrays, maps)]
    return hj.tree_attention(x, rebuilt, batch_shared=[batched], backend=backend)

  return step, [(level.k, level.v, level.lengths) for level in levels]


def time_step(q, levels, batched: bool, backend: str | None, steps: int) -> tuple[float, jax.Array]:
  """Seconds a step (`steps` chained in one call) and the step's output."""
  step, arrays = make_step(levels, batched, backend)
  result = timing.time_fn(timing.chain_steps(step, steps), (q, arrays), **TIMING)
  return result.median_s / steps, jax.jit(step)(q, arrays)


@dataclasses.dataclass(frozen=True)
class Measured:
  """One level timed: its readers a node, the bytes it saves batched, and a step's seconds each way."""

  readers: int
  saved: int
  batched_s: float
  per_sequence_s: float


def batched_by(p: Measured, rule: tuple[int, int]) -> bool:
  """Whether the rule (batch_min_readers, batch_min_saved_bytes) reads level `p` batched (`dispatch.batching_rule`,
  `p.readers` readers of one node)."""
  return dispatch.batching_rule(p.readers, 1, p.saved, *rule)


def rule_seconds(points: list[Measured], rule: tuple[int, int]) -> float:
  """A step's seconds summed over the levels, each read the way the rule says."""
  return sum(p.batched_s if batched_by(p, rule) else p.per_sequence_s for p in points)


def fit_rule(points: list[Measured]) -> tuple[int, int]:
  """(batch_min_readers, batch_min_saved_bytes): of the rules "batched where readers >= r and saved >= s", r from
  the measured levels' reader counts (r >= 2: one reader a node saves nothing) and s from their byte counts or just
  above the largest (no measured level batched), the one whose choices give the least total time over the levels;
  ties go to the rule that batches more of them, then to the smaller r and s."""
  if not points:
    raise ValueError("fit_rule needs at least one measured level; got none.")
  readers = sorted({p.readers for p in points if p.readers >= 2}) or [2]
  saved = sorted({0} | {p.saved for p in points} | {max(p.saved for p in points) + 1})

  def key(rule):
    return rule_seconds(points, rule), -sum(batched_by(p, rule) for p in points), rule

  return min(((r, s) for r in readers for s in saved), key=key)


def rule_report(points: dict[str, Measured], rule: tuple[int, int]) -> str:
  """The rule's total time against batching every level, none and the best choice at each, and its mistakes (a
  level it reads the strictly slower way)."""
  r, s = rule
  values = list(points.values())
  every, none = sum(p.batched_s for p in values), sum(p.per_sequence_s for p in values)
  best = sum(min(p.batched_s, p.per_sequence_s) for p in values)
  wrong = [f"{n} ({'batched' if batched_by(p, rule) else 'per sequence'}: {p.per_sequence_s / p.batched_s:.2f}x)"
           for n, p in points.items()
           if (p.batched_s > p.per_sequence_s if batched_by(p, rule) else p.batched_s < p.per_sequence_s)]
  return (f"rule: batched from {r} readers a node and {s / 1e6:.3f} MB saved a layer; summed over the {len(values)} "
          f"levels, us a step: the rule {rule_seconds(values, rule) * 1e6:.1f}, every level batched "
          f"{every * 1e6:.1f}, none {none * 1e6:.1f}, the faster of the two at each {best * 1e6:.1f}; levels it "
          f"reads the slower way (per sequence / batched time): {', '.join(wrong) or 'none'}")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  field_sweep.add_arguments(parser)
  parser.add_argument("--nodes", type=int, default=16, help="nodes of the shared level")
  parser.add_argument("--suffix", type=int, default=64, help="keys of each sequence's own suffix")
  parser.add_argument("--steps", type=int, default=64,
                      help="steps chained in one call (a call's fixed host cost is shared by them)")
  parser.add_argument("--backend", default=None, help="attention backend (default: the device's)")
  parser.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU check)")
  args = parser.parse_args(argv)
  for option in ("nodes", "steps"):
    if getattr(args, option) < 1:
      parser.error(f"--{option} {getattr(args, option)}: must be at least 1")
  not_measured = ("--tiny" if args.tiny else None) or field_sweep.off_gpu()
  field_sweep.check_out(parser, args, not_measured)
  try:  # before the sweep's minutes: an unknown name, or a compiled backend off a GPU
    dispatch.resolve_backend(args.backend)
  except ValueError as e:
    parser.error(f"--backend: {e}")
  run = field_sweep.Run.begin("sweep_levels", argv, args.base)
  base_file = run.base
  grid = TINY if args.tiny else dict(readers=READERS, node_keys=NODE_KEYS, heads=HEADS, nodes=args.nodes,
                                     suffix=args.suffix, extra=EXTRA)
  dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16

  def timed(nodes: int, readers: int, node_keys: int, heads: tuple[int, int, int]) -> Measured:
    q, levels = step_inputs(nodes, readers, node_keys, heads, grid["suffix"], dtype)
    (tb, ob), (ts, os_) = (time_step(q, levels, b, args.backend, args.steps) for b in (True, False))
    np.testing.assert_allclose(np.asarray(ob, np.float32), np.asarray(os_, np.float32), rtol=2e-2, atol=2e-2)
    saved = saved_bytes(nodes, readers, node_keys, heads, jnp.dtype(dtype).itemsize)
    print(f"  N={nodes} R={readers} L={node_keys} heads={heads} ({saved / 1e6:.2f} MB saved): batched "
          f"{tb * 1e6:.1f} us, per sequence {ts * 1e6:.1f} us ({ts / tb:.2f}x)", flush=True)
    return Measured(readers, saved, tb, ts)

  configs = [(grid["nodes"], r, length, h) for r in grid["readers"] for length in grid["node_keys"]
             for h in grid["heads"]] + list(grid["extra"])
  points = {f"N={n} R={r} L={length} heads={h}": timed(n, r, length, h) for n, r, length, h in configs}
  rule = fit_rule(list(points.values()))
  report = rule_report(points, rule)
  print(f"  {report}", flush=True)
  table = {name: [round(p.batched_s * 1e6, 1), round(p.per_sequence_s * 1e6, 1), round(p.saved / 1e6, 3)]
           for name, p in points.items()}
  measured = (f"one shared level (N nodes of L keys, R readers a node) and a {grid['suffix']}-key suffix, T = 1, "
              f"{args.steps} steps a call; us a step batched / per sequence, MB saved a layer batched: "
              f"{json.dumps(table)}; {report}")
  tune = dataclasses.replace(base_file.tuning, batch_min_readers=rule[0], batch_min_saved_bytes=rule[1])
  out = run.write(args, ("batch_min_readers", "batch_min_saved_bytes"), tune, measured, not_measured)
  print(f"wrote {out}: batch_min_readers {rule[0]}, batch_min_saved_bytes {rule[1]} "
        f"({time.time() - run.start:.0f} s)", flush=True)


if __name__ == "__main__":
  main()
