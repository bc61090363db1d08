"""Quick kernel timing for development (the full benchmark is `python -m experiments bench-attention`).

Times one decode step (T = 1) at suffix length s = out/2 for the nine seed configs
(`experiments/configs/bench_attention.toml`) and prints the fraction of the floor. Usage:
python -m scripts.quick_bench [--configs 0,1,...] [--variants a,b]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

import hydragen_jax as hj
from experiments import config as config_lib
from hydragen_jax.kernels import ops
from scripts import cli

_BENCH = config_lib.load("bench_attention")["bench"]  # the seed rows are data: the benchmark's config
SEED = [tuple(row[k] for k in ("batch", "prefix", "out", "q_heads", "kv_heads")) for row in _BENCH["configs"]]
D = _BENCH["head_dim"]  # (B, P, out, Hq, Hkv) a row
VARIANTS = ("hydragen", "prefix_half", "suffix_half", "shared_storage", "reference")


def prefix_plan(q, k, v, **kw):
  """The shared level of a seed config: the one node of k/v `[1, P, Hkv, D]`, read by every sequence."""
  b, p = q.shape[0], k.shape[1]
  return ops.batched(q, k, v, jnp.array([p]), jnp.zeros((b,), jnp.int32), max_group=None, causal=False, **kw)


def suffix_plan(q, k, v, lengths, **kw):
  """The per-sequence level of a seed config: sequence b reads row b of k/v `[B, S, Hkv, D]`."""
  return ops.per_sequence(q, k, v, lengths, causal=True, **kw)


def run_plans(q, plans, launch="auto", tuning=None):
  """The `(out, lse)` parts of the plans, compiled kernels, softmax scale D**-0.5 (tuning: `ops.run`'s)."""
  return ops.run(q, plans, scale=D**-0.5, interpret=False, launch=launch, tuning=tuning)


def time_at_lengths(compiled, inputs, lengths, want, timing_kw, steps_per_call=1):
  """Step times of `compiled(*inputs, lengths)` at each lengths vector, and the max abs error of its output (the
  `output` of the timing run, or of `single(...)` when compiled chains steps) against `want` (float32 arrays)."""
  from experiments import timing  # noqa: PLC0415

  steps, errs = [], []
  for x, w in zip(lengths, want):
    tm = timing.time_compiled(compiled, (*inputs, x), **timing_kw)
    steps.append(tm.median_s / steps_per_call)
    errs.append(float(jnp.max(jnp.abs(tm.output.astype(jnp.float32) - w))))
  return steps, max(errs, default=0.0)


def print_fraction(i, name, floors, steps, err) -> None:
  """One line of a probe: config i, variant, tok/s fraction of the floor (Simpson means), step times, error."""
  from experiments import floor  # noqa: PLC0415

  frac = floor.simpson(*floors) / floor.simpson(*steps)
  print(f"[{i}] {name:>12}: {frac:.3f} of floor ({' / '.join(f'{x * 1e6:.0f}' for x in steps)} us) "
        f"max err vs auto {err:.4f}", flush=True)


def timeit(f, *args, repeats=15, inner=10):
  """Median over repeats of the time per call, `inner` calls launched back to back (dispatch amortised)."""
  jax.block_until_ready(f(*args))
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(inner):
      out = f(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / inner)
  return statistics.median(times)


def machine_rates():
  x = jnp.ones((1 << 28,), jnp.float32)  # 1 GiB
  copy = jax.jit(lambda x: x + 1)  # one read, one write
  t = timeit(copy, x, inner=3)
  bw = 2 * x.nbytes / t
  n = 8192
  a = jnp.ones((n, n), jnp.bfloat16)
  mm = jax.jit(lambda a: a @ a)
  t = timeit(mm, a, inner=3)
  return bw, 2 * n**3 / t


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--configs", default=",".join(str(i) for i in range(len(SEED))))
  parser.add_argument("--variants", default=",".join(VARIANTS))
  args = parser.parse_args()
  configs = cli.seed_configs(parser, "--configs", args.configs, len(SEED))
  variants = cli.listed(parser, "--variants", args.variants, choices=VARIANTS)
  if jax.default_backend() != "gpu":
    parser.exit(2, f"quick_bench: times compiled GPU kernels, and this machine has no GPU ({jax.default_backend()}); "
                   "run it on the GPU machine\n")
  bw, flops = machine_rates()
  print(f"device {jax.devices()[0].device_kind}: copy {bw / 1e12:.2f} TB/s, bf16 matmul {flops / 1e12:.0f} TFLOP/s")
  print(f"{'cfg':>28} {'variant':>15} {'step us':>9} {'tok/s':>10} {'floor':>6}")
  for i in map(int, configs):
    b, p, out, hq, hkv = SEED[i]
    s = out // 2
    keys = jax.random.split(jax.random.PRNGKey(i), 5)
    q = jax.random.normal(keys[0], (b, 1, hq, D), jnp.bfloat16)
    pk = jax.random.normal(keys[1], (p, hkv, D), jnp.bfloat16)
    pv = jax.random.normal(keys[2], (p, hkv, D), jnp.bfloat16)
    sk = jax.random.normal(keys[3], (b, out, hkv, D), jnp.bfloat16)
    sv = jax.random.normal(keys[4], (b, out, hkv, D), jnp.bfloat16)
    lengths = jnp.full((b,), s, jnp.int32)
    nbytes = 2 * (p + b * s) * hkv * D * 2 + 2 * q.nbytes
    floor = max(nbytes / bw, 4 * D * hq * b * (p + s) / flops)
    for variant in variants:
      backend = "xla" if variant == "reference" else "pallas"
      if variant == "prefix_half":
        f = jax.jit(lambda q, pk, pv, sk, sv, sl: run_plans(q, [prefix_plan(q, pk[None], pv[None])]))
      elif variant == "suffix_half":
        f = jax.jit(lambda q, pk, pv, sk, sv, sl: run_plans(q, [suffix_plan(q, sk, sv, sl, kv_index=jnp.arange(b))]))
      else:
        f = jax.jit(lambda q, pk, pv, sk, sv, sl, backend=backend, bp=variant != "shared_storage":
                    hj.hydragen_attention(q, pk, pv, sk, sv, suffix_lengths=sl, backend=backend, batch_prefix=bp))
      try:
        t = timeit(f, q, pk, pv, sk, sv, lengths)
        print(f"{str(SEED[i]):>28} {variant:>15} {t * 1e6:9.1f} {b / t:10.0f} {floor / t:6.2f}", flush=True)
      except Exception as e:  # noqa: BLE001 - report and go on (OOM on the largest configs)
        print(f"{str(SEED[i]):>28} {variant:>15} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)


if __name__ == "__main__":
  main()
