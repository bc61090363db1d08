"""Pallas implementation of one level's attention: groups of sequences and tiling around `grouped_flash_attention`.

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


def _empty(q: Array) -> tuple[Array, Array]:
  return jnp.zeros_like(q), jnp.full(q.shape[:-1], -jnp.inf, jnp.float32)


def _run(q, k, v, lengths, order, seq_start, num_seqs, kv_index, *, max_seqs, causal, scale, interpret, block):
  """Groups of sequences (order[seq_start[p]:][:num_seqs[p]] reads KV row kv_index[p]) -> (out, lse)."""
  b, t, hq, _ = q.shape
  n, s, hkv, d = k.shape
  if s == 0:
    return _empty(q)
  rows = t * (hq // hkv)  # query rows of one sequence for one KV head
  if block is None:
    block = choose_block(max_seqs * rows, b * rows, seq_start.shape[0], hkv, s, d)
  out, lse = grouped_flash_attention(
      q, k, v, lengths, order, seq_start, num_seqs * rows, kv_index, block=block, max_rows=max_seqs * rows,
      causal=causal, group=hq // hkv, scale=scale, interpret=interpret)
  return combine_splits(out, lse, q.dtype)


def per_sequence(
    q: Array, k: Array, v: Array, lengths: Array, kv_index: Array | None, *, causal: bool, scale: float,
    interpret: bool, block: BlockConfig | None = None,
) -> tuple[Array, Array]:
  """Each sequence attends to its own KV row: q `[B, T, Hq, D]`, k/v `[N, S, Hkv, D]`, lengths `[N]`,
  kv_index `[B]` (None: sequence b reads row b). Returns out `[B, T, Hq, D]`, lse `[B, T, Hq]`."""
  seqs = jnp.arange(q.shape[0], dtype=jnp.int32)
  return _run(q, k, v, lengths, seqs, seqs, jnp.ones_like(seqs), seqs if kv_index is None else kv_index,
              max_seqs=1, causal=causal, scale=scale, interpret=interpret, block=block)


def batched(
    q: Array, k: Array, v: Array, lengths: Array, seq_to_node: Array, *, max_group: int | None, causal: bool,
    scale: float, interpret: bool, block: BlockConfig | None = None,
) -> tuple[Array, Array]:
  """Inter-sequence batching: the queries of all sequences that read node n form one row matrix per KV head.

  q `[B, T, Hq, D]`, k/v `[N, L, Hkv, D]`, lengths `[N]`, seq_to_node `[B]`; max_group: static bound on the
  sequences of one node (None: B). Returns out `[B, T, Hq, D]`, lse `[B, T, Hq]`.
  """
  b, n = q.shape[0], k.shape[0]
  if n == 1:  # one node read by every sequence
    order, counts = jnp.arange(b, dtype=jnp.int32), jnp.full((1,), b, jnp.int32)
  else:  # the kernel visits the sequences node by node
    order = jnp.argsort(seq_to_node, stable=True).astype(jnp.int32)
    counts = jnp.bincount(seq_to_node, length=n).astype(jnp.int32)
  return _run(q, k, v, lengths, order, jnp.cumsum(counts) - counts, counts, jnp.arange(n, dtype=jnp.int32),
              max_seqs=b if max_group is None else min(max_group, b), causal=causal, scale=scale,
              interpret=interpret, block=block)
