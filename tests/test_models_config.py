"""models.config: HF config.json parsing (Llama, Mistral, Qwen2, Qwen3, SmolLM3, Granite, OLMo 2, Phi-3, Gemma;
transformers 4 and 5 layouts), refusal of what changes the math and is not implemented, RoPE frequencies (incl.
Llama-3)."""

import dataclasses
import json
import math
import pathlib
import warnings

import numpy as np
import pytest

from models.checkpoint import CheckpointError as ReExported
from models.config import HARMLESS_KEYS, CheckpointError, LlamaConfig, RopeScaling, is_int, is_integer
from models.llama import rope_inv_freq

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 11008, "max_position_embeddings": 4096, "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "tie_word_embeddings": False, "vocab_size": 32000, "bos_token_id": 1, "eos_token_id": 2,
    "torch_dtype": "float16", "pretraining_tp": 1,
}
CODELLAMA_13B = dict(LLAMA2_7B, hidden_size=5120, intermediate_size=13824, num_attention_heads=40,
                     num_hidden_layers=40, num_key_value_heads=40, max_position_embeddings=16384,
                     rope_theta=1000000, vocab_size=32016)
LLAMA31_8B = dict(LLAMA2_7B, intermediate_size=14336, num_key_value_heads=8, vocab_size=128256,
                  max_position_embeddings=131072, rope_theta=500000.0, bos_token_id=128000,
                  eos_token_id=[128001, 128008, 128009],
                  rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192, "rope_type": "llama3"})
LLAMA32_1B = dict(LLAMA31_8B, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                  num_hidden_layers=16, head_dim=64, tie_word_embeddings=True,
                  rope_scaling=dict(LLAMA31_8B["rope_scaling"], factor=32.0))


def test_llama2():
    c = LlamaConfig.from_dict(LLAMA2_7B)
    assert (c.hidden_size, c.num_hidden_layers, c.head_dim, c.q_per_kv) == (4096, 32, 128, 1)
    assert c.rope_scaling is None and c.rope_theta == 10000.0 and c.eos_token_ids == (2,)
    assert not c.tie_word_embeddings


def test_eos_ids_outside_the_vocabulary_warn_and_load():
    """config.json's eos_token_id -1 or past vocab_size: loaded as transformers loads it (decoding never stops on
    it), with a warning naming the ids; ids inside the vocabulary: no warning."""
    with pytest.warns(UserWarning, match=r"eos_token_ids \[-1, 32000\] outside the vocabulary \[0, 32000\)"):
        c = LlamaConfig.from_dict(dict(LLAMA2_7B, eos_token_id=[2, -1, 32000]))
    assert c.eos_token_ids == (2, -1, 32000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert LlamaConfig.from_dict(dict(LLAMA2_7B, eos_token_id=31999)).eos_token_ids == (31999,)


def test_codellama_theta():
    c = LlamaConfig.from_dict(CODELLAMA_13B)
    assert c.rope_theta == 1e6 and c.vocab_size == 32016 and c.head_dim == 128


def test_llama31_gqa_and_scaling():
    c = LlamaConfig.from_dict(LLAMA31_8B)
    assert c.num_key_value_heads == 8 and c.q_per_kv == 4
    assert c.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert c.eos_token_ids == (128001, 128008, 128009)


def test_llama32_tied_head_dim():
    c = LlamaConfig.from_dict(LLAMA32_1B)
    assert c.tie_word_embeddings and c.head_dim == 64 and c.rope_scaling.factor == 32.0


def test_round_trip_and_file(tmp_path):
    for d in (LLAMA2_7B, LLAMA31_8B, LLAMA32_1B):
        c = LlamaConfig.from_dict(d)
        assert LlamaConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    (tmp_path / "config.json").write_text(json.dumps(LLAMA31_8B))
    assert LlamaConfig.from_json(tmp_path) == LlamaConfig.from_dict(LLAMA31_8B)
    hash(LlamaConfig.from_dict(LLAMA31_8B))  # usable as a jit static argument


@pytest.mark.parametrize("change, match", [
    ({"architectures": ["MistralForCausalLM"]}, "MistralForCausalLM"),
    ({"model_type": "falcon"}, "unsupported model_type 'falcon'"),
    ({"model_type": "gemma"}, "unsupported architecture 'LlamaForCausalLM' for model_type 'gemma'"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "longrope"),
    ({"rope_scaling": {"rope_type": "yarn"}}, "of type 'yarn' needs 'factor'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": "4"}}, "rope_scaling factor must be a finite number; got '4'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "beta_fast": -2}}, "beta_fast must be positive, got -2"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "attention_factor": 0.0}},
     "attention_factor must be positive, got 0.0"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "mscale": "1"}}, "mscale must be a finite number"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "truncate": "false"}},
     "truncate must be true or false; got 'false'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"num_key_value_heads": 5}, "num_key_value_heads"),
    ({"num_key_value_heads": 0}, "num_key_value_heads must be a positive integer, got 0"),  # not read as MHA
    ({"hidden_size": 0}, "hidden_size"),
    # values of the wrong type: named, never converted (bool("false") is True)
    ({"rope_theta": "abc"}, "rope_theta must be a finite number; got 'abc'"),
    ({"rope_scaling": {"rope_type": "linear", "factor": "2"}}, "rope_scaling factor must be a finite number; got '2'"),
    ({"rms_norm_eps": None}, "rms_norm_eps must be a finite number; got None"),
    # sizes: positive integers before any arithmetic on them (a bool is not one; 0 heads is no ZeroDivisionError)
    ({"num_hidden_layers": True}, "num_hidden_layers must be a positive integer, got True"),
    ({"vocab_size": 32000.0}, "vocab_size must be a positive integer, got 32000.0"),
    ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
    ({"head_dim": 128.0}, "head_dim must be a positive integer, got 128.0"),
    ({"max_position_embeddings": None}, "max_position_embeddings must be a positive integer, got None"),
    # numbers that are not finite (Python's json reads NaN and Infinity), or out of range
    ({"rope_theta": float("nan")}, "rope_theta must be a finite number; got nan"),
    ({"rms_norm_eps": -1e-5}, r"rms_norm_eps must be a finite number >= 0, got -1e-05"),
    ({"rope_scaling": {"rope_type": "linear", "factor": float("inf")}}, "factor must be a finite number; got inf"),
    # transformers 4 reads `type`, 5 `rope_type`: the two must not disagree
    ({"rope_scaling": {"type": "dynamic", "rope_type": "linear", "factor": 2.0}},
     "rope_type 'linear' and type 'dynamic'; they must agree"),
    ({"architectures": "LlamaForCausalLM"}, "architectures must be a list of class names, got 'LlamaForCausalLM'"),
    ({"rope_scaling": dict(LLAMA31_8B["rope_scaling"], original_max_position_embeddings=None)},
     "original_max_position_embeddings must be a finite number; got None"),
    ({"rope_scaling": dict(LLAMA31_8B["rope_scaling"], original_max_position_embeddings=0)},
     "original_max_position_embeddings must be positive"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false; got 'false'"),
    ({"eos_token_id": ["a"]}, r"eos_token_id must be an integer token id .*got \['a'\]"),
    ({"pad_token_id": 0.0}, "pad_token_id must be an integer token id"),
])
def test_refuses_unsupported(change, match):
    with pytest.raises(ValueError, match=match):
        LlamaConfig.from_dict(dict(LLAMA2_7B, **change))


def test_qwen_window_layers_must_be_an_integer_where_the_window_applies():
    on = dict(QWEN25_7B, use_sliding_window=True, sliding_window=131072, max_window_layers=None)
    with pytest.raises(CheckpointError, match="max_window_layers must be an integer .*got None"):
        LlamaConfig.from_dict(on)
    LlamaConfig.from_dict(dict(on, use_sliding_window=False))  # no window: the key is not read


def test_llama3_original_context_kept_as_written():
    """transformers divides by original_max_position_embeddings as it is: a float is not truncated."""
    d = dict(LLAMA31_8B, rope_scaling=dict(LLAMA31_8B["rope_scaling"], original_max_position_embeddings=8192.5))
    assert LlamaConfig.from_dict(d).rope_scaling.original_max_position_embeddings == 8192.5


def test_missing_key():
    d = dict(LLAMA2_7B)
    del d["vocab_size"]
    with pytest.raises(ValueError, match="vocab_size"):
        LlamaConfig.from_dict(d)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        LlamaConfig.from_json(tmp_path)


def _numpy_llama3_freqs(dim, theta, factor, low, high, old_ctx):
    """Llama 3.1's frequency rule written per frequency: keep short wavelengths, stretch long ones by `factor`,
    and blend linearly in (old_ctx / wavelength) between the two cut-offs."""
    out = []
    for i in range(0, dim, 2):
        f = theta ** (-i / dim)
        wavelength = 2 * math.pi / f
        if wavelength < old_ctx / high:
            out.append(f)
        elif wavelength > old_ctx / low:
            out.append(f / factor)
        else:
            s = (old_ctx / wavelength - low) / (high - low)
            out.append((1 - s) * f / factor + s * f)
    return np.array(out)


def test_rope_llama3_scaling_matches_numpy():
    c = LlamaConfig.from_dict(LLAMA31_8B)
    got = rope_inv_freq(c)
    want = _numpy_llama3_freqs(128, 500000.0, 8.0, 1.0, 4.0, 8192)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    base = 500000.0 ** (-np.arange(0, 128, 2) / 128)
    assert np.isclose(got[0], base[0]) and np.isclose(got[-1], base[-1] / 8)  # both ends of the band
    mid = (got != base) & (~np.isclose(got, base / 8))
    assert mid.any()  # the smooth band is exercised


def test_rope_default_and_linear():
    c = LlamaConfig.from_dict(LLAMA2_7B)
    np.testing.assert_allclose(rope_inv_freq(c), 10000.0 ** (-np.arange(0, 128, 2) / 128), rtol=1e-12)
    c = LlamaConfig.from_dict(dict(LLAMA2_7B, rope_scaling={"type": "linear", "factor": 4.0}))
    np.testing.assert_allclose(rope_inv_freq(c), 10000.0 ** (-np.arange(0, 128, 2) / 128) / 4, rtol=1e-12)


HF_ROPE = json.loads((pathlib.Path(__file__).parent / "fixtures" / "hf_rope.json").read_text())


@pytest.mark.parametrize("name", sorted(HF_ROPE["cases"]))
def test_rope_matches_transformers(name):
    """Inverse frequencies and the cos / sin factor against transformers' own (its ROPE_INIT_FUNCTIONS, float32, on
    real-sized RoPE configs: Llama 3.1, CodeLlama, Qwen2.5 / Qwen3 with YaRN, and YaRN's knobs: a null factor,
    the mscale pair, betas, truncate false, an attention factor given; scripts/fixtures/make_hf_fixtures.py)."""
    case = HF_ROPE["cases"][name]
    c = LlamaConfig.from_dict(dict(LLAMA2_7B, hidden_size=case["config"]["head_dim"] * 32, **case["config"]))
    assert (c.rope_scaling.rope_type if c.rope_scaling else "default") == case["rope_type"]
    np.testing.assert_allclose(rope_inv_freq(c), case["inv_freq"], rtol=2e-6)
    assert math.isclose(c.rope_scaling.cos_sin_factor, case["cos_sin_factor"], rel_tol=1e-12)
    assert LlamaConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c  # round trip of every field


def test_yarn_config_fields():
    """Qwen2.5's model-card YaRN setting: betas 32 / 1, truncated band, attention factor 0.1 ln 4 + 1; the two
    layouts agree; a null factor is max_position_embeddings / original (DeepSeek-V3's configs); missing or null
    betas take their defaults, as transformers' `or`."""
    qwen = dict(QWEN25_7B, rope_scaling={"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"})
    c = LlamaConfig.from_dict(qwen)
    assert c.rope_scaling == RopeScaling("yarn", 4.0, original_max_position_embeddings=32768)
    assert math.isclose(c.rope_scaling.cos_sin_factor, 0.1 * math.log(4) + 1)
    assert LlamaConfig.from_dict(to_v5(qwen)) == c
    null = dict(qwen, max_position_embeddings=131072, rope_scaling=dict(qwen["rope_scaling"], factor=None,
                                                                        beta_fast=None, beta_slow=0))
    assert LlamaConfig.from_dict(null).rope_scaling == RopeScaling("yarn", 4.0, original_max_position_embeddings=32768)
    assert not LlamaConfig.from_dict(to_v5(dict(qwen, rope_scaling=dict(qwen["rope_scaling"], truncate=False)))
                                     ).rope_scaling.truncate


def test_yarn_stretches_the_maximum_length():
    """YaRN's context, original_max_position_embeddings × factor, bounds the sequences where it exceeds
    max_position_embeddings (Qwen2.5's card: 32768 × 4; it refused past 32768, the length YaRN is added for); a
    config whose max_position_embeddings is already the stretched one (DeepSeek-V3's) keeps it; without YaRN,
    max_position_embeddings. generate() runs past max_position_embeddings within the YaRN context, and past that
    names it."""
    import jax.numpy as jnp
    import models
    qwen = dict(QWEN25_7B, rope_scaling={"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"})
    c = LlamaConfig.from_dict(qwen)
    assert (c.max_position_embeddings, c.yarn_context, c.max_length) == (32768, 131072, 131072)
    stretched = dict(qwen, max_position_embeddings=163840, rope_scaling=dict(qwen["rope_scaling"], factor=None))
    assert LlamaConfig.from_dict(stretched).max_length == 163840
    assert LlamaConfig.from_dict(QWEN25_7B).yarn_context is None and LlamaConfig.from_dict(QWEN25_7B).max_length == 32768
    small = LlamaConfig(**SMALL, model_type="qwen2", max_position_embeddings=16,
                        rope_scaling=RopeScaling("yarn", 4.0, original_max_position_embeddings=16))
    model = models.init_random(small, jnp.float32)
    g = models.generate(model, [list(range(1, 30))], max_new_tokens=3, backend="xla", eos_ids=())
    assert g.lengths.tolist() == [3]
    with pytest.raises(ValueError, match=r"prompt of 62 tokens \+ max_new_tokens 3 exceeds the model's YaRN context of "
                                         r"64 tokens \(original_max_position_embeddings 16 x factor 4.0\)"):
        models.prefill(model, [[1] * 62], 3, backend="xla")


# ------------------------------------------------------------------------------ families

MISTRAL_7B_V01 = {  # sliding window 4096 < 32768 positions: in effect
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_act": "silu", "hidden_size": 4096,
    "intermediate_size": 14336, "max_position_embeddings": 32768, "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
    "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 32000, "bos_token_id": 1, "eos_token_id": 2, "transformers_version": "4.34.0.dev0",
}
MISTRAL_7B_V03 = dict(MISTRAL_7B_V01, rope_theta=1e6, sliding_window=None, vocab_size=32768)
MISTRAL_NEMO = dict(MISTRAL_7B_V03, hidden_size=5120, head_dim=128, num_hidden_layers=40, vocab_size=131072,
                    max_position_embeddings=1024000)
QWEN25_7B = {  # transformers-4 layout; the window (131072 >= 32768 anyway) is off: use_sliding_window false
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
    "intermediate_size": 18944, "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "qwen2",
    "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False, "vocab_size": 152064,
}
QWEN25_05B = dict(QWEN25_7B, hidden_size=896, intermediate_size=4864, num_attention_heads=14,
                  num_hidden_layers=24, num_key_value_heads=2, max_window_layers=21, sliding_window=32768,
                  tie_word_embeddings=True, vocab_size=151936)
QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 12288, "max_position_embeddings": 40960,
    "max_window_layers": 36, "model_type": "qwen3", "num_attention_heads": 32, "num_hidden_layers": 36,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}
QWEN3_06B = dict(QWEN3_8B, hidden_size=1024, intermediate_size=3072, num_attention_heads=16, num_hidden_layers=28,
                 max_window_layers=28, tie_word_embeddings=True)  # head_dim 128 != 1024 / 16
ALL = {"llama2": LLAMA2_7B, "codellama": CODELLAMA_13B, "llama31": LLAMA31_8B, "llama32": LLAMA32_1B,
       "mistral_v03": MISTRAL_7B_V03, "mistral_nemo": MISTRAL_NEMO, "qwen25_7b": QWEN25_7B,
       "qwen25_05b": QWEN25_05B, "qwen3_8b": QWEN3_8B, "qwen3_06b": QWEN3_06B}
SMOLLM3_3B = {  # HuggingFaceTB/SmolLM3-3B (transformers-4 layout): NoPE every 4th layer
    "architectures": ["SmolLM3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": None,
    "eos_token_id": 128012, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 11008, "max_position_embeddings": 65536, "max_window_layers": 28, "mlp_bias": False,
    "model_type": "smollm3", "no_rope_layer_interval": 4, "no_rope_layers": [1, 1, 1, 0] * 9,
    "num_attention_heads": 16, "num_hidden_layers": 36, "num_key_value_heads": 4, "pad_token_id": 128004,
    "pretraining_tp": 2, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 5000000.0, "sliding_window": None,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.54.0", "use_cache": False,
    "use_sliding_window": False, "vocab_size": 128256}
ALL["smollm3_3b"] = SMOLLM3_3B
GRANITE_31_8B = {  # ibm-granite/granite-3.1-8b-instruct (transformers-4 layout)
    "architectures": ["GraniteForCausalLM"], "attention_bias": False, "attention_dropout": 0.1,
    "attention_multiplier": 0.0078125, "bos_token_id": 0, "embedding_multiplier": 12.0, "eos_token_id": 0,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 12800,
    "logits_scaling": 16.0, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "granite",
    "num_attention_heads": 32, "num_hidden_layers": 40, "num_key_value_heads": 8, "pad_token_id": 0,
    "residual_multiplier": 0.22, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000000.0,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.47.0", "use_cache": True,
    "vocab_size": 49155}
ALL["granite_31_8b"] = GRANITE_31_8B
OLMO2_7B = {  # allenai/OLMo-2-1124-7B
    "architectures": ["Olmo2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "eos_token_id": 100257,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008,
    "max_position_embeddings": 4096, "model_type": "olmo2", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 32, "pad_token_id": 100277, "rms_norm_eps": 1e-06, "rope_scaling": None,
    "rope_theta": 500000, "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.47.0.dev0",
    "use_cache": True, "vocab_size": 100352}
ALL["olmo2_7b"] = OLMO2_7B
PHI4 = {  # microsoft/phi-4: Phi-3's architecture, GQA 40 / 10, no window, default RoPE
    "architectures": ["Phi3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 100257,
    "embd_pdrop": 0.0, "eos_token_id": 100265, "hidden_act": "silu", "hidden_size": 5120, "initializer_range": 0.02,
    "intermediate_size": 17920, "max_position_embeddings": 16384, "model_type": "phi3", "num_attention_heads": 40,
    "num_hidden_layers": 40, "num_key_value_heads": 10, "original_max_position_embeddings": 16384,
    "pad_token_id": 100349, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 250000,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.47.0",
    "use_cache": True, "vocab_size": 100352}
ALL["phi4"] = PHI4
# microsoft/Phi-4-mini-instruct's keys and sizes: RoPE on 96 of head_dim 128 (partial_rotary_factor 0.75), longrope
# (its 48 factors a list here stand-ins: 1 + i / 48 and 1 + i), tied embeddings, and four keys transformers' Phi-3
# does not read at the values that change nothing
PHI4_MINI = {
    "architectures": ["Phi3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 199999,
    "embd_pdrop": 0.0, "eos_token_id": 199999, "full_attn_mod": 1, "hidden_act": "silu", "hidden_size": 3072,
    "initializer_range": 0.02, "intermediate_size": 8192, "interpolate_factor": 1, "lm_head_bias": False,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "phi3", "num_attention_heads": 24,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "original_max_position_embeddings": 4096,
    "pad_token_id": 199999, "partial_rotary_factor": 0.75, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05,
    "rope_scaling": {"long_factor": [1.0 + i for i in range(48)], "short_factor": [1.0 + i / 48 for i in range(48)],
                     "type": "longrope"},
    "rope_theta": 10000.0, "sliding_window": 262144, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0", "use_cache": True, "vocab_size": 200064}
ALL["phi4_mini"] = PHI4_MINI
GEMMA_7B = {  # google/gemma-7b's keys (CodeGemma 7B's alike): exact GELU written as "gelu", head_dim 256 != 3072 / 16
    "architectures": ["GemmaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 2,
    "eos_token_id": 1, "head_dim": 256, "hidden_act": "gelu", "hidden_size": 3072, "initializer_range": 0.02,
    "intermediate_size": 24576, "max_position_embeddings": 8192, "model_type": "gemma", "num_attention_heads": 16,
    "num_hidden_layers": 28, "num_key_value_heads": 16, "pad_token_id": 0, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 10000.0, "torch_dtype": "bfloat16", "transformers_version": "4.38.0.dev0",
    "use_cache": True, "vocab_size": 256000}
# Gemma 2B's sizes (MQA: one KV head) with Gemma 1.1's hidden_activation beside hidden_act
GEMMA_2B = dict(GEMMA_7B, hidden_size=2048, intermediate_size=16384, num_attention_heads=8, num_hidden_layers=18,
                num_key_value_heads=1, hidden_activation="gelu_pytorch_tanh")
ALL.update(gemma_7b=GEMMA_7B, gemma_2b=GEMMA_2B)


def to_v5(d, per_layer_type=False):
    """``d`` as transformers 5 writes it: ``rope_parameters`` (with rope_theta inside) instead of top-level
    rope_theta / rope_scaling; Qwen configs also get their ``layer_types``."""
    d = dict(d)
    rope = dict(d.pop("rope_scaling", None) or {"rope_type": "default"})
    rope["rope_type"] = rope.pop("type", rope.get("rope_type"))
    rope["rope_theta"] = float(d.pop("rope_theta", 10000.0))
    if "partial_rotary_factor" in d:  # (Phi-3's: transformers 5 writes it into the RoPE dict)
        rope["partial_rotary_factor"] = d.pop("partial_rotary_factor")
    if d["model_type"] in ("qwen2", "qwen3"):
        window = d["sliding_window"] if d["use_sliding_window"] else None
        d["sliding_window"] = window
        d["layer_types"] = ["sliding_attention" if window is not None and i >= d["max_window_layers"]
                            else "full_attention" for i in range(d["num_hidden_layers"])]
    d["rope_parameters"] = {"full_attention": rope, "sliding_attention": dict(rope)} if per_layer_type else rope
    return d


def test_families():
    m = LlamaConfig.from_dict(MISTRAL_7B_V03)
    assert m.model_type == "mistral" and m.rope_theta == 1e6 and not (m.qkv_bias or m.qk_norm)
    assert LlamaConfig.from_dict(MISTRAL_NEMO).head_dim == 128  # explicit, != 5120 / 32
    q2 = LlamaConfig.from_dict(QWEN25_7B)
    assert q2.qkv_bias and not q2.qk_norm and q2.q_per_kv == 7 and q2.eos_token_ids == (151645,)
    assert LlamaConfig.from_dict(QWEN25_05B).tie_word_embeddings
    q3 = LlamaConfig.from_dict(QWEN3_06B)
    assert q3.qk_norm and not q3.qkv_bias and q3.head_dim == 128 and q3.hidden_size == 1024
    assert LlamaConfig.from_dict(LLAMA2_7B).model_type == "llama"


@pytest.mark.parametrize("name", sorted(ALL))
def test_transformers5_layout_gives_the_same_config(name):
    v4 = ALL[name]
    v5 = to_v5(v4)
    assert "rope_theta" not in v5 and "rope_scaling" not in v5
    assert LlamaConfig.from_dict(v5) == LlamaConfig.from_dict(v4)


@pytest.mark.parametrize("name", ["llama31", "qwen25_7b", "smollm3_3b"])
def test_rope_parameters_per_layer_type_are_refused(name):
    """One RoPE dict per layer type: transformers (5.0 to 5.17) never writes it for these families, fails to load it
    where the config has layer_types, and reads it as one flat dict (its inner dicts ignored: default RoPE) where it
    has none; never read as anything else here."""
    with pytest.raises(CheckpointError, match="rope_parameters keyed by layer type .*'full_attention'"):
        LlamaConfig.from_dict(to_v5(ALL[name], per_layer_type=True))


def test_rope_parameters_beside_rope_scaling_are_not_read():
    """transformers reads `rope_scaling or rope_parameters`: beside a non-empty rope_scaling, a rope_parameters it
    would refuse on its own (keyed by layer type, an unknown RoPE type) is not read either, with a warning naming it
    (both were refused here); a non-dict one is refused, as transformers' config class refuses it."""
    want = LlamaConfig.from_dict(RLLAMA)
    for params in ({"full_attention": {"rope_type": "yarn", "factor": 4.0}}, {"rope_type": "nonsense"}):
        with pytest.warns(UserWarning, match=r"rope_scaling read, rope_parameters left out"):
            assert LlamaConfig.from_dict(dict(RLLAMA, rope_parameters=params)) == want
    with pytest.raises(CheckpointError, match="rope_parameters must be a dict or null, got 'abc'"):
        LlamaConfig.from_dict(dict(RLLAMA, rope_parameters="abc"))


def test_smollm3():
    """SmolLM3's NoPE layers: no_rope_layers as written (its first num_hidden_layers entries), else every
    no_rope_layer_interval-th layer (default 4) without RoPE; transformers' class defaults where keys are left out
    (theta 2e6, tied embeddings, 4 KV heads); a window in effect lies on the NoPE layers, and is refused."""
    c = LlamaConfig.from_dict(SMOLLM3_3B)
    assert c.rope_layers == (True, True, True, False) * 9 and [i for i in range(36) if not c.uses_rope(i)][:2] == [3, 7]
    assert c.tie_word_embeddings and c.head_dim == 128 and c.rope_theta == 5e6 and c.bos_token_id is None
    by_interval = {k: v for k, v in SMOLLM3_3B.items() if k != "no_rope_layers"}
    assert LlamaConfig.from_dict(by_interval) == c
    assert LlamaConfig.from_dict(dict(by_interval, no_rope_layer_interval=3)).rope_layers == (True, True, False) * 12
    assert LlamaConfig.from_dict(dict(SMOLLM3_3B, no_rope_layers=[0] * 40)).rope_layers == (False,) * 36
    assert LlamaConfig.from_dict(dict(SMOLLM3_3B, no_rope_layers=[1, 0] * 18)).rope_layers == (True, False) * 18
    bare = {k: v for k, v in SMOLLM3_3B.items()
            if k not in ("rope_theta", "tie_word_embeddings", "num_key_value_heads", "no_rope_layers")}
    d = LlamaConfig.from_dict(bare)
    assert d.rope_theta == 2e6 and d.tie_word_embeddings and d.num_key_value_heads == 4
    assert d.rope_layers == c.rope_layers
    with pytest.raises(CheckpointError, match=r"sliding_window=4096 \(layers \[3, 7, 11"):
        LlamaConfig.from_dict(dict(SMOLLM3_3B, use_sliding_window=True, sliding_window=4096))
    assert LlamaConfig.from_dict(dict(SMOLLM3_3B, use_sliding_window=False, sliding_window=4096)) == c
    # layers typed sliding_attention get SmolLM3's window whatever use_sliding_window says (its attention masks them)
    typed = dict(SMOLLM3_3B, layer_types=["full_attention", "sliding_attention"] * 18, sliding_window=4096)
    with pytest.raises(CheckpointError, match=r"sliding_window=4096 \(layers \[1, 3, 5"):
        LlamaConfig.from_dict(typed)
    assert LlamaConfig.from_dict(dict(typed, sliding_window=65536)) == c  # as long as the sequences: no effect
    with pytest.raises(CheckpointError, match="no sliding window applies"):
        LlamaConfig.from_dict(dict(typed, sliding_window=None))
    for bad, match in [({"no_rope_layers": [1, 1, 2, 0] * 9}, "no_rope_layers must list 1 .* or 0"),
                       ({"no_rope_layers": [1, 0] * 9}, "for each of the 36 layers"),
                       ({"no_rope_layers": None, "no_rope_layer_interval": 0}, "no_rope_layer_interval must be"),
                       ({"no_rope_layers": "1110"}, "no_rope_layers must list"),
                       ({"no_rope_layers": [True, False] * 18}, "no_rope_layers must list")]:
        with pytest.raises(CheckpointError, match=match):
            LlamaConfig.from_dict(dict(SMOLLM3_3B, **bad))
    with pytest.raises(ValueError, match="rope_layers is for model_type 'smollm3'"):
        LlamaConfig(**SMALL, rope_layers=(True,))
    with pytest.raises(ValueError, match=r"rope_layers must be a tuple of 1 bools"):
        LlamaConfig(**SMALL, model_type="smollm3", rope_layers=(1,))
    assert LlamaConfig(**SMALL, model_type="smollm3", rope_layers=[False]).rope_layers == (False,)


def test_granite():
    """Granite's four scalars as written; transformers' defaults (1.0 each; the logit scale 1.0 too, not
    1/sqrt(head_dim)) where left out; only positive finite numbers; other families have none."""
    c = LlamaConfig.from_dict(GRANITE_31_8B)
    assert (c.embedding_multiplier, c.attention_multiplier, c.residual_multiplier, c.logits_scaling) == (
        12.0, 0.0078125, 0.22, 16.0)
    assert math.isclose(c.query_scale, 0.0078125 * math.sqrt(128))
    bare = LlamaConfig.from_dict({k: v for k, v in GRANITE_31_8B.items() if not k.endswith(("multiplier", "scaling"))})
    assert (bare.embedding_multiplier, bare.attention_multiplier, bare.residual_multiplier, bare.logits_scaling) == (
        1.0, 1.0, 1.0, 1.0)
    assert math.isclose(bare.query_scale, math.sqrt(128))
    assert LlamaConfig.from_dict(LLAMA2_7B).query_scale == 1.0
    for bad, match in [({"logits_scaling": 0}, "logits_scaling must be a positive finite number, got 0"),
                       ({"attention_multiplier": "0.1"}, "attention_multiplier must be a finite number; got '0.1'"),
                       ({"embedding_multiplier": -12.0}, "embedding_multiplier must be a positive finite number")]:
        with pytest.raises(CheckpointError, match=match):
            LlamaConfig.from_dict(dict(GRANITE_31_8B, **bad))
    with pytest.raises(CheckpointError, match="'logits_scaling' = 16.0 is not known"):
        LlamaConfig.from_dict(dict(LLAMA2_7B, logits_scaling=16.0))
    with pytest.raises(ValueError, match="residual_multiplier is Granite's"):
        LlamaConfig(**SMALL, residual_multiplier=0.5)
    assert LlamaConfig(**SMALL, model_type="granite").query_scale == 1.0  # by hand: None, Llama's scale
    odd = LlamaConfig.from_dict(dict(GRANITE_31_8B, head_dim=48, attention_multiplier=0.922243188169904))
    assert LlamaConfig.from_dict(json.loads(json.dumps(odd.to_dict()))) == odd  # written as read, to the last bit


def test_olmo2():
    """OLMo 2: its config class's defaults where keys are left out (rms_norm_eps 1e-5, not 1e-6; no bos; eos 50279),
    and its layer's parameters: norms of the outputs and of q / k over all heads, no input norms."""
    c = LlamaConfig.from_dict(OLMO2_7B)
    assert c.family.post_norms and c.rms_norm_eps == 1e-6 and c.bos_token_id is None and c.eos_token_ids == (100257,)
    bare = LlamaConfig.from_dict({k: v for k, v in OLMO2_7B.items() if k not in ("rms_norm_eps", "eos_token_id")})
    assert bare.rms_norm_eps == 1e-5 and bare.eos_token_ids == (50279,)
    assert LlamaConfig.from_dict({k: v for k, v in LLAMA2_7B.items() if k != "rms_norm_eps"}).rms_norm_eps == 1e-6
    from models.llama import layer_keys, param_shapes
    assert set(layer_keys(c)) == {"w_qkv", "wo", "w_gate_up", "w_down", "attn_out_norm", "mlp_out_norm",
                                  "q_proj_norm", "k_proj_norm"}
    assert param_shapes(c)["layers"][0]["k_proj_norm"] == (32 * 128,)


def test_phi3():
    """Phi-4 reads (its fused checkpoint tensors: tests/test_models_families.py); so does Phi-3-mini-4k's window
    (2047 of 4096 positions: sequences up to 2047 tokens); RoPE scalings other than longrope are refused, naming it
    (transformers reads a Phi-3 config's 'yarn' and 'su' as longrope: test_phi3_longrope); defaults as
    Phi3Config's. Phi-4-mini's partial rotary: test_phi4_mini_partial_rotary."""
    c = LlamaConfig.from_dict(PHI4)
    assert c.model_type == "phi3" and c.head_dim == 128 and c.q_per_kv == 4 and c.rope_theta == 250000
    from models.checkpoint import hf_tensor_shapes
    shapes = hf_tensor_shapes(c)
    assert shapes["model.layers.0.self_attn.qkv_proj.weight"] == ((40 + 2 * 10) * 128, 5120)
    assert shapes["model.layers.0.mlp.gate_up_proj.weight"] == (2 * 17920, 5120)
    assert "model.layers.0.self_attn.q_proj.weight" not in shapes
    left_out = ("rms_norm_eps", "eos_token_id", "bos_token_id", "max_position_embeddings")
    bare = LlamaConfig.from_dict({k: v for k, v in PHI4.items() if k not in left_out})
    assert (bare.rms_norm_eps, bare.eos_token_ids, bare.bos_token_id, bare.max_position_embeddings) == (
        1e-5, (32000,), 1, 4096)
    mini = LlamaConfig.from_dict(dict(PHI4, sliding_window=2047, max_position_embeddings=4096))  # Phi-3-mini-4k's
    assert (mini.sliding_window, mini.max_length) == (2047, 2047)
    for bad, match in [({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "type 'longrope' needs 'short_factor'"),
                       ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
                        "type 'linear' for model_type 'phi3'.* only default RoPE and longrope")]:
        with pytest.raises(CheckpointError, match=match):
            LlamaConfig.from_dict(dict(PHI4, **bad))


def test_phi3_longrope():
    """Phi-3.5-mini / Phi-3-mini-128k: longrope (and a Phi-3 config's 'su' / 'yarn', as transformers 5 reads them):
    the short factors divide the frequencies; cos / sin times sqrt(1 + ln(factor) / ln(context)), factor =
    max_position_embeddings / context, the context being the top-level original_max_position_embeddings (the dict's
    own is not read; Phi3Config's 4096 where left out); sequences up to that context (`max_length`: past it
    transformers switches to the long factors). Against transformers' logits: tests/test_models_families.py."""
    short, long_ = [1.0 + i / 64 for i in range(64)], [4.0 + i for i in range(64)]
    rs = {"type": "longrope", "short_factor": short, "long_factor": long_}
    phi35 = dict(PHI4, max_position_embeddings=131072, original_max_position_embeddings=4096, rope_scaling=rs)
    c = LlamaConfig.from_dict(phi35)
    assert (c.rope_scaling.rope_type, c.rope_scaling.factor, c.max_length) == ("longrope", 32.0, 4096)
    assert math.isclose(c.rope_scaling.cos_sin_factor, math.sqrt(1 + math.log(32) / math.log(4096)), rel_tol=1e-12)
    np.testing.assert_allclose(rope_inv_freq(c), 250000.0 ** (-np.arange(0, 128, 2) / 128) / np.array(short),
                               rtol=1e-12)
    assert LlamaConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c == LlamaConfig.from_dict(c.to_dict())
    # past the context, the long factors (a choice per call: generate's prefill and the dense forward make it)
    long = c.with_long_rope(True)
    assert long.rope_scaling.use_long and long.max_length == 131072 and long.with_long_rope(False) == c
    np.testing.assert_allclose(rope_inv_freq(long), 250000.0 ** (-np.arange(0, 128, 2) / 128) / np.array(long_),
                               rtol=1e-12)
    assert long.rope_scaling.cos_sin_factor == c.rope_scaling.cos_sin_factor  # one attention factor for both
    assert LlamaConfig.from_dict(long.to_dict()) == c  # not a key of the checkpoint
    plain = LlamaConfig.from_dict(PHI4)
    assert plain.with_long_rope(True) is plain  # no longrope: nothing to choose
    for same in [dict(phi35, rope_scaling=dict(rs, type="su", original_max_position_embeddings=4096)),
                 dict(phi35, rope_scaling=dict(rs, type="yarn")),
                 dict(phi35, rope_scaling=dict(rs, original_max_position_embeddings=8192)),  # not read
                 dict(phi35, rope_scaling=None, rope_parameters=dict(rs, rope_theta=250000))]:  # transformers 5
        assert LlamaConfig.from_dict(same) == c
    bare = LlamaConfig.from_dict({k: v for k, v in phi35.items() if k != "original_max_position_embeddings"})
    assert (bare.max_length, bare.rope_scaling.factor) == (4096, 32.0)  # Phi3Config's default context
    given = LlamaConfig.from_dict(dict(phi35, rope_scaling=dict(rs, factor=8.0, attention_factor=1.5)))
    assert (given.rope_scaling.factor, given.rope_scaling.cos_sin_factor, given.max_length) == (8.0, 1.5, 4096)
    for bad, match in [(dict(rs, short_factor=short[:63]),
                        r"short_factor must have rotary_dim / 2 = 64 entries \(one a frequency\), got 63"),
                       ({"type": "longrope", "short_factor": short}, "needs 'long_factor', a list of positive"),
                       (dict(rs, long_factor=long_[:-1] + [0.0]), "needs 'long_factor', a list of positive numbers"),
                       (dict(rs, short_factor=short[:-1] + ["1"]), "needs 'short_factor'"),
                       (dict(rs, attention_factor=-1.0), "attention_factor must be positive, got -1.0")]:
        with pytest.raises(CheckpointError, match=match):
            LlamaConfig.from_dict(dict(phi35, rope_scaling=bad))
    with pytest.raises(CheckpointError, match="original_max_position_embeddings must be a positive integer"):
        LlamaConfig.from_dict(dict(phi35, original_max_position_embeddings=4096.5))
    # "su" without a context of its own: read as longrope with the top-level one (transformers >= 5.22; 5.0-5.21
    # failed to load it, and the loader refused it)
    assert LlamaConfig.from_dict(dict(phi35, rope_scaling=dict(rs, type="su"))) == c
    with pytest.raises(CheckpointError, match=r"head_dim 64 with longrope: .* hidden_size / num_attention_heads = 128"):
        LlamaConfig.from_dict(dict(phi35, head_dim=64, rope_scaling=dict(rs, short_factor=short[:32],
                                                                          long_factor=long_[:32])))


def test_longrope_on_other_families_reads_its_own_dict():
    """longrope on a family other than Phi-3 (transformers runs it on every one: the same rotary class): the
    pretraining context is the dict's original_max_position_embeddings, else max_position_embeddings (a top-level
    one is Phi3Config's alone: an unknown key here), the factor max_position_embeddings / context where not given;
    head_dim need not be hidden_size / heads (Phi3Config's check); saved with the context in the dict, no top-level
    key. Against transformers' logits: tests/test_models_families.py (hf_llama_longrope)."""
    short, long_ = [1.0 + i / 64 for i in range(64)], [4.0 + i for i in range(64)]
    rs = {"rope_type": "longrope", "short_factor": short, "long_factor": long_, "original_max_position_embeddings": 1024}
    c = LlamaConfig.from_dict(dict(LLAMA2_7B, rope_scaling=rs))
    assert (c.longrope_context, c.rope_scaling.factor, c.max_length) == (1024, 4.0, 1024)
    assert math.isclose(c.rope_scaling.cos_sin_factor, math.sqrt(1 + math.log(4) / math.log(1024)), rel_tol=1e-12)
    np.testing.assert_allclose(rope_inv_freq(c), 10000.0 ** (-np.arange(0, 128, 2) / 128) / np.array(short),
                               rtol=1e-12)
    assert c.with_long_rope(True).max_length == 4096
    saved = c.to_dict()
    assert "original_max_position_embeddings" not in saved and saved["rope_scaling"]["original_max_position_embeddings"] == 1024
    assert LlamaConfig.from_dict(json.loads(json.dumps(saved))) == c
    bare = LlamaConfig.from_dict(dict(LLAMA2_7B, rope_parameters={k: v for k, v in rs.items()
                                                                   if k != "original_max_position_embeddings"}))
    assert (bare.longrope_context, bare.rope_scaling.factor, bare.rope_scaling.cos_sin_factor) == (4096, 1.0, 1.0)
    qwen = LlamaConfig.from_dict(dict(QWEN25_7B, head_dim=64, rope_scaling=dict(rs, short_factor=short[:32],
                                                                               long_factor=long_[:32])))
    assert qwen.longrope_context == 1024 and qwen.head_dim == 64
    for bad, match in [(dict(LLAMA2_7B, rope_scaling=dict(rs, original_max_position_embeddings=1024.5)),
                        r"rope_scaling original_max_position_embeddings must be a positive integer \(longrope's "
                        r"pretraining context\), got 1024.5"),
                       (dict(LLAMA2_7B, original_max_position_embeddings=1024, rope_scaling=rs),
                        "key 'original_max_position_embeddings' = 1024 is not known to this loader"),
                       (dict(LLAMA2_7B, rope_scaling=dict(rs, short_factor=short[:63])),
                        r"short_factor must have rotary_dim / 2 = 64 entries")]:
        with pytest.raises((CheckpointError, ValueError), match=match):
            LlamaConfig.from_dict(bad)
    # "yarn" is YaRN outside Phi-3 (Phi3Config alone renames it longrope)
    with pytest.warns(UserWarning, match="key 'short_factor' .* is not read by RoPE type 'yarn'"), \
            pytest.raises(CheckpointError, match="of type 'yarn' needs 'factor'"):
        LlamaConfig.from_dict(dict(LLAMA2_7B, rope_scaling=dict(rs, rope_type="yarn")))


def test_phi4_mini_partial_rotary():
    """Phi-4-mini: RoPE rotates the first int(head_dim * partial_rotary_factor) = 96 of 128 dimensions, its
    frequencies those of a 96-wide head (and longrope's lists one entry a frequency: 48); the factor read at the top
    level (transformers 4's layout, Phi-4-mini's) or in the RoPE dict (5's), both where they agree; Phi-4-mini's keys
    that transformers' Phi-3 does not read accepted at the values that change nothing, refused at others; the partial
    factor refused outside (0, 1], where it leaves an odd number of dimensions, and outside Phi-3. Against
    transformers' logits: tests/test_models_families.py (hf_phi4_partial)."""
    c = LlamaConfig.from_dict(PHI4_MINI)
    assert (c.head_dim, c.rotary_dim, c.partial_rotary_factor, c.q_per_kv, c.tie_word_embeddings) == (
        128, 96, 0.75, 3, True)
    assert (c.rope_scaling.rope_type, c.rope_scaling.factor, c.max_length, c.sliding_window) == (
        "longrope", 32.0, 4096, None)
    short = np.array(PHI4_MINI["rope_scaling"]["short_factor"])
    np.testing.assert_allclose(rope_inv_freq(c), 10000.0 ** (-np.arange(0, 96, 2) / 96) / short, rtol=1e-12)
    assert LlamaConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    rs = PHI4_MINI["rope_scaling"]
    for same in [dict(PHI4_MINI, rope_scaling=dict(rs, partial_rotary_factor=0.75)),  # both places
                 dict({k: v for k, v in PHI4_MINI.items() if k != "partial_rotary_factor"},
                      rope_scaling=dict(rs, partial_rotary_factor=0.75)),
                 {k: v for k, v in PHI4_MINI.items() if k not in ("full_attn_mod", "interpolate_factor",
                                                                   "lm_head_bias")}]:
        assert LlamaConfig.from_dict(same) == c
    # transformers reads rope_scaling where it is given (not empty), and then not rope_parameters: nor its factor
    top_less = {k: v for k, v in PHI4_MINI.items() if k != "partial_rotary_factor"}
    unread = dict(top_less, rope_scaling={"rope_type": "default"},
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75})
    assert LlamaConfig.from_dict(unread).rotary_dim == 128
    assert LlamaConfig.from_dict(dict(unread, rope_scaling=None)).rotary_dim == 96
    assert LlamaConfig.from_dict(dict(PHI4_MINI, interpolate_factor=1.0, full_attn_mod=1.0)) == c  # 1.0 is 1
    plain = LlamaConfig.from_dict(dict(PHI4_MINI, rope_scaling=None))  # default RoPE over the 96
    np.testing.assert_allclose(rope_inv_freq(plain), 10000.0 ** (-np.arange(0, 96, 2) / 96), rtol=1e-12)
    assert plain.max_length == 131072
    assert LlamaConfig.from_dict(dict(PHI4_MINI, partial_rotary_factor=1.0, rope_scaling=None)).rotary_dim == 128
    odd = dict(PHI4_MINI, hidden_size=24 * 10, rope_scaling=None)  # head_dim 10: int(7.5) = 7
    for bad, match in [
            (dict(PHI4_MINI, partial_rotary_factor=0.5),
             r"short_factor must have rotary_dim / 2 = 32 entries .* got 48"),
            (dict(PHI4_MINI, partial_rotary_factor=1.5), r"partial_rotary_factor must be a number in \(0, 1\]"),
            (dict(PHI4_MINI, partial_rotary_factor=0.0), r"partial_rotary_factor must be a number in \(0, 1\]"),
            (dict(PHI4_MINI, partial_rotary_factor="0.75"),
             "partial_rotary_factor must be a finite number; got '0.75'"),
            (odd, r"partial_rotary_factor 0.75 of head_dim 10 gives int\(10 \* 0.75\) = 7 rotated dimensions; RoPE "
                  "needs an even number"),
            (dict(PHI4_MINI, full_attn_mod=2), r"full_attn_mod=2 is not supported .* only 1"),
            (dict(PHI4_MINI, full_attn_mod=True), r"full_attn_mod=True is not supported"),
            (dict(PHI4_MINI, interpolate_factor=2), r"interpolate_factor=2 is not supported"),
            (dict(PHI4_MINI, lm_head_bias=True), r"lm_head_bias=True is not supported .* only False"),
            (dict(PHI4_MINI, mlp_bias=True), "mlp_bias=True is not supported"),
            (dict(LLAMA2_7B, partial_rotary_factor=0.5),
             r"partial_rotary_factor=0.5 is not supported for this model_type \(its transformers class rotates all"),
            (dict(GEMMA_7B, rope_scaling={"rope_type": "default", "partial_rotary_factor": 0.5}),
             "partial_rotary_factor=0.5 is not supported")]:
        with pytest.raises(CheckpointError, match=match):
            LlamaConfig.from_dict(bad)
    small = dict(SMALL, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    assert LlamaConfig(**small, model_type="phi3", partial_rotary_factor=0.75).rotary_dim == 12
    for by_hand, match in [(dict(small, partial_rotary_factor=0.75), "read for model_type 'phi3' only"),
                           (dict(small, model_type="phi3", partial_rotary_factor=0.1), r"= 1 rotated dimensions"),
                           (dict(small, model_type="phi3", partial_rotary_factor=True), r"in \(0, 1\] .*, got True")]:
        with pytest.raises(ValueError, match=match):
            LlamaConfig(**by_hand)


def test_partial_rotary_rotates_the_first_dimensions_and_passes_the_rest():
    """apply_rope with R/2 frequencies on a D-wide head: the first R dimensions as RoPE of an R-wide head, times the
    cos / sin factor; the other D - R unchanged (not times the factor)."""
    import jax
    import jax.numpy as jnp
    from models.llama import apply_rope
    x = jax.random.normal(jax.random.key(0), (2, 5, 3, 16), jnp.float32)
    positions = jnp.arange(10).reshape(2, 5) * 7
    inv = 10000.0 ** (-np.arange(0, 12, 2) / 12)
    got = apply_rope(x, positions, inv, 1.3)
    np.testing.assert_array_equal(got[..., 12:], x[..., 12:])
    np.testing.assert_allclose(got[..., :12], apply_rope(x[..., :12], positions, inv, 1.3), rtol=1e-6, atol=1e-6)
    angles = np.asarray(positions, np.float64)[..., None, None] * inv  # [B, T, 1, 6]
    x1, x2 = np.asarray(x[..., :6], np.float64), np.asarray(x[..., 6:12], np.float64)
    want = 1.3 * np.concatenate([x1 * np.cos(angles) - x2 * np.sin(angles), x2 * np.cos(angles) + x1 * np.sin(angles)],
                                axis=-1)
    np.testing.assert_allclose(got[..., :12], want, rtol=1e-4, atol=1e-4)


def test_gemma():
    """Gemma: head_dim 256 whatever hidden_size / heads, tied embeddings, its token ids; hidden_act read as
    transformers 5 reads it (the only key it reads for the activation: "gelu" is exact GELU, hidden_activation is not
    read); GemmaConfig's defaults where keys are left out (tanh GELU, head_dim 256, 16 KV heads, tied, 8192
    positions, bos 2 / eos 1 / pad 0); what it cannot run refused: another activation, bidirectional attention, a
    sliding window, and Gemma 2 / 3 (model types of their own) by name, with why."""
    c = LlamaConfig.from_dict(GEMMA_7B)
    assert (c.model_type, c.head_dim, c.num_key_value_heads, c.hidden_act, c.tie_word_embeddings) == (
        "gemma", 256, 16, "gelu", True)
    assert (c.bos_token_id, c.eos_token_ids, c.pad_token_id, c.rms_norm_eps, c.rope_theta) == (2, (1,), 0, 1e-6, 1e4)
    two = LlamaConfig.from_dict(GEMMA_2B)
    assert (two.num_key_value_heads, two.head_dim, two.hidden_act) == (1, 256, "gelu")
    assert LlamaConfig.from_dict(dict(GEMMA_2B, hidden_act="gelu_pytorch_tanh", hidden_activation="gelu")
                                 ).hidden_act == "gelu_pytorch_tanh"
    left_out = ("hidden_act", "head_dim", "num_key_value_heads", "max_position_embeddings", "rms_norm_eps",
                "rope_theta", "rope_scaling", "bos_token_id", "eos_token_id", "pad_token_id")
    bare = LlamaConfig.from_dict({k: v for k, v in GEMMA_7B.items() if k not in left_out})
    assert (bare.hidden_act, bare.head_dim, bare.num_key_value_heads, bare.max_position_embeddings) == (
        "gelu_pytorch_tanh", 256, 16, 8192)
    assert (bare.bos_token_id, bare.eos_token_ids, bare.pad_token_id, bare.rms_norm_eps, bare.rope_theta) == (
        2, (1,), 0, 1e-6, 1e4)
    assert LlamaConfig.from_dict(dict(GEMMA_7B, use_bidirectional_attention=None)) == c
    assert LlamaConfig.from_dict(dict(GEMMA_7B, use_bidirectional_attention=False)) == c
    from models.checkpoint import hf_tensor_shapes
    shapes = hf_tensor_shapes(two)
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (8 * 256, 2048) and "lm_head.weight" not in shapes
    for bad, match in [({"hidden_act": "silu"}, r"unsupported hidden_act 'silu' for model_type 'gemma' \(supported: "
                                                r"'gelu_pytorch_tanh', 'gelu'\)"),
                       ({"hidden_act": "gelu_new"}, "unsupported hidden_act 'gelu_new'"),
                       ({"use_bidirectional_attention": True}, "use_bidirectional_attention=True is not supported"),
                       ({"sliding_window": 4096}, "key 'sliding_window' = 4096 is not known"),
                       ({"attn_logit_softcapping": 50.0}, "key 'attn_logit_softcapping'"),
                       ({"architectures": ["Gemma2ForCausalLM"]}, "'Gemma2ForCausalLM' for model_type 'gemma'"),
                       ({"model_type": "gemma2"}, "'gemma2' is not supported: Gemma 2 soft-caps its attention scores "
                                                  "and final logits"),
                       ({"model_type": "gemma3_text"}, "'gemma3_text' is not supported: Gemma 3 has Gemma 2's layers"),
                       ({"model_type": "gemma3"}, "'gemma3' is not supported: .* and a vision tower")]:
        with pytest.raises(CheckpointError, match=match):
            LlamaConfig.from_dict(dict(GEMMA_7B, **bad))
    with pytest.raises(ValueError, match=r"hidden_act must be one of \('silu',\) for model_type 'llama', got 'gelu'"):
        LlamaConfig(**SMALL, hidden_act="gelu")
    assert LlamaConfig(**SMALL, model_type="gemma", hidden_act="gelu").hidden_act == "gelu"
    assert LlamaConfig(**SMALL, model_type="gemma").hidden_act == "gelu_pytorch_tanh"  # None: the family's default
    assert LlamaConfig(**SMALL).hidden_act == "silu"


def test_sliding_window_over_every_layer():
    """Mistral's and Phi-3's window covers every layer: a model with one computes sequences up to it (where it
    changes nothing: query i sees keys i-W < j <= i) and refuses longer ones, at prefill and in a model call; a
    window >= max_position_embeddings is none; Llama's too (transformers' Llama forward ignores it, its generate keeps
    only the last W keys: the two agree up to W); Qwen's on some layers only is refused
    (test_refuses_what_changes_the_math)."""
    v01 = LlamaConfig.from_dict(MISTRAL_7B_V01)
    assert (v01.sliding_window, v01.max_length, v01.max_position_embeddings) == (4096, 4096, 32768)
    assert LlamaConfig.from_dict(json.loads(json.dumps(v01.to_dict()))) == v01
    assert LlamaConfig.from_dict(dict(MISTRAL_7B_V01, sliding_window=32768)).sliding_window is None
    assert LlamaConfig.from_dict(dict(LLAMA2_7B, sliding_window=16)).max_length == 16
    assert LlamaConfig.from_dict(dict(LLAMA2_7B, sliding_window=None)).sliding_window is None
    with pytest.raises(ValueError, match="sliding_window is for the families whose window covers every layer"):
        LlamaConfig(**SMALL, model_type="qwen2", sliding_window=8)
    assert LlamaConfig.from_dict(dict(PHI4, auto_map={"AutoConfig": "configuration_phi3.Phi3Config"})) == \
        LlamaConfig.from_dict(PHI4)  # Phi-3-mini's remote-code classes: transformers builds its own
    import jax.numpy as jnp
    import models
    from models.llama import causal_attention
    small = LlamaConfig(**SMALL, model_type="mistral", sliding_window=8, max_position_embeddings=64)
    model = models.init_random(small, jnp.float32)
    models.prefill(model, [[1, 2, 3, 4, 5]], 3, backend="xla")  # 8 tokens: all inside the window
    wide = models.init_random(dataclasses.replace(small, sliding_window=12), jnp.float32)
    for mode in ("hydragen", "standard"):  # 9 + 3 tokens: the prefill's token arrays are 16 wide, still fine
        models.generate(wide, [[1, 2, 3, 4, 5, 6, 7, 8, 9]] * 2, max_new_tokens=3, backend="xla", mode=mode,
                        eos_ids=())
    with pytest.raises(ValueError, match=r"sequence 0: prompt of 5 tokens \+ max_new_tokens 4 exceeds the model's "
                                         r"sliding window of 8 tokens"):
        models.prefill(model, [[1, 2, 3, 4, 5]], 4, backend="xla")
    with pytest.raises(ValueError, match="sequences of 9 tokens exceed the model's sliding window of 8"):
        model(jnp.zeros((1, 9), jnp.int32), jnp.arange(9)[None], None, causal_attention)


def test_layouts_agree_when_both_present():
    both = dict(LLAMA31_8B, rope_parameters=dict(LLAMA31_8B["rope_scaling"], rope_theta=500000.0))
    assert LlamaConfig.from_dict(both) == LlamaConfig.from_dict(LLAMA31_8B)


def test_round_trip_every_family():
    for d in list(ALL.values()) + [dict(LLAMA2_7B, rope_scaling={"type": "linear", "factor": 4.0})]:
        c = LlamaConfig.from_dict(d)
        assert LlamaConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_llama3_original_context_defaults_to_max_positions():
    """As transformers: a llama3 scaling without original_max_position_embeddings uses max_position_embeddings."""
    rs = {k: v for k, v in LLAMA31_8B["rope_scaling"].items() if k != "original_max_position_embeddings"}
    c = LlamaConfig.from_dict(dict(LLAMA31_8B, rope_scaling=rs))
    assert c.rope_scaling.original_max_position_embeddings == 131072


def test_harmless_keys_accepted():
    extra = {"torch_dtype": "bfloat16", "dtype": "bfloat16", "use_cache": False, "initializer_range": 0.1,
             "pretraining_tp": 1, "attention_dropout": 0.0, "transformers_version": "5.17.0", "_name_or_path": "x",
             "id2label": {"0": "LABEL_0"}, "temperature": 0.6, "top_p": 0.9, "is_llama_config": True,
             "transformers.js_config": {"kv_cache_dtype": {"q4f16": "float16", "fp16": "float16"}},
             "unsloth_version": "2025.3.19", "unsloth_fixed": True}
    assert set(extra) <= HARMLESS_KEYS
    extra["rope_interleaved"] = False  # SmolLM2 (nanotron) writes it; only True would change the math
    assert LlamaConfig.from_dict(dict(LLAMA31_8B, **extra)) == LlamaConfig.from_dict(LLAMA31_8B)


def test_keys_harmless_at_their_empty_value():
    """transformers' attention implementation changes nothing; pruned heads only when there are none (full config
    dumps write `{}`): other values are refused like unknown keys."""
    want = LlamaConfig.from_dict(LLAMA31_8B)
    for extra in ({"_attn_implementation": "sdpa"}, {"pruned_heads": {}}, {"pruned_heads": None}):
        assert LlamaConfig.from_dict(dict(LLAMA31_8B, **extra)) == want
    with pytest.raises(CheckpointError, match="key 'pruned_heads' = \\{'0': \\[1\\]\\} is not known"):
        LlamaConfig.from_dict(dict(LLAMA31_8B, pruned_heads={"0": [1]}))


def test_an_architecture_without_model_type_names_the_missing_model_type():
    d = {k: v for k, v in MISTRAL_7B_V01.items() if k != "model_type"}
    with pytest.raises(CheckpointError, match="unsupported architecture 'MistralForCausalLM' for model_type 'llama' "
                                              r"\(config.json has no model_type, read as 'llama'\)"):
        LlamaConfig.from_dict(d)


def test_sliding_window_not_in_effect():
    assert LlamaConfig.from_dict(dict(MISTRAL_7B_V01, sliding_window=32768)).max_position_embeddings == 32768
    # Qwen: a window applies only with use_sliding_window, and only to layers >= max_window_layers
    LlamaConfig.from_dict(dict(QWEN25_7B, sliding_window=4096))
    LlamaConfig.from_dict(dict(QWEN25_7B, sliding_window=4096, use_sliding_window=True, max_window_layers=28))
    LlamaConfig.from_dict(to_v5(dict(QWEN25_7B, sliding_window=4096)))


def test_sliding_window_in_effect_within_the_yarn_context():
    """A window at or above max_position_embeddings but below YaRN's context (original × factor) is in effect on
    the sequences YaRN lets through: kept, and the model refuses sequences past it (it was dropped, and sequences
    of up to the YaRN context ran without it: wrong logits); Qwen's on some layers is refused; a save keeps it."""
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    mistral = dict(MISTRAL_7B_V01, sliding_window=32768, rope_scaling=yarn)
    c = LlamaConfig.from_dict(mistral)
    assert (c.sliding_window, c.yarn_context, c.max_length) == (32768, 131072, 32768)
    assert LlamaConfig.from_dict(c.to_dict()) == c
    assert LlamaConfig.from_dict(dict(mistral, sliding_window=131072)).sliding_window is None  # the whole context
    qwen = dict(QWEN25_7B, use_sliding_window=True, sliding_window=32768, max_window_layers=20, rope_scaling=yarn)
    with pytest.raises(CheckpointError, match=r"sliding_window=32768 \(layers \[20, .*below the longest sequence, "
                                              r"131072 tokens"):
        LlamaConfig.from_dict(qwen)


RLLAMA, RQWEN = LLAMA31_8B, QWEN3_8B


@pytest.mark.parametrize("d, match", [
    (dict(MISTRAL_7B_V01, sliding_window=1e9), "sliding_window must be a positive integer .* got 1000000000.0"),
    (dict(MISTRAL_7B_V01, sliding_window=0), "sliding_window must be a positive integer .* got 0"),
    (dict(QWEN25_7B, sliding_window=4096, use_sliding_window=True, max_window_layers=20),
     r"sliding_window=4096 \(layers \[20, 21"),
    (to_v5(dict(QWEN3_8B, sliding_window=4096, use_sliding_window=True, max_window_layers=0)), "sliding_window=4096"),
    (dict(QWEN3_8B, layer_types=["full_attention"] * 35 + ["chunked_attention"]), "layer_types"),
    (dict(QWEN3_8B, layer_types=["full_attention"] * 3), "layer_types"),
    (dict(QWEN3_8B, attention_bias=True), "attention_bias=True"),
    (dict(RLLAMA, quantization_config={"quant_method": "awq"}), "'quantization_config' = {'quant_method': 'awq'}"),
    (dict(RLLAMA, logits_scaling=2.0), "'logits_scaling' = 2.0"),
    (dict(MISTRAL_7B_V03, attention_bias=True), "attention_bias"),
    (dict(RLLAMA, partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
    (dict(RLLAMA, rope_interleaved=True), "rope_interleaved=True"),
    (dict(to_v5(RQWEN), rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5}),
     "partial_rotary_factor=0.5"),
    (dict(RQWEN, rope_scaling={"rope_type": "longrope", "factor": 4.0}), "'longrope'"),
    (dict(to_v5(RQWEN), rope_parameters={"full_attention": None}), "keyed by layer type"),
    (dict(to_v5(RQWEN), rope_parameters={"sliding_attention": {"rope_type": "default"}}), "keyed by layer type"),
    (dict(to_v5(RQWEN), rope_parameters={"full_attention": {"rope_type": "default"}, "rope_theta": 1e6}),
     "keyed by layer type"),
    (dict(to_v5(RLLAMA), rope_parameters={"full_attention": {"rope_type": "yarn", "factor": 4.0}}),
     "keyed by layer type"),
    (dict(RQWEN, layer_types=["sliding_attention"] * 36), r"marks layers \[0, 1, .* but no sliding window applies"),
    (dict(LLAMA2_7B, num_attention_heads=7, num_key_value_heads=7), "not a multiple"),
    (dict(LLAMA2_7B, model_type="mistral"), "'LlamaForCausalLM' for model_type 'mistral'"),
])
def test_refuses_what_changes_the_math(d, match):
    with pytest.raises(CheckpointError, match=match):
        LlamaConfig.from_dict(d)


def test_error_class_and_bad_json(tmp_path):
    assert ReExported is CheckpointError and issubclass(CheckpointError, ValueError)
    (tmp_path / "config.json").write_text('{"model_type": "llama", ')
    with pytest.raises(CheckpointError, match="config.json"):
        LlamaConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(LLAMA2_7B, hidden_act="gelu")))
    with pytest.raises(CheckpointError, match=r"config\.json: config: unsupported hidden_act"):
        LlamaConfig.from_json(tmp_path)


def test_qwen25_use_mrope_false_accepted_true_refused():
    """Qwen2.5's configs (and transformers 5's Qwen2Config) write `"use_mrope": false`; true is Qwen2-VL's RoPE."""
    assert LlamaConfig.from_dict(dict(QWEN25_05B, use_mrope=False)) == LlamaConfig.from_dict(QWEN25_05B)
    with pytest.raises(CheckpointError, match="use_mrope=True is not supported"):
        LlamaConfig.from_dict(dict(QWEN25_05B, use_mrope=True))
    with pytest.raises(CheckpointError, match="'use_mrope'"):  # not a Llama key
        LlamaConfig.from_dict(dict(LLAMA2_7B, use_mrope=False))


def test_token_id_defaults_follow_the_family():
    """Ids left out of config.json take transformers' defaults of the family's config class: Llama and Mistral
    1 / 2; Qwen none (transformers omits a value equal to the default when it saves)."""
    drop = lambda d: {k: v for k, v in d.items() if k not in ("bos_token_id", "eos_token_id")}  # noqa: E731
    llama = LlamaConfig.from_dict(drop(LLAMA2_7B))
    assert (llama.bos_token_id, llama.eos_token_ids) == (1, (2,))
    for d in (QWEN25_7B, QWEN3_8B):
        c = LlamaConfig.from_dict(drop(d))
        assert (c.bos_token_id, c.eos_token_ids) == (None, ()), d["model_type"]
        assert LlamaConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_left_out_keys_take_the_family_defaults_of_transformers():
    """A key that config.json leaves out takes the default of the family's transformers config class (what
    transformers would run for that file), not one shared guess: rms_norm_eps 1e-6; max_position_embeddings 2048
    (Llama), 131072 (Mistral), 32768 (Qwen); Mistral's sliding window 4096, Qwen's where use_sliding_window is on."""
    def without(d, *keys):
        return {k: v for k, v in d.items() if k not in keys}

    llama = LlamaConfig.from_dict(without(LLAMA2_7B, "rms_norm_eps", "max_position_embeddings"))
    assert llama.rms_norm_eps == 1e-6 and llama.max_position_embeddings == 2048
    mistral = LlamaConfig.from_dict(without(MISTRAL_7B_V03, "max_position_embeddings"))  # sliding_window: null
    assert mistral.max_position_embeddings == 4096 * 32
    # the key left out: Mistral's 4096, in effect (sequences up to 4096 tokens)
    assert LlamaConfig.from_dict(without(MISTRAL_7B_V03, "sliding_window")).sliding_window == 4096
    qwen = without(QWEN25_7B, "sliding_window", "max_position_embeddings")
    assert LlamaConfig.from_dict(qwen).max_position_embeddings == 32768  # use_sliding_window false: no window
    with pytest.raises(CheckpointError, match=r"sliding_window=4096 \(layers \[0, 1,"):
        LlamaConfig.from_dict(dict(qwen, use_sliding_window=True, max_window_layers=0))
    assert LlamaConfig.from_dict(without(QWEN3_8B, "max_position_embeddings")).max_position_embeddings == 32768


def test_left_out_head_counts_take_the_family_defaults_of_transformers():
    """num_key_value_heads left out: Llama the attention heads, Mistral 8, Qwen2 / Qwen3 32; null: the attention
    heads in every family. head_dim left out: Qwen3 128, the others hidden_size / heads."""
    def without(d, *keys):
        return {k: v for k, v in d.items() if k not in keys}

    small = dict(hidden_size=512, num_attention_heads=32)
    assert LlamaConfig.from_dict(without(dict(LLAMA2_7B, **small), "num_key_value_heads")).num_key_value_heads == 32
    mistral = LlamaConfig.from_dict(without(dict(MISTRAL_7B_V03, **small), "num_key_value_heads"))
    assert (mistral.num_key_value_heads, mistral.head_dim) == (8, 16)
    qwen2 = LlamaConfig.from_dict(without(dict(QWEN25_7B, **small), "num_key_value_heads"))
    assert (qwen2.num_key_value_heads, qwen2.head_dim) == (32, 16)
    qwen3 = LlamaConfig.from_dict(without(dict(QWEN3_06B, **small), "num_key_value_heads", "head_dim"))
    assert (qwen3.num_key_value_heads, qwen3.head_dim) == (32, 128)
    for d in (MISTRAL_7B_V03, QWEN25_7B, QWEN3_06B):
        c = LlamaConfig.from_dict(dict(d, **small, num_key_value_heads=None))
        assert c.num_key_value_heads == 32, d["model_type"]
        assert LlamaConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert LlamaConfig.from_dict(dict(QWEN3_06B, head_dim=None)).head_dim == 1024 // 16


SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8)


@pytest.mark.parametrize("scaling, match", [
    (lambda: RopeScaling("ntk", 2.0), "rope_type must be 'linear', 'llama3', 'yarn', 'longrope' or 'dynamic'.*'ntk'"),
    (lambda: RopeScaling("longrope", 2.0), "short_factor is longrope's and needed by it; rope_type 'longrope'"),
    (lambda: RopeScaling("yarn", 2.0, long_factor=(1.0,)), "long_factor is longrope's .* rope_type 'yarn'"),
    (lambda: RopeScaling("longrope", 2.0, short_factor=(1.0, -1.0), long_factor=(1.0, 1.0)),
     r"short_factor must be a non-empty tuple of positive finite numbers, got \(1.0, -1.0\)"),
    (lambda: RopeScaling("longrope", 2.0, original_max_position_embeddings=4096.0, short_factor=(1.0,),
                         long_factor=(1.0,)), "original_max_position_embeddings must be an integer for longrope"),
    (lambda: LlamaConfig(**SMALL, rope_scaling=RopeScaling("longrope", 2.0, short_factor=(1.0,) * 3,
                                                           long_factor=(1.0,) * 4)),
     r"short_factor must have rotary_dim / 2 = 4 entries \(one a frequency\), got 3"),
    (lambda: RopeScaling("yarn", 4.0, beta_fast=0.0), "rope_scaling.beta_fast must be a positive finite number"),
    (lambda: RopeScaling("yarn", 4.0, attention_factor=-1.0), "attention_factor must be a positive finite number"),
    (lambda: RopeScaling("yarn", 4.0, truncate="no"), "truncate must be True or False, got 'no'"),
    (lambda: RopeScaling("yarn", 4.0, use_long=True), "use_long .* is longrope's, True or False; rope_type 'yarn'"),
    (lambda: RopeScaling("longrope", 4.0, original_max_position_embeddings=32, short_factor=(1.0,), long_factor=(1.0,),
                         use_long=1), "use_long .* got 1"),
    (lambda: RopeScaling("default", 2.0), r"rope_type must be .*\(no scaling: rope_scaling=None\)"),
    (lambda: RopeScaling("linear", 0.0), "rope_scaling.factor must be a positive finite number, got 0.0"),
    (lambda: RopeScaling("linear", -1.0), "rope_scaling.factor must be a positive finite number, got -1.0"),
    (lambda: RopeScaling("linear", float("inf")), "factor must be a positive finite number, got inf"),
    (lambda: RopeScaling("llama3", 8.0, low_freq_factor=4.0, high_freq_factor=1.0),
     r"high_freq_factor \(1.0\) must exceed low_freq_factor \(4.0\)"),
    (lambda: RopeScaling("llama3", 8.0, low_freq_factor=0.0), "low_freq_factor must be a positive finite number"),
    (lambda: LlamaConfig(**SMALL, rope_scaling={"rope_type": "llama3", "factor": 8.0}),
     "rope_scaling must be a models.RopeScaling or None, got dict"),
    (lambda: LlamaConfig(**SMALL, eos_token_ids=(2.0,)), r"eos_token_ids must be a tuple of integer token ids"),
    (lambda: LlamaConfig(**SMALL, bos_token_id="1"), "bos_token_id must be an integer token id \\(int32\\) or None, got '1'"),
    (lambda: LlamaConfig(**SMALL, tie_word_embeddings=1), "tie_word_embeddings must be True or False, got 1"),
])
def test_a_config_built_by_hand_is_checked_as_one_read_from_a_file(scaling, match):
    """The constructors check what from_dict checks: no RoPE type or number runs as another, no dict where a
    RopeScaling belongs, token ids as integers."""
    with pytest.raises(ValueError, match=match):
        scaling()


def test_eos_token_ids_given_as_a_list_become_a_tuple():
    c = LlamaConfig(**SMALL, eos_token_ids=[2, 3])
    assert c.eos_token_ids == (2, 3) and hash(c) == hash(LlamaConfig(**SMALL, eos_token_ids=(2, 3)))


def test_llama3_low_freq_factor_must_be_positive_in_a_file():
    bad = dict(LLAMA31_8B, rope_scaling=dict(LLAMA31_8B["rope_scaling"], low_freq_factor=0.0))
    with pytest.raises(CheckpointError, match="rope_scaling needs 0 < low_freq_factor < high_freq_factor; got 0.0"):
        LlamaConfig.from_dict(bad)


def test_mistral_config_written_with_its_window_off():
    """to_dict writes Mistral's sliding_window as null: left out, transformers would read its default window of
    4096 (and run a Mistral v0.3 / Nemo with it)."""
    d = LlamaConfig.from_dict(MISTRAL_NEMO).to_dict()
    assert "sliding_window" in d and d["sliding_window"] is None
    assert "sliding_window" not in LlamaConfig.from_dict(LLAMA2_7B).to_dict()
    assert LlamaConfig.from_dict(json.loads(json.dumps(d))) == LlamaConfig.from_dict(MISTRAL_NEMO)


def test_configs_read_as_transformers_5_reads_them():
    """Configs transformers 5.17 loads that this loader refused (a review ran transformers on each, logits compared):
    now read as transformers reads them, with a warning where a value is left out."""
    base = LlamaConfig.from_dict(LLAMA2_7B)
    linear = {"rope_type": "linear", "factor": 2.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # an empty dict is none: `rope_scaling or rope_parameters`
        for d in (dict(LLAMA2_7B, rope_scaling={}, rope_parameters=dict(linear, rope_theta=10000.0)),
                  dict(LLAMA2_7B, rope_scaling=linear, rope_parameters={})):
            assert LlamaConfig.from_dict(d).rope_scaling == RopeScaling("linear", 2.0)
        # dynamic NTK changes nothing up to max_position_embeddings, the longest sequence here; kept, and saved, as
        # it was read (it was saved as rope_scaling null: transformers' copy then differed past that length)
        dynamic = LlamaConfig.from_dict(dict(LLAMA2_7B, rope_scaling={"rope_type": "dynamic", "factor": 4.0}))
        assert dynamic.rope_scaling == RopeScaling("dynamic", 4.0) and dynamic.max_length == base.max_length
        np.testing.assert_array_equal(rope_inv_freq(dynamic), rope_inv_freq(base))
        assert dynamic.rope_scaling.cos_sin_factor == 1.0
        assert dynamic.to_dict()["rope_scaling"] == {"rope_type": "dynamic", "factor": 4.0}
        assert LlamaConfig.from_dict(json.loads(json.dumps(dynamic.to_dict()))) == dynamic
        assert LlamaConfig.from_dict(dict(LLAMA2_7B, hidden_act="swish")).hidden_act == "silu"  # ACT2FN's SiLU
        assert LlamaConfig.from_dict(dict(LLAMA2_7B, layer_types=["full_attention"] * 32)) == base
        assert LlamaConfig.from_dict(dict(QWEN25_7B, attention_bias=True)) == LlamaConfig.from_dict(QWEN25_7B)
        assert LlamaConfig.from_dict(dict(LLAMA2_7B, architectures=["LlamaModel"])) == base  # the base model
    with pytest.raises(CheckpointError, match="dynamic' needs 'factor'"):
        LlamaConfig.from_dict(dict(LLAMA2_7B, rope_scaling={"rope_type": "dynamic"}))
    with pytest.raises(CheckpointError, match="layer_types"):  # a sliding layer still changes the math
        LlamaConfig.from_dict(dict(LLAMA2_7B, layer_types=["full_attention"] * 31 + ["sliding_attention"]))
    with pytest.raises(CheckpointError, match=r"partial_rotary_factor=0.5 is not supported"), \
            pytest.warns(UserWarning, match="the RoPE dict's 0.5 read"):  # the value read is the one named
        LlamaConfig.from_dict(dict(LLAMA2_7B, partial_rotary_factor=1.0, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}))
    with pytest.raises(CheckpointError, match="attention_bias"):  # Qwen3 reads it (biases on q/k/v/o)
        LlamaConfig.from_dict(dict(QWEN3_8B, attention_bias=True))
    # the RoPE dict's theta over the top-level one; rope_scaling over rope_parameters; unread keys left out
    with pytest.warns(UserWarning, match=r"rope_theta 10000.0 beside rope_parameters's rope_theta 500000.0: the dict's"):
        assert LlamaConfig.from_dict(dict(LLAMA2_7B, rope_theta=10000.0,
                                          rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
                                     ).rope_theta == 500000.0
    with pytest.warns(UserWarning, match=r"rope_scaling read, rope_parameters left out"):
        assert LlamaConfig.from_dict(dict(LLAMA2_7B, rope_scaling=linear, rope_parameters=dict(linear, factor=4.0))
                                     ).rope_scaling == RopeScaling("linear", 2.0)
    with pytest.warns(UserWarning, match=r"partial_rotary_factor is given as .*: the RoPE dict's 0.5 read"):
        assert LlamaConfig.from_dict(dict(PHI4_MINI, rope_scaling=None, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})).rotary_dim == 64
    with pytest.warns(UserWarning, match=r"rope_scaling key 'finetuned' = True \(1 such in all\) is not read by RoPE "
                                         r"type 'yarn'"):
        yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
        assert LlamaConfig.from_dict(dict(LLAMA2_7B, rope_scaling=dict(yarn, finetuned=True))) == \
            LlamaConfig.from_dict(dict(LLAMA2_7B, rope_scaling=yarn))


def test_generation_config_without_eos_stops_on_none(tmp_path):
    """transformers' generate reads generation_config.json alone: without an eos_token_id (or null) it stops on no
    id, config.json's not read; a warning says so. No such file: config.json's."""
    (tmp_path / "config.json").write_text(json.dumps(LLAMA2_7B))
    assert LlamaConfig.from_json(tmp_path).eos_token_ids == (2,)
    for gen in ({"bos_token_id": 1, "temperature": 0.6}, {"eos_token_id": None}):
        (tmp_path / "generation_config.json").write_text(json.dumps(gen))
        with pytest.warns(UserWarning, match=r"generation_config.json names no eos_token_id: generation does not stop "
                                             r"on config.json's \[2\]"):
            assert LlamaConfig.from_json(tmp_path).eos_token_ids == ()
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert LlamaConfig.from_json(tmp_path).eos_token_ids == (2, 7)


@pytest.mark.parametrize("fields", [
    dict(model_type="smollm3", num_hidden_layers=3, rope_layers=(True,) * 3),  # RoPE in every layer
    dict(model_type="smollm3", num_hidden_layers=3),
    dict(model_type="granite", attention_multiplier=None),  # Llama's logit scale, saved as the number it is
    dict(model_type="granite", attention_multiplier=1 / math.sqrt(8)),
    dict(attention_multiplier=1 / math.sqrt(8)),  # the default scale, spelt out: no Granite key needed
])
def test_hand_built_config_equals_itself_after_a_round_trip(fields):
    """A config built by hand is the config it saves: equal and of one hash after to_dict / from_dict (jit sees
    the same static argument; no recompile), and with the same meaning (the window, RoPE layers, logit scale)."""
    c = LlamaConfig(**dict(SMALL, **fields))
    back = LlamaConfig.from_dict(json.loads(json.dumps(c.to_dict())))
    assert back == c and hash(back) == hash(c)
    assert (c.max_length, c.query_scale, c.uses_rope(0)) == (back.max_length, 1.0, True)
    assert c.rope_layers is None and c.attention_multiplier is None
    kept = LlamaConfig(**dict(SMALL, sliding_window=4095, max_position_embeddings=4096))  # in effect: kept
    assert kept.sliding_window == 4095 and LlamaConfig.from_dict(kept.to_dict()) == kept
    # a window as long as the context stays as built (a model call refuses longer inputs, which transformers would
    # window), though from_dict reads it as none: another static config, not another result
    assert LlamaConfig(**dict(SMALL, sliding_window=4096, max_position_embeddings=4096)).sliding_window == 4096


def test_integer_predicates():
    """``is_int`` takes what a JSON / GGUF file spells as an integer; ``is_integer`` also numpy integers and 0-d
    integer arrays (run-time arguments). Neither takes a bool, a float or a 1-d array."""
    import jax
    import jax.numpy as jnp
    for x in (3, -1, 2**70):
        assert is_int(x) and is_integer(x)
    for x in (np.int64(3), np.array(3), jnp.int32(3), jnp.array(3, jnp.uint8)):
        assert not is_int(x) and is_integer(x), x
    for x in (True, np.bool_(True), jnp.array(True), 3.0, np.float32(3), np.array([3]), jnp.zeros((1,), int), "3",
              None, jax.random.key(0), type("Torchish", (), {"dtype": "torch.int64", "ndim": 0})()):
        assert not is_int(x) and not is_integer(x), x  # (a typed key's dtype, numpy cannot read: False, not raised)
    # the callers take 0-d arrays as the ints they hold, and refuse a key by name
    import models  # noqa: PLC0415
    from models import parallel  # noqa: PLC0415
    tree = models.synthetic_tree(np.array(2), jnp.array(3), 2, 50, seed=np.array(1))
    assert tree == models.synthetic_tree(2, 3, 2, 50, seed=1)
    assert models.expand_samples([[1, 2]], jnp.array(2)) == [(1, 2), (1, 2)]
    assert models.build_sharing_tree([[1, 2, 3], [1, 2, 4]], max_depth=np.array(1)).levels
    for call in (lambda: models.synthetic_tree(2, 3, 2, 50, seed=jax.random.key(0)),
                 lambda: parallel.make_mesh(jax.random.key(0)),
                 lambda: models.build_sharing_tree([[1, 2]], max_depth=jax.random.key(0))):
        with pytest.raises(ValueError, match="must be an integer"):
            call()
