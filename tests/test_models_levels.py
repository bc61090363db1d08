"""The models' cost model of a shared level (`hydragen_jax.validation.batching_pays`, the tuning's
`batch_min_readers`): which levels a `hydragen` step reads batched, the same tokens either way, and what
`generate` reports."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import hydragen_jax
from hydragen_jax import tuning, validation
from models import generate
from models.cache import batched_levels
from models.config import LlamaConfig
from models.llama import init_random

CFG = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=256, eos_token_ids=())
# 2 prompts x 3 samples: a shared root (1 node, 6 readers), the 2 problems (2 nodes, 3 readers each)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 20, 21, 22], [5, 6, 7, 8, 9, 10, 11, 12, 30, 31]]


def _with(min_readers: int) -> tuning.Tuning:
  return dataclasses.replace(tuning.current(), batch_min_readers=min_readers)


def test_batching_pays_from_the_tunings_readers_a_node():
  assert validation.batching_pays(8, 4, _with(2)) and not validation.batching_pays(7, 4, _with(2))
  assert validation.batching_pays(8, 1, _with(8)) and not validation.batching_pays(8, 2, _with(8))
  assert validation.batching_pays(3, 3, _with(1))  # one reader a node pays where the tuning says so
  assert batched_levels("hydragen", 8, [1, 4, 8], _with(2)) == [True, True, False]
  assert batched_levels("shared_storage", 8, [1, 4], _with(2)) == [False, False]
  with tuning.override(_with(5)):
    assert batched_levels("hydragen", 8, [1, 2]) == [True, False]


def test_generate_reads_each_level_as_the_cost_model_says(monkeypatch):
  model = init_random(CFG, jnp.float32, seed=3)
  seen = []
  real = hydragen_jax.tree_attention

  def spy(q, levels, **kw):
    seen.append(kw.get("batch_shared"))
    return real(q, levels, **kw)

  monkeypatch.setattr(hydragen_jax, "tree_attention", spy)
  runs = {}
  # every shared level batched; the root only (6 readers >= 4, the problems' 3 < 4); none. Each override is its own
  # jit cache entry.
  for readers, decode_choice in ((2, [True, True]), (4, [True, False]), (100, [False, False])):
    with tuning.override(_with(readers)):
      seen.clear()
      runs[readers] = generate(model, PROMPTS, num_samples=3, max_new_tokens=4, mode="hydragen", backend="xla")
      stats = runs[readers].stats
      assert stats["shared_levels"] == 2 and stats["shared_levels_batched"] == sum(decode_choice)
      # one choice per shared level in every call (prefill of a level: its parents'; the suffixes and decode: all)
      assert [b for b in seen if len(b) == 2] and all(b == decode_choice for b in seen if len(b) == 2)
  for readers in (4, 100):
    np.testing.assert_array_equal(runs[readers].tokens, runs[2].tokens)
    np.testing.assert_allclose(runs[readers].logits, runs[2].logits, rtol=1e-5, atol=1e-5)
  for mode in ("shared_storage", "standard"):
    stats = generate(model, PROMPTS, num_samples=3, max_new_tokens=2, mode=mode, backend="xla").stats
    assert stats["shared_levels_batched"] == 0


@pytest.mark.parametrize("value", [0, 1.5, True])
def test_batch_min_readers_must_be_a_positive_int(value):
  with pytest.raises(ValueError, match=f"Tuning.batch_min_readers must be a positive int; got {value!r}"):
    _with(value)
