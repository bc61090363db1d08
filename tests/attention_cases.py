"""Random inputs and independent expectations for the attention tests.

The expectation for any tree is plain softmax attention (`reference.attention`) over each sequence's
concatenated keys: that is the claim Hydragen makes.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

from hydragen_jax import Level, reference

TOLERANCE = {jnp.float32: dict(rtol=1e-5, atol=1e-5), jnp.bfloat16: dict(rtol=2e-2, atol=2e-2),
             jnp.float16: dict(rtol=2e-3, atol=2e-3)}


def tol(dtype) -> dict:
  return TOLERANCE[jnp.dtype(dtype).type]


def assert_close_to_reference(out, lse, ref_out, ref_lse, dtype) -> None:
  """out close to the reference's; lse close where the reference row saw a key (-inf rows compared as 0)."""
  chex.assert_trees_all_close(out.astype(jnp.float32), ref_out.astype(jnp.float32), **tol(dtype))
  seen = jnp.isfinite(ref_lse)
  chex.assert_trees_all_close(jnp.where(seen, lse, 0), jnp.where(seen, ref_lse, 0), **tol(dtype))


def normal(key, shape, dtype) -> jax.Array:
  return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def random_level(key, num_nodes: int, capacity: int, lengths, seq_to_node, hkv: int, d: int, dtype) -> Level:
  kk, kv = jax.random.split(key)
  nodes = None if seq_to_node is None else jnp.asarray(seq_to_node, jnp.int32)
  return Level(normal(kk, (num_nodes, capacity, hkv, d), dtype), normal(kv, (num_nodes, capacity, hkv, d), dtype),
               jnp.asarray(lengths, jnp.int32), nodes)


def concatenated(levels: list[Level], batch: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Each sequence's keys and values laid end to end, root to leaf: k, v `[B, S, Hkv, D]`, lengths `[B]`."""
  ks, vs, lens = [], [], []
  for b in range(batch):
    parts_k, parts_v = [], []
    for level in levels:
      n = b if level.seq_to_node is None else int(level.seq_to_node[b])
      length = int(level.lengths[n])
      parts_k.append(np.asarray(level.k[n, :length], np.float32))
      parts_v.append(np.asarray(level.v[n, :length], np.float32))
    ks.append(np.concatenate(parts_k))
    vs.append(np.concatenate(parts_v))
    lens.append(len(ks[-1]))
  total = max(max(lens), 1)
  hkv, d = levels[0].k.shape[2:]

  def pad(xs):
    out = np.zeros((batch, total, hkv, d), np.float32)
    for b, x in enumerate(xs):
      out[b, : len(x)] = x
    return jnp.asarray(out)

  return pad(ks), pad(vs), jnp.asarray(lens, jnp.int32)


def expected_tree(q: jax.Array, levels: list[Level]) -> jax.Array:
  """Causal softmax attention over each sequence's concatenated levels, in float32."""
  k, v, lengths = concatenated(levels, q.shape[0])
  out, _ = reference.attention(q.astype(jnp.float32), k, v, lengths, causal=True, scale=q.shape[-1] ** -0.5)
  return out
