"""Traced lengths and indices out of range: every backend clamps them (no read outside the caches), and the opt-in
checked mode (`checked=True` under `checkify.checkify`) reports them instead.

On the GPU these run the compiled kernels: an out-of-bounds read there kills the CUDA context, so each test ends
with an in-range call that must still work.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import hydragen_jax as hj
from hydragen_jax import Level
from models import init_random, prefill
from models.cache import advance, make_attend
from models.config import LlamaConfig
from tests.attention_cases import expected_tree, normal, random_level, tol

# bf16, D = 64, T·g = 4, capacities multiples of 8: the Hopper kernel's case ("mosaic", "interpret-mosaic"); the
# other kernel backends run the same shapes on the Triton kernels.
B, T, HQ, HKV, D, P, S = 3, 1, 8, 2, 64, 24, 16
DTYPE = jnp.bfloat16


def _step_inputs(seed: int):
  keys = jax.random.split(jax.random.key(seed), 5)
  return (normal(keys[0], (B, T, HQ, D), DTYPE), normal(keys[1], (P, HKV, D), DTYPE),
          normal(keys[2], (P, HKV, D), DTYPE), normal(keys[3], (B, S, HKV, D), DTYPE),
          normal(keys[4], (B, S, HKV, D), DTYPE))


def _assert_close(out, expected):
  out = out.astype(jnp.float32)
  assert bool(jnp.isfinite(out).all())
  chex.assert_trees_all_close(out, expected.astype(jnp.float32), **tol(DTYPE))


@pytest.mark.parametrize("prefix_length,suffix_lengths", [
    (P + 7, [5, 100000, -3]),
    (-1, [S + 1, 0, 2**31 - 1]),
], ids=["above", "negative"])
def test_hydragen_clamps_traced_lengths(backend, prefix_length, suffix_lengths):
  q, pk, pv, sk, sv = _step_inputs(0)
  f = jax.jit(functools.partial(hj.hydragen_attention, backend=backend))
  out = f(q, pk, pv, sk, sv, prefix_length=jnp.int32(prefix_length), suffix_lengths=jnp.array(suffix_lengths))
  clamped_prefix = int(np.clip(prefix_length, 0, P))
  clamped = np.clip(suffix_lengths, 0, S)
  levels = [Level(pk[None], pv[None], jnp.array([clamped_prefix]), jnp.zeros(B, jnp.int32)),
            Level(sk, sv, jnp.asarray(clamped))]
  _assert_close(out, expected_tree(q, levels))
  # The same clamped values given in range give the same answer, and the process still works afterwards.
  in_range = f(q, pk, pv, sk, sv, prefix_length=jnp.int32(clamped_prefix), suffix_lengths=jnp.asarray(clamped))
  chex.assert_trees_all_close(out.astype(jnp.float32), in_range.astype(jnp.float32), **tol(DTYPE))


@pytest.mark.mosaic_falls_back
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention_clamps_traced_kv_lengths(backend, causal):
  q, _, _, sk, sv = _step_inputs(1)
  f = jax.jit(functools.partial(hj.attention, causal=causal, backend=backend))
  out, lse = f(q, sk, sv, kv_lengths=jnp.array([S + 40, -7, 9]))
  ref_out, ref_lse = hj.attention(q, sk, sv, kv_lengths=jnp.array([S, 0, 9]), causal=causal, backend="xla")
  _assert_close(out, ref_out)
  assert bool(jnp.all(jnp.isneginf(lse[1])))  # a length clamped to 0: the empty row
  chex.assert_trees_all_close(jnp.where(jnp.isfinite(ref_lse), lse, 0), jnp.where(jnp.isfinite(ref_lse), ref_lse, 0),
                              **tol(DTYPE))


@pytest.mark.mosaic_falls_back
@pytest.mark.parametrize("batch_shared", [True, False], ids=["batched", "per_seq"])
def test_tree_clamps_traced_node_and_layer_indices(backend, batch_shared):
  """seq_to_node outside [0, N) reads node 0 or N - 1; a layer index outside [0, L) reads layer 0 or L - 1."""
  keys = jax.random.split(jax.random.key(2), 6)
  q = normal(keys[0], (B, T, HQ, D), DTYPE)
  root = random_level(keys[1], 1, 16, [16], [0] * B, HKV, D, DTYPE)
  mid = random_level(keys[2], 2, 8, [8, 5], [0, 1, 1], HKV, D, DTYPE)
  leaf = random_level(keys[3], B, 8, [3, 8, 1], None, HKV, D, DTYPE)
  layers = 3
  stacked = [Level(jnp.stack([lv.k * (i + 1) / layers for i in range(layers)]),
                   jnp.stack([lv.v * (layers - i) / layers for i in range(layers)]),
                   lv.lengths, lv.seq_to_node) for lv in (root, mid, leaf)]
  f = jax.jit(lambda q, levels: hj.tree_attention(q, levels, backend=backend, batch_shared=batch_shared))
  bad = [Level(stacked[0].k, stacked[0].v, jnp.array([99]), jnp.array([5, -2, 0]), layer=jnp.int32(-4)),
         Level(stacked[1].k, stacked[1].v, jnp.array([-1, 5]), jnp.array([7, 1, -3]), layer=jnp.int32(2)),
         Level(stacked[2].k, stacked[2].v, jnp.array([3, 800, -8]), None, layer=jnp.int32(17))]
  out = f(q, bad)
  expected = [Level(stacked[0].k[0], stacked[0].v[0], jnp.array([16]), jnp.array([0, 0, 0])),
              Level(stacked[1].k[2], stacked[1].v[2], jnp.array([0, 5]), jnp.array([1, 1, 0])),
              Level(stacked[2].k[2], stacked[2].v[2], jnp.array([3, 8, 0]), None)]
  _assert_close(out, expected_tree(q, expected))
  # In range afterwards: still works.
  _assert_close(f(q, [dataclasses.replace(lv, layer=jnp.int32(0)) for lv in stacked]),
                expected_tree(q, [Level(lv.k[0], lv.v[0], lv.lengths, lv.seq_to_node) for lv in stacked]))


def test_checked_mode_names_the_argument_and_value(backend):
  q, pk, pv, sk, sv = _step_inputs(3)
  f = checkify.checkify(jax.jit(functools.partial(hj.hydragen_attention, backend=backend, checked=True)))
  err, _ = f(q, pk, pv, sk, sv, prefix_length=jnp.int32(P), suffix_lengths=jnp.array([5, 100000, -3]))
  with pytest.raises(checkify.JaxRuntimeError,
                     match=r"suffix_lengths must lie in \[0, 16\] \(the KV capacity\); got 100000 at index 1"):
    err.throw()
  if backend == "interpret-mosaic":  # the checks run before any kernel, alike for every backend; the Hopper
    return  # kernel's interpreter takes ~10 s a call, so it runs the one above (checkify around its kernel) only
  err, _ = f(q, pk, pv, sk, sv, prefix_length=jnp.int32(P + 7), suffix_lengths=jnp.array([5, 1, 3]))
  with pytest.raises(checkify.JaxRuntimeError, match=r"prefix_length must lie in \[0, 24\].*got 31\. \(`check` failed\)"):
    err.throw()
  err, out = f(q, pk, pv, sk, sv, prefix_length=jnp.int32(P), suffix_lengths=jnp.array([5, 1, 3]))
  err.throw()  # in range: no error, and the same answer as unchecked
  chex.assert_trees_all_close(out, hj.hydragen_attention(q, pk, pv, sk, sv, suffix_lengths=jnp.array([5, 1, 3]),
                                                         backend=backend))


def test_checked_mode_covers_nodes_layers_and_kv_lengths():
  q, _, _, sk, sv = _step_inputs(4)
  attention = checkify.checkify(jax.jit(functools.partial(hj.attention, checked=True)))
  err, _ = attention(q, sk, sv, kv_lengths=jnp.array([1, -2, 3]))
  with pytest.raises(checkify.JaxRuntimeError, match=r"kv_lengths must lie in \[0, 16\].*got -2 at index 1"):
    err.throw()
  tree = checkify.checkify(jax.jit(functools.partial(hj.tree_attention, checked=True)))
  root = Level(sk[None, :1], sv[None, :1], jnp.array([4]), jnp.array([0, 1, 0]), layer=jnp.int32(0))
  err, _ = tree(q, [root, Level(sk, sv, jnp.array([1, 2, 3]))])
  with pytest.raises(checkify.JaxRuntimeError, match=r"levels\[0\].seq_to_node must lie in \[0, 1\).*got 1 at index 1"):
    err.throw()
  root = Level(sk[None, :1], sv[None, :1], jnp.array([4]), jnp.array([0, 0, 0]), layer=jnp.int32(1))
  err, _ = tree(q, [root, Level(sk, sv, jnp.array([1, 2, 3]))])
  with pytest.raises(checkify.JaxRuntimeError, match=r"levels\[0\].layer must lie in \[0, 1\).*got 1\. \(`check` failed\)"):
    err.throw()


@pytest.mark.parametrize("dtype", ["int8", "int16", "uint8"])
def test_checked_mode_reads_narrow_integers_beside_bounds_their_type_cannot_hold(dtype):
  """checked=True compared a traced argument with its bound in the argument's own type: an int8 length beside a
  capacity of 300 (300 read as 44), an int16 one beside 40000, an int8 node index beside 200 nodes: valid values
  refused. Valid ones now pass with the unchecked answer; invalid ones are still named."""
  B, D, cap, nodes = 2, 8, 300 if dtype != "int16" else 40000, 200
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((B, 1, 2, D)), jnp.float32)
  ks = jnp.asarray(rng.standard_normal((B, cap, 1, D)), jnp.float32)
  attention = checkify.checkify(jax.jit(functools.partial(hj.attention, backend="xla", checked=True)))
  lengths = jnp.array([100, 7], dtype)
  err, out = attention(q, ks, ks, kv_lengths=lengths)
  err.throw()
  chex.assert_trees_all_close(out, hj.attention(q, ks, ks, kv_lengths=jnp.array([100, 7]), backend="xla"))
  if dtype != "uint8":
    err, _ = attention(q, ks, ks, kv_lengths=jnp.array([100, -7], dtype))
    with pytest.raises(checkify.JaxRuntimeError, match=rf"kv_lengths must lie in \[0, {cap}\].*got -7 at index 1"):
      err.throw()
  node_k = jnp.asarray(rng.standard_normal((nodes, 4, 1, D)), jnp.float32)
  tree = checkify.checkify(jax.jit(functools.partial(hj.tree_attention, backend="xla", checked=True)))
  level = Level(node_k, node_k, jnp.full((nodes,), 4), jnp.array([1, 0], dtype))
  err, out = tree(q, [level])
  err.throw()
  chex.assert_trees_all_close(out, hj.tree_attention(
      q, [Level(node_k, node_k, jnp.full((nodes,), 4), jnp.array([1, 0]))], backend="xla"))


def test_max_group_must_bound_the_readers_of_every_node(kernel_backend):
  """Level.max_group sizes the kernels' rows per node: a bound that a concrete seq_to_node breaks is refused (the
  kernels would leave the extra sequences' rows unwritten), a traced one is caught with checked=True, and a bound
  that holds gives the reference's answer."""
  q, _, _, sk, sv = _step_inputs(4)  # 3 sequences
  root = lambda nodes, bound: Level(sk[:2], sv[:2], jnp.array([4, 2]), nodes, max_group=bound)  # noqa: E731
  leaf = Level(sk, sv, jnp.array([1, 2, 3]))
  with pytest.raises(ValueError, match=r"levels\[0\].max_group=1, but node 0 is read by 2 sequences"):
    hj.tree_attention(q, [root(np.array([0, 1, 0], np.int32), 1), leaf], backend=kernel_backend)
  for bad in (0, -1, True, 1.5):
    with pytest.raises(ValueError, match=r"levels\[0\].max_group must be None or an integer >= 1 .*; got"):
      hj.tree_attention(q, [root(np.array([0, 1, 0], np.int32), bad), leaf], backend=kernel_backend)
  tree = checkify.checkify(jax.jit(lambda q, nodes: hj.tree_attention(q, [root(nodes, 2), leaf],
                                                                      backend=kernel_backend, checked=True)))
  err, _ = tree(q, jnp.array([1, 1, 1]))
  with pytest.raises(checkify.JaxRuntimeError, match=r"levels\[0\].max_group=2, but node 1 is read by 3"):
    err.throw()
  err, out = tree(q, jnp.array([0, 1, 0]))
  err.throw()
  want = hj.tree_attention(q, [root(np.array([0, 1, 0], np.int32), None), leaf], backend="xla")
  _assert_close(out, want)


@pytest.mark.mosaic_falls_back
def test_no_queries_give_empty_outputs(backend):
  """B = 0, T = 0 or no heads: empty outputs of the right shape (the kernels are not launched)."""
  q, pk, pv, sk, sv = _step_inputs(4)
  out, lse = hj.attention(q[:, :0], sk, sv, backend=backend)
  assert out.shape == q[:, :0].shape and lse.shape == q[:, :0].shape[:-1]
  assert hj.hydragen_attention(q[:0], pk, pv, sk[:0], sv[:0], backend=backend).shape == q[:0].shape
  assert hj.hydragen_attention(q[:, :, :0], pk, pv, sk, sv, backend=backend).shape == q[:, :, :0].shape  # Hq = 0


@pytest.mark.mosaic_falls_back
def test_traced_unsigned_lengths_past_int32_clamp_to_the_capacity(backend):
  """A traced uint32 length above the int32 range is clamped to the capacity like any other too-large one (it
  must not wrap to a negative length in the cast)."""
  q, _, _, sk, sv = _step_inputs(6)
  f = jax.jit(lambda n: hj.attention(q, sk, sv, kv_lengths=n, backend=backend))
  got = f(jnp.array([3_000_000_000, 2**32 - 1, 5], jnp.uint32))
  want = hj.attention(q, sk, sv, kv_lengths=jnp.array([S, S, 5]), backend="xla")
  _assert_close(got[0], want[0])
  chex.assert_trees_all_close(got[1], want[1], **tol(DTYPE))


@pytest.mark.mosaic_falls_back
def test_traced_64_bit_lengths_past_int32_clamp(backend):
  """With jax_enable_x64, traced int64 lengths past the int32 range are clamped like any other out-of-range ones
  (the cast to int32 must not wrap 2^32 + 3 back to 3), on every backend (the kernels trace as 32-bit; Mosaic GPU's
  interpreter refuses the 64-bit mode: test_attention)."""
  if backend == "interpret-mosaic":
    pytest.skip("backend='interpret-mosaic' refuses jax_enable_x64 (test_attention checks that it says so)")
  q, pk, pv, sk, sv = _step_inputs(7)
  with jax.enable_x64(True):
    f = jax.jit(lambda p, n: hj.hydragen_attention(q, pk, pv, sk, sv, prefix_length=p, suffix_lengths=n,
                                                   backend=backend))
    got = f(jnp.int64(2**32 + 1), jnp.array([2**32 + 3, -2**32 + 5, 5], jnp.int64))
  levels = [Level(pk[None], pv[None], jnp.array([P]), jnp.zeros(B, jnp.int32)),
            Level(sk, sv, jnp.array([S, 0, 5]))]
  _assert_close(got, expected_tree(q, levels))


def test_traced_64_bit_layer_past_int32_clamps_and_checked_names_it():
  """With jax_enable_x64, a traced int64 layer index of 2^32 reads the last layer (clamped), not layer 0 (wrapped),
  and checked=True reports the value given."""
  q, _, _, sk, sv = _step_inputs(8)
  ks, vs = jnp.stack([sk, -sk, 2 * sk]), jnp.stack([sv, sv, -sv])
  with jax.enable_x64(True):
    f = jax.jit(lambda i: hj.tree_attention(q, [Level(ks, vs, jnp.array([S, 7, 2]), layer=i)], backend="xla"))
    got = f(jnp.int64(2**32))
    err, _ = checkify.checkify(jax.jit(lambda i: hj.tree_attention(
        q, [Level(ks, vs, jnp.array([S, 7, 2]), layer=i)], backend="xla", checked=True)))(jnp.int64(2**32))
  _assert_close(got, expected_tree(q, [Level(ks[2], vs[2], jnp.array([S, 7, 2]))]))
  with pytest.raises(checkify.JaxRuntimeError, match=r"levels\[0\].layer must lie in \[0, 3\) .*got 4294967296"):
    err.throw()


@pytest.mark.parametrize("checked", [False, True])
def test_a_traced_index_into_an_empty_axis_is_refused_by_name(checked):
  """A level of 0 nodes read by sequences, or an empty layer axis, leaves no value for a traced seq_to_node or
  layer to be clamped to: a ValueError naming it (a TypeError / IndexError from inside JAX's gather before)."""
  q, sk = jnp.ones((2, 1, 4, 16)), jnp.ones((2, 5, 2, 16))
  empty, no_layers = jnp.ones((0, 3, 2, 16)), jnp.ones((0, 2, 5, 2, 16))
  leaf = Level(sk, sk, jnp.array([5, 5]))
  nodes = lambda s: hj.tree_attention(q, [Level(empty, empty, jnp.zeros((0,), jnp.int32), s), leaf],  # noqa: E731
                                      backend="xla", checked=checked)
  with pytest.raises(ValueError, match=r"levels\[0\]\.seq_to_node must lie in \[0, 0\) \(the level has 0 nodes\): "
                                       r"no value does, and 2 sequences read the level"):
    jax.jit(nodes)(jnp.zeros((2,), jnp.int32))
  layers = lambda l: hj.tree_attention(q, [Level(no_layers, no_layers, jnp.array([5, 5]), layer=l)],  # noqa: E731
                                       backend="xla", checked=checked)
  with pytest.raises(ValueError, match=r"levels\[0\]\.layer must lie in \[0, 0\) \(the layer axis of k is empty\)"):
    jax.jit(layers)(jnp.int32(0))
  # no queries: nothing is read, the outputs are empty (the contract), with a traced index too
  for empty_q in (jnp.ones((0, 1, 4, 16)), jnp.ones((2, 0, 4, 16))) if not checked else ():  # (checked: checkify)
    b = empty_q.shape[0]
    out = jax.jit(lambda s, l: hj.tree_attention(  # noqa: E731
        empty_q, [Level(empty, empty, jnp.zeros((0,), jnp.int32), s), Level(no_layers[:, :b], no_layers[:, :b],
                                                                               jnp.full((b,), 5), layer=l)],
        backend="xla", checked=checked))(jnp.zeros((b,), jnp.int32), jnp.int32(0))
    assert out.shape == empty_q.shape


def test_hydragen_errors_name_the_arguments_given():
  """hydragen_attention wraps its prefix into a Level; its errors name prefix_k / suffix_k, not levels[0].k."""
  q, pk, pv, sk, sv = _step_inputs(4)
  with pytest.raises(ValueError, match=r"KV heads of prefix_k \(24, 2, 64\)"):
    hj.hydragen_attention(q[:, :, :3], pk, pv, sk, sv)
  with pytest.raises(ValueError, match=r"dtype mismatch between q \(float32\) and suffix_k"):
    hj.hydragen_attention(q.astype(jnp.float32), pk.astype(jnp.float32), pv.astype(jnp.float32), sk, sv)


TINY = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8, max_position_embeddings=256)


@pytest.mark.parametrize("mode", ["hydragen", "standard", "shared_storage"])
def test_decode_past_cache_capacity_stays_inside_the_caches(kernel_backend, mode):
  """A user's decode loop that runs more steps than the caches were planned for: writes past a cache's end are
  dropped (the cache stops changing), reads are clamped, and the logits stay finite."""
  model = init_random(TINY, seed=0)
  prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [1, 2, 3, 4, 5, 6, 7, 8, 20, 21]]
  state = prefill(model, prompts, 2, mode=mode, pad_multiple=16, backend=kernel_backend)
  cache, positions = state.cache, state.positions
  capacity = cache.k[0].shape[1]

  @jax.jit
  def step(params, cache, tokens, positions):
    ones = jnp.ones((tokens.shape[0],), jnp.int32)
    hidden, cache = type(model)(model.config, params)(tokens[:, None], positions[:, None], cache,
                                                       make_attend(mode, ones, kernel_backend))
    return advance(cache, ones), model.logits(hidden[:, 0])

  params, tokens = model.params(), jnp.array([3, 4], jnp.int32)
  full = None
  for i in range(capacity + 3):
    cache, logits = step(params, cache, tokens, positions + i)
    assert bool(jnp.isfinite(logits).all())
    if full is None and int(cache.lengths.min()) >= capacity:
      full = (cache.k, cache.v)
  assert full is not None and int(cache.lengths.min()) > capacity
  for now, then in zip(cache.k + cache.v, full[0] + full[1]):  # nothing written past the end, in any layer
    np.testing.assert_array_equal(np.asarray(now), np.asarray(then))


def test_cache_write_positions_are_distinct_and_drop_what_does_not_fit():
    """The cache writes tell XLA their (row, slot) pairs are unique (no atomics), and sorted with one slot a row:
    both must hold, padding and past-capacity slots included (they point past the end, each to its own slot, and
    are dropped). A write of several tokens over a nearly full cache keeps what fits and drops the rest."""
    from models.cache import _write, write_positions  # noqa: PLC0415
    cap, T = 6, 4
    lengths, new = jnp.array([0, 2, 5, 6]), jnp.array([4, 1, 3, 0])
    pos = np.asarray(write_positions(lengths, new, T, cap))
    np.testing.assert_array_equal(pos, [[0, 1, 2, 3], [6, 7, 8, 2], [6, 5, 8, 9], [6, 7, 8, 9]])
    assert all(len(set(row)) == T for row in pos)
    one = np.asarray(write_positions(lengths, jnp.ones(4, jnp.int32), 1, cap))
    assert one.ravel().tolist() == [0, 2, 5, 6]  # one slot a row: (row, slot) pairs sorted by row
    # lengths of a type wider than int32 near its end (uint32 2^32 - 1 wrapped to -1: slots 0-2 written) and of
    # a narrow one beside a wider capacity land past the end, or where they say
    near = np.asarray(write_positions(jnp.array([2**32 - 1, 2**31 + 3], jnp.uint32), jnp.array([4, 2]), T, cap))
    assert (near >= cap).all() and all(len(set(row)) == T for row in near)
    np.testing.assert_array_equal(np.asarray(write_positions(jnp.array([100], jnp.int8), jnp.array([2], jnp.int8), 2,
                                                             300)), [[100, 101]])
    # numpy's int64 past int32 without x64 (JAX would narrow 2^32 + 3 to 3 before any clip)
    assert (np.asarray(write_positions(np.array([2**32 + 3]), np.array([2]), 2, cap)) >= cap).all()
    # Python ints past 64 bits (numpy holds them as objects: "Invalid integer data type 'O'")
    assert (np.asarray(write_positions([2**70], [2], 2, cap)) >= cap).all()
    assert np.asarray(write_positions([3], [2**70], 2, cap)).tolist() == [[3, 4]]
    ks = (jnp.zeros((4, cap, 1, 2)),)
    k = jnp.arange(1, 4 * T + 1, dtype=jnp.float32).reshape(4, T, 1, 1) * jnp.ones((1, 1, 1, 2))
    got, _ = jax.jit(_write, static_argnums=2)(ks, ks, 0, k, k, lengths, new)
    want = np.zeros((4, cap))
    want[0, :4] = [1, 2, 3, 4]
    want[1, 2] = 8
    want[2, 5] = 10  # row 2's last three tokens go to slots 5, 6, 7: only slot 5 fits
    np.testing.assert_array_equal(np.asarray(got[0])[:, :, 0, 0], want)
