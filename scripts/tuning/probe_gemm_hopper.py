"""Probe: the decode GEMMs of a 7B-shaped layer on a Mosaic GPU kernel written for them, against XLA's (cuBLAS).

  python -m scripts.tuning.probe_gemm_hopper --rows 8,64 --configs 128x128x6,64x128x12   # on an H100 / H200

The kernel (`matmul`, measured slower than XLA's GEMMs on the H200, 2026-12-02: experiments/PERF_NOTES.md, so the
models do not use it): x `[M, K]` @ w `[K, N]` for a few rows (M ≤ 64), bound by reading w once.

* The work is cut into units: a block of `block_n` columns times a range of K tiles (`block_k` rows of w each); K is
  split (`plan`) until the units fill the CTAs in whole waves (at least `min_balance` of the slots busy).
* One CTA a SM, persistent: CTA c takes units c, c + C, c + 2C, ... and runs their tiles as one stream through a
  ring of `stages` TMA copies (w's tile and x's matching `[Mp, block_k]` slice), so the copies run on across units.
* Each tile: acc `[block_n, Mp]` += w_tileᵀ @ x_tileᵀ, w's columns on the wgmma's M side (a transposed A operand),
  the rows of x on its N side (Mp = M rounded up to 8: no padding to the 64 rows of an M side).
* A unit's float32 sum goes out transposed, `[split, N, Mp]`; XLA adds the splits, transposes and casts.

The probe: eight layers of distinct weights (q/k/v packed 4096 × 12288, o 4096 × 4096, gate/up packed 4096 ×
22016, down 11008 × 4096; 3.2 GB, far beyond L2), bf16. Timed, compiled, warmed up, median of repeats: each GEMM
kind alone over the layers (one call returns every layer's product: the host's dispatch is in the time, the same
for every backend), and the 4 GEMMs of each layer chained (each product's first columns feed the next) as a decode
step runs them; µs a layer and the fraction of the weight-read floor at the bandwidth given (--bandwidth, TB/s; the
e2e runs measure 4.56-4.59 on the H200). Configs: block_n x block_k x stages. Every product is checked against XLA's
(bf16 rounding).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from experiments.timing import time_fn
from hydragen_jax.kernels import hopper, ops
from scripts import cli

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class HopperGemmConfig:
  """block_n: columns of w a unit (a multiple of 64); block_k: rows of w a tile (a multiple of 64); stages: tiles in
  flight a CTA (fewer where shared memory holds fewer: `stages_that_fit`); min_balance: the least share of the
  CTAs' unit slots that the split of K must keep busy (the last wave). The CTAs: `matmul`'s num_ctas."""
  block_n: int = 128
  block_k: int = 128
  stages: int = 6
  min_balance: float = 0.9


def plan(n: int, k: int, config: HopperGemmConfig, num_ctas: int) -> tuple[int, int]:
  """(splits, K tiles a split) for w `[K, N]`: the fewest splits whose units (N / block_n column blocks × splits)
  fill at least `config.min_balance` of the `num_ctas` CTAs' slots (every CTA busy but in the last wave), no split
  empty."""
  tiles, blocks = k // config.block_k, n // config.block_n
  for want in range(1, tiles + 1):
    per_split = -(-tiles // want)
    splits = -(-tiles // per_split)
    units = blocks * splits
    if units >= num_ctas and units / (num_ctas * -(-units // num_ctas)) >= config.min_balance:
      return splits, per_split
  return tiles, 1


def _kernel(x_ref, w_ref, out_ref, x_smem, w_smem, o_smem, bars, *, splits: int, per_split: int, num_ctas: int):
  """CTA c: units c, c + num_ctas, ... (unit u: column block u // splits, split u % splits)."""
  stages, block_k, block_n = w_smem.shape
  mp = x_smem.shape[1]
  k_tiles = w_ref.shape[0] // block_k
  units = w_ref.shape[1] // block_n * splits
  cta = lax.axis_index("cta")
  mine = (units - cta + num_ctas - 1) // num_ctas

  def unit_of(i):  # the CTA's unit i: (column block, split, first K tile, K tiles)
    u = cta + i * num_ctas
    first = u % splits * per_split
    return u // splits, u % splits, first, jnp.minimum(per_split, k_tiles - first)

  def load(state, slot):  # the stream's next tile (unit lu, tile lt, if the CTA has it) into the slot; next state
    lu, lt = state
    block, _, first, count = unit_of(lu)

    @pl.when(lu < mine)
    def _():
      ks = pl.ds((first + lt) * block_k, block_k)
      plgpu.copy_gmem_to_smem(x_ref.at[:, ks], x_smem.at[slot], bars.at[slot])
      plgpu.copy_gmem_to_smem(w_ref.at[ks, pl.ds(block * block_n, block_n)], w_smem.at[slot], bars.at[slot])
    last = lt + 1 == count
    return jnp.where(last, lu + 1, lu), jnp.where(last, 0, lt + 1)

  state = (jnp.int32(0), jnp.int32(0))
  for slot in range(stages):  # the first `stages` tiles of the stream in flight
    state = load(state, slot)

  def product(w_tile, x_tile, acc_ref):
    plgpu.wgmma(acc_ref, w_tile, x_tile)
    return acc_ref[...]

  def tile(j, carry):  # stream tile t: acc += w_tileᵀ @ x_tileᵀ, then its slot takes tile t + stages
    del j
    t, state, acc = carry
    slot = lax.rem(t, stages)
    plgpu.barrier_wait(bars.at[slot])
    acc = acc + pl.run_scoped(functools.partial(product, w_smem.at[slot].transpose((1, 0)),
                                                x_smem.at[slot].transpose((1, 0))),
                              plgpu.ACC((block_n, mp), jnp.float32))
    return t + 1, load(state, slot), acc

  def unit(i, carry):
    t, state = carry
    block, split, _, count = unit_of(i)
    zeros = plgpu.layout_cast(jnp.zeros((block_n, mp), jnp.float32), plgpu.Layout.WGMMA)
    t, state, acc = lax.fori_loop(0, count, tile, (t, state, zeros))
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous unit's sum has left o_smem
    o_smem[...] = acc
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, out_ref.at[split, pl.ds(block * block_n, block_n)])
    return t, state

  lax.fori_loop(0, mine, unit, (jnp.int32(0), state))
  plgpu.wait_smem_to_gmem(0)


def supported(x_shape: tuple[int, ...], w_shape: tuple[int, ...], dtype, config: HopperGemmConfig) -> str | None:
  """None if `matmul` takes x `[M, K]` @ w `[K, N]` of `dtype`, else why not."""
  (m, k), (k2, n) = x_shape, w_shape
  if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return f"dtype {jnp.dtype(dtype)}: the kernel takes 16-bit operands"
  if not 1 <= m <= 64:
    return f"{m} rows: the kernel is for decode steps (1 to 64 rows)"
  if k != k2 or k % config.block_k or n % config.block_n:
    return f"x {x_shape} @ w {w_shape}: K must match and be a multiple of {config.block_k}, N of {config.block_n}"
  return None


@functools.partial(jax.jit, static_argnames=("config", "num_ctas", "interpret"))
def matmul(x: Array, w: Array, *, config: HopperGemmConfig = HopperGemmConfig(), num_ctas: int,
           interpret: bool = False) -> Array:
  """x `[M, K]` @ w `[K, N]` (16-bit, as `supported` takes) in x's dtype, accumulated in float32; `num_ctas`
  persistent CTAs (one a SM)."""
  reason = supported(x.shape, w.shape, x.dtype, config)
  if reason:
    raise ValueError(reason)
  m, k = x.shape
  n = w.shape[1]
  mp = -(-m // 8) * 8
  xp = jnp.pad(x, ((0, mp - m), (0, 0)))
  splits, per_split = plan(n, k, config, num_ctas)
  num_ctas = min(num_ctas, n // config.block_n * splits)
  stages = stages_that_fit(m, config)
  tiled = dict(transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))
  scratch = (plgpu.SMEM((stages, mp, config.block_k), x.dtype, **tiled),
             plgpu.SMEM((stages, config.block_k, config.block_n), x.dtype, **tiled),
             plgpu.SMEM((config.block_n, mp), jnp.float32),
             plgpu.Barrier(num_arrivals=2, num_barriers=stages))  # x's and w's copies of a slot
  params = None
  if interpret:
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # noqa: PLC0415
    params = InterpretGPUParams()
  kernel = functools.partial(_kernel, splits=splits, per_split=per_split, num_ctas=num_ctas)
  partial = plgpu.kernel(
      lambda *refs: pl.run_scoped(lambda *s: kernel(*refs, *s), *scratch),
      out_type=jax.ShapeDtypeStruct((splits, n, mp), jnp.float32), grid=(num_ctas,), grid_names=("cta",),
      kernel_name="decode_gemm_hopper", interpret=params,
  )(xp, w)
  return partial.sum(axis=0)[:, :m].T.astype(x.dtype)


def stages_that_fit(m: int, config: HopperGemmConfig) -> int:
  """`config.stages`, or fewer where a CTA's shared memory holds fewer (x's slices grow with m)."""
  mp = -(-m // 8) * 8
  per_stage = -(-(mp + config.block_n) * config.block_k * 2 // 1024) * 1024
  fit = (hopper.SMEM_LIMIT - 1024 - -(-config.block_n * mp * 4 // 1024) * 1024) // (per_stage + 8)
  return max(1, min(config.stages, fit))


SHAPES = dict(qkv=(4096, 12288), o=(4096, 4096), gate_up=(4096, 22016), down=(11008, 4096))
TINY = dict(qkv=(128, 384), o=(128, 128), gate_up=(128, 512), down=(256, 128))  # --tiny: the plumbing on CPU


def parse_config(text: str) -> HopperGemmConfig:
  try:
    block_n, block_k, stages = (int(v) for v in text.split("x"))
  except ValueError:  # not three integers
    raise ValueError(f"expected BLOCK_NxBLOCK_KxSTAGES, e.g. 128x128x6; got {text!r}") from None
  return HopperGemmConfig(block_n=block_n, block_k=block_k, stages=stages)


def main(argv: list[str] | None = None) -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--rows", default="8,64")
  ap.add_argument("--configs", default="128x128x6")
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--repeats", type=int, default=20)
  ap.add_argument("--chain-only", action="store_true", help="time only the layers' chained GEMMs")
  ap.add_argument("--tiny", action="store_true", help="small shapes, 2 CTAs (with --interpret: on CPU)")
  ap.add_argument("--interpret", action="store_true", help="the kernel in Mosaic GPU's interpreter")
  ap.add_argument("--bandwidth", type=float, default=4.57, help="TB/s for the floor")
  args = ap.parse_args(argv)
  configs = cli.listed(ap, "--configs", args.configs, parse_config)
  rows = cli.listed(ap, "--rows", args.rows, int, low=1)
  cli.at_least(ap, args, layers=1, repeats=1)
  shapes = TINY if args.tiny else SHAPES
  cores = 2 if args.tiny else ops.num_cores()
  keys = iter(jax.random.split(jax.random.PRNGKey(0), 4 * args.layers + 8))
  weights = {name: [(jax.random.normal(next(keys), shape, jnp.float32) * 0.02).astype(jnp.bfloat16)
                    for _ in range(args.layers)] for name, shape in shapes.items()}
  backends = {"xla": lambda x, w: jnp.matmul(x, w)}
  for text, config in zip(args.configs.split(","), configs):
    backends[f"hopper{text}"] = lambda x, w, config=config: matmul(x, w, config=config, num_ctas=cores,
                                                                   interpret=args.interpret)
  print(f"[probe_gemm_hopper] {jax.devices()[0].device_kind}, {cores} SMs, {args.layers} layers, floor at "
        f"{args.bandwidth} TB/s")
  for m in rows:
    for kind, (k, n) in ({} if args.chain_only else shapes).items():
      x = jax.random.normal(next(keys), (m, k), jnp.float32).astype(jnp.bfloat16)
      floor_us = k * n * 2 / (args.bandwidth * 1e12) * 1e6
      want = np.asarray(jnp.matmul(x, weights[kind][0]), np.float32)
      line = []
      for name, mm in backends.items():
        got = np.asarray(jax.jit(mm)(x, weights[kind][0]), np.float32)
        err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-6)
        fn = jax.jit(lambda x, ws, mm=mm: [mm(x, w) for w in ws])
        us = time_fn(fn, (x, weights[kind]), repeats=args.repeats).median_s / args.layers * 1e6
        line.append(f"{name} {us:7.1f} us ({floor_us / us:.3f}; err {err:.1e})")
      print(f"M={m:3d} {kind:8s} floor {floor_us:6.1f} us | " + " | ".join(line))

    def layer_chain(x, mm):  # a layer's four products, each feeding the next (first columns), over every layer
      for i in range(args.layers):
        qkv = mm(x, weights["qkv"][i])
        o = mm(qkv[:, :shapes["o"][0]], weights["o"][i])
        gu = mm(o, weights["gate_up"][i])
        x = mm(gu[:, :shapes["down"][0]], weights["down"][i])
      return x

    x = jax.random.normal(next(keys), (m, shapes["qkv"][0]), jnp.float32).astype(jnp.bfloat16)
    floor_us = sum(k * n * 2 for k, n in shapes.values()) / (args.bandwidth * 1e12) * 1e6
    line = []
    for name, mm in backends.items():
      chain = jax.jit(lambda x, mm=mm: layer_chain(x, mm))
      us = time_fn(chain, (x,), repeats=args.repeats).median_s / args.layers * 1e6
      line.append(f"{name} {us:7.1f} us ({floor_us / us:.3f})")
    print(f"M={m:3d} {'layer':8s} floor {floor_us:6.1f} us | " + " | ".join(line))


if __name__ == "__main__":
  main()
