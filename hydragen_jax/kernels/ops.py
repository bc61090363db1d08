"""Pallas implementation of Hydragen's levels: which groups of sequences read which KV, and their tiling.

Two ways to read a level's KV (`k, v [R, S, Hkv, D]` rows):

* `per_sequence`: each sequence b reads row kv_index[b] on its own (T·g query rows a group). This is the suffix
  (decode) attention, and, over a shared node, the "shared storage" baseline that reads the node once per sequence.
* `batched`: the sequences that read one node are stacked into one row matrix (B_n·T·g rows), so each node's KV
  is read once per row block for all of them: Hydragen's inter-sequence batching.

Each returns a plan (static `LevelSpec`, arrays `LevelWork`); `run` executes the plans of all levels in one kernel
launch (or one a level: `launch="separate"`) and returns each level's `(out, lse)` parts (one per key split) for
`merge_states`. A per-sequence plan may carry the step's new keys and values (`per_sequence(new=...)`): the launch
reads them from there and writes them into the level's caches, which `run_write` returns with the parts.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from hydragen_jax import tuning as tuning_lib
from hydragen_jax.devices import default_device
from hydragen_jax.kernels.flash import BlockConfig, LevelSpec, LevelWork, fused_levels, padded_head_dim
from hydragen_jax.tuning import Tuning

Array = jax.Array
Plan = tuple[LevelSpec, LevelWork]


def num_cores(tuning: Tuning | None = None) -> int:
  """SMs of the default device (the tuning's `num_cores` where it does not say: CPU, interpreted runs)."""
  device = default_device()
  return int(getattr(device, "core_count", 0) or tuning_lib.resolve(tuning).num_cores)


# Shared memory one CUDA block may use (the opt-in maximum, bytes) by compute capability: the CUDA C++ Programming
# Guide's "Technical Specifications per Compute Capability". A GPU not listed (a ROCm GPU, whose capability reads
# "gfx…": 64 KB of LDS on an MI300) gets SHARED_MEMORY_UNKNOWN.
SHARED_MEMORY_BY_CAPABILITY = {
    "7.0": 96 << 10, "7.2": 96 << 10, "7.5": 64 << 10, "8.0": 163 << 10, "8.6": 99 << 10, "8.7": 163 << 10,
    "8.9": 99 << 10, "9.0": 227 << 10, "10.0": 227 << 10, "10.1": 227 << 10, "10.3": 227 << 10, "11.0": 227 << 10,
    "12.0": 99 << 10, "12.1": 99 << 10,
}
SHARED_MEMORY_UNKNOWN = 64 << 10
DEVICE = "device"  # `choose_block(shared_memory=DEVICE)`: the default device's limit


def gpu_capability() -> str | None:
  """The default device's compute capability ("9.0"; "gfx…" on a ROCm GPU); None off a GPU."""
  device = default_device()
  return str(getattr(device, "compute_capability", "")) if device.platform == "gpu" else None


def shared_memory_limit() -> int | None:
  """Bytes of shared memory a program may use on the default device (by its compute capability); None off a GPU
  (the interpreter has no limit)."""
  capability = gpu_capability()
  return None if capability is None else SHARED_MEMORY_BY_CAPABILITY.get(capability, SHARED_MEMORY_UNKNOWN)


def is_hopper(capability: str | None) -> bool:
  """Whether a compute capability ("9.0") is a Hopper GPU's (H100, H200)."""
  return capability is not None and capability.split(".")[0] == "9"


def _measured_layout() -> bool:
  """Whether the default device is one where `tile_shared_memory` was measured exact (a Hopper GPU; off a GPU the
  interpreter has no limit to keep room under)."""
  capability = gpu_capability()
  return capability is None or is_hopper(capability)


def tile_shared_memory(block: BlockConfig, head_dim: int, itemsize: int, exact: bool = True) -> int:
  """Shared memory of one Triton program of `block` (bytes): `num_stages` buffers of a K and a V block of `block_k`
  columns, and the q tile (`block_m` rows), D padded as the kernel pads it (`flash.padded_head_dim`). Nsight
  Compute on the H200 (`scripts/tuning/probe_smem.py`) measured exactly this for 16-bit tiles of one KV head a
  program, 2–3 stages and D >= 64, and less for every other tile it ran (packed heads, 1 or 4 stages, float32).
  exact=False (a GPU where it was not measured) adds the scores tile in float32, in case the compiler stages them
  through shared memory there."""
  d = padded_head_dim(head_dim)
  need = block.num_stages * 2 * block.block_k * d * itemsize + block.block_m * d * itemsize
  return need if exact else need + block.block_m * block.block_k * 4


def fit_shared_memory(block: BlockConfig, head_dim: int, itemsize: int, limit: int | None,
                      exact: bool = True) -> BlockConfig:
  """`block` made to fit `limit` bytes of shared memory (None: as it is): fewer stages (down to 2), then fewer keys
  a step (down to 16 columns, or one key of each packed head), then fewer rows (down to 16), then one stage.
  ValueError where even that does not fit."""
  if limit is None:
    return block

  def need(b):
    return tile_shared_memory(b, head_dim, itemsize, exact)

  smallest_k = max(16, block.heads)
  while need(block) > limit:
    if block.num_stages > 2:
      block = dataclasses.replace(block, num_stages=block.num_stages - 1)
    elif block.block_k > smallest_k:
      block = dataclasses.replace(block, block_k=block.block_k // 2)
    elif block.block_m > 16:
      block = dataclasses.replace(block, block_m=block.block_m // 2)
    elif block.num_stages > 1:
      block = dataclasses.replace(block, num_stages=1)
    else:
      raise ValueError(f"head_dim={head_dim} in {itemsize}-byte elements needs {need(block)} bytes of shared "
                       f"memory for the smallest Triton tile ({block}); this GPU allows {limit} a program.")
  return block


def _key_bounds_hold(programs: int, splits: int, num_keys: int, tuning: Tuning) -> bool:
  """Whether a level of `programs` programs, its `num_keys` keys split `splits` ways, has at most
  `tuning.max_keys_per_program` keys a program, and at most `tuning.balanced_keys` while it has fewer than
  `tuning.balanced_programs_per_core` programs per SM."""
  keys = num_keys / splits
  return keys <= tuning.max_keys_per_program and (
      programs * splits >= tuning.balanced_programs_per_core * num_cores(tuning) or keys <= tuning.balanced_keys)


def _split_bounds_hold(programs: int, splits: int, num_keys: int, tuning: Tuning, heads: int,
                       fill: bool = True) -> bool:
  """Whether a level of `programs` programs (each over `heads` packed KV heads), its `num_keys` keys split `splits`
  ways, has a program per SM (with `fill`: programs for `tuning.split_min_fill` of the SMs where a program then
  streams at most `tuning.split_fill_max_keys` keys of all its heads) and keeps the key bounds (`_key_bounds_hold`)."""
  fraction = tuning.split_min_fill if fill and num_keys / splits * heads <= tuning.split_fill_max_keys else 1.0
  return programs * splits >= fraction * num_cores(tuning) and _key_bounds_hold(programs, splits, num_keys, tuning)


def busy_programs(num_heads: int, heads: int, num_groups: int, total_rows: int, block_m: int) -> int:
  """Programs with rows of a level before its key splits (`choose_block`'s count): a program per group and block
  of `heads` KV heads, more where the groups' `total_rows` (for one KV head) take more row tiles."""
  return num_heads // heads * max(num_groups, pl.cdiv(total_rows * heads, block_m))


def split_for_keys(block: BlockConfig, programs: int, num_keys: int, tuning: Tuning | None = None) -> bool:
  """Whether a level tiled `block`, `programs` programs before its key splits (`busy_programs`) over `num_keys`
  keys, is split for its keys: with half its splits it would break `max_keys_per_program` or `balanced_keys`."""
  return block.splits > 1 and not _key_bounds_hold(programs, block.splits // 2, num_keys,
                                                   tuning_lib.resolve(tuning))


def plan_level(plan: Plan, q_shape: tuple[int, ...]) -> tuple[BlockConfig, int, int]:
  """A plan of queries `q_shape` `[B, T, Hq, D]` as `launch_fill` reads it: (its block, its programs before key
  splits as `choose_block` counted them, `busy_programs`, its keys)."""
  spec, work = plan
  b, t, hq, _ = q_shape
  hkv = work.k.shape[2]
  programs = busy_programs(hkv, spec.block.heads, work.kv_length.shape[0], b * t * (hq // hkv), spec.block.block_m)
  return spec.block, programs, work.k.shape[1]


def launch_fill(levels: list[tuple[BlockConfig, int, int]], tuning: Tuning | None = None) -> list[bool]:
  """Which levels of one launch, each `(block, programs before key splits, num_keys)` as tiled with
  `split_min_fill`, may keep that rule (`choose_block(fill=True)`): every level, unless a level is split for its
  keys (`split_for_keys`) into at least a program per SM; then only such levels. Those long levels fill the SMs
  whatever the rule, and another level's fewer, longer programs only lengthen the launch's last wave (measured on
  the H200: MHA decode at B = 64, P = 16K, whose suffix level would go from 256 programs to 128 beside 256 prefix
  programs of 2048 keys, 2 % slower; at P = 1K and 4K, where no level is split for its keys, the launch fits one
  wave and is 2-7 % faster)."""
  tuning = tuning_lib.resolve(tuning)
  keyed = [split_for_keys(block, programs, keys, tuning) and programs * block.splits >= num_cores(tuning)
           for block, programs, keys in levels]
  return [k or not any(keyed) for k in keyed]


def choose_block(max_rows: int, total_rows: int, num_groups: int, num_heads: int, num_keys: int,
                 head_dim: int, *, shared_launch: bool = True, itemsize: int = 2,
                 tuning: Tuning | None = None, shared_memory: int | None | str = DEVICE,
                 fill: bool = True) -> BlockConfig:
  """Tiling heuristic; its numbers are the device's tuning (`hydragen_jax.tuning`, None: `tuning.current()`).

  max_rows: rows of the largest group for one KV head; total_rows: rows of all groups together (one KV head);
  shared_launch: other levels run in the same launch; itemsize: bytes per element of q, k, v; fill: whether the
  launch lets this level take `split_min_fill` (`launch_fill`; False: a program per SM).

  * Rows: with fewer than 16 rows per KV head (decode), a program packs the rows of several KV heads (`heads`).
  * Row tiles of at most `max_rows_alone` rows for a level alone in its launch (on the H100: 128 rows, 8 warps,
    the fastest prefix product), `max_rows_shared` when levels share a launch (64 rows, 4 warps, 3 stages: a
    compute-bound prefix program and memory-bound suffix programs fit on one SM together and overlap); keys per
    step, warps and stages from the tuning's tile of that row count.
  * Shared memory: the tile shrinks until a program fits `shared_memory` bytes (`fit_shared_memory`; DEVICE: the
    default device's `shared_memory_limit`, None: no limit). The tuning's tiles fit a Hopper GPU in 16 bits;
    float32, D = 256 or a GPU with less shared memory (an A100, sm_89 cards) may need smaller ones.
  * Splits: until the level alone has a program per SM (`split_min_fill` of them where a program's keys, over its
    packed heads, stay within `split_fill_max_keys`), and at most `max_keys_per_program` keys per program
    (`balanced_keys` while the level has fewer than `balanced_programs_per_core` programs per SM), while each
    split keeps at least 4 key blocks (`block_k // heads` keys each). The fill
    rule is the launch's: `launch_fill` says which levels take it (the models' and the API's steps ask it).
  """
  tuning = tuning_lib.resolve(tuning)
  wide = head_dim > 128
  heads = 1
  while num_heads % (2 * heads) == 0 and 2 * heads * max_rows <= 16:
    heads *= 2
  biggest = tuning.max_rows_shared if shared_launch else tuning.max_rows_alone
  if wide:  # shared memory: at most 64 rows of D = 256
    biggest = min(biggest, 64)
  block_m = min(max(16, pl.next_power_of_2(max_rows * heads)), biggest)
  tile = tuning.tile(block_m)
  block_k = tile.block_k
  if wide or itemsize > 2:  # shared memory: at most 32 keys a step for D = 256, 64 in 32 bits
    block_k = min(block_k, 32 if wide else 64)
  block_k = min(block_k, max(16, pl.next_power_of_2(num_keys * heads)))
  exact = _measured_layout()
  if shared_memory == DEVICE:
    shared_memory = shared_memory_limit()
  block = fit_shared_memory(BlockConfig(block_m=block_m, block_k=block_k, num_warps=tile.num_warps,
                                        num_stages=tile.num_stages, heads=heads), head_dim, itemsize,
                            shared_memory, exact)
  step_keys = max(1, block.block_k // heads)
  programs = busy_programs(num_heads, heads, num_groups, total_rows, block.block_m)
  splits = 1
  while (not _split_bounds_hold(programs, splits, num_keys, tuning, block.heads, fill)
         and num_keys >= 2 * splits * 4 * step_keys):
    splits *= 2
  return dataclasses.replace(block, splits=splits)


def _check_block(block: BlockConfig, num_heads: int, head_dim: int, itemsize: int) -> None:
  """A tiling given by the caller: checked, not changed (a tile over the device's shared memory by
  `tile_shared_memory`, an upper bound, may still compile: warned)."""
  if num_heads % block.heads or block.block_k % block.heads:
    raise ValueError(f"block.heads={block.heads} must divide the {num_heads} KV heads and "
                     f"block.block_k={block.block_k}.")
  limit = shared_memory_limit()
  if limit is not None and (need := tile_shared_memory(block, head_dim, itemsize, _measured_layout())) > limit:
    warnings.warn(f"hydragen_jax: {block} with head_dim={head_dim} in {itemsize}-byte elements needs up to {need} "
                  f"bytes of shared memory; this GPU allows {limit} a program: it may fail to compile (the "
                  "tilings `choose_block` makes fit).", stacklevel=3)


def per_sequence(
    q: Array, k: Array, v: Array, lengths: Array, kv_index: Array | None = None, *, kv_offset: Array | int = 0,
    causal: bool, block: BlockConfig | None = None, shared_launch: bool = True, fill: bool = True,
    new: tuple[Array, Array, Array] | None = None,
) -> Plan | None:
  """Each sequence b attends to KV row kv_index[b] (default: kv_offset + b) with lengths[b] valid keys.

  q `[B, T, Hq, D]`, k/v `[R, S, Hkv, D]`, lengths and kv_index `[B]`. None if the level holds no keys. block:
  the tiling (default `choose_block`'s, with `shared_launch` and `fill`). new: `(new_k, new_v [B, T, Hkv, D],
  new_count [B])`, the step's keys and values not yet in the caches: sequence b's last new_count[b] keys (positions
  [lengths[b] - new_count[b], lengths[b])) are its last new_count[b] slots, which the launch reads and writes into
  the caches (`flash.LevelSpec.fresh`; kv_index None only).
  """
  b, t, hq, _ = q.shape
  _, s, hkv, d = k.shape
  if s == 0:
    return None
  rows = t * (hq // hkv)
  if block is None:
    block = choose_block(rows, b * rows, b, hkv, s, d, shared_launch=shared_launch, itemsize=k.dtype.itemsize,
                         fill=fill)
  else:
    _check_block(block, hkv, d, k.dtype.itemsize)
  rows *= block.heads
  lengths = jnp.asarray(lengths, jnp.int32)
  if kv_index is None:  # sequence b reads row kv_offset + b: no index vectors at all (LevelSpec.per_sequence)
    unused = np.zeros((1,), np.int32)
    start = jnp.reshape(jnp.asarray(kv_offset, jnp.int32), (1,))
    new_k, new_v, new_count = (None, None, None) if new is None else new
    return (LevelSpec(block, rows, causal, identity_order=True, per_sequence=True, fresh=new is not None),
            LevelWork(k, v, unused, unused, unused, start, lengths, new_k, new_v, new_count))
  if new is not None:
    raise ValueError("per_sequence: new keys (new=...) need the sequences' own KV rows (kv_index None).")
  seqs = np.arange(b, dtype=np.int32)
  return (LevelSpec(block, rows, causal, identity_order=True),
          LevelWork(k, v, seqs, seqs, np.full((b,), rows, np.int32), kv_index, lengths))


def batched(
    q: Array, k: Array, v: Array, lengths: Array, seq_to_node: Array, *, node_offset: Array | int = 0,
    max_group: int | None, causal: bool, block: BlockConfig | None = None, shared_launch: bool = True,
    fill: bool = True,
) -> Plan | None:
  """Inter-sequence batching: the queries of all sequences that read node n form one row matrix per KV head.

  q `[B, T, Hq, D]`, k/v `[R, L, Hkv, D]` with node n at row node_offset + n, lengths `[N]`, seq_to_node `[B]`;
  max_group: static bound on the sequences of one node (None: B; a numpy seq_to_node, grouped on the host, bounds
  it by its largest node's readers). None if the level holds no keys. block, shared_launch, fill: as
  `per_sequence`.
  """
  b, t, hq, _ = q.shape
  _, s, hkv, d = k.shape
  n = lengths.shape[0]
  if s == 0:
    return None
  if n == 1:  # one node read by every sequence, in their natural order (order is not read): numpy constants
    order, counts, starts = np.zeros((1,), np.int32), np.full((1,), b, np.int32), np.zeros((1,), np.int32)
  else:  # the kernel visits the sequences node by node; a numpy seq_to_node is grouped here, on the host
    xp = np if isinstance(seq_to_node, np.ndarray) else jnp
    order = xp.argsort(seq_to_node, stable=True).astype(np.int32)
    counts = xp.bincount(seq_to_node, length=n) if xp is jnp else np.bincount(seq_to_node, minlength=n)
    counts = counts.astype(np.int32)
    starts = xp.cumsum(counts) - counts
  rows = t * (hq // hkv)
  group = b if max_group is None else min(max_group, b)
  # A tree known now bounds a node's readers by its most-read node's (one reader a node: 1, not B, groups of rows)
  if isinstance(counts, np.ndarray):
    group = min(group, max(int(counts.max(initial=0)), 1))
  max_rows = rows * group
  if block is None:
    block = choose_block(max_rows, b * rows, n, hkv, s, d, shared_launch=shared_launch, itemsize=k.dtype.itemsize,
                         fill=fill)
  else:
    _check_block(block, hkv, d, k.dtype.itemsize)
  nodes = np.arange(n, dtype=np.int32)
  return (LevelSpec(block, max_rows * block.heads, causal, identity_order=n == 1),
          LevelWork(k, v, order, starts, counts * rows * block.heads, node_offset + nodes,
                    lengths.astype(jnp.int32)))


def _shared_stages(specs: tuple[LevelSpec, ...], head_dim: int, itemsize: int,
                   limit: int | None) -> tuple[LevelSpec, ...]:
  """The specs of one launch, which runs every level with the most stages any of them has: fewer stages for all
  where a level would not fit `limit` bytes of shared memory with that many (each fits with its own)."""
  stages = max(spec.block.num_stages for spec in specs)
  exact = _measured_layout()
  while limit is not None and stages > min(spec.block.num_stages for spec in specs) and any(
      tile_shared_memory(dataclasses.replace(spec.block, num_stages=stages), head_dim, itemsize, exact) > limit
      for spec in specs):
    stages -= 1
  return tuple(dataclasses.replace(spec, block=dataclasses.replace(spec.block, num_stages=stages))
               for spec in specs)


LAUNCHES = ("auto", "fused", "interleaved", "separate")


def auto_launch(max_rows: list[int], tuning: Tuning | None = None) -> str:
  """The "auto" launch of levels whose groups have at most `max_rows` query rows per KV head: "interleaved" when a
  level has at least `tuning.interleave_rows` (its product is compute-bound, B·g rows against each KV element, so
  it overlaps with the memory-bound levels), else "fused"."""
  return "interleaved" if any(rows >= tuning_lib.resolve(tuning).interleave_rows for rows in max_rows) else "fused"


def run(q: Array, plans: list[Plan | None], *, scale: float, interpret: bool, launch: str = "auto",
        tuning: Tuning | None = None, stacked: bool = False, merge: bool = False) -> list[tuple[Array, Array]]:
  """`run_write` of plans of which none writes new keys: the parts."""
  if any(plan is not None and plan[0].fresh for plan in plans):
    raise ValueError("run: a plan carries new keys (per_sequence(new=...)); run_write returns the caches it writes.")
  return run_write(q, plans, scale=scale, interpret=interpret, launch=launch, tuning=tuning, stacked=stacked,
                   merge=merge)[0]


def run_write(q: Array, plans: list[Plan | None], *, scale: float, interpret: bool, launch: str = "auto",
              tuning: Tuning | None = None, stacked: bool = False, merge: bool = False
              ) -> tuple[list[tuple[Array, Array]], tuple[Array, Array] | None]:
  """Runs the plans: the `(out [B, T, Hq, D], lse [B, T, Hq])` parts, one per key split of each level (empty
  levels give none); stacked: one `(out [splits, B, T, Hq, D], lse [splits, B, T, Hq])` stack a level instead,
  as the kernel writes them (for `merge.merge_stacks`, which reads them without slicing). merge: where the levels
  share one launch and have more than one part, the launch merges them itself (`fused_levels(merge=True)`): one
  part, the merged `(out, lse)` (a stack of one).

  Returns (the parts, the written `(k, v)` caches of the plan that carries new keys, or None where none does).

  launch: "interleaved" (one launch, the levels' programs mixed over the grid so that compute-bound prefix
  programs and memory-bound suffix programs share the SMs; the shared level's programs spread over the stretch
  that also holds `tuning.interleave_lead` of the others, so the grid ends with short suffix programs:
  flash._schedule), "fused" (one launch, the levels' programs in order), "separate" (one launch per level, each
  with its own warps and stages), or "auto" (`auto_launch`). tuning: None is `tuning.current()`.
  """
  if launch not in LAUNCHES:
    raise ValueError(f"launch={launch!r}; expected one of {LAUNCHES}.")
  tuning = tuning_lib.resolve(tuning)
  plans = [plan for plan in plans if plan is not None]
  if launch == "auto":
    launch = auto_launch([spec.max_rows for spec, _ in plans], tuning)
  groups = [plans] if launch != "separate" else [[plan] for plan in plans]
  parts, written = [], None
  for group in groups:
    if not group:
      continue
    specs, works = zip(*group)
    specs = _shared_stages(specs, q.shape[-1], q.dtype.itemsize, shared_memory_limit())
    merged = merge and len(groups) == 1 and sum(spec.block.splits for spec in specs) > 1
    launch_parts, launch_written = fused_levels(
        q, tuple(works), specs=tuple(specs), scale=scale, interpret=interpret,
        lead=tuning.interleave_lead if launch == "interleaved" else 0.0, merge=merged)
    written = launch_written or written
    for out, lse in launch_parts:
      parts += [(out, lse)] if stacked else [(out[i], lse[i]) for i in range(out.shape[0])]
  return parts, written
