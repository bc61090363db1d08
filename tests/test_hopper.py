"""The Hopper (Mosaic GPU) kernel: its two parts against the reference, the whole step against attention over the
concatenated KV, its fallback where it does not apply. Interpreted on CPU (Mosaic GPU's interpreter), compiled on
the GPU (an H100-class one: wgmma and TMA)."""

from __future__ import annotations

import dataclasses
import re
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hydragen_jax as hj
from hydragen_jax import dispatch, reference, tuning
from hydragen_jax.kernels import hopper, ops
from tests.attention_cases import assert_close_to_reference, expected_tree, normal, random_level, tol
from tests.conftest import ci_if_shipped

requires_hopper = pytest.mark.skipif(not dispatch.on_hopper(),
                                     reason="needs a Hopper GPU (H100/H200): the compiled kernel uses wgmma and TMA")
MOSAIC = [pytest.param("interpret-mosaic", id="interpret"),
          pytest.param("mosaic", id="compiled", marks=[pytest.mark.gpu, requires_hopper])]

# (B, T, Hq, Hkv, D, P, S): GQA groups 4 / 8 / 1 / 4 / 4, T·g = 4, 16, 4, 12, 4 (query windows of 8, 16, 8, 16 and
# 8 rows), head dims 64 and 128, capacities multiples of 8 that end inside a 64-key tile, or a whole tile, or under 8.
SHAPES = [
    (3, 1, 8, 2, 64, 40, 16),
    (5, 2, 8, 1, 128, 136, 72),
    (9, 4, 4, 4, 128, 64, 24),
    (3, 3, 8, 2, 64, 8, 64),
    (4, 1, 8, 2, 128, 4, 1),  # capacities under one 8-row tile (a decode step's first suffix token)
]


# T·g = 1's settings on the H200 (128-key tiles, q in registers, the suffix ring across items, trimmed tiles)
MHA_DECODE = dict(prefix_stages=2, suffix_stages=2, prefix_keys=128, q_registers=True, suffix_lookahead=True,
                  suffix_trim=True)


def _inputs(shape, dtype, seed=0):
  b, t, hq, hkv, d, p, s = shape
  keys = jax.random.split(jax.random.PRNGKey(seed), 5)
  q = normal(keys[0], (b, t, hq, d), dtype)
  pk, pv = normal(keys[1], (p, hkv, d), dtype), normal(keys[2], (p, hkv, d), dtype)
  sk, sv = normal(keys[3], (b, s, hkv, d), dtype), normal(keys[4], (b, s, hkv, d), dtype)
  return q, pk, pv, sk, sv


def _close(out, lse, ref_out, ref_lse, dtype):
  """As `assert_close_to_reference`, and lse -inf exactly where the reference row saw no key."""
  np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(ref_lse))
  assert_close_to_reference(out, lse, ref_out, ref_lse, dtype)


def _shape_id(s):
  return "B{}T{}Hq{}Hkv{}D{}P{}S{}".format(*s)


def _cases(argnames: str, values: list, ids: list, slow: tuple = ()) -> tuple:
  """`pytest.mark.parametrize`'s arguments for `values` named `ids`, those in `slow` marked slow: interpreted only
  by `scripts/test.sh --all` (CI time: an interpreted case takes 5-15 s of CPU), compiled on the GPU as the rest."""
  assert set(slow) <= set(ids), set(slow) - set(ids)
  single = "," not in argnames
  return argnames, [pytest.param(*((v,) if single else v), id=i, marks=pytest.mark.slow if i in slow else ())
                    for v, i in zip(values, ids)]


# bf16 and f16 on every shape, compiled; interpreted, bf16 on every shape and f16 on two (a D = 64 and a D = 128
# one) with --all. CI leaves out the longest shape (T·g = 4 as shape 0, ~15 s), shape 0 in bf16 (f16 runs it: the
# kernel's code is the same for both 16-bit types) and shape 1 in bf16 (test_step_equals_attention_over_concatenated_kv
# runs it): each interpreted case costs ~10 s of CI.
_DTYPE_SLOW = {("bf16", SHAPES[0]), ("bf16", SHAPES[1]), ("bf16", SHAPES[2]), ("f16", SHAPES[2])}
DTYPE_CASES = [pytest.param(s, dtype, id=f"{name}-{_shape_id(s)}",
                            marks=pytest.mark.slow if (name, s) in _DTYPE_SLOW else ())
               for name, dtype in (("bf16", jnp.bfloat16), ("f16", jnp.float16)) for s in SHAPES]
F16_INTERPRETED = (SHAPES[0], SHAPES[2])


@pytest.mark.parametrize("backend", MOSAIC)
@pytest.mark.parametrize("shape,dtype", DTYPE_CASES)
def test_parts_match_reference(backend, shape, dtype):
  """Prefix part and suffix part, each against the reference; ragged suffixes with empty ones and ones shorter
  than T, a prefix that ends inside a key tile."""
  if backend.startswith("interpret") and dtype == jnp.float16 and shape not in F16_INTERPRETED:
    pytest.skip("f16 is interpreted on two shapes only, one in CI (the same code as bf16; CI time); compiled on all")
  b, t, _, _, d, p, s = shape
  q, pk, pv, sk, sv = _inputs(shape, dtype)
  lengths = jnp.asarray(np.random.default_rng(1).integers(0, s + 1, b), jnp.int32).at[0].set(s).at[1].set(0)
  plen = jnp.int32(p - 3)
  assert hopper.supported(q, pk, sk) is None
  (po, pl_), (so, sl) = jax.jit(lambda *a: hopper.prefix_suffix_attention(
      *a, scale=d**-0.5, interpret=backend.startswith("interpret")))(q, pk, pv, plen, sk, sv, lengths)
  _close(po, pl_, *reference.shared_attention(q, pk, pv, plen, scale=d**-0.5), dtype)
  _close(so, sl, *reference.attention(q, sk, sv, lengths, causal=True, scale=d**-0.5), dtype)


# T·g not a multiple of 4: MHA decode (1), T = 2 or 3 with MHA, T = 3 with g = 2 (a window of 8 or 16 rows at any
# offset; the suffix lse leaves the kernel as whole windows).
ODD_ROWS = [
    (5, 1, 2, 2, 64, 40, 16),
    (7, 2, 4, 4, 128, 64, 24),
    (3, 3, 2, 2, 64, 16, 72),
    (6, 3, 4, 2, 64, 24, 16),
]


@pytest.mark.parametrize("backend", MOSAIC)
@pytest.mark.parametrize(*_cases("shape", ODD_ROWS, [_shape_id(s) for s in ODD_ROWS],
                                 slow=(_shape_id(ODD_ROWS[0]), _shape_id(ODD_ROWS[1]), _shape_id(ODD_ROWS[3]))))
def test_parts_match_reference_with_rows_not_a_multiple_of_4(backend, shape):
  """As above for T·g = 1, 2, 3, 6: every sequence's rows at their own offset of an 8-aligned window."""
  b, t, _, _, d, p, s = shape
  q, pk, pv, sk, sv = _inputs(shape, jnp.bfloat16, seed=4)
  lengths = jnp.asarray(np.random.default_rng(4).integers(0, s + 1, b), jnp.int32).at[0].set(s).at[1].set(0)
  assert hopper.supported(q, pk, sk) is None
  (po, pl_), (so, sl) = jax.jit(lambda *a: hopper.prefix_suffix_attention(
      *a, scale=d**-0.5, interpret=backend.startswith("interpret")))(q, pk, pv, jnp.int32(p - 5), sk, sv, lengths)
  _close(po, pl_, *reference.shared_attention(q, pk, pv, jnp.int32(p - 5), scale=d**-0.5), jnp.bfloat16)
  _close(so, sl, *reference.attention(q, sk, sv, lengths, causal=True, scale=d**-0.5), jnp.bfloat16)


def _ships(config: hopper.HopperConfig) -> bool:
  """Whether a shipped tuning file (of any known device kind) has the Hopper setting `config` (its CTAs aside)."""
  setting = {f.name: getattr(config, f.name) for f in dataclasses.fields(tuning.HopperTuning)}
  files = [tuning.file_for(kind).tuning for kind in tuning.known_kinds()]
  return any(dataclasses.asdict(s) == setting for t in files for entries in (t.hopper, t.hopper_long)
             for _, s in entries)


MHA_DECODE_CONFIGS = {
    "default": hopper.HopperConfig(num_ctas=132),
    "lookahead": hopper.HopperConfig(num_ctas=132, prefix_stages=2, suffix_stages=3, suffix_lookahead=True),
    "trim_lookahead_128prefixkeys": hopper.HopperConfig(num_ctas=132, **MHA_DECODE),
    "trim_128suffixkeys": hopper.HopperConfig(num_ctas=132, prefix_stages=2, suffix_stages=2, q_registers=True,
                                              suffix_keys=128, suffix_trim=True),
    "packed_h200": hopper.HopperConfig(num_ctas=132, suffix_pack=True, **MHA_DECODE),
    "packed_box_h200": hopper.HopperConfig(num_ctas=132, suffix_pack=True, suffix_box=True, **MHA_DECODE)}


# The packed settings (~7 s each) in the slow tier: CI lowers the shipped ones, packed in boxes, in
# test_shipped_mha_decode_settings_lower_for_cuda; so are the settings no tuning file ships (as conftest.ci_if_shipped
# does for options; CI time): a file that ships one brings its case back into CI.
@pytest.mark.parametrize(*_cases("config", list(MHA_DECODE_CONFIGS.values()), list(MHA_DECODE_CONFIGS),
                                 slow=("packed_h200", "packed_box_h200", *(
                                     name for name, c in MHA_DECODE_CONFIGS.items() if not _ships(c)))))
def test_mha_decode_lowers_for_cuda(config):
  """The e2e shape that motivates T·g = 1 (7B MHA, B = 512, a 16K prefix) lowers to Mosaic GPU for CUDA on any
  machine (TMA copies and shared memory accepted by its lowering; the compiled check is the GPU test above)."""
  _assert_lowers_for_cuda(config, batch=512, heads=32, kv_heads=32, prefix=16384, suffix=144)


def _assert_lowers_for_cuda(config, *, batch, heads, kv_heads, prefix, suffix):
  """The kernel with `config` for queries `[batch, 1, heads, 128]` (bf16) over a prefix and suffix caches of those
  capacities lowers to Mosaic GPU for CUDA (checked on any machine); returns the lowered text."""
  q = jax.ShapeDtypeStruct((batch, 1, heads, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((prefix, kv_heads, 128), jnp.bfloat16)
  skv = jax.ShapeDtypeStruct((batch, suffix, kv_heads, 128), jnp.bfloat16)
  assert hopper.supported(q, kv, skv, config) is None
  step = jax.jit(lambda *a: hopper.prefix_suffix_attention(*a, scale=0.1, config=config))
  traced = step.trace(q, kv, kv, jax.ShapeDtypeStruct((), jnp.int32), skv, skv,
                      jax.ShapeDtypeStruct((batch,), jnp.int32))
  text = traced.lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text
  return text


def test_layers_share_one_compiled_kernel():
  """Three layers of the same shapes (as a model's decode step calls them) carry one Mosaic GPU module, one kernel
  hash: compiled once, not once per layer (inlined, each call site had a module and a compile of its own: 77 s of
  decode compile for the 32-layer 7B step on the H200)."""
  b, p, s, heads, d = 64, 1024, 64, 8, 128
  q = jax.ShapeDtypeStruct((b, 1, heads, d), jnp.bfloat16)
  pkv = jax.ShapeDtypeStruct((1, p, heads, d), jnp.bfloat16)
  skv = jax.ShapeDtypeStruct((b, s, heads, d), jnp.bfloat16)

  def layers(q, pk, pv, sk, sv, lengths):
    for layer in range(3):
      prefix = hj.Level(pk, pv, jnp.full((1,), p, jnp.int32), jnp.zeros((b,), jnp.int32), b)
      q = (hj.tree_attention(q, [prefix, hj.Level(sk, sv, lengths)], backend="mosaic") * (layer + 1)).astype(q.dtype)
    return q

  with hj.lowering_for_gpu():  # "mosaic" traced off a GPU, to lower for one
    traced = jax.jit(layers).trace(q, pkv, pkv, skv, skv, jax.ShapeDtypeStruct((b,), jnp.int32))
  text = traced.lower(lowering_platforms=("cuda",)).as_text()
  hashes = re.findall(r'kernel_hash = "([^"]*)"', text)
  assert len(hashes) == 1, f"{len(set(hashes))} distinct kernels in {len(hashes)} Mosaic GPU calls"


@pytest.mark.parametrize("backend", MOSAIC)
@pytest.mark.parametrize(*_cases("config", [hopper.HopperConfig(num_ctas=1), hopper.HopperConfig(num_ctas=2, pingpong=False),
                                    hopper.HopperConfig(num_ctas=2, prefix_stages=2, suffix_stages=1, prefix_keys=128),
                                    hopper.HopperConfig(num_ctas=2, q_registers=True),
                                    hopper.HopperConfig(num_ctas=2, prefix_stages=2, suffix_stages=2, prefix_keys=128,
                                                        q_registers=True),
                                    hopper.HopperConfig(num_ctas=2, cluster=2),
                                    hopper.HopperConfig(num_ctas=2, prefix_stages=2, suffix_stages=2, suffix_keys=128,
                                                        q_registers=True),
                                    hopper.HopperConfig(num_ctas=4, prefix_stages=2, suffix_stages=2, prefix_keys=128,
                                                        q_registers=True, cluster=2)],
                                 ["1cta", "2cta_nopingpong", "2cta_128keys", "2cta_qregisters", "2cta_128keys_qregisters",
                                  "1cluster", "2cta_128suffixkeys_qregisters", "2clusters_128keys_qregisters"],
                                 # all slow (CI time): CI's packed-item tests run several items a CTA (1-3 CTAs)
                                 slow=("1cta", "2cta_nopingpong", "2cta_128keys", "2cta_qregisters",
                                       "2cta_128keys_qregisters", "1cluster", "2cta_128suffixkeys_qregisters",
                                       "2clusters_128keys_qregisters")))
def test_several_items_per_cta(backend, config):
  """Few CTAs: each runs several prefix items (the pair's ring runs on across items) and suffix items (buffers
  reused after the previous item's stores), with and without the ping-pong, with q in shared memory or registers
  (q_registers: each item's out and lse stored before the next item's), alone or in 2-CTA clusters that share
  each prefix tile (cluster: the ring's slots refilled once both CTAs have read them; 4 item pairs, for one or two
  clusters)."""
  shape = (40, 3, 8, 2, 64, 136, 72)  # 480 rows per KV head: 4 blocks of 128, 8 prefix items; 80 suffix items
  b, t, _, _, d, p, s = shape
  q, pk, pv, sk, sv = _inputs(shape, jnp.bfloat16, seed=2)
  lengths = jnp.asarray(np.random.default_rng(2).integers(0, s + 1, b), jnp.int32)
  (po, pl_), (so, sl) = jax.jit(lambda *a: hopper.prefix_suffix_attention(
      *a, scale=d**-0.5, config=config, interpret=backend.startswith("interpret")))(
          q, pk, pv, jnp.int32(p - 1), sk, sv, lengths)
  _close(po, pl_, *reference.shared_attention(q, pk, pv, jnp.int32(p - 1), scale=d**-0.5), jnp.bfloat16)
  _close(so, sl, *reference.attention(q, sk, sv, lengths, causal=True, scale=d**-0.5), jnp.bfloat16)


@pytest.mark.parametrize("backend", MOSAIC)
@pytest.mark.parametrize(*_cases("shape,config,plen", [
    # 3 splits of one 128-key tile each: the second sees 5 keys, the third none (its tile lies past the cache:
    # it loads the cache's last tile, all masked); 2 CTAs for 24 prefix items (8 KV heads × 3 splits)
    ((9, 1, 8, 8, 128, 136, 24), hopper.HopperConfig(num_ctas=2, prefix_splits=3, **MHA_DECODE), 133),
    # 2 splits of 2 and 1 64-key tiles, the pair's ping-pong, 2-CTA clusters sharing each tile (the same split)
    ((40, 3, 8, 2, 64, 136, 72), hopper.HopperConfig(num_ctas=4, prefix_stages=2, prefix_splits=2, cluster=2), 135),
    # 3 splits with the value product issued under the next tile's scores and no ping-pong: the third split empty
    ((9, 1, 8, 8, 128, 136, 24), hopper.HopperConfig(num_ctas=2, prefix_splits=3, prefix_overlap=True,
                                                      pingpong=False, **MHA_DECODE), 133),
], ["3splits_mha_decode", "2splits_clusters", "3splits_overlap_nopingpong"],
   slow=("2splits_clusters", "3splits_overlap_nopingpong")))  # clusters: an option no tuning ships
def test_prefix_key_splits_match_reference(backend, shape, config, plen):
  """prefix_splits: one prefix part a split (merged here), uneven and empty splits; the suffix part unchanged."""
  b, t, _, _, d, p, s = shape
  q, pk, pv, sk, sv = _inputs(shape, jnp.bfloat16, seed=6)
  lengths = jnp.asarray(np.random.default_rng(6).integers(0, s + 1, b), jnp.int32).at[1].set(0)
  assert hopper.supported(q, pk, sk, config) is None
  parts = jax.jit(lambda *a: hopper.prefix_suffix_attention(
      *a, scale=d**-0.5, config=config, interpret=backend.startswith("interpret")))(
          q, pk, pv, jnp.int32(plen), sk, sv, lengths)
  assert len(parts) == config.prefix_splits + 1
  po, pl_ = reference.merge_states(parts[:-1])
  _close(po, pl_, *reference.shared_attention(q, pk, pv, jnp.int32(plen), scale=d**-0.5), jnp.bfloat16)
  _close(*parts[-1], *reference.attention(q, sk, sv, lengths, causal=True, scale=d**-0.5), jnp.bfloat16)
  if config.prefix_splits == 3:  # the third split (of 128 keys, from 256) holds no key: out 0, lse -inf
    assert bool(jnp.all(parts[2][1] == -jnp.inf)) and not bool(jnp.any(parts[2][0]))


# packed cases run compiled only (each interpreted case costs ~5 s of CI): capacity under 8 and T·g = 2
PACKED_COMPILED_ONLY = ((4, 1, 8, 2, 128, 4, 1), (7, 2, 4, 4, 128, 64, 24))


@pytest.mark.parametrize("backend", MOSAIC)
@pytest.mark.parametrize(*_cases("shape,config", [
    # T·g = 4: 2 sequences an item, capacity under one 8-row tile
    ((4, 1, 8, 2, 128, 4, 1), hopper.HopperConfig(num_ctas=2, suffix_pack=True)),
    # T·g = 2, causal (T = 2): 4 sequences an item, the last window partly past B; T·g = 1's H200 settings (the
    # ring across items, 128-key prefix tiles, q in registers; suffix_trim set but not applied to packed items)
    ((7, 2, 4, 4, 128, 64, 24), hopper.HopperConfig(num_ctas=1, suffix_pack=True, **MHA_DECODE)),
    # T·g = 1: 8 sequences an item of 16 keys each a 128-key tile, several tiles and items a CTA, B not a
    # multiple of 8
    ((19, 1, 4, 4, 64, 40, 72), hopper.HopperConfig(num_ctas=3, suffix_pack=True, suffix_keys=128,
                                                     suffix_lookahead=True)),
    # T·g = 4 from T = 2, g = 2 (causal with a GQA group: query t = (r mod 4) // 2 of sequence r // 4)
    ((5, 2, 4, 2, 64, 8, 40), hopper.HopperConfig(num_ctas=2, suffix_pack=True)),
    # B = 3 < 8 sequences a window (the window's last 5 sub-blocks never copied), capacity 5 under one sub-block
    ((3, 1, 4, 4, 64, 16, 5), hopper.HopperConfig(num_ctas=1, suffix_pack=True, suffix_lookahead=True)),
    # the H200's T·g = 4 setting: 128-key suffix tiles of 64 keys a sequence, q in registers, 2 + 2 stages
    ((6, 1, 8, 2, 128, 40, 136), hopper.HopperConfig(num_ctas=2, prefix_stages=2, suffix_stages=2,
                                                      q_registers=True, suffix_keys=128, suffix_pack=True)),
], ["rows4_capacity1", "rows2_causal_lookahead", "rows1_several_tiles", "rows4_causal_gqa", "batch_under_pack",
    "rows4_h200"], slow=("rows4_causal_gqa", "rows1_several_tiles")))  # T·g = 1 packed: the suffix_box test
def test_packed_suffix_items_match_reference(backend, shape, config):
  """suffix_pack: the 8 / T·g sequences of a query window in one suffix item (a block-diagonal mask over their key
  sub-blocks): ragged lengths, an empty suffix, a full one; the prefix part unchanged."""
  if backend.startswith("interpret") and shape in PACKED_COMPILED_ONLY:
    pytest.skip("compiled only (CI time): the interpreted cases cover T·g = 1 and 4, causal, B < pack")
  b, t, _, _, d, p, s = shape
  q, pk, pv, sk, sv = _inputs(shape, jnp.bfloat16, seed=3)
  lengths = jnp.asarray(np.random.default_rng(3).integers(0, s + 1, b), jnp.int32).at[0].set(s).at[1].set(0)
  assert hopper.suffix_pack_of(t * q.shape[2] // pk.shape[1], config) == 8 // (t * q.shape[2] // pk.shape[1])
  assert hopper.supported(q, pk, sk, config) is None
  (po, pl_), (so, sl) = jax.jit(lambda *a: hopper.prefix_suffix_attention(
      *a, scale=d**-0.5, config=config, interpret=backend.startswith("interpret")))(
          q, pk, pv, jnp.int32(p - 3), sk, sv, lengths)
  _close(so, sl, *reference.attention(q, sk, sv, lengths, causal=True, scale=d**-0.5), jnp.bfloat16)
  _close(po, pl_, *reference.shared_attention(q, pk, pv, jnp.int32(p - 3), scale=d**-0.5), jnp.bfloat16)


@pytest.mark.parametrize("backend", MOSAIC)
@pytest.mark.parametrize(*_cases("shape,config", [
    # T·g = 1: 8 sequences a window, 16 keys each a 128-key tile; B = 19: the last window partly past the batch
    ((19, 1, 4, 4, 64, 40, 72), hopper.HopperConfig(num_ctas=3, suffix_pack=True, suffix_box=True,
                                                     suffix_keys=128)),
    # T·g = 1's H200 settings (the ring across items, 128-key prefix tiles, q in registers): 8 keys a sequence
    ((16, 1, 4, 4, 128, 64, 40), hopper.HopperConfig(num_ctas=2, suffix_pack=True, suffix_box=True, **MHA_DECODE)),
    # T·g = 4 (GQA), the H200's setting: 2 sequences a window, 64 keys each a 128-key tile
    ((6, 1, 8, 2, 128, 40, 136), hopper.HopperConfig(num_ctas=2, prefix_stages=2, suffix_stages=2,
                                                      q_registers=True, suffix_keys=128, suffix_pack=True,
                                                      suffix_box=True)),
    # T·g = 2 from T = 2 (causal): 4 sequences a window
    ((9, 2, 4, 4, 64, 8, 56), hopper.HopperConfig(num_ctas=2, suffix_pack=True, suffix_box=True)),
], ["rows1_128keys", "rows1_h200", "rows4_h200", "rows2_causal"], slow=("rows1_h200", "rows4_h200", "rows2_causal")))
def test_suffix_box_copies_live_tiles_at_once_and_never_reads_past_a_last_sub_block(backend, shape, config):
  """suffix_box: a packed tile in which every sequence has keys is one TMA box (sequences × keys × D), the others a
  copy a sequence. Most sequences are long (whole tiles as boxes), some end inside a tile, one is empty. The caches
  hold NaN past the last sub-block each sequence's own copies read (its length rounded up to the keys a sequence has
  in a tile): a box that took a sequence's sub-block where its copy would be skipped carries NaN into the window's
  output (a zero weight times NaN). Interpreted, a box is copied a sequence at a time (the interpreter takes no
  reshaped refs), so the box copy itself, its (1, 8, 64) tiling and its arrivals are checked compiled (the GPU
  tier) and by the lowering test; which tiles go as boxes is checked in both."""
  b, t, _, _, d, p, s = shape
  q, pk, pv, sk, sv = _inputs(shape, jnp.bfloat16, seed=5)
  rng = np.random.default_rng(5)
  lengths = np.where(rng.random(b) < 0.75, s - rng.integers(0, 3, b), rng.integers(0, s + 1, b))
  lengths = jnp.asarray(lengths, jnp.int32).at[1].set(0).at[2].set(s)
  pack = hopper.suffix_pack_of(t * q.shape[2] // pk.shape[1], config)
  kb = config.suffix_keys // pack  # keys of a sequence in a tile
  read = -(-lengths // kb) * kb
  poisoned = [jnp.where((jnp.arange(s)[None, :] >= read[:, None])[:, :, None, None], jnp.nan, x).astype(x.dtype)
              for x in (sk, sv)]
  past = (jnp.arange(s)[None, :] >= lengths[:, None])[:, :, None, None]
  assert pack > 1
  (po, pl_), (so, sl) = jax.jit(lambda *a: hopper.prefix_suffix_attention(
      *a, scale=d**-0.5, config=config, interpret=backend.startswith("interpret")))(
          q, pk, pv, jnp.int32(p - 3), *poisoned, lengths)
  clean = [jnp.where(past, 0, x).astype(x.dtype) for x in (sk, sv)]
  _close(so, sl, *reference.attention(q, *clean, lengths, causal=True, scale=d**-0.5), jnp.bfloat16)
  _close(po, pl_, *reference.shared_attention(q, pk, pv, jnp.int32(p - 3), scale=d**-0.5), jnp.bfloat16)


def test_packed_gqa_setting_lowers_for_cuda():
  """The H200's shipped setting for T·g = 4 (packed suffix items) on a GQA seed row's shapes lowers for CUDA."""
  config = dataclasses.replace(hopper.tuned_config(tuning.file_for("NVIDIA H200").tuning, rows=4), num_ctas=132)
  assert config.suffix_pack and hopper.suffix_pack_of(4, config) == 2
  _assert_lowers_for_cuda(config, batch=512, heads=32, kv_heads=8, prefix=2048, suffix=512)


@pytest.mark.parametrize("prefix", [4096, 16384])
def test_shipped_mha_decode_settings_lower_for_cuda(prefix):
  """The H200's T·g = 1 settings, a short prefix's (`hopper`) and a long one's (`hopper_long`), on the 7B MHA
  decode layer (B = 512) lower for CUDA; the long prefix takes 128-key prefix tiles, the short one 128-key suffix
  tiles."""
  h200 = tuning.file_for("NVIDIA H200").tuning
  config = dataclasses.replace(hopper.tuned_config(h200, rows=1, prefix=prefix), num_ctas=132)
  long = prefix >= h200.hopper_long_prefix > 0
  assert (config.prefix_keys, config.suffix_keys) == ((128, 64) if long else (64, 128))
  _assert_lowers_for_cuda(config, batch=512, heads=32, kv_heads=32, prefix=prefix, suffix=144)


def _shipped_settings():
  """(device kind, T·g, prefix) of every Hopper setting in the shipped tuning files: each entry of `hopper` and
  `hopper_long` at the first and the last T·g it serves (a setting may pack at one and not at the other; the last
  entry, open-ended, at its first), a short prefix or `hopper_long_prefix`."""
  cases = set()
  for kind in tuning.known_kinds():
    t = tuning.file_for(kind).tuning
    for entries, prefix in ((t.hopper, 2048), (t.hopper_long, t.hopper_long_prefix)):
      starts = [rows for rows, _ in entries]
      for first, end in zip(starts, starts[1:] + [starts[-1] + 1]):
        cases |= {(kind, first, prefix), (kind, end - 1, prefix)}
  return sorted(cases)


@pytest.mark.parametrize("kind,rows,prefix", _shipped_settings())
def test_every_shipped_setting_lowers_for_cuda(kind, rows, prefix):
  """Each setting a tuning file ships (a sweep may pick any candidate, e.g. packed boxes at T·g = 2) lowers for CUDA
  at the T·g it serves (4 KV heads, B = 256, a ragged 136-key suffix capacity) and is the one the kernel takes."""
  t = tuning.file_for(kind).tuning
  config = dataclasses.replace(hopper.tuned_config(t, rows=rows, prefix=prefix), num_ctas=132)
  assert config == hopper.HopperConfig(**dataclasses.asdict(t.hopper_for(rows, prefix)), num_ctas=132)
  _assert_lowers_for_cuda(config, batch=256, heads=4 * rows, kv_heads=4, prefix=prefix, suffix=136)


def test_suffix_pack_applies_where_a_window_holds_whole_sequences():
  """8 / T·g sequences an item for T·g = 1, 2, 4 with suffix_pack; one otherwise (or without it)."""
  packed, plain = hopper.HopperConfig(suffix_pack=True), hopper.HopperConfig()
  assert [hopper.suffix_pack_of(r, packed) for r in (1, 2, 3, 4, 6, 8, 16)] == [8, 4, 1, 2, 1, 1, 1]
  assert all(hopper.suffix_pack_of(r, plain) == 1 for r in (1, 2, 4))


def test_prefix_splits_follow_the_fill():
  """prefix_fill: below fill × CTAs items, splits doubled until items × splits reach the CTAs, each split keeping 2
  key tiles; at or above it, or with fill 0: none."""
  config = hopper.HopperConfig(num_ctas=132, prefix_keys=128, prefix_fill=1.0)
  q_shape = (64, 1, 32, 128)  # B = 64, MHA: 32 items (one 128-row block a KV head)
  assert hopper.prefix_splits_for(q_shape, 32, 4096, config) == 8  # 256 >= 132
  assert hopper.prefix_splits_for(q_shape, 32, 1024, config) == 4  # 4 splits of 2 tiles: no more
  assert hopper.prefix_splits_for(q_shape, 32, 511, config) == 1  # under 2 tiles a split at 2 splits
  assert hopper.prefix_splits_for((512, 1, 32, 128), 32, 4096, config) == 2  # 128 items: 256
  assert hopper.prefix_splits_for(q_shape, 32, 4096, dataclasses.replace(config, prefix_fill=0.0)) == 1
  three_quarters = dataclasses.replace(config, prefix_fill=0.75)  # the H200's: split below 99 items
  assert hopper.prefix_splits_for(q_shape, 32, 4096, three_quarters) == 8  # then up to the CTAs, not to 99
  assert hopper.prefix_splits_for((512, 1, 16, 128), 16, 16384, three_quarters) == 4  # 64 items: 256
  assert hopper.prefix_splits_for((512, 1, 32, 128), 32, 16384, three_quarters) == 1  # 128 items >= 99
  with pytest.raises(ValueError, match="prefix_splits must be None or a positive int; got 0"):
    hopper.HopperConfig(prefix_splits=0)
  with pytest.raises(ValueError, match="prefix_fill must be a finite number >= 0"):
    tuning.HopperTuning(2, 2, 208, 88, True, prefix_fill=-1.0)


def test_the_grid_has_no_more_ctas_than_items():
  """The persistent grid: one CTA per SM, but no more than the prefix items (KV head x split x 128-row block, whole
  clusters) or the suffix items (sequence or packed window x KV head), whichever are more; item i of each kind is
  CTA i's either way."""
  base = hopper.HopperConfig(num_ctas=132, prefix_splits=1, suffix_pack=False)
  q_shape = (5, 1, 8, 64)  # T·g = 4: 20 rows a KV head, one 128-row block; 5 suffix items a KV head
  assert hopper._busy_ctas(q_shape, 2, base) == 10  # suffixes: 5 x 2
  assert hopper._busy_ctas(q_shape, 2, dataclasses.replace(base, prefix_splits=3, cluster=2)) == 12  # 2 x 3 x 2
  assert hopper._busy_ctas(q_shape, 2, dataclasses.replace(base, suffix_pack=True)) == 6  # windows of 2: 3 x 2
  assert hopper._busy_ctas((1024, 1, 32, 128), 8, base) == 8192  # more items than SMs: the SMs bound it
  seen = {}
  real = hopper._prefix_suffix_attention
  with mock.patch.object(hopper, "_prefix_suffix_attention", lambda *a, config, **k: seen.update(
      config=config) or real(*a, config=config, **k)):
    q, pk, pv, sk, sv = _inputs((5, 1, 8, 2, 64, 40, 16), jnp.bfloat16)
    hopper.prefix_suffix_attention(q, pk, pv, jnp.int32(40), sk, sv, jnp.full((5,), 16, jnp.int32), scale=0.125,
                                   config=base, interpret=True)
  assert seen["config"].num_ctas == 10


@pytest.mark.parametrize("backend", MOSAIC)
@pytest.mark.parametrize(*_cases("shape", [SHAPES[1], ODD_ROWS[1]], [_shape_id(SHAPES[1]), _shape_id(ODD_ROWS[1])],
                                 slow=(_shape_id(ODD_ROWS[1]),)))
def test_queries_in_registers_match_reference(backend, shape):
  """q_registers with 128-key tiles (2 + 2 stages) at D = 128: T·g = 16 and 2, a prefix ending inside a tile, empty
  suffixes (D = 64 and several items a CTA: test_several_items_per_cta)."""
  b, t, _, _, d, p, s = shape
  q, pk, pv, sk, sv = _inputs(shape, jnp.bfloat16, seed=5)
  lengths = jnp.asarray(np.random.default_rng(5).integers(0, s + 1, b), jnp.int32).at[1].set(0)
  config = hopper.HopperConfig(prefix_stages=2, suffix_stages=2, prefix_keys=128, q_registers=True)
  assert hopper.supported(q, pk, sk, config) is None
  (po, pl_), (so, sl) = jax.jit(lambda *a: hopper.prefix_suffix_attention(
      *a, scale=d**-0.5, config=config, interpret=backend.startswith("interpret")))(
          q, pk, pv, jnp.int32(p - 3), sk, sv, lengths)
  _close(po, pl_, *reference.shared_attention(q, pk, pv, jnp.int32(p - 3), scale=d**-0.5), jnp.bfloat16)
  _close(so, sl, *reference.attention(q, sk, sv, lengths, causal=True, scale=d**-0.5), jnp.bfloat16)


def test_128_key_prefix_tiles_fit_only_with_fewer_stages():
  """128-key prefix tiles double a prefix stage (64 KB at D = 128): 2 prefix + 1 suffix stages fit, 2 + 2 do not
  (`supported` says so), and the field takes 64 or 128 only."""
  q = jax.ShapeDtypeStruct((256, 1, 32, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((4096, 8, 128), jnp.bfloat16)
  skv = jax.ShapeDtypeStruct((256, 512, 8, 128), jnp.bfloat16)
  fits = hopper.HopperConfig(num_ctas=132, prefix_stages=2, suffix_stages=1, prefix_keys=128)
  assert hopper.supported(q, kv, skv, fits) is None
  assert "shared memory" in hopper.supported(q, kv, skv, dataclasses.replace(fits, suffix_stages=2))
  with pytest.raises(ValueError, match="prefix_keys must be 64 or 128; got 96"):
    hopper.HopperConfig(prefix_keys=96)
  with pytest.raises(ValueError, match="HopperTuning.prefix_keys must be 64 or 128; got 32"):
    tuning.HopperTuning(2, 1, 208, 88, True, 32)
  step = jax.jit(lambda *a: hopper.prefix_suffix_attention(*a, scale=0.1, config=fits))
  traced = step.trace(q, kv, kv, jax.ShapeDtypeStruct((), jnp.int32), skv, skv,
                      jax.ShapeDtypeStruct((256,), jnp.int32))
  assert "mosaic_gpu" in traced.lower(lowering_platforms=("cuda",)).as_text()  # Mosaic GPU's own smem check too


@pytest.mark.parametrize("backend", MOSAIC)
@pytest.mark.parametrize(*_cases("shape,stages,keys", [
    ((40, 3, 8, 2, 64, 136, 72), 2, 64), ((13, 1, 4, 4, 128, 64, 264), 3, 64), ((9, 2, 8, 2, 64, 40, 200), 1, 64),
    ((13, 1, 4, 4, 128, 64, 264), 2, 128), ((7, 3, 16, 2, 128, 64, 136), 2, 128)],
    ["T3g4_2stages", "mha_3stages", "T2g4_1stage", "mha_128keys_2stages", "T3g8_128keys_2stages"],
    # off in every tuning since 2026-12-04: CI runs the ring (with suffix_trim) in the trim test's 64keys_lookahead
    slow=("T3g4_2stages", "mha_3stages", "T2g4_1stage", "mha_128keys_2stages", "T3g8_128keys_2stages")))
def test_suffix_lookahead_runs_the_ring_across_items(backend, shape, stages, keys):
  """suffix_lookahead: each CTA's suffix items share one stream of key tiles (the next item's tiles loaded into the
  slots the current one frees, its queries into a second buffer). Items with no tile, one tile, fewer tiles than
  stages and more, in every order; 2 CTAs, so each runs many items; suffix tiles of 64 and 128 keys (128: with q in
  registers, the shared memory 2 stages of them need), on query windows of 8 to 24 rows."""
  b, t, _, _, d, p, s = shape
  q, pk, pv, sk, sv = _inputs(shape, jnp.bfloat16, seed=6)
  lengths = jnp.asarray(np.random.default_rng(6).integers(0, s + 1, b), jnp.int32)
  lengths = lengths.at[0].set(0).at[1].set(1).at[2].set(s).at[3].set(0).at[4].set(64)
  config = hopper.HopperConfig(num_ctas=2, prefix_stages=2, suffix_stages=stages, suffix_lookahead=True,
                               suffix_keys=keys, q_registers=keys == 128)
  (po, pl_), (so, sl) = jax.jit(lambda *a: hopper.prefix_suffix_attention(
      *a, scale=d**-0.5, config=config, interpret=backend.startswith("interpret")))(
          q, pk, pv, jnp.int32(p - 1), sk, sv, lengths)
  _close(po, pl_, *reference.shared_attention(q, pk, pv, jnp.int32(p - 1), scale=d**-0.5), jnp.bfloat16)
  _close(so, sl, *reference.attention(q, sk, sv, lengths, causal=True, scale=d**-0.5), jnp.bfloat16)


@pytest.mark.parametrize("backend", MOSAIC)
@pytest.mark.parametrize(*_cases("shape,config", [
    ((13, 3, 8, 2, 64, 40, 200), dict(suffix_stages=2)),
    ((9, 1, 4, 4, 128, 40, 136), dict(suffix_stages=1)),
    ((6, 1, 8, 2, 128, 40, 136), dict(suffix_stages=2, q_registers=True, suffix_keys=128, suffix_pack=True,
                                      suffix_box=True)),
    ((19, 1, 4, 4, 64, 40, 72), dict(suffix_stages=3, suffix_pack=True, suffix_box=True, suffix_lookahead=True)),
    ((16, 1, 8, 2, 64, 40, 272), dict(suffix_stages=2, suffix_trim=True, suffix_lookahead=True)),
    ((5, 1, 8, 2, 128, 136, 200), dict(suffix_stages=2, prefix_keys=128, q_registers=True, suffix_pack=True)),
], ["T3g4_2stages", "mha_1stage", "rows4_128keys_boxed", "mha_packed_lookahead_3stages", "trim_lookahead",
    "rows4_128key_prefix_64key_suffix"],
   # CI: several tiles through a 2-slot ring unpacked (a 16-row window), and packed beside 128-key prefix tiles
   # (as the H200's long prefixes run it); the rest in the slow tier, and compiled
   slow=("mha_1stage", "rows4_128keys_boxed", "mha_packed_lookahead_3stages", "trim_lookahead")))
def test_suffix_late_sum_sums_each_item_once(backend, shape, config):
  """suffix_late_sum: the suffix softmax's running sum kept per score, rescaled with the max, summed over the keys
  after an item's last tile. Items of no key (sum 0: out 0, lse -inf), one key, a whole capacity and random
  lengths; rings of 1, 2 and 3 slots; unpacked (T·g = 12, a 16-row window) and packed (T·g = 1 and 4) items, boxed,
  trimmed, with the ring across items; 64- and 128-key suffix tiles, beside 128-key prefix tiles too. A sum that
  is not rescaled by α fails here."""
  b, t, _, _, d, p, s = shape
  q, pk, pv, sk, sv = _inputs(shape, jnp.bfloat16, seed=11)
  lengths = jnp.asarray(np.random.default_rng(11).integers(0, s + 1, b), jnp.int32)
  lengths = lengths.at[0].set(0).at[1].set(1).at[2].set(s)
  config = hopper.HopperConfig(**{"num_ctas": 2, "prefix_stages": 2, **config, "suffix_late_sum": True})
  assert hopper.supported(q, pk, sk, config) is None
  (po, pl_), (so, sl) = jax.jit(lambda *a: hopper.prefix_suffix_attention(
      *a, scale=d**-0.5, config=config, interpret=backend.startswith("interpret")))(
          q, pk, pv, jnp.int32(p - 1), sk, sv, lengths)
  _close(so, sl, *reference.attention(q, sk, sv, lengths, causal=True, scale=d**-0.5), jnp.bfloat16)
  _close(po, pl_, *reference.shared_attention(q, pk, pv, jnp.int32(p - 1), scale=d**-0.5), jnp.bfloat16)


def test_suffix_late_sum_lowers_for_cuda():
  """suffix_late_sum lowers to Mosaic GPU for CUDA: with the H200's short-prefix T·g = 4 setting (128-key suffix
  tiles, packed), where its kernel differs from the same setting's without it, and as the H200 ships it, in the
  long-prefix settings of T·g 1 (boxed, 8 sequences an item), 2 (unpacked) and 4 (128-key prefix tiles beside
  64-key suffix tiles), from `hopper_long_prefix` = 8192 keys (those lowered below)."""
  settings = tuning.file_for("NVIDIA H200").tuning
  config = dataclasses.replace(hopper.tuned_config(settings, rows=4), num_ctas=132)
  without, with_late_sum = (_assert_lowers_for_cuda(dataclasses.replace(config, suffix_late_sum=late), batch=512,
                                                    heads=32, kv_heads=8, prefix=2048, suffix=512)
                            for late in (False, True))
  assert without != with_late_sum
  assert settings.hopper_long_prefix == 8192
  for rows in (1, 2, 4):
    config = hopper.tuned_config(settings, rows=rows, prefix=8192)
    assert config.suffix_late_sum and config.prefix_keys == 128


@pytest.mark.slow  # CI lowers these settings in test_every_shipped_setting_lowers_for_cuda (at other head counts)
@pytest.mark.parametrize("rows,heads,kv_heads", [(1, 32, 32), (2, 16, 8), (4, 32, 8)])
def test_long_prefix_late_sum_settings_lower_for_cuda_at_the_seed_shapes(rows, heads, kv_heads):
  """The H200's long-prefix settings (the late sum, 128-key prefix tiles) at the 7B and GQA seed rows' heads."""
  config = dataclasses.replace(hopper.tuned_config(tuning.file_for("NVIDIA H200").tuning, rows=rows, prefix=8192),
                               num_ctas=132)
  _assert_lowers_for_cuda(config, batch=512, heads=heads, kv_heads=kv_heads, prefix=8192, suffix=512)


@ci_if_shipped("zero_value_tails")
@pytest.mark.parametrize("backend", MOSAIC)
@pytest.mark.parametrize(*_cases("shape,config", [
    # unpacked, T·g = 4 (an 8-row window), 64-key tiles through 3 prefix stages
    ((3, 1, 8, 2, 64, 40, 16), dict()),
    # packed, T·g = 4 from T = 2, g = 2 (causal): 2 sequences a window, sub-blocks of 32 keys
    ((5, 2, 4, 2, 64, 8, 40), dict(suffix_pack=True)),
    # the H200's T·g = 1 settings below 8K: 128-key prefix tiles (two 64-row chunks zeroed), q in registers, the
    # ring across items, trimmed last tiles (their stale rows too)
    ((16, 1, 4, 4, 128, 200, 40), dict(MHA_DECODE, suffix_stages=2)),  # the prefix's end in a 2nd 64-row chunk
    # packed in boxes, 128-key suffix tiles of 16 keys a sequence, the late sum (the H200's long T·g = 1 settings)
    ((19, 1, 4, 4, 64, 40, 72), dict(suffix_pack=True, suffix_box=True, suffix_keys=128, suffix_late_sum=True)),
    # the overlapped prefix loop (a tile's values zeroed one tile after its scores, in its masked loop and after
    # it), in 3 key splits (the last split's tiles past the end: zeroed in the loop)
    ((3, 1, 8, 2, 64, 296, 16), dict(prefix_overlap=True, prefix_stages=2, prefix_splits=3)),
    # the pair's early key release in a key ring longer than the value ring, prefix key splits (a split's last
    # tiles past the prefix's end: fully masked, values zeroed)
    ((4, 1, 8, 2, 64, 296, 16), dict(prefix_stages=2, prefix_early_keys=True, prefix_key_stages=3,
                                     prefix_splits=3)),
    # the pair's suffix items (T·g = 8, unpacked: a window a sequence) zeroed as warpgroup 2's are
    ((3, 1, 16, 2, 64, 40, 16), dict(prefix_stages=2, pair_suffix_cost=0.25, pair_prefix_cost=0.25)),
], ["unpacked", "packed_causal", "mha_decode_trim_lookahead", "packed_box_late_sum", "prefix_overlap",
    "early_keys_splits", "pair_suffixes"], slow=("unpacked", "mha_decode_trim_lookahead", "packed_box_late_sum",
                                                  "prefix_overlap", "early_keys_splits", "pair_suffixes")))
def test_zero_value_tails_keeps_non_finite_values_past_the_lengths_out(backend, shape, config):  # shipped: one case
  """zero_value_tails: the caches hold NaN past every length (prefix and suffixes: an unused tail) and the output
  equals the reference's over zeroed tails; lengths 0, a whole capacity and random ones. Without the setting the
  same inputs give NaN (a zero weight times NaN: the kernel's documented precondition), so the poisoned rows reach
  the value products that the setting guards."""
  b, t, _, _, d, p, s = shape
  q, pk, pv, sk, sv = _inputs(shape, jnp.bfloat16, seed=13)
  lengths = jnp.asarray(np.random.default_rng(13).integers(0, s + 1, b), jnp.int32).at[0].set(s).at[1].set(0)
  plen = p - 3  # with 3 splits of 2 tiles: the last split's second tile lies past the cache (it reloads the last)
  past = (jnp.arange(s)[None, :] >= lengths[:, None])[:, :, None, None]
  prefix_past = (jnp.arange(p) >= plen)[:, None, None]
  poison = lambda x, where: jnp.where(where, jnp.nan, x).astype(x.dtype)
  inputs = (q, poison(pk, prefix_past), poison(pv, prefix_past), jnp.int32(plen), poison(sk, past),
            poison(sv, past), lengths)
  config = hopper.HopperConfig(**{"num_ctas": 2, **config, "zero_value_tails": True})
  assert hopper.supported(q, pk, sk, config) is None
  if config.pair_suffix_cost:  # the pair runs suffix items of its own
    k, n = _pair_share(shape, config, lengths, plen)
    assert k < n, (k, n)
  step = jax.jit(lambda *a, config: hopper.prefix_suffix_attention(
      *a, scale=d**-0.5, config=config, interpret=backend.startswith("interpret")), static_argnames="config")
  *prefix_parts, (so, sl) = step(*inputs, config=config)
  clean = [jnp.where(past, 0, x).astype(x.dtype) for x in (sk, sv)]
  _close(so, sl, *reference.attention(q, *clean, lengths, causal=True, scale=d**-0.5), jnp.bfloat16)
  out, lse = reference.merge_states(prefix_parts) if len(prefix_parts) > 1 else prefix_parts[0]
  _close(out, lse, *reference.shared_attention(q, pk, pv, jnp.int32(plen), scale=d**-0.5), jnp.bfloat16)
  if config.suffix_pack:  # the unguarded kernel on one packed and one unpacked case (CI time)
    return
  unguarded = step(*inputs, config=dataclasses.replace(config, zero_value_tails=False))
  has_nan = lambda part: bool(jnp.isnan(part[0].astype(jnp.float32)).any())
  assert any(map(has_nan, unguarded[:-1])) and has_nan(unguarded[-1])  # a prefix split's part, the suffixes'


@ci_if_shipped("zero_value_tails")
def test_zero_value_tails_lowers_for_cuda():
  """zero_value_tails lowers to Mosaic GPU for CUDA with the H200's shipped settings: T·g = 1 from 8K keys of
  prefix (128-key prefix tiles, packed items in boxes: the value rings read through their reshape) and T·g = 4
  below (128-key packed suffix tiles, the pair's early key release)."""
  settings = tuning.file_for("NVIDIA H200").tuning
  for rows, heads, kv_heads, prefix in [(1, 32, 32, 8192), (4, 32, 8, 2048)]:
    config = hopper.tuned_config(settings, rows=rows, prefix=prefix)
    _assert_lowers_for_cuda(dataclasses.replace(config, zero_value_tails=True, num_ctas=132), batch=512,
                            heads=heads, kv_heads=kv_heads, prefix=prefix, suffix=144)


# pair_suffix_cost: the pair takes suffix items after its prefix items (rows = queries, through its prefix slots).
PAIR_CHEAP = dict(pair_suffix_cost=0.25, pair_prefix_cost=0.25)  # costs that give the pair most of a CTA's items


def _pair_share(shape, config, lengths, plen) -> tuple[int, int]:
  """(K, N) on CTA 0 of `shape`'s step with `config` (no clusters, no key splits): its N suffix items (round-robin
  over num_ctas) and `pair_split`'s K of them from its prefix tiles and the mean suffix length: warpgroup 2 runs K,
  the pair N - K."""
  b, t, hq, hkv, d, _, _ = shape
  pack = hopper.suffix_pack_of(t * hq // hkv, config)
  items = -(-hkv * -(-b // pack) // config.num_ctas)
  prefix_tiles = -(-hopper.prefix_items((b, t, hq, d), hkv) // config.num_ctas) * -(-plen // config.prefix_keys)
  mean = -(-int(jnp.sum(lengths)) // b)
  return int(hopper.pair_split(items, prefix_tiles, mean, config, pack)), items


@ci_if_shipped("pair_suffix_cost")
@pytest.mark.parametrize("backend", MOSAIC)
@pytest.mark.parametrize(*_cases("shape,config,plen", [
    # T·g = 4: 2 sequences a window, 64-key prefix tiles (32 keys a sequence), one slot each, q in shared memory
    ((40, 1, 8, 2, 64, 136, 72), hopper.HopperConfig(num_ctas=2, prefix_stages=2, suffix_pack=True, **PAIR_CHEAP),
     133),
    # T·g = 8 from T = 2, g = 4 (causal, unpacked: a window a sequence), 4 prefix stages: 2 slots each warpgroup;
    # warpgroup 2's ring across its items (ending at K) and its trimmed last tiles (the pair copies whole tiles)
    ((9, 2, 8, 2, 64, 72, 136), hopper.HopperConfig(num_ctas=2, prefix_stages=4, suffix_stages=2,
                                                     suffix_lookahead=True, suffix_trim=True, **PAIR_CHEAP), 70),
    # no prefix: the pair goes straight to the suffixes, its slots never loaded (zeroed for the skipped sub-blocks)
    ((16, 1, 8, 2, 64, 64, 40), hopper.HopperConfig(num_ctas=2, prefix_stages=2, suffix_pack=True, **PAIR_CHEAP), 0),
    # T·g = 1, the H200's long-prefix setting: 8 sequences a window in boxes (the pair copies a sequence at a time
    # from the caches' [B, S, Hkv·D] view), 128-key prefix tiles (16 keys a sequence), q in registers, the late sum
    ((24, 1, 4, 4, 128, 200, 40), hopper.HopperConfig(num_ctas=2, prefix_stages=2, suffix_stages=2, prefix_keys=128,
                                                      q_registers=True, suffix_pack=True, suffix_box=True,
                                                      suffix_late_sum=True, **PAIR_CHEAP), 197),
    # T·g = 4 from T = 2, g = 2 (causal, packed) in 2-CTA clusters (the prefix rings' last multicast tiles land
    # before the pair reuses its slots). With the ping-pong off as well, the interpreter on a 2-CPU machine stalled
    # at the first prefix tile (both loaders blocked in barrier callbacks, the other warpgroups never scheduled)
    ((20, 2, 4, 2, 64, 136, 40), hopper.HopperConfig(num_ctas=2, prefix_stages=2, cluster=2, suffix_pack=True,
                                                      **PAIR_CHEAP), 131),
], ["rows4_packed", "rows8_causal_2slots", "no_prefix", "rows1_boxes_q_registers", "rows4_causal_clusters"],
   slow=("rows4_packed", "no_prefix", "rows1_boxes_q_registers", "rows4_causal_clusters")))
def test_pair_takes_suffix_items_after_its_prefix_items(backend, shape, config, plen):
  """pair_suffix_cost: the CTA's last suffix items run on the pair once its prefix items are done (each warpgroup
  its own, scored rows = queries through its prefix slots), the first ones on warpgroup 2: both parts against the
  reference, ragged suffixes with an empty and a full one."""
  b, t, _, _, d, p, s = shape
  q, pk, pv, sk, sv = _inputs(shape, jnp.bfloat16, seed=17)
  lengths = jnp.asarray(np.random.default_rng(17).integers(0, s + 1, b), jnp.int32).at[0].set(s).at[1].set(0)
  assert hopper.supported(q, pk, sk, config) is None and hopper._shares(config, t * q.shape[2] // pk.shape[1])
  if config.cluster == 1:  # the pair has items to run (and warpgroup 2 some, but for the empty prefix)
    k, n = _pair_share(shape, config, lengths, plen)
    assert k < n and (k > 0 or plen == 0), (k, n)
  (po, pl_), (so, sl) = jax.jit(lambda *a: hopper.prefix_suffix_attention(
      *a, scale=d**-0.5, config=config, interpret=backend.startswith("interpret")))(
          q, pk, pv, jnp.int32(plen), sk, sv, lengths)
  _close(so, sl, *reference.attention(q, sk, sv, lengths, causal=True, scale=d**-0.5), jnp.bfloat16)
  _close(po, pl_, *reference.shared_attention(q, pk, pv, jnp.int32(plen), scale=d**-0.5), jnp.bfloat16)


def test_pair_split_balances_the_two_finish_times():
  """`pair_split`: warpgroup 2 keeps K of N items where K·w2 ≈ prefix + (N - K)·wp / 2 (costs in 1/16ths of its
  tile time; an item counts one tile more): all N where the prefix alone outlasts them, fewer as the pair's costs
  fall, none taken from an empty CTA, K within [0, N]."""
  config = hopper.HopperConfig(prefix_keys=64, suffix_keys=128, suffix_pack=True, pair_suffix_cost=1.0,
                               pair_prefix_cost=1.0)
  # pack 2, 512-key suffixes: warpgroup 2 8 tiles + 1 an item (w2 = 144), a warpgroup of the pair 16 + 1 (wp = 272)
  assert int(hopper.pair_split(30, 0, 512, config, 2)) == -(-30 * 272 // (2 * 144 + 272))  # 15: half each way
  assert int(hopper.pair_split(30, 128, 512, config, 2)) == -(-(2 * 128 * 16 + 30 * 272) // (2 * 144 + 272))  # 22
  assert int(hopper.pair_split(30, 1000, 512, config, 2)) == 30  # the prefix outlasts warpgroup 2's whole list
  assert int(hopper.pair_split(0, 128, 512, config, 2)) == 0
  # the pair's suffix tiles are 64 keys whatever the prefix tiles (a 128-key slot holds two)
  assert int(hopper.pair_split(30, 0, 512, dataclasses.replace(config, prefix_keys=128), 2)) == 15
  cheap = dataclasses.replace(config, pair_suffix_cost=0.25, pair_prefix_cost=0.25)
  assert int(hopper.pair_split(30, 128, 512, cheap, 2)) < 22
  # one-key suffixes (s = 1): an item is its fixed cost and one tile on either side
  assert int(hopper.pair_split(30, 128, 1, config, 2)) == 30
  assert int(hopper.pair_split(30, 0, 1, config, 2)) == 10  # wp = w2 = 32: a third each


@pytest.mark.parametrize("cost,rows,pack,shares", [(1.0, 4, True, True), (1.0, 1, True, True), (1.0, 8, False, True),
                                                   (1.0, 16, False, True), (1.0, 4, False, False),
                                                   (1.0, 3, True, False), (0.0, 4, True, False)])
def test_the_pair_takes_suffix_items_where_they_fill_whole_windows(cost, rows, pack, shares):
  """`_shares`: with pair_suffix_cost > 0, where an item's rows fill whole 8-row windows (packed T·g 1, 2, 4 or T·g
  a multiple of 8: the pair stores whole windows), not for T·g = 3 or unpacked T·g = 4 (a window shared with the
  next sequence), never at cost 0."""
  assert hopper._shares(hopper.HopperConfig(suffix_pack=pack, pair_suffix_cost=cost), rows) == shares


@ci_if_shipped("pair_suffix_cost")
@pytest.mark.parametrize("rows,heads,kv_heads,prefix", [(1, 32, 32, 4096), (1, 32, 32, 16384), (4, 32, 8, 2048),
                                                        (4, 32, 8, 8192), (8, 32, 4, 2048)])
def test_pair_suffixes_lower_for_cuda(rows, heads, kv_heads, prefix):
  """The H200's shipped settings with the pair taking suffix items lower for CUDA: T·g = 1 (packed in boxes; 64-
  and 128-key prefix tiles), T·g = 4 (packed, q in registers), T·g = 8 (unpacked, the H200's rows 5-8 setting)."""
  h200 = tuning.file_for("NVIDIA H200").tuning
  config = dataclasses.replace(hopper.tuned_config(h200, rows=rows, prefix=prefix), num_ctas=132, pair_suffix_cost=1.0)
  assert hopper._shares(config, rows)
  _assert_lowers_for_cuda(config, batch=512, heads=heads, kv_heads=kv_heads, prefix=prefix, suffix=512)

@pytest.mark.parametrize("backend", MOSAIC)
@pytest.mark.parametrize(*_cases("keys,lookahead", [(64, False), (64, True), (128, False)],
                                 ["64keys", "64keys_lookahead", "128keys"], slow=("64keys", "128keys")))
def test_suffix_trim_copies_a_last_tile_only_as_far_as_its_keys(backend, keys, lookahead):
  """suffix_trim: a suffix's last tile is copied in the smallest of 8, 16, 32, ... keys that holds its keys, the
  rest of the slot keeping an earlier tile's values under the mask. Lengths at both edges of every size (0, 1, 8,
  9, ..., 65, a whole capacity), items of several tiles before short ones in the same slots (2 CTAs, 2 stages),
  64- and 128-key tiles, with and without the ring across items."""
  shape = (16, 1, 8, 2, 64, 40, 272)
  q, pk, pv, sk, sv = _inputs(shape, jnp.bfloat16, seed=7)
  lengths = jnp.asarray([272, 1, 8, 9, 16, 17, 32, 33, 63, 0, 64, 65, 100, 127, 128, 129], jnp.int32)
  config = hopper.HopperConfig(num_ctas=2, prefix_stages=2, suffix_stages=2, suffix_keys=keys,
                               q_registers=keys == 128, suffix_lookahead=lookahead, suffix_trim=True)
  (po, pl_), (so, sl) = jax.jit(lambda *a: hopper.prefix_suffix_attention(
      *a, scale=0.125, config=config, interpret=backend.startswith("interpret")))(
          q, pk, pv, jnp.int32(40), sk, sv, lengths)
  _close(po, pl_, *reference.shared_attention(q, pk, pv, jnp.int32(40), scale=0.125), jnp.bfloat16)
  _close(so, sl, *reference.attention(q, sk, sv, lengths, causal=True, scale=0.125), jnp.bfloat16)


@ci_if_shipped("prefix_overlap")
@pytest.mark.parametrize("backend", MOSAIC)
@pytest.mark.parametrize(*_cases("shape,length,keys,stages,pingpong", [
    ((5, 2, 8, 4, 64, 272, 16), 264, 64, 2, True),
    ((3, 1, 8, 4, 128, 136, 8), 136, 128, 2, True),
    ((4, 1, 4, 4, 64, 200, 8), 64, 64, 3, False),
    ((3, 1, 8, 4, 64, 40, 8), 5, 64, 2, True),
    ((3, 1, 8, 4, 64, 40, 8), 0, 64, 2, True),
    ((40, 1, 8, 4, 64, 200, 8), 200, 64, 3, True),
], ["4tiles_and_8keys", "128keys", "one_whole_tile_no_pingpong", "one_partial_tile", "no_key",
    "both_warpgroups_rows_3stages"], slow=("4tiles_and_8keys", "128keys", "one_whole_tile_no_pingpong", "no_key",
                                           "both_warpgroups_rows_3stages")))
def test_prefix_overlap_issues_the_value_product_with_the_next_scores(backend, shape, length, keys, stages,
                                                                      pingpong):
  """prefix_overlap (FlashAttention-3's intra-warpgroup pipelining): each tile's value product one tile late, with
  the next tile's scores. Prefixes of several tiles ending in a partial one, one whole tile, one partial tile and no
  key (out 0, lse -inf); 64- and 128-key tiles (128: q in registers), with and without the ping-pong, rings of 2
  and 3 stages; 2 CTAs over 4 KV heads, so each CTA's pair runs items one after the other in one ring; 80 query
  rows a KV head in the last case, so that warpgroup 1's rows are real too. Interpreted, the products run one at a
  time (the overlap itself is checked compiled, on a Hopper GPU), but the loop's order, the delayed value product
  and the key and value tiles released apart are the compiled path's."""
  b, t, _, _, d, p, s = shape
  q, pk, pv, sk, sv = _inputs(shape, jnp.bfloat16, seed=8)
  lengths = jnp.asarray(np.random.default_rng(8).integers(0, s + 1, b), jnp.int32)
  config = hopper.HopperConfig(num_ctas=2, prefix_stages=stages, suffix_stages=2, pingpong=pingpong,
                               prefix_keys=keys, q_registers=keys == 128, prefix_overlap=True)
  (po, pl_), (so, sl) = jax.jit(lambda *a: hopper.prefix_suffix_attention(
      *a, scale=d**-0.5, config=config, interpret=backend.startswith("interpret")))(
          q, pk, pv, jnp.int32(length), sk, sv, lengths)
  _close(po, pl_, *reference.shared_attention(q, pk, pv, jnp.int32(length), scale=d**-0.5), jnp.bfloat16)
  _close(so, sl, *reference.attention(q, sk, sv, lengths, causal=True, scale=d**-0.5), jnp.bfloat16)


@pytest.mark.parametrize("backend", MOSAIC)
@pytest.mark.parametrize(*_cases("shape,length,config", [
    ((5, 2, 8, 4, 64, 272, 16), 264, dict(prefix_stages=2)),
    ((3, 1, 8, 4, 128, 136, 8), 136, dict(prefix_stages=2, prefix_keys=128, q_registers=True)),
    ((4, 1, 4, 4, 64, 200, 8), 64, dict(prefix_stages=1, pingpong=False)),
    ((3, 1, 8, 4, 64, 40, 8), 5, dict(prefix_stages=2, num_ctas=1)),
    ((3, 1, 8, 4, 64, 40, 8), 0, dict(prefix_stages=2)),
    ((40, 1, 8, 4, 64, 200, 8), 200, dict(prefix_stages=3)),
    ((40, 3, 8, 2, 64, 136, 72), 135, dict(prefix_stages=2, prefix_splits=2, cluster=2, num_ctas=4)),
    # prefix_key_stages: a key ring longer than the value ring (key tile g in key slot g mod 3, its value tile in
    # value slot g mod 2)
    ((5, 2, 8, 4, 64, 272, 16), 264, dict(prefix_stages=2, prefix_key_stages=3)),
    ((3, 1, 8, 4, 64, 136, 8), 70, dict(prefix_stages=2, prefix_key_stages=3, num_ctas=1)),
    ((3, 1, 8, 4, 64, 40, 8), 0, dict(prefix_stages=2, prefix_key_stages=3)),
    ((4, 1, 4, 4, 64, 200, 8), 200, dict(prefix_stages=1, pingpong=False, prefix_key_stages=4)),
    ((40, 3, 8, 2, 64, 136, 72), 135, dict(prefix_stages=2, prefix_key_stages=3, prefix_splits=2, cluster=2,
                                           num_ctas=4)),
], ["4tiles_and_8keys", "128keys", "one_slot_no_pingpong", "one_partial_tile", "no_key", "both_warpgroups_rows_3stages",
    "2splits_clusters", "3key_slots", "3key_slots_2tiles_refilled", "3key_slots_no_key", "4key_slots_1value_slot",
    "3key_slots_2splits_clusters"],
   # on in the H200's T·g = 4 setting (one CTA a cluster, no key splits): CI runs several tiles through a 2-slot
   # ring, one partial tile and no key; clusters with key splits and the key ring (off in every tuning) are slow
   slow=("128keys", "one_slot_no_pingpong", "both_warpgroups_rows_3stages", "2splits_clusters", "3key_slots",
         "3key_slots_2tiles_refilled", "3key_slots_no_key", "4key_slots_1value_slot", "3key_slots_2splits_clusters")))
def test_prefix_early_keys_releases_key_tiles_after_the_scores(backend, shape, length, config):
  """prefix_early_keys: the pair releases a slot's key tile after both score products and its value tile after both
  value products, each refilled on its own. Prefixes of several tiles ending in a partial one, one whole tile, one
  partial tile and no key (out 0, lse -inf); 64- and 128-key tiles; a one-slot ring without the ping-pong and rings
  of 2 and 3; 80 query rows a KV head (warpgroup 1's rows real too); 2-CTA clusters multicasting each tile, with key
  splits; prefix_key_stages, key rings of 3 and 4 slots beside value rings of 2 and 1 (the slots of one tile then
  differ, and each ring is refilled at its own distance). The CTAs (2; 1 for the partial tile, so that its 2-slot
  ring is refilled across the items) run several items each, so the ring runs on across items; with no key, no tile
  is loaded or released. A release that never comes hangs the interpreted kernel; a premature one shows only
  compiled, on a Hopper GPU (interpreted, a mutation releasing the key tile before its score product still gave
  exact output, with the interpreter's race detector on)."""
  b, t, _, _, d, p, s = shape
  q, pk, pv, sk, sv = _inputs(shape, jnp.bfloat16, seed=9)
  lengths = jnp.asarray(np.random.default_rng(9).integers(0, s + 1, b), jnp.int32)
  config = hopper.HopperConfig(**{"num_ctas": 2, "suffix_stages": 2, **config, "prefix_early_keys": True})
  assert hopper.supported(q, pk, sk, config) is None
  *prefix, (so, sl) = jax.jit(lambda *a: hopper.prefix_suffix_attention(
      *a, scale=d**-0.5, config=config, interpret=backend.startswith("interpret")))(
          q, pk, pv, jnp.int32(length), sk, sv, lengths)
  po, pl_ = reference.merge_states(prefix) if len(prefix) > 1 else prefix[0]
  _close(po, pl_, *reference.shared_attention(q, pk, pv, jnp.int32(length), scale=d**-0.5), jnp.bfloat16)
  _close(so, sl, *reference.attention(q, sk, sv, lengths, causal=True, scale=d**-0.5), jnp.bfloat16)


@pytest.mark.parametrize("b,p,hq,hkv,tiles", [
    (1024, 8192, 32, 8, dict(suffix_keys=128, suffix_pack=True)),
    pytest.param(512, 16384, 32, 32, dict(prefix_keys=128, suffix_lookahead=True, suffix_trim=True),
                 marks=pytest.mark.slow),  # not shipped with the early release since 2026-12-04 (CI time)
    pytest.param(1024, 8192, 32, 8, dict(suffix_keys=128, cluster=2), marks=ci_if_shipped("cluster"))],
    ids=["rows4_packed", "mha_decode_lookahead_trim", "clusters"])
def test_prefix_early_keys_lowers_for_cuda(b, p, hq, hkv, tiles):
  """The pair's early key release lowers to Mosaic GPU for CUDA with the H200's settings of T·g = 4 (GQA rows) and
  T·g = 1's long prefixes until 2026-12-04 (the 7B decode layer; lookahead and trim), and in 2-CTA clusters (its
  value tiles' own cluster barrier); its kernel differs from the same settings' without it."""
  q = jax.ShapeDtypeStruct((b, 1, hq, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((p, hkv, 128), jnp.bfloat16)
  skv = jax.ShapeDtypeStruct((b, 256, hkv, 128), jnp.bfloat16)
  texts = []
  for early in (True, False):
    config = hopper.HopperConfig(num_ctas=132, prefix_stages=2, suffix_stages=2, q_registers=True,
                                 prefix_early_keys=early, **tiles)
    assert hopper.supported(q, kv, skv, config) is None
    step = jax.jit(lambda *a, config=config: hopper.prefix_suffix_attention(*a, scale=0.1, config=config))
    texts.append(step.trace(q, kv, kv, jax.ShapeDtypeStruct((), jnp.int32), skv, skv,
                            jax.ShapeDtypeStruct((b,), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text())
  assert "mosaic_gpu" in texts[0] and texts[0] != texts[1]


# the H200's T·g = 4 setting of short prefixes, as its tuning file had it on 2026-12-05
_H200_ROWS4 = dict(prefix_stages=2, suffix_stages=2, q_registers=True, suffix_keys=128, suffix_pack=True,
                   prefix_early_keys=True)


@ci_if_shipped("suffix_early_keys")
@pytest.mark.parametrize("backend", MOSAIC)
@pytest.mark.parametrize(*_cases("shape,config", [
    # T·g = 4 packed (2 sequences a window), 128-key tiles through a 2-slot ring, several tiles and items a CTA
    ((12, 1, 8, 2, 128, 40, 200), dict(num_ctas=2, **_H200_ROWS4)),
    # unpacked, causal T·g = 12, a one-slot ring, trimmed last tiles
    ((3, 3, 8, 2, 64, 8, 136), dict(num_ctas=1, suffix_stages=1, suffix_trim=True)),
    # T·g = 1 in boxes, the late sum, the ring across items (a next item's tiles loaded by this one's releases)
    ((19, 1, 4, 4, 64, 40, 72), dict(num_ctas=3, suffix_pack=True, suffix_box=True, suffix_keys=128,
                                     suffix_lookahead=True, suffix_late_sum=True)),
    # zero_value_tails (the value tile zeroed after its key tile was released) and 3 stages
    ((6, 1, 8, 2, 64, 40, 136), dict(num_ctas=2, suffix_stages=3, zero_value_tails=True)),
], ["rows4_h200", "rows12_one_slot_trim", "rows1_boxes_lookahead_late_sum", "zero_tails_3stages"],
   slow=("rows12_one_slot_trim", "rows1_boxes_lookahead_late_sum", "zero_tails_3stages")))  # CI: ~20 s one
def test_suffix_early_keys_releases_key_tiles_after_the_scores(backend, shape, config):
  """suffix_early_keys: warpgroup 2 refills a slot's key tile once its score product has read it and its value tile
  after the value product (the copies of each part arriving on its own barrier: packed items' sub-block copies and
  boxes, their plain arrivals, trimmed copies, the lookahead's next-item tiles). Ragged lengths with an empty suffix
  and a full one; the same parts as without it, against the reference. A release that never comes hangs the
  interpreted kernel; a premature one would show compiled only (as for prefix_early_keys)."""
  b, t, _, _, d, p, s = shape
  q, pk, pv, sk, sv = _inputs(shape, jnp.bfloat16, seed=11)
  lengths = jnp.asarray(np.random.default_rng(11).integers(0, s + 1, b), jnp.int32).at[0].set(s).at[1].set(0)
  early = hopper.HopperConfig(**config, suffix_early_keys=True)
  assert hopper.supported(q, pk, sk, early) is None
  run = lambda c: jax.jit(lambda *a: hopper.prefix_suffix_attention(
      *a, scale=d**-0.5, config=c, interpret=backend.startswith("interpret")))(
          q, pk, pv, jnp.int32(p - 3), sk, sv, lengths)
  *prefix, (so, sl) = run(early)
  _close(so, sl, *reference.attention(q, sk, sv, lengths, causal=True, scale=d**-0.5), jnp.bfloat16)
  po, pl_ = reference.merge_states(prefix) if len(prefix) > 1 else prefix[0]
  _close(po, pl_, *reference.shared_attention(q, pk, pv, jnp.int32(p - 3), scale=d**-0.5), jnp.bfloat16)
  for got, want in zip([*prefix, (so, sl)], run(hopper.HopperConfig(**config))):  # the same parts as without it
    np.testing.assert_array_equal(np.asarray(got[0], np.float32), np.asarray(want[0], np.float32))


@ci_if_shipped("suffix_early_keys")
@pytest.mark.parametrize("rows", [4, 1])
def test_suffix_early_keys_lowers_for_cuda(rows):
  """The suffix's early key release lowers to Mosaic GPU for CUDA with the H200's shipped T·g = 4 and T·g = 1
  settings on seed-row shapes (T·g = 1's copies of boxes included), and its kernel differs from the same settings'
  without it."""
  b, heads = (512, 32) if rows == 4 else (256, 32)
  q = jax.ShapeDtypeStruct((b, 1, heads, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2048, heads // rows, 128), jnp.bfloat16)
  skv = jax.ShapeDtypeStruct((b, 512, heads // rows, 128), jnp.bfloat16)
  shipped = hopper.tuned_config(tuning.file_for("NVIDIA H200").tuning, rows=rows, prefix=2048)
  assert shipped.suffix_box == (rows == 1)
  texts = []
  for early in (True, False):
    config = dataclasses.replace(shipped, num_ctas=132, suffix_early_keys=early)
    assert hopper.supported(q, kv, skv, config) is None
    step = jax.jit(lambda *a, config=config: hopper.prefix_suffix_attention(*a, scale=0.1, config=config))
    texts.append(step.trace(q, kv, kv, jax.ShapeDtypeStruct((), jnp.int32), skv, skv,
                            jax.ShapeDtypeStruct((b,), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text())
  assert "mosaic_gpu" in texts[0] and texts[0] != texts[1]


def _lowers_as_counted(q, kv, skv, config, need: int, fits: bool) -> None:
  """The kernel of `config` over these shapes (ShapeDtypeStructs) lowers for CUDA where it fits an SM, and Mosaic
  GPU refuses it naming `need` (`_smem_bytes`) bytes where it does not; `supported` agrees."""
  assert (hopper.supported(q, kv, skv, config) is None) == fits
  step = jax.jit(lambda *a: hopper.prefix_suffix_attention(*a, scale=0.1, config=config))
  traced = step.trace(q, kv, kv, jax.ShapeDtypeStruct((), jnp.int32), skv, skv,
                      jax.ShapeDtypeStruct((q.shape[0],), jnp.int32))
  if fits:
    assert "mosaic_gpu" in traced.lower(lowering_platforms=("cuda",)).as_text()
  else:
    with pytest.raises(ValueError, match=f"smem_bytes={need} "):
      traced.lower(lowering_platforms=("cuda",))


@ci_if_shipped("prefix_key_stages")
@pytest.mark.parametrize("key_stages,cluster,fits", [(3, 1, True), (3, 2, True), (4, 1, False)],
                         ids=["3key_slots", "3key_slots_clusters", "4key_slots"])
def test_prefix_key_ring_fits_beside_the_h200_gqa_setting(key_stages, cluster, fits):
  """prefix_key_stages with the H200's T·g = 4 setting (64-key prefix tiles in 2 value slots, 128-key suffix tiles
  in 2, q in registers): a third key slot (16 KB) fits an SM, a fourth does not, by the bytes `_smem_bytes` counts
  (Mosaic GPU's own count, lowered for CUDA; `supported` refuses the second); the key ring lowers in 2-CTA clusters
  too (its cluster barrier of 3 slots beside the value tiles' 2)."""
  q = jax.ShapeDtypeStruct((1024, 1, 32, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((8192, 8, 128), jnp.bfloat16)
  skv = jax.ShapeDtypeStruct((1024, 256, 8, 128), jnp.bfloat16)
  config = hopper.HopperConfig(num_ctas=132, prefix_stages=2, suffix_stages=2, q_registers=True, suffix_keys=128,
                               suffix_pack=True, prefix_early_keys=True, prefix_key_stages=key_stages, cluster=cluster)
  need = hopper._smem_bytes(128, 4, config)
  assert need == hopper._smem_bytes(128, 4, dataclasses.replace(
      config, prefix_key_stages=0)) + (key_stages - 2) * ((64 * 128 * 2) + 8 + 8)  # a slot, its two barriers
  _lowers_as_counted(q, kv, skv, config, need, fits)


@ci_if_shipped("prefix_overlap")
@pytest.mark.parametrize("pingpong", [True, False], ids=["pingpong", "no_pingpong"])
def test_prefix_overlap_lowers_for_cuda_with_one_wgmma_left_in_flight(pingpong):
  """The overlapped prefix loop lowers to Mosaic GPU for CUDA at the GQA and the MHA decode shapes (with the
  settings of T·g = 2-8 and of T·g = 1, and in 2-CTA clusters: its value tiles' own cluster barrier), and waits for
  its score products with one wgmma group left in flight."""
  for b, p, hq, hkv, tiles in [(1024, 8192, 32, 8, dict(suffix_keys=128)),
                               (512, 16384, 32, 32, dict(prefix_keys=128, suffix_lookahead=True, suffix_trim=True)),
                               (1024, 8192, 32, 8, dict(suffix_keys=128, cluster=2))]:
    q = jax.ShapeDtypeStruct((b, 1, hq, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((p, hkv, 128), jnp.bfloat16)
    skv = jax.ShapeDtypeStruct((b, 256, hkv, 128), jnp.bfloat16)
    config = hopper.HopperConfig(num_ctas=132, prefix_stages=2, suffix_stages=2, q_registers=True,
                                 pingpong=pingpong, prefix_overlap=True, **tiles)
    assert hopper.supported(q, kv, skv, config) is None
    step = jax.jit(lambda *a: hopper.prefix_suffix_attention(*a, scale=0.1, config=config))
    text = step.trace(q, kv, kv, jax.ShapeDtypeStruct((), jnp.int32), skv, skv,
                      jax.ShapeDtypeStruct((b,), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
    assert "wgmma.wait_group.sync.aligned 1" in text


@ci_if_shipped("cluster")
def test_clusters_lower_for_cuda_and_check_their_settings():
  """2-CTA clusters lower to Mosaic GPU for CUDA (the multicast copies split each prefix tile between the two CTAs)
  at the GQA and the MHA decode shapes; the grid takes whole clusters (132 SMs: 66 clusters; an odd num_ctas is
  refused), and `cluster` takes 1 or 2."""
  for b, p, hq, hkv in [(1024, 8192, 32, 8), (512, 16384, 32, 32)]:
    q = jax.ShapeDtypeStruct((b, 1, hq, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((p, hkv, 128), jnp.bfloat16)
    skv = jax.ShapeDtypeStruct((b, 256, hkv, 128), jnp.bfloat16)
    config = hopper.HopperConfig(num_ctas=132, prefix_stages=2, suffix_stages=2, prefix_keys=128, q_registers=True,
                                 cluster=2)
    step = jax.jit(lambda *a: hopper.prefix_suffix_attention(*a, scale=0.1, config=config))
    text = step.trace(q, kv, kv, jax.ShapeDtypeStruct((), jnp.int32), skv, skv,
                      jax.ShapeDtypeStruct((b,), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text
  args = [jnp.zeros((2, 1, 8, 64), jnp.bfloat16), jnp.zeros((64, 2, 64), jnp.bfloat16),
          jnp.zeros((64, 2, 64), jnp.bfloat16), jnp.int32(64), jnp.zeros((2, 64, 2, 64), jnp.bfloat16),
          jnp.zeros((2, 64, 2, 64), jnp.bfloat16), jnp.zeros((2,), jnp.int32)]
  with pytest.raises(ValueError, match="num_ctas=3 is not a multiple of its cluster=2"):
    hopper.prefix_suffix_attention(*args, scale=0.1, config=hopper.HopperConfig(num_ctas=3, cluster=2))
  with pytest.raises(ValueError, match="HopperConfig.suffix_keys must be 64 or 128; got 32"):
    hopper.HopperConfig(suffix_keys=32)
  with pytest.raises(ValueError, match="HopperConfig.cluster must be 1 or 2; got 4"):
    hopper.HopperConfig(cluster=4)
  with pytest.raises(ValueError, match="HopperTuning.cluster must be 1 or 2; got 3"):
    tuning.HopperTuning(2, 3, 208, 88, True, 64, False, 3)


@pytest.mark.parametrize("fields,message", [
    (dict(pair_registers=224, suffix_registers=64), r"2·pair_registers \+ suffix_registers at most 504"),
    (dict(pair_registers=216, suffix_registers=80), r"at most 504 \(more hangs the kernel\)"),
    (dict(pair_registers=212), "each must be a multiple of 8"),
    (dict(prefix_stages=1), "prefix_stages must be >= 2 with pingpong"),
    (dict(prefix_stages=1, pingpong=False, prefix_overlap=True), "prefix_stages must be >= 2 with prefix_overlap"),
    (dict(suffix_stages=0), "suffix_stages must be a positive int"),
    (dict(prefix_stages=2, prefix_overlap=True, prefix_early_keys=True), "prefix_early_keys and prefix_overlap are "
     "exclusive"),
    (dict(prefix_early_keys="true"), r"prefix_early_keys must be true or false; got 'true'"),
    (dict(zero_value_tails=1), r"zero_value_tails must be true or false; got 1"),
    (dict(prefix_stages=3, prefix_early_keys=True, prefix_key_stages=2), r"prefix_key_stages must be 0 \(as "
     r"prefix_stages\) or an int >= prefix_stages \(3\); got 2"),
    (dict(prefix_stages=2, prefix_key_stages=-1), "prefix_key_stages must be 0"),
    (dict(prefix_stages=2, prefix_early_keys=True, prefix_key_stages=True), "prefix_key_stages must be 0"),
    (dict(prefix_stages=2, prefix_key_stages=3), r"prefix_key_stages=3 > prefix_stages=2 needs prefix_early_keys"),
    (dict(prefix_stages=2, prefix_overlap=True, prefix_key_stages=3), "needs prefix_early_keys"),
    (dict(pair_suffix_cost=-1.0), r"pair_suffix_cost must be a finite number >= 0; got -1.0"),
    (dict(pair_suffix_cost=float("inf")), r"pair_suffix_cost must be a finite number >= 0; got inf"),
    (dict(pair_suffix_cost=True), r"pair_suffix_cost must be a finite number >= 0; got True"),
    (dict(pair_prefix_cost=0.0), r"pair_prefix_cost must be > 0; got 0.0"),
    (dict(prefix_stages=1, pingpong=False, pair_suffix_cost=1.0), r"prefix_stages must be >= 2 with "
     r"pair_suffix_cost > 0 \(each warpgroup of the pair streams its suffix items through prefix slots of its own\); "
     "got 1"),
])
def test_settings_that_cannot_run_are_refused(fields, message):
  """Registers beyond the pool setmaxnreg can share (2·216 + 80 and 2·224 + 64 hung on the H200), a one-slot
  prefix ring with the ping-pong (the pair would wait for each other), an empty ring: refused by HopperConfig and
  HopperTuning alike, naming the field."""
  with pytest.raises(ValueError, match=message):
    hopper.HopperConfig(**fields)
  base = dict(prefix_stages=2, suffix_stages=3, pair_registers=208, suffix_registers=88, pingpong=True)
  with pytest.raises(ValueError, match=message):
    tuning.HopperTuning(**{**base, **fields})
  hopper.HopperConfig(prefix_stages=1, pingpong=False)  # one slot without the ping-pong runs


@pytest.mark.parametrize("tiles", [dict(prefix_keys=128), dict(suffix_keys=128)], ids=["prefix128", "suffix128"])
@pytest.mark.parametrize("suffix_stages,fits", [(2, True), (3, False)])
def test_queries_in_registers_free_their_shared_buffer(tiles, suffix_stages, fits):
  """q_registers drops the pair's 32 KB query/out buffer: 128-key prefix or suffix tiles fit with 2 prefix + 2
  suffix stages, not with 3 suffix stages, by the bytes `_smem_bytes` counts (Mosaic GPU's own count, lowered for
  CUDA: the 128-key suffix tiles' keys-major products of M = 128 and their reductions lower too)."""
  q = jax.ShapeDtypeStruct((256, 1, 32, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((4096, 8, 128), jnp.bfloat16)
  skv = jax.ShapeDtypeStruct((256, 512, 8, 128), jnp.bfloat16)
  config = hopper.HopperConfig(num_ctas=132, prefix_stages=2, suffix_stages=suffix_stages, q_registers=True, **tiles)
  need = hopper._smem_bytes(128, 4, config)
  assert need == hopper._smem_bytes(128, 4, dataclasses.replace(config, q_registers=False)) - (
      32 << 10)
  _lowers_as_counted(q, kv, skv, config, need, fits)


@pytest.mark.parametrize("pair_cost", [0.0, pytest.param(1.0, marks=ci_if_shipped("pair_suffix_cost"))],
                         ids=["suffixes_alone", "pair_suffixes"])
@pytest.mark.parametrize("rows,fits", [(48, True), (52, False)])
def test_shared_memory_count_matches_mosaic_gpu(rows, fits, pair_cost):
  """`_smem_bytes` against Mosaic GPU's own count: lowered for CUDA (on any machine), T·g = 48 fits an SM and
  T·g = 52 does not, by the bytes `_smem_bytes` says; `supported` refuses the second. With the pair taking suffix
  items (T·g = 48: whole windows), its two barriers a prefix slot counted too."""
  q = jax.ShapeDtypeStruct((2, rows // 4, 8, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((64, 2, 128), jnp.bfloat16)
  skv = jax.ShapeDtypeStruct((2, 64, 2, 128), jnp.bfloat16)
  # the H100's settings (the device's file may differ by T·g)
  config = hopper.HopperConfig(num_ctas=4, pair_suffix_cost=pair_cost)
  need = hopper._smem_bytes(128, rows, config)
  assert (need <= hopper.SMEM_LIMIT) == fits
  assert (hopper.supported(q, kv, skv, config) is None) == fits
  step = jax.jit(lambda *a: hopper.prefix_suffix_attention(*a, scale=0.1, config=config))
  traced = step.trace(q, kv, kv, jax.ShapeDtypeStruct((), jnp.int32), skv, skv, jax.ShapeDtypeStruct((2,), jnp.int32))
  if fits:
    traced.lower(lowering_platforms=("cuda",))
  else:
    with pytest.raises(ValueError, match=f"smem_bytes={need} "):
      traced.lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("backend", MOSAIC)
@pytest.mark.parametrize("shape", SHAPES[:2], ids=_shape_id)
def test_step_equals_attention_over_concatenated_kv(backend, shape):
  """The strongest claim through the public API: prefix + suffix merged == causal attention over both."""
  b, t, hq, hkv, d, p, s = shape
  keys = jax.random.split(jax.random.PRNGKey(3), 4)
  q = normal(keys[0], (b, t, hq, d), jnp.bfloat16)
  prefix = random_level(keys[1], 1, p, [p - 5], [0] * b, hkv, d, jnp.bfloat16)
  lengths = jax.random.randint(keys[3], (b,), t, s + 1).at[0].set(s)
  suffix = random_level(keys[2], b, s, lengths, None, hkv, d, jnp.bfloat16)
  step = jax.jit(lambda q, pl_, sl: hj.hydragen_attention(q, prefix.k[0], prefix.v[0], suffix.k, suffix.v,
                                                           prefix_length=pl_, suffix_lengths=sl, backend=backend))
  out = step(q, prefix.lengths[0], suffix.lengths)  # lengths traced
  chex.assert_trees_all_close(out.astype(jnp.float32), expected_tree(q, [prefix, suffix]), **tol(jnp.bfloat16))


@pytest.mark.parametrize("backend", MOSAIC)
@pytest.mark.parametrize("config", [
    pytest.param(None, id="tuned"),
    # clusters are an option no tuning ships: interpreted in the slow tier (CI time), compiled on the GPU
    pytest.param(hopper.HopperConfig(num_ctas=10, prefix_stages=2, suffix_stages=2, prefix_keys=128, q_registers=True,
                                     cluster=2, suffix_lookahead=True, suffix_trim=True, prefix_splits=2),
                 id="every_option", marks=pytest.mark.slow)])
def test_empty_prefix_and_empty_suffixes(backend, config):
  """A zero-length prefix and all-empty suffixes: no NaN, out 0 and lse -inf where a part sees nothing; with
  every option on (2 prefix splits), 10 CTAs in 5 clusters for 2 item pairs of each split and 8 suffix items (clusters
  and CTAs with none)."""
  shape = (4, 1, 8, 2, 64, 16, 8)
  q, pk, pv, sk, sv = _inputs(shape, jnp.bfloat16)
  parts = jax.jit(lambda *a: hopper.prefix_suffix_attention(
      *a, scale=0.125, config=config, interpret=backend.startswith("interpret")))(q, pk, pv, jnp.int32(0), sk, sv,
                                                                                 jnp.zeros(4, jnp.int32))
  assert len(parts) == (2 if config is None else 3)
  for out, lse in parts:
    chex.assert_trees_all_equal(out, jnp.zeros_like(out))
    assert bool(jnp.all(lse == -jnp.inf))
  if config is not None:
    return
  out = hj.hydragen_attention(q, pk, pv, sk, sv, prefix_length=0, suffix_lengths=jnp.array([0, 1, 0, 8]),
                              backend=backend)
  assert not bool(jnp.any(jnp.isnan(out.astype(jnp.float32))))
  chex.assert_trees_all_equal(out[0], jnp.zeros_like(out[0]))


UNSUPPORTED = [("16-bit", dict(dtype=jnp.float32), "16-bit inputs"), ("head_dim", dict(d=256), "head dim 256"),
               ("capacity", dict(p=20), "not a multiple of 8"),  # 4 and 1 are fine: under one tile
               ("empty", dict(p=0), "is 0 (a TMA copy needs a key"),  # a suffix of 0: test_attention
               ("rows", dict(t=5, hq=32), "exceeds 64 rows"),
               ("smem", dict(t=13, d=128), "shared memory")]  # T·g = 52: a 56-row window


# Every case's reason in CI; its answer through the fallback (the interpreted Triton kernels, ~5 s a case) for the
# first case there and for all with --all.
@pytest.mark.parametrize("case,reason,fallback", [
    *[pytest.param(case, reason, True, id=name, marks=pytest.mark.slow if i else ())
      for i, (name, case, reason) in enumerate(UNSUPPORTED)],
    *[pytest.param(case, reason, False, id=f"{name}-reason_only") for name, case, reason in UNSUPPORTED[1:]]])
def test_unsupported_cases_name_the_reason_and_fall_back(case, reason, fallback):
  """Outside its case the kernel says why, and backend="interpret-mosaic" still gives the right answer (Triton)."""
  b, t, hq, hkv, d, p, s = 2, case.get("t", 1), case.get("hq", 8), 2, case.get("d", 64), case.get("p", 16), 16
  dtype = case.get("dtype", jnp.bfloat16)
  keys = jax.random.split(jax.random.PRNGKey(5), 3)
  q = normal(keys[0], (b, t, hq, d), dtype)
  prefix = random_level(keys[1], 1, p, [p], [0] * b, hkv, d, dtype)
  suffix = random_level(keys[2], b, s, [s, t], None, hkv, d, dtype)
  assert reason in hopper.supported(q, prefix.k[0], suffix.k)
  if not fallback:
    return
  out = hj.hydragen_attention(q, prefix.k[0], prefix.v[0], suffix.k, suffix.v, suffix_lengths=suffix.lengths,
                              backend="interpret-mosaic")
  chex.assert_trees_all_close(out.astype(jnp.float32), expected_tree(q, [prefix, suffix]), **tol(dtype))


def test_pallas_leaves_the_hopper_kernel_where_its_prefix_items_leave_sms_idle():
  """hopper_min_fill: the kernel's persistent grid runs one prefix item (KV head, 128 stacked query rows) per CTA
  and SM at a time. With a bound of 0.75 the 7B MHA decode layer at B = 512, 128 items (132 SMs: fill 0.97), takes
  it, and the same layer with its heads split over two GPUs, 64 items (fill 0.48), stays on Triton, as it did on
  both GPUs with the Hopper settings of 2026-11-30; the devices' bounds are measured (0.4 on the H200, 0.181 on the
  H100: the split layer now runs faster on the kernel there)."""
  whole, split = (512, 1, 32, 128), (512, 1, 16, 128)
  assert hopper.prefix_items(whole, 32) == 128 and hopper.prefix_items(split, 16) == 64
  assert hopper.prefix_items((512, 1, 32, 128), 8) == 8 * 16  # g = 4: 2048 rows per KV head
  assert hopper.prefix_items((3, 2, 4, 64), 2) == 2  # T·g = 4, 12 rows per KV head: one partial block
  assert hopper.prefix_items((129, 1, 2, 64), 2) == 4  # 129 rows: two blocks per KV head
  t = dataclasses.replace(tuning.current(), hopper_min_work=1, hopper_min_fill=0.75)
  assert dispatch.prefix_fill(whole, 32, 132) == 128 / 132
  assert dispatch.pays_on_hopper(whole, 32, 16384, t, num_cores=132)
  assert not dispatch.pays_on_hopper(split, 16, 16384, t, num_cores=132)
  assert dispatch.pays_on_hopper(split, 16, 16384, t, num_cores=78)  # a GPU of fewer SMs
  assert dispatch.pays_on_hopper(split, 16, 16384, dataclasses.replace(t, hopper_min_fill=0.0), num_cores=132)
  assert not dispatch.pays_on_hopper(whole, 32, 16384, dataclasses.replace(t, hopper_min_work=2 ** 40),
                                       num_cores=132)  # both rules hold, or the Triton kernels run
  with tuning.override(t):  # the device's SM count where none is given (the tuning's num_cores on CPU)
    assert dispatch.pays_on_hopper(whole, 32, 16384) == (128 / ops.num_cores() >= 0.75)


def test_pallas_takes_the_hopper_kernel_for_a_long_prefix_per_sequence():
  """hopper_min_seq_work: below hopper_min_work, a product whose work a sequence (T·g rows × prefix capacity) is at
  least the threshold takes the Hopper kernel, its items filling the grid as before (measured on the H200, B = 256
  MHA: P = 8K faster than Triton, 4K slower, and B = 512, P = 4K, the same total work as 256 / 8K, slower)."""
  t = dataclasses.replace(tuning.current(), hopper_min_work=4194304, hopper_min_fill=0.4, hopper_min_seq_work=8192)
  mha = lambda b: (b, 1, 32, 128)  # noqa: E731
  assert dispatch.prefix_work(mha(256), 32, 8192) == 2097152 < t.hopper_min_work
  assert dispatch.pays_on_hopper(mha(256), 32, 8192, t, num_cores=132)  # 8192 a sequence; 64 items: fill 0.48
  assert not dispatch.pays_on_hopper(mha(256), 32, 4096, t, num_cores=132)
  assert not dispatch.pays_on_hopper(mha(512), 32, 4096, t, num_cores=132)  # 4096 a sequence
  assert not dispatch.pays_on_hopper(mha(64), 32, 16384, t, num_cores=132)  # 16384 a sequence but fill 0.12
  assert dispatch.pays_on_hopper((256, 1, 32, 128), 8, 2048, t, num_cores=132)  # GQA, T·g = 4: 8192 a sequence
  assert dispatch.pays_on_hopper((128, 2, 32, 128), 8, 1024, t, num_cores=132)  # T = 2, g = 4: 8192 a sequence
  assert not dispatch.pays_on_hopper(mha(256), 32, 8192, dataclasses.replace(t, hopper_min_seq_work=0),
                                       num_cores=132)  # 0: off, only hopper_min_work decides


def test_pallas_counts_the_key_splits_in_the_fill_from_hopper_split_min_rows():
  """hopper_split_min_rows: from that many T·g rows, a product that reaches hopper_min_work counts its prefix items
  after the key splits of the setting the kernel would run (its `prefix_fill`, bounded by the SMs and by the
  prefix capacity: `hopper.with_grid`), so a GQA batch of few items takes the kernel with its keys split; fewer rows
  (MHA, T·g = 2), a product below hopper_min_work (it passed on hopper_min_seq_work), or a setting that does not
  split keep counting the items as they are. The GQA shapes are those measured on the H200 (the tuning file's
  note)."""
  long = tuning.HopperTuning(2, 2, 208, 88, True, 128, True, 1, False, 64, prefix_fill=0.75, suffix_pack=True)
  short = tuning.HopperTuning(2, 2, 208, 88, True, 64, True, 1, False, 128, suffix_pack=True)
  t = dataclasses.replace(tuning.current(), hopper_min_work=4194304, hopper_min_fill=0.4, hopper_min_seq_work=4096,
                          hopper=((1, short),), hopper_long=((1, long),), hopper_long_prefix=16384,
                          hopper_split_min_rows=4)
  pays = lambda b, p, hq, hkv, tun=t: dispatch.pays_on_hopper((b, 1, hq, 128), hkv, p, tun, num_cores=132)  # noqa: E731
  splits = lambda b, p, hq, hkv: hopper.with_grid((b, 1, hq, 128), hkv, p, hopper.HopperConfig(  # noqa: E731
      **dataclasses.asdict(long)), 132).prefix_splits
  assert hopper.prefix_items((128, 1, 32, 128), 8) == 32  # fill 0.24: below 0.4 before the splits
  assert (splits(128, 16384, 32, 8), splits(64, 16384, 32, 8), splits(32, 32768, 32, 8)) == (8, 16, 32)
  assert pays(128, 16384, 32, 8) and pays(64, 16384, 32, 8) and pays(32, 32768, 32, 8)
  assert not pays(32, 16384, 32, 8)  # 2M < hopper_min_work (passed on hopper_min_seq_work): items as they are
  assert not pays(8, 16384, 32, 8) and not pays(16, 32768, 32, 8)
  assert dispatch.prefix_work((128, 1, 32), 32, 32768) == dispatch.prefix_work((128, 1, 16), 8, 16384) == 2 ** 22
  assert not pays(128, 32768, 32, 32) and not pays(128, 16384, 16, 8)  # T·g = 1, 2: below hopper_split_min_rows
  assert pays(128, 16384, 16, 8, dataclasses.replace(t, hopper_split_min_rows=2))
  assert pays(128, 32768, 32, 32, dataclasses.replace(t, hopper_split_min_rows=1))
  assert not pays(128, 16384, 32, 8, dataclasses.replace(t, hopper_split_min_rows=0))  # 0: off
  assert not pays(128, 16383, 32, 8)  # below hopper_long_prefix: `short` does not split its keys
  assert pays(512, 16384, 32, 8) and pays(512, 8192, 32, 8)  # 64 items fill 0.48 with or without splits
  # the SMs bound the splits: doubled until the items reach the SMs, 16 items × 16 splits (1.94 a CTA), not more
  assert not pays(64, 16384, 32, 8, dataclasses.replace(t, hopper_min_fill=2.0))
  # the capacity bounds them: a split keeps at least 2 tiles of 128 keys, so 4096 keys split 16 ways at most (8 items
  # × 16: 0.97 a CTA, not 1.94); a product of 2^19 (a lowered hopper_min_work), the long setting from 4096 keys
  low = dataclasses.replace(t, hopper_min_work=2 ** 19, hopper_long_prefix=4096)
  assert splits(32, 4096, 32, 8) == 16
  assert pays(32, 4096, 32, 8, dataclasses.replace(low, hopper_min_fill=0.9))
  assert not pays(32, 4096, 32, 8, dataclasses.replace(low, hopper_min_fill=1.0))
  with pytest.raises(ValueError, match="hopper_split_min_rows must be an int >= 0; got -1"):
    dataclasses.replace(t, hopper_split_min_rows=-1)


def test_pallas_leaves_windows_wider_than_hopper_max_rows_to_triton():
  """hopper_max_rows: above that many T·g rows the Hopper kernel never runs, whatever the work and fill (the H200:
  8, from T·g 16 measured slower than Triton at P = 16K, B = 128-256); 0 bounds nothing; T·g up to it as before,
  the rows counted over the query steps too (T = 2, 3 with g = 4)."""
  h200 = tuning.file_for("NVIDIA H200").tuning
  def pays(b, hq, hkv, t=h200, p=16384):
    return dispatch.pays_on_hopper((b, 1, hq, 128), hkv, p, t, num_cores=132)

  assert h200.hopper_max_rows == 8
  assert not pays(256, 32, 2) and not pays(512, 24, 2)  # T·g 16, 12
  assert pays(256, 32, 2, dataclasses.replace(h200, hopper_max_rows=0))  # the rest of the rule takes it
  assert pays(256, 32, 2, dataclasses.replace(h200, hopper_max_rows=16))
  assert pays(512, 32, 4) and pays(1024, 32, 8, p=8192)  # T·g 8 and 4
  steps = lambda t: dispatch.pays_on_hopper((256, t, 32, 128), 8, 16384, h200, num_cores=132)  # noqa: E731
  assert steps(2) and not steps(3)  # T·g 8 from 2 steps of g = 4, 12 from 3
  with pytest.raises(ValueError, match="hopper_max_rows must be an int >= 0; got -1"):
    dataclasses.replace(h200, hopper_max_rows=-1)


def test_pallas_takes_the_hopper_kernel_only_for_a_large_prefix_product_on_hopper():
  """The automatic choice: a Hopper GPU and (rows per KV head) × (prefix capacity) >= the tuning's
  hopper_min_work."""
  q = jnp.zeros((512, 1, 32, 8), jnp.bfloat16)  # 2048 rows per KV head (g = 4)
  min_work = tuning.current().hopper_min_work
  assert dispatch.hopper_pays(q, 8, min_work // 2048) == dispatch.on_hopper()
  assert not dispatch.hopper_pays(q, 8, min_work // 2048 - 8)
  assert not dispatch.hopper_pays(q, 32, min_work // 2048)  # MHA: 512 rows
  # MHA decode (T·g = 1) takes it too, where its product is large enough (measured on the H200: PERF_NOTES.md)
  assert dispatch.pays_on_hopper(q.shape, 32, min_work // 512)
  assert not dispatch.pays_on_hopper(q.shape, 32, min_work // 512 - 8)
  assert dispatch.hopper_pays(q, 32, min_work // 512) == dispatch.on_hopper()
