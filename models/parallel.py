"""Tensor parallelism (Megatron-style) over the axis ``"model"`` of a ``jax.sharding.Mesh``.

A model on a mesh of n devices (``Llama(config, params, mesh=mesh)``, made by ``init_random(..., mesh=mesh)``,
``load_checkpoint(..., mesh=mesh)`` or ``shard_model(model, mesh)``) holds every weight as one global array whose
shards lie on their devices (``NamedSharding``, specs in ``param_specs``):

- the packed q/k/v projection ``w_qkv`` ``[d, Hkv, (g + 2)·D]`` (and Qwen2's ``b_qkv``) and the packed gate/up
  ``w_gate_up`` ``[d, 2, I]``: column-parallel, split over their KV-head axis and their MLP axis: each device holds
  its KV heads, each with its query heads (``models.llama.pack_qkv`` groups them so), and its I/n MLP columns;
- o and down: row-parallel, each device holds the rows that its heads / MLP columns feed; the partial products are
  summed over the devices by one ``psum`` (all-reduce) each;
- the embedding and the LM head: split over the vocabulary; the lookup is masked to the device's rows and summed by
  a ``psum`` (then scaled: Granite's multiplier, Gemma's sqrt(d)), the logits stay split over the vocabulary
  (``[B, V]`` sharded on V);
- norms (and Qwen3's q/k norms; Gemma's, of 1 + weight): replicated; OLMo 2's q / k norms over all heads split as their heads (k's copied
  with its KV head), their mean squares averaged over the devices (one ``pmean`` a layer for both);

KV caches (every shared level and the suffix, ``[N, S, Hkv, D]`` per layer) are split over their KV-head axis 2
(``KV_SPEC``). When the mesh has more devices than the model has KV heads (n = r·Hkv), each KV head is replicated
on the r devices whose query heads read it: ``w_qkv`` (and ``b_qkv``) then has n groups, one a device, each with
the device's Hq/n query heads and a copy of the key and value columns of the KV head they read, and the caches
hold ``n`` KV heads, one a device. Query head h lives on device h // (Hq/n), and reads KV head h // (Hq/Hkv), which
that layout puts on the same device. A head count the mesh cannot split that way raises ``ValueError``. The
vocabulary and the MLP width are zero-padded to multiples of n where needed (padded logits are -inf, padded MLP
columns add 0).

The forward runs under one ``jax.shard_map`` per model call: each device runs the single-device decoder
(``models.llama.run_layers``) with a config of its local sizes (``local_config``) on its own shards, the attention
callback (Pallas kernels included) on its own heads and caches. The only communication is one psum after o, one
after down (per layer) and one after the embedding lookup (and, for OLMo 2, a pmean of q's and k's mean squares per
layer: two numbers per token). Everything outside the model call (sampling, cache
bookkeeping) is ordinary jitted code on the global arrays, partitioned by XLA.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from models.config import LlamaConfig, is_integer
from models.llama import (Llama, check_shapes, head_logits, model_norm, pack_qkv, param_shapes,
                          run_layers, scale_embeddings, unpack_qkv)

AXIS = "model"
KV_SPEC = P(None, None, AXIS, None)  # caches [N, S, Hkv, D]: split over KV heads

# Spec of every parameter (models.llama.param_shapes names; linear weights are [in, out]).
_SPECS = {
    "embed": P(AXIS, None), "lm_head": P(None, AXIS), "final_norm": P(),
    "w_qkv": P(None, AXIS, None), "b_qkv": P(AXIS, None), "wo": P(AXIS, None),
    "w_gate_up": P(None, None, AXIS), "w_down": P(AXIS, None),
    "attn_norm": P(), "mlp_norm": P(), "q_norm": P(), "k_norm": P(),
    # OLMo 2's: the output norms replicated, the q / k norms over all heads split as their heads (k's replicated with
    # its KV heads where the mesh has more devices than KV heads)
    "attn_out_norm": P(), "mlp_out_norm": P(), "q_proj_norm": P(AXIS), "k_proj_norm": P(AXIS),
}
_QKV_KEYS = ("w_qkv", "b_qkv")  # KV heads replicated when the mesh has more devices than KV heads


@dataclasses.dataclass(frozen=True)
class Split:
    """How a config divides over ``devices`` devices: per-device sizes (``kv_replicas`` devices hold each KV head)."""

    devices: int
    q_heads: int
    kv_heads: int
    kv_replicas: int
    intermediate: int  # MLP columns a device (the padded width / devices)
    vocab: int  # vocabulary rows a device (the padded vocabulary / devices)


def mesh_size(mesh: Mesh) -> int:
    """Devices along the mesh's ``"model"`` axis; ``ValueError`` for a mesh with other axes, or whose axis is not of
    type Auto (``jax.make_mesh`` makes Explicit axes by default, which the model's sharding constraints cannot
    name)."""
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if tuple(mesh.axis_names) != (AXIS,):
        raise ValueError(f"mesh must have the one axis {AXIS!r} (tensor parallelism), got axes {mesh.axis_names}")
    kind = mesh.axis_types[0]
    if kind != jax.sharding.AxisType.Auto:
        default = " (jax.make_mesh's default)" if kind == jax.sharding.AxisType.Explicit else ""
        raise ValueError(f"mesh axis {AXIS!r} must be of type AxisType.Auto, got {kind}{default}: "
                         f"build it with models.parallel.make_mesh(n), or jax.make_mesh((n,), ({AXIS!r},), "
                         "axis_types=(jax.sharding.AxisType.Auto,))")
    return mesh.shape[AXIS]


def make_mesh(devices: int) -> Mesh:
    """A mesh of the first ``devices`` devices along the axis ``"model"`` (an integer: Python, numpy, or a 0-d integer
    array; ``models.config.is_integer``)."""
    available = jax.devices()
    if not is_integer(devices) or not 1 <= devices <= len(available):
        raise ValueError(f"make_mesh: devices must be an integer in [1, {len(available)}] (the devices JAX sees), "
                         f"got {devices!r}")
    return Mesh(np.array(available[:int(devices)]), (AXIS,))


def split(config: LlamaConfig, devices: int) -> Split:
    """The per-device sizes of ``config`` over ``devices`` devices; ``ValueError`` naming the counts where the heads
    do not divide: Hq must be a multiple of n, and Hkv a multiple or a divisor of n (then each KV head is
    replicated on n / Hkv devices, those of its query heads)."""
    n, hq, hkv = devices, config.num_attention_heads, config.num_key_value_heads
    if not is_integer(n) or n < 1:
        raise ValueError(f"tensor parallelism: devices must be a positive integer, got {n!r}")
    n = int(n)
    if hq % n:
        raise ValueError(f"tensor parallelism over {n} devices: num_attention_heads ({hq}) must be a multiple of the "
                         f"mesh axis {AXIS!r} size ({n})")
    if hkv % n and n % hkv:
        raise ValueError(f"tensor parallelism over {n} devices: num_key_value_heads ({hkv}) must be a multiple or a "
                         f"divisor of the mesh axis {AXIS!r} size ({n}), so that the {hq // n} query heads of each "
                         f"device read whole KV heads of their own (num_attention_heads = {hq})")
    return Split(devices=n, q_heads=hq // n, kv_heads=max(1, hkv // n), kv_replicas=max(1, n // hkv),
                 intermediate=-(-config.intermediate_size // n), vocab=-(-config.vocab_size // n))


def local_config(config: LlamaConfig, s: Split) -> LlamaConfig:
    """The config one device runs: its heads, MLP columns and vocabulary rows; no stop ids (generation reads the
    whole config's: checked against a device's rows, an id past them warned that generation never stops on it)."""
    return dataclasses.replace(config, num_attention_heads=s.q_heads, num_key_value_heads=s.kv_heads,
                               intermediate_size=s.intermediate, vocab_size=s.vocab, eos_token_ids=())


def param_specs(config: LlamaConfig) -> dict[str, Any]:
    """The ``PartitionSpec`` of every parameter, in the tree of ``models.llama.param_shapes``."""
    return jax.tree_util.tree_map_with_path(lambda path, _: _SPECS[_key(path)], param_shapes(config),
                                            is_leaf=lambda x: isinstance(x, tuple))


def param_specs_of(key: str) -> P:
    """The ``PartitionSpec`` of parameter ``key`` (e.g. ``w_qkv``)."""
    return _SPECS[key]


def _key(path) -> str:
    """The parameter name at the end of a tree path (``['layers'][3]['w_qkv']`` -> ``w_qkv``)."""
    return path[-1].key


def layout_shape(key: str, shape: tuple[int, ...], s: Split, head_dim: int) -> tuple[int, ...]:
    """The global shape of parameter ``key`` (canonical ``shape``) on the mesh: KV heads replicated, vocabulary and
    MLP width padded."""
    shape = list(shape)
    if key in _QKV_KEYS:  # [..., Hkv, (g + 2)·D] -> r·Hkv groups of g / r query heads, a key and a value each
        r = s.kv_replicas
        shape[-2:] = [shape[-2] * r, (shape[-1] - 2 * head_dim) // r + 2 * head_dim]
    if key == "k_proj_norm":  # [Hkv·D] -> each KV head's D weights r times
        shape[0] *= s.kv_replicas
    if key in ("embed", "w_down"):
        shape[0] = (s.vocab if key == "embed" else s.intermediate) * s.devices
    if key in ("lm_head", "w_gate_up"):
        shape[-1] = (s.vocab if key == "lm_head" else s.intermediate) * s.devices
    return tuple(shape)


def to_layout(key: str, x, config: LlamaConfig, s: Split):
    """Parameter ``key`` (canonical, ``[in, out]``; numpy or jax) in its mesh layout: each KV head's key and value
    columns repeated ``kv_replicas`` times, once with each group of its query heads (so that device i holds the
    query heads i·Hq/n onwards and KV head i // r; OLMo 2's k norm weights likewise), zero rows / columns of
    padding."""
    xp = np if isinstance(x, np.ndarray) else jnp
    D = config.head_dim
    target = layout_shape(key, x.shape, s, D)
    heads = lambda y: xp.repeat(y.reshape(y.shape[:-1] + (-1, D)), s.kv_replicas, axis=-2).reshape(  # noqa: E731
        y.shape[:-1] + (-1,))
    if key in _QKV_KEYS and s.kv_replicas > 1:
        q, k, v = unpack_qkv(x, D)
        x = pack_qkv(q, heads(k), heads(v), D)
    if key == "k_proj_norm" and s.kv_replicas > 1:
        x = heads(x)
    if target != x.shape:
        x = xp.pad(x, [(0, t - d) for t, d in zip(target, x.shape)])
    return x


def from_layout(key: str, x, config: LlamaConfig, s: Split, replicas: str = "first"):
    """Inverse of ``to_layout``: the canonical parameter (one copy of each KV head, no padding). ``replicas``:
    "first" keeps a replicated KV head's first copy (parameters: the copies are equal); "sum" adds the copies, the
    transpose of ``to_layout`` (gradients: each copy's holds only its own query heads' part)."""
    D = config.head_dim
    r = s.kv_replicas
    if replicas == "first":
        first = lambda y: y.reshape(y.shape[:-1] + (-1, D))[..., ::r, :].reshape(  # noqa: E731
            y.shape[:-1] + (-1,))
    elif replicas == "sum":
        first = lambda y: y.reshape(y.shape[:-1] + (-1, r, D)).sum(axis=-2).reshape(  # noqa: E731
            y.shape[:-1] + (-1,))
    else:
        raise ValueError(f"from_layout: replicas must be 'first' or 'sum', got {replicas!r}")
    if key in _QKV_KEYS and s.kv_replicas > 1:
        q, k, v = unpack_qkv(x, D)
        x = pack_qkv(q, first(k), first(v), D)
    if key == "k_proj_norm" and s.kv_replicas > 1:
        x = first(x)
    V, I = config.vocab_size, config.intermediate_size
    if key == "embed":
        return x[:V]
    if key == "lm_head":
        return x[:, :V]
    if key == "w_gate_up":
        return x[..., :I]
    return x[:I] if key == "w_down" else x


def map_params(fn, params: dict[str, Any]) -> dict[str, Any]:
    """``fn(key, array)`` applied to every parameter (``key``: its name, e.g. ``w_qkv``)."""
    return jax.tree_util.tree_map_with_path(lambda path, x: fn(_key(path), x), params)


def check_layout(config: LlamaConfig, params: dict[str, Any], mesh: Mesh) -> Split:
    """The split of ``config`` on ``mesh``; ``ValueError`` naming the first parameter whose shape is not its mesh
    layout (``shard_model`` puts a single-device model's parameters in it)."""
    s = split(config, mesh_size(mesh))
    check_shapes(config, params, "Llama(mesh=...)", f"on a {s.devices}-device mesh it must be {{want}} (use "
                 "models.parallel.shard_model to place a single-device model's parameters)",
                 layout=lambda key, shape: layout_shape(key, shape, s, config.head_dim))
    return s


def place(params: dict[str, Any], mesh: Mesh) -> dict[str, Any]:
    """Parameters already in ``mesh``'s layout (shapes), each array not yet placed in its sharding on the mesh put
    there (e.g. built on one device: each call would otherwise re-shard it); arrays in place, tracers (a model
    rebuilt inside a trace) and abstract values (``jax.ShapeDtypeStruct``) are left as they are."""
    def one(key, x):
        if isinstance(x, jax.core.Tracer) or not isinstance(x, (jax.Array, np.ndarray)):  # traced or abstract
            return x
        want = NamedSharding(mesh, _SPECS[key])
        if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(want, x.ndim):
            return x
        return jax.device_put(x, want)

    return map_params(one, params)


def put(key: str, x, config: LlamaConfig, s: Split, mesh: Mesh) -> jax.Array:
    """Canonical parameter ``key`` (a host or device array) on ``mesh`` in its layout: each device receives only its
    shard (no whole copy on a device)."""
    return jax.device_put(to_layout(key, x, config, s), NamedSharding(mesh, _SPECS[key]))


def shard_params(config: LlamaConfig, params: dict[str, Any], mesh: Mesh) -> dict[str, Any]:
    """Canonical parameters (host or device arrays) placed on ``mesh`` in their layout, one tensor at a time."""
    s = split(config, mesh_size(mesh))
    return map_params(lambda key, x: put(key, x, config, s, mesh), params)


def canonical_params(config: LlamaConfig, params: dict[str, Any], mesh: Mesh) -> dict[str, Any]:
    """Parameters in their mesh layout -> the canonical ones (still global arrays; ``np.asarray`` gathers one);
    ``ValueError`` where they are not ``mesh``'s layout (e.g. a mesh of another size)."""
    s = check_layout(config, params, mesh)
    return map_params(lambda key, x: from_layout(key, x, config, s), params)


def canonical_grads(config: LlamaConfig, grads: dict[str, Any], mesh: Mesh) -> dict[str, Any]:
    """Gradients with respect to parameters in ``mesh``'s layout -> those of the canonical parameters: where a KV
    head is replicated (fewer KV heads than devices) its copies' gradients are summed, each holding only its own
    query heads' part (``canonical_params`` would keep the first copy's part); padding dropped. To update the
    parameters on the mesh, put the result back in the layout (``shard_params``), so the copies stay equal."""
    s = check_layout(config, grads, mesh)
    return map_params(lambda key, x: from_layout(key, x, config, s, replicas="sum"), grads)




# ------------------------------------------------------------------------------------------- the forward


def cache_specs(cache: Any) -> Any:
    """The specs of a cache pytree: its KV arrays (the 4-D ``[N, S, Hkv, D]`` leaves) split over heads, the rest
    (lengths, node indices) replicated."""
    return jax.tree.map(lambda x: KV_SPEC if x.ndim == 4 else P(), cache)


def forward(config: LlamaConfig, mesh: Mesh, params: dict[str, Any], tokens: jax.Array, positions: jax.Array,
            cache: Any, attend) -> tuple[jax.Array, Any]:
    """``Llama.__call__`` on the mesh: tokens ``[B, T]``, positions ``[B, T]`` (replicated) -> (hidden ``[B, T, d]``
    replicated, cache). Each device runs the decoder on its shards under ``shard_map``; ``attend`` sees the
    device's own q ``[B, T, Hq/n, D]``, k/v and cache arrays."""
    s = split(config, mesh_size(mesh))
    local = local_config(config, s)
    reduce = lambda y: jax.lax.psum(y, AXIS)  # noqa: E731
    mean = lambda y: jax.lax.pmean(y, AXIS)  # noqa: E731  (OLMo 2's q / k norms)

    def body(params, tokens, positions, cache):
        x = scale_embeddings(config, _embed(params["embed"], tokens))
        x, cache = run_layers(local, params["layers"], x, positions, cache, attend, reduce=reduce,
                              mean=mean if config.family.post_norms else None)
        return model_norm(config, x, params["final_norm"]), cache

    specs = cache_specs(cache)
    return jax.shard_map(body, mesh=mesh, in_specs=(param_specs(config), P(), P(), specs), out_specs=(P(), specs),
                         check_vma=False)(params, tokens, positions, cache)


def _embed(table: jax.Array, tokens: jax.Array) -> jax.Array:
    """Vocabulary-parallel lookup: this device's rows ``[V/n, d]`` give the tokens they hold, zeros elsewhere; the
    psum over devices adds the one row each token has (exact: the other terms are zeros)."""
    rows = table.shape[0]
    local = tokens - jax.lax.axis_index(AXIS) * rows
    here = (local >= 0) & (local < rows)
    x = jnp.take(table, jnp.where(here, local, 0), axis=0)
    return jax.lax.psum(jnp.where(here[..., None], x, jnp.zeros((), x.dtype)), AXIS)


def logits(config: LlamaConfig, mesh: Mesh, params: dict[str, Any], hidden: jax.Array) -> jax.Array:
    """``Llama.logits`` on the mesh: hidden ``[..., d]`` (replicated) -> float32 ``[..., V_padded]`` split over the
    vocabulary (each device multiplies by its own rows of the head; padded entries are -inf)."""
    tied = config.tie_word_embeddings
    padded = config.vocab_size % mesh_size(mesh) != 0

    def body(w, h):
        out = head_logits(h, w.T if tied else w)
        column = jax.lax.axis_index(AXIS) * out.shape[-1] + jnp.arange(out.shape[-1])  # global vocabulary index
        return jnp.where(column < config.vocab_size, out, -jnp.inf) if padded else out

    return jax.shard_map(body, mesh=mesh, in_specs=(_SPECS["embed" if tied else "lm_head"], P()),
                         out_specs=P(*([None] * (hidden.ndim - 1)), AXIS),
                         check_vma=False)(params["embed" if tied else "lm_head"], hidden)


def shard_model(model: Llama, mesh: Mesh) -> Llama:
    """A single-device ``Llama`` (any loader's) placed on ``mesh``, tensor by tensor."""
    if model.mesh is not None:
        raise ValueError(f"shard_model: the model is already on a mesh ({model.mesh})")
    return Llama(model.config, shard_params(model.config, model.params(), mesh), mesh)
