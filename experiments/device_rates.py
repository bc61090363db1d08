"""Measured device rates that define the floor: memory bandwidth and matmul rate in the run's dtype (same run, same
device).

The floor's bandwidth is the best of several probes, so that no slow way of moving bytes sets it:
  copy         a plain device-to-device copy of `nbytes` into a donated buffer (bytes read + written; no
               allocation in the timing: each call writes the buffer the previous call returned)
  read         a read-only row reduction over `nbytes` (bytes read + the small output written)
  pallas_read  a Pallas kernel that streams `nbytes` block by block and writes one partial sum per program
               (compiled on GPU, interpreted elsewhere)
Each probe is timed over several repeats of `calls` back-to-back calls (a repeat lasts >= PROBE_MIN_REPEAT_S, or
the config's rates.min_repeat_s, so host dispatch overlaps the device work); a probe's figure is its best repeat
(its median is recorded too). A probe
that fails is recorded with its error; the floor uses the best of those that ran.

Runs on several devices (tensor parallel) also time the link between them (`allreduce_rates`): a psum over the
devices, as the model's row-parallel layers do, giving the all-reduce bus bandwidth of the floor's all-reduce term.
"""

from __future__ import annotations

import functools
import gc
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from experiments import config, timing

PROBES = config.BANDWIDTH_PROBES  # the bandwidth probes, in the order they run (a config may name a subset)
PROBE_MIN_REPEAT_S = 0.05  # each repeat of a probe lasts at least this long (a config's rates.min_repeat_s overrides)
PROBE_MAX_CALLS = 1000
PROBE_MIN_REPEATS = 5
READ_COLS = 4096  # row length of the reduction probe
PALLAS_COLS = 512  # row length of the Pallas probe's blocks
PALLAS_CHUNK = 16  # rows per load: a [16, 512] block (16 KB of bf16) per loop step
PALLAS_ROWS_PER_PROGRAM = 2048  # rows streamed by one program (2 MB of bf16)


def _time_calls(call: Callable[[Any], Any], state: Any, timing_kw: dict) -> tuple[list[float], int]:
    """Seconds per call of `state = call(state)`, launched back to back: one entry per repeat, each repeat
    `calls` calls long (calibrated from the warm-up so that it lasts >= timing_kw's `probe_min_repeat_s`, default
    PROBE_MIN_REPEAT_S), after timing_kw's `warmup` calls; max(`repeats`, PROBE_MIN_REPEATS) repeats. Returns
    (times, calls)."""
    warmup, repeats = timing_kw["warmup"], timing_kw["repeats"]
    min_repeat_s = timing_kw.get("probe_min_repeat_s", PROBE_MIN_REPEAT_S)
    state = jax.block_until_ready(call(state))  # first call: lazy initialisation, never reported
    single = float("inf")
    for _ in range(max(1, warmup)):
        start = time.perf_counter()
        state = jax.block_until_ready(call(state))
        single = min(single, time.perf_counter() - start)
    calls = timing.calls_per_repeat(single, min_repeat_s, PROBE_MAX_CALLS)
    times = []
    for _ in range(max(repeats, PROBE_MIN_REPEATS)):
        start = time.perf_counter()
        for _ in range(calls):
            state = call(state)
        jax.block_until_ready(state)
        times.append((time.perf_counter() - start) / calls)
    return times, calls


def _time_fn_kw(timing_kw: dict) -> dict:
    """timing_kw without the probes' own key, as `timing.time_fn` takes it."""
    return {k: v for k, v in timing_kw.items() if k != "probe_min_repeat_s"}


def _probe_result(moved_bytes: int, times: list[float], calls: int) -> dict:
    best, median = min(times), statistics.median(times)
    return {"bytes": moved_bytes, "best_s": best, "median_s": median, "bytes_per_s": moved_bytes / best,
            "median_bytes_per_s": moved_bytes / median, "calls": calls, "repeats": len(times)}


def copy_probe(nbytes: int, timing_kw: dict, dtype=jnp.bfloat16) -> dict:
    """A plain device-to-device copy of `nbytes` into a donated buffer: bytes read + written per second."""
    itemsize = jnp.dtype(dtype).itemsize
    n = max(1, nbytes // itemsize)
    src = jax.random.normal(jax.random.key(0), (n,), dtype=dtype)
    dst = jnp.zeros_like(src)
    # The output aliases `dst` (donated); XLA lowers the whole-array update to one copy of `src` into it.
    copy = jax.jit(lambda a, b: lax.dynamic_update_slice(b, a, (0,)), donate_argnums=1).lower(src, dst).compile()
    times, calls = _time_calls(lambda b: copy(src, b), dst, timing_kw)
    del src, dst
    return _probe_result(2 * n * itemsize, times, calls)


def read_probe(nbytes: int, timing_kw: dict, dtype=jnp.bfloat16) -> dict:
    """A read-only pass: a float32 row reduction over `nbytes` of data (bytes read + output written per second)."""
    itemsize = jnp.dtype(dtype).itemsize
    rows = max(1, nbytes // itemsize // READ_COLS)
    x = jax.random.normal(jax.random.key(2), (rows, READ_COLS), dtype=dtype)
    reduce = jax.jit(lambda a: jnp.sum(a, axis=1, dtype=jnp.float32)).lower(x).compile()
    times, calls = _time_calls(lambda _: reduce(x), None, timing_kw)
    del x
    return _probe_result(rows * READ_COLS * itemsize + rows * 4, times, calls)


def _stream_read_kernel(x_ref, o_ref, *, chunk: int, steps: int):
    """One program: sum rows [p * chunk * steps, (p + 1) * chunk * steps) of x `[R, C]` in float32 into o `[1, C]`,
    loading `chunk` rows a step."""
    base = pl.program_id(0) * (chunk * steps)

    def body(i, acc):
        start = pl.multiple_of(base + i * chunk, chunk)
        return acc + x_ref[pl.ds(start, chunk), :].astype(jnp.float32)

    acc = lax.fori_loop(0, steps, body, jnp.zeros((chunk, x_ref.shape[1]), jnp.float32))
    o_ref[...] = jnp.sum(acc, axis=0, keepdims=True)


@functools.partial(jax.jit, static_argnames=("steps", "interpret"))
def stream_read(x: jax.Array, *, steps: int, interpret: bool) -> jax.Array:
    """Partial float32 column sums of x `[R, C]`, one row `[C]` per program of `PALLAS_CHUNK * steps` rows:
    out `[R // (PALLAS_CHUNK * steps), C]`. R must be a multiple of PALLAS_CHUNK * steps."""
    rows, cols = x.shape
    per_program = PALLAS_CHUNK * steps
    if rows % per_program:
        raise ValueError(f"stream_read: x has {rows} rows; expected a multiple of {per_program} (chunk x steps)")
    programs = rows // per_program
    return pl.pallas_call(
        functools.partial(_stream_read_kernel, chunk=PALLAS_CHUNK, steps=steps),
        grid=(programs,),
        in_specs=[pl.BlockSpec(x.shape, lambda i: (0, 0))],  # the kernel indexes the whole array itself
        out_specs=pl.BlockSpec((1, cols), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((programs, cols), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=4),
        interpret=interpret,
        name="stream_read_probe",
    )(x)


def pallas_read_probe(nbytes: int, timing_kw: dict, dtype=jnp.bfloat16) -> dict:
    """`stream_read` over about `nbytes` of data: bytes read + partial sums written per second."""
    itemsize = jnp.dtype(dtype).itemsize
    total_rows = max(PALLAS_CHUNK, nbytes // itemsize // PALLAS_COLS)
    steps = max(1, min(PALLAS_ROWS_PER_PROGRAM, total_rows) // PALLAS_CHUNK)
    programs = max(1, total_rows // (PALLAS_CHUNK * steps))
    x = jax.random.normal(jax.random.key(3), (programs * PALLAS_CHUNK * steps, PALLAS_COLS), dtype=dtype)
    interpret = jax.devices()[0].platform != "gpu"
    read = jax.jit(functools.partial(stream_read, steps=steps, interpret=interpret)).lower(x).compile()
    times, calls = _time_calls(lambda _: read(x), None, timing_kw)
    moved = x.size * itemsize + programs * PALLAS_COLS * 4
    del x
    return _probe_result(moved, times, calls)


PROBE_FNS = {"copy": copy_probe, "read": read_probe, "pallas_read": pallas_read_probe}


def bandwidth(nbytes: int, timing_kw: dict, probes: tuple[str, ...] = PROBES) -> dict:
    """Every probe's figure and the best of them.

    Returns `bandwidth_bytes_per_s` (the best probe's best repeat: the floor's bandwidth), `bandwidth_probe` (its
    name), `bandwidth_probes` ({name: probe result, or {"error": ...}}) and `<name>_bandwidth_bytes_per_s` for each
    probe (None where it failed). Raises RuntimeError if no probe ran.
    """
    unknown = [p for p in probes if p not in PROBE_FNS]
    if unknown:
        raise ValueError(f"unknown bandwidth probe {unknown[0]!r}; expected some of {list(PROBE_FNS)}")
    found: dict[str, dict] = {}
    for name in probes:
        try:
            found[name] = PROBE_FNS[name](nbytes, timing_kw)
        except Exception as error:  # noqa: BLE001 - recorded; the floor uses the probes that ran
            found[name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
        gc.collect()
    ran = {name: r["bytes_per_s"] for name, r in found.items() if "bytes_per_s" in r}
    if not ran:
        raise RuntimeError(f"no bandwidth probe ran: {found}")
    best = max(ran, key=ran.get)
    out = {"bandwidth_bytes_per_s": ran[best], "bandwidth_probe": best, "bandwidth_probes": found,
           "copy_bytes": nbytes}
    out.update({f"{name}_bandwidth_bytes_per_s": ran.get(name) for name in probes})
    return out


def matmul_rate(n: int, timing_kw: dict, dtype=jnp.bfloat16) -> dict:
    """FLOP/s of an n x n x n matmul (2 n^3 FLOPs) in `dtype` as the run's own products compute it (f32
    accumulation; float32 operands at HIGHEST precision, exact fp32 products as the models' and kernels' are, not
    TF32): the best repeat (the floor's rate: the fastest the GPU showed, as for the bandwidth; the median is recorded
    too). Calls run back to back for >= PROBE_MIN_REPEAT_S (timing_kw's `probe_min_repeat_s`) per repeat, so that
    host dispatch is not counted."""
    dtype = jnp.dtype(dtype)
    precision = lax.Precision.HIGHEST if dtype == jnp.float32 else None
    ka, kb = jax.random.split(jax.random.key(1))
    a = jax.random.normal(ka, (n, n), dtype=dtype)
    b = jax.random.normal(kb, (n, n), dtype=dtype)
    t = timing.time_fn(lambda x, y: jnp.matmul(x, y, precision=precision), (a, b), **_back_to_back(timing_kw))
    del a, b
    flops = 2.0 * n**3
    return {"matmul_n": n, "matmul_dtype": dtype.name, "matmul_time_s": min(t.times_s),
            "matmul_flops_per_s": flops / min(t.times_s), "matmul_median_flops_per_s": flops / t.median_s}


def _back_to_back(timing_kw: dict) -> dict:
    """time_fn's options for a probe whose calls run back to back for >= the probes' repeat length (timing_kw's
    `probe_min_repeat_s`, default PROBE_MIN_REPEAT_S), whatever the config's timing of its own steps."""
    return {**_time_fn_kw(timing_kw), "min_repeat_s": max(timing_kw.get("min_repeat_s", 0.0),
                                                          timing_kw.get("probe_min_repeat_s", PROBE_MIN_REPEAT_S)),
            "max_inner": max(timing_kw.get("max_inner", 1), PROBE_MAX_CALLS)}


def dispatch_time(timing_kw: dict) -> dict:
    """Seconds per call of a trivial jitted op (x + 1 on 512 KiB) launched back to back, timed as the matmul probe
    (calls back to back for at least the probes' repeat length; the median per call): the host's cost of one
    dispatch, a lower bound on any step timed one call per step."""
    x = jnp.ones((64, 32, 128), jnp.bfloat16)
    t = timing.time_fn(lambda a: a + 1, (x,), **_back_to_back(timing_kw))
    return {"dispatch_s": t.median_s}


ALLREDUCE_BYTES = (4 * 2**20, 64 * 2**20, 256 * 2**20)  # default message sizes of the all-reduce probe


def allreduce_rates(devices: int, sizes: tuple[int, ...], timing_kw: dict, dtype=jnp.bfloat16) -> dict:
    """The inter-device link, as a decode step on `devices` devices uses it: a psum (all-reduce) over the first
    `devices` devices of `nbytes` per device, for each size, timed like the bandwidth probes (best repeat of
    back-to-back calls).

    Bus bandwidth (NCCL's convention) = 2 (n - 1) / n * bytes / time: the bytes each device sends and receives in
    a ring all-reduce, per second. Returns {"devices", "probes": [{bytes, best_s, median_s, bus_bytes_per_s}],
    "bus_bytes_per_s": the best of the probes (the floor's), "bytes": that probe's size}."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:devices]), ("model",))
    spec = jax.sharding.PartitionSpec("model")
    psum = jax.jit(jax.shard_map(lambda a: lax.psum(a, "model"), mesh=mesh, in_specs=spec, out_specs=spec,
                                 check_vma=False))
    factor = 2 * (devices - 1) / devices
    found = []
    for nbytes in sizes:
        n = max(1, nbytes // jnp.dtype(dtype).itemsize)
        x = jax.device_put(jnp.ones((devices * n,), dtype), jax.sharding.NamedSharding(mesh, spec))
        # On host devices (CPU) each call is waited for: XLA's CPU collectives abort when hundreds are in flight
        # (a rendezvous timeout in the TP smoke run); on GPUs they run back to back like the other probes.
        call = (lambda _: jax.block_until_ready(psum(x))) if mesh.devices.flat[0].platform == "cpu" else (
            lambda _: psum(x))
        times, calls = _time_calls(call, None, timing_kw)
        moved = n * jnp.dtype(dtype).itemsize
        found.append({"bytes": moved, "best_s": min(times), "median_s": statistics.median(times), "calls": calls,
                      "bus_bytes_per_s": factor * moved / min(times)})
        del x
    best = max(found, key=lambda r: r["bus_bytes_per_s"])
    return {"devices": devices, "probes": found, "bus_bytes_per_s": best["bus_bytes_per_s"], "bytes": best["bytes"]}


def measure(copy_bytes: int, matmul_n: int, timing_kw: dict, probes: tuple[str, ...] = PROBES,
            dtype=jnp.bfloat16) -> dict:
    """Device rates of one run: the bandwidth probes (see `bandwidth`), the matmul rate in the run's `dtype` and the
    dispatch time."""
    return {**bandwidth(copy_bytes, timing_kw, probes), **matmul_rate(matmul_n, timing_kw, dtype),
            **dispatch_time(timing_kw)}


def measure_for(config: dict, timing_kw: dict) -> dict:
    """`measure` with a config's [rates] table, the matmul in the dtype of its [bench] or [model] table."""
    rates = config["rates"]
    dtype = (config.get("bench") or config.get("model") or {}).get("dtype", "bfloat16")
    return measure(rates["copy_bytes"], rates["matmul_n"], _probe_kw(config, timing_kw),
                   tuple(rates.get("probes", PROBES)), dtype)


def _probe_kw(config: dict, timing_kw: dict) -> dict:
    """timing_kw with the config's rates.min_repeat_s (default PROBE_MIN_REPEAT_S) as the probes' repeat length."""
    return {**timing_kw, "probe_min_repeat_s": config["rates"].get("min_repeat_s", PROBE_MIN_REPEAT_S)}


def measure_allreduce_for(config: dict, devices: list[int], timing_kw: dict) -> dict:
    """`allreduce_rates` for every device count above 1 in `devices`, keyed by the count (a string, as JSON keeps
    it); sizes from the config's rates.allreduce_bytes."""
    sizes = tuple(config["rates"].get("allreduce_bytes", ALLREDUCE_BYTES))
    return {str(n): allreduce_rates(n, sizes, _probe_kw(config, timing_kw)) for n in sorted(set(devices)) if n > 1}


def describe_allreduce(rates: dict) -> str:
    """One line per device count: the best all-reduce bus bandwidth and the time of each probe's size."""
    return "; ".join(f"all-reduce over {n} devices: bus bandwidth {r['bus_bytes_per_s'] / 1e9:.1f} GB/s ("
                     + ", ".join(f"{p['bytes'] / 2**20:g} MiB in {p['best_s'] * 1e6:.0f} us" for p in r["probes"])
                     + ")" for n, r in rates.items())


def describe(rates: dict) -> str:
    """One line: the floor's bandwidth, every probe's figure, the matmul rate."""
    probes = rates.get("bandwidth_probes")
    if probes:
        parts = [f"{name} {r['bytes_per_s'] / 1e12:.3f}" if "bytes_per_s" in r else f"{name} failed"
                 for name, r in probes.items()]
    else:  # records written before the probes existed
        parts = [f"copy {rates.get('copy_bandwidth_bytes_per_s', rates['bandwidth_bytes_per_s']) / 1e12:.3f}"]
        if rates.get("read_bandwidth_bytes_per_s"):
            parts.append(f"read {rates['read_bandwidth_bytes_per_s'] / 1e12:.3f}")
    return (f"floor bandwidth {rates['bandwidth_bytes_per_s'] / 1e12:.3f} TB/s (best of: {', '.join(parts)} TB/s), "
            f"{rates.get('matmul_dtype', 'bfloat16')} matmul {rates['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s "
            f"(n = {rates['matmul_n']})")
