"""Pallas GPU kernel: a step's new keys and values written into a layer's k and v caches in one launch.

jnp's scatters write each cache with one of their own: two launches a layer, each moving little at decode (B = 64,
7B shape: 0.5 MB each, ~2.4 µs each on the H200: launch-bound; with the tuning's `pair_write` the models write both
with one XLA scatter, `models.pair_scatter`). Here one program a (sequence, query slot) copies the
slot's key row and value row (Hkv·D elements each) to its cache position: both caches in one launch, in place (the
outputs alias the caches). A slot whose position lies outside the cache (`models.cache.write_positions` puts padding
slots and overflow past the capacity) is dropped, as XLA's scatter with mode="drop" does. The models use it on the
kernel backends for steps of at most the tuning's `write_max_rows` slots (B·T; `hydragen_jax.tuning`, 0: never).

Measured on the H200 in the 7B decode step (session 31, experiments/PERF_NOTES.md): the launch takes 1.8 µs a layer
at B = 64 where the two scatters took 4.8, yet the step is no faster: XLA's scatter fusions compute their updates
(the qkv GEMM's split-K sum, k's RoPE, v's slice of the packed projection) inside the write, while a custom call's
operands are buffers, so XLA adds fusions that materialise k and v. Off in both shipped files; on a GPU,
`python -m scripts.profile_decode --write 0,4096` compares both inside the model.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from hydragen_jax import reference

Array = jax.Array


def _kernel(pos_ref, k_ref, v_ref, _k_cache, _v_cache, k_out, v_out, *, slots: int, capacity: int, width: int,
            block: int):
  """pos [B·T]; k, v [B·T, W]; caches (aliased by the outputs) [B, S, W]: program i writes slot i's rows."""
  i = pl.program_id(0).astype(jnp.int32)  # int32 indices throughout, jax_enable_x64 or not (one index type)
  pos = pos_ref[i]
  cols = jnp.arange(block)
  col_ok = cols < width  # the row padded to a power of two (Triton's tile)
  keep = col_ok & (pos >= 0) & (pos < capacity)
  row = jnp.clip(pos, 0, capacity - 1)  # a dropped slot's address stays inside the array (its store is masked)
  for src, dst in ((k_ref, k_out), (v_ref, v_out)):
    val = plgpu.load(src.at[i, pl.ds(jnp.int32(0), block)], mask=col_ok, other=0)
    plgpu.store(dst.at[i // slots, row, pl.ds(jnp.int32(0), block)], val, mask=keep)


def write(k_cache: Array, v_cache: Array, k: Array, v: Array, positions: Array, *,
          interpret: bool = False) -> tuple[Array, Array]:
  """Writes k and v into their caches at `positions`, in one kernel launch.

  Args:
    k_cache, v_cache: `[B, S, Hkv, D]` one layer's caches (S the capacity).
    k, v: `[B, T, Hkv, D]` the step's new keys and values (cast to the caches' dtype).
    positions: `[B, T]` int, the cache slot of each; slots outside [0, S) are dropped (as XLA's scatter with
      mode="drop"). A sequence's slots must differ (`cache.write_positions` makes them so): two writes to one
      entry land in no defined order.
    interpret: run in the Pallas interpreter (CPU).

  Returns:
    The updated `(k_cache, v_cache)` (in place under jit where the caches are not needed elsewhere).
  """
  b, t, s, hkv, d = reference.check_write_args("kv_write.write", k_cache, v_cache, k, v, positions)
  if b * t == 0 or s == 0 or hkv * d == 0:  # nothing to write, or nowhere to write it (every slot dropped)
    return k_cache, v_cache
  width = hkv * d
  block = pl.next_power_of_2(width)
  rows = b * t
  # Free reshapes (contiguous arrays): rows of W = Hkv·D elements.
  inputs = (reference.saturate_int32(positions).reshape(rows), k.astype(k_cache.dtype).reshape(rows, width),
            v.astype(v_cache.dtype).reshape(rows, width), k_cache.reshape(b, s, width), v_cache.reshape(b, s, width))

  def whole(x):  # the kernel indexes inside the full array itself
    return pl.BlockSpec(x.shape, lambda _: (0,) * x.ndim)

  k_out, v_out = pl.pallas_call(
      functools.partial(_kernel, slots=t, capacity=s, width=width, block=block),
      grid=(rows,),
      in_specs=[whole(x) for x in inputs],
      out_specs=[whole(inputs[3]), whole(inputs[4])],
      out_shape=[jax.ShapeDtypeStruct(inputs[3].shape, k_cache.dtype),
                 jax.ShapeDtypeStruct(inputs[4].shape, v_cache.dtype)],
      input_output_aliases={3: 0, 4: 1},
      compiler_params=plgpu.CompilerParams(num_warps=4 if block >= 1024 else 1, num_stages=1),
      interpret=interpret,
      name="hydragen_kv_write",
  )(*inputs)
  return k_out.reshape(k_cache.shape), v_out.reshape(v_cache.shape)
