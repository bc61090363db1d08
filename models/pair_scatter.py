"""One XLA scatter that writes a step's new keys and values into both of a layer's caches.

`jnp`'s ``x.at[i].set(u)`` is one scatter an array, so a decode step's cache write costs two launches a layer
(k's, v's), each small and launch-bound at decode batch sizes. XLA's scatter is variadic: one instruction may
update several operands at the same indices. JAX does not expose that, so this module defines the primitive
``kv_pair_scatter`` whose lowering is one ``stablehlo.scatter`` of the two caches (replacing each entry by its
update), with unique indices: XLA:GPU emits it as one fusion that also computes the updates (k's RoPE, v's slice
of the packed projection), as it does for each scatter alone. Slots outside the caches are dropped (XLA's scatter
semantics; JAX's ``mode="drop"``). The models' decode loop writes with it where the device's tuning's
``pair_write`` says (``models.cache.make_attend(..., decode=True)``); prefill, which writes once a call, does not.

Two XLA defects are kept away from it: operands that are one value (a barrier, below) and operands in a layout
other than row-major, on which XLA:GPU's layout normalization aborts the process (a small model's decode loop on
XLA's attention, whose dots made the loop's caches heads-major; the caches are pinned row-major around the scatter).

Measured on an H100 (2026-12-06, sessions 55-56, `scripts/tuning/probe_kv_write.py`, experiments/PERF_NOTES.md):
in the 7B decode step (8 layers, P = 1K) the cache write took 3.5-4.1 µs a layer against 6.0-6.4 for two scatters
at B = 64, and 2.4 against 4.0-4.2 at B = 8 (one launch a layer less; steps 0.9-1.2 % faster).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.extend.mlir import ir
from jax.experimental.layout import Layout, with_layout_constraint
from jax.extend.mlir.dialects import stablehlo
from jax.interpreters import mlir

from hydragen_jax import reference

Array = jax.Array

kv_pair_scatter_p = Primitive("kv_pair_scatter")
kv_pair_scatter_p.multiple_results = True


@kv_pair_scatter_p.def_abstract_eval
def _abstract_eval(k_cache, v_cache, indices, k, v, *, indices_are_sorted: bool):
  del indices, k, v, indices_are_sorted
  return k_cache, v_cache  # the caches' avals (shape, dtype, and under shard_map their varying axes)


def _lower(ctx, k_cache, v_cache, indices, k, v, *, indices_are_sorted: bool):
  _, _, indices_aval, update_aval, _ = ctx.avals_in
  batch_dims = indices_aval.ndim - 1  # indices [B, T, 2]: (row, position) of each update slot
  dnums = stablehlo.ScatterDimensionNumbers.get(
      update_window_dims=list(range(batch_dims, update_aval.ndim)),  # a slot's [Hkv, D] entry
      inserted_window_dims=[0, 1],
      input_batching_dims=[],
      scatter_indices_batching_dims=[],
      scattered_dims_to_operand_dims=[0, 1],
      index_vector_dim=batch_dims)
  results = [mlir.aval_to_ir_type(ctx.module_context, aval) for aval in ctx.avals_out]
  op = stablehlo.ScatterOp(results, [k_cache, v_cache], indices, [k, v], dnums,
                           indices_are_sorted=ir.BoolAttr.get(indices_are_sorted), unique_indices=ir.BoolAttr.get(True))
  scalars = [mlir.aval_to_ir_type(ctx.module_context, jax.core.ShapedArray((), a.dtype)) for a in ctx.avals_out]
  block = op.update_computation.blocks.append(*scalars, *scalars)  # (old k, old v, new k, new v) -> (new k, new v)
  with ir.InsertionPoint(block):
    stablehlo.return_([block.arguments[2], block.arguments[3]])
  return op.results


mlir.register_lowering(kv_pair_scatter_p, _lower)
kv_pair_scatter_p.def_impl(jax.jit(kv_pair_scatter_p.bind, static_argnames="indices_are_sorted"))


def scatter(k_cache: Array, v_cache: Array, k: Array, v: Array, positions: Array) -> tuple[Array, Array]:
  """Writes k and v into their caches at `positions`, in one scatter.

  Args:
    k_cache, v_cache: `[B, S, Hkv, D]` one layer's caches (S the capacity), the same shape and dtype.
    k, v: `[B, T, Hkv, D]` the step's new keys and values (cast to the caches' dtype).
    positions: `[B, T]` int, the cache slot of each; slots outside [0, S) are dropped. A sequence's slots must
      differ (`models.cache.write_positions` makes them so): the scatter is told its indices are unique.

  Returns:
    The updated `(k_cache, v_cache)` (in place under jit where the caches are not needed elsewhere).
  """
  b, t, s, hkv, d = reference.check_write_args("pair_scatter.scatter", k_cache, v_cache, k, v, positions)
  if b * t == 0 or s == 0 or hkv * d == 0:  # nothing to write, or nowhere to write it (every slot dropped)
    return k_cache, v_cache
  slots = reference.saturate_int32(positions)  # (outside int32: clipped, still outside the cache)
  rows = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, t))
  indices = jnp.stack([rows, slots], axis=-1)
  # XLA miscompiles a variadic scatter whose operands are one value (openxla/xla#29362: e.g. two fresh zero caches,
  # merged by its CSE; the CPU backend then wrote both updates into one buffer). Behind this barrier the two
  # operands are distinct instructions: XLA copies one where they are one value (a fresh pair) and nothing where
  # they are distinct buffers (a decode loop's caches).
  k_cache, v_cache = jax.lax.optimization_barrier((k_cache, v_cache))
  # XLA:GPU's layout normalization aborts on a variadic scatter whose operands layout assignment gave a layout
  # other than the row-major one (`Check failed: input_shape.IsArray()` in shape_util.cc, XLA of JAX 0.11.2: an
  # H100, session 56, a small model's decode loop on XLA's attention, whose dots made the loop's caches
  # heads-major, layout {3,1,2,0}). The caches are pinned row-major around the scatter: no change where the readers
  # take them so anyway (the Pallas kernels), a layout change where XLA's own attention wanted another.
  row_major = Layout(major_to_minor=tuple(range(k_cache.ndim)))
  k_cache, v_cache = with_layout_constraint((k_cache, v_cache), (row_major, row_major))
  # (row, slot) pairs are distinct (unique: no atomics); with one slot a row (decode) also sorted, by row.
  out = kv_pair_scatter_p.bind(k_cache, v_cache, indices, k.astype(k_cache.dtype), v.astype(v_cache.dtype),
                               indices_are_sorted=t == 1)
  return tuple(with_layout_constraint(tuple(out), (row_major, row_major)))
