"""Probe (development tool): which use of the one-scatter cache write (`models.pair_scatter`) makes XLA abort.

On an H100 (2026-12-06, sessions 55-56) XLA:GPU aborted the process compiling the test model's generate with the
pair write: its prefill with the pair forced (session 55), and also its decode loop with the pair there only
(session 56), while the 7B-shaped decode loop (bf16, 8 heads of 128), the decode step alone and the write alone
compiled. The probe named the cause (an H100, session 56): `shape_util.cc:1576 Check failed: input_shape.IsArray()`
in XLA's layout normalization, on the scatter whose caches layout assignment had made heads-major (XLA's attention
over the test model's 2 KV heads of 12); with the caches pinned row-major around it (`models.pair_scatter`) every
case passes. Each case below runs in a process of its own (an abort ends only that one) and prints its exit code
and XLA's fatal log line (`Check failed ...`), else the last lines of its stderr:
  - `alone-fresh-T<t>`: one jitted call that makes every layer's zero k and v caches and writes T slots into each
    (`--layers` layers: all those zeros are one value to XLA's CSE);
  - `alone-params-T<t>`: the same writes into caches passed in (distinct buffers);
  - `loop-T1`: the writes of `alone-params-T1` inside a `lax.fori_loop` whose carries are the caches (the decode
    loop's form), at the test model's head shape (2 heads of 12, float32);
  - `prefill`: `models.generate` on the test model (tests/write_cases.py) with the pair forced into prefill too;
  - `decode-<variant>`: `models.generate` with the tuning's `pair_write` (the decode loop only), on the test model
    (`f32`; `f32hi` with the tests' float32 matmul precision "highest", tests/conftest.py), in bfloat16 (`bf16`),
    with 8 heads of 128 (`wide`), or with one prompt and one sample (`flat`: the tree of two levels, not three).
With `--dump DIR`, a failing case is rerun with XLA's dump of every pass of the decode loop's module into DIR/<case>
and the last files written (the pass before the abort) are listed.

  python -m scripts.tuning.probe_pair_abort [--layers 2] [--cases alone-fresh-T1,decode-f32,...] [--dump DIR]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import subprocess
import sys
from scripts import cli

CASES = ("alone-fresh-T1", "alone-fresh-T3", "alone-params-T1", "alone-params-T3", "loop-T1", "prefill",
         "decode-f32", "decode-f32hi", "decode-bf16", "decode-wide", "decode-flat")
FATAL = re.compile(r"Check failed|^F\d{4} |RET_CHECK|LOG\(FATAL\)")


def run_case(case: str, layers: int) -> None:
  """The case itself (in the child process)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from models import cache, pair_scatter  # noqa: PLC0415

  if case == "prefill" or case.startswith("decode-"):
    _run_model_case(case)
    return
  kind, t = case.split("-")[1], int(case.split("-T")[1])
  b, s, hkv, d = 4, 16, 2, (12 if kind == "loop" else 8)
  k = jnp.ones((b, t, hkv, d))
  pos = cache.write_positions(jnp.full((b,), 2), jnp.full((b,), t), t, s)

  def writes(caches):
    return [pair_scatter.scatter(kc, vc, k * (i + 1), -k, pos) for i, (kc, vc) in enumerate(caches)]

  if kind == "loop":
    caches = [(jnp.zeros((b, s, hkv, d)), jnp.zeros((b, s, hkv, d))) for _ in range(layers)]
    out = jax.jit(lambda c: jax.lax.fori_loop(0, 3, lambda i, c: writes(c), c), donate_argnums=0)(caches)
  elif kind == "fresh":
    out = jax.jit(lambda: writes([(jnp.zeros((b, s, hkv, d)), jnp.zeros((b, s, hkv, d))) for _ in range(layers)]))()
  else:
    caches = [(jnp.zeros((b, s, hkv, d)), jnp.zeros((b, s, hkv, d))) for _ in range(layers)]
    out = jax.jit(writes)(caches)
  print("sums", [(float(kc.sum()), float(vc.sum())) for kc, vc in out])


def _run_model_case(case: str) -> None:
  """`prefill` and `decode-<variant>`: `models.generate` on the test model (tests/write_cases.py) or a variant."""
  import dataclasses  # noqa: PLC0415

  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415

  from hydragen_jax import tuning  # noqa: PLC0415
  from models import cache  # noqa: PLC0415
  from models.generate import generate  # noqa: PLC0415
  from models.llama import init_random  # noqa: PLC0415
  from tests import write_cases  # noqa: PLC0415

  variant, cfg, prompts, samples = case.split("-")[-1], write_cases.CFG, write_cases.prompts(), 2
  if case == "prefill":
    real = cache._write
    cache._write = lambda *a: real(*a[:8], decode=True)  # the pair in every write, prefill's too
    model = init_random(cfg, jnp.float32, seed=3)
    with tuning.override(dataclasses.replace(tuning.current(), pair_write=True)):
      out = generate(model, prompts, num_samples=samples, max_new_tokens=4, backend="xla")
    print("tokens", out.tokens.tolist())
    return
  if variant == "wide":
    cfg = dataclasses.replace(cfg, hidden_size=256, num_attention_heads=8, num_key_value_heads=8, head_dim=128)
  if variant == "f32hi":
    jax.config.update("jax_default_matmul_precision", "highest")
  if variant == "flat":
    prompts, samples = prompts[:1], 1
  model = init_random(cfg, jnp.bfloat16 if variant == "bf16" else jnp.float32, seed=3)
  generate_module = sys.modules["models.generate"]
  compile_decode, texts = generate_module.compile_decode, []

  def spy(*a, **kw):  # the compiled decode loop's text: its caches' layouts and copies
    fn, seconds = compile_decode(*a, **kw)
    texts.append(fn.as_text())
    return fn, seconds

  generate_module.compile_decode = spy
  for pair in (False, True):
    with tuning.override(dataclasses.replace(tuning.current(), pair_write=pair)):
      out = generate(model, prompts, num_samples=samples, max_new_tokens=4, backend="xla")
    shape = rf"\[{len(prompts) * samples},\d+,{cfg.num_key_value_heads},{cfg.head_dim}\]\{{[0-9,]+\}}"
    layouts = sorted(set(re.findall(shape, texts[-1])))
    print(f"pair {pair}: tokens {out.tokens.tolist()}; caches {layouts}; copies {texts[-1].count(' copy(')}")


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--cases", default=",".join(CASES))
  parser.add_argument("--dump", default=None, help="rerun a failing case with XLA's per-pass dump into DUMP/<case>")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    run_case(args.child, args.layers)
    return
  cases = cli.listed(parser, "--cases", args.cases, choices=CASES)
  for case in cases:
    command = [sys.executable, "-m", "scripts.tuning.probe_pair_abort", "--child", case, "--layers", str(args.layers)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip() and "WARNING" not in line]
    fatal = [line for line in lines if FATAL.search(line)]
    print(f"== {case}: exit {done.returncode}", flush=True)
    print("\n".join("   " + line[:400] for line in done.stdout.strip().splitlines()[-4:]), flush=True)
    if done.returncode:
      print("\n".join("   " + line[:400] for line in (fatal or lines[-6:])), flush=True)
    if done.returncode and args.dump:
      where = pathlib.Path(args.dump) / case
      flags = f"--xla_dump_to={where} --xla_dump_hlo_pass_re=.* --xla_dump_hlo_module_re=.*decode.*"
      env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
      subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
      files = sorted(where.glob("*"), key=lambda f: f.stat().st_mtime)
      print(f"   dump: {len(files)} files in {where}; the last:", flush=True)
      print("\n".join("     " + f.name for f in files[-4:]), flush=True)


if __name__ == "__main__":
  main()
