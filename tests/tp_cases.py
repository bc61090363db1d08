"""Tensor parallelism on several devices: the cases that need a mesh (run by tests/test_models_parallel.py in a
subprocess with 4 CPU host devices; on a machine with GPUs, `python -m pytest tests/tp_cases.py` runs them on its
GPUs, the cases needing more devices than there are skipped).

Sharded vs single device: the same greedy tokens and the same logits (fp32 tolerance) in every attention mode, MHA
and GQA, 2 and 4 devices, fewer KV heads than devices; the loader and init place each shard on its device; the
compiled decode step communicates only the all-reduces of the row-parallel layers and the embedding.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import models
from hydragen_jax import tuning
from models import parallel
from models.cache import level_node_bytes
from models.config import LlamaConfig
from tests.conftest import ON_GPU, record_batch_shared
from tests.params_cases import assert_same_params
from tests.test_models_decode_step import new_buffers_of_shape

# MHA, tied embeddings, a vocabulary (97) and an MLP width (50) that 4 devices do not divide (padded).
MHA = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=50, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, head_dim=8, max_position_embeddings=256, eos_token_ids=(),
                  tie_word_embeddings=True)
# GQA 8/2 with Qwen2's q/k/v biases: on 4 devices each KV head (and its biases) is replicated on 2 of them.
GQA = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=256, eos_token_ids=(), model_type="qwen2")
# One KV head for 4 devices (MQA), Qwen3's q/k norms.
MQA = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=8, max_position_embeddings=256, eos_token_ids=(), model_type="qwen3")
# OLMo 2's norms over all heads: q's split, k's with 2 KV heads each on 2 of 4 devices.
OLMO = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=8,
                   num_key_value_heads=2, head_dim=8, max_position_embeddings=256, eos_token_ids=(), model_type="olmo2")
CONFIGS = {"mha": MHA, "gqa": GQA, "mqa": MQA, "olmo": OLMO,
           "gqa1": dataclasses.replace(GQA, num_hidden_layers=1)}  # the kernels' case: interpreting them is slow
BACKEND = None if ON_GPU else "xla"  # the kernels on a GPU, the jnp reference on CPU (one case interprets them)
MODES = ("hydragen", "shared_storage", "standard", "none")


def needs(devices: int):
    return pytest.mark.skipif(len(jax.devices()) < devices, reason=f"needs {devices} devices, "
                              f"JAX sees {len(jax.devices())}")


def prompts(vocab: int):
    """A few-shot prefix -> 3 problems of different lengths, and one prompt of its own: a two-level tree."""
    rng = np.random.default_rng(0)
    few = rng.integers(0, vocab, 24).tolist()
    return [few + rng.integers(0, vocab, n).tolist() for n in (5, 9, 2)] + [rng.integers(0, vocab, 7).tolist()]


_single: dict = {}


def single(name: str, mode: str, backend=BACKEND, sampling=None):
    """The single-device generation of config `name` (memoised)."""
    key = (name, mode, backend, str(sampling))
    if key not in _single:
        model = models.init_random(CONFIGS[name], jnp.float32, seed=5)
        _single[key] = models.generate(model, prompts(model.config.vocab_size), num_samples=2, max_new_tokens=8,
                                       mode=mode, backend=backend, sampling=sampling, seed=1)
    return _single[key]


def sharded(name: str, devices: int, mode: str, backend=BACKEND, sampling=None):
    model = models.init_random(CONFIGS[name], jnp.float32, seed=5, mesh=parallel.make_mesh(devices))
    return models.generate(model, prompts(model.config.vocab_size), num_samples=2, max_new_tokens=8, mode=mode,
                           backend=backend, sampling=sampling, seed=1)


def assert_same(got, want, mode):
    assert got.logits.shape == want.logits.shape
    np.testing.assert_allclose(got.logits, want.logits, atol=2e-5, rtol=2e-5, err_msg=mode)
    np.testing.assert_array_equal(got.tokens, want.tokens, err_msg=mode)
    np.testing.assert_allclose(got.logprobs, want.logprobs, atol=2e-5, err_msg=mode)


CASES = [(name, devices) for name in ("mha", "gqa", "mqa") for devices in (2, 4)]
# The case CI runs every time: Hydragen on GQA over 4 devices (KV heads replicated; MHA over 2 in the slow tier: the
# cost model's and sampling's tests); the whole matrix (`shared_storage`, `standard`, and `none`: no attention to
# shard, which tests/test_experiments_parallel.py runs on a mesh in CI) is marked slow (CI time).
FAST = {"hydragen": ("gqa", 4)}


def _case(mode, name, devices):
    marks = [needs(devices)] + ([] if FAST.get(mode) == (name, devices) else [pytest.mark.slow])
    return pytest.param(name, devices, mode, marks=marks, id=f"{name}-{devices}-{mode}")


@pytest.mark.parametrize("name,devices,mode", [_case(m, n, d) for m in MODES for n, d in CASES])
def test_sharded_equals_single_device(name, devices, mode):
    got = sharded(name, devices, mode)
    assert_same(got, single(name, mode), mode)
    if mode != "none":  # the text of mode none is meaningless, but the others must write real completions
        assert len({tuple(t) for t in got.tokens}) >= 3


@pytest.mark.parametrize("name", [pytest.param("gqa", marks=needs(4)),
                                  pytest.param("mqa", marks=[needs(4), pytest.mark.slow]),
                                  pytest.param("olmo", marks=[needs(4), pytest.mark.slow])])
def test_biases_and_norms_follow_their_heads_on_the_mesh(name):
    """Qwen2's q/k/v biases, Qwen3's q/k norms and OLMo 2's norms over all heads made random (`init_random` makes
    biases 0 and norms 1, which would hide a bias or a norm on the wrong head): the model placed on 4 devices (KV
    heads, and the biases in their packed groups, OLMo 2's k norm weights with them, replicated) generates what the
    single-device model does."""
    config = CONFIGS[name]
    rng = np.random.default_rng(3)
    varied = ("b_qkv", "q_norm", "k_norm", "attn_norm", "mlp_norm", "q_proj_norm", "k_proj_norm", "attn_out_norm",
              "mlp_out_norm")

    def vary(key, x):
        return x + jnp.asarray(rng.normal(size=x.shape) * 0.5, x.dtype) if key in varied else x

    one = models.Llama(config, parallel.map_params(vary, models.init_random(config, jnp.float32, seed=5).params()))
    assert any(key in layer for layer in one.params()["layers"] for key in ("b_qkv", "q_norm", "q_proj_norm"))
    model = parallel.shard_model(one, parallel.make_mesh(4))

    def run(m):
        return models.generate(m, prompts(config.vocab_size), num_samples=2, max_new_tokens=8, mode="hydragen",
                               backend=BACKEND, seed=1)

    assert_same(run(model), run(one), name)


@needs(2)
@pytest.mark.slow  # CI time (~12 s): the vocabulary's split and its padding run in CI in every sharded generate
@pytest.mark.parametrize("name", ["mha", "gqa"])  # mha: 97 tokens, padded to 98
def test_sampling_equals_single_device(name):
    """Temperature, top-k and top-p sampling on logits split over the vocabulary draws the same tokens, also where
    the devices do not divide the vocabulary (its padding draws no noise of its own)."""
    spec = {"temperature": 0.8, "top_k": 20, "top_p": 0.9}
    got = sharded(name, 2, "hydragen", sampling=spec)
    assert_same(got, single(name, "hydragen", sampling=spec), "sampling")


@pytest.mark.slow  # CI time (~14 s); the cost model's rule on one device: tests/test_models_levels.py
@pytest.mark.parametrize("name,devices", [pytest.param("mha", 2, marks=needs(2)),  # 4 KV heads: 2 a device
                                          pytest.param("gqa", 4, marks=needs(4))])  # replicated
def test_cost_model_counts_the_bytes_a_device_reads(monkeypatch, name, devices):
    """On a mesh, the bytes a batched level saves (`batch_min_saved_bytes`) are those of a device's own KV heads
    (split or replicated): the step's choice and generate's stats agree on them."""
    config = CONFIGS[name]
    model = models.init_random(config, jnp.float32, seed=5, mesh=parallel.make_mesh(devices))
    tree = models.build_sharing_tree(models.expand_samples(prompts(config.vocab_size), 2))
    state = models.prefill(model, tree, 8, mode="hydragen", backend=BACKEND)
    root = state.cache.shared[0]
    k = root.k[0]
    local_heads = k.sharding.shard_shape(k.shape)[2]
    assert local_heads == max(1, config.num_key_value_heads // devices)
    assert level_node_bytes(root) == 2 * k[0].size // k.shape[2] * local_heads * k.dtype.itemsize
    saved = (tree.num_sequences - k.shape[0]) * level_node_bytes(root)
    seen = record_batch_shared(monkeypatch)
    for threshold, batched in ((saved, True), (saved + 1, False)):  # a global count would batch both
        seen.clear()
        with tuning.override(dataclasses.replace(tuning.current(), batch_min_readers=1,
                                                 batch_min_saved_bytes=threshold)):
            stats = models.generate(model, prompts(config.vocab_size), num_samples=2, max_new_tokens=2,
                                    mode="hydragen", backend=BACKEND).stats
        steps = [choice for choice in seen if len(choice) == len(state.cache.shared)]  # the suffixes' and decode's
        assert steps and all(choice[0] == batched for choice in steps), (threshold, seen)
        assert stats["shared_levels_batched"] == sum(steps[-1])


@needs(2)
def test_kernels_under_shard_map():
    """The Pallas kernels (interpreted on CPU, compiled on a GPU) run per device on its own heads and caches, and
    agree with the single-device jnp reference (on a GPU: with the single-device kernels)."""
    backend = "pallas" if ON_GPU else "interpret"
    got = sharded("gqa1", 2, "hydragen", backend=backend)
    want = single("gqa1", "hydragen", backend="pallas" if ON_GPU else "xla")
    np.testing.assert_allclose(got.logits, want.logits, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(got.tokens, want.tokens)


@needs(2)
def test_interpreted_mosaic_is_refused_on_a_mesh():
    """backend "interpret-mosaic" on several devices: JAX's Mosaic GPU interpreter keeps one state for all of them
    and failed mid-run ('Barrier remains allocated', a review's finding): refused by name before anything runs
    (prefill, decode and compile_decode); on one device it runs (tests/test_attention.py)."""
    model = models.init_random(CONFIGS["gqa1"], jnp.float32, seed=5, mesh=parallel.make_mesh(2))
    refused = r"backend='interpret-mosaic' does not run on a mesh of 2 devices: .*take backend='interpret'"
    with pytest.raises(ValueError, match=refused):
        models.generate(model, prompts(model.config.vocab_size), max_new_tokens=2, backend="interpret-mosaic")
    state = models.prefill(model, prompts(model.config.vocab_size), 2, backend="interpret")
    with pytest.raises(ValueError, match=refused):
        models.decode(model, state, 1, backend="interpret-mosaic")
    with pytest.raises(ValueError, match=refused):
        models.compile_decode(model, state, backend="interpret-mosaic")


@needs(2)
@pytest.mark.slow  # the pair write is on in the H100's tuning file only (CI time)
def test_pair_write_under_shard_map(monkeypatch):
    """The tuning's `pair_write` (`models.pair_scatter`: one scatter of a layer's k and v caches) on each device's
    shards of its KV heads: the tokens and logits of one scatter a cache, bit for bit."""
    from models import pair_scatter  # noqa: PLC0415

    with tuning.override(dataclasses.replace(tuning.current(), pair_write=False)):  # whatever the file says
        want = sharded("gqa", 2, "hydragen")
    shapes, real = [], pair_scatter.scatter
    monkeypatch.setattr(pair_scatter, "scatter", lambda *a: shapes.append(a[0].shape) or real(*a))
    with tuning.override(dataclasses.replace(tuning.current(), pair_write=True)):
        got = sharded("gqa", 2, "hydragen")
    # written per device (under shard_map): each cache holds the device's half of the KV heads
    assert shapes and all(shape[2] == CONFIGS["gqa"].num_key_value_heads // 2 for shape in shapes), shapes
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.logits, want.logits)


@needs(2)
@pytest.mark.slow  # the decode GEMM kernel is off in every shipped tuning (CI time)
def test_decode_gemm_kernel_under_shard_map(monkeypatch):
    """The decode GEMM kernel (`models.gemm`; interpreted on CPU, compiled on a GPU) on each device's shards of a
    bf16 model: the same first tokens and logits (bf16 tolerance) as the single-device model with XLA's GEMMs."""
    from hydragen_jax import tuning  # noqa: PLC0415
    from models import gemm  # noqa: PLC0415

    kernel = "pallas" if ON_GPU else "interpret"
    calls = []

    def chosen(rows, tuning_=None):  # the GPU's rule, with the kernel interpreted on CPU
        backend = kernel if tuning.resolve(tuning_).gemm.covers(rows) else "xla"
        calls.append(backend)
        return backend

    monkeypatch.setattr(gemm, "default_backend", chosen)
    small = dataclasses.replace(tuning.current().gemm, block_n=16, block_k=16, min_rows=1)

    def run(max_rows, mesh):  # each tuning its own jit cache entry
        model = models.init_random(CONFIGS["gqa1"], jnp.bfloat16, seed=5, mesh=mesh)
        with tuning.override(dataclasses.replace(tuning.current(), gemm=dataclasses.replace(small, max_rows=max_rows))):
            return models.generate(model, prompts(model.config.vocab_size), num_samples=2, max_new_tokens=3,
                                   mode="hydragen", backend=BACKEND, seed=1)

    want = run(0, None)
    got = run(64, parallel.make_mesh(2))
    assert kernel in calls
    np.testing.assert_allclose(got.logits, want.logits, atol=5e-2, rtol=5e-2)
    np.testing.assert_array_equal(got.tokens[:, 0], want.tokens[:, 0])


@needs(4)
@pytest.mark.parametrize("name", ["mha", "gqa"])
def test_init_places_each_shard_and_keeps_the_values(name):
    config, mesh = CONFIGS[name], parallel.make_mesh(4)
    model = models.init_random(config, jnp.float32, seed=5, mesh=mesh)
    one = models.init_random(config, jnp.float32, seed=5)
    assert_same_params(parallel.canonical_params(config, model.params(), mesh), one)
    qkv = model.params()["layers"][0]["w_qkv"]
    assert qkv.sharding.spec == parallel.param_specs_of("w_qkv")
    heads, D = config.num_key_value_heads, config.head_dim
    width = (config.num_attention_heads // 4 // max(1, heads // 4) + 2) * D  # a group: its query heads, k, v
    assert [s.data.shape for s in qkv.addressable_shards] == [(config.hidden_size, max(1, heads // 4), width)] * 4
    if heads < 4:  # device i holds KV head i // (4 / Hkv)
        _, full, _ = models.llama.unpack_qkv(np.asarray(one.params()["layers"][0]["w_qkv"]), D)
        full = full.reshape(config.hidden_size, heads, D)
        for i, shard in enumerate(qkv.addressable_shards):
            _, k, _ = models.llama.unpack_qkv(np.asarray(shard.data), D)
            np.testing.assert_array_equal(k, full[:, i // (4 // heads)])


@pytest.mark.parametrize("name,devices", [
    # CI runs OLMo 2 on 4 devices (its q / k norms over heads split across them); Granite's scalings are
    # elementwise on the vocabulary-split head every sharded generate reads (slow tier: CI time, ~12 s)
    pytest.param("hf_granite", 2, marks=[needs(2), pytest.mark.slow]),
    pytest.param("hf_olmo2", 4, marks=needs(4)),
    pytest.param("hf_olmo2", 2, marks=[needs(2), pytest.mark.slow]),
    pytest.param("hf_smollm3", 2, marks=[needs(2), pytest.mark.slow]),
    pytest.param("hf_phi3", 2, marks=[needs(2), pytest.mark.slow]),
    pytest.param("hf_phi4_partial", 2, marks=[needs(2), pytest.mark.slow]),
    pytest.param("hf_gemma", 4, marks=[needs(4), pytest.mark.slow])])
def test_family_fixtures_on_the_mesh(tmp_path, name, devices):
    """transformers' tiny checkpoints of the families with extras outside the layers' GEMMs (Granite's embedding
    and logits scaling on the vocabulary-split embedding and head, its residual and logit-scale multipliers;
    OLMo 2's q / k norms over all heads, on 4 devices with its 2 KV heads (and their norm weights) each on two of
    them; SmolLM3's layer without RoPE; Phi-3's fused tensors, split on reading and joined on saving;
    Phi-4-mini's partial rotary with longrope, its prompts on both sides of the 32-token context (generate's two
    calls); Gemma's embeddings scaled after the vocabulary-split lookup, its norms of 1 + weight, GELU, head_dim 32
    != 64 / 4, its 2 KV heads on 4 devices) loaded onto a mesh generate what they do on one device, and init and save
    on the mesh keep the canonical parameters."""
    path = pathlib.Path(__file__).parent / "fixtures" / name
    one = models.load_checkpoint(path, dtype=jnp.float32)
    mesh = models.load_checkpoint(path, dtype=jnp.float32, mesh=parallel.make_mesh(devices))
    assert_same_params(parallel.canonical_params(one.config, mesh.params(), mesh.mesh), one)
    config, grid = one.config, mesh.mesh
    init = models.init_random(config, jnp.float32, seed=1, mesh=grid)
    assert_same_params(parallel.canonical_params(config, init.params(), grid),
                       models.init_random(config, jnp.float32, seed=1))
    models.save_checkpoint(mesh, tmp_path / "again")
    assert_same_params(models.load_checkpoint(tmp_path / "again", dtype=jnp.float32), one)

    def run(m):
        return models.generate(m, prompts(m.config.vocab_size), num_samples=2, max_new_tokens=6, mode="hydragen",
                               backend=BACKEND, seed=1)

    assert_same(run(mesh), run(one), name)


@needs(4)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_load_checkpoint_on_a_mesh(tmp_path, dtype):
    """The loader puts every tensor in its layout, a shard on each device; the values are those of the
    single-device load; saving the sharded model writes the checkpoint back."""
    one = models.init_random(GQA, jnp.float32, seed=2)
    models.save_checkpoint(one, tmp_path / "ckpt", max_shard_bytes=20_000)
    mesh = parallel.make_mesh(4)
    model = models.load_checkpoint(tmp_path / "ckpt", dtype=dtype, mesh=mesh)
    ref = models.load_checkpoint(tmp_path / "ckpt", dtype=dtype)
    assert model.mesh is mesh and model.dtype == jnp.dtype(dtype)
    specs = jax.tree.leaves(parallel.param_specs(GQA), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    for x, spec in zip(jax.tree.leaves(model.params()), specs):
        assert x.sharding.spec == spec and len(x.addressable_shards) == 4
    assert_same_params(parallel.canonical_params(GQA, model.params(), mesh), ref)
    models.save_checkpoint(model, tmp_path / "again")
    assert_same_params(models.load_checkpoint(tmp_path / "again", dtype=dtype), ref)


@needs(4)
def test_shard_model_equals_init_on_the_mesh():
    mesh = parallel.make_mesh(4)
    placed = parallel.shard_model(models.init_random(MHA, jnp.float32, seed=5), mesh)
    made = models.init_random(MHA, jnp.float32, seed=5, mesh=mesh)
    assert_same_params(placed, made)
    assert jax.tree.map(lambda x: x.sharding, placed.params()) == jax.tree.map(lambda x: x.sharding, made.params())
    with pytest.raises(ValueError, match="already on a mesh"):
        parallel.shard_model(made, mesh)
    with pytest.raises(ValueError, match=r"params\['embed'\] has shape \(97, 32\); on a 4-device mesh it must be "
                                         r"\(100, 32\)"):
        models.Llama(MHA, models.init_random(MHA, jnp.float32).params(), mesh)


_COLLECTIVE = re.compile(r"= (\(?[^=]*?) (all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)"
                         r"(?:-start)?\(")


def collectives(hlo: str) -> list[tuple[str, list[tuple[int, ...]]]]:
    """(op, output shapes) of every collective of an HLO module's text."""
    out = []
    for match in _COLLECTIVE.finditer(hlo):
        dims = re.findall(r"\w+\[([\d,]*)\]", match.group(1))
        shapes = [tuple(int(d) for d in text.split(",") if d) for text in dims]
        out.append((match.group(2), shapes))
    return out


@needs(2)
@pytest.mark.parametrize("mode", ["hydragen", pytest.param("standard", marks=pytest.mark.slow)])
def test_decode_step_communicates_only_the_row_parallel_sums(mode):
    """The compiled greedy decode loop on 4 devices (2 where there are 2): one all-reduce of [B, 1, d] after the
    embedding and after each layer's o and down projections (2L + 1), nothing else bigger than a few values per
    sequence (the argmax and log-softmax of logits split over the vocabulary), no all-to-all; each device's caches
    are never copied."""
    config = GQA
    model = models.init_random(config, jnp.float32, seed=5, mesh=parallel.make_mesh(min(4, len(jax.devices()))))
    state = models.prefill(model, prompts(config.vocab_size), 4, mode=mode, backend=BACKEND)
    fn, _ = models.compile_decode(model, state, backend=BACKEND)
    hlo = fn.as_text()
    found = collectives(hlo)
    B, d = state.positions.shape[0], config.hidden_size
    sums = [s for op, shapes in found if op == "all-reduce" for s in shapes if s == (B, 1, d)]
    assert len(sums) == 2 * config.num_hidden_layers + 1, found
    assert not [op for op, _ in found if op not in ("all-reduce", "all-gather")], found
    small = 4 * B  # per-sequence partial results of the sampling
    assert all(np.prod(s) <= small for _, shapes in found for s in shapes if s != (B, 1, d)), found
    local = {x.addressable_shards[0].data.shape for x in jax.tree.leaves(state.cache) if x.ndim == 4}
    assert all(shape[2] == 1 for shape in local)  # one KV head a device (8/2 heads over 2 or 4 devices)
    made = new_buffers_of_shape(hlo, local)
    assert not [line for line in made if " copy" in line or "transpose(" in line], made


@needs(2)
@pytest.mark.slow  # as the single-device smoke runs of tests/test_experiments.py
def test_e2e_runs_one_and_two_devices_in_the_same_run(tmp_path):
    """`python -m experiments run e2e_tp --smoke`: the grid once on one device and once on two, the all-reduce probe
    in the run's device rates, the two-device floors with its all-reduce term, the speed-up table."""
    from experiments import __main__ as cli
    from experiments import floor, records

    out = tmp_path / "tp.jsonl"
    assert cli.main(["run", "e2e_tp", "--smoke", "--out", str(out), "--no-progress"]) == 0
    recs = records.read(out)
    rates = next(r for r in recs if r["record"] == "device_rates")["results"]
    link = rates["allreduce"]["2"]
    assert link["devices"] == 2 and link["bus_bytes_per_s"] > 0 and len(link["probes"]) == 1
    assert [r["point"]["tp"] for r in recs if r["record"] == "model"] == [1, 2]
    decode = [r for r in recs if r["record"] == "decode"]
    assert {(r["point"]["tp"], r["mode"]) for r in decode} == {(n, m) for n in (1, 2) for m in ("hydragen", "none")}
    for rec in decode:
        res = rec["results"]
        assert rec["status"] == "ok" and res["floor_fraction"] == pytest.approx(res["floor_s"] / res["mean_step_s"])
        assert ("allreduce" in res["floor_parts_s"]) == (rec["point"]["tp"] == 2)
        assert res["floor_s"] == pytest.approx(floor.simpson(*res["floor_step_s"]))
    md = out.with_suffix(".md").read_text()
    assert "## Tensor parallel speed-up" in md and "hydragen tp=2 / tp=1" in md and "All-reduce over 2 devices" in md


@needs(2)
def test_decode_again_on_a_mesh_reuses_its_compiled_loop():
    """prefill's fresh arrays (tokens, lengths, key, ...) are replicated on the mesh, as decode returns them: a
    second decode() of the same shapes is a jit cache hit (they were uncommitted on one device, so the second call,
    given decode's replicated outputs, compiled the loop again)."""
    model = models.init_random(GQA, jnp.float32, seed=5, mesh=parallel.make_mesh(2))
    state = models.prefill(model, prompts(96), 8, backend=BACKEND)
    replicated = jax.sharding.NamedSharding(model.mesh, jax.sharding.PartitionSpec())
    made = {name: getattr(state, name).sharding for name in ("tokens", "lengths", "done", "step", "max_new")}
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    logging.getLogger("jax").addHandler(handler)
    compiles = []
    try:
        with jax.log_compiles(True):
            for _ in range(3):
                state = models.decode(model, state, 2, backend=BACKEND)
                compiles.append(log.getvalue().count("compilation of jit(_decode_impl)"))
    finally:
        logging.getLogger("jax").removeHandler(handler)
    assert compiles in ([1, 1, 1], [0, 0, 0]), compiles  # (0: compiled by an earlier case, same shapes)
    assert int(state.step) == 6
    assert all(sharding.is_equivalent_to(replicated, 0) for sharding in made.values()), made


@needs(2)
def test_a_state_prefilled_without_a_mesh_decodes_on_one_of_the_same_layout():
    """Where no layout differs (vocabulary 96 and 4 KV heads on 2 devices: no padding, no replicas), a state
    prefilled on one device without a mesh decodes on the mesh to the tokens it decodes to there (models/README)."""
    cfg = dataclasses.replace(MHA, vocab_size=96)
    one = models.init_random(cfg, jnp.float32, seed=5)
    on2 = parallel.shard_model(one, parallel.make_mesh(2))
    want = models.decode(one, models.prefill(one, prompts(96), 6, backend=BACKEND), 6, backend=BACKEND)
    got = models.decode(on2, models.prefill(one, prompts(96), 6, backend=BACKEND), 6, backend=BACKEND)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))


@needs(4)
def test_a_state_and_parameters_of_another_layout_are_refused():
    """decode / compile_decode with a state prefilled off the mesh (or on another mesh, or on the same devices in
    another order), and canonical_params with a mesh of another size, name both layouts instead of failing inside JAX
    (or returning mis-shaped parameters)."""
    one = models.init_random(MHA, jnp.float32, seed=5)
    on4 = parallel.shard_model(one, parallel.make_mesh(4))
    for model, state, made in ((on4, models.prefill(one, prompts(97), 4, backend=BACKEND), "a 4-device mesh"),
                               (one, models.prefill(on4, prompts(97), 4, backend=BACKEND), r"one device \(no mesh\)")):
        for fn in (models.decode, lambda m, s, n: models.compile_decode(m, s)):
            with pytest.raises(ValueError, match=rf"the state does not fit this model, on {made}: it needs logits "
                                                 r"\[B, (97|100)\]"):
                fn(model, state, 1)
    with pytest.raises(ValueError, match=r"on a 2-device mesh it must be"):
        parallel.canonical_params(MHA, on4.params(), parallel.make_mesh(2))
    # the same layout committed to other devices: a mesh of devices 2 and 3 against one of 0 and 1; device 1 against
    # device 0 (uncommitted arrays JAX moves: a state left where prefill put it decodes on a model put on device 1)
    devices = jax.devices()
    low, high = (parallel.shard_model(one, Mesh(np.array(devices[i:i + 2]), (parallel.AXIS,))) for i in (0, 2))
    on0 = models.Llama(MHA, jax.device_put(one.params(), devices[0]))
    away = jax.device_put(models.prefill(one, prompts(97), 4, backend=BACKEND), devices[1])
    swapped = parallel.shard_model(one, Mesh(np.array(devices[1::-1]), (parallel.AXIS,)))  # devices 1, 0
    for model, state, have, want in ((high, models.prefill(low, prompts(97), 4, backend=BACKEND), [0, 1], [2, 3]),
                                     (low, models.prefill(swapped, prompts(97), 4, backend=BACKEND), [1, 0], [0, 1]),
                                     (on0, away, [1], [0])):
        for fn in (models.decode, lambda m, s, n: models.compile_decode(m, s)):
            with pytest.raises(ValueError, match=rf"the state lives on devices {re.escape(str(have))}, this model's "
                                                 rf"parameters on {re.escape(str(want))}"):
                fn(model, state, 1)
    on1 = models.Llama(MHA, jax.device_put(one.params(), devices[1]))
    assert int(models.decode(on1, models.prefill(one, prompts(97), 4, backend=BACKEND), 2).step) == 2


@needs(4)
def test_parameters_of_the_layout_on_one_device_are_placed_on_the_mesh():
    """Llama(config, params, mesh) with arrays of the mesh's layout that sit on one device puts each on the mesh (a
    call would otherwise re-shard the whole model every time), and generates the same."""
    mesh = parallel.make_mesh(4)
    on4 = parallel.shard_model(models.init_random(MHA, jnp.float32, seed=5), mesh)
    gathered = jax.tree.map(lambda x: jax.device_put(x, jax.devices()[0]), on4.params())
    rebuilt = models.Llama(MHA, gathered, mesh)
    for got, want in zip(jax.tree.leaves(rebuilt.params()), jax.tree.leaves(on4.params())):
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), on4.params())
    assert models.Llama(MHA, abstract, mesh).params()["embed"] is abstract["embed"]  # abstract values left alone
    run = lambda m: models.generate(m, prompts(97), max_new_tokens=3, backend=BACKEND)  # noqa: E731
    np.testing.assert_array_equal(run(rebuilt).tokens, run(on4).tokens)


@needs(4)
def test_canonical_grads_sum_the_replicated_kv_heads():
    """Gradients taken on a mesh where KV heads are replicated (GQA 8/2 on 4 devices: each KV head on 2), brought to
    the canonical parameters by canonical_grads, are those of the single-device model: each copy's gradient holds
    only its own query heads' part, and the copies are summed (canonical_params, which keeps the first copy, is off
    by the other copy's part)."""
    from models.llama import causal_attention  # noqa: PLC0415

    one = models.init_random(GQA, jnp.float32, seed=3)
    mesh = parallel.make_mesh(4)
    on4 = parallel.shard_model(one, mesh)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, GQA.vocab_size, (3, 10)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(10), (3, 10))

    def loss(params, mesh):
        model = models.Llama(GQA, params, mesh)
        logits = model.logits(model(tokens, positions, None, causal_attention)[0])[..., :GQA.vocab_size]
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    grad = jax.jit(jax.grad(loss), static_argnums=1)  # one compile, not one per op (50 s -> seconds on CPU)
    want = grad(one.params(), None)
    grads = grad(on4.params(), mesh)
    got = parallel.canonical_grads(GQA, grads, mesh)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))
    first = np.asarray(parallel.canonical_params(GQA, grads, mesh)["layers"][0]["w_qkv"])
    assert not np.allclose(first, np.asarray(want["layers"][0]["w_qkv"]), atol=1e-4)  # one copy's part only
