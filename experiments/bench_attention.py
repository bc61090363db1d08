"""Issue #5's attention microbenchmark: one decode step of B sequences sharing a P-token prefix.

For each seed config and each suffix length s in (1, out/2, out), every variant is compiled and timed on the same
random inputs of `bench.dtype` (built once per (config, s), freed before the next; suffix caches of `out` tokens of
which s are valid, as a decode's: `make_inputs`). Per-step times are combined with
Simpson's rule into tokens/s = B / mean step time; the floor (see `floor.py`) uses the bandwidth (the best of
`device_rates`' probes) and the matmul rate measured at the start of the same run.

Variants (`VARIANTS`):
  hydragen            hydragen_jax.hydragen_attention (pallas on GPU: the Hopper kernel where it pays, else
                      Triton; `cpu_backend` elsewhere)
  hydragen_triton     the same with the Triton kernels only ("triton" where hydragen's backend is "pallas" or
                      "mosaic", "interpret" for the interpreted ones; skipped where it is "xla")
  reference           the same function with backend="xla"
  cudnn_per_sequence  jax.nn.dot_product_attention(implementation="cudnn") on per-sequence KV [B, P+s, Hkv, D]
  xla_per_sequence    the same with implementation="xla"
  shared_storage      hydragen_attention(..., batch_prefix=False): prefix stored once, read per sequence
  torch_hydragen      outside anchor: Hydragen from PyTorch's flash SDPA + log-sum-exp merge (experiments/anchors.py)
  flashinfer_cascade  outside anchor: FlashInfer's two-level cascade attention (experiments/anchors.py)
The anchors run where torch (and FlashInfer) are importable on a CUDA GPU, skipped with the reason elsewhere; they
are timed with CUDA events on the same inputs, chained the same way, their outputs compared with the reference's.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import jax
import jax.numpy as jnp
from tqdm import tqdm

from experiments import anchors, device_rates, floor, memory, records, tables, timing


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int
    prefix: int
    out: int
    q_heads: int
    kv_heads: int
    head_dim: int
    dtype: str

    @property
    def itemsize(self) -> int:
        return jnp.dtype(self.dtype).itemsize

    def point(self) -> dict:
        return {"batch": self.batch, "prefix": self.prefix, "out": self.out, "q_heads": self.q_heads,
                "kv_heads": self.kv_heads, "head_dim": self.head_dim, "dtype": self.dtype}

    def label(self) -> str:
        return f"B={self.batch} P={self.prefix} out={self.out} H={self.q_heads}/{self.kv_heads}"


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    prefix_copied: bool  # the variant keeps per-sequence copies of the prefix
    needs_gpu: bool = False
    outside: bool = False  # an outside anchor (experiments/anchors.py): torch, timed with CUDA events
    kv_copy: bool = False  # builds its own copy of the KV (FlashInfer's paged cache)


VARIANTS = {
    "hydragen": Variant("hydragen", prefix_copied=False),
    "hydragen_triton": Variant("hydragen_triton", prefix_copied=False),
    "reference": Variant("reference", prefix_copied=False),
    "cudnn_per_sequence": Variant("cudnn_per_sequence", prefix_copied=True, needs_gpu=True),
    "xla_per_sequence": Variant("xla_per_sequence", prefix_copied=True),
    "shared_storage": Variant("shared_storage", prefix_copied=False),
    "torch_hydragen": Variant("torch_hydragen", prefix_copied=False, needs_gpu=True, outside=True),
    "flashinfer_cascade": Variant("flashinfer_cascade", prefix_copied=False, needs_gpu=True, outside=True,
                                  kv_copy=True),
}


def cases_from_config(config: dict) -> list[Case]:
    bench = config["bench"]
    return [Case(head_dim=bench["head_dim"], dtype=bench["dtype"], **row) for row in bench["configs"]]


def hydragen_backend(bench: dict) -> str:
    """The hydragen variant's backend on this run's device ("auto": pallas on a GPU)."""
    return records.resolve_backend(bench["hydragen_backend"], bench["cpu_backend"],
                                   jax.devices()[0].platform == "gpu", "pallas")


# ---------------------------------------------------------------- inputs


def make_inputs(case: Case, s: int, seed: int) -> dict:
    """Queries, the shared prefix KV and per-sequence suffix caches: random normal data, already on the device.

    The suffix caches hold `case.out` tokens a sequence (its capacity over the decode, as a decode loop's caches
    do), of which the first s are valid (`suffix_lengths`): the kernels' choice (and Triton's tiles) follow the
    capacity, as in a decode, so that a config runs the same kernels at every s. Returns q `[B, 1, Hq, D]`,
    prefix_k / prefix_v `[P, Hkv, D]`, suffix_k / suffix_v `[B, out, Hkv, D]`, suffix_lengths `[B]` (int32, s) and
    s (a Python int: the variants that read exact-length copies slice them with it)."""
    if not 1 <= s <= case.out:
        raise ValueError(f"make_inputs: s must be in [1, out = {case.out}] (the suffix caches hold out tokens); "
                         f"got {s}")
    keys = jax.random.split(jax.random.key(seed), 5)
    dt = jnp.dtype(case.dtype)
    kv = (case.kv_heads, case.head_dim)
    return {
        "q": jax.random.normal(keys[0], (case.batch, 1, case.q_heads, case.head_dim), dt),
        "prefix_k": jax.random.normal(keys[1], (case.prefix, *kv), dt),
        "prefix_v": jax.random.normal(keys[2], (case.prefix, *kv), dt),
        "suffix_k": jax.random.normal(keys[3], (case.batch, case.out, *kv), dt),
        "suffix_v": jax.random.normal(keys[4], (case.batch, case.out, *kv), dt),
        "suffix_lengths": jnp.full((case.batch,), s, jnp.int32),
        "s": s,
    }


@jax.jit
def _per_sequence(prefix, suffix):
    batch = suffix.shape[0]
    copies = jnp.broadcast_to(prefix[None], (batch, *prefix.shape))
    return jnp.concatenate([copies, suffix], axis=1)


def per_sequence_kv(inputs: dict) -> tuple[jax.Array, jax.Array]:
    """The concatenated per-sequence KV [B, P+s, Hkv, D] that the per-sequence baselines read."""
    s = inputs["s"]
    k = _per_sequence(inputs["prefix_k"], inputs["suffix_k"][:, :s])
    v = _per_sequence(inputs["prefix_v"], inputs["suffix_v"][:, :s])
    return jax.block_until_ready((k, v))


def estimate_bytes(case: Case, s: int, variant: Variant, copies: int = 1) -> int:
    """Device bytes a variant needs at suffix s: the shared inputs (suffix caches of `out` tokens), its copies (the
    per-sequence KV, the anchors' exact-length suffixes, FlashInfer's paged cache), output and f32 logits
    workspace; with `copies` (`l2_copies`) > 1, an upper bound: copies - 1 more of the inputs and of its own."""
    shared = floor.kv_cache_bytes(case.batch, case.prefix, case.out, case.kv_heads, case.head_dim, case.itemsize,
                                  False)
    q_and_out = 2 * case.batch * case.q_heads * case.head_dim * case.itemsize
    own = 0
    if variant.prefix_copied:
        own += floor.kv_cache_bytes(case.batch, case.prefix, s, case.kv_heads, case.head_dim, case.itemsize, True)
    if variant.outside:
        own += floor.kv_cache_bytes(case.batch, 0, s, case.kv_heads, case.head_dim, case.itemsize, False)
    if variant.kv_copy:
        own += floor.kv_cache_bytes(case.batch, case.prefix, s, case.kv_heads, case.head_dim, case.itemsize, False)
    logits = 2 * 4 * case.batch * case.q_heads * (case.prefix + s)
    return copies * (shared + own) + q_and_out + logits


def step_read_bytes(case: Case, s: int, variant: Variant) -> int:
    """Bytes one step of a variant reads and writes: the floor's (`floor.step_bytes`: the prefix once, s tokens a
    sequence, queries and outputs), the prefix once a sequence where the variant keeps per-sequence copies."""
    prefix = case.batch * case.prefix if variant.prefix_copied else case.prefix
    return floor.step_bytes(case.batch, prefix, s, case.q_heads, case.kv_heads, case.head_dim, case.itemsize)


def l2_copies(case: Case, s: int, variant: Variant, l2_bytes: int, steps_per_call: int) -> int:
    """Copies of a variant's KV that a timed chain reads in turn (`timing.chain_steps`' copies), so that together
    they are at least twice the L2 cache (`l2_bytes`, the config's [device] table; 0: one copy): data a step reads
    that would fit L2 is otherwise served from it from step to step, faster than the floor's HBM bandwidth (a
    decode reads each layer's caches once a step). A power of two dividing `steps_per_call`."""
    need = math.ceil(2 * l2_bytes / max(1, step_read_bytes(case, s, variant)))
    copies = 1
    while copies < need and steps_per_call % (2 * copies) == 0:
        copies *= 2
    return copies


def step_floor(case: Case, s: int, rates: dict) -> dict:
    """The floor of one decode step at suffix s (`floor.py`: the prefix once, s keys a sequence, queries and outputs;
    4·D·Hq FLOPs a query-key pair) at a run's measured rates (`device_rates`): `floor_s`, `floor_bytes`,
    `floor_flops`."""
    nbytes = floor.step_bytes(case.batch, case.prefix, s, case.q_heads, case.kv_heads, case.head_dim, case.itemsize)
    flops = floor.step_flops(case.batch, case.prefix, s, case.q_heads, case.head_dim)
    return {"floor_s": floor.floor_time(nbytes, flops, rates["bandwidth_bytes_per_s"], rates["matmul_flops_per_s"]),
            "floor_bytes": nbytes, "floor_flops": flops}


def plan(config: dict, capacity: int) -> list[dict]:
    """Each config x variant's estimated memory at s = out against `capacity` bytes (nothing is allocated)."""
    usable = memory.usable_bytes(capacity, config.get("device"))
    rows = []
    for case in cases_from_config(config):
        for name in config["bench"]["variants"]:
            need = estimate_bytes(case, case.out, VARIANTS[name])
            rows.append({"point": case.point(), "modes": [name], "needed_bytes": need, "fits": need <= usable})
    return rows


# ---------------------------------------------------------------- variants


def build_variant(name: str, inputs: dict, per_seq: Callable[[], tuple], backend: str) -> tuple[Callable, tuple]:
    """A function of device arrays and its arguments for one variant."""
    if name in ("hydragen", "hydragen_triton", "reference", "shared_storage"):
        import hydragen_jax

        chosen = "xla" if name == "reference" else TRITON_ONLY[backend] if name == "hydragen_triton" else backend
        batch_prefix = name != "shared_storage"

        def fn(q, pk, pv, sk, sv, lengths):
            return hydragen_jax.hydragen_attention(q, pk, pv, sk, sv, suffix_lengths=lengths, backend=chosen,
                                                   batch_prefix=batch_prefix)

        return fn, tuple(inputs[k] for k in ("q", "prefix_k", "prefix_v", "suffix_k", "suffix_v", "suffix_lengths"))
    if name in ("cudnn_per_sequence", "xla_per_sequence"):
        implementation = "cudnn" if name == "cudnn_per_sequence" else "xla"

        def fn(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, implementation=implementation)

        k, v = per_seq()
        return fn, (inputs["q"], k, v)
    raise KeyError(f"unknown variant {name!r}")


# the Triton-only counterpart of each backend that runs kernels (`hydragen_triton`); "xla" runs none
TRITON_ONLY = {"pallas": "triton", "mosaic": "triton", "triton": "triton", "interpret": "interpret",
               "interpret-mosaic": "interpret"}


def skip_reason(variant: Variant, backend: str | None = None) -> str | None:
    if variant.outside:
        return anchors.skip_reason(variant.name)
    if variant.name == "hydragen_triton" and backend is not None and backend not in TRITON_ONLY:
        return f"runs the Triton kernels, and this run's Hydragen backend is {backend!r}, which runs no kernels"
    platform = jax.devices()[0].platform
    if variant.needs_gpu and platform != "gpu":
        return f"needs a CUDA GPU with cuDNN (platform is {platform})"
    return None


# ---------------------------------------------------------------- runner


def measure_variant(name: str, case: Case, s: int, inputs: dict, per_seq: Callable, *, backend: str,
                    build: Callable, timing_kw: dict, device_table: dict | None, reference_out=None,
                    steps_per_call: int = 1) -> tuple[str, dict, str | None, jax.Array | None]:
    """(status, results, reason, output) of one variant at one (config, s); failures become statuses.

    One timed call runs `steps_per_call` steps chained (`timing.chain_steps`: each step's output is the next one's
    query), over `l2_copies` copies of the KV in turn; `step_s` is the call's median time / steps_per_call, and the
    output compared with the reference's is that of the last step of the chain (the reference runs the same
    chain)."""
    variant = VARIANTS[name]
    reason = skip_reason(variant, backend)
    if reason is not None:
        return "skipped", {}, reason, None
    args = None
    copies = l2_copies(case, s, variant, (device_table or {}).get("l2_bytes", 0), steps_per_call)
    while copies > 1 and not memory.fits(estimate_bytes(case, s, variant, copies), device_table):
        copies //= 2  # fewer copies where they would not fit (one copy: the estimate plan() checks)
    try:
        memory.check_fits(estimate_bytes(case, s, variant, copies), device_table)
        if variant.outside:
            results, output = anchors.measure(name, inputs, steps_per_call, timing_kw, copies)
        else:
            fn, args = build(name, inputs, per_seq, backend)
            args = (args[0], *(a for kv in timing.fresh_copies(args[1:], copies) for a in kv))
            in_use = memory.bytes_in_use()  # inputs of this (config, s) + this variant's copies (GPU only)
            t = timing.time_fn(timing.chain_steps(fn, steps_per_call, copies), args, **timing_kw)
            results = {**t.as_dict(), "steps_per_call": steps_per_call, "step_s": t.median_s / steps_per_call,
                       "l2_copies": copies}
            output = t.output
            if in_use is not None:
                results["device_bytes_in_use"] = in_use
        if not bool(jnp.all(jnp.isfinite(output.astype(jnp.float32)))):  # a wrong result: not a time to report
            return "error", results, "output not finite (NaN or inf): its time is not counted", output
        if reference_out is not None and name != "reference":
            diff = float(jnp.max(jnp.abs(output.astype(jnp.float32) - reference_out.astype(jnp.float32))))
            if not math.isfinite(diff):
                return "error", results, "the jnp reference's output is not finite: nothing to check against", output
            results["max_abs_err_vs_reference"] = diff
            results["output_finite"] = True
        return "ok", results, None, output
    except Exception as error:  # noqa: BLE001 - every failure becomes a record
        status = "oom" if memory.is_oom(error) else "error"
        return status, {}, f"{type(error).__name__}: {str(error)[:500]}", None
    finally:
        del args


def run(config: dict, writer: records.RecordWriter, *, progress: bool = True,
        build: Callable = build_variant) -> list[dict]:
    """Run the benchmark, writing device_rates, step and summary records. Returns all records written."""
    bench = config["bench"]
    timing_kw = timing.timing_options(config["timing"])
    budget = config["timing"].get("time_budget_s")
    steps_per_call = config["timing"].get("steps_per_call", 1)
    started = time.perf_counter()
    backend = hydragen_backend(bench)

    rates = device_rates.measure_for(config, timing_kw)
    writer.write(record="device_rates", point={}, mode=None, status="ok", results=rates)
    print(f"[bench] {device_rates.describe(rates)}; one dispatched call of a trivial op "
          f"{rates['dispatch_s'] * 1e6:.1f} us; {steps_per_call} decode step(s) chained per timed call", flush=True)

    cases = cases_from_config(config)
    copied = [n for n in bench["variants"] if VARIANTS[n].prefix_copied]
    last_copied = copied[-1] if copied else None
    steps: dict[tuple[Case, str], dict[int, dict]] = {}
    work = [(case, s) for case in cases for s in floor.simpson_points(case.out)]
    for case, s in tqdm(work, desc="bench-attention", disable=not progress):
        point = {**case.point(), "suffix": s, "backend": backend}
        base = step_floor(case, s, rates)
        floor_s = base["floor_s"]

        def record(name, status, results, reason=None):
            kv = floor.kv_cache_bytes(case.batch, case.prefix, s, case.kv_heads, case.head_dim, case.itemsize,
                                      VARIANTS[name].prefix_copied)
            if status == "ok":
                results["floor_fraction"] = floor_s / results["step_s"]
            rec = writer.write(record="step", point=point, mode=name, status=status, reason=reason,
                               results={"kv_cache_bytes": kv, **base, **results})
            steps.setdefault((case, name), {})[s] = rec
            return rec

        if budget is not None and time.perf_counter() - started > budget:
            for name in bench["variants"]:
                record(name, "skipped", {}, "time budget exhausted")
            continue
        try:
            inputs = make_inputs(case, s, bench["seed"] + s)
        except Exception as error:  # noqa: BLE001 - recorded for every variant
            status = "oom" if memory.is_oom(error) else "error"
            for name in bench["variants"]:
                record(name, status, {}, f"inputs: {type(error).__name__}: {str(error)[:400]}")
            memory.release()
            continue
        cache: dict[str, tuple] = {}

        def per_seq():
            if "kv" not in cache:
                cache["kv"] = per_sequence_kv(inputs)
            return cache["kv"]

        reference_out = None
        # the reference first, whatever the config's order, so that every other variant is checked against it
        for name in sorted(bench["variants"], key=lambda name: name != "reference"):
            status, results, reason, out = measure_variant(
                name, case, s, inputs, per_seq, backend=backend, build=build, timing_kw=timing_kw,
                device_table=config.get("device"), reference_out=reference_out, steps_per_call=steps_per_call)
            if name == "reference":
                reference_out = out
            del out
            if name == last_copied:
                cache.clear()  # no later variant reads the per-sequence copies
            memory.release()
            _print_step(case, s, name, record(name, status, results, reason))
        del inputs, reference_out
        cache.clear()
        memory.release()

    for case in cases:
        for name in bench["variants"]:
            write_summary(writer, case, name, steps.get((case, name), {}), bench["variants"], steps, backend)

    summaries = [r for r in writer.records if r["record"] == "summary"]
    print(tables.bench_results_table(summaries), flush=True)
    print(tables.bench_floor_table(summaries), flush=True)  # the last table: fraction of the floor, speedups
    return writer.records


def _print_step(case: Case, s: int, name: str, rec: dict) -> None:
    if rec["status"] == "ok":
        r = rec["results"]
        tqdm.write(f"[bench] {case.label()} s={s} {name}: {r['step_s'] * 1e6:.1f} us a step "
                   f"(compile {r['compile_s']:.1f} s, floor fraction {r['floor_fraction']:.3f})")
    else:
        tqdm.write(f"[bench] {case.label()} s={s} {name}: {rec['status']} ({rec.get('reason', '')[:120]})")


def summarize(case: Case, by_s: dict[int, dict]) -> tuple[str, dict, str | None]:
    """Simpson-combined results of one variant on one config from its three step records."""
    points = floor.simpson_points(case.out)
    recs = [by_s.get(s) for s in points]
    if any(r is None for r in recs):
        missing = ", ".join(str(s) for s, r in zip(points, recs) if r is None)
        return "skipped", {}, f"no step record at s = {missing} (the run stopped before them)"
    statuses = [r["status"] for r in recs]
    kv_bytes = recs[-1]["results"].get("kv_cache_bytes")
    floor_mean = floor.simpson(*(r["results"]["floor_s"] for r in recs))
    base = {"kv_cache_bytes_at_out": kv_bytes, "floor_mean_step_s": floor_mean,
            "floor_tokens_per_s": case.batch / floor_mean}
    if all(s == "ok" for s in statuses):
        mean_step = floor.simpson(*(r["results"]["step_s"] for r in recs))
        fraction = floor_mean / mean_step  # = tok/s over the generation / the floor's tok/s
        errs = [r["results"].get("max_abs_err_vs_reference") for r in recs]
        results = {**base, "mean_step_s": mean_step, "tokens_per_s": case.batch / mean_step,
                   "floor_fraction": fraction, "step_s": [r["results"]["step_s"] for r in recs],
                   "compile_s": sum(r["results"]["compile_s"] for r in recs)}
        if any(e is not None for e in errs):
            results["max_abs_err_vs_reference"] = max(e for e in errs if e is not None)
        return "ok", results, None
    worst = next(s for s in ("oom", "error", "skipped") if s in statuses)
    # (a reason repeated at every s is said once where it is shown: `tables.not_measured`)
    reasons = "; ".join(f"s={s}: {r.get('reason', '')[:200]}" for s, r in zip(points, recs) if r["status"] != "ok")
    return worst, base, reasons


def summary_fields(case, name, by_s, variants, steps, backend) -> dict:
    """Keyword arguments of a `summary` record of one variant on one config."""
    status, results, reason = summarize(case, by_s)
    if status == "ok":
        for other in variants:
            if other == name:
                continue
            o_status, o_results, _ = summarize(case, steps.get((case, other), {}))
            if o_status == "ok":
                results[f"speedup_vs_{other}"] = results["tokens_per_s"] / o_results["tokens_per_s"]
    point = {**case.point(), "suffixes": list(floor.simpson_points(case.out)), "backend": backend}
    return {"record": "summary", "point": point, "mode": name, "status": status, "results": results,
            "reason": reason}


def write_summary(writer, case, name, by_s, variants, steps, backend) -> dict:
    return writer.write(**summary_fields(case, name, by_s, variants, steps, backend))


def summaries_from_steps(all_records: list[dict]) -> list[dict]:
    """Summary records rebuilt from step records (a run stopped before it wrote its summaries)."""
    steps: dict = {}
    cases, variants, meta = [], [], None
    for rec in all_records:
        if rec["record"] != "step":
            continue
        meta = meta or rec
        p = rec["point"]
        case = Case(**{k: p[k] for k in ("batch", "prefix", "out", "q_heads", "kv_heads", "head_dim", "dtype")})
        if case not in cases:
            cases.append(case)
        if rec["mode"] not in variants:
            variants.append(rec["mode"])
        steps.setdefault((case, rec["mode"]), {})[p["suffix"]] = rec
    if meta is None:
        return []
    base = {k: meta[k] for k in records.REQUIRED_KEYS if k in meta}
    out = []
    for case in cases:
        for name in variants:
            fields = summary_fields(case, name, steps.get((case, name), {}), variants, steps,
                                    meta["point"].get("backend"))
            out.append({**base, **fields})
    return out


def write_markdown(path, all_records: list[dict]) -> None:
    summaries = [r for r in all_records if r["record"] == "summary"] or summaries_from_steps(all_records)
    rates = next((r for r in all_records if r["record"] == "device_rates"), None)
    with open(path, "w") as f:
        f.write(tables.bench_markdown(summaries, rates))
