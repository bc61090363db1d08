"""Pallas GPU kernel: the log-sum-exp merge of a step's attention parts in one pass.

    o = Σ_i o_i·e^{lse_i - m} / Σ_i e^{lse_i - m},   lse = m + log Σ_i e^{lse_i - m},   m = max_i lse_i

`reference.merge_states` is the same arithmetic in jnp; XLA compiles it into two kernels (the per-row weights,
then the weighted sum), each a launch and a pass over the rows. Here one program takes `block_rows` rows of every
part at once, so the parts (a level's key splits and the levels) are read once and nothing is written but the
result. The parts are separate inputs, read in place: no stacking copy.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

Array = jax.Array


def _merge_kernel(*refs, num_parts: int, block_rows: int, head_dim: int):
  """Rows [pid·block_rows, (pid + 1)·block_rows) of every part: refs = lse_0.., out_0.., merged out, merged lse."""
  lse_refs, out_refs = refs[:num_parts], refs[num_parts:2 * num_parts]
  o_ref, lse_ref = refs[2 * num_parts:]
  rows = pl.program_id(0) * block_rows + jnp.arange(block_rows)
  row_ok = rows < lse_ref.shape[0]
  cols = jnp.arange(pl.next_power_of_2(head_dim))  # Triton tiles are powers of two: pad D, mask the extra columns
  tile_ok = row_ok[:, None] & (cols < head_dim)[None, :]
  lses = [plgpu.load(ref.at[rows], mask=row_ok, other=-jnp.inf) for ref in lse_refs]
  top = functools.reduce(jnp.maximum, lses)
  top = jnp.where(top > -jnp.inf, top, 0.0)  # every part empty: any finite shift works (the weights are all 0)
  total = jnp.zeros((block_rows,), jnp.float32)
  acc = jnp.zeros((block_rows, cols.shape[0]), jnp.float32)
  for lse, ref in zip(lses, out_refs):
    weight = jnp.exp(lse - top)  # 0 for an empty part (lse = -inf)
    part = plgpu.load(ref.at[rows[:, None], cols[None, :]], mask=tile_ok, other=0).astype(jnp.float32)
    acc += jnp.where(weight[:, None] > 0, part, 0.0) * weight[:, None]  # an empty part's out is never read as NaN
    total += weight
  seen = total > 0
  safe = jnp.where(seen, total, 1.0)
  plgpu.store(o_ref.at[rows[:, None], cols[None, :]], (acc / safe[:, None]).astype(o_ref.dtype), mask=tile_ok)
  plgpu.store(lse_ref.at[rows], jnp.where(seen, top + jnp.log(safe), -jnp.inf), mask=row_ok)


@functools.partial(jax.jit, static_argnames=("interpret", "block_rows", "num_warps"))
def merge_states(states: Sequence[tuple[Array, Array]], *, interpret: bool, block_rows: int = 16,
                 num_warps: int = 4) -> tuple[Array, Array]:
  """`reference.merge_states` as one kernel.

  Args:
    states: `(out_i [..., D], lse_i [...])` pairs of one shape (natural-log lse); a part with lse = -inf adds
      nothing, and if every part is empty the row's result is out = 0, lse = -inf (no NaN).
    interpret: run in the Pallas interpreter (CPU).
    block_rows: rows a program (a power of two); num_warps: Triton's warps a program.

  Returns:
    out `[..., D]` in the first part's dtype, lse `[...]` float32.
  """
  if not states:
    raise ValueError("merge_states: `states` is empty; expected at least one (out, lse) pair.")
  shape = states[0][0].shape
  for i, (out, lse) in enumerate(states):
    if out.shape != shape or lse.shape != shape[:-1]:
      raise ValueError(f"states[{i}] has out {out.shape} and lse {lse.shape}; expected out {shape} and lse "
                       f"{shape[:-1]} (every part of one shape).")
  if block_rows < 1 or block_rows & (block_rows - 1):
    raise ValueError(f"block_rows={block_rows}; expected a power of two.")
  d, rows = shape[-1], states[0][1].size
  if rows == 0 or d == 0:
    return jnp.zeros(shape, states[0][0].dtype), jnp.full(shape[:-1], -jnp.inf, jnp.float32)
  lses = [lse.astype(jnp.float32).reshape(rows) for _, lse in states]
  outs = [out.reshape(rows, d) for out, _ in states]

  def whole(x):  # the kernel indexes inside the full array itself
    return pl.BlockSpec(x.shape, lambda *_: (0,) * len(x.shape))

  out_shape = [jax.ShapeDtypeStruct((rows, d), states[0][0].dtype), jax.ShapeDtypeStruct((rows,), jnp.float32)]
  out, lse = pl.pallas_call(
      functools.partial(_merge_kernel, num_parts=len(states), block_rows=block_rows, head_dim=d),
      grid=(pl.cdiv(rows, block_rows),),
      in_specs=[whole(x) for x in (*lses, *outs)],
      out_specs=[whole(x) for x in out_shape],
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
      name="hydragen_merge",
  )(*lses, *outs)
  return out.reshape(shape), lse.reshape(shape[:-1])
