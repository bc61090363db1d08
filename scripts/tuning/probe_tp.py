"""What a tensor-parallel decode step pays for its all-reduces, and which XLA / NCCL settings lower it (issue 16).

Two measurements per setting, each in a fresh process (XLA_FLAGS and NCCL_* are read once per process):
  * `allreduce`: a chain of 64 psums of [B, d] bf16 inside one compiled `fori_loop` (no host dispatch between
    them): the latency and bandwidth an all-reduce has inside a decode step.
  * `stack`: a 7B-shaped layer stack without attention, Megatron-style over the mesh axis "model": per layer
    q/k/v and gate/up column-parallel, o and down row-parallel with one psum each, weights as per-layer arrays and
    a Python loop over the 32 layers (as `models.llama`), `--steps` steps chained in a `fori_loop`. Variants:
    tp = 1; tp = n; tp = n without the psums (the compute alone); tp = n with the batch in two halves whose
    layers interleave (one half's all-reduce can run under the other half's GEMMs if XLA schedules it so).

Usage (two GPUs; NCCL_NVLS_ENABLE=0 stays set):
  python -m scripts.tuning.probe_tp [--settings base,oneshot,lhs,...] [--batches 64,512] [--out FILE.jsonl]
On one GPU, the GEMM settings against the default (tp = 1 throughout; the step's GEMMs at M = B):
  python -m scripts.tuning.probe_tp --tp 1 --settings base,exhaustive,tritonany,tritonany_exhaustive,warpspec,cublaslt,notriton --batches 8,64,512
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from scripts import cli

SETTINGS = {  # name -> (extra XLA flags, extra environment)
    "base": ("", {}),
    "oneshot": ("--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true", {}),
    "lhs": ("--xla_gpu_enable_latency_hiding_scheduler=true", {}),
    "oneshot_lhs": ("--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true "
                    "--xla_gpu_enable_latency_hiding_scheduler=true", {}),
    "userbuf": ("--xla_gpu_enable_nccl_user_buffers=true", {}),
    "ll128": ("", {"NCCL_PROTO": "LL128"}),
    "ll": ("", {"NCCL_PROTO": "LL"}),
    "sync": ("--xla_gpu_disable_async_collectives=ALLREDUCE", {}),
    "lhs_nocombine": ("--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_all_reduce_combine_threshold_bytes=0",
                      {}),
    "oneshot_lhs_nocombine": ("--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true "
                              "--xla_gpu_enable_latency_hiding_scheduler=true "
                              "--xla_gpu_all_reduce_combine_threshold_bytes=0", {}),
    "channels32": ("", {"NCCL_MIN_NCHANNELS": "32"}),
    # GEMM settings (run with --tp 1: the layer stack is then the 7B decode step's GEMMs without attention)
    "exhaustive": ("--xla_gpu_exhaustive_tiling_search=true", {}),
    "tritonany": ("--xla_gpu_triton_gemm_any=true", {}),  # the autotuner may pick Triton for every GEMM
    "tritonany_exhaustive": ("--xla_gpu_triton_gemm_any=true --xla_gpu_exhaustive_tiling_search=true", {}),
    "warpspec": ("--xla_gpu_triton_gemm_any=true --xla_gpu_experimental_enable_triton_warp_specialization=true", {}),
    "cublaslt": ("--xla_gpu_enable_cublaslt=true", {}),
    "notriton": ("--xla_gpu_enable_triton_gemm=false", {}),
}

D, F, LAYERS = 4096, 11008, 32


def child(args):
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from jax import lax  # noqa: PLC0415
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: PLC0415

  global D, F, LAYERS
  if args.small:  # a CPU check that the script runs
    D, F, LAYERS = 256, 512, 2
  n = args.tp
  mesh = Mesh(np.array(jax.devices()[:n]), ("model",))
  out = []

  def timed(fn, *a, repeats=5):
    jax.block_until_ready(fn(*a))
    jax.block_until_ready(fn(*a))
    times = []
    for _ in range(repeats):
      t = time.perf_counter()
      jax.block_until_ready(fn(*a))
      times.append(time.perf_counter() - t)
    return min(times), statistics.median(times)

  # -- all-reduces chained in one loop
  chain = 64
  for b in args.batches:
    def body(x):
      def step(_, x):
        return lax.psum(x * jnp.bfloat16(0.5), "model")
      return lax.fori_loop(0, chain, step, x)
    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False))
    x = jax.device_put(jnp.ones((b, D), jnp.bfloat16), NamedSharding(mesh, P()))
    best, med = timed(f, x)
    nbytes = b * D * 2
    out.append({"what": "allreduce", "batch": b, "bytes": nbytes, "us_each": best / chain * 1e6,
                "median_us_each": med / chain * 1e6,
                "bus_GBps": 2 * (n - 1) / n * nbytes / (best / chain) / 1e9})
    print(json.dumps(out[-1]), flush=True)

  # -- the layer stack
  specs = {"qkv": P(None, "model"), "o": P("model", None), "gu": P(None, "model"), "down": P("model", None)}
  shapes = {"qkv": (D, 3 * D), "o": (D, D), "gu": (D, 2 * F), "down": (F, D)}

  makers = {k: jax.jit(lambda kk, s=shapes[k]: (0.02 * jax.random.normal(kk, s)).astype(jnp.bfloat16),
                       out_shardings=NamedSharding(mesh, specs[k])) for k in shapes}  # compiled once per shape

  def init(i):
    keys = jax.random.split(jax.random.key(i), 4)
    return {k: makers[k](kk) for k, kk in zip(shapes, keys)}

  layers = [init(i) for i in range(LAYERS)]
  wspec = [specs] * LAYERS

  def norm(x):
    xf = x.astype(jnp.float32)
    return (xf * lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + 1e-6)).astype(x.dtype)

  def layer(x, w, reduce):
    dn = w["o"].shape[0]
    h = norm(x) @ w["qkv"]
    a = h[:, :dn] + h[:, dn:2 * dn] + h[:, 2 * dn:]  # stands in for attention: q, k and v all used
    x = x + reduce(a @ w["o"])
    g = norm(x) @ w["gu"]
    fn = g.shape[1] // 2
    return x + reduce((jax.nn.silu(g[:, :fn]) * g[:, fn:]) @ w["down"])

  def make(reduce, halves):
    def body(x, ws):
      def step(_, x):
        parts = jnp.split(x, halves) if halves > 1 else [x]
        for w in ws:
          parts = [layer(p, w, reduce) for p in parts]
        return norm(jnp.concatenate(parts) if halves > 1 else parts[0])
      return lax.fori_loop(0, args.steps, step, x)
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), wspec), out_specs=P(), check_vma=False))

  variants = [("psum", lambda v: lax.psum(v, "model"), 1)]
  if n > 1:
    variants += [("psum_halves", lambda v: lax.psum(v, "model"), 2)]
    if args.nopsum:
      variants += [("nopsum", lambda v: v, 1)]
  for b in args.batches:
    x = jax.device_put(jax.random.normal(jax.random.key(1), (b, D), jnp.bfloat16), NamedSharding(mesh, P()))
    for name, reduce, halves in variants:
      f = make(reduce, halves)
      t0 = time.perf_counter()
      f = f.lower(x, layers).compile()
      compile_s = time.perf_counter() - t0
      best, med = timed(f, x, layers)
      hlo = f.as_text()
      out.append({"what": "stack", "variant": name, "tp": n, "batch": b, "step_ms": best / args.steps * 1e3,
                  "median_step_ms": med / args.steps * 1e3, "compile_s": compile_s,
                  "all_reduce_ops": hlo.count("all-reduce-start(") + hlo.count(" all-reduce("),
                  "one_shot_in_hlo": "one_shot" in hlo.lower() or "oneshot" in hlo.lower()})
      print(json.dumps(out[-1]), flush=True)
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--settings", default="base,oneshot,lhs,oneshot_lhs,ll128")
  parser.add_argument("--batches", default="64,512")
  parser.add_argument("--tp", type=int, default=2)
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--out", default=None)
  parser.add_argument("--child", action="store_true")
  parser.add_argument("--small", action="store_true", help="tiny shapes (a CPU check)")
  parser.add_argument("--nopsum", action="store_true", help="also time tp = n without the psums (compute alone)")
  args = parser.parse_args()
  args.batches = cli.listed(parser, "--batches", args.batches, int, low=1)
  settings = cli.listed(parser, "--settings", args.settings, choices=SETTINGS)
  cli.at_least(parser, args, tp=1, steps=1)
  if args.child:
    child(args)
    return
  runs = [("tp1", 1)] + [(s, args.tp) for s in settings]
  out = open(args.out, "w") if args.out else None
  for name, tp in runs:
    flags, env = SETTINGS.get(name, ("", {}))
    e = dict(os.environ, NCCL_NVLS_ENABLE="0", **env)
    e["XLA_FLAGS"] = (e.get("XLA_FLAGS", "") + " " + flags).strip()
    cmd = [sys.executable, "-m", "scripts.tuning.probe_tp", "--child", "--tp", str(tp), "--steps", str(args.steps),
           "--batches", ",".join(map(str, args.batches))] + (["--small"] if args.small else []) + (
               ["--nopsum"] if args.nopsum and name == "base" else [])
    t = time.perf_counter()
    p = subprocess.run(cmd, env=e, capture_output=True, text=True)
    print(f"== {name} (tp={tp}, XLA_FLAGS={flags!r}, env={env}) rc={p.returncode} {time.perf_counter() - t:.0f} s",
          flush=True)
    for line in p.stdout.splitlines():
      if line.startswith("{"):
        row = dict(json.loads(line), setting=name)
        print("  ", json.dumps(row), flush=True)
        if out:
          out.write(json.dumps(row) + "\n")
          out.flush()
    if p.returncode:
      print(p.stderr[-3000:], flush=True)


if __name__ == "__main__":
  main()
