"""A Llama-family decoder in Flax NNX: RMSNorm, RoPE (with Llama-3 / linear / YaRN / longrope scaling, and Phi-3's
partial rotary), GQA, SwiGLU; with the q/k/v biases of Qwen2, the q/k RMSNorm of Qwen3, SmolLM3's layers without
RoPE, Granite's multipliers, OLMo 2's norms after the attention and the MLP, and Gemma's scaled embeddings, norms
of weights stored as offsets from 1 and GELU-gated MLP where the config's family has them.

Each layer's weights are arrays of their own (``params["layers"]`` is a list of per-layer dicts) and the layers
run in a Python loop inside the jitted step: every GEMM reads its weight in place. (Weights stacked ``[L, ...]``
under a ``lax.scan`` made XLA copy each layer's slice out before its GEMM, every step: about one extra read and
write of all weights; see experiments/PERF_NOTES.md.) Linear weights are stored ``[in, out]``, and the projections
that share their input are packed into one weight, one GEMM each (``pack_layer``; checkpoints hold them apart):

- ``w_qkv`` ``[d, Hkv, (g + 2)·D]`` (g = Hq / Hkv): for each KV head, the columns of its g query heads, then its
  key, then its value (Qwen2's biases alike, ``b_qkv`` ``[Hkv, (g + 2)·D]``). Grouped by KV head, so that a tensor
  parallel device's slice of axis 1 holds its own query heads with the keys and values they read;
- ``w_gate_up`` ``[d, 2, I]``: the gate's columns, then the up projection's.

One GEMM over 3 or 2 weights' columns instead of one a weight: on an H200, a 7B layer's GEMMs take 8 % less time at
8 rows, 14–21 % less at 64–256 rows, 5 % at 512 (``scripts/tuning/probe_weight_layout.py``; the separate GEMMs
leave SMs idle where N is small, and each pays its own launch and tail).

Attention is not part of the model: ``Llama.__call__`` takes an ``attend`` callback
``attend(cache, layer, q, k, v) -> (out, cache)`` with layer a Python int, q ``[B, T, Hq, D]``, k/v
``[B, T, Hkv, D]`` (RoPE already applied) and out ``[B, T, Hq, D]``, so one model serves training (plain causal
attention), the prefill of shared prefixes and the decode loop of every attention mode (see ``models.cache``).

A float32 model runs its matmuls (and ``causal_attention``) at full float32 precision
(``Precision.HIGHEST``), whatever the platform's default (TF32 on NVIDIA GPUs); bfloat16 runs at the default.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from models import gemm
from models.config import LlamaConfig

# XLA options for a jitted step of the model (``jax.jit(..., compiler_options=COMPILER_OPTIONS)``; prefill and
# decode use them when called at the top level: XLA takes options only there, not for a jit nested in a trace).
# XLA's dot merger joins GEMMs that share an input into one. Where the GEMMs are small enough for it (its threshold
# counts a dot's operand and output bytes, 32 MB by default) and cuBLAS runs the merged GEMM, it concatenates their
# weights into a new buffer every step: on a 2-GPU mesh it did so for the q/k/v and gate/up shards of the 7B shape
# when they were separate weights, 67 us a layer of a decode step at B = 512 (an H200, scripts/profile_decode.py;
# experiments/PERF_NOTES.md). The weights are packed since (`pack_layer`), so no two GEMMs of a layer share an input
# now; threshold 0 keeps it that way for any other model code: each GEMM reads its weight in place.
# A decode step is ~10 kernels a layer, many of a few microseconds at small batches. XLA's command buffer (the CUDA
# graph of a step's kernels) follows its scheduler's order by default (LHS); in CONCURRENT mode it is a graph of the
# kernels' data dependencies, so that independent ones run at once: q's RoPE and the two cache writes after the
# q/k/v GEMM. On the H200 (`python -m scripts.tuning.probe_flags`, 8 layers of the 7B shape, 16-step calls, one round):
# hydragen's step 2-3 % faster at B = 64, `none` and B = 8 within noise (experiments/PERF_NOTES.md).
# (Programmatic dependent launch, `xla_gpu_enable_pdl`, is on by default in this XLA; off, the step was 2-3 % slower.)
# An option that XLA_FLAGS also sets, when this module is imported, is left to XLA_FLAGS: a user's flag, or a probe's
# A/B, is not overridden.
_OPTIONS = {"xla_gpu_dot_merger_threshold_mb": 0, "xla_gpu_command_buffer_scheduling_mode": "CONCURRENT"}


def compiler_options(xla_flags: str) -> dict[str, Any]:
    """The model's XLA options (``_OPTIONS``) less those that ``xla_flags`` (an XLA_FLAGS string) sets."""
    return {key: value for key, value in _OPTIONS.items() if not re.search(rf"(^|\s)--{key}(=|\s|$)", xla_flags)}


COMPILER_OPTIONS = compiler_options(os.environ.get("XLA_FLAGS", ""))

Params = dict[str, Any]
AttendFn = Callable[[Any, int, jax.Array, jax.Array, jax.Array], tuple[jax.Array, Any]]  # (cache, layer, q, k, v)

# A packed parameter and the projections it holds, in order (`pack_layer`): the checkpoints' names for them.
PACKED = {"w_qkv": ("wq", "wk", "wv"), "b_qkv": ("bq", "bk", "bv"), "w_gate_up": ("w_gate", "w_up")}
# The MLP's activation (config.hidden_act; the family's `hidden_acts` say which it may take), as transformers'
# ACT2FN: "gelu_pytorch_tanh" is torch's tanh approximation of GELU, "gelu" the exact one (erf).
ACTIVATIONS = {"silu": jax.nn.silu, "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
               "gelu": functools.partial(jax.nn.gelu, approximate=False)}


def layer_keys(config: LlamaConfig, packed: bool = True) -> tuple[str, ...]:
    """The per-layer parameter names of ``config``'s family; ``packed=False``: with each packed weight named as its
    projections (``wq``, ``wk``, ``wv``, ``w_gate``, ``w_up``; Qwen2's ``bq``, ``bk``, ``bv``), as checkpoints hold
    them."""
    return tuple(packed_layer_shapes(config) if packed else unpacked_layer_shapes(config))


def unpacked_layer_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of a layer's parameters with every projection apart, as checkpoints hold them: the one place a
    family's layer parameters are named (``packed_layer_shapes`` packs these)."""
    c = config
    d, I = c.hidden_size, c.intermediate_size
    hq, hkv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    layer = {"attn_norm": (d,), "wq": (d, hq), "wk": (d, hkv), "wv": (d, hkv), "wo": (hq, d),
             "mlp_norm": (d,), "w_gate": (d, I), "w_up": (d, I), "w_down": (I, d)}
    if c.qkv_bias:  # Qwen2
        layer.update(bq=(hq,), bk=(hkv,), bv=(hkv,))
    if c.qk_norm:  # Qwen3: RMSNorm of each head of q and k
        layer.update(q_norm=(c.head_dim,), k_norm=(c.head_dim,))
    if c.family.post_norms:  # OLMo 2: norms of the attention's and the MLP's outputs, of q and k over all heads
        del layer["attn_norm"], layer["mlp_norm"]
        layer.update(attn_out_norm=(d,), mlp_out_norm=(d,), q_proj_norm=(hq,), k_proj_norm=(hkv,))
    return layer


def packed_layer_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of a layer's parameters as the model holds them: ``pack_layer`` of ``unpacked_layer_shapes``
    (``w_qkv [d, Hkv, (Hq/Hkv + 2)·D]``, ``b_qkv [Hkv, (Hq/Hkv + 2)·D]``, ``w_gate_up [d, 2, I]``)."""
    return dict(_packed_shapes(config))


@functools.lru_cache(maxsize=64)
def _packed_shapes(config: LlamaConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """``packed_layer_shapes``, traced (``jax.eval_shape``), not computed; once a config."""
    abstract = {k: jax.ShapeDtypeStruct(shape, jnp.float32) for k, shape in unpacked_layer_shapes(config).items()}
    packed = jax.eval_shape(lambda layer: pack_layer(layer, config.head_dim), abstract)
    return tuple((k, tuple(x.shape)) for k, x in packed.items())


def param_shapes(config: LlamaConfig) -> dict[str, Any]:
    """Shapes of every parameter: top-level arrays and ``layers``, a list of one dict per layer (packed)."""
    c = config
    shapes = {"embed": (c.vocab_size, c.hidden_size), "final_norm": (c.hidden_size,),
              "layers": [packed_layer_shapes(c) for _ in range(c.num_hidden_layers)]}
    if not c.tie_word_embeddings:
        shapes["lm_head"] = (c.hidden_size, c.vocab_size)
    return shapes


def param_shape(key: str, shapes: dict[str, Any]) -> tuple[int, ...]:
    """The shape of parameter ``key`` in ``shapes`` (``param_shapes(config)``): a layer's (every layer has the same)
    or the model's own."""
    return shapes["layers"][0][key] if key in shapes["layers"][0] else shapes[key]


def check_shapes(config: LlamaConfig, params: Params, where: str, needs: str,
                 layout: Callable[[str, tuple[int, ...]], tuple[int, ...]] | None = None) -> None:
    """``ValueError`` naming the first parameter whose shape is not its ``param_shapes(config)`` shape, or
    ``layout(key, shape)`` of it (the shape a layout needs, e.g. a mesh's): "{where}: params[...] has shape (...);
    {needs}" with ``needs`` formatted with ``want``, the shape it needs."""
    shapes = param_shapes(config)
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        key = path[-1].key
        want = tuple(param_shape(key, shapes) if layout is None else layout(key, param_shape(key, shapes)))
        if tuple(x.shape) != want:
            raise ValueError(f"{where}: params{jax.tree_util.keystr(path)} has shape {tuple(x.shape)}; "
                             + needs.format(want=want))


def pack_qkv(q, k, v, head_dim: int):
    """q ``[..., Hq·D]``, k and v ``[..., S·D]`` (numpy or jax) -> ``[..., S, (Hq/S + 2)·D]``: for each of the S
    KV heads, its Hq/S query heads (query head h reads KV head h // (Hq/S)), then its key, then its value."""
    xp = np if isinstance(q, np.ndarray) else jnp
    lead, kv_heads = q.shape[:-1], k.shape[-1] // head_dim
    if (k.shape != v.shape or k.shape[:-1] != lead or not kv_heads or k.shape[-1] % head_dim
            or q.shape[-1] % (kv_heads * head_dim)):
        raise ValueError(f"pack_qkv: q {q.shape}, k {k.shape}, v {v.shape} with head_dim {head_dim}: k and v must "
                         "have the same shape, the leading axes of q, and at least one head of head_dim columns "
                         "(S heads); q's width must be a multiple of S·head_dim (whole query heads for each KV head)")
    group = lambda x: x.reshape(*lead, kv_heads, -1)  # noqa: E731
    return xp.concatenate([group(q), group(k), group(v)], axis=-1)


def unpack_qkv(x, head_dim: int):
    """Inverse of ``pack_qkv``: x ``[..., S, (g + 2)·D]`` -> (q ``[..., S·g·D]``, k ``[..., S·D]``, v)."""
    lead, kv_heads = x.shape[:-2], x.shape[-2]
    flat = lambda y: y.reshape(*lead, kv_heads * y.shape[-1])  # noqa: E731
    return (flat(x[..., :-2 * head_dim]), flat(x[..., -2 * head_dim:-head_dim]), flat(x[..., -head_dim:]))


def pack_layer(layer: dict[str, Any], head_dim: int) -> dict[str, Any]:
    """A layer's parameters with the projections apart (checkpoint names, ``layer_keys(config, packed=False)``) ->
    packed (``layer_keys(config)``): ``w_qkv`` and ``b_qkv`` by ``pack_qkv``, ``w_gate_up`` the gate and up weights
    stacked ``[d, 2, I]``. numpy or jax arrays; keys without a packed form are kept."""
    out = {k: x for k, x in layer.items() if not any(k in parts for parts in PACKED.values())}
    for key, parts in PACKED.items():
        if all(p in layer for p in parts):
            xs = [layer[p] for p in parts]
            xp = np if isinstance(xs[0], np.ndarray) else jnp
            if len(parts) == 2 and xs[0].shape != xs[1].shape:
                raise ValueError(f"pack_layer: {parts[0]} {xs[0].shape} and {parts[1]} {xs[1].shape} must have "
                                 "the same shape")
            out[key] = pack_qkv(*xs, head_dim) if len(parts) == 3 else xp.stack(xs, axis=-2)
        elif any(p in layer for p in parts):
            raise ValueError(f"pack_layer: {key} needs {parts}; got only {[p for p in parts if p in layer]}")
    return out


def unpack_layer(layer: dict[str, Any], head_dim: int) -> dict[str, Any]:
    """Inverse of ``pack_layer``: each packed weight as its projections (checkpoint names)."""
    out = {k: x for k, x in layer.items() if k not in PACKED}
    for key, parts in PACKED.items():
        if key in layer:
            x = layer[key]
            pieces = unpack_qkv(x, head_dim) if len(parts) == 3 else (x[..., 0, :], x[..., 1, :])
            out.update(zip(parts, pieces))
    return out


@functools.partial(jax.jit, static_argnums=(0, 2, 3, 4, 5))
def _draw(shapes: tuple[tuple[str, tuple[int, ...]], ...], key: jax.Array, dtype, hidden_size: int,
          head_dim: int, norm_weight: float = 1.0) -> dict:
    """Random arrays for ``(name, shape)`` pairs (projections apart): norm weights ``norm_weight``, biases 0,
    matrices N(0, 1/fan_in) (embedding: N(0, 1/hidden_size)); returned packed (``pack_layer``)."""
    out = {}
    for k, (name, shape) in zip(jax.random.split(key, len(shapes)), shapes):
        if "norm" in name:
            out[name] = jnp.full(shape, norm_weight, dtype)
        elif name in PACKED["b_qkv"]:
            out[name] = jnp.zeros(shape, dtype)
        else:
            fan_in = hidden_size if name == "embed" else shape[-2]
            out[name] = (jax.random.normal(k, shape, jnp.float32) / math.sqrt(fan_in)).astype(dtype)
    return pack_layer(out, head_dim)


def model_dtype(caller: str, dtype) -> jnp.dtype:
    """`dtype` as a model's parameters' dtype (float32 or bfloat16: what the models compute in, and the loaders
    take); `ValueError` naming `caller` else."""
    try:
        dtype = jnp.dtype(dtype)
    except TypeError:
        dtype = repr(dtype)  # not a dtype at all ("bf16"): named as given below
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"{caller}: dtype must be float32 or bfloat16, got {dtype}")
    return dtype


def init_params(config: LlamaConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random parameters: norms that scale by 1 (weights 1; Gemma's, stored as offsets from 1, 0), biases 0, every
    matrix N(0, 1/fan_in) (embedding: N(0, 1/hidden_size)).

    Generated on device, one jitted call for the top-level arrays and one per layer (all layers share one
    compilation): cheap enough for 7B-shaped benchmark models.
    """
    dtype = model_dtype("init_params", dtype)
    return _init(config, key, lambda names_shapes, k: _draw(names_shapes, k, dtype, config.hidden_size,
                                                            config.head_dim, _norm_weight(config)))


def _norm_weight(config: LlamaConfig) -> float:
    """The stored weight of a norm that scales by 1: 1, or 0 where the family stores offsets from 1 (Gemma)."""
    return 0.0 if config.family.unit_offset_norms else 1.0


def _init(config: LlamaConfig, key: jax.Array, draw) -> Params:
    """The parameter tree of ``config``, each group of arrays made by ``draw(names_shapes, key)`` (projections
    apart; ``draw`` packs them): the top-level arrays, then each layer (every layer the same names and shapes),
    one key each."""
    shapes = param_shapes(config)
    keys = jax.random.split(key, config.num_hidden_layers + 1)
    params = draw(tuple((name, shape) for name, shape in shapes.items() if name != "layers"), keys[0])
    layer = tuple(unpacked_layer_shapes(config).items())
    params["layers"] = [draw(layer, k) for k in keys[1:]]
    return params


# ----------------------------------------------------------------------------------------------- pure math


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, weight_f32: bool = False,
             unit_offset: bool = False) -> jax.Array:
    """RMSNorm over the last axis, computed in float32. HF Llama semantics: x cast back to its dtype, then times the
    weight (the result in x's dtype promoted with the weight's, as HF's ``weight * x.to(dtype)``); ``weight_f32``
    (OLMo 2's): the weight applied in float32, then the cast; ``unit_offset`` (Gemma's): the weight stored as its
    offset from 1, times (1 + weight) in float32, then the cast."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    if unit_offset:
        return ((1.0 + weight.astype(jnp.float32)) * xf).astype(x.dtype)
    if weight_f32:
        return (weight.astype(jnp.float32) * xf).astype(x.dtype)
    return weight * xf.astype(x.dtype)


def heads_norm(xs: tuple[jax.Array, ...], weights: tuple[jax.Array, ...], eps: float,
               mean: Callable[[jax.Array], jax.Array] | None = None) -> tuple[jax.Array, ...]:
    """OLMo 2's RMSNorm of q and of k over all heads' width: each x ``[B, T, H, D]`` with its weight ``[H·D]``
    (applied in float32). ``mean``: on a mesh, the average over the devices of their heads' mean squares (each
    device holds as many heads: the mean over all of them; a KV head held by r devices counts r times, as each of
    its copies), one call for all of ``xs`` (one all-reduce a layer)."""
    xfs = [x.astype(jnp.float32) for x in xs]
    mean_squares = jnp.stack([jnp.mean(xf * xf, axis=(-2, -1)) for xf in xfs])  # [len(xs), B, T]
    if mean is not None:
        mean_squares = mean(mean_squares)
    return tuple((w.reshape(x.shape[-2:]).astype(jnp.float32) * (xf * jax.lax.rsqrt(ms[..., None, None] + eps))
                  ).astype(x.dtype) for x, xf, w, ms in zip(xs, xfs, weights, mean_squares))


def model_norm(config: LlamaConfig, x: jax.Array, weight: jax.Array) -> jax.Array:
    """The family's RMSNorm of hidden states ``[..., d]`` (OLMo 2's applies its weight in float32, Gemma's 1 + its
    weight)."""
    return rms_norm(x, weight, config.rms_norm_eps, weight_f32=config.family.post_norms,
                    unit_offset=config.family.unit_offset_norms)


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """Inverse frequencies ``[R/2]`` (float64 numpy, static) for the R = ``config.rotary_dim`` dimensions RoPE
    rotates (head_dim but with Phi-3's partial_rotary_factor), with llama3, linear, yarn or longrope scaling applied
    (yarn and longrope also multiply cos and sin: ``RopeScaling.cos_sin_factor``, applied by ``apply_rope``)."""
    d = config.rotary_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    rs = config.rope_scaling
    if rs is None or rs.rope_type == "dynamic":  # dynamic NTK: the base unchanged up to max_position_embeddings
        return inv
    if rs.rope_type == "linear":
        return inv / rs.factor
    if rs.rope_type == "longrope":  # the short factors within the pretraining context, the long ones past it
        return inv / np.asarray(rs.long_factor if rs.use_long else rs.short_factor, np.float64)
    if rs.rope_type == "yarn":
        # YaRN: dimension i keeps its frequency where it turns more than beta_fast times over the original context,
        # is divided by `factor` where it turns fewer than beta_slow times, and blends linearly in between. The
        # dimension that turns r times over a context L: d·ln(L / (2π r)) / (2 ln theta).
        def dim_of(turns):
            return d * math.log(rs.original_max_position_embeddings / (2 * math.pi * turns)) / (2 * math.log(
                config.rope_theta))
        low, high = dim_of(rs.beta_fast), dim_of(rs.beta_slow)
        if rs.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, d - 1)
        if low == high:
            high += 0.001  # as transformers: no division by zero
        kept = 1 - np.clip((np.arange(d // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        return inv / rs.factor * (1 - kept) + inv * kept
    # llama3: long wavelengths (low frequencies) are divided by `factor`, short ones kept, and the band in
    # between interpolates smoothly in 1/wavelength.
    wavelen = 2 * np.pi / inv
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    mid = (1 - smooth) * inv / rs.factor + smooth * inv
    return np.where(wavelen > low_wavelen, inv / rs.factor, np.where(wavelen < high_wavelen, inv, mid))


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray, factor: float = 1.0) -> jax.Array:
    """Rotary embedding in the HF "rotate half" layout. x ``[B, T, H, D]``, positions ``[B, T]`` int, inv_freq
    ``[R/2]``; cos and sin multiplied by ``factor`` (YaRN's and longrope's attention factor; 1 otherwise). Where
    R < D (Phi-4-mini's partial_rotary_factor) the first R dimensions rotate and the other D - R pass unchanged (not
    multiplied by ``factor``).

    (Written with a flip instead of the concatenate, XLA's RoPE fusions ran faster on the H200 but the GEMMs of
    `none`'s step slower, 2–3 % in all: `scripts/tuning/probe_rope.py`, PERF_NOTES.md.)"""
    rotated = 2 * len(inv_freq)
    if rotated < x.shape[-1]:
        return jnp.concatenate([apply_rope(x[..., :rotated], positions, inv_freq, factor), x[..., rotated:]], axis=-1)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [B, T, D/2]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]
    if factor != 1.0:
        cos, sin = cos * factor, sin * factor
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def causal_attention(cache, layer, q, k, v):
    """Plain causal self-attention over the T tokens of the call (training / scoring); cache unused."""
    del layer
    full = gemm.matmul_precision(q.dtype) is not None
    with jax.default_matmul_precision("highest") if full else contextlib.nullcontext():
        return jax.nn.dot_product_attention(q, k, v, is_causal=True), cache


# ----------------------------------------------------------------------------------------------- modules


def decoder_layer(config: LlamaConfig, p: dict[str, jax.Array], layer: int, x: jax.Array, positions: jax.Array,
                  cache: Any, attend: AttendFn, reduce: Callable[[jax.Array], jax.Array] | None = None,
                  mean: Callable[[jax.Array], jax.Array] | None = None) -> tuple[jax.Array, Any]:
    """One decoder layer: x ``[B, T, d]`` -> x + attention, then + gated MLP (pre-norm; OLMo 2's
    ``family.post_norms``: the norms on the attention's and the MLP's outputs instead) (act(gate) * up, act the
    config's ``hidden_act``: SiLU, Gemma's GELU); returns (x, cache).

    reduce: applied to the outputs of the o and down projections before they join the residual (tensor parallelism:
    the psum of the devices' partial products, see ``models.parallel``); None on one device. mean: the average over
    the devices (their pmean) of OLMo 2's q / k norms' mean squares; None on one device."""
    c = config
    B, T, d = x.shape
    inv_freq = rope_inv_freq(c)
    S, D = c.num_key_value_heads, c.head_dim
    g = c.num_attention_heads // S

    # The GEMMs (`models.gemm.linear`: XLA's, or the decode kernel where the device's tuning enables it), each over
    # a packed weight viewed as `[K, N]` (a free reshape: the arrays are contiguous).
    post = c.family.post_norms  # OLMo 2: the norms on the outputs (below), none on the inputs
    h = x if post else model_norm(c, x, p["attn_norm"])
    qkv = gemm.linear(h, p["w_qkv"].reshape(d, -1))
    qkv = qkv.reshape(B, T, S, g + 2, D)  # per KV head: its g query heads, its key, its value
    if c.qkv_bias:  # Qwen2
        qkv = qkv + p["b_qkv"].reshape(S, g + 2, D)
    q = qkv[:, :, :, :g].reshape(B, T, S * g, D)
    k, v = qkv[:, :, :, g], qkv[:, :, :, g + 1]
    if c.qk_norm:  # Qwen3: RMSNorm over head_dim of every head, before RoPE
        q, k = rms_norm(q, p["q_norm"], c.rms_norm_eps), rms_norm(k, p["k_norm"], c.rms_norm_eps)
    if post:  # OLMo 2: RMSNorm over all heads of q (and of k), as of q_proj's (k_proj's) whole output
        q, k = heads_norm((q, k), (p["q_proj_norm"], p["k_proj_norm"]), c.rms_norm_eps, mean)
    # Granite's logit scale (attention_multiplier) is folded into q, so that every attention path (the kernels,
    # the reference, the dense prefill) keeps its default 1/sqrt(D)
    if c.uses_rope(layer):  # SmolLM3's NoPE layers leave q and k as they are
        # (the query scale rides on cos / sin: it would miss the dimensions a partial rotary passes; the config
        # allows the two in different families only)
        assert c.query_scale == 1.0 or c.rotary_dim == D, "Granite's multipliers with a partial rotary"
        factor = c.rope_scaling.cos_sin_factor if c.rope_scaling is not None else 1.0
        q, k = apply_rope(q, positions, inv_freq, factor * c.query_scale), apply_rope(k, positions, inv_freq, factor)
    elif c.query_scale != 1.0:
        q = (q.astype(jnp.float32) * c.query_scale).astype(q.dtype)
    o, cache = attend(cache, layer, q, k, v)
    reduce = reduce or (lambda y: y)
    attn = gemm.linear(o.astype(x.dtype).reshape(B, T, -1), p["wo"])
    attn = reduce(attn)
    x = x + _residual(c, model_norm(c, attn, p["attn_out_norm"]) if post else attn)
    h = x if post else model_norm(c, x, p["mlp_norm"])
    gate_up = gemm.linear(h, p["w_gate_up"].reshape(d, -1))
    gate_up = gate_up.reshape(B, T, 2, -1)
    down = gemm.linear(ACTIVATIONS[c.hidden_act](gate_up[:, :, 0]) * gate_up[:, :, 1], p["w_down"])
    down = reduce(down)
    x = x + _residual(c, model_norm(c, down, p["mlp_out_norm"]) if post else down)
    return x, cache


def _times(x: jax.Array, factor: float) -> jax.Array:
    """x times a Python float as torch multiplies a tensor by a scalar: in float32 (the factor not rounded to x's
    dtype first: 0.22 is 0.2197 in bfloat16, every Granite residual 0.12 % low), the product rounded to x's dtype."""
    return (x.astype(jnp.promote_types(x.dtype, jnp.float32)) * factor).astype(x.dtype)


def _residual(config: LlamaConfig, y: jax.Array) -> jax.Array:
    """A layer's attention or MLP output as it joins the residual: times Granite's residual_multiplier."""
    return _times(y, config.residual_multiplier) if config.residual_multiplier != 1.0 else y


def scale_embeddings(config: LlamaConfig, x: jax.Array) -> jax.Array:
    """The looked-up embeddings ``[..., d]`` times Granite's embedding_multiplier, or Gemma's sqrt(hidden_size) (the
    factor rounded to their dtype first, as transformers: 55.5 for 3072 in bfloat16), in their dtype."""
    if config.family.scaled_embeddings:
        return x * jnp.asarray(math.sqrt(config.hidden_size), x.dtype)
    return _times(x, config.embedding_multiplier) if config.embedding_multiplier != 1.0 else x


def run_layers(config: LlamaConfig, layers: list[dict[str, jax.Array]], x: jax.Array, positions: jax.Array,
               cache: Any, attend: AttendFn, reduce: Callable[[jax.Array], jax.Array] | None = None,
               mean: Callable[[jax.Array], jax.Array] | None = None):
    """Every decoder layer in turn (a Python loop: each layer's weights are read in place): x ``[B, T, d]`` ->
    (x, cache). ``reduce``, ``mean``: as ``decoder_layer``'s."""
    for i, p in enumerate(layers):
        x, cache = decoder_layer(config, p, i, x, positions, cache, attend, reduce, mean)
    return x, cache


def head_logits(hidden: jax.Array, w: jax.Array) -> jax.Array:
    """hidden ``[..., d]`` @ w ``[d, V]`` -> float32 logits ``[..., V]``."""
    return jnp.matmul(hidden, w, preferred_element_type=jnp.float32, precision=gemm.matmul_precision(w.dtype))


class Llama(nnx.Module):
    """Llama decoder. ``Llama(config, params)`` wraps a parameter tree from ``init_params`` / the loaders (layers
    as a list of per-layer dicts).

    ``__call__(tokens [B, T] int, positions [B, T] int, cache, attend) -> (hidden [B, T, d], cache)``;
    ``logits(hidden [..., d]) -> [..., V]`` float32.

    ``mesh``: a ``jax.sharding.Mesh`` with the one axis ``"model"`` for tensor parallelism (``models.parallel``):
    params are then global arrays in the mesh layout (``init_random`` / ``load_checkpoint`` / ``shard_model`` with
    ``mesh=`` make them; arrays of that layout elsewhere, e.g. on one device, are put on the mesh), each call runs on
    every device of the mesh, and logits are ``[..., V']`` split over the vocabulary (V' = V rounded up to a multiple
    of the mesh size; padded logits are -inf). The mesh travels with the model: ``prefill``, ``decode`` and
    ``generate`` use it.
    """

    def __init__(self, config: LlamaConfig, params: Params, mesh: Mesh | None = None):
        self.config = config
        self.mesh = mesh
        want = {"embed", "final_norm", "layers"} | (set() if config.tie_word_embeddings else {"lm_head"})
        if not isinstance(params, dict) or set(params) != want:
            have = sorted(params) if isinstance(params, dict) else type(params).__name__
            raise ValueError(f"Llama: params has keys {have}; the config (tie_word_embeddings="
                             f"{config.tie_word_embeddings}) needs {sorted(want)}")
        layers = params["layers"]
        if isinstance(layers, dict):
            raise ValueError("Llama: params['layers'] must be a list of per-layer dicts (one per layer), got a dict "
                             f"of {sorted(layers)}")
        if len(layers) != config.num_hidden_layers:
            raise ValueError(f"Llama: params has {len(layers)} layers; the config says {config.num_hidden_layers}")
        for i, layer in enumerate(layers):
            if set(layer) != set(layer_keys(config)):
                raise ValueError(f"Llama: params['layers'][{i}] has keys {sorted(layer)}, model_type "
                                 f"{config.model_type!r} needs {sorted(layer_keys(config))} (a checkpoint's "
                                 "separate projections: pack them with models.llama.pack_layer)")
        if mesh is None:  # on a mesh, parallel.check_layout checks the shapes of its layout
            check_shapes(config, params, "Llama", "the config needs {want} (w_qkv [d, Hkv, (Hq/Hkv + 2)·D] and "
                         "w_gate_up [d, 2, I]: models.llama.pack_layer packs a checkpoint's projections; parameters in a "
                         "mesh's layout need mesh=..., or models.parallel.canonical_params to take them off it)")
        else:
            from models import parallel

            parallel.check_layout(config, params, mesh)
            params = parallel.place(params, mesh)  # arrays of the layout not yet on the mesh (e.g. on one device)
            layers = params["layers"]
        self.embed = nnx.Param(params["embed"])
        self.final_norm = nnx.Param(params["final_norm"])
        self.lm_head = nnx.Param(params["lm_head"]) if not config.tie_word_embeddings else None
        self.layers = nnx.List([nnx.Dict({k: nnx.Param(w) for k, w in layer.items()}) for layer in layers])

    @property
    def dtype(self):
        return self.embed.value.dtype

    def layer_params(self) -> list[dict[str, jax.Array]]:
        return [{k: w.value for k, w in layer.items()} for layer in self.layers]

    def params(self) -> Params:
        """The plain parameter tree (arrays, one dict per layer), as accepted by ``Llama(config, params)``."""
        p = {"embed": self.embed.value, "final_norm": self.final_norm.value, "layers": self.layer_params()}
        if self.lm_head is not None:
            p["lm_head"] = self.lm_head.value
        return p

    @property
    def kv_heads(self) -> int:
        """KV heads of the model's caches: the config's, or on a mesh with more devices than that, one a device
        (each KV head replicated, see ``models.parallel``)."""
        if self.mesh is None:
            return self.config.num_key_value_heads
        from models import parallel

        s = parallel.split(self.config, parallel.mesh_size(self.mesh))
        return s.kv_heads * s.devices

    @property
    def kv_sharding(self) -> NamedSharding | None:
        """Sharding of the KV cache arrays ``[N, S, Hkv, D]`` (split over heads on the mesh); None on one device."""
        if self.mesh is None:
            return None
        from models import parallel

        return NamedSharding(self.mesh, parallel.KV_SPEC)

    def __call__(self, tokens: jax.Array, positions: jax.Array, cache: Any, attend: AttendFn):
        c = self.config
        if attend is causal_attention and c.sliding_window is not None and tokens.shape[-1] > c.sliding_window:
            # (the dense causal path: the token array is the sequences; prefill checks its real lengths itself)
            raise ValueError(f"Llama: sequences of {tokens.shape[-1]} tokens exceed the model's sliding window of "
                             f"{c.sliding_window} (config sliding_window: their later queries would see fewer keys, "
                             "which is not implemented)")
        if attend is causal_attention and c.longrope_context is not None:
            # longrope on the dense path, as transformers chooses per call: the long factors where the sequences
            # (the token array's width) exceed the pretraining context. (A cached forward's caller chooses:
            # models.generate's prefill, whose decode keeps the choice.)
            c = c.with_long_rope(tokens.shape[-1] > c.longrope_context)
        if self.mesh is not None:
            from models import parallel

            return parallel.forward(c, self.mesh, self.params(), tokens, positions, cache, attend)
        x = scale_embeddings(c, jnp.take(self.embed.value, tokens, axis=0))
        x, cache = run_layers(c, self.layer_params(), x, positions, cache, attend)
        return model_norm(c, x, self.final_norm.value), cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden ``[..., d]`` -> float32 logits ``[..., V]`` (divided by Granite's logits_scaling); on a mesh
        ``[..., V']``, the vocabulary padded to a multiple of its devices with -inf."""
        if self.mesh is not None:
            from models import parallel

            out = parallel.logits(self.config, self.mesh, self.params(), hidden)
        else:
            out = head_logits(hidden, self.embed.value.T if self.lm_head is None else self.lm_head.value)
        return out / self.config.logits_scaling if self.config.logits_scaling != 1.0 else out


def init_random(config: LlamaConfig, dtype=jnp.float32, seed: int = 0, mesh: Mesh | None = None) -> Llama:
    """A randomly initialised model (``init_params``; for tests and benchmarks). With ``mesh``, the parameters are
    generated in place on the mesh's devices, in its layout (the same values as on one device)."""
    dtype = model_dtype("init_random", dtype)
    if mesh is None:
        return Llama(config, init_params(config, jax.random.key(seed), dtype))
    from models import parallel

    s = parallel.split(config, parallel.mesh_size(mesh))

    @functools.cache  # one compilation a group: every layer has the same names and shapes
    def placed(names_shapes):  # _draw, then each array in its mesh layout, generated on its devices
        def draw(key):
            return {name: parallel.to_layout(name, x, config, s) for name, x in
                    _draw(names_shapes, key, dtype, config.hidden_size, config.head_dim, _norm_weight(config)).items()}

        names = jax.eval_shape(draw, jax.random.key(0))  # the names the draw gives (packed)
        return jax.jit(draw, out_shardings={name: NamedSharding(mesh, parallel.param_specs_of(name)) for name in names})

    return Llama(config, _init(config, jax.random.key(seed), lambda names_shapes, k: placed(names_shapes)(k)), mesh)
