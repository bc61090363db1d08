"""Hugging Face-format checkpoints: ``config.json`` + ``*.safetensors`` (one file, or shards + index).

Tensor names and layouts are those of HF ``LlamaForCausalLM`` (linear weights ``[out, in]``); the loader
transposes them to ``[in, out]`` and stacks the layers along a leading axis (see ``models.llama``).
Every missing or misshaped tensor raises ``CheckpointError`` naming the tensor, expected and actual shape.
"""

from __future__ import annotations

import json
import os
import warnings

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from models.config import LlamaConfig
from models.llama import LAYER_KEYS, Llama, Params

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# our stacked name -> HF per-layer name pattern
_HF_LAYER = {
    "attn_norm": "input_layernorm.weight",
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "w_gate": "mlp.gate_proj.weight",
    "w_up": "mlp.up_proj.weight",
    "w_down": "mlp.down_proj.weight",
}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint is incomplete or inconsistent with its config."""


def hf_tensor_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF Llama checkpoint must hold for ``config``, with its HF shape."""
    c = config
    d, I = c.hidden_size, c.intermediate_size
    hq, hkv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    per_layer = {"attn_norm": (d,), "wq": (hq, d), "wk": (hkv, d), "wv": (hkv, d), "wo": (d, hq),
                 "mlp_norm": (d,), "w_gate": (I, d), "w_up": (I, d), "w_down": (d, I)}
    shapes = {"model.embed_tokens.weight": (c.vocab_size, d), "model.norm.weight": (d,)}
    for i in range(c.num_hidden_layers):
        for key, shape in per_layer.items():
            shapes[f"model.layers.{i}.{_HF_LAYER[key]}"] = shape
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, d)
    return shapes


def _tensor_files(path: str) -> dict[str, str]:
    """Map tensor name -> safetensors file, from the index if there is one."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map'")
        return {name: os.path.join(path, fname) for name, fname in weight_map.items()}
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors file and no {INDEX_FILE}")
    mapping = {}
    for fname in files:
        with safe_open(os.path.join(path, fname), framework="numpy") as f:
            mapping.update({name: os.path.join(path, fname) for name in f.keys()})
    return mapping


def load_checkpoint(path: str | os.PathLike, dtype=jnp.float32) -> Llama:
    """Load an HF-format Llama directory into a ``Llama`` with parameters in ``dtype`` (fp32 or bf16)."""
    path = os.fspath(path)
    config = LlamaConfig.from_json(path)
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"load_checkpoint: dtype must be float32 or bfloat16, got {dtype}")
    expected = hf_tensor_shapes(config)
    files = _tensor_files(path)
    missing = [n for n in expected if n not in files]
    if missing:
        raise CheckpointError(f"{path}: missing tensor {missing[0]!r} "
                              f"({len(missing)} missing in all, expected shape {expected[missing[0]]})")
    extra = [n for n in files if n not in expected and not n.endswith(_IGNORED_SUFFIXES)]
    if extra:
        warnings.warn(f"{path}: ignoring {len(extra)} unexpected tensors, e.g. {extra[0]!r}")

    by_file: dict[str, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    tensors: dict[str, np.ndarray] = {}
    for fname, names in by_file.items():
        if not os.path.exists(fname):
            raise CheckpointError(f"{path}: shard {os.path.basename(fname)} (holding {names[0]!r}) not found")
        with safe_open(fname, framework="numpy") as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise CheckpointError(f"{path}: missing tensor {name!r} in {os.path.basename(fname)}")
                shape = tuple(f.get_slice(name).get_shape())
                if shape != expected[name]:
                    raise CheckpointError(
                        f"{path}: tensor {name!r} has shape {shape}, expected {expected[name]}")
                tensors[name] = np.asarray(f.get_tensor(name)).astype(np.float32)
    return Llama(config, _from_hf(config, tensors, dtype))


def _from_hf(config: LlamaConfig, t: dict[str, np.ndarray], dtype) -> Params:
    def conv(x):
        return jnp.asarray(x, dtype)

    layers = []
    for i in range(config.num_hidden_layers):
        hf = {key: t[f"model.layers.{i}.{_HF_LAYER[key]}"] for key in LAYER_KEYS}
        layers.append({key: conv(w if w.ndim == 1 else w.T) for key, w in hf.items()})
    params = {"embed": conv(t["model.embed_tokens.weight"]), "final_norm": conv(t["model.norm.weight"]),
              "layers": layers}
    if not config.tie_word_embeddings:
        params["lm_head"] = conv(t["lm_head.weight"].T)
    return params


def to_hf_tensors(model: Llama, dtype=None) -> dict[str, np.ndarray]:
    """The model's parameters as HF-named numpy arrays (``[out, in]`` layout), optionally cast."""
    p = model.params()
    np_dtype = None if dtype is None else (ml_dtypes.bfloat16 if jnp.dtype(dtype) == jnp.bfloat16
                                           else np.dtype(dtype))

    def conv(x):
        x = np.asarray(x.astype(jnp.float32)) if x.dtype == jnp.bfloat16 else np.asarray(x)
        out = np.ascontiguousarray(x)
        return out.astype(np_dtype) if np_dtype is not None else out.astype(np.asarray(p["embed"]).dtype)

    out = {"model.embed_tokens.weight": conv(p["embed"]), "model.norm.weight": conv(p["final_norm"])}
    for i, layer in enumerate(p["layers"]):
        for key in LAYER_KEYS:
            w = layer[key]
            out[f"model.layers.{i}.{_HF_LAYER[key]}"] = conv(w if w.ndim == 1 else w.T)
    if "lm_head" in p:
        out["lm_head.weight"] = conv(p["lm_head"].T)
    return out


def save_checkpoint(model: Llama, path: str | os.PathLike, *, dtype=None,
                    max_shard_bytes: int | None = None, extra_config: dict | None = None) -> None:
    """Write ``config.json`` and ``model.safetensors`` (or shards + ``model.safetensors.index.json``)."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    cfg = model.config.to_dict()
    cfg.update(extra_config or {})
    tensors = to_hf_tensors(model, dtype)
    cfg["torch_dtype"] = "bfloat16" if next(iter(tensors.values())).dtype == ml_dtypes.bfloat16 else "float32"
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    if max_shard_bytes is None:
        save_file(tensors, os.path.join(path, SINGLE_FILE), metadata={"format": "pt"})
        return
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, x in tensors.items():
        if shards[-1] and size + x.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = x
        size += x.nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(x.nbytes for x in tensors.values())
    with open(os.path.join(path, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
