"""models.generate: the attention modes agree, sampling, stops, chunked decode, bad input, GPU bf16."""

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.config import LlamaConfig
from models.generate import (SamplingConfig, categorical, compile_decode, decode, generate, prefill, sample,
                             top_k_mask, top_p_mask)
from models.llama import Llama, init_params, init_random
from models.sharing import SharedLevel, SharingTree, build_sharing_tree, expand_samples
from models.tokenizer import ByteTokenizer

CFG = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=512, eos_token_ids=())


@pytest.fixture(scope="module")
def model():
    return init_random(CFG, jnp.float32, seed=7)


def fewshot_prompts(seed=0, vocab=97):
    """Few-shot prefix -> 4 ragged problems (one without the prefix) -> samples: a depth-2 tree."""
    rng = np.random.default_rng(seed)
    few = rng.integers(0, vocab, 40).tolist()
    problems = [rng.integers(0, vocab, n).tolist() for n in (5, 11, 2, 8)]
    prompts = [few + p for p in problems[:3]] + [rng.integers(0, vocab, 9).tolist()]
    return prompts


def test_modes_agree_greedy_fp32(model):
    prompts = fewshot_prompts()
    runs = {mode: generate(model, prompts, num_samples=3, max_new_tokens=64, mode=mode)
            for mode in ("hydragen", "standard", "shared_storage")}
    h = runs["hydragen"]
    assert h.tokens.shape == (12, 64) and (h.lengths == 64).all()
    assert len(h.tree.levels) == 2  # few-shot prefix, then each problem
    for mode in ("standard", "shared_storage"):
        np.testing.assert_array_equal(runs[mode].tokens, h.tokens, err_msg=mode)
        np.testing.assert_allclose(runs[mode].logits, h.logits, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(runs[mode].logprobs, h.logprobs, atol=1e-4)
    assert len({tuple(t) for t in h.tokens}) >= 4  # the prompts lead to different completions
    none = generate(model, prompts, num_samples=3, max_new_tokens=8, mode="none")
    assert none.tokens.shape == (12, 8) and np.isfinite(none.logprobs).all()


# hydragen in CI; standard and shared_storage run the same kernels per sequence (tests/test_out_of_range.py decodes
# them interpreted in CI)
@pytest.mark.parametrize("mode", ["hydragen", pytest.param("standard", marks=pytest.mark.slow),
                                  pytest.param("shared_storage", marks=pytest.mark.slow)])
def test_modes_agree_interpret_backend(model, mode):
    """The Pallas kernels (interpreted on CPU) in the model give the same greedy tokens as the jnp path."""
    rng = np.random.default_rng(1)
    shared = rng.integers(0, 97, 12).tolist()
    prompts = [shared + [3, 4, 5], shared + [6], shared + [7, 8]]
    ref = generate(model, prompts, num_samples=2, max_new_tokens=6, backend="xla")
    g = generate(model, prompts, num_samples=2, max_new_tokens=6, mode=mode, backend="interpret")
    np.testing.assert_array_equal(g.tokens, ref.tokens, err_msg=mode)
    np.testing.assert_allclose(g.logits, ref.logits, atol=1e-4, rtol=1e-4)


# CI: float32 and "mixed" (bf16 weights); bf16 throughout in the slow tier (CI time)
@pytest.mark.parametrize("dtype", [jnp.float32, pytest.param(jnp.bfloat16, marks=pytest.mark.slow), "mixed"])
def test_prefill_in_chunks_equals_one_chunk(model, dtype):
    """A prompt level prefilled in several chunks (one compiled loop over them) gives the caches and first logits of
    one chunk: chunks of 4 and 7 tokens over levels of 40 and 2-11 tokens (ragged, some shorter than a chunk).
    "mixed": bf16 weights with a float32 final norm (its hidden state float32, wider than the embedding)."""
    if dtype == "mixed":
        params = init_random(CFG, jnp.bfloat16, seed=7).params()
        m = Llama(CFG, {**params, "final_norm": params["final_norm"].astype(jnp.float32)})
        dtype = jnp.bfloat16
    else:
        m = model if dtype == jnp.float32 else init_random(CFG, dtype, seed=7)
    prompts = fewshot_prompts()
    one = prefill(m, prompts, 4, prefill_chunk=64)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == jnp.float32 else dict(atol=5e-2, rtol=5e-2)
    for chunk in (4, 7):
        many = prefill(m, prompts, 4, prefill_chunk=chunk)
        np.testing.assert_array_equal(many.positions, one.positions)
        np.testing.assert_allclose(np.asarray(many.logits, np.float32), np.asarray(one.logits, np.float32), **tol)
        levels = [(a, b) for a, b in zip(many.cache.shared, one.cache.shared)] + [(many.cache, one.cache)]
        for a, b in levels:
            np.testing.assert_array_equal(a.lengths, b.lengths)
            for x, y in zip(a.k + a.v, b.k + b.v):
                np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), **tol)


def test_prompts_of_other_lengths_within_the_padding_share_one_compiled_prefill(model, monkeypatch):
    """The same tree shape with a shared prefix of 20, 23 or 29 tokens and suffixes of 1-3 (all under one
    pad_multiple of 16) traces the prefill once (it traced once a length: the token arrays were as wide as the
    longest node), and the padding does not change the logits (pad_multiple 1 against 16)."""
    generate_lib = importlib.import_module("models.generate")  # (models.generate is also the function's name)
    traces = []

    class Counted(generate_lib.Llama):
        def __init__(self, *args, **kwargs):
            traces.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(generate_lib, "Llama", Counted)
    rng = np.random.default_rng(5)
    for n in (20, 23, 29):
        shared = rng.integers(0, 97, n).tolist()
        prompts = [shared + [1, 2], shared + [3], shared + [4, 5, 6]]
        state = prefill(model, prompts, 4)
    assert len(traces) <= 1  # (none where an earlier test in this process compiled the same plan)
    np.testing.assert_allclose(state.logits, prefill(model, prompts, 4, pad_multiple=1).logits, rtol=1e-5, atol=1e-5)


def test_nothing_compiles_while_the_decode_rate_is_measured(model, monkeypatch):
    """Once the decode loop is compiled, generate's host loop compiles nothing (a jnp.all of the done flags compiled
    once a batch size, inside the window stats["decode_tokens_per_s"] is measured over: the first call's rate read
    up to 9x low)."""
    generate_lib = importlib.import_module("models.generate")
    compiled, events = [], []
    real = generate_lib.compile_decode
    monkeypatch.setattr(generate_lib, "compile_decode", lambda *a, **k: (real(*a, **k), compiled.append(1))[0])
    listener = lambda name, _secs, **_: events.append((name, len(compiled)))  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        generate(model, [[1, 2, 3, 4, 5], [1, 2, 3, 4, 6], [7]], num_samples=5, max_new_tokens=6, eos_ids=(),
                 chunk_steps=2, backend="xla")  # 15 sequences: a batch size no other test compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiled == [1]
    assert not [name for name, after in events if after and "compile" in name and "backend" in name], events


def test_other_temperatures_and_top_ps_reuse_the_compiled_loop(model):
    """temperature and top_p are traced arguments of the decode loop: another value compiles nothing (each compiled
    a decode loop: seconds for a 7B model), and each value takes effect: a tiny temperature or top_p draws the
    greedy tokens from the loop compiled for 5.0 / 0.9."""
    prompts = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 6], [9, 8]]
    kw = dict(num_samples=3, eos_ids=(), backend="xla", seed=3)
    greedy = generate(model, prompts, max_new_tokens=7, **kw).tokens
    events = []
    listener = lambda name, _secs, **_: events.append(name)  # noqa: E731
    for first, then in (({"temperature": 5.0}, {"temperature": 1e-30}),
                        ({"temperature": 1.0, "top_p": 0.9}, {"temperature": 1.0, "top_p": 1e-6})):
        hot = generate(model, prompts, max_new_tokens=7, sampling=first, **kw)
        assert (hot.tokens != greedy).any()
        jax.monitoring.register_event_duration_secs_listener(listener)
        try:
            cold = generate(model, prompts, max_new_tokens=7, sampling=then, **kw)
        finally:
            jax.monitoring.unregister_event_duration_listener(listener)
        np.testing.assert_array_equal(cold.tokens, greedy)
    assert not [name for name in events if "compile" in name and "backend" in name], events


def test_other_stop_lists_reuse_the_compiled_loop(model):
    """The state's stop ids are `[B, K]` with K a power of two of at least 4: eos and stop lists of other lengths
    within it compile nothing (each width compiled a decode loop: a server's per-request stop ids recompiled), and
    each list still stops its sequences."""
    prompts = [[1, 2, 3, 4, 5], [9, 8]]
    kw = dict(max_new_tokens=6, backend="xla")
    free = generate(model, prompts, eos_ids=(), **kw)
    first = int(free.tokens[0, 1])  # sequence 0's second token: stopping on it ends it after two
    events = []
    listener = lambda name, _secs, **_: events.append(name)  # noqa: E731
    generate(model, prompts, eos_ids=(60,), **kw)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        two = generate(model, prompts, eos_ids=(60, 61), **kw)
        out = generate(model, prompts, eos_ids=(60,), stop_tokens=[[62, 63, first], []], **kw)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert not [name for name in events if "compile" in name and "backend" in name], events
    np.testing.assert_array_equal(two.tokens, free.tokens)
    assert out.lengths[0] == 2 and int(out.tokens[0, 1]) == first
    state = prefill(model, prompts, 4, eos_ids=(60,), stop_tokens=[[1, 2, 3, 4], []], backend="xla")
    assert state.stop_tokens.shape == (2, 8)


def test_sample_refuses_a_value_for_a_setting_its_config_turns_off():
    """temperature / top_p replace the values of settings cfg turns on (the decode loop's traced ones): a value for
    one it turns off (ignored before) or a 0 temperature for a sampling cfg (NaN) is refused; a concrete top_p of 1.0,
    numpy's or JAX's, keeps every token as Python's does (float32 sums fell short of it and masked the tail)."""
    logits, key = jax.random.normal(jax.random.key(0), (3, 500)), jax.random.key(1)
    for cfg, kw in ((SamplingConfig(1.0), dict(top_p=1e-6)), (SamplingConfig(0.0), dict(temperature=0.5)),
                    (SamplingConfig(1.0, top_p=0.9), dict(top_p=1.0)), (SamplingConfig(1.0), dict(temperature=0))):
        with pytest.raises(ValueError, match=rf"sample: {next(iter(kw))}=.* where cfg has it"):
            sample(logits, key, cfg, **kw)
    for one in (1.0, np.float32(1.0), jnp.float32(1.0)):
        np.testing.assert_array_equal(np.asarray(top_p_mask(logits, one)), np.asarray(logits))
    traced = jax.jit(top_p_mask)(logits, jnp.float32(1.0))
    np.testing.assert_array_equal(np.asarray(traced), np.asarray(logits))
    rows = np.array([[1.0], [0.5], [1.0]], np.float32)  # a concrete top_p a row: as under jit (float() refused it)
    np.testing.assert_array_equal(np.asarray(top_p_mask(logits, rows)), np.asarray(jax.jit(top_p_mask)(logits, rows)))
    # the loop's knobs agree with its static config: greedy's, and a top_p that is 1.0 in float32
    generate_lib = importlib.import_module("models.generate")
    for cfg in (SamplingConfig(0.0, top_p=0.9), SamplingConfig(1.0, top_p=1 - 1e-9)):
        t, p = generate_lib._knobs(cfg)
        sample(logits, key, cfg.static(), temperature=t, top_p=p)  # concrete knobs: no refusal
    assert SamplingConfig(1.0, top_p=1 - 1e-9).static() == SamplingConfig(1.0).static()


def test_compiled_decode_copies_and_greedy_configs_share_a_loop():
    """CompiledDecode copies (its __getattr__ recursed before __init__); every greedy config is one static config."""
    import copy
    generate_lib = importlib.import_module("models.generate")
    fn = generate_lib.CompiledDecode(object(), (np.float32(1), np.float32(1)))
    assert copy.copy(fn)._knobs == fn._knobs
    assert SamplingConfig(0.0, top_k=5, top_p=0.5).static() == SamplingConfig(0.0).static()


def test_a_prompt_too_long_is_named_as_the_users_prompt(model):
    """With num_samples > 1 the refusal names the prompt the user passed (it named sequence 3 of the expanded
    prompts for the second of two prompts)."""
    with pytest.raises(ValueError, match=r"prompt 1 \(sequence 3 of the prompts x num_samples 3\): prompt of 505 "
                                         r"tokens \+ max_new_tokens 9 exceeds the model's"):
        generate(model, [[1] * 10, [2] * 505], num_samples=3, max_new_tokens=9, backend="xla")


def test_prefill_token_widths():
    """A prefill's token arrays: powers of two below pad_multiple (a one-token suffix stays one wide), multiples of
    it from there; pad_multiple 1 gives exact widths."""
    width = importlib.import_module("models.generate")._token_width
    assert [width(x, 16) for x in (0, 1, 2, 3, 5, 9, 16, 17, 33)] == [1, 1, 2, 4, 8, 16, 16, 32, 48]
    assert [width(x, 24) for x in (17, 24, 25)] == [24, 24, 48] and [width(x, 1) for x in (1, 3, 17)] == [1, 3, 17]


def test_chunked_decode_equals_generate(model):
    prompts = fewshot_prompts(seed=2)
    full = generate(model, prompts, num_samples=2, max_new_tokens=20, sampling={"temperature": 0.8}, seed=3)
    state = prefill(model, expand_samples(prompts, 2), 20, seed=3)
    state = decode(model, state, 0, sampling={"temperature": 0.8})
    assert int(state.step) == 0
    state = decode(model, state, jnp.int32(7), sampling={"temperature": 0.8})
    assert int(state.step) == 7
    state = decode(model, state, 2**31 - 1, sampling={"temperature": 0.8})  # step + num_steps would overflow int32
    assert int(state.step) == 20
    state = decode(model, state, 2**40, sampling={"temperature": 0.8})  # more steps than int32 holds: none left
    assert int(state.step) == 20
    np.testing.assert_array_equal(np.asarray(state.tokens), full.tokens)


def test_prefill_and_decode_nest_under_a_users_trace(model):
    """At the top level prefill and decode compile with models.COMPILER_OPTIONS; under an outer trace (eval_shape, a
    user's jit) they are part of that program, where XLA refuses per-jit compiler options: same results."""
    import models  # noqa: PLC0415

    prompts = expand_samples(fewshot_prompts(seed=4), 2)
    shapes = jax.eval_shape(lambda: prefill(model, prompts, 6).cache)
    state = prefill(model, prompts, 6)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), shapes) == jax.tree.map(lambda x: (x.shape, x.dtype), state.cache)
    top = decode(model, prefill(model, prompts, 6), 5)
    nested = jax.jit(lambda params, s: decode(models.Llama(CFG, params), s, 5))(model.params(), state)
    np.testing.assert_array_equal(np.asarray(nested.tokens), np.asarray(top.tokens))


def test_compiler_options_leave_to_xla_flags_what_they_set():
    """models.COMPILER_OPTIONS (the dot merger off, CONCURRENT command buffers) leaves out an option that XLA_FLAGS
    set when it was imported: per-jit options would otherwise override a user's flag or a probe's A/B."""
    import os  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    from models import llama  # noqa: PLC0415

    both = ["xla_gpu_command_buffer_scheduling_mode", "xla_gpu_dot_merger_threshold_mb"]
    for flags, left in (("", both), ("--xla_gpu_command_buffer_scheduling_mode=LHS", both[1:]),
                        ("--xla_gpu_dot_merger_threshold_mb=4 --x=1", both[:1]),
                        ("--xla_gpu_dot_merger_threshold_mb_more=4", both)):  # another flag's name, not this one's
        assert sorted(llama.compiler_options(flags)) == left, flags
    # read from XLA_FLAGS when models is imported (one process: each import costs seconds of CI)
    code = "import models; print(sorted(models.COMPILER_OPTIONS))"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_gpu_command_buffer_scheduling_mode=LHS")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[-2] == "['xla_gpu_dot_merger_threshold_mb']"


def test_generation_under_jax_enable_x64_is_the_same(model):
    """With jax_enable_x64 on (a user's process may need it), generate, prefill and decode run as without it (the
    models are 32-bit: Python ints traced as int64 beside their int32 positions failed)."""
    prompts = [[1, 2, 3, 4], [1, 2, 3, 5]]
    want = generate(model, prompts, max_new_tokens=3, backend="interpret").tokens
    with jax.enable_x64(True):
        got = generate(model, prompts, max_new_tokens=3, backend="interpret").tokens
        state = decode(model, prefill(model, prompts, 3), 3)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.asarray(state.tokens), want)
    for sampling in (None, {"temperature": 0.7, "top_p": 0.9}):  # compile_decode's function called under x64 (its
        fn, _ = compile_decode(model, prefill(model, prompts, 3), sampling=sampling)  # float32 knobs, not float64)
        want = fn(model.params(), prefill(model, prompts, 3), jnp.int32(3)).tokens
        with jax.enable_x64(True):
            got = fn(model.params(), prefill(model, prompts, 3), jnp.int32(3)).tokens
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # a traced 64-bit step count past int32 is clipped in its own type before the 32-bit loop (not wrapped:
    # 2^32 + 1 would run 1 step, 2^40 none), a negative one to 0 steps
    with jax.enable_x64(True):
        run = jax.jit(lambda st, n: decode(model, st, n))
        for steps, taken in ((jnp.int64(2**40), 3), (jnp.int64(2**32 + 1), 3), (jnp.uint64(2**33), 3),
                             (jnp.int64(-2**32 + 2), 0)):
            assert int(run(prefill(model, prompts, 3), steps).step) == taken, steps


def test_explicit_tree_equals_auto(model):
    prompts = fewshot_prompts(seed=4)
    seqs = expand_samples(prompts, 2)
    flat = build_sharing_tree(seqs, max_depth=0)  # no sharing at all: every token in the suffix
    a = generate(model, prompts, num_samples=2, max_new_tokens=10)
    b = generate(model, prompts, num_samples=2, max_new_tokens=10, tree=flat)
    assert b.tree.levels == ()
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-4, rtol=1e-4)


def test_a_node_reached_through_twin_ancestors_equals_one_ancestor(model):
    """Sequences that read one node through two ancestor nodes of the same tokens (allowed: the same prefix) get the
    tokens of the tree in which they share one ancestor."""
    few, problem = (5, 6, 7, 8, 9, 10), (11, 12, 13)
    prompts = [few + problem + (20 + b,) for b in range(3)]
    one = SharingTree((SharedLevel((few,), (0, 0, 0)), SharedLevel((problem,), (0, 0, 0))),
                      tuple((20 + b,) for b in range(3)))
    twins = SharingTree((SharedLevel((few, few), (0, 1, 1)), SharedLevel((problem,), (0, 0, 0))), one.suffixes)
    a = generate(model, prompts, max_new_tokens=6, tree=one)
    b = generate(model, prompts, max_new_tokens=6, tree=twins)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logits, b.logits, atol=1e-4, rtol=1e-4)


def test_seeds_reproducible(model):
    prompts = fewshot_prompts(seed=5)
    kw = dict(num_samples=4, max_new_tokens=12, sampling={"temperature": 1.0, "top_k": 20, "top_p": 0.9})
    a = generate(model, prompts, seed=11, **kw)
    b = generate(model, prompts, seed=11, **kw)
    c = generate(model, prompts, seed=12, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.tokens != c.tokens).any()
    assert len({tuple(t) for t in a.tokens[:4]}) > 1  # samples of one prompt differ


def test_top_k_mask():
    logits = jnp.array([[1.0, 5.0, 3.0, 4.0, 2.0]])
    np.testing.assert_array_equal(np.isfinite(top_k_mask(logits, 2)), [[False, True, False, True, False]])
    np.testing.assert_array_equal(top_k_mask(logits, 0), logits)


def test_top_p_mask():
    logits = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]]))
    keep = lambda p: np.isfinite(np.asarray(top_p_mask(logits, p)))[0].tolist()
    assert keep(0.5) == [False, True, False, False]
    assert keep(0.7) == [False, True, False, True]
    assert keep(0.81) == [False, True, True, True]
    assert keep(1.0) == [True, True, True, True]


def test_top_p_mask_keeps_the_mass_of_tied_tokens_as_transformers():
    """Tokens tied with the last one the nucleus needs are not all kept (a logit threshold kept them: [2, 1, 1, 1, 1]
    at p = 0.5 kept all five); the set has the mass of transformers' TopPLogitsWarper's (of tied tokens, the lower
    ids here)."""
    keep = lambda x, p: np.isfinite(np.asarray(top_p_mask(jnp.array([x], jnp.float32), p)))[0].tolist()  # noqa: E731
    assert keep([2.0, 1, 1, 1, 1], 0.5) == [True, True, False, False, False]
    assert keep([0.0, 0, 0, 0], 0.3) == [True, True, False, False]
    assert keep([1.0, 3, 1, 3], 0.6) == [False, True, False, True]
    def nucleus(x, p):  # the rule: the fewest most likely tokens of mass >= p; of tied tokens the lower ids first
        # (transformers' warper keeps the same mass; which of tied tokens, its sort decides)
        x = np.asarray(x, np.float64)
        probs = np.exp(x - x.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        order = np.argsort(-x, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(probs, order, -1)
        want = np.zeros(x.shape, bool)
        np.put_along_axis(want, order, np.cumsum(sorted_p, -1) - sorted_p < p, -1)
        return want, probs

    logits = jnp.round(jax.random.normal(jax.random.key(3), (64, 50)) * 2) / 2  # many ties
    for p in (0.1, 0.5, 0.9, 0.999):
        got = np.isfinite(np.asarray(top_p_mask(logits, p)))
        want, probs = nucleus(logits, p)
        np.testing.assert_array_equal(got, want)
        mass = (probs * got).sum(-1)
        assert (mass >= p - 1e-6).all() and (mass - (probs * got).min(-1, where=got, initial=1) < p + 1e-6).all()
        # traced p; and after top_k: -inf entries (tied among themselves) never kept, ties at the k-th value kept
        np.testing.assert_array_equal(np.isfinite(np.asarray(jax.jit(top_p_mask)(logits, jnp.float32(p)))), want)
        masked = top_k_mask(logits, 5)
        np.testing.assert_array_equal(np.isfinite(np.asarray(top_p_mask(masked, p))), nucleus(masked, p)[0])
    assert keep([-np.inf, 1.0, -np.inf, -np.inf], 0.999) == [False, True, False, False]


def test_sample_checks_its_keyword_values_and_takes_any_config_form():
    """sample()'s temperature / top_p keywords are checked as SamplingConfig's own (top_p 0 drew the second least
    likely token, a negative temperature the inverted distribution, NaN always token 0); cfg may be what
    decode / generate take (a dict, "greedy", None: an AttributeError before)."""
    logits, key = jnp.array([[0.0, 1.0, 5.0, 0.5]] * 3), jax.random.key(0)
    on = SamplingConfig(1.0, top_p=0.9)
    for kw, match in ((dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"), (dict(top_p=-0.5), "top_p must be"),
                      (dict(top_p=2.0), r"top_p must be in \(0, 1\], got 2.0"),
                      (dict(temperature=-1.0), "temperature must be 0 .*got -1.0"),
                      (dict(temperature=float("nan")), "temperature must be 0 .*got nan")):
        with pytest.raises(ValueError, match=match):
            sample(logits, key, on, **kw)
    for value in (jnp.asarray(0.5), np.array(0.5), np.float32(0.5)):  # concrete 0-d arrays: numbers
        sample(logits, key, on, top_p=value, temperature=value)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 0.0"):
        sample(logits, key, on, top_p=jnp.asarray(0.0))
    for cfg in ({"temperature": 1.0}, "greedy", None):
        tok, _ = sample(logits, key, cfg)
        assert tok.shape == (3,)
    assert np.asarray(sample(logits, key, None)[0]).tolist() == [2, 2, 2]


def test_a_model_that_is_not_a_llama_and_logits_that_are_not_rows_are_named(model):
    """generate(model.params(), ...) and generate(None, ...) raised AttributeError ('dict' object has no attribute
    'config'); sample() of 1-D logits an IndexError."""
    state = prefill(model, [[1, 2, 3]], 2)
    for fn, call in (("generate", lambda m: generate(m, [[1, 2, 3]], max_new_tokens=2)),
                     ("prefill", lambda m: prefill(m, [[1, 2, 3]], 2)), ("decode", lambda m: decode(m, state, 1)),
                     ("compile_decode", lambda m: compile_decode(m, state))):
        with pytest.raises(ValueError, match=rf"{fn}: model must be a models.Llama .*got dict \(parameters alone"):
            call(model.params())
        with pytest.raises(ValueError, match=rf"{fn}: model must be a models.Llama .*got NoneType$"):
            call(None)
    with pytest.raises(ValueError, match=r"sample: logits must be \[B, V'\] .*got shape \(3,\) \(one sequence: "):
        sample(jnp.array([0.0, 1, 2]), jax.random.key(0), None)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.float16, jnp.float64, "bf16"])
def test_init_random_takes_the_models_dtypes_only(dtype):
    """int32 weights were built (generate then failed naming q), float64 silently gave float32, float16 was taken
    though the models compute in float32 or bfloat16: refused by name, as load_checkpoint refuses them."""
    with pytest.raises(ValueError, match=r"init_random: dtype must be float32 or bfloat16, got"):
        init_random(CFG, dtype)
    with pytest.raises(ValueError, match=r"init_params: dtype must be float32 or bfloat16, got"):
        init_params(CFG, jax.random.key(0), dtype)


def test_config_token_ids_outside_int32():
    """An eos id outside int32 (the config accepts ids outside the vocabulary, with a warning, as transformers) never
    stops a sequence and no longer fails inside generate; a pad or bos id outside int32 is refused by name."""
    with pytest.warns(UserWarning, match="outside the vocabulary"):
        cfg = dataclasses.replace(CFG, eos_token_ids=(2**31, 5))
    out = generate(init_random(cfg, jnp.float32, seed=0), [[1, 2, 3]], max_new_tokens=3)
    assert out.tokens.shape[0] == 1
    for name in ("pad_token_id", "bos_token_id"):
        with pytest.raises(ValueError, match=rf"config: {name} must be an integer token id \(int32\) or None, got "
                                             r"2147483648"):
            dataclasses.replace(CFG, **{name: 2**31})


def test_sample_at_small_temperatures_and_huge_logits_takes_the_largest_logit():
    """Scaled by a small temperature, or large to begin with, the logits must not overflow to ties of +inf, which
    would take the first index instead of the largest logit."""
    key = jax.random.key(0)
    for logits, temperature in (([10.0, 20.0, 5.0, -3.0], 1e-37), ([10.0, 20.0, 5.0, -3.0], 1.2e-38),
                                ([3e38, 3.3e38, -3e38, 0.0], 0.5)):
        for options in ({}, dict(top_k=2), dict(top_p=0.9)):
            tok, _ = sample(jnp.array([logits]), key, SamplingConfig(temperature, **options))
            assert int(tok[0]) == 1, (logits, temperature, options)


def test_sample_distribution_and_options():
    logits = jnp.tile(jnp.array([[0.0, 1.0, 2.0, 0.5]]), (20000, 1))
    key = jax.random.key(0)
    for temp in (0.5, 1.0, 2.0):
        tok, _ = sample(logits, key, SamplingConfig(temperature=temp))
        freq = np.bincount(np.asarray(tok), minlength=4) / 20000
        np.testing.assert_allclose(freq, jax.nn.softmax(logits[0] / temp), atol=0.015)
    tok, logp = sample(logits[:3], key, SamplingConfig(temperature=0.0))
    assert (np.asarray(tok) == 2).all()
    np.testing.assert_allclose(logp, jax.nn.log_softmax(logits[0])[2], rtol=1e-6)
    tok, _ = sample(logits, key, SamplingConfig(temperature=1.0, top_k=2))
    assert set(np.unique(np.asarray(tok))) == {1, 2}
    tok, _ = sample(logits, key, SamplingConfig(temperature=5.0, top_k=1))
    assert (np.asarray(tok) == 2).all()


@pytest.mark.parametrize("spec", [dict(temperature=0.7), dict(temperature=1.3, top_k=9),
                                  dict(temperature=1.0, top_p=0.8)])
def test_sample_of_padded_logits_draws_as_the_vocabulary(spec):
    """Logits padded past the vocabulary with -inf (a mesh's vocabulary-parallel layout) draw the tokens and
    log-probs that the unpadded logits draw with the same key (a plain categorical over the padded width would not)."""
    V, pad, B = 37, 3, 64
    logits = jax.random.normal(jax.random.key(3), (B, V)) * 2
    padded = jnp.concatenate([logits, jnp.full((B, pad), -jnp.inf)], axis=-1)
    cfg = SamplingConfig(**spec)
    differs = False
    for seed in range(4):
        key = jax.random.key(seed)
        want_tok, want_logp = sample(logits, key, cfg)
        got_tok, got_logp = sample(padded, key, cfg, vocab_size=V)
        np.testing.assert_array_equal(got_tok, want_tok)
        np.testing.assert_allclose(got_logp, want_logp, rtol=1e-6)
        differs |= bool((sample(padded, key, cfg)[0] != want_tok).any())
    assert differs  # the draw this fixes: the padded width's own noise picks other tokens
    # and the draw is JAX's own: the tokens jax.random.categorical gives the cut logits (one device's draw before)
    x = logits / 1.3
    np.testing.assert_array_equal(categorical(key, jnp.concatenate([x, jnp.full((B, pad), -jnp.inf)], -1), V),
                                  jax.random.categorical(key, x, axis=-1))
    with pytest.raises(ValueError, match=r"vocab_size must be in \[1, 40\].*got 41"):
        sample(padded, key, cfg, vocab_size=V + pad + 1)


def test_eos_and_per_sequence_stop(model):
    prompts = fewshot_prompts(seed=6)
    free = generate(model, prompts, max_new_tokens=16)
    eos = int(free.tokens[0, 3])
    g = generate(model, prompts, max_new_tokens=16, eos_ids=[eos])
    for b in range(len(prompts)):
        hits = np.flatnonzero(free.tokens[b] == eos)
        want = int(hits[0]) + 1 if len(hits) else 16
        assert g.lengths[b] == want
        np.testing.assert_array_equal(g.tokens[b, :want], free.tokens[b, :want])
        assert (g.tokens[b, want:] == 0).all() and (g.logprobs[b, want:] == 0).all()
    # a stop token for the second prompt only (its 6th token)
    stop = int(free.tokens[1, 5])
    g = generate(model, prompts, max_new_tokens=16, stop_tokens=[[], [stop], [], []])
    first = int(np.flatnonzero(free.tokens[1] == stop)[0])
    assert g.lengths[1] == first + 1
    others = [b for b in range(4) if b != 1]
    assert (g.lengths[others] == 16).all()


def test_per_sequence_budgets_and_early_exit(model):
    seqs = expand_samples(fewshot_prompts(seed=8), 1)
    state = prefill(model, seqs, [3, 9, 1, 5])
    state = decode(model, state, 100, sampling="greedy")
    assert np.asarray(state.lengths).tolist() == [3, 9, 1, 5]
    assert int(state.step) == 9  # the loop stopped once every sequence was done


@pytest.mark.parametrize("pad", [-1, CFG.vocab_size + 3])
def test_pad_id_outside_the_vocabulary(model, pad):
    """A config's pad id may lie outside the vocabulary (-1 in some Llama configs): finished rows still feed it, and
    its embedding must not turn their logits into NaN; the others are unchanged."""
    import dataclasses  # noqa: PLC0415
    seqs = expand_samples(fewshot_prompts(seed=8), 1)
    want = decode(model, prefill(model, seqs, [3, 9, 1, 5]), 100, sampling="greedy")
    other = type(model)(dataclasses.replace(CFG, pad_token_id=pad), model.params())
    state = decode(other, prefill(other, seqs, [3, 9, 1, 5]), 100, sampling="greedy")
    assert np.isfinite(np.asarray(state.logits)).all()
    lengths = np.asarray(state.lengths)
    for b in range(4):
        np.testing.assert_array_equal(np.asarray(state.tokens)[b, :lengths[b]], np.asarray(want.tokens)[b, :lengths[b]])
        assert (np.asarray(state.tokens)[b, lengths[b]:] == pad).all()


def test_text_prompts_with_tokenizer():
    cfg = LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, eos_token_ids=(257,),
                      pad_token_id=258)
    m = init_random(cfg, seed=0)
    tok = ByteTokenizer()
    g = generate(m, ["def f(x):\n    return", "def g(y):\n"], num_samples=2, max_new_tokens=5, tokenizer=tok)
    assert len(g.texts) == 4 and all(isinstance(t, str) for t in g.texts)
    assert g.tree.levels[0].nodes[0] == tuple(tok.encode("def "))


def test_stats(model):
    g = generate(model, fewshot_prompts(), max_new_tokens=8, chunk_steps=np.int64(3))  # any integer type
    for k in ("compile_s", "prefill_s", "decode_s", "decode_tokens_per_s"):
        assert g.stats[k] > 0
    assert g.stats["decode_steps"] == 8  # one step, then chunks of 3: 1 + 3 + 3 + 1
    assert 0 < g.stats["first_chunk_s"] < g.stats["decode_s"]


def test_generate_calls_one_step_then_chunks(model, monkeypatch):
    """The decode loop's first call runs one step (it also loads the kernels; the rate leaves it out), the others
    `chunk_steps` each, the last cut by max_new_tokens."""
    gen = importlib.import_module("models.generate")  # the package exports a function of that name

    compile_decode, calls = gen.compile_decode, []

    def recording(*args, **kwargs):
        fn, seconds = compile_decode(*args, **kwargs)

        def run(params, state, steps):
            calls.append(int(steps))
            return fn(params, state, steps)
        return run, seconds

    monkeypatch.setattr(gen, "compile_decode", recording)
    g = generate(model, fewshot_prompts(), max_new_tokens=8, chunk_steps=3)
    assert calls == [1, 3, 3, 3] and g.stats["decode_steps"] == 8


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts=[]), r"prompts: no prompts given \(empty prompt list\)"),
    (dict(prompts=[[1, 2], []]), "prompt 1 is empty"),
    (dict(prompts=[[1] * 500], max_new_tokens=20), "exceeds the model's maximum length 512"),
    (dict(num_samples=0), "num_samples"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(chunk_steps=0), "chunk_steps must be a positive integer, got 0"),
    (dict(sampling={"temprature": 0.5}), "unknown sampling option 'temprature'"),
    (dict(sampling={"top_p": 1.5}), "top_p"),
    (dict(sampling={"temperature": -1.0}), "temperature"),
    (dict(mode="paged"), "unknown attention mode 'paged'"),
    (dict(prompts=["hello"]), "no tokenizer"),
    (dict(prompts=[[1, 200]]), r"prompts: prompt 0, position 1: token id 200 outside the vocabulary \[0, 97\)"),
    (dict(prompts=[[1, 2], [3, 4, 97, 5]]), r"prompts: prompt 1, position 2: token id 97 outside the vocabulary"),
    (dict(prompts=np.zeros((2, 2, 2), int)), r"prompts as an array must be \[B, T\] token ids \(a prompt a row\), got "
                                             r"shape \(2, 2, 2\)$"),  # its hint was "(one prompt: [prompt])"
    (dict(prompts=np.zeros((3,), int)), r"got shape \(3,\) \(one prompt: \[prompt\]\)"),
    (dict(stop_tokens=[[1]] * 5), "stop_tokens has 5 entries"),
    (dict(stop_tokens=[5, 6]), r"stop_tokens\[0\] must be a sequence of token ids in \[0, 97\), got 5"),
    (dict(stop_tokens=[[5], [45.7]]), r"stop_tokens\[1\] must be a sequence of token ids .*got \[45.7\]"),
    (dict(stop_tokens=[[5], [-1]]), r"stop_tokens\[1\] .*got \[-1\]"),  # -1 pads the stop list inside
    (dict(eos_ids=(100,)), r"eos_ids must be a sequence of token ids in \[0, 97\), got \(100,\)"),
    (dict(eos_ids=5), r"eos_ids must be a sequence of token ids in \[0, 97\), got 5"),
    (dict(max_new_tokens=True), "max_new_tokens must be a positive integer, got True"),
    (dict(max_new_tokens=2.0), "max_new_tokens must be a positive integer, got 2.0"),
    (dict(num_samples=np.int64(0)), r"num_samples must be a positive integer, got np.int64\(0\)"),
    (dict(max_depth=None), "max_depth must be an integer >= 0, got None"),
    (dict(prompts=[np.array([[1, 2], [3, 4]])]),  # was flattened into the prompt 1, 2, 3, 4
     r"prompt 0 must be a sequence of integer token ids, got array[\s\S]* \(dtype int64, shape \(2, 2\)\)"),
    (dict(prompts="hello"), r"prompts must be a list of prompts .*got 'hello' \(one prompt: \[prompt\]\)"),
    (dict(prompts=(p for p in [[1, 2]])), "prompts must be a list of prompts .*got generator"),
    (dict(seed=1.5), "seed must be an integer .*got 1.5"),
    (dict(seed=None), "seed must be an integer .*got None"),
    (dict(seed=2**63), r"seed must be an integer in \[-2\*\*63, 2\*\*63\) .*got 9223372036854775808"),  # before prefill
    (dict(seed=np.uint64(2**64 - 1)), r"seed must be an integer in \[-2\*\*63, 2\*\*63\) \(the sampling key's seed; "
                                      r"JAX keeps its low 32 bits\)"),
    (dict(stop_tokens=5), "stop_tokens must be a list of stop-id lists, one per prompt, got 5"),
    (dict(tree=[[1, 2, 3], [1, 2, 4]]), r"tree must be a SharingTree \(models.build_sharing_tree\) or None, got list"),
    # before anything compiles (it failed after the whole generation, as an AttributeError)
    (dict(tokenizer="x"), r"tokenizer must be None or an object with encode\(text\) and decode\(ids\) .*got str"),
    (dict(max_new_tokens=10**30), r"max_new_tokens 4611686018427387904 exceeds the model's"),  # not "an integer"
])
def test_bad_input(model, kwargs, match):
    args = dict(prompts=[[1, 2, 3], [1, 2, 4]], max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate(model, **args)


def test_a_tree_that_does_not_spell_the_prompts_says_where(model):
    prompts = [[1, 2, 3], [1, 2, 4]]
    other = build_sharing_tree([[1, 2, 3], [1, 2, 5]])
    with pytest.raises(ValueError, match=r"does not spell .*: sequence 1 is \[1, 2, 5\] in the tree, \[1, 2, 4\] in "
                                         "the prompts"):
        generate(model, prompts, max_new_tokens=2, tree=other)
    with pytest.raises(ValueError, match="it has 2 sequences, the prompts x num_samples 4"):
        generate(model, prompts, max_new_tokens=2, num_samples=2, tree=other)


def test_numpy_and_jax_integers_are_integers(model):
    """max_new_tokens and num_samples as numpy integers (as chunk_steps, test_stats); eos_ids and stop_tokens as
    numpy or jax arrays; prefill's sizes as 0-d arrays."""
    g = generate(model, [[1, 2, 3]], max_new_tokens=np.int64(3), num_samples=np.int32(2))
    assert g.tokens.shape == (2, 3)
    first = int(g.tokens[0, 0])
    for eos in (np.array([first]), jnp.array([first]), (np.int64(first),)):
        stopped = generate(model, [[1, 2, 3]], max_new_tokens=3, eos_ids=eos)
        assert int(stopped.lengths[0]) == 1, eos  # the first token ends it
    stopped = generate(model, [[1, 2, 3]], max_new_tokens=3, stop_tokens=[jnp.array([first])])
    assert int(stopped.lengths[0]) == 1
    state = prefill(model, [[1, 2, 3]], 2, prefill_chunk=np.array(2), pad_multiple=jnp.array(8))
    assert int(state.max_new[0]) == 2
    # prompts as a [B, T] integer array (a prompt a row), as prefill takes them
    rows = [[1, 2, 3], [1, 2, 4]]
    want = generate(model, rows, max_new_tokens=2).tokens
    for prompts in (np.array(rows), jnp.array(rows, jnp.int32)):
        np.testing.assert_array_equal(generate(model, prompts, max_new_tokens=2).tokens, want)
        np.testing.assert_array_equal(np.asarray(decode(model, prefill(model, prompts, 2), 2).tokens), want)


@pytest.mark.parametrize("kwargs, match", [
    (dict(prefill_chunk=-1), "prefill_chunk must be a positive integer, got -1"),  # silently prefilled nothing
    (dict(prefill_chunk=0), "prefill_chunk must be a positive integer, got 0"),
    (dict(prefill_chunk=True), "prefill_chunk must be a positive integer, got True"),
    (dict(pad_multiple=-16), "pad_multiple must be a positive integer, got -16"),  # gave caches of capacity 0
    (dict(max_new_tokens=1.5), r"max_new_tokens must be an integer or one integer per sequence \(2\), got 1.5"),
    (dict(max_new_tokens=[3, 4, 5]), r"max_new_tokens must be an integer or one integer per sequence \(2\)"),
    # the budget as given, not wrapped by a cast to a narrower type
    (dict(max_new_tokens=np.array([2**63, 2], np.uint64)), r"sequence 0: prompt of 6 tokens \+ max_new_tokens "
                                                          r"9223372036854775808 exceeds"),
    # Python integers past int64: the length refused (was "must be an integer", a numpy object array)
    (dict(max_new_tokens=[10**30, 3]), r"sequence 0: prompt of 6 tokens \+ max_new_tokens 4611686018427387904 exceeds"),
    (dict(max_new_tokens=10**30), r"sequence 0: prompt of 6 tokens \+ max_new_tokens 4611686018427387904 exceeds"),
    (dict(stop_tokens=5), "stop_tokens must be a list of stop-id lists, one per sequence, got 5"),
    (dict(stop_tokens=[[1]] * 3), r"stop_tokens has 3 entries, expected one per sequence \(2\)"),
    (dict(seed=-2**63 - 1), r"seed must be an integer in \[-2\*\*63, 2\*\*63\)"),
    # where the id is (it named none)
    (dict(prompts_or_tree=[[5, 6, 7, 8], [5, 6, 1, 500]]), r"prompts_or_tree\[1\], position 3: token id 500 outside "
                                                          r"the vocabulary \[0, \d+\)"),
    (dict(prompts_or_tree=build_sharing_tree([[5, 500, 7, 8], [5, 500, 1]])),  # a tree: its node and position
     r"tree\.levels\[0\]\.nodes\[0\], position 1: token id 500"),
    (dict(prompts_or_tree="hello"), r"prompts_or_tree must be a SharingTree or a list of token-id prompts .*got "
                                    r"'hello' \(text: encode it first"),
])
def test_prefill_bad_input(model, kwargs, match):
    args = dict(prompts_or_tree=[[5, 6, 7, 8, 9, 10], [5, 6, 7]], max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        prefill(model, **args)


def test_decode_and_sampling_bad_input(model):
    """decode's step count and the sampling options take integers (numpy ones too) and refuse the rest, instead of
    truncating 2.5 steps to 2 or reading -3 as 0."""
    for steps in (2.5, -3, True, np.array([2])):
        with pytest.raises(ValueError, match=r"decode: num_steps must be an integer >= 0, got"):
            decode(model, prefill(model, [[1, 2, 3]], 4), steps)
    state = decode(model, prefill(model, [[1, 2, 3]], 4), np.int64(2))
    assert int(state.step) == 2
    # counts past int32 as 0-d arrays too: as many steps as are left (not wrapped to 0 or below by the cast)
    for steps in (np.array(2**40), jnp.uint32(2**31), np.array(2**31, np.uint32)):
        assert int(decode(model, prefill(model, [[1, 2, 3]], 3), steps).step) == 3, steps
    # a JAX array's count is read on the device only (never waited for here): a negative one runs no step
    assert int(decode(model, prefill(model, [[1, 2, 3]], 3), jnp.int32(-3)).step) == 0


def test_decode_does_not_wait_for_an_array_step_count(model, monkeypatch):
    """A step count given as a JAX array (e.g. computed on the device from an earlier result) is passed to the loop
    as it is: decode() read it on the host (its sign, int()), which waited for the work computing it."""
    state = prefill(model, [[1, 2, 3]], 4)
    count = jnp.int32(2)
    reads = []
    for name in ("__int__", "__bool__", "__index__"):
        real = getattr(type(count), name)
        monkeypatch.setattr(type(count), name, lambda self, real=real, name=name: reads.append(name) or real(self))
    out = decode(model, state, count)
    monkeypatch.undo()
    assert not reads, reads
    assert int(out.step) == 2
    assert SamplingConfig(top_k=np.int64(5), temperature=np.float32(0.5)) == SamplingConfig(0.5, 5)
    for kwargs, match in ((dict(top_k=2.5), "top_k must be an integer >= 0, got 2.5"),
                          (dict(temperature=True), "temperature must be 0 .*got True"),
                          (dict(temperature=float("nan")), "temperature must be 0 .*got nan"),
                          # below float32's normals the scaled logits lose their order (a subnormal flushes to 0)
                          (dict(temperature=1e-40), r"temperature must be 0 \(greedy\) or a number in \[1.18e-38, "
                                                    r"3.4e\+38\] \(float32's normals\), got 1e-40"),
                          (dict(temperature=float("inf")), "temperature must be 0 .*got inf"),
                          # past float32's largest the logits were divided by inf: a uniform draw
                          (dict(temperature=1e308), "temperature must be 0 .*got 1e[+]?308"),
                          (dict(top_p=0), r"top_p must be in \(0, 1\], got 0")):
        with pytest.raises(ValueError, match=match):
            SamplingConfig(**kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (Pallas kernels, bf16)")
def test_modes_agree_bf16_gpu():
    cfg = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
                      eos_token_ids=())
    m = init_random(cfg, jnp.bfloat16, seed=0)
    long_prefix = np.random.default_rng(10).integers(0, 1000, 1000).tolist()
    prompts = [long_prefix + p for p in fewshot_prompts(seed=9, vocab=1000)]  # 1K-token prefix, depth-2 tree
    runs = {mode: generate(m, prompts, num_samples=8, max_new_tokens=64, mode=mode)
            for mode in ("hydragen", "standard", "shared_storage")}
    h = runs["hydragen"]
    for mode in ("standard", "shared_storage"):
        g = runs[mode]
        np.testing.assert_allclose(g.logits, h.logits, atol=0.02 * np.abs(h.logits).max())
        # bf16 greedy paths may part at near-ties: until they part, the log-probs agree; where they part, both
        # chose tokens of (nearly) equal probability
        same = np.cumprod(g.tokens == h.tokens, axis=1).astype(bool)
        assert np.abs(np.where(same, g.logprobs - h.logprobs, 0)).max() < 0.1, mode
        first = same.sum(1)
        parted = first < g.tokens.shape[1]
        if parted.any():
            at = np.abs(g.logprobs[parted, first[parted]] - h.logprobs[parted, first[parted]])
            assert at.max() < 0.1, mode
