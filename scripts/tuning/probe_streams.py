"""Probe (development tool): can the prefix product and the suffix stream overlap on two CUDA streams, and how fast
is a Mosaic GPU (wgmma) prefix kernel on our shapes?

For the compute-heavy GQA configs, times at s = 1, out/2, out:
  auto          the current step (`ops.run(launch="auto")`)
  str_triton    Triton prefix (128x128 tile, alone) on `compute_on("gpu_stream:1")`, Triton suffix on stream 2
  str_light     the same with the light 64x64 prefix tile; strr_*: the suffix issued first; seq_*: one stream
  seq_mgpuf16   JAX's Mosaic GPU attention kernel (jax.experimental.pallas.ops.gpu.attention_mgpu, float16 only)
                on the prefix, then the Triton suffix, one stream; str_mgpuf16 / strr_mgpuf16: on two streams
and the prefix products alone (TFLOP/s). On the H100 with jaxlib 0.11.2 (experiments/PERF_NOTES.md): the Mosaic
kernel runs the B=1024 P=8K prefix at ~530 TFLOP/s but, in front of the suffix, gives 0.65 of the floor; every
two-stream variant fails in XLA with "No ExecutionStreamId found". Usage: python -m scripts.tuning.probe_streams
[--configs 6,8] [--variants ...]
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
from jax.experimental.compute_on import compute_on
from jax.experimental.xla_metadata import set_xla_metadata

from experiments import device_rates, floor, timing
from hydragen_jax import merge_states
from hydragen_jax.kernels.flash import BlockConfig
from scripts import cli
from scripts.quick_bench import D, SEED, prefix_plan, run_plans, suffix_plan, print_fraction, time_at_lengths
from scripts.tuning.sweep_kernels import floor_s, inputs

TIMING = dict(warmup=2, repeats=7, min_repeat_s=0.02, max_inner=50)


def on_stream(n, f):
  return compute_on(compute_type=f"gpu_stream:{n}", out_memory_spaces=jax.memory.Space.Device)(jax.jit(f))


def mgpu_prefix(q, pk, pv, dtype):
  """(out [B, 1, Hq, D], lse [B, 1, Hq]) of q over the prefix via JAX's Mosaic GPU kernel (scale folded in q)."""
  from jax.experimental.pallas.ops.gpu import attention_mgpu as am
  b, t, hq, d = q.shape
  cfg = am.TuningConfig(block_q=64, block_kv=128, max_concurrent_steps=2)
  qs = (q * d**-0.5).astype(dtype).reshape(1, b * t, hq, d)
  out, (lse2,) = am.attention(qs, pk.astype(dtype), pv.astype(dtype), cfg, save_residuals=True)
  lse = (lse2[0] * math.log(2.0)).T.reshape(b, t, hq)  # base 2 -> natural, [Hq, B*T] -> [B, T, Hq]
  return out.reshape(b, t, hq, d).astype(q.dtype), lse


def triton_prefix(q, pk, pv, blk=BlockConfig(128, 128, 2, 8, 3)):
  return run_plans(q, [prefix_plan(q, pk, pv, block=blk)], launch="separate")


def triton_suffix(q, sk, sv, lengths):
  return run_plans(q, [suffix_plan(q, sk, sv, lengths, shared_launch=False)], launch="separate")


def variant_fn(name):
  def fn(q, pk, pv, sk, sv, lengths):
    if name == "auto":
      parts = run_plans(q, [prefix_plan(q, pk, pv), suffix_plan(q, sk, sv, lengths)])
    else:
      kind, impl = name.split("_", 1)
      if impl == "triton":
        pre = triton_prefix
      elif impl == "light":
        pre = lambda q, pk, pv: triton_prefix(q, pk, pv, BlockConfig(64, 64, 4, 4, 3))
      elif impl == "mgpuf16":
        pre = lambda q, pk, pv: [mgpu_prefix(q, pk, pv, jnp.float16)]
      else:
        raise ValueError(f"unknown variant {name!r}")
      suf = triton_suffix
      if kind == "seq":
        parts = pre(q, pk, pv) + suf(q, sk, sv, lengths)
      else:  # two streams; str issues the prefix first, strr the suffix
        pre, suf = on_stream(1, pre), on_stream(2, suf)
        with set_xla_metadata(_scheduling_group_id="1"):
          if kind == "str":
            parts = pre(q, pk, pv) + suf(q, sk, sv, lengths)
          else:
            sparts = suf(q, sk, sv, lengths)
            parts = pre(q, pk, pv) + sparts
    out, _ = merge_states(parts)
    return out.astype(q.dtype)

  return fn


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--configs", default="6,8")
  parser.add_argument("--variants", default="auto,str_triton,str_light,strr_light,seq_mgpuf16,str_mgpuf16,strr_mgpuf16")
  args = parser.parse_args()
  configs = cli.seed_configs(parser, "--configs", args.configs, len(SEED))
  variants = cli.listed(parser, "--variants", args.variants)
  rates = device_rates.measure(1 << 31, 8192, TIMING)
  print(f"bandwidth {rates['bandwidth_bytes_per_s'] / 1e12:.3f} TB/s, matmul "
        f"{rates['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s", flush=True)
  for i in configs:
    cfg = SEED[i]
    b, p, out, hq, hkv = cfg
    q, pk, pv, sk, sv = inputs(i)
    flops = 4 * D * hq * b * p
    # The prefix alone, and the Mosaic kernel's error against the Triton kernel's.
    ref_out, ref_lse = merge_states(triton_prefix(q, pk, pv))
    try:
      t = timing.time_fn(lambda q, k, v: mgpu_prefix(q, k, v, jnp.float16), (q, pk, pv), **TIMING)
      o, l = t.output
      err = float(jnp.max(jnp.abs(o.astype(jnp.float32) - ref_out.astype(jnp.float32))))
      lerr = float(jnp.max(jnp.abs(l - ref_lse)))
      print(f"[{i}] mgpu prefix float16: {t.median_s * 1e6:.1f} us {flops / t.median_s / 1e12:.0f} TFLOP/s, "
            f"max err out {err:.4f} lse {lerr:.4f}", flush=True)
    except Exception as e:  # noqa: BLE001
      print(f"[{i}] mgpu prefix float16: {type(e).__name__}: {str(e)[:400]}", flush=True)
    t = timing.time_fn(triton_prefix, (q, pk, pv), **TIMING).median_s
    print(f"[{i}] triton prefix 128x128: {t * 1e6:.1f} us {flops / t / 1e12:.0f} TFLOP/s", flush=True)
    points = floor.simpson_points(out)
    floors = [floor_s(cfg, s, rates) for s in points]
    print(f"[{i}] {cfg} floors " + " / ".join(f"{x * 1e6:.0f}" for x in floors) + " us", flush=True)
    lengths = [jnp.full((b,), s, jnp.int32) for s in points]
    auto = jax.jit(variant_fn("auto"))
    base = [auto(q, pk, pv, sk, sv, x).astype(jnp.float32) for x in lengths]
    for name in variants:
      try:
        compiled, _ = timing.compile_aot(variant_fn(name), (q, pk, pv, sk, sv, lengths[0]))
        steps, err = time_at_lengths(compiled, (q, pk, pv, sk, sv), lengths, base, TIMING)
        print_fraction(i, name, floors, steps, err)
      except Exception as e:  # noqa: BLE001
        print(f"[{i}] {name}: {type(e).__name__}: {str(e)[:400]}", flush=True)


if __name__ == "__main__":
  main()
