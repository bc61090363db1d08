"""Outside anchors of bench-attention: the strongest shared-prefix decode attention of other libraries, timed in the
same run on the same inputs as our variants. Optional: torch (and FlashInfer) are imported only inside these
functions, and a variant whose library is missing is skipped with the reason.

  torch_hydragen      Hydragen built from PyTorch's flash SDPA with its log-sum-exp
                      (`torch.ops.aten._scaled_dot_product_flash_attention`): the prefix queries of all B sequences
                      stacked as one batch-of-one call (the g query heads of a KV head and the B sequences as rows),
                      the suffixes in one call batched over sequences, both parts merged in float32.
  flashinfer_cascade  FlashInfer's `MultiLevelCascadeAttentionWrapper(2, workspace, "NHD")`: level 0 the shared
                      prefix (one request holding all B queries), level 1 each sequence's own pages; one paged cache
                      `[pages, 2, 16, Hkv, D]`; `plan()` once per (config, s), outside the timing.

Inputs are the bench's own JAX arrays, shared with torch through DLPack (no copy; FlashInfer's paged cache is a
copy, made before the timing). Steps are chained as `timing.chain_steps` chains ours (each step's output is the
next step's query, `steps_per_call` steps a timed call) and timed with CUDA events: eagerly, and replayed from a
CUDA graph of the chain where the capture works (no host launch cost, as our steps compiled in one XLA call). The
faster of the two is the variant's `step_s`; both are recorded.
"""

from __future__ import annotations

import importlib.util
import math
import statistics
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments import timing

ANCHORS = ("torch_hydragen", "flashinfer_cascade")
PAGE_SIZE = 16
WORKSPACE_BYTES = 256 * 2**20  # FlashInfer's float workspace (it recommends 128 MB)
TARBALL_HINT = ("extract ../shared/anchors/flashinfer-0.2.14.post1-jit.tar.gz into .anchors/ and run with "
                "PYTHONPATH=.anchors (experiments/README.md, 'Outside anchors')")


def skip_reason(name: str) -> str | None:
    """Why anchor `name` cannot run here (None if it can)."""
    if name not in ANCHORS:
        raise ValueError(f"not an anchor: {name!r}; expected one of {ANCHORS}")
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed (an optional anchor, never a dependency)"
    platform = jax.devices()[0].platform
    if platform != "gpu":
        return f"needs JAX on a CUDA GPU to share the inputs with torch (platform is {platform})"
    import torch

    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    if name == "flashinfer_cascade":
        try:
            import flashinfer  # noqa: F401
        except Exception as error:  # noqa: BLE001 - any import failure is a reason to skip
            return f"flashinfer is not importable ({type(error).__name__}: {str(error)[:200]}); {TARBALL_HINT}"
    return None


def _torch(x: jax.Array):
    """A torch view of a JAX GPU array (DLPack, no copy); through the host where DLPack fails."""
    import torch

    x = jax.block_until_ready(x)
    try:
        return torch.from_dlpack(x)
    except Exception:  # noqa: BLE001 - any DLPack failure: copy through the host instead
        host = np.asarray(x)
        if x.dtype == jnp.bfloat16:  # numpy has no bfloat16 torch accepts: move the bits
            return torch.from_numpy(host.view(np.uint16)).view(torch.bfloat16).cuda()
        return torch.from_numpy(host).cuda()


def flash_with_lse(q, k, v, scale: float):
    """PyTorch's flash attention over q `[N, H, M, D]`, k/v `[N, H, S, D]` (non-causal): (out `[N, H, M, D]`,
    natural-log lse `[N, H, M]` float32)."""
    import torch

    out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
    return out[0], out[1][..., : q.shape[2]]


def torch_hydragen_step(prefix_k, prefix_v, suffix_k, suffix_v) -> Callable:
    """`step(q [B, 1, Hq, D]) -> out [B, 1, Hq, D]`: exact attention over [prefix; suffix] of each sequence, as
    Hydragen computes it with PyTorch's flash kernel (torch tensors: prefix `[P, Hkv, D]`, suffix `[B, S, Hkv, D]`)."""
    import torch

    hkv, d = prefix_k.shape[1:]
    k_p, v_p = prefix_k.unsqueeze(0).transpose(1, 2), prefix_v.unsqueeze(0).transpose(1, 2)  # [1, Hkv, P, D]
    k_s, v_s = suffix_k.transpose(1, 2), suffix_v.transpose(1, 2)  # [B, Hkv, S, D]
    scale = d ** -0.5

    def step(q):
        b, _, hq, _ = q.shape
        g = hq // hkv
        qg = q.reshape(b, hkv, g, d)  # query head h = kv * g + j reads KV head kv
        q_p = qg.permute(1, 0, 2, 3).reshape(1, hkv, b * g, d)  # every sequence's rows of a KV head: one matrix
        o_p, lse_p = flash_with_lse(q_p, k_p, v_p, scale)
        o_s, lse_s = flash_with_lse(qg, k_s, v_s, scale)
        o_p = o_p.reshape(hkv, b, g, d).permute(1, 0, 2, 3)
        lse_p = lse_p.reshape(hkv, b, g).permute(1, 0, 2)
        m = torch.maximum(lse_p, lse_s)
        w_p, w_s = torch.exp(lse_p - m), torch.exp(lse_s - m)
        out = (o_p.float() * w_p[..., None] + o_s.float() * w_s[..., None]) / (w_p + w_s)[..., None]
        return out.to(q.dtype).reshape(b, 1, hq, d)

    return step


def _fill_pages(pages, tokens, page_size: int) -> None:
    """Write tokens `[..., L, Hkv, D]` into pages `[..., n, page_size, Hkv, D]` (a view into a cache), in order."""
    full, rest = divmod(tokens.shape[-3], page_size)
    if full:
        pages[..., :full, :, :, :] = tokens[..., : full * page_size, :, :].reshape(
            *tokens.shape[:-3], full, page_size, *tokens.shape[-2:])
    if rest:
        pages[..., full, :rest, :, :] = tokens[..., full * page_size:, :, :]


def paged_cache(prefix_k, prefix_v, suffix_k, suffix_v, page_size: int = PAGE_SIZE):
    """One paged KV cache `[pages, 2, page_size, Hkv, D]` (NHD) from prefix `[P, Hkv, D]` and suffixes
    `[B, S, Hkv, D]`: the prefix's pages first, then each sequence's suffix pages. Returns (cache, prefix pages,
    pages per sequence)."""
    import torch

    p, hkv, d = prefix_k.shape
    b, s = suffix_k.shape[:2]
    n_p, n_s = math.ceil(p / page_size), math.ceil(s / page_size)
    cache = torch.zeros((n_p + b * n_s, 2, page_size, hkv, d), dtype=prefix_k.dtype, device=prefix_k.device)
    for i, (pre, suf) in enumerate(((prefix_k, suffix_k), (prefix_v, suffix_v))):
        _fill_pages(cache[:n_p, i], pre, page_size)
        _fill_pages(cache[n_p:, i].view(b, n_s, page_size, hkv, d), suf, page_size)
    return cache, n_p, n_s


def flashinfer_step(prefix_k, prefix_v, suffix_k, suffix_v, q_heads: int) -> Callable:
    """`step(q [B, 1, Hq, D]) -> out [B, 1, Hq, D]` with FlashInfer's two-level cascade; planned here, once."""
    import flashinfer
    import torch

    p, hkv, d = prefix_k.shape
    b, s = suffix_k.shape[:2]
    dev = prefix_k.device
    cache, n_p, n_s = paged_cache(prefix_k, prefix_v, suffix_k, suffix_v)
    i32 = dict(dtype=torch.int32, device=dev)
    workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=dev)
    wrapper = flashinfer.MultiLevelCascadeAttentionWrapper(2, workspace, "NHD")
    wrapper.plan(
        [torch.tensor([0, b], **i32), torch.arange(b + 1, **i32)],  # level 0: one request of B queries; 1: each
        [torch.tensor([0, n_p], **i32), torch.arange(b + 1, **i32) * n_s],
        [torch.arange(n_p, **i32), n_p + torch.arange(b * n_s, **i32)],
        [torch.tensor([p - (n_p - 1) * PAGE_SIZE], **i32), torch.full((b,), s - (n_s - 1) * PAGE_SIZE, **i32)],
        q_heads, hkv, d, PAGE_SIZE, causal=False, q_data_type=prefix_k.dtype)

    def step(q):
        return wrapper.run(q.reshape(b, q_heads, d), cache).reshape(b, 1, q_heads, d)

    step.keep = (workspace, wrapper, cache)  # alive as long as the step
    return step


def _event_times(fn: Callable[[], object], timing_kw: dict) -> tuple[list[float], int]:
    """Seconds per call of fn() measured with CUDA events: `repeats` repeats of `inner` back-to-back calls (inner
    calibrated so that a repeat lasts >= min_repeat_s, at most max_inner)."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def timed(calls: int) -> float:
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / calls

    single = timed(1)
    inner = timing.calls_per_repeat(single, timing_kw.get("min_repeat_s", 0), timing_kw.get("max_inner", 1))
    return [timed(inner) for _ in range(timing_kw["repeats"])], inner


def _capture(call: Callable, q):
    """A CUDA graph of call(q) and its (static) output."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graphs asks
        for _ in range(2):
            call(q)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):  # JAX's threads stay free to call CUDA
        out = call(q)
    torch.cuda.synchronize()
    return graph, out


def time_chain(step: Callable | Sequence[Callable], q, steps_per_call: int, timing_kw: dict) -> tuple[dict, object]:
    """Time `steps_per_call` chained steps from q (eager, then as a CUDA graph where it can be captured); `step` a
    list: step i of the chain is `step[i % len(step)]` (each over its own copy of the caches: `measure`'s copies).

    Returns (results, output of the chain as a torch tensor). results: `step_s` (the faster way, per step),
    `step_s_eager`, `step_s_graph` (None if the capture failed, with `graph_error`), `cuda_graph` (which one is
    `step_s`), `median_s`/`min_s`/`max_s`/`repeats`/`inner` of that way (per call), `compile_s` (the first call:
    any JIT compilation and set-up), `timer`."""
    import torch

    fns = list(step) if isinstance(step, (list, tuple)) else [step]

    def call(x):
        for i in range(steps_per_call):
            x = fns[i % len(fns)](x)
        return x

    begin = time.perf_counter()
    out = call(q)
    torch.cuda.synchronize()
    first_s = time.perf_counter() - begin
    for _ in range(timing_kw["warmup"]):
        out = call(q)
    eager, eager_inner = _event_times(lambda: call(q), timing_kw)
    runs = {"eager": (eager, eager_inner, out)}
    graph_error = None
    try:
        graph, static_out = _capture(call, q)
        graph_times, graph_inner = _event_times(graph.replay, timing_kw)
        runs["graph"] = (graph_times, graph_inner, static_out.clone())
    except Exception as error:  # noqa: BLE001 - the eager timing stands; the reason is recorded
        graph_error = f"{type(error).__name__}: {str(error)[:300]}"
        torch.cuda.synchronize()
    best = min(runs, key=lambda k: statistics.median(runs[k][0]))
    times, inner, output = runs[best]
    per_step = {k: statistics.median(v[0]) / steps_per_call for k, v in runs.items()}
    results = {"compile_s": first_s, "median_s": statistics.median(times), "min_s": min(times),
               "max_s": max(times), "repeats": len(times), "inner": inner, "steps_per_call": steps_per_call,
               "step_s": per_step[best], "step_s_eager": per_step["eager"], "step_s_graph": per_step.get("graph"),
               "cuda_graph": best == "graph", "timer": "cuda_events"}
    if graph_error is not None:
        results["graph_error"] = graph_error
    return results, output


def measure(name: str, inputs: dict, steps_per_call: int, timing_kw: dict,
            copies: int = 1) -> tuple[dict, jax.Array]:
    """Time anchor `name` on the bench's inputs (q, prefix_k/v, suffix_k/v of which the first `s` tokens are
    valid; see bench_attention.make_inputs); `copies` > 1: the chain's steps read that many copies of the KV in
    turn (as `timing.chain_steps`' copies: data smaller than L2 is not served from it step to step).
    Returns (results, the chain's output as a JAX array, for the comparison with the reference)."""
    import torch

    reason = skip_reason(name)
    if reason is not None:
        raise RuntimeError(f"{name} cannot run here: {reason}")
    s = inputs["s"]  # the suffix caches hold `out` tokens: the anchors read arrays of the s valid ones
    exact = {"suffix_k": inputs["suffix_k"][:, :s], "suffix_v": inputs["suffix_v"][:, :s]}
    t = {k: _torch(exact.get(k, inputs[k])) for k in ("q", "prefix_k", "prefix_v", "suffix_k", "suffix_v")}
    del exact
    versions = {"torch_version": torch.__version__}
    kv = ("prefix_k", "prefix_v", "suffix_k", "suffix_v")
    sets = [tuple(t[k] for k in kv)] + [tuple(t[k].clone() for k in kv) for _ in range(copies - 1)]
    if name == "torch_hydragen":
        step = [torch_hydragen_step(*kv_set) for kv_set in sets]
    else:
        import flashinfer

        step = [flashinfer_step(*kv_set, t["q"].shape[2]) for kv_set in sets]
        versions["flashinfer_version"] = getattr(flashinfer, "__version__", None)
    del sets
    torch.cuda.synchronize()
    results, out = time_chain(step, t["q"], steps_per_call, timing_kw)
    output = jnp.asarray(np.asarray(out.float().cpu()))
    del step, t
    torch.cuda.empty_cache()
    return {**results, **versions, "l2_copies": copies}, output
