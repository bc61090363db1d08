"""Tests of experiments/: configs, floor arithmetic, Simpson, timing, OOM recording, smoke runs and plots."""

from __future__ import annotations

import json
import pathlib
import tomllib

import chex
import jax
import jax.numpy as jnp
import pytest

from experiments import __main__ as cli
from experiments import bench_attention, config, floor, memory, records, timing
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


def test_kv_cache_bytes_prefix_once_vs_copied():
    shared = floor.kv_cache_bytes(1024, 8192, 512, 8, 128, 2, prefix_copied=False)
    copied = floor.kv_cache_bytes(1024, 8192, 512, 8, 128, 2, prefix_copied=True)
    assert shared == 2 * (8192 + 1024 * 512) * 8 * 128 * 2
    assert copied == 2 * 1024 * (8192 + 512) * 8 * 128 * 2


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


@pytest.fixture(scope="module")
def bench_smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.jsonl"
    assert cli.main(["bench-attention", "--smoke", "--out", str(out), "--no-progress"]) == 0
    return out


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
    by_mode = {r["mode"]: r for r in summaries}
    assert by_mode["cudnn_per_sequence"]["status"] == "skipped"  # CPU: skipped with a reason
    assert "GPU" in by_mode["cudnn_per_sequence"]["reason"]
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
    md = bench_smoke.with_suffix(".md").read_text()
    assert "floor frac" in md and "tok/s" in md


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


@pytest.mark.slow
@pytest.mark.parametrize("name", E2E_CONFIGS)
def test_e2e_smoke_runs_parses_and_plots(name, tmp_path):
    out = tmp_path / f"{name}.jsonl"
    assert cli.main(["run", name, "--smoke", "--out", str(out), "--no-progress", "--plot"]) == 0
    recs = _check_records(out)
    decode = [r for r in recs if r["record"] == "decode"]
    assert decode and all(r["status"] == "ok" for r in decode)
    for rec in decode:
        res = rec["results"]
        assert res["tokens_per_s"] > 0 and len(res["step_s"]) == 3
        assert res["mean_step_s"] == pytest.approx(floor.simpson(*res["step_s"]))
        assert res["decode_compile_s"] >= 0 and res["prefill_compile_s"] >= 0 and res["cache_bytes"] > 0
    assert [r for r in recs if r["record"] == "prefill"]
    cfg = config.load(name, smoke=True)
    if name == "tree_apps":
        assert {r["mode"] for r in decode} == set(cfg["tree"]["variants"])
        by = {r["mode"]: r["results"]["cache_bytes"] for r in decode}
        assert by["two_level"] < by["one_level"] < by["standard"]  # problem prompts stored once per problem
    else:
        assert {r["mode"] for r in decode} == set(cfg["modes"])
    assert out.with_suffix(".md").read_text().count("|") > 10
    pngs = list(tmp_path.glob("*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)


def _tiny_e2e(**device):
    cfg = config.load("e2e_throughput", smoke=True)
    cfg["grid"]["batches"] = [2]
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
    assert "OOM" in (tmp_path / "oom.md").read_text()
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
