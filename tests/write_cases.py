"""Shared cases of the cache-write tests (`test_kv_write`: the Pallas write kernel; `test_pair_scatter`: XLA's one
scatter of both caches)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from models import cache as cache_lib
from models.config import LlamaConfig

# (B, T, Hkv, D, S, lengths, new tokens): decode (one slot a sequence, one sequence at its capacity: dropped); a
# prefill chunk with padding slots (right-aligned) and overflow past the capacity, Hkv·D not a power of two; GQA-sized
# rows of 8 heads of 128, one sequence writing nothing.
CASES = {
    "decode": (3, 1, 2, 64, 9, [0, 4, 9], [1, 1, 1]),
    "chunk-odd-width": (2, 4, 3, 10, 7, [1, 5], [3, 4]),
    "wide": (4, 2, 8, 128, 16, [0, 3, 14, 7], [2, 1, 2, 0]),
}

DTYPES = {"f32": (jnp.float32, jnp.float32), "bf16": (jnp.bfloat16, jnp.bfloat16),
          "f32-to-bf16": (jnp.float32, jnp.bfloat16)}  # (k and v, the caches)


def inputs(case: str, dtypes: str):
  """A case's random caches `[B, S, Hkv, D]` and new k, v `[B, T, Hkv, D]` in its dtypes, and its slots
  (`write_positions`'s; in "wide" also a negative one, which no write may take): (k_cache, v_cache, k, v,
  positions)."""
  b, t, hkv, d, s, lengths, new = CASES[case]
  dtype, cache_dtype = DTYPES[dtypes]
  ks = jax.random.split(jax.random.PRNGKey(list(CASES).index(case)), 4)
  k_cache, v_cache = (jax.random.normal(key, (b, s, hkv, d), jnp.float32).astype(cache_dtype) for key in ks[:2])
  k, v = (jax.random.normal(key, (b, t, hkv, d), jnp.float32).astype(dtype) for key in ks[2:])
  pos = cache_lib.write_positions(jnp.array(lengths), jnp.array(new), t, s)
  if case == "wide":
    pos = pos.at[1, 0].set(-3)
  return k_cache, v_cache, k, v, pos

# A small GQA model and prompts that share a prefix, for the models' use of a write.
CFG = LlamaConfig(vocab_size=89, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=12, max_position_embeddings=256, eos_token_ids=())


def prompts() -> list[list[int]]:
  """Three prompts of a 10-token shared prefix and 1-3 tokens of their own."""
  shared = np.random.default_rng(5).integers(0, CFG.vocab_size, 10).tolist()
  return [shared + [3, 4], shared + [6], shared + [7, 8, 9]]
