"""models.parallel: how a config splits over devices (pure, here), and the sharded model on 4 CPU host devices
(tests/tp_cases.py, run in a subprocess: XLA_FLAGS=--xla_force_host_platform_device_count=4 must be set before JAX
starts, which this process has done already)."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import models
from models import llama, parallel
from models.config import LlamaConfig

ROOT = pathlib.Path(__file__).resolve().parent.parent


def config(hq: int, hkv: int, **kw) -> LlamaConfig:
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=50, num_hidden_layers=2, num_attention_heads=hq,
                num_key_value_heads=hkv, head_dim=8)
    return LlamaConfig(**{**base, **kw})


@pytest.mark.parametrize("hq,hkv,n,per_device", [
    (32, 8, 2, (16, 4, 1)),  # 4 KV heads a device
    (32, 8, 8, (4, 1, 1)),
    (32, 8, 16, (2, 1, 2)),  # each KV head on 2 devices
    (8, 1, 4, (2, 1, 4)),  # MQA
    (40, 40, 2, (20, 20, 1)),  # CodeLlama-13b
])
def test_split_sizes(hq, hkv, n, per_device):
    s = parallel.split(config(hq, hkv), n)
    assert (s.q_heads, s.kv_heads, s.kv_replicas) == per_device
    assert (s.intermediate, s.vocab) == (-(-50 // n), -(-97 // n))
    # query head h (on device h // q_heads) reads KV head h // (hq / hkv): device i holds KV heads
    # [i * kv_heads / r, ...) of the original ones
    for h in range(hq):
        device = h // s.q_heads
        held = [(device * s.kv_heads + j) // s.kv_replicas for j in range(s.kv_heads)]
        assert h // (hq // hkv) in held


@pytest.mark.parametrize("hq,hkv,n,message", [
    (6, 6, 4, r"num_attention_heads \(6\) must be a multiple of the mesh axis 'model' size \(4\)"),
    (6, 3, 2, r"num_key_value_heads \(3\) must be a multiple or a divisor of the mesh axis 'model' size \(2\)"),
    (12, 4, 6, r"num_key_value_heads \(4\) must be a multiple or a divisor of the mesh axis 'model' size \(6\)"),
    (8, 8, 0, r"devices must be a positive integer, got 0"),  # not a ZeroDivisionError
    (8, 8, True, r"devices must be a positive integer, got True"),
    (8, 8, 2.0, r"devices must be a positive integer, got 2.0"),
])
def test_head_counts_the_mesh_cannot_split_are_refused(hq, hkv, n, message):
    with pytest.raises(ValueError, match=message):
        parallel.split(config(hq, hkv), n)


def test_a_devices_config_checks_no_stop_ids_against_its_rows():
    """A device's config holds ⌈V/n⌉ vocabulary rows: a stop id past them (Llama 3's 128001 of 128256 on 2 devices)
    warned that generation never stops on it, though generation reads the whole config's ids and stops there."""
    import warnings  # noqa: PLC0415

    c = dataclasses.replace(config(8, 2), eos_token_ids=(90,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        local = parallel.local_config(c, parallel.split(c, 2))
    assert local.vocab_size == 49 and local.eos_token_ids == () and c.eos_token_ids == (90,)


def test_split_takes_numpy_integers_as_make_mesh_does():
    assert parallel.split(config(8, 2), np.int64(4)) == parallel.split(config(8, 2), 4)


def test_olmo2_on_a_one_device_mesh():
    """OLMo 2 (its q / k norms over all heads; several devices: tests/tp_cases.py) on a one-device mesh loads, inits
    and generates as without a mesh."""
    path, mesh = ROOT / "tests" / "fixtures" / "hf_olmo2", parallel.make_mesh(1)
    one, on_mesh = models.load_checkpoint(path, dtype=jnp.float32), models.load_checkpoint(path, jnp.float32, mesh=mesh)
    models.init_random(one.config, mesh=mesh)
    parallel.shard_model(one, mesh)

    def run(m):
        return models.generate(m, [[5, 6, 7, 8, 9], [5, 6, 7, 10]], max_new_tokens=3, backend="xla")

    np.testing.assert_array_equal(run(on_mesh).tokens, run(one).tokens)


@pytest.mark.parametrize("hq,hkv,n", [(8, 2, 4), (8, 8, 2), (4, 1, 4)])
@pytest.mark.parametrize("key", ["embed", "lm_head", "w_qkv", "b_qkv", "w_gate_up", "w_down", "wo", "q_norm"])
def test_layout_round_trip(hq, hkv, n, key):
    cfg = config(hq, hkv)
    s = parallel.split(cfg, n)
    family = {"b_qkv": (hkv, (hq // hkv + 2) * 8), "q_norm": (8,)}  # Qwen2's and Qwen3's
    shape = family[key] if key in family else llama.param_shape(key, llama.param_shapes(cfg))
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    laid = parallel.to_layout(key, x, cfg, s)
    assert laid.shape == parallel.layout_shape(key, shape, s, 8)
    np.testing.assert_array_equal(parallel.from_layout(key, laid, cfg, s), x)
    if key in ("w_qkv", "b_qkv"):  # device i's shard: query heads i·Hq/n onwards, then KV head i·Hkv/n (or i // r)
        q, k, v = llama.unpack_qkv(x, 8)
        lead = x.shape[:-2]
        shards = np.split(laid, n, axis=-2)
        for i, shard in enumerate(shards):
            sq, sk, sv = llama.unpack_qkv(shard, 8)
            heads = lambda y: y.reshape(*lead, -1, 8)  # noqa: E731
            np.testing.assert_array_equal(heads(sq), heads(q)[..., i * hq // n:(i + 1) * hq // n, :])
            kv = slice(i // s.kv_replicas, i // s.kv_replicas + 1) if s.kv_replicas > 1 else \
                slice(i * hkv // n, (i + 1) * hkv // n)
            np.testing.assert_array_equal(heads(sk), heads(k)[..., kv, :])
            np.testing.assert_array_equal(heads(sv), heads(v)[..., kv, :])
    if key == "w_gate_up":  # device i's shard: its gate columns, then its up columns (padded with zeros)
        per = -(-cfg.intermediate_size // n)
        for i, shard in enumerate(np.split(laid, n, axis=-1)):
            for j in range(2):
                want = x[:, j, i * per:(i + 1) * per]
                np.testing.assert_array_equal(shard[:, j, :want.shape[-1]], want)
                assert not shard[:, j, want.shape[-1]:].any()
    if key == "embed":  # padded rows are zero
        assert laid.shape[0] % n == 0 and not laid[97:].any()


def test_mesh_must_have_the_model_axis_only():
    devices = np.array(jax.devices()[:1])
    with pytest.raises(ValueError, match=r"one axis 'model'.*\('data',\)"):
        parallel.mesh_size(Mesh(devices, ("data",)))
    with pytest.raises(ValueError, match="must be a jax.sharding.Mesh, got tuple"):
        parallel.mesh_size((1,))
    with pytest.raises(ValueError, match=r"devices must be an integer in \[1, \d+\]"):
        parallel.make_mesh(len(jax.devices()) + 1)
    assert parallel.mesh_size(parallel.make_mesh(1)) == 1
    assert parallel.mesh_size(parallel.make_mesh(np.int64(1))) == 1  # numpy integers too
    with pytest.raises(ValueError, match=r"devices must be an integer .*got True"):
        parallel.make_mesh(True)
    # jax.make_mesh's axes are Explicit by default: named, with how to build an Auto one
    with pytest.raises(ValueError, match=r"mesh axis 'model' must be of type AxisType.Auto, got AxisType.Explicit "
                                         r".*models.parallel.make_mesh"):
        parallel.mesh_size(jax.make_mesh((1,), ("model",)))
    manual = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Manual,))
    with pytest.raises(ValueError, match=r"got AxisType.Manual: build it with") as error:  # not called the default
        parallel.mesh_size(manual)
    assert "default" not in str(error.value)
    auto = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
    assert parallel.mesh_size(auto) == 1


def test_decode_refuses_a_state_of_another_model():
    """A state prefilled by a model of another vocabulary or depth: the decode names what it needs and got."""
    small = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=8, max_position_embeddings=64, eos_token_ids=())
    a = models.init_random(small, jnp.float32)
    b = models.init_random(dataclasses.replace(small, vocab_size=41, num_hidden_layers=2), jnp.float32)
    state = models.prefill(b, [[1, 2, 3], [1, 2, 4]], 2, backend="xla")
    with pytest.raises(ValueError, match=r"decode: the state does not fit this model, on one device \(no mesh\): it "
                                         r"needs logits \[B, 40\] and caches of 1 KV heads over 1 layers; got logits "
                                         r"\[2, 41\], KV heads \[1\], 2 layers"):
        models.decode(a, state, 1)


def _run_cases(marker: str) -> None:
    """tests/tp_cases.py in a fresh Python with 4 CPU host devices; its output shown where it fails."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=" ".join([os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=4",
                                   "--xla_backend_optimization_level=0"]).strip())  # tiny models: compiles dominate
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marker,
                           "tests/tp_cases.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and " skipped" not in done.stdout, done.stdout[-3000:]


def test_sharded_model_on_4_host_devices():
    """Hydragen and shared storage (GQA on 4 devices, KV heads replicated; MHA on 2), sampling, the cost model's
    bytes a device, the Pallas kernels under shard_map, init, loader, the decode step's collectives
    (tests/tp_cases.py, not slow; ~90 s of CPU)."""
    _run_cases("not slow")


@pytest.mark.slow
def test_sharded_model_on_4_host_devices_every_case():
    """The whole matrix: every mode on MHA, GQA and MQA over 2 and 4 devices; the experiments runner on one and two
    devices in the same run (~80 s of CPU)."""
    _run_cases("slow")
