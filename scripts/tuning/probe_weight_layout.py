"""Probe (development tool): a decode layer's GEMMs with the weights stored three ways, at a few row counts:
  - `fused`: `[K, N]` (`x @ w`), q/k/v in one array and gate/up in one: one GEMM each (the models' layout since
    2026-12-01, `models.llama.pack_layer`);
  - `fused_nk`: `[N, K]` (each output's weights contiguous along K, as checkpoints store them: `x @ w.T`), fused the
    same way;
  - `separate`: `[K, N]` with q, k, v, gate and up each their own array, as the models stored them until
    2026-12-01: seven GEMMs a layer instead of four.

Issue 12 leaves `none` below 0.80 of its step floor: at B = 8 the GEMMs read the weights at ~3.4 TB/s against the
floor's ~4.5 (the layout decides the order in which cuBLAS and the decode kernel stream them: `[N, K]` measured
slower, 2026-12-01), and at B = 256 (the long document) at ~0.6 of the matmul rate, where q, k and v each (N = 4096)
give cuBLAS 64 output tiles of 128 × 128 at 256 rows for 132 SMs, gate and up each (N = 11008) 172; fused (N = 12288
and 22016) 192 and 344: whether that pays is what `separate` against `fused` measures (it did, at every row
count from 8 to 512 on an H200: experiments/PERF_NOTES.md, 2026-12-01). The steps compile with the
models' XLA options (`models.COMPILER_OPTIONS`: no dot merger, which would otherwise join the separate GEMMs).
Each variant runs `--layers` layers of the GEMMs of a 7B-shaped layer (separate arrays per layer, a Python loop, as
the models), q, k and v all feeding the o projection (an elementwise stand-in for attention, so none is dead code)
and the layers chained through a residual so nothing is hoisted, `--steps` steps in one call; the output is µs a
layer, the weights' bytes over that time and the fraction of the device's measured bandwidth, and the FLOP rate.
The layouts' products are checked against each other (the separate arrays are slices of the fused ones).

  python -m scripts.tuning.probe_weight_layout [--rows 1,8,16,64,256,512] [--layers 8] [--steps 16]  # on the GPU
  python -m scripts.tuning.probe_weight_layout --tiny                                                 # anywhere
"""

from __future__ import annotations

import argparse
import json
import re

import jax
import jax.numpy as jnp
import numpy as np

from experiments import device_rates, timing
from models import COMPILER_OPTIONS, gemm
from scripts import cli

SHAPE_7B = dict(hidden=4096, q=4096, kv=4096, intermediate=11008)
SHAPE_TINY = dict(hidden=64, q=64, kv=32, intermediate=96)
TIMING = dict(warmup=2, repeats=5)
LAYOUTS = ("fused", "fused_nk", "separate")  # [K, N] fused, [N, K] fused, [K, N] separate
# `fused` with some GEMMs split along K into a batched product (float32 partials added by XLA): "fused_sk<S>" splits
# the o and down projections (N = d: few output tiles at 128-512 rows) in S, "fused_sk<S>all" every GEMM.
SPLIT_K = ("fused_sk2", "fused_sk4", "fused_sk8", "fused_sk2all")


def split_of(layout: str) -> tuple[int, bool]:
  """(K splits, whether every GEMM is split) of a layout name; (1, False) for the unsplit ones."""
  m = re.fullmatch(r"fused_sk([2-9]|[1-9]\d+)(all)?", layout)  # 2 splits or more
  return (int(m.group(1)), bool(m.group(2))) if m else (1, False)


def layer_weights(shape: dict, layers: int, dtype, layout: str, seed: int = 0) -> list[dict]:
  """Per layer, by `layout` (`LAYOUTS`; the split layouts read "fused"): "fused": qkv `[d, q + 2·kv]`, o `[q, d]`, gate_up `[d, 2·I]`, down
  `[I, d]`; "fused_nk": each of those transposed, `[N, K]`; "separate": q, k, v, gate, up as their own `[K, N]`
  arrays, cut from the fused ones (the same seed gives the same weights in every layout)."""
  d, qn, kv, inter = shape["hidden"], shape["q"], shape["kv"], shape["intermediate"]
  sizes = dict(qkv=(d, qn + 2 * kv), o=(qn, d), gate_up=(d, 2 * inter), down=(inter, d))
  keys = iter(jax.random.split(jax.random.key(seed), layers * len(sizes)))
  out = []
  for _ in range(layers):
    ws = {name: (jax.random.normal(next(keys), (k, n)) * k**-0.5).astype(dtype) for name, (k, n) in sizes.items()}
    if layout == "fused_nk":
      ws = {name: w.T for name, w in ws.items()}  # a new array, laid out [N, K]
    elif layout == "separate":
      qkv, gate_up = ws.pop("qkv"), ws.pop("gate_up")
      ws.update(q=qkv[:, :qn], k=qkv[:, qn:qn + kv], v=qkv[:, qn + kv:], gate=gate_up[:, :inter],
                up=gate_up[:, inter:])  # each slice its own new array
    elif layout != "fused":
      raise ValueError(f"layout: {layout!r}, expected one of {LAYOUTS}")
    out.append(ws)
  return out


def split_k_matmul(x, w, splits: int):
  """x `[M, K]` @ w `[K, N]` as one batched product over `splits` equal chunks of K (`[splits, M, N]` float32
  partials), added in float32: `[M, N]` in x's dtype. More output tiles for the GPU where M and N give few (the o and
  down projections at a few hundred rows); both reshapes are free (x's chunks are strided views, w's contiguous).
  Measured slower than XLA's one product at 128-1024 rows on the H200 (2026-12-01, experiments/PERF_NOTES.md)."""
  m, k = x.shape
  if splits < 1 or k % splits:
    raise ValueError(f"split_k_matmul: splits={splits!r} must be a positive divisor of K = {k}")
  n = w.shape[1]
  parts = jax.lax.dot_general(x.reshape(m, splits, k // splits), w.reshape(splits, k // splits, n),
                          (((2,), (1,)), ((1,), (0,))), precision=gemm.matmul_precision(x.dtype),
                          preferred_element_type=jnp.float32)
  return parts.sum(axis=0).astype(x.dtype)


def matmul(x, w, transposed: bool = False, splits: int = 1):
  """x `[M, K]` @ w: w `[K, N]`, or `[N, K]` contracted on its second axis; `splits` > 1: K in that many chunks, one
  batched product with float32 partials, added (`[K, N]` only)."""
  if splits > 1:
    return split_k_matmul(x, w, splits)
  dims = (((1,), (1,)), ((), ())) if transposed else (((1,), (0,)), ((), ()))
  return jax.lax.dot_general(x, w, dims, precision=gemm.matmul_precision(x.dtype)).astype(x.dtype)


def mix(q, k, v):
  """The attention's stand-in: q `[M, q]`, k and v `[M, kv]` (q a multiple of kv, as GQA) -> `[M, q]`."""
  if q.shape[-1] % k.shape[-1]:
    raise ValueError(f"mix: q's width {q.shape[-1]} is not a multiple of k's {k.shape[-1]} (as GQA's heads are)")
  reps = q.shape[-1] // k.shape[-1]
  return q * jax.nn.sigmoid(jnp.tile(k, reps)) + jnp.tile(v, reps)


def layers_step(shape: dict, layout: str):
  """One step: x `[M, d]` through every layer's GEMMs (a residual carries the layers; SiLU-gated MLP)."""
  qn, kv, inter = shape["q"], shape["kv"], shape["intermediate"]
  t = layout == "fused_nk"
  splits, split_all = split_of(layout)
  s_in = splits if split_all else 1  # the GEMMs with many output tiles (qkv, gate_up)

  def step(x, layers):
    for w in layers:
      if layout == "separate":
        q, k, v = (matmul(x, w[n]) for n in ("q", "k", "v"))
        x = x + matmul(mix(q, k, v), w["o"])
        x = x + matmul(jax.nn.silu(matmul(x, w["gate"])) * matmul(x, w["up"]), w["down"])
      else:
        qkv = matmul(x, w["qkv"], t, s_in)
        x = x + matmul(mix(qkv[:, :qn], qkv[:, qn:qn + kv], qkv[:, qn + kv:]), w["o"], t, splits)
        gu = matmul(x, w["gate_up"], t, s_in)
        x = x + matmul(jax.nn.silu(gu[:, :inter]) * gu[:, inter:], w["down"], t, splits)
    return x

  return step


def layer_bytes(shape: dict, itemsize: int) -> int:
  d, qn, kv, inter = shape["hidden"], shape["q"], shape["kv"], shape["intermediate"]
  return (d * (qn + 2 * kv) + qn * d + d * 2 * inter + inter * d) * itemsize


def layer_flops(shape: dict, rows: int) -> int:
  return 2 * rows * layer_bytes(shape, 1)  # a multiply and an add per weight and row


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rows", default="1,8,16,64,256,512")
  parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated, of {LAYOUTS}")
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--steps", type=int, default=16)
  parser.add_argument("--tiny", action="store_true", help="small shapes, 2 layers (any machine: the plumbing)")
  parser.add_argument("--out", default=None, help="JSON-lines file, a row per (rows, layout)")
  args = parser.parse_args(argv)
  layouts = cli.listed(parser, "--layouts", args.layouts)
  rows = cli.listed(parser, "--rows", args.rows, int, low=1)
  cli.at_least(parser, args, layers=1, steps=1)
  if unknown := [l for l in layouts if l not in LAYOUTS and split_of(l)[0] == 1]:
    parser.error(f"--layouts: {unknown} not among {LAYOUTS} or fused_sk<S>[all] (e.g. {SPLIT_K})")
  shape, layers = (SHAPE_TINY, 2) if args.tiny else (SHAPE_7B, args.layers)
  dtype = jnp.bfloat16
  bandwidth = None
  if not args.tiny:
    rates = device_rates.bandwidth(1 << 31, TIMING)
    bandwidth = rates["bandwidth_bytes_per_s"]
    print(f"{jax.devices()[0].device_kind}: bandwidth {bandwidth / 1e12:.3f} TB/s", flush=True)
  stored_as = {l: l if split_of(l)[0] == 1 else "fused" for l in layouts}  # the split layouts read the fused weights
  stored = {s: layer_weights(shape, layers, dtype, s) for s in set(stored_as.values())}
  weights = {l: stored[stored_as[l]] for l in layouts}
  rows_out = []
  for m in rows:
    x = jax.random.normal(jax.random.key(m), (m, shape["hidden"]), dtype)
    outs = {}
    for layout in layouts:
      step = layers_step(shape, layout)
      chained = jax.jit(timing.chain_steps(step, args.steps)).lower(x, weights[layout])
      result = timing.time_compiled(chained.compile(COMPILER_OPTIONS), (x, weights[layout]), **TIMING)
      per_layer = result.median_s / args.steps / layers
      outs[layout] = np.asarray(jax.jit(step)(x, weights[layout]), np.float32)
      tbs = layer_bytes(shape, jnp.dtype(dtype).itemsize) / per_layer / 1e12
      tflops = layer_flops(shape, m) / per_layer / 1e12
      row = dict(rows=m, layout=layout, us_per_layer=per_layer * 1e6, tb_per_s=tbs, tflop_per_s=tflops,
                 fraction=None if bandwidth is None else tbs * 1e12 / bandwidth)
      rows_out.append(row)
      frac = "" if bandwidth is None else f" ({row['fraction']:.2f} of the bandwidth)"
      print(f"rows {m:4d} weights {layout:8s}: {row['us_per_layer']:8.1f} us a layer, {tbs:.2f} TB/s{frac}, "
            f"{tflops:.0f} TFLOP/s", flush=True)
    first = outs[layouts[0]]
    for layout in layouts[1:]:
      err = float(np.max(np.abs(first - outs[layout])) / (np.max(np.abs(first)) + 1e-30))
      if err > 0.05:
        raise SystemExit(f"rows {m}: {layout} and {layouts[0]} differ by {err:.3g} (relative): not the same product")
  if args.out:
    with open(args.out, "w") as f:
      for row in rows_out:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
