"""models.checkpoint + models.llama against an independent plain-numpy Llama.

The test writes a tiny HF-format checkpoint itself (numpy arrays under HF names, sharded with an index), loads
it in fp32 and bf16, and compares logits with a numpy implementation of the same math written here. Also: the
Qwen2 / Qwen3 tensors (biases, q/k norms) round-trip; missing, unexpected, corrupt or truncated files raise
``CheckpointError`` naming the tensor or file.
"""

import dataclasses
import json
import math
import pathlib
import re
import warnings

import chex
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from models.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, to_hf_tensors
from models.config import LlamaConfig
from models.generate import generate, prefill
from models import llama
from models.llama import Llama, causal_attention

import jax.numpy as jnp

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "vocab_size": 50, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5, "rope_theta": 500.0, "tie_word_embeddings": False, "bos_token_id": 1,
    "eos_token_id": 2,
    # original context 16: the three RoPE bands (kept, stretched, blended) all occur with head_dim 8
    "rope_scaling": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 16},
}


def make_tensors(cfg, seed=0):
    rng = np.random.default_rng(seed)
    d, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hq = cfg["num_attention_heads"] * cfg["head_dim"]
    hkv = cfg["num_key_value_heads"] * cfg["head_dim"]

    def w(*shape):
        return (rng.standard_normal(shape) / math.sqrt(shape[-1])).astype(np.float32)

    t = {"model.embed_tokens.weight": w(V, d), "model.norm.weight": (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
        t[p + "post_attention_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
        t[p + "self_attn.q_proj.weight"] = w(hq, d)
        t[p + "self_attn.k_proj.weight"] = w(hkv, d)
        t[p + "self_attn.v_proj.weight"] = w(hkv, d)
        t[p + "self_attn.o_proj.weight"] = w(d, hq)
        t[p + "mlp.gate_proj.weight"] = w(I, d)
        t[p + "mlp.up_proj.weight"] = w(I, d)
        t[p + "mlp.down_proj.weight"] = w(d, I)
    if not cfg["tie_word_embeddings"]:
        t["lm_head.weight"] = w(V, d)
    return t


QWEN2 = dict(CONFIG, architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=False,
             sliding_window=None, max_window_layers=2, rope_scaling=None, tie_word_embeddings=True)
QWEN3 = dict(CONFIG, architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=16, rope_scaling=None)


def family_tensors(cfg, seed=0):
    """make_tensors plus the family's q/k/v biases (Qwen2) or q/k norms (Qwen3), all random."""
    rng = np.random.default_rng(seed + 100)
    t = make_tensors(cfg, seed)
    hq, hkv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}.self_attn."
        if cfg.get("model_type") == "qwen2":
            for name, n in (("q", hq), ("k", hkv), ("v", hkv)):
                t[p + f"{name}_proj.bias"] = (0.1 * rng.standard_normal(n)).astype(np.float32)
        if cfg.get("model_type") == "qwen3":
            for name in ("q", "k"):
                t[p + f"{name}_norm.weight"] = (1 + 0.1 * rng.standard_normal(cfg["head_dim"])).astype(np.float32)
    return t


def write_checkpoint(path, cfg, tensors, shards=1, dtype=np.float32):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    names = sorted(tensors)
    conv = {n: tensors[n].astype(dtype) for n in names}
    if shards == 1:
        save_file(conv, str(path / "model.safetensors"))
        return
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: conv[n] for n in names[s::shards]}
        save_file(part, str(path / fname))
        weight_map.update({n: fname for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


# ------------------------------------------------------------------------------ independent numpy Llama


def np_inv_freq(cfg):
    d, theta = cfg["head_dim"], cfg["rope_theta"]
    rs = cfg.get("rope_scaling")
    freqs = []
    for i in range(0, d, 2):
        f = theta ** (-i / d)
        if rs:
            wl = 2 * math.pi / f
            old = rs["original_max_position_embeddings"]
            lo, hi, fac = rs["low_freq_factor"], rs["high_freq_factor"], rs["factor"]
            if wl > old / lo:
                f = f / fac
            elif wl >= old / hi:
                s = (old / wl - lo) / (hi - lo)
                f = (1 - s) * f / fac + s * f
        freqs.append(f)
    return np.array(freqs)


def np_llama_logits(cfg, t, tokens):
    """Logits ``[T, V]`` of one sequence, float64, straight from HF tensor names and HF Llama math."""
    t = {k: v.astype(np.float64) for k, v in t.items()}
    H, Hkv, D = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps = cfg["rms_norm_eps"]
    T = len(tokens)

    def norm(x, w):
        return w * x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)

    ang = np.arange(T)[:, None] * np_inv_freq(cfg)[None, :]  # [T, D/2]
    cos = np.concatenate([np.cos(ang)] * 2, -1)[:, None, :]
    sin = np.concatenate([np.sin(ang)] * 2, -1)[:, None, :]

    def rope(x):  # x [T, H, D]; HF rotate_half
        half = D // 2
        rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
        return x * cos + rot * sin

    x = t["model.embed_tokens.weight"][np.asarray(tokens)]
    mask = np.tril(np.ones((T, T), bool))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = norm(x, t[p + "input_layernorm.weight"])
        q = rope((h @ t[p + "self_attn.q_proj.weight"].T).reshape(T, H, D))
        k = rope((h @ t[p + "self_attn.k_proj.weight"].T).reshape(T, Hkv, D))
        v = (h @ t[p + "self_attn.v_proj.weight"].T).reshape(T, Hkv, D)
        k, v = np.repeat(k, H // Hkv, axis=1), np.repeat(v, H // Hkv, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / math.sqrt(D)
        s = np.where(mask[None], s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", a, v).reshape(T, H * D)
        x = x + o @ t[p + "self_attn.o_proj.weight"].T
        h = norm(x, t[p + "post_attention_layernorm.weight"])
        g = h @ t[p + "mlp.gate_proj.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * (h @ t[p + "mlp.up_proj.weight"].T)) @ t[p + "mlp.down_proj.weight"].T
    x = norm(x, t["model.norm.weight"])
    head = t["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else t["lm_head.weight"]
    return x @ head.T


def model_logits(model, tokens):
    toks = jnp.asarray([tokens], jnp.int32)
    pos = jnp.arange(len(tokens))[None]
    h, _ = model(toks, pos, None, causal_attention)
    return np.asarray(model.logits(h)[0])


# ------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("shards", [1, 3])
def test_fp32_logits_match_numpy(tmp_path, tied, shards):
    cfg = dict(CONFIG, tie_word_embeddings=tied)
    t = make_tensors(cfg)
    write_checkpoint(tmp_path / "ck", cfg, t, shards=shards)
    model = load_checkpoint(tmp_path / "ck", dtype=jnp.float32)
    assert model.dtype == jnp.float32
    tokens = [1, 7, 3, 9, 21, 30, 5, 5, 44, 12, 0, 3, 17, 18, 19, 20, 33, 2, 4, 6]
    np.testing.assert_allclose(model_logits(model, tokens), np_llama_logits(cfg, t, tokens), atol=2e-4, rtol=2e-4)


def test_bf16_checkpoint_and_params(tmp_path):
    t = make_tensors(CONFIG)
    write_checkpoint(tmp_path / "ck", CONFIG, t, shards=2, dtype=ml_dtypes.bfloat16)
    t_bf16 = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in t.items()}
    tokens = [1, 4, 9, 16, 25, 36, 49, 0, 1, 2]
    want = np_llama_logits(CONFIG, t_bf16, tokens)
    m32 = load_checkpoint(tmp_path / "ck", dtype=jnp.float32)  # bf16 file -> fp32 params: exact weights
    np.testing.assert_allclose(model_logits(m32, tokens), want, atol=2e-4, rtol=2e-4)
    m16 = load_checkpoint(tmp_path / "ck", dtype=jnp.bfloat16)
    assert m16.dtype == jnp.bfloat16
    got = model_logits(m16, tokens)
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()


def test_generation_path_matches_numpy(tmp_path):
    """Prefill (through hydragen_jax, shared levels) and greedy decode agree with the numpy model."""
    t = make_tensors(CONFIG, seed=3)
    write_checkpoint(tmp_path / "ck", CONFIG, t)
    model = load_checkpoint(tmp_path / "ck")
    shared = [1, 5, 9, 13, 17, 21, 25]
    prompts = [shared + [3, 4], shared + [6], shared + [8, 10, 12]]
    g = generate(model, prompts, num_samples=2, max_new_tokens=12, eos_ids=())
    assert len(g.tree.levels) >= 1
    for b in range(6):
        p = prompts[b // 2]
        full = p + g.tokens[b].tolist()
        ref = np_llama_logits(CONFIG, t, full)
        np.testing.assert_allclose(g.logits[b], ref[len(p) - 1], atol=2e-4, rtol=2e-4)
        ref_next = ref[len(p) - 1:len(full) - 1]
        assert (g.tokens[b] == ref_next.argmax(-1)).all()
        lsm = ref_next - np.log(np.exp(ref_next - ref_next.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - ref_next.max(-1, keepdims=True)
        np.testing.assert_allclose(g.logprobs[b], lsm[np.arange(12), g.tokens[b]], atol=2e-4)


def test_save_load_round_trip(tmp_path):
    t = make_tensors(CONFIG)
    write_checkpoint(tmp_path / "a", CONFIG, t)
    model = load_checkpoint(tmp_path / "a")
    save_checkpoint(model, tmp_path / "b", max_shard_bytes=20_000)
    assert (tmp_path / "b" / "model.safetensors.index.json").exists()
    again = load_checkpoint(tmp_path / "b")
    tokens = [3, 1, 4, 1, 5, 9, 2, 6]
    np.testing.assert_array_equal(model_logits(model, tokens), model_logits(again, tokens))
    save_checkpoint(model, tmp_path / "c", dtype=jnp.bfloat16)
    assert load_checkpoint(tmp_path / "c", dtype=jnp.bfloat16).dtype == jnp.bfloat16
    # a shard size the whole model fits: one model.safetensors and no index, as transformers' save_pretrained
    save_checkpoint(model, tmp_path / "d", max_shard_bytes=10**9)
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["config.json", "model.safetensors"]
    np.testing.assert_array_equal(model_logits(load_checkpoint(tmp_path / "d"), tokens), model_logits(model, tokens))


def test_a_sharded_saves_index_metadata_is_transformers(tmp_path):
    """The index of a sharded save carries the metadata transformers' save_pretrained writes: the parameter count
    (a tied head, saved once, counted once) and the bytes, as in the fixture transformers saved (tied, bf16)."""
    fixture = pathlib.Path(__file__).parent / "fixtures" / "hf_llama3"
    want = json.loads((fixture / "model.safetensors.index.json").read_text())
    model = load_checkpoint(fixture, dtype=jnp.bfloat16)
    assert model.config.tie_word_embeddings
    save_checkpoint(model, tmp_path, dtype=jnp.bfloat16, max_shard_bytes=want["metadata"]["total_size"] // 3)
    text = (tmp_path / "model.safetensors.index.json").read_text()
    got = json.loads(text)
    assert got["metadata"] == want["metadata"], (got["metadata"], want["metadata"])
    assert text.endswith("}\n") and text.index('"metadata"') < text.index('"weight_map"')  # transformers' layout
    assert sorted(got["weight_map"]) == sorted(want["weight_map"])
    # float32: twice the bytes, the same parameters
    save_checkpoint(model, tmp_path / "f32", dtype=jnp.float32, max_shard_bytes=want["metadata"]["total_size"] // 3)
    got = json.loads((tmp_path / "f32" / "model.safetensors.index.json").read_text())["metadata"]
    assert got == {"total_parameters": want["metadata"]["total_parameters"],
                   "total_size": 2 * want["metadata"]["total_size"]}, got


def _model(path, seed=0):
    write_checkpoint(path, CONFIG, make_tensors(CONFIG, seed=seed))
    return load_checkpoint(path)


def test_saving_again_replaces_an_earlier_save_in_either_form(tmp_path):
    """A save into a directory that holds an earlier one, sharded or not, loads as the new model: the loader
    prefers an index, so a stale index or stale shards must not survive a single-file save (nor the reverse)."""
    a, b = _model(tmp_path / "a", seed=0), _model(tmp_path / "b", seed=1)
    tokens = [3, 1, 4, 1, 5]
    out = tmp_path / "out"
    for model, shards in ((a, 20_000), (b, None), (a, 20_000), (b, 50_000), (a, None)):
        save_checkpoint(model, out, max_shard_bytes=shards)
        np.testing.assert_array_equal(model_logits(load_checkpoint(out), tokens), model_logits(model, tokens))
        names = sorted(p.name for p in out.iterdir() if p.name != "config.json")
        if shards is None:
            assert names == ["model.safetensors"], names
        else:  # only this save's shards, listed by its index
            index = json.loads((out / "model.safetensors.index.json").read_text())
            assert names == sorted({*index["weight_map"].values(), "model.safetensors.index.json"}), names


@pytest.mark.parametrize("dtype, name", [(jnp.float16, "float16"), (jnp.bfloat16, "bfloat16"),
                                         (jnp.float32, "float32")])
def test_saved_config_names_the_tensors_dtype(tmp_path, dtype, name):
    model = _model(tmp_path / "a")
    save_checkpoint(model, tmp_path / "b", dtype=dtype)
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["torch_dtype"] == cfg["dtype"] == name


@pytest.mark.parametrize("kwargs, match", [
    ({"dtype": jnp.int8}, r"save_checkpoint: dtype must be one of .*got <class 'jax.numpy.int8'>"),
    ({"dtype": np.int32}, r"dtype must be one of \('float32', 'bfloat16', 'float16', 'float64'\)"),
    ({"dtype": jnp.float8_e4m3fn}, "dtype must be one of"),
    ({"dtype": "bf16"}, r"dtype must be one of .*got 'bf16'"),
    ({"max_shard_bytes": 0}, "max_shard_bytes must be a positive int .*got 0"),
    ({"max_shard_bytes": -5}, "max_shard_bytes must be a positive int"),
    ({"max_shard_bytes": 1.5e6}, "max_shard_bytes must be a positive int"),
    ({"extra_config": {"use_flash_attn": True}},
     r"extra_config \{'use_flash_attn': True\} gives a config.json that load_checkpoint refuses: .*'use_flash_attn'"),
])
def test_a_save_load_checkpoint_would_refuse_is_refused_before_writing(tmp_path, kwargs, match):
    """A dtype the loader does not read back (int8 would round every weight to 0 or ±1), a shard size that is not
    one, or extra config keys the loader refuses: named at the save, with nothing written."""
    model = _model(tmp_path / "a")
    with pytest.raises(ValueError, match=match):
        save_checkpoint(model, tmp_path / "b", **kwargs)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("extra", [{"rope_theta": 1e6}, {"rms_norm_eps": 0.5}, {"tie_word_embeddings": True},
                                   {"num_hidden_layers": 1}, {"_name_or_path": "mine", "vocab_size": 7},
                                   {"head_dim": None}, {"num_key_value_heads": None}])
def test_extra_config_that_changes_the_model_is_refused(tmp_path, extra):
    """config.json must describe the tensors written: a key that changes the model (it saved a checkpoint that
    loaded with other logits, or did not load) is refused by name, with nothing written; so is one of its keys
    restated otherwise (a null head_dim or num_key_value_heads: this loader fills them in, transformers' Qwen3,
    Gemma, Mistral refuse them)."""
    model = _model(tmp_path / "a")
    changed = [k for k in extra if k != "_name_or_path"]
    with pytest.raises(ValueError, match=re.escape(f"extra_config changes the model config.json describes (keys "
                                                   f"{changed!r})")):
        save_checkpoint(model, tmp_path / "b", extra_config=extra)
    assert not (tmp_path / "b").exists()


def test_a_model_of_mixed_dtypes_is_saved_in_each_tensors_dtype(tmp_path):
    """dtype=None keeps each tensor's dtype (a float32 norm of a bfloat16 model was rounded to bfloat16); config.json
    names the embedding's."""
    _model(tmp_path / "a")
    model = load_checkpoint(tmp_path / "a", dtype=jnp.bfloat16)
    params = model.params()
    layers = [dict(layer, attn_norm=(layer["attn_norm"].astype(jnp.float32) + 1e-3)) for layer in params["layers"]]
    mixed = Llama(model.config, dict(params, layers=layers))
    save_checkpoint(mixed, tmp_path / "b")
    with safe_open(str(tmp_path / "b" / "model.safetensors"), "np") as f:
        assert f.get_slice("model.layers.0.input_layernorm.weight").get_dtype() == "F32"
        assert f.get_slice("model.layers.0.self_attn.q_proj.weight").get_dtype() == "BF16"
    assert json.loads((tmp_path / "b" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    again = load_checkpoint(tmp_path / "b", dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(again.params()["layers"][0]["attn_norm"]),
                                  np.asarray(layers[0]["attn_norm"]))


@pytest.mark.parametrize("extra, match", [
    ({"max_length": 8}, "'max_length' = 8 is a default of transformers' generate\\(\\), .* generation_config.json"),
    ({"do_sample": True, "temperature": 0.5}, "'do_sample' = True is a default of transformers' generate"),
    ({"use_return_dict": True}, "'use_return_dict' = True is a switch of how transformers runs the model"),
    ({"return_dict": False}, "'return_dict' = False is a switch"),
    ({"is_encoder_decoder": True}, "'is_encoder_decoder' = True is a switch"),
    ({"_attn_implementation": "flash_attention_2"}, "'_attn_implementation' = 'flash_attention_2' is a switch"),
    ({"output_attentions": True}, "'output_attentions' = True is a switch"),
    ({"output_hidden_states": True}, "'output_hidden_states' = True is a switch"),
    ({"use_cache": "yes"}, "'use_cache' = 'yes'; transformers expects true or false"),
    ({"initializer_range": 3.0}, r"'initializer_range' = 3.0; transformers expects a number in \[0, 1\]"),
    ({"_name_or_path": np.float32(0.5)}, r"'_name_or_path' = .*0.5.* is not a JSON value"),
])
def test_extra_config_keys_transformers_acts_on_are_refused(tmp_path, extra, match):
    """Keys the loader reads past (harmless in a checkpoint's config.json for this model's math) that transformers
    acts on when it loads what save_checkpoint wrote (a review ran transformers 5.17 on each): generate() defaults
    (it then sampled, or stopped after 4 tokens), and run-time switches it refuses or fails on (every forward with
    return_dict false): refused by name, nothing written."""
    model = _model(tmp_path / "a")
    with pytest.raises(ValueError, match=r"save_checkpoint: extra_config key " + match):
        save_checkpoint(model, tmp_path / "b", extra_config=extra)
    assert not (tmp_path / "b").exists()
    if not any(isinstance(v, np.generic) for v in extra.values()):
        assert LlamaConfig.from_dict(dict(CONFIG, **extra)) == model.config  # read past in a config.json
    # in place too: refused before the weight files are removed (a value json cannot write left a truncated
    # config.json and no weights)
    with pytest.raises(ValueError, match=r"save_checkpoint: extra_config key "):
        save_checkpoint(model, tmp_path / "a", extra_config=extra)
    assert load_checkpoint(tmp_path / "a").config == model.config


def test_extra_config_the_loader_reads_is_saved(tmp_path):
    model = _model(tmp_path / "a")
    save_checkpoint(model, tmp_path / "b", extra_config={"_name_or_path": "mine", "pruned_heads": {},
                                                         "rms_norm_eps": model.config.rms_norm_eps})
    assert json.loads((tmp_path / "b" / "config.json").read_text())["_name_or_path"] == "mine"
    tokens = [3, 1, 4]
    np.testing.assert_array_equal(model_logits(load_checkpoint(tmp_path / "b"), tokens), model_logits(model, tokens))


def test_extra_config_provenance_under_the_projects_prefix(tmp_path):
    """The docstring's "e.g. provenance": any new key was refused (the loader refuses keys it does not know); keys
    named hydragen_... are this project's metadata, saved and loaded; a plain "provenance" is still refused."""
    model = _model(tmp_path / "a")
    record = {"trained_by": "me", "steps": [1, 2]}
    save_checkpoint(model, tmp_path / "b", extra_config={"hydragen_provenance": record})
    assert json.loads((tmp_path / "b" / "config.json").read_text())["hydragen_provenance"] == record
    assert load_checkpoint(tmp_path / "b").config == model.config
    with pytest.raises(ValueError, match="key 'provenance' = 'x' is not known to this loader"):
        save_checkpoint(model, tmp_path / "c", extra_config={"provenance": "x"})


def test_index_entry_that_is_not_a_file_name(tmp_path):
    write_checkpoint(tmp_path / "ck", CONFIG, make_tensors(CONFIG), shards=2)
    index = tmp_path / "ck" / "model.safetensors.index.json"
    d = json.loads(index.read_text())
    d["weight_map"]["model.norm.weight"] = None
    index.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"weight_map\['model.norm.weight'\] = None, expected a file name"):
        load_checkpoint(tmp_path / "ck")


@pytest.mark.parametrize("where", ["../outside.safetensors", "/abs/model.safetensors", "sub/../../x.safetensors"])
def test_index_entry_outside_the_checkpoint_is_refused(tmp_path, where):
    """An index whose weight_map names a file outside the checkpoint's directory: refused by name, nothing read from
    there (a shard in a subdirectory of the checkpoint stays allowed)."""
    write_checkpoint(tmp_path / "ck", CONFIG, make_tensors(CONFIG), shards=2)
    index = tmp_path / "ck" / "model.safetensors.index.json"
    d = json.loads(index.read_text())
    d["weight_map"]["model.norm.weight"] = where
    index.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=re.escape(f"weight_map['model.norm.weight'] = {where!r} is outside")):
        load_checkpoint(tmp_path / "ck")


def _sharded_and_whole(tmp_path) -> tuple[pathlib.Path, dict]:
    """The same tensors as a 2-shard checkpoint ck/ and a single-file whole/: ck's index path and its JSON."""
    tensors = make_tensors(CONFIG)
    write_checkpoint(tmp_path / "ck", CONFIG, tensors, shards=2)
    write_checkpoint(tmp_path / "whole", CONFIG, tensors)
    index = tmp_path / "ck" / "model.safetensors.index.json"
    return index, json.loads(index.read_text())


def _loads_as_whole(tmp_path) -> None:
    tokens = [3, 1, 4]
    np.testing.assert_array_equal(model_logits(load_checkpoint(tmp_path / "ck"), tokens),
                                  model_logits(load_checkpoint(tmp_path / "whole"), tokens))


def test_index_naming_one_shard_two_ways_loads(tmp_path):
    """"./a.safetensors" and "a.safetensors" are one file: not a tensor in two shards."""
    index, d = _sharded_and_whole(tmp_path)
    name = next(iter(d["weight_map"]))
    d["weight_map"][name] = "./" + d["weight_map"][name]
    index.write_text(json.dumps(d))
    _loads_as_whole(tmp_path)


def test_index_entry_in_a_subdirectory_loads(tmp_path):
    index, d = _sharded_and_whole(tmp_path)
    first = d["weight_map"]["model.norm.weight"]
    (tmp_path / "ck" / "sub").mkdir()
    (tmp_path / "ck" / first).rename(tmp_path / "ck" / "sub" / first)
    d["weight_map"] = {n: ("sub/" + f if f == first else f) for n, f in d["weight_map"].items()}
    index.write_text(json.dumps(d))
    _loads_as_whole(tmp_path)


def test_params_with_other_top_level_names_than_the_config_needs(tmp_path):
    """Llama(config, params) names the keys that differ (an lm_head with tied embeddings, none without) instead of
    failing on a bare KeyError."""
    model = _model(tmp_path / "a")
    config, p = model.config, model.params()
    tied = llama.LlamaConfig.from_dict(dict(CONFIG, tie_word_embeddings=True))
    with pytest.raises(ValueError, match=r"params has keys \['embed', 'final_norm', 'layers', 'lm_head'\]; the "
                                         r"config \(tie_word_embeddings=True\) needs \['embed', 'final_norm', "
                                         r"'layers'\]"):
        llama.Llama(tied, p)
    with pytest.raises(ValueError, match=r"needs \['embed', 'final_norm', 'layers', 'lm_head'\]"):
        llama.Llama(config, {k: v for k, v in p.items() if k != "lm_head"})


@pytest.mark.parametrize("cfg, name", [(CONFIG, "model.layers.1.mlp.up_proj.weight"),
                                       (QWEN2, "model.layers.1.self_attn.v_proj.bias")], ids=["llama", "qwen2"])
def test_missing_tensor(tmp_path, cfg, name):
    t = family_tensors(cfg)
    del t[name]
    write_checkpoint(tmp_path / "ck", cfg, t)
    with pytest.raises(CheckpointError, match=f"missing tensor '{name}'"):
        load_checkpoint(tmp_path / "ck")


def test_missing_lm_head_when_untied(tmp_path):
    t = make_tensors(dict(CONFIG, tie_word_embeddings=True))
    write_checkpoint(tmp_path / "ck", CONFIG, t)  # config says untied
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        load_checkpoint(tmp_path / "ck")


def test_misshaped_tensor(tmp_path):
    t = make_tensors(CONFIG)
    t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((32, 32), np.float32)  # expected (16, 32)
    write_checkpoint(tmp_path / "ck", CONFIG, t, shards=2)
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(32, 32\), "
                                              r"expected \(16, 32\)"):
        load_checkpoint(tmp_path / "ck")


@pytest.mark.parametrize("bad, name", [(np.int8, "I8"), (np.bool_, "BOOL"), (ml_dtypes.float8_e4m3fn, "F8_E4M3")])
def test_integer_bool_or_8_bit_tensors_are_refused_naming_them(tmp_path, bad, name):
    """A quantized or integer weight is never read as if it were the float weight (its shape is right)."""
    t = {n: v.astype(np.float32) for n, v in make_tensors(CONFIG).items()}
    q = "model.layers.0.self_attn.q_proj.weight"
    t[q] = (t[q] * 100).astype(bad)
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "config.json").write_text(json.dumps(CONFIG))
    try:
        save_file(t, str(tmp_path / "ck" / "model.safetensors"))
    except (ValueError, TypeError, KeyError) as e:  # this safetensors cannot write the dtype
        pytest.skip(f"safetensors cannot write {name}: {e}")
    with pytest.raises(CheckpointError, match=rf"tensor '{q}' in model.safetensors has dtype {name}; expected one of "
                                              r"\('F16', 'BF16', 'F32', 'F64'\)"):
        load_checkpoint(tmp_path / "ck")


def test_load_dtype_that_is_not_one_is_named(tmp_path):
    write_checkpoint(tmp_path / "ck", CONFIG, make_tensors(CONFIG))
    with pytest.raises(ValueError, match="load_checkpoint: dtype must be float32 or bfloat16, got 'bf16'"):
        load_checkpoint(tmp_path / "ck", dtype="bf16")


def test_missing_shard_and_files(tmp_path):
    t = make_tensors(CONFIG)
    write_checkpoint(tmp_path / "ck", CONFIG, t, shards=2)
    (tmp_path / "ck" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(CONFIG))
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_checkpoint(tmp_path / "empty")


def test_which_safetensors_files_are_read_without_an_index(tmp_path):
    """As transformers: `model.safetensors` alone where it exists (a stale copy or index beside it is not read);
    shards without their index all, and a tensor in two of them raises instead of the last file's copy winning."""
    t = make_tensors(CONFIG)
    write_checkpoint(tmp_path / "ck", CONFIG, t)
    tokens = [3, 1, 4, 1, 5]
    want = model_logits(load_checkpoint(tmp_path / "ck"), tokens)
    save_file({"model.norm.weight": np.zeros(CONFIG["hidden_size"], np.float32)},
              str(tmp_path / "ck" / "model_old.safetensors"))  # sorts after model.safetensors
    np.testing.assert_array_equal(model_logits(load_checkpoint(tmp_path / "ck"), tokens), want)

    write_checkpoint(tmp_path / "ck" / "stale", CONFIG, {**t, "model.norm.weight": np.zeros(CONFIG["hidden_size"],
                                                                                      np.float32)}, shards=2)
    for f in (tmp_path / "ck" / "stale").iterdir():  # a stale index and its shards beside model.safetensors
        if f.name != "config.json":
            f.rename(tmp_path / "ck" / f.name)
    np.testing.assert_array_equal(model_logits(load_checkpoint(tmp_path / "ck"), tokens), want)

    write_checkpoint(tmp_path / "shards", CONFIG, t, shards=2)
    (tmp_path / "shards" / "model.safetensors.index.json").unlink()
    np.testing.assert_array_equal(model_logits(load_checkpoint(tmp_path / "shards"), tokens), want)
    save_file({"model.norm.weight": np.zeros(CONFIG["hidden_size"], np.float32)},
              str(tmp_path / "shards" / "zz_old.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.norm\.weight' is in both "
                                              r"model-0000\d-of-00002\.safetensors and zz_old\.safetensors"):
        load_checkpoint(tmp_path / "shards")


def test_an_index_that_misplaces_or_omits_a_tensor_is_read_as_transformers_reads_it(tmp_path):
    """transformers reads every shard the index lists, whole: a tensor the map puts in the wrong listed shard, or
    leaves out, is read where it is (both were refused: 'missing tensor ... in model-00001...'); a listed shard that
    is not there is named with the tensors missing."""
    t = make_tensors(CONFIG)
    write_checkpoint(tmp_path / "ref", CONFIG, t)
    want = load_checkpoint(tmp_path / "ref").params()
    write_checkpoint(tmp_path / "ck", CONFIG, t, shards=2)
    index = tmp_path / "ck" / "model.safetensors.index.json"
    d = json.loads(index.read_text())
    first, second = sorted(set(d["weight_map"].values()))
    moved = next(n for n, f in d["weight_map"].items() if f == second)
    d["weight_map"][moved] = first  # the wrong listed shard
    del d["weight_map"][next(n for n, f in d["weight_map"].items() if f == second and n != moved)]  # left out
    index.write_text(json.dumps(d))
    chex.assert_trees_all_equal(load_checkpoint(tmp_path / "ck").params(), want)
    (tmp_path / "ck" / second).unlink()
    with pytest.raises(CheckpointError, match=rf"missing tensor .*; the index lists {second}, which is not there"):
        load_checkpoint(tmp_path / "ck")


def test_renamed_tensors_are_named_as_the_file_names_them(tmp_path):
    """Errors name a tensor as its file does: a base model's without "model.", a tied pair saved as the head alone by
    "lm_head.weight" (and its other tensors with "model."); a shard's tensor that the index leaves out is not
    required (it loaded before the shards were read whole, and transformers ignores it)."""
    cfg = dict(CONFIG, tie_word_embeddings=True)
    t = make_tensors(cfg)
    big = {k.removeprefix("model."): v for k, v in t.items()}
    big["layers.0.mlp.up_proj.weight"] = np.full_like(big["layers.0.mlp.up_proj.weight"], 3.4e38)
    write_checkpoint(tmp_path / "base", cfg, big)
    with pytest.raises(CheckpointError, match=r"tensor 'layers\.0\.mlp\.up_proj\.weight' holds .*would load as inf"):
        load_checkpoint(tmp_path / "base", jnp.bfloat16)
    head_only = {k: v for k, v in t.items() if k not in ("model.embed_tokens.weight", "model.norm.weight")}
    head_only["lm_head.weight"] = t["model.embed_tokens.weight"]
    write_checkpoint(tmp_path / "head", cfg, head_only)
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.norm\.weight'"):
        load_checkpoint(tmp_path / "head")
    write_checkpoint(tmp_path / "extra", cfg, {**t, "model.extra_buffer": np.ones(3, np.float32)}, shards=2)
    index = tmp_path / "extra" / "model.safetensors.index.json"
    d = json.loads(index.read_text())
    del d["weight_map"]["model.extra_buffer"]
    index.write_text(json.dumps(d))
    load_checkpoint(tmp_path / "extra")


def test_a_file_is_not_a_checkpoint_directory(tmp_path):
    write_checkpoint(tmp_path / "ck", CONFIG, make_tensors(CONFIG))
    for name in ("config.json", "model.safetensors"):
        with pytest.raises(CheckpointError, match=f"{name} is a file; expected the checkpoint's directory"):
            load_checkpoint(tmp_path / "ck" / name)
    with pytest.raises(CheckpointError, match="not valid JSON"):  # a binary file read as a config
        LlamaConfig.from_json(tmp_path / "ck" / "model.safetensors")


def test_generation_config_gives_the_stop_ids(tmp_path):
    """As transformers' generate: a generation_config.json with an eos_token_id (an id or a list) gives the stop ids
    instead of config.json's (Llama 3 Instruct adds <|eot_id|> there);
    a malformed one is refused naming the file. Without one, or with null, none (transformers' generate reads that
    file alone): a warning says so; no such file: config.json's."""
    write_checkpoint(tmp_path / "ck", dict(CONFIG, eos_token_id=2), make_tensors(CONFIG))
    gen = tmp_path / "ck" / "generation_config.json"
    assert load_checkpoint(tmp_path / "ck").config.eos_token_ids == (2,)
    for eos, want in (([2, 7], (2, 7)), (5, (5,)), (None, ())):
        gen.write_text(json.dumps({"bos_token_id": 1, "eos_token_id": eos, "do_sample": True}))
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            assert load_checkpoint(tmp_path / "ck").config.eos_token_ids == want, eos
            assert LlamaConfig.from_json(tmp_path / "ck" / "config.json").eos_token_ids == want
        assert bool(seen) == (eos is None) and all("names no eos_token_id" in str(w.message) for w in seen)
    # a config file of another name is read alone; a save writes the stop ids into config.json and into a
    # generation_config.json in the folder (an earlier save's: it would override them), keeping its other keys
    # (it was removed, and with it transformers' sampling defaults where a checkpoint was saved in place)
    gen.write_text(json.dumps({"eos_token_id": [2, 7]}))
    (tmp_path / "ck" / "other.json").write_text((tmp_path / "ck" / "config.json").read_text())
    assert LlamaConfig.from_json(tmp_path / "ck" / "other.json").eos_token_ids == (2,)
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "generation_config.json").write_text('{"eos_token_id": 9, "temperature": 0.6}')
    save_checkpoint(load_checkpoint(tmp_path / "ck"), tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "generation_config.json").read_text()) == {
        "eos_token_id": [2, 7], "temperature": 0.6}
    assert load_checkpoint(tmp_path / "saved").config.eos_token_ids == (2, 7)
    gen.write_text(json.dumps({"eos_token_id": 5, "do_sample": True, "top_p": 0.9}))  # saved in place
    save_checkpoint(load_checkpoint(tmp_path / "ck"), tmp_path / "ck", dtype=jnp.bfloat16)
    assert json.loads(gen.read_text()) == {"eos_token_id": 5, "do_sample": True, "top_p": 0.9}
    assert load_checkpoint(tmp_path / "ck").config.eos_token_ids == (5,)
    # its bos / pad ids too, where it has them (a save in place with other ids left them stale for transformers)
    gen.write_text(json.dumps({"bos_token_id": 1, "pad_token_id": 0, "eos_token_id": 5}))
    m = load_checkpoint(tmp_path / "ck")
    save_checkpoint(Llama(dataclasses.replace(m.config, bos_token_id=3, pad_token_id=4, eos_token_ids=(6,)),
                          m.params()), tmp_path / "ck")
    assert json.loads(gen.read_text()) == {"bos_token_id": 3, "pad_token_id": 4, "eos_token_id": 6}
    gen.write_text(json.dumps({"eos_token_id": 5}))  # ids the file leaves out stay out
    save_checkpoint(m, tmp_path / "ck")
    assert json.loads(gen.read_text()) == {"eos_token_id": 5}
    # an id config.json leaves out (Qwen-Instruct's pad: generation_config.json's alone) stays the file's
    gen.write_text(json.dumps({"pad_token_id": 7, "eos_token_id": 5}))
    save_checkpoint(Llama(dataclasses.replace(m.config, pad_token_id=None), m.params()), tmp_path / "ck")
    assert json.loads(gen.read_text()) == {"pad_token_id": 7, "eos_token_id": 5}
    (tmp_path / "saved" / "generation_config.json").write_text("[9]")  # not an object: removed
    save_checkpoint(load_checkpoint(tmp_path / "ck"), tmp_path / "saved")
    assert not (tmp_path / "saved" / "generation_config.json").exists()
    # an id outside the vocabulary is taken as config.json's is: a warning that generation never stops on it
    gen.write_text(json.dumps({"eos_token_id": [-1, 2]}))
    with pytest.warns(UserWarning, match=r"eos_token_ids \[-1\] outside the vocabulary"):
        assert load_checkpoint(tmp_path / "ck").config.eos_token_ids == (-1, 2)
    for bad in ('{"eos_token_id": "2"}', '{"eos_token_id": [2, 1.5]}', '{"eos_token_id": [2, true]}', "{not json"):
        gen.write_text(bad)
        with pytest.raises(CheckpointError, match="generation_config.json"):
            load_checkpoint(tmp_path / "ck")


def test_unsupported_config_in_checkpoint(tmp_path):
    write_checkpoint(tmp_path / "ck", dict(CONFIG, architectures=["Qwen2ForCausalLM"]), make_tensors(CONFIG))
    with pytest.raises(CheckpointError, match="Qwen2ForCausalLM"):
        load_checkpoint(tmp_path / "ck")


def test_prefill_logits_equal_full_forward(tmp_path):
    t = make_tensors(CONFIG, seed=5)
    write_checkpoint(tmp_path / "ck", CONFIG, t)
    model = load_checkpoint(tmp_path / "ck")
    prompts = [[1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 8], [1, 2, 9]]
    state = prefill(model, prompts, 4)
    for b, p in enumerate(prompts):
        np.testing.assert_allclose(np.asarray(state.logits[b]), model_logits(model, p)[-1], atol=2e-5, rtol=2e-5)


# ------------------------------------------------------------------------------ families, bad files


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2), (6, 1)])
def test_packed_qkv_groups_each_kv_head_with_its_query_heads(hq, hkv):
    """w_qkv ``[d, Hkv, (g + 2)·D]``: group s holds query heads s·g .. s·g + g - 1 (those that read KV head s), then
    KV head s's key and value; unpacking gives the projections back; mismatched widths are refused."""
    D, d, rng = 4, 3, np.random.default_rng(0)
    q, k, v = (rng.normal(size=(d, h * D)).astype(np.float32) for h in (hq, hkv, hkv))
    layer = {"wq": q, "wk": k, "wv": v, "w_gate": rng.normal(size=(d, 5)), "w_up": rng.normal(size=(d, 5)),
             "attn_norm": np.ones(d)}
    packed = llama.pack_layer(layer, D)
    assert sorted(packed) == ["attn_norm", "w_gate_up", "w_qkv"]
    g = hq // hkv
    assert packed["w_qkv"].shape == (d, hkv, (g + 2) * D) and packed["w_gate_up"].shape == (d, 2, 5)
    for s in range(hkv):
        group = packed["w_qkv"][:, s].reshape(d, g + 2, D)
        np.testing.assert_array_equal(group[:, :g], q.reshape(d, hq, D)[:, s * g:(s + 1) * g])
        np.testing.assert_array_equal(group[:, g], k.reshape(d, hkv, D)[:, s])
        np.testing.assert_array_equal(group[:, g + 1], v.reshape(d, hkv, D)[:, s])
    np.testing.assert_array_equal(packed["w_gate_up"][:, 1], layer["w_up"])
    back = llama.unpack_layer(packed, D)
    assert sorted(back) == sorted(layer)
    for key in layer:
        np.testing.assert_array_equal(back[key], layer[key], err_msg=key)
    with pytest.raises(ValueError, match="pack_qkv: q"):
        llama.pack_qkv(q[:, :-1], k, v, D)
    with pytest.raises(ValueError, match="at least one head"):
        llama.pack_qkv(q, k[:, :0], v[:, :0], D)
    with pytest.raises(ValueError, match=r"pack_layer: w_gate \(3, 5\) and w_up \(3, 4\) must have the same shape"):
        llama.pack_layer({"w_gate": layer["w_gate"], "w_up": layer["w_up"][:, :4]}, D)
    with pytest.raises(ValueError, match=r"pack_layer: w_gate_up needs \('w_gate', 'w_up'\); got only \['w_up'\]"):
        llama.pack_layer({"w_up": layer["w_up"]}, D)


@pytest.mark.parametrize("cfg", [QWEN2, QWEN3], ids=["qwen2", "qwen3"])
def test_family_tensors_load_and_round_trip(tmp_path, cfg):
    t = family_tensors(cfg)
    write_checkpoint(tmp_path / "a", cfg, t, shards=2)
    model = load_checkpoint(tmp_path / "a")
    extra = {"qwen2": ("b_qkv",), "qwen3": ("q_norm", "k_norm")}[cfg["model_type"]]
    assert all(set(extra) <= set(layer) for layer in model.params()["layers"])
    got = to_hf_tensors(model)
    assert set(got) == set(t)
    for name in t:
        np.testing.assert_array_equal(got[name], t[name], err_msg=name)
    save_checkpoint(model, tmp_path / "b")
    again = load_checkpoint(tmp_path / "b")
    assert again.config == model.config
    np.testing.assert_array_equal(model_logits(again, [3, 1, 4, 1, 5]), model_logits(model, [3, 1, 4, 1, 5]))


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.o_proj.bias", "model.layers.2.mlp.up_proj.weight",
                                  "model.layers.0.self_attn.q_norm.weight"])
def test_unexpected_tensor_raises(tmp_path, name):
    """A tensor the config does not use (a bias, a layer too many, a Qwen3 norm in a Llama) is not ignored."""
    t = make_tensors(CONFIG)
    t[name] = np.ones(4, np.float32)
    write_checkpoint(tmp_path / "ck", CONFIG, t, shards=2)
    with pytest.raises(CheckpointError, match=f"tensor '{name}'"):
        load_checkpoint(tmp_path / "ck")


def test_ignored_buffers_and_tied_head_copy(tmp_path):
    cfg = dict(CONFIG, tie_word_embeddings=True)
    t = make_tensors(cfg)
    t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)  # old checkpoints hold it
    t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()  # an explicit copy of the tied head
    write_checkpoint(tmp_path / "ck", cfg, t)
    assert "lm_head" not in load_checkpoint(tmp_path / "ck").params()
    t["lm_head.weight"][0, 0] += 1.0
    write_checkpoint(tmp_path / "own", cfg, t)  # a head of its own: transformers warns and loads it untied
    with pytest.warns(UserWarning, match="'lm_head.weight' differs from 'model.embed_tokens.weight': loaded untied"):
        model = load_checkpoint(tmp_path / "own")
    assert not model.config.tie_word_embeddings
    np.testing.assert_array_equal(np.asarray(model.params()["lm_head"]).T, t["lm_head.weight"])
    np.testing.assert_array_equal(np.asarray(model.embed.value), t["model.embed_tokens.weight"])
    head_only = {k: v for k, v in t.items() if k != "model.embed_tokens.weight"}
    write_checkpoint(tmp_path / "head", cfg, head_only)  # the tied pair saved as the head alone: read as both
    model = load_checkpoint(tmp_path / "head")
    assert model.config.tie_word_embeddings and "lm_head" not in model.params()
    np.testing.assert_array_equal(np.asarray(model.embed.value), t["lm_head.weight"])


def test_a_base_models_names_without_model_prefix(tmp_path):
    """A checkpoint saved from the base model ("LlamaModel": "embed_tokens.weight", "layers.0....", no "model."):
    transformers adds the prefix; the same here (it was 'missing tensor'), the same model as with the prefix."""
    cfg = dict(CONFIG, tie_word_embeddings=True)
    t = make_tensors(cfg)
    write_checkpoint(tmp_path / "causal", cfg, t)
    base = {k.removeprefix("model."): v for k, v in t.items()}
    write_checkpoint(tmp_path / "base", dict(cfg, architectures=["LlamaModel"]), base, shards=2)
    want, got = load_checkpoint(tmp_path / "causal"), load_checkpoint(tmp_path / "base")
    chex.assert_trees_all_equal(got.params(), want.params())
    del base["norm.weight"]
    write_checkpoint(tmp_path / "short", cfg, base)
    with pytest.raises(CheckpointError, match=r"missing tensor 'norm.weight'"):  # named as the file names it
        load_checkpoint(tmp_path / "short")


def test_corrupt_or_truncated_files(tmp_path):
    t = make_tensors(CONFIG)
    write_checkpoint(tmp_path / "ck", CONFIG, t, shards=2)
    shard = tmp_path / "ck" / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2])  # truncated: the header promises more bytes
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: not a readable safetensors"):
        load_checkpoint(tmp_path / "ck")
    write_checkpoint(tmp_path / "one", CONFIG, t)  # no index: every file is opened to list its tensors
    (tmp_path / "one" / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="model.safetensors: not a readable safetensors"):
        load_checkpoint(tmp_path / "one")
    (tmp_path / "ck" / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        load_checkpoint(tmp_path / "ck")


def test_index_that_is_not_utf8_is_named(tmp_path):
    write_checkpoint(tmp_path / "ck", CONFIG, make_tensors(CONFIG), shards=2)
    (tmp_path / "ck" / "model.safetensors.index.json").write_bytes(b'{"weight_map": {"\xff": 1}}')
    with pytest.raises(CheckpointError, match="model.safetensors.index.json: not a JSON object"):
        load_checkpoint(tmp_path / "ck")


@pytest.mark.parametrize("src, dtype, value", [(jnp.bfloat16, jnp.float16, 1e5), (jnp.float32, jnp.float16, 7e4),
                                               (jnp.float32, jnp.bfloat16, 3.4e38)])
def test_a_weight_past_the_saved_dtypes_range_is_named_not_saved_as_inf(tmp_path, src, dtype, value):
    """A bf16 (or fp32) weight past float16's largest finite value (65504) would be written as inf: refused, naming
    the tensor, before anything is written. Values within the range still save (rounded)."""
    t = make_tensors(CONFIG)
    t["model.layers.1.mlp.down_proj.weight"][3, 5] = value
    write_checkpoint(tmp_path / "a", CONFIG, t)
    model = load_checkpoint(tmp_path / "a", dtype=src)
    with pytest.raises(ValueError, match=r"tensor 'model.layers.1.mlp.down_proj.weight' holds .*past "
                                         r"(float16|bfloat16)'s largest finite value .*would be saved as inf"):
        save_checkpoint(model, tmp_path / "b", dtype=dtype)
    assert not (tmp_path / "b").exists()
    save_checkpoint(model, tmp_path / "c", dtype=jnp.float32 if src == jnp.float32 else None)  # its own range: saved
    assert load_checkpoint(tmp_path / "c", dtype=src).params()["layers"][1] is not None


def test_phi3_fused_weight_past_float16_is_named_as_its_fused_tensor(tmp_path):
    model = load_checkpoint(pathlib.Path(__file__).parent / "fixtures" / "hf_phi3")
    layer = dict(model.params()["layers"][0])
    layer["w_gate_up"] = layer["w_gate_up"].at[0, 0, 0].set(1e6)  # [d, 2, I]: gate's, in gate_up_proj's rows
    params = dict(model.params(), layers=[layer] + model.params()["layers"][1:])
    with pytest.raises(ValueError, match=r"tensor 'model.layers.0.mlp.gate_up_proj.weight' holds 1000000.0"):
        save_checkpoint(llama.Llama(model.config, params), tmp_path / "b", dtype=jnp.float16)


Q0 = "model.layers.0.self_attn.q_proj.weight"


@pytest.mark.parametrize("stored, value, dtype", [(np.float64, 1e39, jnp.float32), (np.float32, 3.4e38, jnp.bfloat16)])
def test_a_weight_past_the_models_dtype_is_named_not_loaded_as_inf(tmp_path, stored, value, dtype):
    """A finite weight past the range of the dtype it is loaded in (float64 past float32; float32 past bfloat16) is
    refused by name, as save_checkpoint refuses it: it loaded as inf with no word (float64: a numpy warning naming
    nothing). The same float32 weight loads in float32; weights stored non-finite load as stored (as transformers)."""
    t = make_tensors(CONFIG)
    t[Q0] = t[Q0].astype(stored)
    t[Q0][0, 0] = value
    write_checkpoint(tmp_path, CONFIG, {n: x for n, x in t.items() if n != Q0}, dtype=np.float32)
    save_file({**{n: x.astype(np.float32) for n, x in t.items() if n != Q0}, Q0: t[Q0]},
              str(tmp_path / "model.safetensors"))
    held = re.escape(str(float(np.asarray(value, stored))))
    with pytest.raises(CheckpointError, match=rf"tensor '{re.escape(Q0)}' holds {held}, past "
                                              rf"{jnp.dtype(dtype).name}'s largest finite value .*would load as inf"):
        load_checkpoint(tmp_path, dtype=dtype)
    if stored == np.float32:
        assert float(np.asarray(load_checkpoint(tmp_path).layer_params()[0]["w_qkv"]).max()) == pytest.approx(value)
    t[Q0][0, 0] = np.nan
    save_file({**{n: x.astype(np.float32) for n, x in t.items() if n != Q0}, Q0: t[Q0]},
              str(tmp_path / "model.safetensors"))
    assert np.isnan(np.asarray(load_checkpoint(tmp_path, dtype=dtype).layer_params()[0]["w_qkv"], np.float32)).any()


def test_a_tensor_in_two_listed_shards_is_refused(tmp_path):
    """An index whose shards both hold a tensor: transformers 5 reads every listed shard whole (the later copy wins),
    this loader read the shard the map names, silently; now refused, naming both shards and the map's choice."""
    write_checkpoint(tmp_path, CONFIG, make_tensors(CONFIG), shards=3)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    other = sorted({f for n, f in index["weight_map"].items() if f != index["weight_map"][Q0]})[0]
    held = dict(load_file(str(tmp_path / other)), **{Q0: np.zeros_like(make_tensors(CONFIG)[Q0])})
    save_file(held, str(tmp_path / other))
    with pytest.raises(CheckpointError, match=rf"tensor '{re.escape(Q0)}' is in both model-0000\d-of-00003\."
                                              rf"safetensors and model-0000\d-of-00003\.safetensors \(model\."
                                              rf"safetensors\.index\.json maps it to {index['weight_map'][Q0]}\)"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("change, match", [
    ({"model_type": ["llama"]}, r"model_type must be a string .*got \['llama'\]"),
    ({"rope_scaling": {"type": ["linear"], "factor": 2.0}}, r"rope_scaling type must be a string .*got \['linear'\]"),
    ({"num_hidden_layers": 10**18}, r"num_hidden_layers=1000000000000000000 is more than 65536"),
])
def test_config_values_of_the_wrong_kind_are_named(tmp_path, change, match):
    """A list where a string goes (a TypeError 'unhashable type' before) and a layer count no file could hold (it
    built per-layer tables until memory ran out) are refused by key, naming the file."""
    write_checkpoint(tmp_path, dict(CONFIG, **change), make_tensors(CONFIG))
    with pytest.raises(CheckpointError, match=rf"config\.json: config: {match}"):
        load_checkpoint(tmp_path)


def test_json_files_that_are_directories_or_nested_too_deep_are_named(tmp_path):
    """config.json, generation_config.json or the index as a directory (IsADirectoryError before), and JSON nested
    deeper than Python's parser goes (RecursionError before): CheckpointError naming the file."""
    for name, match in [("config.json", "is a directory; expected a JSON file"),
                        ("generation_config.json", "is a directory; expected a JSON file"),
                        ("model.safetensors.index.json", "is a directory; expected the JSON index")]:
        d = tmp_path / name.split(".")[0]
        write_checkpoint(d, CONFIG, make_tensors(CONFIG), shards=2)
        (d / name).unlink(missing_ok=True)
        (d / name).mkdir()
        with pytest.raises(CheckpointError, match=re.escape(str(d / name)) + " " + match):
            load_checkpoint(d)
    d = tmp_path / "deep"
    write_checkpoint(d, CONFIG, make_tensors(CONFIG))
    (d / "config.json").write_text(json.dumps(CONFIG)[:-1] + ', "x": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON \(nested too deep"):
        load_checkpoint(d)


def test_a_tied_heads_explicit_copy_with_nan_is_a_copy(tmp_path):
    """An lm_head.weight that copies a tied embedding holding NaN is the same tensor (it was refused as 'differs')."""
    cfg = dict(CONFIG, tie_word_embeddings=True)
    t = make_tensors(cfg)
    t["model.embed_tokens.weight"][3, 1] = np.nan
    t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()
    write_checkpoint(tmp_path, cfg, t)
    assert np.isnan(np.asarray(load_checkpoint(tmp_path).embed.value)[3, 1])
