"""Pallas GPU kernel: flash attention over groups of query rows that share one KV sequence.

One kernel serves both halves of Hydragen:

* prefix (shared) part: every query of every sequence that reads a shared node, times the GQA group, times the
  query tokens, is a row of one matrix; a program takes `block_m` of those rows and streams the node's KV once
  through the tensor cores (inter-sequence batching);
* suffix (per-sequence) part: a group is one sequence's T·g rows (the GQA heads of one KV head together), and
  long keys are split over programs.

Layout. Queries and outputs stay in their natural layout `[B, T, Hq, D]`, seen as rows `[B·T·Hq, D]`; no
transposes. Group p takes the sequences order[seq_start[p] :] (row_count[p] = their number × T·g rows, ordered
(sequence, token t, head-in-group j)) and reads KV sequence kv_index[p] of the caches `k, v [N, S, Hkv, D]` (in
place, no copy) up to kv_lengths[kv_index[p]]. For KV head h, local row r is the query row
((seq·T + t)·Hq + h·g + j) with seq = order[seq_start + r // (T·g)], t = (r // g) % T, j = r % g: the kernel
gathers and scatters those rows itself. The grid is (group, KV head, row block, key split). A program streams its
key range in blocks of `block_k` with the online softmax; a row sees no key past its length (nor, if causal, past
its own position) and an empty row gives out = 0, lse = -inf.

With `splits > 1` every split writes float32 partial results that `combine_splits` merges by their lse.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from hydragen_jax.reference import merge_states

Array = jax.Array

# Finite stand-in for -inf inside the kernel, so that a fully masked block never computes inf - inf.
_MASKED = -1e30
_LOG2_E = math.log2(math.e)
_LN_2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """Static tiling of one kernel call (all sizes powers of two, as Triton needs).

  Attributes:
    block_m: query rows per program (>= 16: the tensor-core minimum).
    block_k: keys per inner step.
    splits: programs that share one row block's keys (flash-decoding split).
    num_warps, num_stages: Triton launch parameters.
  """

  block_m: int = 64
  block_k: int = 64
  splits: int = 1
  num_warps: int = 4
  num_stages: int = 2


def _kernel(
    seq_start_ref, row_count_ref, kv_index_ref, kv_len_ref, order_ref,  # [G], [G], [G], [N], [B] int32
    q_ref,  # [B·T·Hq, D]
    k_ref, v_ref,  # [N, S, Hkv, D]
    o_ref,  # [splits, B·T·Hq, D]
    lse_ref,  # [splits, B·T·Hq]
    *,
    block: BlockConfig,
    split_len: int,
    head_dim: int,
    causal: bool,
    num_queries: int,
    group: int,
    scale: float,
    precision,
):
  p, h, mb, sp = (pl.program_id(i) for i in range(4))
  row_count = row_count_ref[p]
  first_local = mb * block.block_m

  @pl.when(first_local < row_count)
  def _():
    d_pad = pl.next_power_of_2(head_dim)  # Triton tiles are powers of two: pad D, mask the extra columns
    local = first_local + jnp.arange(block.block_m)
    row_ok = local < row_count
    cols = jnp.arange(d_pad)
    col_ok = cols < head_dim
    tile_ok = row_ok[:, None] & col_ok[None, :]
    # Which query row each local row is (see the module docstring). Masked rows point one past the end, so that
    # no store of theirs can land on a real row (the interpreter's scatter drops out-of-bounds updates).
    seq = plgpu.load(order_ref.at[seq_start_ref[p] + local // (num_queries * group)], mask=row_ok, other=0)
    token = (local // group) % num_queries
    num_heads = group * k_ref.shape[2]
    flat = jnp.where(row_ok, (seq * num_queries + token) * num_heads + h * group + local % group, q_ref.shape[0])
    q = plgpu.load(q_ref.at[flat[:, None], cols[None, :]], mask=tile_ok, other=0)

    node = kv_index_ref[p]
    length = kv_len_ref[node]
    lo = sp * split_len
    hi = jnp.minimum(lo + split_len, length)
    # Causal: a row of token t is key (length - T + t) of its sequence; it sees keys up to that one.
    last_visible = length - num_queries + token
    kv_cols = pl.ds(0, d_pad)

    def step(i, carry):
      acc, m, l = carry
      start = lo + i * block.block_k
      pos = start + jnp.arange(block.block_k)
      key_ok = pos < hi
      kv_mask = key_ok[:, None] & col_ok[None, :]
      k = plgpu.load(k_ref.at[node, pl.ds(start, block.block_k), h, kv_cols], mask=kv_mask, other=0)
      # Logits in base 2: exp(x) = 2^(x·log2 e), so exp2 does the softmax.
      s = plgpu.dot(q, k, trans_b=True, precision=precision) * (scale * _LOG2_E)
      ok = key_ok[None, :]
      if causal:
        ok = ok & (pos[None, :] <= last_visible[:, None])
      s = jnp.where(ok, s, _MASKED)
      m_new = jnp.maximum(m, jnp.max(s, axis=1))
      alpha = jnp.exp2(m - m_new)
      probs = jnp.where(ok, jnp.exp2(s - m_new[:, None]), 0.0)
      v = plgpu.load(v_ref.at[node, pl.ds(start, block.block_k), h, kv_cols], mask=kv_mask, other=0)
      acc = acc * alpha[:, None] + plgpu.dot(probs.astype(v.dtype), v, precision=precision)
      return acc, m_new, l * alpha + jnp.sum(probs, axis=1)

    init = (
        jnp.zeros((block.block_m, d_pad), jnp.float32),
        jnp.full((block.block_m,), _MASKED, jnp.float32),
        jnp.zeros((block.block_m,), jnp.float32),
    )
    num_steps = pl.cdiv(jnp.maximum(hi - lo, 0), block.block_k)
    acc, m, l = lax.fori_loop(0, num_steps, step, init)

    seen = l > 0
    safe_l = jnp.where(seen, l, 1.0)
    out = jnp.where(seen[:, None], acc / safe_l[:, None], 0.0)
    lse = jnp.where(seen, (m + jnp.log2(safe_l)) * _LN_2, -jnp.inf)
    plgpu.store(o_ref.at[sp, flat[:, None], cols[None, :]], out.astype(o_ref.dtype), mask=tile_ok)
    plgpu.store(lse_ref.at[sp, flat], lse, mask=row_ok)


@functools.partial(
    jax.jit,
    static_argnames=("block", "max_rows", "causal", "group", "scale", "interpret"),
)
def grouped_flash_attention(
    q: Array,
    k: Array,
    v: Array,
    kv_lengths: Array,
    order: Array,
    seq_start: Array,
    row_count: Array,
    kv_index: Array,
    *,
    block: BlockConfig,
    max_rows: int,
    causal: bool,
    group: int,
    scale: float,
    interpret: bool,
) -> tuple[Array, Array]:
  """Runs the kernel; see the module docstring for the layout.

  Args:
    q: `[B, T, Hq, D]` queries.
    k, v: `[N, S, Hkv, D]` KV caches, read in place.
    kv_lengths: `[N]` valid keys per KV sequence.
    order: `[B]` the sequences, group by group.
    seq_start, row_count, kv_index: `[G]` each: group p's first position in `order`, its rows (sequences × T·g),
      and the KV sequence it reads.
    block: tiling; `block.splits > 1` returns float32 partials.
    max_rows: static bound on any row_count (sets the number of row blocks in the grid).
    causal: the T queries of a sequence are its last T keys.
    group: g = Hq // Hkv.
    scale: multiplies q·k.
    interpret: run the kernel in the Pallas interpreter (CPU).

  Returns:
    out `[splits, B, T, Hq, D]` (q dtype if splits == 1, else float32) and lse `[splits, B, T, Hq]` float32.
    Query rows that belong to no group are left unwritten.
  """
  b, t, hq, d = q.shape
  hkv, s = k.shape[2], k.shape[1]
  num_groups = seq_start.shape[0]
  split_len = pl.cdiv(pl.cdiv(s, block.splits), block.block_k) * block.block_k
  grid = (num_groups, hkv, pl.cdiv(max_rows, block.block_m), block.splits)
  out_dtype = q.dtype if block.splits == 1 else jnp.float32
  precision = lax.Precision.HIGHEST if q.dtype == jnp.float32 else lax.Precision.DEFAULT
  kernel = functools.partial(
      _kernel, block=block, split_len=split_len, head_dim=d, causal=causal, num_queries=t, group=group,
      scale=scale, precision=precision)

  def whole(x):  # the kernel indexes inside the full array itself
    return pl.BlockSpec(x.shape, lambda *_: (0,) * len(x.shape))

  rows = b * t * hq
  out_shape = (
      jax.ShapeDtypeStruct((block.splits, rows, d), out_dtype),
      jax.ShapeDtypeStruct((block.splits, rows), jnp.float32),
  )
  ints = [x.astype(jnp.int32) for x in (seq_start, row_count, kv_index, kv_lengths, order)]
  q_rows = q.reshape(rows, d)
  out, lse = pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=[whole(x) for x in (*ints, q_rows, k, v)],
      out_specs=[whole(x) for x in out_shape],
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=block.num_warps, num_stages=block.num_stages),
      interpret=interpret,
      name="hydragen_grouped_flash",
  )(*ints, q_rows, k, v)
  return out.reshape(block.splits, b, t, hq, d), lse.reshape(block.splits, b, t, hq)


def combine_splits(out: Array, lse: Array, dtype) -> tuple[Array, Array]:
  """Merges the key splits of `grouped_flash_attention`: out `[splits, ..., D]`, lse `[splits, ...]`."""
  merged, lse = merge_states([(out[i], lse[i]) for i in range(out.shape[0])])
  return merged.astype(dtype), lse
