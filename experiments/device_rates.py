"""Measured device rates that define the floor: copy bandwidth and bf16 matmul rate (same run, same device)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from experiments import timing


def copy_bandwidth(nbytes: int, timing_kw: dict, dtype=jnp.bfloat16) -> dict:
    """Bytes read + written per second of an elementwise device-to-device pass over `nbytes` of data."""
    itemsize = jnp.dtype(dtype).itemsize
    n = max(1, nbytes // itemsize)
    x = jax.random.normal(jax.random.key(0), (n,), dtype=dtype)
    t = timing.time_fn(lambda a: a * 2, (x,), **timing_kw)
    moved = 2 * n * itemsize
    del x
    return {"copy_bytes": n * itemsize, "copy_time_s": t.median_s, "bandwidth_bytes_per_s": moved / t.median_s}


def read_bandwidth(nbytes: int, timing_kw: dict, dtype=jnp.bfloat16) -> dict:
    """Bytes read per second of a reduction over `nbytes` of data (attention's KV stream only reads)."""
    itemsize = jnp.dtype(dtype).itemsize
    n = max(1, nbytes // itemsize)
    x = jax.random.normal(jax.random.key(2), (n // 1024, 1024), dtype=dtype)
    t = timing.time_fn(lambda a: jnp.sum(a, axis=0, dtype=jnp.float32), (x,), **timing_kw)
    del x
    return {"read_time_s": t.median_s, "read_bandwidth_bytes_per_s": (n // 1024) * 1024 * itemsize / t.median_s}


def matmul_rate(n: int, timing_kw: dict, dtype=jnp.bfloat16) -> dict:
    """FLOP/s of an n x n x n matmul (2 n^3 FLOPs) in `dtype` with the default (f32) accumulation."""
    ka, kb = jax.random.split(jax.random.key(1))
    a = jax.random.normal(ka, (n, n), dtype=dtype)
    b = jax.random.normal(kb, (n, n), dtype=dtype)
    t = timing.time_fn(lambda x, y: x @ y, (a, b), **timing_kw)
    del a, b
    return {"matmul_n": n, "matmul_time_s": t.median_s, "matmul_flops_per_s": 2.0 * n**3 / t.median_s}


def dispatch_time(timing_kw: dict) -> dict:
    """Seconds per call of a trivial jitted op (x + 1 on 512 KiB) launched back to back: the host's cost of one
    dispatch, a lower bound on any step timed one call per step."""
    x = jnp.ones((64, 32, 128), jnp.bfloat16)
    t = timing.time_fn(lambda a: a + 1, (x,), **timing_kw)
    return {"dispatch_s": t.median_s}


def measure(copy_bytes: int, matmul_n: int, timing_kw: dict) -> dict:
    """Device rates; `bandwidth_bytes_per_s`, the floor's bandwidth, is the larger of the copy and the read-only
    rates, so that the floor is never set by a slow way of moving bytes."""
    copy = copy_bandwidth(copy_bytes, timing_kw)
    read = read_bandwidth(copy_bytes, timing_kw)
    copy["copy_bandwidth_bytes_per_s"] = copy["bandwidth_bytes_per_s"]
    copy["bandwidth_bytes_per_s"] = max(copy["bandwidth_bytes_per_s"], read["read_bandwidth_bytes_per_s"])
    return {**copy, **read, **matmul_rate(matmul_n, timing_kw), **dispatch_time(timing_kw)}
