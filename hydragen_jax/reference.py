"""The op, defined: softmax attention with ragged lengths, and the log-sum-exp merge.

This module is the specification every implementation is tested against. It is plain `jax.numpy` in float32
(float64 for float64 inputs, under `jax_enable_x64`: `accumulation_dtype`) and reads like the equations of the Hydragen paper (arXiv 2402.05099, section 3):

    attention(q, K, V) = softmax(q Kᵀ · scale) V,          lse = log Σ_j exp(q·k_j · scale)

and for keys split into parts K = [K_1; K_2; …] with per-part results (o_i, lse_i):

    o = Σ_i o_i · exp(lse_i - lse),                        lse = log Σ_i exp(lse_i)

Shapes follow `jax.nn.dot_product_attention`: q `[B, T, Hq, D]`, k and v `[B, S, Hkv, D]`. Query head i reads KV
head i // g with g = Hq // Hkv (multi-head, grouped-query and multi-query attention alike).

It also specifies the cache write a decode step does before attending (`append`: `write_positions` then
`write_at`), which `tree_attention_append` and the models' cache writes are tested against.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def visible_keys(kv_lengths: Array, num_keys: int, num_queries: int, causal: bool) -> Array:
  """Which keys each query sees: bool `[B, T, S]`.

  Key position s is visible to query t of sequence b when s < kv_lengths[b] and, if `causal`, when
  s <= kv_lengths[b] - T + t: the T queries are the last T valid tokens of the sequence.
  """
  pos = jnp.arange(num_keys)[None, None, :]
  lengths = kv_lengths[:, None, None]
  visible = pos < lengths
  if causal:
    last = lengths - num_queries + jnp.arange(num_queries)[None, :, None]
    visible &= pos <= last
  return visible


def accumulation_dtype(*arrays) -> jnp.dtype:
  """The dtype the op computes in, and of its lse: float32 for 16- and 32-bit inputs, float64 where an input is
  float64 (only under `jax_enable_x64`), so that a float64 result carries float64 accuracy."""
  return jnp.result_type(jnp.float32, *(jnp.asarray(a).dtype for a in arrays))


def _softmax(logits: Array, visible: Array) -> tuple[Array, Array]:
  """softmax over the visible keys (last axis) and its lse; a row with no visible key gets 0 and -inf. The lse of
  such a row is taken over finite stand-ins and replaced after: a logsumexp over -inf alone has a NaN tangent, which
  forward-mode and second derivatives would carry into the merge (its weight 0 times NaN)."""
  seen = jnp.any(jnp.broadcast_to(visible, logits.shape), axis=-1)
  logits = jnp.where(visible, logits, -jnp.inf)
  lse = jax.nn.logsumexp(jnp.where(seen[..., None], logits, 0.0), axis=-1)
  return jnp.where(visible, jnp.exp(logits - lse[..., None]), 0.0), jnp.where(seen, lse, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("causal", "scale"))  # called eagerly: one program, not op by op
def attention(
    q: Array,
    k: Array,
    v: Array,
    kv_lengths: Array,
    *,
    causal: bool,
    scale: float,
) -> tuple[Array, Array]:
  """Plain softmax attention with its log-sum-exp.

  Args:
    q: `[B, T, Hq, D]` queries.
    k, v: `[B, S, Hkv, D]` keys and values; Hq is a multiple of Hkv.
    kv_lengths: `[B]` valid keys per sequence.
    causal: the T queries are the last T valid keys (see `visible_keys`).
    scale: multiplies q·k.

  Returns:
    out `[B, T, Hq, D]` in q.dtype (0 where a query sees no key) and lse `[B, T, Hq]` float32 (-inf there;
    `accumulation_dtype`: float64 for float64 inputs).
  """
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  acc = accumulation_dtype(q, k, v)
  qg = q.astype(acc).reshape(b, t, hkv, hq // hkv, d)
  # keys and values past a sequence's length are not its keys': whatever they hold (NaN in an unused cache tail)
  # stays out, of the output and of its derivatives (else a masked logit of a NaN key gives q a NaN gradient)
  valid = (jnp.arange(s) < kv_lengths[:, None])[:, :, None, None]
  logits = jnp.einsum("bthgd,bshd->bthgs", qg, jnp.where(valid, k.astype(acc), 0.0)) * scale
  visible = visible_keys(kv_lengths, s, t, causal)[:, :, None, None, :]
  probs, lse = _softmax(logits, visible)
  v = jnp.where(valid, v.astype(acc), 0.0)
  out = jnp.einsum("bthgs,bshd->bthgd", probs, v)
  return out.reshape(b, t, hq, d).astype(q.dtype), lse.reshape(b, t, hq)


@functools.partial(jax.jit, static_argnames=("scale",))
def shared_attention(q: Array, k: Array, v: Array, length: Array, *, scale: float) -> tuple[Array, Array]:
  """Attention of every query of the batch to one shared, fully visible KV: the prefix product of Hydragen.

  All B·T·g queries of a KV head meet the shared keys in one matrix product (inter-sequence batching).

  Args:
    q: `[B, T, Hq, D]`; k, v: `[P, Hkv, D]`; length: scalar count of valid shared keys.

  Returns:
    out `[B, T, Hq, D]` and lse `[B, T, Hq]` float32 (float64 for float64 inputs), as `attention`.
  """
  b, t, hq, d = q.shape
  p, hkv = k.shape[0], k.shape[1]
  acc = accumulation_dtype(q, k, v)
  qg = q.astype(acc).reshape(b, t, hkv, hq // hkv, d)
  visible = jnp.arange(p) < length
  logits = jnp.einsum("bthgd,phd->bthgp", qg, jnp.where(visible[:, None, None], k.astype(acc), 0.0)) * scale
  probs, lse = _softmax(logits, visible)
  v = jnp.where(visible[:, None, None], v.astype(acc), 0.0)  # values past the length stay out, as above
  out = jnp.einsum("bthgp,phd->bthgd", probs, v)
  return out.reshape(b, t, hq, d).astype(q.dtype), lse.reshape(b, t, hq)


def _is_array(x) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


def _describe(part) -> str:
  """What `merge_states` got for a part, for its error."""
  if _is_array(part):
    return f"an array of shape {jnp.shape(part)}"
  if isinstance(part, (tuple, list)) and len(part) == 2:
    kinds = ["array" if _is_array(x) else type(x).__name__ for x in part]
    return f"a pair of {kinds[0]} and {kinds[1]}"
  if isinstance(part, (tuple, list)):
    return f"{type(part).__name__} of {len(part)}"
  return type(part).__name__


@jax.jit
def merge_states(states: Sequence[tuple[Array, Array]]) -> tuple[Array, Array]:
  """Exact log-sum-exp merge of attention results over disjoint key sets.

  Args:
    states: `(out_i, lse_i)` pairs, out_i `[..., D]`, lse_i `[...]` (natural log). A part with no keys has
      lse_i = -inf and contributes nothing; if every part is empty the result is out = 0, lse = -inf (no NaN).

  Returns:
    out `[..., D]` in the dtype of the first part's out, and lse `[...]` float32 (float64 where a part's out or lse
    is float64: `accumulation_dtype`).
  """
  if _is_array(states) or not hasattr(states, "__iter__"):
    raise ValueError(f"merge_states: `states` must be a sequence of (out, lse) pairs; got {_describe(states)}.")
  states = list(states)
  if not states:
    raise ValueError("merge_states: `states` is empty; expected at least one (out, lse) pair.")
  for i, state in enumerate(states):
    if not (isinstance(state, (tuple, list)) and len(state) == 2 and all(map(_is_array, state))):
      raise ValueError(f"merge_states: part {i} must be an (out, lse) pair of arrays; got {_describe(state)}. "
                       f"`states` is a sequence of such pairs, e.g. [(out_1, lse_1), (out_2, lse_2)].")
    for what, x in zip(("out", "lse"), state):  # (arrays: checked above)
      if not jnp.issubdtype(x.dtype, jnp.floating) or jnp.dtype(x.dtype).itemsize < 2:
        raise ValueError(f"merge_states: part {i}'s {what} has dtype {x.dtype}; expected float16, bfloat16, float32 "
                         "or float64 (the merge is a weighted average in float32 or float64).")
  shape = jnp.shape(states[0][0])
  if not shape:
    raise ValueError("merge_states: part 0's out is a scalar; expected out [..., D] (a head dim axis) and lse [...].")
  for i, (o, lse) in enumerate(states):
    if jnp.shape(o) != shape or jnp.shape(lse) != shape[:-1]:
      raise ValueError(f"merge_states: part {i} has out {jnp.shape(o)} and lse {jnp.shape(lse)}; expected out "
                       f"{shape} (as part 0) and lse {shape[:-1]} (out without its last axis).")
  # o = Σ_i o_i·e^{lse_i} / Σ_i e^{lse_i}, shifted by the largest lse for range. Written part by part (no stacking),
  # so that XLA fuses it into elementwise passes without materialising a stack (on a GPU two kernels: the per-row
  # weights, then the weighted sum; `kernels/merge.py` does it in one).
  acc = accumulation_dtype(*(x for state in states for x in state))
  lses = [jnp.asarray(lse, acc) for _, lse in states]
  top = functools.reduce(jnp.maximum, lses)
  top = jnp.where(jnp.isfinite(top), top, 0.0)  # all parts empty: any finite shift works
  weights = [jnp.exp(lse - top) for lse in lses]  # exp(-inf) = 0 for empty parts
  total = sum(weights[1:], weights[0])
  safe_total = jnp.where(total > 0, total, 1.0)
  # an empty part's out is never read (weight 0 would still turn a NaN or inf there into NaN)
  out = sum((jnp.where(w[..., None] > 0, jnp.asarray(o, acc), 0.0) * (w / safe_total)[..., None]
             for (o, _), w in zip(states, weights)), jnp.zeros((), acc))
  # no keys: -inf; a NaN lse stays NaN (as -inf the next merge would read it as an empty part and drop it)
  lse = jnp.where(total > 0, top + jnp.log(safe_total), jnp.where(jnp.isnan(total), jnp.nan, -jnp.inf))
  return out.astype(states[0][0].dtype), lse


def saturate_int32(x: Array) -> Array:
  """Integer `x` as int32, a wider type (uint32; int64, uint64 with `jax_enable_x64`; numpy's and Python's at any
  width) clipped to int32's range first: past int32 is past any capacity or index, and the cast must not wrap it
  back into range (2^32 - 1 -> -1)."""
  # numpy / Python values clipped in numpy, before JAX would narrow them (2^32 + 3 -> 3 without x64)
  xp = jnp if isinstance(x, jax.Array) else np
  x = xp.asarray(x)
  if x.dtype == object:  # Python ints past 64 bits (numpy holds them as objects)
    x = np.asarray(np.clip(x, -2**31, 2**31 - 1)).astype(np.int64)
  info = jnp.iinfo(x.dtype)
  if info.max > 2**31 - 1 or info.min < -2**31:
    x = xp.clip(x, max(info.min, -2**31), 2**31 - 1)
  return jnp.asarray(x.astype(xp.int32))


def write_positions(lengths: Array, new_tokens: Array, num_slots: int, capacity: int) -> Array:
  """Cache position of each of a step's T query slots `[B, T]`: sequence b's new_tokens[b] real tokens are its last
  slots (right-aligned) and go to positions lengths[b], lengths[b] + 1, …; a padding slot t, and a slot whose
  position is at or past the capacity (or below 0), gets capacity + t (past the end: dropped; distinct within a
  row). new_tokens is clamped to [0, T]."""
  t = jnp.arange(num_slots)[None, :]
  # int32 (a uint32 length near 2^32 wrapped to a slot inside the cache), lengths past the capacity at it (no sum
  # overflows), a count outside [0, T] meaning none or all slots
  lengths = jnp.minimum(saturate_int32(lengths), capacity)
  new_tokens = jnp.clip(saturate_int32(new_tokens), 0, num_slots)[:, None]
  pos = lengths[:, None] + t - (num_slots - new_tokens)
  return jnp.where((t >= num_slots - new_tokens) & (pos >= 0) & (pos < capacity), pos, capacity + t)


def check_write_args(where: str, k_cache: Array, v_cache: Array, k: Array, v: Array, positions: Array
                     ) -> tuple[int, int, int, int, int]:
  """(B, T, S, Hkv, D) of a cache write's arguments (`write_at`'s, `models.kv_write.write`'s,
  `models.pair_scatter.scatter`'s): caches
  `[B, S, Hkv, D]` of one shape and dtype, k and v `[B, T, Hkv, D]`, integer positions `[B, T]`; else a ValueError
  that names `where`, the argument and what it got."""
  if k_cache.ndim != 4 or v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
    raise ValueError(f"{where}: k_cache {k_cache.dtype}{list(k_cache.shape)} and v_cache "
                     f"{v_cache.dtype}{list(v_cache.shape)}; expected both [B, S, Hkv, D], one shape and dtype.")
  b, s, hkv, d = k_cache.shape
  if k.ndim != 4 or v.shape != k.shape or k.shape[0] != b or k.shape[2:] != (hkv, d):
    raise ValueError(f"{where}: k {list(k.shape)} and v {list(v.shape)}; expected both [{b}, T, {hkv}, {d}] (the "
                     "caches' batch, KV heads and head dim).")
  t = k.shape[1]
  if positions.shape != (b, t) or not jnp.issubdtype(positions.dtype, jnp.integer):
    raise ValueError(f"{where}: positions {positions.dtype}{list(positions.shape)}; expected integers [{b}, {t}] (one "
                     "slot a new token).")
  return b, t, s, hkv, d


def write_at(k_cache: Array, v_cache: Array, k: Array, v: Array, positions: Array) -> tuple[Array, Array]:
  """k, v `[B, T, Hkv, D]` written into the caches `[B, S, Hkv, D]` at integer `positions` `[B, T]`
  (`write_positions`'s: distinct within a row; those outside [0, S) dropped), in the caches' dtype: one scatter a
  cache. Shapes are checked (`check_write_args`: a ValueError naming the argument)."""
  k_cache, v_cache = jnp.asarray(k_cache), jnp.asarray(v_cache)  # numpy caches too (`.at` is jax's)
  k, v = jnp.asarray(k), jnp.asarray(v)
  positions = positions if isinstance(positions, (jax.Array, np.ndarray)) else np.asarray(positions)
  b, t, s, _, _ = check_write_args("write_at", k_cache, v_cache, k, v, positions)
  rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, t))
  # int32 (a wider slot past the end stays past it: uint32 2^32 - 1 mixed with int32 read as -1), and a negative
  # slot dropped, as the other writes drop it (`.at` would wrap it to S + p), past the end at S + t (distinct within
  # the row)
  positions = saturate_int32(positions)
  positions = jnp.where(positions < 0, s + jnp.arange(t, dtype=jnp.int32)[None, :], positions)
  # (row, position) pairs are distinct (`write_positions`): the hint lets XLA write without atomics. With one slot a
  # row (decode, T = 1) they are also sorted (by row); with more, a row's padding slots (past the end) come first.
  hints = dict(mode="drop", indices_are_sorted=t == 1, unique_indices=True)
  return (k_cache.at[rows, positions].set(k.astype(k_cache.dtype), **hints),
          v_cache.at[rows, positions].set(v.astype(v_cache.dtype), **hints))


def append(k_cache: Array, v_cache: Array, k: Array, v: Array, lengths: Array, new_tokens: Array
           ) -> tuple[Array, Array]:
  """A step's new keys and values written into per-sequence caches, after their valid entries.

  Args:
    k_cache, v_cache: `[B, S, Hkv, D]`, lengths[b] valid entries each.
    k, v: `[B, T, Hkv, D]` the step's; sequence b's last new_tokens[b] slots are real (`write_positions`).
    lengths, new_tokens: `[B]`.

  Returns:
    The caches with the real slots at positions lengths[b] … lengths[b] + new_tokens[b] - 1 (those below S; the
    rest dropped), in the caches' dtype.
  """
  return write_at(k_cache, v_cache, k, v, write_positions(lengths, new_tokens, k.shape[1], k_cache.shape[1]))
