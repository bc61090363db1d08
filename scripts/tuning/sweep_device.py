"""Per-device tuning sweep: measures the kernels' tuning choices on this GPU and writes its data file.

  python -m scripts.tuning.sweep_device --out hydragen_jax/tuning/nvidia-h200.json   # on the GPU, 450 s budget
  python -m scripts.tuning.sweep_device --dry-run --out /tmp/tuning.json             # anywhere: the plumbing

Greedy, one choice at a time (`choices`, most important first), from the base tuning (--base FILE, else the one in
force: $HYDRAGEN_JAX_TUNING's file where set, else the device's): each candidate value is timed on the configs its choice concerns (`CONFIGS`: the benchmark's seed rows and
the 7B model's MHA decode layer that takes the Hopper kernel, whole and with its heads split over two GPUs, two more
of its e2e layers, and GQA shapes of other T·g and prefix lengths), as the benchmark times a step (a whole decode
step, 16 chained in one call, at s = 1, out/2, out; Simpson mean), and the candidate with the best speed-up over the
tuning so far (geometric mean over the configs whose step it changes) takes its place if at least --min-gain faster;
the next choice starts from the result. A step whose kernels a candidate does not change (same tiles, splits,
launch) is timed once. Every output is checked against the first step timed on its config: a candidate whose output
differs, or that fails to compile, is refused. The budget (--budget-s) stops the choices early (the rest keep the
base's values; the file says which were measured: run again with --base and --fields for those) and a final pass
times the picked tuning against the base on every config with the kernel the API would take ("pallas"). Interactions
between choices are seen only through the greedy order and that final pass. The file is written after every choice
and the log (--log) after every step, so a sweep stopped from outside keeps what it measured; each step is printed
before it starts, so one that hangs is named, and a step not back after --step-timeout-s ends the sweep (a kernel
that never returns cannot be stopped from Python): the log names it, the file keeps the choices made, the exit
status is 3.

--dry-run builds and traces (jax.eval_shape) every step the sweep would time, on the same configs, but runs and
times nothing (no memory, any machine): its times are stand-ins derived from each step's signature, so that the
picking and the file writing run, and it counts the steps a real sweep times; not a measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import sys
import threading
import time
import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from experiments import floor, records, timing
from hydragen_jax import dispatch, merge_states
from hydragen_jax import tuning as tuning_lib
from hydragen_jax.kernels import hopper, merge, ops
from hydragen_jax.tuning import HopperTuning, Tile, Tuning
from scripts.tuning import field_sweep, probe_hopper, sweep_kernels
from scripts.quick_bench import D, SEED, prefix_plan, run_plans, suffix_plan

STEPS, TIMING = probe_hopper.STEPS, probe_hopper.TIMING
# The configs (B, P, out, Hq, Hkv): the benchmark's seed rows, and the 7B model's decode layer at P = 16K, B = 512
# (e2e part 3: MHA, T·g = 1, a prefix product above the Hopper threshold), the kernel's other kind of shape, whole
# (128 prefix items: about one per SM) and with its heads split over two GPUs (TP = 2: 64 items, half the SMs).
MHA_LAYER, MHA_LAYER_TP2 = (512, 16384, 128, 32, 32), (512, 16384, 128, 16, 16)
# Two more of the e2e grid's 7B layers, below today's thresholds (prefix work 2M at 4K / 512, 1M at 16K / 64 with 32
# items, fill 0.24): the threshold choice times them on both kernels, so whether the Hopper kernel pays there is
# measured, not extrapolated from the seed rows (whose long suffixes favour Triton).
E2E_LAYERS = ((512, 4096, 128, 32, 32), (64, 16384, 128, 32, 32))
# GQA (T·g = 4) with a long prefix: its product decides at every suffix length (`hopper_long`'s rows 4-8), at
# B = 512 (64 prefix items) and at B = 128 (16 items: the kernel pays only with its keys split,
# `hopper_split_min_rows`).
GQA_LONG = ((512, 16384, 256, 32, 8), (128, 16384, 256, 32, 8))
# T·g = 2 and MHA with as few items and the same prefix product (2^22, `hopper_min_work` on the H200): where
# `hopper_split_min_rows` 1 or 2 would move them to the Hopper kernel with split keys
FEW_ITEMS = ((128, 16384, 256, 16, 8), (128, 32768, 128, 32, 32))
# A wide query window (T·g = 16: GQA 32/2) whose items fill the SMs: `hopper_max_rows` (the Hopper kernel lost to
# Triton there on the H200, 1.4x)
WIDE = ((256, 16384, 256, 32, 2),)
# T·g = 2 (GQA 16/8) and T·g = 8 (64/8), the other few-row windows, a short prefix and a long one each: the Hopper
# settings of rows 2-3 and 5-8 (`hopper` and `hopper_long`), which the T·g = 4 rows do not decide (session 51, on an
# H100: T·g = 8 below 8K keys ran faster on its own setting than on T·g = 4's, 0.70 against 0.67 of the floor)
GQA2 = ((1024, 4096, 512, 16, 8), (512, 16384, 256, 16, 8))
GQA8 = ((256, 4096, 512, 64, 8), (128, 16384, 256, 64, 8))
CONFIGS = tuple(SEED) + (MHA_LAYER, MHA_LAYER_TP2) + E2E_LAYERS + GQA_LONG + FEW_ITEMS + WIDE + GQA2 + GQA8
_GQA = tuple(i for i, (_, _, _, hq, hkv) in enumerate(SEED) if hq != hkv)
_AT = {c: i for i, c in enumerate(CONFIGS)}
# Configs (indices into CONFIGS) a choice is timed on: the GQA rows (compute-bound prefix: the interleaved launch),
# every config (also for the thresholds between the Hopper kernel and Triton: any shape may cross them, the MHA seed
# rows too, now that T·g = 1 has settings of its own), the MHA decode layers, a spread for the tiles (small and
# large MHA, mid and large GQA) and the largest prefix products alone.
_MHA = tuple(i for i, (_, _, _, hq, hkv) in enumerate(CONFIGS) if hq == hkv)  # T·g = 1 (decode, MHA)
# the Hopper kernel's T·g = 1 settings by prefix length (`Tuning.hopper_long`): the long ones timed on the 16K layers,
# the short ones on the 4K layer (the 16K layer at B = 64 leaves SMs idle: Triton's), their threshold on every MHA
# config
LONG_PREFIX = MHA_LAYER[1]
GROUPS = dict(gqa=_GQA, all=tuple(range(len(CONFIGS))), mha=_MHA,
              mha_layers=(_AT[MHA_LAYER], _AT[MHA_LAYER_TP2]), mha_short=(_AT[E2E_LAYERS[0]],),
              prefix=(0, 4, 6, 8), suffix=(0, 3, 6, 8), alone=(4, 8), gqa_long=tuple(_AT[c] for c in GQA_LONG),
              split=(_AT[GQA_LONG[1]], *(_AT[c] for c in FEW_ITEMS)), wide=tuple(_AT[c] for c in WIDE),
              gqa2=(_AT[GQA2[0]],), gqa2_long=(_AT[GQA2[1]],), gqa8=(_AT[GQA8[0]],), gqa8_long=(_AT[GQA8[1]],),
              long_prefix=tuple(sorted(set(_MHA) | set(_GQA) | {_AT[c] for c in GQA_LONG})))
# Candidates: those of the H100 sweeps (scripts/tuning/sweep_kernels.py, scripts/tuning/probe_hopper.py), the H100's values
# included so that a sweep from another base can return to them.
# (HopperTuning(3, 2, 216, 80, True), an H100 candidate, is left out: on the H200 with JAX 0.11.2 its first step
# never returned, twice: 150 s and 400 s, where the others take 3 s, compile included. Its 2·216 + 80 = 512
# registers exceed the pool setmaxnreg shares, 504: `tuning.check_hopper` now refuses it.)
# 128-key prefix tiles (`prefix_keys`): 64 KB a stage at D = 128, so with q's shared buffer only 2 + 1 stages fit
# an SM (session 13: slower, the one suffix stage starves the suffix stream), with q in registers (`q_registers`)
# 2 + 2 (session 13: 2 + 2 with the pair's registers raised to 224, the suffix's cut to 64, hung on the H200: 512
# registers, over the pool).
# `cluster` 2: pairs of CTAs share each prefix tile by TMA multicast (half the prefix's L2-to-SM traffic).
# `suffix_lookahead`: the suffix ring runs on across items (short decode items wait no memory latency).
# `suffix_keys` 128: half the suffix tiles' cross-warp reductions a key (2 stages fit with q in registers).
# `suffix_trim`: a suffix's last tile copied only as far as its keys reach (in 8, 16, 32, ... keys).
# `prefix_overlap`: the pair's value product issued with its next score product (FlashAttention-3's intra-warpgroup
# pipelining).
# The H200's settings first (a sweep that runs out of budget has timed them): the trimmed copies with the settings
# of T·g = 1 and 2-8, measured in session 15; then those measured in sessions 13-14, then the rings and the
# ping-pong measured since the H100; last the overlap with the settings of T·g = 2-8 and 1 (session 17 on the H200:
# no gain at T·g = 4, 20 % slower at T·g = 1, where its second accumulator spills).
# `prefix_fill`: the prefix keys split over CTAs below that many prefix items a CTA (session 18: 0.75 with T·g = 1's
# settings, the H200's; its candidate first, so that a sweep keeps it unless another is faster).
# `suffix_pack`: the 8 / T·g sequences of a query window in one suffix item (session 19: +2-3 % on the GQA rows,
# T·g = 4, with the settings of T·g = 2-8; slower at T·g = 1 beyond one-token suffixes: 16 copies a tile).
# `suffix_box`: a packed tile whose sequences all have its keys in one TMA copy (session 28 on the H200: the 7B MHA
# layer with 128-key suffix tiles 0.772 of its floor at B = 512, P = 4K against Triton's 0.636, and the T·g = 1
# setting packed in boxes 0.553 at P = 16K against 0.530 unpacked; the GQA rows 1.005x).
# `prefix_early_keys`: the pair's key tile released after the score products, its value tile after the value
# products (session 37; measured in session 38: the GQA row 1024 / 8K +3-4 %, on in the H200's T·g = 4 setting,
# 1.4 % slower at T·g = 1): the H200's settings of T·g = 1 and of the GQA rows with it, second and third, so that a
# budget-limited sweep times them; `prefix_key_stages` = 3 (a third key slot beside two value slots, session 38;
# not yet measured) with the GQA rows' setting fourth. Fifth, the H200's setting of long prefixes at T·g = 2-8
# (session 39: 128-key prefix tiles, 64-key suffix tiles, key splits; at P = 16K-32K 1.14-2.2x the 64-key tiles).
# First of all, the long prefixes' settings of session 40 with `suffix_late_sum` (the suffix softmax's sum reduced
# once an item: with 64-key suffix tiles +1-5.5 % at P = 16K; at T·g = 1 without the ring across items and trimmed
# tiles, +3 % at 16K and +16 % at 8K), T·g = 2-8's and T·g = 1's.
# `suffix_early_keys`: warpgroup 2 refills a slot's key tile after its score product, its value tile after the value
# product (session 51, not yet timed): with the H200's settings of the GQA rows and of T·g = 1, right after them.
# `pair_suffix_cost` / `pair_prefix_cost`: the pair takes suffix items after its prefix items (session 46; session
# 49 on an H100: 2-10 % slower): with the GQA rows' setting, and with the long prefixes' 128-key prefix tiles (whose
# 64-key suffix tiles lose at s = out what the pair may take back), after the H200's own settings.
HOPPER_CONFIGS = (HopperTuning(2, 2, 208, 88, True, 128, True, 1, False, 64, prefix_fill=0.75, suffix_pack=True,
                               suffix_late_sum=True),
                  HopperTuning(2, 2, 208, 88, True, 128, True, 1, False, 64, prefix_fill=0.75, suffix_pack=True,
                               suffix_box=True, suffix_late_sum=True),
                  HopperTuning(2, 2, 208, 88, True, 64, True, 1, False, 128, prefix_fill=0.75, suffix_pack=True,
                               suffix_box=True),
                  HopperTuning(2, 2, 208, 88, True, 64, True, 1, False, 128, prefix_fill=0.75, suffix_pack=True,
                               suffix_box=True, prefix_early_keys=True),
                  HopperTuning(2, 2, 208, 88, True, 64, True, 1, False, 128, suffix_pack=True, prefix_early_keys=True),
                  HopperTuning(2, 2, 208, 88, True, 64, True, 1, False, 128, suffix_pack=True, prefix_early_keys=True,
                               suffix_early_keys=True),
                  HopperTuning(2, 2, 208, 88, True, 64, True, 1, False, 128, prefix_fill=0.75, suffix_pack=True,
                               suffix_box=True, suffix_early_keys=True),
                  HopperTuning(2, 2, 208, 88, True, 64, True, 1, False, 128, suffix_pack=True, prefix_early_keys=True,
                               pair_suffix_cost=1.0, pair_prefix_cost=0.75),
                  HopperTuning(2, 2, 208, 88, True, 128, True, 1, False, 64, prefix_fill=0.75, suffix_pack=True,
                               suffix_late_sum=True, pair_suffix_cost=1.0, pair_prefix_cost=0.6),
                  HopperTuning(2, 2, 208, 88, True, 64, True, 1, False, 128, suffix_pack=True, prefix_early_keys=True,
                               prefix_key_stages=3),
                  HopperTuning(2, 2, 208, 88, True, 128, True, 1, False, 64, prefix_fill=0.75, suffix_pack=True),
                  HopperTuning(2, 2, 208, 88, True, 128, True, 1, True, 64, True, prefix_fill=0.75, suffix_pack=True,
                               suffix_box=True),
                  HopperTuning(2, 2, 208, 88, True, 64, True, 1, False, 128, suffix_pack=True, suffix_box=True),
                  HopperTuning(2, 2, 208, 88, True, 128, True, 1, True, 64, True, prefix_fill=0.75),
                  HopperTuning(2, 2, 208, 88, True, 64, True, 1, False, 128, suffix_pack=True),
                  HopperTuning(2, 2, 208, 88, True, 128, True, 1, True, 64, True),
                  HopperTuning(2, 2, 208, 88, True, 64, True, 1, False, 128, True),
                  HopperTuning(2, 3, 208, 88, True, 64, False, 1, True),
                  HopperTuning(2, 2, 208, 88, True, 64, True, 1, True, 128),
                  HopperTuning(2, 2, 208, 88, True, 64, True, 1, False, 128),
                  HopperTuning(2, 2, 208, 88, True, 128, True, 1, True),
                  HopperTuning(2, 3, 208, 88, True, 64, True), HopperTuning(2, 2, 208, 88, True, 128, True),
                  HopperTuning(2, 3, 208, 88, True, 64, False, 2), HopperTuning(2, 2, 208, 88, True, 128, True, 2),
                  HopperTuning(3, 2, 208, 88, True), HopperTuning(3, 2, 208, 88, False),
                  HopperTuning(2, 3, 208, 88, True), HopperTuning(2, 2, 208, 88, True),
                  HopperTuning(2, 2, 208, 88, True, 64, True, 1, False, 128, False, True),
                  HopperTuning(2, 2, 208, 88, True, 128, True, 1, True, 64, True, True))
SUFFIX_TILES = (Tile(64, 4, 3), Tile(64, 4, 2), Tile(64, 4, 4), Tile(128, 4, 2), Tile(32, 4, 3))
PREFIX_TILES = (Tile(64, 4, 3), Tile(64, 4, 4), Tile(32, 4, 4), Tile(64, 4, 2), Tile(128, 4, 2), Tile(64, 8, 3))
ALONE_TILES = (Tile(128, 8, 3), Tile(128, 8, 2), Tile(64, 8, 3), Tile(64, 8, 4))
KEY_SPLITS = ((2048, 1024), (2048, 2048), (4096, 1024), (4096, 2048), (4096, 4096), (8192, 2048), (8192, 4096),
              (8192, 8192))  # (max_keys_per_program, balanced_keys)


@dataclasses.dataclass(frozen=True)
class Choice:
  """One tuning choice: the field it sets (`read` / `apply`), the kernel it is timed on ("triton": the Triton step;
  "hopper": the Hopper kernel's step; "pallas": the kernel the API takes; "alone": the prefix level alone in its
  launch), the group of configs it is timed on, and its candidate values."""

  field: str
  kernel: str
  group: str
  candidates: tuple
  read: Callable[[Tuning], Any]
  apply: Callable[[Tuning, Any], Tuning]


def field_choice(name: str, kernel: str, group: str, candidates) -> Choice:
  return Choice(name, kernel, group, tuple(candidates), lambda t: getattr(t, name),
                lambda t, v: dataclasses.replace(t, **{name: v}))


def fields_choice(names: tuple[str, ...], kernel: str, group: str, candidates) -> Choice:
  """A choice of several fields together (values: tuples), for those that act together."""
  return Choice("+".join(names), kernel, group, tuple(candidates), lambda t: tuple(getattr(t, n) for n in names),
                lambda t, v: dataclasses.replace(t, **dict(zip(names, v))))


def tile_choice(rows: int, kernel: str, group: str, candidates) -> Choice:
  def apply(t: Tuning, tile: Tile) -> Tuning:
    return dataclasses.replace(t, tiles=tuple((r, tile if r == rows else old) for r, old in t.tiles))
  return Choice(f"tiles[{rows}]", kernel, group, tuple(candidates), lambda t: t.tile(rows), apply)


def hopper_choice(first: int, last: int, group: str, candidates, long_from: int = 0) -> Choice:
  """The Hopper kernel's settings for T·g = first..last query rows a sequence and KV head (`Tuning.hopper`), timed
  on `group`'s configs (whose T·g must lie in that range). The base is the entry of `first`; a pick becomes one entry
  for the whole range (`Tuning.with_hopper`), replacing any entries inside it. long_from: the settings of prefixes
  from that many keys (`Tuning.hopper_long`, the group's configs having such prefixes): a tuning without them starts
  them as a copy of `hopper`'s, and `hopper_long_prefix` drops to long_from where it is 0 or larger (the
  `hopper_long_prefix` choice then sets it on the MHA and GQA configs)."""
  rows = f"[{first}-{last}]" if last > first else f"[{first}]"
  if not long_from:
    return Choice(f"hopper{rows}", "hopper", group, tuple(candidates), lambda t: t.hopper_for(first),
                  lambda t, v: t.with_hopper(first, last, v))

  def apply(t: Tuning, v: HopperTuning) -> Tuning:
    alone = dataclasses.replace(t, hopper=t.hopper_long or t.hopper, hopper_long=(), hopper_long_prefix=0)
    entries = alone.with_hopper(first, last, v).hopper
    prefix = min(t.hopper_long_prefix, long_from) if t.hopper_long_prefix else long_from
    return dataclasses.replace(t, hopper_long=entries, hopper_long_prefix=prefix)
  return Choice(f"hopper_long{rows}", "hopper", group, tuple(candidates),
                lambda t: t.hopper_for(first, long_from), apply)


def long_prefix_choice(group: str, candidates) -> Choice:
  """`hopper_long_prefix`, timed with the kernel the API takes: 0 drops the long settings (`hopper` for every
  prefix)."""
  return Choice("hopper_long_prefix", "pallas", group, tuple(candidates), lambda t: t.hopper_long_prefix,
                lambda t, v: dataclasses.replace(t, hopper_long_prefix=v, hopper_long=t.hopper_long if v else ()))


# the fields that decide between the Hopper kernel and Triton on the configs, swept together (hopper_min_seq_work,
# the rule for a long prefix a sequence, is a choice of its own after them)
THRESHOLDS = ("hopper_min_work", "hopper_min_fill")


def choices(configs, groups) -> list[Choice]:
  """The choices, most important first (the time budget may stop the sweep before the last). Thresholds take the
  configs' own sizes as candidates, and twice the largest (none of them); the Hopper kernel's two, every pair of
  those (of equally fast pairs, the last: the larger thresholds)."""
  every = [configs[i] for i in groups["all"]]
  works = sorted({dispatch.prefix_work((b, 1, hq), hkv, p) for b, p, _, hq, hkv in every})
  seq_works = sorted({dispatch.prefix_work((1, 1, hq), hkv, p) for _, p, _, hq, hkv in every})
  # fill thresholds: below every config's fill, between each two, above all (the configs' fills on this device)
  fills = sorted({round(dispatch.prefix_fill((b, 1, hq), hkv, ops.num_cores()), 3) for b, _, _, hq, hkv in every})
  fill_cuts = [0.0] + [round((a + b) / 2, 3) for a, b in zip(fills, fills[1:])] + [2 * fills[-1]]
  rows = sorted({b * hq // hkv for b, _, _, hq, hkv in every})
  return [
      # GQA's few-row suffix items (the seed rows: T·g = 4, for rows 4-8 until the choices of rows 5-8 below)
      hopper_choice(4, 8, "gqa", HOPPER_CONFIGS),
      # MHA decode: one-row items; a long prefix's settings and a short one's apart, then where one ends
      hopper_choice(1, 1, "mha_layers", HOPPER_CONFIGS, long_from=LONG_PREFIX),
      hopper_choice(1, 1, "mha_short", HOPPER_CONFIGS),
      # GQA's long prefixes (timed from the MHA layers' 16K)
      hopper_choice(4, 8, "gqa_long", HOPPER_CONFIGS, long_from=LONG_PREFIX),
      # where the long settings start, one threshold for all rows: timed on the MHA and GQA configs (0, their
      # prefixes, and 8192: the GQA row 1024 / 8K and the long document's 8K layer gained from 8K in session 40)
      long_prefix_choice("long_prefix", [0] + sorted({configs[i][1] for i in groups["long_prefix"]} | {8192})),
      # One choice for both thresholds: a shape takes the Hopper kernel only where both allow it, so a config below
      # both (B = 64 MHA: fill 0.24 and a small prefix product) moves only if both drop together.
      fields_choice(THRESHOLDS, "pallas", "all", [(w, f) for w in works + [2 * works[-1]] for f in fill_cuts]),
      # a prefix product below hopper_min_work still takes the kernel where one sequence's share (T·g rows × prefix
      # keys) reaches this (and the items fill hopper_min_fill): 0 (off) or the configs' own shares
      field_choice("hopper_min_seq_work", "pallas", "all", [0] + seq_works),
      # ... and up to what suffix capacity that share takes it (0: any; the configs' own capacities)
      field_choice("hopper_seq_max_suffix", "pallas", "all", [0] + sorted({out for _, _, out, _, _ in every})),
      # from how many T·g rows the fill counts the setting's key splits (0: never): shapes of T·g 4, 2 and 1 whose
      # items fill the SMs only with their keys split
      field_choice("hopper_split_min_rows", "pallas", "split", (0, 1, 2, 4, 8)),
      # up to how many T·g rows the kernel runs at all (0: any): a wide window (T·g 16) that the rules above send
      # to it
      field_choice("hopper_max_rows", "pallas", "wide", (0, 8, 16)),
      # the other few-row windows: T·g = 2-3 and 5-8, each on a config of its own T·g, short prefix and long
      hopper_choice(2, 3, "gqa2", HOPPER_CONFIGS),
      hopper_choice(5, 8, "gqa8", HOPPER_CONFIGS),
      hopper_choice(2, 3, "gqa2_long", HOPPER_CONFIGS, long_from=LONG_PREFIX),
      hopper_choice(5, 8, "gqa8_long", HOPPER_CONFIGS, long_from=LONG_PREFIX),
      field_choice("interleave_lead", "triton", "gqa", (0.5, 0.75, 0.9, 1.0)),
      tile_choice(16, "triton", "suffix", SUFFIX_TILES),
      fields_choice(("max_keys_per_program", "balanced_keys"), "triton", "all", KEY_SPLITS),
      field_choice("balanced_programs_per_core", "triton", "all", (2, 3, 4, 8)),
      # a level split only until its programs fill this fraction of the SMs, where a program then streams at most
      # this many keys over its packed heads (1.0: a program per SM); 0.96 leaves a level of 128 programs unsplit
      fields_choice(("split_min_fill", "split_fill_max_keys"), "triton", "all",
                    [(1.0, 2048), (0.96, 2048), (0.96, 4096), (0.96, 8192)]),
      tile_choice(64, "triton", "prefix", PREFIX_TILES),
      field_choice("interleave_rows", "triton", "all", rows + [2 * rows[-1]]),
      field_choice("max_rows_shared", "triton", "gqa", (64, 128)),
      tile_choice(128, "alone", "alone", ALONE_TILES),
      field_choice("max_rows_alone", "alone", "alone", (64, 128)),
      # the merge kernel up to this many query rows (B·T·Hq): 0 (off) or the configs' own row counts
      field_choice("merge_max_rows", "pallas", "all", [0] + sorted({b * hq for b, _, _, hq, _ in every})),
      # the Triton launch merges its own parts up to this many query rows (0: off; above: `merge_max_rows` decides)
      field_choice("launch_merge_max_rows", "pallas", "all", [0] + sorted({b * hq for b, _, _, hq, _ in every})),
  ]


def jsonable(value):
  return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def seconds_record(times) -> list:
  """Step times for a record: None where not timed, "failed" where the step failed or was wrong."""
  return [t if t is None or math.isfinite(t) else "failed" for t in times]


def speedup(base_s: list[float], cand_s: list[float]) -> float:
  """Geometric mean of base / candidate time over configs; 0 where the candidate failed (inf)."""
  if any(math.isinf(t) for t in cand_s):
    return 0.0
  return math.exp(sum(math.log(b / t) for b, t in zip(base_s, cand_s)) / len(base_s))


def stand_in_time(signature) -> float:
  """Dry run: a deterministic time of a step signature (0.1–0.12 ms), no measurement."""
  return 1e-4 * (1 + zlib.crc32(repr(signature).encode()) % 200 / 1000)


class Sweep:
  """Times steps of the configs under tunings; a step is timed once per signature (kernel, tiles, launch)."""

  def __init__(self, configs, *, dry_run: bool, deadline: float, log=None, step_timeout_s: float = math.inf,
               on_hang: Callable[[], None] | None = None):
    self.configs, self.dry_run, self.deadline, self.log = configs, dry_run, deadline, log
    # A step that has not returned after step_timeout_s (a kernel that never ends cannot be stopped from Python):
    # the log says which, then on_hang() runs on the watchdog's thread (main's: save the file, end the process).
    self.step_timeout_s, self.on_hang = step_timeout_s, on_hang
    # The watchdog and a step that returns as it fires: whichever takes the lock first decides. The watchdog holds it
    # until on_hang has ended the process, so a step that comes back meanwhile waits: one writer of the file.
    self._lock, self._step_done = threading.Lock(), False
    self.seconds: dict[tuple, float] = {}  # signature -> Simpson mean step time (inf: failed)
    self._inputs: dict[int, tuple] = {}
    self._reference: dict[tuple, list] = {}  # (config, alone) -> the first outputs timed
    self.timed = 0

  def structs(self, i: int) -> tuple:
    b, p, out, hq, hkv = self.configs[i]
    s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    return s(b, 1, hq, D), s(1, p, hkv, D), s(1, p, hkv, D), s(b, out, hkv, D), s(b, out, hkv, D)

  def signature(self, i: int, tune: Tuning, kernel: str) -> tuple | None:
    """What the step of config i under `tune` runs (equal signatures: the same compiled step); None where the
    kernel does not apply (the Hopper kernel on a shape it does not take). The last item of a Triton step's: how its
    parts are merged, as the API merges them: "launch" (in the launch, up to `launch_merge_max_rows` query rows),
    "pallas" (the merge kernel: `merge.applies` under `merge_max_rows`) or "xla" (`merge_states`); the Hopper
    kernel's parts are merged by `merge_states` whatever the tuning."""
    b, p, _, hq, hkv = cfg = self.configs[i]
    q, pk, pv, sk, sv = self.structs(i)
    if kernel == "alone":
      return ("alone", i, ops.choose_block(b * hq // hkv, b * hq // hkv, 1, hkv, p, D, shared_launch=False,
                                           tuning=tune))
    if kernel in ("hopper", "pallas"):
      settings = tune.hopper_for(hopper.query_rows(q.shape, hkv), p)
      fits = hopper.supported(q, jax.ShapeDtypeStruct(pk.shape[1:], pk.dtype), sk, hopper.config_of(settings)) is None
      # "pallas" as the API runs it: the Hopper kernel only on a Hopper GPU (a dry run traces it anywhere)
      on_hopper = self.dry_run or dispatch.on_hopper()
      if kernel == "hopper" or (fits and on_hopper and dispatch.pays_on_hopper(q.shape, hkv, p, tune,
                                                                                   suffix_capacity=sk.shape[1])):
        return ("hopper", i, settings) if fits else None
    pb, sb = sweep_kernels.launch_blocks(cfg, {}, tune)
    specs = [prefix_plan(q, pk, pv, block=pb)[0], suffix_plan(q, sk, sv, np.ones((b,), np.int32), block=sb)[0]]
    launch = ops.auto_launch([spec.max_rows for spec in specs], tune)
    return ("triton", i, pb, sb, launch, tune.interleave_lead if launch == "interleaved" else None,
            merge.method(b * hq, D, tune))

  def step(self, signature: tuple, tune: Tuning) -> Callable:
    kind, i = signature[:2]
    if kind == "hopper":  # the signature holds the settings of the config's T·g
      return probe_hopper.step(hopper.config_of(signature[2]))
    if kind == "alone":
      block = signature[2]

      def alone(q, pk, pv, sk, sv, lengths):
        out, _ = merge_states(run_plans(q, [prefix_plan(q, pk, pv, block=block)], launch="fused", tuning=tune))
        return out.astype(q.dtype)
      return alone
    return sweep_kernels.step_fn(self.configs[i], dict(launch=signature[4], merge=signature[-1]),
                                 tune)[0]

  def time(self, i: int, tune: Tuning, kernel: str) -> float | None:
    """Simpson mean step time of config i under `tune` (inf: the kernel does not apply, fails, or is wrong);
    None once the deadline has passed."""
    signature = self.signature(i, tune, kernel)
    if signature is None:
      return math.inf
    if signature in self.seconds:
      return self.seconds[signature]
    if time.time() > self.deadline:
      return None
    print(f"  [{i}] {signature[0]} ...", end="", flush=True)  # a step that hangs shows which one it is
    start, error, err = time.time(), None, None
    watchdog = threading.Timer(self.step_timeout_s, self._hung, (i, signature, start))
    watchdog.daemon = True
    self._step_done = False
    if math.isfinite(self.step_timeout_s):
      watchdog.start()
    try:
      steps, err = self._measure(i, self.step(signature, tune), signature)
      seconds = floor.simpson(*steps) if len(steps) == 3 else steps[0]
    except Exception as e:  # noqa: BLE001 - a candidate that does not compile or run is refused, the sweep goes on
      steps, seconds, error = None, math.inf, f"{type(e).__name__}: {str(e)[:300]}"
    finally:
      watchdog.cancel()
      with self._lock:  # waits for a watchdog already under way
        self._step_done = True
    self.seconds[signature] = seconds
    self.timed += 1
    line = dict(config=self.configs[i], signature=repr(signature), steps_s=steps, seconds=seconds_record([seconds])[0],
                max_err=err, error=error, wall_s=round(time.time() - start, 2))
    print(f" {seconds * 1e6:.1f} us ({line['wall_s']:.0f} s)" + (f" ({error})" if error else "")
          + f"  {signature[2:]}", flush=True)
    self._write_log(line)
    return seconds

  def _write_log(self, line: dict) -> None:
    if self.log:
      self.log.write(json.dumps(line, default=str) + "\n")
      self.log.flush()  # a sweep killed from outside keeps what it timed

  def _hung(self, i: int, signature: tuple, start: float) -> None:
    with self._lock:
      if self._step_done:  # the step came back as the timer fired
        return
      try:
        error = f"hung: no result after {self.step_timeout_s:g} s"
        print(f" {error}  {signature[2:]}", flush=True)
        self._write_log(dict(config=self.configs[i], signature=repr(signature), steps_s=None, seconds="failed",
                             max_err=None, error=error, wall_s=round(time.time() - start, 2)))
      except Exception as e:  # noqa: BLE001 - the sweep must end all the same
        print(f"  (the watchdog could not log the hang: {type(e).__name__}: {e})", flush=True)
      if self.on_hang:  # main's ends the process
        self.on_hang()

  def _measure(self, i: int, fn: Callable, signature: tuple) -> tuple[list[float], float | None]:
    """Step times at s = 1, out/2, out (alone: s = 1, the suffix is not read), chained over the config's
    `sweep_kernels.l2_copies` copies of the KV, and the max error of the outputs against the first step timed on
    this config."""
    b, _, out, _, _ = self.configs[i]
    alone = signature[0] == "alone"
    points = (1,) if alone else floor.simpson_points(out)
    copies = sweep_kernels.l2_copies(self.configs[i], STEPS)  # as the benchmark: its KV at s = 1 not L2-warm
    chained = timing.chain_steps(fn, STEPS, copies)

    if self.dry_run:
      structs = self.structs(i)
      args = sweep_kernels.chain_args(structs[0], [structs[1:]] * copies, jax.ShapeDtypeStruct((b,), jnp.int32))
      assert jax.eval_shape(chained, *args).shape == structs[0].shape
      return [stand_in_time((signature, s)) for s in points], None
    if i not in self._inputs:
      self._inputs[i] = sweep_kernels.kv_copies(sweep_kernels.config_inputs(self.configs[i], i), copies)
    q, kv = self._inputs[i]
    lengths = lambda s: jnp.full((b,), s, jnp.int32)  # noqa: E731
    compiled, _ = timing.compile_aot(chained, sweep_kernels.chain_args(q, kv, lengths(1)))
    steps, outs = [], []
    for s in points:
      tm = timing.time_compiled(compiled, sweep_kernels.chain_args(q, kv, lengths(s)), **TIMING)
      steps.append(tm.median_s / STEPS)
      outs.append(np.asarray(tm.output, np.float32))
    want = self._reference.setdefault((i, alone), outs)
    err = max(float(np.max(np.abs(o - w))) for o, w in zip(outs, want))
    scale = max(float(np.max(np.abs(w))) for w in want)
    if not err <= 2e-3 + 0.02 * scale:  # bf16 rounding is ~1e-4 here; a wrong tile is off by 1e-2 and more
      raise ValueError(f"output differs from the first step timed on this config by {err:.2e} (outputs up to "
                       f"{scale:.2e})")
    return steps, err


def run_choice(sweep: Sweep, choice: Choice, tune: Tuning, configs: tuple[int, ...], min_gain: float):
  """One choice from `tune`: (the tuning with its pick, the record of what was timed). A candidate's speed-up is
  over the configs whose step it changes (the others run the same kernels)."""
  current = choice.read(tune)
  base = {i: sweep.time(i, tune, choice.kernel) for i in configs}
  record = dict(field=choice.field, kernel=choice.kernel, configs=[sweep.configs[i] for i in configs],
                base=jsonable(current), base_s=seconds_record(base.values()), candidates=[], untimed=0)
  if None in base.values():
    record["status"] = "not measured: time budget"
    return tune, record
  # a base step that fails: a candidate that runs every config wins, the fastest over the others' steps
  broken = {i for i in configs if math.isinf(base[i])}
  best, best_gain = None, (0.0 if broken else 1.0 + min_gain)
  for value in choice.candidates:
    if value == current:
      continue
    try:
      candidate = choice.apply(tune, value)
    except ValueError as e:
      record["candidates"].append(dict(value=jsonable(value), invalid=str(e)))
      continue
    changed = [i for i in configs if sweep.signature(i, candidate, choice.kernel)
               != sweep.signature(i, tune, choice.kernel)]
    times = [sweep.time(i, candidate, choice.kernel) for i in changed]
    entry = dict(value=jsonable(value), changed=[sweep.configs[i] for i in changed])
    record["candidates"].append(entry)
    if not changed:
      entry["status"] = "the same steps as the base"
    elif None in times:
      record["untimed"] += 1
      entry["status"] = "not timed (time budget)"
    elif broken and not (broken <= set(changed) and all(math.isfinite(t) for t in times)):
      entry |= dict(seconds=seconds_record(times), status="leaves a config the base fails on failing")
    else:
      others = [(base[i], t) for i, t in zip(changed, times) if i not in broken]
      gain = speedup(*zip(*others)) if others else 1.0
      entry |= dict(seconds=seconds_record(times), speedup=round(gain, 4))
      if gain >= best_gain:
        best, best_gain = value, gain
  record["picked"] = jsonable(current if best is None else best)
  if broken:  # the base's value cannot stay: picked, or the choice is not measured
    record["base_fails_on"] = [sweep.configs[i] for i in sorted(broken)]
    record["status"] = "picked" if best is not None else "not measured: the base step fails, and every candidate too"
  else:
    record["status"] = "kept" if best is None else "picked"
  return (tune if best is None else choice.apply(tune, best)), record


def field_notes(recs: list[dict], min_gain: float, base_notes: dict | None = None) -> dict:
  """What decided each field, for the file's provenance: this sweep's records, and for the fields it did not
  measure, the base file's notes (`base_notes`: where the base is this device's own file; else none). A joint
  field's note ("a+b") takes in the notes its fields had when swept apart."""
  notes = dict(base_notes or {})
  for r in recs:
    timed = [c for c in r["candidates"] if "speedup" in c]
    best = max(timed, key=lambda c: c["speedup"], default=None)
    if r["status"].startswith("not measured"):
      text = f"{r['status']}: kept from the base" + (f" ({notes[r['field']]})" if r["field"] in notes else "")
    elif r["status"] == "picked" and r.get("base_fails_on"):
      text = (f"measured: {json.dumps(r['base'])} fails on {r['base_fails_on']}; {json.dumps(r['picked'])} runs every "
              f"config, the fastest candidate that does")
    elif r["status"] == "picked":
      text = (f"measured: {json.dumps(r['picked'])} is {best['speedup']:.3f}x the speed of {json.dumps(r['base'])} "
              f"({r['kernel']} steps of {best['changed']})")
    else:
      text = (f"measured: {json.dumps(r['base'])} kept, no candidate {1 + min_gain:.2f}x as fast"
              + (f" (best {json.dumps(best['value'])}: {best['speedup']:.3f}x)" if best else ""))
    notes[r["field"]] = text + (f"; {r['untimed']} candidates not timed (time budget)" if r.get("untimed") else "")
    parts = r["field"].split("+")
    for part in parts if len(parts) > 1 else ():  # fields once swept apart: their notes join the joint one's
      if part in notes:
        notes[r["field"]] += f". Before, {part} alone: {notes.pop(part)}"
  return notes


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default=None, help="data file to write (default: hydragen_jax/tuning/<device>.json)")
  parser.add_argument("--base", default=None, help="tuning file to start from (default: the one in force, "
                      "$HYDRAGEN_JAX_TUNING's where set, else the device's)")
  parser.add_argument("--budget-s", type=float, default=450.0, help="wall time of the sweep, final check included")
  parser.add_argument("--final-s", type=float, default=60.0, help="of which reserved for the final check")
  parser.add_argument("--min-gain", type=float, default=0.02, help="a candidate must be this much faster")
  parser.add_argument("--fields", default=None, help="comma-separated fields to sweep (default: all; \"hopper\": every "
                                                     "hopper[rows] and hopper_long[rows] choice, \"tiles\": every "
                                                     "tile)")
  parser.add_argument("--commit", default=None,
                      help="commit of the code (default: $HYDRAGEN_JAX_COMMIT, else git rev-parse HEAD)")
  parser.add_argument("--log", default=None, help="JSON-lines file of every timed step")
  parser.add_argument("--step-timeout-s", type=float, default=120.0,
                      help="a step not back after this long ends the sweep (file and log written, exit status 3)")
  parser.add_argument("--dry-run", action="store_true", help="steps traced, not run; stand-in times")
  args = parser.parse_args(argv)
  for name in ("budget_s", "step_timeout_s"):
    if not getattr(args, name) > 0:
      parser.error(f"--{name.replace('_', '-')} must be > 0; got {getattr(args, name)}")
  if not 0 <= args.final_s < args.budget_s:
    parser.error(f"--final-s must be >= 0 and below --budget-s ({args.budget_s:g}: the choices get the rest); got "
                 f"{args.final_s}")
  if not args.min_gain >= 0:
    parser.error(f"--min-gain must be >= 0 (a candidate must be at least as fast); got {args.min_gain}")
  # the device's own file is written only by a measurement: a dry run, or a run off a GPU, names its --out
  field_sweep.check_out(parser, args, "--dry-run" if args.dry_run else field_sweep.off_gpu())
  start = time.time()
  kind = tuning_lib.device_kind()
  base_file = field_sweep.base_file(args.base, kind)
  configs, groups = CONFIGS, GROUPS
  todo = choices(configs, groups)
  every_field = {c.field for c in todo}  # (before --fields: a sweep of all of them measures the whole file)
  if args.fields:
    wanted = args.fields.split(",")
    # "hopper": every hopper[...] and hopper_long[...]; a field of a joint choice picks it ("hopper_min_fill":
    # hopper_min_work+...)
    picks = lambda name, field: (field == name or field.startswith(name + "[") or name in field.split("+")
                                 or (name == "hopper" and field.startswith("hopper_long[")))
    if unknown := sorted(w for w in wanted if not any(picks(w, c.field) for c in todo)):
      parser.error(f"--fields: unknown {unknown}; known: {[c.field for c in todo]} (a name before '[' picks all)")
    todo = [c for c in todo if any(picks(w, c.field) for w in wanted)]
  print(f"{kind}: sweeping {[c.field for c in todo]} from {base_file.device_kind}'s tuning "
        f"({'dry run' if args.dry_run else f'budget {args.budget_s:.0f} s'})", flush=True)
  out = args.out or str(tuning_lib.data_file(kind))
  fixed = dict(  # the provenance that does not change while the sweep runs
      measured_on=None if args.dry_run else kind,
      command="python -m scripts.tuning.sweep_device " + " ".join(sys.argv[1:] if argv is None else argv),
      commit=args.commit or records.git_commit(), jax_version=jax.__version__,
      base={k: base_file.provenance.get(k) for k in ("measured_on", "date", "commit")}
      | dict(device_kind=base_file.device_kind, file=args.base or os.environ.get(tuning_lib.TUNING_ENV)))

  # the notes and choice records of the fields this sweep leaves alone (e.g. the note of sweep_gemm.py's field, the
  # records of a full sweep before a partial one), where the base is this device's
  own_base = tuning_lib.slug(base_file.device_kind) == tuning_lib.slug(kind)  # as `file_for` matches them
  base_measured = own_base and tuning_lib.slug(str(base_file.provenance.get("measured_on"))) == tuning_lib.slug(kind)
  base_notes = base_file.provenance.get("fields", {}) if own_base else {}
  base_choices = base_file.provenance.get("choices", []) if own_base else []

  def save(tune: Tuning, recs: list[dict], final: dict) -> None:
    """The data file of the sweep so far: the picked tuning and its provenance."""
    measured = [r["field"] for r in recs if not r["status"].startswith("not measured")]
    # nothing timed (the budget, a dry run) on a base that is not this device's measured file: the file says so
    timed = bool(measured) and sweep.timed > 0
    # on another device's base, only a sweep of every choice measures this device's file (as with_measured_field)
    whole = own_base or every_field <= set(measured)
    measured_on = fixed["measured_on"] if (timed and whole) or base_measured else None
    note = (("DRY RUN: nothing was run or timed (stand-in times); not a measurement. " if args.dry_run else "")
            + ("" if whole or not timed else f"NOT MEASURED on {kind} except {measured}: the other fields are "
                                                f"{base_file.device_kind}'s (run every choice on this device). ")
            + f"Swept {measured} in {time.time() - start:.0f} s; the other fields are the base's. Greedy, one choice "
            f"at a time, a candidate kept if >= {args.min_gain:.0%} faster (geometric mean over the configs it "
            "changes), each step checked against the first timed on its config (scripts/tuning/sweep_device.py).")
    provenance = dict(fixed, measured_on=measured_on,
                      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      note=note, fields=field_notes(recs, args.min_gain, base_notes), final_check=final,
                      choices=[c for c in base_choices if c.get("field") not in {r["field"] for r in recs}] + recs,
                      steps_timed=sweep.timed)
    tuning_lib.write(out, tuning_lib.TuningFile(kind, tune, provenance))

  def hung() -> None:
    """A step never returned (the watchdog's thread): keep the choices made so far, end the process (the GPU
    may be stuck in the kernel; no Python can stop it), even if the file cannot be written."""
    try:
      where = "the final check" if current == "final check" else f"the choice {current}"
      save(tune, recs, dict(status=f"not run: the sweep stopped in {where}, whose step did not return within "
                                   f"{args.step_timeout_s:g} s (see the log)"))
    finally:
      _abort(3)  # the log is flushed line by line

  log = open(args.log, "w") if args.log else None  # noqa: SIM115 - closed in the finally below
  try:
    sweep = Sweep(configs, dry_run=args.dry_run, deadline=start + args.budget_s - args.final_s, log=log,
                  step_timeout_s=args.step_timeout_s, on_hang=hung)
    tune, recs, current = base_file.tuning, [], None
    for choice in todo:
      current = choice.field
      print(f"{choice.field} ({choice.kernel}, configs {groups[choice.group]}):", flush=True)
      tune, record = run_choice(sweep, choice, tune, groups[choice.group], args.min_gain)
      recs.append(record)
      print(f"  -> {record['status']}: {record.get('picked', record['base'])}", flush=True)
      # the file after every choice: a sweep stopped from outside (a call's time limit) keeps the choices it made
      save(tune, recs, dict(status=f"not run: written after the choice {choice.field}; the final check follows "
                                   "the last choice"))
    sweep.deadline, current = start + args.budget_s, "final check"
    final = dict(status="the picked tuning is the base's: nothing to compare")
    if tune != base_file.tuning:
      pairs = [(sweep.time(i, base_file.tuning, "pallas"), sweep.time(i, tune, "pallas")) for i in groups["all"]]
      done = [(i, b, t) for i, (b, t) in zip(groups["all"], pairs) if b is not None and t is not None]
      runs = [(b, t) for _, b, t in done if math.isfinite(b)]  # over the configs the base runs (where it fails,
      overall = speedup(*zip(*runs)) if runs else None      # nothing to compare: a pick may have fixed it)
      final = dict(status="timed" if len(done) == len(pairs) else "partial (time budget)",
                   speedups={str(configs[i]): _json_ratio(b / t) for i, b, t in done},
                   speedup=None if overall is None else _json_ratio(overall))
      if overall is not None and not overall >= 1.0:
        # slower than the base over the configs (a pick's gain was the noise of its own configs): not written
        final["status"] += "; slower than the base: the base's tuning kept"
        tune = base_file.tuning
        recs = [dict(r, status="not measured: picked, then reverted by the final check") if r["status"] == "picked"
                else r for r in recs]
  finally:  # a sweep stopped from outside closes its log too
    if log:
      log.close()
  save(tune, recs, final)
  print(f"wrote {out} ({time.time() - start:.0f} s, {sweep.timed} steps timed); final check: {final}", flush=True)


def _json_ratio(x: float) -> float | None:
  """A speed-up for the file: None where a step failed (an infinite or zero ratio; JSON has no Infinity)."""
  return round(x, 4) if math.isfinite(x) and x > 0 else None


def _abort(status: int) -> None:
  os._exit(status)  # noqa: SLF001 - from the watchdog's thread, past a main thread stuck on the device


if __name__ == "__main__":
  main()
