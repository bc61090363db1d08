"""Kernel sweep on the GPU (development tool; the official numbers come from `python -m experiments bench-attention`).

For the nine seed configs (`experiments/configs/bench_attention.toml`), times a whole Hydragen decode step
(prefix + suffix + merges) at s = 1, out/2 and out under several launch schedules and tilings, and prints tok/s
over the generation (Simpson mean step) as a fraction of the floor's tok/s, all measured in the same run. Then sweeps the prefix tiles alone on the
compute-heavy configs (TFLOP/s) and the suffix tiles alone (fraction of the bandwidth floor).

Usage: python -m scripts.tuning.sweep_kernels [--parts step,prefix,suffix] [--configs 0,1,...] [--shapes BxPxOUTxHQxHKV,...]
       [--variants a,b] [--steps-per-call N] [--out F]
The step sweep chains --steps-per-call steps a timed call (default 16, as the benchmark); the prefix and suffix
sweeps time one call a measurement (host-bound where a call takes less than ~80 us: the B = 64 rows).
(--shapes adds configs of other shapes to the step and suffix sweeps, e.g. the 7B decode layer 64x4096x128x32x32.)
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import time

import jax
import jax.numpy as jnp

from experiments import bench_attention, device_rates, floor, timing
from experiments import config as config_lib
from hydragen_jax import merge_states
from hydragen_jax import tuning as tuning_lib
from hydragen_jax.kernels import merge as merge_kernel
from hydragen_jax.kernels import ops
from hydragen_jax.kernels.flash import BlockConfig
from scripts import cli
from scripts.quick_bench import D, SEED, prefix_plan, run_plans, suffix_plan  # SEED: the bench's nine seed configs

TIMING = dict(warmup=2, repeats=7, min_repeat_s=0.02, max_inner=50)
# Steps chained a timed call (experiments.timing.chain_steps), as the benchmark's: one call a step is bound by host
# dispatch at B = 64 (50-80 us a call for ~30 us of GPU work). --steps-per-call 1 times one call a step.
STEPS_PER_CALL = 16

# A step variant: launch schedule, and tiling overrides (None: the heuristic) as BlockConfig field dicts.
VARIANTS = {
    "auto": dict(launch="auto"),
    "interleaved": dict(launch="interleaved"),
    "fused": dict(launch="fused"),
    "auto_mk1024": dict(launch="auto", max_keys=1024),
    "auto_bal2048": dict(launch="auto", balanced_keys=2048),
    "auto_mk4096": dict(launch="auto", max_keys=4096),
    "auto_bal1024": dict(launch="auto", balanced_keys=1024),
    "auto_bal4096": dict(launch="auto", balanced_keys=4096),
    "auto_k8192": dict(launch="auto", max_keys=8192, balanced_keys=8192),
    "auto_lead75": dict(launch="auto", lead=0.75),
    "auto_lead50": dict(launch="auto", lead=0.5),
    "auto_lead25": dict(launch="auto", lead=0.25),
    "auto_sheads8": dict(launch="auto", suffix=dict(heads=8)),
    "auto_sk128": dict(launch="auto", suffix=dict(block_k=128, num_stages=2)),
    "auto_lead90": dict(launch="auto", lead=0.9),
    "auto_lead100": dict(launch="auto", lead=1.0),
    "auto_st2": dict(launch="auto", prefix=dict(num_stages=2), suffix=dict(num_stages=2)),
    "auto_k32": dict(launch="auto", prefix=dict(block_k=32), suffix=dict(block_k=32)),
    "auto_k32st4": dict(launch="auto", prefix=dict(block_k=32, num_stages=4), suffix=dict(block_k=32, num_stages=4)),
    "auto_pm128": dict(launch="auto", prefix=dict(block_m=128, num_warps=8)),
    "auto_pk128st2": dict(launch="auto", prefix=dict(block_k=128, num_stages=2), suffix=dict(num_stages=2)),
    # Decode with one query row per KV head (MHA, T·g = 1): the suffix packs 16 KV heads a tile, so a 64-column
    # key block is only 4 keys; wider blocks, other splits, stages and warps.
    "auto_sk128st2": dict(launch="auto", prefix=dict(num_stages=2), suffix=dict(block_k=128, num_stages=2)),
    "auto_ssp1": dict(launch="auto", suffix=dict(splits=1)),
    "auto_ssp4": dict(launch="auto", suffix="double_splits"),
    "auto_psph": dict(launch="auto", prefix="half_splits"),
    "auto_pspd": dict(launch="auto", prefix="double_splits"),
    "auto_st4": dict(launch="auto", prefix=dict(num_stages=4), suffix=dict(num_stages=4)),
    "auto_w8": dict(launch="auto", prefix=dict(num_warps=8), suffix=dict(num_warps=8)),
    "sep_sw2": dict(launch="separate", suffix=dict(num_warps=2)),
    "sep_sw2k128": dict(launch="separate", suffix=dict(num_warps=2, block_k=128, num_stages=3)),
    "separate": dict(launch="separate"),
    "auto_nomerge": dict(launch="auto", merge=False),  # the kernel alone: its first part, not merged (timing only)
    # Every variant merges its parts as the API does under its tuning (`merge.applies`: the merge kernel up to
    # `Tuning.merge_max_rows` query rows); these force XLA's merge (`merge_states`) or the merge kernel.
    "auto_xmerge": dict(launch="auto", merge="xla"),
    # The parts merged by one variadic reduction over the stacked parts (an online-softmax combiner), where
    # merge_states' elementwise pass compiles to two kernels (the per-row weights apart): `merge_by_reduce`.
    # Measured slower on every seed row (H200, 2026-12-02: PERF_NOTES.md), against XLA's merge (then every variant's).
    "auto_rmerge": dict(launch="auto", merge="reduce"),
    # The parts merged by the Pallas merge kernel (`kernels.merge`, `Tuning.merge_max_rows`): one launch over the
    # levels' stacks as the kernel wrote them, rows a program and warps (its defaults: 2 rows, one warp).
    "auto_pmerge": dict(launch="auto", merge="pallas"),
    "auto_pmerge16w4": dict(launch="auto", merge="pallas", merge_rows=16, merge_warps=4),
    "auto_pmerge4": dict(launch="auto", merge="pallas", merge_rows=4),
    "auto_pmerge4w8": dict(launch="auto", merge="pallas", merge_rows=4, merge_warps=8),
    "auto_pmerge1w1": dict(launch="auto", merge="pallas", merge_rows=1),
    "auto_pmerge2w2": dict(launch="auto", merge="pallas", merge_warps=2),
    "auto_pmerge2w1": dict(launch="auto", merge="pallas", merge_rows=2, merge_warps=1),  # the defaults, by name
    # the parts merged in the fused launch itself (`fused_levels(merge=True)`: the last program of a row merges it)
    "auto_lmerge": dict(launch="auto", merge="launch"),
    "auto_ssp4_psph": dict(launch="auto", suffix="double_splits", prefix="half_splits"),
    "auto_ssp4_sk128": dict(launch="auto", suffix=dict(block_k=128, splits=4)),
    "auto_ssp8": dict(launch="auto", suffix=dict(splits=8)),
    # The MHA prefix level at B = 64 runs 2 programs an SM (227 registers, 115 KB of shared memory: Nsight Compute,
    # session 18) at 0.46 of the bandwidth: smaller row tiles (each KV block then read by 2 or 4 programs, mostly
    # from L2), deeper rings of smaller key blocks in a launch of their own.
    "auto_pm32": dict(launch="auto", prefix=dict(block_m=32)),
    "auto_pm32_psph": dict(launch="auto", prefix=dict(block_m=32, splits=4)),  # half of the B = 64 rows' 8 splits
    "auto_pm16_sp2": dict(launch="auto", prefix=dict(block_m=16, splits=2)),
    "auto_pm16_sp4": dict(launch="auto", prefix=dict(block_m=16, splits=4)),
    "sep_pk32st4": dict(launch="separate", prefix=dict(block_k=32, num_stages=4)),
    "sep_pk32st6": dict(launch="separate", prefix=dict(block_k=32, num_stages=6)),
    "sep_pst2": dict(launch="separate", prefix=dict(num_stages=2)),
    "sep_pk128st2": dict(launch="separate", prefix=dict(block_k=128, num_stages=2)),
    # MHA decode at B = 64 (e2e: the fused step ~1.7x its floor, a fixed ~12-18 us a step beyond its bytes; session
    # 33's reading): all programs in one wave (4 prefix + 1 suffix split: 256 programs for 264 slots at 2 an SM, 5
    # parts to merge), and 32-key prefix blocks (smaller tiles: 3 programs an SM if the registers allow).
    "auto_psp4_ssp1": dict(launch="auto", prefix=dict(splits=4), suffix=dict(splits=1)),
    "auto_pk32": dict(launch="auto", prefix=dict(block_k=32)),
    "auto_pk32st2": dict(launch="auto", prefix=dict(block_k=32, num_stages=2), suffix=dict(num_stages=2)),
    # Session 34: auto_psp4_ssp1 the fastest at B = 64 MHA, P = 4K (0.688 against 0.643; at P = 1K its tiling is
    # auto_ssp1's, the prefix already at 4 splits there): the same by the tuning's rule, a level split only until
    # its programs fill 96 % of the SMs (a level of 128 programs on 132 SMs no longer split in two), on every
    # config (fill96: slower with 512-key suffixes, 64 x 1K x 512 0.812 -> 0.746), or only where a program then
    # streams at most 2048 / 4096 keys over its packed heads (k2 / k4; k4 is the H200 file's since session 34).
    "auto_fill96": dict(launch="auto", split_fill=0.96, split_fill_keys=1 << 30),
    "auto_fill96k2": dict(launch="auto", split_fill=0.96, split_fill_keys=2048),
    "auto_fill96k4": dict(launch="auto", split_fill=0.96, split_fill_keys=4096),
    # ... and the rule off (a program per SM, the tuning before session 34): the A/B against today's `auto`.
    "auto_fill100": dict(launch="auto", split_fill=1.0),
}

PREFIX_TILES = [(64, 64, 4, 3), (64, 64, 4, 4), (64, 32, 4, 4), (128, 128, 8, 3), (128, 64, 8, 4),
                (64, 64, 8, 3), (64, 128, 4, 2), (64, 128, 4, 3), (128, 128, 8, 2)]
SUFFIX_TILES = [(1, 64, 4, 3), (0, 64, 4, 3), (0, 64, 4, 2), (0, 128, 4, 2), (0, 128, 8, 2), (0, 32, 4, 3),
                (0, 64, 4, 4), (0, 128, 4, 3), (0, 64, 2, 3), (0, 128, 2, 3), (0, 256, 4, 2)]  # heads (0: heuristic), block_k, warps, stages


def variant_tuning(variant: dict, base: tuning_lib.Tuning | None = None) -> tuning_lib.Tuning:
  """The tuning of a step variant: `base` (None: the device's) with its max_keys / balanced_keys / lead /
  split_fill."""
  base = tuning_lib.resolve(base)
  max_keys = variant.get("max_keys", base.max_keys_per_program)
  return dataclasses.replace(base, max_keys_per_program=max_keys,
                             balanced_keys=min(variant.get("balanced_keys", base.balanced_keys), max_keys),
                             interleave_lead=variant.get("lead", base.interleave_lead),
                             split_min_fill=variant.get("split_fill", base.split_min_fill),
                             split_fill_max_keys=variant.get("split_fill_keys", base.split_fill_max_keys))


def blocks(cfg, which: str, overrides: dict | None, tuning: tuning_lib.Tuning | None = None,
           fill: bool = True) -> BlockConfig:
  """The tiling `choose_block` gives config cfg's prefix or suffix level under `tuning` (None: the device's),
  both levels sharing the launch (`fill`: whether the launch lets it take `split_min_fill`, `launch_blocks`), with
  `overrides` (BlockConfig fields, or "half_splits" / "double_splits" / "double_heads")."""
  b, p, out, hq, hkv = cfg
  g = hq // hkv
  base = (ops.choose_block(b * g, b * g, 1, hkv, p, D, tuning=tuning, fill=fill) if which == "prefix"
          else ops.choose_block(g, b * g, b, hkv, out, D, tuning=tuning, fill=fill))
  if overrides == "half_splits":
    overrides = dict(splits=max(1, base.splits // 2))
  elif overrides == "double_splits":
    overrides = dict(splits=2 * base.splits)
  elif overrides == "double_heads":
    overrides = dict(heads=2 * base.heads, block_m=2 * base.block_m, block_k=2 * base.block_k)
  return dataclasses.replace(base, **(overrides or {}))


def launch_blocks(cfg, variant: dict, tuning: tuning_lib.Tuning) -> tuple[BlockConfig, BlockConfig]:
  """The (prefix, suffix) tilings of config cfg under a variant, with the launch's split rule as the library
  applies it (`ops.launch_fill`, on the tilings before the variant's overrides; not for "separate" launches, whose
  levels each have a launch of their own)."""
  b, p, out, hq, hkv = cfg
  fills = [True, True]
  if variant.get("launch") != "separate":
    pb, sb = (blocks(cfg, which, None, tuning) for which in ("prefix", "suffix"))
    rows = b * hq // hkv  # a launch's query rows for one KV head; the prefix is one group, the suffix b
    fills = ops.launch_fill([(pb, ops.busy_programs(hkv, pb.heads, 1, rows, pb.block_m), p),
                             (sb, ops.busy_programs(hkv, sb.heads, b, rows, sb.block_m), out)], tuning)
  return tuple(blocks(cfg, which, variant.get(which), tuning, fill)
               for which, fill in zip(("prefix", "suffix"), fills))


def case(cfg) -> bench_attention.Case:
  """Config cfg = (B, P, out, Hq, Hkv) as the benchmark's case (head dim D, bfloat16)."""
  b, p, out, hq, hkv = cfg
  return bench_attention.Case(batch=b, prefix=p, out=out, q_heads=hq, kv_heads=hkv, head_dim=D, dtype="bfloat16")


def config_inputs(cfg, seed: int):
  """The benchmark's inputs of config cfg = (B, P, out, Hq, Hkv) (`bench_attention.make_inputs`): q
  `[B, 1, Hq, D]`, the prefix k, v `[1, P, Hkv, D]` (the plans' node axis), the suffix caches k, v
  `[B, out, Hkv, D]`; each timing passes its own lengths."""
  x = bench_attention.make_inputs(case(cfg), cfg[2], seed)
  return x["q"], x["prefix_k"][None], x["prefix_v"][None], x["suffix_k"], x["suffix_v"]


CONFIGS = list(SEED)  # the seed configs, then those of --shapes
L2_BYTES = config_lib.load("bench_attention").get("device", {}).get("l2_bytes", 0)  # the benchmark's (l2_copies)


def parse_shape(text: str) -> tuple[int, ...]:
  """A config written BxPxOUTxHQxHKV, e.g. "64x4096x128x32x32"."""
  try:
    parts = tuple(int(x) for x in text.split("x"))
  except ValueError:
    parts = ()
  if len(parts) != 5 or min(parts) < 1:
    raise ValueError(f"a shape: expected BxPxOUTxHQxHKV of positive ints; got {text!r}.")
  return parts


def add_shapes(parser: argparse.ArgumentParser, shapes: str) -> list[int]:
  """The configs of `--shapes`, comma-separated BxPxOUTxHQxHKV (or a usage error), appended to CONFIGS: their
  indexes."""
  first = len(CONFIGS)
  CONFIGS.extend(cli.listed(parser, "--shapes", shapes, parse_shape) if shapes else [])
  return list(range(first, len(CONFIGS)))


def inputs(i):
  return config_inputs(CONFIGS[i], i)


def merge_by_reduce(states):
  """`merge_states` as one variadic reduction over the stacked parts: (lse, out, 1) per part, each element combined
  as online softmax does (shift by the larger lse), then out = acc / total, lse = top + log(total)."""
  out = jnp.stack([o.astype(jnp.float32) for o, _ in states])  # [n, ..., D]
  lse = jnp.broadcast_to(jnp.stack([l.astype(jnp.float32) for _, l in states])[..., None], out.shape)

  def combine(x, y):
    (m1, a1, l1), (m2, a2, l2) = x, y
    top = jnp.maximum(m1, m2)
    shift = jnp.where(top == -jnp.inf, 0.0, top)
    w1, w2 = jnp.exp(m1 - shift), jnp.exp(m2 - shift)
    return top, a1 * w1 + a2 * w2, l1 * w1 + l2 * w2

  zero = jnp.float32(0)
  top, acc, total = jax.lax.reduce((lse, out, jnp.ones_like(out)), (jnp.float32(-jnp.inf), zero, zero), combine, (0,))
  safe = jnp.where(total > 0, total, 1.0)
  return (acc / safe).astype(states[0][0].dtype), jnp.where(total > 0, top + jnp.log(safe), -jnp.inf)[..., 0]


def step_fn(cfg, variant, tuning: tuning_lib.Tuning | None = None):
  """A whole Hydragen step of config cfg under a variant (launch, BlockConfig overrides "prefix" / "suffix", and the
  tuning fields of `variant_tuning`), from `tuning` (None: the device's): (fn, (prefix block, suffix block))."""
  tune = variant_tuning(variant, tuning)
  pb, sb = launch_blocks(cfg, variant, tune)

  def fn(q, pk, pv, sk, sv, lengths):
    plans = [prefix_plan(q, pk, pv, block=pb), suffix_plan(q, sk, sv, lengths, block=sb)]
    how = variant.get("merge", "tuning")
    if how == "tuning":  # as the API merges under the tuning
      how = merge_kernel.method(q.size // q.shape[-1], q.shape[-1], tune)
    if how == "launch":
      (out, _), = ops.run(q, plans, scale=D**-0.5, interpret=False, launch=variant["launch"], tuning=tune, merge=True)
      return out
    if how == "pallas":
      stacks = ops.run(q, plans, scale=D**-0.5, interpret=False, launch=variant["launch"], tuning=tune, stacked=True)
      out, _ = merge_kernel.merge_stacks(stacks, rows=variant.get("merge_rows", tune.merge_rows),
                                         num_warps=variant.get("merge_warps", tune.merge_warps))  # the swept tuning's
      return out
    parts = run_plans(q, plans, launch=variant["launch"], tuning=tune)
    if how is False:
      return parts[0][0].astype(q.dtype)
    out, _ = (merge_by_reduce if variant.get("merge") == "reduce" else merge_states)(parts)
    return out.astype(q.dtype)

  return fn, (pb, sb)


def l2_copies(cfg, steps: int) -> int:
  """Copies of config cfg's KV a timed chain of `steps` reads in turn, as the benchmark's at s = 1
  (`bench_attention.l2_copies` with its config's device.l2_bytes): where its s = 1 step's bytes would fit the L2
  cache, the chain would otherwise read them from L2 step to step."""
  return bench_attention.l2_copies(case(cfg), 1, bench_attention.VARIANTS["hydragen"], L2_BYTES, steps)


def kv_copies(data, copies: int) -> tuple:
  """`config_inputs`' (q, k, v, suffix k, suffix v) as (q, [the KV, then copies - 1 copies of it in fresh buffers])."""
  q, *kv = data
  return q, timing.fresh_copies(kv, copies)


def chain_args(q, kv_sets, lengths) -> tuple:
  """The arguments of a step chained over copies (`timing.chain_steps(fn, steps, len(kv_sets))` of `fn(q, pk, pv, sk,
  sv, lengths)`): q, then each copy of the KV with the lengths."""
  return (q, *(x for kv in kv_sets for x in (*kv, lengths)))


def floor_s(cfg, s, rates):
  """The benchmark's floor of one step of config cfg at suffix s (`bench_attention.step_floor`), in seconds."""
  return bench_attention.step_floor(case(cfg), s, rates)["floor_s"]


def sweep_steps(configs, names, rates, records):
  """Whole steps under each variant: tok/s fraction of the floor, and the step times at s = 1, out/2, out."""
  print(f"\n{'config':>26} " + " ".join(f"{n:>13}" for n in names) + "   (tok/s fraction of floor)")
  for i in configs:
    cfg = CONFIGS[i]
    b, out = cfg[0], cfg[2]
    copies = l2_copies(cfg, STEPS_PER_CALL)  # as the benchmark: the KV at s = 1 not served from L2 step to step
    q, kv = kv_copies(inputs(i), copies)
    points = floor.simpson_points(out)
    floor_mean = floor.simpson(*(floor_s(cfg, s, rates) for s in points))
    cells = []
    for name in names:
      try:
        fn, (pb, sb) = step_fn(cfg, VARIANTS[name])
        compiled, _ = timing.compile_aot(timing.chain_steps(fn, STEPS_PER_CALL, copies),
                                         chain_args(q, kv, jnp.ones((b,), jnp.int32)))
        steps = [timing.time_compiled(compiled, chain_args(q, kv, jnp.full((b,), s, jnp.int32)), **TIMING).median_s
                 / STEPS_PER_CALL for s in points]
        frac = floor_mean / floor.simpson(*steps)
        cells.append(f"{frac:5.3f}")
        records.append(dict(kind="step", config=cfg, variant=name, steps_s=steps, floor_mean_s=floor_mean,
                            fraction=frac, prefix_block=str(pb), suffix_block=str(sb),
                            steps_per_call=STEPS_PER_CALL, l2_copies=copies))
        print(f"  [{i}] {name}: {frac:.3f} ({' / '.join(f'{x * 1e6:.0f}' for x in steps)} us; floor "
              f"{floor_mean * 1e6:.0f} us mean)", flush=True)
      except Exception as e:  # noqa: BLE001 - report and go on
        cells.append("  error")
        print(f"  [{i}] {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
    print(f"{str(cfg):>26} " + " ".join(f"{c:>13}" for c in cells), flush=True)


def sweep_prefix(configs, rates, records):
  """The prefix product alone (one shared node, all B·g rows) under each tile of PREFIX_TILES: TFLOP/s."""
  for i in configs:
    b, p, _, hq, _ = CONFIGS[i]
    q, pk, pv, _, _ = inputs(i)
    flops = 4 * D * hq * b * p
    for (bm, bk, w, st), splits in itertools.product(PREFIX_TILES, (1, 2)):
      blk = BlockConfig(bm, bk, splits, w, st)
      fn = lambda q, k, v, blk=blk: run_plans(q, [prefix_plan(q, k, v, block=blk)])
      try:
        t = timing.time_fn(fn, (q, pk, pv), **TIMING).median_s
        records.append(dict(kind="prefix", config=CONFIGS[i], block=str(blk), step_s=t))
        print(f"  prefix [{i}] {bm}x{bk} w{w} st{st} sp{splits}: {t * 1e6:7.1f} us {flops / t / 1e12:6.1f} "
              f"TFLOP/s ({flops / t / rates['matmul_flops_per_s']:.2f} of matmul)", flush=True)
      except Exception as e:  # noqa: BLE001
        print(f"  prefix [{i}] {blk}: {type(e).__name__}: {str(e)[:200]}", flush=True)


def sweep_suffix(configs, rates, records):
  """The suffix attention alone under each tile of SUFFIX_TILES at the Simpson points: fraction of the bandwidth
  (the keys and values of s tokens a sequence, its query and output)."""
  for i in configs:
    b, _, out, hq, hkv = CONFIGS[i]
    q, _, _, sk, sv = inputs(i)
    for heads, bk, w, st in SUFFIX_TILES:
      over = dict(block_k=bk, num_warps=w, num_stages=st, **({"heads": heads} if heads else {}))
      blk = blocks(CONFIGS[i], "suffix", over)
      fn = lambda q, k, v, lengths, blk=blk: run_plans(q, [suffix_plan(q, k, v, lengths, block=blk)])
      try:
        compiled, _ = timing.compile_aot(fn, (q, sk, sv, jnp.ones((b,), jnp.int32)))
        for s in floor.simpson_points(out):
          t = timing.time_compiled(compiled, (q, sk, sv, jnp.full((b,), s, jnp.int32)), **TIMING).median_s
          records.append(dict(kind="suffix", config=CONFIGS[i], s=s, block=str(blk), step_s=t))
          moved = floor.step_bytes(b, 0, s, hq, hkv, D, 2)  # s keys and values a sequence, its query and output
          print(f"  suffix [{i}] s={s} {blk}: {t * 1e6:7.1f} us "
                f"{moved / t / rates['bandwidth_bytes_per_s']:.2f} of bandwidth", flush=True)
      except Exception as e:  # noqa: BLE001
        print(f"  suffix [{i}] {blk}: {type(e).__name__}: {str(e)[:200]}", flush=True)


def main():
  global STEPS_PER_CALL
  parser = argparse.ArgumentParser()
  parser.add_argument("--parts", default="step,prefix,suffix")
  parser.add_argument("--configs", default=",".join(map(str, range(len(SEED)))))
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--shapes", default="", help="extra configs BxPxOUTxHQxHKV, comma-separated")
  parser.add_argument("--steps-per-call", type=int, default=STEPS_PER_CALL)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  STEPS_PER_CALL = args.steps_per_call
  configs = cli.seed_configs(parser, "--configs", args.configs, len(SEED)) + add_shapes(parser, args.shapes)
  parts = cli.listed(parser, "--parts", args.parts, choices=("step", "prefix", "suffix"))
  variants = cli.listed(parser, "--variants", args.variants, choices=VARIANTS)
  cli.at_least(parser, args, steps_per_call=1)
  rates = device_rates.measure(1 << 31, 8192, TIMING)
  print(f"{jax.devices()[0].device_kind}: bandwidth {rates['bandwidth_bytes_per_s'] / 1e12:.3f} TB/s, "
        f"matmul {rates['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s", flush=True)
  records = [dict(kind="rates", **rates)]
  start = time.time()
  if "step" in parts:
    sweep_steps(configs, variants, rates, records)
  if "prefix" in parts:  # the compute-heavy configs
    sweep_prefix([c for c in configs if c in (4, 8)], rates, records)
  if "suffix" in parts:
    sweep_suffix([c for c in configs if c in (0, 8) or c >= len(SEED)], rates, records)
  print(f"[sweep] done in {time.time() - start:.0f} s", flush=True)
  if args.out:
    with open(args.out, "w") as f:
      for r in records:
        f.write(json.dumps(r, default=str) + "\n")


if __name__ == "__main__":
  main()
