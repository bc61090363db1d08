"""Llama, Mistral, Qwen2, Qwen3, SmolLM3, Granite, OLMo 2, Phi-3, Gemma checkpoints (YaRN RoPE among them) against
transformers itself, and exact float32.

The fixtures (tests/fixtures/hf_*/, listed in hf_families.json) were written by scripts/fixtures/make_hf_fixtures.py
with transformers' ``save_pretrained``, with transformers' float32 logits of every position of three prompts
(sharing a prefix) plus their greedy continuations. Each checkpoint must give those logits to 1e-5 of the largest
one, and Hydragen generation (the prefix read once by all three) the same greedy tokens. No torch needed.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import config as config_module, llama
from models.checkpoint import load_checkpoint, save_checkpoint
from models.config import LlamaConfig
from models.generate import generate, prefill
from models.llama import Llama, causal_attention, init_random, pack_qkv, unpack_qkv

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
MANIFEST = json.loads((FIXTURES / "hf_families.json").read_text())
NAMES = sorted(MANIFEST["fixtures"])
ONE_PER_FAMILY = ["hf_llama3", "hf_mistral", "hf_qwen2", "hf_qwen3", "hf_smollm3", "hf_granite", "hf_olmo2",
                  "hf_phi3", "hf_gemma"]
FP32_TOL = 1e-5  # of the largest |logit|


@functools.lru_cache(maxsize=None)
def model(name: str, dtype=jnp.float32) -> Llama:
    return load_checkpoint(FIXTURES / name, dtype=dtype)


def cases(name: str, outputs: str = "transformers_outputs.npz") -> list[tuple[list[int], list[int], np.ndarray]]:
    """(prompt, transformers' greedy continuation, its logits ``[T, V]`` of prompt + continuation) per prompt
    (``transformers_outputs_cross.npz``: each greedy step's logits ``[N, V]`` instead)."""
    with np.load(FIXTURES / name / outputs) as f:
        n = len([k for k in f.files if k.startswith("prompt_")])
        logits = "steps" if "steps_0" in f.files else "logits"  # (the cross outputs: each step's last row)
        return [(f[f"prompt_{i}"].tolist(), f[f"greedy_{i}"].tolist(), f[f"{logits}_{i}"]) for i in range(n)]


def full_logits(m: Llama, seqs: list[list[int]]) -> list[np.ndarray]:
    """Logits ``[T_b, V]`` (float32) of each sequence, by one causal forward of them all, right-padded (a causal
    token does not see the padding after it)."""
    T = max(map(len, seqs))
    ids = jnp.asarray([s + [0] * (T - len(s)) for s in seqs], jnp.int32)
    h, _ = m(ids, jnp.broadcast_to(jnp.arange(T), ids.shape), None, causal_attention)
    out = np.asarray(m.logits(h), np.float32)
    return [out[b, :len(s)] for b, s in enumerate(seqs)]


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def test_fixtures_cover_each_family():
    """The fixtures exercise what each family adds (a fixture without it would test nothing)."""
    arch = {n: f["architecture"] for n, f in MANIFEST["fixtures"].items()}
    assert {arch[n] for n in ONE_PER_FAMILY} == {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                                                   "Qwen3ForCausalLM", "SmolLM3ForCausalLM", "GraniteForCausalLM",
                                                   "Olmo2ForCausalLM", "Phi3ForCausalLM", "GemmaForCausalLM"}
    raw = {n: json.loads((FIXTURES / n / "config.json").read_text()) for n in NAMES}
    assert "rope_parameters" in raw["hf_llama3"] and "rope_theta" not in raw["hf_llama3"]  # transformers 5
    assert "rope_parameters" not in raw["hf_llama3_v4"] and raw["hf_llama3_v4"]["rope_scaling"]  # transformers 4
    assert (FIXTURES / "hf_llama3" / "model.safetensors.index.json").exists()  # several shards
    c = {n: model(n).config for n in NAMES}
    assert c["hf_llama3"] == c["hf_llama3_v4"] and c["hf_llama3"].rope_scaling.rope_type == "llama3"
    assert c["hf_llama2"].rope_scaling.rope_type == "linear" and c["hf_llama2"].q_per_kv == 1
    assert c["hf_mistral"].head_dim * c["hf_mistral"].num_attention_heads != c["hf_mistral"].hidden_size
    layers = model("hf_qwen2").params()["layers"]
    assert c["hf_qwen2"].tie_word_embeddings and all(np.abs(np.asarray(layer["b_qkv"])).min() > 0 for layer in layers)
    layers = model("hf_qwen3").params()["layers"]
    assert c["hf_qwen3"].head_dim == 32 != c["hf_qwen3"].hidden_size // c["hf_qwen3"].num_attention_heads
    assert all(np.abs(np.asarray(layer[k]) - 1).max() > 0.01 for layer in layers for k in ("q_norm", "k_norm"))
    assert c["hf_smollm3"].rope_layers == (True, True, True, False) and c["hf_smollm3"].tie_word_embeddings
    layers = model("hf_olmo2").params()["layers"]
    assert all(layer["q_proj_norm"].shape == (64,) and layer["k_proj_norm"].shape == (32,) for layer in layers)
    assert all(np.abs(np.asarray(layer[k]) - 1).max() > 0.01 for layer in layers
               for k in ("attn_out_norm", "mlp_out_norm", "q_proj_norm", "k_proj_norm"))
    from safetensors import safe_open
    with safe_open(str(FIXTURES / "hf_phi3" / "model.safetensors"), "np") as f:  # Phi-3: fused tensors only
        assert {"model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight"} <= set(f.keys())
        assert not any("q_proj" in k or "gate_proj" in k for k in f.keys())
    gemma, layers = c["hf_gemma"], model("hf_gemma").params()["layers"]  # head_dim 32 != 64 / 4; tied; GELU (tanh)
    assert (gemma.head_dim, gemma.hidden_size // gemma.num_attention_heads, gemma.hidden_act) == (32, 16,
                                                                                                   "gelu_pytorch_tanh")
    assert gemma.tie_word_embeddings and all(np.abs(np.asarray(layer["attn_norm"])).min() > 0.5 for layer in layers)
    g = c["hf_granite"]
    assert (g.embedding_multiplier, g.attention_multiplier, g.residual_multiplier, g.logits_scaling) == (12, .2, .22, 8)
    # YaRN: Qwen2.5's model-card setting in the transformers-4 layout, and Llama with every knob in the 5 layout
    assert raw["hf_qwen2_yarn"]["rope_scaling"]["type"] == "yarn" and "rope_parameters" not in raw["hf_qwen2_yarn"]
    assert c["hf_qwen2_yarn"].rope_scaling.truncate and c["hf_qwen2_yarn"].rope_scaling.attention_factor is None
    yarn = raw["hf_llama_yarn"]["rope_parameters"]
    assert yarn["rope_type"] == "yarn" and not yarn["truncate"] and yarn["mscale"] != yarn["mscale_all_dim"]
    # Phi-4-mini: partial rotary with longrope, in its config.json's layout (the factor at the top level)
    phi4 = raw["hf_phi4_partial"]
    assert phi4["partial_rotary_factor"] == 0.75 and phi4["rope_scaling"]["type"] == "longrope"
    assert (phi4["full_attn_mod"], phi4["interpolate_factor"], phi4["lm_head_bias"]) == (1, 1, False)
    p4 = c["hf_phi4_partial"]
    assert (p4.head_dim, p4.rotary_dim, p4.max_length, p4.tie_word_embeddings) == (16, 12, 32, True)


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name):
    prompts, greedy, want = zip(*cases(name))
    got = full_logits(model(name), [p + g for p, g in zip(prompts, greedy)])
    for b in range(len(prompts)):
        assert rel_err(got[b], want[b]) <= FP32_TOL


@pytest.mark.parametrize("name", NAMES)
def test_hydragen_greedy_matches_transformers(name):
    prompts, greedy, logits = zip(*cases(name))
    g = generate(model(name), list(prompts), max_new_tokens=len(greedy[0]), sampling="greedy", mode="hydragen",
                 eos_ids=())
    assert len(g.tree.levels) == 1  # the shared prefix, read once for all three
    for b, p in enumerate(prompts):
        assert g.tokens[b].tolist() == greedy[b]
        assert rel_err(g.logits[b], logits[b][len(p) - 1]) <= FP32_TOL  # first-token logits, through prefill


def test_rope_config_is_what_the_fixture_tests():
    """Read with transformers-4 defaults instead of its rope_parameters (theta 10000, no scaling: what this loader
    did before), the Llama-3 fixture is far off: the comparison above can see a misread config."""
    m = model("hf_llama3")
    wrong = Llama(dataclasses.replace(m.config, rope_theta=10000.0, rope_scaling=None), m.params())
    prompt, greedy, want = cases("hf_llama3")[2]
    assert rel_err(full_logits(wrong, [prompt + greedy])[0], want) > 100 * FP32_TOL


@pytest.mark.parametrize("name", ["hf_qwen2_yarn", "hf_llama_yarn"])
@pytest.mark.parametrize("misread", ["no cos/sin factor", "band not truncated as written", "linear"])
def test_yarn_config_is_what_the_fixture_tests(name, misread):
    """Each part of YaRN changes the fixtures' logits far beyond the tolerance: the attention factor, the band's
    truncation, the blend of frequencies (read as linear scaling by the same factor)."""
    m = model(name)
    rs = m.config.rope_scaling
    wrong = {"no cos/sin factor": dataclasses.replace(rs, attention_factor=1.0),
             "band not truncated as written": dataclasses.replace(rs, truncate=not rs.truncate),
             "linear": dataclasses.replace(rs, rope_type="linear")}[misread]
    prompt, greedy, want = cases(name)[2]
    logits = full_logits(Llama(dataclasses.replace(m.config, rope_scaling=wrong), m.params()), [prompt + greedy])
    assert rel_err(logits[0], want) > 100 * FP32_TOL


@pytest.mark.parametrize("misread", ["no cos/sin factor", "long factors", "no factors"])
def test_longrope_config_is_what_the_fixture_tests(misread):
    """Phi-3's longrope within its pretraining context: the attention factor, and the short factors (not the long
    ones, not none), each change the fixture's logits far beyond the tolerance."""
    m = model("hf_phi3_longrope")
    rs = m.config.rope_scaling
    wrong = {"no cos/sin factor": dataclasses.replace(rs, attention_factor=1.0),
             "long factors": dataclasses.replace(rs, short_factor=rs.long_factor),
             "no factors": dataclasses.replace(rs, short_factor=(1.0,) * len(rs.short_factor))}[misread]
    prompt, greedy, want = cases("hf_phi3_longrope")[2]
    logits = full_logits(Llama(dataclasses.replace(m.config, rope_scaling=wrong), m.params()), [prompt + greedy])
    assert rel_err(logits[0], want) > 100 * FP32_TOL


@pytest.mark.parametrize("misread", ["factor from the context", "no longrope", "short factors past the context"])
def test_llama_longrope_is_what_the_fixture_tests(monkeypatch, misread):
    """longrope on Llama (its context, 32, in the RoPE dict; factor 2 given, not 128 / 32): the factor derived as
    Phi-3's is when absent (another cos / sin factor), default RoPE, or the short factors on prompts past the
    context, each change transformers' logits far beyond the tolerance."""
    m = model("hf_llama_longrope")
    rs = m.config.rope_scaling
    assert (m.config.longrope_context, rs.factor) == (32, 2.0)
    outputs = "transformers_outputs_long.npz" if misread == "short factors past the context" else \
        "transformers_outputs.npz"
    config = m.config
    if misread == "factor from the context":
        config = dataclasses.replace(config, rope_scaling=dataclasses.replace(rs, factor=128 / 32))
    elif misread == "no longrope":
        config = dataclasses.replace(config, rope_scaling=None)
    else:
        monkeypatch.setattr(LlamaConfig, "with_long_rope", lambda self, long: self)
    prompt, greedy, want = cases("hf_llama_longrope", outputs)[2]
    assert rel_err(full_logits(Llama(config, m.params()), [prompt + greedy])[0], want) > 100 * FP32_TOL


@pytest.mark.parametrize("misread", ["all of head_dim", "no longrope", "the last dimensions"])
def test_partial_rotary_is_what_the_fixture_tests(monkeypatch, misread):
    """Phi-4-mini's partial rotary: RoPE over the whole head (default frequencies, as a loader ignoring the factor
    and the 12-entry lists would run it), the partial rotary without longrope, or the rotation on the last 12
    dimensions instead of the first, each change the fixture's logits far beyond the tolerance."""
    m = model("hf_phi4_partial")
    config = m.config
    if misread == "all of head_dim":
        config = dataclasses.replace(config, partial_rotary_factor=1.0, rope_scaling=None)
    elif misread == "no longrope":
        config = dataclasses.replace(config, rope_scaling=None)
    else:
        rope = llama.apply_rope
        monkeypatch.setattr(llama, "apply_rope", lambda x, *a: jnp.flip(rope(jnp.flip(x, -1), *a), -1))
    prompt, greedy, want = cases("hf_phi4_partial")[2]
    logits = full_logits(Llama(config, m.params()), [prompt + greedy])
    assert rel_err(logits[0], want) > 100 * FP32_TOL


def test_longrope_prefill_does_not_cross_the_pretraining_context():
    """One prefill and its decode compute with one set of longrope factors: a sequence whose prompt is within
    original_max_position_embeddings (32 in the fixture) but whose new tokens would take it past (transformers'
    Phi-3 computes the whole sequence again with the long factors at the crossing step) is refused by prefill,
    naming the limit and generate(), which does it in two calls (below); so is a batch mixing prompts past the
    context with prompts within it. Up to the context, and from prompts past it up to max_position_embeddings,
    prefill runs."""
    m = model("hf_phi3_longrope")
    assert m.config.max_length == 32 and m.config.with_long_rope(True).max_length == 128
    prompt = cases("hf_phi3_longrope")[0][0]
    assert not prefill(m, [prompt], 32 - len(prompt)).long_rope
    with pytest.raises(ValueError, match=r"sequence 0: prompt of \d+ tokens \+ max_new_tokens \d+ exceeds the model's "
                                         r"longrope context of 32 tokens \(original_max_position_embeddings: at the "
                                         r"step that crosses it .* generate\(\) does, in two calls"):
        prefill(m, [prompt], 33 - len(prompt))
    long_prompt = cases("hf_phi3_longrope", "transformers_outputs_long.npz")[0][0]
    with pytest.raises(ValueError, match=r"sequence 1's prompt \(43 tokens\) is longer than the model's longrope "
                                         r"context of 32 tokens .* sequence 0's \(10\) is not"):
        prefill(m, [prompt, long_prompt], 2)
    assert prefill(m, [long_prompt], 128 - len(long_prompt)).long_rope
    with pytest.raises(ValueError, match="maximum length 128"):  # past the context: max_position_embeddings
        prefill(m, [long_prompt], 129 - len(long_prompt))


@pytest.mark.parametrize("name", [pytest.param("hf_phi3_longrope", marks=pytest.mark.slow),  # ~40 s each;
                                  "hf_phi4_partial",  # (Phi-4-mini's: longrope with partial rotary)
                                  pytest.param("hf_llama_longrope", marks=pytest.mark.slow)])
def test_longrope_generation_across_the_pretraining_context_matches_transformers(name):
    """generate() over prompts of 8-12 tokens continued by 30 (context 32), as transformers computes each sequence
    (the long factors for every position from the step a sequence holds 33 tokens on: its uncached generate and
    repeated full forwards; transformers 5.17's cached generate() feeds the last token alone, without its cache,
    from that step on): the same greedy tokens, each step's log-probability of them to 1e-4; with a long prompt in
    the batch as well (it joins the second call); and a stop token met before the context ends a sequence there."""
    prompts, greedy, steps = zip(*cases(name, "transformers_outputs_cross.npz"))
    m = model(name)
    g = generate(m, list(prompts), max_new_tokens=len(greedy[0]), sampling="greedy", eos_ids=())
    assert g.stats["longrope_calls"] == 2 and g.stats["generated_tokens"] == 3 * len(greedy[0])
    for b in range(len(prompts)):
        assert g.tokens[b].tolist() == greedy[b]
        want = jax.nn.log_softmax(steps[b], axis=-1)[np.arange(len(greedy[b])), greedy[b]]
        np.testing.assert_allclose(g.logprobs[b], want, atol=1e-4)
    long_prompt, long_greedy, _ = cases(name, "transformers_outputs_long.npz")[1]
    mixed = generate(m, [prompts[0], long_prompt], max_new_tokens=len(greedy[0]), sampling="greedy", eos_ids=())
    assert mixed.tokens[0].tolist() == greedy[0]
    assert mixed.tokens[1, :len(long_greedy)].tolist() == long_greedy
    with pytest.raises(ValueError, match=r"sequence 1: prompt of 41 tokens \+ max_new_tokens 88 exceeds the model's "
                                         r"maximum length 128 \(past the longrope context of 32 tokens"):
        generate(m, [prompts[0], long_prompt], max_new_tokens=88, sampling="greedy", eos_ids=())  # before any call
    with pytest.raises(ValueError, match=r"prompt 1 \(sequence 2 of the prompts x num_samples 2\): prompt of 41 "
                                         r"tokens \+ max_new_tokens 88"):  # the user's prompt, as prefill names it
        generate(m, [prompts[0], long_prompt], num_samples=2, max_new_tokens=88, sampling="greedy", eos_ids=())
    stop = greedy[0][3]  # met before the context (the prompt holds 10): no second call for that sequence
    early = generate(m, [prompts[0]], max_new_tokens=len(greedy[0]), sampling="greedy", eos_ids=[stop])
    k = greedy[0].index(stop)
    assert early.lengths[0] == k + 1 and early.tokens[0, :k + 1].tolist() == greedy[0][:k + 1]
    assert early.stats["longrope_calls"] == 1


@pytest.mark.parametrize("first_chunks,rate", [((0.5, 1.0), 100.0),  # the second call has only its first chunk
                                                ((1.0, 1.0), (100 * 1 + 1000 * 1) / 2)])  # neither call: whole times
def test_longrope_calls_combine_their_decode_rates(monkeypatch, first_chunks, rate):
    """generate()'s two calls across the longrope context report one decode rate: each call's rate weighted by its
    time after its first chunk (a call with none weighs nothing), or, where no call has any, by its whole time;
    steps and times add up (`_generate_tree` stubbed: each call generates its whole budget and reports set times)."""
    rates = iter([100.0, 1000.0])
    halves = iter(first_chunks)

    def fake(model, tree, budgets, stop_tokens, **kw):
        b, n, v = tree.num_sequences, int(max(budgets)), model.config.vocab_size
        stats = dict(decode_s=1.0, first_chunk_s=next(halves), decode_tokens_per_s=next(rates), decode_steps=n)
        return np.ones((b, n), np.int32), np.asarray(budgets), np.zeros((b, n), np.float32), np.zeros((b, v)), stats

    # the module (the package's `models.generate` is the function)
    monkeypatch.setattr(importlib.import_module("models.generate"), "_generate_tree", fake)
    m = model("hf_phi4_partial")  # longrope context 32
    g = generate(m, [[1] * 30], max_new_tokens=6, sampling="greedy", eos_ids=())
    assert g.stats["longrope_calls"] == 2 and g.stats["decode_steps"] == 6 and g.stats["decode_s"] == 2.0
    assert g.stats["decode_tokens_per_s"] == pytest.approx(rate)


@pytest.mark.parametrize("seed,second", [(7, 8), (-1, 0), (2**63 - 1, -2**63)])
def test_longrope_second_call_takes_the_next_seed_wrapped(monkeypatch, seed, second):
    """The call past the longrope context samples with ``seed`` + 1, wrapped into the seeds' range: 2**63 - 1, a
    valid seed, made the second call refuse 2**63 after the first had run (`_generate_tree` stubbed)."""
    seeds = []

    def fake(model, tree, budgets, stop_tokens, **kw):
        seeds.append(kw["seed"])
        b, n, v = tree.num_sequences, int(max(budgets)), model.config.vocab_size
        stats = dict(decode_s=1.0, first_chunk_s=0.5, decode_tokens_per_s=1.0, decode_steps=n)
        return np.ones((b, n), np.int32), np.asarray(budgets), np.zeros((b, n), np.float32), np.zeros((b, v)), stats

    monkeypatch.setattr(importlib.import_module("models.generate"), "_generate_tree", fake)
    m = model("hf_phi4_partial")  # longrope context 32
    generate(m, [[1] * 30], max_new_tokens=6, sampling={"temperature": 1.0}, seed=seed, eos_ids=())
    assert seeds == [seed, second]
    with pytest.raises(ValueError, match=r"seed must be an integer in \[-2\*\*63, 2\*\*63\)"):
        generate(m, [[1] * 30], max_new_tokens=6, sampling={"temperature": 1.0}, seed=2**63, eos_ids=())
    assert len(seeds) == 2  # refused before any call


def test_longrope_calls_name_bad_eos_ids_first():
    """Sequences that cross the longrope context generate in two calls, which read eos_ids before any prefill:
    a bad one is named there as in one call (it was a bare TypeError)."""
    m = model("hf_phi4_partial")  # longrope context 32
    for eos, crossing in ((5, 6), (5, 1), ([None], 6)):
        with pytest.raises(ValueError, match=r"eos_ids must be a sequence of token ids in \[0, \d+\), got"):
            generate(m, [[1] * 30], max_new_tokens=crossing, sampling="greedy", eos_ids=eos)


@pytest.mark.parametrize("name", ["hf_phi3_longrope", "hf_phi4_partial", "hf_llama_longrope"])
@pytest.mark.parametrize("mode", ["hydragen", pytest.param("standard", marks=pytest.mark.slow)])
def test_longrope_prompts_past_the_pretraining_context_match_transformers(name, mode):
    """Prompts longer than original_max_position_embeddings (43, 41 and 45 tokens sharing 40, context 32):
    transformers computes them with the long factors from the first token; so do the dense forward (chosen by the
    sequences' width, as transformers chooses per call) and generation (prefill chooses, the decode state keeps it):
    logits to 1e-5, the same greedy tokens."""
    prompts, greedy, want = zip(*cases(name, "transformers_outputs_long.npz"))
    m = model(name)
    assert min(map(len, prompts)) > m.config.longrope_context
    got = full_logits(m, [p + g for p, g in zip(prompts, greedy)])
    for b in range(len(prompts)):
        assert rel_err(got[b], want[b]) <= FP32_TOL
    state = prefill(m, list(prompts), len(greedy[0]), mode=mode, eos_ids=())
    assert state.long_rope
    g = generate(m, list(prompts), max_new_tokens=len(greedy[0]), sampling="greedy", mode=mode, eos_ids=())
    for b, p in enumerate(prompts):
        assert g.tokens[b].tolist() == greedy[b]
        assert rel_err(g.logits[b], want[b][len(p) - 1]) <= FP32_TOL


def test_longrope_past_the_context_is_what_the_fixture_tests(monkeypatch):
    """The short factors on the long prompts (a loader that never switches) are far off transformers' logits."""
    m = model("hf_phi3_longrope")
    prompt, greedy, want = cases("hf_phi3_longrope", "transformers_outputs_long.npz")[2]
    monkeypatch.setattr(LlamaConfig, "with_long_rope", lambda self, long: self)
    assert rel_err(full_logits(m, [prompt + greedy])[0], want) > 100 * FP32_TOL


def test_nope_layers_are_what_the_fixture_tests():
    """SmolLM3's fixture with RoPE in its fourth layer too is far off: the comparison sees a NoPE layer misread."""
    m = model("hf_smollm3")
    prompt, greedy, want = cases("hf_smollm3")[2]
    wrong = Llama(dataclasses.replace(m.config, rope_layers=None), m.params())
    assert rel_err(full_logits(wrong, [prompt + greedy])[0], want) > 100 * FP32_TOL


def test_granite_multipliers_multiply_in_float32_as_torch_does():
    """transformers multiplies a bfloat16 tensor by Granite's residual_multiplier (0.22) in float32 and rounds the
    product once; JAX rounded the factor to bfloat16 first (0.2197: every residual branch 0.12 % low). Both
    multipliers now as torch, bit for bit on random bfloat16 activations."""
    import ml_dtypes  # noqa: PLC0415

    c = dataclasses.replace(model("hf_granite").config, residual_multiplier=0.22, embedding_multiplier=12.3)
    y = jax.random.normal(jax.random.key(0), (4, 64), jnp.float32).astype(jnp.bfloat16)
    for got, factor in ((llama._residual(c, y), 0.22), (llama.scale_embeddings(c, y), 12.3)):
        want = (np.asarray(y, np.float32) * np.float32(factor)).astype(ml_dtypes.bfloat16)
        assert got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("scalar", ["embedding_multiplier", "attention_multiplier", "residual_multiplier",
                                    "logits_scaling"])
def test_granite_scalars_are_what_the_fixture_tests(scalar):
    """Each of Granite's four scalars read as 1 (attention_multiplier as 1/sqrt(head_dim), Llama's) moves the
    fixture's logits far beyond the tolerance."""
    m = model("hf_granite")
    prompt, greedy, want = cases("hf_granite")[2]
    wrong = Llama(dataclasses.replace(m.config, **{scalar: None if scalar == "attention_multiplier" else 1.0}),
                  m.params())
    assert rel_err(full_logits(wrong, [prompt + greedy])[0], want) > 100 * FP32_TOL


@pytest.mark.parametrize("misread", ["q/k norms of one", "output norms swapped"])
def test_olmo2_norms_are_what_the_fixture_tests(misread):
    """OLMo 2's q / k norm weights and which output each post-norm belongs to change the fixture's logits far beyond
    the tolerance."""
    m = model("hf_olmo2")
    prompt, greedy, want = cases("hf_olmo2")[2]
    params = m.params()
    for layer in params["layers"]:
        if misread == "q/k norms of one":
            layer.update({k: jnp.ones_like(layer[k]) for k in ("q_proj_norm", "k_proj_norm")})
        else:
            layer.update(attn_out_norm=layer["mlp_out_norm"], mlp_out_norm=layer["attn_out_norm"])
    assert rel_err(full_logits(Llama(m.config, params), [prompt + greedy])[0], want) > 100 * FP32_TOL


@pytest.mark.parametrize("misread", ["gate and up swapped", "k and v swapped"])
def test_phi3_fused_tensors_are_what_the_fixture_tests(misread):
    """Which rows of Phi-3's fused gate_up_proj / qkv_proj are which projection changes the fixture's logits far
    beyond the tolerance."""
    m = model("hf_phi3")
    prompt, greedy, want = cases("hf_phi3")[2]
    params = m.params()
    for layer in params["layers"]:
        if misread == "gate and up swapped":
            layer["w_gate_up"] = layer["w_gate_up"][:, ::-1]
        else:
            D = m.config.head_dim
            q, k, v = unpack_qkv(layer["w_qkv"], D)
            layer["w_qkv"] = pack_qkv(q, v, k, D)
    assert rel_err(full_logits(Llama(m.config, params), [prompt + greedy])[0], want) > 100 * FP32_TOL


@pytest.mark.parametrize("misread", ["embeddings not scaled", "norm weights without the 1", "SiLU for GELU"])
def test_gemma_is_what_the_fixture_tests(monkeypatch, misread):
    """Each of Gemma's differences from Llama read as Llama's (embeddings not times sqrt(hidden_size), RMSNorm times
    its stored weight instead of 1 + weight, SiLU instead of tanh GELU in the MLP) moves the fixture's logits far
    beyond the tolerance."""
    m = model("hf_gemma")
    prompt, greedy, want = cases("hf_gemma")[2]
    family = m.config.family
    if misread == "SiLU for GELU":
        monkeypatch.setitem(llama.ACTIVATIONS, m.config.hidden_act, jax.nn.silu)
    else:
        flag = "scaled_embeddings" if misread == "embeddings not scaled" else "unit_offset_norms"
        monkeypatch.setitem(config_module.FAMILIES, "gemma", dataclasses.replace(family, **{flag: False}))
    assert rel_err(full_logits(m, [prompt + greedy])[0], want) > 100 * FP32_TOL


def test_gemma_hidden_act_gelu_is_exact_gelu_as_in_transformers(tmp_path):
    """Gemma 1's config.json says hidden_act "gelu", and one written for transformers 4.42 may carry hidden_activation
    "gelu_pytorch_tanh" beside it: transformers 5 runs exact GELU for that, reading hidden_act only, and so does the
    loader. The fixture's weights with that config give transformers' logits of it; the tanh GELU's are more than 20
    times the tolerance away from them."""
    entry = MANIFEST["fixtures"]["hf_gemma"]["gelu"]
    for f in ("model.safetensors", "config.json"):
        (tmp_path / f).write_bytes((FIXTURES / "hf_gemma" / f).read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, **entry["config_changes"])))
    m = load_checkpoint(tmp_path)
    assert m.config.hidden_act == "gelu" and entry["config_changes"]["hidden_activation"] == "gelu_pytorch_tanh"
    prompts, greedy, want = zip(*cases("hf_gemma", entry["outputs"]))
    seqs = [p + g for p, g in zip(prompts, greedy)]
    for b, (got, tanh) in enumerate(zip(full_logits(m, seqs), full_logits(model("hf_gemma"), seqs))):
        assert rel_err(got, want[b]) <= FP32_TOL
        assert rel_err(tanh, want[b]) > 20 * FP32_TOL


def test_gemma_saved_and_read_back(tmp_path):
    """Gemma's norm weights are saved as they are stored (offsets from 1), its activation and head_dim written:
    the saved checkpoint loads to the same parameters and logits (and transformers 5.17 reads it to the fixture's
    logits, bit for bit, in float32 and bfloat16 files: checked by hand, as this suite runs without torch)."""
    m = model("hf_gemma")
    save_checkpoint(m, tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert (written["model_type"], written["hidden_act"], written["head_dim"]) == ("gemma", "gelu_pytorch_tanh", 32)
    again = load_checkpoint(tmp_path)
    assert again.config == m.config
    for a, b in zip(jax.tree.leaves(again.params()), jax.tree.leaves(m.params())):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    prompt, greedy, _ = cases("hf_gemma")[0]
    np.testing.assert_array_equal(full_logits(again, [prompt + greedy])[0], full_logits(m, [prompt + greedy])[0])


@pytest.mark.parametrize("backend", [pytest.param("interpret", marks=pytest.mark.slow),  # ~12 s of CPU; D 256 in
                                     # the kernels' own tests (tests/test_attention.py) runs in CI
                                     pytest.param("pallas", marks=pytest.mark.gpu),
                                     pytest.param("mosaic", marks=pytest.mark.gpu)])
def test_gemma_head_dim_256_runs_through_the_attention_kernels(backend):
    """Gemma's real head_dim, 256, in a tiny model: Hydragen's prefill and decode through the Pallas kernels
    (interpreted on CPU; compiled on a GPU, where the Hopper kernel refuses D 256 and "mosaic" falls back to Triton)
    give the jnp reference's tokens and logits."""
    if (backend == "interpret") == (jax.default_backend() == "gpu"):
        pytest.skip("interpreted on CPU; compiled on a GPU")
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=256, max_position_embeddings=64,
                         eos_token_ids=(), model_type="gemma")
    m = init_random(config, jnp.float32, seed=3)
    assert not np.asarray(m.params()["final_norm"]).any()  # norms that scale by 1: Gemma stores 0
    prompts = [[5, 6, 7, 8, 9, 10, 11, 3], [5, 6, 7, 8, 9, 10, 11, 4, 12], [5, 6, 7, 8, 9, 10, 11]]
    got, want = (generate(m, prompts, max_new_tokens=3, sampling="greedy", mode="hydragen", backend=b, eos_ids=())
                 for b in (backend, "xla"))
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.logits, want.logits, atol=1e-4, rtol=1e-4)


def test_non_integer_token_ids_raise():
    m = model("hf_qwen2")
    for bad in ([[1.5, 2.0]], [[2.0, 3.0]], [[True, 5]], [np.array([4.0])]):
        with pytest.raises(ValueError, match="prompts: prompt 0 must be a sequence of integer token ids"):
            generate(m, bad, max_new_tokens=2)
        with pytest.raises(ValueError, match="prompts_or_tree: prompt 0 must be"):
            prefill(m, bad, 2)


# ------------------------------------------------------------------------------ exact float32


def dot_precisions(jaxpr) -> list:
    """(operand dtype, precision) of every dot_general in ``jaxpr``, sub-jaxprs (scan bodies, ...) included."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append((eqn.invars[0].aval.dtype, eqn.params["precision"]))
        for v in eqn.params.values():
            for sub in v if isinstance(v, (list, tuple)) else [v]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    out += dot_precisions(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    out += dot_precisions(sub)
    return out


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_fp32_matmuls_run_at_full_precision(dtype):
    """Traced with the platform default precision (TF32 for f32 on NVIDIA GPUs; the test suite sets "highest"
    globally, so the default is restored here), every matmul of a float32 forward (projections, attention,
    logits) asks for HIGHEST; a bfloat16 forward keeps the default."""
    cfg = dataclasses.replace(model("hf_qwen2").config, num_hidden_layers=1)
    m = init_random(cfg, dtype, seed=0)

    def forward(params):
        mm = Llama(cfg, params)
        h, _ = mm(jnp.zeros((1, 5), jnp.int32), jnp.arange(5)[None], None, causal_attention)
        return mm.logits(h)

    with jax.default_matmul_precision("default"):
        jaxpr = jax.make_jaxpr(forward)(m.params())
    found = dot_precisions(jaxpr.jaxpr)
    assert len(found) == 7  # q/k/v (packed), o, gate/up (packed), down, the two of attention, logits
    highest = (jax.lax.Precision.HIGHEST,) * 2
    if dtype == jnp.float32:
        assert all(p == highest for _, p in found), found
    else:  # unchanged: nothing asks for more than the default (jax's bf16 attention picks its own algorithm)
        assert all(p != highest for _, p in found), found


# ------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (compiled kernels, TF32 default)")
def test_gpu_longrope_generation_across_the_context_matches_transformers():
    """generate()'s two calls across Phi-4-mini's fixture's longrope context, compiled: transformers' greedy
    tokens, each step's log-probability to 1e-4 (float32)."""
    prompts, greedy, steps = zip(*cases("hf_phi4_partial", "transformers_outputs_cross.npz"))
    with jax.default_matmul_precision("default"):
        g = generate(model("hf_phi4_partial"), list(prompts), max_new_tokens=len(greedy[0]), sampling="greedy",
                     eos_ids=())
    assert g.stats["longrope_calls"] == 2
    for b in range(len(prompts)):
        assert g.tokens[b].tolist() == greedy[b]
        want = jax.nn.log_softmax(steps[b], axis=-1)[np.arange(len(greedy[b])), greedy[b]]
        np.testing.assert_allclose(g.logprobs[b], want, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (compiled kernels, TF32 default)")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ONE_PER_FAMILY + ["hf_phi4_partial", "hf_phi4_partial:long"])
def test_gpu_matches_transformers(name, dtype):
    """On the GPU, at its default matmul precision (TF32 for float32; the suite's global "highest" is undone
    here): float32 as exact as on CPU (tokens equal); bfloat16 (the stored weights exactly) within bf16 rounding of
    transformers' float32 logits, its greedy tokens equal until a near-tie, where both choices are within that
    tolerance of each other. (":long": the fixture's prompts past its longrope context.)"""
    tol = FP32_TOL if dtype == "float32" else 0.05
    name, _, long = name.partition(":")
    m = model(name, jnp.dtype(dtype))
    prompts, greedy, logits = zip(*cases(name, "transformers_outputs_long.npz" if long else "transformers_outputs.npz"))
    with jax.default_matmul_precision("default"):
        got = full_logits(m, [p + g for p, g in zip(prompts, greedy)])
        g = generate(m, list(prompts), max_new_tokens=len(greedy[0]), sampling="greedy", mode="hydragen",
                     eos_ids=())
    for b in range(len(prompts)):
        assert rel_err(got[b], logits[b]) <= tol
    for b, p in enumerate(prompts):
        assert rel_err(g.logits[b], logits[b][len(p) - 1]) <= tol
        ours, theirs = g.tokens[b].tolist(), greedy[b]
        if dtype == "float32":
            assert ours == theirs
        elif ours != theirs:
            k = next(i for i in range(len(ours)) if ours[i] != theirs[i])
            row = logits[b][len(p) - 1 + k]  # transformers' logits where the two paths part
            assert row[theirs[k]] - row[ours[k]] <= tol * np.abs(row).max()
