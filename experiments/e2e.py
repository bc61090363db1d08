"""End-to-end decode experiments (issue #4) on a randomly initialised Llama-shaped model.

Kinds:
  e2e_throughput  decode tokens/s vs batch size, for several shared-prefix lengths, every mode
  long_document   one batch, growing shared prefix: throughput relative to the shortest prefix, per mode
  tree_apps       APPS-like two-level sharing vs one-level vs standard (time of the decode)

Per point (tree of prompts, mode): `models.generate.prefill` (compile and run timed separately), then the decode
loop (`models.generate.compile_decode`, compile timed) is timed over windows of `steps_per_sample` steps centred
on three positions of the generation, s = 1, G/2 and G as in bench-attention, clamped to [0, G) (`sample_starts`:
with 64 steps of G = 128, steps 0-63, 31-94 and 64-127; the floor averages the same windows); each window's time
is the median of `repeats` runs; Simpson's rule gives the mean step time, tokens/s = B / mean step time and the
decode time of G tokens = G * mean step time. With `full_decode = true` one whole G-step decode is timed as well.
`hydragen`, `shared_storage` and `none` share one prefill (the same TreeCache; see model_api.derive_mode);
`standard` prefills its per-sequence dense caches. Points whose estimated memory exceeds the device are recorded
as "oom" without allocating; RESOURCE_EXHAUSTED at run time is recorded as "oom" too.

Every decode record carries the step floor (`floor.decode_floor`: each op of the step at max(bytes / bandwidth,
FLOPs / matmul rate), averaged over the timed steps as the timing is) from the device rates measured at the start
of the same run (a `device_rates` record), and `floor_fraction` = floor / measured mean step.

Tensor parallelism (config `mesh.model`, e.g. `--set mesh.model=2` or `--set "mesh.model=[1, 2]"`): the whole grid
runs once per device count, in order, each on a model split over that many devices (models.parallel; 1 = the
single-device model). Points then carry `tp`; memory estimates are per device; the floor is per device plus the
step's all-reduces at the all-reduce bus bandwidth measured at the start of the run (`allreduce` in the
`device_rates` record, per device count).
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
from tqdm import tqdm

from experiments import device_rates, floor, memory, records, tables, timing

TREE_MODES = ("hydragen", "shared_storage", "none")
TREE_VARIANTS = {  # tree_apps variant -> (shared levels, mode)
    "two_level": (2, "hydragen"),
    "one_level": (1, "hydragen"),
    "two_level_shared_storage": (2, "shared_storage"),
    "standard": (2, "standard"),
}
MARGIN_BYTES = 2 * 2**30  # activations, logits, workspace of prefill and decode


@dataclasses.dataclass
class Job:
    """One prefill and the decode modes timed on it."""

    point: dict
    tree_fn: object  # () -> SharingTree
    modes: list[str]  # modes of models.generate
    labels: list[str]  # names recorded (== modes except for tree_apps variants)


def backend_of(config: dict) -> str | None:
    """The models' backend on this run's device ("auto": None, the library's default, on a GPU)."""
    return records.resolve_backend(config["backend"], config["cpu_backend"], jax.devices()[0].platform == "gpu", None)


def jobs_for(config: dict, vocab: int) -> list[Job]:
    kind, seed = config["kind"], config["model"]["seed"]
    jobs = []
    if kind in ("e2e_throughput", "long_document"):
        grid = config["grid"]
        batches = grid["batches"] if kind == "e2e_throughput" else [grid["batch"]]
        for prefix in grid["prefixes"]:
            for batch in batches:
                point = {"prefix": prefix, "batch": batch, "generate": grid["generate"], "unique": grid["unique"]}
                tree_fn = (lambda b=batch, p=prefix: _synthetic(b, p, grid["unique"], vocab, seed))
                jobs += _split_by_prefill(point, tree_fn, config["modes"], config["modes"])
    elif kind == "tree_apps":
        t = config["tree"]
        point = {k: t[k] for k in ("fewshot", "problem_prompt", "problems", "samples", "generate")}
        point["batch"] = t["problems"] * t["samples"]
        for variant in t["variants"]:
            levels, mode = TREE_VARIANTS[variant]
            tree_fn = (lambda lv=levels: _apps(t, vocab, seed, lv))
            jobs.append(Job({**point, "levels": levels}, tree_fn, [mode], [variant]))
    else:
        raise ValueError(f"not an end-to-end kind: {kind!r}")
    return jobs


def _synthetic(batch, prefix, unique, vocab, seed):
    from experiments import model_api

    return model_api.synthetic_tree(batch, prefix, unique, vocab, seed)


def _apps(t, vocab, seed, levels):
    from experiments import model_api

    return model_api.apps_tree(t["fewshot"], t["problem_prompt"], t["problems"], t["samples"], vocab, seed, levels)


def _split_by_prefill(point, tree_fn, modes, labels) -> list[Job]:
    """Tree modes share one prefill; `standard` has its own."""
    shared = [m for m in modes if m in TREE_MODES]
    jobs = []
    if shared:
        order = [m for m in TREE_MODES if m in shared]  # hydragen first: the others derive from its state
        jobs.append(Job(point, tree_fn, order, order))
    if "standard" in modes:
        jobs.append(Job(point, tree_fn, ["standard"], ["standard"]))
    return jobs


def tensor_parallel_sizes(config: dict) -> list[int]:
    """The device counts a run covers, in order (config `mesh.model`, an int or a list); [1] without a mesh table."""
    sizes = config.get("mesh", {}).get("model", 1)
    return sizes if isinstance(sizes, list) else [sizes]


def run(config: dict, writer: records.RecordWriter, *, progress: bool = True) -> list[dict]:
    from experiments import model_api

    timing_cfg = config["timing"]
    budget = timing_cfg.get("time_budget_s")
    started = time.perf_counter()
    backend = backend_of(config)
    sizes = tensor_parallel_sizes(config)
    if max(sizes) > len(jax.devices()):
        from experiments import config as config_lib

        raise config_lib.ConfigError(
            f"mesh.model = {config['mesh']['model']} needs {max(sizes)} devices; JAX sees {len(jax.devices())} (on "
            f"a CPU: XLA_FLAGS=--xla_force_host_platform_device_count={max(sizes)})")
    rates = device_rates.measure_for(config, timing.timing_options(timing_cfg))  # before the model takes memory
    if max(sizes) > 1:
        rates["allreduce"] = device_rates.measure_allreduce_for(config, sizes, timing.timing_options(timing_cfg))
    writer.write(record="device_rates", point={}, mode=None, status="ok", results=rates)
    print(f"[e2e] {device_rates.describe(rates)}", flush=True)
    if max(sizes) > 1:
        print(f"[e2e] {device_rates.describe_allreduce(rates['allreduce'])}", flush=True)
    model_cfg = config["model"]
    itemsize = jax.numpy.dtype(model_cfg["dtype"]).itemsize
    for tp in sizes:
        model, init_s = model_api.build_model(model_cfg["shape"], model_cfg["dtype"], model_cfg["seed"], tp)
        weights = model_api.param_bytes(model)
        writer.write(record="model", point={"shape": model_cfg["shape"], "dtype": model_cfg["dtype"],
                                            **_tp_key(config, tp)}, mode=None,
                     status="ok", results={"init_s": init_s, "param_bytes": weights, "backend": backend or "default"})
        print(f"[e2e] model {model_cfg['shape'].get('num_hidden_layers')} layers, {weights / 1e9:.2f} GB of weights"
              f"{f' over {tp} devices' if tp > 1 else ''}, init {init_s:.1f} s, backend {backend or 'default'}",
              flush=True)
        jobs = jobs_for(config, model.config.vocab_size)
        for job in tqdm(jobs, desc=f"{config['name']}{f' tp={tp}' if tp > 1 else ''}", disable=not progress):
            out_of_time = budget is not None and time.perf_counter() - started > budget
            run_job(job, model, config, writer, backend, weights, itemsize, rates, tp, skip=out_of_time)
        del model
        memory.release()
    return writer.records


def _tp_key(config: dict, tp: int) -> dict:
    """`{"tp": tp}` for the points of a run with a mesh table, {} otherwise (single-device records unchanged)."""
    return {"tp": tp} if "mesh" in config else {}


def needed_bytes(tree, generate: int, first_mode: str, config, weights: int, itemsize: int, tp: int = 1) -> int:
    """Estimated bytes on each device of one prefill and its decode: weights, caches, margin (dense copies for
    standard, which prefill builds from the tree cache: both are alive at its peak). On `tp` devices: the weights
    (`weights`: all devices' bytes) and caches split over them."""
    from experiments import model_api

    est = model_api.cache_estimate(tree, generate, config, itemsize)
    caches = est["tree"] + (est["dense"] if first_mode == "standard" else 0)
    return int(weights / tp + caches * model_api.kv_share(config, tp)) + MARGIN_BYTES


def plan(config: dict, capacity: int) -> list[dict]:
    """Every job's estimated memory against `capacity` bytes (no model is built, nothing is allocated)."""
    from experiments import model_api
    from models import LlamaConfig

    shape, dtype = config["model"]["shape"], config["model"]["dtype"]
    itemsize = jax.numpy.dtype(dtype).itemsize
    weights = model_api.shape_param_bytes(shape, itemsize)
    usable = memory.usable_bytes(capacity, config.get("device"))
    rows = []
    for tp in tensor_parallel_sizes(config):
        for job in jobs_for(config, shape["vocab_size"]):
            tree = job.tree_fn()
            need = needed_bytes(tree, job.point["generate"], job.modes[0], LlamaConfig(**shape), weights, itemsize,
                                tp)
            rows.append({"point": {**job.point, "batch": tree.num_sequences, **_tp_key(config, tp)},
                         "modes": job.labels, "needed_bytes": need, "fits": need <= usable})
    return rows


def run_job(job: Job, model, config, writer, backend, weights: int, itemsize: int, rates: dict, tp: int = 1,
            skip: bool = False) -> None:
    """Prefill the job's tree once, then time the decode of each of its modes. `skip` (the run's time budget is
    spent): nothing runs; the modes are recorded "skipped", or "oom" where the memory estimate does not fit (knowing
    that takes no time)."""
    from experiments import model_api

    dec, timing_cfg = config["decode"], config["timing"]
    generate = job.point["generate"]
    tree = job.tree_fn()
    first = job.modes[0]
    needed = needed_bytes(tree, generate, first, model.config, weights, itemsize, tp)
    point = {**job.point, "batch": tree.num_sequences, **_tp_key(config, tp)}
    shape = floor.ModelShape.from_config(config["model"]["shape"], itemsize)
    sharing = model_api.sharing(tree)
    state = None
    try:
        memory.check_fits(needed, config.get("device"))
        if skip:
            for label in job.labels:
                writer.write(record="decode", point=point, mode=label, status="skipped", reason="time budget exhausted")
            return
        state, pre = model_api.prefill(model, tree, generate, first, backend, dec["prefill_chunk"])
    except Exception as error:  # noqa: BLE001 - recorded
        status = "oom" if memory.is_oom(error) else "error"
        reason = f"prefill: {type(error).__name__}: {str(error)[:400]}"
        for label in job.labels:
            writer.write(record="decode", point=point, mode=label, status=status,
                         results={"estimate_bytes": needed}, reason=reason)
            tqdm.write(f"[e2e] {_label(point)} {label}: {status} ({reason[:100]})")
        del state
        memory.release()
        return
    writer.write(record="prefill", point=point, mode=first, status="ok",
                 results={**pre, "cache_bytes": model_api.cache_bytes(state), "estimate_bytes": needed})
    org = model_api.origin(state)
    lost = None  # set when a failure consumed the (donated) state: the remaining modes cannot run
    for mode, label in zip(job.modes, job.labels):
        if lost is not None:
            rec = writer.write(record="decode", point=point, mode=label, status="error",
                               results={"estimate_bytes": needed}, reason=f"not run: {lost}")
            _print(point, label, rec)
            continue
        try:
            if mode != first:
                state, org = model_api.derive_mode(state, mode, org)
            state, results = time_decode(model, state, org, generate, dec, timing_cfg, backend)
            results.update(pre, cache_bytes=model_api.cache_bytes(state), estimate_bytes=needed)
            results.update(floor_fields(shape, sharing, mode, results, rates, tp))
            rec = writer.write(record="decode", point=point, mode=label, status="ok", results=results)
        except Exception as error:  # noqa: BLE001 - recorded
            status = "oom" if memory.is_oom(error) else "error"
            reason = f"{type(error).__name__}: {str(error)[:400]}"
            rec = writer.write(record="decode", point=point, mode=label, status=status,
                               results={"estimate_bytes": needed}, reason=reason)
            if _deleted(state):
                lost = f"the decode state was consumed by the failure of {label} ({status})"
        _print(point, label, rec)
    del state, org
    memory.release()


def _deleted(state) -> bool:
    return any(getattr(x, "is_deleted", lambda: False)() for x in jax.tree.leaves(state))


def sample_starts(generate: int, steps: int) -> list[int]:
    """First step (0-based) of each timed window of `steps` steps: centred on s = 1, G/2, G, inside [0, G)."""
    return [min(max(0, s - 1 - steps // 2), generate - steps) for s in floor.simpson_points(generate)]


def floor_fields(shape: floor.ModelShape, sharing: floor.Sharing, mode: str, results: dict, rates: dict,
                 tp: int = 1) -> dict:
    """The step floor of a timed decode (`floor.decode_floor` over the windows it timed) and its fraction; on `tp`
    devices, with the all-reduce bus bandwidth measured for `tp` devices."""
    link = rates["allreduce"][str(tp)]["bus_bytes_per_s"] if tp > 1 else None
    out = floor.decode_floor(shape, sharing, mode, results["sample_starts"], results["steps_per_sample"],
                             rates["bandwidth_bytes_per_s"], rates["matmul_flops_per_s"], tp, link)
    out.update(floor_fraction=out["floor_s"] / results["mean_step_s"],
               floor_bandwidth_bytes_per_s=rates["bandwidth_bytes_per_s"],
               floor_matmul_flops_per_s=rates["matmul_flops_per_s"])
    if tp > 1:
        out["floor_allreduce_bus_bytes_per_s"] = link
    return out


WARMUP_STEPS = 16  # steps of a warm-up call: enough to estimate a step beside the call's fixed cost


def timing_plan(step_s: float, steps: int, repeats: int, budget_s: float) -> tuple[int, int]:
    """(steps a timed call, repeats) for a mode whose step takes about `step_s`: `steps` a call (the config's
    `steps_per_sample`) and `repeats` at each of the three positions, fewer repeats (>= 1) where they would pass
    `budget_s`, and shorter calls (>= 1 step) where even one repeat would: a slow mode's steps (shared storage at
    long prefixes: 0.1-0.6 s each) make a call's fixed cost (a few ms) negligible at any length."""
    per_point = 3 * steps * step_s  # seconds of one repeat over the three positions
    if per_point > budget_s:
        steps = max(1, min(steps, int(budget_s // max(3 * step_s, 1e-9))))
        return steps, 1
    if per_point * repeats > budget_s:
        repeats = max(1, int(budget_s // max(per_point, 1e-9)))
    return steps, repeats


def time_decode(model, state, org, generate: int, dec: dict, timing_cfg: dict, backend) -> tuple[object, dict]:
    """Per-step decode time at s = 1, G/2, G (median of repeats each), Simpson-combined. Returns the state (the
    decode donates its input) and the results."""
    from experiments import model_api

    fn, compile_s = model_api.compile_decode(model, state, backend)
    steps = min(dec["steps_per_sample"], generate)
    warm = min(steps, WARMUP_STEPS)
    state, _, _ = model_api.run_decode(fn, model, model_api.at_step(state, org, 0), 1)  # loads the kernels
    for _ in range(timing_cfg["warmup"]):  # >= 1 (the config's check); the last warm-up call estimates a step
        state, warm_s, _ = model_api.run_decode(fn, model, model_api.at_step(state, org, 0), warm)
    k, repeats = timing_plan(warm_s / warm, steps, timing_cfg["repeats"], dec["point_budget_s"])
    starts = sample_starts(generate, k)
    step_s = []
    for start in starts:
        times = []
        for _ in range(repeats):
            state, elapsed, taken = model_api.run_decode(fn, model, model_api.at_step(state, org, start), k)
            if taken != k:
                raise RuntimeError(f"decode took {taken} steps instead of {k}")
            times.append(elapsed / k)
        step_s.append(statistics.median(times))
    mean_step = floor.simpson(*step_s)
    B = state.positions.shape[0]
    results = {"decode_compile_s": compile_s, "step_s": step_s, "mean_step_s": mean_step,
               "tokens_per_s": B / mean_step, "decode_s": generate * mean_step, "repeats": repeats,
               "steps_per_sample": k, "sample_starts": starts}
    if dec["full_decode"] and generate * mean_step <= dec["point_budget_s"]:
        state, full_s, taken = model_api.run_decode(fn, model, model_api.at_step(state, org, 0), generate)
        results.update(decode_s_full=full_s, tokens_per_s_full=B * taken / full_s)
    elif dec["full_decode"]:  # said, not left out silently
        results["decode_s_full_skipped"] = (f"the whole decode (~{generate * mean_step:.1f} s: {generate} steps) "
                                            f"would pass point_budget_s = {dec['point_budget_s']}")
    peak = memory.peak_bytes_in_use()
    if peak is not None:
        results["peak_bytes_in_use"] = peak
    return state, results


def _label(point: dict) -> str:
    keys = ("tp", "prefix", "fewshot", "problem_prompt", "problems", "samples", "batch", "levels")
    return " ".join(f"{k}={point[k]}" for k in keys if k in point)


def _print(point, label, rec) -> None:
    if rec["status"] == "ok":
        r = rec["results"]
        tqdm.write(f"[e2e] {_label(point)} {label}: {r['tokens_per_s']:.0f} tok/s, step "
                   f"{r['mean_step_s'] * 1e3:.2f} ms (prefill compile {r['prefill_compile_s']:.1f} s, run "
                   f"{r['prefill_s']:.2f} s; decode compile {r['decode_compile_s']:.1f} s; repeats {r['repeats']})")
    else:
        tqdm.write(f"[e2e] {_label(point)} {label}: {rec['status']} ({rec.get('reason', '')[:120]})")


def write_markdown(path, all_records: list[dict]) -> None:
    decode = [r for r in all_records if r["record"] == "decode"]
    if not decode:
        open(path, "w").write("# (no decode records)\n")
        return
    r0 = decode[0]
    kind = r0["experiment"]
    model = next((r for r in all_records if r["record"] == "model"), None)
    rates = next((r for r in all_records if r["record"] == "device_rates"), None)
    parts = [f"# {r0['config']} results", "",
             f"Device `{r0['device']}`, JAX {r0['jax_version']}, {r0['date_utc']}, commit `{r0['git_commit']}`"
             f"{' (smoke)' if r0['smoke'] else ''}."]
    if model:
        shape = model["point"]["shape"]
        parts.append(f"Model: random {model['point']['dtype']} Llama, {shape.get('num_hidden_layers')} layers, "
                     f"hidden {shape.get('hidden_size')}, {shape.get('num_attention_heads')}/"
                     f"{shape.get('num_key_value_heads')} heads, {model['results']['param_bytes'] / 1e9:.2f} GB.")
    if rates:
        parts.append(tables.rates_line(rates))
        if rates["results"].get("allreduce"):
            line = device_rates.describe_allreduce(rates["results"]["allreduce"])
            parts.append(line[0].upper() + line[1:] + ".")
    parts += ["", "Decode tokens/s = B / Simpson mean step time (steps timed in windows centred on s = 1, G/2, G); OOM = did not fit.",
              ""]
    by_tp = {tp: [r for r in decode if r["point"].get("tp") == tp]  # {None: all} without tensor parallelism
             for tp in sorted({r["point"].get("tp") for r in decode}, key=lambda v: v or 0)}
    keys = (["tp"] if None not in by_tp else []) + ["prefix", "batch"]
    if kind == "e2e_throughput":
        parts.append(tables.e2e_table(decode, keys))
        if len(by_tp) > 1:
            parts += ["", "## Tensor parallel speed-up", "",
                      "Tokens/s on n devices over tokens/s on the fewest devices of the run, same prefix, batch and "
                      "mode (every device count measured in the same run).", "",
                      tables.tp_speedup_table(decode)]
    for tp, recs in by_tp.items():  # the tables of one device count each
        title = [f"### {tp} device{'s' if tp > 1 else ''}", ""] if tp is not None else []
        if kind == "long_document":
            parts += ["", *title, tables.e2e_table(recs, keys), "", "Throughput relative to the shortest prefix:", "",
                      tables.relative_table(recs, "prefix")]
        elif kind == "tree_apps":
            parts += ["", *title, tables.tree_table(recs)]
    if kind == "tree_apps":
        keys = keys[:-2] + ["levels", "batch"]
    if tables.has_floors(decode):
        parts += ["", "## Step floor", "",
                  "Floor of a step: every op (each layer's GEMMs, attention and cache write; the LM head) at "
                  "max(bytes / bandwidth, FLOPs / matmul rate), averaged over the timed steps as the timing is; "
                  "fraction = floor / measured mean step."
                  + (" On n > 1 devices: each device's share of those ops, plus the 2 L + 1 all-reduces of [B, d] a "
                     "step at the measured all-reduce bus bandwidth." if keys[0] == "tp" else ""), "",
                  tables.e2e_table(decode, keys, "floor_tokens_per_s"), "",
                  tables.e2e_table(decode, keys, "floor_fraction")]
        if kind == "long_document":
            for recs in by_tp.values():
                parts += ["", tables.relative_table(recs, "prefix", "floor_tokens_per_s"), "",
                          tables.prefix_ratio_line(recs)]
    if kind != "tree_apps" and tables.hydragen_vs_none_rows(decode, keys):
        parts += ["", "## Hydragen against no attention", "",
                  "Attention floor: the attention of every layer at its floor (a layer's levels in one op; levels apart: "
                  "each level alone), cache writes included: what `none` does not do.", "",
                  tables.hydragen_vs_none_table(decode, keys)]
    parts += [""] + tables.e2e_not_measured(decode)
    open(path, "w").write("\n".join(parts))
