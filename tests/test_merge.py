"""The Pallas merge kernel (`kernels.merge`) against the reference merge, and its use by the API (`Tuning.merge_max_rows`)."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

import hydragen_jax as hj
from hydragen_jax import reference
from hydragen_jax import tuning as tuning_lib
from hydragen_jax.kernels import merge
from tests.conftest import ci_if_shipped

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def _stacks(sizes, n, d, dtype, seed=0):
  """Random stacks `(out [P, n, d], lse [P, n])`; in the first stack's first part, rows 0-2 are empty (lse -inf, out
  NaN: what an unwritten part may hold), and in every part row 1 is (a row with no keys at all)."""
  stacks = []
  for i, p in enumerate(sizes):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed * 97 + i))
    out = jax.random.normal(k1, (p, n, d), jnp.float32).astype(dtype)
    lse = 3.0 * jax.random.normal(k2, (p, n), jnp.float32)
    if i == 0:
      out, lse = out.at[0, :3].set(jnp.nan), lse.at[0, :3].set(-jnp.inf)
    stacks.append((out.at[:, 1].set(jnp.nan), lse.at[:, 1].set(-jnp.inf)))
  return stacks


@pytest.mark.parametrize("sizes,n,d,dtype,rows,warps", [
    ((8, 2), 64, 128, jnp.bfloat16, 2, 1),  # a B = 64 MHA decode step's prefix and suffix splits (rows shortened)
    ((1, 1, 1), 48, 64, jnp.float32, 16, 4),  # the Hopper kernel's parts, each a stack of one
    pytest.param((3,), 9, 128, jnp.bfloat16, 2, 1, marks=pytest.mark.slow),  # odd rows: one a program
    pytest.param((2, 5), 96, 256, jnp.float32, 4, 2, marks=pytest.mark.slow),
])
def test_merge_stacks_equals_the_reference(kernel_backend, sizes, n, d, dtype, rows, warps):
  stacks = _stacks(sizes, n, d, dtype, seed=len(sizes) + n)
  out, lse = merge.merge_stacks(stacks, interpret=kernel_backend.startswith("interpret"), rows=rows, num_warps=warps)
  want_out, want_lse = reference.merge_states([(o[i], l[i]) for o, l in stacks for i in range(o.shape[0])])
  assert out.dtype == dtype and lse.dtype == jnp.float32
  assert not jnp.isnan(out).any() and not jnp.isnan(lse).any()
  chex.assert_trees_all_close(out.astype(jnp.float32), want_out.astype(jnp.float32), rtol=TOL[dtype],
                              atol=TOL[dtype])
  chex.assert_trees_all_close(lse, want_lse, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(out[1], np.float32), 0.0)  # no keys anywhere: out 0, lse -inf
  assert lse[1] == -jnp.inf


def test_merge_stacks_keeps_a_nan_lse_nan(kernel_backend):
  """As the reference: a part's NaN lse gives NaN, not the -inf of a row with no keys (a later merge dropped it)."""
  out, lse = jnp.ones((2, 3, 64)), jnp.zeros((2, 3)).at[0, 1].set(jnp.nan)
  got_out, got_lse = merge.merge_stacks([(out, lse)], interpret=kernel_backend.startswith("interpret"), rows=1,
                                        num_warps=1)
  assert jnp.isnan(got_lse[1]) and jnp.isnan(got_out[1]).all()
  assert not jnp.isnan(got_lse[::2]).any() and not jnp.isnan(got_out[::2]).any()


def test_launch_settings_are_the_tunings():
  """Rows and warps a program come from the device's tuning (`merge_rows`, `merge_warps`), an argument overrides."""
  with tuning_lib.override(dataclasses.replace(tuning_lib.current(), merge_rows=8, merge_warps=2)):
    assert merge.rows_per_program(2048, 128) == 8
    assert merge.rows_per_program(2048, 128, rows=4) == 4
    parts = _stacks((2,), 16, 64, jnp.float32)  # random parts (equal ones merge to themselves under any weights)
    out, lse = merge.merge_stacks(parts, interpret=True)
    chex.assert_trees_all_close((out, lse), reference.merge_states([(o, l) for o, l in zip(*parts[0])]),
                                rtol=1e-5, atol=1e-5)
  for field, bad in (("merge_rows", 3), ("merge_rows", 0), ("merge_warps", 64), ("merge_warps", 1.0)):
    with pytest.raises(ValueError, match=f"Tuning.{field} must be a power of two"):
      dataclasses.replace(tuning_lib.current(), **{field: bad})


def test_rows_per_program():
  assert merge.rows_per_program(2048, 128) == tuning_lib.current().merge_rows
  assert merge.rows_per_program(24, 64, rows=16) == 8  # the largest power of two dividing the rows
  assert merge.rows_per_program(9, 64) == 1
  assert merge.rows_per_program(64, 80) == 0  # Triton tiles need a power-of-two head dim
  assert merge.rows_per_program(64, 512) == 0
  assert merge.rows_per_program(0, 64) == 0


def test_merge_stacks_refuses_bad_input():
  good = _stacks((2,), 16, 64, jnp.float32)
  with pytest.raises(ValueError, match="empty"):
    merge.merge_stacks([])
  with pytest.raises(ValueError, match=r"stack 1 has out \(2, 8, 64\)"):
    merge.merge_stacks(good + _stacks((2,), 8, 64, jnp.float32))
  with pytest.raises(ValueError, match="not supported"):
    merge.merge_stacks(_stacks((2,), 16, 80, jnp.float32))
  with pytest.raises(ValueError, match="rows=3; expected a power of two"):
    merge.merge_stacks(good, rows=3)


def _merging(max_rows: int) -> tuning_lib.Tuning:
  return dataclasses.replace(tuning_lib.current(), merge_max_rows=max_rows)


def _tree(levels: int, *, seed: int, prefix: int, prefix_length: int, node_lengths: list[int]):
  """q `[4, 1, 8, 64]` and a tree over it: a prefix node of `prefix` keys (`prefix_length` valid) shared by all, with
  3 levels two 16-key nodes (`node_lengths` valid) of two sequences each, and 24-key suffixes (24, 1, 13, 0 valid);
  bf16 with 2 levels, float32 with 3. Returns (q, levels, dtype)."""
  b, s, hq, hkv, d = 4, 24, 8, 2, 64
  dtype = jnp.bfloat16 if levels == 2 else jnp.float32
  ks = jax.random.split(jax.random.PRNGKey(seed), 7)
  q = jax.random.normal(ks[0], (b, 1, hq, d), dtype)
  pk, pv = (jax.random.normal(k, (1, prefix, hkv, d), dtype) for k in ks[1:3])
  nk, nv = (jax.random.normal(k, (2, 16, hkv, d), dtype) for k in ks[3:5])
  sk, sv = (jax.random.normal(k, (b, s, hkv, d), dtype) for k in ks[5:7])
  tree = [hj.Level(pk, pv, jnp.array([prefix_length], jnp.int32), np.zeros((b,), np.int32))]
  if levels == 3:
    tree.append(hj.Level(nk, nv, jnp.array(node_lengths, jnp.int32), np.array([0, 0, 1, 1], np.int32)))
  tree.append(hj.Level(sk, sv, jnp.array([24, 1, 13, 0], jnp.int32)))
  return q, tree, dtype


@pytest.mark.parametrize("levels", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_api_merges_with_the_kernel_where_the_tuning_says(kernel_backend, levels):
  """Up to `merge_max_rows` query rows the API's result is the same and the step holds the merge kernel (one launch)
  in place of XLA's merge; above, no merge kernel. A prefix and suffixes (bf16, GQA 4), and a three-level tree (float32)."""
  q, tree, dtype = _tree(levels, seed=7, prefix=40, prefix_length=40, node_lengths=[16, 5])
  b, hq = q.shape[0], q.shape[2]
  fn = lambda q: hj.tree_attention(q, tree, backend=kernel_backend)
  want = hj.tree_attention(q, tree, backend="xla")
  rows = b * hq  # B·T·Hq
  with tuning_lib.override(_merging(rows)):
    got = jax.jit(fn)(q)
    assert "hydragen_merge" in str(jax.make_jaxpr(fn)(q))
  chex.assert_trees_all_close(got.astype(jnp.float32), want.astype(jnp.float32), rtol=TOL[dtype], atol=TOL[dtype])
  for max_rows in (rows - 1, 0):  # XLA's merge (the other tests run it)
    with tuning_lib.override(_merging(max_rows)):
      assert "hydragen_merge" not in str(jax.make_jaxpr(fn)(q))


def _outside_kernels(jaxpr) -> list[str]:
  """The primitives a jaxpr runs, those of nested calls (jit) included, kernels' bodies not."""
  names = []
  for eqn in jaxpr.eqns:
    names.append(eqn.primitive.name)
    if eqn.primitive.name != "pallas_call":
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        names += _outside_kernels(sub)
  return names


@ci_if_shipped("launch_merge_max_rows")
@pytest.mark.parametrize("levels", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_api_merges_in_the_launch_where_the_tuning_says(kernel_backend, levels):
  """Up to `launch_merge_max_rows` query rows the Triton launch merges its own parts (`fused_levels(merge=True)`):
  the same result as XLA's reference backend, and no merge launch in the step (neither the merge kernel, which
  `merge_max_rows` would take, nor XLA's merge); above, the parts are merged as before. A prefix with its keys split
  and suffixes (bf16, GQA 4), and a three-level tree (float32)."""
  q, tree, dtype = _tree(levels, seed=8, prefix=70, prefix_length=67, node_lengths=[16, 0])
  b, hq = q.shape[0], q.shape[2]
  fn = lambda q: hj.tree_attention(q, tree, backend=kernel_backend)
  want = hj.tree_attention(q, tree, backend="xla")
  rows = b * hq  # B·T·Hq
  split = dataclasses.replace(tuning_lib.current(), max_keys_per_program=32, balanced_keys=32, merge_max_rows=rows)
  with tuning_lib.override(dataclasses.replace(split, launch_merge_max_rows=rows)):
    got = jax.jit(fn)(q)
    ops = _outside_kernels(jax.make_jaxpr(fn)(q).jaxpr)
  assert ops.count("pallas_call") == 1 and "exp" not in ops, f"one launch, no merge outside it: {ops}"
  chex.assert_trees_all_close(got.astype(jnp.float32), want.astype(jnp.float32), rtol=TOL[dtype], atol=TOL[dtype])
  with tuning_lib.override(dataclasses.replace(split, launch_merge_max_rows=rows - 1)):
    assert "hydragen_merge" in str(jax.make_jaxpr(fn)(q))  # the merge kernel, as before


def test_api_merges_key_splits_and_returns_their_lse(kernel_backend, monkeypatch):
  """A level split over programs (a small `max_keys_per_program`): stacks of several parts go through the kernel,
  and `attention` returns the merged lse as the reference does."""
  b, t, hq, hkv, d, s = 2, 3, 4, 2, 64, 600
  ks = jax.random.split(jax.random.PRNGKey(11), 3)
  q = jax.random.normal(ks[0], (b, t, hq, d), jnp.float32)
  k, v = (jax.random.normal(key, (b, s, hkv, d), jnp.float32) for key in ks[1:])
  lengths = jnp.array([600, 431], jnp.int32)
  fn = lambda q: hj.attention(q, k, v, kv_lengths=lengths, causal=True, backend=kernel_backend)
  split = dataclasses.replace(_merging(b * t * hq), max_keys_per_program=256, balanced_keys=128)
  seen, real = [], merge.merge_stacks
  monkeypatch.setattr(merge, "merge_stacks", lambda stacks, **kw: seen.append([o.shape for o, _ in stacks])
                      or real(stacks, **kw))
  with tuning_lib.override(split):
    out, lse = jax.jit(fn)(q)
  assert seen and max(shape[0] for shape in seen[0]) > 1, seen  # a stack of several splits, merged by the kernel
  want_out, want_lse = hj.attention(q, k, v, kv_lengths=lengths, causal=True, backend="xla")
  chex.assert_trees_all_close(out, want_out, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(lse, want_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # interpreted Hopper kernel (CI time); compiled with -m gpu as "mosaic" in the shared test base
def test_api_merges_the_hopper_kernels_parts_with_xla_whatever_the_tuning():
  """The Hopper kernel's parts (its key splits and the suffixes) are merged by `merge_states`, also below
  `merge_max_rows`: XLA folds the kernel's layout change of each part into its merge, which the merge kernel would
  take only copied (a copy a part: at B = 64, P = 16K, GQA, 121 µs a step through the API against ~68 µs measured
  for the kernel and `merge_states`, session 40). Here the prefix's part and the suffixes'."""
  b, p, s, hq, hkv, d = 4, 40, 24, 8, 2, 64
  ks = jax.random.split(jax.random.PRNGKey(5), 5)
  q = jax.random.normal(ks[0], (b, 1, hq, d), jnp.bfloat16)
  pk, pv = (jax.random.normal(key, (p, hkv, d), jnp.bfloat16) for key in ks[1:3])
  sk, sv = (jax.random.normal(key, (b, s, hkv, d), jnp.bfloat16) for key in ks[3:5])
  lengths = jnp.array([24, 1, 13, 0], jnp.int32)
  fn = lambda q: hj.hydragen_attention(q, pk, pv, sk, sv, suffix_lengths=lengths, backend="interpret-mosaic")
  with tuning_lib.override(_merging(b * hq)):  # the merge kernel would take these rows
    jaxpr = str(jax.make_jaxpr(fn)(q))
    assert "hydragen_hopper" in jaxpr and "hydragen_merge" not in jaxpr, jaxpr[:0]
    got = jax.jit(fn)(q)
  want = hj.hydragen_attention(q, pk, pv, sk, sv, suffix_lengths=lengths, backend="xla")
  chex.assert_trees_all_close(got.astype(jnp.float32), want.astype(jnp.float32), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("bad", [-1, True, 2.0])
def test_tuning_merge_max_rows_must_be_a_count(bad):
  with pytest.raises(ValueError, match=r"merge_max_rows must be an int >= 0"):
    _merging(bad)


def test_tuning_launch_merge_max_rows_is_a_count_that_defaults_to_off():
  with pytest.raises(ValueError, match=r"launch_merge_max_rows must be an int >= 0"):
    dataclasses.replace(tuning_lib.current(), launch_merge_max_rows=-1)
  on = dataclasses.replace(tuning_lib.current(), launch_merge_max_rows=2048)
  assert tuning_lib.from_dict(tuning_lib.to_dict(on)).launch_merge_max_rows == 2048
  data = tuning_lib.to_dict(on)
  del data["launch_merge_max_rows"]  # a file written before the field: off
  assert tuning_lib.from_dict(data).launch_merge_max_rows == 0


def test_merge_method_is_the_apis_rule():
  """`merge.method`, the rule the API and the sweeps share: the launch up to `launch_merge_max_rows` rows, then the
  merge kernel where it applies under `merge_max_rows`, else XLA's `merge_states`."""
  tune = dataclasses.replace(tuning_lib.current(), launch_merge_max_rows=2048, merge_max_rows=4096)
  assert [merge.method(n, 128, tune) for n in (1, 2048, 2049, 4096, 4097)] == [
      "launch", "launch", "pallas", "pallas", "xla"]
  assert merge.method(3000, 96, tune) == "xla"  # a head dim the merge kernel does not take
  assert merge.method(0, 128, tune) == "xla"  # no rows: nothing for a kernel
  off = dataclasses.replace(tune, launch_merge_max_rows=0, merge_max_rows=0)
  assert merge.method(1, 128, off) == "xla"


def test_tuning_merge_max_rows_round_trips_and_defaults_to_off():
  assert tuning_lib.from_dict(tuning_lib.to_dict(_merging(4096))).merge_max_rows == 4096
  data = tuning_lib.to_dict(_merging(4096))
  del data["merge_max_rows"]  # a file written before the field: off
  assert tuning_lib.from_dict(data).merge_max_rows == 0
