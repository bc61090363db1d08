"""`tree_attention_append`: a step's cache write and attention in one, against the reference's write followed by
`tree_attention`, and against plain attention over the concatenated KV; the Triton launch that writes the new keys
itself (`LevelSpec.fresh`); its bad inputs; and the models' use of it (`Tuning.write_in_attention`)."""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hydragen_jax as hj
from hydragen_jax import Level, reference
from hydragen_jax import tuning as tuning_lib
from hydragen_jax.kernels import flash, ops
from models.generate import generate
from models.llama import init_random
from tests import write_cases
from tests.attention_cases import normal, tol
from tests.conftest import ci_if_shipped, grid

# (B, T, Hq, Hkv, D, prefix P, leaf capacity S, old lengths, new tokens): decode (one sequence at its capacity: its
# key dropped; one empty); a chunk with padding slots (right-aligned) and overflow past the capacity, GQA 4; MQA
# with 16 query slots (two row blocks a KV head, each storing the new keys it reads), one sequence writing nothing;
# GQA 8, D 128; a prefill chunk of 20 slots (more (slot, head) pairs than one store tile: `flash._STORE_ROWS`), part
# of it past the capacity.
CASES = {
    "decode": (3, 1, 4, 4, 64, 21, 37, [36, 0, 37], [1, 1, 1]),
    "chunk": (2, 3, 8, 2, 64, 0, 9, [1, 7], [2, 3]),
    "rows": (2, 16, 8, 1, 64, 5, 40, [3, 20], [16, 0]),
    "gqa8": (2, 2, 16, 2, 128, 13, 23, [0, 11], [2, 1]),
    "prefill": (2, 20, 4, 4, 32, 7, 48, [5, 40], [20, 13]),
}


def _inputs(case: str, dtype, new_dtype=None, **change):
  """A case's q, shared prefix level, leaf caches, new k and v (in `new_dtype`, default `dtype`), old lengths and new
  tokens; `change` replaces the case's fields by name (b, t, hq, hkv, d, p, s, old, new)."""
  fields = dict(zip(("b", "t", "hq", "hkv", "d", "p", "s", "old", "new"), CASES[case]), **change)
  b, t, hq, hkv, d, p, s, old, new = fields.values()
  keys = jax.random.split(jax.random.PRNGKey(list(CASES).index(case)), 7)
  q = normal(keys[0], (b, t, hq, d), dtype)
  prefix = Level(normal(keys[1], (1, p, hkv, d), dtype), normal(keys[2], (1, p, hkv, d), dtype), jnp.array([p]),
                 np.zeros((b,), np.int32))
  k_cache, v_cache = normal(keys[3], (b, s, hkv, d), dtype), normal(keys[4], (b, s, hkv, d), dtype)
  new_k, new_v = (normal(key, (b, t, hkv, d), new_dtype or dtype) for key in keys[5:])
  return q, prefix, k_cache, v_cache, new_k, new_v, jnp.array(old, jnp.int32), jnp.array(new, jnp.int32)


@pytest.mark.mosaic_falls_back
@pytest.mark.parametrize("case,dtype,batched", grid(list(CASES), [jnp.float32, jnp.bfloat16], [True, False], ids=[
    str, lambda d: jnp.dtype(d).name, lambda b: "batched" if b else "per_seq"]))
def test_append_equals_the_write_then_tree_attention(backend, case, dtype, batched):
  """The output equals the reference's write (`reference.append`) followed by `tree_attention` on the reference,
  and the caches come back with exactly the written entries, under jit with traced lengths."""
  q, prefix, k_cache, v_cache, new_k, new_v, old, new = _inputs(case, dtype)

  @jax.jit
  def step(k_cache, v_cache, old, new):
    return hj.tree_attention_append(q, [prefix, Level(k_cache, v_cache, old)], new_k, new_v, new_tokens=new,
                                    backend=backend, batch_shared=batched)

  out, k_got, v_got = step(k_cache, v_cache, old, new)
  k_ref, v_ref = reference.append(k_cache, v_cache, new_k, new_v, old, new)
  chex.assert_trees_all_equal((k_got, v_got), (k_ref, v_ref))
  total = jnp.minimum(old + new, k_cache.shape[1])
  ref = hj.tree_attention(q, [prefix, Level(k_ref, v_ref, total)], backend="xla")
  assert out.dtype == dtype
  chex.assert_trees_all_close(out.astype(jnp.float32), ref.astype(jnp.float32), **tol(dtype))


@pytest.mark.mosaic_falls_back
def test_append_equals_attention_over_the_concatenated_kv(backend):
  """Against plain causal attention over each sequence's [prefix; old entries; new keys], built by concatenation."""
  q, prefix, k_cache, v_cache, new_k, new_v, old, new = _inputs("chunk", jnp.float32)
  out, _, _ = hj.tree_attention_append(q, [prefix, Level(k_cache, v_cache, old)], new_k, new_v, new_tokens=new,
                                       backend=backend)
  p, s, t = prefix.k.shape[1], k_cache.shape[1], q.shape[1]
  rows_k, rows_v, lengths = [], [], []
  for b in range(q.shape[0]):
    n, o = int(new[b]), int(old[b])
    keep = min(n, s - o)  # entries past the capacity are dropped
    k_b = jnp.concatenate([prefix.k[0], k_cache[b, :o], new_k[b, t - n:t - n + keep]])
    v_b = jnp.concatenate([prefix.v[0], v_cache[b, :o], new_v[b, t - n:t - n + keep]])
    lengths.append(k_b.shape[0])
    rows_k.append(jnp.pad(k_b, ((0, p + s - k_b.shape[0]), (0, 0), (0, 0))))
    rows_v.append(jnp.pad(v_b, ((0, p + s - v_b.shape[0]), (0, 0), (0, 0))))
  ref, _ = reference.attention(q, jnp.stack(rows_k), jnp.stack(rows_v), jnp.array(lengths), causal=True,
                               scale=q.shape[-1] ** -0.5)
  chex.assert_trees_all_close(out, ref, **tol(jnp.float32))


@pytest.mark.mosaic_falls_back
def test_append_takes_numpy_arrays(backend):
  """Numpy caches, new keys and lengths (as every other entry point takes them, on every backend): the same
  output and caches as from jax arrays."""
  args = _inputs("chunk", jnp.float32)
  q, prefix, k_cache, v_cache, new_k, new_v, old, new = args
  want = hj.tree_attention_append(q, [prefix, Level(k_cache, v_cache, old)], new_k, new_v, new_tokens=new,
                                  backend=backend)
  q, k_cache, v_cache, new_k, new_v, old, new = (np.asarray(x) for x in (q, k_cache, v_cache, new_k, new_v, old, new))
  prefix = Level(*(np.asarray(x) for x in (prefix.k, prefix.v, prefix.lengths, prefix.seq_to_node)))
  got = hj.tree_attention_append(q, [prefix, Level(k_cache, v_cache, old)], new_k, new_v, new_tokens=new,
                                 backend=backend)
  chex.assert_trees_all_close(got, want, atol=0, rtol=0)


def test_append_with_split_keys_and_traced_out_of_range_lengths(kernel_backend):
  """A leaf split over several programs (the split that holds the new keys stores them), and traced lengths
  past the capacity or below 0 (clamped, as everywhere: nothing written outside, the attention reads [0, S])."""
  b, t, hq, hkv, d, s = 4, 1, 4, 2, 64, 300
  keys = jax.random.split(jax.random.PRNGKey(3), 5)
  q = normal(keys[0], (b, t, hq, d), jnp.float32)
  k_cache, v_cache = normal(keys[1], (b, s, hkv, d), jnp.float32), normal(keys[2], (b, s, hkv, d), jnp.float32)
  new_k, new_v = normal(keys[3], (b, t, hkv, d), jnp.float32), normal(keys[4], (b, t, hkv, d), jnp.float32)
  old = jnp.array([250, 299, 400, -5])
  tune = dataclasses.replace(tuning_lib.current(), max_keys_per_program=64, balanced_keys=64)
  with tuning_lib.override(tune):
    plan = ops.per_sequence(q, k_cache, v_cache, old, causal=True, shared_launch=False)
    assert plan[0].block.splits > 1, plan[0].block
    out, k_got, v_got = jax.jit(functools.partial(hj.tree_attention_append, backend=kernel_backend))(
        q, [Level(k_cache, v_cache, old)], new_k, new_v)
  clamped = jnp.clip(old, 0, s)
  k_ref, v_ref = reference.append(k_cache, v_cache, new_k, new_v, clamped, jnp.ones((b,), jnp.int32))
  chex.assert_trees_all_equal((k_got, v_got), (k_ref, v_ref))
  ref, _ = reference.attention(q, k_ref, v_ref, jnp.minimum(clamped + 1, s), causal=True, scale=d**-0.5)
  chex.assert_trees_all_close(out, ref, **tol(jnp.float32))


def test_the_triton_launch_writes_the_new_keys_itself(kernel_backend, monkeypatch):
  """On the Triton kernels the attention's launch stores the new keys (no scatter: `reference.append` is not called)
  and returns the caches from its own outputs; on `xla` a scatter writes them first."""
  q, prefix, k_cache, v_cache, new_k, new_v, old, new = _inputs("decode", jnp.float32)
  levels = [prefix, Level(k_cache, v_cache, old)]
  calls, real = [], reference.append
  monkeypatch.setattr(reference, "append", lambda *a: calls.append(1) or real(*a))
  assert hj.append_in_launch(q, levels, backend=kernel_backend)
  hj.tree_attention_append(q, levels, new_k, new_v, new_tokens=new, backend=kernel_backend)
  assert not calls
  text = jax.jit(lambda k, v: hj.tree_attention_append(q, [prefix, Level(k, v, old)], new_k, new_v,
                                                       backend=kernel_backend)).lower(k_cache, v_cache).as_text()
  if kernel_backend == "pallas":  # the compiled launch's outputs alias the caches (in place)
    assert "output_operand_alias" in text or "tf.aliasing_output" in text, text[:2000]
  assert not hj.append_in_launch(q, levels, backend="xla")
  hj.tree_attention_append(q, levels, new_k, new_v, new_tokens=new, backend="xla")
  assert calls == [1]


def test_append_on_the_hopper_kernel_writes_with_a_scatter_first():
  """Where the Hopper kernel takes the step (capacities multiples of 8, bf16), the launch does not write: a scatter
  writes first (`append_in_launch` False), and the results are those of the reference; on the Triton kernels the
  same step writes in its launch."""
  q, prefix, k_cache, v_cache, new_k, new_v, old, new = _inputs("gqa8", jnp.bfloat16, p=16, s=24, old=[0, 23])
  levels = [prefix, Level(k_cache, v_cache, old)]
  assert hj.api._hopper_runs(q, levels, causal=[False, True], batched=[True, False], backend="interpret-mosaic")
  assert not hj.append_in_launch(q, levels, backend="interpret-mosaic")
  assert hj.append_in_launch(q, levels, backend="interpret")
  ref = hj.tree_attention_append(q, levels, new_k, new_v, new_tokens=new, backend="xla")
  for backend in ("interpret-mosaic", "interpret"):
    got = hj.tree_attention_append(q, levels, new_k, new_v, new_tokens=new, backend=backend)
    chex.assert_trees_all_equal(got[1:], ref[1:])
    chex.assert_trees_all_close(got[0].astype(jnp.float32), ref[0].astype(jnp.float32), **tol(jnp.bfloat16))


def test_append_in_launch_not_for_a_leaf_read_through_seq_to_node_nor_without_work():
  q, prefix, k_cache, v_cache, new_k, new_v, old, new = _inputs("gqa8", jnp.bfloat16)
  nodes = Level(k_cache, v_cache, old, np.arange(2, dtype=np.int32))
  assert not hj.append_in_launch(q, [prefix, nodes], backend="interpret")
  assert not hj.append_in_launch(q, [prefix, Level(k_cache[:, :0], v_cache[:, :0], old * 0)], backend="interpret")
  assert not hj.append_in_launch(q[:, :0], [prefix, Level(k_cache, v_cache, old)], backend="interpret")


@pytest.mark.parametrize("b,t,s", [(0, 2, 8), (2, 0, 8), (2, 2, 0)], ids=["B0", "T0", "S0"])
def test_append_of_nothing_or_nowhere(kernel_backend, b, t, s):
  """No sequences, no slots, or no capacity: the caches come back as they were (every entry dropped where S = 0),
  the output is empty or sees the prefix only."""
  q, prefix, k_cache, v_cache, new_k, new_v, old, new = _inputs("gqa8", jnp.float32, b=b, t=t, s=s, old=[0] * b,
                                                                new=[min(t, 1)] * b)
  out, k_got, v_got = hj.tree_attention_append(q, [prefix, Level(k_cache, v_cache, old)], new_k, new_v,
                                               new_tokens=new, backend=kernel_backend)
  k_ref, v_ref = reference.append(k_cache, v_cache, new_k, new_v, old, new)
  chex.assert_trees_all_equal((k_got, v_got), (k_ref, v_ref))
  ref = hj.tree_attention(q, [prefix, Level(k_ref, v_ref, jnp.minimum(old + new, s))], backend="xla")
  chex.assert_trees_all_close(out, ref, **tol(jnp.float32))


def test_append_casts_new_keys_to_the_caches_dtype(kernel_backend):
  """float32 new keys into bf16 caches: written as the scatter writes them (cast), attended as stored."""
  q, prefix, k_cache, v_cache, new_k, new_v, old, new = _inputs("chunk", jnp.bfloat16, new_dtype=jnp.float32)
  out, k_got, v_got = hj.tree_attention_append(q, [prefix, Level(k_cache, v_cache, old)], new_k, new_v,
                                               new_tokens=new, backend=kernel_backend)
  k_ref, v_ref = reference.append(k_cache, v_cache, new_k, new_v, old, new)
  chex.assert_trees_all_equal((k_got, v_got), (k_ref, v_ref))
  assert k_got.dtype == jnp.bfloat16
  ref = hj.tree_attention(q, [prefix, Level(k_ref, v_ref, jnp.minimum(old + new, 9))], backend="xla")
  chex.assert_trees_all_close(out.astype(jnp.float32), ref.astype(jnp.float32), **tol(jnp.bfloat16))


@pytest.mark.mosaic_falls_back
def test_traced_new_tokens_out_of_range_are_clamped(backend):
  """A traced count past T reads as T, a negative one as 0 (as the module docstring says of traced values)."""
  q, prefix, k_cache, v_cache, new_k, new_v, old, _ = _inputs("chunk", jnp.float32)
  levels = [prefix, Level(k_cache, v_cache, old)]
  step = jax.jit(lambda n: hj.tree_attention_append(q, levels, new_k, new_v, new_tokens=n, backend=backend))
  got, want = step(jnp.array([5, -1])), step(jnp.array([3, 0]))
  chex.assert_trees_all_equal(got[1:], want[1:])
  chex.assert_trees_all_close(got[0], want[0], **tol(jnp.float32))


@pytest.mark.parametrize("launch,merge_rows", [
    pytest.param("auto", 1 << 20, marks=ci_if_shipped("launch_merge_max_rows")), ("separate", 0), ("fused", 0)],
    ids=["merged-in-launch", "separate", "fused"])
def test_the_writing_launch_with_its_merge_or_in_separate_launches(monkeypatch, launch, merge_rows):
  """The written caches come back right beside the launch's own merge (its count aliased too) and when each level
  has a launch of its own; three levels, the middle one per sequence over two nodes."""
  q, prefix, k_cache, v_cache, new_k, new_v, old, new = _inputs("decode", jnp.float32)
  mid = Level(normal(jax.random.PRNGKey(9), (2, 11, 4, 64), jnp.float32),
              normal(jax.random.PRNGKey(10), (2, 11, 4, 64), jnp.float32), jnp.array([11, 4]),
              np.array([0, 1, 1], np.int32))
  levels = [prefix, mid, Level(k_cache, v_cache, old)]
  monkeypatch.setattr(ops, "auto_launch", lambda rows, tuning=None: "fused" if launch == "auto" else launch)
  tune = dataclasses.replace(tuning_lib.current(), launch_merge_max_rows=merge_rows)
  with tuning_lib.override(tune):
    out, k_got, v_got = hj.tree_attention_append(q, levels, new_k, new_v, new_tokens=new, backend="interpret")
  k_ref, v_ref = reference.append(k_cache, v_cache, new_k, new_v, old, new)
  chex.assert_trees_all_equal((k_got, v_got), (k_ref, v_ref))
  ref = hj.tree_attention(q, levels[:2] + [Level(k_ref, v_ref, jnp.minimum(old + new, 37))], backend="xla")
  chex.assert_trees_all_close(out, ref, **tol(jnp.float32))


@pytest.mark.parametrize("change,match", [
    (dict(new_k=jnp.zeros((2, 2, 2, 64)), new_v=jnp.zeros((2, 2, 2, 64))),
     r"new_k \(2, 2, 2, 64\): expected \[B, T, Hkv, D\] = \(2, 2, 2, 128\)"),
    (dict(new_v=jnp.zeros((2, 2, 2, 64))), r"new_k and new_v must have the same shape"),
    (dict(new_tokens=jnp.array([3, 0])), r"new_tokens must lie in \[0, 2\] \(T, the query slots\)"),
    (dict(new_tokens=jnp.array([1])), r"new_tokens"),
    (dict(leaf_nodes=True), r"levels\[1\] has seq_to_node set: expected None"),
    (dict(new_k=jnp.zeros((2, 2, 2, 128), jnp.int32), new_v=jnp.zeros((2, 2, 2, 128), jnp.int32)),
     r"new_k and new_v must be floating-point"),
], ids=["new_k-head-dim", "new_v-shape", "new_tokens-range", "new_tokens-count", "leaf-seq_to_node", "int-keys"])
def test_append_names_bad_input(change, match):
  q, prefix, k_cache, v_cache, new_k, new_v, old, new = _inputs("gqa8", jnp.float32)
  leaf = Level(k_cache, v_cache, old, np.arange(2, dtype=np.int32) if change.get("leaf_nodes") else None)
  args = dict(new_k=new_k, new_v=new_v, new_tokens=new)
  args.update({key: value for key, value in change.items() if key != "leaf_nodes"})
  with pytest.raises(ValueError, match=match):
    hj.tree_attention_append(q, [prefix, leaf], args["new_k"], args["new_v"], new_tokens=args["new_tokens"],
                             backend="xla")


def test_a_launch_writes_one_fresh_level_and_only_through_run_write():
  q, _, k_cache, v_cache, new_k, new_v, old, new = _inputs("decode", jnp.float32)
  spec, work = ops.per_sequence(q, k_cache, v_cache, old + new, causal=True, new=(new_k, new_v, new))
  assert spec.fresh
  with pytest.raises(ValueError, match="run_write returns the caches"):
    ops.run(q, [(spec, work)], scale=0.125, interpret=True)
  with pytest.raises(ValueError, match="at most one level"):
    flash.fused_levels(q, (work, work), specs=(spec, spec), scale=0.125, interpret=True)
  with pytest.raises(ValueError, match="kv_index None"):
    ops.per_sequence(q, k_cache, v_cache, old, jnp.arange(3), causal=True, new=(new_k, new_v, new))


# CI: hydragen where a tuning file sets `write_in_attention` (off in both: the slow tier and the GPU; CI time ~20 s
# a case interpreted; the launch's own tests above run in CI); shared_storage's and standard's caches are appended
# to as hydragen's suffix level is: slow tier
@pytest.mark.parametrize("mode", [pytest.param("hydragen", marks=ci_if_shipped("write_in_attention")),
                                  pytest.param("shared_storage", marks=pytest.mark.slow),
                                  pytest.param("standard", marks=pytest.mark.slow)])
def test_models_write_in_the_attention_where_the_tuning_says(kernel_backend, monkeypatch, mode):
  """With the tuning's `write_in_attention` the decode loop writes its caches in the attention's launch
  (`tree_attention_append`); the greedy tokens and logits are bit for bit those of the write before it."""
  model = init_random(write_cases.CFG, jnp.float32, seed=3)
  prompts = write_cases.prompts()
  # The calls are seen while tracing: a step another test compiled with the same tuning would not trace again.
  jax.clear_caches()
  calls, real = [], hj.tree_attention_append
  monkeypatch.setattr(hj, "tree_attention_append", lambda *a, **k: calls.append(1) or real(*a, **k))
  with tuning_lib.override(dataclasses.replace(tuning_lib.current(), write_in_attention=False)):
    ref = generate(model, prompts, num_samples=2, max_new_tokens=4, mode=mode, backend=kernel_backend)
  assert not calls
  with tuning_lib.override(dataclasses.replace(tuning_lib.current(), write_in_attention=True)):
    got = generate(model, prompts, num_samples=2, max_new_tokens=4, mode=mode, backend=kernel_backend)
  assert calls  # the decode loop's steps (prefill keeps its write)
  np.testing.assert_array_equal(got.tokens, ref.tokens)
  np.testing.assert_array_equal(got.logits, ref.logits)


def test_append_under_vmap_over_layers(kernel_backend):
  """vmapped over a leading layer axis (each layer its own caches and keys), as each layer called alone."""
  q, prefix, k_cache, v_cache, new_k, new_v, old, new = _inputs("decode", jnp.float32)
  stack = lambda x: jnp.stack([x, x[::-1] * 0.5])  # noqa: E731

  def step(q, pk, pv, k_cache, v_cache, new_k, new_v):
    levels = [Level(pk, pv, prefix.lengths, prefix.seq_to_node), Level(k_cache, v_cache, old)]
    return hj.tree_attention_append(q, levels, new_k, new_v, new_tokens=new, backend=kernel_backend)

  args = [stack(x) for x in (q, prefix.k, prefix.v, k_cache, v_cache, new_k, new_v)]
  got = jax.jit(jax.vmap(step))(*args)
  for layer in range(2):
    want = step(*(x[layer] for x in args))
    chex.assert_trees_all_close(tuple(x[layer] for x in got), want, **tol(jnp.float32))


def test_checked_mode_names_a_traced_new_tokens_out_of_range():
  """`checked=True` under checkify: a traced count past T raises with its name, value and position."""
  from jax.experimental import checkify  # noqa: PLC0415

  q, prefix, k_cache, v_cache, new_k, new_v, old, _ = _inputs("chunk", jnp.float32)
  levels = [prefix, Level(k_cache, v_cache, old)]
  step = checkify.checkify(jax.jit(lambda n: hj.tree_attention_append(q, levels, new_k, new_v, new_tokens=n,
                                                                      backend="xla", checked=True)))
  err, _ = step(jnp.array([1, 7]))
  with pytest.raises(Exception, match=r"new_tokens must lie in \[0, 3\] \(T, the query slots\); got 7 at index 1"):
    err.throw()
  err, _ = step(jnp.array([1, 3]))
  err.throw()  # in range: no error
