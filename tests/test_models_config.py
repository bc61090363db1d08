"""models.config: HF config.json parsing, refusal of unsupported options, RoPE frequencies (incl. Llama-3)."""

import json
import math

import numpy as np
import pytest

from models.config import LlamaConfig, RopeScaling
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
    ({"model_type": "gemma"}, "gemma"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"sliding_window": 4096}, "sliding_window"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "dynamic"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"num_key_value_heads": 5}, "num_key_value_heads"),
    ({"hidden_size": 0}, "hidden_size"),
])
def test_refuses_unsupported(change, match):
    with pytest.raises(ValueError, match=match):
        LlamaConfig.from_dict(dict(LLAMA2_7B, **change))


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
