"""The only module of experiments/ that runs `models`: build a random model, prefill, compile decode, and
re-position a decode state for timing (config.py, e2e.py and report.py import only `models.LlamaConfig`, and
config.py `models.parallel.split`, to check configs and estimate memory).

Decode is timed by running a few steps from a chosen position of the generation (see `at_step`): the decode
loop of `models.generate` is one jit-compiled `lax.while_loop` that donates its state, and its cost per step
depends only on the lengths of the caches (not on their contents), so a state can be moved to step j by setting
the step counter, the positions and the cache lengths, without re-running prefill.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import models
from models import LlamaConfig, parallel
from models.config import is_int

PAD_MULTIPLE = 16  # prefill's default padding of cache capacities


def build_model(shape: dict, dtype: str, seed: int, tp: int = 1) -> tuple[models.Llama, float]:
    """A randomly initialised Llama of `shape` (LlamaConfig fields), tensor parallel over the first `tp` devices
    (tp = 1: the single-device model, no mesh); returns the model and the init seconds."""
    config = LlamaConfig(**shape)
    mesh = None if tp == 1 else parallel.make_mesh(tp)
    start = time.perf_counter()
    model = models.init_random(config, dtype=jnp.dtype(dtype), seed=seed, mesh=mesh)
    jax.block_until_ready(model.params())
    return model, time.perf_counter() - start


def shape_param_bytes(shape: dict, itemsize: int) -> int:
    """Bytes of the weights of a model of `shape`, without building it."""
    import math

    shapes = models.llama.param_shapes(LlamaConfig(**shape))
    leaves = jax.tree.leaves(shapes, is_leaf=lambda s: isinstance(s, tuple))
    return sum(math.prod(s) for s in leaves) * itemsize


def kv_share(config: LlamaConfig, tp: int) -> float:
    """The fraction of a model's KV cache that one of `tp` devices holds (1 / tp, or 1 / Hkv where KV heads are
    replicated); ValueError where the heads do not split over `tp` devices."""
    return parallel.split(config, tp).kv_heads / config.num_key_value_heads


def param_bytes(model: models.Llama) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(model.params()))


def _round_up(x: int, m: int = PAD_MULTIPLE) -> int:
    return max(m, -(-x // m) * m)


def kv_bytes_per_token(config: LlamaConfig, itemsize: int) -> int:
    """K and V of one token in every layer."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * itemsize


def cache_estimate(tree: models.SharingTree, generate: int, config: LlamaConfig, itemsize: int) -> dict:
    """Bytes of the caches prefill allocates: the shared levels (+ suffixes), and the dense copies (standard)."""
    per_token = kv_bytes_per_token(config, itemsize)
    B = tree.num_sequences
    shared_tokens = sum(len(level.nodes) * _round_up(max(len(n) for n in level.nodes)) for level in tree.levels)
    suffix_cap = _round_up(max(len(s) for s in tree.suffixes) + generate)
    tree_bytes = per_token * (shared_tokens + B * suffix_cap)
    longest = max(tree.prefix_length(b) + len(tree.suffixes[b]) for b in range(B))
    dense_bytes = per_token * B * _round_up(longest + generate)
    return {"tree": tree_bytes, "dense": dense_bytes}


def sharing(tree: models.SharingTree) -> "floor.Sharing":
    """What the step floor needs of a tree: each shared node's length and readers, each sequence's own prompt
    tokens (suffix) and whole prompt."""
    from experiments import floor

    levels = []
    for level in tree.levels:
        readers = np.bincount(np.asarray(level.seq_to_node, np.int64), minlength=len(level.nodes))
        levels.append(tuple((len(node), int(r)) for node, r in zip(level.nodes, readers) if len(node) and r))
    suffixes = tuple(len(s) for s in tree.suffixes)
    prompts = tuple(tree.prefix_length(b) + suffixes[b] for b in range(tree.num_sequences))
    return floor.Sharing(tuple(levels), suffixes, prompts)


def synthetic_tree(batch: int, prefix: int, unique: int, vocab: int, seed: int) -> models.SharingTree:
    return models.synthetic_tree(batch, prefix, unique, vocab, seed=seed)


def apps_tree(fewshot: int, problem_prompt: int, problems: int, samples: int, vocab: int, seed: int,
              levels: int) -> models.SharingTree:
    """APPS-like sharing: a few-shot prefix read by every sequence, each problem's prompt read by its samples.

    levels=2: two shared levels (few-shot, then the problem prompt without its last token); each sample's suffix
    is the problem's last prompt token. levels=1: only the few-shot prefix is shared; each sample holds its
    problem's whole prompt in its own suffix. levels=0: nothing shared (every sequence's whole prompt in its
    suffix).
    """
    if levels not in (0, 1, 2) or isinstance(levels, bool):
        raise ValueError(f"apps_tree: levels must be 0, 1 or 2, got {levels!r}")
    # (levels=2: a problem prompt of 2 tokens at least, its last one each sample's suffix)
    least = dict(fewshot=0, problem_prompt=2 if levels == 2 else 1, problems=1, samples=1, vocab=1)
    for name, value in dict(fewshot=fewshot, problem_prompt=problem_prompt, problems=problems, samples=samples,
                            vocab=vocab).items():
        if not is_int(value) or value < least[name]:
            raise ValueError(f"apps_tree: {name} must be an integer >= {least[name]} (levels={levels}), got {value!r}")
    rng = np.random.default_rng(seed)
    shot = tuple(rng.integers(0, vocab, fewshot).tolist())
    prompts = [tuple(rng.integers(0, vocab, problem_prompt).tolist()) for _ in range(problems)]
    B = problems * samples
    owner = [b // samples for b in range(B)]
    if levels == 2:
        lv = (models.SharedLevel((shot,), (0,) * B),
              models.SharedLevel(tuple(p[:-1] for p in prompts), tuple(owner)))
        return models.SharingTree(lv, tuple((prompts[i][-1],) for i in owner))
    if levels == 1:
        return models.SharingTree((models.SharedLevel((shot,), (0,) * B),), tuple(prompts[i] for i in owner))
    return models.SharingTree((), tuple(shot + prompts[i] for i in owner))


def prefill(model, tree, generate: int, mode: str, backend: str | None, chunk: int,
            max_calls: int = 3) -> tuple[Any, dict]:
    """models.prefill, timed: the first call compiles and runs; later calls (cached) run only. A second call that is
    still more than half as slow as the first (some paths finish warming up on it) is followed by a third.
    `prefill_s` is the last call, `prefill_compile_s` = first - last.

    EOS is disabled (eos_ids=()) so that every sequence decodes the full length whatever random weights sample.
    """
    kw = dict(mode=mode, eos_ids=(), backend=backend, prefill_chunk=chunk)
    times, state = [], None
    for _ in range(max_calls):
        del state
        start = time.perf_counter()
        state = models.prefill(model, tree, generate, **kw)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - start)
        if len(times) >= 2 and times[-1] <= 0.5 * times[0]:
            break
    return state, {"prefill_s": times[-1], "prefill_compile_s": max(0.0, times[0] - times[-1]),
                   "prefill_calls": len(times)}


def derive_mode(state, mode: str, org: "Origin"):
    """The state (and its origin) that prefill(mode=...) gives, from a `hydragen` one: `shared_storage` keeps the
    same TreeCache, `none` keeps only lengths equal to the positions (as models.generate does for those modes)."""
    if mode == "shared_storage":
        return state.replace(mode=mode), org
    if mode == "none":
        cache = models.NoCache(lengths=jnp.copy(org.positions))
        return state.replace(mode=mode, cache=cache), dataclasses.replace(org, cache_lengths=jnp.copy(org.positions))
    raise ValueError(f"cannot derive mode {mode!r}")


def cache_bytes(state) -> int:
    return models.cache_bytes(state.cache)


@dataclasses.dataclass
class Origin:
    """Copies of the small arrays of a freshly prefilled state, to move it to any decode step."""

    cache_lengths: jax.Array
    positions: jax.Array
    logits: jax.Array


def origin(state) -> Origin:
    return Origin(jnp.copy(state.cache.lengths), jnp.copy(state.positions), jnp.copy(state.logits))


def at_step(state, org: Origin, step: int):
    """`state` as it is after `step` decode steps (lengths and counters; cache contents are not re-created)."""
    B = state.positions.shape[0]
    return state.replace(
        cache=state.cache.replace(lengths=org.cache_lengths + step),
        positions=org.positions + step,
        logits=jnp.copy(org.logits),  # the decode call donates its state
        lengths=jnp.full((B,), step, jnp.int32),
        done=jnp.zeros((B,), bool),
        step=jnp.asarray(step, jnp.int32),
    )


def compile_decode(model, state, backend: str | None):
    """models.generate.compile_decode with greedy sampling: (fn(params, state, num_steps), seconds)."""
    return models.compile_decode(model, state, sampling="greedy", backend=backend)


def run_decode(fn, model, state, steps: int) -> tuple[Any, float, int]:
    """Run `steps` decode steps; returns (new state, seconds, steps actually taken)."""
    params = model.params()
    before = int(state.step)
    jax.block_until_ready(state)
    start = time.perf_counter()
    state = fn(params, state, jnp.int32(steps))
    jax.block_until_ready(state)
    elapsed = time.perf_counter() - start
    return state, elapsed, int(state.step) - before
