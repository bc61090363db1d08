"""Quick kernel timing for development (the full benchmark is `python -m experiments bench-attention`).

Times one decode step (T = 1) at the Simpson midpoint s = (out + 1) / 2 for the nine seed configs
(`experiments/configs/bench_attention.toml`) as the benchmark does (its inputs, rates, floor and timing: caches of
`out` tokens with s valid, steps chained a call) and prints the fraction of that step's floor. Usage:
python -m scripts.quick_bench [--configs 0,1,...] [--variants a,b]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import hydragen_jax as hj
from experiments import bench_attention, device_rates, floor, timing
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
  steps, errs = [], []
  for x, w in zip(lengths, want):
    tm = timing.time_compiled(compiled, (*inputs, x), **timing_kw)
    steps.append(tm.median_s / steps_per_call)
    errs.append(float(jnp.max(jnp.abs(tm.output.astype(jnp.float32) - w))))
  return steps, max(errs, default=0.0)


def print_fraction(i, name, floors, steps, err) -> None:
  """One line of a probe: config i, variant, tok/s fraction of the floor (Simpson means), step times, error."""
  frac = floor.simpson(*floors) / floor.simpson(*steps)
  print(f"[{i}] {name:>12}: {frac:.3f} of floor ({' / '.join(f'{x * 1e6:.0f}' for x in steps)} us) "
        f"max err vs auto {err:.4f}", flush=True)


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
  config = config_lib.load("bench_attention")
  timing_kw = timing.timing_options(config["timing"])
  steps = config["timing"].get("steps_per_call", 1)
  rates = device_rates.measure_for(config, timing_kw)  # the benchmark's rates: its floor, not a weaker one
  print(f"device {jax.devices()[0].device_kind}: {device_rates.describe(rates)}; {steps} steps chained a call")
  print(f"{'cfg':>28} {'variant':>15} {'step us':>9} {'tok/s':>10} {'floor':>6}")
  cases = bench_attention.cases_from_config(config)
  for i in map(int, configs):
    case = cases[i]
    s = floor.simpson_points(case.out)[1]  # the Simpson midpoint, as the benchmark's
    x = bench_attention.make_inputs(case, s, _BENCH["seed"] + s)  # caches of `out` tokens, s valid
    b = case.batch
    step_floor = bench_attention.step_floor(case, s, rates)["floor_s"]
    for variant in variants:
      backend = "xla" if variant == "reference" else "pallas"
      if variant == "prefix_half":
        def f(q, pk, pv, sk, sv, sl):
          return run_plans(q, [prefix_plan(q, pk[None], pv[None])])[0][0].astype(q.dtype)
      elif variant == "suffix_half":
        def f(q, pk, pv, sk, sv, sl, b=b):
          return run_plans(q, [suffix_plan(q, sk, sv, sl, kv_index=jnp.arange(b))])[0][0].astype(q.dtype)
      else:
        def f(q, pk, pv, sk, sv, sl, backend=backend, bp=variant != "shared_storage"):
          return hj.hydragen_attention(q, pk, pv, sk, sv, suffix_lengths=sl, backend=backend, batch_prefix=bp)
      args = tuple(x[k] for k in ("q", "prefix_k", "prefix_v", "suffix_k", "suffix_v", "suffix_lengths"))
      try:
        t = timing.time_fn(timing.chain_steps(f, steps), args, **timing_kw).median_s / steps
        print(f"{str(SEED[i]):>28} {variant:>15} {t * 1e6:9.1f} {b / t:10.0f} {step_floor / t:6.2f}", flush=True)
      except Exception as e:  # noqa: BLE001 - report and go on (OOM on the largest configs)
        print(f"{str(SEED[i]):>28} {variant:>15} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
    del x

if __name__ == "__main__":
  main()
