"""The cache-write kernel (`models.kv_write`) against XLA's scatters, and its use by the models
(`Tuning.write_max_rows`). Interpreted on CPU, compiled on the GPU (the `kernel_backend` fixture)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hydragen_jax import tuning as tuning_lib
from models import cache as cache_lib
from models import kv_write
from models.generate import generate
from models.llama import init_random
from tests import write_cases
from tests.conftest import ci_if_shipped, grid
from tests.write_cases import CASES, CFG, DTYPES


@ci_if_shipped("write_max_rows")
@pytest.mark.parametrize("case,dtypes", grid(list(CASES), list(DTYPES), ids=[str, str]))
def test_write_matches_the_scatters(kernel_backend, case, dtypes):
  """Each slot's key and value rows land at their position; dropped slots (padding, past the capacity, negative)
  and every other entry keep what the caches held: bit for bit what XLA's scatters give."""
  k_cache, v_cache, k, v, pos = write_cases.inputs(case, dtypes)  # "wide": a negative slot, dropped too
  fn = jax.jit(lambda *a: kv_write.write(*a, interpret=kernel_backend.startswith("interpret")))
  got = fn(k_cache, v_cache, k, v, pos)
  # the models' scatters (which drop a negative slot too: jnp's .at would wrap it, and did)
  want = cache_lib.scatter_write(k_cache, v_cache, k, v, pos)
  for g, w in zip(got, want):
    assert g.dtype == w.dtype and g.shape == w.shape
    np.testing.assert_array_equal(np.asarray(g.astype(jnp.float32)), np.asarray(w.astype(jnp.float32)))


@pytest.mark.parametrize("cache_shape,k_shape", [((2, 0, 2, 4), (2, 1, 2, 4)), ((2, 5, 2, 4), (2, 0, 2, 4)),
                                                 ((0, 5, 2, 4), (0, 1, 2, 4)), ((2, 5, 0, 4), (2, 1, 0, 4))],
                         ids=["no-capacity", "no-tokens", "no-sequences", "no-heads"])
def test_write_of_nothing_returns_the_caches(cache_shape, k_shape):
  k_cache, k = jnp.ones(cache_shape), jnp.ones(k_shape)
  out = kv_write.write(k_cache, k_cache, k, k, jnp.zeros(k_shape[:2], jnp.int32), interpret=True)
  assert out[0] is k_cache and out[1] is k_cache


def test_slots_beyond_int32_stay_dropped():
  """The kernel reads int32 slots: 64-bit positions (x64 mode) outside the cache stay outside, not wrapped into it
  (2^32 + 1 would wrap to 1); unsigned ones too."""
  with jax.enable_x64(True):
    pos = jnp.array([[2**32 + 1, -2**32 + 2, 3, -1, 7, 2**40]], jnp.int64)
    cache = jnp.zeros((1, 7, 1, 8), jnp.float32)
    new = jnp.arange(1, 7, dtype=jnp.float32).reshape(1, 6, 1, 1) * jnp.ones((1, 6, 1, 8))
    k_cache, _ = kv_write.write(cache, cache, new, new, pos, interpret=True)
    assert np.flatnonzero(np.asarray(k_cache[0, :, 0, 0])).tolist() == [3]
  pos = jnp.array([[2**31 + 5, 2]], jnp.uint32)
  k_cache, _ = kv_write.write(cache, cache, new[:, :2], new[:, :2], pos, interpret=True)
  assert np.flatnonzero(np.asarray(k_cache[0, :, 0, 0])).tolist() == [2]


@pytest.mark.parametrize("dtype,capacity,positions,written", [
    ("int8", 300, [-1, 100], [100]), ("int16", 40000, [-1, 5], [5]), ("uint8", 300, [255, 3], [3, 255]),
    ("uint16", 70000, [65535, 2], [2, 65535])])
def test_narrow_positions_beside_a_capacity_their_type_cannot_hold(dtype, capacity, positions, written):
  """int8 positions beside a capacity of 300 were compared in int8 (300 became 44: the padding slot -1 overwrote
  entry 44, positions 44-127 were dropped); int16 beside 40000 dropped every write."""
  pos = jnp.array([positions], dtype)
  cache = jnp.zeros((1, capacity, 1, 8), jnp.float32)
  new = jnp.arange(1, 3, dtype=jnp.float32).reshape(1, 2, 1, 1) * jnp.ones((1, 2, 1, 8))
  k_cache, _ = kv_write.write(cache, cache, new, new, pos, interpret=True)
  assert sorted(np.flatnonzero(np.asarray(k_cache[0, :, 0, 0])).tolist()) == sorted(written)


@pytest.mark.parametrize("dtype", ["int32", "int64"])
def test_write_under_x64_writes_as_without(dtype):
  """Under jax_enable_x64 the kernel traces (its program id and slice starts were int64 beside int32 rows: a
  TypeError from dynamic_slice) and writes what it writes without x64, for int32 and int64 positions."""
  kc, k = jnp.zeros((2, 4, 1, 2)), jnp.arange(1.0, 5.0).reshape(2, 1, 1, 2)
  want = kv_write.write(kc, kc, k, k, jnp.array([[0], [3]], jnp.int32), interpret=True)
  with jax.enable_x64(True):
    got = kv_write.write(kc, kc, k, k, jnp.array([[0], [3]], dtype), interpret=True)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize("args,match", [
    (((2, 5, 2, 4), (2, 5, 2, 8), (2, 1, 2, 4), (2, 1)), r"k_cache float32\[2, 5, 2, 4\] and v_cache "
                                                         r"float32\[2, 5, 2, 8\]"),
    (((2, 5, 2, 4), (2, 5, 2, 4), (3, 1, 2, 4), (2, 1)), r"k \[3, 1, 2, 4\] and v \[3, 1, 2, 4\]; expected both "
                                                         r"\[2, T, 2, 4\]"),
    (((2, 5, 2, 4), (2, 5, 2, 4), (2, 1, 2, 4), (2, 2)), r"positions int32\[2, 2\]; expected integers \[2, 1\]"),
])
def test_write_names_bad_shapes(args, match):
  kc, vc, k, p = args
  with pytest.raises(ValueError, match=match):
    kv_write.write(jnp.zeros(kc), jnp.zeros(vc), jnp.zeros(k), jnp.zeros(k), jnp.zeros(p, jnp.int32), interpret=True)


@pytest.mark.parametrize("pair", [False, True])
def test_scatter_writes_name_bad_shapes_and_drop_negative_slots(pair):
  """The models' scatters check what the kernel checks (with one scatter a cache, k of 1 KV head was broadcast
  into 2-head caches and [B, 3] positions beside T = 1 wrote one token into 3 slots, silently), and drop a negative
  slot as the kernel does (jnp's .at wrapped -1 to the last slot: the caches differed by `pair_write`)."""
  kc = jnp.zeros((2, 4, 2, 4))
  with pytest.raises(ValueError, match=r"k \[2, 1, 1, 4\] and v \[2, 1, 1, 4\]; expected both \[2, T, 2, 4\]"):
    cache_lib.scatter_write(kc, kc, jnp.ones((2, 1, 1, 4)), jnp.ones((2, 1, 1, 4)), jnp.zeros((2, 1), jnp.int32),
                            pair=pair)
  with pytest.raises(ValueError, match=r"positions int32\[2, 3\]; expected integers \[2, 1\]"):
    cache_lib.scatter_write(kc, kc, jnp.ones((2, 1, 2, 4)), jnp.ones((2, 1, 2, 4)), jnp.zeros((2, 3), jnp.int32),
                            pair=pair)
  with pytest.raises(ValueError, match=r"positions float32\[2, 1\]; expected integers"):
    cache_lib.scatter_write(kc, kc, jnp.ones((2, 1, 2, 4)), jnp.ones((2, 1, 2, 4)), jnp.zeros((2, 1)), pair=pair)
  k = jnp.ones((2, 2, 2, 4))
  got, _ = jax.jit(functools.partial(cache_lib.scatter_write, pair=pair))(kc, kc, k, k, jnp.array([[-1, 1], [-4, -2]]))
  want = np.zeros((2, 4))
  want[0, 1] = 1
  np.testing.assert_array_equal(np.asarray(got[:, :, 0, 0]), want)
  # unsigned slots past the end stay past it (uint32 2^32 - 1 beside int32 read as -1: the last slot written)
  for pos in (jnp.array([[0, 2**32 - 1], [2**31, 3]], jnp.uint32), np.array([[0, 2**32 + 1], [2**40, 3]])):
    got, _ = cache_lib.scatter_write(kc, kc, k, k, pos, pair=pair)
    np.testing.assert_array_equal(np.asarray(got[:, :, 0, 0]), [[1, 0, 0, 0], [0, 0, 0, 1]])


def test_write_names_float_positions():
  with pytest.raises(ValueError, match=r"positions float32\[2, 1\]; expected integers \[2, 1\]"):
    kv_write.write(jnp.zeros((2, 5, 2, 4)), jnp.zeros((2, 5, 2, 4)), jnp.zeros((2, 1, 2, 4)), jnp.zeros((2, 1, 2, 4)),
                   jnp.zeros((2, 1), jnp.float32), interpret=True)


# CI where a tuning file sets `write_max_rows` (0 in both: the slow tier and the GPU; CI time ~20 s interpreted)
@ci_if_shipped("write_max_rows")
def test_models_write_with_the_kernel_where_the_tuning_says(kernel_backend, monkeypatch):
  """Steps of at most `write_max_rows` slots (B·T: here every decode step) write with the kernel, larger ones
  (prefill chunks) with XLA's scatters; the greedy tokens and logits are those of the jnp path."""
  model = init_random(CFG, jnp.float32, seed=3)
  prompts = write_cases.prompts()
  # The calls are seen while tracing: a step another test compiled with the same tuning would not trace again.
  jax.clear_caches()
  calls, real = [], kv_write.write
  monkeypatch.setattr(kv_write, "write", lambda kc, *a, **kw: calls.append(kc.shape) or real(kc, *a, **kw))
  ref = generate(model, prompts, num_samples=2, max_new_tokens=4, backend="xla")
  assert not calls  # the jnp path never takes the kernel
  rows = len(prompts) * 2
  with tuning_lib.override(dataclasses.replace(tuning_lib.current(), write_max_rows=rows)):
    got = generate(model, prompts, num_samples=2, max_new_tokens=4, backend=kernel_backend)
  # decode writes the per-sequence suffix caches ([rows, ...]); prefill chunks of few enough slots (a level's nodes
  # times its chunk's tokens) may take it too
  assert any(shape[0] == rows for shape in calls)
  np.testing.assert_array_equal(got.tokens, ref.tokens)
  np.testing.assert_allclose(got.logits, ref.logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("write_rows,backend,kernel", [  # the kernel's cases in CI where a file ships it
    pytest.param(6, "interpret", True, marks=ci_if_shipped("write_max_rows")),
    pytest.param(5, "interpret", False, marks=ci_if_shipped("write_max_rows")), (0, "interpret", False),
    (6, "xla", False)])
def test_cache_write_takes_the_kernel_up_to_write_max_rows(monkeypatch, write_rows, backend, kernel):
  """A step of B·T = 6 slots: the kernel on a kernel backend where `write_max_rows` >= 6; else the scatters (the
  same caches either way)."""
  calls, real = [], kv_write.write
  monkeypatch.setattr(kv_write, "write", lambda *a, **kw: calls.append(1) or real(*a, **kw))
  b, t, s, hkv, d = 3, 2, 5, 2, 4
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  caches = tuple((jax.random.normal(key, (b, s, hkv, d)),) for key in ks[:2])
  k, v = (jax.random.normal(key, (b, t, hkv, d)) for key in ks[2:])
  lengths, new = jnp.array([0, 3, 4]), jnp.array([2, 1, 2])
  with tuning_lib.override(dataclasses.replace(tuning_lib.current(), write_max_rows=write_rows)):
    got = cache_lib._write(*caches, 0, k, v, lengths, new, backend)
  assert bool(calls) == kernel
  want = cache_lib.scatter_write(caches[0][0], caches[1][0], k, v, cache_lib.write_positions(lengths, new, t, s))
  for g, w in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g[0]), np.asarray(w))


@pytest.mark.parametrize("bad", [-1, 1.5, True, "8"])
def test_tuning_write_max_rows_must_be_a_count(bad):
  with pytest.raises(ValueError, match=r"write_max_rows must be an int >= 0"):
    dataclasses.replace(tuning_lib.current(), write_max_rows=bad)


def test_tuning_write_max_rows_round_trips_and_defaults_to_off():
  tune = dataclasses.replace(tuning_lib.current(), write_max_rows=512)
  assert tuning_lib.from_dict(tuning_lib.to_dict(tune)).write_max_rows == 512
  data = tuning_lib.to_dict(tune)
  del data["write_max_rows"]  # a file written before the field: off
  assert tuning_lib.from_dict(data).write_max_rows == 0
