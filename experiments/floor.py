"""The floor of one decode step of shared-prefix attention, and Simpson's rule over a growing suffix.

One step: B sequences, each with one new query (T = 1) attending to a shared prefix of P tokens and to its own
suffix of s_b tokens.
    bytes = 2 * (P + sum_b s_b) * Hkv * D * itemsize       (each K and V element read once)
          + 2 * B * T * Hq * D * itemsize                   (queries read, outputs written)
    FLOPs = 4 * D * Hq * T * sum_b (P + s_b)                (Q K^T and P V)
    floor time = max(bytes / copy bandwidth, FLOPs / matmul rate)
"""

from __future__ import annotations

from typing import Sequence


def step_bytes(batch: int, prefix: int, suffixes: int | Sequence[int], q_heads: int, kv_heads: int,
               head_dim: int, itemsize: int, queries: int = 1) -> int:
    total_suffix = suffixes * batch if isinstance(suffixes, int) else sum(suffixes)
    kv = 2 * (prefix + total_suffix) * kv_heads * head_dim * itemsize
    q_and_out = 2 * batch * queries * q_heads * head_dim * itemsize
    return kv + q_and_out


def step_flops(batch: int, prefix: int, suffixes: int | Sequence[int], q_heads: int, head_dim: int,
               queries: int = 1) -> int:
    total_suffix = suffixes * batch if isinstance(suffixes, int) else sum(suffixes)
    return 4 * head_dim * q_heads * queries * (batch * prefix + total_suffix)


def floor_time(nbytes: float, flops: float, bandwidth: float, matmul_rate: float) -> float:
    """Seconds: the larger of the memory time and the compute time."""
    return max(nbytes / bandwidth, flops / matmul_rate)


def simpson(first: float, middle: float, last: float) -> float:
    """Mean of a smooth quantity over an interval from its values at the ends and the midpoint."""
    return (first + 4.0 * middle + last) / 6.0


def simpson_points(out: int) -> tuple[int, int, int]:
    """Suffix lengths at which a decode of `out` tokens is sampled: 1, out/2, out."""
    return 1, max(1, out // 2), out


def kv_cache_bytes(batch: int, prefix: int, suffix: int, kv_heads: int, head_dim: int, itemsize: int,
                   prefix_copied: bool) -> int:
    """Bytes of the K and V arrays a variant keeps: the prefix once (shared) or once per sequence (copied)."""
    prefix_tokens = batch * prefix if prefix_copied else prefix
    return 2 * (prefix_tokens + batch * suffix) * kv_heads * head_dim * itemsize
