"""Per-device tuning: the kernels' measured choices, one data file per device kind, chosen at run time.

The choices (when "pallas" takes the Hopper kernel, the Triton tiles and key splits, when and how levels are
interleaved in one launch, the Hopper kernel's ring depths, ping-pong and registers) were measured on one device
and differ on another. Each `<slug>.json` next to this module holds the `Tuning` of one device kind (the default
device's `device_kind`, `hydragen_jax.devices.default_device`; slug: lower case, other characters as "-", e.g.
"NVIDIA H200" -> nvidia-h200.json) and its provenance: the command, date and commit that measured it (`python -m
scripts.tuning.sweep_device` writes one), or, in a file not yet measured on its device, saying so (`measured_on`
null).

`current()` is the tuning of the default device: its file, else the file of a known kind its name extends by whole
words (`variant_of`: "NVIDIA H200 NVL" takes the H200's), else the H100's (`FALLBACK_KIND`, the device the kernels
were first tuned on), which also serves CPU and interpreted runs; a GPU without a file of its own gets a warning. The
environment variable HYDRAGEN_JAX_TUNING=PATH (`TUNING_ENV`) takes a tuning file for whatever device runs (e.g. one a
sweep wrote for a GPU the package has no file for). `override(t)` sets the tuning inside a `with` block (sweeps,
tests); the functions that read it also take it as an argument (None: `current()`).

The tuning is read where the kernels' static choices are made, when a function is traced. An `override` is part of
jit's cache key (a JAX user context): a jitted function called inside one is traced anew for it, so a tuning A/B
in one process times both tunings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.resources
import json
import operator
import os
import pathlib
import re
import warnings
from typing import Any, Iterator

import jax

from hydragen_jax.devices import default_device

FALLBACK_KIND = "NVIDIA H100 80GB HBM3"
TUNING_ENV = "HYDRAGEN_JAX_TUNING"  # a tuning file to use whatever the device
PROVENANCE_KEYS = ("measured_on", "command", "date", "commit", "note")
MAX_STAGES = 8  # pipeline stages of a Triton launch at most (tiles, GEMM)


@dataclasses.dataclass(frozen=True)
class Tile:
  """Triton launch of one row-tile size: keys per inner step, warps, pipeline stages."""

  block_k: int
  num_warps: int
  num_stages: int


@dataclasses.dataclass(frozen=True)
class HopperTuning:
  """The Hopper kernel's measured settings (`kernels.hopper.HopperConfig` holds their meaning)."""

  prefix_stages: int
  suffix_stages: int
  pair_registers: int
  suffix_registers: int
  pingpong: bool
  prefix_keys: int = 64
  q_registers: bool = False
  cluster: int = 1
  suffix_lookahead: bool = False
  suffix_keys: int = 64
  suffix_trim: bool = False
  prefix_overlap: bool = False
  prefix_fill: float = 0.0
  suffix_pack: bool = False
  suffix_box: bool = False
  prefix_early_keys: bool = False
  prefix_key_stages: int = 0
  suffix_late_sum: bool = False
  zero_value_tails: bool = False
  pair_suffix_cost: float = 0.0
  pair_prefix_cost: float = 1.0
  suffix_early_keys: bool = False

  def __post_init__(self):
    check_hopper(self)


KEY_TILES = (64, 128)  # the Hopper kernel's prefix and suffix key tiles
# Registers a thread of the Hopper kernel's three warpgroups may share: a CTA of 384 threads starts with 168 a
# thread (65536 / 384, rounded down to a multiple of 8), and setmaxnreg moves them between warpgroups; asking for
# more than the pool waits forever (2·216 + 80 and 2·224 + 64 = 512 both hung on the H200).
REGISTER_POOL = 3 * 168


def check_hopper(config) -> None:
  """ValueError naming `config`'s class (HopperTuning or the kernel's HopperConfig) and field where its settings
  are out of range or cannot run: prefix and suffix key tiles of 64 or 128, a cluster of 1 or 2 CTAs, ring stages
  >= 1 (>= 2 for the prefix with the ping-pong, where a tile's value product waits for the other warpgroup's next
  score product, whose tile the one-slot ring could only load after it, and with prefix_overlap, where it is issued
  with its own warpgroup's next score product), prefix_early_keys and prefix_overlap not both (each releases a
  slot's key tile on its own schedule), prefix_key_stages 0 or at least prefix_stages (more only with
  prefix_early_keys, which releases key tiles apart from value tiles), registers in multiples of 8 that fit the
  pool, the pair's suffix costs finite (pair_suffix_cost >= 0, pair_prefix_cost > 0) and, where the pair takes
  suffix items, a prefix value slot for each of its warpgroups."""
  name = type(config).__name__
  for field in ("prefix_fill", "pair_suffix_cost", "pair_prefix_cost"):
    _check_fill(config, field)
  if not config.pair_prefix_cost > 0:
    raise ValueError(f"{name}.pair_prefix_cost must be > 0; got {config.pair_prefix_cost!r}.")
  _check_ints(config, ("prefix_stages", "suffix_stages"), least=1)  # before the rules below compare them
  if config.pair_suffix_cost > 0 and config.prefix_stages < 2:
    raise ValueError(f"{name}.prefix_stages must be >= 2 with pair_suffix_cost > 0 (each warpgroup of the pair "
                     f"streams its suffix items through prefix slots of its own); got {config.prefix_stages}.")
  for field in ("pingpong", "q_registers", "suffix_lookahead", "suffix_trim", "prefix_overlap", "suffix_pack",
                "suffix_box", "prefix_early_keys", "suffix_late_sum", "zero_value_tails", "suffix_early_keys"):
    if not isinstance(getattr(config, field), bool):  # "false" or 0.5 would read as true
      raise ValueError(f"{name}.{field} must be true or false; got {getattr(config, field)!r}.")
  for field in ("prefix_keys", "suffix_keys"):
    if not is_int(getattr(config, field)) or getattr(config, field) not in KEY_TILES:
      raise ValueError(f"{name}.{field} must be 64 or 128; got {getattr(config, field)!r}.")
  if not is_int(config.cluster) or config.cluster not in (1, 2):
    raise ValueError(f"{name}.cluster must be 1 or 2; got {config.cluster!r}.")
  if config.suffix_box and not config.suffix_pack:
    raise ValueError(f"{name}.suffix_box needs suffix_pack (it copies the tiles of packed suffix items); got "
                     "suffix_box=True, suffix_pack=False.")
  if config.pingpong and config.prefix_stages < 2:
    raise ValueError(f"{name}.prefix_stages must be >= 2 with pingpong (the pair would wait for each other); got "
                     f"{config.prefix_stages}.")
  if config.prefix_early_keys and config.prefix_overlap:
    raise ValueError(f"{name}.prefix_early_keys and prefix_overlap are exclusive (prefix_overlap already releases a "
                     "slot's key tile before its value tile); got both true.")
  key_stages = config.prefix_key_stages
  if not is_int(key_stages) or key_stages < 0 or 0 < key_stages < config.prefix_stages:
    raise ValueError(f"{name}.prefix_key_stages must be 0 (as prefix_stages) or an int >= prefix_stages "
                     f"({config.prefix_stages}); got {key_stages!r}.")
  if key_stages > config.prefix_stages and not config.prefix_early_keys:
    raise ValueError(f"{name}.prefix_key_stages={key_stages} > prefix_stages={config.prefix_stages} needs "
                     "prefix_early_keys (a key slot is refilled apart from the value slots only there).")
  if config.prefix_overlap and config.prefix_stages < 2:
    raise ValueError(f"{name}.prefix_stages must be >= 2 with prefix_overlap (a tile's key copy would wait for the "
                     f"release of the previous tile's slot, which waits for that key tile); got "
                     f"{config.prefix_stages}.")
  pair, suffix = config.pair_registers, config.suffix_registers
  if any(not isinstance(r, int) or r % 8 or not 24 <= r <= 256 for r in (pair, suffix)) or (
      2 * pair + suffix > REGISTER_POOL):
    raise ValueError(f"{name}: pair_registers={pair!r}, suffix_registers={suffix!r}: each must be a multiple of 8 "
                     f"in [24, 256], and 2·pair_registers + suffix_registers at most {REGISTER_POOL} (more hangs "
                     "the kernel).")


def _check_fill(obj, name: str) -> None:
  """Field `name` of `obj` (items per SM or CTA, a cost) is a finite number >= 0, not a bool; else ValueError naming
  it."""
  value = getattr(obj, name)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < float("inf"):
    raise ValueError(f"{type(obj).__name__}.{name} must be a finite number >= 0; got {value!r}.")


def _check_fraction(obj, name: str, zero: bool) -> None:
  """Field `name` of `obj` is a number in [0, 1] (zero) or (0, 1], not a bool; else ValueError naming it."""
  value = getattr(obj, name)
  inside = isinstance(value, (int, float)) and not isinstance(value, bool) and (
      0.0 <= value <= 1.0 if zero else 0.0 < value <= 1.0)
  if not inside:
    raise ValueError(f"{type(obj).__name__}.{name} must be a number in {'[' if zero else '('}0, 1]; got {value!r}.")


def is_int(value) -> bool:
  """A Python int, not a bool (64.0 or True in a hand-edited file is refused, not taken for 64 or 1)."""
  return isinstance(value, int) and not isinstance(value, bool)


def _check_ints(obj, names: tuple[str, ...], least: int) -> None:
  """Each field of `obj` named in `names` is an int (not a bool) of at least `least`; else ValueError naming it."""
  for name in names:
    value = getattr(obj, name)
    if not is_int(value) or value < least:
      what = "a positive int" if least == 1 else f"an int >= {least}"
      raise ValueError(f"{type(obj).__name__}.{name} must be {what}; got {value!r}.")


@dataclasses.dataclass(frozen=True)
class GemmTuning:
  """The decode GEMM kernel (`models.gemm`: a few rows of activations times the layers' weights, streamed once).

  min_rows, max_rows: the kernel runs for products of min_rows to max_rows rows (B·T of a decode step: `covers`),
  XLA's GEMMs outside and everywhere where max_rows is 0 (not measured faster). block_n / block_k: weight columns /
  rows of a tile; num_warps, num_stages: the Triton launch (stages: weight tiles in flight); programs_per_core: the K
  dimension is split until the launch has at least this many programs per SM (partial sums added in float32, one
  more small kernel); 0: never split.
  """

  min_rows: int
  max_rows: int
  block_n: int
  block_k: int
  num_warps: int
  num_stages: int
  programs_per_core: int

  def __post_init__(self):
    if not is_int(self.max_rows) or not 0 <= self.max_rows <= 128:
      raise ValueError(f"GemmTuning.max_rows must be an int in [0, 128]; got {self.max_rows!r}.")
    if not is_int(self.min_rows) or not 1 <= self.min_rows <= 128:
      raise ValueError(f"GemmTuning.min_rows must be an int in [1, 128]; got {self.min_rows!r}.")
    if self.max_rows and self.min_rows > self.max_rows:
      raise ValueError(f"GemmTuning.min_rows ({self.min_rows}) must be at most max_rows ({self.max_rows}) "
                       "where the kernel is on (max_rows > 0).")
    for name in ("block_n", "block_k"):
      value = getattr(self, name)
      if not _power_of_two(value) or value < 16:
        raise ValueError(f"GemmTuning.{name} must be a power of two >= 16; got {value!r}.")
    if not is_int(self.num_warps) or self.num_warps not in (1, 2, 4, 8, 16):
      raise ValueError(f"GemmTuning.num_warps must be one of 1, 2, 4, 8, 16; got {self.num_warps!r}.")
    _check_ints(self, ("num_stages",), least=1)
    if self.num_stages > MAX_STAGES:
      raise ValueError(f"GemmTuning.num_stages must be at most {MAX_STAGES}; got {self.num_stages!r}.")
    _check_ints(self, ("programs_per_core",), least=0)

  def covers(self, rows: int) -> bool:
    """Whether the kernel runs for a product of `rows` rows (on a GPU)."""
    return self.max_rows > 0 and self.min_rows <= rows <= self.max_rows


@dataclasses.dataclass(frozen=True)
class Tuning:
  """The kernels' measured choices on one device.

  Attributes:
    hopper_min_work: "pallas" takes the Hopper kernel when (stacked query rows per KV head, B·T·g) × (prefix
      capacity) is at least this (`dispatch.hopper_pays`); below, the Triton kernels are as fast.
    hopper_min_fill: ... and its prefix items (KV heads × 128-row blocks: `kernels.hopper.prefix_items`) are at
      least this many per SM: with fewer, the persistent grid leaves SMs without prefix work (e.g. a layer's heads
      split over GPUs by tensor parallelism) and the Triton kernels are faster (measured before the kernel could
      split its prefix keys: `HopperTuning.prefix_fill`).
    hopper_min_seq_work: ... or, below `hopper_min_work`, where the prefix product's work of one sequence (its T·g
      query rows × the prefix capacity) is at least this (0: off): long prefixes with few rows a sequence (MHA
      decode) keep the kernel's pair busy per item even at moderate B, where the same total work spread over more,
      shorter rows does not pay (the H200, B = 256 MHA: P = 8K 1.13× Triton, 4K 0.88×; B = 512, P = 4K 0.83×).
    hopper_seq_max_suffix: ... that path (one sequence's share, below `hopper_min_work`) only up to this suffix
      capacity (0: any): where the suffixes are long the Triton kernels' stream wins it back (the H200, MHA, B = 256,
      P = 4K: the Hopper kernel 1.10 / 1.05x Triton at suffix capacity 128 / 256, 0.96 / 0.92x at 512 / 1024).
    hopper_split_min_rows: ... and from this many T·g rows (0: never), where the prefix product reaches
      `hopper_min_work`, the items that `hopper_min_fill` counts are those after the setting's key splits
      (`HopperTuning.prefix_fill`): on the H200 such split items beat Triton at T·g = 4, B = 32-128 and P = 16K-32K
      (1.04-1.56x) and MHA, B = 128, P = 32K (1.52x), while T·g = 2, B = 128, P = 16K loses a little (0.94x; the
      sweep's geometric mean picked 1 over 4); below `hopper_min_work` they do not pay (B = 8-16: 0.68-0.85x;
      B = 32, P = 16K 1.05x, left to Triton by the rule).
    hopper_max_rows: ... and up to this many T·g rows (0: any): on the H200 the kernel's setting for wide query
      windows (T·g 16: GQA 32/2) ran 1.4-2.6x slower than Triton at P = 16K, B = 128-256, where the rule above
      took it (its 128-key prefix tiles do not fit the shared memory beside a 16-row window's suffix rings).
    max_keys_per_program: a Triton program streams at most this many keys of a level; longer ranges are split.
    balanced_keys: ... and at most this many while its level has fewer than `balanced_programs_per_core`
      programs per SM (more splits balance the grid's tail, at the price of partials merged by lse).
    balanced_programs_per_core: see `balanced_keys`.
    interleave_rows: `ops.run`'s "auto" launch interleaves the levels' programs when a level has at least this
      many query rows per KV head in one group (a compute-bound product); else it runs them in order.
    interleave_lead: interleaved, the shared level's programs spread over the stretch of the grid that also holds
      this fraction of the other levels' programs.
    max_rows_alone, max_rows_shared: largest row tile of a level alone in its launch / sharing it with others.
    tiles: the Triton tile of each row-tile size, `(block_m, Tile)` for every power of two from 16 to at least
      the larger of the two bounds above (shared-memory limits still cap block_k: `ops.choose_block`).
    hopper: the Hopper kernel's settings by the query rows T·g of one sequence and KV head (a suffix item's rows),
      `(rows, HopperTuning)` from 1 up: an entry holds from its rows up to the next entry's (`hopper_for`). The
      settings that suit one-row items (MHA decode: the suffix stream is a chain of tiny items, the prefix product
      decides) differ from those of GQA's few-row items (the suffix tiles' softmax decides).
    hopper_long_prefix, hopper_long: the Hopper kernel's settings by T·g rows (entries as `hopper`'s) for a
      prefix of at least `hopper_long_prefix` keys; `hopper` below it (0, the default: `hopper` for every prefix).
      A long prefix's product is compute-bound and wants 128-key prefix tiles, whose shared memory leaves the
      suffixes 64-key tiles; with a shorter prefix the suffix stream decides, and 128-key suffix tiles pay.
    gemm: the model's decode GEMM kernel (`models.gemm`; off where `gemm.max_rows` is 0).
    batch_min_readers, batch_min_saved_bytes: the models' cost model of a shared level (`dispatch.batching_pays`):
      its queries are stacked and the level read once (Hydragen) where its nodes have at least `batch_min_readers`
      readers on average and reading it batched saves at least `batch_min_saved_bytes` of K and V a layer, else
      each sequence reads its node (as shared storage does).
    num_cores: SMs assumed where the device does not report its count (CPU, interpreted runs).
    merge_max_rows: the kernel backends merge a step's parts (levels, key splits) by log-sum-exp in one Pallas
      launch (`kernels.merge`) where the step has at most this many query rows (B·T·Hq), rather than by XLA's
      elementwise merge (two kernels: the per-row weights apart); 0: never. Few rows: the two launches' latency is
      most of the merge's time. The rows are those the merge sees (per example under vmap, per device under
      shard_map); head dims that are not a power of two up to 256 keep XLA's merge, and so do the Hopper kernel's
      parts (XLA folds their layout change into its merge; the merge kernel would take each part copied).
    launch_merge_max_rows: the Triton kernels' launch merges its own parts where the step has at most this many
      query rows (B·T·Hq; 0: never): the program that writes a row's last part merges all of them
      (`kernels.flash.fused_levels(merge=True)`), so the step has no merge launch; above it, `merge_max_rows`
      decides. For the levels of one launch (not the "separate" launches; the Hopper kernel's parts keep XLA's merge).
    merge_rows, merge_warps: the merge kernel's rows a program (a power of two; the largest power of two up to it
      dividing the step's rows) and warps a program (a power of two up to 32).
    write_max_rows: on the kernel backends the models write a step's new keys and values into a layer's caches
      with one Pallas launch (`models.kv_write`: both caches, in place) where the step has at most this many new
      slots (B·T, per device), rather than with XLA's scatters; 0: never.
    pair_write: the models' decode loop writes a layer's k and v caches with one XLA scatter (`models.pair_scatter`:
      one launch) rather than one scatter each (false, the default; prefill keeps one scatter each).
    write_in_attention: the models' decode loop writes a layer's new keys and values inside the attention's launch
      (`hydragen_jax.tree_attention_append`: the Triton programs that read the new keys take them from the step's
      k and v and store them) where the Triton kernels run the step, so the step has no write launch; elsewhere
      (the Hopper kernel's steps, the `xla` backend) `pair_write` and `write_max_rows` still decide (false, the
      default).
    split_min_fill, split_fill_max_keys: a Triton level's keys are split until it has a program per SM, or
      programs for `split_min_fill` of the SMs where each program then streams at most `split_fill_max_keys` keys
      (summed over the KV heads it packs) (`ops.choose_block`; 1.0, the default: a program per SM). Below 1, a level
      of 128 programs on 132 SMs is not split once more: fewer programs and partials to merge (where the launch's
      other level is halved too, e.g. MHA decode at B = 64 and P = 4K, its programs fit in one wave); the key bound
      keeps long ranges split (long suffixes: the launch's longest programs). The rule is the launch's
      (`ops.launch_fill`): where a level is split for its keys (`max_keys_per_program`, `balanced_keys`) into at
      least a program per SM, only such levels take it (B = 64, P = 16K: the suffix keeps a program per SM beside
      256 prefix programs, 8 splits).
  """

  hopper_min_work: int
  hopper_min_fill: float
  hopper_min_seq_work: int
  max_keys_per_program: int
  balanced_keys: int
  balanced_programs_per_core: int
  interleave_rows: int
  interleave_lead: float
  max_rows_alone: int
  max_rows_shared: int
  tiles: tuple[tuple[int, Tile], ...]
  hopper: tuple[tuple[int, HopperTuning], ...]
  gemm: GemmTuning
  batch_min_readers: int
  batch_min_saved_bytes: int
  num_cores: int
  hopper_long_prefix: int = 0
  hopper_long: tuple[tuple[int, HopperTuning], ...] = ()
  merge_max_rows: int = 0
  merge_rows: int = 2
  merge_warps: int = 1
  write_max_rows: int = 0
  split_min_fill: float = 1.0
  split_fill_max_keys: int = 2048
  hopper_split_min_rows: int = 0
  hopper_max_rows: int = 0
  launch_merge_max_rows: int = 0
  hopper_seq_max_suffix: int = 0
  pair_write: bool = False
  write_in_attention: bool = False

  def __post_init__(self):
    _check_ints(self, ("hopper_min_work", "max_keys_per_program", "balanced_keys", "balanced_programs_per_core",
                       "interleave_rows", "batch_min_readers", "num_cores", "split_fill_max_keys"), least=1)
    _check_ints(self, ("batch_min_saved_bytes", "hopper_min_seq_work", "merge_max_rows", "write_max_rows",
                       "hopper_split_min_rows", "hopper_max_rows", "launch_merge_max_rows", "hopper_seq_max_suffix"),
                least=0)
    for name in ("pair_write", "write_in_attention"):
      if not isinstance(getattr(self, name), bool):  # "false" or 0.5 would read as true
        raise ValueError(f"Tuning.{name} must be true or false; got {getattr(self, name)!r}.")
    for name, most in (("merge_rows", None), ("merge_warps", 32)):
      value = getattr(self, name)
      if not _power_of_two(value) or (most is not None and value > most):
        raise ValueError(f"Tuning.{name} must be a power of two{f' up to {most}' if most else ''}; got {value!r}.")
    if self.balanced_keys > self.max_keys_per_program:
      raise ValueError(f"Tuning.balanced_keys={self.balanced_keys} exceeds max_keys_per_program="
                       f"{self.max_keys_per_program}.")
    _check_fill(self, "hopper_min_fill")
    _check_fraction(self, "split_min_fill", zero=False)
    _check_fraction(self, "interleave_lead", zero=True)
    for name in ("max_rows_alone", "max_rows_shared"):
      value = getattr(self, name)
      if not _power_of_two(value) or value < 16:
        raise ValueError(f"Tuning.{name} must be a power of two >= 16; got {value!r}.")
    have = [rows for rows, _ in self.tiles]
    if not have or have != [16 << i for i in range(len(have))] or (
        have[-1] < max(self.max_rows_alone, self.max_rows_shared)):
      raise ValueError(f"Tuning.tiles must give a Tile for the row tiles 16, 32, 64, ... up to max_rows_alone="
                       f"{self.max_rows_alone} and max_rows_shared={self.max_rows_shared}, in that order; got {have}.")
    _check_ints(self, ("hopper_long_prefix",), least=0)
    for name in ("hopper", "hopper_long") if self.hopper_long or self.hopper_long_prefix else ("hopper",):
      starts = [rows for rows, _ in getattr(self, name)]
      if not starts or starts[0] != 1 or any(not is_int(r) for r in starts) or (
          starts != sorted(set(starts))):
        raise ValueError(f"Tuning.{name} must give (rows, HopperTuning) entries from rows 1 up, in increasing order "
                         f"of rows; got rows {starts}" + (f" (hopper_long_prefix={self.hopper_long_prefix})."
                                                          if name == "hopper_long" else "."))
      if bad := [rows for rows, settings in getattr(self, name) if not isinstance(settings, HopperTuning)]:
        raise ValueError(f"Tuning.{name}: the entries of rows {bad} are not HopperTuning.")
    if self.hopper_long and not self.hopper_long_prefix:
      raise ValueError("Tuning.hopper_long is given but hopper_long_prefix is 0: set the prefix length (keys) from "
                       "which it holds.")
    for rows, tile in self.tiles:
      rules = {"block_k": (lambda v: _power_of_two(v) and v >= 16, "a power of two >= 16"),
               "num_warps": (lambda v: v in (1, 2, 4, 8, 16), "one of 1, 2, 4, 8, 16"),
               # (the shared-memory fit lowers stages one at a time: 2**70 of them never ended)
               "num_stages": (lambda v: 1 <= v <= MAX_STAGES, f"an int in [1, {MAX_STAGES}]")}
      for field, (ok, what) in rules.items():
        value = getattr(tile, field)
        if not is_int(value) or not ok(value):
          raise ValueError(f"Tuning.tiles[{rows}].{field} must be {what}; got {value!r}.")

  def tile(self, block_m: int) -> Tile:
    """The Tile of row tiles of `block_m` rows."""
    for rows, tile in self.tiles:
      if rows == block_m:
        return tile
    raise ValueError(f"no tile for block_m={block_m}; the tuning has {[rows for rows, _ in self.tiles]}.")

  def hopper_for(self, rows: int, prefix: int = 0) -> HopperTuning:
    """The Hopper kernel's settings for `rows` (>= 1) query rows a sequence and KV head (T·g) and a prefix of
    `prefix` keys (its capacity): `hopper_long`'s from `hopper_long_prefix` keys, else `hopper`'s."""
    try:
      count, keys = operator.index(rows), operator.index(prefix)
    except TypeError:
      count = keys = -1
    if count < 1 or keys < 0:
      raise ValueError(f"hopper_for: rows must be an int >= 1 (T·g) and prefix an int >= 0 (keys); got "
                       f"rows={rows!r}, prefix={prefix!r}.")
    return _setting(self.hopper_long if self.hopper_long_prefix and keys >= self.hopper_long_prefix else self.hopper,
                    count)

  def with_hopper(self, first: int, last: int, settings: HopperTuning) -> Tuning:
    """This tuning with `settings` for the rows `first`..`last` (the other rows keep theirs; equal neighbours
    merge into one entry). Rows of `hopper_long` that hold `hopper`'s settings (copies, never measured apart on long
    prefixes) follow the change; rows with long settings of their own keep them."""
    if not 1 <= first <= last:
      raise ValueError(f"with_hopper: expected 1 <= first <= last; got {first}, {last}.")
    cut = {first, last + 1}
    starts = sorted({start for start, _ in self.hopper} | cut)
    hopper = _merged([(r, settings if first <= r <= last else _setting(self.hopper, r)) for r in starts])
    long = self.hopper_long
    if long:
      starts = sorted({start for start, _ in self.hopper} | {start for start, _ in long} | cut)
      follows = lambda r: first <= r <= last and _setting(long, r) == _setting(self.hopper, r)
      long = _merged([(r, settings if follows(r) else _setting(long, r)) for r in starts])
    return dataclasses.replace(self, hopper=hopper, hopper_long=long)


def _setting(entries: tuple[tuple[int, HopperTuning], ...], rows: int) -> HopperTuning:
  """The settings that hold for `rows` in (start rows, settings) entries: the last entry starting at or below."""
  return [settings for start, settings in entries if start <= rows][-1]


def _merged(entries: list[tuple[int, HopperTuning]]) -> tuple[tuple[int, HopperTuning], ...]:
  """Entries with equal neighbours merged into the first of them."""
  return tuple(entry for i, entry in enumerate(entries) if i == 0 or entry[1] != entries[i - 1][1])


@dataclasses.dataclass(frozen=True)
class TuningFile:
  """One data file: the device kind it serves, its tuning, and where the numbers come from (`PROVENANCE_KEYS`:
  `measured_on`, the device kind they were measured on or None; the command, date and commit; a note)."""

  device_kind: str
  tuning: Tuning
  provenance: dict

  @property
  def measured(self) -> bool:
    """Whether its numbers were measured on the device kind it serves."""
    return self.provenance["measured_on"] == self.device_kind


def _power_of_two(x) -> bool:
  return is_int(x) and x > 0 and x & (x - 1) == 0


def slug(device_kind: str) -> str:
  """File stem of a device kind: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
  return re.sub(r"[^A-Za-z0-9]+", "-", device_kind).strip("-").lower() or "device"


def to_dict(tuning: Tuning) -> dict:
  """The JSON form of a tuning (tiles keyed by their row count)."""
  out = dataclasses.asdict(tuning)
  out["tiles"] = {str(rows): dataclasses.asdict(tile) for rows, tile in tuning.tiles}
  for name in ("hopper", "hopper_long"):
    out[name] = {str(rows): dataclasses.asdict(settings) for rows, settings in getattr(tuning, name)}
  return out


def _fields(cls, data: Any, where: str, defaults: bool = False) -> dict:
  """`data` checked to be a dict with exactly the fields of dataclass `cls` (defaults: those with a default may be
  left out, e.g. a Hopper option added after the file was written)."""
  names = [f.name for f in dataclasses.fields(cls)]
  if not isinstance(data, dict):
    raise ValueError(f"{where}: expected an object with {names}; got {type(data).__name__}.")
  optional = {f.name for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING} if defaults else set()
  if missing := [n for n in names if n not in data and n not in optional]:
    raise ValueError(f"{where}: missing {missing}.")
  if unknown := sorted(set(data) - set(names)):
    raise ValueError(f"{where}: unknown {unknown} (fields: {names}).")
  return data


def from_dict(data: dict, where: str = "tuning") -> Tuning:
  """The tuning of its JSON form (`to_dict`); errors name `where` and the field."""
  data = dict(_fields(Tuning, data, where, defaults=True))
  tiles = data["tiles"]
  if not isinstance(tiles, dict):
    raise ValueError(f"{where}.tiles: expected an object keyed by row count; got {type(tiles).__name__}.")
  if bad := [key for key in tiles if not (isinstance(key, str) and key.isascii() and key.isdigit()
                                          and key == str(int(key)))]:
    raise ValueError(f"{where}.tiles: keys must be row counts (\"16\", as the hopper rows); got {bad}.")
  rows = sorted((int(key), key) for key in tiles)
  data["tiles"] = tuple((r, Tile(**_fields(Tile, tiles[key], f"{where}.tiles[{key}]"))) for r, key in rows)
  data["hopper"] = _hopper_entries(data["hopper"], f"{where}.hopper")
  if data.get("hopper_long", {}) != {}:  # {}: none (`to_dict` of ()); null, [] or false are refused by name
    data["hopper_long"] = _hopper_entries(data["hopper_long"], f"{where}.hopper_long")
  else:
    data["hopper_long"] = ()
  gemm = _fields(GemmTuning, data["gemm"], f"{where}.gemm")  # (its errors name the field already)
  try:
    data["gemm"] = GemmTuning(**gemm)
    return Tuning(**data)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from e


def _hopper_entries(data: Any, where: str) -> tuple[tuple[int, HopperTuning], ...]:
  """The Hopper settings of a file: an object keyed by row counts ("1", "2", ...), or one settings object (the
  form before the settings went by rows: it holds for every row count). Options left out take their defaults
  (off: the kernel as it was before the option)."""
  names = {f.name for f in dataclasses.fields(HopperTuning)}
  if isinstance(data, dict) and data and not names & set(data):  # keyed by row counts
    if bad := [key for key in data if not (isinstance(key, str) and key.isascii() and key.isdigit())]:
      raise ValueError(f"{where}: keys must be row counts (\"1\", \"2\", ...) or the fields of one setting; got "
                       f"{bad}.")
    return tuple((int(key), _hopper_setting(data[key], f"{where}[{key}]")) for key in sorted(data, key=int))
  return ((1, _hopper_setting(data, where)),)


def _hopper_setting(data: Any, where: str) -> HopperTuning:
  """One Hopper setting of a file; errors name `where` (the file and the entry) and the field."""
  fields = _fields(HopperTuning, data, where, defaults=True)
  try:
    return HopperTuning(**fields)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from e


def dumps(file: TuningFile) -> str:
  """The text of a data file."""
  return json.dumps({"device_kind": file.device_kind, "provenance": file.provenance,
                     "tuning": to_dict(file.tuning)}, indent=2) + "\n"


class _RepeatedKey(Exception):
  pass


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict:
  """A JSON object's dict, refusing a key given twice (`json.loads` keeps the last)."""
  keys = [k for k, _ in pairs]
  if len(set(keys)) != len(keys):
    raise _RepeatedKey(next(k for i, k in enumerate(keys) if k in keys[:i]))
  return dict(pairs)


def loads(text: str, where: str = "tuning file") -> TuningFile:
  """A data file from its text (`dumps`)."""
  try:
    data = json.loads(text, object_pairs_hook=_no_repeated_keys)
  except json.JSONDecodeError as e:
    raise ValueError(f"{where}: not valid JSON: {e}") from e
  except _RepeatedKey as e:  # json.loads would keep the last silently
    raise ValueError(f"{where}: the key {e.args[0]!r} is given twice in one object (which would count?)") from None
  if not isinstance(data, dict) or sorted(data) != ["device_kind", "provenance", "tuning"]:
    raise ValueError(f"{where}: expected an object with device_kind, provenance, tuning; got "
                     f"{sorted(data) if isinstance(data, dict) else type(data).__name__}.")
  if not isinstance(data["device_kind"], str) or not data["device_kind"]:
    raise ValueError(f"{where}: device_kind must be a device kind's name (e.g. {FALLBACK_KIND!r}); got "
                     f"{data['device_kind']!r}.")
  provenance = data["provenance"]
  if not isinstance(provenance, dict) or (missing := [k for k in PROVENANCE_KEYS if k not in provenance]):
    raise ValueError(f"{where}: provenance must record {list(PROVENANCE_KEYS)}; missing "
                     f"{missing if isinstance(provenance, dict) else 'all'}.")
  if isinstance(data["tuning"], dict) and (left := [f.name for f in dataclasses.fields(Tuning)
                                                     if f.name not in data["tuning"]
                                                     and f.default is not dataclasses.MISSING]):
    # a file written before these fields existed: their defaults, the behaviour before them, apply
    warnings.warn(f"{where}: the tuning leaves out {left}; their defaults apply ("
                  f"{', '.join(f'{n}={getattr(Tuning, n, None)!r}' for n in left)}): write every field to choose them "
                  "(scripts/tuning/sweep_device.py writes them all)", stacklevel=2)
  return TuningFile(data["device_kind"], from_dict(data["tuning"], f"{where}: tuning"), provenance)


def load(path: str | pathlib.Path) -> TuningFile:
  try:
    text = pathlib.Path(path).read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not UTF-8 text (a tuning file is JSON): {e}") from e
  return loads(text, str(path))


def file_path_problem(path: str | pathlib.Path) -> str | None:
  """Why a file cannot be written at `path` ("a directory", "its folder does not exist"), or None (`write`; the
  sweeps check their --out and --log with it before they start)."""
  path = pathlib.Path(path).absolute()
  if path.is_dir():
    return "a directory"
  return None if path.parent.is_dir() else "its folder does not exist"


def write(path: str | pathlib.Path, file: TuningFile) -> None:
  """Write `file` to `path` whole or not at all (a temporary file renamed over it: a process killed while writing
  leaves the old file, never a truncated one that the device would fail to load)."""
  text = dumps(file)
  loads(text, str(path))  # what is written must load
  path = pathlib.Path(path)
  folder = pathlib.Path(str(importlib.resources.files(__name__))).resolve()
  if path.absolute().parent.resolve() == folder and path.name != f"{slug(file.device_kind)}.json":
    raise ValueError(f"{path}: a tuning file in the package's folder is named after its device kind, "
                     f"{slug(file.device_kind)}.json for {file.device_kind!r} (a device finds its file by that name; "
                     "under another, it would be ignored or refused as another kind's)")
  if why := file_path_problem(path):
    raise ValueError(f"{path}: {why}; a tuning file is written to a file path in an existing folder")
  temporary = path.with_name(f".{path.name}.tmp")
  try:
    temporary.write_text(text)
    os.replace(temporary, path)
  finally:
    temporary.unlink(missing_ok=True)  # (gone once renamed; left by a failed write or rename otherwise)


def with_measured_field(base: TuningFile, device_kind: str, tuning: Tuning, field: str | tuple[str, ...], note: str,
                        *, command: str, date: str, commit: str) -> TuningFile:
  """`base` with `tuning` and the newly measured `field` (or fields, measured together) for `device_kind` (a sweep
  of one field, e.g. `scripts/tuning/sweep_gemm.py`): its note under `provenance.fields`; the base's other
  provenance stays where the base is the device's own file, else (the fallback's) the file says that only this
  field was measured here."""
  names = (field,) if isinstance(field, str) else tuple(field)
  field = ("the field " if len(names) == 1 else "the fields ") + " and ".join(names)
  if slug(base.device_kind) == slug(device_kind):  # the device's own file (`file_for` matches kinds by their slug)
    provenance = dict(base.provenance, fields=dict(base.provenance.get("fields", {})))
    if str(provenance.get("note", "")).startswith(f"NOT MEASURED on {device_kind} except the field"):
      provenance["note"] = provenance["note"].replace(" except the field", f" except {field} and the field", 1)
  else:
    provenance = dict(measured_on=None, command=command, date=date, commit=commit, fields={},
                      note=f"NOT MEASURED on {device_kind} except {field}: the other fields are "
                           f"{base.device_kind}'s (run scripts/tuning/sweep_device.py on this device)")
  provenance["fields"][names[0]] = note
  for name in names[1:]:  # measured together: the note once
    provenance["fields"][name] = f"measured with {names[0]}, in one run: see its note"
  return TuningFile(device_kind, tuning, provenance)


def data_file(device_kind: str):
  """The path of a device kind's data file (whether or not it exists)."""
  return importlib.resources.files(__name__) / f"{slug(device_kind)}.json"


def known_kinds() -> list[str]:
  """Device kinds that have a data file."""
  return sorted(loads(f.read_text(), f.name).device_kind for f in importlib.resources.files(__name__).iterdir()
                if f.name.endswith(".json"))


def _is_gpu_kind(kind: str) -> bool:
  """Whether a device kind names a GPU: the default device's platform where it is that kind (a TPU or CPU has no
  tuning to miss), else the name's vendor."""
  device = default_device()
  if device.device_kind == kind:
    return device.platform == "gpu"
  return kind.upper().startswith(("NVIDIA", "AMD", "TESLA", "QUADRO", "GEFORCE", "RTX"))


def variant_of(device_kind: str) -> str | None:
  """The known kind whose name `device_kind`'s extends by whole words ("NVIDIA H200 NVL" -> "NVIDIA H200": the
  same chip on another board), the longest if several; None if none does."""
  name = slug(device_kind)
  return max((k for k in known_kinds() if name.startswith(slug(k) + "-")), key=len, default=None)


@functools.lru_cache(maxsize=None)
def file_for(device_kind: str) -> TuningFile:
  """The data file of a device kind; else that of the known kind its name extends (`variant_of`); else the
  fallback's (`FALLBACK_KIND`)."""
  data = data_file(device_kind)
  if not data.is_file():
    base = variant_of(device_kind) or FALLBACK_KIND
    if _is_gpu_kind(device_kind):  # a GPU never measured (CPU runs interpret the kernels: nothing to tune)
      why = ("a kind its name extends (the same chip; its clocks, power and bandwidth may differ)"
             if base != FALLBACK_KIND else "which may not suit it")
      warnings.warn(f"hydragen_jax: no tuning file for device kind {device_kind!r} (known: {known_kinds()}); the "
                    f"kernels use the {base}'s choices, {why} (the Triton tiles are cut to its shared memory; the "
                    "Hopper kernel runs only on a Hopper). "
                    f"Measure this device with `python -m scripts.tuning.sweep_device`, or set {TUNING_ENV} to a "
                    "tuning file.", stacklevel=2)
    data, device_kind = data_file(base), base
  file = loads(data.read_text(), data.name)
  if slug(file.device_kind) != slug(device_kind):  # the file a kind's slug names ("NVIDIA  H200" -> NVIDIA H200's)
    raise ValueError(f"{data.name} names device kind {file.device_kind!r}, not {device_kind!r}.")
  return file


def for_device_kind(device_kind: str) -> Tuning:
  return file_for(device_kind).tuning


# The tuning `override` forces: a JAX user context, part of jit's cache key, so that a function jitted (traced) under
# one tuning is traced again under another. (A plain context variable would leave the first trace in force: the
# kernels read the tuning when they are traced.)
_OVERRIDE = jax.make_user_context(default_value=None)


def device_kind() -> str:
  """The default device's kind ("NVIDIA H200", "cpu", ...; `hydragen_jax.devices.default_device`)."""
  return default_device().device_kind


def _file_at(path: str) -> TuningFile:
  """The file at `path`, read again once it changes (its absolute path, modification time and size: an edit,
  or a relative path that names another file after a chdir, is read anew)."""
  try:
    stat = os.stat(path)
  except OSError as e:
    raise ValueError(f"{TUNING_ENV}={path!r}: {e}") from e
  return _file_version(path, os.path.abspath(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _file_version(path: str, absolute: str, mtime_ns: int, size: int) -> TuningFile:
  del absolute, mtime_ns, size  # the cache's key: this version of the file
  try:
    return load(path)
  except (OSError, ValueError) as e:
    raise ValueError(f"{TUNING_ENV}={path!r}: {e}") from e


def current() -> Tuning:
  """The tuning in force: an `override`'s, else the file that $HYDRAGEN_JAX_TUNING names (any device's: e.g. a GPU
  without a file of its own; read again when it changes), else the default device's (`for_device_kind`). Read
  when a function is traced: a jitted function keeps the tuning it was traced with when the variable or its file
  changes (jit's cache does not see them); `override` is part of jit's cache key and retraces."""
  forced = _OVERRIDE.value
  if forced is not None:
    return forced
  if path := os.environ.get(TUNING_ENV):
    file = _file_at(path)
    _warn_if_for_another_gpu(path, file.device_kind, device_kind())
    return file.tuning
  return for_device_kind(device_kind())


@functools.lru_cache(maxsize=None)
def _warn_if_for_another_gpu(path: str, file_kind: str, kind: str) -> None:
  """Once a (file, device) pair: a GPU given a file measured for another kind, likely by mistake (a sweep writes
  its device's kind; CPU and interpreted runs take any file silently)."""
  if file_kind != kind and _is_gpu_kind(kind):
    warnings.warn(f"hydragen_jax: {TUNING_ENV}={path!r} is the tuning of device kind {file_kind!r}, and this device "
                  f"is {kind!r}: its choices may not suit it (the file is used).", stacklevel=3)


def resolve(tuning: Tuning | None) -> Tuning:
  """`tuning`, or `current()` where None."""
  if tuning is None:
    return current()
  if not isinstance(tuning, Tuning):
    raise TypeError(f"tuning must be a hydragen_jax.tuning.Tuning or None; got {type(tuning).__name__} (a "
                    "TuningFile's is its .tuning).")
  return tuning


@contextlib.contextmanager
def override(tuning: Tuning) -> Iterator[Tuning]:
  """`current()` returns `tuning` inside the `with` block (this thread only). A jitted function called inside is
  traced for it, even if it was traced before under another tuning (the override is part of jit's cache key)."""
  if not isinstance(tuning, Tuning):
    raise TypeError(f"override takes a Tuning; got {type(tuning).__name__}.")
  with _OVERRIDE(tuning):
    yield tuning
