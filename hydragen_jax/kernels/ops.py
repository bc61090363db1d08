"""Pallas implementation of one level's attention: query layout and tiling around `grouped_flash_attention`.

Two ways to read a level's KV (`k, v [N, L, Hkv, D]`, node n valid up to lengths[n]):

* `per_sequence`: each sequence b reads node kv_index[b] on its own (T·g rows a group). This is the suffix
  (decode) attention, and, over a shared node, the "shared storage" baseline that reads the node once per sequence.
* `batched`: the sequences that read one node are stacked into one row matrix (B_n·T·g rows), so each node's KV
  is read once per row block for all of them: Hydragen's inter-sequence batching.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from hydragen_jax.kernels.flash import BlockConfig, combine_splits, grouped_flash_attention

Array = jax.Array


def _num_cores() -> int:
  device = jax.devices()[0]
  return int(getattr(device, "core_count", 0) or 132)  # 132 SMs: H100 SXM


def choose_block(max_rows: int, total_rows: int, num_groups: int, num_heads: int, num_keys: int,
                 head_dim: int) -> BlockConfig:
  """Tiling heuristic: big row blocks for the tensor cores, key splits until the GPU has ~2 programs per SM.

  max_rows: rows of the largest group; total_rows: rows of all groups together.
  """
  wide = head_dim > 128
  block_m = min(max(16, pl.next_power_of_2(max_rows)), 64 if wide else 128)
  # 64-key blocks (32 for D=256: shared memory), 3 stages in flight; 8 warps for 128-row tensor-core tiles.
  # From the block sweep on the H100 (experiments/PERF_NOTES.md); 256-key blocks overflow shared memory.
  block_k, num_warps, num_stages = (32 if wide else 64), (8 if block_m == 128 else 4), 3
  block_k = min(block_k, max(16, pl.next_power_of_2(num_keys)))
  programs = num_heads * max(num_groups, pl.cdiv(total_rows, block_m))  # programs with rows to do
  splits = 1
  while programs * splits < 2 * _num_cores() and num_keys >= 2 * splits * 4 * block_k:
    splits *= 2
  return BlockConfig(block_m=block_m, block_k=block_k, splits=splits, num_warps=num_warps, num_stages=num_stages)


def to_rows(q: Array, num_kv_heads: int) -> Array:
  """`[B, T, Hq, D]` -> `[Hkv, B·T·g, D]`, rows ordered (sequence, token, head in group)."""
  b, t, hq, d = q.shape
  g = hq // num_kv_heads
  return q.reshape(b, t, num_kv_heads, g, d).transpose(2, 0, 1, 3, 4).reshape(num_kv_heads, b * t * g, d)


def from_rows(out: Array, lse: Array, batch: int, num_queries: int) -> tuple[Array, Array]:
  """Inverse of `to_rows` for out `[Hkv, R, D]` and lse `[Hkv, R]`."""
  hkv, r, d = out.shape
  g = r // (batch * num_queries)
  out = out.reshape(hkv, batch, num_queries, g, d).transpose(1, 2, 0, 3, 4).reshape(batch, num_queries, hkv * g, d)
  lse = lse.reshape(hkv, batch, num_queries, g).transpose(1, 2, 0, 3).reshape(batch, num_queries, hkv * g)
  return out, lse


def _empty(q: Array) -> tuple[Array, Array]:
  return jnp.zeros_like(q), jnp.full(q.shape[:-1], -jnp.inf, jnp.float32)


def _run(q_rows, k, v, lengths, row_start, row_count, kv_index, *, max_rows, num_queries, group, causal,
         scale, interpret, block):
  if block is None:
    block = choose_block(max_rows, q_rows.shape[1], row_start.shape[0], k.shape[2], k.shape[1], k.shape[3])
  out, lse = grouped_flash_attention(
      q_rows, k, v, lengths, row_start, row_count, kv_index, block=block, max_rows=max_rows, causal=causal,
      num_queries=num_queries, group=group, scale=scale, interpret=interpret)
  return combine_splits(out, lse, q_rows.dtype)


def per_sequence(
    q: Array, k: Array, v: Array, lengths: Array, kv_index: Array | None, *, causal: bool, scale: float,
    interpret: bool, block: BlockConfig | None = None,
) -> tuple[Array, Array]:
  """Each sequence attends to its own KV row: q `[B, T, Hq, D]`, k/v `[N, S, Hkv, D]`, lengths `[N]`,
  kv_index `[B]` (None: sequence b reads row b). Returns out `[B, T, Hq, D]`, lse `[B, T, Hq]`."""
  b, t, hq, _ = q.shape
  hkv = k.shape[2]
  if k.shape[1] == 0:
    return _empty(q)
  rows = t * (hq // hkv)
  seq = jnp.arange(b, dtype=jnp.int32)
  out, lse = _run(
      to_rows(q, hkv), k, v, lengths, seq * rows, jnp.full((b,), rows, jnp.int32),
      seq if kv_index is None else kv_index, max_rows=rows, num_queries=t, group=hq // hkv, causal=causal,
      scale=scale, interpret=interpret, block=block)
  return from_rows(out, lse, b, t)


def batched(
    q: Array, k: Array, v: Array, lengths: Array, seq_to_node: Array, *, max_group: int | None, causal: bool,
    scale: float, interpret: bool, block: BlockConfig | None = None,
) -> tuple[Array, Array]:
  """Inter-sequence batching: the queries of all sequences that read node n form one row matrix per KV head.

  q `[B, T, Hq, D]`, k/v `[N, L, Hkv, D]`, lengths `[N]`, seq_to_node `[B]`; max_group: static bound on the
  sequences of one node (None: B). Returns out `[B, T, Hq, D]`, lse `[B, T, Hq]`.
  """
  b, t, hq, _ = q.shape
  n, _, hkv, _ = k.shape
  if k.shape[1] == 0:
    return _empty(q)
  rows = t * (hq // hkv)
  if n == 1:  # one node: rows are already grouped
    order = None
    counts = jnp.full((1,), b, jnp.int32)
  else:  # sort sequences by node so each node's rows are contiguous
    order = jnp.argsort(seq_to_node, stable=True)
    q = q[order]
    counts = jnp.bincount(seq_to_node, length=n).astype(jnp.int32)
  starts = jnp.cumsum(counts) - counts
  max_rows = rows * (b if max_group is None else min(max_group, b))
  out, lse = _run(
      to_rows(q, hkv), k, v, lengths, starts * rows, counts * rows, jnp.arange(n, dtype=jnp.int32),
      max_rows=max_rows, num_queries=t, group=hq // hkv, causal=causal, scale=scale, interpret=interpret,
      block=block)
  out, lse = from_rows(out, lse, b, t)
  if order is not None:
    inverse = jnp.argsort(order)
    out, lse = out[inverse], lse[inverse]
  return out, lse
