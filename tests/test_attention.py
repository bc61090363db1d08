"""The shared test base: every backend against the reference and against plain attention over concatenated KV."""

from __future__ import annotations

import dataclasses
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hydragen_jax as hj
from hydragen_jax import Level, dispatch, reference, tuning
from hydragen_jax.kernels import hopper, ops
from tests.attention_cases import expected_tree, normal, random_level, tol
from tests.conftest import BACKEND_PARAMS, ci_if_shipped, grid, requires_gpu

# (B, T, Hq, Hkv, D, S): MHA, GQA groups 4 and 8, MQA; D 64/128/256; odd lengths.
SHAPES = [
    (2, 1, 4, 4, 64, 37),
    (3, 4, 8, 2, 64, 50),
    (2, 1, 8, 1, 128, 23),
    (1, 4, 16, 2, 128, 70),
    (2, 1, 4, 1, 256, 19),
]
DTYPES = [jnp.float32, jnp.bfloat16]


def _ragged_lengths(key, batch, capacity, minimum=0):
  lengths = jax.random.randint(key, (batch,), minimum, capacity + 1)
  return lengths.at[0].set(capacity)  # one full sequence, the others ragged


def _shape_id(s) -> str:
  return "B{}T{}Hq{}Hkv{}D{}S{}".format(*s)


def _dtype_id(d) -> str:
  return jnp.dtype(d).name


# Each grid: every combination with --all (and compiled on the GPU), a covering subset of them in CI (conftest.grid).
@pytest.mark.mosaic_falls_back
@pytest.mark.parametrize("shape,dtype,causal", grid(SHAPES, DTYPES, [False, True], ids=[
    _shape_id, _dtype_id, lambda c: "causal" if c else "full"]))
def test_attention_matches_reference(backend, shape, dtype, causal):
  b, t, hq, hkv, d, s = shape
  keys = jax.random.split(jax.random.PRNGKey(hash((shape, causal)) % 2**31), 4)
  q, k, v = (normal(keys[0], (b, t, hq, d), dtype), normal(keys[1], (b, s, hkv, d), dtype),
             normal(keys[2], (b, s, hkv, d), dtype))
  lengths = _ragged_lengths(keys[3], b, s)
  out, lse = hj.attention(q, k, v, kv_lengths=lengths, causal=causal, backend=backend)
  ref_out, ref_lse = reference.attention(q.astype(jnp.float32), k, v, lengths, causal=causal, scale=d**-0.5)
  assert out.dtype == dtype and lse.dtype == jnp.float32
  chex.assert_trees_all_close(out.astype(jnp.float32), ref_out, **tol(dtype))
  seen = jnp.isfinite(ref_lse)
  chex.assert_trees_all_equal(jnp.isfinite(lse), seen)
  chex.assert_trees_all_close(jnp.where(seen, lse, 0), jnp.where(seen, ref_lse, 0), **tol(dtype))


@pytest.mark.mosaic_falls_back
def test_attention_empty_sequences_give_zero_and_minus_inf(backend):
  keys = jax.random.split(jax.random.PRNGKey(1), 3)
  q = normal(keys[0], (3, 2, 4, 64), jnp.float32)
  k, v = normal(keys[1], (3, 20, 2, 64), jnp.float32), normal(keys[2], (3, 20, 2, 64), jnp.float32)
  # Sequence 0 has no keys; sequence 1 has one key, so its first causal query (position -1) sees none.
  out, lse = hj.attention(q, k, v, kv_lengths=jnp.array([0, 1, 20]), causal=True, backend=backend)
  assert not jnp.isnan(out).any() and not jnp.isnan(lse).any()
  chex.assert_trees_all_equal(out[0], jnp.zeros_like(out[0]))
  assert jnp.all(lse[0] == -jnp.inf) and jnp.all(lse[1, 0] == -jnp.inf) and jnp.all(jnp.isfinite(lse[1, 1]))


@pytest.mark.mosaic_falls_back
@pytest.mark.parametrize("shape,dtype,batch_prefix", grid(SHAPES, DTYPES, [True, False], ids=[
    _shape_id, _dtype_id, lambda b: "batched" if b else "per_seq"]))
def test_hydragen_equals_attention_over_concatenated_kv(backend, shape, dtype, batch_prefix):
  """The strongest claim: prefix + suffix merged == plain causal attention over [prefix; suffix]."""
  b, t, hq, hkv, d, s = shape
  p = 2 * s + 3  # odd, not a multiple of any block
  keys = jax.random.split(jax.random.PRNGKey(7 + hash(shape) % 1000), 6)
  q = normal(keys[0], (b, t, hq, d), dtype)
  prefix = random_level(keys[1], 1, p, [p - 2], [0] * b, hkv, d, dtype)
  suffix = random_level(keys[2], b, s, _ragged_lengths(keys[3], b, s, minimum=t), None, hkv, d, dtype)
  out = hj.hydragen_attention(q, prefix.k[0], prefix.v[0], suffix.k, suffix.v, prefix_length=p - 2,
                              suffix_lengths=suffix.lengths, backend=backend, batch_prefix=batch_prefix)
  assert out.shape == q.shape and out.dtype == dtype
  chex.assert_trees_all_close(out.astype(jnp.float32), expected_tree(q, [prefix, suffix]), **tol(dtype))


@pytest.mark.mosaic_falls_back
@pytest.mark.parametrize("prefix_length", [0, 1])
def test_hydragen_empty_or_tiny_prefix(backend, prefix_length):
  keys = jax.random.split(jax.random.PRNGKey(3), 4)
  b, t, hq, hkv, d = 3, 1, 8, 2, 64
  q = normal(keys[0], (b, t, hq, d), jnp.float32)
  prefix = random_level(keys[1], 1, 16, [prefix_length], [0] * b, hkv, d, jnp.float32)
  suffix = random_level(keys[2], b, 9, [9, 1, 4], None, hkv, d, jnp.float32)
  out = hj.hydragen_attention(q, prefix.k[0], prefix.v[0], suffix.k, suffix.v, prefix_length=prefix_length,
                              suffix_lengths=suffix.lengths, backend=backend)
  chex.assert_trees_all_close(out, expected_tree(q, [prefix, suffix]), **tol(jnp.float32))


def test_hydragen_suffix_shorter_than_the_queries_sees_the_whole_prefix(backend):
  """The contract for suffix_lengths < T: query t sees suffix keys s <= length - T + t (none where that is < 0) and
  the whole prefix, always; and for a length > T the causal rule itself: checked against softmax in float64 numpy
  over exactly those keys (the concatenated causal mask of `expected_tree` would hide prefix keys from queries
  without a suffix key, and it shares the reference's rule). T·g = 6, bf16: the Hopper kernel's."""
  keys = jax.random.split(jax.random.PRNGKey(31), 4)
  b, t, hq, hkv, d, p_len = 3, 3, 4, 2, 64, 13
  q = normal(keys[0], (b, t, hq, d), jnp.bfloat16)
  prefix = random_level(keys[1], 1, 16, [p_len], [0] * b, hkv, d, jnp.bfloat16)
  suffix = random_level(keys[2], b, 8, [0, 1, 6], None, hkv, d, jnp.bfloat16)
  out = hj.hydragen_attention(q, prefix.k[0], prefix.v[0], suffix.k, suffix.v, prefix_length=p_len,
                              suffix_lengths=suffix.lengths, backend=backend)
  f64 = lambda x: np.asarray(x.astype(jnp.float32), np.float64)  # noqa: E731
  qn, pk, pv, sk, sv = f64(q), f64(prefix.k[0, :p_len]), f64(prefix.v[0, :p_len]), f64(suffix.k), f64(suffix.v)
  want = np.zeros((b, t, hq, d))
  for i, length in enumerate([0, 1, 6]):
    for j in range(t):
      seen = [s for s in range(length) if s <= length - t + j]
      for h in range(hq):
        kk = np.concatenate([pk[:, h // (hq // hkv)], sk[i, seen, h // (hq // hkv)]])
        vv = np.concatenate([pv[:, h // (hq // hkv)], sv[i, seen, h // (hq // hkv)]])
        w = np.exp(kk @ qn[i, j, h] / np.sqrt(d) - (kk @ qn[i, j, h] / np.sqrt(d)).max())
        want[i, j, h] = w @ vv / w.sum()
  np.testing.assert_allclose(np.asarray(out.astype(jnp.float32)), want, rtol=2e-2, atol=2e-2)


@pytest.mark.mosaic_falls_back
def test_hydragen_zero_capacity_prefix(backend):
  keys = jax.random.split(jax.random.PRNGKey(4), 3)
  q = normal(keys[0], (2, 1, 4, 64), jnp.float32)
  suffix = random_level(keys[1], 2, 11, [11, 5], None, 4, 64, jnp.float32)
  empty = jnp.zeros((0, 4, 64), jnp.float32)
  out = hj.hydragen_attention(q, empty, empty, suffix.k, suffix.v, suffix_lengths=suffix.lengths, backend=backend)
  ref, _ = reference.attention(q, suffix.k, suffix.v, suffix.lengths, causal=True, scale=64**-0.5)
  chex.assert_trees_all_close(out, ref, **tol(jnp.float32))


@pytest.mark.mosaic_falls_back(ci=True)  # the fallback is what it tests
@pytest.mark.parametrize("empty", ["prefix", "suffix"])
@pytest.mark.parametrize("hkv", [4, 2], ids=["Tg1", "Tg2"])
def test_hydragen_zero_capacity_level_in_the_hopper_kernels_shapes(backend, empty, hkv):
  """A level of capacity 0 beside the other in bf16 at D = 64 and T·g = 1 / 2, shapes the Hopper kernel takes
  otherwise (T·g 1-2 pack their suffixes in boxes): the other level alone, no crash (the kernel refuses an empty
  cache, whose TMA copy would have no key: the Triton kernels run it)."""
  keys = jax.random.split(jax.random.PRNGKey(5), 3)
  b, d = 3, 64
  q = normal(keys[0], (b, 1, 4, d), jnp.bfloat16)
  prefix = random_level(keys[1], 1, 0 if empty == "prefix" else 24, [0 if empty == "prefix" else 19], [0] * b, hkv, d,
                        jnp.bfloat16)
  suffix = random_level(keys[2], b, 0 if empty == "suffix" else 16, [0] * b if empty == "suffix" else [16, 3, 0],
                        None, hkv, d, jnp.bfloat16)
  out = hj.hydragen_attention(q, prefix.k[0], prefix.v[0], suffix.k, suffix.v, prefix_length=prefix.lengths[0],
                              suffix_lengths=suffix.lengths, backend=backend)
  assert not jnp.isnan(out.astype(jnp.float32)).any()
  chex.assert_trees_all_close(out.astype(jnp.float32), expected_tree(q, [prefix, suffix]), **tol(jnp.bfloat16))


@pytest.mark.mosaic_falls_back
@pytest.mark.parametrize("heads,dtype,batch_shared", grid([(8, 2, 64), (8, 1, 128), (4, 4, 256)], DTYPES, [True, False],
                                                        ids=[lambda h: "{}-{}-{}".format(*h), _dtype_id,
                                                             lambda b: "batched" if b else "per_seq"],
                                                        # CI: each head shape, dtype and reading once (3 cases)
                                                        ci=("8-2-64-float32-batched", "8-1-128-bfloat16-per_seq",
                                                            "4-4-256-bfloat16-batched")))
def test_depth3_tree_with_uneven_nodes(backend, heads, dtype, batch_shared):
  """Few-shot root -> 3 problems (uneven, one empty) -> 7 samples with ragged completions."""
  hq, hkv, d = heads
  keys = jax.random.split(jax.random.PRNGKey(11), 5)
  b, t = 7, 2
  seq_to_problem = [0, 0, 0, 1, 2, 2, 1]
  q = normal(keys[0], (b, t, hq, d), dtype)
  levels = [
      random_level(keys[1], 1, 45, [41], [0] * b, hkv, d, dtype),
      random_level(keys[2], 3, 19, [19, 0, 7], seq_to_problem, hkv, d, dtype),
      random_level(keys[3], b, 13, [2, 13, 5, 9, 3, 2, 11], None, hkv, d, dtype),
  ]
  out = hj.tree_attention(q, levels, backend=backend, batch_shared=batch_shared)
  chex.assert_trees_all_close(out.astype(jnp.float32), expected_tree(q, levels), **tol(dtype))


@pytest.mark.mosaic_falls_back
@pytest.mark.parametrize("batch_shared", [(True, False), (False, True)], ids=["root_batched", "problems_batched"])
def test_tree_levels_batched_or_not_each_its_own(backend, batch_shared):
  """One choice per shared level (the models' cost model makes it): any mix gives the same attention."""
  keys = jax.random.split(jax.random.PRNGKey(13), 4)
  b, t, hq, hkv, d = 5, 1, 8, 2, 64
  q = normal(keys[0], (b, t, hq, d), jnp.float32)
  levels = [random_level(keys[1], 1, 33, [30], [0] * b, hkv, d, jnp.float32),
            random_level(keys[2], 2, 17, [17, 9], [0, 1, 1, 0, 1], hkv, d, jnp.float32),
            random_level(keys[3], b, 9, [3, 9, 1, 5, 7], None, hkv, d, jnp.float32)]
  out = hj.tree_attention(q, levels, backend=backend, batch_shared=list(batch_shared))
  chex.assert_trees_all_close(out, expected_tree(q, levels), **tol(jnp.float32))


def test_tree_batch_shared_reaches_each_level(monkeypatch):
  """Each shared level gets its own choice, in order; the leaf level is never batched."""
  from hydragen_jax import api  # noqa: PLC0415

  seen = []
  real = api._attend

  def spy(q, levels, *, batched, **kw):
    seen.append(batched)
    return real(q, levels, batched=batched, **kw)

  monkeypatch.setattr(api, "_attend", spy)
  keys = jax.random.split(jax.random.PRNGKey(15), 4)
  q = normal(keys[0], (2, 1, 4, 16), jnp.float32)
  levels = [random_level(keys[1], 1, 8, [8], [0, 0], 2, 16, jnp.float32),
            random_level(keys[2], 2, 8, [8, 8], [0, 1], 2, 16, jnp.float32),
            random_level(keys[3], 2, 8, [3, 5], None, 2, 16, jnp.float32)]
  for choice, want in [([True, False], [True, False, False]), ((False, True), [False, True, False]),
                       (np.array([True, True]), [True, True, False]), (True, [True, True, False]),
                       (np.False_, [False, False, False])]:
    hj.tree_attention(q, levels, backend="xla", batch_shared=choice)
    assert seen.pop() == want, choice


@pytest.mark.parametrize("batch_shared", [[True], [True, False, True], [1, 0], "yes", 1, None, np.array(True),
                                          np.array([[True, False]])])
def test_tree_batch_shared_per_level_must_name_every_shared_level(batch_shared):
  keys = jax.random.split(jax.random.PRNGKey(14), 4)
  q = normal(keys[0], (2, 1, 4, 16), jnp.float32)
  levels = [random_level(keys[1], 1, 8, [8], [0, 0], 2, 16, jnp.float32),
            random_level(keys[2], 2, 8, [8, 8], [0, 1], 2, 16, jnp.float32),
            random_level(keys[3], 2, 8, [3, 5], None, 2, 16, jnp.float32)]
  with pytest.raises(ValueError, match=r"batch_shared=.*expected a bool, or one bool per shared level \(2 for 3 "):
    hj.tree_attention(q, levels, backend="xla", batch_shared=batch_shared)


def test_tree_levels_and_batch_shared_given_otherwise():
  """Levels as any iterable (a generator: taken once) give the list's result; a traced batch_shared (a bool, or one
  in a list) is refused with the static-argument hint, not a TracerArrayConversionError."""
  keys = jax.random.split(jax.random.PRNGKey(16), 3)
  q = normal(keys[0], (2, 1, 4, 16), jnp.float32)
  levels = [random_level(keys[1], 1, 8, [8], [0, 0], 2, 16, jnp.float32),
            random_level(keys[2], 2, 8, [3, 5], None, 2, 16, jnp.float32)]
  want = hj.tree_attention(q, levels, backend="xla")
  chex.assert_trees_all_close(hj.tree_attention(q, (lv for lv in levels), backend="xla"), want)
  with pytest.raises(ValueError, match=r"levels must be a sequence of Level, root to leaf; got int"):
    hj.tree_attention(q, 3, backend="xla")
  for flag in (lambda b: b, lambda b: [b]):
    with pytest.raises(ValueError, match=r"batch_shared=.*Tracer.*pass it as a static argument \(e\.g\. "
                                         r"jax\.jit\(fn, static_argnames='batch_shared'\)"):
      jax.jit(lambda q, b: hj.tree_attention(q, levels, backend="xla", batch_shared=flag(b)))(q, True)


@pytest.mark.mosaic_falls_back
def test_tree_with_empty_leaf_level_sees_shared_levels_only(backend):
  keys = jax.random.split(jax.random.PRNGKey(12), 4)
  b, hq, hkv, d = 4, 4, 2, 64
  q = normal(keys[0], (b, 1, hq, d), jnp.float32)
  root = random_level(keys[1], 1, 30, [30], [0] * b, hkv, d, jnp.float32)
  leaf = random_level(keys[2], b, 8, [0, 0, 0, 0], None, hkv, d, jnp.float32)
  out = hj.tree_attention(q, [root, leaf], backend=backend)
  ref, _ = reference.shared_attention(q, root.k[0], root.v[0], 30, scale=d**-0.5)
  chex.assert_trees_all_close(out, ref, **tol(jnp.float32))


@pytest.mark.mosaic_falls_back
def test_single_level_tree_is_causal_attention(backend):
  keys = jax.random.split(jax.random.PRNGKey(13), 4)
  q = normal(keys[0], (3, 4, 8, 64), jnp.float32)
  leaf = random_level(keys[1], 3, 21, [21, 4, 9], None, 2, 64, jnp.float32)
  out = hj.tree_attention(q, [leaf], backend=backend)
  chex.assert_trees_all_close(out, expected_tree(q, [leaf]), **tol(jnp.float32))


@pytest.mark.mosaic_falls_back
def test_under_jit_with_traced_lengths(backend):
  keys = jax.random.split(jax.random.PRNGKey(5), 5)
  b, t, hq, hkv, d, p, s = 4, 1, 8, 2, 64, 33, 17
  q = normal(keys[0], (b, t, hq, d), jnp.float32)
  prefix = random_level(keys[1], 1, p, [p], [0] * b, hkv, d, jnp.float32)
  suffix = random_level(keys[2], b, s, [17, 3, 8, 1], None, hkv, d, jnp.float32)
  f = jax.jit(lambda q, pk, pv, sk, sv, pl, sl: hj.hydragen_attention(
      q, pk, pv, sk, sv, prefix_length=pl, suffix_lengths=sl, backend=backend))
  out = f(q, prefix.k[0], prefix.v[0], suffix.k, suffix.v, jnp.int32(p), suffix.lengths)
  chex.assert_trees_all_close(out, expected_tree(q, [prefix, suffix]), **tol(jnp.float32))
  tree = jax.jit(lambda q, levels: hj.tree_attention(q, levels, backend=backend))
  chex.assert_trees_all_close(tree(q, [prefix, suffix]), out, **tol(jnp.float32))


def test_numpy_lengths_with_a_traced_seq_to_node(kernel_backend):
  """Lengths known on the host (numpy, or None: full) beside a node index traced under jit, on a level read per
  sequence (a shared level not batched, a leaf level with its own nodes): the kernel backends gather the lengths by
  the traced index (a batched level and the reference never did)."""
  keys = jax.random.split(jax.random.PRNGKey(9), 4)
  q = normal(keys[0], (3, 1, 4, 64), jnp.float32)
  nodes = random_level(keys[1], 2, 8, [8, 5], [0, 1, 1], 2, 64, jnp.float32)
  suffix = random_level(keys[2], 3, 8, [8, 3, 2], None, 2, 64, jnp.float32)
  m = jnp.array([0, 1, 1])
  for lengths, batch_shared, leaf in ((np.array([8, 5], np.int32), False, False), (None, None, True)):
    level = dataclasses.replace(nodes, lengths=lengths)
    full = dataclasses.replace(nodes, lengths=jnp.array([8, 8] if lengths is None else lengths))
    levels, want = ([level], [full]) if leaf else ([level, suffix], [full, suffix])
    kwargs = {} if leaf else dict(batch_shared=batch_shared)
    f = jax.jit(lambda m, levels=levels, kwargs=kwargs: hj.tree_attention(
        q, [dataclasses.replace(levels[0], seq_to_node=m), *levels[1:]], backend=kernel_backend, **kwargs))
    chex.assert_trees_all_close(f(m), expected_tree(q, want), **tol(jnp.float32))


@pytest.mark.parametrize("backend", [pytest.param("xla", id="xla"), pytest.param("interpret", id="interpret"),
                                     pytest.param("triton", id="triton", marks=[pytest.mark.gpu, requires_gpu])])
def test_keys_and_values_past_the_lengths_never_enter(backend):
  """Whatever a cache holds past a length (NaN, inf: an unused tail) leaves the output as if it held zeros, on the
  reference and the Triton kernels (the Hopper kernel needs it finite: README, 'Lengths and indices out of range')."""
  keys = jax.random.split(jax.random.PRNGKey(12), 5)
  q = normal(keys[0], (2, 1, 4, 64), jnp.bfloat16)
  pk, pv = (normal(k, (16, 1, 64), jnp.bfloat16) for k in keys[1:3])
  sk, sv = (normal(k, (2, 8, 1, 64), jnp.bfloat16) for k in keys[3:5])
  lengths = jnp.array([5, 8])
  step = jax.jit(lambda pk, pv, sk, sv: hj.hydragen_attention(q, pk, pv, sk, sv, prefix_length=10,
                                                              suffix_lengths=lengths, backend=backend))
  plain = jax.jit(lambda v: hj.attention(q, sk, v, kv_lengths=lengths, causal=True, backend=backend))
  clean = step(pk.at[10:].set(0), pv.at[10:].set(0), sk.at[0, 5:].set(0), sv.at[0, 5:].set(0))
  for bad in (np.nan, np.inf):
    out = step(pk.at[10:].set(bad), pv.at[10:].set(bad), sk.at[0, 5:].set(bad), sv.at[0, 5:].set(bad))
    chex.assert_trees_all_equal(out, clean)
    chex.assert_trees_all_equal(plain(sv.at[0, 5:].set(bad)), plain(sv.at[0, 5:].set(0)))


# interpreted, numpy warns on the score product of the inf keys past a length (masked after it)
@ci_if_shipped("zero_value_tails")
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
@pytest.mark.parametrize("backend", [
    pytest.param("interpret-mosaic", id="interpret"),
    pytest.param("mosaic", id="compiled", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not dispatch.on_hopper(), reason="needs a Hopper GPU (H100/H200): the kernel uses wgmma and TMA")])])
def test_hopper_kernel_with_zero_value_tails_keeps_non_finite_tails_out(backend):
  """The Hopper kernel through the API with `zero_value_tails` on in the tuning (off in the shipped files: it
  costs 2-6 % on the H200): NaN / inf past the prefix's and a suffix's length leave the step as if those rows held zeros, as on the
  other backends (test_keys_and_values_past_the_lengths_never_enter)."""
  keys = jax.random.split(jax.random.PRNGKey(12), 5)
  q = normal(keys[0], (2, 1, 4, 64), jnp.bfloat16)
  pk, pv = (normal(k, (16, 1, 64), jnp.bfloat16) for k in keys[1:3])
  sk, sv = (normal(k, (2, 8, 1, 64), jnp.bfloat16) for k in keys[3:5])
  lengths = jnp.array([5, 8])
  assert hopper.supported(q, pk, sk) is None  # the step runs on the Hopper kernel
  t = tuning.current()
  zeroed = lambda entries: tuple((r, dataclasses.replace(s, zero_value_tails=True)) for r, s in entries)
  with tuning.override(dataclasses.replace(t, hopper=zeroed(t.hopper), hopper_long=zeroed(t.hopper_long))):
    step = jax.jit(lambda pk, pv, sk, sv: hj.hydragen_attention(q, pk, pv, sk, sv, prefix_length=10,
                                                                suffix_lengths=lengths, backend=backend))
    clean = step(pk.at[10:].set(0), pv.at[10:].set(0), sk.at[0, 5:].set(0), sv.at[0, 5:].set(0))
    for bad in (np.nan, np.inf):
      chex.assert_trees_all_equal(step(pk.at[10:].set(bad), pv.at[10:].set(bad), sk.at[0, 5:].set(bad),
                                       sv.at[0, 5:].set(bad)), clean)


@pytest.mark.mosaic_falls_back
def test_under_vmap_over_layers(backend):
  """A leading axis (e.g. layers of a model) mapped with jax.vmap: Pallas' batching rule adds a grid axis."""
  keys = jax.random.split(jax.random.PRNGKey(6), 5)
  layers, b, hq, hkv, d, p, s = 2, 3, 4, 2, 64, 20, 9
  q = normal(keys[0], (layers, b, 1, hq, d), jnp.float32)
  pk, pv = normal(keys[1], (layers, p, hkv, d), jnp.float32), normal(keys[2], (layers, p, hkv, d), jnp.float32)
  sk, sv = normal(keys[3], (layers, b, s, hkv, d), jnp.float32), normal(keys[4], (layers, b, s, hkv, d), jnp.float32)
  lengths = jnp.array([9, 2, 5])
  out = jax.vmap(lambda q, pk, pv, sk, sv: hj.hydragen_attention(
      q, pk, pv, sk, sv, suffix_lengths=lengths, backend=backend))(q, pk, pv, sk, sv)
  for i in range(layers):
    levels = [Level(pk[i][None], pv[i][None], jnp.array([p]), jnp.zeros(b, jnp.int32)),
              Level(sk[i], sv[i], lengths)]
    chex.assert_trees_all_close(out[i], expected_tree(q[i], levels), **tol(jnp.float32))


# 4 trees a backend in CI (it was 8: CPU time), a fresh draw every run: hypothesis keeps no example database there;
# interpreted, the Hopper kernel's backend with --all only (CI time: most random trees fall back to Triton there, which
# "interpret" runs)
@pytest.mark.parametrize("backend", [pytest.param(p.values[0], id=p.id, marks=(*p.marks, pytest.mark.slow))
                                     if p.id in ("interpret-mosaic", "xla") else p for p in BACKEND_PARAMS])
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_random_trees(backend, data):
  """Hypothesis draws the tree: depth, nodes, lengths (0 included), heads, query tokens."""
  depth = data.draw(st.integers(1, 3), label="depth")
  b = data.draw(st.integers(1, 5), label="batch")
  t = data.draw(st.integers(1, 3), label="T")
  hkv = data.draw(st.sampled_from([1, 2]), label="Hkv")
  g = data.draw(st.sampled_from([1, 4, 8]), label="group")
  d = 64
  seed = data.draw(st.integers(0, 2**16), label="seed")
  keys = iter(jax.random.split(jax.random.PRNGKey(seed), 2 * depth + 2))
  q = normal(next(keys), (b, t, hkv * g, d), jnp.float32)
  levels = []
  for level in range(depth - 1):
    n = data.draw(st.integers(1, b), label=f"nodes{level}")
    cap = data.draw(st.integers(1, 40), label=f"capacity{level}")
    lengths = data.draw(st.lists(st.integers(0, cap), min_size=n, max_size=n), label=f"lengths{level}")
    nodes = data.draw(st.lists(st.integers(0, n - 1), min_size=b, max_size=b), label=f"seq_to_node{level}")
    levels.append(random_level(next(keys), n, cap, lengths, nodes, hkv, d, jnp.float32))
  cap = data.draw(st.integers(t, 30), label="leaf capacity")
  leaf_lengths = data.draw(st.lists(st.integers(t, cap), min_size=b, max_size=b), label="leaf lengths")
  levels.append(random_level(next(keys), b, cap, leaf_lengths, None, hkv, d, jnp.float32))
  batch_shared = data.draw(st.booleans(), label="batch_shared")
  out = hj.tree_attention(q, levels, backend=backend, batch_shared=batch_shared)
  chex.assert_trees_all_close(out, expected_tree(q, levels), **tol(jnp.float32))


def test_reference_called_outside_jit_is_one_compiled_program_a_function():
  """The reference (what the xla backend runs) called eagerly: one compiled program per function and shape, not one
  per jnp op (a depth-3 tree on the xla backend compiled 107 programs before)."""
  compiles = []

  def count(event, _duration, **_):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(event)

  keys = jax.random.split(jax.random.PRNGKey(16), 4)
  q = normal(keys[0], (3, 2, 8, 24), jnp.float32)  # a head dim no other test compiles
  k, v = normal(keys[1], (3, 13, 2, 24), jnp.float32), normal(keys[2], (3, 13, 2, 24), jnp.float32)
  lengths, lse = jnp.array([13, 5, 0], jnp.int32), normal(keys[3], (3, 2, 8), jnp.float32)
  shared_k, shared_v = np.asarray(k[0]), np.asarray(v[0])
  jax.block_until_ready((q, k, v, lengths, lse))
  jax.monitoring.register_event_duration_secs_listener(count)
  try:
    for name, run in [("attention", lambda: reference.attention(q, k, v, lengths, causal=True, scale=0.2)),
                      ("shared_attention", lambda: reference.shared_attention(q, shared_k, shared_v, 9, scale=0.2)),
                      ("merge_states", lambda: reference.merge_states([(q, lse), (q, lse)]))]:
      compiles.clear()
      jax.block_until_ready(run())
      assert len(compiles) == 1, (name, len(compiles))
  finally:
    jax.monitoring.unregister_event_duration_listener(count)


# --- merge_states -------------------------------------------------------------------------------------------


def test_merge_of_key_splits_equals_full_attention():
  keys = jax.random.split(jax.random.PRNGKey(8), 3)
  q = normal(keys[0], (2, 3, 8, 64), jnp.float32)
  k, v = normal(keys[1], (2, 50, 2, 64), jnp.float32), normal(keys[2], (2, 50, 2, 64), jnp.float32)
  full = jnp.full((2,), 50)
  parts = [reference.attention(q, k[:, a:b], v[:, a:b], jnp.full((2,), b - a), causal=False, scale=0.125)
           for a, b in [(0, 7), (7, 31), (31, 50)]]
  out, lse = hj.merge_states(parts)
  ref_out, ref_lse = reference.attention(q, k, v, full, causal=False, scale=0.125)
  chex.assert_trees_all_close((out, lse), (ref_out, ref_lse), rtol=1e-5, atol=1e-5)


def test_merge_of_mixed_dtypes_is_in_the_first_parts_dtype_computed_in_float32():
  """out in the first part's dtype, lse float32, the arithmetic in float32: a bfloat16 part beside a float32 one."""
  a = (jnp.full((2, 4), 1.0, jnp.bfloat16), jnp.zeros((2,), jnp.bfloat16))
  b = (jnp.full((2, 4), 1.0 + 2.0 ** -12, jnp.float32), jnp.zeros((2,), jnp.float32))
  out, lse = hj.merge_states([a, b])
  assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
  out, lse = hj.merge_states([b, a])
  assert out.dtype == jnp.float32 and lse.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), 1.0 + 2.0 ** -13, rtol=1e-7)  # not rounded to bfloat16 on the way
  np.testing.assert_allclose(np.asarray(lse), np.log(2.0), rtol=1e-6)


def test_merge_with_empty_parts_has_no_nan():
  out = jnp.ones((2, 4))
  empty = (jnp.zeros((2, 4)), jnp.full((2,), -jnp.inf))
  merged, lse = hj.merge_states([empty, (out, jnp.array([0.5, -3.0])), empty])
  chex.assert_trees_all_close((merged, lse), (out, jnp.array([0.5, -3.0])))
  all_empty, lse = hj.merge_states([empty, empty])
  assert not jnp.isnan(all_empty).any()
  chex.assert_trees_all_equal(all_empty, jnp.zeros((2, 4)))
  assert jnp.all(lse == -jnp.inf)


def test_merge_keeps_a_nan_lse_nan():
  """A NaN lse (a wrong part upstream) gives a NaN lse, not -inf: as -inf the next merge read it as a part with no
  keys and dropped it, and the NaN vanished."""
  one, nan = (jnp.ones((1, 4)), jnp.zeros((1,))), (jnp.ones((1, 4)), jnp.array([jnp.nan]))
  out, lse = hj.merge_states([nan, one])
  assert jnp.isnan(out).all() and jnp.isnan(lse).all()
  out, lse = hj.merge_states([(out, lse), (2 * jnp.ones((1, 4)), jnp.zeros((1,)))])
  assert jnp.isnan(out).all() and jnp.isnan(lse).all()


def test_merge_names_a_part_that_is_not_a_pair_of_arrays():
  out, lse = jnp.ones((2, 4)), jnp.zeros((2,))
  with pytest.raises(ValueError, match=r"part 0 must be an \(out, lse\) pair of arrays; got an array of shape "
                                       r"\(2, 4\)\. `states` is a sequence of such pairs"):
    hj.merge_states((out, lse))  # one pair, not a sequence of pairs
  with pytest.raises(ValueError, match=r"part 1 must be an \(out, lse\) pair of arrays; got tuple of 3"):
    hj.merge_states([(out, lse), (out, lse, lse)])
  with pytest.raises(ValueError, match=r"part 0 must be an \(out, lse\) pair of arrays; got a pair of list and array"):
    hj.merge_states([(np.asarray(out).tolist(), lse)])
  with pytest.raises(ValueError, match=r"part 0's out is a scalar; expected out \[\.\.\., D\]"):  # was out (1,)
    hj.merge_states([(jnp.float32(1.0), jnp.float32(0.0)), (jnp.float32(3.0), jnp.float32(0.0))])
  # integer parts (a weighted average truncated), an array of parts, a number: refused by name; a generator taken
  with pytest.raises(ValueError, match=r"part 1's out has dtype int32; expected float16, bfloat16, float32 or "):
    hj.merge_states([(out, lse), (jnp.ones((1, 4), jnp.int32), lse)])
  with pytest.raises(ValueError, match=r"`states` must be a sequence of \(out, lse\) pairs; got"):
    hj.merge_states(jnp.stack([out, out]))
  with pytest.raises(ValueError, match=r"`states` must be a sequence of \(out, lse\) pairs; got"):
    hj.merge_states(3)
  chex.assert_trees_all_close(hj.merge_states(p for p in [(out, lse), (out, lse)]),
                              hj.merge_states([(out, lse), (out, lse)]))


def test_merge_is_order_independent_and_keeps_dtype():
  keys = jax.random.split(jax.random.PRNGKey(9), 6)
  parts = [(normal(keys[i], (3, 8), jnp.bfloat16), jax.random.normal(keys[i + 3], (3,))) for i in range(3)]
  a, la = hj.merge_states(parts)
  b, lb = hj.merge_states(parts[::-1])
  nested, ln = hj.merge_states([hj.merge_states(parts[:2]), parts[2]])
  assert a.dtype == jnp.bfloat16
  chex.assert_trees_all_close((a, la), (b, lb), rtol=1e-2, atol=1e-2)
  chex.assert_trees_all_close((a, la), (nested, ln), rtol=1e-2, atol=1e-2)


def test_merge_rejects_no_parts():
  with pytest.raises(ValueError, match="states"):
    hj.merge_states([])


def test_merge_rejects_parts_of_other_shapes():
  """Parts that would broadcast (another batch, an lse with an extra axis) are refused, not silently merged."""
  out, lse = jnp.ones((2, 3, 8)), jnp.zeros((2, 3))
  with pytest.raises(ValueError, match=r"part 1 has out \(1, 3, 8\) and lse \(1, 3\); expected out \(2, 3, 8\)"):
    hj.merge_states([(out, lse), (out[:1], lse[:1])])
  with pytest.raises(ValueError, match=r"part 1 has out \(2, 3, 8\) and lse \(2, 3, 1\);.*lse \(2, 3\)"):
    hj.merge_states([(out, lse), (out, lse[..., None])])


def test_merge_never_reads_an_empty_part():
  """An empty part (lse = -inf) contributes nothing, whatever its out holds (NaN or inf included)."""
  out, lse = jnp.full((2, 4), 2.0), jnp.array([0.5, -1.0])
  junk = (jnp.array([[jnp.nan] * 4, [jnp.inf] * 4]), jnp.full((2,), -jnp.inf))
  merged, merged_lse = hj.merge_states([junk, (out, lse)])
  chex.assert_trees_all_equal((merged, merged_lse), (out, lse))


# --- bad input ----------------------------------------------------------------------------------------------


def _ok():
  q = jnp.zeros((2, 1, 4, 64))
  k = jnp.zeros((2, 10, 2, 64))
  return q, k


def test_mosaic_off_a_hopper_gpu_runs_the_triton_kernels(monkeypatch):
  """backend="mosaic" takes the Hopper kernel except on a GPU that is not a Hopper (wgmma, TMA): Triton there, as
  documented."""
  from hydragen_jax import api  # noqa: PLC0415

  q = jnp.zeros((4, 1, 8, 64), jnp.bfloat16)
  prefix = Level(jnp.zeros((1, 16, 2, 64), jnp.bfloat16), jnp.zeros((1, 16, 2, 64), jnp.bfloat16), jnp.array([16]))
  suffix = Level(jnp.zeros((4, 8, 2, 64), jnp.bfloat16), jnp.zeros((4, 8, 2, 64), jnp.bfloat16), jnp.full((4,), 8))
  monkeypatch.setattr(api.hopper, "prefix_suffix_attention", lambda *a, **k: ["hopper parts"])
  parts = lambda: api._hopper_parts(q, [prefix, suffix], causal=[False, True], batched=[True, False],  # noqa: E731
                                    scale=0.125, backend="mosaic")
  monkeypatch.setattr(dispatch, "gpu_without_hopper", lambda: True)  # an A100, say
  assert parts() is None
  monkeypatch.setattr(dispatch, "gpu_without_hopper", lambda: False)  # a Hopper, or lowering for one from a CPU
  assert parts() == ["hopper parts"]


@pytest.mark.parametrize("case,match", [
    ("q_rank", r"q must have rank 4 .*\(2, 4, 64\)"),
    ("heads", r"Hq=4\) must be a multiple of the KV heads.*Hkv=3"),
    ("kv_dtype", r"dtype mismatch between k \(float32\) and v \(bfloat16\)"),
    ("kv_shape", r"k and v must have the same shape"),
    ("head_dim", r"head dim of q .*D=64.*D=32"),
    ("lengths_shape", r"kv_lengths must have shape \(2,\); got \(3,\)"),
    ("lengths_above", r"kv_lengths must lie in \[0, 10\].*max 11"),
    ("lengths_float", r"kv_lengths must be integer"),
    ("lengths_huge_list", r"kv_lengths must lie in \[0, 10\].*max 1099511627776"),  # past int32: not wrapped
    ("lengths_past_int64", r"kv_lengths must be integer; got \[1180591620717411303424, 1\]"),
    ("lengths_str", r"kv_lengths must have shape \(2,\); got \(\)"),
    ("lengths_float_list", r"kv_lengths must be integer; got dtype float64"),
    ("batch", r"batch of k .* differs from batch of q"),
    ("backend", r"backend='cuda' is not one of"),
    ("int_dtype", r"q must have a floating dtype of 16 bits or more \(float32, bfloat16, float16; float64 on "
                  r"backend='xla'\); got int32"),
    ("float8_dtype", r"q must have a floating dtype of 16 bits or more .*got float8_e4m3fn"),
    ("no_head_dim", r"head dim of q \(2, 1, 4, 0\) must be at least 1; got D=0"),
    ("no_kv_heads", r"k \(2, 10, 0, 64\) has no KV heads \(Hkv=0\); expected at least one"),
    ("scale_negative", r"scale must be a positive finite number, got -0.1"),
    ("scale_zero", r"scale must be a positive finite number, got 0.0"),
    ("scale_nan", r"scale must be a positive finite number, got nan"),
    ("scale_str", r"scale must be a positive number known at trace time \(a Python float\), got 'x'"),
    ("scale_tiny", r"scale=1e-40 is too small: scale·log2 e is not a normal float32"),
    ("scale_huge", r"scale=1e\+39 is too large: scale·log2 e overflows float32 \(at most 2.359e\+38\)"),
    ("scale_bool", r"scale must be a positive number known at trace time \(a Python float\), got True"),
    ("scale_numeric_str", r"scale must be a positive number known at trace time \(a Python float\), got '1'"),
    ("q_list", r"q must be an array of rank 4 \(\[B, T, Hq, D\]\); got list"),
    ("causal_str", r"causal must be a bool, got 'yes'"),
    ("v_list", r"v must be an array of k's shape \(2, 10, 2, 64\); got list"),
    ("checked_str", r"checked must be a bool, got 'no'"),
])
def test_attention_bad_input(case, match):
  q, k = _ok()
  kwargs = dict(q=q, k=k, v=k)
  if case == "q_rank":
    kwargs["q"] = q[:, 0]
  elif case == "heads":
    kwargs["k"] = kwargs["v"] = jnp.zeros((2, 10, 3, 64))
  elif case == "kv_dtype":
    kwargs["v"] = k.astype(jnp.bfloat16)
  elif case == "kv_shape":
    kwargs["v"] = k[:, :5]
  elif case == "head_dim":
    kwargs["k"] = kwargs["v"] = jnp.zeros((2, 10, 2, 32))
  elif case == "lengths_shape":
    kwargs["kv_lengths"] = jnp.array([1, 2, 3])
  elif case == "lengths_above":
    kwargs["kv_lengths"] = jnp.array([3, 11])
  elif case == "lengths_float":
    kwargs["kv_lengths"] = jnp.array([3.0, 1.0])
  elif case == "lengths_huge_list":
    kwargs["kv_lengths"] = [2**40, 1]
  elif case == "lengths_past_int64":
    kwargs["kv_lengths"] = [2**70, 1]
  elif case == "lengths_str":
    kwargs["kv_lengths"] = "ab"
  elif case == "lengths_float_list":
    kwargs["kv_lengths"] = [3.0, 1.0]
  elif case == "batch":
    kwargs["k"] = kwargs["v"] = jnp.zeros((3, 10, 2, 64))
  elif case == "backend":
    kwargs["backend"] = "cuda"
  elif case == "int_dtype":  # integers would be truncated on the way out, each backend differently
    kwargs = dict(q=q.astype(jnp.int32), k=k.astype(jnp.int32), v=k.astype(jnp.int32))
  elif case == "float8_dtype":  # every backend, 'xla' too (it failed inside JAX's type promotion)
    kwargs = dict(q=q.astype(jnp.float8_e4m3fn), k=k.astype(jnp.float8_e4m3fn), v=k.astype(jnp.float8_e4m3fn),
                  backend="xla")
  elif case == "no_head_dim":
    kwargs = dict(q=q[..., :0], k=k[..., :0], v=k[..., :0])
  elif case == "no_kv_heads":
    kwargs["k"] = kwargs["v"] = jnp.zeros((2, 10, 0, 64))
  elif case.startswith("scale_"):
    kwargs["scale"] = {"scale_negative": -0.1, "scale_zero": 0.0, "scale_nan": float("nan"), "scale_str": "x",
                       "scale_tiny": 1e-40, "scale_bool": True, "scale_numeric_str": "1", "scale_huge": 1e39}[case]
  elif case == "q_list":
    kwargs["q"] = np.asarray(q).tolist()
  elif case == "causal_str":
    kwargs["causal"] = "yes"
  elif case == "v_list":
    kwargs["v"] = np.asarray(k).tolist()
  elif case == "checked_str":  # a truthy string would stage checkify checks that jit then cannot run
    kwargs["checked"] = "no"
  with pytest.raises(ValueError, match=match):
    hj.attention(**kwargs)


def test_traced_scale_is_refused_by_name():
  """The kernels fold the scale into their exponents at trace time: a traced one is named, not a jax error."""
  q, k = _ok()
  with pytest.raises(ValueError, match=r"scale must be a positive number known at trace time"):
    jax.jit(lambda scale: hj.attention(q, k, k, scale=scale)[0])(0.5)


@pytest.mark.parametrize("dtype,scale", [
    pytest.param(dtype, scale, id=f"{scale}-{_dtype_id(dtype)}",
                 marks=() if (scale, dtype) in ((3.0, jnp.bfloat16), (0.03, jnp.float32)) else pytest.mark.slow)
    # CI: scale 3 in bfloat16 (where rounding q · scale in 16 bits hurt; float16 rounds the same way, --all), 0.03
    # in float32
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16) for scale in (0.03, 1.0, 3.0)])
def test_custom_scale_matches_reference(backend, dtype, scale):
  """A logit scale far from 1/sqrt(D) (large logits: nearly one-hot rows) as exact as the default's: the kernels
  scale the float32 scores, never a 16-bit copy of q (rounding q·scale back to bf16 gave 4x the reference's error at
  scale 3). Through `hydragen_attention` (D = 64, 16 rows a KV head), so `mosaic` runs its Hopper kernel too."""
  keys = jax.random.split(jax.random.PRNGKey(int(scale * 100)), 5)
  q = normal(keys[0], (4, 4, 8, 64), dtype)
  pk, pv = normal(keys[1], (40, 2, 64), dtype), normal(keys[2], (40, 2, 64), dtype)
  sk, sv = normal(keys[3], (4, 24, 2, 64), dtype), normal(keys[4], (4, 24, 2, 64), dtype)
  lengths = jnp.array([24, 7, 4, 19])
  out = hj.hydragen_attention(q, pk, pv, sk, sv, suffix_lengths=lengths, scale=scale, backend=backend)
  k = jnp.concatenate([jnp.broadcast_to(pk, (4, *pk.shape)), sk], axis=1)
  v = jnp.concatenate([jnp.broadcast_to(pv, (4, *pv.shape)), sv], axis=1)
  ref, _ = reference.attention(q.astype(jnp.float32), k, v, lengths + 40, causal=True, scale=scale)
  # float32: logits of ~scale·sqrt(D) amplify the arithmetic's rounding by as much in any order of summation (the
  # reference's own merge of two parts differs by that); 16 bits: their own tolerance, which q·scale rounded missed
  cond = max(1.0, scale * 64**0.5) if dtype == jnp.float32 else 1.0
  chex.assert_trees_all_close(out.astype(jnp.float32), ref, **{k: cond * x for k, x in tol(dtype).items()})


def test_tree_bad_input():
  q = jnp.zeros((3, 1, 4, 64))
  kv = jnp.zeros((2, 8, 2, 64))
  with pytest.raises(ValueError, match=r"levels\[0\].seq_to_node must have shape \(3,\).*got \(2,\)"):
    hj.tree_attention(q, [Level(kv, kv, jnp.array([8, 8]), jnp.array([0, 1]))])
  with pytest.raises(ValueError, match=r"levels\[0\].seq_to_node must lie in \[0, 2\).*max 2"):
    hj.tree_attention(q, [Level(kv, kv, jnp.array([8, 8]), jnp.array([0, 1, 2]))])
  with pytest.raises(ValueError, match=r"levels\[0\].seq_to_node is None.*2 nodes.*3 sequences"):
    hj.tree_attention(q, [Level(kv, kv, jnp.array([8, 8]))])
  with pytest.raises(ValueError, match=r"levels\[0\].lengths must lie in \[0, 8\]"):
    hj.tree_attention(q, [Level(kv, kv, jnp.array([9, 8]), jnp.array([0, 1, 1]))])
  with pytest.raises(ValueError, match="levels is empty"):
    hj.tree_attention(q, [])
  with pytest.raises(ValueError, match=r"levels must be a sequence of Level.*got one Level: pass \[level\]"):
    hj.tree_attention(q, Level(kv, kv, jnp.array([8, 8]), jnp.array([0, 1, 1])))
  root = Level(kv, kv, jnp.array([8, 8]), jnp.array([0, 1, 1]))
  for bad, what in (("x", "str"), ((jnp.zeros((3, 5, 2, 64)),) * 2 + (jnp.array([5, 2, 0]),), "tuple")):
    with pytest.raises(ValueError, match=rf"levels\[1\] must be a Level\(k, v, lengths, .*\); got {what}"):
      hj.tree_attention(q, [root, bad])


def test_hydragen_bad_input():
  q = jnp.zeros((2, 1, 4, 64))
  pk = jnp.zeros((5, 2, 64))
  sk = jnp.zeros((2, 6, 2, 64))
  with pytest.raises(ValueError, match=r"prefix_k must have rank 3 \(\[P, Hkv, D\]\)"):
    hj.hydragen_attention(q, pk[None], pk[None], sk, sk)
  with pytest.raises(ValueError, match=r"dtype mismatch between prefix_k \(float32\) and prefix_v \(bfloat16\)"):
    hj.hydragen_attention(q, pk, pk.astype(jnp.bfloat16), sk, sk)
  with pytest.raises(ValueError, match=r"prefix_length must lie in \[0, 5\]"):
    hj.hydragen_attention(q, pk, pk, sk, sk, prefix_length=6)
  with pytest.raises(ValueError, match=r"batch of suffix_k \(3, 6, 2, 64\) differs from batch of q"):
    hj.hydragen_attention(q, pk, pk, jnp.zeros((3, 6, 2, 64)), jnp.zeros((3, 6, 2, 64)))
  with pytest.raises(ValueError, match=r"prefix_k \(5, 2, 64\) and suffix_k \(2, 6, 4, 64\) must share"):
    hj.hydragen_attention(q, pk, pk, jnp.zeros((2, 6, 4, 64)), jnp.zeros((2, 6, 4, 64)))
  with pytest.raises(ValueError, match=r"batch_prefix must be a bool, got 'no'"):
    hj.hydragen_attention(q, pk, pk, sk, sk, batch_prefix="no")
  with pytest.raises(ValueError, match=r"checked must be a bool, got 'no'"):
    hj.hydragen_attention(q, pk, pk, sk, sk, checked="no")
  with pytest.raises(ValueError, match=r"prefix_v must be an array of prefix_k's shape \(5, 2, 64\); got list"):
    hj.hydragen_attention(q, pk, np.asarray(pk).tolist(), sk, sk)
  with pytest.raises(ValueError, match=r"suffix_v must be an array of suffix_k's shape \(2, 6, 2, 64\); got list"):
    hj.hydragen_attention(q, pk, pk, sk, np.asarray(sk).tolist())
  with pytest.raises(ValueError, match=r"levels\[0\].v must be an array of levels\[0\].k's shape"):
    hj.tree_attention(q, [hj.Level(sk, np.asarray(sk).tolist(), jnp.array([6, 6]))])
  with pytest.raises(ValueError, match=r"checked must be a bool, got 1"):
    hj.tree_attention(q, [hj.Level(sk, sk, jnp.array([6, 6]))], checked=1)


def test_kernel_backends_name_float64_inputs_and_64_bit_mode():
  """With jax_enable_x64, float64 inputs run on "xla" (in float64) and are refused by name on the kernels, which
  are 16- and 32-bit; "interpret-mosaic" names the 64-bit mode itself (its interpreter runs the kernel in it)."""
  with jax.enable_x64(True):
    q, k = jnp.zeros((2, 1, 4, 16), jnp.float64), jnp.zeros((2, 8, 2, 16), jnp.float64)
    assert hj.attention(q, k, k, backend="xla")[0].dtype == jnp.float64
    with pytest.raises(ValueError, match=r"backend='interpret' runs the Pallas kernels, which take float32, "
                                         r"bfloat16 or float16; got q float64"):
      hj.attention(q, k, k, backend="interpret")
    q, k = q.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
    with pytest.raises(ValueError, match=r"backend='interpret-mosaic' does not run with jax_enable_x64 on"):
      hj.hydragen_attention(q, k[0], k[0], k, k, backend="interpret-mosaic")


def _attention_f64(q, k, v, lengths):
  """Plain attention in numpy float64 over each sequence's first lengths[b] keys (no mask beyond them)."""
  b, t, hq, d = q.shape
  g = hq // k.shape[2]
  out, lse = np.zeros(q.shape), np.zeros(q.shape[:-1])
  for i in range(b):
    kk, vv = np.repeat(k[i, :lengths[i]], g, axis=1), np.repeat(v[i, :lengths[i]], g, axis=1)  # [S, Hq, D]
    s = np.einsum("thd,shd->ths", q[i], kk) / np.sqrt(d)
    m = s.max(-1, keepdims=True)
    w = np.exp(s - m)
    out[i] = np.einsum("ths,shd->thd", w / w.sum(-1, keepdims=True), vv)
    lse[i] = (m[..., 0] + np.log(w.sum(-1)))
  return out, lse


def test_float64_inputs_are_computed_in_float64():
  """Under jax_enable_x64, float64 inputs on "xla" give float64 accuracy (not float32's rounding in a float64
  array): attention, the Hydragen split and its merge against numpy float64, to 1e-12."""
  rng = np.random.default_rng(5)
  b, hq, hkv, d, p, s = 3, 4, 2, 16, 7, 5
  q = rng.standard_normal((b, 1, hq, d))
  pk, pv = rng.standard_normal((p, hkv, d)), rng.standard_normal((p, hkv, d))
  sk, sv = rng.standard_normal((b, s, hkv, d)), rng.standard_normal((b, s, hkv, d))
  lengths = np.array([5, 1, 3])
  full_k = np.concatenate([np.broadcast_to(pk, (b, p, hkv, d)), sk], axis=1)
  full_v = np.concatenate([np.broadcast_to(pv, (b, p, hkv, d)), sv], axis=1)
  want, want_lse = _attention_f64(q, full_k, full_v, p + lengths)
  with jax.enable_x64(True):
    out, lse = hj.attention(jnp.asarray(q), jnp.asarray(full_k), jnp.asarray(full_v), kv_lengths=p + lengths,
                            backend="xla")
    assert out.dtype == lse.dtype == jnp.float64
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12, atol=1e-12)
    split = hj.hydragen_attention(*map(jnp.asarray, (q, pk, pv, sk, sv)), suffix_lengths=lengths, backend="xla")
    assert split.dtype == jnp.float64
    np.testing.assert_allclose(split, want, rtol=1e-12, atol=1e-12)
    # two parts whose lse differ by 1e-12: the merge keeps that difference
    o1, o2 = jnp.asarray(rng.standard_normal((2, 8))), jnp.asarray(rng.standard_normal((2, 8)))
    l1 = jnp.asarray([0.3, -1.0])
    merged, mlse = hj.merge_states([(o1, l1), (o2, l1 + 1e-12)])
    w2 = 1 / (1 + np.exp(-1e-12))
    np.testing.assert_allclose(merged, (1 - w2) * np.asarray(o1) + w2 * np.asarray(o2), rtol=1e-14, atol=1e-14)
    assert mlse.dtype == jnp.float64
  # without the 64-bit mode nothing changes: float32 in, float32 lse
  out32, lse32 = hj.attention(jnp.asarray(q, jnp.float32), jnp.asarray(full_k, jnp.float32),
                              jnp.asarray(full_v, jnp.float32), kv_lengths=p + lengths, backend="xla")
  assert out32.dtype == lse32.dtype == jnp.float32


def test_default_backend_is_xla_on_cpu_and_pallas_on_gpu():
  assert hj.default_backend() == ("pallas" if jax.default_backend() == "gpu" else "xla")
  assert set(hj.BACKENDS) == {"pallas", "triton", "mosaic", "interpret", "interpret-mosaic", "xla"}


@pytest.mark.mosaic_falls_back
def test_layered_levels_read_one_layer_in_place(backend):
  """Level(layer=i) over k/v [layers, N, L, Hkv, D] equals the level built from the slice k[i]."""
  keys = jax.random.split(jax.random.PRNGKey(14), 4)
  layers, b, hq, hkv, d = 3, 4, 8, 2, 64
  q = normal(keys[0], (b, 1, hq, d), jnp.float32)
  shared = random_level(keys[1], 2, 25, [25, 9], [0, 1, 1, 0], hkv, d, jnp.float32)
  leaf = random_level(keys[2], b, 10, [10, 3, 6, 1], None, hkv, d, jnp.float32)
  stack = lambda x, key: jnp.stack([x, normal(key, x.shape, x.dtype), x * 0.5])
  ks = jax.random.split(keys[3], 4)
  layered = [Level(stack(lv.k, ks[2 * i]), stack(lv.v, ks[2 * i + 1]), lv.lengths, lv.seq_to_node,
                   layer=jnp.int32(2)) for i, lv in enumerate([shared, leaf])]
  sliced = [Level(lv.k[2], lv.v[2], lv.lengths, lv.seq_to_node) for lv in layered]
  f = jax.jit(lambda q, levels: hj.tree_attention(q, levels, backend=backend))
  chex.assert_trees_all_close(f(q, layered), expected_tree(q, sliced), **tol(jnp.float32))
  # a layered level of capacity 0 (no keys): as without it (the view as [layers·N, ...] failed to infer its rows)
  empty = Level(jnp.zeros((layers, 2, 0, hkv, d)), jnp.zeros((layers, 2, 0, hkv, d)), jnp.zeros((2,), jnp.int32),
                jnp.array([0, 1, 1, 0]), layer=jnp.int32(1))
  chex.assert_trees_all_close(f(q, [empty, layered[1]]), expected_tree(q, sliced[1:]), **tol(jnp.float32))
  with pytest.raises(ValueError, match=r"levels\[0\].layer must lie in \[0, 3\).*got 3"):
    hj.tree_attention(q, [dataclasses.replace(layered[0], layer=jnp.int32(3)), layered[1]], backend=backend)
  with pytest.raises(ValueError, match=r"levels\[0\].layer must lie in \[0, 3\).*got 1099511627776"):  # not an
    hj.tree_attention(q, [dataclasses.replace(layered[0], layer=2**40), layered[1]], backend=backend)  # OverflowError
  with pytest.raises(ValueError, match=r"levels\[0\].k must have rank 5 \(\[num_layers, N, L, Hkv, D\]\)"):
    hj.tree_attention(q, [dataclasses.replace(shared, layer=jnp.int32(0)), leaf], backend=backend)


@pytest.mark.mosaic_falls_back
def test_numpy_float64_inputs_are_float32_on_every_backend(backend):
  """Without jax_enable_x64 JAX computes numpy float64 arrays as float32: every backend takes them so, mixed with
  float32 ones too, with no warning (the kernel backends refused them, xla warned of a float64 cast)."""
  rng = np.random.default_rng(3)
  q, k, v = (rng.standard_normal(shape) for shape in ((2, 1, 4, 64), (2, 5, 2, 64), (2, 5, 2, 64)))
  want, _ = hj.attention(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), backend=backend)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    for args in ((q, k, v), (q, jnp.asarray(k, jnp.float32), v)):
      out, _ = hj.attention(*args, backend=backend)
      assert out.dtype == jnp.float32
      chex.assert_trees_all_close(out, want, **tol(jnp.float32))


def test_levels_must_agree_on_kv_heads():
  q = jnp.zeros((2, 1, 4, 64))
  with pytest.raises(ValueError, match=r"levels\[1\].k .* has Hkv=4 KV heads but levels\[0\].k .* has 2"):
    hj.tree_attention(q, [Level(jnp.zeros((1, 5, 2, 64)), jnp.zeros((1, 5, 2, 64)), jnp.array([5]),
                                jnp.zeros(2, jnp.int32)),
                          Level(jnp.zeros((2, 3, 4, 64)), jnp.zeros((2, 3, 4, 64)), jnp.array([3, 3]))])


def test_max_group_may_be_a_numpy_integer(kernel_backend):
  """Level.max_group as numpy computes it (np.bincount(...).max() is a numpy integer) works on every backend."""
  keys = jax.random.split(jax.random.PRNGKey(16), 3)
  nodes = np.array([0, 1, 1, 1], np.int32)
  q = normal(keys[0], (4, 1, 4, 64), jnp.float32)
  shared = dataclasses.replace(random_level(keys[1], 2, 8, [8, 5], nodes, 2, 64, jnp.float32),
                               max_group=np.bincount(nodes).max())
  leaf = random_level(keys[2], 4, 8, [8, 3, 1, 6], None, 2, 64, jnp.float32)
  chex.assert_trees_all_close(hj.tree_attention(q, [shared, leaf], backend=kernel_backend),
                              expected_tree(q, [shared, leaf]), **tol(jnp.float32))


def test_static_tree_is_grouped_on_the_host(kernel_backend):
  """A numpy seq_to_node (a tree known when tracing) gives the same result as a traced one, and the step then has
  no device work to group the sequences (no sort)."""
  keys = jax.random.split(jax.random.PRNGKey(15), 3)
  b, hq, hkv, d = 6, 8, 2, 64
  q = normal(keys[0], (b, 1, hq, d), jnp.float32)
  nodes = np.array([2, 0, 2, 1, 0, 2], np.int32)
  shared = random_level(keys[1], 3, 24, [24, 7, 13], nodes, hkv, d, jnp.float32)
  leaf = random_level(keys[2], b, 8, [8, 3, 1, 6, 2, 5], None, hkv, d, jnp.float32)
  f = lambda q, levels, nodes: hj.tree_attention(  # noqa: E731
      q, [dataclasses.replace(levels[0], seq_to_node=nodes), levels[1]], backend=kernel_backend)
  traced = jax.jit(f)
  static = jax.jit(lambda q, levels: f(q, levels, nodes))
  chex.assert_trees_all_close(static(q, [shared, leaf]), traced(q, [shared, leaf], jnp.asarray(nodes)),
                              **tol(jnp.float32))
  chex.assert_trees_all_close(static(q, [shared, leaf]), expected_tree(q, [shared, leaf]), **tol(jnp.float32))
  assert "sort" in str(jax.make_jaxpr(traced)(q, [shared, leaf], jnp.asarray(nodes)))
  assert "sort" not in str(jax.make_jaxpr(static)(q, [shared, leaf]))


# (tuning, shared memory limit, whether the count is exact there: False keeps room for the scores, as off a Hopper)
SHARED_MEMORY_CASES = [("device", "device", True), ("NVIDIA H100 80GB HBM3", "device", True),
                       ("device", 99 << 10, True), ("NVIDIA H100 80GB HBM3", 163 << 10, False)]


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("tuning_kind,limit,exact", SHARED_MEMORY_CASES, ids=lambda x: str(x).replace(" ", "_"))
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=lambda d: jnp.dtype(d).name)
def test_long_levels_fit_the_shared_memory(monkeypatch, dtype, d, tuning_kind, limit, exact):
  """Compiled, the tiles the tuning gives to levels long enough to use them whole (128 query rows a KV head, a
  level alone and a prefix beside its suffixes, every dtype, D up to 256) fit the GPU's shared memory, also under
  the H100's tuning and under the smaller limits of an A100 (163 KB, with the margin of a GPU not measured) or an
  sm_89 card (99 KB), simulated: every launch's tiles within the limit by the count, compiled and exact."""
  if limit != "device":
    monkeypatch.setattr(ops, "shared_memory_limit", lambda: limit)
  monkeypatch.setattr(ops, "_measured_layout", lambda: exact)
  bound = ops.shared_memory_limit()
  launched = []

  def record(q, works, *, specs, **kw):
    launched.extend(spec.block for spec in specs)
    return fused_levels(q, works, specs=specs, **kw)

  fused_levels = ops.fused_levels
  monkeypatch.setattr(ops, "fused_levels", record)
  tune = tuning.current() if tuning_kind == "device" else tuning.for_device_kind(tuning_kind)
  keys = jax.random.split(jax.random.PRNGKey(d), 8)
  with tuning.override(tune):
    q = normal(keys[0], (2, 32, 8, d), dtype)  # T·g = 128 rows a KV head
    k, v = normal(keys[1], (2, 301, 2, d), dtype), normal(keys[2], (2, 301, 2, d), dtype)
    lengths = jnp.array([301, 257])
    out, _ = hj.attention(q, k, v, kv_lengths=lengths, causal=True, backend="triton")
    ref, _ = reference.attention(q.astype(jnp.float32), k, v, lengths, causal=True, scale=d**-0.5)
    chex.assert_trees_all_close(out.astype(jnp.float32), ref, **tol(dtype))
    qs = normal(keys[3], (8, 4, 8, d), dtype)  # a prefix of 128 rows a KV head beside 8 suffixes
    prefix = random_level(keys[4], 1, 300, [300], [0] * 8, 2, d, dtype)
    suffix = random_level(keys[5], 8, 200, [200, 7, 190, 64, 5, 129, 33, 100], None, 2, d, dtype)
    out = hj.tree_attention(qs, [prefix, suffix], backend="triton")
    chex.assert_trees_all_close(out.astype(jnp.float32), expected_tree(qs, [prefix, suffix]), **tol(dtype))
  itemsize = jnp.dtype(dtype).itemsize
  assert len(launched) == 3 and all(ops.tile_shared_memory(b, d, itemsize, exact) <= bound for b in launched)


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the refusal off a GPU")
@pytest.mark.parametrize("backend", dispatch.COMPILED_BACKENDS)
def test_compiled_backends_are_refused_off_a_gpu_unless_lowering_for_one(backend):
  """On a CPU a compiled backend is refused by name before any work (it used to fail inside Pallas' lowering with
  "Only interpret mode is supported on CPU backend"); inside `lowering_for_gpu` it traces, for a lowering for CUDA
  (the Hopper kernel's, which lowers without a GPU), and the refusal comes back after the block."""
  q, k = _ok()
  with pytest.raises(ValueError, match=rf"backend='{backend}' runs compiled GPU kernels, and the default device is "
                                       r"'cpu': take 'interpret'"):
    hj.attention(q, k, k, backend=backend)
  b, p, s, heads, d = 16, 1024, 64, 8, 128
  q = jax.ShapeDtypeStruct((b, 1, heads, d), jnp.bfloat16)
  pkv = jax.ShapeDtypeStruct((p, heads, d), jnp.bfloat16)
  skv = jax.ShapeDtypeStruct((b, s, heads, d), jnp.bfloat16)
  step = jax.jit(lambda *a: hj.hydragen_attention(*a, backend=backend))
  with hj.lowering_for_gpu():
    traced = step.trace(q, pkv, pkv, skv, skv)
  if backend == "mosaic":
    assert "mosaic_gpu" in traced.lower(lowering_platforms=("cuda",)).as_text()
  with pytest.raises(ValueError, match=r"runs compiled GPU kernels"):
    jax.jit(lambda *a: hj.hydragen_attention(*a, backend=backend)).trace(q, pkv, pkv, skv, skv)


class _FakeGpuDevice:  # what hydragen_jax.devices reads of a device ('Device' in the name: jax.default_device takes it)
  platform, device_kind, compute_capability, core_count = "gpu", "NVIDIA H200", "9.0", 132


def test_the_default_device_decides_backend_limits_and_tuning_not_the_machine(monkeypatch):
  """Jitted calls of uncommitted arrays run on `jax.default_device`'s device where one is set: it decides the default
  backend (and the decode GEMM's), the refusal of the compiled ones, the compute capability and SMs the kernels are
  cut to, and the tuning file; all of them together. A GPU machine is pretended (`jax.devices()` patched): its
  default device gives "pallas", 9.0, 132 SMs and the H200's file; `default_device(cpu)` (a device or "cpu") gives
  the CPU's everywhere (the backend was chosen by the machine, "pallas", which then failed in Pallas' lowering); a
  GPU set as the default device on a machine whose default backend is the CPU gives the GPU's everywhere."""
  from hydragen_jax import devices
  from hydragen_jax.kernels import ops as kernel_ops
  from models import gemm
  real = jax.devices
  gpu = _FakeGpuDevice()
  on = tuning.resolve(None)
  on = dataclasses.replace(on, gemm=dataclasses.replace(on.gemm, min_rows=1, max_rows=128))  # the GEMM kernel on

  def looks(kind):
    assert devices.default_platform() == kind
    assert hj.default_backend() == dispatch.resolve_backend(None) == ("pallas" if kind == "gpu" else "xla")
    assert gemm.default_backend(64, on) == ("pallas" if kind == "gpu" else "xla")
    assert kernel_ops.gpu_capability() == ("9.0" if kind == "gpu" else None)
    assert tuning.device_kind() == ("NVIDIA H200" if kind == "gpu" else "cpu")
    assert kernel_ops.num_cores() == (132 if kind == "gpu" else tuning.resolve(None).num_cores)
    if kind == "cpu":
      with pytest.raises(ValueError, match=r"backend='pallas' runs compiled GPU kernels, and the default device is "
                                           r"'cpu'"):
        dispatch.resolve_backend("pallas")
    else:
      assert dispatch.resolve_backend("pallas") == "pallas"

  monkeypatch.setattr(jax, "devices", lambda backend=None: [gpu] if backend in (None, "gpu") else real(backend))
  looks("gpu")
  for cpu in (real("cpu")[0], "cpu"):
    with jax.default_device(cpu):
      looks("cpu")
      q, k = (normal(jax.random.key(i), x.shape, jnp.float32) for i, x in enumerate(_ok()))  # and a call runs: on
      chex.assert_trees_all_close(hj.attention(q, k, k)[0], hj.attention(q, k, k, backend="xla")[0])  # the CPU
  monkeypatch.setattr(jax, "devices", lambda backend=None: real(backend) if backend != "gpu" else [gpu])
  looks("cpu")
  with jax.default_device(gpu):
    looks("gpu")


@pytest.mark.parametrize("backend", ["interpret", pytest.param("interpret-mosaic", marks=pytest.mark.slow)])  # its
def test_gradients_through_the_kernels_are_refused_by_name(backend):  # shapes are not the Hopper kernel's: Triton
  """The kernels define no derivative: jax.grad through a kernel backend raises a ValueError naming it (Pallas
  failed with a bare AssertionError inside its own rules), with respect to q or to the caches, through
  hydragen_attention, attention and tree_attention_append; "xla" differentiates, and the forward pass is unchanged."""
  b, p, s, heads, d = 2, 8, 8, 4, 16
  q, pk, sk = (normal(jax.random.key(i), shape, jnp.float32)
               for i, shape in enumerate([(b, 1, heads, d), (p, 2, d), (b, s, 2, d)]))
  lengths = jnp.array([3, 5])
  fns = {"hydragen": lambda q, k, be: hj.hydragen_attention(q, pk, pk, k, k, suffix_lengths=lengths, backend=be),
         "attention": lambda q, k, be: hj.attention(q, k, k, kv_lengths=lengths, backend=be)[0],
         "append": lambda q, k, be: hj.tree_attention_append(q, [Level(k, k, lengths)], q[:, :, :2], q[:, :, :2],
                                                             backend=be)[0]}
  for name, fn in fns.items():
    for argnum in (0, 1):
      loss = lambda q, k, be: jnp.sum(fn(q, k, be) ** 2)  # noqa: E731
      with pytest.raises(ValueError, match=rf"backend='{backend}' runs kernels that define no derivative"):
        jax.grad(loss, argnums=argnum)(q, sk, backend)
  jax.test_util.check_grads(lambda q, k: fns["hydragen"](q, k, "xla"), (q, sk), order=1, modes=["rev"],
                            atol=1e-2, rtol=1e-2)  # against finite differences
  chex.assert_trees_all_close(fns["hydragen"](q, sk, backend), fns["hydragen"](q, sk, "xla"), rtol=1e-5, atol=1e-5)


def test_a_traced_flag_says_to_make_it_static():
  """jax.jit(hj.attention)(..., causal=True) traces the flag: the error names it and says how to pass it (it said
  only "causal must be a bool, got JitTracer(bool[])")."""
  q, k = (normal(jax.random.key(i), (1, 1, 2, 8), jnp.float32) for i in range(2))
  with pytest.raises(ValueError, match=r"causal must be a bool, got .*Tracer.*pass it as a static argument \(e\.g\. "
                                       r"jax\.jit\(fn, static_argnames='causal'\)"):
    jax.jit(hj.attention)(q, k, k, causal=True)
  assert jax.jit(hj.attention, static_argnames="causal")(q, k, k, causal=True)[0].shape == q.shape


def _plain64(q, k, v, visible):
  """Softmax attention in float64 over the keys `visible` `[B, T, S]` (0 where a query sees none): the oracle of the
  derivatives below."""
  b, t, hq, d = q.shape
  hkv = k.shape[2]
  qg = q.astype(jnp.float64).reshape(b, t, hkv, hq // hkv, d)
  logits = jnp.einsum("bthgd,bshd->bthgs", qg, k.astype(jnp.float64)) / np.sqrt(d)
  mask = visible[:, :, None, None, :]
  logits = jnp.where(mask, logits, -jnp.inf)
  m = jnp.where(jnp.any(mask, -1), jnp.max(logits, -1), 0.0)
  w = jnp.where(mask, jnp.exp(logits - m[..., None]), 0.0)
  probs = w / jnp.maximum(jnp.sum(w, -1, keepdims=True), 1e-300)
  return jnp.einsum("bthgs,bshd->bthgd", probs, v.astype(jnp.float64)).reshape(b, t, hq, d)


def test_xla_derivatives_with_empty_parts_and_non_finite_tails_are_finite_and_exact():
  """On "xla": forward-mode (jvp) and second derivatives where one part of a query's keys is empty (a suffix of
  length 0 beside the prefix, a query that sees nothing) were NaN (the logsumexp of an all -inf row, times the
  merge's weight 0); the gradient with respect to q was NaN where a cache held NaN past its length (a masked logit
  of a NaN key). Now finite and equal to float64 plain attention over the concatenated keys."""
  with jax.enable_x64(True):
    b, p, s, d = 2, 5, 4, 8
    q, pk, pv, sk, sv = (normal(jax.random.key(i), shape, jnp.float32) for i, shape in
                         enumerate([(b, 1, 4, d), (p, 2, d), (p, 2, d), (b, s, 2, d), (b, s, 2, d)]))
    lengths = jnp.array([3, 0])
    sk_bad = sk.at[:, 3:].set(jnp.nan).at[1].set(jnp.inf)  # past each sequence's length only
    fn = lambda q, sk: hj.hydragen_attention(q, pk, pv, sk, sv, suffix_lengths=lengths, backend="xla")  # noqa: E731

    def want(q, sk):
      k = jnp.concatenate([jnp.broadcast_to(pk, (b, p, 2, d)), sk], 1)
      v = jnp.concatenate([jnp.broadcast_to(pv, (b, p, 2, d)), sv], 1)
      visible = (jnp.arange(p + s)[None, :] < p + lengths[:, None])[:, None, :]
      return _plain64(q, k, v, visible)

    dq = normal(jax.random.key(9), q.shape, jnp.float32)
    got_t = jax.jvp(lambda q: fn(q, sk), (q,), (dq,))[1]
    want_t = jax.jvp(lambda q: want(q, sk), (q,), (dq,))[1]
    assert np.isfinite(np.asarray(got_t)).all()
    np.testing.assert_allclose(np.asarray(got_t, np.float64), np.asarray(want_t), rtol=1e-4, atol=1e-5)
    loss = lambda f: (lambda q: jnp.sum(f(q) ** 2))  # noqa: E731
    hvp = jax.jvp(jax.grad(loss(lambda q: fn(q, sk))), (q,), (dq,))[1]
    want_hvp = jax.jvp(jax.grad(loss(lambda q: want(q, sk))), (q,), (dq,))[1]
    np.testing.assert_allclose(np.asarray(hvp, np.float64), np.asarray(want_hvp), rtol=1e-3, atol=1e-4)
    g_bad = jax.grad(loss(lambda q: fn(q, sk_bad)))(q)
    np.testing.assert_allclose(np.asarray(g_bad), np.asarray(jax.grad(loss(lambda q: fn(q, sk)))(q)), rtol=1e-6)
    # a query that sees no key at all: output 0, tangent 0
    empty = lambda q: hj.attention(q, sk, sv, kv_lengths=jnp.array([0, 2]), backend="xla")[0]  # noqa: E731
    t = jax.jvp(empty, (q,), (dq,))[1]
    assert np.isfinite(np.asarray(t)).all() and not np.asarray(t[0]).any()
