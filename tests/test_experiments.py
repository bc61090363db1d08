"""Tests of experiments/: configs, floor arithmetic, Simpson, timing, OOM recording, smoke runs and plots."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import tomllib
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import __main__ as cli
from experiments import anchors, bench_attention, config, device_rates, floor, memory, records, report, tables, timing
from experiments import plot as plot_lib

CONFIGS = sorted(config.CONFIG_DIR.glob("*.toml"))


# ---------------------------------------------------------------- floor and Simpson


def test_floor_matches_hand_computation_for_seed_config():
    # B=64, P=1024, out=512, Hq=Hkv=32, D=128, bf16; rates of the BRIEF's H100 (3.02 TB/s, 671 TFLOP/s).
    args = dict(batch=64, prefix=1024, q_heads=32, kv_heads=32, head_dim=128, itemsize=2)
    # s=1: K,V = 2*(1024 + 64*1)*32*128*2 = 17,825,792; q + out = 2*64*32*128*2 = 1,048,576.
    assert floor.step_bytes(suffixes=1, **args) == 18_874_368
    assert floor.step_bytes(suffixes=256, **args) == 286_261_248
    assert floor.step_bytes(suffixes=512, **args) == 554_696_704
    assert floor.step_bytes(suffixes=[1] * 64, **args) == 18_874_368
    # T = 4 queries a sequence: four queries and outputs each (the KV once)
    assert floor.step_bytes(suffixes=1, queries=4, **args) == 17_825_792 + 4 * 1_048_576
    # FLOPs = 4*128*32*64*(1024+1)
    assert floor.step_flops(64, 1024, 1, 32, 128) == 1_074_790_400
    bw, mm = 3.02e12, 671e12
    times = [floor.floor_time(floor.step_bytes(suffixes=s, **args), floor.step_flops(64, 1024, s, 32, 128), bw, mm)
             for s in floor.simpson_points(512)]
    assert times[0] == pytest.approx(18_874_368 / bw)  # memory-bound
    tok_s = 64 / floor.simpson(*times)
    assert tok_s == pytest.approx(674_780, rel=1e-3)  # BRIEF: floor 675k tok/s


def test_floor_compute_bound_for_largest_seed_config():
    flops = floor.step_flops(1024, 8192, 1, 32, 128)
    assert flops == 137_455_730_688  # BRIEF: 137 GFLOP a step
    nbytes = floor.step_bytes(1024, 8192, 1, 32, 8, 128, 2)
    assert floor.floor_time(nbytes, flops, 3.02e12, 671e12) == pytest.approx(flops / 671e12)


def test_simpson():
    assert floor.simpson(1.0, 1.0, 1.0) == 1.0
    assert floor.simpson(0.0, 3.0, 6.0) == pytest.approx(3.0)  # exact for linear growth
    assert floor.simpson(0.0, 0.25, 1.0) == pytest.approx(1 / 3)  # exact for x^2 on [0, 1]
    assert floor.simpson(1.0, 4.0, 1.0) == pytest.approx(3.0)
    assert floor.simpson_points(512) == (1, 256, 512)


def test_simpson_points_midpoint_of_odd_generations():
    # Simpson's rule over [1, out] needs its midpoint: out = 3 samples s = 1, 2, 3 (out // 2 gave 1, 1, 3), which
    # makes the rule exact for a step time linear in s: the mean over s = 1..3 of s is 2
    assert floor.simpson_points(3) == (1, 2, 3)
    assert floor.simpson(*floor.simpson_points(3)) == pytest.approx(2.0)
    assert floor.simpson_points(129) == (1, 65, 129)
    assert floor.simpson_points(128) == (1, 64, 128) and floor.simpson_points(1) == (1, 1, 1)
    assert floor.simpson_points(2) == (1, 1, 2)


def test_step_flops_of_several_causal_queries():
    # T = 3 queries a sequence, the last 3 of its suffix of 5 (causal): they see 3, 4, 5 suffix tokens and all 7
    # prefix tokens; B = 2, Hq = 2, D = 4: 4 * 4 * 2 * 2 * (3 * 7 + 3 + 4 + 5)
    assert floor.step_flops(2, 7, 5, 2, 4, queries=3) == 4 * 4 * 2 * 2 * (21 + 12)
    assert floor.step_flops(2, 7, [5, 5], 2, 4, queries=3) == 4 * 4 * 2 * 2 * (21 + 12)
    assert floor.step_flops(2, 7, 5, 2, 4) == 4 * 4 * 2 * 2 * (7 + 5)  # T = 1 unchanged


def test_kv_cache_bytes_prefix_once_vs_copied():
    shared = floor.kv_cache_bytes(1024, 8192, 512, 8, 128, 2, prefix_copied=False)
    copied = floor.kv_cache_bytes(1024, 8192, 512, 8, 128, 2, prefix_copied=True)
    assert shared == 2 * (8192 + 1024 * 512) * 8 * 128 * 2
    assert copied == 2 * 1024 * (8192 + 512) * 8 * 128 * 2


# ---------------------------------------------------------------- the step floor of a whole model

# A small shape whose ops are easy to count by hand: d = 8, I = 16, 2 layers, 4/2 heads of 4, vocab 32, 2 bytes.
TINY = floor.ModelShape(hidden=8, intermediate=16, layers=2, q_heads=4, kv_heads=2, head_dim=4, vocab=32, itemsize=2)
# B = 3: one shared node of 10 tokens read by all three, prompt suffixes of 1, 2, 3 tokens.
TINY_SHARING = floor.Sharing(levels=(((10, 3),),), suffix_lengths=(1, 2, 3), prompt_lengths=(11, 12, 13))


def test_sharing_needs_one_length_of_each_kind_a_sequence():
    with pytest.raises(ValueError, match=r"must list the same B >= 1 sequences"):
        floor.Sharing((), (), ())
    with pytest.raises(ValueError, match=r"suffix_lengths \(2\) and prompt_lengths \(1\)"):
        floor.Sharing((), (1, 2), (3,))


def test_layer_gemms_and_lm_head_by_hand():
    ops = {op.name: op for op in floor.layer_gemms(TINY, 3)}
    assert list(ops) == ["qkv", "o", "gate_up", "down"]  # the models' packed weights: four GEMMs a layer
    # q/k/v: weights 8x(16+8+8), activations in 3x8 and out 3x32, 2 bytes each; 2*3*8*32 FLOPs
    assert (ops["qkv"].bytes, ops["qkv"].flops) == (2 * (8 * 32 + 3 * 8 + 3 * 32), 2 * 3 * 8 * 32)
    assert (ops["o"].bytes, ops["o"].flops) == (2 * (16 * 8 + 3 * 16 + 3 * 8), 2 * 3 * 16 * 8)
    assert (ops["down"].bytes, ops["down"].flops) == (2 * (16 * 8 + 3 * 16 + 3 * 8), 2 * 3 * 16 * 8)
    head = floor.lm_head(TINY, 3)
    assert (head.bytes, head.flops) == (2 * 8 * 32 + 2 * 3 * 8 + 4 * 3 * 32, 2 * 3 * 8 * 32)  # float32 logits


def test_attention_levels_per_mode_by_hand():
    kv = 2 * 2 * 4 * 2  # K and V of one token: 2 KV heads of 4, 2 bytes
    q_out = 2 * 3 * 4 * 4 * 2  # queries read and outputs written
    per_key = 4 * 4 * 4  # FLOPs of one query against one key: 4 * D * Hq
    step = 5  # own cache: suffix + 5 generated + this step's token
    own = (1 + 2 + 3) + 3 * 6
    hyd = floor.attention_levels(TINY, TINY_SHARING, "hydragen", step)
    assert [(op.name, op.bytes, op.flops) for op in hyd] == [
        ("shared0", 10 * kv, 3 * 10 * per_key), ("suffix", own * kv + q_out, own * per_key)]
    shared = floor.attention_levels(TINY, TINY_SHARING, "shared_storage", step)
    # read once per reader, but the repeated reads of a node can hit L2: memory moves it once, as for hydragen
    assert shared == hyd
    standard = floor.attention_levels(TINY, TINY_SHARING, "standard", step)
    full = (11 + 12 + 13) + 3 * 6
    assert [(op.name, op.bytes, op.flops) for op in standard] == [("sequence", full * kv + q_out, full * per_key)]
    assert floor.attention_levels(TINY, TINY_SHARING, "none", step) == []
    with pytest.raises(ValueError, match="mode must be one of"):
        floor.attention_levels(TINY, TINY_SHARING, "flash", step)


def test_decode_step_floor_sums_ops_and_none_skips_attention():
    bw, mm = 1e9, 1e12  # every op here is memory-bound at these rates
    hyd = floor.decode_step_floor(TINY, TINY_SHARING, "hydragen", 0, bw, mm)
    none = floor.decode_step_floor(TINY, TINY_SHARING, "none", 0, bw, mm)
    gemm_bytes = sum(op.bytes for op in floor.layer_gemms(TINY, 3))
    assert hyd["gemm"] == pytest.approx(2 * gemm_bytes / bw) == none["gemm"]  # `none` keeps every GEMM
    assert none["attention"] == none["cache_write"] == 0 and none["levels"] == {}
    assert hyd["cache_write"] == pytest.approx(2 * (2 * 3 * 2 * 4 * 2) / bw)
    levels = floor.attention_levels(TINY, TINY_SHARING, "hydragen", 0)
    assert hyd["attention"] == pytest.approx(2 * sum(op.bytes for op in levels) / bw)  # one op per layer
    assert hyd["total"] == pytest.approx(hyd["gemm"] + hyd["lm_head"] + hyd["attention"] + hyd["cache_write"])
    # compute-bound levels overlap inside a layer's op: the joint floor is below the levels' sum
    slow_mm = floor.decode_step_floor(TINY, TINY_SHARING, "hydragen", 0, 1e12, 1e6)
    assert slow_mm["attention"] <= sum(slow_mm["levels"].values())


def test_decode_floor_matches_the_issue_estimates():
    """7B shape, bf16, 1K prefix, 1 unique token, 128 new tokens timed 4 steps at 0, 61, 124, 4.24 TB/s and
    790 TFLOP/s: issue 12's estimates 3.3 ms (B=8), 6.5 ms (B=256), 13.0 ms (B=512) for hydragen."""
    shape = floor.ModelShape(4096, 11008, 32, 32, 32, 128, 32000, 2)
    for batch, want_ms in ((8, 3.3), (256, 6.5), (512, 13.0)):
        sharing = floor.Sharing((((1024, batch),),), (1,) * batch, (1025,) * batch)
        got = floor.decode_floor(shape, sharing, "hydragen", [0, 61, 124], 4, 4.24e12, 790e12)
        assert got["floor_s"] * 1e3 == pytest.approx(want_ms, abs=0.1)  # the issue rounds to 0.1 ms
        assert got["floor_tokens_per_s"] == pytest.approx(batch / got["floor_s"])


def test_decode_floor_averages_like_the_timing():
    bw, mm = 2e9, 1e10
    starts, k = [0, 3, 6], 2
    got = floor.decode_floor(TINY, TINY_SHARING, "hydragen", starts, k, bw, mm)
    per_step = [floor.decode_step_floor(TINY, TINY_SHARING, "hydragen", j, bw, mm) for j in range(8)]
    windows = [(per_step[s]["total"] + per_step[s + 1]["total"]) / 2 for s in starts]
    assert got["floor_step_s"] == pytest.approx(windows)
    assert got["floor_s"] == pytest.approx(floor.simpson(*windows))
    parts = got["floor_parts_s"]
    assert got["attention_floor_s"] == pytest.approx(parts["attention"] + parts["cache_write"])
    assert set(got["attention_level_floor_s"]) == {"shared0", "suffix"}
    with pytest.raises(ValueError, match="3 sample positions"):
        floor.decode_floor(TINY, TINY_SHARING, "hydragen", [0, 3], k, bw, mm)



def test_e2e_timing_plan_keeps_a_point_within_its_budget():
    """Steps a timed call and repeats at each of the three positions, for a step of about step_s: the config's
    where they fit point_budget_s, fewer repeats where not, and shorter calls (one repeat) where even one repeat of
    the config's calls would pass it."""
    from experiments import e2e

    assert e2e.timing_plan(0.004, 64, 5, 20.0) == (64, 5)       # 3.8 s of steps: all repeats
    assert e2e.timing_plan(0.030, 64, 5, 20.0) == (64, 3)       # 5.8 s a repeat: 3 of them
    assert e2e.timing_plan(0.318, 64, 5, 20.0) == (20, 1)       # 61 s a repeat: 20-step calls, 19 s
    assert e2e.timing_plan(30.0, 64, 5, 20.0) == (1, 1)         # never fewer than one step
    assert e2e.timing_plan(0.5, 8, 5, 20.0) == (8, 1)           # calls are never made longer

def test_sharing_of_trees_and_e2e_floor_fields():
    from experiments import e2e, model_api

    two = model_api.sharing(model_api.apps_tree(16, 8, 3, 4, 100, 0, levels=2))
    assert two.levels == (((16, 12),), ((7, 4),) * 3)  # few-shot read by all 12; each problem (but its last token)
    assert two.suffix_lengths == (1,) * 12 and two.prompt_lengths == (24,) * 12
    one = model_api.sharing(model_api.apps_tree(16, 8, 3, 4, 100, 0, levels=1))
    assert one.levels == (((16, 12),),) and one.suffix_lengths == (8,) * 12
    assert e2e.sample_starts(128, 4) == [0, 61, 124] and e2e.sample_starts(8, 2) == [0, 2, 6]
    results = {"sample_starts": [0, 3, 6], "steps_per_sample": 2, "mean_step_s": 1e-3}
    rates = {"bandwidth_bytes_per_s": 2e9, "matmul_flops_per_s": 1e10}
    fields = e2e.floor_fields(TINY, TINY_SHARING, "hydragen", results, rates)
    assert fields["floor_fraction"] == pytest.approx(fields["floor_s"] / 1e-3)
    assert fields["floor_bandwidth_bytes_per_s"] == 2e9 and fields["floor_matmul_flops_per_s"] == 1e10


# ---------------------------------------------------------------- device rates


def test_bandwidth_probes_each_recorded_and_the_best_used():
    kw = {"warmup": 1, "repeats": 2}
    rates = device_rates.bandwidth(1 << 20, kw)
    probes = rates["bandwidth_probes"]
    assert list(probes) == list(device_rates.PROBES)
    for name, probe in probes.items():
        assert probe["bytes_per_s"] == pytest.approx(probe["bytes"] / probe["best_s"])
        assert probe["median_s"] >= probe["best_s"] and probe["repeats"] >= device_rates.PROBE_MIN_REPEATS
        assert rates[f"{name}_bandwidth_bytes_per_s"] == probe["bytes_per_s"]
    assert probes["copy"]["bytes"] == 2 * (1 << 20)  # read + written
    assert probes["read"]["bytes"] >= 1 << 20 and probes["pallas_read"]["bytes"] >= 1 << 20
    best = max(p["bytes_per_s"] for p in probes.values())
    assert rates["bandwidth_bytes_per_s"] == best
    assert probes[rates["bandwidth_probe"]]["bytes_per_s"] == best


def test_rates_min_repeat_s_sets_the_calls_of_a_probe_repeat():
    """A config's rates.min_repeat_s: 0 times one call a repeat (the smoke runs); a repeat of a probe otherwise lasts
    at least that long, by back-to-back calls (PROBE_MIN_REPEAT_S by default); the matmul's timing takes no unknown
    key from it. A negative value is refused by the config."""
    kw = {"warmup": 1, "repeats": 1}
    rates = {"copy_bytes": 1 << 12, "matmul_n": 16, "probes": ["copy"]}
    one = device_rates.measure_for({"rates": {**rates, "min_repeat_s": 0.0}}, kw)
    assert one["bandwidth_probes"]["copy"]["calls"] == 1 and one["matmul_time_s"] > 0
    # a 4 KiB copy takes well under 200 ms: calibrated to last 200 ms (by its warm-up call's time), a repeat is calls
    long = device_rates.measure_for({"rates": {**rates, "min_repeat_s": 0.2}}, kw)["bandwidth_probes"]["copy"]
    assert long["calls"] > 1
    assert device_rates.measure_for({"rates": rates}, kw)["bandwidth_probes"]["copy"]["calls"] > 1  # the default
    for bad in ("-1", "inf"):  # an infinite repeat would never end (an OverflowError counting its calls)
        with pytest.raises(config.ConfigError, match=r"min_repeat_s.*seconds >= 0"):
            config.load("e2e_throughput", smoke=True, assignments=[f"rates.min_repeat_s={bad}"])
    for name, table in (("e2e_throughput", "rates"), ("bench_attention", "timing")):  # one field, same refusals
        with pytest.raises(config.ConfigError, match=r"min_repeat_s.*seconds >= 0"):
            config.load(name, smoke=True, assignments=[f"{table}.min_repeat_s=inf"])
        with pytest.raises(config.ConfigError, match=r"min_repeat_s.*must be int or float, got True"):
            config.load(name, smoke=True, assignments=[f"{table}.min_repeat_s=true"])
    # a model run's decode calls time their own steps: bench-attention's repeat options would be silently ignored
    for key in ("min_repeat_s=0.1", "max_inner=4", "steps_per_call=2"):
        for name in ("e2e_throughput", "long_document", "tree_apps", "e2e_tp"):
            with pytest.raises(config.ConfigError, match=f"unknown key 'timing.{key.split('=')[0]}'"):
                config.load(name, smoke=True, assignments=[f"timing.{key}"])


def test_failed_probe_is_recorded_and_no_probe_is_an_error(monkeypatch):
    def broken(nbytes, timing_kw):
        raise RuntimeError("lowering failed")

    monkeypatch.setitem(device_rates.PROBE_FNS, "pallas_read", broken)
    rates = device_rates.bandwidth(1 << 16, {"warmup": 0, "repeats": 1}, probes=("copy", "pallas_read"))
    assert rates["bandwidth_probes"]["pallas_read"] == {"error": "RuntimeError: lowering failed"}
    assert rates["pallas_read_bandwidth_bytes_per_s"] is None and rates["bandwidth_probe"] == "copy"
    with pytest.raises(RuntimeError, match="no bandwidth probe ran"):
        device_rates.bandwidth(1 << 16, {"warmup": 0, "repeats": 1}, probes=("pallas_read",))
    with pytest.raises(ValueError, match="unknown bandwidth probe 'dma'"):
        device_rates.bandwidth(1 << 16, {"warmup": 0, "repeats": 1}, probes=("dma",))


def test_stream_read_kernel_sums_every_block():
    x = jax.random.normal(jax.random.key(5), (4 * device_rates.PALLAS_CHUNK * 3, 512), jnp.float32)
    got = device_rates.stream_read(x, steps=3, interpret=True)
    want = x.reshape(4, device_rates.PALLAS_CHUNK * 3, 512).sum(axis=1)
    chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="expected a multiple of 48"):
        device_rates.stream_read(x[:40], steps=3, interpret=True)


# ---------------------------------------------------------------- outside anchors


def test_triton_only_variant_runs_the_triton_kernels_or_is_skipped(monkeypatch):
    """`hydragen_triton` is the Triton kernels whatever hydragen's backend: "triton" for "pallas" and "mosaic",
    "interpret" for the interpreted ones; where hydragen runs "xla" (no kernels) it is skipped with the reason, not
    recorded as a second copy of hydragen under the Triton title."""
    used = []
    monkeypatch.setattr("hydragen_jax.hydragen_attention", lambda *a, backend, **k: used.append(backend))
    for backend, want in (("pallas", "triton"), ("mosaic", "triton"), ("triton", "triton"),
                          ("interpret", "interpret"), ("interpret-mosaic", "interpret")):
        fn, args = bench_attention.build_variant("hydragen_triton", dict.fromkeys(
            ("q", "prefix_k", "prefix_v", "suffix_k", "suffix_v", "suffix_lengths")), None, backend)
        fn(*args)
        assert used.pop() == want, backend
        assert bench_attention.skip_reason(bench_attention.VARIANTS["hydragen_triton"], backend) is None
    assert bench_attention.skip_reason(bench_attention.VARIANTS["hydragen_triton"], "xla") == (
        "runs the Triton kernels, and this run's Hydragen backend is 'xla', which runs no kernels")


def test_anchor_skip_reasons(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    for name in anchors.ANCHORS:
        assert "torch is not installed" in anchors.skip_reason(name)
        assert bench_attention.skip_reason(bench_attention.VARIANTS[name]) == anchors.skip_reason(name)
    with pytest.raises(ValueError, match="not an anchor"):
        anchors.skip_reason("reference")


@pytest.mark.gpu
@pytest.mark.parametrize("name", anchors.ANCHORS)
def test_anchor_matches_the_reference_on_gpu(name):
    """On a GPU with torch (and FlashInfer on PYTHONPATH): the anchor's chained output equals our reference's."""
    reason = anchors.skip_reason(name)
    if reason is not None:
        pytest.skip(reason)
    case = bench_attention.Case(batch=8, prefix=40, out=24, q_heads=8, kv_heads=2, head_dim=128, dtype="bfloat16")
    inputs = bench_attention.make_inputs(case, 19, 0)  # caches of 24 tokens, 19 valid
    kw = {"warmup": 1, "repeats": 2, "min_repeat_s": 0.0, "max_inner": 1}
    results, out = anchors.measure(name, inputs, 2, kw)
    fn, args = bench_attention.build_variant("reference", inputs, None, "xla")
    want = jax.jit(timing.chain_steps(fn, 2))(*args)
    assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - want.astype(jnp.float32)))) < 0.02
    assert results["step_s"] > 0 and results["timer"] == "cuda_events"


# ---------------------------------------------------------------- timing and memory


def test_time_fn_reports_compile_and_median():
    x = jnp.ones((64, 64))
    t = timing.time_fn(lambda a: a @ a, (x,), warmup=1, repeats=5, min_repeat_s=0.001, max_inner=4)
    assert t.compile_s > 0 and t.median_s > 0
    assert len(t.times_s) == 5 and 1 <= t.inner <= 4
    assert min(t.times_s) <= t.median_s <= max(t.times_s)
    assert t.output.shape == (64, 64)


def test_chain_steps_feeds_each_output_to_the_next_step():
    key_q, key_k = jax.random.split(jax.random.key(3))
    q = jax.random.normal(key_q, (2, 1, 4, 8))
    k = jax.random.normal(key_k, (2, 5, 4, 8))

    def step(q, k):  # an attention-like step: out has q's shape
        return jax.nn.dot_product_attention(q, k, k)

    assert timing.chain_steps(step, 1) is step
    want = q
    for _ in range(3):
        want = step(want, k)
    got = jax.jit(timing.chain_steps(step, 3))(q, k)
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)
    assert not jnp.allclose(got, step(q, k))  # three steps, not one
    with pytest.raises(ValueError, match="steps must be >= 1; got 0"):
        timing.chain_steps(step, 0)
    with pytest.raises(ValueError, match=r"fn returned shape \(2, 1, 4\); expected the query's \(2, 1, 4, 8\)"):
        timing.chain_steps(lambda q, k: q.sum(-1), 2)(q, k)


def test_is_oom_and_estimate():
    assert memory.is_oom(jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while allocating"))
    assert not memory.is_oom(ValueError("shapes do not match"))
    with pytest.raises(memory.EstimatedOOM):
        memory.check_fits(2000, {"memory_capacity_bytes": 1000, "memory_fraction": 1.0})
    memory.check_fits(900, {"memory_capacity_bytes": 1000, "memory_fraction": 1.0})


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_validates_full_and_smoke(path):
    full = config.load(path)
    smoke = config.load(path, smoke=True)
    assert full["smoke"] is False and smoke["smoke"] is True
    assert full["name"] == path.stem


def _bench_raw():
    with open(config.CONFIG_DIR / "bench_attention.toml", "rb") as f:
        return tomllib.load(f)


def test_config_error_names_unknown_key():
    raw = _bench_raw()
    raw["bench"]["batch_size"] = 3
    with pytest.raises(config.ConfigError, match=r"unknown key 'bench\.batch_size'"):
        config.from_dict(raw)


def test_config_error_names_bad_row_value():
    raw = _bench_raw()
    raw["bench"]["configs"][2]["batch"] = "big"
    with pytest.raises(config.ConfigError, match=r"'bench\.configs\[2\]\.batch'"):
        config.from_dict(raw)


def test_config_error_names_missing_and_bad_choice():
    raw = _bench_raw()
    del raw["timing"]["repeats"]
    with pytest.raises(config.ConfigError, match=r"missing key 'timing\.repeats'"):
        config.from_dict(raw)
    raw = _bench_raw()
    raw["bench"]["variants"] = ["hydragen", "flash"]
    with pytest.raises(config.ConfigError, match=r"'bench\.variants\[1\]'"):
        config.from_dict(raw)


def test_config_error_in_smoke_overrides():
    raw = _bench_raw()
    raw["smoke"]["timing"]["repeats"] = 0
    with pytest.raises(config.ConfigError, match=r"\[smoke\].*'timing\.repeats'"):
        config.from_dict(raw, smoke=True)
    raw = _bench_raw()
    del raw["smoke"]
    with pytest.raises(config.ConfigError, match="smoke"):
        config.from_dict(raw)


# ---------------------------------------------------------------- bench-attention


def _check_records(path: pathlib.Path) -> list[dict]:
    recs = records.read(path)  # raises if a required key is missing
    assert recs
    for rec in recs:
        for key in records.REQUIRED_KEYS:
            assert key in rec
        assert rec["status"] in records.STATUSES
    return recs


@pytest.fixture(scope="session")  # session: xdist may interleave other modules' tests with this group's
def bench_smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.jsonl"
    assert cli.main(["bench-attention", "--smoke", "--out", str(out), "--no-progress"]) == 0
    return out


def test_bench_checks_every_variant_against_the_reference_whatever_the_order(tmp_path):
    """The reference runs first at each point, so a variant listed before it is still compared with it."""
    out = tmp_path / "bench.jsonl"
    one = config.load("bench_attention", smoke=True)["bench"]["configs"][0]
    row = "{" + ", ".join(f"{k} = {v}" for k, v in one.items()) + "}"
    assert cli.main(["bench-attention", "--smoke", "--out", str(out), "--no-progress", "--set",
                     "bench.variants=['hydragen', 'reference']", "--set", f"bench.configs=[{row}]", "--set",
                     "bench.cpu_backend='xla'"]) == 0
    steps = [r for r in _check_records(out) if r["record"] == "step" and r["mode"] == "hydragen"]
    assert steps and all(r["results"]["max_abs_err_vs_reference"] < 1e-5 for r in steps), steps


@pytest.mark.parametrize("table, dtype, precision", [("model", "float32", "HIGHEST"), ("bench", "float32", "HIGHEST"),
                                                      ("model", "bfloat16", "DEFAULT"), (None, "bfloat16", "DEFAULT")])
def test_matmul_rate_is_timed_in_the_runs_dtype(monkeypatch, table, dtype, precision):
    """The floor's matmul rate is the run's own products' rate: a float32 run's (exact fp32 products, as the models
    and kernels compute them; ~10x slower than bf16 on an H100) was timed in bf16, so its floor read ~6x too low."""
    seen = []
    monkeypatch.setattr(timing, "time_fn", lambda fn, args, **kw: seen.append((fn, args)) or timing.Timing(
        compile_s=0.0, median_s=1.0, times_s=[1.0], inner=1))
    monkeypatch.setattr(device_rates, "bandwidth", lambda *a, **k: {})
    cfg = {"rates": {"copy_bytes": 1 << 16, "matmul_n": 64}, **({table: {"dtype": dtype}} if table else {})}
    rates = device_rates.measure_for(cfg, {"warmup": 0, "repeats": 1})
    fn, args = seen[0]
    assert rates["matmul_dtype"] == dtype and all(a.dtype == jnp.dtype(dtype) for a in args)
    with jax.default_matmul_precision("default"):  # as on the GPU (the test suite sets "highest")
        jaxpr = str(jax.make_jaxpr(fn)(*args))
    assert ("HIGHEST" in jaxpr) == (precision == "HIGHEST"), jaxpr


def test_dispatch_probe_runs_calls_back_to_back_whatever_the_runs_timing(monkeypatch):
    """The model runs' [timing] has no min_repeat_s: the dispatch probe timed one call and its wait (73-151 us on
    the H200 against 36-52 in bench runs); it now runs back to back for the probes' repeat length, as the matmul's."""
    seen = []
    real = timing.time_fn
    monkeypatch.setattr(timing, "time_fn", lambda fn, args, **kw: seen.append(kw) or real(fn, args, **{
        **kw, "min_repeat_s": 0.0, "max_inner": 1}))
    device_rates.dispatch_time({"warmup": 1, "repeats": 2, "probe_min_repeat_s": 0.05})
    assert seen[0]["min_repeat_s"] == 0.05 and seen[0]["max_inner"] == device_rates.PROBE_MAX_CALLS, seen
    assert seen[0]["repeats"] == 2 and "probe_min_repeat_s" not in seen[0]


def test_bench_a_variant_whose_output_is_not_finite_is_an_error_not_a_time():
    """A NaN output was recorded "ok" with a null error, counted in the tok/s and left out of the report's "within
    X of the reference" (its max skipped nulls): now an error naming why, as is a reference that is not finite."""
    case = bench_attention.Case(2, 8, 4, 2, 2, 8, "float32")
    q = jnp.ones((2, 1, 2, 8))
    kw = dict(backend="xla", timing_kw=dict(warmup=0, repeats=1), device_table=None)
    nan = lambda name, inputs, per_seq, backend: (lambda x: x * jnp.nan, (q,))  # noqa: E731
    same = lambda name, inputs, per_seq, backend: (lambda x: x, (q,))  # noqa: E731
    status, _, reason, _ = bench_attention.measure_variant("hydragen", case, 1, {}, None, build=nan,
                                                           reference_out=q, **kw)
    assert (status, reason) == ("error", "output not finite (NaN or inf): its time is not counted")
    status, results, reason, _ = bench_attention.measure_variant("hydragen", case, 1, {}, None, build=same,
                                                                 reference_out=q, **kw)
    assert (status, results["max_abs_err_vs_reference"], results["output_finite"]) == ("ok", 0.0, True)
    status, _, reason, _ = bench_attention.measure_variant("hydragen", case, 1, {}, None, build=same,
                                                           reference_out=q * jnp.nan, **kw)
    assert (status, reason) == ("error", "the jnp reference's output is not finite: nothing to check against")


@pytest.mark.parametrize("assignment, match", [
    ("grid.prefixes=[32, 32]", r"key 'grid.prefixes' lists 32 twice \(at 0 and 1\): each point or variant would run"),
    ("modes=['hydragen', 'none', 'hydragen']", r"key 'modes' lists 'hydragen' twice \(at 0 and 2\)")])
def test_a_list_that_repeats_a_point_or_variant_is_refused(assignment, match):
    with pytest.raises(config.ConfigError, match=match):
        config.load("e2e_throughput", smoke=True, assignments=[assignment])


@pytest.mark.parametrize("assignment, match", [
    ("grid.batches=[4", r"--set 'grid.batches=\[4': the value is not valid TOML"),
    ("bench.cpu_backend='xla", r"--set \"bench.cpu_backend='xla\": the value is not valid TOML")])
def test_a_set_value_of_broken_toml_is_named(assignment, match):
    with pytest.raises(config.ConfigError, match=match):
        config.load("e2e_throughput" if "grid" in assignment else "bench_attention", smoke=True,
                    assignments=[assignment])
    assert config.parse_assignment("bench.cpu_backend=xla") == (["bench", "cpu_backend"], "xla")  # a bare word


@pytest.mark.xdist_group("bench_smoke")  # one worker runs the smoke bench (session fixture)
def test_bench_smoke_results(bench_smoke):
    recs = _check_records(bench_smoke)
    cfg = config.load("bench_attention", smoke=True)
    variants = cfg["bench"]["variants"]
    n_cases = len(cfg["bench"]["configs"])
    steps = [r for r in recs if r["record"] == "step"]
    summaries = [r for r in recs if r["record"] == "summary"]
    assert len(steps) == 3 * n_cases * len(variants)
    assert len(summaries) == n_cases * len(variants)
    rates = [r for r in recs if r["record"] == "device_rates"]
    assert len(rates) == 1 and rates[0]["results"]["bandwidth_bytes_per_s"] > 0
    probes = rates[0]["results"]["bandwidth_probes"]
    assert set(probes) == set(device_rates.PROBES)
    assert rates[0]["results"]["bandwidth_bytes_per_s"] == max(p["bytes_per_s"] for p in probes.values())
    by_mode = {r["mode"]: r for r in summaries}
    assert by_mode["cudnn_per_sequence"]["status"] == "skipped"  # CPU: skipped with a reason
    assert "GPU" in by_mode["cudnn_per_sequence"]["reason"]
    assert "torch_hydragen" in variants  # no torch, or no GPU: skipped with the reason, never a failure
    reason = anchors.skip_reason("torch_hydragen")
    assert by_mode["torch_hydragen"]["status"] == "skipped" and reason in by_mode["torch_hydragen"]["reason"]
    for mode in ("hydragen", "reference", "xla_per_sequence", "shared_storage"):
        res = by_mode[mode]["results"]
        assert by_mode[mode]["status"] == "ok"
        assert res["tokens_per_s"] > 0 and res["floor_fraction"] > 0
        assert res["mean_step_s"] == pytest.approx(floor.simpson(*res["step_s"]))
        assert by_mode[mode]["point"]["batch"] / res["mean_step_s"] == pytest.approx(res["tokens_per_s"])
    for rec in steps:
        if rec["mode"] in ("hydragen", "shared_storage", "xla_per_sequence") and rec["status"] == "ok":
            res = rec["results"]
            assert res["output_finite"], rec
            assert res["max_abs_err_vs_reference"] is not None and res["max_abs_err_vs_reference"] < 0.05, rec
    assert "speedup_vs_xla_per_sequence" in by_mode["hydragen"]["results"]
    chained = cfg["timing"]["steps_per_call"]
    assert chained == 2 and rates[0]["results"]["dispatch_s"] > 0
    for rec in steps:
        if rec["status"] == "ok":
            res = rec["results"]
            assert res["compile_s"] > 0 and res["repeats"] == cfg["timing"]["repeats"]
            assert res["steps_per_call"] == chained and res["step_s"] == pytest.approx(res["median_s"] / chained)
            assert res["l2_copies"] == 2, rec  # KiB of KV against a 50 MiB L2: a copy a step of the two chained
    md = bench_smoke.with_suffix(".md").read_text()
    assert "floor frac" in md and "tok/s" in md


@pytest.mark.xdist_group("bench_smoke")  # one worker runs the smoke bench (session fixture)
def test_bench_smoke_plots(bench_smoke, tmp_path):
    assert cli.main(["plot", str(bench_smoke), "--out", str(tmp_path)]) == 0
    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) == 2
    assert all(p.stat().st_size > 1000 for p in pngs)


def _tiny_bench_config(**device):
    cfg = config.load("bench_attention", smoke=True)
    cfg["bench"]["configs"] = cfg["bench"]["configs"][:1]
    cfg["bench"]["variants"] = ["reference", "xla_per_sequence"]
    cfg["timing"]["repeats"] = 1
    # one small probe: the smoke bench fixture runs them all (CI time)
    cfg["rates"] = {"copy_bytes": 1 << 16, "matmul_n": 32, "probes": ["copy"], "min_repeat_s": 0.0}
    if device:
        cfg["device"] = device
    return cfg


def test_bench_records_injected_oom(tmp_path):
    cfg = _tiny_bench_config()

    def build(name, inputs, per_seq, backend):
        if name == "xla_per_sequence":
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 55 GB")
        return bench_attention.build_variant(name, inputs, per_seq, backend)

    with records.RecordWriter(tmp_path / "oom.jsonl", cfg) as writer:
        bench_attention.run(cfg, writer, progress=False, build=build)
    recs = _check_records(tmp_path / "oom.jsonl")
    oom = [r for r in recs if r["mode"] == "xla_per_sequence"]
    assert len(oom) == 4 and all(r["status"] == "oom" for r in oom)
    assert "RESOURCE_EXHAUSTED" in oom[0]["reason"]
    assert oom[0]["results"]["kv_cache_bytes"] > 0  # what it would have kept is still recorded
    ok = [r for r in recs if r["mode"] == "reference" and r["record"] == "summary"]
    assert ok[0]["status"] == "ok" and "speedup_vs_xla_per_sequence" not in ok[0]["results"]


def test_bench_records_estimated_oom_without_allocating(tmp_path):
    cfg = _tiny_bench_config(memory_capacity_bytes=1000, memory_fraction=1.0)
    built = []

    def build(name, inputs, per_seq, backend):
        built.append(name)
        return bench_attention.build_variant(name, inputs, per_seq, backend)

    with records.RecordWriter(tmp_path / "est.jsonl", cfg) as writer:
        bench_attention.run(cfg, writer, progress=False, build=build)
    steps = [r for r in _check_records(tmp_path / "est.jsonl") if r["record"] == "step"]
    assert built == []
    assert steps and all(r["status"] == "oom" and "estimated" in r["reason"] for r in steps)


@pytest.mark.xdist_group("bench_smoke")  # one worker runs the smoke bench (session fixture)
def test_jsonl_is_one_object_per_line(bench_smoke):
    for line in bench_smoke.read_text().splitlines():
        assert isinstance(json.loads(line), dict)


def test_set_overrides_and_select_rows():
    cfg = config.load("bench_attention", assignments=["timing.repeats=9", "bench.cpu_backend=xla"])
    assert cfg["timing"]["repeats"] == 9 and cfg["bench"]["cpu_backend"] == "xla"
    picked = cli.select_rows("bench_attention", False, "0,8", [])
    cfg = config.load("bench_attention", assignments=[picked])
    assert [(r["batch"], r["prefix"]) for r in cfg["bench"]["configs"]] == [(64, 1024), (1024, 8192)]
    with pytest.raises(config.ConfigError, match=r"--set.*'timing\.repeat'"):
        config.load("bench_attention", assignments=["timing.repeat=9"])


def test_seed_configs_are_data():
    rows = config.load("bench_attention")["bench"]["configs"]
    assert len(rows) == 9
    assert rows[-1] == {"batch": 1024, "prefix": 8192, "out": 512, "q_heads": 32, "kv_heads": 8}


# ---------------------------------------------------------------- end-to-end experiments


E2E_CONFIGS = ["e2e_throughput", "long_document", "tree_apps"]


# e2e_throughput's smoke run in CI; the other two, the same runner and report with other grids, in the slow tier
@pytest.mark.parametrize("name", [E2E_CONFIGS[0], *(pytest.param(n, marks=pytest.mark.slow) for n in E2E_CONFIGS[1:])])
def test_e2e_smoke_runs_parses_and_plots(name, tmp_path):
    out = tmp_path / f"{name}.jsonl"
    assert cli.main(["run", name, "--smoke", "--out", str(out), "--no-progress", "--plot"]) == 0
    recs = _check_records(out)
    decode = [r for r in recs if r["record"] == "decode"]
    assert decode and all(r["status"] == "ok" for r in decode)
    rates = [r for r in recs if r["record"] == "device_rates"]
    assert len(rates) == 1 and rates[0]["results"]["bandwidth_probe"] in device_rates.PROBES
    for rec in decode:
        res = rec["results"]
        assert res["tokens_per_s"] > 0 and len(res["step_s"]) == 3
        assert res["mean_step_s"] == pytest.approx(floor.simpson(*res["step_s"]))
        assert res["decode_compile_s"] >= 0 and res["prefill_compile_s"] >= 0 and res["cache_bytes"] > 0
        # the step floor, from the rates of the same run
        assert res["floor_bandwidth_bytes_per_s"] == rates[0]["results"]["bandwidth_bytes_per_s"]
        assert res["floor_s"] == pytest.approx(floor.simpson(*res["floor_step_s"]))
        assert res["floor_fraction"] == pytest.approx(res["floor_s"] / res["mean_step_s"])
        assert res["floor_tokens_per_s"] == pytest.approx(rec["point"]["batch"] / res["floor_s"])
        assert (res["attention_floor_s"] == 0) == (rec["mode"] == "none")
    assert [r for r in recs if r["record"] == "prefill"]
    cfg = config.load(name, smoke=True)
    if name == "tree_apps":
        assert {r["mode"] for r in decode} == set(cfg["tree"]["variants"])
        by = {r["mode"]: r["results"]["cache_bytes"] for r in decode}
        assert by["two_level"] < by["one_level"] < by["standard"]  # problem prompts stored once per problem
    else:
        assert {r["mode"] for r in decode} == set(cfg["modes"])
    md = out.with_suffix(".md").read_text()
    assert md.count("|") > 10 and "floor_fraction" in md and "Floor bandwidth" in md
    pngs = list(tmp_path.glob("*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)


def _tiny_e2e(**device):
    cfg = config.load("e2e_throughput", smoke=True)
    cfg["grid"]["batches"] = [2]
    cfg["rates"] = {"copy_bytes": 1 << 16, "matmul_n": 32, "probes": ["copy"]}
    if device:
        cfg["device"] = device
    return cfg


def test_e2e_estimated_oom_is_recorded_without_prefill(tmp_path, monkeypatch):
    from experiments import e2e, model_api

    def no_prefill(*args, **kwargs):
        raise AssertionError("prefill must not run when the estimate does not fit")

    monkeypatch.setattr(model_api, "prefill", no_prefill)
    cfg = _tiny_e2e(memory_capacity_bytes=10**6, memory_fraction=1.0)
    with records.RecordWriter(tmp_path / "oom.jsonl", cfg) as writer:
        e2e.run(cfg, writer, progress=False)
    decode = [r for r in _check_records(tmp_path / "oom.jsonl") if r["record"] == "decode"]
    assert {r["mode"] for r in decode} == set(cfg["modes"])
    assert all(r["status"] == "oom" and "estimated" in r["reason"] for r in decode)


def test_e2e_points_past_the_time_budget_are_skipped_or_estimated_oom(tmp_path, monkeypatch):
    """Once the budget is spent nothing runs; a point whose estimate does not fit is still recorded as an estimated
    OOM (knowing it takes no time), the others as skipped."""
    from experiments import e2e, model_api

    def no_prefill(*args, **kwargs):
        raise AssertionError("nothing runs past the time budget")

    monkeypatch.setattr(model_api, "prefill", no_prefill)
    for device, status in [({}, "skipped"), ({"memory_capacity_bytes": 10**6, "memory_fraction": 1.0}, "oom")]:
        cfg = _tiny_e2e(**device)
        cfg["timing"]["time_budget_s"] = 0
        path = tmp_path / f"{status}.jsonl"
        with records.RecordWriter(path, cfg) as writer:
            e2e.run(cfg, writer, progress=False)
        decode = [r for r in _check_records(path) if r["record"] == "decode"]
        assert {r["mode"] for r in decode} == set(cfg["modes"]) and all(r["status"] == status for r in decode)
        assert all(("estimated" in r["reason"] and r["results"]["estimate_bytes"] > 10**6) if status == "oom"
                   else r["reason"] == "time budget exhausted" for r in decode)


def test_e2e_runtime_oom_is_recorded(tmp_path, monkeypatch):
    from experiments import e2e, model_api

    def fake_prefill(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 80.00GiB")

    monkeypatch.setattr(model_api, "prefill", fake_prefill)
    cfg = _tiny_e2e()
    with records.RecordWriter(tmp_path / "oom.jsonl", cfg) as writer:
        e2e.run(cfg, writer, progress=False)
    decode = [r for r in _check_records(tmp_path / "oom.jsonl") if r["record"] == "decode"]
    assert decode and all(r["status"] == "oom" and "RESOURCE_EXHAUSTED" in r["reason"] for r in decode)
    e2e.write_markdown(tmp_path / "oom.md", records.read(tmp_path / "oom.jsonl"))
    md = (tmp_path / "oom.md").read_text()
    assert "OOM" in md
    assert re.search(r"## Not measured\n\n- prefix=\d+ batch=2 .*: OOM: prefill: .*RESOURCE_EXHAUSTED", md), md
    assert plot_lib.plot_files([tmp_path / "oom.jsonl"], tmp_path)  # plots draw failures too


def test_e2e_config_error_names_model_key():
    with open(config.CONFIG_DIR / "e2e_throughput.toml", "rb") as f:
        raw = tomllib.load(f)
    raw["model"]["shape"]["num_layers"] = 32
    with pytest.raises(config.ConfigError, match=r"unknown key 'model\.shape\.num_layers'"):
        config.from_dict(raw)
    raw = tomllib.loads((config.CONFIG_DIR / "tree_apps.toml").read_text())
    raw["tree"]["variants"] = ["three_level"]
    with pytest.raises(config.ConfigError, match=r"'tree\.variants\[0\]'"):
        config.from_dict(raw)


def test_apps_tree_shapes():
    from experiments import model_api

    two = model_api.apps_tree(16, 8, 3, 4, 100, 0, levels=2)
    one = model_api.apps_tree(16, 8, 3, 4, 100, 0, levels=1)
    assert two.num_sequences == one.num_sequences == 12
    assert [two.prompt(b) for b in range(12)] == [one.prompt(b) for b in range(12)]  # same prompts
    assert len(two.levels) == 2 and len(two.levels[1].nodes) == 3
    assert all(len(s) == 1 for s in two.suffixes) and all(len(s) == 8 for s in one.suffixes)
    base = dict(fewshot=4, problem_prompt=3, problems=2, samples=2, vocab=10, seed=0, levels=2)
    for change, match in [(dict(problem_prompt=1), r"problem_prompt must be an integer >= 2 \(levels=2\), got 1"),
                          (dict(problem_prompt=0, levels=1), r"problem_prompt must be an integer >= 1 \(levels=1\)"),
                          (dict(problems=0), r"problems must be an integer >= 1 .*got 0"),
                          (dict(samples=-1), r"samples must be an integer >= 1 .*got -1"),
                          (dict(levels=3), r"levels must be 0, 1 or 2, got 3")]:
        with pytest.raises(ValueError, match=rf"apps_tree: {match}"):  # an IndexError, or a tree built wrong
            model_api.apps_tree(**{**base, **change})


@pytest.mark.xdist_group("bench_smoke")  # one worker runs the smoke bench (session fixture)
def test_report_of_partial_bench_run(bench_smoke, tmp_path):
    """A run killed before its summaries still gets its markdown tables (rebuilt from step records)."""
    lines = [l for l in bench_smoke.read_text().splitlines() if '"record": "summary"' not in l]
    partial = tmp_path / "partial.jsonl"
    partial.write_text("\n".join(lines) + "\n")
    assert cli.main(["report", str(partial)]) == 0
    md = partial.with_suffix(".md").read_text()
    full = bench_smoke.with_suffix(".md").read_text()
    table = lambda text: [l for l in text.splitlines() if l.startswith("| 4 | 64 |")]
    assert table(md) == table(full)  # same numbers as the summaries the full run wrote
    assert md.partition("## Not measured")[2] == full.partition("## Not measured")[2]  # the anchors' reasons
    pngs = plot_lib.plot_files([partial], tmp_path / "plots")  # and its plots
    assert any(p.name.endswith("tokens_per_s.png") for p in pngs), pngs
    # cut off mid-row (its last step record never written): the row's SKIPPED cell says why below the tables
    last = max(i for i, l in enumerate(lines) if '"record": "step"' in l)
    step = json.loads(lines[last])
    cut = tmp_path / "cut.jsonl"
    cut.write_text("\n".join(lines[:last]) + "\n")
    assert cli.main(["report", str(cut)]) == 0
    md = cut.with_suffix(".md").read_text()
    p = step["point"]
    assert (f"\n- B={p['batch']} P={p['prefix']} out={p['out']} {p['q_heads']}/{p['kv_heads']}, "
            f"{step['mode']}: SKIPPED: no step record at s = {p['suffix']} (the run stopped before them)") in md, md


def test_plan_estimates_full_configs(capsys):
    assert cli.main(["plan", "long_document"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 * len(config.load("long_document")["grid"]["prefixes"])
    assert all(l.startswith("OOM") for l in lines if l.endswith("standard"))  # prompt copied 256 times
    assert all(l.startswith("fits") for l in lines if "hydragen" in l)
    assert cli.main(["plan", "bench_attention"]) == 0
    assert "OOM" not in capsys.readouterr().out  # every seed config fits an 80 GB GPU


def test_e2e_failure_that_consumes_the_state_marks_the_other_modes(tmp_path, monkeypatch):
    from experiments import e2e

    def failing_decode(model, state, *args, **kwargs):
        for leaf in jax.tree.leaves(state):  # what a donated call that fails half-way leaves behind
            leaf.delete()
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory in decode")

    monkeypatch.setattr(e2e, "time_decode", failing_decode)
    cfg = _tiny_e2e()
    cfg["modes"] = ["hydragen", "shared_storage", "none"]
    with records.RecordWriter(tmp_path / "lost.jsonl", cfg) as writer:
        e2e.run(cfg, writer, progress=False)
    decode = {r["mode"]: r for r in _check_records(tmp_path / "lost.jsonl") if r["record"] == "decode"}
    assert decode["hydragen"]["status"] == "oom"
    assert decode["shared_storage"]["status"] == "error" and "not run" in decode["shared_storage"]["reason"]
    assert decode["none"]["status"] == "error"


# ---------------------------------------------------------------- the README report

H200 = "gpu:NVIDIA H200"
H100 = "gpu:NVIDIA H100 80GB HBM3"
SHAPE = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
         "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128}


def _rec(kind, record, point, mode, results, status="ok", device=H200, reason=None):
    rec = {"config": kind, "experiment": kind, "record": record, "point": point, "mode": mode, "status": status,
           "results": results, "device": device, "jax_version": "0.11.2", "date_utc": "2026-11-30T10:00:00+00:00",
           "git_commit": "abcdef0123456", "smoke": False}
    return {**rec, "reason": reason} if reason else rec


def _write_results(folder, name, stamp, recs, device=H200):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{records.device_slug(device)}-{stamp}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _rates(device=H200, bandwidth=4.3e12):
    probes = {"copy": {"bytes_per_s": bandwidth}, "read": {"bytes_per_s": 4.0e12}, "pallas_read": {"error": "x"}}
    return _rec("bench_attention", "device_rates", {}, None, {
        "bandwidth_bytes_per_s": bandwidth, "bandwidth_probe": "copy", "bandwidth_probes": probes,
        "matmul_flops_per_s": 7.0e14, "matmul_n": 8192}, device=device)


def _bench_summary(case, mode, tok_s, device=H200, **extra):
    b, p, out, hq, hkv = case
    point = {"batch": b, "prefix": p, "out": out, "q_heads": hq, "kv_heads": hkv, "head_dim": 128,
             "dtype": "bfloat16", "suffixes": [1, out // 2, out], "backend": "pallas"}
    results = {"tokens_per_s": tok_s, "floor_tokens_per_s": 1e6, "floor_fraction": tok_s / 1e6, **extra}
    return _rec("bench_attention", "summary", point, mode, results, device=device)


def _decode(point, mode, tok_s, kind="e2e_throughput", device=H200, floors=False):
    results = {"tokens_per_s": tok_s, "mean_step_s": point["batch"] / tok_s}
    if floors:
        floor_s = point["batch"] / (2 * tok_s)
        attention = 0.0 if mode == "none" else 1e-3
        results.update(floor_s=floor_s, floor_tokens_per_s=point["batch"] / floor_s, floor_fraction=0.5,
                       attention_floor_s=attention, floor_parts_s={"cache_write": 0.0},
                       attention_level_floor_s={} if mode == "none" else {"shared0": 1e-3, "suffix": 1e-3})
    return _rec(kind, "decode", point, mode, results, device=device)


def _model(kind="e2e_throughput", device=H200):
    return _rec(kind, "model", {"shape": SHAPE, "dtype": "bfloat16"}, None, {"param_bytes": 13.48e9}, device=device)


def _e2e_point(prefix, batch):
    return {"prefix": prefix, "batch": batch, "generate": 128, "unique": 1}


def _section(readme):
    text = readme.read_text()
    return text[text.index(report.BEGIN):text.index(report.END)]


@pytest.fixture
def readme(tmp_path):
    path = tmp_path / "README.md"
    path.write_text(f"# title\n\nintro\n\n{report.BEGIN} -->\nold text\n{report.END}\n\n## Dependencies\n")
    return path


def test_report_takes_the_newest_file_of_each_name_and_each_row_from_the_newest_file(tmp_path, readme):
    res = tmp_path / "results"
    a, b = (64, 1024, 512, 32, 32), (512, 4096, 512, 32, 8)
    _write_results(res, "bench_attention", "20261130-100000", [_rates(bandwidth=4.2e12)] + [
        _bench_summary(c, "hydragen", 5e5, speedup_vs_reference=2.0) for c in (a, b)] + [
        _bench_summary(c, "reference", 2.5e5) for c in (a, b)])
    _write_results(res, "bench_attention-gqa", "20261130-103000", [_rates(bandwidth=4.3e12),  # newer: row b from here
        _bench_summary(b, "hydragen", 9e5, speedup_vs_reference=3.0, speedup_vs_torch_hydragen=2.25),
        _bench_summary(b, "reference", 3e5), _bench_summary(b, "torch_hydragen", 4e5, max_abs_err_vs_reference=0.002),
        {**_bench_summary(b, "flashinfer_cascade", 1), "status": "skipped", "results": {},
         "reason": "s=1: flashinfer is not importable (ModuleNotFoundError); extract the tarball"}])
    for stamp, tok in (("20261130-090000", 100.0), ("20261130-100500", 1000.0)):  # the newer part1 counts
        _write_results(res, "e2e_throughput-part1", stamp, [_model()] + [
            _decode(_e2e_point(1024, 4), "hydragen", tok), _decode(_e2e_point(1024, 4), "none", 2 * tok)])
    _write_results(res, "e2e_throughput-part2", "20261130-095000", [
        _decode(_e2e_point(4096, 4), "hydragen", 900.0), _decode(_e2e_point(4096, 4), "shared_storage", 300.0)])
    _write_results(res, "e2e_throughput-part3", "20261130-040000", [  # hours older, another NAME: it counts
        _decode(_e2e_point(16384, 1), "hydragen", 7.0)])
    _write_results(res, "e2e_throughput-part2", "20261129-095000", [  # an older part2: left out
        _decode(_e2e_point(4096, 1), "hydragen", 5.0)])
    chosen = report.choose(report.load_results(res))
    assert sorted(f.label for f in chosen["e2e_throughput"]) == [
        "e2e_throughput-part1-nvidia-h200-20261130-100500", "e2e_throughput-part2-nvidia-h200-20261130-095000",
        "e2e_throughput-part3-nvidia-h200-20261130-040000"]
    changed, _ = report.update_readme(readme, res, plot=False)
    text = readme.read_text()
    assert changed and text.startswith("# title\n\nintro\n\n") and text.endswith(f"{report.END}\n\n## Dependencies\n")
    section = _section(readme)
    assert "old text" not in section and "## Results on an NVIDIA H200 (JAX 0.11.2)" in section
    # bench: row a from the full run, row b (with the anchor) from the newer gqa run; the skipped anchor named
    assert "| 64 | 1024 | 512 | 32/32 | 500.0k | 250.0k | – | 1.00M | 0.500 | – |" in section
    assert "| 512 | 4096 | 512 | 32/8 | 900.0k | 300.0k | 400.0k | 1.00M | 0.900 | 2.25x |" in section
    assert "Hydragen / PyTorch Hydragen" in section and "FlashInfer cascade" not in section.split("|---")[0]
    assert "Not run: FlashInfer cascade (flashinfer is not importable (ModuleNotFoundError); extract the tarball)." \
        in section  # whole (it was cut at 160 characters, its hint's last step lost)
    assert "row 1: `bench_attention-nvidia-h200-20261130-100000.*`" in section
    assert "row 2: `bench_attention-gqa-nvidia-h200-20261130-103000.*`" in section
    assert "floor bandwidth 4.300 TB/s (best of: copy 4.300, read 4.000, pallas_read failed TB/s)" in section
    assert "2.0–3.0× jnp reference" in section and "within 0.002 of the jnp reference" in section
    # e2e: rows from the newest part1, part2 and part3; the older part1's and part2's rows left out
    assert "| 1K | 4 | 1.0k | – | 2.0k |" in section and "| 4K | 4 | 900 | 300 | – |" in section
    assert "| 16K | 1 | 7 |" in section
    assert "| 4K | 1 |" not in section and "| 1K | 4 | 100 |" not in section
    assert "0.50 at 1K (B=4; paper 0.84)" in section and "3.0× at 4K/4" in section
    assert "13.48 GB of weights" in section


def test_report_shows_floors_and_the_long_document_ratio(tmp_path, readme):
    res = tmp_path / "results"
    _write_results(res, "e2e_throughput-part1", "20261130-100000", [_model()] + [
        _decode(_e2e_point(16384, 8), m, tok, floors=True) for m, tok in (("hydragen", 400.0), ("none", 800.0))])
    _write_results(res, "long_document", "20261130-101000", [
        _decode({**_e2e_point(p, 256)}, m, tok, kind="long_document", floors=True)
        for p, m, tok in ((1024, "hydragen", 1e4), (16384, "hydragen", 8e3), (1024, "none", 2e4), (16384, "none", 2e4))])
    _write_results(res, "tree_apps", "20261130-102000", [
        _rec("tree_apps", "decode", {"fewshot": 2048, "problem_prompt": 512, "problems": 8, "samples": 16,
                                     "generate": 128, "batch": 128, "levels": lv}, mode,
             {"decode_s": d, "tokens_per_s": 128 * 128 / d, "cache_bytes": 1e10}, status="ok")
        for mode, lv, d in (("two_level", 2, 2.0), ("one_level", 1, 4.0), ("two_level_shared_storage", 2, 5.0))])
    report.update_readme(readme, res, plot=False)
    section = _section(readme)
    # e2e floors: floor tok/s 2 x measured, fraction 0.5, extra = 10 ms vs an attention floor of 1 ms (levels 2 ms)
    assert "| 16K | 8 | 800 | 0.500 | 0.500 | 10.000 | 1.000 | 10.00 | 5.00 |" in section
    assert "0.50 at 16K (B=8; paper 0.76)" in section
    # rel. tok/s, rel. floor, fractions of hydragen and none; extra 32 - 12.8 ms against 1 ms, levels apart 2 ms
    assert "| 16K | 8.0k | 0.80 | 1.00 | 0.80 | 0.500 | 0.500 | 19.20 | 9.60 |" in section
    assert "Throughput at a 16K prefix / at 1K: hydragen 0.80 (floors 0.80), none 1.00 (floors 1.00); paper, " \
           "Hydragen: 0.90." in section
    assert "Two-level Hydragen takes 50% less decode time than one-level (2.00 s vs 4.00 s for 128 tokens) and " \
           "60% less than two-level shared storage (5.00 s)" in section


def test_report_takes_each_long_document_row_from_the_newest_run_that_has_it(tmp_path, readme):
    res = tmp_path / "results"
    point = lambda p: {**_e2e_point(p, 256)}  # noqa: E731
    _write_results(res, "long_document", "20261203-225052", [  # the full run: 8K's `none` ran out of time
        _decode(point(p), m, tok, kind="long_document", floors=True)
        for p, m, tok in ((1024, "hydragen", 1e4), (1024, "none", 2e4), (8192, "hydragen", 9e3),
                          (16384, "hydragen", 8e3), (16384, "none", 2e4))]
        + [{**_decode(point(8192), "none", 1.0, kind="long_document"), "status": "skipped", "results": {}}])
    _write_results(res, "long_document-p8k", "20261203-234254", [  # a newer run of 8K alone: its row whole
        _decode(point(8192), m, tok, kind="long_document", floors=True) for m, tok in (("hydragen", 5e3),
                                                                                      ("none", 1e4))])
    _write_results(res, "long_document", "20261201-120000", [  # an older full run: left out
        _decode(point(p), "hydragen", 1.0, kind="long_document") for p in (1024, 2048)])
    _write_results(res, "long_document-b128", "20261202-120000", [  # another batch's run: not mixed in
        _decode({**_e2e_point(p, 128)}, "hydragen", 1.0, kind="long_document") for p in (1024, 4096)])
    report.update_readme(readme, res, plot=False)
    section = _section(readme)
    assert "`long_document-nvidia-h200-20261203-225052.*`" in section
    assert "`long_document-p8k-nvidia-h200-20261203-234254.*`" in section
    assert "20261201-120000" not in section and "| 2K |" not in section
    assert "b128" not in section and "| 4K |" not in section and "| 1K | 10.0k |" in section
    # 8K: 5k tok/s and `none` at 10k from the p8k run, relative to the full run's 1K row
    assert "| 8K | 5.0k | 0.50 | 0.50 |" in section
    assert "| 16K | 8.0k | 0.80 | 1.00 |" in section


def test_report_gives_tensor_parallel_runs_a_section_of_their_own(tmp_path, readme):
    res = tmp_path / "results"
    point = lambda tp, b: {**_e2e_point(1024, b), "tp": tp}  # noqa: E731
    _write_results(res, "e2e_throughput-part1", "20261130-100000", [_model(), _decode(_e2e_point(1024, 8), "hydragen", 1e3)])
    _write_results(res, "e2e_tp-7b-1k", "20261130-101000", [_model()] + [
        _decode(point(tp, 512), mode, tok * tp, floors=True)
        for tp in (1, 2) for mode, tok in (("hydragen", 3e4), ("none", 4e4))])
    _write_results(res, "tree_apps", "20261130-102000", [_rec(  # a tree on a mesh: no part for it
        "tree_apps", "decode", {"fewshot": 8, "problem_prompt": 4, "problems": 2, "samples": 2, "generate": 8,
                                "batch": 4, "levels": 2, "tp": 2}, "two_level", {"decode_s": 1.0})])
    chosen = report.choose(report.load_results(res))
    assert "tree_apps" not in chosen
    assert [f.name for f in chosen["e2e_throughput"]] == ["e2e_throughput-part1"]  # TP points stay out of it
    assert [f.name for f in chosen[report.TP_KIND]] == ["e2e_tp-7b-1k"]
    report.update_readme(readme, res, plot=False)
    section = _section(readme)
    tp = section[section.index("**Tensor parallel**"):]
    assert "`e2e_tp-7b-1k-nvidia-h200-20261130-101000.*`" in tp and "13.48 GB of weights" in tp
    assert "| 2 | 1024 | 512 | 60.0k | 80.0k |" in tp  # tok/s per device count
    assert "| 1024 | 512 | 2.00x | 2.00x |" in tp  # speed-up over one device
    assert "| 2 | 1024 | 512 | 0.500 | 0.500 |" in tp  # floor fractions (three decimals, as everywhere)
    assert "| 1 | 1024 | 512 |" not in section[:section.index("**Tensor parallel**")]


def test_report_falls_back_to_another_device_per_experiment(tmp_path, readme):
    res = tmp_path / "results"
    _write_results(res, "bench_attention", "20261130-100000", [
        _rates(), _bench_summary((64, 1024, 512, 32, 32), "hydragen", 5e5)])
    _write_results(res, "tree_apps", "20261125-010000", [_rec(
        "tree_apps", "decode", {"fewshot": 2048, "problem_prompt": 512, "problems": 8, "samples": 16,
                                "generate": 128, "batch": 128, "levels": 2}, "two_level", {"decode_s": 1.0, "tokens_per_s": 32.0,
                                                                         "cache_bytes": 1e6}, device=H100)], device=H100)
    report.update_readme(readme, res, plot=False)
    section = _section(readme)
    assert section.count("## Results\n") == 1 and "`gpu:NVIDIA H100 80GB HBM3`" in section
    assert "**[NVIDIA H100 80GB HBM3] APPS-like tree**" in section and "**[NVIDIA H200] One decode step" in section
    report.update_readme(readme, res, device="nvidia-h100-80gb-hbm3", plot=False)  # asked: H100 (bench falls back)
    assert "**[NVIDIA H200] One decode step" in _section(readme)


def test_report_leaves_out_runs_of_another_setup_and_runs_stopped_before_a_measurement(tmp_path):
    """A review's findings: a run of a config not in experiments/configs, a tree run with another workload, an e2e
    run with a shape field the committed config leaves out, a newer file holding only device rates (a run stopped at
    its time limit) and a CPU bench run where no accelerator has one never take a section's rows."""
    res = tmp_path / "results"
    tree = {"fewshot": 2048, "problem_prompt": 512, "problems": 8, "samples": 16, "generate": 128, "batch": 128,
            "levels": 2}
    two_level = {"decode_s": 1.0, "tokens_per_s": 32.0, "cache_bytes": 1e6}
    _write_results(res, "tree_apps", "20261130-100000", [_rec("tree_apps", "decode", tree, "two_level", two_level)])
    _write_results(res, "tree_apps", "20261130-110000", [_rates()])  # stopped before its first point
    _write_results(res, "tree_apps-g16", "20261130-120000", [_rec(
        "tree_apps", "decode", {**tree, "generate": 16}, "two_level", two_level)])
    _write_results(res, "e2e_throughput-part1", "20261130-100000", [_model(), _decode(_e2e_point(1024, 8), "none",
                                                                                        1e3)])
    tied = _rec("e2e_throughput", "model", {"shape": {**SHAPE, "tie_word_embeddings": True}, "dtype": "bfloat16"},
                None, {})
    _write_results(res, "e2e_throughput-tied", "20261130-110000", [tied, _decode(_e2e_point(1024, 8), "none", 2e3)])
    mine = {**_model(), "config": "my_13b"}
    _write_results(res, "my_13b", "20261130-120000", [mine, {**_decode(_e2e_point(1024, 64), "none", 7e3),
                                                             "config": "my_13b"}])
    cpu = "cpu:cpu"
    on_cpu = _bench_summary((64, 1024, 512, 32, 32), "hydragen", 5e5, device=cpu)  # the config's setup on a CPU
    on_cpu["point"]["backend"] = "xla"
    _write_results(res, "bench_attention", "20261130-130000", [_rates(device=cpu), on_cpu], device=cpu)
    files = report.load_results(res)
    assert report.newest_per_name([f for f in files if f.kind == "tree_apps"])[0].stamp.hour == 12  # measured
    chosen = report.choose(files)
    assert [f.label for f in chosen["tree_apps"]] == ["tree_apps-nvidia-h200-20261130-100000"]
    assert [f.label for f in chosen["e2e_throughput"]] == ["e2e_throughput-part1-nvidia-h200-20261130-100000"]
    assert "bench_attention" not in chosen
    assert not report._shape_differs({}, {"eos_token_ids": [2]})  # JSON's list against the config's default (2,)
    assert report._shape_differs({}, {"eos_token_ids": [3]})
    only_cpu = report.choose([f for f in files if f.slug == "cpu"])  # the only device: its runs are shown
    assert [f.slug for f in only_cpu["bench_attention"]] == ["cpu"]


def test_report_cli_check_markers_and_plot(tmp_path, readme, capsys):
    res = tmp_path / "results"
    for part, prefix in (("part1", 1024), ("part3", 16384)):
        _write_results(res, f"e2e_throughput-{part}", f"20261130-10{prefix % 7}000", [
            _decode(_e2e_point(prefix, b), m, 100.0 * b) for b in (8, 64) for m in ("hydragen", "none")])
    args = ["report", "--readme", str(readme), "--results-dir", str(res)]
    assert cli.main(args + ["--check"]) == 1 and "+| 1K | 8 |" in capsys.readouterr().out
    assert "old text" in readme.read_text()  # --check writes nothing
    assert cli.main(args) == 0
    plot = res / "e2e_throughput-combined-nvidia-h200-20261130-104000.png"  # the newest part's stamp
    assert plot.stat().st_size > 1000 and f"](results/{plot.name})" in _section(readme)  # relative to the README
    assert cli.main(args + ["--check"]) == 0
    # A newer part makes a new picture, and the older one goes (it showed the parts it replaced).
    # Another device whose slug starts with this one's keeps its picture.
    other = res / "e2e_throughput-combined-nvidia-h200-nvl-20261130.png"
    other.write_bytes(b"png")
    _write_results(res, "e2e_throughput-part1", "20261130-120000", [
        _decode(_e2e_point(1024, b), m, 200.0 * b) for b in (8, 64) for m in ("hydragen", "none")])
    assert cli.main(args) == 0 and not plot.exists() and other.exists()
    other.unlink()
    assert [p.name for p in res.glob("*combined*")] == ["e2e_throughput-combined-nvidia-h200-20261130-120000.png"]
    assert "-20261130-120000.png)" in _section(readme) and cli.main(args + ["--check"]) == 0
    readme.write_text("no markers\n")
    assert cli.main(args) == 2 and "expected one '<!-- report:begin" in capsys.readouterr().err
    with pytest.raises(ValueError, match="found 2 begin"):
        report.replace_section(f"{report.BEGIN}\n{report.BEGIN}\n{report.END}\n", "x", "nvidia-h200")


def test_report_links_the_combined_plot_of_its_results_dir_relative_to_the_readme(tmp_path):
    """With --results-dir and --readme elsewhere, the plot's link is the picture drawn in that folder, relative to
    the README (not experiments/results/); with --no-plot and no picture there, no link names one."""
    res, docs = tmp_path / "out" / "my results", tmp_path / "docs"
    docs.mkdir()
    readme = docs / "README.md"
    readme.write_text(f"# title\n\n{report.BEGIN} -->\nold text\n{report.END}\n")
    _write_results(res, "e2e_throughput-part1", "20261130-100000", [
        _decode(_e2e_point(1024, b), m, 100.0 * b) for b in (8, 64) for m in ("hydragen", "none")])
    args = ["report", "--readme", str(readme), "--results-dir", str(res)]
    assert cli.main(args + ["--no-plot"]) == 0 and "![" not in _section(readme) and not list(res.glob("*.png"))
    assert cli.main(args) == 0
    links = re.findall(r"!\[decode throughput vs batch\]\(([^)]+)\)", _section(readme))
    assert links == ["../out/my%20results/e2e_throughput-combined-nvidia-h200-20261130-100000.png"], links
    assert "All files under `../out/my%20results/`" in _section(readme)
    assert (docs / links[0].replace("%20", " ")).is_file()  # the link works from the README's folder


def test_readme_results_section_is_generated_from_the_results():
    """README.md's results section is what `python -m experiments report` makes of experiments/results/ (regenerate
    it after adding results: `python -m experiments report`)."""
    changed, diff = report.update_readme(records.REPO_ROOT / "README.md", records.RESULTS_DIR, check=True)
    assert not changed, diff[:3000]


def test_records_name_the_commit_given_on_the_command_line(monkeypatch):
    """The device machine's copy of the tree carries a stale .git: HYDRAGEN_JAX_COMMIT names the code that ran."""
    monkeypatch.delenv("HYDRAGEN_JAX_COMMIT", raising=False)
    head = records.git_commit()
    assert head is None or len(head.removesuffix("-dirty")) == 40
    monkeypatch.setenv("HYDRAGEN_JAX_COMMIT", " 3b15fcb\n")
    assert records.git_commit() == "3b15fcb"
    monkeypatch.setenv("HYDRAGEN_JAX_COMMIT", "")
    assert records.git_commit() == head


def test_records_mark_a_commit_whose_tree_was_edited(monkeypatch, tmp_path):
    """Without HYDRAGEN_JAX_COMMIT, a tree whose tracked files differ from HEAD (uncommitted edits, or the device
    machine's stale .git beside a newer tree) is recorded as `<HEAD>-dirty`, and the README's file lines keep the
    mark; untracked files do not count."""
    import shutil  # noqa: PLC0415

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    monkeypatch.delenv("HYDRAGEN_JAX_COMMIT", raising=False)
    monkeypatch.setattr(records, "REPO_ROOT", tmp_path)

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                              capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "records.py").write_text("# the code's own file, tracked\n")
    git("add", "code.py", "experiments/records.py")
    git("commit", "-qm", "first")
    head = git("rev-parse", "HEAD")
    assert records.git_commit() == head
    (tmp_path / "new.py").write_text("y = 2\n")  # untracked
    assert records.git_commit() == head
    (tmp_path / "code.py").write_text("x = 2\n")
    assert records.git_commit() == head + "-dirty"
    # an installed copy (pip install .) inside another repository names no commit, not that repository's HEAD
    (tmp_path / "site" / "experiments").mkdir(parents=True)
    (tmp_path / "site" / "experiments" / "records.py").write_text("# installed, untracked\n")
    monkeypatch.setattr(records, "REPO_ROOT", tmp_path / "site")
    assert records.git_commit() is None
    monkeypatch.setattr(records, "REPO_ROOT", tmp_path)
    record = {"record": "bench", "status": "ok", "date_utc": "2026-12-04T09:00:00+00:00",
              "git_commit": head + "-dirty"}
    results = report.ResultsFile(path=tmp_path / "x.jsonl", name="x", stamp=None, kind="bench", device="gpu:X",
                                 records=(record,))
    line = report._file_line(results)
    assert f"recorded commit `{head[:7]}-dirty`" in line


def test_gpu_full_archives_into_a_relative_out(tmp_path):
    """OUT relative to the caller's folder (the archive was written from inside the results folder: lost, with
    exit 0). A stand-in PYTHON reports a GPU and writes a one-line results file for the run."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/bash\nif [[ "$1" == -c ]]; then echo "gpu fake-gpu-out"; exit 0; fi\n'
                    'while [[ $# -gt 0 ]]; do if [[ "$1" == --out ]]; then echo "{}" > "$2"; fi; shift; done\n')
    fake.chmod(0o755)
    root = pathlib.Path(__file__).resolve().parent.parent
    env = dict(os.environ, GPU_PYTHON=str(fake), OUT="rel/out")
    try:
        done = subprocess.run(["bash", str(root / "experiments/gpu_full.sh"), "tree"], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "archiving" not in done.stdout, done.stdout
        archives = list((tmp_path / "rel" / "out").glob("tree_apps-fake-gpu-out-*.tgz"))
        assert len(archives) == 1, done.stdout
    finally:
        for f in (root / "experiments" / "results").glob("tree_apps-fake-gpu-out-*"):
            f.unlink()


@pytest.mark.parametrize("part, tag, extra, name", [
    ("e2e-part1", "", "--set grid.batches=[64]", "e2e_throughput-part1"),
    ("e2e-part1", "b64", "--set grid.batches=[64]", "e2e_throughput-part1-b64"),
    ("long-doc2", "", "--set timing.repeats=2", "long_document-part2"),
    ("long-doc2", "p8k", "--set grid.prefixes=[8192]", "long_document-part2-p8k")])
def test_gpu_full_names_a_tagged_run_apart(tmp_path, part, tag, extra, name):
    """`TAG` gives a restricted run a NAME of its own (the report then merges its rows with the full part's instead of
    replacing it). A stand-in PYTHON reports a GPU and records the runner's arguments; nothing runs."""
    args = tmp_path / "args.txt"
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/bash\nif [[ "$1" == -c ]]; then echo "gpu fake-gpu"; else echo "$@" >> {args}; fi\n')
    fake.chmod(0o755)
    root = pathlib.Path(__file__).resolve().parent.parent
    env = dict(os.environ, GPU_PYTHON=str(fake), TAG=tag, EXTRA=extra)
    env.pop("OUT", None)
    done = subprocess.run(["bash", str(root / "experiments/gpu_full.sh"), part], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    line = args.read_text().splitlines()[0]
    assert f"--out experiments/results/{name}-fake-gpu-" in line and line.endswith(extra), line  # EXTRA last: it wins
    if part == "long-doc2":  # the second half of the long document's prefixes
        assert "grid.prefixes=[32768, 2048, 8192]" in line, line
    for assignment in line.split(" --set ")[1:]:  # each a key the part's config has (a wrong one raises)
        config.load("long_document" if part.startswith("long") else "e2e_throughput",
                    assignments=[assignment.split(" --")[0]])


def test_gpu_full_splits_extra_as_the_shell_and_exits_with_a_failed_runs_status(tmp_path):
    """EXTRA's words are split as the shell splits them (a quoted value with spaces stays one argument), and a run
    that fails (here: status 3, as a config error from EXTRA would) makes the script's own status, not 0."""
    args = tmp_path / "args.txt"
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/bash\nif [[ "$1" == -c ]]; then echo "gpu fake-gpu"; exit 0; fi\n'
                    f'if [[ "$3" == run ]]; then printf "%s\\n" "$@" > {args}; exit 3; fi\n')
    fake.chmod(0o755)
    root = pathlib.Path(__file__).resolve().parent.parent
    env = dict(os.environ, GPU_PYTHON=str(fake), TAG="", EXTRA='--set "grid.prefixes=[1024, 4096]" --set timing.repeats=2')
    env.pop("OUT", None)
    done = subprocess.run(["bash", str(root / "experiments/gpu_full.sh"), "long-doc1"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 3, (done.stdout, done.stderr)
    assert "long_document-part1 exited with status 3 (partial results kept)" in done.stdout
    assert args.read_text().splitlines()[-4:] == ["--set", "grid.prefixes=[1024, 4096]", "--set", "timing.repeats=2"]


@pytest.mark.parametrize("rows, tag, want", [("", "", "bench_attention-mha-fake-gpu-.* rows=0,1,2,3,4"),
                                             ("4", "row4", "bench_attention-mha-row4-fake-gpu-.* rows=4")])
def test_gpu_full_runs_the_bench_rows_asked_for(tmp_path, rows, tag, want):
    """`ROWS` picks the seed rows of a bench part (the stand-in PYTHON answers the row selection with the rows it was
    asked for)."""
    args = tmp_path / "args.txt"
    fake = tmp_path / "python"
    fake.write_text('#!/bin/bash\nif [[ "$1" == -c && "$2" == *select_rows* ]]; then echo "rows=$3"\n'
                    f'elif [[ "$1" == -c ]]; then echo "gpu fake-gpu"; else echo "$@" >> {args}; fi\n')
    fake.chmod(0o755)
    root = pathlib.Path(__file__).resolve().parent.parent
    env = dict(os.environ, GPU_PYTHON=str(fake), TAG=tag, ROWS=rows, ANCHORS_DIR=str(tmp_path / "none"))
    env.pop("OUT", None)
    done = subprocess.run(["bash", str(root / "experiments/gpu_full.sh"), "bench-mha"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert re.search(want, args.read_text().splitlines()[0]), args.read_text()


def test_report_keeps_the_device_its_marker_names(tmp_path, readme, capsys):
    """The begin marker names the section's device: a newer run on another GPU does not take the section over; a
    device asked for (`--device`) does, and stays; a marked device without results gives way to the newest."""
    res = tmp_path / "results"
    _write_results(res, "bench_attention", "20261130-100000", [
        _rates(), _bench_summary((64, 1024, 512, 32, 32), "hydragen", 5e5)])
    report.update_readme(readme, res, plot=False)
    assert report.marked_device(readme.read_text()) == "nvidia-h200"
    _write_results(res, "bench_attention", "20261205-100000", [  # newer, on an H100
        _rates(device=H100), _bench_summary((64, 1024, 512, 32, 32), "hydragen", 4e5, device=H100)], device=H100)
    report.update_readme(readme, res, plot=False)
    section = _section(readme)
    assert "## Results on an NVIDIA H200" in section and "500.0k" in section and "400.0k" not in section
    assert ("Other devices:\n\n- NVIDIA H100 80GB HBM3 (JAX 0.11.2): one decode step of attention at 0.400 of the "
            "floor over 1 row; tables: `bench_attention-nvidia-h100-80gb-hbm3-20261205-100000.md`.") in section, section
    args = ["report", "--readme", str(readme), "--results-dir", str(res), "--no-plot"]
    assert cli.main(args + ["--device", "nvidia-h100-80gb-hbm3"]) == 0
    assert report.marked_device(readme.read_text()) == "nvidia-h100-80gb-hbm3" and "400.0k" in _section(readme)
    assert "- NVIDIA H200 (JAX 0.11.2): one decode step of attention at 0.500" in _section(readme)
    assert cli.main(args + ["--check"]) == 0  # and it stays
    readme.write_text(readme.read_text().replace("(device nvidia-h100-80gb-hbm3:", "(device nvidia-a100:"))
    report.update_readme(readme, res, plot=False)  # no A100 results: the newest device's (the H100's)
    assert report.marked_device(readme.read_text()) == "nvidia-h100-80gb-hbm3" and "400.0k" in _section(readme)
    capsys.readouterr()


def test_report_sums_up_another_devices_end_to_end_runs(tmp_path, readme, capsys):
    """Another accelerator's single-device e2e runs get its line too: Hydragen's range of step-floor fractions over
    its points, its extra time over `none` against the attention floor at B >= 64 only, and the runs' tables; a
    device with e2e runs and no bench runs gets a line of its own; tensor-parallel runs stay out of it."""
    res = tmp_path / "results"
    _write_results(res, "bench_attention", "20261130-100000", [
        _rates(), _bench_summary((64, 1024, 512, 32, 32), "hydragen", 5e5)])
    points = [_e2e_point(1024, 8), _e2e_point(1024, 64), _e2e_point(4096, 512)]
    recs = [_model(device=H100)]
    for point, (hyd, none) in zip(points, [(100.0, 2000.0), (8000.0, 10000.0), (20000.0, 40000.0)]):
        recs += [_decode(point, "hydragen", hyd, device=H100, floors=True),
                 _decode(point, "none", none, device=H100, floors=True)]
    recs[1]["results"]["floor_fraction"] = 0.75  # hydragen at B = 8
    _write_results(res, "e2e_throughput-part1", "20261205-100000", recs, device=H100)
    tp = [_model(device=H100), _decode({**_e2e_point(1024, 64), "tp": 2}, "hydragen", 1e3, device=H100, floors=True)]
    _write_results(res, "e2e_tp-7b", "20261205-110000", tp, device=H100)
    report.update_readme(readme, res, device="nvidia-h200", plot=False)
    section = _section(readme)
    # extra over none: B = 64 64/8000 - 64/10000 = 1.6 ms, B = 512 512/20000 - 512/40000 = 12.8 ms (B = 8's 76 ms
    # left out); the attention floor 1 ms a step
    assert ("- NVIDIA H100 80GB HBM3 (JAX 0.11.2): end to end (random bfloat16 Llama, 32 layers, hidden 4096, 32/32 "
            "heads, 13.48 GB of weights): Hydragen at 0.50–0.75 of its step floor over 3 points, its extra time over "
            "`none` 1.60–12.80× the attention floor at B ≥ 64; tables: "
            "`e2e_throughput-part1-nvidia-h100-80gb-hbm3-20261205-100000.md`.") in section, section
    assert "e2e_tp-7b" not in section.split("Other devices:")[1].split("\n\n")[1]
    capsys.readouterr()


def test_report_keeps_accelerator_results_and_measured_points(tmp_path, readme, capsys):
    """A newer CPU run (tiny sizes, a check) does not take the section over; a point that a newer run skipped keeps
    the older run's measurement; an unknown --device is refused, naming the devices there are."""
    res = tmp_path / "results"
    _write_results(res, "e2e_throughput-part1", "20261130-100000", [
        _decode(_e2e_point(1024, 64), m, tok) for m, tok in (("hydragen", 1e4), ("none", 2e4))])
    _write_results(res, "e2e_throughput-part1-b64", "20261130-110000", [  # newer, its B = 64 points skipped
        {**_decode(_e2e_point(1024, 64), m, 1.0), "status": "skipped", "results": {}, "reason": "time budget"}
        for m in ("hydragen", "none")])
    _write_results(res, "e2e_throughput-part1", "20261130-120000", [  # newest of all, on a CPU
        _decode(_e2e_point(1024, 64), m, 5.0, device="cpu:cpu") for m in ("hydragen", "none")], device="cpu:cpu")
    report.update_readme(readme, res, plot=False)
    section = _section(readme)
    assert "## Results on an NVIDIA H200" in section and "| 1K | 64 | 10.0k | 20.0k |" in section, section
    args = ["report", "--readme", str(readme), "--results-dir", str(res)]
    assert cli.main(args + ["--device", "NVIDIA H200", "--check"]) == 0  # a device kind is taken as its slug
    capsys.readouterr()
    assert cli.main(args + ["--device", "nvidia-h100"]) == 2
    assert "device 'nvidia-h100': no results of it; the results' devices are ['cpu', 'nvidia-h200']" in \
        capsys.readouterr().err
    assert cli.main(["report", "--check", str(res / "e2e_throughput-part1-nvidia-h200-20261130-100000.jsonl")]) == 2
    assert "apply to the README's section" in capsys.readouterr().err


def test_report_keeps_a_measured_bench_row_and_leaves_out_runs_of_another_setup(tmp_path, readme):
    """A bench row that a newer run skipped keeps the older run's measurement (as e2e points do); runs of another
    setup than the committed config's (float32 at D = 64; Hydragen on XLA; the 13B shape with 256 tokens; 2048
    unique tokens; the model's attention on XLA) neither replace rows nor mix under the headers, which describe the
    committed configs (the last three replaced the e2e row)."""
    res = tmp_path / "results"
    a = (64, 1024, 512, 32, 32)
    _write_results(res, "bench_attention", "20261130-100000", [_rates()] + [
        _bench_summary(a, "hydragen", 5e5), _bench_summary(a, "reference", 2.5e5)])
    _write_results(res, "bench_attention-row0", "20261130-110000", [_rates()] + [  # newer: the row skipped
        {**_bench_summary(a, m, 1.0), "status": "skipped", "results": {}, "reason": "time budget exhausted"}
        for m in ("hydragen", "reference")])
    fp32 = [{**s, "point": {**s["point"], "dtype": "float32", "head_dim": 64}}
            for s in (_bench_summary(a, "hydragen", 7e5), _bench_summary(a, "reference", 3e5))]
    _write_results(res, "bench_attention-fp32", "20261130-120000", [_rates()] + fp32)  # newest: another setup
    xla = [{**s, "point": {**s["point"], "backend": "xla"}} for s in (_bench_summary(a, "hydragen", 1e5),)]
    _write_results(res, "bench_attention-xla", "20261130-130000", [_rates()] + xla)  # its Hydragen on XLA
    _write_results(res, "e2e_throughput-part1", "20261130-100000", [_model()] + [
        _decode(_e2e_point(1024, 64), m, tok) for m, tok in (("hydragen", 1e4), ("none", 2e4))])
    big = {**SHAPE, "hidden_size": 5120, "num_hidden_layers": 40}
    _write_results(res, "e2e_throughput-part1-13b", "20261130-110000", [  # newer, the 13B shape
        {**_model(), "point": {"shape": big, "dtype": "bfloat16"}}] + [
        _decode({**_e2e_point(1024, 64), "generate": 256}, m, tok) for m, tok in (("hydragen", 3e3), ("none", 6e3))])
    _write_results(res, "e2e_throughput-part1-u2k", "20261130-120000", [_model()] + [  # 2048 unique tokens each
        _decode({**_e2e_point(1024, 64), "unique": 2048}, m, tok) for m, tok in (("hydragen", 4e3), ("none", 8e3))])
    _write_results(res, "e2e_throughput-part1-xla", "20261130-130000", [  # the model's attention on XLA
        {**_model(), "results": {"param_bytes": 13.48e9, "backend": "xla"}}] + [
        _decode(_e2e_point(1024, 64), m, tok) for m, tok in (("hydragen", 5e3), ("none", 9e3))])
    chosen = report.choose(report.load_results(res))
    assert [f.label for f in chosen["e2e_throughput"]] == ["e2e_throughput-part1-nvidia-h200-20261130-100000"]
    report.update_readme(readme, res, plot=False)
    section = _section(readme)
    assert "| 64 | 1024 | 512 | 32/32 | 500.0k | 250.0k |" in section, section
    assert "SKIPPED" not in section and "700.0k" not in section and "100.0k" not in section
    assert "| 1K | 64 | 10.0k | 20.0k |" in section and not {"3.0k", "4.0k", "5.0k"} & set(section.split())
    assert "32 layers, hidden 4096" in section and "40 layers" not in section and "256 generated" not in section


def test_report_text_of_a_lone_variant_on_a_cpu(tmp_path, readme):
    """A bench run of Hydragen alone, on a CPU: no empty list of speed-ups, and the article fits the device."""
    res = tmp_path / "results"
    summary = _bench_summary((64, 1024, 512, 32, 32), "hydragen", 5e5, device="cpu:cpu")
    summary["point"]["backend"] = "xla"  # `auto` on a CPU: the config's cpu_backend
    _write_results(res, "bench_attention", "20261130-100000", [_rates(device="cpu:cpu"), summary], device="cpu:cpu")
    report.update_readme(readme, res, plot=False)
    section = _section(readme)
    assert "## Results on a cpu" in section and "others'" not in section and "Hydragen / floor 0.500." in section


def test_config_paths_that_are_not_there_are_not_names(tmp_path, capsys):
    """A mistyped path to a config must not run the built-in config of the same name."""
    with pytest.raises(config.ConfigError, match=r"no config file '/nowhere/tree_apps.toml'"):
        config.resolve_path("/nowhere/tree_apps.toml")
    with pytest.raises(config.ConfigError, match=r"no config file 'tree_apps.toml'"):
        config.resolve_path("tree_apps.toml")
    assert config.resolve_path("tree_apps") == config.CONFIG_DIR / "tree_apps.toml"
    assert cli.main(["plan", "/nowhere/tree_apps.toml"]) == 2  # a clean error, as `run` gives
    assert "config error: no config file" in capsys.readouterr().err


def test_set_cannot_change_a_configs_kind():
    with pytest.raises(config.ConfigError, match=r"a config's kind cannot be changed \(it is 'bench_attention'\)"):
        config.load("bench_attention", assignments=["kind=e2e_throughput"])
    assert config.load("bench_attention", assignments=["kind=bench_attention"])["kind"] == "bench_attention"


def test_out_paths_under_a_file_are_named(tmp_path, capsys):
    """`plot --out` naming a file, or a folder under one, and `run --out` under a file: clean messages and exit 2
    (FileExistsError / NotADirectoryError tracebacks before)."""
    path = _write_results(tmp_path, "e2e_throughput-part1", "20261130-100000", [
        _model(), _decode(_e2e_point(1024, 8), "none", 1e3)])
    for out, why in ((path, "is a file"), (path / "sub", "lies under the file")):
        assert cli.main(["plot", str(path), "--out", str(out)]) == 2
        assert f"plot: --out {str(out)!r} {why}" in capsys.readouterr().err
    assert cli.main(["run", "tree_apps", "--smoke", "--out", str(path / "x.jsonl")]) == 2
    assert "config error: --out" in capsys.readouterr().err and path.read_text()  # the results file untouched


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="'pallas' runs on a GPU: the points would not fail")
def test_a_run_with_failed_points_exits_1(tmp_path, capsys):
    """A run whose points fail (here every one: the compiled kernels off a GPU) keeps its records and exits 1 (it
    exited 0, and gpu_full.sh reports failures by the status); out-of-memory and skipped points are results."""
    out = tmp_path / "x.jsonl"
    assert cli.main(["run", "e2e_throughput", "--smoke", "--set", 'backend="pallas"', "--out", str(out),
                     "--no-progress"]) == 1
    assert "point(s) failed (status error)" in capsys.readouterr().err
    assert {r["status"] for r in records.read(out) if r.get("record") == "decode"} == {"error"}


def test_a_record_cut_off_at_the_end_is_left_out_and_a_bad_line_named(tmp_path):
    """A run killed while writing its last record keeps what it measured (README): the cut-off line (no newline
    after it) is left out with a warning, and report and plot read the file (they refused it whole); a line that is
    not a record elsewhere is an error naming the file and line."""
    path = _write_results(tmp_path, "e2e_throughput-part1", "20261130-100000", [
        _model(), _decode(_e2e_point(1024, 8), "none", 1e3)])
    whole = path.read_text()
    path.write_text(whole + '{"config": "e2e_throughput", "rec')  # a run killed mid-line
    with pytest.warns(UserWarning, match=rf"{path.name}:3: the last line is cut off .*left out"):
        assert len(records.read(path)) == 2
    with pytest.warns(UserWarning, match="the last line is cut off"):
        assert cli.main(["report", str(path)]) == 0
    path.write_text(whole + '{"config": "e2e_throughput", "rec\n')  # not at the end of a write: a broken file
    with pytest.raises(ValueError, match=rf"{path.name}:3: not a JSON record"):
        records.read(path)


@pytest.mark.parametrize("select", ["-1", "9", "x", ""])
def test_select_rows_outside_the_seed_rows(select):
    with pytest.raises(config.ConfigError, match=r"--select .*: indexes must be in 0\.\.8"):
        cli.select_rows("bench_attention", False, select, [])


def test_plan_takes_the_configs_device_capacity(capsys):
    """`plan` estimates against the config's device.memory_capacity_bytes where it sets one, of which
    memory_fraction is usable, as `run` checks (memory.check_fits): once, not twice."""
    grid = ["--set", "grid.prefixes=[1024]", "--set", "grid.batches=[64]", "--set", 'modes=["hydragen"]']
    cfg = config.load("e2e_throughput", assignments=grid[1::2])
    from experiments import e2e  # noqa: PLC0415

    need = e2e.plan(cfg, 10**15)[0]["needed_bytes"]
    fraction = cfg["device"]["memory_fraction"]
    for capacity, fits in ((int(need / fraction * 1.01), "fits"), (int(need / fraction * 0.99), "OOM")):
        assert cli.main(["plan", "e2e_throughput", *grid, "--set", f"device.memory_capacity_bytes={capacity}"]) == 0
        assert capsys.readouterr().out.split()[0] == fits, (capacity, need)
    assert cli.main(["plan", "e2e_throughput", "--set", "grid.prefixes=[1024]", "--set", "grid.batches=[64]"]) == 0
    out = capsys.readouterr()
    assert out.out.split()[0] == "fits" and "an 80 GB H100's bytes_limit" in out.err  # CPU: the assumption named


def test_plan_takes_the_accelerators_capacity(capsys, monkeypatch):
    """On a GPU machine `plan` goes by that GPU's bytes_limit (as `run` does), not an H100's."""
    grid = ["--set", "grid.prefixes=[1024]", "--set", "grid.batches=[64]", "--set", 'modes=["hydragen"]']
    monkeypatch.setattr(memory.jax, "devices", lambda: [types.SimpleNamespace(memory_stats=lambda: {
        "bytes_limit": 10**6})])
    assert cli.main(["plan", "e2e_throughput", *grid]) == 0
    out = capsys.readouterr()
    assert out.out.split()[0] == "OOM" and not out.err  # 1 MB: nothing fits, and no assumption to name


def test_rates_take_their_unit_after_rounding_and_fractions_three_decimals():
    """999 960 tok/s is 1.00M, not 1000.0k (the unit was chosen before the rounding); e2e tables' floor fractions
    with three decimals as the others' (0.78 beside 0.748 before)."""
    assert [tables.fmt_rate(v) for v in (999_960, 999_949, 999.7, 999.4, 1e6)] == ["1.00M", "999.9k", "1.0k", "999",
                                                                                    "1.00M"]
    recs = [{"record": "decode", "point": {"prefix": 1024, "batch": 64}, "mode": "hydragen", "status": "ok",
             "results": {"floor_fraction": 0.78039}}]
    assert "0.780" in tables.e2e_table(recs, ("prefix", "batch"), "floor_fraction")


def test_not_measured_says_each_reason_once_on_one_line():
    """The "Not measured" bullets: one per row and reason (modes joined), a reason repeated at each of the three
    timed s said once (at fewer s it keeps their names: it is not every s's),
    an XLA message's lines joined (a bullet of several lines broke the markdown), nothing where all are ok."""
    rec = lambda status, reason=None: {"status": status, **({"reason": reason} if reason else {})}
    rows = [("B=8", "a", rec("skipped", "s=1: no torch; s=2: no torch; s=4: no torch")), ("B=8", "b", rec("ok")),
            ("B=8", "c", rec("skipped", "s=1: no torch")), ("B=8", "d", rec("oom", "s=1: X\nFailures (3):\n Y; s=2: Z")),
            ("B=9", "a", rec("error"))]
    assert tables.not_measured(rows) == [
        "## Not measured", "", "- B=8, a: SKIPPED: no torch", "- B=8, c: SKIPPED: s=1: no torch",
        "- B=8, d: OOM: s=1: X Failures (3): Y; s=2: Z",
        "- B=9, a: ERROR: no reason recorded", ""]
    assert tables.not_measured([("B=8", "b", rec("ok"))]) == []


def test_tree_plot_shows_every_variant_an_oom_one_included(tmp_path):
    """An out-of-memory variant's bar has no height: the axis stopped before its tick and "OOM" label."""
    recs = [{"record": "decode", "mode": m, "status": st, "point": {"generate": 8, "problems": 2, "samples": 2},
             "results": {"decode_s": v} if v else {}, "device": "gpu:X", "experiment": "tree_apps", "smoke": False,
             "jax_version": "0.11.2", "date_utc": "2026-12-07T12:00:00+00:00"}
            for m, st, v in (("two_level", "ok", 1.0), ("one_level", "ok", 2.0), ("standard", "oom", None))]
    captured = []
    real = plot_lib._save
    plot_lib._save = lambda fig, path: (captured.append(fig.axes[0].get_xlim()), real(fig, path))[1]
    try:
        plot_lib.plot_tree_apps(recs, tmp_path, "t")
    finally:
        plot_lib._save = real
    assert captured[0] == (-0.5, 2.5)


def test_plot_of_several_devices_draws_one_set_per_device(tmp_path):
    """`plot` of files from two GPUs drew one line through both runs' points (one device's 8-sequence point beside
    the other's 64): each device now has its own PNGs, named by its slug, holding its records only."""
    def rec(device, batch, rate):
        return {"record": "decode", "mode": "hydragen", "status": "ok", "point": {"prefix": 1024, "batch": batch},
                "results": {"tokens_per_s": rate}, "device": device, "experiment": "e2e_throughput", "smoke": False,
                "jax_version": "0.11.2", "date_utc": "2026-12-07T12:00:00+00:00"}
    recs = [rec("gpu:NVIDIA H100 80GB HBM3", 8, 1e3), rec("gpu:NVIDIA H200", 64, 9e3),
            rec("gpu:NVIDIA H100 80GB HBM3", 64, 5e3)]
    drawn = []
    real = plot_lib.PLOTTERS["e2e_throughput"]
    plot_lib.PLOTTERS["e2e_throughput"] = lambda group, out, stem: (drawn.append((stem, group)), real(group, out, stem))[1]
    try:
        paths = plot_lib.plot_records(recs, tmp_path, "combined")
    finally:
        plot_lib.PLOTTERS["e2e_throughput"] = real
    assert sorted(p.name for p in paths) == ["combined-nvidia-h100-80gb-hbm3-throughput.png",
                                             "combined-nvidia-h200-throughput.png"]
    assert all(len({r["device"] for r in group}) == 1 for _, group in drawn)
    assert sorted(len(group) for _, group in drawn) == [1, 2]
    # one device: the names stay as they were
    assert [p.name for p in plot_lib.plot_records(recs[:1], tmp_path, "one")] == ["one-throughput.png"]
    # two spellings of one device's kind (one slug): numbered, not one file written over the other
    twins = [recs[0], {**recs[1], "device": "gpu:nvidia h100 80gb hbm3"}]
    assert sorted(p.name for p in plot_lib.plot_records(twins, tmp_path, "twins")) == [
        "twins-nvidia-h100-80gb-hbm3-1-throughput.png", "twins-nvidia-h100-80gb-hbm3-2-throughput.png"]


def test_plot_of_a_file_without_measured_records_says_so(tmp_path, capsys):
    """A run killed before its first point leaves its rates only: `plot` says there is nothing to plot (status 1)."""
    path = _write_results(tmp_path, "e2e_throughput-part1", "20261130-100000", [_rates()])
    assert cli.main(["plot", str(path), "--out", str(tmp_path)]) == 1
    assert f"plot: nothing to plot in {path} (no measured records)" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


def test_a_whole_decode_past_the_point_budget_says_so(tmp_path):
    """`full_decode` times the whole decode where it fits `point_budget_s`; where it does not, the record says so."""
    out = tmp_path / "r.jsonl"
    assert cli.main(["run", "e2e_throughput", "--smoke", "--set", "decode.point_budget_s=1e-9", "--set",
                     "grid.batches=[1]", "--set", "modes=['hydragen']", "--out", str(out), "--no-progress"]) == 0
    decode = [r for r in _check_records(out) if r["record"] == "decode" and r["status"] == "ok"]
    assert decode and all("decode_s_full" not in r["results"] and "would pass point_budget_s = 1e-09"
                          in r["results"]["decode_s_full_skipped"] for r in decode), decode


def test_run_needing_more_devices_than_there_are(tmp_path, capsys):
    """A mesh larger than the machine is a config error (with the CPU hint), and leaves no empty results file."""
    out = tmp_path / "r.jsonl"
    n = len(jax.devices()) + 1
    assert cli.main(["run", "e2e_throughput", "--smoke", "--set", f"mesh.model={n}", "--out", str(out),
                     "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"mesh.model = {n} needs {n} devices" in err and "xla_force_host_platform_device_count" in err, err
    assert not out.exists()


def test_config_refuses_what_passed_validation_and_failed_later(tmp_path):
    """Values the schema took and the run then broke on, each refused naming its key (a review's findings): a
    decode length of 2 (Simpson's points 1, 1, 2 timed s = 1 twice), a seed past 2**31 (an OverflowError at every
    point), a kind that is not a string (a TypeError) or that [smoke] changes (validated as one kind, run as the
    other), a file that is not UTF-8 (a UnicodeDecodeError)."""
    for name, assignment, key in [
            ("bench_attention", "bench.configs=[{batch=2, prefix=16, out=2, q_heads=4, kv_heads=2}]",
             r"bench\.configs\[0\]\.out"),
            ("e2e_throughput", "grid.generate=2", r"grid\.generate"), ("tree_apps", "tree.generate=2", r"tree\.generate")]:
        with pytest.raises(config.ConfigError, match=rf"key '{key}' must be an integer >= 3 .*got 2"):
            config.load(name, smoke=True, assignments=[assignment])
    config.load("bench_attention", smoke=True,
                assignments=["bench.configs=[{batch=2, prefix=16, out=3, q_heads=4, kv_heads=2}]"])
    for name, key in [("bench_attention", "bench.seed"), ("e2e_throughput", "model.seed")]:
        with pytest.raises(config.ConfigError, match=rf"key '{re.escape(key)}' must be an integer in \[0, 2\*\*31\), "
                                                     r"got 2147483648"):
            config.load(name, smoke=True, assignments=[f"{key}={2**31}"])
        config.load(name, smoke=True, assignments=[f"{key}={2**31 - 1}"])
    text = config.resolve_path("e2e_throughput").read_text()
    for label, body, match in [
            ("list", text.replace('kind = "e2e_throughput"', 'kind = ["e2e_throughput"]'),
             r"key 'kind' must be one of .*got \['e2e_throughput'\]"),
            ("smoke", text.replace("[smoke]", '[smoke]\nkind = "long_document"'),
             r"key 'smoke\.kind' = 'long_document': a smoke run keeps the config's kind \('e2e_throughput'\)")]:
        path = tmp_path / f"{label}.toml"
        path.write_text(body)
        assert body != text
        with pytest.raises(config.ConfigError, match=match):
            config.load(path, smoke=True)
    for assignment, match in [("grid.prefixes=1024", r"key 'grid\.prefixes' must be a non-empty array, got 1024"),
                              ("timing=3", r"key 'timing' must be a table, got 3"),
                              # bench-attention's (the model runs ignored it), and a warm-up the run took anyway
                              ("timing.steps_per_call=8", r"unknown key 'timing\.steps_per_call'"),
                              ("timing.warmup=0", r"key 'timing\.warmup' must be an integer >= 1 .*got 0"),
                              ("device.__optional__=5", r"unknown key 'device\.__optional__'")]:
        with pytest.raises(config.ConfigError, match=match):
            config.load("e2e_throughput", smoke=True, assignments=[assignment])
    config.load("bench_attention", smoke=True, assignments=["timing.warmup=0", "timing.steps_per_call=8"])
    path = tmp_path / "latin1.toml"
    path.write_bytes(text.replace("[smoke]", "# caf\u00e9\n[smoke]").encode("latin-1"))
    with pytest.raises(config.ConfigError, match=r"latin1\.toml: not valid TOML: not UTF-8 text"):
        config.load(path)


def test_config_errors_across_keys_and_cli_input_errors(tmp_path, capsys):
    """What the schema cannot see key by key fails before anything runs, naming the key: a model shape whose heads
    do not divide, a mesh that cannot split it, a bench row whose heads do not divide; `--set` says it cannot index
    arrays; missing files and folders and a bad capacity are refused (a mistyped --results-dir would have emptied
    the README's tables)."""
    with pytest.raises(config.ConfigError, match=r"key 'model\.shape': config: num_attention_heads \(4\) must be a "
                                                 r"multiple of num_key_value_heads \(3\)"):
        config.load("e2e_throughput", smoke=True, assignments=["model.shape.num_key_value_heads=3"])
    with pytest.raises(config.ConfigError, match=r"key 'mesh\.model' = 3: tensor parallelism over 3 devices"):
        config.load("e2e_throughput", assignments=["mesh.model=3"])
    with pytest.raises(config.ConfigError, match=r"key 'bench\.configs\[0\]\.kv_heads' must divide q_heads \(4\)"):
        config.load("bench_attention", smoke=True,
                    assignments=["bench.configs=[{batch=2, prefix=16, out=4, q_heads=4, kv_heads=3}]"])
    with pytest.raises(config.ConfigError, match=r"key 'mesh\.model' must be a device count >= 1, or a non-empty "
                                                 r"list of distinct ones, got \[2, 2\]"):
        config.load("e2e_tp", assignments=["mesh.model=[2, 2]"])
    with pytest.raises(config.ConfigError, match=r"key 'grid': its longest sequence, 70000 tokens \(prompt \+ "
                                                 r"generate\), exceeds model.shape.max_position_embeddings = 65536"):
        config.load("long_document", assignments=["grid.prefixes=[1024, 69871]"])
    with pytest.raises(config.ConfigError, match=r"key 'tree': its longest sequence"):
        config.load("tree_apps", smoke=True, assignments=["tree.fewshot=5000"])
    with pytest.raises(config.ConfigError, match=r"'configs\[2\]' indexes an array, which --set cannot"):
        config.load("bench_attention", assignments=["bench.configs[2].batch=4"])
    assert cli.main(["plan", "e2e_throughput", "--smoke", "--set", "model.shape.num_key_value_heads=3"]) == 2
    assert "config error: e2e_throughput.toml: key 'model.shape'" in capsys.readouterr().err
    assert cli.main(["report", "--check", "--results-dir", str(tmp_path / "nope")]) == 2
    assert cli.main(["plot", str(tmp_path / "none.jsonl")]) == 2
    assert cli.main(["report", str(tmp_path / "none.jsonl")]) == 2
    assert cli.main(["plan", "tree_apps", "--capacity-gb", "-5"]) == 2
    err = capsys.readouterr().err
    assert "is not a folder of results files" in err and err.count("no results file") == 2, err
    assert "--capacity-gb must be a finite number > 0, got -5.0" in err


def test_the_cli_names_bad_files_and_paths_without_a_traceback(tmp_path, capsys):
    """A truncated results file to `report` or `plot`, a README that is not there, a folder as the config, an
    `--out` ending in .md (its markdown would replace the records) or naming an existing file (an earlier run's
    records, never truncated) and an infinite capacity: each a clean message and exit 2."""
    path = _write_results(tmp_path, "e2e_throughput-part1", "20261130-100000", [
        _model(), _decode(_e2e_point(1024, 8), "none", 1e3)])
    path.write_text(path.read_text() + '{"config": "e2e_throughput", "rec\n')  # a broken line, not a cut-off end
    for command in ("report", "plot"):
        assert cli.main([command, str(path)]) == 2
        assert re.search(rf"^{command}: .*{path.name}:3: not a JSON record", capsys.readouterr().err, re.M)
    assert cli.main(["report", "--readme", str(tmp_path / "NOPE.md"), "--check"]) == 2
    assert "report: --readme" in capsys.readouterr().err
    assert cli.main(["run", str(tmp_path), "--smoke"]) == 2
    assert "is a directory, not a config file" in capsys.readouterr().err
    assert cli.main(["run", "tree_apps", "--smoke", "--out", str(tmp_path / "res.md"), "--no-progress"]) == 2
    assert "the records' file cannot end in .md" in capsys.readouterr().err and not (tmp_path / "res.md").exists()
    earlier = path.read_text()  # an earlier run's records as --out: refused, the file left as it was
    assert cli.main(["run", "tree_apps", "--smoke", "--out", str(path), "--no-progress"]) == 2
    assert f"--out {str(path)!r} exists" in capsys.readouterr().err and path.read_text() == earlier
    assert cli.main(["plan", "tree_apps", "--capacity-gb", "inf"]) == 2
    assert "--capacity-gb must be a finite number > 0, got inf" in capsys.readouterr().err


def test_markdown_tables_show_a_dash_for_a_result_written_as_null(tmp_path):
    """A non-finite result is written as null (records._clean): the tables show "–" for it, not a crash."""
    point = _e2e_point(1024, 8)
    none = _decode(point, "none", 2e3)
    none["results"]["tokens_per_s"] = None
    path = _write_results(tmp_path, "e2e_throughput-part1", "20261130-100000", [
        _model(), _decode(point, "hydragen", 1e3), none])
    assert cli.main(["report", str(path)]) == 0
    tree = {"levels": 2, "batch": 128}
    one = _rec("tree_apps", "decode", dict(tree, levels=1), "one_level",
               {"decode_s": None, "tokens_per_s": 1e3, "cache_bytes": None})
    two = _rec("tree_apps", "decode", tree, "two_level", {"decode_s": 0.5, "tokens_per_s": 2e3, "cache_bytes": 1e9})
    path = _write_results(tmp_path, "tree_apps", "20261130-100000", [_model("tree_apps"), one, two])
    assert cli.main(["report", str(path)]) == 0
    md = path.with_suffix(".md").read_text()
    assert "| one_level | 1 | 128 | – | – | 1.0k | – | – |" in md and "| two_level | 2 | 128 | 0.5 | – | 2.0k | 1.00 | – |" in md


def test_report_of_a_folder_without_reportable_runs_leaves_the_readme(tmp_path, readme, capsys):
    """A results folder of smoke runs only must not replace the README's tables with "No results yet"."""
    res = tmp_path / "results"
    recs = [_model(), _decode(_e2e_point(1024, 8), "none", 1e3)]
    _write_results(res, "e2e_throughput-part1", "20261130-100000", [dict(r, smoke=True) for r in recs])
    before = readme.read_text()
    assert cli.main(["report", "--readme", str(readme), "--results-dir", str(res), "--no-plot"]) == 2
    assert "no results to report" in capsys.readouterr().err and readme.read_text() == before


def test_default_output_never_names_an_existing_file(tmp_path, monkeypatch):
    """Two runs of one config started in the same second: the second's default file is another, in the time-stamped
    form `report` reads (the first's records are never truncated)."""
    monkeypatch.setattr(records, "RESULTS_DIR", tmp_path)
    first = records.default_output("tree_apps", smoke=False)
    first.write_text("{}\n")
    second = records.default_output("tree_apps", smoke=False)
    assert second != first and not second.exists() and report.STAMP.search(second.name), (first, second)
    with pytest.raises(FileExistsError):  # the writer itself refuses an existing file
        records.RecordWriter(first, {"name": "tree_apps", "kind": "tree_apps", "smoke": False})
    assert first.read_text() == "{}\n"


def test_combined_plot_draws_the_runs_the_tables_show(tmp_path, readme, monkeypatch):
    """Two runs of one point (a full part, then a run of some batches): the picture drew both, two dots at one batch;
    now each point's record from the run the tables take, and its title spans the runs' dates."""
    res = tmp_path / "results"
    _write_results(res, "e2e_throughput-part1", "20261130-100000", [
        _decode(_e2e_point(1024, b), m, 100.0 * b) for b in (8, 64) for m in ("hydragen", "none")])
    newer = [dict(_decode(_e2e_point(1024, 8), m, 300.0), date_utc="2026-12-01T10:00:00+00:00")
             for m in ("hydragen", "none")]
    _write_results(res, "e2e_throughput-part1-b8", "20261201-100000", newer)
    drawn = []
    real = plot_lib.plot_e2e_throughput
    monkeypatch.setattr(plot_lib, "plot_e2e_throughput", lambda recs, *a: drawn.append(recs) or real(recs, *a))
    report.update_readme(readme, res)
    (recs,) = drawn
    got = sorted((r["point"]["batch"], r["mode"], r["results"]["tokens_per_s"]) for r in recs)
    assert got == [(8, "hydragen", 300.0), (8, "none", 300.0), (64, "hydragen", 6400.0), (64, "none", 6400.0)], got
    assert plot_lib._title(recs, "x").endswith("2026-11-30 to 2026-12-01")
    assert plot_lib._title(newer, "x").endswith("JAX 0.11.2, 2026-12-01")  # one date: once


def test_model_runs_take_the_models_dtypes_only():
    """model.dtype float16 passed the config and failed at init_random (the models compute in float32 or bfloat16):
    refused with the run's other config errors, before anything runs; bench-attention's kernels take it."""
    for name in ("e2e_throughput", "long_document", "tree_apps", "e2e_tp"):
        with pytest.raises(config.ConfigError, match=r"model.dtype.*one of \['bfloat16', 'float32'\]"):
            config.load(name, smoke=True, assignments=["model.dtype='float16'"])
    assert config.load("bench_attention", smoke=True, assignments=["bench.dtype='float16'"])["bench"]["dtype"] == "float16"


def test_calls_per_repeat_is_the_one_calibration_of_the_timers():
    """One rule for the timers, the rate probes and the anchors: enough calls for a repeat of min_repeat_s, at most
    max_calls, one where no minimum is asked."""
    from experiments.timing import calls_per_repeat  # noqa: PLC0415

    assert calls_per_repeat(1e-4, 0.05, 1000) == 500
    assert calls_per_repeat(1e-4, 0.05, 100) == 100
    assert calls_per_repeat(0.2, 0.05, 1000) == 1
    assert calls_per_repeat(1e-4, 0.0, 1000) == 1 and calls_per_repeat(1e-4, 0.05, 1) == 1
    assert calls_per_repeat(0.0, 0.05, 10**12) == 5 * 10**7  # a call timed at 0 s: as if 1 ns


def test_bench_inputs_are_a_decode_s_caches_at_every_point():
    """The suffix caches hold `out` tokens at every Simpson point, s of them valid (`suffix_lengths`), so that the
    kernel choice (which follows a cache's capacity, as in a decode) is the same at each point of a config; s past
    out is refused. The sweeps' inputs (scripts/tuning/sweep_kernels) are the benchmark's, and so is their floor."""
    from scripts.tuning import sweep_kernels  # noqa: PLC0415

    case = bench_attention.Case(batch=3, prefix=5, out=7, q_heads=4, kv_heads=2, head_dim=8, dtype="float32")
    shapes = set()
    for s in floor.simpson_points(case.out):
        x = bench_attention.make_inputs(case, s, 0)
        shapes.add(tuple(x[k].shape for k in ("q", "prefix_k", "suffix_k", "suffix_v")))
        assert x["s"] == s and x["suffix_lengths"].tolist() == [s] * 3
        k, v = bench_attention.per_sequence_kv(x)  # the per-sequence baselines: the s valid tokens only
        assert k.shape == v.shape == (3, 5 + s, 2, 8)
        np.testing.assert_array_equal(np.asarray(k[:, 5:]), np.asarray(x["suffix_k"][:, :s]))
        fn, args = bench_attention.build_variant("reference", x, None, "xla")
        want = jax.nn.dot_product_attention(x["q"], k, v)  # one query sees every valid key
        np.testing.assert_allclose(np.asarray(fn(*args)), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert shapes == {((3, 1, 4, 8), (5, 2, 8), (3, 7, 2, 8), (3, 7, 2, 8))}
    with pytest.raises(ValueError, match=r"s must be in \[1, out = 7\]"):
        bench_attention.make_inputs(case, 8, 0)
    cfg = (3, 5, 7, 4, 2)
    assert [x.shape for x in sweep_kernels.config_inputs(cfg, 0)] == [
        (3, 1, 4, sweep_kernels.D), (1, 5, 2, sweep_kernels.D), (1, 5, 2, sweep_kernels.D),
        (3, 7, 2, sweep_kernels.D), (3, 7, 2, sweep_kernels.D)]
    rates = {"bandwidth_bytes_per_s": 1e12, "matmul_flops_per_s": 1e14}
    bench_case = sweep_kernels.case(cfg)
    assert sweep_kernels.floor_s(cfg, 4, rates) == bench_attention.step_floor(bench_case, 4, rates)["floor_s"] == (
        floor.floor_time(floor.step_bytes(3, 5, 4, 4, 2, sweep_kernels.D, 2), floor.step_flops(3, 5, 4, 4,
                                                                                               sweep_kernels.D),
                         1e12, 1e14))
    # the memory estimate counts the caches at their capacity, and the anchors' exact-length copies
    variants = bench_attention.VARIANTS
    plain = bench_attention.estimate_bytes(case, 1, variants["hydragen"])
    assert plain >= floor.kv_cache_bytes(3, 5, 7, 2, 8, 4, False)
    assert bench_attention.estimate_bytes(case, 1, variants["torch_hydragen"]) == plain + 2 * 3 * 1 * 2 * 8 * 4


def test_chain_steps_reads_its_copies_in_turn():
    """copies = 2: step i reads the i mod 2-th set of arguments (x + a, then x + b, ...); steps must be a multiple."""
    x, a, b = jnp.zeros(3), jnp.ones(3), 10 * jnp.ones(3)
    chained = jax.jit(timing.chain_steps(lambda x, y: x + y, 4, copies=2))
    np.testing.assert_array_equal(chained(x, a, b), 22 * jnp.ones(3))
    np.testing.assert_array_equal(jax.jit(timing.chain_steps(lambda x, y: x * 2 + y, 3))(x, a), 7 * jnp.ones(3))
    with pytest.raises(ValueError, match=r"copies must be >= 1 and divide steps \(4\); got 3"):
        timing.chain_steps(lambda x, y: x, 4, copies=3)
    with pytest.raises(ValueError, match="3 arguments after q do not split into 2 copies"):
        chained(x, a, b, a)


def test_l2_copies_cover_twice_the_cache():
    """Copies of a point's KV, together >= 2 x L2 where the chain allows (a power of two dividing its steps); one
    where its bytes exceed that already, where l2_bytes is 0, and for the per-sequence copies (B times the prefix)."""
    v = bench_attention.VARIANTS
    case = bench_attention.Case(batch=64, prefix=1024, out=512, q_heads=32, kv_heads=32, head_dim=128,
                                dtype="bfloat16")
    l2 = 50 * 2**20
    assert bench_attention.step_read_bytes(case, 1, v["hydragen"]) == floor.step_bytes(64, 1024, 1, 32, 32, 128, 2)
    assert bench_attention.l2_copies(case, 1, v["hydragen"], l2, 16) == 8  # 18.9 MB a step: 6 needed, 8
    assert bench_attention.l2_copies(case, 1, v["hydragen"], l2, 4) == 4  # at most the chain's steps
    assert bench_attention.l2_copies(case, 1, v["hydragen"], l2, 6) == 2  # a power of two dividing them
    assert bench_attention.l2_copies(case, 256, v["hydragen"], l2, 16) == 1  # 286 MB
    assert bench_attention.l2_copies(case, 1, v["hydragen"], 0, 16) == 1
    assert bench_attention.l2_copies(case, 1, v["xla_per_sequence"], l2, 16) == 1  # 1 GB of copies a step
    one = bench_attention.estimate_bytes(case, 1, v["hydragen"])
    shared = floor.kv_cache_bytes(64, 1024, 512, 32, 128, 2, False)
    assert bench_attention.estimate_bytes(case, 1, v["hydragen"], 8) == one + 7 * shared


def test_l2_copies_fall_back_to_what_fits():
    """Where the copies would not fit the device (the config's memory_capacity_bytes), fewer are timed, down to one:
    never an estimated OOM that one copy would not have."""
    case = bench_attention.Case(batch=2, prefix=8, out=4, q_heads=4, kv_heads=2, head_dim=8, dtype="float32")
    hydragen = bench_attention.VARIANTS["hydragen"]
    one = bench_attention.estimate_bytes(case, 1, hydragen)
    inputs = bench_attention.make_inputs(case, 1, 0)
    kw = {"warmup": 0, "repeats": 1, "min_repeat_s": 0.0, "max_inner": 1}
    for capacity, want in ((one, 1), (bench_attention.estimate_bytes(case, 1, hydragen, 2), 2), (10**9, 4)):
        table = {"memory_capacity_bytes": capacity, "memory_fraction": 1.0, "l2_bytes": 2**20}
        status, results, reason, _ = bench_attention.measure_variant(
            "hydragen", case, 1, inputs, None, backend="xla", build=bench_attention.build_variant, timing_kw=kw,
            device_table=table, steps_per_call=4)
        assert status == "ok" and results["l2_copies"] == want, (capacity, status, reason, results)
