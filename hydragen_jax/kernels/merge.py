"""Pallas GPU kernel: the log-sum-exp merge of a step's parts in one launch.

A Hydragen step ends with parts over disjoint keys (each level, each key split of a level): stacks of normalised
partial outputs `out [P, ..., D]` and their `lse [P, ...]` (N rows: the product of `...`, e.g. B·T·Hq). `merge_states` (the reference) merges them as

  top = max_i lse_i,   w_i = e^{lse_i - top},   out = Σ_i w_i · out_i / Σ_i w_i,   lse = top + log Σ_i w_i,

which XLA compiles to two kernels (the per-row weights, then the weighted sum). Here one program takes `rows` rows
of every part, computes their weights in registers and writes the merged rows: one launch, each part read once.
Small programs (1 row, one warp, on the H100 and the H200: `Tuning.merge_rows`, `merge_warps`) keep many
loads in flight over the whole GPU: at B = 64 MHA decode (2048 rows, 10 parts) the step ran 1-2 µs faster than with
XLA's merge, where 16-row programs of 4 warps were no faster, and at B = 8 (256 rows, 16 parts) one row a program
halved the merge of two (4.1 -> 2.1 µs a layer on the H100; experiments/PERF_NOTES.md); `Tuning.merge_max_rows` says up to which row count
the API uses it (for the Triton
kernels' parts: the Hopper kernel's go to `merge_states`, which folds their layout change into its fusions), unless
`Tuning.launch_merge_max_rows` lets the Triton launch merge its parts itself (`flash.fused_levels(merge=True)`).
Empty parts (lse = -inf) weigh 0, their outputs are never read into the sum, and a row with no keys in any part
gives out = 0, lse = -inf (no NaN), as in `reference.merge_states`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from hydragen_jax import tuning as tuning_lib

Array = jax.Array


def rows_per_program(n: int, d: int, rows: int | None = None) -> int:
  """Rows a program merges for n rows of head dim d: the largest power of two up to `rows` (None: the tuning's
  `merge_rows`) dividing n, or 0 where
  the kernel does not apply (d not a power of two up to 256, the Triton tile's constraint, or no rows)."""
  if n <= 0 or d <= 0 or d & (d - 1) or d > 256:
    return 0
  rows = tuning_lib.current().merge_rows if rows is None else rows
  return min(rows, n & -n)  # n & -n: the largest power of two dividing n


def applies(n: int, d: int, max_rows: int) -> bool:
  """Whether a step of n query rows (B·T·Hq) and head dim d merges its parts here under a tuning's `merge_max_rows`
  (the API's rule; the sweeps time steps by it too)."""
  return 0 < n <= max_rows and rows_per_program(n, d, rows=1) > 0  # (a head dim the kernel takes)


def method(n: int, d: int, tuning) -> str:
  """How the Triton kernels' parts of a step of n query rows (B·T·Hq) and head dim d are merged under a tuning (the
  API's rule; the sweeps time steps by it): "launch" (in the launch itself, `flash.fused_levels(merge=True)`, up to
  `launch_merge_max_rows` rows), "pallas" (this module's kernel: `applies` under `merge_max_rows`) or "xla"
  (`merge_states`)."""
  if 0 < n <= tuning.launch_merge_max_rows:
    return "launch"
  return "pallas" if applies(n, d, tuning.merge_max_rows) else "xla"


def merge_tiles(lses: Sequence[Array], out_of) -> tuple[Array, Array]:
  """The log-sum-exp merge of one tile of rows inside a kernel (this module's and the launch's own merge,
  `flash._merge_if_last`): lses, each part's `[rows]` lse; out_of(i), part i's out `[rows, D]` (read one part at a
  time, into the sum). Returns out `[rows, D]` float32 and lse `[rows]`, as `reference.merge_states`."""
  lses = [lse.astype(jnp.float32) for lse in lses]
  top = functools.reduce(jnp.maximum, lses)
  top = jnp.where(jnp.isfinite(top), top, 0.0)  # every part empty: any finite shift works
  weights = [jnp.exp(lse - top) for lse in lses]  # 0 for an empty part
  total = functools.reduce(jnp.add, weights)
  safe = jnp.where(total > 0, total, 1.0)
  # an empty part's rows may hold anything (a NaN times weight 0 is still NaN): select, then weigh (as the
  # reference: a NaN weight still makes NaN)
  acc = functools.reduce(jnp.add, (jnp.where(w[:, None] > 0, out_of(i).astype(jnp.float32), 0.0) * (w / safe)[:, None]
                                   for i, w in enumerate(weights)))
  # no keys: -inf; a NaN lse stays NaN (not read as an empty part by a later merge), as the reference
  return acc, jnp.where(total > 0, top + jnp.log(safe), jnp.where(jnp.isnan(total), jnp.nan, -jnp.inf))


def _kernel(*refs, sizes: tuple[int, ...]):
  """refs: per stack (out [P, rows, D], lse [P, rows]), then the merged out [rows, D] and lse [rows]."""
  ins, (o_ref, lse_ref) = refs[:-2], refs[-2:]
  parts = [(ins[2 * s], ins[2 * s + 1], p) for s, size in enumerate(sizes) for p in range(size)]
  out, lse = merge_tiles([lse[p] for _, lse, p in parts], lambda i: parts[i][0][parts[i][2]])
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse


def merge_stacks(stacks: Sequence[tuple[Array, Array]], *, interpret: bool = False,
                 rows: int | None = None, num_warps: int | None = None) -> tuple[Array, Array]:
  """Merges stacks of parts by their log-sum-exp in one kernel launch.

  Args:
    stacks: `(out [P_i, ..., D], lse [P_i, ...])` pairs (P_i parts each: e.g. a level's key splits, `...` e.g.
      `B, T, Hq`); every part over the same rows, lse in natural log, -inf for a row with no keys in that part.
    interpret: run in the Pallas interpreter (CPU).
    rows, num_warps: rows a program (a power of two; the largest power of two up to it that divides n) and its
      warps; None: the tuning's `merge_rows` and `merge_warps` (`tuning.current()`).

  Returns:
    out `[..., D]` in the first stack's dtype and lse `[...]` float32, as `reference.merge_states` over every part of
    every stack.
  """
  if not stacks:
    raise ValueError("merge_stacks: `stacks` is empty; expected at least one (out, lse) pair.")
  shape = stacks[0][0].shape[1:]  # [..., D]
  if len(shape) < 2:
    raise ValueError(f"merge_stacks: stack 0 has out {stacks[0][0].shape}; expected [P, ..., D] with rows.")
  for i, (o, lse) in enumerate(stacks):
    if o.shape[1:] != shape or lse.shape != o.shape[:-1]:
      raise ValueError(f"merge_stacks: stack {i} has out {o.shape} and lse {lse.shape}; expected out [P, "
                       f"{', '.join(map(str, shape))}] and lse [P, {', '.join(map(str, shape[:-1]))}] (rows and head "
                       "dim as stack 0's).")
  n, d = math.prod(shape[:-1]), shape[-1]
  tuning = tuning_lib.current()
  rows = tuning.merge_rows if rows is None else rows
  num_warps = tuning.merge_warps if num_warps is None else num_warps
  if rows < 1 or rows & (rows - 1):
    raise ValueError(f"merge_stacks: rows={rows}; expected a power of two >= 1.")
  rows = rows_per_program(n, d, rows)
  if not rows:
    raise ValueError(f"merge_stacks: {n} rows of head dim {d} are not supported (head dim a power of two up to "
                     "256, at least one row); use reference.merge_states.")
  out_dtype = stacks[0][0].dtype
  in_specs, inputs = [], []
  for o, lse in stacks:  # each stack seen as [P, N, D] (a free reshape)
    in_specs += [pl.BlockSpec((o.shape[0], rows, d), lambda r: (0, r, 0)),
                 pl.BlockSpec((o.shape[0], rows), lambda r: (0, r))]
    inputs += [o.reshape(o.shape[0], n, d), lse.reshape(lse.shape[0], n)]
  out, lse = pl.pallas_call(
      functools.partial(_kernel, sizes=tuple(o.shape[0] for o, _ in stacks)),
      grid=(n // rows,),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((rows, d), lambda r: (r, 0)), pl.BlockSpec((rows,), lambda r: (r,))],
      out_shape=[jax.ShapeDtypeStruct((n, d), out_dtype), jax.ShapeDtypeStruct((n,), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
      name="hydragen_merge",
  )(*inputs)
  return out.reshape(shape), lse.reshape(shape[:-1])
