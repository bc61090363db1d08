"""Hugging Face-format checkpoints: ``config.json`` + ``*.safetensors`` (one file, or shards + index).

Tensor names and layouts are those of HF ``LlamaForCausalLM``, which ``MistralForCausalLM``, ``Qwen2ForCausalLM``,
``Qwen3ForCausalLM``, ``SmolLM3ForCausalLM``, ``GraniteForCausalLM``, ``Olmo2ForCausalLM`` and ``GemmaForCausalLM``
(its norm weights stored as offsets from 1, loaded as they are) share: one name table
(``_HF_LAYER``) serves every family, each family holding the entries its config asks for
(``models.llama.layer_keys``: Qwen2 adds the q/k/v biases, Qwen3 the q/k norms, OLMo 2 has its own norms);
``Phi3ForCausalLM`` holds q/k/v in one tensor and gate/up in another (``_FUSED``), split on reading. Linear
weights are ``[out, in]``; the loader transposes them to ``[in, out]`` (``_hf_layout``) and packs q/k/v and
gate/up (``models.llama.pack_layer``), one dict of arrays per layer (see ``models.llama``); saving unpacks them.
Every missing, misshaped or unexpected tensor, and every unreadable file, raises ``CheckpointError`` naming the
tensor or the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from jax.sharding import Mesh
from safetensors.numpy import save_file

from models.config import GENERATE_KEYS, RUNTIME_KEYS, CheckpointError, LlamaConfig
from models.llama import (PACKED, Llama, Params, layer_keys, model_dtype, pack_layer, param_shapes, unpack_layer,
                          unpacked_layer_shapes)

__all__ = ["CheckpointError", "hf_name", "hf_tensor_shapes", "load_checkpoint", "save_checkpoint", "to_hf_tensors"]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# our name -> HF name: the model's own tensors, and a layer's (after "model.layers.{i}.") for all families (the
# projections apart, as `models.llama.layer_keys(config, packed=False)` names them)
_HF_TOP = {"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight", "lm_head": "lm_head.weight"}
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
    "bq": "self_attn.q_proj.bias",  # Qwen2
    "bk": "self_attn.k_proj.bias",
    "bv": "self_attn.v_proj.bias",
    "q_norm": "self_attn.q_norm.weight",  # Qwen3
    "k_norm": "self_attn.k_norm.weight",
    "attn_out_norm": "post_attention_layernorm.weight",  # OLMo 2 (its norms on the outputs; no input_layernorm)
    "mlp_out_norm": "post_feedforward_layernorm.weight",
    "q_proj_norm": "self_attn.q_norm.weight",  # OLMo 2: over all heads' width
    "k_proj_norm": "self_attn.k_norm.weight",
}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers recomputed from the config
# Phi-3's fused tensors (after "model.layers.{i}."): the projections each holds, in order along its rows
_FUSED = {"self_attn.qkv_proj.weight": ("wq", "wk", "wv"), "mlp.gate_up_proj.weight": ("w_gate", "w_up")}


def hf_name(key: str, layer: int | None = None) -> str:
    """The HF name of our parameter ``key``: of the model (layer None) or of layer ``layer``."""
    return _HF_TOP[key] if layer is None else f"model.layers.{layer}.{_HF_LAYER[key]}"


def _transposed(key: str, ndim: int) -> bool:
    """HF linear weights are ``[out, in]``, ours ``[in, out]``; vectors and the embedding (``[vocab, hidden]`` in
    both) are stored alike."""
    return ndim == 2 and key != "embed"


def _hf_layout(key: str, x):
    """``x`` (our parameter ``key``) in HF's layout, or back: the transpose is its own inverse."""
    return x.T if _transposed(key, x.ndim) else x


def _top_keys(config: LlamaConfig) -> list[str]:
    return ["embed", "final_norm"] + ([] if config.tie_word_embeddings else ["lm_head"])


def _names(config: LlamaConfig) -> list[tuple[str, int | None]]:
    """(key, layer) of every tensor of ``config``'s checkpoint: the model's own (layer None), then each layer's
    (projections apart)."""
    return [(key, None) for key in _top_keys(config)] + [(key, i) for i in range(config.num_hidden_layers)
                                                         for key in layer_keys(config, packed=False)]


def _fused_rows(config: LlamaConfig) -> dict[str, tuple[str, int, int]]:
    """Projection key -> (the fused tensor's name after "model.layers.{i}.", the projection's first row there, its end
    row) where ``config``'s family stores q/k/v and gate/up fused (Phi-3); {} otherwise."""
    if not config.family.fused_projections:
        return {}
    shapes, out = unpacked_layer_shapes(config), {}
    for suffix, keys in _FUSED.items():
        start = 0
        for key in keys:
            rows = shapes[key][-1]  # ours [in, out]: HF's rows are our columns
            out[key] = (suffix, start, start + rows)
            start += rows
    return out


def hf_tensor_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an HF checkpoint of ``config`` must hold, with its HF shape (``[out, in]`` matrices; Phi-3's
    fused q/k/v and gate/up tensors in place of their projections)."""
    top, layer_shapes = param_shapes(config), unpacked_layer_shapes(config)
    shapes = {}
    for key, layer in _names(config):
        shape = top[key] if layer is None else layer_shapes[key]
        shapes[hf_name(key, layer)] = shape[::-1] if _transposed(key, len(shape)) else shape
    if _fused_rows(config):
        for i in range(config.num_hidden_layers):
            for suffix, keys in _FUSED.items():
                parts = [shapes.pop(hf_name(key, i)) for key in keys]
                shapes[f"model.layers.{i}.{suffix}"] = (sum(p[0] for p in parts), parts[0][1])
    return shapes


def _open(fname: str):
    """``safe_open`` that names the file when it is not a readable safetensors file."""
    try:
        return safe_open(fname, framework="numpy")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{fname}: not a readable safetensors file ({e})") from e


_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")  # the shards save_checkpoint writes


def _tensor_files(path: str) -> tuple[dict[str, str], set[str]]:
    """Map tensor name -> safetensors file, in transformers' order: `model.safetensors` alone if there is one, else
    the index, else every `*.safetensors` file (shards without their index; a tensor in two of them is an error).
    Also the names a listed shard holds that the index leaves out (read where needed, never required: transformers
    reads such a shard whole, and the loader before it never saw them)."""
    index = os.path.join(path, INDEX_FILE)
    single = os.path.isfile(os.path.join(path, SINGLE_FILE))
    if os.path.exists(index) and not single:
        if os.path.isdir(index):
            raise CheckpointError(f"{index} is a directory; expected the JSON index of the shards")
        with open(index, encoding="utf-8") as f:
            try:
                weight_map = json.load(f).get("weight_map")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, RecursionError) as e:
                raise CheckpointError(f"{index}: not a JSON object with a 'weight_map' ({e!r})") from e
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map'")
        for n, f in weight_map.items():
            if not isinstance(f, str):
                raise CheckpointError(f"{index}: weight_map[{n!r}] = {f!r}, expected a file name")
            # a shard outside the checkpoint's directory (an absolute path, "../x"): refused, not read from elsewhere
            if os.path.isabs(f) or os.path.normpath(f).split(os.sep)[0] == os.pardir:
                raise CheckpointError(f"{index}: weight_map[{n!r}] = {f!r} is outside {path}; expected a file of the "
                                      "checkpoint's directory")
        # one file named two ways ("a.safetensors", "./a.safetensors") is one shard
        mapping = {name: os.path.normpath(os.path.join(path, fname)) for name, fname in weight_map.items()}
        # transformers 5 reads every listed shard whole: a tensor is read where it is, whichever shard the map names
        # for it (or none); one held by two listed shards (the last read wins there) is refused rather than guessed;
        # a listed shard that is not there is named when a tensor the map puts in it is read.
        held: dict[str, str] = {}
        for fname in sorted(set(mapping.values())):
            if os.path.isfile(fname):
                with _open(fname) as f:
                    for name in f.keys():
                        if name in held:
                            raise CheckpointError(f"{path}: tensor {name!r} is in both {os.path.basename(held[name])} "
                                                  f"and {os.path.basename(fname)} ({INDEX_FILE} maps it to "
                                                  f"{os.path.basename(mapping.get(name, '(neither)'))})")
                        held[name] = fname
        return {**{n: f for n, f in mapping.items() if not os.path.isfile(f)}, **held}, set(held) - set(mapping)
    if single:  # as transformers: that file alone, before any index
        files = [SINGLE_FILE]
    else:  # shards without their index: every *.safetensors file, no tensor in two of them
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors file and no {INDEX_FILE}")
    mapping = {}
    for fname in files:
        with _open(os.path.join(path, fname)) as f:
            for name in f.keys():
                if name in mapping:
                    raise CheckpointError(f"{path}: tensor {name!r} is in both {os.path.basename(mapping[name])} and "
                                          f"{fname}, and no {INDEX_FILE} says which to read")
                mapping[name] = os.path.join(path, fname)
    return mapping, set()


# safetensors dtypes read as weights (cast to float32 on the host, then to the model's dtype)
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def _read(files: dict[str, str], names: list[str], expected: dict[str, tuple[int, ...]], path: str,
          stored: dict[str, str] | None = None):
    """The named tensors as float32 numpy arrays, each checked against its expected shape. `stored`: the name in
    the file of each name that is stored under another (a base model's names without "model.")."""
    stored = stored or {}
    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    tensors: dict[str, np.ndarray] = {}
    for fname, in_file in by_file.items():
        if not os.path.exists(fname):
            raise CheckpointError(f"{path}: shard {os.path.basename(fname)} (holding {in_file[0]!r}) not found")
        with _open(fname) as f:
            present = set(f.keys())
            for name in in_file:
                key = stored.get(name, name)
                if key not in present:
                    raise CheckpointError(f"{path}: missing tensor {key!r} in {os.path.basename(fname)}")
                piece = f.get_slice(key)
                shape = tuple(piece.get_shape())
                if shape != expected[name]:
                    raise CheckpointError(f"{path}: tensor {key!r} has shape {shape}, expected {expected[name]}")
                if piece.get_dtype() not in FLOAT_DTYPES:  # an integer, bool or 8-bit float tensor: quantized weights
                    raise CheckpointError(f"{path}: tensor {key!r} in {os.path.basename(fname)} has dtype "
                                          f"{piece.get_dtype()}; expected one of {FLOAT_DTYPES} (quantized "
                                          "checkpoints are not supported)")
                try:
                    raw = np.asarray(f.get_tensor(key))
                except (SafetensorError, OSError, ValueError, TypeError) as e:
                    raise CheckpointError(f"{fname}: cannot read tensor {key!r} ({e})") from e
                tensors[name] = _cast(path, key, raw, np.float32)
    return tensors


def _cast_finite(x: np.ndarray, dtype) -> tuple[np.ndarray, str | None]:
    """`x` in `dtype`, and where a finite value of `x` became inf there (past `dtype`'s range), what it is ("holds
    V, past D's largest finite value M"); None where none did. Non-finite values stay as they are."""
    with np.errstate(over="ignore"):
        y = x.astype(dtype)
    if y.dtype != x.dtype and not np.isfinite(y).all():
        bad = ~np.isfinite(y) & np.isfinite(x)
        if bad.any():
            return y, (f"holds {float(x[bad][0])}, past {np.dtype(dtype).name}'s largest finite value "
                       f"{float(ml_dtypes.finfo(dtype).max)}")
    return y, None


def _cast(path: str, name: str, x: np.ndarray, dtype) -> np.ndarray:
    """`x` in `dtype`, or `CheckpointError` naming the tensor where a finite weight is past `dtype`'s range (it would
    load as inf: a float64 checkpoint's, or a float32 one loaded in bfloat16). Non-finite weights stay as stored."""
    y, past = _cast_finite(x, dtype)
    if past:
        raise CheckpointError(f"{path}: tensor {name!r} {past}: it would load as inf")
    return y


def load_checkpoint(path: str | os.PathLike, dtype=jnp.float32, mesh: Mesh | None = None) -> Llama:
    """Load an HF-format directory (Llama, Mistral, Qwen2, Qwen3, SmolLM3, Granite, OLMo 2, Phi-3, Gemma) into a
    ``Llama`` with parameters in ``dtype`` (fp32 or bf16). Raises ``CheckpointError`` for an unsupported config, a
    missing, misshaped or unexpected tensor, an unreadable file.

    Layer by layer, each tensor is read, cast, packed and sent: the host holds one layer's tensors at a time.
    mesh: load for tensor parallelism on it (``models.parallel``): each tensor is put in its mesh layout on the host
    and sent shard by shard to the devices that hold it (no device receives a whole tensor)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        raise CheckpointError(f"load_checkpoint: {path} is a file; expected the checkpoint's directory (config.json "
                              "and *.safetensors)")
    config = LlamaConfig.from_json(path)
    dtype = model_dtype("load_checkpoint", dtype)
    files, unlisted = _tensor_files(path)
    stored: dict[str, str] = {}  # our (HF causal LM) name -> the file's, where they differ
    base_names = bool(files) and not any(n.startswith("model.") for n in files)
    if base_names:
        # a base model's names ("embed_tokens.weight", "layers.0...."): transformers adds its prefix, "model."
        stored = {("model." + n if n != _HF_TOP["lm_head"] else n): n for n in files}
        files = {ours: files[theirs] for ours, theirs in stored.items()}
        unlisted = {ours for ours, theirs in stored.items() if theirs in unlisted}
        stored = {ours: theirs for ours, theirs in stored.items() if ours != theirs}
    embed, head = _HF_TOP["embed"], _HF_TOP["lm_head"]
    tied_head = config.tie_word_embeddings and head in files
    if tied_head and embed not in files:  # transformers ties the other way round: the head read as the embedding
        files[embed], tied_head = files[head], False
        stored[embed] = stored.pop(head, head)
        del files[head]
    read_early: dict[str, np.ndarray] = {}  # tensors read to decide the config, handed to the reader (not read twice)
    if tied_head:  # a copy of the head beside a tied embedding: one if it is one, else (as transformers) untied
        shapes = {embed: hf_tensor_shapes(config)[embed]}
        read_early = _read(files, [embed, head], {**shapes, head: shapes[embed]}, path, stored)
        if not np.array_equal(read_early[head], read_early[embed], equal_nan=True):
            warnings.warn(f"{path}: tie_word_embeddings is true but tensor 'lm_head.weight' differs from "
                          "'model.embed_tokens.weight': loaded untied, each its own (as transformers loads it)",
                          stacklevel=2)
            config, tied_head = dataclasses.replace(config, tie_word_embeddings=False), False
        else:
            del read_early[head]  # a copy: never read again
    expected = hf_tensor_shapes(config)
    missing = [n for n in expected if n not in files]
    if missing:  # named as the file would name it
        name = missing[0].removeprefix("model.") if base_names else missing[0]
        gone = sorted({os.path.basename(f) for f in files.values() if not os.path.isfile(f)})
        raise CheckpointError(f"{path}: missing tensor {name!r} "
                              f"({len(missing)} missing in all, expected shape {expected[missing[0]]})"
                              + (f"; the index lists {gone[0]}, which is not there" if gone else ""))
    extra = [n for n in files if n not in expected and n not in unlisted and not n.endswith(_IGNORED_SUFFIXES)
             and not (tied_head and n == head)]
    if extra:
        raise CheckpointError(f"{path}: tensor {stored.get(extra[0], extra[0])!r} ({len(extra)} unexpected in all) "
                              f"is not part of a {config.model_type!r} model of this config, which would not use it")
    read = _tensor_reader(config, files, expected, path, dtype, stored, read_early)
    if mesh is None:
        return Llama(config, _build(config, read, _on_device(dtype)))
    from models import parallel

    s = parallel.split(config, parallel.mesh_size(mesh))
    return Llama(config, _build(config, read, lambda arrays: {k: parallel.put(k, x, config, s, mesh)
                                                              for k, x in arrays.items()}), mesh)


def _tensor_reader(config: LlamaConfig, files, expected, path: str, dtype, stored: dict[str, str],
                   read_early: dict[str, np.ndarray]):
    """``read(key, layer)`` for ``_build``: one tensor from its file, checked, in our layout, in ``dtype`` on the host
    (bf16 as ml_dtypes'), so that the host holds one layer's tensors at a time, not the whole model in float32.
    A projection stored in a fused tensor (Phi-3) is its rows of it (the fused tensor read once for all of them)."""
    host_dtype = ml_dtypes.bfloat16 if dtype == jnp.dtype(jnp.bfloat16) else np.float32
    fused, last = _fused_rows(config), {}

    def read(key: str, layer: int | None) -> np.ndarray:
        if layer is not None and key in fused:
            suffix, start, end = fused[key]
            name = f"model.layers.{layer}.{suffix}"
            if last.get("name") != name:
                last.update(name=name, x=_read(files, [name], expected, path, stored)[name])
            return _cast(path, stored.get(name, name), _hf_layout(key, last["x"][start:end]), host_dtype)
        name = hf_name(key, layer)
        x = read_early.pop(name) if name in read_early else _read(files, [name], expected, path, stored)[name]
        return _cast(path, stored.get(name, name), _hf_layout(key, x), host_dtype)

    return read


def _from_hf(config: LlamaConfig, t: dict[str, np.ndarray], dtype) -> Params:
    """Our parameters (``dtype``) from HF-named, HF-laid-out arrays ``t``: each layer packed on the host, then sent."""
    return _build(config, lambda key, layer: _hf_layout(key, t[hf_name(key, layer)]), _on_device(dtype))


def _on_device(dtype):
    """``send`` for ``_build`` on one device: each array to the default device in ``dtype``."""
    return lambda arrays: {key: jnp.asarray(x, dtype) for key, x in arrays.items()}


def _build(config: LlamaConfig, read, send) -> Params:
    """Our parameter tree, the model's own tensors and then one layer at a time: ``read(key, layer)`` gives a tensor
    in our layout, projections apart, on the host (layer None: the model's own); each layer's are packed
    (``pack_layer``) and each group goes through ``send(arrays)``, which places them."""
    params = send({key: read(key, None) for key in _top_keys(config)})
    params["layers"] = [send(pack_layer({key: read(key, i) for key in layer_keys(config, packed=False)},
                                        config.head_dim)) for i in range(config.num_hidden_layers)]
    return params


# the dtypes a checkpoint is saved in: those the loader reads (FLOAT_DTYPES)
SAVE_DTYPES = ("float32", "bfloat16", "float16", "float64")


def _saved_dtype(dtype) -> np.dtype:
    """`dtype` as the numpy dtype of saved tensors (bfloat16: ml_dtypes'); `ValueError` naming the argument where it
    is not one the loader reads back (int8 would round every weight to 0 or ±1, float8 lose most bits)."""
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None  # not a dtype at all ("bf16")
    if name not in SAVE_DTYPES:
        raise ValueError(f"save_checkpoint: dtype must be one of {SAVE_DTYPES} (or None: the model's), got {dtype!r}")
    return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)


def to_hf_tensors(model: Llama, dtype=None) -> dict[str, np.ndarray]:
    """The model's parameters as HF-named numpy arrays (``[out, in]`` layout, each packed weight unpacked on the host
    into its projections), optionally cast (a model on a mesh: its canonical parameters, gathered one tensor at a
    time)."""
    p, config = model.params(), model.config
    canonical = lambda key, x: x  # noqa: E731
    if model.mesh is not None:
        from models import parallel

        s = parallel.split(config, parallel.mesh_size(model.mesh))
        canonical = lambda key, x: parallel.from_layout(key, x, config, s)  # noqa: E731
    np_dtype = None if dtype is None else _saved_dtype(dtype)
    saved = lambda x: np_dtype if np_dtype is not None else np.dtype(x.dtype)  # noqa: E731 (None: its own)

    def host(key: str, x) -> np.ndarray:  # one tensor, canonical, to the host (bf16 through float32)
        x = canonical(key, x)
        return np.asarray(x.astype(jnp.float32)) if x.dtype == jnp.bfloat16 else np.asarray(x)

    def conv(name: str, key: str, x: np.ndarray, out_dtype) -> np.ndarray:
        y, past = _cast_finite(np.ascontiguousarray(_hf_layout(key, x)), out_dtype)
        if past:  # past the saved dtype's range: inf, not the weight
            raise ValueError(f"save_checkpoint: tensor {name!r} {past}: it would be saved as inf (save in float32)")
        return y

    tensors = {hf_name(key): conv(hf_name(key), key, host(key, p[key]), saved(p[key])) for key, layer in
               _names(config) if layer is None}
    fused = _fused_rows(config)  # Phi-3: the projections' rows joined as its checkpoints hold them
    saved_name = lambda key, i: f"model.layers.{i}.{fused[key][0]}" if key in fused else hf_name(key, i)  # noqa: E731
    for i, layer in enumerate(p["layers"]):  # each layer to the host, then unpacked there (no device copies)
        unpacked = unpack_layer({key: host(key, x) for key, x in layer.items()}, config.head_dim)
        dtypes = {part: saved(layer[_PACKED_FROM.get(part, part)]) for part in unpacked}  # each its weight's
        tensors.update({hf_name(key, i): conv(saved_name(key, i), key, x, dtypes[key]) for key, x in unpacked.items()})
        if fused:
            for suffix, keys in _FUSED.items():
                tensors[f"model.layers.{i}.{suffix}"] = np.concatenate([tensors.pop(hf_name(k, i)) for k in keys])
    return {name: tensors[name] for name in hf_tensor_shapes(config)}


def _loads_as(cfg: dict) -> LlamaConfig | None:
    """What load_checkpoint makes of config.json `cfg` (None: it refuses it)."""
    try:
        return LlamaConfig.from_dict(cfg)
    except (ValueError, CheckpointError):
        return None


_PACKED_FROM = {part: key for key, parts in PACKED.items() for part in parts}  # a projection -> its packed weight


def _same_generation_ids(path: str, cfg: dict) -> None:
    """The ``generation_config.json`` at ``path``, if any, with config.json's (``cfg``) stop ids as its
    ``eos_token_id``, and its ``bos_token_id`` / ``pad_token_id`` where it has them (transformers' generate reads
    this file's ids, not config.json's); its other keys kept; removed where it is not a JSON object."""
    if not os.path.exists(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            gen = json.load(f)
    except (OSError, ValueError, RecursionError):
        gen = None
    if not isinstance(gen, dict):
        os.remove(path)
        return
    gen["eos_token_id"] = cfg["eos_token_id"]
    for key in ("bos_token_id", "pad_token_id"):  # (a save in place with other ids left these stale; an id that
        if key in gen and cfg[key] is not None:  # config.json leaves out, e.g. Qwen's pad, stays the file's)
            gen[key] = cfg[key]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(gen, f, indent=2)


# extra_config keys whose values transformers 5.17's config classes check (strict dataclass fields): the check and
# what it expects
_EXTRA_CHECKS = {
    "use_cache": (lambda v: isinstance(v, bool), "true or false"),
    "initializer_range": (lambda v: not isinstance(v, bool) and isinstance(v, (int, float)) and 0 <= v <= 1,
                          "a number in [0, 1]"),
}


def save_checkpoint(model: Llama, path: str | os.PathLike, *, dtype=None,
                    max_shard_bytes: int | None = None, extra_config: dict | None = None) -> None:
    """Write ``config.json`` and ``model.safetensors``, or, where ``max_shard_bytes`` splits the tensors into
    several files, shards + ``model.safetensors.index.json`` (its metadata transformers': ``total_parameters``, a tied
    head counted once, and ``total_size`` in bytes; one shard: the single file, as transformers). config.json
    holds the model's stop ids, and a ``generation_config.json`` in ``path`` (an earlier save's, or the checkpoint's
    own where the model is saved in place), whose ids the loader reads in their place, gets the same ids and keeps
    its other keys (transformers' sampling defaults); one that is not a JSON object is removed.

    ``dtype``: every tensor's (one of ``SAVE_DTYPES``), or None: each tensor in the model's dtype for it (config.json
    names the embedding's). ``extra_config``: keys added to config.json: metadata under a
    ``hydragen_`` name (``models.config.OWN_PREFIX``, e.g. ``{"hydragen_provenance": ...}``; the loader refuses other
    keys it does not know) or keys of ``HARMLESS_KEYS`` (``_name_or_path``, ...); refused: one that changes
    the model it describes or restates one of its keys otherwise (``rope_theta``, ``num_hidden_layers``, a null
    ``head_dim``, …: change ``model.config`` instead), a default of transformers' generate (``GENERATE_KEYS``: its
    place is generation_config.json), a switch of how transformers runs the model (``RUNTIME_KEYS``), a value
    transformers' config class refuses (``_EXTRA_CHECKS``) and one JSON cannot hold: each before anything is
    written."""
    path = os.fspath(path)
    if max_shard_bytes is not None and (isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int)
                                        or max_shard_bytes < 1):
        raise ValueError(f"save_checkpoint: max_shard_bytes must be a positive int (or None: one file), got "
                         f"{max_shard_bytes!r}")
    base = model.config.to_dict()
    for k, v in (extra_config or {}).items():
        try:  # before anything is written (an in-place save removes the weight files first)
            json.dumps(v, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise ValueError(f"save_checkpoint: extra_config key {k!r} = {v!r} is not a JSON value ({e})") from e
        if k in _EXTRA_CHECKS and not _EXTRA_CHECKS[k][0](v):
            raise ValueError(f"save_checkpoint: extra_config key {k!r} = {v!r}; transformers expects "
                             f"{_EXTRA_CHECKS[k][1]} (its config class refuses the saved copy otherwise)")
        if k in GENERATE_KEYS or k in RUNTIME_KEYS:
            raise ValueError(f"save_checkpoint: extra_config key {k!r} = {v!r} is " + (
                "a default of transformers' generate(), which it would apply to this checkpoint (this project's "
                "generate does not read it): write it in generation_config.json" if k in GENERATE_KEYS else
                "a switch of how transformers runs the model (it refuses or fails on some values): left to its "
                "defaults"))
    cfg = {**base, **(extra_config or {})}
    try:  # what load_checkpoint will make of it: a key it refuses is refused now, before anything is written
        loaded = LlamaConfig.from_dict(cfg)
    except (ValueError, CheckpointError) as e:
        raise ValueError(f"save_checkpoint: extra_config {extra_config!r} gives a config.json that load_checkpoint "
                         f"refuses: {e}") from e
    if extra_config:  # the tensors written are the model's: config.json must describe them (plain: the model's
        # config as saved without extra_config); a key of it restated with another value is refused too (a null
        # head_dim, which this loader fills in as transformers' Llama does but its Qwen3 or Gemma refuses)
        plain = _loads_as(base)
        restated = [k for k, v in extra_config.items() if k in base and json.loads(json.dumps(v)) != base[k]]
        if restated or loaded != plain:
            changed = [k for k, v in extra_config.items() if k in restated or _loads_as({**base, k: v}) != plain] \
                or sorted(extra_config)  # those that change it alone (else all: together)
            raise ValueError(f"save_checkpoint: extra_config changes the model config.json describes (keys "
                             f"{changed}); expected keys that leave it as it is (e.g. provenance): change "
                             "model.config instead")
    tensors = to_hf_tensors(model, dtype)
    os.makedirs(path, exist_ok=True)
    stored = next(iter(tensors.values())).dtype
    # the tensors' dtype under both names transformers reads ("torch_dtype" up to v4, "dtype" since v5)
    cfg["torch_dtype"] = cfg["dtype"] = "bfloat16" if stored == ml_dtypes.bfloat16 else np.dtype(stored).name
    # A directory saved before, in the other form (one file / shards) or with more shards, would otherwise keep
    # files that the loader reads in place of these (it prefers the index): remove the files this function writes.
    for fname in os.listdir(path):
        if fname in (SINGLE_FILE, INDEX_FILE) or _SHARD_NAME.fullmatch(fname):
            os.remove(os.path.join(path, fname))
    _same_generation_ids(os.path.join(path, "generation_config.json"), cfg)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, x in tensors.items():
        if shards[-1] and max_shard_bytes is not None and size + x.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = x
        size += x.nbytes
    if len(shards) == 1:  # everything fits one file: no index, as transformers' save_pretrained
        save_file(tensors, os.path.join(path, SINGLE_FILE), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    # transformers' index metadata: the parameters (a tied head counted once, as it is saved once) and their bytes
    metadata = {"total_parameters": sum(x.size for x in tensors.values()),
                "total_size": sum(x.nbytes for x in tensors.values())}
    with open(os.path.join(path, INDEX_FILE), "w") as f:  # as transformers writes it: sorted keys, a final newline
        f.write(json.dumps({"metadata": metadata, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")
