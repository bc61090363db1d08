"""Probe (development tool): does the suffix caches' layout bound the Hopper kernel's suffix stream?

The caches are `[B, S, Hkv, D]` (the model's natural layout): one suffix tile of KV head h is `keys` rows of D
values, each row `Hkv·D` elements from the next (256 contiguous bytes at D = 128 in bf16, 2 KB apart at Hkv = 8).
A head-major cache `[B, Hkv, S, D]` would make each (sequence, head) one contiguous run instead. The probe times
that without a kernel change: the same step written over B·Hkv sequences of one KV head each,

  q `[B, 1, Hq, D]` -> `[B·Hkv, 1, g, D]`, caches `[B, S, Hkv, D]` -> `[B·Hkv, S, 1, D]` (a copy made once, outside
  the timing), lengths repeated Hkv times, the prefix `[1, P, Hkv, D]` -> its head 0 `[1, P, 1, D]`,

so T·g, the prefix's rows and FLOPs, the suffix bytes and the number of suffix items are the same; only the
suffix tiles' addresses (and the prefix's footprint in L2: one head instead of Hkv) differ. The natural inputs
carry the same prefix in every head, so both forms compute the same output, which the probe checks. The kernel's
own layout flags (`prefix_heads_major`, `suffix_heads_major`: the caches `[Hkv, P, D]` / `[B, Hkv, S, D]`, copies
made once outside the timing) separate the two: forms `natural`, `prefix_hm`, `suffix_hm`, `both_hm`, and the
one-head emulation `heads`.

Usage: python -m scripts.tuning.probe_layout [--configs 5,6,7,8] [--shapes BxPxOUTxHQxHKV,...] [--variants tuned]
(variants as in probe_hopper: `tuned`, the device's setting for the config, with `+FIELD=VALUE` overrides).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from experiments import device_rates, floor, timing
from scripts.quick_bench import print_fraction, time_at_lengths
from hydragen_jax import merge_states
from hydragen_jax.kernels import hopper
from scripts.quick_bench import D
from scripts.tuning.probe_hopper import STEPS, TIMING, resolve, step

FORMS = ("natural", "prefix_hm", "suffix_hm", "both_hm", "heads")
from scripts.tuning.sweep_kernels import CONFIGS, add_shapes, floor_s, inputs


def head_major(q, pk, pv, sk, sv, lengths):
  """The same step over B·Hkv one-head sequences (module docstring): each (sequence, KV head) suffix contiguous."""
  b, t, hq, d = q.shape
  hkv = sk.shape[2]
  q_e = q.reshape(b, t, hkv, hq // hkv, d).transpose(0, 2, 1, 3, 4).reshape(b * hkv, t, hq // hkv, d)
  caches = [x.transpose(0, 2, 1, 3).reshape(b * hkv, x.shape[1], 1, d) for x in (sk, sv)]
  return (q_e, pk[:, :, :1], pv[:, :, :1], *caches), [jnp.repeat(x, hkv) for x in lengths]


def back(out_e, shape):
  """The head-major step's output `[B·Hkv, T, g, D]` in the natural `[B, T, Hq, D]`."""
  b, t, hq, d = shape
  hkv = out_e.shape[0] // b
  return out_e.reshape(b, hkv, t, hq // hkv, d).transpose(0, 2, 1, 3, 4).reshape(b, t, hq, d)


def layout_step(config, prefix_hm: bool, suffix_hm: bool):
  """probe_hopper.step's Hopper step over caches in the given layouts (prefix `[1, Hkv, P, D]` where prefix_hm,
  suffix `[B, Hkv, S, D]` where suffix_hm)."""
  def fn(q, pk, pv, sk, sv, lengths):
    parts = hopper.prefix_suffix_attention(q, pk[0], pv[0], jnp.int32(pk.shape[2 if prefix_hm else 1]), sk, sv,
                                           lengths, scale=D**-0.5, config=config, prefix_heads_major=prefix_hm,
                                           suffix_heads_major=suffix_hm)
    out, _ = merge_states(list(parts))
    return out.astype(q.dtype)
  return fn


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--configs", default="5,6,7,8")
  parser.add_argument("--shapes", default="", help="extra configs BxPxOUTxHQxHKV, comma-separated")
  parser.add_argument("--variants", default="tuned")
  parser.add_argument("--forms", default=",".join(FORMS), help=f"some of {FORMS}")
  args = parser.parse_args()
  configs = [int(c) for c in args.configs.split(",") if c] + add_shapes(args.shapes)
  rates = device_rates.measure(1 << 31, 8192, TIMING)
  print(f"bandwidth {rates['bandwidth_bytes_per_s'] / 1e12:.3f} TB/s, matmul "
        f"{rates['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s", flush=True)
  for i in configs:
    cfg = CONFIGS[i]
    b, p, out, hq, hkv = cfg
    q, pk, pv, sk, sv = inputs(i)
    pk, pv = (jnp.broadcast_to(x[:, :, :1], x.shape) for x in (pk, pv))  # one prefix in every head
    points = floor.simpson_points(out)
    floors = [floor_s(cfg, s, rates) for s in points]
    print(f"[{i}] {cfg} floors " + " / ".join(f"{x * 1e6:.0f}" for x in floors) + " us", flush=True)
    lengths = [jnp.full((b,), s, jnp.int32) for s in points]
    (q_e, *kv_e), lengths_e = head_major(q, pk, pv, sk, sv, lengths)
    moved = lambda x: jnp.moveaxis(x, 2, 1)  # [., S, Hkv, D] -> [., Hkv, S, D]
    for name in args.variants.split(","):
      config = resolve(name, cfg)
      single = jax.jit(step(config))
      want = [single(q, pk, pv, sk, sv, x).astype(jnp.float32) for x in lengths]
      for form in args.forms.split(","):
        if form == "heads":
          fn, args_, lens, unmap = step(config), (q_e, *kv_e), lengths_e, lambda o: back(o, q.shape)
        else:
          prefix_hm, suffix_hm = form in ("prefix_hm", "both_hm"), form in ("suffix_hm", "both_hm")
          fn, lens, unmap = layout_step(config, prefix_hm, suffix_hm), lengths, lambda o: o
          args_ = (q, *[moved(x) if prefix_hm else x for x in (pk, pv)],
                   *[moved(x) if suffix_hm else x for x in (sk, sv)])
        try:
          compiled, _ = timing.compile_aot(timing.chain_steps(fn, STEPS), (*args_, lens[0]))
          like = [jnp.zeros(args_[0].shape, jnp.float32)] * len(lens)  # (time_at_lengths' error is not read)
          steps, _ = time_at_lengths(compiled, args_, lens, like, TIMING, STEPS)
          one = jax.jit(fn)
          err = max(float(np.abs(np.asarray(unmap(one(*args_, x)), np.float32) - np.asarray(w)).max())
                    for x, w in zip(lens, want))
          print_fraction(i, f"{name}:{form}", floors, steps, err)
        except Exception as e:  # noqa: BLE001
          print(f"[{i}] {name}:{form}: {type(e).__name__}: {str(e)[:1500]}", flush=True)
        del args_


if __name__ == "__main__":
  main()
