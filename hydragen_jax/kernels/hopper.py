"""Hopper kernel (Pallas Mosaic GPU): a decode step's shared prefix and every suffix in one persistent launch.

Why a second kernel: on the compute-bound configs (large B with GQA) the prefix product must run near the tensor
cores' rate *and* hide under the memory-bound suffix stream. The Triton tiles reach only ~290 TFLOP/s when they
share an SM with suffix programs (experiments/PERF_NOTES.md). Here each CTA (one per SM) runs three warpgroups
side by side, so that the suffixes' TMA copies stream while the prefix's wgmma run:

* warpgroups 0 and 1, the prefix pair: prefix items (h, c, r), 128 stacked query rows r of KV head h (64 each, one
  wgmma tile) over key split c of the prefix (`prefix_splits`: one split unless the items would leave SMs idle),
  whose key tiles warpgroup 1 loads into a ring that both read;
* warpgroup 2: suffix items (b, h), sequence b's T·g query rows of KV head h over its own keys, in its own ring
  (`suffix_pack`: the 8 / T·g sequences of an 8-row query window in one item); with `pair_suffix_cost` the pair
  takes a CTA's last suffix items once its prefix items are done.

Items go round-robin over the CTAs. Both are flash attention: online softmax over key tiles (the prefix's of
`prefix_keys` = 64 or 128 keys, the suffixes' of `suffix_keys` = 64 or 128), scores in base 2 (`s·scale·log2 e`).
A suffix item has so few query rows that a 64-row tile would be mostly padding, so warpgroup 2 transposes its tile:
keys on the wgmma's rows (64 a wgmma), the queries (an 8-aligned window of n ≥ T·g rows of `qt[h]`) on its N side
(the pair's suffix items keep rows = queries: its tensor cores are free once its prefix items are done). That
tile's softmax reduces over rows, across warps, through a shared-memory scratch that Mosaic GPU gives every
warpgroup of a CTA at the same address: only warpgroup 2 reduces that way, so nothing races on it.

The returned lse is natural-log, -inf for a query that sees no key (its out is 0). Masked scores are -inf and the
running max starts at a finite -1e30, so fully masked tiles never produce NaN. A tile's values past a length enter
its value product with a zero weight: without `zero_value_tails` they must be finite (NaN or inf there give NaN; a
model's caches start zeroed); with it, those rows are zeroed in shared memory first.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from hydragen_jax import tuning as tuning_lib
from hydragen_jax.kernels import ops
from hydragen_jax.kernels.flash import LOG2_E, M_START  # the online softmax's constants, as Triton's

Array = jax.Array

ROWS = 64  # query rows of one warpgroup's wgmma tile
PARTS = ("keys", "values")  # a ring slot's two tiles, each copied and released on its own barrier
PAIR = 2  # warpgroups 0 and 1 run the prefix, warpgroup 2 the suffixes
SMEM_LIMIT = ops.SHARED_MEMORY_BY_CAPABILITY["9.0"]  # bytes of shared memory a CTA may use on an H100 / H200 (227 KB)


@dataclasses.dataclass(frozen=True)
class HopperConfig(tuning_lib.HopperTuning):
  """Static configuration of the Hopper kernel. The defaults equal the H100 file's T·g >= 9 setting; `tuned_config()`
  gives the device's (its `hydragen_jax.tuning` file), which the kernel takes where no config is passed.

  num_ctas: CTAs of the persistent grid; None: one per SM of the device (either way no more than the work has items:
  `_busy_ctas`). prefix_stages / suffix_stages: key tiles
  in flight in the prefix pair's ring and in the suffix warpgroup's (shared memory: `_smem_bytes`, at most
  SMEM_LIMIT). pair_registers / suffix_registers: registers a thread
  of the pair / of the suffix warpgroup (setmaxnreg; multiples of 8, 2·pair + suffix <= `tuning.REGISTER_POOL`,
  504). pingpong: the pair takes turns on the tensor cores, one's softmax running under the other's products
  (FlashAttention-3's schedule; needs prefix_stages >= 2).
  prefix_keys: keys of a prefix tile, 64 or 128 (score products of N = 128: fewer barrier round trips per key, at
  twice the shared memory a stage).
  q_registers: the pair holds its queries in registers (the score product's A operand, 32 a thread at D = 128),
  loaded from and stored to global memory directly, without the 32 KB shared buffer that otherwise holds q and
  stages the out: room for 128-key tiles with 2 suffix stages.
  cluster: CTAs (1 or 2) that run prefix items of the same KV head side by side and share each prefix key tile: each
  loads its part and the TMA multicasts it to both, so the prefix tiles cross from L2 to the SMs once a cluster, not
  once a CTA (the prefix rows are padded to whole clusters of items; the persistent grid takes an even CTA count).
  suffix_keys: keys of a suffix tile, 64 or 128 (half the suffix warpgroup's cross-warp softmax reductions and
  barrier round trips per key, at twice the shared memory a stage: with q_registers, 2 stages fit beside 2 prefix
  stages of 64 keys).
  suffix_lookahead: the suffix warpgroup's ring runs on across its items: the key tiles of its next item are loaded
  as the current item's last tiles free their slots, and the next item's queries (a second buffer) while the
  current one runs, so a short item (a decode step's suffix: one or two tiles) does not wait a memory latency.
  suffix_trim: a suffix's last tile is copied only as far as its keys reach, rounded up to 8, 16, 32, ... keys (a
  one-token suffix reads 8 keys of K and V, not a whole tile: 4 KB instead of 32 KB at D = 128 and 64-key tiles).
  The rest of the slot keeps an earlier tile's values, which the mask gives zero weight in the sequence's own query
  columns (those of the window's padding may see them; they are never stored); the value ring is zeroed once at the
  start, so that what shared memory held before the kernel (NaN, say) never meets a zero weight.
  prefix_overlap: each warpgroup of the pair issues a tile's score product together with the previous tile's value
  product and runs the softmax while the value product is on the tensor cores (FlashAttention-3's intra-warpgroup
  pipelining, `_flash_overlapped`; needs prefix_stages >= 2: a slot's value tile is released one tile later than
  its key tile, each refilled on its own). Costs registers: the previous tile's probabilities (16 a thread for
  64-key tiles, 32 for 128) are held, and the output accumulator is tied up by its wgmma during the softmax.
  prefix_early_keys: the pair releases a slot's key tile as soon as both warpgroups' score products have read it,
  and its value tile after their value products (as JAX's own Mosaic GPU attention kernel does), so the loader
  copies the next key tile into the slot half a tile earlier than when both are released together after the value
  products: with 2 stages and the ping-pong, from half a tile's time to a whole one to hide the copy's latency.
  Exclusive with prefix_overlap (which releases them apart already).
  prefix_key_stages: with prefix_early_keys, the pair's key tiles in a ring of this many slots, more than the value
  tiles' prefix_stages (0: as many), so that a key tile is copied further ahead of its score product than its
  value tile of its value product: at D = 128 a 64-key slot is 16 KB, and the H200's T·g = 4 setting (2 + 2
  stages, 128-key suffix tiles) has room for one more key slot (`_smem_bytes`).
  prefix_fill: with fewer prefix items (KV heads × 128-row blocks) than this many per CTA, the prefix keys are split
  (flash-decoding), the splits doubled until every CTA has an item, while a split keeps at least 2 key tiles: e.g.
  the 7B decode layer split over two GPUs (B = 512, 16 heads) has 64 items for 132 SMs, and 4 splits. Each split is
  a part of its own to merge. 0: never split.
  prefix_splits: the key splits of every prefix item (a power of two or not); None: from prefix_fill and the shapes
  (`prefix_splits_for`).
  suffix_pack: where T·g is 1, 2 or 4, a suffix item is the 8 / T·g sequences whose query rows fill one 8-row
  window, not one sequence: each tile holds block_k / (8 / T·g) keys of each of them (a copy each, skipped where the
  sequence has no keys left), their scores masked to a block diagonal. The suffix warpgroup runs each item's chain
  (copies, two wgmma and their waits, the softmax's cross-warp reductions, the stores) once for 8 / T·g sequences:
  a decode step's one-token suffixes are bound by that chain, ~600 instructions a warp and 16 barriers an item at
  T·g = 1 (Nsight Compute, B = 256 MHA on the H200: ~2.3 µs an item). suffix_trim does not apply to packed items
  (their copies are already block_k / (8 / T·g) keys); the value ring is zeroed once at the start, as with it.
  suffix_box: with suffix_pack, a tile in which every sequence of the item has keys is one TMA copy of K and one of
  V (a box of 8 / T·g consecutive sequences × their block_k / (8 / T·g) keys × D, the caches read as
  `[B, S, Hkv·D]`) instead of one copy a sequence: the same bytes, since each sequence's copy takes its whole
  sub-block; a tile where some sequence has no keys left (or lies past the batch) is copied a sequence at a time as
  before, so no sub-block past a sequence's last one is read. The suffix rings are then
  `[stages, 8 / T·g, keys a sequence, D]`, the same bytes as `[stages, block_k, D]` (a tile's rows sequence by
  sequence), which `_flash` reads through a reshape (needs suffix_pack).
  suffix_late_sum: the suffix warpgroup keeps the softmax's running sum per score (`[keys, n]`: each thread the sum
  of its own keys' probabilities, rescaled as the max moves) and sums it over the keys once an item, after its last
  tile, instead of once a tile: a suffix tile's softmax then reduces across the warps only for its max. The suffix
  stream is a chain of latencies a tile (two wgmma and their waits, the cross-warp reductions, the stores), and
  the sum's reduction is one of its links; costs n·keys / 128 registers a thread (4 for a 64-key tile of an 8-row
  window, 8 at 128 keys).
  zero_value_tails: in every tile that holds keys past a length (a part's last tiles; in a packed item, every tile
  where some sequence of the window has ended), the rows of those keys in the value tile are set to zero in shared
  memory before its value product (`_zero_rows`: a load, a select and a store of the tile, 64 × 64 at a time, by
  the warpgroup, then a fence), so that whatever a cache holds there (NaN, inf) stays out of the output, as on the
  reference and the Triton kernels; without it those rows meet a zero weight, and 0·NaN is NaN. Both warpgroups
  of the pair zero their shared tile: they write the same values (a row's own or zero), so neither can see
  anything else.
  pair_suffix_cost, pair_prefix_cost: with pair_suffix_cost > 0, the pair takes suffix items once its prefix items
  are done, where an item fills whole 8-row windows (packed, or T·g a multiple of 8: `_shares`): warpgroup 2 runs
  the first K of a CTA's suffix items, the pair's warpgroups the others, each its own (`pair_split` picks K so that
  both finish together on the mean suffix length). The costs are in warpgroup 2's time for one of its suffix tiles:
  pair_suffix_cost one warpgroup of the pair's time for one of its suffix tiles (64 keys, the item's window in the
  first rows of a 64-row query tile), pair_prefix_cost the pair's time for one prefix tile; an item counts one tile
  more for its fixed cost. The pair's tiles go through its prefix rings as 64-key slots (warpgroup w: those of
  value and key slots w, w + 2, ...; needs prefix_stages >= 2; a 128-key slot holds two, so that a tile's copy runs
  under the previous tile's products), scored rows = queries (no cross-warp reduction: warpgroup 2's reduction
  scratch stays its own), each out staged in its first value slot. So on a suffix-bound step (long
  suffixes beside a short prefix product) three warpgroups stream the suffixes, and on a prefix-bound one K is
  every item. 0: warpgroup 2 runs them all.
  suffix_early_keys: warpgroup 2 releases a slot's key tile once its score product has read it, and its value tile
  after the value product (each refilled on its own, as prefix_early_keys does for the pair), so that the next key
  tile's copy starts about half a tile earlier: the suffix stream is a chain of latencies a tile, one of which is
  the copy's, exposed where the ring has few stages.
  """

  # The measured settings are HopperTuning's fields (its checks too), here with the H100's values as defaults.
  prefix_stages: int = 3
  suffix_stages: int = 2
  pair_registers: int = 208
  suffix_registers: int = 88
  pingpong: bool = True
  num_ctas: int | None = None
  prefix_splits: int | None = None

  def __post_init__(self):
    super().__post_init__()
    for name in ("prefix_splits", "num_ctas"):
      value = getattr(self, name)
      if value is not None and (not tuning_lib.is_int(value) or value < 1):
        raise ValueError(f"HopperConfig.{name} must be None or a positive int; got {value!r}.")



def config_of(settings: tuning_lib.HopperTuning) -> HopperConfig:
  """The kernel's configuration with the measured `settings` (one entry of `Tuning.hopper` or `hopper_long`), one
  CTA per SM."""
  return HopperConfig(**dataclasses.asdict(settings))


def tuned_config(tuning: tuning_lib.Tuning | None = None, rows: int = 1, prefix: int = 0) -> HopperConfig:
  """The kernel's settings in the device's tuning (None: `tuning.current()`) for `rows` query rows a sequence and KV
  head (T·g) and a prefix of `prefix` keys (`Tuning.hopper_for`), one CTA per SM."""
  return config_of(tuning_lib.resolve(tuning).hopper_for(rows, prefix))


def query_rows(q_shape: tuple[int, ...], num_kv_heads: int) -> int:
  """T·g: query rows of one sequence and KV head (a suffix item's rows; `Tuning.hopper_for` keys the settings by
  it) of queries `[B, T, Hq, D]` over `num_kv_heads` KV heads."""
  return q_shape[1] * q_shape[2] // num_kv_heads


def supported(q: Array, prefix_k: Array, suffix_k: Array, config: HopperConfig | None = None) -> str | None:
  """None if the Hopper kernel handles q `[B, T, Hq, D]` over prefix_k `[P, Hkv, D]` and suffix_k `[B, S, Hkv, D]`
  with `config` (None: `tuned_config()` for these T·g rows and this prefix capacity), else the reason it does not."""
  _, steps, num_q_heads, head_dim = q.shape
  rows = query_rows(q.shape, prefix_k.shape[-2])
  if rows < 1:
    return f"T·Hq = {steps * num_q_heads} query rows for {prefix_k.shape[-2]} KV heads: under one a KV head"
  config = tuned_config(rows=rows, prefix=prefix_k.shape[0]) if config is None else config
  if q.dtype not in (jnp.bfloat16, jnp.float16) or {prefix_k.dtype, suffix_k.dtype} != {q.dtype}:
    return f"dtypes {q.dtype}/{prefix_k.dtype}/{suffix_k.dtype}: wgmma tiles take 16-bit inputs, all the same"
  if head_dim not in (64, 128):
    return f"head dim {head_dim}: shared memory holds D = 64 or 128"
  if _window_rows(rows) > ROWS:
    return f"T·g = {rows} query rows per sequence and KV head: their 8-aligned window exceeds {ROWS} rows"
  if 0 in (prefix_k.shape[0], suffix_k.shape[1]):
    return (f"prefix capacity {prefix_k.shape[0]} or suffix capacity {suffix_k.shape[1]} is 0 (a TMA copy needs a "
            "key: the Triton kernels read the other level alone)")
  if any(n % 8 and n > 8 for n in (prefix_k.shape[0], suffix_k.shape[1])):
    return (f"prefix capacity {prefix_k.shape[0]} or suffix capacity {suffix_k.shape[1]} is over 8 and not a "
            "multiple of 8 (a TMA copy needs the caches' key dimension in whole 8-row tiles, or under one)")
  if (need := _smem_bytes(head_dim, rows, config)) > SMEM_LIMIT:
    return f"shared memory: {need} bytes for D = {head_dim} and T·g = {rows}, over the SM's {SMEM_LIMIT}"
  return None


def prefix_items(q_shape: tuple[int, ...], num_kv_heads: int) -> int:
  """Prefix items of queries `[B, T, Hq, D]` over `num_kv_heads` KV heads: (KV head, block of PAIR·ROWS = 128
  stacked query rows). The persistent grid has one CTA per SM and each item runs on one CTA's pair, so with fewer
  items than SMs the prefix product uses only part of the tensor cores (`dispatch.pays_on_hopper`), unless its
  keys are split (`prefix_fill`: each split another item). Items of real rows only: with `cluster = 2` a KV head
  with an odd count of blocks runs one more item, of padding."""
  rows = q_shape[0] * query_rows(q_shape, num_kv_heads)  # B·T·g
  return num_kv_heads * -(-rows // (PAIR * ROWS))


def prefix_splits_for(q_shape: tuple[int, ...], num_kv_heads: int, prefix_capacity: int, config: HopperConfig) -> int:
  """Key splits of each prefix item: 1 where the items (`prefix_items`) are at least `config.prefix_fill` per CTA;
  else doubled from 1 while the items times the splits are fewer than the CTAs and each split would still hold at
  least 2 key tiles of the prefix's capacity (the capacity, not the traced length: a short prefix in a large cache
  may leave splits empty, which cost time, not exactness)."""
  items, splits = prefix_items(q_shape, num_kv_heads), 1
  if items >= config.prefix_fill * config.num_ctas:
    return 1
  while items * splits < config.num_ctas and prefix_capacity >= 2 * splits * 2 * config.prefix_keys:
    splits *= 2
  return splits


def with_grid(q_shape: tuple[int, ...], num_kv_heads: int, prefix_capacity: int, config: HopperConfig,
              num_cores: int) -> HopperConfig:
  """`config` with what it leaves open filled for queries `[B, T, Hq, D]`: `num_ctas`, one CTA per SM of a device
  of `num_cores` SMs in whole clusters, and `prefix_splits` (`prefix_splits_for`). What the kernel launches (before
  capping the CTAs at the items), and what `dispatch.pays_on_hopper` counts."""
  if config.num_ctas is None:
    config = dataclasses.replace(config, num_ctas=num_cores // config.cluster * config.cluster)
  if config.prefix_splits is None:
    config = dataclasses.replace(config, prefix_splits=prefix_splits_for(q_shape, num_kv_heads, prefix_capacity,
                                                                         config))
  return config


def _busy_ctas(q_shape: tuple[int, ...], num_kv_heads: int, config: HopperConfig) -> int:
  """CTAs that get an item (prefix: KV head × key split × 128-row block, the blocks padded to whole clusters;
  suffix: sequence or packed window × KV head) when there are at least as many CTAs, in whole clusters."""
  batch, qrows = q_shape[0], query_rows(q_shape, num_kv_heads)
  block = PAIR * ROWS * config.cluster
  prefix = num_kv_heads * config.prefix_splits * (-(-batch * qrows // block) * config.cluster)
  suffix = num_kv_heads * -(-batch // suffix_pack_of(qrows, config))
  return max(-(-max(prefix, suffix, 1) // config.cluster) * config.cluster, config.cluster)


def _scratch(head_dim: int, srows: int, dtype, config: HopperConfig, interpret: bool, pack: int = 1,
             share: bool = False) -> tuple:
  """The kernel's shared memory: buffers and barriers, in `_kernel`'s order (`pack`: sequences a suffix item, each
  a copy arriving on its tile's barriers; `share`: the pair takes suffix items, `_shares`)."""
  tiled = dict(transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))
  ring = lambda stages, keys: plgpu.SMEM((stages, keys, head_dim), dtype, **tiled)
  # suffix_box, compiled: a slot holds `pack` sub-blocks of keys // pack rows (one box copy fills them all)
  # (tiled (1, 8, 64): a tile never spans two sub-blocks, so that the sub-blocks fold into the [block_k, D] that
  # the wgmma reads, a tile of (8, 64) as in `ring`)
  suffix_ring = ring if interpret or not _boxed(config, pack) else (
      lambda stages, keys: plgpu.SMEM((stages, pack, keys // pack, head_dim), dtype,
                                      transforms=(plgpu.TilingTransform((1, 8, 64)), plgpu.SwizzleTransform(128))))

  def prefix_read(slots):  # a barrier a prefix slot: both warpgroups of the pair (in a cluster: of both CTAs) arrive
    if config.cluster > 1:
      return plgpu.ClusterBarrier(collective_axes=("cluster",), num_arrivals=PAIR, num_barriers=slots)
    return plgpu.Barrier(num_arrivals=PAIR, num_barriers=slots)
  key_stages = _key_stages(config)
  return (
      # the pair's queries, then their out (q_registers: none; interpreted, the wgmma's A operand, see _accumulate)
      plgpu.SMEM((PAIR, ROWS, head_dim), dtype, **tiled) if interpret or not config.q_registers else None,
      plgpu.SMEM((PAIR, ROWS), jnp.float32),  # their lse
      ring(key_stages, config.prefix_keys), ring(config.prefix_stages, config.prefix_keys),  # prefix K, V
      plgpu.SMEM((2, srows, head_dim) if config.suffix_lookahead else (srows, head_dim), dtype,
                 **tiled),  # a suffix item's queries (suffix_lookahead: and the next item's)
      plgpu.SMEM((srows, head_dim), dtype),  # its out
      plgpu.SMEM((srows,), jnp.float32),  # its lse
      plgpu.SMEM((srows, config.suffix_keys), dtype, **tiled),  # a suffix tile's probabilities, transposed
      # suffix K, V
      suffix_ring(config.suffix_stages, config.suffix_keys), suffix_ring(config.suffix_stages, config.suffix_keys),
      plgpu.Barrier(num_barriers=PAIR + 1 + config.suffix_lookahead),  # query copies, one per query buffer
      plgpu.Barrier(num_barriers=key_stages),  # prefix key tile copied
      plgpu.Barrier(num_barriers=config.prefix_stages),  # prefix value tile copied
      # prefix slot read by both warpgroups (of both CTAs of a cluster: their tiles are multicast); with
      # prefix_overlap or prefix_early_keys its key tile (then a key slot)
      prefix_read(key_stages),
      plgpu.Barrier(num_arrivals=pack, num_barriers=config.suffix_stages),  # suffix key tile copied
      plgpu.Barrier(num_arrivals=pack, num_barriers=config.suffix_stages),  # suffix value tile copied
      plgpu.Barrier(num_arrivals=PAIR),  # the pair's ping-pong
      plgpu.SMEM((PAIR, ROWS, config.prefix_keys), dtype, **tiled) if interpret else None,  # see _accumulate
      # prefix_overlap, prefix_early_keys: a slot's value tile read by both warpgroups (the barrier above then counts
      # its key tile)
      prefix_read(config.prefix_stages) if config.prefix_overlap or config.prefix_early_keys else None,
      # share: the pair's suffix tiles copied into a 64-key slot of the prefix rings (K, V; `pack` copies a tile)
      *((plgpu.Barrier(num_arrivals=pack, num_barriers=config.prefix_stages * config.prefix_keys // ROWS),) * 2
        if share else (None, None)),
  )


def _key_stages(config: HopperConfig) -> int:
  """Slots of the pair's key ring (`prefix_key_stages`, 0: as the value ring's `prefix_stages`)."""
  return config.prefix_key_stages or config.prefix_stages


def _smem_bytes(head_dim: int, qrows: int, config: HopperConfig) -> int:
  """Shared memory of one CTA (16-bit inputs) for T·g = `qrows` rows a sequence as Mosaic GPU lays it out: every
  buffer of `_scratch` rounded up to 1 KB, the 2 KB cross-warp reduction scratch and 8 bytes a barrier; checked
  against Mosaic GPU's own count on the lowered kernel (`tests/test_hopper.py`)."""
  total = 2048
  for item in _scratch(head_dim, _window_rows(qrows), jnp.bfloat16, config, interpret=False,
                       share=_shares(config, qrows)):
    if isinstance(item, (plgpu.Barrier, plgpu.ClusterBarrier)):
      total += 8 * math.prod(item.num_barriers)
    elif item is not None:
      total += -(-math.prod(item.shape) * jnp.dtype(item.dtype).itemsize // 1024) * 1024
  return total


def _boxed(config: HopperConfig, pack: int) -> bool:
  """Whether packed suffix items (`pack` sequences each, `suffix_pack_of`) copy their tiles in boxes."""
  return config.suffix_box and pack > 1


def _window_rows(qrows: int) -> int:
  """Rows of the 8-aligned window that holds one sequence's `qrows` rows wherever it starts (offset < 8)."""
  max_offset = 8 - math.gcd(qrows, 8)
  return -(-(qrows + max_offset) // 8) * 8


def _shares(config: HopperConfig, qrows: int) -> bool:
  """Whether the pair takes suffix items (`pair_suffix_cost` > 0) for `qrows` = T·g rows a sequence: where an item
  fills whole 8-row windows (packed, or T·g a multiple of 8), which the pair stores whole."""
  return config.pair_suffix_cost > 0 and (suffix_pack_of(qrows, config) > 1 or qrows % 8 == 0)


def pair_split(num_items, prefix_tiles, mean_keys, config: HopperConfig, pack: int):
  """K, where the pair takes suffix items (`_shares`): of a CTA's `num_items` suffix items warpgroup 2 runs [0, K)
  and the pair [K, num_items) once its `prefix_tiles` prefix tiles are done, K balancing the two finish times for
  suffixes of `mean_keys` keys: K·w2 = prefix + (num_items - K)·wp / PAIR, w2 and wp an item's time on warpgroup 2
  and on one warpgroup of the pair (its tiles, `suffix_keys` / `pack` and 64 / `pack` keys of a sequence each, and one tile more for the item's fixed cost; the pair's at `pair_suffix_cost` each), prefix the prefix
  tiles at `pair_prefix_cost` each, all in warpgroup 2's tile times (a packed item runs as long as its longest
  sequence: with ragged lengths the mean undercounts, which the measured costs absorb). Integer arithmetic in
  1/16ths of a tile time (int32 [] from traced or Python ints; in range for caches that fit a GPU's memory and
  costs below ~500)."""
  cost = lambda c: max(round(16 * c), 1)
  w2 = (pl.cdiv(mean_keys, config.suffix_keys // pack) + 1) * 16
  wp = (pl.cdiv(mean_keys, ROWS // pack) + 1) * cost(config.pair_suffix_cost)
  k = pl.cdiv(PAIR * prefix_tiles * cost(config.pair_prefix_cost) + num_items * wp, PAIR * w2 + wp)
  return jnp.clip(k, 0, num_items)


def suffix_pack_of(qrows: int, config: HopperConfig) -> int:
  """Sequences a suffix item holds: 8 / T·g with `config.suffix_pack` where T·g (`qrows`) is 1, 2 or 4 (the 8-row
  query window holds whole sequences), else 1."""
  return 8 // qrows if config.suffix_pack and qrows in (1, 2, 4) else 1


class _Slots:
  """A ring `[stages, keys, D]` (shared memory) seen as one of `[stages · keys / rows, rows, D]`, by indexing (the
  interpreter takes no reshape of a ref): slot i is rows (i mod keys / rows)·rows ... of slot i // (keys / rows).
  What `_flash` and the copies use of a ring: `shape`, `dtype`, `at[i]` and `at[i, rows]`."""

  def __init__(self, ring, rows: int):
    self.ring, self.rows, self.per = ring, rows, ring.shape[1] // rows
    self.shape, self.dtype = (ring.shape[0] * self.per, rows, *ring.shape[2:]), ring.dtype

  @property
  def at(self):
    return self

  def __getitem__(self, index):
    slot, rows = index if isinstance(index, tuple) else (index, pl.ds(0, self.rows))
    return self.ring.at[slot // self.per, pl.ds(slot % self.per * self.rows + rows.start, rows.size)]


def _product(a, b, acc_ref, issued=lambda: None):
  """a @ b on the tensor cores (wgmma) into a zeroed accumulator; returns it (waiting for the wgmma). `issued()`
  runs between issuing the wgmma and waiting for it."""
  plgpu.wgmma(acc_ref, a, b)
  issued()
  return acc_ref[...]


def _accumulate(acc, p, v_tile, p_smem):
  """acc + p @ v_tile `[64, D]` (rows = queries). Compiled (p_smem None): p is the wgmma's register operand and
  the wgmma accumulates into acc in place. The interpreter takes neither a register operand nor a pre-initialised
  accumulator, so there p goes through shared memory and the product into a fresh accumulator."""
  if p_smem is None:
    return pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, p, v_tile))(plgpu.ACC.init(acc))
  p_smem[...] = p
  plgpu.commit_smem()
  return acc + pl.run_scoped(functools.partial(_product, p_smem, v_tile), plgpu.ACC(acc.shape, jnp.float32))


def _accumulate_keys_major(acc, p, v_tile, p_smem):
  """acc + v_tileᵀ @ p `[D, n]` for p `[keys, n]`: p goes to shared memory, written transposed (`[n, keys]`,
  the wgmma's K-major B operand), and vᵀ is read from v_tile `[keys, D]` as a transposed A operand."""
  p_smem.transpose((1, 0))[...] = p
  plgpu.commit_smem()
  return acc + pl.run_scoped(functools.partial(_product, v_tile.transpose((1, 0)), p_smem.transpose((1, 0))),
                             plgpu.ACC(acc.shape, jnp.float32))


def _zero_rows(v_tile, keep):
  """Zero the rows r of the value tile `v_tile` `[keys, D]` (shared memory) where `keep(r)` is false (r: the rows'
  indices, int32 `[64, 64]`), before a wgmma reads it (`zero_value_tails`). A 64 × 64 block at a time (the
  tiling's 64 columns): 16 registers a thread."""
  wgmma = plgpu.Layout.WGMMA
  for start in range(0, v_tile.shape[0], ROWS):
    for col in range(0, v_tile.shape[1], 64):
      block = v_tile.at[pl.ds(start, ROWS), pl.ds(col, 64)]
      v = plgpu.load(block, layout=wgmma)
      block[...] = jnp.where(keep(plgpu.broadcasted_iota(jnp.int32, v.shape, 0, layout=wgmma) + start), v,
                             jnp.zeros_like(v))
  plgpu.commit_smem()  # the generic proxy's stores, before the wgmma (the async proxy) reads the tile


def _zero_tail(v_tile, value_keep, j):
  """`_zero_rows` of tile j where it holds a row to zero: `value_keep(j)` is (whether some row of the tile lies
  past a length, bool []; its rows' keep(r))."""
  past, keep = value_keep(j)
  pl.when(past)(functools.partial(_zero_rows, v_tile, keep))


def _softmax_tile(s, m, l, *, scale2, key_axis, late_sum=False):
  """One key tile of the online softmax (base 2) over scores s, per query along the axis that is not `key_axis`:
  (p = exp2(s·scale2 - m_new), unnormalised, float32; m_new, the running max; alpha = exp2(m - m_new), the factor
  for what came before; l·alpha + the sum of p). late_sum: l has the scores' shape, a sum per score (l·alpha + p),
  to be summed over the keys after the last tile."""
  m_new = jnp.maximum(m, s.max(axis=key_axis) * scale2)
  alpha = jnp.exp2(m - m_new)
  per_score = lambda x: lax.broadcast_in_dim(x, s.shape, [1 - key_axis])
  p = jnp.exp2(s * scale2 - per_score(m_new))  # one FMA and an exp2 per score
  return p, m_new, alpha, (l * per_score(alpha) + p if late_sum else l * alpha + p.sum(axis=key_axis))


def _flash_start(acc_shape: tuple[int, int], num_q: int, key_axis: int):
  """The online softmax's start in the wgmma's layouts: (acc 0 `acc_shape`, running max M_START, sum 0) per query."""
  wgmma = plgpu.Layout.WGMMA
  return (plgpu.layout_cast(jnp.zeros(acc_shape, jnp.float32), wgmma),
          plgpu.layout_cast(jnp.full((num_q,), M_START, jnp.float32), wgmma.reduce(key_axis)),
          plgpu.layout_cast(jnp.zeros((num_q,), jnp.float32), wgmma.reduce(key_axis)))


def _flash(q_smem, k_smem, v_smem, p_smem, k_bar, v_bar, slot_of, after, num_tiles, num_full, limit, *, scale2,
           keys_major, late_sum=False, keys_read=None, key_slot_of=None, value_keep=None, issued=lambda: None,
           softmax_done=lambda: None, before_pv=lambda: None):
  """Online softmax of the queries in q_smem over `num_tiles` key tiles (flash attention, scores in base 2).

  Tile j sits in ring slot `slot_of(j)` of k_smem/v_smem `[stages, keys, D]`, its copies arriving on `k_bar(slot)`
  and `v_bar(slot)`; `after(j, slot)` runs once the tile is no longer read (it refills or releases the slot); with
  `keys_read`, `keys_read(j, slot)` runs once its key tile is no longer read (its score product complete), and
  `after` then stands for the value tile alone; with `key_slot_of` too, key tile j sits in k_smem's slot
  `key_slot_of(j)` (a key ring of its own length), which k_bar and keys_read are then given. With
  `value_keep`, tile j's value rows past a length are zeroed before its value product (`_zero_tail`; masked tiles
  only: a tile below `num_full` has no key past a length).
  `issued()` runs once a tile's score product is issued, `softmax_done()` after its softmax, `before_pv()` before
  its value product (the prefix pair's ping-pong, see `_kernel`).
  Tiles below `num_full` are visible to every query and skip the mask; in the others a key at position < `limit`
  is visible (limit broadcasts against the score tile: per query when causal), or where `limit(j)`, a callable
  (tile j's boolean mask of the tile's shape: packed suffix items).

  Two orientations of the score tile:
  * rows = queries (`[64, keys]`, q_smem `[64, D]`): the prefix's tiles; acc `[64, D]`.
  * keys_major (`[block_k, n]`, q_smem `[n, D]`, n = 8 … 64): a suffix item's few query rows on the wgmma's N side
    instead of 64 rows of mostly padding (8× less tensor and ALU work for n = 8); acc `[D, n]`.

  late_sum (keys_major): the sum of exp2 kept per score and summed over the keys after the last tile
  (`_softmax_tile`).

  Returns (acc, m, l): unnormalised output, running max (base 2), sum of exp2, per query.
  """
  block_k, head_dim = k_smem.shape[-2:]
  key_axis = 0 if keys_major else 1
  q_axis = 1 - key_axis
  num_q = q_smem.shape[0]
  tile = (block_k, num_q) if keys_major else (num_q, block_k)
  keys = plgpu.broadcasted_iota(jnp.int32, tile, key_axis, layout=plgpu.Layout.WGMMA)

  def body(masked, j, carry):
    acc, m, l = carry
    slot = slot_of(j)
    kslot = slot if key_slot_of is None else key_slot_of(j)
    plgpu.barrier_wait(k_bar(kslot))
    k_tile = k_smem.at[kslot]
    a, b = (k_tile, q_smem.transpose((1, 0))) if keys_major else (q_smem, k_tile.transpose((1, 0)))
    s = pl.run_scoped(functools.partial(_product, a, b, issued=issued), plgpu.ACC(tile, jnp.float32))
    if keys_read is not None:  # reading the scores waited for their wgmma: the key tile is no longer read
      keys_read(j, kslot)
    if masked:
      s = jnp.where(limit(j) if callable(limit) else keys + j * block_k < limit, s, -jnp.inf)
    p, m_new, alpha, l = _softmax_tile(s, m, l, scale2=scale2, key_axis=key_axis, late_sum=late_sum)
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [q_axis])
    softmax_done()
    if masked and value_keep is not None:
      p = p.astype(k_smem.dtype)  # 16-bit before the zeroing's registers are live
      plgpu.barrier_wait(v_bar(slot))
      _zero_tail(v_smem.at[slot], value_keep, j)
    else:
      plgpu.barrier_wait(v_bar(slot))
    before_pv()
    p = p.astype(k_smem.dtype)
    if keys_major:
      acc = _accumulate_keys_major(acc, p, v_smem.at[slot], p_smem)
    else:
      acc = _accumulate(acc, p, v_smem.at[slot], p_smem)
    after(j, slot)  # reading the product waited for the wgmma: the slot is no longer read
    return acc, m_new, l

  start = _flash_start((head_dim, num_q) if keys_major else (num_q, head_dim), num_q, key_axis)
  if late_sum:  # the sum per score (no tile: zeros, which sum to 0)
    start = (*start[:2], plgpu.layout_cast(jnp.zeros(tile, jnp.float32), plgpu.Layout.WGMMA))
  num_full = jnp.clip(num_full, 0, num_tiles)
  carry = lax.fori_loop(0, num_full, functools.partial(body, False), start)
  acc, m, l = lax.fori_loop(num_full, num_tiles, functools.partial(body, True), carry)
  return acc, m, (l.sum(axis=key_axis) if late_sum else l)


def _flash_overlapped(q, k_smem, v_smem, p_smem, k_bar, v_bar, slot_of, keys_read, values_read, num_tiles, num_full,
                      limit, *, scale2, value_keep=None, issued=lambda: None, softmax_done=lambda: None,
                      before_pv=lambda: None):
  """`_flash` for the prefix pair's tiles (rows = queries; same arguments and result) with FlashAttention-3's
  overlap inside a warpgroup: tile j's score product and tile j - 1's value product are issued together, the wait
  is for the score product alone (`wgmma_accumulator_load(wait_n=1)`: wgmma groups complete in order), and tile j's
  softmax runs while the value product is still on the tensor cores. So each tile's value product comes one tile
  after its scores: the loop carries the probabilities of the tile before. A slot's key and value tiles are released
  apart: the keys once their scores are complete (`keys_read(j, slot)`), the values one tile later, once their
  product has read them (`values_read(j, slot)`), so that a 2-stage ring still loads the next key tile a whole tile
  ahead (released together, tile j + 1's keys would wait for tile j - 1's value product).

    S_0 = q K_0ᵀ; softmax_0 -> P_0
    for j in 1 .. n-1:  issue S_j = q K_jᵀ, O += P_{j-1} V_{j-1};  wait S_j;  softmax_j -> P_j, α_j;  wait;  O *= α_j
    O += P_{n-1} V_{n-1}

  The ping-pong hooks keep their count and order a tile (`before_pv` gates both products of an iteration), so
  the pair's barrier sees the same sequence of arrivals and waits as with `_flash`. Interpreted (p_smem given) the
  same sequence runs one product at a time (the interpreter has neither register operands nor in-place
  accumulators). With `value_keep` (as `_flash`'s), the value tiles of the masked loop's previous tiles and the last
  tile are zeroed past the limit (that includes the last full tile: zeroing a full tile changes nothing)."""
  block_k, head_dim = k_smem.shape[-2:]
  num_q = q.shape[0]
  tile = (num_q, block_k)
  keys = plgpu.broadcasted_iota(jnp.int32, tile, 1, layout=plgpu.Layout.WGMMA)
  wgmma = plgpu.Layout.WGMMA

  def key_tile(slot):
    return k_smem.at[slot].transpose((1, 0))

  def softmax(s, m, l, j=None):  # j given: tile j's keys masked (those at positions >= limit)
    if j is not None:
      s = jnp.where(keys + j * block_k < limit, s, -jnp.inf)
    p, m_new, alpha, l = _softmax_tile(s, m, l, scale2=scale2, key_axis=1)
    return p.astype(k_smem.dtype), m_new, alpha, l

  def rescale(acc, alpha):
    return acc * lax.broadcast_in_dim(alpha, acc.shape, [0])

  def scores_first(_, carry):  # tile 0: its scores alone
    acc, m, l, _ = carry
    plgpu.barrier_wait(k_bar(slot_of(0)))
    s = pl.run_scoped(functools.partial(_product, q, key_tile(slot_of(0)), issued=issued), plgpu.ACC(tile))
    p, m, _, l = softmax(s, m, l, 0)  # masked: tile 0 may also be the last (acc is still 0: nothing to rescale)
    softmax_done()
    keys_read(0, slot_of(0))
    return acc, m, l, p

  def step(masked, j, carry):  # tile j's scores with tile j - 1's values
    acc, m, l, p_prev = carry
    slot, prev = slot_of(j), slot_of(j - 1)
    before_pv()
    plgpu.barrier_wait(k_bar(slot))
    plgpu.barrier_wait(v_bar(prev))
    if masked and value_keep is not None:
      _zero_tail(v_smem.at[prev], value_keep, j - 1)
    if p_smem is None:
      def both(refs):
        acc_ref, s_ref, out_refs = refs
        plgpu.wgmma(s_ref, q, key_tile(slot))
        plgpu.wgmma(acc_ref, p_prev, v_smem.at[prev])
        issued()
        s = plgpu.wgmma_accumulator_load(s_ref, wait_n=1)  # the value product stays in flight
        for ref, x in zip(out_refs, softmax(s, m, l, j if masked else None)):
          ref[...] = x

      zero = plgpu.layout_cast(jnp.zeros(tile, jnp.float32), wgmma)
      acc, _, (p, m, alpha, l) = pl.run_state(both)((plgpu.ACC.init(acc), plgpu.ACC.init(zero), (p_prev, m, m, l)))
    else:
      s = pl.run_scoped(functools.partial(_product, q, key_tile(slot), issued=issued), plgpu.ACC(tile))
      acc = _accumulate(acc, p_prev, v_smem.at[prev], p_smem)
      p, m, alpha, l = softmax(s, m, l, j if masked else None)
    softmax_done()
    keys_read(j, slot)  # tile j's scores are complete
    values_read(j - 1, prev)  # tile j - 1's value product has been waited for
    return rescale(acc, alpha), m, l, p

  def values_last(_, carry):  # tile n - 1's values
    acc, m, l, p = carry
    slot = slot_of(num_tiles - 1)
    before_pv()
    plgpu.barrier_wait(v_bar(slot))
    if value_keep is not None:
      _zero_tail(v_smem.at[slot], value_keep, num_tiles - 1)
    acc = _accumulate(acc, p, v_smem.at[slot], p_smem)
    values_read(num_tiles - 1, slot)
    return acc, m, l, p

  acc, m, l = _flash_start((num_q, head_dim), num_q, key_axis=1)
  p = plgpu.layout_cast(jnp.zeros(tile, k_smem.dtype), wgmma)
  some = jnp.minimum(num_tiles, 1)  # 0 or 1: the first and last tiles' parts run only where there are tiles
  num_full = jnp.clip(num_full, 1, jnp.maximum(num_tiles, 1))  # no tile: the loops below run [1, 1) and [1, 0)
  carry = lax.fori_loop(0, some, scores_first, (acc, m, l, p))
  carry = lax.fori_loop(1, num_full, functools.partial(step, False), carry)
  carry = lax.fori_loop(num_full, num_tiles, functools.partial(step, True), carry)
  acc, m, l, _ = lax.fori_loop(0, some, values_last, carry)
  return acc, m, l


def _normalise(acc, m, l, dtype, *, keys_major):
  """(out, lse): out = acc / l (0 where l = 0) in `dtype`, lse = (m + log2 l)·ln 2 (-inf where l = 0)."""
  seen = l > 0
  inv = jnp.where(seen, 1.0 / jnp.where(seen, l, 1.0), 0.0)
  out = (acc * lax.broadcast_in_dim(inv, acc.shape, [1 if keys_major else 0])).astype(dtype)
  return out, jnp.where(seen, (m + jnp.log2(jnp.where(seen, l, 1.0))) * math.log(2.0), -jnp.inf)


def _finish(acc, m, l, o_smem, lse_smem, *, keys_major):
  """Normalise (`_normalise`) into shared memory. keys_major: acc is `[D, n]` and goes to o_smem `[n, D]`
  transposed."""
  out, lse = _normalise(acc, m, l, o_smem.dtype, keys_major=keys_major)
  lse_smem[...] = lse
  if keys_major:
    o_smem.transpose((1, 0))[...] = out
  else:
    o_smem[...] = out
  plgpu.commit_smem()


def _kernel(qt_ref, pk_ref, pv_ref, sk_ref, sv_ref, lens_ref, op_ref, lp_ref, os_ref, ls_ref, scratch, *,
            config: HopperConfig, scale: float, batch: int, qrows: int, causal_t: int, group: int, pack: int,
            share: bool):
  """One warpgroup's part (module docstring). lens_ref: [suffix lengths (B), prefix length] (share: and the sum of
  the suffix lengths). pack: sequences a suffix item (`suffix_pack_of`). share: the pair takes suffix items after
  its prefix items (`_shares`)."""
  (pq_all, plse_all, pk_smem, pv_smem, q_smem, o_smem, lse_smem, p_smem, sk_smem, sv_smem,
   q_bars, pk_bars, pv_bars, consumed, sk_bars, sv_bars, sched, pp_all, consumed_v, pair_k_bars, pair_v_bars) = scratch
  wg, num_ctas, size = lax.axis_index("wg"), config.num_ctas, config.cluster
  member = lax.axis_index("cluster") if size > 1 else 0  # this CTA's place in its cluster
  cta = lax.axis_index("cta") * size + member
  num_heads = pk_ref.shape[1]
  splits = op_ref.shape[0]  # key splits of the prefix
  pairs = op_ref.shape[2] // (PAIR * ROWS)  # 128-row blocks per KV head (a multiple of the cluster size)
  srows = q_smem.shape[-2]  # rows of a suffix item's window
  flash = functools.partial(_flash, scale2=scale * LOG2_E)
  wgmma = plgpu.Layout.WGMMA

  def count(num_items, first=cta, step=num_ctas):  # items first, first + step, ... < num_items
    return (num_items - first + step - 1) // step

  # Prefix items go round-robin over the clusters, a cluster's CTAs taking consecutive items (the same KV head and
  # key split: the row block varies fastest). Item idx is (KV head, key split, row block).
  clusters, cluster_id = num_ctas // size, cta // size
  prefix_item = lambda i: (cluster_id + i * clusters) * size + member
  prefix_coords = lambda idx: (idx // (pairs * splits), idx // pairs % splits, idx % pairs)

  def pair_queries(src):
    """This warpgroup of the pair's 64 query rows `src` (gmem) as its score product's A operand: in registers
    (q_registers: plain loads straight into the wgmma's register layout) or in its buffer, which a prefix item's
    out is also staged in (the previous item's out and lse stores must have read shared memory first: q reloads
    into that buffer, and _finish will overwrite the lse buffer)."""
    if config.q_registers:
      q = plgpu.load(src, layout=plgpu.Layout.WGMMA, optimized=False)
      if pq_all is None:
        return q
      pq_all.at[wg][...] = q  # interpreted: its wgmma reads A from shared memory only
      plgpu.commit_smem()
    else:
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)
      plgpu.copy_gmem_to_smem(src, pq_all.at[wg], q_bars.at[wg])
      plgpu.barrier_wait(q_bars.at[wg])
    return pq_all.at[wg]

  def prefix_pair():
    """Warpgroups 0 and 1. The pair's key tiles form one stream g = i·n + j (item i, tile j, n tiles an item) in
    a ring of `stages` slots: warpgroup 1 loads tile g + stages once both have read tile g (both arrive on
    `consumed`, warpgroup 1 then waits for it; its own arrival matters only in a cluster). In a cluster the CTAs
    run the same stream (items of one KV head) and each tile is multicast to both, so a slot is refilled once all
    four warpgroups have read it. With prefix_overlap or prefix_early_keys a slot's key and value tiles are released
    and refilled apart (`consumed` counts the key tile's readers, `consumed_v` the value tile's); with
    prefix_key_stages the key tiles have a ring of their own length: key tile g sits in key slot g mod key_stages,
    its value tile in value slot g mod stages."""
    stages, block_k = pv_smem.shape[:2]
    key_stages = pk_smem.shape[0]
    ring = {"keys": key_stages, "values": stages}  # each part's slots: tile g's part sits in slot g mod that, and
    slot_in = lambda part, g: lax.rem(g, ring[part])  # once read, the slot takes the part of tile g + that
    length = lens_ref[batch]

    # Every split has n tiles: the keys' tiles shared out, the last split's extra tiles fully masked (they load the
    # cache's last tile, in range). One split: n = cdiv(length, block_k).
    n = pl.cdiv(pl.cdiv(length, block_k), splits)
    split_keys = n * block_k
    last_tile = max(pl.cdiv(pk_ref.shape[0], block_k) - 1, 0) * block_k
    items = count(num_heads * pairs * splits // size, cluster_id, clusters)  # the same in both CTAs of a cluster
    total = items * n
    loader = wg == 1
    multicast = dict(collective_axes="cluster") if size > 1 else {}

    def load(g, parts=PARTS):  # stream tile g's parts into their slots
      head, split, _ = prefix_coords(prefix_item(g // n))
      start = (g % n) * block_k
      if splits > 1:
        start = jnp.minimum(split * split_keys + start, last_tile)
      keys = pl.ds(start, block_k)
      if "keys" in parts:
        slot = slot_in("keys", g)
        plgpu.copy_gmem_to_smem(pk_ref.at[keys, head], pk_smem.at[slot], pk_bars.at[slot], **multicast)
      if "values" in parts:
        slot = slot_in("values", g)
        plgpu.copy_gmem_to_smem(pv_ref.at[keys, head], pv_smem.at[slot], pv_bars.at[slot], **multicast)

    @pl.when(loader)
    def _():
      lax.fori_loop(0, jnp.minimum(total, stages), lambda g, _: load(g), None)
      # a longer key ring: its extra slots' first tiles
      lax.fori_loop(stages, jnp.minimum(total, key_stages), lambda g, _: load(g, ("keys",)), None)

    # Ping-pong on `sched` (two arrivals a phase): warpgroup 1 starts half a turn late; then in every tile each
    # issues its score product and meets the other (rendezvous), and after its softmax arrives but waits for the
    # other's arrival only just before its value product. So one warpgroup's softmax runs while the other's
    # products use the tensor cores. Warpgroup 0 ends with the rendezvous that warpgroup 1 began with.
    def rendezvous():
      plgpu.barrier_arrive(sched)
      plgpu.barrier_wait(sched)

    hooks = dict(issued=rendezvous, softmax_done=lambda: plgpu.barrier_arrive(sched),
                 before_pv=lambda: plgpu.barrier_wait(sched)) if config.pingpong else {}
    if config.pingpong:
      pl.when(wg == 1)(rendezvous)

    def item(i, _):
      h, split, block = prefix_coords(prefix_item(i))
      rows = pl.ds(block * PAIR * ROWS + wg * ROWS, ROWS)
      # The split's keys, counted from its first tile: keys at or past `visible` are masked.
      visible = jnp.clip(length - split * split_keys, 0, split_keys) if splits > 1 else length
      lse = plse_all.at[wg]
      q = pair_queries(qt_ref.at[h, rows])
      first = i * n

      def release(barrier, parts, j, _):  # tile j's `parts` read by this warpgroup: refill them once both have
        g = first + j  # (parts: the key and value tiles together only where both rings have `stages` slots)
        slot = slot_in(parts[0], g)  # from the stream index, as `load` puts it there
        plgpu.barrier_arrive(barrier.at[slot])

        @pl.when(loader)
        def _():
          # Every phase, also the last ones (a producer's tail): none is left unobserved, and no arrival from
          # the other CTA of a cluster reaches this one after it has ended.
          plgpu.barrier_wait(barrier.at[slot])
          refill = g + ring[parts[0]]
          pl.when(refill < total)(functools.partial(load, refill, parts))

      args = (q, pk_smem, pv_smem, None if pp_all is None else pp_all.at[wg], lambda slot: pk_bars.at[slot],
              lambda slot: pv_bars.at[slot], lambda j: slot_in("values", first + j))
      keep = dict(value_keep=lambda j: ((j + 1) * block_k > visible, lambda r: r + j * block_k < visible)
                  ) if config.zero_value_tails else {}
      if config.prefix_overlap:  # a slot's key tile is refilled once its scores are done, its value tile later
        acc, m, l = _flash_overlapped(*args, functools.partial(release, consumed, ("keys",)),
                                      functools.partial(release, consumed_v, ("values",)), n, visible // block_k,
                                      visible, scale2=scale * LOG2_E, **keep, **hooks)
      elif config.prefix_early_keys:  # the key tile refilled once both score products are done
        acc, m, l = flash(*args, functools.partial(release, consumed_v, ("values",)), n, visible // block_k, visible,
                          keys_major=False, keys_read=functools.partial(release, consumed, ("keys",)),
                          key_slot_of=lambda j: slot_in("keys", first + j), **keep, **hooks)
      else:
        acc, m, l = flash(*args, functools.partial(release, consumed, ("keys", "values")), n, visible // block_k,
                          visible, keys_major=False, **keep, **hooks)
      out_ref, lse_ref = op_ref.at[split], lp_ref.at[split]
      if config.q_registers:
        out, lse_now = _normalise(acc, m, l, op_ref.dtype, keys_major=False)
        out_ref.at[h, rows][...] = out  # plain stores from registers
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous item's lse store has read its buffer
        lse[...] = lse_now
        plgpu.commit_smem()
      else:
        _finish(acc, m, l, q, lse, keys_major=False)
        plgpu.copy_smem_to_gmem(q, out_ref.at[h, rows])
      plgpu.copy_smem_to_gmem(lse, lse_ref.at[h, rows])

    lax.fori_loop(0, items, item, None)
    if config.pingpong:
      pl.when(wg == 0)(rendezvous)
    if share:
      rendezvous()  # neither warpgroup reads the prefix rings any more (nor does a copy still fill them)
      pair_suffixes()

  def suffix_split(num_items):  # `pair_split` for this CTA: its prefix tiles, the mean suffix length
    prefix_keys = pv_smem.shape[1]
    prefix_tiles = count(num_heads * pairs * splits // size, cluster_id, clusters) * pl.cdiv(
        pl.cdiv(lens_ref[batch], prefix_keys), splits)
    return pair_split(num_items, prefix_tiles, pl.cdiv(lens_ref[batch + 1], batch), config, pack)

  def pair_suffixes():
    """Warpgroups 0 and 1 after their prefix items: the CTA's suffix items from `suffix_split`'s K on, warpgroup w
    every other one (K + w, K + w + 2, ...), in 64-key tiles (pack sequences a tile, as warpgroup 2's items)
    through slots of its own: the prefix rings seen as rings of 64-key slots (a 128-key slot holds two), warpgroup
    w's those of the prefix slots w, w + 2, ... (2 prefix stages of 128 keys: two 64-key slots each, so a tile's
    copy runs under the previous tile's products; of 64 keys: one). Scored rows = queries: the item's window in
    the first rows of a 64-row query tile (the rows after it, a neighbouring window's queries or padding, are
    computed and dropped); no cross-warp reduction, so nothing shares warpgroup 2's reduction scratch. The out is
    staged in the warpgroup's first value slot and only the window's rows are stored."""
    stages, prefix_keys, head_dim = pv_smem.shape
    sub = prefix_keys // ROWS  # 64-key slots a prefix slot
    k_ring, v_ring = _Slots(pk_smem, ROWS), _Slots(pv_smem, ROWS)
    slots = stages // PAIR * sub  # 64-key slots of each warpgroup
    num_items, coords, load, visibility, values_kept = suffix_items(
        ROWS, False, ((sk_ref, k_ring, pair_k_bars), (sv_ref, v_ring, pair_v_bars)))
    first = suffix_split(num_items) + wg
    own = lambda i: (wg + PAIR * (i // sub)) * sub + i % sub  # the warpgroup's i-th 64-key slot
    slot_of = lambda j: own(lax.rem(j, slots))
    o_stage, lse_stage = v_ring.at[own(0)], plse_all.at[wg]
    if pack > 1:  # a skipped copy leaves its sub-block as it was: finite values (zeros), not what smem held
      for i in range(slots):
        v_ring.at[own(i)][...] = plgpu.layout_cast(jnp.zeros(v_ring.shape[1:], v_ring.dtype), wgmma)
      plgpu.commit_smem()  # before the copies (the async proxy) write into the slots

    def item(t, _):
      it, window, n = coords(first + t * PAIR)
      h = it[1]
      num_full, limit = visibility(it, window)
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous item's stores have read o_stage, lse_stage
      lax.fori_loop(0, jnp.minimum(n, slots), lambda j, _: load(it, j, slot_of(j)), None)
      q = pair_queries(qt_ref.at[h, pl.ds(window, ROWS)])  # the window and the rows after it (qt is padded)

      def after(j, slot):  # tile j has been read: its slot takes tile j + slots
        pl.when(j + slots < n)(lambda: load(it, j + slots, slot))

      acc, m, l = flash(q, k_ring, v_ring, None if pp_all is None else pp_all.at[wg, :, pl.ds(0, ROWS)],
                        lambda slot: pair_k_bars.at[slot], lambda slot: pair_v_bars.at[slot], slot_of, after, n,
                        num_full, limit, keys_major=False,
                        value_keep=values_kept(it) if config.zero_value_tails else None)
      _finish(acc, m, l, o_stage, lse_stage, keys_major=False)
      plgpu.copy_smem_to_gmem(o_stage.at[pl.ds(0, srows)], os_ref.at[h, pl.ds(window, srows)])
      plgpu.copy_smem_to_gmem(lse_stage.at[pl.ds(0, srows)], ls_ref.at[h, pl.ds(window, srows)])

    lax.fori_loop(0, count(num_items, first, PAIR), item, None)

  def suffix_items(block_k, keys_major, refs, boxed=False, rings4=False):
    """This CTA's suffix items (`suffixes` defines them) as a warpgroup streams them: tiles of `block_k` keys, copied
    by `refs` ((sk_ref, K ring, its barriers), (sv_ref, V ring, its barriers)), a packed item's tile in one box
    where `boxed` (else a copy a sequence, from the caches' `[B, S, Hkv·D]` view where suffix_box reshaped them),
    scored keys_major (`[block_k, srows]`: warpgroup 2) or rows = queries (`[ROWS, block_k]`, the window's rows
    first: the pair). Returns (num_items, coords(i), load(item, j, slot), visibility(item, window),
    values_kept(item)), as `suffixes` and `pair_suffixes` use them."""
    tile = (block_k, srows) if keys_major else (ROWS, block_k)
    key_axis = 0 if keys_major else 1
    if keys_major:
      cols = plgpu.broadcasted_iota(jnp.int32, tile, 1 - key_axis, layout=wgmma)  # each score's row of the window
    else:  # the pair: each query row's (a vector in the tile's row layout: 64 rows of 64 or 128 keys would hold
      # 32-64 registers a thread for as long as an item runs), spread over a tile's keys inside its loop only
      cols = plgpu.broadcasted_iota(jnp.int32, tile, 0, layout=wgmma).max(axis=1)
    per_row = lambda x: lax.broadcast_in_dim(x, tile, [0])  # a row vector over the pair's tile
    key_iota = lambda: plgpu.broadcasted_iota(jnp.int32, tile, 1, layout=wgmma)  # the pair's tile's keys
    head_dim = refs[0][1].shape[-1]

    def copy(b, h, keys, rows, slot, parts=PARTS):  # keys of K and / or V (gmem) into the slot's rows (smem)
      for part, (ref, smem, bars) in zip(PARTS, refs):
        if part in parts:
          plgpu.copy_gmem_to_smem(ref.at[b, keys, h], smem.at[slot, rows], bars.at[slot])

    def copy_box(b, c, n, h, keys, slot, parts=PARTS):  # suffix_box: sequences b ... b + n - 1 into sub-blocks
      heads = pl.ds(h * head_dim, head_dim)  # c ... c + n - 1; KV head h of the caches' [B, S, Hkv·D] view
      if rings4:  # one copy (one arrival)
        return copy(pl.ds(b, n), heads, keys, pl.ds(c, n), slot, parts)
      for i in range(n):  # interpreted (its refs take no reshape): a copy (an arrival) a sequence
        copy(b + i, heads, keys, pl.ds((c + i) * keys.size, keys.size), slot, parts)

    if pack == 1:
      num_items = count(batch * num_heads)

      def coords(i):  # item i of this CTA: ((sequence, KV head, its first row), its 8-aligned window, key tiles)
        idx = jnp.minimum(cta + i * num_ctas, batch * num_heads - 1)  # clamped: the item after the last is asked
        b = idx // num_heads
        # TMA rows of a tiled buffer start at a multiple of 8: load the 8-aligned window holding the sequence's rows.
        return (b, idx % num_heads, b * qrows), pl.multiple_of(b * qrows // 8 * 8, 8), pl.cdiv(lens_ref[b], block_k)

      def load(item, j, slot, parts=PARTS):  # tile j of the item (its key and / or value part) into the slot
        b, h, _ = item
        if not (config.suffix_trim and keys_major):
          return copy(b, h, pl.ds(j * block_k, block_k), pl.ds(0, block_k), slot, parts)
        # suffix_trim: one copy (one arrival on each barrier) of the smallest size in 8, 16, ..., block_k that
        # holds the keys left from this tile's start (>= 1: only tiles below cdiv(length, block_k) are loaded)
        left = lens_ref[b] - j * block_k
        sizes = [8 << k for k in range(block_k.bit_length() - 3)]  # 8, 16, ..., block_k
        for smaller, size in zip([0] + sizes, sizes):
          fits = left > smaller if size == block_k else (left > smaller) & (left <= size)
          pl.when(fits)(functools.partial(copy, b, h, pl.ds(j * block_k, size), pl.ds(0, size), slot, parts))

      def visibility(item, window):  # (tiles every query sees whole, what `_flash` masks the others by)
        b, _, first_row = item
        length = lens_ref[b]
        # Window row c is query t = (c - (first_row - window)) // g of the sequence's last T tokens: it sees suffix
        # keys < length - T + 1 + t.
        limit = length - causal_t + 1 + (cols - (first_row - window)) // group if causal_t > 1 else length
        if causal_t > 1 and not keys_major:  # the pair: each row's limit as tile j's mask
          return (length - causal_t + 1) // block_k, lambda j: key_iota() + j * block_k < per_row(limit)
        return (length - causal_t + 1) // block_k, limit

      def values_kept(item):  # zero_value_tails: tile j's value rows of the sequence's keys
        length = lens_ref[item[0]]
        return lambda j: ((j + 1) * block_k > length, lambda r: r + j * block_k < length)
    else:
      kb = block_k // pack  # keys of one sequence in a tile
      num_windows = -(-batch // pack)
      num_items = count(num_windows * num_heads)
      if keys_major:
        key_rows = plgpu.broadcasted_iota(jnp.int32, tile, key_axis, layout=wgmma)  # each score's key in the tile
      seq_of_col = cols // qrows  # row r of the window is sequence r // T·g of the window,
      step_of_col = cols % qrows // group  # query t = (r mod T·g) // g of the sequence's last T tokens
      if keys_major:
        own_block = key_rows // kb == seq_of_col  # the tile's keys of a row's own sequence
        key_of_row = key_rows % kb

      def coords(i):  # item i of this CTA: ((first sequence, KV head, the window's lengths), window, key tiles)
        idx = jnp.minimum(cta + i * num_ctas, num_windows * num_heads - 1)
        w, h = idx // num_heads, idx % num_heads
        # past the last sequence: length 0 (its copies are skipped, its rows stay masked)
        lens = tuple(jnp.where(w * pack + c < batch, lens_ref[jnp.minimum(w * pack + c, batch - 1)], 0)
                     for c in range(pack))
        return (w * pack, h, lens), pl.multiple_of(w * srows, 8), pl.cdiv(functools.reduce(jnp.maximum, lens), kb)

      def arrive(slot, times, parts=PARTS):  # plain arrivals on the slot's barriers, in place of copies
        for _ in range(times):
          for part, (_, _, bars) in zip(PARTS, refs):
            if part in parts:
              plgpu.barrier_arrive(bars.at[slot])

      def load_each(item, j, slot, parts=PARTS):  # sub-block c of the slot: keys j·kb ... of the window's
        b0, h, lens = item  # sequence c, if any
        for c in range(pack):  # always `pack` arrivals on the slot's barriers: a skipped copy's is a plain arrival
          live = lens[c] > j * kb
          b, keys = jnp.minimum(b0 + c, batch - 1), pl.ds(j * kb, kb)
          pl.when(live)(functools.partial(copy_box, b, c, 1, h, keys, slot, parts) if _boxed(config, pack) else
                        functools.partial(copy, b, h, keys, pl.ds(c * kb, kb), slot, parts))
          pl.when(jnp.logical_not(live))(functools.partial(arrive, slot, 1, parts))

      def load(item, j, slot, parts=PARTS):
        if not boxed:
          return load_each(item, j, slot, parts)
        b0, h, lens = item
        # every sequence has keys in tile j (one past the batch has length 0), so each would copy its whole
        # sub-block: the box, [pack sequences, kb keys, D], in one copy and pack - 1 plain arrivals (the barriers
        # count pack)
        whole = functools.reduce(jnp.logical_and, [n > j * kb for n in lens])

        @pl.when(whole)
        def _():
          copy_box(b0, 0, pack, h, pl.ds(j * kb, kb), slot, parts)
          if rings4:
            arrive(slot, pack - 1, parts)

        pl.when(jnp.logical_not(whole))(functools.partial(load_each, item, j, slot, parts))

      def length_of(seq, lens):  # the length of each element's sequence `seq` of the window (< pack)
        return functools.reduce(lambda acc, c: jnp.where(seq == c, lens[c], acc), range(1, pack),
                                jnp.where(seq == 0, lens[0], 0))

      def visibility(item, window):
        del window
        length = length_of(seq_of_col, item[2])
        # query t sees its sequence's keys < length - T + 1 + t
        limit = length - causal_t + 1 + step_of_col if causal_t > 1 else length
        if keys_major:
          return 0, lambda j: own_block & (key_of_row + j * kb < limit)

        def mask(j):  # the pair's tile j: each row's own sequence's sub-block, keys below its limit
          keys = key_iota()
          return (keys // kb == per_row(seq_of_col)) & (keys % kb + j * kb < per_row(limit))
        return 0, mask

      def values_kept(item):  # zero_value_tails: tile j's value rows of each sub-block's sequence's keys
        lens = item[2]
        short = lambda j: functools.reduce(jnp.logical_or, [n < (j + 1) * kb for n in lens])  # some sequence ends
        return lambda j: (short(j), lambda r: r % kb + j * kb < length_of(r // kb, lens))

    return num_items, coords, load, visibility, values_kept

  def suffixes():
    """Warpgroup 2. Without suffix_lookahead each item fills its own ring from slot 0 as it starts. With it, a CTA's
    items form one stream of key tiles (item i's tile j is stream tile base_i + j, base_i the tiles of the items
    before it, in slot (base_i + j) mod stages), each item's first min(n, stages) tiles and its queries are in
    flight before it starts: as item i starts, the next item's first tiles go into the slots item i leaves empty
    (it has fewer than `stages` tiles; their last tiles were read by earlier items), and as item i reads its tile
    j, the slot takes stream tile base_i + j + stages, its own or the next item's.

    An item is (sequence b, KV head h), or with suffix_pack (`pack` > 1) (window w, KV head h): the `pack` = 8 / T·g
    sequences whose rows fill the 8-row query window w, each a sub-block of kb = block_k / pack keys of every tile
    (a copy of its own, all arriving on the slot's barrier), the tile's scores masked to a block diagonal: one
    item's softmax, barriers and stores serve `pack` sequences. Where the pair takes suffix items (`share`: see
    `_shares`) the CTA's last items go to it (`pair_suffixes`): warpgroup 2 runs the first `suffix_split` of them."""
    boxed = _boxed(config, pack)  # the caches [B, S, Hkv·D]
    rings4 = len(sk_smem.shape) == 4  # suffix_box compiled: rings [stages, pack, keys a sequence, D]
    stages, block_k, head_dim = sk_smem.shape[0], math.prod(sk_smem.shape[1:-1]), sk_smem.shape[-1]
    # the rings as `_flash` reads them: [stages, block_k, D] (with rings4 a fold of the same bytes)
    k_ring, v_ring = (r.reshape(stages, block_k, head_dim) if rings4 else r for r in (sk_smem, sv_smem))
    lookahead = config.suffix_lookahead
    num_items, coords, load, visibility, values_kept = suffix_items(
        block_k, True, ((sk_ref, sk_smem, sk_bars), (sv_ref, sv_smem, sv_bars)), boxed, rings4)
    if share:
      num_items = suffix_split(num_items)

    if pack == 1:
      def store(item, window, h):  # only the sequence's own rows go out (o_smem is untiled: any start row)
        _, _, first_row = item
        mine = pl.ds(first_row - window, qrows)
        plgpu.copy_smem_to_gmem(o_smem.at[mine], os_ref.at[h, pl.ds(first_row, qrows)])
        if qrows % 4:  # a TMA copy moves whole 16 bytes from and to 16-byte-aligned addresses: the whole window's
          plgpu.copy_smem_to_gmem(lse_smem, ls_ref.at[h, item[0]])  # lse, [Hkv, B, srows] (unpacked after)
        else:
          plgpu.copy_smem_to_gmem(lse_smem.at[mine], ls_ref.at[h, pl.ds(first_row, qrows)])
    else:
      def store(item, window, h):  # the whole window: its rows past B·T·g fall in the outputs' padding
        del item
        plgpu.copy_smem_to_gmem(o_smem, os_ref.at[h, pl.ds(window, srows)])
        plgpu.copy_smem_to_gmem(lse_smem, ls_ref.at[h, pl.ds(window, srows)])

    def queries(i):  # item i's query buffer and its copy's barrier (lookahead: two buffers, by item parity)
      if not lookahead:
        return q_smem, q_bars.at[PAIR]
      k = lax.rem(i, 2)
      return q_smem.at[k], q_bars.at[PAIR + k]

    def start(i, base):  # item i's queries and first tiles (q_smem is never stored from: no store to wait for)
      item, window, n = coords(i)
      plgpu.copy_gmem_to_smem(qt_ref.at[item[1], pl.ds(window, srows)], *queries(i))
      # Tile starts are traced values (a loop, not unrolled): TMA clips a tile at the array's end.
      lax.fori_loop(0, jnp.minimum(n, stages), lambda j, _: load(item, j, lax.rem(base + j, stages)), None)

    if config.suffix_trim or pack > 1:  # zero weights times stale values must stay zero: no NaN from before the
      for slot in range(stages):  # kernel in the rows a trimmed or skipped copy leaves
        v_ring.at[slot][...] = plgpu.layout_cast(jnp.zeros(v_ring.shape[1:], v_ring.dtype), wgmma)
      plgpu.commit_smem()  # before the copies (the async proxy) write into the ring
    if lookahead:  # the stream's first item; each later one is started by the item before it
      pl.when(num_items > 0)(lambda: start(0, 0))

    def item(i, base):  # base: the stream index of the item's first tile (0 without the lookahead)
      it, window, n = coords(i)
      h = it[1]
      num_full, limit = visibility(it, window)
      slot_of = lambda j: lax.rem(base + j, stages)
      if lookahead:
        nit, next_window, nn = coords(i + 1)
        has_next = i + 1 < num_items

        @pl.when(has_next)
        def _():  # the next item's queries (the other buffer: its last reader, item i - 1, has finished) and the
          # first tiles that go into the slots this item leaves empty; after() below loads the rest
          plgpu.copy_gmem_to_smem(qt_ref.at[nit[1], pl.ds(next_window, srows)], *queries(i + 1))
          lax.fori_loop(0, jnp.minimum(nn, jnp.maximum(stages - n, 0)),
                        lambda t, _: load(nit, t, slot_of(n + t)), None)
      else:
        start(i, 0)  # the queries' copy goes out with the first tiles' (one memory latency an item, not two)

      def after(j, slot, parts=PARTS):  # tile j has been read: its slot takes stream tile base + j + stages
        pl.when(j + stages < n)(lambda: load(it, j + stages, slot, parts))
        if lookahead:
          t = j + stages - n  # the next item's tile
          pl.when(has_next & (t >= 0) & (t < nn))(lambda: load(nit, t, slot, parts))

      early = config.suffix_early_keys  # the key part refilled once read by the scores, the value part after
      keys_read = functools.partial(after, parts=("keys",)) if early else None
      values_read = functools.partial(after, parts=("values",)) if early else after

      q_buffer, q_copied = queries(i)
      plgpu.barrier_wait(q_copied)
      acc, m, l = flash(q_buffer, k_ring, v_ring, p_smem, lambda slot: sk_bars.at[slot],
                        lambda slot: sv_bars.at[slot], slot_of, values_read, n, num_full, limit, keys_major=True,
                        late_sum=config.suffix_late_sum, keys_read=keys_read,
                        value_keep=values_kept(it) if config.zero_value_tails else None)
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous item's stores have read o_smem, lse_smem
      _finish(acc, m, l, o_smem, lse_smem, keys_major=True)
      store(it, window, h)
      return base + n if lookahead else base

    lax.fori_loop(0, num_items, item, jnp.int32(0))

  @pl.when(wg < PAIR)
  def _():
    plgpu.set_max_registers(config.pair_registers, action="increase")
    prefix_pair()

  @pl.when(wg == PAIR)
  def _():
    plgpu.set_max_registers(config.suffix_registers, action="decrease")
    suffixes()

  plgpu.wait_smem_to_gmem(0)


def prefix_suffix_attention(q: Array, prefix_k: Array, prefix_v: Array, prefix_length: Array, suffix_k: Array,
                            suffix_v: Array, suffix_lengths: Array, *, scale: float,
                            config: HopperConfig | None = None, interpret: bool = False):
  """The parts of a Hydragen decode step (the prefix's, one a key split, then the suffixes'), for `merge_states`
  (check `supported` first).

  Args:
    q: `[B, T, Hq, D]` (bf16/f16), the last T tokens of each suffix.
    prefix_k, prefix_v: `[P, Hkv, D]`, shared by all B sequences, fully visible up to `prefix_length` (int32 []).
    suffix_k, suffix_v: `[B, S, Hkv, D]`, causal for the T queries, `suffix_lengths` `[B]` int32 valid keys.
      Lengths are clamped to [0, P] and [0, S].
    config: the kernel's settings; None: `tuned_config()` for T·g = T·Hq/Hkv rows and a prefix of P keys.
    interpret: run in Mosaic GPU's interpreter (CPU tests).

  Returns:
    The parts for `merge_states`: (out, lse) over each key split of the prefix (one unless `config.prefix_splits`
    or its prefix_fill splits it), then (out, lse) over the suffixes; out `[B, T, Hq, D]` q.dtype, lse `[B, T, Hq]`
    float32 (natural log; -inf and out 0 where a query sees no key of that part).
  """
  if config is None:
    config = tuned_config(rows=query_rows(q.shape, prefix_k.shape[1]), prefix=prefix_k.shape[0])
  config = with_grid(q.shape, prefix_k.shape[1], prefix_k.shape[0], config, ops.num_cores())
  if config.num_ctas % config.cluster:
    raise ValueError(f"HopperConfig.num_ctas={config.num_ctas} is not a multiple of its cluster={config.cluster}.")
  # No more CTAs than the work has items: item i of each kind runs on CTA i either way (the round-robin's first
  # turn), so the CTAs past the last item would only start and stop (in the interpreter each costs a whole CTA's
  # simulation: ~130 idle ones made a small test 10x slower). Capped after the splits, which count the SMs.
  config = dataclasses.replace(config, num_ctas=min(config.num_ctas, _busy_ctas(q.shape, prefix_k.shape[1], config)))
  return _prefix_suffix_attention(q, prefix_k, prefix_v, prefix_length, suffix_k, suffix_v, suffix_lengths,
                                  scale=float(scale), config=config, interpret=interpret)


# One jit for the kernel and its layout changes: a model's layers call it with the same shapes and settings, and a
# nested jit is lowered once per signature, so they share one Mosaic GPU module (one kernel hash, compiled once);
# inlined at each call site, every layer would carry a module of its own (a different hash) and compile it again.
@functools.partial(jax.jit, static_argnames=("scale", "config", "interpret"))
def _prefix_suffix_attention(q, prefix_k, prefix_v, prefix_length, suffix_k, suffix_v, suffix_lengths, *, scale,
                             config: HopperConfig, interpret: bool):
  batch, steps, num_q_heads, head_dim = q.shape
  num_heads = prefix_k.shape[1]
  group = num_q_heads // num_heads
  qrows = steps * group  # query rows per sequence and KV head
  srows = _window_rows(qrows)
  # [B, T, Hkv·g, D] -> [Hkv, B·T·g, D]: each KV head's rows stacked (a copy of q, not of the caches), padded to
  # whole clusters of 128-row pair blocks (the prefix items' rows: `rows`) and past the last suffix window: no copy
  # in or out of the kernel falls off an array's end.
  qt = q.reshape(batch, steps, num_heads, group, head_dim).transpose(2, 0, 1, 3, 4)
  qt = qt.reshape(num_heads, batch * qrows, head_dim)
  block = PAIR * ROWS * config.cluster
  rows = -(-batch * qrows // block) * block
  last_window = (batch - 1) * qrows // 8 * 8
  share = _shares(config, qrows)  # and the pair's suffix items load 64 rows from a window's start
  qt = jnp.pad(qt, ((0, 0), (0, max(rows, last_window + (ROWS if share else srows)) - batch * qrows), (0, 0)))
  # Lengths clamped to the capacities (a traced length may be out of range): no tile is read past the caches.
  suffix_lengths = jnp.clip(suffix_lengths.astype(jnp.int32), 0, suffix_k.shape[1])
  prefix_length = jnp.clip(jnp.reshape(prefix_length, (1,)).astype(jnp.int32), 0, prefix_k.shape[0])
  # share: and the suffixes' total keys, whose mean `pair_split` takes
  lens = jnp.concatenate([suffix_lengths, prefix_length] + ([suffix_lengths.sum(keepdims=True)] if share else []))
  pack = suffix_pack_of(qrows, config)
  scratch = _scratch(head_dim, srows, q.dtype, config, interpret, pack, share)
  if _boxed(config, pack):  # the caches as [B, S, Hkv·D]: a box of sequences × keys × one head's D
    suffix_k, suffix_v = (x.reshape(*x.shape[:2], x.shape[2] * x.shape[3]) for x in (suffix_k, suffix_v))
  kernel = functools.partial(_kernel, config=config, scale=scale, batch=batch, qrows=qrows, causal_t=steps,
                             group=group, pack=pack, share=share)
  splits = config.prefix_splits
  # packed suffix items store whole windows: the suffix outputs hold every window's 8 rows (sliced below)
  suffix_rows = -(-batch // pack) * srows if pack > 1 else batch * qrows
  out_type = (
      jax.ShapeDtypeStruct((splits, num_heads, rows, head_dim), q.dtype),
      jax.ShapeDtypeStruct((splits, num_heads, rows), jnp.float32),
      jax.ShapeDtypeStruct((num_heads, suffix_rows, head_dim), q.dtype),
      # suffix lse: each sequence's rows, or (T·g not a multiple of 4, unpacked) each item's whole window
      jax.ShapeDtypeStruct((num_heads, batch, srows) if qrows % 4 and pack == 1 else (num_heads, suffix_rows),
                           jnp.float32),
  )
  params = None
  if interpret:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # noqa: PLC0415
    params = InterpretGPUParams()
  op, lp, os_, ls = plgpu.kernel(
      lambda *refs: pl.run_scoped(lambda s: kernel(*refs, s), scratch, collective_axes="wg"),
      out_type=out_type, grid=(config.num_ctas // config.cluster,), grid_names=("cta",),
      cluster=(config.cluster,) if config.cluster > 1 else (), cluster_names=("cluster",) if config.cluster > 1 else (),
      num_threads=PAIR + 1, thread_name="wg", kernel_name="hydragen_hopper",
      compiler_params=plgpu.CompilerParams(approx_math=True), interpret=params,
  )(qt, prefix_k, prefix_v, suffix_k, suffix_v, lens)

  def back(out, lse):  # [Hkv, B, T·g(, D)] -> [B, T, Hq(, D)]
    out = out.reshape(num_heads, batch, steps, group, head_dim).transpose(1, 2, 0, 3, 4)
    lse = lse.reshape(num_heads, batch, steps, group).transpose(1, 2, 0, 3)
    return (out.reshape(batch, steps, num_q_heads, head_dim), lse.reshape(batch, steps, num_q_heads))

  if pack > 1:
    os_, ls = os_[:, :batch * qrows], ls[:, :batch * qrows]
  elif qrows % 4:  # sequence b's rows sit at offset (b·T·g) mod 8 of its window
    offsets = (np.arange(batch) * qrows % 8)[:, None] + np.arange(qrows)
    ls = jnp.take_along_axis(ls, jnp.asarray(offsets)[None], axis=2).reshape(num_heads, batch * qrows)
  return (*(back(op[c, :, :batch * qrows], lp[c, :, :batch * qrows]) for c in range(splits)), back(os_, ls))
