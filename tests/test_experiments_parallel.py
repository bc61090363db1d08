"""experiments/ on several devices (tensor parallel): the per-device step floor with its all-reduce term, the
`mesh` config table, per-device memory estimates, the speed-up table, the README report leaving such runs out.
(The runs themselves, on 4 CPU host devices: tests/tp_cases.py, launched by tests/test_models_parallel.py.)"""

from __future__ import annotations

import dataclasses

import pytest

from experiments import config, e2e, floor, model_api, report, tables
from models import LlamaConfig
from tests.test_experiments import SHAPE, _decode, _model, _rates, _write_results

SEVEN_B = floor.ModelShape.from_config(SHAPE, 2)
BW, MM, LINK = 4.0e12, 7.0e14, 3.0e11  # bytes/s, FLOP/s, all-reduce bus bytes/s


def test_tensor_parallel_shape_is_one_device_share():
    assert floor.tensor_parallel(SEVEN_B, 1) is SEVEN_B
    half = floor.tensor_parallel(SEVEN_B, 2)
    assert (half.q_heads, half.kv_heads, half.intermediate, half.vocab) == (16, 16, 5504, 16000)
    assert (half.hidden, half.layers, half.head_dim) == (4096, 32, 128)
    gqa = dataclasses.replace(SEVEN_B, kv_heads=8, vocab=32001)
    wide = floor.tensor_parallel(gqa, 16)  # each KV head on 2 devices; vocabulary rounded up
    assert (wide.q_heads, wide.kv_heads, wide.vocab) == (2, 1, 2001)


@pytest.mark.parametrize("heads,kv_heads,intermediate,vocab,devices", [
    (32, 32, 11008, 32000, 2), (32, 8, 14336, 128256, 4), (32, 8, 14336, 32001, 16), (40, 40, 13824, 32016, 8),
    (12, 4, 1536, 49152, 4), (8, 2, 64, 99, 8), (8, 2, 50, 97, 4)])  # the last: I / n rounded up (13)
def test_tensor_parallel_share_is_the_models_split(heads, kv_heads, intermediate, vocab, devices):
    """floor stays free of jax and models, so it has its own copy of the split: the same sizes as
    models.parallel.split (what the sharded model runs) on dense, GQA, replicated-KV and odd-vocabulary shapes."""
    from models import parallel  # noqa: PLC0415

    shape = dataclasses.replace(SEVEN_B, q_heads=heads, kv_heads=kv_heads, intermediate=intermediate, vocab=vocab)
    share = floor.tensor_parallel(shape, devices)
    split = parallel.split(LlamaConfig(vocab_size=vocab, hidden_size=4096, intermediate_size=intermediate,
                                       num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                       head_dim=128), devices)
    assert (share.q_heads, share.kv_heads, share.intermediate, share.vocab) == (
        split.q_heads, split.kv_heads, split.intermediate, split.vocab)


def test_allreduce_time_is_a_ring_over_the_bus_bandwidth():
    assert floor.allreduce_time(4 * 2**20, 1, LINK) == 0.0
    assert floor.allreduce_time(4 * 2**20, 2, LINK) == pytest.approx(4 * 2**20 / LINK)  # 2 (n-1)/n = 1
    assert floor.allreduce_time(4 * 2**20, 8, LINK) == pytest.approx(1.75 * 4 * 2**20 / LINK)


def test_step_floor_on_two_devices_by_hand():
    """The two-device floor is one device's share of every op plus 2 L + 1 all-reduces of [B, d]."""
    sharing = floor.Sharing(levels=(((1024, 512),),), suffix_lengths=(1,) * 512, prompt_lengths=(1025,) * 512)
    two = floor.decode_step_floor(SEVEN_B, sharing, "hydragen", 3, BW, MM, devices=2, allreduce_bandwidth=LINK)
    share = floor.decode_step_floor(floor.tensor_parallel(SEVEN_B, 2), sharing, "hydragen", 3, BW, MM)
    message = 512 * 4096 * 2
    assert two["allreduce"] == pytest.approx(65 * message / LINK)
    assert two["total"] == pytest.approx(share["total"] + two["allreduce"])
    for part in ("gemm", "lm_head", "attention", "cache_write"):
        assert two[part] == pytest.approx(share[part])
    one = floor.decode_step_floor(SEVEN_B, sharing, "hydragen", 3, BW, MM)
    assert "allreduce" not in one and two["gemm"] == pytest.approx(one["gemm"] / 2, rel=0.01)
    with pytest.raises(ValueError, match="needs the all-reduce bus bandwidth"):
        floor.decode_step_floor(SEVEN_B, sharing, "hydragen", 3, BW, MM, devices=2)
    averaged = floor.decode_floor(SEVEN_B, sharing, "none", [0, 62, 124], 4, BW, MM, 2, LINK)
    assert averaged["floor_parts_s"]["allreduce"] == pytest.approx(two["allreduce"])


@pytest.mark.parametrize("value,ok", [("2", True), ("[1, 2]", True), ("0", False), ("[]", False), ("[1, 0]", False),
                                      ('"two"', False), ("true", False)])
def test_mesh_table_of_the_configs(value, ok):
    load = lambda: config.load("e2e_throughput", assignments=[f"mesh.model={value}"])  # noqa: E731
    if ok:
        assert e2e.tensor_parallel_sizes(load()) == ([2] if value == "2" else [1, 2])
    else:
        with pytest.raises(config.ConfigError, match=r"key 'mesh\.model' must be"):
            load()
    assert e2e.tensor_parallel_sizes(config.load("e2e_throughput")) == [1]
    assert "tp" not in e2e._tp_key(config.load("e2e_throughput"), 1)


def test_memory_estimate_is_per_device():
    cfg = LlamaConfig(**SHAPE)
    tree = model_api.synthetic_tree(512, 1024, 1, cfg.vocab_size, 0)
    one = e2e.needed_bytes(tree, 128, "hydragen", cfg, 10**10, 2)
    two = e2e.needed_bytes(tree, 128, "hydragen", cfg, 10**10, 2, tp=2)
    assert two - e2e.MARGIN_BYTES == pytest.approx((one - e2e.MARGIN_BYTES) / 2, abs=1)
    mqa = dataclasses.replace(cfg, num_key_value_heads=1)  # the one KV head on every device: caches whole
    kv = model_api.cache_estimate(tree, 128, mqa, 2)["tree"]
    assert e2e.needed_bytes(tree, 128, "hydragen", mqa, 0, 2, tp=4) == kv + e2e.MARGIN_BYTES
    rows = e2e.plan(config.load("e2e_tp"), 138 * 10**9)
    assert {r["point"]["tp"] for r in rows} == {1, 2}
    fits = {(r["point"]["tp"], r["point"]["prefix"], r["point"]["batch"]) for r in rows if r["fits"]}
    assert (1, 1024, 1024) in fits and (1, 1024, 2048) not in fits and (2, 1024, 2048) in fits


def test_speedup_table_and_markdown_of_a_two_device_run(tmp_path):
    point = lambda tp, batch: {"prefix": 1024, "batch": batch, "generate": 128, "unique": 1, "tp": tp}  # noqa: E731
    recs = [_decode(point(1, 512), "hydragen", 10_000.0, floors=True), _decode(point(2, 512), "hydragen", 18_500.0,
                                                                              floors=True),
            {**_decode(point(1, 2048), "hydragen", 1.0), "status": "oom"},
            _decode(point(2, 2048), "hydragen", 30_000.0, floors=True)]
    table = tables.tp_speedup_table(recs)
    assert "| 1024 | 512 | 1.85x |" in table and "| 1024 | 2048 | OOM |" in table
    path = _write_results(tmp_path, "e2e_tp", "20261130-100000", [_model(), _rates()] + recs)
    e2e.write_markdown(path.with_suffix(".md"), [_rates(), _model()] + recs)
    md = path.with_suffix(".md").read_text()
    assert "| tp | prefix | batch |" in md and "## Tensor parallel speed-up" in md
    assert [f.kind for f in report.load_results(tmp_path)] == [report.TP_KIND]  # a README part of their own


def test_tp_smoke_run_on_two_host_devices(tmp_path):
    """The documented CPU run of the tensor-parallel experiment (XLA_FLAGS=--xla_force_host_platform_device_count=2,
    `run e2e_tp --smoke`) finishes: its all-reduce probe once launched ~1000 collectives without waiting, and XLA's
    CPU rendezvous aborted the process (signal 6)."""
    import json  # noqa: PLC0415
    import os  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415
    out = tmp_path / "tp.jsonl"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-m", "experiments", "run", "e2e_tp", "--smoke", "--out", str(out),
                           "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    rates = [r for r in records if r["record"] == "device_rates"]
    assert rates and "allreduce" in json.dumps(rates[0]["results"]), rates
    assert any(r["record"] == "decode" and r["status"] == "ok" for r in records)
