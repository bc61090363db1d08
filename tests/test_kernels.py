"""The Pallas kernel under forced tilings: several key blocks per program, key splits, row blocks that cut
through a node's rows, padded head dims. Interpreted on CPU, compiled on GPU."""

from __future__ import annotations

import dataclasses
import functools
import warnings
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hydragen_jax import merge_states, reference, tuning
from hydragen_jax.kernels import flash, ops
from hydragen_jax.kernels.flash import BlockConfig
from tests.attention_cases import assert_close_to_reference, normal, tol
from tests.conftest import ci_if_shipped, grid


def _prefix_then_suffix(q, pk, pv, prefix_length, sk, sv, lengths, scale):
  """Reference: causal attention of each sequence over [its copy of the prefix; its suffix]."""
  b, _, hkv, d = sk.shape
  kk = jnp.concatenate([jnp.broadcast_to(pk[:, :prefix_length], (b, prefix_length, hkv, d)), sk], axis=1)
  vv = jnp.concatenate([jnp.broadcast_to(pv[:, :prefix_length], (b, prefix_length, hkv, d)), sv], axis=1)
  return reference.attention(q, kk, vv, prefix_length + lengths, causal=True, scale=scale)[0]


def _run(q, plan, scale, backend):
  """One level through the fused kernel, its key splits merged."""
  return merge_states(ops.run(q, [plan], scale=scale, interpret=backend == "interpret"))


BLOCKS = [
    BlockConfig(block_m=16, block_k=16, splits=1),
    BlockConfig(block_m=16, block_k=16, splits=3),
    BlockConfig(block_m=32, block_k=32, splits=2),
    BlockConfig(block_m=16, block_k=32, splits=2, heads=2),  # both KV heads of a sequence in one program
]


def _block_id(b):
  return f"m{b.block_m}k{b.block_k}s{b.splits}h{b.heads}"


# every combination with --all (and compiled on the GPU), a covering subset in CI (conftest.grid)
@pytest.mark.parametrize("block,dtype,direct", grid(BLOCKS, [jnp.float32, jnp.bfloat16], [False, True], ids=[
    _block_id, lambda d: "f32" if d == jnp.float32 else "bf16", lambda d: "direct" if d else "indexed"]))
def test_per_sequence_tilings(kernel_backend, block, dtype, direct):
  """Sequence b reads KV row b through index vectors (indexed) or by its program id alone (direct)."""
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  b, t, hq, hkv, d, s = 3, 3, 8, 2, 64, 75
  q = normal(keys[0], (b, t, hq, d), dtype)
  k, v = normal(keys[1], (b, s, hkv, d), dtype), normal(keys[2], (b, s, hkv, d), dtype)
  lengths = jnp.array([75, 33, 2])
  plan = ops.per_sequence(q, k, v, lengths, None if direct else jnp.arange(b), causal=True, block=block)
  out, lse = _run(q, plan, d**-0.5, kernel_backend)
  ref_out, ref_lse = reference.attention(q.astype(jnp.float32), k, v, lengths, causal=True, scale=d**-0.5)
  assert_close_to_reference(out, lse, ref_out, ref_lse, dtype)


@pytest.mark.parametrize("block", BLOCKS, ids=_block_id)
@pytest.mark.parametrize("max_group", [None, 4])
def test_batched_groups_tilings(kernel_backend, block, max_group):
  """5 sequences over 3 nodes (sizes 2, 0 and 3... sequences), 8 rows each: row blocks straddle node borders."""
  keys = jax.random.split(jax.random.PRNGKey(1), 4)
  b, t, hq, hkv, d, n, cap = 5, 2, 8, 2, 64, 3, 70
  q = normal(keys[0], (b, t, hq, d), jnp.float32)
  k, v = normal(keys[1], (n, cap, hkv, d), jnp.float32), normal(keys[2], (n, cap, hkv, d), jnp.float32)
  lengths = jnp.array([70, 41, 0])
  seq_to_node = jnp.array([1, 0, 1, 1, 0])
  plan = ops.batched(q, k, v, lengths, seq_to_node, max_group=max_group, causal=False, block=block)
  out, lse = _run(q, plan, 0.1, kernel_backend)
  ref_out, ref_lse = reference.attention(q, k[seq_to_node], v[seq_to_node], lengths[seq_to_node], causal=False,
                                         scale=0.1)
  chex.assert_trees_all_close((out, lse), (ref_out, ref_lse), **tol(jnp.float32))


@pytest.mark.parametrize("d,dtype", [(80, jnp.float32), (8, jnp.float32), (8, jnp.bfloat16), (4, jnp.bfloat16)],
                         ids=["D80-f32", "D8-f32", "D8-bf16", "D4-bf16"])
def test_head_dim_not_a_power_of_two_or_under_16(kernel_backend, d, dtype):
  """D pads to a power of two of at least 16 (a tensor-core product's K): 80 -> 128, 8 and 4 -> 16."""
  keys = jax.random.split(jax.random.PRNGKey(2), 3)
  q = normal(keys[0], (2, 1, 4, d), dtype)
  k, v = normal(keys[1], (2, 40, 2, d), dtype), normal(keys[2], (2, 40, 2, d), dtype)
  lengths = jnp.array([40, 17])
  out, lse = _run(q, ops.per_sequence(q, k, v, lengths, jnp.arange(2), causal=False), 0.1, kernel_backend)
  ref_out, ref_lse = reference.attention(q.astype(jnp.float32), k, v, lengths, causal=False, scale=0.1)
  assert_close_to_reference(out, lse, ref_out, ref_lse, dtype)


def test_choose_block_splits_keys_when_few_programs_or_many_keys():
  few = ops.choose_block(max_rows=4, total_rows=4 * 8, num_groups=8, num_heads=2, num_keys=8192, head_dim=128)
  many = ops.choose_block(max_rows=4, total_rows=4 * 4096, num_groups=4096, num_heads=8, num_keys=2048,
                          head_dim=128)
  long = ops.choose_block(max_rows=4, total_rows=4 * 4096, num_groups=4096, num_heads=8, num_keys=8192,
                          head_dim=128)
  assert few.splits > 1 and many.splits == 1
  assert 8192 / long.splits <= tuning.current().max_keys_per_program
  wide = ops.choose_block(max_rows=4096, total_rows=4096, num_groups=1, num_heads=8, num_keys=512, head_dim=256)
  assert wide.block_m == 64 and all(x & (x - 1) == 0 for x in (wide.block_m, wide.block_k, wide.splits))


@pytest.mark.parametrize("batch,prefix,q_heads,kv_heads", [(64, 2048, 32, 32), (256, 4096, 32, 32),
                                                             (512, 4096, 32, 8), (1024, 8192, 32, 8), (3, 9000, 4, 2)])
def test_choose_block_splits_are_the_fewest_that_keep_the_key_bounds(batch, prefix, q_heads, kv_heads):
  """Prefix splits: at most max_keys_per_program keys a program, balanced_keys while the level has fewer than
  balanced_programs_per_core programs per SM, at least one program per SM (split_min_fill of them where the key
  bound allows), and no more splits than that (each split is a partial to merge)."""
  tune = tuning.current()
  rows = batch * q_heads // kv_heads
  blk = ops.choose_block(rows, rows, 1, kv_heads, prefix, 128)
  programs = kv_heads // blk.heads * -(-rows * blk.heads // blk.block_m)
  step_keys = blk.block_k // blk.heads
  assert blk.splits == 1 or not ops._split_bounds_hold(programs, blk.splits // 2, prefix, tune, blk.heads)
  if not ops._split_bounds_hold(programs, blk.splits, prefix, tune, blk.heads):
    # stopped by the key cap only: one more split would leave a split under 8 key steps, this one did not
    assert prefix < 2 * blk.splits * 4 * step_keys and (blk.splits == 1 or prefix >= blk.splits * 4 * step_keys), blk
    return
  # the bounds themselves, on this level
  keys, total = prefix / blk.splits, programs * blk.splits
  assert keys <= tune.max_keys_per_program
  assert total >= tune.balanced_programs_per_core * ops.num_cores() or keys <= tune.balanced_keys


@pytest.mark.parametrize("fill,max_keys,suffix_keys,splits", [
    (1.0, 4096, 128, (8, 2)),   # a program per SM: 32 prefix programs split 8 ways, 128 suffix programs 2
    (0.96, 4096, 128, (4, 1)),  # 128 programs fill 97 % of 132 SMs: one split fewer on each level
    (0.96, 4096, 512, (4, 2)),  # a suffix program of 16 heads x 512 keys is past the key bound: split as before
    (0.96, 512, 128, (8, 2)),   # both levels past a bound of 512 keys (1024 a prefix program, 2048 a suffix one)
    (0.96, 2048, 128, (4, 1)),  # the bound holds inclusively: a suffix program of 16 heads x 128 keys = 2048
    (0.96, 2047, 128, (4, 2)),  # ... one key under it: split as before
])
def test_choose_block_split_min_fill(fill, max_keys, suffix_keys, splits):
  """MHA decode at B = 64, P = 4K on 132 SMs: each level is split until it has a program per SM, or programs for
  `split_min_fill` of them where a program then streams at most `split_fill_max_keys` keys over its packed heads."""
  tune = dataclasses.replace(tuning.current(), split_min_fill=fill, split_fill_max_keys=max_keys)
  with mock.patch.object(ops, "num_cores", lambda t=None: 132):
    prefix = ops.choose_block(64, 64, 1, 32, 4096, 128, tuning=tune)
    suffix = ops.choose_block(1, 64, 64, 32, suffix_keys, 128, tuning=tune)
  assert (prefix.heads, suffix.heads) == (1, 16)
  assert (prefix.splits, suffix.splits) == splits


@pytest.mark.parametrize("prefix,fills,splits", [
    (4096, [True, True], (4, 1)),     # no level split for its keys: the launch fits one wave (256 programs)
    (8192, [True, True], (4, 1)),     # 4 prefix splits for balanced_keys, 128 programs: under one an SM
    (16384, [True, False], (8, 2)),   # 8 prefix splits for balanced_keys, 256 programs: the suffix keeps one an SM
])
def test_launch_fill_leaves_the_rule_to_levels_split_for_their_keys(prefix, fills, splits):
  """MHA decode at B = 64 on 132 SMs with `split_min_fill` 0.96: where a level of the launch is split for its keys
  (`split_for_keys`: half its splits would break `balanced_keys`) into at least a program per SM, the other levels
  are tiled without the rule."""
  tune = dataclasses.replace(tuning.current(), split_min_fill=0.96, split_fill_max_keys=4096, balanced_keys=2048,
                             max_keys_per_program=4096, balanced_programs_per_core=4)
  with mock.patch.object(ops, "num_cores", lambda t=None: 132):
    pb = ops.choose_block(64, 64, 1, 32, prefix, 128, tuning=tune)
    sb = ops.choose_block(1, 64, 64, 32, 128, 128, tuning=tune)
    assert ops.split_for_keys(pb, 32, prefix, tune) == (prefix >= 8192)
    assert not ops.split_for_keys(sb, 128, 128, tune)
    assert ops.launch_fill([(pb, 32, prefix), (sb, 128, 128)], tune) == fills
    sb = ops.choose_block(1, 64, 64, 32, 128, 128, tuning=tune, fill=fills[1])
  assert (pb.splits, sb.splits) == splits
  # a level alone in its launch, or a launch of one level, keeps the rule
  assert ops.launch_fill([(pb, 32, prefix)], tune) == [True]


def test_plan_level_counts_programs_as_choose_block():
  """`plan_level` reads a plan's programs before key splits as `choose_block` counted them (`busy_programs`: the
  programs with rows), also for a batched level of several nodes whose groups are padded to the largest."""
  q = jnp.zeros((40, 1, 8, 16), jnp.float32)
  k = jnp.zeros((3, 64, 4, 16), jnp.float32)
  plan = ops.batched(q, k, k, jnp.array([64, 64, 64]), np.array([0] * 38 + [1, 2], np.int32), max_group=None,
                     causal=False)
  block, programs, keys = ops.plan_level(plan, q.shape)
  rows = 40 * 8 // 4  # all the groups' query rows for one KV head (each group padded to 80 in the grid)
  assert keys == 64 and programs == 4 // block.heads * max(3, -(-rows * block.heads // block.block_m))
  assert programs < int(np.prod(flash.program_counts(*plan))) // block.splits  # the kernel's grid pads the groups


def test_batched_level_of_a_host_tree_sizes_its_groups_by_the_largest_node():
  """A shared level read batched, its seq_to_node a numpy array (a tree known now) and no max_group: each node's
  rows are bounded by its largest node's readers, not by B. One reader a node (B = 512 nodes, GQA 32/8) used to
  size every node for 512 sequences: 131,072 programs, of which 130,048 exited at once; now as with max_group=1.
  A traced seq_to_node keeps the bound B (nothing is known of it)."""
  b, hq, hkv, d = 512, 32, 8, 16
  q = jax.ShapeDtypeStruct((b, 1, hq, d), jnp.float32)
  k = jnp.zeros((b, 64, hkv, d), jnp.float32)
  lengths = jnp.full((b,), 64)
  one_each = np.arange(b, dtype=np.int32)[::-1].copy()
  plan = ops.batched(q, k, k, lengths, one_each, max_group=None, causal=False)
  bounded = ops.batched(q, k, k, lengths, one_each, max_group=1, causal=False)
  assert plan[0].max_rows == bounded[0].max_rows == (hq // hkv) * plan[0].block.heads
  assert int(np.prod(flash.program_counts(*plan))) == int(np.prod(flash.program_counts(*bounded)))
  few = np.array([0, 0, 0] + list(range(1, b - 2)), np.int32)  # node 0 read by 3 sequences, the others by 1 or 0
  spec = ops.batched(q, k, k, lengths, few, max_group=None, causal=False)[0]
  assert spec.max_rows == 3 * (hq // hkv) * spec.block.heads
  specs = []  # a traced seq_to_node: its plan built under the trace, no host grouping
  jax.eval_shape(lambda nodes: specs.append(ops.batched(q, k, k, lengths, nodes, max_group=None, causal=False)[0]),
                 jnp.asarray(one_each))
  assert specs[0].max_rows == b * (hq // hkv) * specs[0].block.heads


@pytest.mark.parametrize("prefix,splits", [(4096, (4, 1)), (16384, (8, 2))])
def test_hydragen_step_tiles_its_launch_with_the_split_rule(prefix, splits):
  """`hydragen_attention` on the kernel backends plans a step's levels with `launch_fill` (traced only: the plans
  that reach `ops.run_write` are read, nothing runs)."""
  import hydragen_jax  # noqa: PLC0415

  tune = dataclasses.replace(tuning.current(), split_min_fill=0.96, split_fill_max_keys=4096, balanced_keys=2048,
                             max_keys_per_program=4096, balanced_programs_per_core=4)
  seen = []

  def run(q, plans, **kw):
    seen.extend(spec.block.splits for spec, _ in plans)
    raise StopIteration

  bf = jnp.bfloat16
  args = (jax.ShapeDtypeStruct((64, 1, 32, 128), bf), jax.ShapeDtypeStruct((prefix, 32, 128), bf),
          jax.ShapeDtypeStruct((prefix, 32, 128), bf), jax.ShapeDtypeStruct((64, 128, 32, 128), bf),
          jax.ShapeDtypeStruct((64, 128, 32, 128), bf))
  with (tuning.override(tune), mock.patch.object(ops, "num_cores", lambda t=None: 132),
        mock.patch.object(ops, "run_write", run), pytest.raises(StopIteration)):
    jax.eval_shape(lambda *a: hydragen_jax.hydragen_attention(*a, backend="interpret"), *args)
  assert tuple(seen) == splits


def test_choose_block_light_tiles_when_levels_share_the_launch():
  """A level alone takes 128-row tiles with 8 warps; beside other levels, 64-row tiles with 4 warps (two
  programs per SM), and float32 never gets the 128-key blocks that only fit shared memory in 16 bits."""
  kw = dict(max_rows=4096, total_rows=4096, num_groups=1, num_heads=8, num_keys=4096, head_dim=128)
  alone = ops.choose_block(**kw, shared_launch=False)
  shared = ops.choose_block(**kw, shared_launch=True)
  alone32 = ops.choose_block(**kw, shared_launch=False, itemsize=4)
  assert (alone.block_m, alone.num_warps, alone.block_k) == (128, 8, 128)
  assert (shared.block_m, shared.num_warps) == (64, 4)
  assert alone32.block_k == 64


def test_levels_with_different_tilings_share_one_launch(kernel_backend):
  """A batched prefix (32-row tiles, 3 key splits) and a per-sequence suffix (16-row tiles, 2 splits) in one
  launch: the tilings differ per level."""
  keys = jax.random.split(jax.random.PRNGKey(3), 5)
  b, hq, hkv, d = 6, 8, 2, 64
  q = normal(keys[0], (b, 1, hq, d), jnp.float32)
  pk, pv = normal(keys[1], (1, 90, hkv, d), jnp.float32), normal(keys[2], (1, 90, hkv, d), jnp.float32)
  sk, sv = normal(keys[3], (b, 20, hkv, d), jnp.float32), normal(keys[4], (b, 20, hkv, d), jnp.float32)
  lengths = jnp.array([20, 1, 7, 13, 2, 20])
  plans = [ops.batched(q, pk, pv, jnp.array([87]), jnp.zeros(b, jnp.int32), max_group=None, causal=False,
                       block=BlockConfig(block_m=32, block_k=16, splits=3)),
           ops.per_sequence(q, sk, sv, lengths, jnp.arange(b), causal=True,
                            block=BlockConfig(block_m=16, block_k=16, splits=2))]
  parts = ops.run(q, plans, scale=0.125, interpret=kernel_backend == "interpret")
  assert len(parts) == 5
  out, _ = merge_states(parts)
  ref = _prefix_then_suffix(q, pk, pv, 87, sk, sv, lengths, 0.125)
  chex.assert_trees_all_close(out, ref, **tol(jnp.float32))


@pytest.mark.parametrize("shape,dtype", grid([(8, 8, 1, 8), (8, 8, 1, 2), (16, 4, 1, 4), (8, 4, 2, 2)],
                                              [jnp.float32, jnp.bfloat16],
                                              ids=[lambda s: "{}-{}-{}-{}".format(*s),
                                                   lambda d: "f32" if d == jnp.float32 else "bf16"]))
def test_heads_packed_in_one_tile(kernel_backend, shape, dtype):
  """Decode-shaped levels (T·g < 16 rows per KV head): one program reads `heads` KV heads' keys as (key, head)
  columns and masks the scores across heads. Odd lengths, an empty sequence, a length under T."""
  hq, hkv, t, heads = shape
  keys = jax.random.split(jax.random.PRNGKey(4), 3)
  b, d, s = 4, 64, 37
  q = normal(keys[0], (b, t, hq, d), dtype)
  k, v = normal(keys[1], (b, s, hkv, d), dtype), normal(keys[2], (b, s, hkv, d), dtype)
  lengths = jnp.array([37, 0, 1, 20])
  block = BlockConfig(block_m=16, block_k=8 * heads, splits=2, heads=heads)
  out, lse = _run(q, ops.per_sequence(q, k, v, lengths, causal=True, block=block), d**-0.5, kernel_backend)
  ref_out, ref_lse = reference.attention(q.astype(jnp.float32), k, v, lengths, causal=True, scale=d**-0.5)
  assert bool(jnp.all(jnp.isfinite(lse) == jnp.isfinite(ref_lse)))
  assert_close_to_reference(out, lse, ref_out, ref_lse, dtype)


def test_choose_block_packs_heads_for_decode():
  mha = ops.choose_block(max_rows=1, total_rows=64, num_groups=64, num_heads=32, num_keys=512, head_dim=128)
  gqa = ops.choose_block(max_rows=4, total_rows=4 * 64, num_groups=64, num_heads=8, num_keys=512, head_dim=128)
  prefix = ops.choose_block(max_rows=4096, total_rows=4096, num_groups=1, num_heads=8, num_keys=512, head_dim=128)
  assert (mha.heads, gqa.heads, prefix.heads) == (16, 4, 1)
  assert mha.block_m == gqa.block_m == 16


def test_block_heads_must_divide_kv_heads():
  q = jnp.zeros((1, 1, 6, 64))
  k = jnp.zeros((1, 8, 3, 64))
  with pytest.raises(ValueError, match="heads=2 must divide the 3 KV heads"):
    ops.per_sequence(q, k, k, jnp.array([8]), jnp.arange(1), causal=True, block=BlockConfig(16, 16, heads=2))


@pytest.mark.parametrize("launch", ops.LAUNCHES)
def test_launch_schedules_agree(kernel_backend, launch):
  """The levels' programs in order, interleaved over the grid (uneven program counts: a remainder), or one
  launch per level: the same result as plain attention over the concatenated keys."""
  keys = jax.random.split(jax.random.PRNGKey(5), 5)
  b, hq, hkv, d = 5, 8, 2, 64
  q = normal(keys[0], (b, 1, hq, d), jnp.float32)
  pk, pv = normal(keys[1], (1, 50, hkv, d), jnp.float32), normal(keys[2], (1, 50, hkv, d), jnp.float32)
  sk, sv = normal(keys[3], (b, 30, hkv, d), jnp.float32), normal(keys[4], (b, 30, hkv, d), jnp.float32)
  lengths = jnp.array([30, 0, 7, 13, 29])
  plans = [ops.batched(q, pk, pv, jnp.array([50]), jnp.zeros(b, jnp.int32), max_group=None, causal=False,
                       block=BlockConfig(block_m=16, block_k=16, splits=3)),
           ops.per_sequence(q, sk, sv, lengths, jnp.arange(b), causal=True,
                            block=BlockConfig(block_m=16, block_k=16, splits=2, heads=2))]
  out, _ = merge_states(ops.run(q, plans, scale=0.125, interpret=kernel_backend == "interpret", launch=launch))
  ref = _prefix_then_suffix(q, pk, pv, 50, sk, sv, lengths, 0.125)
  chex.assert_trees_all_close(out, ref, **tol(jnp.float32))


def test_unknown_launch_is_refused():
  with pytest.raises(ValueError, match="launch='streams'"):
    ops.run(jnp.zeros((1, 1, 2, 16)), [], scale=1.0, interpret=True, launch="streams")


def test_direct_rows_start_at_kv_offset(kernel_backend):
  """per_sequence without kv_index reads rows kv_offset + b of a larger cache (a layer of a stacked cache)."""
  keys = jax.random.split(jax.random.PRNGKey(6), 3)
  b, hq, hkv, d, s = 3, 4, 2, 64, 21
  q = normal(keys[0], (b, 1, hq, d), jnp.float32)
  k, v = normal(keys[1], (3 * b, s, hkv, d), jnp.float32), normal(keys[2], (3 * b, s, hkv, d), jnp.float32)
  lengths = jnp.array([21, 4, 0])
  out, lse = _run(q, ops.per_sequence(q, k, v, lengths, kv_offset=jnp.int32(b), causal=True), 0.125, kernel_backend)
  ref_out, ref_lse = reference.attention(q, k[b:2 * b], v[b:2 * b], lengths, causal=True, scale=0.125)
  assert_close_to_reference(out, lse, ref_out, ref_lse, jnp.float32)


@pytest.mark.parametrize("sizes", [(5, 7), (1024, 2048), (7, 3), (1, 9), (4, 4), (3, 5, 11)])
@pytest.mark.parametrize("lead", [0.0, 0.25, 0.5, 1.0])
def test_schedule_is_a_permutation(sizes, lead):
  """Every program id goes to exactly one level, and each level's indices are 0..n-1 once each."""
  pid = jnp.arange(sum(sizes))
  owned = flash._schedule(pid, sizes, lead)
  mine = np.stack([np.asarray(m) for m, _ in owned])
  np.testing.assert_array_equal(mine.sum(axis=0), 1)
  for n, (m, index) in zip(sizes, owned):
    np.testing.assert_array_equal(np.sort(np.asarray(index)[np.asarray(m)]), np.arange(n))
  if len(sizes) == 2 and 0 < lead < 1:  # the grid ends with second-level programs only
    tail = sum(sizes) - (sizes[1] - int(sizes[1] * lead))
    assert not np.asarray(owned[0][0])[tail:].any()



# ------------------------------------------------------------------------------------------ shared memory

KB = 1024


def test_tile_shared_memory_counts_the_stages_and_the_q_tile():
  """The count Nsight Compute gave on the H200 for the 64 x 64 tile, 3 stages, D = 128 in bf16: 114688 bytes (3
  stages of a K and a V block, 96 KB, and the q tile, 16 KB); D pads to a power of two; other GPUs add a margin."""
  block = BlockConfig(block_m=64, block_k=64, num_stages=3)
  assert ops.tile_shared_memory(block, 128, 2) == 114688
  assert ops.tile_shared_memory(block, 80, 2) == 114688
  assert ops.tile_shared_memory(block, 128, 4) == 2 * 114688
  assert ops.tile_shared_memory(block, 128, 2, exact=False) == 114688 + 64 * 64 * 4


def test_fit_shared_memory_drops_stages_then_keys_then_rows():
  block = BlockConfig(block_m=128, block_k=128, num_stages=4, num_warps=8, splits=2)
  assert ops.fit_shared_memory(block, 128, 2, None) == block
  assert ops.fit_shared_memory(block, 128, 2, 1 << 30) == block
  fits = {limit: ops.fit_shared_memory(block, 256, 4, limit) for limit in (227 * KB, 163 * KB, 99 * KB, 64 * KB)}
  for limit, fit in fits.items():
    assert ops.tile_shared_memory(fit, 256, 4) <= limit
    assert (fit.splits, fit.num_warps, fit.heads) == (2, 8, 1)  # only the tile's size changes
  assert (fits[227 * KB].num_stages, fits[227 * KB].block_k, fits[227 * KB].block_m) == (2, 16, 128)
  assert (fits[99 * KB].num_stages, fits[99 * KB].block_k, fits[99 * KB].block_m) == (2, 16, 32)
  assert (fits[64 * KB].num_stages, fits[64 * KB].block_k, fits[64 * KB].block_m) == (1, 16, 16)
  packed = ops.fit_shared_memory(BlockConfig(block_m=16, block_k=64, num_stages=3, heads=32), 256, 4, 99 * KB)
  assert packed.block_k == 32 and packed.block_k % packed.heads == 0  # one key of each packed head, no less
  with pytest.raises(ValueError, match=r"head_dim=1024 in 4-byte elements needs \d+ bytes .* allows 65536"):
    ops.fit_shared_memory(block, 1024, 4, 64 * KB)


@pytest.mark.parametrize("limit", [227 * KB, 163 * KB, 99 * KB, 64 * KB], ids=str)
@pytest.mark.parametrize("tuning_kind", ["NVIDIA H100 80GB HBM3", "NVIDIA H200"])
def test_choose_block_fits_the_shared_memory(limit, tuning_kind):
  """Every tile the tunings give (row tiles 16-128 alone or sharing a launch, every dtype, D up to 256) fits the
  limit; with the Hopper's own limit the 16-bit tiles of D <= 128 are those of no limit (the tuning's), untouched."""
  tune = tuning.for_device_kind(tuning_kind)
  for rows in (1, 4, 16, 64, 128, 4096):
    for d in (64, 80, 128, 256):
      for itemsize in (2, 4):
        for shared in (True, False):
          kw = dict(shared_launch=shared, itemsize=itemsize, tuning=tune)
          fit = ops.choose_block(rows, rows * 8, 8, 8, 4096, d, shared_memory=limit, **kw)
          free = ops.choose_block(rows, rows * 8, 8, 8, 4096, d, shared_memory=None, **kw)
          assert ops.tile_shared_memory(fit, d, itemsize) <= limit
          if limit == 227 * KB and itemsize == 2 and d <= 128:
            assert fit == free


def test_choose_block_on_an_h100_in_float32_keeps_two_stages():
  """A level alone in float32 (128-row tiles, 64 keys) counts 256 KB with 3 stages, over a Hopper's 227 KB: 2
  stages. (Nsight Compute measured 224.5 KB on the H200: in float32 the count is an upper bound.)"""
  tune = tuning.for_device_kind("NVIDIA H100 80GB HBM3")
  kw = dict(max_rows=4096, total_rows=4096, num_groups=1, num_heads=8, num_keys=4096, head_dim=128, itemsize=4,
            shared_launch=False, tuning=tune)
  assert ops.choose_block(**kw, shared_memory=None).num_stages == 3
  fit = ops.choose_block(**kw, shared_memory=ops.SHARED_MEMORY_BY_CAPABILITY["9.0"])
  assert (fit.block_m, fit.block_k, fit.num_stages) == (128, 64, 2)


def test_a_launch_takes_the_stages_every_level_fits():
  """Levels fused into one launch run with the most stages any has (`fused_levels`): lowered where a level would
  not fit with them."""
  big = flash.LevelSpec(BlockConfig(block_m=64, block_k=64, num_stages=2), 64, True)
  small = flash.LevelSpec(BlockConfig(block_m=16, block_k=64, num_stages=4), 16, True)
  specs = ops._shared_stages((big, small), 128, 2, 99 * KB)
  assert [s.block.num_stages for s in specs] == [2, 2]
  assert all(ops.tile_shared_memory(s.block, 128, 2) <= 99 * KB for s in specs)
  roomy = ops._shared_stages((big, small), 128, 2, 227 * KB)
  assert [s.block.num_stages for s in roomy] == [4, 4]  # what the launch ran before: the max
  assert [s.block.num_stages for s in ops._shared_stages((big, small), 128, 2, None)] == [4, 4]


class _Gpu:
  platform = "gpu"
  device_kind = "a GPU"

  def __init__(self, capability):
    self.compute_capability = capability


@pytest.mark.parametrize("capability,limit", [("7.5", 64 * KB), ("8.0", 163 * KB), ("8.6", 99 * KB),
                                              ("8.9", 99 * KB), ("9.0", 227 * KB), ("10.0", 227 * KB),
                                              ("12.0", 99 * KB), ("99.9", ops.SHARED_MEMORY_UNKNOWN),
                                              ("gfx942", ops.SHARED_MEMORY_UNKNOWN)])
def test_shared_memory_limit_by_compute_capability(monkeypatch, capability, limit):
  assert ops.shared_memory_limit() is None  # CPU: the interpreter has no limit
  monkeypatch.setattr(jax, "devices", lambda *a: [_Gpu(capability)])
  assert ops.shared_memory_limit() == limit
  assert ops._measured_layout() == capability.startswith("9.")
  # where the count was not measured, the tile also leaves room for the scores
  block = ops.choose_block(64, 64, 1, 1, 4096, 128, shared_launch=False, shared_memory=limit,
                           tuning=tuning.for_device_kind("NVIDIA H100 80GB HBM3"))
  assert ops.tile_shared_memory(block, 128, 2, exact=ops._measured_layout()) <= limit


def test_off_a_hopper_the_tile_keeps_room_for_the_scores(monkeypatch):
  """An A100 (163 KB): the H100's 128-row tile of a level alone (128 keys, 3 stages, 224 KB) drops to 2 stages and,
  with the scores' margin (64 KB at 128 x 128 in float32), to 64 keys a step; a Hopper of the same limit would keep
  128 keys (160 KB)."""
  tune = tuning.for_device_kind("NVIDIA H100 80GB HBM3")
  kw = dict(max_rows=128, total_rows=128, num_groups=1, num_heads=8, num_keys=4096, head_dim=128,
            shared_launch=False, tuning=tune)
  monkeypatch.setattr(jax, "devices", lambda *a: [_Gpu("8.0")])
  a100 = ops.choose_block(**kw)
  assert (a100.block_m, a100.block_k, a100.num_stages) == (128, 64, 2)
  monkeypatch.setattr(jax, "devices", lambda *a: [_Gpu("9.0")])
  hopper = ops.choose_block(**kw, shared_memory=163 * KB)
  assert (hopper.block_m, hopper.block_k, hopper.num_stages) == (128, 128, 2)


def test_run_launches_with_stages_every_level_fits(monkeypatch):
  """`ops.run` fuses a 64-row level of 2 stages with a 16-row one of 4: the launch would run both with 4 stages,
  73728 bytes for the first at D = 64 in bf16; under a 64 KB limit it runs with 3 (57344)."""
  monkeypatch.setattr(ops, "shared_memory_limit", lambda: 64 * KB)
  launched = []

  def record(q, works, *, specs, **kw):
    launched.append([spec.block.num_stages for spec in specs])
    return fused_levels(q, works, specs=specs, **kw)

  fused_levels = ops.fused_levels
  monkeypatch.setattr(ops, "fused_levels", record)
  keys = jax.random.split(jax.random.PRNGKey(5), 5)
  q = normal(keys[0], (4, 4, 4, 64), jnp.bfloat16)
  pk, pv = (normal(key, (1, 70, 4, 64), jnp.bfloat16) for key in keys[1:3])
  sk, sv = (normal(key, (4, 40, 4, 64), jnp.bfloat16) for key in keys[3:5])
  prefix = ops.batched(q, pk, pv, jnp.array([70]), np.zeros(4, np.int32), max_group=None, causal=False,
                       block=BlockConfig(block_m=64, block_k=64, num_stages=2))
  suffix = ops.per_sequence(q, sk, sv, jnp.array([40, 3, 17, 9]), causal=True,
                            block=BlockConfig(block_m=16, block_k=32, num_stages=4))
  parts = ops.run(q, [prefix, suffix], scale=0.125, interpret=True, launch="fused")
  assert launched == [[3, 3]]
  out, _ = merge_states(parts)
  want = _prefix_then_suffix(q.astype(jnp.float32), pk.astype(jnp.float32), pv.astype(jnp.float32), 70,
                             sk.astype(jnp.float32), sv.astype(jnp.float32), jnp.array([40, 3, 17, 9]), 0.125)
  chex.assert_trees_all_close(out.astype(jnp.float32), want, **tol(jnp.bfloat16))


def test_a_given_tiling_over_the_shared_memory_is_warned(monkeypatch):
  q = jnp.zeros((2, 1, 4, 128), jnp.bfloat16)
  k = jnp.zeros((2, 256, 4, 128), jnp.bfloat16)
  big = BlockConfig(block_m=64, block_k=64, num_stages=3)  # 114688 bytes
  monkeypatch.setattr(ops, "shared_memory_limit", lambda: 227 * KB)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    ops.per_sequence(q, k, k, jnp.array([256, 9]), causal=True, block=big)
  monkeypatch.setattr(ops, "shared_memory_limit", lambda: 99 * KB)
  with pytest.warns(UserWarning, match=r"needs up to 114688 bytes of shared memory; this GPU allows 101376"):
    ops.per_sequence(q, k, k, jnp.array([256, 9]), causal=True, block=big)
  with pytest.warns(UserWarning, match="needs up to 114688 bytes"):
    ops.batched(q, k[:1], k[:1], jnp.array([256]), np.zeros(2, np.int32), max_group=None, causal=False, block=big)


def _tree_step(key, dtype, b, t, hq, hkv, d, prefix_lengths, mid_lengths, suffix_lengths, blocks):
  """q and the plans of a three-level step (a prefix node shared by all, two middle nodes, each sequence's causal
  suffix) tiled `blocks` (prefix, middle, suffix), and the reference's (out, lse)."""
  keys = jax.random.split(key, 7)
  q = normal(keys[0], (b, t, hq, d), dtype)
  pk, pv = normal(keys[1], (1, 45, hkv, d), dtype), normal(keys[2], (1, 45, hkv, d), dtype)
  mk, mv = normal(keys[3], (2, 23, hkv, d), dtype), normal(keys[4], (2, 23, hkv, d), dtype)
  sk, sv = normal(keys[5], (b, 19, hkv, d), dtype), normal(keys[6], (b, 19, hkv, d), dtype)
  mid = np.arange(b, dtype=np.int32) % 2
  plans = [ops.batched(q, pk, pv, jnp.array(prefix_lengths), np.zeros(b, np.int32), max_group=None, causal=False,
                       block=blocks[0]),
           ops.batched(q, mk, mv, jnp.array(mid_lengths), mid, max_group=None, causal=False, block=blocks[1]),
           ops.per_sequence(q, sk, sv, jnp.array(suffix_lengths), causal=True, block=blocks[2])]
  q32, scale = q.astype(jnp.float32), d**-0.5
  return q, plans, reference.merge_states([  # the reference's levels (shared ones fully visible), merged
      reference.shared_attention(q32, pk[0], pv[0], prefix_lengths[0], scale=scale),
      reference.attention(q32, mk[mid], mv[mid], jnp.array(mid_lengths)[mid], causal=False, scale=scale),
      reference.attention(q32, sk, sv, jnp.array(suffix_lengths), causal=True, scale=scale)])


# CI, where a shipped tuning file sets `launch_merge_max_rows` (0 in both today: the slow tier): one case a launch
# form (CI time ~8 s a case); the rest of the grid with --all, every case compiled on the GPU
@ci_if_shipped("launch_merge_max_rows")
@pytest.mark.parametrize("gqa,dtype,launch", grid([(4, 4), (8, 2), (8, 1)], [jnp.float32, jnp.bfloat16],
                                                  ["fused", "interleaved"],
                                                  ids=[lambda g: f"hq{g[0]}hkv{g[1]}", lambda d: d.__name__, str],
                                                  ci=("hq8hkv2-bfloat16-interleaved", "hq4hkv4-float32-fused")))
def test_launch_merges_its_parts(kernel_backend, gqa, dtype, launch):
  """merge=True: the program that writes a row's last part merges every part of it in the launch: the same out and
  lse as `merge_states` over the launch's parts, and as the reference's levels merged.
  Three levels (prefix, two middle nodes, suffixes) with key splits, two query tokens, packed heads, an empty middle
  node and an empty suffix, and a sequence whose query sees no key at all (every part empty: out 0, lse -inf)."""
  hq, hkv = gqa
  b, t, d = 6, 2, 64
  blocks = (BlockConfig(block_m=16, block_k=16, splits=3), BlockConfig(block_m=16, block_k=16, splits=2),
            BlockConfig(block_m=16, block_k=16, splits=2, heads=2 if hkv % 2 == 0 else 1))
  q, plans, (ref_out, ref_lse) = _tree_step(jax.random.PRNGKey(11), dtype, b, t, hq, hkv, d, [45], [23, 0],
                                            [19, 0, 1, 7, 12, 2], blocks)
  interpret = kernel_backend == "interpret"
  parts = ops.run(q, plans, scale=d**-0.5, interpret=interpret, launch=launch)
  merged = ops.run(q, plans, scale=d**-0.5, interpret=interpret, launch=launch, merge=True)
  assert len(parts) == 7 and len(merged) == 1
  out, lse = merged[0]
  assert out.dtype == q.dtype and lse.dtype == jnp.float32
  by_xla = merge_states(parts)
  chex.assert_trees_all_close(out.astype(jnp.float32), by_xla[0].astype(jnp.float32), **tol(dtype))
  chex.assert_trees_all_close(lse, by_xla[1], **tol(dtype))
  assert_close_to_reference(out, lse, ref_out, ref_lse, dtype)


@ci_if_shipped("launch_merge_max_rows")
def test_launch_merges_empty_rows_to_zero():
  """Every part of every row empty (the prefix's and the suffixes' lengths 0, the caches not): out 0, lse -inf, no
  NaN, with the merge in the launch."""
  b, hq, hkv, d = 3, 4, 2, 16
  q = jnp.ones((b, 1, hq, d))
  k = jnp.full((b, 8, hkv, d), jnp.nan)  # never read: no key is valid
  plans = [ops.batched(q, k[:1], k[:1], jnp.array([0]), np.zeros(b, np.int32), max_group=None, causal=False,
                       block=BlockConfig(block_m=16, block_k=16, splits=2)),
           ops.per_sequence(q, k, k, jnp.zeros(b, jnp.int32), causal=True, block=BlockConfig(16, 16))]
  (out, lse), = ops.run(q, plans, scale=0.25, interpret=True, merge=True)
  assert bool(jnp.all(out == 0)) and bool(jnp.all(lse == -jnp.inf))


@ci_if_shipped("launch_merge_max_rows")
def test_run_merges_in_the_launch_only_where_it_has_parts_to_merge():
  """merge=True with one part (one level, no splits) or one launch per level ("separate"): the parts as without
  it (the separate launches cannot count each other's parts)."""
  keys = jax.random.split(jax.random.PRNGKey(12), 3)
  b, hq, hkv, d = 2, 4, 2, 16
  q = normal(keys[0], (b, 1, hq, d), jnp.float32)
  k, v = normal(keys[1], (b, 20, hkv, d), jnp.float32), normal(keys[2], (b, 20, hkv, d), jnp.float32)
  one = ops.per_sequence(q, k, v, jnp.array([20, 3]), causal=True, block=BlockConfig(16, 16))
  two = ops.per_sequence(q, k, v, jnp.array([20, 3]), causal=True, block=BlockConfig(16, 16, splits=2))
  assert len(ops.run(q, [one], scale=0.25, interpret=True, merge=True)) == 1
  assert len(ops.run(q, [two], scale=0.25, interpret=True, merge=True)) == 1  # merged: one part
  assert len(ops.run(q, [two, one], scale=0.25, interpret=True, merge=True, launch="separate")) == 3


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU: races show only when programs run at once")
def test_launch_merge_has_no_race_on_the_gpu():
  """MHA decode at B = 64 (the step the merge in the launch is for: 2048 rows, prefix and suffix programs running
  together on every SM, 6 parts a row) and GQA at B = 128, merged in the launch 30 times each: every run equal to
  `merge_states` over the same launch's parts (a row merged before all its parts landed would differ)."""
  for b, hq, hkv, p, s in ((64, 32, 32, 1024, 512), (128, 32, 8, 2048, 256)):
    keys = jax.random.split(jax.random.PRNGKey(b), 5)
    q = normal(keys[0], (b, 1, hq, 128), jnp.bfloat16)
    pk, pv = normal(keys[1], (1, p, hkv, 128), jnp.bfloat16), normal(keys[2], (1, p, hkv, 128), jnp.bfloat16)
    sk, sv = normal(keys[3], (b, s, hkv, 128), jnp.bfloat16), normal(keys[4], (b, s, hkv, 128), jnp.bfloat16)
    lengths = jnp.arange(b, dtype=jnp.int32) * 7 % s + 1

    def step(q, pk, pv, sk, sv, lengths, merge):
      plans = [ops.batched(q, pk, pv, jnp.array([p]), np.zeros(b, np.int32), max_group=None, causal=False,
                           block=BlockConfig(64, 64, splits=4, num_stages=3)),
               ops.per_sequence(q, sk, sv, lengths, causal=True, block=ops.choose_block(
                   hq // hkv, b * hq // hkv, b, hkv, s, 128))]
      parts = ops.run(q, plans, scale=128**-0.5, interpret=False, merge=merge)
      return parts[0] if merge else merge_states(parts)

    merged = jax.jit(functools.partial(step, merge=True))
    want = jax.jit(functools.partial(step, merge=False))(q, pk, pv, sk, sv, lengths)
    for _ in range(30):
      out, lse = merged(q, pk, pv, sk, sv, lengths)
      chex.assert_trees_all_close(out.astype(jnp.float32), want[0].astype(jnp.float32), **tol(jnp.bfloat16))
      chex.assert_trees_all_close(lse, want[1], **tol(jnp.bfloat16))


@ci_if_shipped("launch_merge_max_rows")
def test_launch_merge_lowers_for_cuda(capsys):
  """The merge in the launch (the masked atomic count, barriers, volatile loads) lowers to Triton for an H100
  without one (an abstract device; Pallas's lowering rules run, not Triton's compiler): one kernel, its count
  aliased in place, and every atomic add of its Triton IR (printed by pallas_call's debug) a float add on float32
  pointers. (Pallas 0.11.2 lowers an int32 tensor's atomic add as a float add of its bits: an int32 count never grew
  on the GPU, while the interpreter counted right.)"""
  b, hq, hkv, d = 8, 8, 2, 64
  s = lambda *shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype)

  def step(q, pk, pv, sk, sv, lengths):
    plans = [ops.batched(q, pk, pv, jnp.array([96]), np.zeros(b, np.int32), max_group=None, causal=False,
                         block=BlockConfig(16, 32, splits=2)),
             ops.per_sequence(q, sk, sv, lengths, causal=True, block=BlockConfig(16, 32, splits=2, heads=2))]
    return ops.run(q, plans, scale=0.125, interpret=False, merge=True)

  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="cuda")
  debug = functools.partial(flash.pl.pallas_call, debug=True)
  with (jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)),
        mock.patch.object(flash.pl, "pallas_call", debug)):
    traced = jax.jit(step).trace(s(b, 1, hq, d), s(1, 96, hkv, d), s(1, 96, hkv, d), s(b, 40, hkv, d),
                                 s(b, 40, hkv, d), s(b, dtype=jnp.int32))
    text = traced.lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 1 and "output_operand_alias" in text, text[:2000]
  atomics = [line for line in capsys.readouterr().out.splitlines() if "tt.atomic_rmw" in line]
  assert len(atomics) == 4, atomics  # per level: the count's add, and the merging program's add of 0
  assert all("tt.atomic_rmw fadd" in a and "!tt.ptr<f32>>, tensor<16xf32>" in a for a in atomics), atomics
