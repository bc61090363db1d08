"""KV caches for the three cache layouts, and the attention of each mode over them.

All caches hold every layer: arrays ``[L, N, S, Hkv, D]`` (L layers, N nodes or sequences, S capacity).

- ``TreeCache`` (modes ``hydragen`` and ``shared_storage``): the shared levels of a ``SharingTree``, each node's
  KV stored once (``LevelCache``), plus a per-sequence suffix cache ``[L, B, S_max, Hkv, D]`` preallocated to
  the prompt's unique part + the generation length. ``hydragen`` reads a shared node once for all the sequences
  under it (inter-sequence batching); ``shared_storage`` reads it once per sequence (vLLM prefix caching).
- ``DenseCache`` (mode ``standard``): each sequence holds its own copy of its whole prompt (FlashAttention-style
  baseline), ``[L, B, S_total, Hkv, D]``.
- ``NoCache`` (mode ``none``): attention skipped, output zeros. For throughput upper bounds ONLY: the
  generated text is meaningless.

``make_attend(mode, cache, new_tokens, backend)`` returns the ``attend(cache, layer, q, k, v)`` callback that
``models.llama.Llama`` calls in each layer: it writes the T new keys/values of each sequence (right-aligned:
sequence b's ``new_tokens[b]`` real tokens are the last query slots) after the cache's valid entries, then
attends causally with those entries included. After the forward, ``advance(cache, new_tokens)`` moves the
lengths on.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

import hydragen_jax
from hydragen_jax import Level

MODES = ("hydragen", "standard", "shared_storage", "none")


@struct.dataclass
class LevelCache:
    """One shared level: k/v ``[L, N, Lmax, Hkv, D]``, lengths ``[N]``, seq_to_node ``[B]``."""

    k: jax.Array
    v: jax.Array
    lengths: jax.Array
    seq_to_node: jax.Array
    max_group: int | None = struct.field(pytree_node=False, default=None)


@struct.dataclass
class TreeCache:
    """Shared levels (root to leaf) + per-sequence suffix k/v ``[L, B, S_max, Hkv, D]``, lengths ``[B]``."""

    shared: tuple[LevelCache, ...]
    k: jax.Array
    v: jax.Array
    lengths: jax.Array


@struct.dataclass
class DenseCache:
    """Per-sequence full caches k/v ``[L, B, S_total, Hkv, D]``, lengths ``[B]``."""

    k: jax.Array
    v: jax.Array
    lengths: jax.Array


@struct.dataclass
class NoCache:
    """Mode ``none``: nothing stored; lengths ``[B]`` kept for bookkeeping only."""

    lengths: jax.Array


Cache = TreeCache | DenseCache | NoCache


def write_positions(lengths: jax.Array, new_tokens: jax.Array, T: int, capacity: int) -> jax.Array:
    """Cache slot of each right-aligned query slot ``[B, T]``; padding slots get ``capacity`` (dropped)."""
    t = jnp.arange(T)[None, :]
    pos = lengths[:, None] + t - (T - new_tokens[:, None])
    return jnp.where(t >= T - new_tokens[:, None], pos, capacity)


def _write(k_all, v_all, layer, k, v, lengths, new_tokens):
    """Scatter the new k/v ``[B, T, Hkv, D]`` of ``layer`` into k_all/v_all ``[L, B, S, Hkv, D]``."""
    B, T = k.shape[:2]
    pos = write_positions(lengths, new_tokens, T, k_all.shape[2])
    rows = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
    k_all = k_all.at[layer, rows, pos].set(k.astype(k_all.dtype), mode="drop")
    v_all = v_all.at[layer, rows, pos].set(v.astype(v_all.dtype), mode="drop")
    return k_all, v_all


def _layer_level(k_all, v_all, layer, lengths, seq_to_node, max_group, by_index: bool) -> Level:
    """The ``Level`` of one layer of k/v ``[L, N, S, Hkv, D]``.

    by_index=False slices the layer out (``k_all[layer]``): the jnp reference fuses the slice into its
    consumers. by_index=True hands the kernels the whole array with ``layer=``, so they read that layer in place:
    a slice would be copied before each Pallas call, every layer and every step.
    """
    if not by_index:
        return Level(k_all[layer], v_all[layer], lengths, seq_to_node, max_group)
    return Level(k_all, v_all, lengths, seq_to_node, max_group, layer=layer)


def make_attend(mode: str, new_tokens: jax.Array, backend: str | None = None):
    """The per-layer attention of ``mode`` (see module docstring). new_tokens ``[B]`` int."""
    if mode not in MODES:
        raise ValueError(f"unknown attention mode {mode!r}; expected one of {MODES}")
    # The jnp reference fuses a layer slice into its consumers; for the kernels, address layers by index.
    by_index = hydragen_jax.default_backend() != "xla" if backend is None else backend != "xla"

    def attend(cache: Any, layer, q, k, v):
        if mode == "none":
            return jnp.zeros_like(q), cache
        k_all, v_all = _write(cache.k, cache.v, layer, k, v, cache.lengths, new_tokens)
        cache = cache.replace(k=k_all, v=v_all)
        own = _layer_level(k_all, v_all, layer, cache.lengths + new_tokens, None, None, by_index)
        if mode == "standard":  # = attention(q, k, v, kv_lengths, causal=True) over each sequence's own cache
            return hydragen_jax.tree_attention(q, [own], backend=backend), cache
        batched = mode == "hydragen"
        levels = [_layer_level(lc.k, lc.v, layer, lc.lengths, lc.seq_to_node, lc.max_group, by_index)
                  for lc in cache.shared]
        out = hydragen_jax.tree_attention(q, levels + [own], backend=backend, batch_shared=batched)
        return out, cache

    return attend


def advance(cache: Cache, new_tokens: jax.Array) -> Cache:
    """Count the tokens just written."""
    return cache.replace(lengths=cache.lengths + new_tokens)


def cache_bytes(cache: Cache) -> int:
    """Bytes held by the cache's arrays (the KV memory of a mode)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
