"""The one-scatter cache write (`models.pair_scatter`) against a plain loop over the slots, its guard against XLA's
variadic-scatter bug, its bad inputs, and its use by the models (`Tuning.pair_write`)."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hydragen_jax import tuning as tuning_lib
from models import cache as cache_lib
from models import pair_scatter
from models.generate import generate
from models.llama import init_random
from tests import write_cases
from tests.conftest import ON_GPU, grid, requires_gpu
from tests.write_cases import CASES, CFG, DTYPES


def loop_write(cache, new, positions):
  """The write as a loop over the slots (numpy): slot (b, t) lands at positions[b, t] where that lies in the cache."""
  out = np.array(cache)
  for (b, t), pos in np.ndenumerate(np.asarray(positions)):
    if 0 <= pos < out.shape[1]:
      out[b, pos] = np.asarray(new[b, t].astype(cache.dtype))
  return out


@pytest.mark.parametrize("case,dtypes", grid(list(CASES), list(DTYPES), ids=[str, str]))
def test_scatter_writes_each_slot_once(case, dtypes):
  """k and v land at their slots (dropped: padding, past the capacity, negative); every other entry keeps its
  value: bit for bit the loop's result, in the caches' dtype."""
  cache_dtype = DTYPES[dtypes][1]
  k_cache, v_cache, k, v, pos = write_cases.inputs(case, dtypes)
  got = jax.jit(pair_scatter.scatter)(k_cache, v_cache, k, v, pos)
  for g, cache, upd in zip(got, (k_cache, v_cache), (k, v)):
    assert g.dtype == cache_dtype and g.shape == cache.shape
    np.testing.assert_array_equal(np.asarray(g.astype(jnp.float32)),
                                  loop_write(cache.astype(jnp.float32), upd.astype(cache_dtype).astype(jnp.float32),
                                             pos))


def test_one_value_as_both_caches():
  """Two fresh zero caches made in one jitted function are one value to XLA (its CSE merges them), on which XLA's
  variadic scatter wrote both updates into one buffer (openxla/xla#29362; v's cache came back holding k). The
  write's barrier keeps them apart: each cache gets its own update; so with one array passed as both."""
  b, t, hkv, d, s = 2, 3, 2, 4, 8
  k = jax.random.normal(jax.random.PRNGKey(0), (b, t, hkv, d))
  pos = cache_lib.write_positions(jnp.array([0, 2]), jnp.array([3, 2]), t, s)

  @jax.jit
  def fresh(k):
    zeros = jnp.zeros((b, s, hkv, d)), jnp.zeros((b, s, hkv, d))
    return pair_scatter.scatter(*zeros, k, 2 * k, pos)

  for kc, vc in (fresh(k), pair_scatter.scatter(*(2 * [jnp.zeros((b, s, hkv, d))]), k, 2 * k, pos)):
    want = loop_write(np.zeros((b, s, hkv, d), np.float32), k, pos)
    np.testing.assert_array_equal(np.asarray(kc), want)
    np.testing.assert_array_equal(np.asarray(vc), 2 * want)


def test_one_scatter_writes_both_caches():
  """The write lowers to one scatter of two operands (one launch for both caches where two scatters took two)."""
  k_cache = jnp.zeros((2, 8, 2, 4))
  k = jnp.ones((2, 1, 2, 4))
  text = jax.jit(pair_scatter.scatter).lower(k_cache, k_cache, k, k, jnp.zeros((2, 1), jnp.int32)).as_text()
  scatters = [line for line in text.splitlines() if "stablehlo.scatter" in line]
  assert len(scatters) == 1 and re.search(r'%\w+:2 = "stablehlo.scatter"', scatters[0]), text


def test_caches_are_pinned_row_major_around_the_scatter():
  """XLA:GPU's layout normalization aborts the process on a variadic scatter whose caches layout assignment made
  other than row-major (a small model's decode loop on XLA's attention: heads-major caches, session 56). Both caches
  enter the scatter and both results leave it pinned row-major (minor to major 3, 2, 1, 0)."""
  k_cache, k = jnp.zeros((2, 8, 2, 4)), jnp.ones((2, 1, 2, 4))
  text = jax.jit(pair_scatter.scatter).lower(k_cache, k_cache, k, k, jnp.zeros((2, 1), jnp.int32)).as_text()
  lines = text.splitlines()
  pins = [i for i, line in enumerate(lines) if "@LayoutConstraint" in line]
  scatter = next(i for i, line in enumerate(lines) if "stablehlo.scatter" in line)
  assert len([i for i in pins if i < scatter]) == 2 and len([i for i in pins if i > scatter]) == 2, text
  assert all("result_layouts = [dense<[3, 2, 1, 0]>" in lines[i] for i in pins), text


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a GPU: XLA's GPU compile of the scatter")
def test_scatter_compiled_for_the_gpu():
  """The two tests above in a `-m gpu` run (XLA's GPU compile): every case and dtype bit for bit as the loop, and
  one value as both caches."""
  for case in CASES:
    for dtypes in DTYPES:
      test_scatter_writes_each_slot_once(case, dtypes)
  test_one_value_as_both_caches()


@pytest.mark.parametrize("cache_shape,k_shape", [((2, 0, 2, 4), (2, 1, 2, 4)), ((2, 5, 2, 4), (2, 0, 2, 4)),
                                                 ((0, 5, 2, 4), (0, 1, 2, 4)), ((2, 5, 0, 4), (2, 1, 0, 4))],
                         ids=["no-capacity", "no-tokens", "no-sequences", "no-heads"])
def test_write_of_nothing_returns_the_caches(cache_shape, k_shape):
  k_cache, v_cache = jnp.ones(cache_shape), jnp.full(cache_shape, 2.0)
  k = jnp.zeros(k_shape)
  got = pair_scatter.scatter(k_cache, v_cache, k, k, jnp.zeros(k_shape[:2], jnp.int32))
  for g, c in zip(got, (k_cache, v_cache)):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(c))


@pytest.mark.parametrize("args,match", [
    (((2, 5, 2, 4), (2, 5, 2, 3), (2, 1, 2, 4), (2, 1, 2, 4), (2, 1)), r"k_cache float32\[2, 5, 2, 4\] and v_cache "
                                                                      r"float32\[2, 5, 2, 3\]"),
    (((2, 5, 2, 4), (2, 5, 2, 4), (2, 1, 2, 4), (2, 1, 3, 4), (2, 1)), r"k \[2, 1, 2, 4\] and v \[2, 1, 3, 4\]; "
                                                                      r"expected both \[2, T, 2, 4\]"),
    (((2, 5, 2, 4), (2, 5, 2, 4), (2, 1, 2, 4), (2, 1, 2, 4), (2, 2)), r"positions int32\[2, 2\]; expected "
                                                                      r"integers \[2, 1\]"),
], ids=["caches", "updates", "positions"])
def test_bad_shapes_are_named(args, match):
  cache_a, cache_b, k, v, pos = args
  with pytest.raises(ValueError, match=match):
    pair_scatter.scatter(jnp.zeros(cache_a), jnp.zeros(cache_b), jnp.zeros(k), jnp.zeros(v), jnp.zeros(pos, jnp.int32))


# CI: hydragen on XLA's attention (the write is the same scatter whatever reads the caches next; ~26 s more
# interpreted); the interpreted kernels and standard (its per-sequence caches are written as hydragen's suffix level
# is) in the slow tier; compiled on the GPU.
@pytest.mark.parametrize("backend", ["xla", pytest.param("interpret", marks=pytest.mark.slow),
                                     pytest.param("pallas", marks=[pytest.mark.gpu, requires_gpu])])
@pytest.mark.parametrize("mode", ["hydragen", pytest.param("standard", marks=pytest.mark.slow)])
def test_models_write_with_one_scatter_where_the_tuning_says(backend, monkeypatch, mode):
  """With the tuning's `pair_write` the decode loop writes its caches with `pair_scatter` (on XLA's attention and
  the kernels'); the greedy tokens and logits are bit for bit those of one scatter a cache."""
  model = init_random(CFG, jnp.float32, seed=3)
  prompts = write_cases.prompts()
  # The calls are seen while tracing: a step another test compiled with the same tuning would not trace again.
  jax.clear_caches()
  calls, real = [], pair_scatter.scatter
  monkeypatch.setattr(pair_scatter, "scatter", lambda *a: calls.append(a[0].shape) or real(*a))
  with tuning_lib.override(dataclasses.replace(tuning_lib.current(), pair_write=False)):  # whatever the file says
    ref = generate(model, prompts, num_samples=2, max_new_tokens=4, mode=mode, backend=backend)
  assert not calls  # off: one scatter a cache
  with tuning_lib.override(dataclasses.replace(tuning_lib.current(), pair_write=True)):
    got = generate(model, prompts, num_samples=2, max_new_tokens=4, mode=mode, backend=backend)
  assert any(shape[0] == len(prompts) * 2 for shape in calls)  # the per-sequence caches, written each step
  np.testing.assert_array_equal(got.tokens, ref.tokens)
  np.testing.assert_array_equal(got.logits, ref.logits)


@pytest.mark.parametrize("decode", [False, True])
def test_only_the_decode_loop_writes_with_one_scatter(monkeypatch, decode):
  """`pair_write` applies to the decode loop's attend (`make_attend(..., decode=True)`: its caches are the loop's
  carries), not to prefill's (one write a call, into fresh caches)."""
  calls, real = [], pair_scatter.scatter
  monkeypatch.setattr(pair_scatter, "scatter", lambda *a: calls.append(1) or real(*a))
  b, s, hkv, d = 2, 6, 2, 4
  cache = cache_lib.DenseCache(k=(jnp.zeros((b, s, hkv, d)),), v=(jnp.ones((b, s, hkv, d)),),
                               lengths=jnp.array([1, 3]))
  q = jax.random.normal(jax.random.PRNGKey(0), (b, 1, 2 * hkv, d))
  k, v = (jax.random.normal(key, (b, 1, hkv, d)) for key in jax.random.split(jax.random.PRNGKey(1)))
  attend = cache_lib.make_attend("standard", jnp.ones((b,), jnp.int32), "xla", decode=decode)
  with tuning_lib.override(dataclasses.replace(tuning_lib.current(), pair_write=True)):
    _, written = attend(cache, 0, q, k, v)
  assert len(calls) == int(decode)
  for got, c, u in ((written.k[0], cache.k[0], k), (written.v[0], cache.v[0], v)):  # either way: slots 1 and 3
    np.testing.assert_array_equal(np.asarray(got), loop_write(c, u, jnp.array([[1], [3]])))
