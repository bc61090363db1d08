"""Probe (development tool): which use of the one-scatter cache write (`models.pair_scatter`) makes XLA abort.

On an H100 (2026-12-06, session 55) XLA:GPU aborted the process while compiling a small model's prefill with the
pair write, while decode steps and the write alone compiled. Each case below runs in a process of its own (an
abort ends only that one) and prints its exit code and the last lines of its stderr (XLA's CHECK message):
  - `alone-fresh-T<t>`: one jitted call that makes every layer's zero k and v caches and writes T slots into each
    (`--layers` layers: all those zeros are one value to XLA's CSE);
  - `alone-params-T<t>`: the same writes into caches passed in (distinct buffers);
  - `prefill`: `models.generate` on the test model (tests/write_cases.py) with the pair forced into prefill too.

  python -m scripts.tuning.probe_pair_abort [--layers 2] [--cases alone-fresh-T1,alone-fresh-T3,...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys

CASES = ("alone-fresh-T1", "alone-fresh-T3", "alone-params-T1", "alone-params-T3", "prefill")


def run_case(case: str, layers: int) -> None:
  """The case itself (in the child process)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from models import cache, pair_scatter  # noqa: PLC0415

  if case == "prefill":
    from hydragen_jax import tuning  # noqa: PLC0415
    import dataclasses  # noqa: PLC0415
    from models.generate import generate  # noqa: PLC0415
    from models.llama import init_random  # noqa: PLC0415
    from tests import write_cases  # noqa: PLC0415

    real = cache._write
    cache._write = lambda *a: real(*a[:8], decode=True)  # the pair in every write, prefill's too
    model = init_random(write_cases.CFG, jnp.float32, seed=3)
    with tuning.override(dataclasses.replace(tuning.current(), pair_write=True)):
      out = generate(model, write_cases.prompts(), num_samples=2, max_new_tokens=4, backend="xla")
    print("tokens", out.tokens.tolist())
    return
  kind, t = case.split("-")[1], int(case.split("-T")[1])
  b, s, hkv, d = 4, 16, 2, 8
  k = jnp.ones((b, t, hkv, d))
  pos = cache.write_positions(jnp.full((b,), 2), jnp.full((b,), t), t, s)

  def writes(caches):
    return [pair_scatter.scatter(kc, vc, k * (i + 1), -k, pos) for i, (kc, vc) in enumerate(caches)]

  if kind == "fresh":
    out = jax.jit(lambda: writes([(jnp.zeros((b, s, hkv, d)), jnp.zeros((b, s, hkv, d))) for _ in range(layers)]))()
  else:
    caches = [(jnp.zeros((b, s, hkv, d)), jnp.zeros((b, s, hkv, d))) for _ in range(layers)]
    out = jax.jit(writes)(caches)
  print("sums", [(float(kc.sum()), float(vc.sum())) for kc, vc in out])


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--cases", default=",".join(CASES))
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    run_case(args.child, args.layers)
    return
  for case in args.cases.split(","):
    if case not in CASES:
      parser.error(f"--cases: {case!r} is not one of {CASES}")
    done = subprocess.run([sys.executable, "-m", "scripts.tuning.probe_pair_abort", "--child", case, "--layers",
                           str(args.layers)], capture_output=True, text=True, timeout=300)
    tail = [line for line in done.stderr.splitlines() if line.strip() and "WARNING" not in line][-6:]
    print(f"== {case}: exit {done.returncode}; {done.stdout.strip()[-200:]}", flush=True)
    if done.returncode:
      print("\n".join("   " + line[:300] for line in tail), flush=True)


if __name__ == "__main__":
  main()
