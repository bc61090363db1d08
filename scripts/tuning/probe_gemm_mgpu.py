"""Probe (development tool): JAX's own Hopper matmul (`jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu`: persistent,
warp-specialised, TMA and wgmma, tiles as a `TuningConfig`) against XLA's GEMM (cuBLAS) on a 7B decode layer's four
products at a few row counts.

Issue 12 leaves `none` at B = 256 at ~0.63 of its step floor. There the profile (PERF_NOTES.md, 2026-12-01) has the
down projection (K = 11008, N = 4096) at ~460 TFLOP/s on cuBLAS's 128 × 128 tiles: 64 output tiles for 132 SMs.
Tiles of 128 × 64 (or a 256-row CTA of two 128-row warpgroups over 64 columns) give 128 units, one wave. Each
product runs `--layers` times a call, each on its own weight array (as the models' per-layer weights), and the
output is µs a product (the call's median over `--layers`, one host dispatch a call included alike) and its FLOP
rate; every config's product is checked against XLA's. Measured on an H200 (2026-12-02, with an XLA baseline that
wrote float32 and converted after, slower than the models' own): no faster than that baseline at 128-512 rows
(experiments/PERF_NOTES.md); so not used by the models.

  python -m scripts.tuning.probe_gemm_mgpu [--rows 256,512] [--layers 16] [--products down,o,qkv,gate_up]  # GPU
  python -m scripts.tuning.probe_gemm_mgpu --tiny --interpret                                              # anywhere
"""

from __future__ import annotations

import argparse
import contextlib
import json

import jax
import jax.numpy as jnp
import numpy as np

from experiments import timing
from scripts import cli

# (K, N) of a 7B layer's packed products (`models.llama.pack_layer`), and tiny ones for the interpreted check.
PRODUCTS_7B = dict(qkv=(4096, 12288), o=(4096, 4096), gate_up=(4096, 22016), down=(11008, 4096))
PRODUCTS_TINY = dict(o=(128, 128), down=(192, 128))
# (tile_m, tile_n, wg_dimension, max_concurrent_steps): a CTA is two warpgroups' tiles side by side along
# wg_dimension, so its tile is (2·tile_m) × tile_n ("M") or tile_m × (2·tile_n) ("N").
CONFIGS = {
    "m64n64M": (64, 64, "M", 4),       # CTA 128 × 64
    "m128n64M": (128, 64, "M", 4),     # CTA 256 × 64
    "m64n128M": (64, 128, "M", 4),     # CTA 128 × 128
    "m128n128N": (128, 128, "N", 4),   # CTA 128 × 256
    "m128n64N": (128, 64, "N", 4),     # CTA 128 × 128
    "m128n64N6": (128, 64, "N", 6),    # CTA 128 × 128, 6 stages
}


def tuning_config(name: str):
  from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm
  tile_m, tile_n, wg, stages = CONFIGS[name]
  return hm.TuningConfig(tile_m=tile_m, tile_n=tile_n, tile_k=64, max_concurrent_steps=stages,
                         epi_tile_m=64, epi_tile_n=64, grid_minor_dim=hm.MatmulDimension.N, grid_tile_width=1,
                         wg_dimension=hm.MatmulDimension[wg])


def fits(name: str, rows: int, k: int, n: int) -> bool:
  """Whether the config's CTA tile divides the product (the kernel asks it; it does not pad)."""
  tile_m, tile_n, wg, _ = CONFIGS[name]
  cta_m, cta_n = (2 * tile_m, tile_n) if wg == "M" else (tile_m, 2 * tile_n)
  return rows % cta_m == 0 and n % cta_n == 0 and k % 64 == 0


class _Interpreted:
  """`hopper_matmul_mgpu`'s view of `plgpu` with every kernel interpreted (its `matmul` takes no interpret
  argument), on a pretend device of 4 SMs: installed by `interpreted()`."""

  def __init__(self, plgpu):
    self._plgpu = plgpu

  def __getattr__(self, name):
    return getattr(self._plgpu, name)

  def kernel(self, *args, **kwargs):
    return self._plgpu.kernel(*args, interpret=self._plgpu.InterpretGPUParams(), **kwargs)


@contextlib.contextmanager
def interpreted():
  """Within: `hopper_matmul_mgpu.matmul` runs in Pallas' Mosaic GPU interpreter (CPU)."""
  from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm
  saved = hm.plgpu, hm.get_num_sms
  hm.plgpu, hm.get_num_sms = _Interpreted(saved[0]), lambda: 4
  try:
    yield
  finally:
    hm.plgpu, hm.get_num_sms = saved


def matmul_fn(name: str):
  """x [M, K] @ w [K, N] by XLA ("xla") or by the Hopper matmul with config `name`."""
  if name == "xla":  # as the models' GEMMs (`models.gemm.linear`): bf16 out, f32 accumulation inside cuBLAS
    return jnp.dot
  from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm
  config = tuning_config(name)
  return lambda x, w: hm.matmul(x, w, None, config)


def run(rows_list, products: dict, layers: int, names, dtype, timed: bool) -> list[dict]:
  """One record a (product, rows, config): max_err against XLA's product, and with `timed` µs and TFLOP/s."""
  out = []
  for prod, (k, n) in products.items():
    ws = [(jax.random.normal(jax.random.key(i), (k, n)) / np.sqrt(k)).astype(dtype) for i in range(layers)]
    for rows in rows_list:
      x = jax.random.normal(jax.random.key(100 + rows), (rows, k), dtype)
      want = None
      for name in ["xla", *names]:
        if name != "xla" and not fits(name, rows, k, n):
          continue
        mm = matmul_fn(name)
        fn = jax.jit(lambda x, *ws, mm=mm: tuple(mm(x, w) for w in ws))
        rec = dict(product=prod, rows=rows, k=k, n=n, config=name)
        try:
          got = fn(x, *ws)
        except Exception as e:  # a config the kernel refuses (shared memory) is reported, not fatal
          rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
          print(json.dumps(rec), flush=True)
          out.append(rec)
          continue
        if want is None:
          want = np.asarray(got[0], np.float32)
        rec["max_err"] = float(np.max(np.abs(np.asarray(got[0], np.float32) - want)))
        if timed:
          t = timing.time_fn(fn, (x, *ws), warmup=2, repeats=7)
          us = t.median_s / layers * 1e6
          rec.update(us=round(us, 2), tflops=round(2 * rows * k * n / (us * 1e-6) / 1e12, 1))
        print(json.dumps(rec), flush=True)
        out.append(rec)
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rows", default="256,512")
  ap.add_argument("--layers", type=int, default=16)
  ap.add_argument("--products", default=",".join(PRODUCTS_7B))
  ap.add_argument("--configs", default=",".join(CONFIGS))
  ap.add_argument("--tiny", action="store_true", help="tiny products (the interpreted check)")
  ap.add_argument("--interpret", action="store_true")
  args = ap.parse_args(argv)
  table = PRODUCTS_TINY if args.tiny else PRODUCTS_7B
  products = {p: table[p] for p in cli.listed(ap, "--products", args.products, choices=PRODUCTS_7B) if p in table}
  rows = cli.listed(ap, "--rows", args.rows, int, low=1)
  names = cli.listed(ap, "--configs", args.configs, choices=CONFIGS)
  cli.at_least(ap, args, layers=1)
  if args.interpret:
    with interpreted():
      return run(rows, products, args.layers, names, jnp.bfloat16, timed=False)
  return run(rows, products, args.layers, names, jnp.bfloat16, timed=True)


if __name__ == "__main__":
  main()
