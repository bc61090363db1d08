"""Floors of one decode step (the time below which the device cannot do the step's work), and Simpson's rule.

Attention alone (bench-attention), one step: B sequences, each with one new query (T = 1) attending to a shared prefix of P tokens and to its own
suffix of s_b tokens.
    bytes = 2 * (P + sum_b s_b) * Hkv * D * itemsize       (each K and V element read once)
          + 2 * B * T * Hq * D * itemsize                   (queries read, outputs written)
    FLOPs = 4 * D * Hq * sum_b (T (P + s_b) - T (T - 1) / 2)  (Q K^T and P V; T > 1: the suffix causal)
    floor time = max(bytes / bandwidth, FLOPs / matmul rate)

A whole model's decode step (end-to-end runs, `decode_step_floor`): the sum over the step's ops (every layer's GEMMs,
attention and cache write, then the LM head) of each op's max(bytes / bandwidth, FLOPs / matmul rate);
`decode_floor` averages it over the steps a run times, as the run averages its measured steps.

Tensor parallel over n devices (models.parallel): the ops are each device's share (`tensor_parallel`: its query and
KV heads, MLP columns and vocabulary rows; the batch is whole on every device), plus the all-reduces of a step: one
of the [B, d] activations after the embedding and after each layer's o and down projections (2 L + 1), each at
    2 (n - 1) / n * B * d * itemsize / (the measured all-reduce bus bandwidth)
(a ring all-reduce's bytes sent per device; `allreduce_time`).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence


def step_bytes(batch: int, prefix: int, suffixes: int | Sequence[int], q_heads: int, kv_heads: int,
               head_dim: int, itemsize: int, queries: int = 1) -> int:
    total_suffix = suffixes * batch if isinstance(suffixes, int) else sum(suffixes)
    kv = 2 * (prefix + total_suffix) * kv_heads * head_dim * itemsize
    q_and_out = 2 * batch * queries * q_heads * head_dim * itemsize
    return kv + q_and_out


def step_flops(batch: int, prefix: int, suffixes: int | Sequence[int], q_heads: int, head_dim: int,
               queries: int = 1) -> int:
    """The T = `queries` queries of a sequence are the last T of its suffix (causal, as hydragen_attention's suffix
    level): query t sees the whole prefix and s_b - T + 1 + t suffix tokens, T (T - 1) / 2 fewer than T s_b."""
    total_suffix = suffixes * batch if isinstance(suffixes, int) else sum(suffixes)
    causal = batch * queries * (queries - 1) // 2
    return 4 * head_dim * q_heads * (queries * (batch * prefix + total_suffix) - causal)


def floor_time(nbytes: float, flops: float, bandwidth: float, matmul_rate: float) -> float:
    """Seconds: the larger of the memory time and the compute time."""
    return max(nbytes / bandwidth, flops / matmul_rate)


def simpson(first: float, middle: float, last: float) -> float:
    """Mean of a smooth quantity over an interval from its values at the ends and the midpoint."""
    return (first + 4.0 * middle + last) / 6.0


def simpson_points(out: int) -> tuple[int, int, int]:
    """Suffix lengths at which a decode of `out` tokens is sampled: 1, out/2, out (the midpoint (out + 1) / 2 of
    [1, out] where out is odd: Simpson's rule needs equally spaced points)."""
    return 1, max(1, (out + 1) // 2), out


def kv_cache_bytes(batch: int, prefix: int, suffix: int, kv_heads: int, head_dim: int, itemsize: int,
                   prefix_copied: bool) -> int:
    """Bytes of the K and V arrays a variant keeps: the prefix once (shared) or once per sequence (copied)."""
    prefix_tokens = batch * prefix if prefix_copied else prefix
    return 2 * (prefix_tokens + batch * suffix) * kv_heads * head_dim * itemsize


# ---------------------------------------------------------------- one decode step of a whole model


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-family decoder that set the work of a decode step (`itemsize`: bytes per weight / KV
    element)."""

    hidden: int
    intermediate: int
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    itemsize: int

    @classmethod
    def from_config(cls, shape: dict, itemsize: int) -> "ModelShape":
        """From a config's `[model.shape]` table (models.LlamaConfig field names)."""
        return cls(hidden=shape["hidden_size"], intermediate=shape["intermediate_size"],
                   layers=shape["num_hidden_layers"], q_heads=shape["num_attention_heads"],
                   kv_heads=shape["num_key_value_heads"], head_dim=shape["head_dim"], vocab=shape["vocab_size"],
                   itemsize=itemsize)


def tensor_parallel(shape: ModelShape, devices: int) -> ModelShape:
    """One device's share of `shape` on `devices` devices (as models.parallel splits it: Hq/n query heads,
    max(Hkv/n, 1) KV heads, the MLP columns and vocabulary rows divided rounded up, ⌈I/n⌉ and ⌈V/n⌉)."""
    if devices == 1:
        return shape
    return dataclasses.replace(shape, q_heads=shape.q_heads // devices, kv_heads=max(1, shape.kv_heads // devices),
                               intermediate=-(-shape.intermediate // devices), vocab=-(-shape.vocab // devices))


def allreduce_time(nbytes: float, devices: int, bus_bandwidth: float) -> float:
    """Seconds of an all-reduce of `nbytes` per device at `bus_bandwidth` (NCCL's bus bandwidth: a ring's bytes
    sent per device, 2 (n - 1) / n * nbytes, per second); 0 on one device."""
    return 0.0 if devices == 1 else 2 * (devices - 1) / devices * nbytes / bus_bandwidth


@dataclasses.dataclass(frozen=True)
class Sharing:
    """Which prompt tokens the B sequences of a decode read.

    levels[l]: one (node length, readers) pair per node of shared level l (root first; empty nodes left out).
    suffix_lengths[b]: prompt tokens of sequence b in its own cache (after the shared levels).
    prompt_lengths[b]: its whole prompt (what `standard` copies into its own cache).
    """

    levels: tuple[tuple[tuple[int, int], ...], ...]
    suffix_lengths: tuple[int, ...]
    prompt_lengths: tuple[int, ...]

    def __post_init__(self):
        if len(self.suffix_lengths) != len(self.prompt_lengths) or not self.suffix_lengths:
            raise ValueError(f"Sharing: suffix_lengths ({len(self.suffix_lengths)}) and prompt_lengths "
                             f"({len(self.prompt_lengths)}) must list the same B >= 1 sequences")
        for l, level in enumerate(self.levels):
            readers = sum(r for _, r in level)
            if readers > self.batch:
                raise ValueError(f"Sharing: level {l} has {readers} readers, more than the batch ({self.batch})")

    @property
    def batch(self) -> int:
        return len(self.suffix_lengths)


@dataclasses.dataclass(frozen=True)
class Op:
    """One operation of a step: bytes moved and FLOPs."""

    name: str
    bytes: float
    flops: float

    def time(self, bandwidth: float, matmul_rate: float) -> float:
        return floor_time(self.bytes, self.flops, bandwidth, matmul_rate)


def gemm(name: str, rows: int, k: int, n: int, itemsize: int, out_itemsize: int | None = None) -> Op:
    """[rows, k] @ [k, n]: the weights read once, the activations read and the result written."""
    out_itemsize = itemsize if out_itemsize is None else out_itemsize
    return Op(name, k * n * itemsize + rows * k * itemsize + rows * n * out_itemsize, 2 * rows * k * n)


def layer_gemms(shape: ModelShape, batch: int) -> list[Op]:
    """The four GEMMs of one layer for one new token per sequence, as the models run them: q/k/v packed in one
    weight, o, gate/up packed in one, down (`models.llama.pack_layer`); every mode runs them (`none` included: it
    skips only the attention and the cache writes)."""
    d, w = shape.hidden, shape.itemsize
    hq, hkv = shape.q_heads * shape.head_dim, shape.kv_heads * shape.head_dim
    return [gemm("qkv", batch, d, hq + 2 * hkv, w), gemm("o", batch, hq, d, w),
            gemm("gate_up", batch, d, 2 * shape.intermediate, w), gemm("down", batch, shape.intermediate, d, w)]


def lm_head(shape: ModelShape, batch: int) -> Op:
    """The logits: [B, d] @ [d, V], float32 out."""
    return gemm("lm_head", batch, shape.hidden, shape.vocab, shape.itemsize, out_itemsize=4)


def attention_levels(shape: ModelShape, sharing: Sharing, mode: str, step: int) -> list[Op]:
    """One layer's attention at decode step `step` (0-based: each sequence's own cache then holds its prompt
    suffix + `step` generated tokens + the token of this step), one Op per level.

    hydragen and shared_storage: each shared node read from memory once (shared_storage reads it once per reader,
    but those repeated reads can be served by the L2 cache: counting them as memory traffic made a floor that
    shared_storage beat, 1.43 of it at B=512 P=1K on the H200); standard: each sequence reads its whole prompt
    from its own cache; none: no attention.
    The queries read and outputs written (2 * B * Hq * D elements) are counted on the last level.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got {mode!r}")
    if mode == "none":
        return []
    kv = 2 * shape.kv_heads * shape.head_dim * shape.itemsize  # bytes of one token's K and V
    per_query = 4 * shape.head_dim * shape.q_heads  # FLOPs of one query against one key (QK^T and PV)
    q_and_out = 2 * sharing.batch * shape.q_heads * shape.head_dim * shape.itemsize
    ops = []
    if mode != "standard":
        for l, level in enumerate(sharing.levels):
            ops.append(Op(f"shared{l}", sum(n for n, _ in level) * kv, per_query * sum(n * r for n, r in level)))
    own = sharing.prompt_lengths if mode == "standard" else sharing.suffix_lengths
    tokens = sum(own) + sharing.batch * (step + 1)
    ops.append(Op("sequence" if mode == "standard" else "suffix", tokens * kv + q_and_out, per_query * tokens))
    return ops


def cache_write(shape: ModelShape, batch: int, mode: str) -> Op:
    """One layer's cache update: K and V of each sequence's new token written (none: nothing)."""
    nbytes = 0 if mode == "none" else 2 * batch * shape.kv_heads * shape.head_dim * shape.itemsize
    return Op("cache_write", nbytes, 0)


def decode_step_floor(shape: ModelShape, sharing: Sharing, mode: str, step: int, bandwidth: float,
                      matmul_rate: float, devices: int = 1, allreduce_bandwidth: float | None = None) -> dict:
    """Seconds of one decode step at the floor: each op at max(bytes / bandwidth, FLOPs / matmul rate), summed.

    Ops: every layer's four GEMMs (packed q/k/v, o, packed gate/up, down), its attention (all levels of a layer as
    one op: they run in one launch and may overlap, as bench-attention's floor assumes) and its cache write, then
    the LM head. Norms, RoPE,
    residuals, the embedding gather and sampling are not counted (they can fuse into the GEMMs). On `devices` > 1
    (tensor parallel): each device's share of those ops (`tensor_parallel(shape, devices)`), plus the step's 2 L + 1
    all-reduces of [B, d] at `allreduce_bandwidth` (bus bandwidth; required then).

    Returns {"total", "gemm", "lm_head", "attention", "cache_write", "levels": {level: seconds of that level
    alone, summed over layers}}, and "allreduce" on several devices.
    """
    if devices > 1 and not allreduce_bandwidth:
        raise ValueError(f"decode_step_floor: a step on {devices} devices needs the all-reduce bus bandwidth; got "
                         f"{allreduce_bandwidth!r}")
    full, shape = shape, tensor_parallel(shape, devices)
    L, B = shape.layers, sharing.batch
    gemms = L * sum(op.time(bandwidth, matmul_rate) for op in layer_gemms(shape, B))
    head = lm_head(shape, B).time(bandwidth, matmul_rate)
    levels = attention_levels(shape, sharing, mode, step)
    joint = Op("attention", sum(op.bytes for op in levels), sum(op.flops for op in levels))
    attention = L * joint.time(bandwidth, matmul_rate) if levels else 0.0
    write = L * cache_write(shape, B, mode).time(bandwidth, matmul_rate)
    out = {"total": gemms + head + attention + write, "gemm": gemms, "lm_head": head, "attention": attention,
           "cache_write": write, "levels": {op.name: L * op.time(bandwidth, matmul_rate) for op in levels}}
    if devices > 1:
        out["allreduce"] = (2 * L + 1) * allreduce_time(B * full.hidden * full.itemsize, devices, allreduce_bandwidth)
        out["total"] += out["allreduce"]
    return out


def _combine(dicts: list[dict], fn) -> dict:
    """Nested dicts of the same keys -> one, each leaf `fn` of the leaves at its place."""
    return {key: _combine([d[key] for d in dicts], fn) if isinstance(value, dict) else fn([d[key] for d in dicts])
            for key, value in dicts[0].items()}


def decode_floor(shape: ModelShape, sharing: Sharing, mode: str, starts: Sequence[int], steps_per_sample: int,
                 bandwidth: float, matmul_rate: float, devices: int = 1,
                 allreduce_bandwidth: float | None = None) -> dict:
    """The floor of a decode timed the way e2e times it: at each of the three sample positions, the mean step floor
    of the `steps_per_sample` steps from `start`; Simpson's rule over the three.

    Returns (seconds per step): floor_s (the Simpson mean: compare with the measured mean step), floor_step_s [3]
    (each position), floor_parts_s {gemm, lm_head, attention, cache_write[, allreduce]}, attention_floor_s
    (attention + cache
    writes: what `none` skips), attention_level_floor_s {level: that level's attention alone}, and
    floor_tokens_per_s = B / floor_s.
    """
    if len(starts) != 3:
        raise ValueError(f"starts must hold the 3 sample positions; got {list(starts)}")
    mean_of = lambda v: sum(v) / len(v)  # noqa: E731
    step = lambda j: decode_step_floor(shape, sharing, mode, j, bandwidth, matmul_rate, devices,  # noqa: E731
                                       allreduce_bandwidth)
    windows = [_combine([step(j) for j in range(start, start + steps_per_sample)], mean_of) for start in starts]
    mean = _combine(windows, lambda v: simpson(*v))
    return {
        "floor_s": mean["total"],
        "floor_step_s": [w["total"] for w in windows],
        "floor_parts_s": {k: mean[k] for k in ("gemm", "lm_head", "attention", "cache_write", "allreduce")
                          if k in mean},
        "attention_floor_s": mean["attention"] + mean["cache_write"],
        "attention_level_floor_s": mean["levels"],
        "floor_tokens_per_s": sharing.batch / mean["total"],
    }


MODES = ("hydragen", "shared_storage", "standard", "none")
