"""Probe (development tool): a decode layer's GEMMs with the weights stored `[K, N]` (the models' layout, `x @ w`)
against `[N, K]` (each output's weights contiguous along K, as checkpoints store them: `x @ w.T`), at a few row
counts.

Issue 12 leaves `none` at B = 8 below 0.80 of its step floor because the GEMMs read the weights at ~3.4 TB/s
(XLA's) against the floor's ~4.5: the weights' layout decides the order in which cuBLAS (and the decode kernel)
stream them, and a skinny GEMM may stream `[N, K]` better. Each variant runs `--layers` layers of the GEMMs of a
7B-shaped layer (q/k/v fused, o, gate/up fused, down; separate arrays per layer, a Python loop, as the models), the
layers chained through a residual so nothing is hoisted, `--steps` steps in one call; the output is µs a layer,
the weights' bytes over that time, and the fraction of the device's measured bandwidth. The two layouts' products
are checked against each other.

  python -m scripts.tuning.probe_weight_layout [--rows 1,8,16,64] [--layers 8] [--steps 16]   # on the GPU
  python -m scripts.tuning.probe_weight_layout --tiny                                            # anywhere: plumbing
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from experiments import device_rates, timing
from models import gemm

SHAPE_7B = dict(hidden=4096, q=4096, kv=4096, intermediate=11008)
SHAPE_TINY = dict(hidden=64, q=64, kv=32, intermediate=96)
TIMING = dict(warmup=2, repeats=5)


def layer_weights(shape: dict, layers: int, dtype, transposed: bool, seed: int = 0) -> list[dict]:
  """Per layer: qkv `[d, q + 2·kv]`, o `[q, d]`, gate_up `[d, 2·I]`, down `[I, d]` (transposed: each `[N, K]`)."""
  d, qn, kv, inter = shape["hidden"], shape["q"], shape["kv"], shape["intermediate"]
  sizes = dict(qkv=(d, qn + 2 * kv), o=(qn, d), gate_up=(d, 2 * inter), down=(inter, d))
  keys = iter(jax.random.split(jax.random.key(seed), layers * len(sizes)))
  out = []
  for _ in range(layers):
    ws = {name: (jax.random.normal(next(keys), (k, n)) * k**-0.5).astype(dtype) for name, (k, n) in sizes.items()}
    out.append({name: w.T for name, w in ws.items()} if transposed else ws)  # a new array, laid out [N, K]
  return out


def matmul(x, w, transposed: bool):
  """x `[M, K]` @ w: w `[K, N]`, or `[N, K]` contracted on its second axis."""
  dims = (((1,), (1,)), ((), ())) if transposed else (((1,), (0,)), ((), ()))
  return jax.lax.dot_general(x, w, dims, precision=gemm.matmul_precision(x.dtype)).astype(x.dtype)


def layers_step(shape: dict, transposed: bool):
  """One step: x `[M, d]` through every layer's GEMMs (a residual carries the layers; SiLU-gated MLP)."""
  qn, inter = shape["q"], shape["intermediate"]

  def step(x, layers):
    for w in layers:
      qkv = matmul(x, w["qkv"], transposed)
      x = x + matmul(qkv[:, :qn], w["o"], transposed)
      gu = matmul(x, w["gate_up"], transposed)
      x = x + matmul(jax.nn.silu(gu[:, :inter]) * gu[:, inter:], w["down"], transposed)
    return x

  return step


def layer_bytes(shape: dict, itemsize: int) -> int:
  d, qn, kv, inter = shape["hidden"], shape["q"], shape["kv"], shape["intermediate"]
  return (d * (qn + 2 * kv) + qn * d + d * 2 * inter + inter * d) * itemsize


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rows", default="1,8,16,64")
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--steps", type=int, default=16)
  parser.add_argument("--tiny", action="store_true", help="small shapes, 2 layers (any machine: the plumbing)")
  parser.add_argument("--out", default=None, help="JSON-lines file, a row per (rows, layout)")
  args = parser.parse_args(argv)
  shape, layers = (SHAPE_TINY, 2) if args.tiny else (SHAPE_7B, args.layers)
  dtype = jnp.bfloat16
  bandwidth = None
  if not args.tiny:
    rates = device_rates.bandwidth(1 << 31, TIMING)
    bandwidth = rates["bandwidth_bytes_per_s"]
    print(f"{jax.devices()[0].device_kind}: bandwidth {bandwidth / 1e12:.3f} TB/s", flush=True)
  weights = {t: layer_weights(shape, layers, dtype, t) for t in (False, True)}
  rows_out = []
  for m in map(int, args.rows.split(",")):
    x = jax.random.normal(jax.random.key(m), (m, shape["hidden"]), dtype)
    outs = {}
    for transposed in (False, True):
      step = layers_step(shape, transposed)
      result = timing.time_fn(timing.chain_steps(step, args.steps), (x, weights[transposed]), **TIMING)
      per_layer = result.median_s / args.steps / layers
      outs[transposed] = np.asarray(jax.jit(step)(x, weights[transposed]), np.float32)
      tbs = layer_bytes(shape, jnp.dtype(dtype).itemsize) / per_layer / 1e12
      row = dict(rows=m, layout="[N, K]" if transposed else "[K, N]", us_per_layer=per_layer * 1e6, tb_per_s=tbs,
                 fraction=None if bandwidth is None else tbs * 1e12 / bandwidth)
      rows_out.append(row)
      frac = "" if bandwidth is None else f" ({row['fraction']:.2f} of the bandwidth)"
      print(f"rows {m:4d} weights {row['layout']}: {row['us_per_layer']:8.1f} us a layer, {tbs:.2f} TB/s{frac}",
            flush=True)
    err = float(np.max(np.abs(outs[False] - outs[True])) / (np.max(np.abs(outs[False])) + 1e-30))
    if err > 0.05:
      raise SystemExit(f"rows {m}: the two layouts' outputs differ by {err:.3g} (relative): not the same product")
  if args.out:
    with open(args.out, "w") as f:
      for row in rows_out:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
