"""Generation with shared prefixes: prefill each shared level once, ragged prefill of the unique parts, then the
whole decode loop in one jit-compiled ``lax.while_loop``.

Public pieces (benchmarks time them separately):

- ``prefill(model, prompts_or_tree, max_new_tokens, *, mode, ...) -> DecodeState``: builds the caches of
  ``mode`` and the logits of each sequence's next token. Shared levels are prefilled once per node (their tokens
  attend to their ancestors' nodes and causally to themselves), then the unique suffixes of all sequences in
  one batched, right-aligned ragged pass. Long levels are processed in chunks of ``prefill_chunk`` tokens, in a
  ``lax.fori_loop`` over the chunks (the model compiled once, whatever the number of chunks).
- ``decode(model, state, num_steps, *, sampling, backend) -> DecodeState``: up to ``num_steps`` more tokens for
  every sequence inside one ``lax.while_loop`` (stops early when all sequences are done). No Python between
  tokens; the loop's condition is read by the host before each step. ``state`` is donated (its buffers are
  reused); do not use it afterwards.
- ``generate(model, prompts, ...) -> Generation``: both, from token ids or text, with samples per prompt, EOS
  and per-sequence stops, progress per chunk of decode steps, and timing stats.

Modes (see ``models.cache``): ``hydragen``, ``standard``, ``shared_storage``, ``none`` (no attention: a
throughput upper bound for benchmarks only, its text is meaningless).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P

from hydragen_jax.validation import check_mesh_backend
from models.cache import (Cache, DenseCache, LevelCache, NoCache, TreeCache, advance, batched_levels, check_mode,
                          empty_layers, level_sizes, make_attend)
from models.config import LlamaConfig, is_int, is_integer
from models import llama as llama_module
from models.llama import COMPILER_OPTIONS, Llama
from models.sharing import SharingTree, build_sharing_tree, expand_samples

# ------------------------------------------------------------------------------------------------- sampling


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. temperature 0 = greedy (argmax); top_k 0 = off; top_p 1.0 = off."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        def number(name: str, kind) -> Any:  # a Python or numpy number as a Python one (hashable, static); not bool
            value = getattr(self, name)
            return None if isinstance(value, (bool, np.bool_)) or not isinstance(value, kind) else value

        t, k, p = number("temperature", numbers.Real), number("top_k", numbers.Integral), number("top_p", numbers.Real)
        f32 = np.finfo(np.float32)  # the sampler divides float32 logits by it: a normal float32 number
        if t is None or not (t == 0 or float(f32.tiny) <= t <= float(f32.max)):  # as Python floats: no cast
            raise ValueError(f"sampling: temperature must be 0 (greedy) or a number in [{f32.tiny:.3g}, "
                             f"{f32.max:.3g}] (float32's normals), got {self.temperature!r}")
        if k is None or k < 0:
            raise ValueError(f"sampling: top_k must be an integer >= 0, got {self.top_k!r}")
        if p is None or not 0 < p <= 1:
            raise ValueError(f"sampling: top_p must be in (0, 1], got {self.top_p!r}")
        for name, value in (("temperature", float(t)), ("top_k", int(k)), ("top_p", float(p))):
            object.__setattr__(self, name, value)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def static(self) -> "SamplingConfig":
        """What a compiled decode loop is specialised on: greedy or not, top_k, top_p on or off (1.0 or 0.5 stand
        for off and on). The temperature and top_p values are traced arguments of the loop: another value reuses
        it (as a static argument, each value compiled a loop of its own: seconds for a 7B model)."""
        if self.greedy:  # top_k and top_p do not apply: one loop for every greedy config
            return SamplingConfig(0.0)
        return SamplingConfig(1.0, self.top_k, 0.5 if self._top_p_on else 1.0)

    @property
    def _top_p_on(self) -> bool:
        """Whether the nucleus filter applies: top_p below 1 in float32, the loop's (1 - 1e-9 is 1.0 there)."""
        return bool(np.float32(self.top_p) < 1.0)

    @classmethod
    def make(cls, spec: "SamplingConfig | dict | str | None") -> "SamplingConfig":
        """From a SamplingConfig, a dict of options, "greedy" or None (greedy)."""
        if spec is None or spec == "greedy":
            return cls(temperature=0.0)
        if isinstance(spec, cls):
            return spec
        if isinstance(spec, dict):
            known = [f.name for f in dataclasses.fields(cls)]
            unknown = [k for k in spec if k not in known]
            if unknown:
                raise ValueError(f"unknown sampling option {unknown[0]!r}; known options: {known}")
            return cls(**spec)
        raise ValueError(f"sampling must be a SamplingConfig, a dict, 'greedy' or None, got {spec!r}")


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
    """Keep the k largest logits of each row ``[B, V]`` (ties at the k-th value kept), others -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_mask(logits: jax.Array, p: float | jax.Array) -> jax.Array:
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches p (at least one); p a number
    (1.0: every token, no work) or a traced scalar."""
    if not isinstance(p, jax.core.Tracer) and bool(np.all(np.asarray(p) >= 1.0)):  # a number or array, concrete
        return logits
    ranked = -jnp.sort(-logits, axis=-1)  # the values, most likely first (no indices: a sort, no scatter back)
    probs = jax.nn.softmax(ranked, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass strictly above each sorted entry
    keep = (before < p) | (p >= 1.0)  # a traced p of 1.0: every token (float32 sums can fall short of it)
    n = jnp.maximum(jnp.sum(keep, axis=-1, keepdims=True), 1)  # tokens kept (a prefix of the ranking)
    last = jnp.take_along_axis(ranked, n - 1, axis=-1)  # the value of the last one kept
    # the n first by position, not every token tied with the last one (transformers' TopPLogitsWarper keeps the
    # same mass): those above it, then of those tied with it the lower ids first, as many as make n
    above, tied = logits > last, logits == last
    room = n - jnp.sum(above, axis=-1, keepdims=True)
    return jnp.where(above | (tied & (jnp.cumsum(tied, axis=-1) <= room)), logits, -jnp.inf)


def categorical(key: jax.Array, x: jax.Array, vocab_size: int | None = None) -> jax.Array:
    """``jax.random.categorical(key, x[:, :vocab_size])`` for logits ``[B, V']`` whose columns from
    ``vocab_size`` on are padding (-inf: the vocabulary padded to a multiple of the mesh's devices), without
    cutting them off: the Gumbel noise of a ``[B, vocab_size]`` draw, zero-padded, so that the same key draws the
    same tokens as on one device and the logits keep their vocabulary-parallel layout."""
    V = x.shape[-1] if vocab_size is None else vocab_size
    if not 0 < V <= x.shape[-1]:
        raise ValueError(f"categorical: vocab_size must be in [1, {x.shape[-1]}] (the logits' width), got {V}")
    noise = jax.random.gumbel(key, (*x.shape[:-1], V), x.dtype)  # categorical's own draw for [B, V]
    if V < x.shape[-1]:
        noise = jnp.pad(noise, [(0, 0)] * (x.ndim - 1) + [(0, x.shape[-1] - V)])
    return jnp.argmax(noise + x, axis=-1)


def sample(logits: jax.Array, key: jax.Array, cfg: SamplingConfig, vocab_size: int | None = None, *,
           temperature: float | jax.Array | None = None, top_p: float | jax.Array | None = None
           ) -> tuple[jax.Array, jax.Array]:
    """Next tokens ``[B]`` int32 from logits ``[B, V']`` and their log-probs ``[B]`` under the model's
    unmodified distribution (log-softmax of the raw logits). vocab_size: the real vocabulary V <= V' (None: V');
    columns past it are padding (-inf) and the draw is that of the first V columns. temperature, top_p: values
    (traced in the decode loop) in place of cfg's, whose greedy, top_k and top_p on / off still decide; concrete
    ones are checked as SamplingConfig checks its own. cfg: anything ``SamplingConfig.make`` takes."""
    if jnp.ndim(logits) != 2:
        raise ValueError(f"sample: logits must be [B, V'] (a row of logits a sequence), got shape "
                         f"{jnp.shape(logits)}" + (" (one sequence: logits[None])" if jnp.ndim(logits) == 1 else ""))
    cfg = SamplingConfig.make(cfg)
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if value is not None and not isinstance(value, jax.core.Tracer) and np.ndim(value) == 0:
            try:  # a 0-d numpy or JAX array as its number
                value = float(np.asarray(value))
            except (TypeError, ValueError):
                pass  # (not a number: SamplingConfig names it)
            SamplingConfig(**{"temperature": 1.0, name: value})  # its range checks
    for name, value, on, what in (("temperature", temperature, lambda v: v != 0, not cfg.greedy),
                                  ("top_p", top_p, lambda v: v < 1.0, cfg._top_p_on)):
        if value is not None and not isinstance(value, jax.core.Tracer) and np.ndim(value) == 0 and \
                bool(on(np.float32(value))) != what:
            raise ValueError(f"sample: {name}={value!r} where cfg has it {'on' if what else 'off'} ({cfg}); the "
                             "keyword replaces the value of a setting cfg turns on (the decode loop's traced one)")
    logits = logits.astype(jnp.float32)
    if cfg.greedy:
        tok = jnp.argmax(logits, axis=-1)
    else:
        t = cfg.temperature if temperature is None else temperature
        p = cfg.top_p if top_p is None or not cfg._top_p_on else top_p
        # Less the row's max first (the draw is the same): scaled by a small temperature the scores only go down,
        # to -inf at worst, never up to +inf, whose ties would take the first index instead of the largest logit.
        shifted = logits - jnp.max(logits, axis=-1, keepdims=True)
        x = top_p_mask(top_k_mask(shifted / t, cfg.top_k), p)
        tok = categorical(key, x, vocab_size)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tok[:, None], axis=-1)[:, 0]
    return tok.astype(jnp.int32), logp


# ------------------------------------------------------------------------------------------------- state


@struct.dataclass
class DecodeState:
    """Everything the decode loop carries (a pytree). B sequences, N = max new tokens.

    cache: the mode's cache; logits ``[B, V]`` float32 for the next token (on a mesh ``[B, V']``, padded -inf);
    positions ``[B]`` RoPE position of the next token fed; tokens ``[B, N]`` (pad after a sequence stops); logprobs
    ``[B, N]``; lengths ``[B]`` tokens generated (stop token included); done ``[B]``; step () steps taken; key PRNG
    key; max_new ``[B]`` per-sequence budgets; stop_tokens ``[B, K]`` ids that end each sequence (-1 = none);
    long_rope: longrope's long factors in use (prompts past the pretraining context: ``prefill``), which ``decode``
    keeps.
    """

    cache: Cache
    logits: jax.Array
    positions: jax.Array
    tokens: jax.Array
    logprobs: jax.Array
    lengths: jax.Array
    done: jax.Array
    step: jax.Array
    key: jax.Array
    max_new: jax.Array
    stop_tokens: jax.Array
    mode: str = struct.field(pytree_node=False, default="hydragen")
    pad_id: int = struct.field(pytree_node=False, default=0)
    long_rope: bool = struct.field(pytree_node=False, default=False)


def _in_32_bits(fn):
    """``fn`` traced and run as without ``jax_enable_x64``: the models' positions, lengths, cache slots and steps
    are 32-bit (with the mode on, Python ints would trace as int64 beside them)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with jax.enable_x64(False):
            return fn(*args, **kwargs)
    return wrapper


def _positive_int(name: str, value) -> int:
    """``value`` as an int >= 1 (``models.config.is_integer``); ``ValueError`` naming ``name`` otherwise."""
    if not is_integer(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _id_list(name: str, ids, vocab_size: int) -> list[int]:
    """``ids`` (a sequence of token ids: eos_ids, one entry of stop_tokens; a list, tuple, range or 1-d integer
    array) as ints in [0, vocab_size); ``ValueError`` naming ``name`` otherwise (a bare int, floats, ids outside
    the vocabulary)."""
    if isinstance(ids, (np.ndarray, jax.Array)):
        values = ids.tolist() if ids.ndim == 1 and np.issubdtype(ids.dtype, np.integer) else None
    else:
        values = list(ids) if isinstance(ids, (list, tuple, range)) and all(map(is_integer, ids)) else None
    if values is None or any(not 0 <= int(t) < vocab_size for t in values):
        raise ValueError(f"{name} must be a sequence of token ids in [0, {vocab_size}), got {ids!r}")
    return [int(t) for t in values]


def _round_up(x: int, m: int) -> int:
    """x rounded up to a multiple of m, at least m (a capacity of 0 keys still holds one tile)."""
    return max(m, -(-x // m) * m)


def _token_width(x: int, m: int) -> int:
    """The width of a prefill's token array for rows of at most ``x`` tokens: the next power of two up to ``m``, then
    multiples of ``m`` (a one-token suffix is not padded to ``m`` tokens, and lengths in a bucket share a compile)."""
    return min(1 << max(x - 1, 0).bit_length(), m) if x < m else _round_up(x, m)


def _right_aligned(rows: Sequence[Sequence[int]], T: int) -> np.ndarray:
    """rows of token ids as an int32 ``[len(rows), T]`` array, each row's ids at its end (zeros before)."""
    out = np.zeros((len(rows), T), np.int32)
    for i, r in enumerate(rows):
        if r:
            out[i, T - len(r):] = r
    return out


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static shapes of a prefill (hashable, a jit static argument)."""

    level_nodes: tuple[int, ...]  # N_l
    level_tokens: tuple[int, ...]  # T_l: the token arrays' width for the longest node (_token_width)
    level_capacity: tuple[int, ...]  # storage length of each level
    seq_to_node: tuple[tuple[int, ...], ...]  # per level: the node of each sequence
    ancestors: tuple[tuple[tuple[int, ...], ...], ...]  # per level l, per level j < l: each node's ancestor node
    suffix_tokens: int  # U: the token arrays' width for the longest suffix (_token_width)
    suffix_capacity: int  # U + max new tokens, rounded
    dense_capacity: int  # longest prompt + max new tokens, rounded (standard mode; 0 in the others)
    chunk: int


def _host_arrays(tree: SharingTree, max_new: int, pad_multiple: int, chunk: int, *,
                 dense: bool) -> tuple[_Plan, dict]:
    """The prefill's static plan and its host arrays (``dense``: the standard mode's per-sequence caches' capacity
    too). Token arrays are right-aligned in widths of a power of two below ``pad_multiple``, multiples of it above
    (`_token_width`), so prompts whose lengths differ within that rounding (the same tree shape) share one compiled
    prefill."""
    B = tree.num_sequences
    arrays: dict[str, Any] = {"levels": []}
    nodes, tokens, capacity, seq_to_node, ancestors = [], [], [], [], []
    offsets = np.zeros((len(tree.levels) + 1, B), np.int32)  # start of level l in each sequence
    for l, level in enumerate(tree.levels):
        lens = np.array([len(n) for n in level.nodes], np.int32)
        s2n = np.array(level.seq_to_node, np.int32)
        T = int(lens.max())
        width = _token_width(T, pad_multiple)
        # each node's ancestors and start position, from any sequence reading it
        reader = np.zeros(len(level.nodes), np.int64)
        reader[s2n[::-1]] = np.arange(B)[::-1]
        anc = np.stack([np.array(tree.levels[j].seq_to_node, np.int32)[reader] for j in range(l)]) \
            if l else np.zeros((0, len(level.nodes)), np.int32)
        arrays["levels"].append({"tokens": _right_aligned(level.nodes, width), "lengths": lens,
                                 "start": offsets[l][reader].astype(np.int32)})
        seq_to_node.append(tuple(int(n) for n in s2n))
        ancestors.append(tuple(tuple(int(n) for n in row) for row in anc))
        offsets[l + 1] = offsets[l] + lens[s2n]
        nodes.append(len(level.nodes))
        tokens.append(width)
        capacity.append(_round_up(T, pad_multiple))
    u = np.array([len(s) for s in tree.suffixes], np.int32)
    U = int(u.max())
    suffix_width = _token_width(U, pad_multiple)
    arrays.update(suffix_tokens=_right_aligned(tree.suffixes, suffix_width), suffix_lengths=u, offsets=offsets)
    prompt_max = int((offsets[-1] + u).max())
    plan = _Plan(tuple(nodes), tuple(tokens), tuple(capacity), tuple(seq_to_node), tuple(ancestors),
                 suffix_width, _round_up(U + max_new, pad_multiple),
                 _round_up(prompt_max + max_new, pad_multiple) if dense else 0, chunk)
    return plan, arrays


def _prefill_rows(model: Llama, cache: TreeCache, tokens, lengths, start, plan_chunk: int, backend):
    """Prefill rows (nodes or sequences) whose right-aligned tokens ``[N, T]`` go into ``cache.k/v``; returns
    the cache and the final hidden state of each row's last token ``[N, d]``."""
    N, T = tokens.shape
    C = min(plan_chunk, T)

    def chunk(c0, carry):  # chunk c covers token indices [c0, c0 + C) of every row; c0 static or traced
        cache, last = carry
        new = jnp.clip(lengths - c0, 0, C)
        idx = jnp.arange(C)[None, :] - (C - new[:, None]) + c0  # token index in the row of each slot
        src = jnp.clip(idx + (T - lengths[:, None]), 0, T - 1)  # column in the right-aligned input
        chunk_tokens = jnp.take_along_axis(tokens, src, axis=1)
        positions = jnp.maximum(start[:, None] + idx, 0)
        hidden, cache = model(chunk_tokens, positions, cache, make_attend("hydragen", new, backend))
        cache = advance(cache, new)
        ends_here = (lengths > c0) & (lengths <= c0 + C)
        return cache, jnp.where(ends_here[:, None], hidden[:, -1], last)

    carry = (cache, jnp.zeros((N, model.config.hidden_size), model.dtype))
    chunks = -(-T // C)
    if chunks == 1:
        return chunk(0, carry)
    # the loop's carry keeps one dtype: `last` in that of the hidden state (the final norm's weight may be wider
    # than the embedding's), found by tracing one chunk abstractly
    carry = (cache, jnp.zeros_like(carry[1], dtype=jax.eval_shape(chunk, 0, carry)[1].dtype))
    # Every chunk has the same shapes ([N, C] tokens over the same caches), so a loop compiles the model once
    # rather than once a chunk (unrolled, the long document's 32K-token level in four 8K chunks took 80 s of prefill
    # compile on the H200, its 16K in two 36 s, its 8K in one 20 s)
    return jax.lax.fori_loop(0, chunks, lambda c, carry: chunk(c * C, carry), carry)


def _prefill_impl(params, arrays, *, config: LlamaConfig, plan: _Plan, mode: str, backend, mesh=None):
    """The prefill (jitted, `_prefill_jit`): each shared level's nodes through the model in `plan.chunk`-token
    chunks, reading their ancestors' caches, then the suffixes; returns the mode's cache and the logits of each
    sequence's last prompt token, and the RoPE position of each sequence's next token. ``arrays``: `_host_arrays`'
    token arrays, lengths and offsets."""
    model = Llama(config, params, mesh)
    L, Hkv, D = config.num_hidden_layers, model.kv_heads, config.head_dim
    dtype = model.dtype
    shared: list[LevelCache] = []
    for l, la in enumerate(arrays["levels"]):
        N, cap = plan.level_nodes[l], plan.level_capacity[l]
        ancestors = tuple(LevelCache(lc.k, lc.v, lc.lengths, plan.ancestors[l][j]) for j, lc in enumerate(shared))
        own = TreeCache(ancestors, *empty_layers(L, (N, cap, Hkv, D), dtype, model.kv_sharding),
                        lengths=jnp.zeros((N,), jnp.int32))
        own, _ = _prefill_rows(model, own, la["tokens"], la["lengths"], la["start"], plan.chunk, backend)
        shared.append(LevelCache(own.k, own.v, own.lengths, plan.seq_to_node[l]))
    B = arrays["suffix_lengths"].shape[0]
    S = plan.suffix_capacity
    tree_cache = TreeCache(tuple(shared), *empty_layers(L, (B, S, Hkv, D), dtype, model.kv_sharding),
                           lengths=jnp.zeros((B,), jnp.int32))
    tree_cache, last = _prefill_rows(model, tree_cache, arrays["suffix_tokens"], arrays["suffix_lengths"],
                                     arrays["offsets"][-1], plan.chunk, backend)
    logits = model.logits(last)
    positions = arrays["offsets"][-1] + arrays["suffix_lengths"]
    if mode in ("hydragen", "shared_storage"):
        cache = tree_cache
    elif mode == "standard":
        cache = _dense_from_tree(tree_cache, arrays["offsets"], plan.dense_capacity)
    else:
        cache = NoCache(lengths=positions)
    return cache, logits, positions


def _dense_from_tree(tc: TreeCache, offsets, capacity: int) -> DenseCache:
    """Copy each sequence's whole prompt (its shared nodes, then its suffix) into its own cache: per layer, one
    gather from the tree cache's storage (flattened; one extra zero row serves the unused slots)."""
    B = tc.lengths.shape[0]
    parts = [(lc.k, lc.v, lc.lengths, lc.nodes) for lc in tc.shared]
    parts.append((tc.k, tc.v, tc.lengths, jnp.arange(B)))
    src = jnp.full((B, capacity), -1, jnp.int32)  # row of the flat storage for each dense slot
    j = jnp.arange(capacity)[None, :]
    base = 0
    for l, (pk, _, plen, s2n) in enumerate(parts):
        n_nodes, cap = pk[0].shape[:2]
        idx = j - offsets[l][:, None]  # [B, S]: index inside this part
        valid = (idx >= 0) & (idx < plen[s2n][:, None])
        src = jnp.where(valid, base + s2n[:, None] * cap + idx, src)
        base += n_nodes * cap
    src = jnp.where(src < 0, base, src)

    def gather(layers):  # layers: per part, the part's array of this layer
        flat = [x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:]) for x in layers]  # (-1 fails on 0 keys)
        return jnp.concatenate(flat + [jnp.zeros((1,) + flat[0].shape[1:], flat[0].dtype)])[src]

    num_layers = len(tc.k)
    k = tuple(gather([pk[i] for pk, _, _, _ in parts]) for i in range(num_layers))
    v = tuple(gather([pv[i] for _, pv, _, _ in parts]) for i in range(num_layers))
    return DenseCache(k=k, v=v, lengths=offsets[-1] + tc.lengths)


def _at_top_level() -> bool:
    """Whether JAX is tracing nothing now: XLA compiler options may be given only to a jit called at the top level
    (under an outer jit or eval_shape, the model's step is compiled as part of that program, with its options)."""
    from jax._src import core  # noqa: PLC0415 (no public query for this in jax 0.11)

    return bool(getattr(core, "trace_state_clean", lambda: False)())


def _model_jit(fn, **jit_kw):
    """``fn`` jitted with ``COMPILER_OPTIONS`` where it is called at the top level, plain under an outer trace (where
    JAX refuses per-jit compiler options); ``.lower`` (ahead-of-time compiles) is the top-level one's."""
    top, nested = jax.jit(fn, compiler_options=COMPILER_OPTIONS, **jit_kw), jax.jit(fn, **jit_kw)

    def call(*args, **kwargs):
        return (top if _at_top_level() else nested)(*args, **kwargs)

    call.lower = top.lower
    return call


_prefill_jit = _model_jit(_prefill_impl, static_argnames=("config", "plan", "mode", "backend", "mesh"))


def _token_ids(prompt, i: int, arg: str) -> list[int]:
    """Prompt ``i`` of argument ``arg`` as a list of Python ints. ``ValueError`` naming both for an empty prompt
    or ids that are not integers (floats such as 1.5 or even 2.0, bools, strings)."""
    ids = np.asarray(prompt)
    if ids.size == 0:
        raise ValueError(f"{arg}: prompt {i} is empty")
    if isinstance(prompt, (list, tuple)):  # element by element: numpy would turn [True, 5] into integers
        integers = all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt)
    else:
        integers = np.issubdtype(ids.dtype, np.integer)
    if ids.ndim != 1 or not integers:
        raise ValueError(f"{arg}: prompt {i} must be a sequence of integer token ids, got {prompt!r} "
                         f"(dtype {ids.dtype}, shape {ids.shape})")
    return ids.tolist()


def _as_tree(prompts_or_tree, max_depth: int, vocab_size: int) -> SharingTree:
    """The sharing tree of `prefill`'s argument; prompts' token ids checked against the vocabulary here, by the
    user's prompt and position (not by the tree's node built from them); a tree's by `prefill`."""
    if isinstance(prompts_or_tree, SharingTree):
        return prompts_or_tree
    if isinstance(prompts_or_tree, (str, bytes)) or not isinstance(prompts_or_tree, (Sequence, np.ndarray,
                                                                                      jax.Array)):
        what = repr(prompts_or_tree)[:60] if isinstance(prompts_or_tree, (str, bytes)) else type(
            prompts_or_tree).__name__
        raise ValueError(f"prompts_or_tree must be a SharingTree or a list of token-id prompts (one a sequence), got "
                         f"{what} (text: encode it first, or use generate(..., tokenizer=...))")
    prompts = [_token_ids(p, i, "prompts_or_tree") for i, p in enumerate(prompts_or_tree)]
    _check_vocabulary([(f"prompts_or_tree[{i}]", p) for i, p in enumerate(prompts)], vocab_size)
    return build_sharing_tree(prompts, max_depth=max_depth)


@_in_32_bits
def prefill(model: Llama, prompts_or_tree: SharingTree | Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
            *, mode: str = "hydragen", eos_ids: Sequence[int] | None = None,
            stop_tokens: Sequence[Sequence[int]] | None = None, seed: int = 0, backend: str | None = None,
            max_depth: int = 3, pad_multiple: int = 16, prefill_chunk: int = 2048) -> DecodeState:
    """Caches and first-token logits for every sequence of a sharing tree (or of token-id prompts, one per
    sequence, whose tree is built by ``build_sharing_tree``).

    max_new_tokens: an int, or one budget per sequence. eos_ids: ids ending every sequence (default: the
    config's). stop_tokens: extra stop ids per sequence. pad_multiple: the caches' capacities are rounded up to a
    multiple of it, and the prefill's token arrays to one (below it: to a power of two), so that prompts of other
    lengths within that rounding (over a tree of the same shape) reuse one compiled prefill (not the standard mode,
    whose per-sequence caches round each whole prompt; 1: exact widths, a compile a length); the state's tokens
    ``[B, N]`` are as wide as the largest budget N, which the decode loop is compiled for. Raises ``ValueError``
    on bad input.
    """
    return _prefill(model, prompts_or_tree, max_new_tokens, mode=mode, eos_ids=eos_ids, stop_tokens=stop_tokens,
                    seed=seed, backend=backend, max_depth=max_depth, pad_multiple=pad_multiple,
                    prefill_chunk=prefill_chunk)


def _prefill(model: Llama, prompts_or_tree, max_new_tokens, *, mode: str = "hydragen", eos_ids=None,
             stop_tokens=None, seed=0, backend=None, max_depth=3, pad_multiple=16, prefill_chunk=2048,
             stats: dict | None = None, last_token_unused: bool = False, samples: int = 1) -> DecodeState:
    """``prefill``, for ``generate``: ``stats`` (a dict) gets the prefill's compile time, "prefill_compile_s";
    ``last_token_unused``: the caller drops the logits the last new token gives, so prompt + new tokens may exceed
    ``max_length`` by one (``_generate_across_longrope_context``); ``samples``: generate's num_samples, for the
    refusals' names of sequences."""
    _check_model(model, "prefill")
    check_mode(mode)
    config: LlamaConfig = model.config
    key = _key(seed)
    pad_multiple, prefill_chunk = _positive_int("pad_multiple", pad_multiple), _positive_int("prefill_chunk",
                                                                                              prefill_chunk)
    tree = _as_tree(prompts_or_tree, max_depth, config.vocab_size)
    B = tree.num_sequences
    raw = np.asarray(_clip_huge(max_new_tokens))
    if not np.issubdtype(raw.dtype, np.integer) or raw.ndim > 1 or (raw.ndim == 1 and raw.shape != (B,)):
        raise ValueError(f"max_new_tokens must be an integer or one integer per sequence ({B}), got "
                         f"{max_new_tokens!r}")
    if (raw < 1).any():
        raise ValueError(f"max_new_tokens must be >= 1, got {int(raw.min())}")
    # past the int32 range is past any model's length (refused below); the cast must not wrap it
    given = np.broadcast_to(raw, (B,))
    budgets = np.minimum(given, 2**31 - 1).astype(np.int64)
    N = int(budgets.max())
    config = _longrope_choice(config, tree)
    for b in range(B):
        total = tree.prefix_length(b) + len(tree.suffixes[b])
        if total + budgets[b] > config.max_length + last_token_unused:
            raise ValueError(f"{_sequence_name(b, samples)}: prompt of {total} tokens + max_new_tokens "
                             f"{int(given[b])} exceeds the model's {_length_limit(config)}")
    if isinstance(prompts_or_tree, SharingTree):  # (prompts: checked by _as_tree)
        _check_vocabulary([(f"tree.levels[{i}].nodes[{j}]", n) for i, level in enumerate(tree.levels)
                           for j, n in enumerate(level.nodes)]
                          + [(f"tree.suffixes[{b}] (sequence {b}'s own tokens)", x) for b, x in enumerate(tree.suffixes)],
                          config.vocab_size)
    # the config's ids outside the vocabulary (accepted with a warning, as transformers does) can never be drawn
    eos = (tuple(i for i in config.eos_token_ids if 0 <= i < config.vocab_size) if eos_ids is None
           else tuple(_id_list("eos_ids", eos_ids, config.vocab_size)))
    extra = ([_id_list(f"stop_tokens[{b}]", s, config.vocab_size)
              for b, s in enumerate(_stop_entries(stop_tokens, B, "sequence"))]
             if stop_tokens is not None else [[] for _ in range(B)])
    # K columns a sequence, a power of two of at least 4: other stop lists of up to K ids reuse the compiled loop
    K = max(4, 1 << (max(len(eos) + len(s) for s in extra) - 1).bit_length())
    stops = np.full((B, K), -1, np.int32)
    for b, s in enumerate(extra):
        ids = list(eos) + s
        stops[b, :len(ids)] = ids

    _check_mesh_backend(model, backend)
    plan, arrays = _host_arrays(tree, N, pad_multiple, prefill_chunk, dense=mode == "standard")
    args = (model.params(), jax.tree.map(jnp.asarray, arrays))
    kw = dict(config=config, plan=plan, mode=mode, backend=backend, mesh=model.mesh)
    if stats is not None:
        t0 = time.perf_counter()
        fn = _prefill_jit.lower(*args, **kw).compile()
        stats["prefill_compile_s"] = time.perf_counter() - t0
        cache, logits, positions = fn(*args)
    else:
        cache, logits, positions = _prefill_jit(*args, **kw)
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    books = dict(tokens=jnp.full((B, N), pad, jnp.int32), logprobs=jnp.zeros((B, N), jnp.float32),
                 lengths=jnp.zeros((B,), jnp.int32), done=jnp.zeros((B,), bool), step=jnp.zeros((), jnp.int32),
                 key=key, max_new=jnp.asarray(budgets, jnp.int32), stop_tokens=jnp.asarray(stops))
    if model.mesh is not None:  # replicated, as decode returns them: a second decode() then hits its jit cache
        books = jax.device_put(books, NamedSharding(model.mesh, P()))
    return DecodeState(cache=cache, logits=logits, positions=positions, **books, mode=mode, pad_id=pad,
                       long_rope=config.rope_scaling is not None and config.rope_scaling.use_long)


def _key(seed) -> jax.Array:
    """The sampling key of ``seed`` (JAX's: seeds that agree in their low 32 bits give the same key); ``ValueError``
    naming it where it is not an integer in JAX's range of seeds, [-2**63, 2**63)."""
    if not is_integer(seed) or not -2**63 <= int(seed) < 2**63:
        raise ValueError(f"seed must be an integer in [-2**63, 2**63) (the sampling key's seed; JAX keeps its low "
                         f"32 bits), got {seed!r}")
    return jax.random.key(seed)


def _stop_entries(stop_tokens, count: int, what: str) -> list:
    """``stop_tokens`` as a list of ``count`` entries (each checked by ``_id_list``); ``ValueError`` otherwise."""
    arrays = (np.ndarray, jax.Array)
    if isinstance(stop_tokens, (str, bytes)) or not isinstance(stop_tokens, (Sequence, *arrays)) or (
            isinstance(stop_tokens, arrays) and stop_tokens.ndim != 2):
        raise ValueError(f"stop_tokens must be a list of stop-id lists, one per {what}, got {stop_tokens!r}")
    if len(stop_tokens) != count:
        raise ValueError(f"stop_tokens has {len(stop_tokens)} entries, expected one per {what} ({count})")
    return list(stop_tokens)


def _length_limit(config: LlamaConfig) -> str:
    """What ``config.max_length`` is, for the message of a sequence longer than it."""
    if config.max_length == config.max_position_embeddings:
        return f"maximum length {config.max_position_embeddings}"
    if config.max_length == config.yarn_context:
        scaling = config.rope_scaling
        return (f"YaRN context of {config.max_length} tokens (original_max_position_embeddings "
                f"{scaling.original_max_position_embeddings} x factor {scaling.factor})")
    if config.max_length == config.sliding_window:
        return (f"sliding window of {config.sliding_window} tokens (config sliding_window: a longer sequence's queries "
                "would see fewer keys, which is not implemented)")
    return (f"longrope context of {config.max_length} tokens (original_max_position_embeddings: at the step that "
            "crosses it transformers computes the whole sequence again with the long factors, which one prefill and "
            "decode do not; generate() does, in two calls. Prompts longer than the context run here, with the long "
            "factors throughout)")


def _longrope_choice(config: LlamaConfig, tree: SharingTree) -> LlamaConfig:
    """The factors a longrope model computes this batch with, as transformers does for each sequence alone:
    the long ones where the prompts are longer than the pretraining context (from their first token: its prefill's
    largest position is past the context, and so is every decode step's), the short ones where they are not (the
    caller's ``max_length`` check then keeps prompt + new tokens within the context). A batch of both kinds is
    refused: the prompts that share a node would need its keys and values under both."""
    context = config.longrope_context
    if context is None:
        return config
    lengths = [tree.prefix_length(b) + len(tree.suffixes[b]) for b in range(tree.num_sequences)]
    long = [n > context for n in lengths]
    if any(long) and not all(long):
        a, b = long.index(True), long.index(False)
        raise ValueError(f"sequence {a}'s prompt ({lengths[a]} tokens) is longer than the model's longrope context of "
                         f"{context} tokens (original_max_position_embeddings), sequence {b}'s ({lengths[b]}) is not: "
                         "transformers computes the first with the long factors, the second with the short ones; "
                         "prefill them in separate calls (generate() does so itself)")
    return config.with_long_rope(all(long))


# ------------------------------------------------------------------------------------------------- decode


def _decode_step(model: Llama, s: DecodeState, attend, sampling: SamplingConfig, temperature, top_p) -> DecodeState:
    """One decode step of every sequence: sample each row's next token from its logits (pad where the row is done),
    record it, and run the model on it (the caches written, the next logits). sampling: ``SamplingConfig.static``;
    temperature, top_p: traced scalars."""
    config = model.config
    B = s.tokens.shape[0]
    tok, logp = sample(s.logits, jax.random.fold_in(s.key, s.step), sampling, config.vocab_size,
                       temperature=temperature, top_p=top_p)
    active = ~s.done
    tok = jnp.where(active, tok, s.pad_id)
    tokens = jax.lax.dynamic_update_slice(s.tokens, tok[:, None], (0, s.step))
    logprobs = jax.lax.dynamic_update_slice(s.logprobs, jnp.where(active, logp, 0.0)[:, None], (0, s.step))
    lengths = s.lengths + active
    stop = jnp.any(tok[:, None] == s.stop_tokens, axis=1)
    done = s.done | (active & (stop | (lengths >= s.max_new)))
    # a finished row feeds its pad id, which a config may put outside the vocabulary (-1, say): clipped, so that
    # its (unused) logits stay finite
    hidden, cache = model(jnp.clip(tok, 0, config.vocab_size - 1)[:, None], s.positions[:, None], s.cache, attend)
    cache = advance(cache, jnp.ones((B,), jnp.int32))
    return s.replace(cache=cache, logits=model.logits(hidden[:, 0]), positions=s.positions + 1,
                     tokens=tokens, logprobs=logprobs, lengths=lengths, done=done, step=s.step + 1)


def _decode_impl(params, state: DecodeState, num_steps, temperature, top_p, *, config: LlamaConfig,
                 sampling: SamplingConfig, backend, mesh=None):
    model = Llama(config, params, mesh)
    B, N = state.tokens.shape
    limit = state.step + jnp.clip(num_steps, 0, N - state.step)  # (step + num_steps could overflow int32)
    attend = make_attend(state.mode, jnp.ones((B,), jnp.int32), backend, decode=True)

    def cond(s: DecodeState):
        return (s.step < limit) & ~jnp.all(s.done)

    return jax.lax.while_loop(cond, lambda s: _decode_step(model, s, attend, sampling, temperature, top_p), state)


_decode_jit = _model_jit(_decode_impl, static_argnames=("config", "sampling", "backend", "mesh"), donate_argnums=(1,))


def _check_state(model: Llama, state: DecodeState, fn: str) -> None:
    """``ValueError`` naming both where ``state`` was not made by ``prefill`` with this model's layout (its mesh, or
    none): the logits' vocabulary (padded on a mesh), the caches' KV heads (replicated on a mesh) and layers; or
    where the state and the parameters are committed to different devices."""
    config, n = model.config, 1
    vocab = config.vocab_size
    if model.mesh is not None:
        from models import parallel  # noqa: PLC0415

        s = parallel.split(config, parallel.mesh_size(model.mesh))
        n, vocab = s.devices, s.vocab * s.devices
    cache = state.cache
    layers = () if isinstance(cache, NoCache) else tuple(cache.k)
    shared = [x for level in getattr(cache, "shared", ()) for x in level.k]
    heads = sorted({x.shape[-2] for x in layers + tuple(shared)})
    if (state.logits.shape[-1] != vocab or heads not in ([], [model.kv_heads])
            or len(layers) not in (0, config.num_hidden_layers)):
        made = f"a {n}-device mesh" if model.mesh is not None else "one device (no mesh)"
        raise ValueError(
            f"{fn}: the state does not fit this model, on {made}: it needs logits [B, {vocab}] and caches of "
            f"{model.kv_heads} KV heads over {config.num_hidden_layers} layers; got logits {list(state.logits.shape)}, "
            f"KV heads {heads}, {len(layers)} layers (make the state with prefill on the same model and mesh)")
    # The same layout committed to other devices (another mesh of the same size, or one device but not the model's):
    # JAX would refuse the call with "incompatible devices"; name both device sets and the way out instead.
    # (Uncommitted arrays, placed by default, JAX moves to the others' devices: not refused.)
    # (The same devices in another mesh order are another layout too: the order says which shard each holds; an
    # array of another kind of sharding is compared by its set of devices.)
    want, have = _devices(model.embed.value), _devices(state.logits)
    if want and have and (want != have if want[1] and have[1] else set(want[0]) != set(have[0])):
        raise ValueError(f"{fn}: the state lives on devices {list(have[0])}, this model's parameters on "
                         f"{list(want[0])} (in mesh order; make the state with prefill on the same model and mesh)")


def _devices(x) -> tuple[tuple[int, ...], bool] | None:
    """The ids of the devices a concrete array is committed to and whether they are in a mesh's order (a
    NamedSharding's; else sorted); None for uncommitted arrays, abstract values and tracers (an outer trace)."""
    if isinstance(x, jax.core.Tracer) or not isinstance(x, jax.Array) or not x.committed:
        return None
    if isinstance(x.sharding, jax.sharding.NamedSharding):
        return tuple(d.id for d in x.sharding.mesh.devices.flat), True
    return tuple(sorted(d.id for d in x.sharding.device_set)), False


def decode(model: Llama, state: DecodeState, num_steps: int, *, sampling: SamplingConfig | dict | str | None = None,
           backend: str | None = None) -> DecodeState:
    """Run up to ``num_steps`` decode steps (one token per sequence each) inside one ``lax.while_loop``.

    ``state`` is donated: use only the returned state. ``num_steps`` (an integer >= 0, or an integer scalar array)
    is traced (no recompile per value); a JAX array's value is read on the device only (decode does not wait for
    it; a negative one runs no step).
    """
    _check_model(model, "decode")
    on_device = isinstance(num_steps, jax.Array)  # traced, or an array maybe still being computed: never read here
    if not is_integer(num_steps) or (not on_device and num_steps < 0):
        raise ValueError(f"decode: num_steps must be an integer >= 0, got {num_steps!r}")
    if not on_device:  # more than int32 holds: as many as the tokens left (the cap)
        num_steps = min(int(num_steps), 2**31 - 1)
    elif jnp.iinfo(num_steps.dtype).max > 2**31 - 1:  # wider than int32 (uint32; int64 with jax_enable_x64):
        # clipped in its own type, on the device, before the 32-bit step below would wrap it (the loop takes a
        # negative count as none)
        num_steps = jnp.clip(num_steps, 0, 2**31 - 1)
    return _decode_32(model, state, num_steps, sampling=sampling, backend=backend)


def _clip_huge(n):
    """``max_new_tokens`` with Python integers past int64 (a numpy object array otherwise, refused as "not an
    integer") brought to 2**62: past any model's length, which the caller then reports."""
    big = lambda x: is_int(x) and x > 2**62  # noqa: E731
    if big(n):
        return 2**62
    return [2**62 if big(x) else x for x in n] if isinstance(n, (list, tuple)) else n


def _check_model(model, fn: str) -> None:
    """``ValueError`` naming ``fn`` where ``model`` is not a ``Llama`` (its parameters alone, None, ...)."""
    if not isinstance(model, llama_module.Llama):  # (the module's class: tests subclass the name here)
        hint = " (parameters alone: Llama(config, params))" if isinstance(model, dict) else ""
        raise ValueError(f"{fn}: model must be a models.Llama (init_random, load_checkpoint, load_gguf, ...), got "
                         f"{type(model).__name__}{hint}")


def _check_mesh_backend(model: Llama, backend: str | None) -> None:
    """``ValueError`` for backend "interpret-mosaic" on a mesh of several devices
    (`hydragen_jax.validation.check_mesh_backend`)."""
    check_mesh_backend(backend, 1 if model.mesh is None else model.mesh.devices.size)


@_in_32_bits
def _decode_32(model: Llama, state: DecodeState, num_steps, *, sampling, backend) -> DecodeState:
    """``decode`` once its step count fits int32."""
    _check_state(model, state, "decode")
    _check_mesh_backend(model, backend)
    sampling = SamplingConfig.make(sampling)
    config = model.config.with_long_rope(state.long_rope)
    return _decode_jit(model.params(), state, jnp.int32(num_steps), *_knobs(sampling), config=config,
                       sampling=sampling.static(), backend=backend, mesh=model.mesh)


def _knobs(sampling: SamplingConfig) -> tuple[float, float]:
    """The decode loop's traced sampling arguments, temperature and top_p: numpy float32 scalars (float32 under
    jax_enable_x64 too, where Python floats would be float64 at the call; placed wherever the loop runs; one
    compiled loop for every value)."""
    if sampling.greedy:  # neither applies (SamplingConfig.static)
        return np.float32(0.0), np.float32(1.0)
    return np.float32(sampling.temperature), np.float32(sampling.top_p if sampling._top_p_on else 1.0)


class CompiledDecode:
    """``compile_decode``'s function: ``fn(params, state, num_steps)``, the sampling's temperature and top_p bound;
    the compiled executable's methods (``as_text``, ``cost_analysis``, ...) as its own."""

    def __init__(self, compiled, knobs: tuple[float, float]):
        self._compiled, self._knobs = compiled, knobs

    def __call__(self, params, state: DecodeState, num_steps) -> DecodeState:
        return self._compiled(params, state, num_steps, *self._knobs)

    def __getattr__(self, name: str):
        if name.startswith("_"):  # not the executable's (and no recursion before __init__ set _compiled: a copy)
            raise AttributeError(name)
        return getattr(self._compiled, name)


@_in_32_bits
def compile_decode(model: Llama, state: DecodeState, *, sampling=None, backend=None):
    """Ahead-of-time compiled decode: returns ``(fn, seconds)``; ``fn(params, state, num_steps)`` (a
    ``CompiledDecode``). Another temperature or top_p (not top_k, nor greedy against sampling, nor top_p on
    against off) reuses the compiled program: compiled again, it is found in JAX's cache."""
    _check_model(model, "compile_decode")
    _check_state(model, state, "compile_decode")
    _check_mesh_backend(model, backend)
    sampling = SamplingConfig.make(sampling)
    t0 = time.perf_counter()
    config = model.config.with_long_rope(state.long_rope)
    knobs = _knobs(sampling)
    fn = _decode_jit.lower(model.params(), state, jnp.int32(1), *knobs, config=config, sampling=sampling.static(),
                           backend=backend, mesh=model.mesh).compile()
    return CompiledDecode(fn, knobs), time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------- generate


@dataclasses.dataclass
class Generation:
    """Result of ``generate``: B = prompts x samples sequences, prompt-major (prompt i's samples adjacent).

    tokens ``[B, N]`` int32 (pad after each sequence's end); lengths ``[B]`` (stop token included);
    logprobs ``[B, N]`` (model log-probabilities of the chosen tokens, 0 after the end); texts (when a
    tokenizer was given); tree (the sharing tree used); stats (seconds, throughput); logits ``[B, V]`` float32 (the
    first new token's).
    """

    tokens: np.ndarray
    lengths: np.ndarray
    logprobs: np.ndarray
    tree: SharingTree
    texts: list[str] | None = None
    stats: dict[str, float] = dataclasses.field(default_factory=dict)
    logits: np.ndarray | None = None  # first-token logits [B, V] (for checks)


def _tokenize(prompts, tokenizer) -> list[list[int]]:
    if isinstance(prompts, (np.ndarray, jax.Array)):
        if prompts.ndim != 2:  # [B, T] token ids: a prompt a row
            raise ValueError(f"prompts as an array must be [B, T] token ids (a prompt a row), got shape "
                             f"{tuple(prompts.shape)}" + (" (one prompt: [prompt])" if prompts.ndim == 1 else ""))
        prompts = list(np.asarray(prompts))
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        what = repr(prompts)[:60] if isinstance(prompts, (str, bytes)) else type(prompts).__name__
        raise ValueError(f"prompts must be a list of prompts (token-id lists or strings), got {what} (one prompt: "
                         "[prompt])")
    if len(prompts) == 0:
        raise ValueError("prompts: no prompts given (empty prompt list)")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError(f"prompt {i} is text but no tokenizer was given")
            p = tokenizer.encode(p)
        out.append(_token_ids(p, i, "prompts"))
    return out


def _check_vocabulary(parts, vocab_size: int) -> None:
    """``ValueError`` naming where (each part's label: "prompts: prompt 3") and the position of the first token id
    outside ``[0, vocab_size)``. parts: (label, ids) pairs (ids past int64 compared exactly, as Python ints)."""
    for where, part in parts:
        ids = np.asarray(part)
        bad = np.flatnonzero((ids < 0) | (ids >= vocab_size)) if ids.size else ()
        if len(bad):
            raise ValueError(f"{where}, position {bad[0]}: token id {part[bad[0]]} outside the vocabulary "
                             f"[0, {vocab_size})")


@_in_32_bits
def generate(model: Llama, prompts, *, num_samples: int = 1, max_new_tokens: int = 64, sampling=None,
             mode: str = "hydragen", tokenizer=None, eos_ids: Sequence[int] | None = None,
             stop_tokens: Sequence[Sequence[int]] | None = None, seed: int = 0, tree: SharingTree | None = None,
             max_depth: int = 3, backend: str | None = None, chunk_steps: int = 64, progress: bool = False,
             progress_desc: str | None = None) -> Generation:
    """Complete every prompt ``num_samples`` times.

    prompts: token-id lists or strings, or a ``[B, T]`` integer array (a prompt a row). Strings need ``tokenizer``
      (any object with encode/decode) and are encoded with the tokenizer's own BOS rule, so pass a chat template's
      text as ids, encoded with ``add_bos=False``, where the template writes BOS itself, as ``models.demo`` does.
    sampling: None / "greedy", a ``SamplingConfig`` or a dict (temperature, top_k, top_p).
    stop_tokens: extra stop ids per prompt (applied to each of its samples), besides ``eos_ids`` (default:
    the config's EOS ids). tree: an explicit ``SharingTree`` over the B sequences (default: built from the
    prompts' common prefixes, at most ``max_depth`` shared levels). The decode loop runs in chunks of
    ``chunk_steps`` steps after a first call of one step (it also loads the loop's kernels: ``stats`` leaves it out
    of ``decode_tokens_per_s``), one host sync per call (progress bar with ``progress=True``); a chunk stops early
    once every sequence is done, and each call costs 1-4 ms besides its steps on an H200 (64-step chunks: 2.5-5 %
    more tok/s than 16-step ones with a 7B model at batch 8 and 64).
    A longrope model (Phi-3.5, Phi-4-mini) whose sequences cross its pretraining context, or whose prompts lie on
    both sides of it, generates in two calls, as transformers computes each sequence
    (``_generate_across_longrope_context``: the trees built from the prompts, ``tree`` not used for the calls).
    """
    _check_model(model, "generate")
    check_mode(mode)
    if tokenizer is not None and not all(callable(getattr(tokenizer, f, None)) for f in ("encode", "decode")):
        raise ValueError(f"tokenizer must be None or an object with encode(text) and decode(ids) (e.g. "
                         f"models.load_hf_tokenizer's), got {type(tokenizer).__name__} {str(tokenizer)[:40]!r}")
    sampling = SamplingConfig.make(sampling)
    chunk_steps = min(_positive_int("chunk_steps", chunk_steps), 2**31 - 1)  # more: as many as the tokens left
    num_samples = _positive_int("num_samples", num_samples)
    max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
    token_prompts = _tokenize(prompts, tokenizer)
    _check_vocabulary([(f"prompts: prompt {i}", p) for i, p in enumerate(token_prompts)], model.config.vocab_size)
    sequences = expand_samples(token_prompts, num_samples)
    if tree is None:
        tree = build_sharing_tree(sequences, max_depth=max_depth)
    elif not isinstance(tree, SharingTree):
        raise ValueError(f"tree must be a SharingTree (models.build_sharing_tree) or None, got {type(tree).__name__}")
    elif (spelled := [list(tree.prompt(b)) for b in range(tree.num_sequences)]) != [list(s) for s in sequences]:
        if len(spelled) != len(sequences):
            why = f"it has {len(spelled)} sequences, the prompts x num_samples {len(sequences)}"
        else:
            b = next(b for b, (t, s) in enumerate(zip(spelled, sequences)) if t != list(s))
            short = lambda ids: f"{list(ids)[:16]}{'...' if len(ids) > 16 else ''}"  # noqa: E731
            why = f"sequence {b} is {short(spelled[b])} in the tree, {short(sequences[b])} in the prompts"
        raise ValueError(f"the given tree does not spell the prompts x num_samples sequences: {why}")
    if stop_tokens is not None:
        stop_tokens = [_id_list(f"stop_tokens[{i}]", s, model.config.vocab_size)
                       for i, s in enumerate(_stop_entries(stop_tokens, len(token_prompts), "prompt"))
                       for _ in range(num_samples)]
    if eos_ids is not None:  # checked before any call (the longrope calls read it first)
        eos_ids = _id_list("eos_ids", eos_ids, model.config.vocab_size)

    context = model.config.longrope_context
    if context is not None and (any(len(q) <= context < len(q) + max_new_tokens for q in sequences)
                                or len({len(q) > context for q in sequences}) > 1):
        tokens, lengths, logprobs, first_logits, stats = _generate_across_longrope_context(
            model, sequences, max_new_tokens, stop_tokens, max_depth=max_depth, mode=mode, sampling=sampling,
            eos_ids=eos_ids, seed=seed, backend=backend, chunk_steps=chunk_steps, progress=progress,
            progress_desc=progress_desc, samples=num_samples)
    else:
        tokens, lengths, logprobs, first_logits, stats = _generate_tree(
            model, tree, max_new_tokens, stop_tokens, mode=mode, sampling=sampling, eos_ids=eos_ids, seed=seed,
            backend=backend, chunk_steps=chunk_steps, progress=progress, progress_desc=progress_desc,
            samples=num_samples)
    texts = None
    if tokenizer is not None:
        texts = [tokenizer.decode(tokens[b, :lengths[b]]) for b in range(tree.num_sequences)]
    return Generation(tokens, lengths, logprobs, tree, texts, stats, first_logits)


def _generate_tree(model: Llama, tree: SharingTree, max_new_tokens, stop_tokens, *, mode, sampling, eos_ids, seed,
                   backend, chunk_steps, progress, progress_desc, last_token_unused: bool = False, samples: int = 1):
    """``generate``'s prefill and chunked decode loop over ``tree``'s sequences (max_new_tokens: an int or one a
    sequence): their (tokens, lengths, logprobs, first-token logits, stats)."""
    stats: dict[str, float] = {}
    t0 = time.perf_counter()
    state = _prefill(model, tree, max_new_tokens, mode=mode, eos_ids=eos_ids, stop_tokens=stop_tokens, seed=seed,
                     backend=backend, stats=stats, last_token_unused=last_token_unused, samples=samples)
    first_logits = np.asarray(jax.device_get(state.logits))[:, :model.config.vocab_size]  # on a mesh: unpadded
    stats["prefill_s"] = time.perf_counter() - t0 - stats["prefill_compile_s"]
    # The shared levels, and how many of them a step reads batched (the device's cost model, models.cache)
    shared = level_sizes(getattr(state.cache, "shared", ()))
    stats["shared_levels"] = len(shared)
    stats["shared_levels_batched"] = sum(batched_levels(mode, tree.num_sequences, shared))
    fn, stats["decode_compile_s"] = compile_decode(model, state, sampling=sampling, backend=backend)
    stats["compile_s"] = stats["prefill_compile_s"] + stats["decode_compile_s"]
    params = model.params()
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=int(np.max(max_new_tokens)), desc=progress_desc or mode, unit="step", leave=True)
    t0 = time.perf_counter()
    steps = 0
    first = None  # (steps, seconds) of the first call, one step: it also loads the loop's kernels (one-time)
    while True:
        state = fn(params, state, jnp.int32(chunk_steps if first else 1))
        # one host sync per chunk, read on the host (a jnp.all here compiled once per batch size, inside the window
        # the decode rate is measured over: the first call's rate read 9x low on CPU)
        new_steps, done = jax.device_get((state.step, state.done))
        if bar is not None:
            bar.update(int(new_steps) - steps)
        steps = int(new_steps)
        first = first or (steps, time.perf_counter() - t0)
        if steps >= np.max(max_new_tokens) or bool(np.all(done)):
            break
    stats["decode_s"] = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    B = tree.num_sequences
    stats["decode_steps"] = steps
    stats["first_chunk_s"] = first[1]
    # The rate leaves the first call (one step) out where there are more: the first run of a compiled loop also
    # loads its kernels onto the device, a one-time cost that is not decoding (on a GPU, more than the whole decode
    # of a small model).
    if steps > first[0]:
        stats["decode_tokens_per_s"] = B * (steps - first[0]) / (stats["decode_s"] - first[1])
    else:
        stats["decode_tokens_per_s"] = B * steps / stats["decode_s"]
    tokens, lengths, logprobs = (np.asarray(x) for x in jax.device_get((state.tokens, state.lengths, state.logprobs)))
    stats["generated_tokens"] = int(lengths.sum())
    return tokens, lengths, logprobs, first_logits, stats


def _sequence_name(b: int, samples: int) -> str:
    """Sequence b in a refusal: as generate's user passed it where num_samples > 1 repeated each prompt."""
    if samples == 1:
        return f"sequence {b}"
    return f"prompt {b // samples} (sequence {b} of the prompts x num_samples {samples})"


def _generate_across_longrope_context(model: Llama, sequences, max_new_tokens: int, stop_tokens, *, max_depth,
                                      samples: int = 1, **kw):
    """``generate`` where longrope's factors change within the batch, as transformers computes each sequence:
    the short factors while a sequence holds at most original_max_position_embeddings (C) tokens, the long ones
    for every position of it from the step it holds C + 1 on (transformers drops its cache there and computes the
    whole sequence again). In two calls: the prompts within C generate with the short factors up to C + 1 tokens
    (their next logits would be long ones); then those that go on, as prompts of C + 1 tokens (prompt + what they
    generated), with the prompts longer than C, generate the rest with the long factors (their shared prefixes
    computed again, and shared again). Greedy tokens are transformers'; sampled ones come from the same
    distributions, the second call's key from ``seed`` + 1 (wrapped into ``_key``'s range: 2**63 - 1 is followed by
    -2**63, whose low 32 bits, those JAX keeps, are still ``seed``'s + 1). Returns what ``_generate_tree`` returns for all
    sequences, with the calls' stats: times, steps and first chunks summed, ``decode_tokens_per_s`` over both calls
    without their first chunks (as one call's), the shared levels of the call with the most; ``longrope_calls``: how
    many ran."""
    context = model.config.longrope_context
    B, N, V = len(sequences), max_new_tokens, model.config.vocab_size
    long = model.config.with_long_rope(True)  # checked now, not in the second call (its own indices)
    for b, q in enumerate(sequences):
        if len(q) + N > long.max_length:
            raise ValueError(f"{_sequence_name(b, samples)}: prompt of {len(q)} tokens + max_new_tokens {N} exceeds "
                             f"the model's {_length_limit(long)} (past the longrope context of {context} tokens, with "
                             "the long factors)")
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    stops = stop_tokens or [[] for _ in range(B)]
    eos = list(model.config.eos_token_ids if kw["eos_ids"] is None else kw["eos_ids"])
    tokens, logprobs = np.full((B, N), pad, np.int32), np.zeros((B, N), np.float32)
    lengths, first_logits = np.zeros(B, np.int32), np.zeros((B, V), np.float32)
    calls = []  # each call's stats
    short = [b for b in range(B) if len(sequences[b]) <= context]
    go_on = [b for b in range(B) if len(sequences[b]) > context]
    seed = kw.pop("seed")
    _key(seed)  # a bad seed named before any call
    if short:  # the short factors, up to C + 1 tokens
        budgets = np.array([min(N, context + 1 - len(sequences[b])) for b in short])
        t, n, lp, first, call = _generate_tree(
            model, build_sharing_tree([sequences[b] for b in short], max_depth=max_depth), budgets,
            [stops[b] for b in short] if stop_tokens else None, seed=seed, last_token_unused=True, **kw)
        calls.append(call)
        for i, b in enumerate(short):
            tokens[b, :n[i]], logprobs[b, :n[i]] = t[i, :n[i]], lp[i, :n[i]]
            lengths[b], first_logits[b] = n[i], first[i]
            stopped = n[i] < budgets[i] or int(t[i, n[i] - 1]) in eos + list(stops[b])
            if not stopped and n[i] < N:
                go_on.append(b)
    if go_on:  # the long factors: every prompt longer than C
        go_on.sort()
        prompts = [tuple(sequences[b]) + tuple(tokens[b, :lengths[b]].tolist()) for b in go_on]
        budgets = np.array([N - lengths[b] for b in go_on])
        t, n, lp, first, call = _generate_tree(
            model, build_sharing_tree(prompts, max_depth=max_depth), budgets,
            [stops[b] for b in go_on] if stop_tokens else None, seed=(int(seed) + 1 + 2**63) % 2**64 - 2**63, **kw)
        calls.append(call)
        for i, b in enumerate(go_on):
            k = lengths[b]
            tokens[b, k:k + n[i]], logprobs[b, k:k + n[i]] = t[i, :n[i]], lp[i, :n[i]]
            if k == 0:
                first_logits[b] = first[i]
            lengths[b] = k + n[i]
    # times and steps add up; the levels: the most of one call
    stats = {key: (max if key.startswith("shared_levels") else sum)(c[key] for c in calls) for key in calls[0]}
    stats["generated_tokens"] = int(lengths.sum())
    # each call's rate (over its steps after the first chunk) weighted by the time of those steps; where no call
    # has steps after its first chunk, each call's rate over all its steps, weighted by their time
    after = [c["decode_s"] - c["first_chunk_s"] for c in calls]
    times = after if sum(after) > 0 else [c["decode_s"] for c in calls]
    stats["decode_tokens_per_s"] = sum(c["decode_tokens_per_s"] * t for c, t in zip(calls, times)) / sum(times)
    stats["longrope_calls"] = len(calls)
    return tokens, lengths, logprobs, first_logits, stats
