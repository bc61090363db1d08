"""Sharing trees: which prompt tokens are stored once and read by several sequences.

A ``SharingTree`` describes B sequences as a stack of shared levels (root to leaf) plus one unique suffix per
sequence: sequence b's prompt is ``levels[0].nodes[s0[b]] + levels[1].nodes[s1[b]] + ... + suffixes[b]`` where
``s_l = levels[l].seq_to_node``. Every level covers every sequence; a sequence with fewer shared parts reads an
empty node (no tokens). Every suffix holds at least one token (the last prompt token, whose logits start
generation).

``build_sharing_tree(prompts)`` finds the tree automatically from common prefixes (a radix trie over the
prompts, up to ``max_depth`` levels), so "few-shot prefix -> problem -> samples" becomes two shared levels
(few-shot examples, then each problem) and one suffix per sample. A tree may also be given explicitly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np

from models.config import is_integer

Tokens = tuple[int, ...]


def _ints(values, what: str) -> Tokens:
    """``values`` as a tuple of Python ints; ``ValueError`` naming ``what`` for anything that is not an integer
    (floats such as 1.5 or even 2.0, bools, strings): token ids and node indices are never rounded."""
    if hasattr(values, "dtype") and hasattr(values, "ndim"):  # a numpy or JAX array: its dtype says it at once
        a = np.asarray(values)
        if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):  # (bool is not an integer dtype)
            raise ValueError(f"{what}: must be a 1-D array of integers, got dtype {a.dtype}, shape {a.shape}")
        return tuple(a.tolist())
    if _not_a_sequence(values):
        raise ValueError(f"{what}: must be a sequence of integers, got {values!r} ({type(values).__name__})")
    out = tuple(values)
    if all(type(t) is int for t in out):  # the common case, fast on long prompts (type(True) is bool)
        return out
    checked = []
    for i, t in enumerate(out):
        a = np.asarray(t)  # a numpy or JAX scalar
        if a.ndim or not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{what}: element {i} must be an integer, got {t!r} ({type(t).__name__})")
        checked.append(int(a))
    return tuple(checked)


def _not_a_sequence(x) -> bool:
    """Whether ``x`` cannot be a sequence of token ids or of parts: a str (text, not ids), a scalar, a 0-d array
    (bytes are token ids)."""
    return isinstance(x, str) or not isinstance(x, Iterable) or getattr(x, "ndim", 1) == 0


def _sequence(values, what: str, expected: str, nested: bool) -> tuple:
    """``values`` as a tuple; ValueError naming ``what`` (``expected``: what it must be) unless it is a sequence
    (`_not_a_sequence`), with ``nested`` one of sequences (nodes, suffixes: not of bare token ids)."""
    if _not_a_sequence(values):
        raise ValueError(f"{what}: must be {expected}; got {type(values).__name__}")
    out = tuple(values)
    for i, x in enumerate(out if nested else ()):
        if _not_a_sequence(x):
            raise ValueError(f"{what}: must be {expected}; element {i} is {x!r}")
    return out


@dataclasses.dataclass(frozen=True)
class SharedLevel:
    """One shared level: ``nodes[n]`` the tokens of node n, ``seq_to_node[b]`` the node sequence b reads."""

    nodes: tuple[Tokens, ...]
    seq_to_node: tuple[int, ...]

    def __post_init__(self):
        nodes = _sequence(self.nodes, "SharedLevel: nodes", "a sequence of nodes, each a sequence of token ids", True)
        object.__setattr__(self, "nodes", tuple(_ints(n, f"SharedLevel: node {i}") for i, n in enumerate(nodes)))
        object.__setattr__(self, "seq_to_node", _ints(self.seq_to_node, "SharedLevel: seq_to_node"))


@dataclasses.dataclass(frozen=True)
class SharingTree:
    """Shared levels (root to leaf) and the per-sequence suffixes; see the module docstring."""

    levels: tuple[SharedLevel, ...]
    suffixes: tuple[Tokens, ...]

    def __post_init__(self):
        object.__setattr__(self, "levels", _sequence(self.levels, "SharingTree: levels", "a sequence of SharedLevel",
                                                     False))
        suffixes = _sequence(self.suffixes, "SharingTree: suffixes",
                             "a sequence of suffixes, each a sequence of token ids", True)
        for l, level in enumerate(self.levels):
            if not isinstance(level, SharedLevel):
                raise ValueError(f"SharingTree: level {l} must be a SharedLevel(nodes, seq_to_node), got "
                                 f"{type(level).__name__}")
        object.__setattr__(self, "suffixes",
                           tuple(_ints(s, f"SharingTree: suffix of sequence {b}") for b, s in enumerate(suffixes)))
        B = len(self.suffixes)
        if B == 0:
            raise ValueError("SharingTree: no sequences (empty suffixes)")
        for b, s in enumerate(self.suffixes):
            if not s:
                raise ValueError(f"SharingTree: suffix of sequence {b} is empty; each needs >= 1 token")
        for l, level in enumerate(self.levels):
            if len(level.seq_to_node) != B:
                raise ValueError(f"SharingTree: level {l} maps {len(level.seq_to_node)} sequences, expected {B}")
            bad = [s for s in level.seq_to_node if not 0 <= s < len(level.nodes)]
            if bad:
                raise ValueError(f"SharingTree: level {l} seq_to_node has {bad[0]} outside [0, {len(level.nodes)})")
        # all sequences of one node must have the same tokens before it (its keys and values, computed once, hold
        # their positions and context); ancestors that differ as nodes but spell the same tokens (two empty nodes) do
        for l in range(1, len(self.levels)):
            owner: dict[int, int] = {}  # node -> the first sequence that reads it
            for b in range(B):
                n = self.levels[l].seq_to_node[b]
                if not self.levels[l].nodes[n]:
                    continue
                first = owner.setdefault(n, b)
                # the same ancestor nodes spell the same tokens: only other nodes need their tokens compared
                if self.ancestors(l, first) != self.ancestors(l, b) and self._before(l, first) != self._before(l, b):
                    raise ValueError(f"SharingTree: node {n} of level {l} is read by sequences with different "
                                     f"tokens before it: sequence {first} through ancestors "
                                     f"{self.ancestors(l, first)}, sequence {b} through {self.ancestors(l, b)}")

    @property
    def num_sequences(self) -> int:
        return len(self.suffixes)

    def ancestors(self, level: int, b: int) -> tuple[int, ...]:
        """Nodes read by sequence b at the levels above ``level``."""
        return tuple(self.levels[j].seq_to_node[b] for j in range(level))

    def _before(self, level: int, b: int) -> Tokens:
        """The tokens sequence b reads at the levels above ``level``."""
        return tuple(token for j in range(level) for token in self.levels[j].nodes[self.levels[j].seq_to_node[b]])

    def prompt(self, b: int) -> Tokens:
        """The full prompt of sequence b."""
        return self._before(len(self.levels), b) + self.suffixes[b]

    def prefix_length(self, b: int) -> int:
        return sum(len(level.nodes[level.seq_to_node[b]]) for level in self.levels)

    def describe(self) -> str:
        parts = [f"{len(lv.nodes)} node(s) of {min(map(len, lv.nodes))}-{max(map(len, lv.nodes))} tokens"
                 for lv in self.levels]
        u = [len(s) for s in self.suffixes]
        return (f"{self.num_sequences} sequences; shared levels: " + ("; ".join(parts) or "none")
                + f"; suffixes {min(u)}-{max(u)} tokens")


def build_sharing_tree(prompts: Sequence[Sequence[int]], max_depth: int = 3) -> SharingTree:
    """Group ``prompts`` (one per sequence) by common prefixes into at most ``max_depth`` shared levels.

    A radix trie over each prompt without its last token: every trie edge read by >= 2 sequences becomes a
    node; a sequence's edges below the ``max_depth``-th are merged into its deepest node (a node this leaves
    with one reader is un-shared); everything after a sequence's last shared edge is its suffix.
    """
    if not is_integer(max_depth) or max_depth < 0:
        raise ValueError(f"max_depth must be an integer >= 0, got {max_depth!r}")
    max_depth = int(max_depth)
    prompts = [_ints(p, f"build_sharing_tree: prompt {b}") for b, p in enumerate(prompts)]
    if not prompts:
        raise ValueError("no prompts given (empty prompt list)")
    for b, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {b} is empty")
    heads = [p[:-1] for p in prompts]
    arrays = [np.asarray(h, np.int64) for h in heads]
    paths: list[list[tuple[int, int, int]]] = [[] for _ in prompts]  # (group id, start, end) per shared edge
    group_ids = iter(range(1 << 62))

    # The trie's branch points, walked with a stack of (sequences, offset) rather than by recursion: prompts that
    # are each a prefix of the next make a chain as deep as the batch (capped to max_depth below).
    todo = [(list(range(len(prompts))), 0)] if max_depth > 0 else []
    while todo:
        seqs, offset = todo.pop()
        groups: dict[int, list[int]] = {}
        for b in seqs:
            if len(heads[b]) > offset:
                groups.setdefault(heads[b][offset], []).append(b)
        for members in groups.values():
            if len(members) < 2:
                continue
            end = offset + _common_length([arrays[b][offset:] for b in members])
            gid = next(group_ids)
            for b in members:
                paths[b].append((gid, offset, end))
            todo.append((members, end))
    for b, path in enumerate(paths):
        if len(path) > max_depth:
            tail = path[max_depth - 1:]
            paths[b] = path[:max_depth - 1] + [(tail[-1][0], tail[0][1], tail[-1][2])]
    # capping can leave a sequence alone on its deepest node (the others' nodes merged): un-share it
    readers: dict[int, int] = {}
    for path in paths:
        for gid, _, _ in path:
            readers[gid] = readers.get(gid, 0) + 1
    for path in paths:
        while path and readers[path[-1][0]] < 2:
            path.pop()
    depth = max(len(p) for p in paths)
    levels = []
    for l in range(depth):
        node_of: dict[int, int] = {}
        nodes: list[Tokens] = []
        seq_to_node = []
        for b, path in enumerate(paths):
            key = path[l][0] if l < len(path) else -1  # -1: the empty node
            if key not in node_of:
                node_of[key] = len(nodes)
                nodes.append(prompts[b][path[l][1]:path[l][2]] if key != -1 else ())
            seq_to_node.append(node_of[key])
        levels.append(SharedLevel(tuple(nodes), tuple(seq_to_node)))
    suffixes = tuple(p[path[-1][2]:] if path else p for p, path in zip(prompts, paths))
    return SharingTree(tuple(levels), suffixes)


def _common_length(seqs: list[np.ndarray]) -> int:
    """Length of the longest common prefix of 1-D arrays."""
    n = min(len(a) for a in seqs)
    ref = seqs[0][:n]
    for a in seqs[1:]:
        diff = np.flatnonzero(a[:n] != ref)
        n = int(diff[0]) if len(diff) else n
        ref = ref[:n]
    return n


def expand_samples(prompts: Sequence[Sequence[int]], num_samples: int) -> list[Tokens]:
    """Each prompt repeated ``num_samples`` times, prompt-major (each prompt's samples adjacent: p0 p0 ... p1 p1 ...,
    the order of ``Generation``'s rows)."""
    if not is_integer(num_samples) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    return [tuple(p) for p in prompts for _ in range(int(num_samples))]


def synthetic_tree(batch: int, shared_len: int, unique_len: int, vocab_size: int, seed: int = 0) -> SharingTree:
    """A one-level tree for benchmarks: one random shared prefix of ``shared_len`` tokens read by all ``batch``
    sequences, each with ``unique_len`` (>= 1) random tokens of its own. No text involved."""
    for name, value, least in (("batch", batch, 1), ("shared_len", shared_len, 0), ("unique_len", unique_len, 1),
                               ("vocab_size", vocab_size, 1), ("seed", seed, 0)):
        if not is_integer(value) or value < least:
            raise ValueError(f"synthetic_tree: {name} must be an integer >= {least}, got {value!r}")
    batch, shared_len, unique_len, vocab_size, seed = map(int, (batch, shared_len, unique_len, vocab_size, seed))
    rng = np.random.default_rng(seed)
    prefix = tuple(rng.integers(0, vocab_size, shared_len).tolist())
    uniques = rng.integers(0, vocab_size, (batch, unique_len)).tolist()
    levels = (SharedLevel((prefix,), (0,) * batch),) if shared_len else ()
    return SharingTree(levels, tuple(tuple(u) for u in uniques))
