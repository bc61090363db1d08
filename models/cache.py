"""KV caches for the three cache layouts, and the attention of each mode over them.

Every cache holds one array per layer (tuples of L arrays ``[N, S, Hkv, D]``: N nodes or sequences, S capacity),
so that a layer's KV is a whole array: the kernels read it in place (the Hopper kernel too) and a decode step
writes its new entries in place.

- ``TreeCache`` (modes ``hydragen`` and ``shared_storage``): the shared levels of a ``SharingTree``, each node's
  KV stored once (``LevelCache``), plus a per-sequence suffix cache ``[B, S_max, Hkv, D]`` per layer,
  preallocated to the prompt's unique part + the generation length. ``hydragen`` reads a shared node once for all
  the sequences under it (inter-sequence batching) on every level where the device's cost model says it pays
  (``batched_levels``), per sequence on the others; ``shared_storage`` reads every node once per sequence (vLLM
  prefix caching).
- ``DenseCache`` (mode ``standard``): each sequence holds its own copy of its whole prompt (FlashAttention-style
  baseline), ``[B, S_total, Hkv, D]`` per layer.
- ``NoCache`` (mode ``none``): the "No Attention" upper bound of the Hydragen paper: the q/k/v and output
  projections and RoPE still run, only the attention itself and the cache writes are skipped (the attention
  output is the queries, as in the paper's code). For throughput upper bounds ONLY: the generated text is
  meaningless.

``make_attend(mode, new_tokens, backend, decode)`` returns the ``attend(cache, layer, q, k, v)`` callback that
``models.llama.Llama`` calls in each layer: it writes the T new keys/values of each sequence (right-aligned:
sequence b's ``new_tokens[b]`` real tokens are the last query slots) after the cache's valid entries, then
attends causally with those entries included. After the forward, ``advance(cache, new_tokens)`` moves the
lengths on. Writes past a cache's capacity are dropped and reads past it are clamped (never outside the arrays).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

import hydragen_jax
from hydragen_jax import Level
from hydragen_jax import reference as hydragen_reference
from hydragen_jax.reference import write_positions  # the library's rule, the models' too
from hydragen_jax import tuning as tuning_lib
from hydragen_jax.dispatch import batching_pays, resolve_backend
from models import kv_write, pair_scatter

MODES = ("hydragen", "standard", "shared_storage", "none")


Layers = tuple[jax.Array, ...]


@struct.dataclass
class LevelCache:
    """One shared level: k/v per layer (L arrays ``[N, Lmax, Hkv, D]``), lengths ``[N]``; seq_to_node, the node of
    each of the B sequences, is static (a tuple: the tree is known when the step is traced, so the kernels group
    the sequences on the host, with no device work per step)."""

    k: Layers
    v: Layers
    lengths: jax.Array
    seq_to_node: tuple[int, ...] = struct.field(pytree_node=False)

    @property
    def nodes(self) -> np.ndarray:
        """seq_to_node as an int32 array ``[B]``."""
        return np.asarray(self.seq_to_node, np.int32)


@struct.dataclass
class TreeCache:
    """Shared levels (root to leaf) + per-sequence suffix k/v per layer (L arrays ``[B, S_max, Hkv, D]``), lengths
    ``[B]``."""

    shared: tuple[LevelCache, ...]
    k: Layers
    v: Layers
    lengths: jax.Array


@struct.dataclass
class DenseCache:
    """Per-sequence full caches k/v per layer (L arrays ``[B, S_total, Hkv, D]``), lengths ``[B]``."""

    k: Layers
    v: Layers
    lengths: jax.Array


@struct.dataclass
class NoCache:
    """Mode ``none``: nothing stored; lengths ``[B]`` kept for bookkeeping only."""

    lengths: jax.Array


Cache = TreeCache | DenseCache | NoCache


def empty_layers(num_layers: int, shape: tuple[int, ...], dtype, sharding=None) -> tuple[Layers, Layers]:
    """Zeroed k and v: ``num_layers`` arrays of ``shape`` each; with ``sharding`` (a model on a mesh: split over
    KV heads), each device makes only its own shard."""

    def zeros():
        x = jnp.zeros(shape, dtype)
        return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)

    return tuple(zeros() for _ in range(num_layers)), tuple(zeros() for _ in range(num_layers))


def scatter_write(k_cache: jax.Array, v_cache: jax.Array, k, v, positions: jax.Array, pair: bool = False
                  ) -> tuple[jax.Array, jax.Array]:
    """XLA's write of the new k/v ``[B, T, Hkv, D]`` into one layer's caches ``[B, S, Hkv, D]`` at ``positions``
    ``[B, T]`` (`write_positions`'s: slots at or past S dropped), in place under jit: one scatter a cache (the
    library's, ``hydragen_jax.reference.write_at``), or with ``pair`` one scatter of both (``models.pair_scatter``)."""
    if pair:
        return pair_scatter.scatter(k_cache, v_cache, k, v, positions)
    return hydragen_reference.write_at(k_cache, v_cache, k, v, positions)


def _replace_layer(ks: Layers, vs: Layers, layer: int, k_new, v_new) -> tuple[Layers, Layers]:
    """ks and vs with layer ``layer``'s arrays replaced by the written ones."""
    return ks[:layer] + (k_new,) + ks[layer + 1:], vs[:layer] + (v_new,) + vs[layer + 1:]


def _write(ks: Layers, vs: Layers, layer: int, k, v, lengths, new_tokens, backend: str | None = None,
           decode: bool = False) -> tuple[Layers, Layers]:
    """Write the new k/v ``[B, T, Hkv, D]`` into layer ``layer`` of ks/vs (in place under jit): on the kernel
    backends, steps of at most the tuning's ``write_max_rows`` slots (B·T) in one Pallas launch
    (``models.kv_write``), else with XLA's scatters (`scatter_write`: in the decode loop, one of both caches where
    the tuning's ``pair_write`` says)."""
    B, T = k.shape[:2]
    pos = write_positions(lengths, new_tokens, T, ks[layer].shape[1])
    backend = resolve_backend(backend)
    tune = tuning_lib.current()
    if backend != "xla" and 0 < B * T <= tune.write_max_rows:
        k_new, v_new = kv_write.write(ks[layer], vs[layer], k, v, pos, interpret=backend.startswith("interpret"))
    else:
        k_new, v_new = scatter_write(ks[layer], vs[layer], k, v, pos, pair=decode and tune.pair_write)
    return _replace_layer(ks, vs, layer, k_new, v_new)


def _no_attention(q, k, v, lengths):
    """The paper's "No Attention": the output is the queries q ``[B, T, Hq, D]``. k and v must still be computed (the
    paper skips only the attention), but XLA removes what nothing reads: they enter the output through a select on
    a condition that never holds (a negative length) and that XLA cannot prove false: an elementwise op fused with
    its neighbours, no attention work."""
    never = (lengths < 0)[:, None, None, None]
    kv = jnp.repeat(k + v, q.shape[2] // k.shape[2], axis=2)
    return jnp.where(never, kv.astype(q.dtype), q)


def level_node_bytes(level: LevelCache) -> int:
    """K and V bytes of one node of a shared level that one device reads a layer (its capacity:
    ``2 · Lmax · Hkv · D · itemsize``, Hkv the device's KV heads: on a mesh, those of its shard)."""
    k = level.k[0]
    # A placed array gives its shard's shape; traced (also inside shard_map) the shape is already the device's.
    shape = k.shape if isinstance(k, jax.core.Tracer) else k.sharding.shard_shape(k.shape)
    return 2 * math.prod(shape[1:]) * k.dtype.itemsize


def level_sizes(levels: Sequence[LevelCache]) -> list[tuple[int, int]]:
    """(nodes, `level_node_bytes`) of each shared level: what `batched_levels` decides on."""
    return [(level.k[0].shape[0], level_node_bytes(level)) for level in levels]


def batched_levels(mode: str, batch: int, levels: Sequence[tuple[int, int]], tuning=None) -> list[bool]:
    """Which shared levels a step reads batched, each level given as (nodes, bytes of one node a layer:
    `level_sizes`): in `hydragen` mode those where batching pays (the device's cost model,
    `hydragen_jax.dispatch.batching_pays`: readers a node and bytes saved; `tuning` None: the current one), the
    others per sequence; none in the other modes."""
    return [mode == "hydragen" and batching_pays(batch, n, node_bytes, tuning) for n, node_bytes in levels]


def check_mode(mode: str) -> None:
    """ValueError unless ``mode`` is one of MODES."""
    if mode not in MODES:
        raise ValueError(f"unknown attention mode {mode!r}; expected one of {MODES}")


def make_attend(mode: str, new_tokens: jax.Array, backend: str | None = None, decode: bool = False):
    """The per-layer attention of ``mode`` (see module docstring). new_tokens ``[B]`` int. ``decode``: the decode
    loop's (its caches are the loop's carries, written every step), where the tuning's ``pair_write`` and
    ``write_in_attention`` apply (the latter: the write inside the attention's launch,
    ``hydragen_jax.tree_attention_append``, where the Triton kernels run the step); prefill writes once a call, and
    its caches are fresh values that the pair's barrier would copy."""
    check_mode(mode)

    def attend(cache: Any, layer: int, q, k, v):
        if mode == "none":
            return _no_attention(q, k, v, cache.lengths), cache
        shared = [] if mode == "standard" else cache.shared
        levels = [Level(lc.k[layer], lc.v[layer], lc.lengths, lc.nodes) for lc in shared]
        batched = batched_levels(mode, q.shape[0], level_sizes(shared))
        if decode and tuning_lib.current().write_in_attention:
            before = levels + [Level(cache.k[layer], cache.v[layer], cache.lengths)]
            if hydragen_jax.append_in_launch(q, before, backend=backend, batch_shared=batched):
                out, k_new, v_new = hydragen_jax.tree_attention_append(q, before, k, v, new_tokens=new_tokens,
                                                                       backend=backend, batch_shared=batched)
                ks, vs = _replace_layer(cache.k, cache.v, layer, k_new, v_new)
                return out, cache.replace(k=ks, v=vs)
        ks, vs = _write(cache.k, cache.v, layer, k, v, cache.lengths, new_tokens, backend, decode)
        cache = cache.replace(k=ks, v=vs)
        own = Level(ks[layer], vs[layer], cache.lengths + new_tokens)
        # standard: = attention(q, k, v, kv_lengths, causal=True) over each sequence's own cache
        return hydragen_jax.tree_attention(q, levels + [own], backend=backend, batch_shared=batched), cache

    return attend


def advance(cache: Cache, new_tokens: jax.Array) -> Cache:
    """Count the tokens just written."""
    return cache.replace(lengths=cache.lengths + new_tokens)


def cache_bytes(cache: Cache) -> int:
    """Bytes held by the cache's arrays (the KV memory of a mode)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
