"""Pallas GPU kernel: flash attention over groups of query rows that share one KV sequence.

One kernel serves both halves of Hydragen:

* prefix (shared) part: every query of every sequence that reads a shared node, times the GQA group, times the
  query tokens, is a row of one matrix; a program takes `block_m` of those rows and streams the node's KV once
  through the tensor cores (inter-sequence batching);
* suffix (per-sequence) part: a group is one sequence's T·g rows (the GQA heads of one KV head together), and
  long keys are split over programs.

Layout. Queries come as rows `q_rows [Hkv, R, D]`; group p owns rows [row_start[p], row_start[p] + row_count[p])
ordered (sequence, token t, head-in-group j), and reads KV sequence kv_index[p] of the caches `k, v [N, S, Hkv, D]`
(read in place, no copy) up to kv_lengths[kv_index[p]]. The grid is (group, KV head, row block, key split).
A program streams its key range in blocks of `block_k` with the online softmax; a row sees no key past its
length (nor, if causal, past its own position) and an empty row gives out = 0, lse = -inf.

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
    row_start_ref, row_count_ref, kv_index_ref, kv_len_ref,  # [G], [G], [G], [N] int32
    q_ref,  # [Hkv, R, D]
    k_ref, v_ref,  # [N, S, Hkv, D]
    o_ref,  # [splits, Hkv, R, D]
    lse_ref,  # [splits, Hkv, R]
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
    col_ok = jnp.arange(d_pad) < head_dim
    rows = pl.ds(row_start_ref[p] + first_local, block.block_m)
    cols = pl.ds(0, d_pad)
    q = plgpu.load(q_ref.at[h, rows, cols], mask=row_ok[:, None] & col_ok[None, :], other=0)

    node = kv_index_ref[p]
    length = kv_len_ref[node]
    lo = sp * split_len
    hi = jnp.minimum(lo + split_len, length)
    # Causal: row r is token t = (r // g) % T of its sequence, the (length - T + t)-th key; it sees keys <= that.
    last_visible = length - num_queries + (local // group) % num_queries

    def step(i, carry):
      acc, m, l = carry
      start = lo + i * block.block_k
      pos = start + jnp.arange(block.block_k)
      key_ok = pos < hi
      kv_mask = key_ok[:, None] & col_ok[None, :]
      k = plgpu.load(k_ref.at[node, pl.ds(start, block.block_k), h, cols], mask=kv_mask, other=0)
      # Logits in base 2: exp(x) = 2^(x·log2 e), so exp2 does the softmax.
      s = plgpu.dot(q, k, trans_b=True, precision=precision) * (scale * _LOG2_E)
      ok = key_ok[None, :]
      if causal:
        ok = ok & (pos[None, :] <= last_visible[:, None])
      s = jnp.where(ok, s, _MASKED)
      m_new = jnp.maximum(m, jnp.max(s, axis=1))
      alpha = jnp.exp2(m - m_new)
      probs = jnp.where(ok, jnp.exp2(s - m_new[:, None]), 0.0)
      v = plgpu.load(v_ref.at[node, pl.ds(start, block.block_k), h, cols], mask=kv_mask, other=0)
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
    plgpu.store(o_ref.at[sp, h, rows, cols], out.astype(o_ref.dtype), mask=row_ok[:, None] & col_ok[None, :])
    plgpu.store(lse_ref.at[sp, h, rows], lse, mask=row_ok)


@functools.partial(
    jax.jit,
    static_argnames=("block", "max_rows", "causal", "num_queries", "group", "scale", "interpret"),
)
def grouped_flash_attention(
    q_rows: Array,
    k: Array,
    v: Array,
    kv_lengths: Array,
    row_start: Array,
    row_count: Array,
    kv_index: Array,
    *,
    block: BlockConfig,
    max_rows: int,
    causal: bool,
    num_queries: int,
    group: int,
    scale: float,
    interpret: bool,
) -> tuple[Array, Array]:
  """Runs the kernel; see the module docstring for the layout.

  Args:
    q_rows: `[Hkv, R, D]` query rows.
    k, v: `[N, S, Hkv, D]` KV caches, read in place.
    kv_lengths: `[N]` valid keys per KV sequence.
    row_start, row_count, kv_index: `[G]` each: the rows of group p and the KV sequence they read.
    block: tiling; `block.splits > 1` returns float32 partials.
    max_rows: static bound on any row_count (sets the number of row blocks in the grid).
    causal, num_queries, group: causal masking; rows are ordered (sequence, token of num_queries, head of group).
    scale: multiplies q·k.
    interpret: run the kernel in the Pallas interpreter (CPU).

  Returns:
    out `[splits, Hkv, R, D]` (q dtype if splits == 1, else float32) and lse `[splits, Hkv, R]` float32.
    Rows that belong to no group are left unwritten.
  """
  hkv, r, d = q_rows.shape
  s = k.shape[1]
  num_groups = row_start.shape[0]
  split_len = pl.cdiv(pl.cdiv(s, block.splits), block.block_k) * block.block_k
  grid = (num_groups, hkv, pl.cdiv(max_rows, block.block_m), block.splits)
  out_dtype = q_rows.dtype if block.splits == 1 else jnp.float32
  precision = lax.Precision.HIGHEST if q_rows.dtype == jnp.float32 else lax.Precision.DEFAULT
  kernel = functools.partial(
      _kernel, block=block, split_len=split_len, head_dim=d, causal=causal, num_queries=num_queries,
      group=group, scale=scale, precision=precision)

  def whole(x):  # the kernel indexes inside the full array itself
    return pl.BlockSpec(x.shape, lambda *_: (0,) * len(x.shape))

  out_shape = (
      jax.ShapeDtypeStruct((block.splits, hkv, r, d), out_dtype),
      jax.ShapeDtypeStruct((block.splits, hkv, r), jnp.float32),
  )
  ints = [x.astype(jnp.int32) for x in (row_start, row_count, kv_index, kv_lengths)]
  return pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=[whole(x) for x in (*ints, q_rows, k, v)],
      out_specs=[whole(x) for x in out_shape],
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=block.num_warps, num_stages=block.num_stages),
      interpret=interpret,
      name="hydragen_grouped_flash",
  )(*ints, q_rows, k, v)


def combine_splits(out: Array, lse: Array, dtype) -> tuple[Array, Array]:
  """Merges the key splits of `grouped_flash_attention`: out `[splits, ..., D]`, lse `[splits, ...]`."""
  merged, lse = merge_states([(out[i], lse[i]) for i in range(out.shape[0])])
  return merged.astype(dtype), lse
