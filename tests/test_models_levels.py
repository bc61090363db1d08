"""The models' cost model of a shared level (`hydragen_jax.dispatch.batching_pays`, the tuning's
`batch_min_readers` and `batch_min_saved_bytes`): which levels a `hydragen` step reads batched, the same tokens
either way, and what `generate` reports."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from hydragen_jax import dispatch, tuning
from models import generate, prefill
from models.cache import LevelCache, batched_levels, level_node_bytes, level_sizes
from models.config import LlamaConfig
from models.llama import init_random
from models.sharing import expand_samples
from tests.conftest import record_batch_shared

CFG = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=256, eos_token_ids=())
# 2 prompts x 3 samples: a shared root (1 node, 6 readers), the 2 problems (2 nodes, 3 readers each)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 20, 21, 22], [5, 6, 7, 8, 9, 10, 11, 12, 30, 31]]


def _with(min_readers: int, min_saved: int = 0) -> tuning.Tuning:
  return dataclasses.replace(tuning.current(), batch_min_readers=min_readers, batch_min_saved_bytes=min_saved)


def test_batching_pays_from_the_tunings_readers_a_node_and_bytes_saved():
  assert dispatch.batching_pays(8, 4, 1, _with(2)) and not dispatch.batching_pays(7, 4, 1, _with(2))
  assert dispatch.batching_pays(8, 1, 1, _with(8)) and not dispatch.batching_pays(8, 2, 1, _with(8))
  assert dispatch.batching_pays(3, 3, 0, _with(1))  # one reader a node pays where the tuning says so
  # bytes saved: (B - N) nodes' reads of node_bytes each
  assert dispatch.batching_pays(8, 2, 100, _with(2, 600)) and not dispatch.batching_pays(8, 2, 99, _with(2, 600))
  assert not dispatch.batching_pays(8, 8, 10**9, _with(1, 1))  # one reader a node saves nothing
  assert batched_levels("hydragen", 8, [(1, 10), (4, 10), (8, 10)], _with(2)) == [True, True, False]
  assert batched_levels("hydragen", 8, [(1, 10), (4, 10), (1, 2)], _with(2, 40)) == [True, True, False]
  assert batched_levels("shared_storage", 8, [(1, 10), (4, 10)], _with(2)) == [False, False]
  with tuning.override(_with(5)):
    assert batched_levels("hydragen", 8, [(1, 10), (2, 10)]) == [True, False]


def test_level_node_bytes_is_one_node_of_one_layer():
  k = jnp.zeros((3, 20, 2, 8), jnp.bfloat16)
  level = LevelCache((k, k), (k, k), jnp.zeros((3,), jnp.int32), (0, 1, 2, 2))
  assert level_node_bytes(level) == 2 * 20 * 2 * 8 * 2


def test_generate_reads_each_level_as_the_cost_model_says(monkeypatch):
  model = init_random(CFG, jnp.float32, seed=3)
  seen = record_batch_shared(monkeypatch)
  # The bytes each level saves batched: the root (1 node, 6 readers) 5 nodes' reads, the problems (2 nodes, 3 each) 4.
  state = prefill(model, expand_samples(PROMPTS, 3), 4, mode="hydragen", backend="xla")
  root, problems = (level_node_bytes(level) for level in state.cache.shared)
  root_saved, problems_saved = 5 * root, 4 * problems
  assert root_saved > problems_saved > 0
  runs = {}
  # every shared level batched; the root only (6 readers >= 4, the problems' 3 < 4); none (too few readers). Each
  # override is its own jit cache entry (a compile each: CI time), so the bytes' rule is checked on the levels the
  # step reads, without a generate of its own: the problems saving too few bytes leave the root alone batched.
  assert batched_levels("hydragen", 6, level_sizes(state.cache.shared), _with(2, problems_saved + 1)) == [True, False]
  assert batched_levels("hydragen", 6, level_sizes(state.cache.shared), _with(2, problems_saved)) == [True, True]
  cases = {"all": ((2, 0), [True, True]), "root": ((4, 0), [True, False]), "none": ((100, 0), [False, False])}
  for name, (rule, decode_choice) in cases.items():
    with tuning.override(_with(*rule)):
      seen.clear()
      runs[name] = generate(model, PROMPTS, num_samples=3, max_new_tokens=4, mode="hydragen", backend="xla")
      stats = runs[name].stats
      assert stats["shared_levels"] == 2 and stats["shared_levels_batched"] == sum(decode_choice), name
      # one choice per shared level in every call (prefill of a level: its parents'; the suffixes and decode: all)
      assert [b for b in seen if len(b) == 2] and all(b == decode_choice for b in seen if len(b) == 2), name
  for name in cases:
    np.testing.assert_array_equal(runs[name].tokens, runs["all"].tokens)
    np.testing.assert_allclose(runs[name].logits, runs["all"].logits, rtol=1e-5, atol=1e-5)
  for mode in ("shared_storage", "standard"):
    stats = generate(model, PROMPTS, num_samples=3, max_new_tokens=2, mode=mode, backend="xla").stats
    assert stats["shared_levels_batched"] == 0


@pytest.mark.parametrize("value", [0, 1.5, True])
def test_batch_min_readers_must_be_a_positive_int(value):
  with pytest.raises(ValueError, match=f"Tuning.batch_min_readers must be a positive int; got {value!r}"):
    _with(value)


@pytest.mark.parametrize("value", [-1, 2.0, True])
def test_batch_min_saved_bytes_must_be_an_int_of_at_least_0(value):
  with pytest.raises(ValueError, match=f"Tuning.batch_min_saved_bytes must be an int >= 0; got {value!r}"):
    _with(2, value)
