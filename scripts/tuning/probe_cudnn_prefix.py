"""Probe (development tool): the shared prefix on cuDNN's fused attention, against our kernels.

The prefix level of a Hydragen step is one attention of all B·T queries (stacked as one sequence, Hq heads) over
the P prefix keys (Hkv heads): the shape cuDNN's flash attention is built for. JAX 0.11.2 reaches it with the
log-sum-exp through `jax._src.cudnn.fused_attention_stablehlo.dot_product_attention(..., return_residual=True)`.
For each config (B, P, out, Hq, Hkv) this prints
  - the prefix product alone: cuDNN (no mask; and with a kv_seqlen padding mask, as a traced prefix length needs)
    against ours (`hydragen_attention` with every suffix empty), in µs and TFLOP/s, with cuDNN's out and lse
    against the pure-jnp reference (checks that its residual is the natural-log LSE);
  - whole steps at s = 1, out/2, out (16 chained a call), as fractions of the bench floor: `auto` (our step as the
    API runs it) and `cudnn+ours` (cuDNN prefix, our kernels on the suffixes, the log-sum-exp merge), the latter
    also compiled with CONCURRENT command buffers (`models.COMPILER_OPTIONS`), where the prefix and suffix kernels
    are independent nodes of one graph and might run at once.
Usage: python -m scripts.tuning.probe_cudnn_prefix [--configs 5,6,7,8] [--shapes BxPxOUTxHQxHKV,...] [--no-steps]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.cudnn import fused_attention_stablehlo as cudnn

import hydragen_jax as hj
from experiments import device_rates, floor, timing
from hydragen_jax import merge_states, reference
from scripts import cli
from scripts.quick_bench import D
from scripts.tuning.sweep_kernels import CONFIGS, SEED, add_shapes, floor_s, inputs

TIMING = dict(warmup=2, repeats=7, min_repeat_s=0.02, max_inner=20)
STEPS = 16
SCALE = D**-0.5


def cudnn_prefix(q, pk, pv, prefix_length=None):
  """(out `[B, T, Hq, D]`, lse `[B, T, Hq]` float32) of q `[B, T, Hq, D]` over the prefix pk, pv `[P, Hkv, D]`:
  the B·T queries as one sequence; with prefix_length (traced), a padding mask past it."""
  b, t, hq, d = q.shape
  stacked = q.reshape(1, b * t, hq, d)
  kw = {}
  if prefix_length is not None:
    kw = dict(q_seqlen=jnp.array([b * t], jnp.int32), kv_seqlen=jnp.reshape(prefix_length, (1,)).astype(jnp.int32),
              mask_type=cudnn.MaskType.PADDING)
  out, lse = cudnn.dot_product_attention(stacked, pk[None], pv[None], scale=SCALE, return_residual=True, **kw)
  lse = jnp.transpose(lse.reshape(hq, b, t), (1, 2, 0))  # cuDNN's softmax statistic is [1, Hq, B·T] (BNT)
  return out.reshape(b, t, hq, d), lse


def step(name):
  def fn(q, pk, pv, sk, sv, lengths):
    if name == "auto":
      return hj.hydragen_attention(q, pk[0], pv[0], sk, sv, suffix_lengths=lengths, backend="pallas")
    prefix = cudnn_prefix(q, pk[0], pv[0])
    suffix = hj.attention(q, sk, sv, kv_lengths=lengths, causal=True, backend="pallas")
    out, _ = merge_states([prefix, suffix])
    return out.astype(q.dtype)
  return fn


def prefix_alone(i, rates):
  b, p, out, hq, hkv = CONFIGS[i]
  q, pk, pv, sk, sv = inputs(i)
  flops = 4 * D * hq * b * p
  zeros = jnp.zeros((b,), jnp.int32)
  fns = {
      "cudnn": (lambda q, pk, pv: cudnn_prefix(q, pk[0], pv[0])[0], (q, pk, pv)),
      "cudnn_len": (lambda q, pk, pv, n: cudnn_prefix(q, pk[0], pv[0], n)[0], (q, pk, pv, jnp.int32(p))),
      "ours": (lambda q, pk, pv, sk, sv, n: hj.hydragen_attention(q, pk[0], pv[0], sk, sv, suffix_lengths=n,
                                                                  backend="pallas"), (q, pk, pv, sk, sv, zeros)),
  }
  line = []
  for name, (fn, args) in fns.items():
    try:
      tm = timing.time_fn(fn, args, **TIMING)
      line.append(f"{name} {tm.median_s * 1e6:.0f} us {flops / tm.median_s / 1e12:.0f} TFLOP/s "
                  f"({flops / tm.median_s / rates['matmul_flops_per_s']:.2f})")
    except Exception as e:  # noqa: BLE001 - a probe: report and go on
      line.append(f"{name} failed: {type(e).__name__}: {str(e)[:300]}")
  print(f"[{i}] {CONFIGS[i]} prefix alone: " + "; ".join(line), flush=True)
  try:
    got_o, got_l = jax.jit(lambda q, pk, pv: cudnn_prefix(q, pk[0], pv[0], jnp.int32(p - 5)))(q, pk, pv)
    want_o, want_l = jax.jit(lambda q, pk, pv: reference.shared_attention(
        q.astype(jnp.float32), pk[0].astype(jnp.float32), pv[0].astype(jnp.float32), jnp.int32(p - 5),
        scale=SCALE))(q, pk, pv)
    f = lambda x: np.asarray(x, np.float32)
    print(f"[{i}] cudnn (prefix length P - 5) against the reference: out {np.abs(f(got_o) - f(want_o)).max():.4f}, "
          f"lse {np.abs(f(got_l) - f(want_l)).max():.5f} (lse shape {got_l.shape})", flush=True)
  except Exception as e:  # noqa: BLE001
    print(f"[{i}] cudnn check failed: {type(e).__name__}: {str(e)[:300]}", flush=True)


def steps(i, rates):
  from models import COMPILER_OPTIONS  # noqa: PLC0415

  b, p, out, hq, hkv = CONFIGS[i]
  q, pk, pv, sk, sv = inputs(i)
  points = floor.simpson_points(out)
  floors = [floor_s(CONFIGS[i], s, rates) for s in points]
  lengths = [jnp.full((b,), s, jnp.int32) for s in points]
  want = jax.jit(step("auto"))(q, pk, pv, sk, sv, lengths[1]).astype(jnp.float32)
  for name, options in (("auto", None), ("cudnn+ours", None), ("cudnn+ours/conc", COMPILER_OPTIONS)):
    try:
      fn = step(name.split("/")[0])
      chained = jax.jit(timing.chain_steps(fn, STEPS)).lower(q, pk, pv, sk, sv, lengths[0]).compile(options)
      times = [timing.time_compiled(chained, (q, pk, pv, sk, sv, x), **TIMING).median_s / STEPS for x in lengths]
      got = jax.jit(fn).lower(q, pk, pv, sk, sv, lengths[1]).compile(options)(q, pk, pv, sk, sv, lengths[1])
      err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)))
      frac = floor.simpson(*floors) / floor.simpson(*times)
      print(f"[{i}] {name:>16}: {frac:.3f} of floor ({' / '.join(f'{x * 1e6:.0f}' for x in times)} us; floors "
            f"{' / '.join(f'{x * 1e6:.0f}' for x in floors)}) max err vs auto {err:.4f}", flush=True)
    except Exception as e:  # noqa: BLE001
      print(f"[{i}] {name:>16}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--configs", default="5,6,7,8")
  parser.add_argument("--shapes", default="", help="extra configs BxPxOUTxHQxHKV, comma-separated")
  parser.add_argument("--no-steps", action="store_true", help="the prefix alone only")
  args = parser.parse_args()
  configs = cli.seed_configs(parser, "--configs", args.configs, len(SEED)) + add_shapes(parser, args.shapes)
  rates = device_rates.measure(1 << 31, 8192, dict(warmup=2, repeats=7, min_repeat_s=0.02, max_inner=20))
  print(f"{jax.devices()[0].device_kind}: bandwidth {rates['bandwidth_bytes_per_s'] / 1e12:.3f} TB/s, matmul "
        f"{rates['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s", flush=True)
  for i in configs:
    prefix_alone(i, rates)
    if not args.no_steps:
      steps(i, rates)


if __name__ == "__main__":
  main()
