"""Probe (development tool, GPU): registers and spills of the Hopper kernel's settings at several query windows.

ptxas reports, for each compiled kernel, the registers a thread uses and the bytes it spills to local memory
(`MOSAIC_GPU_DUMP_PTXAS=1` makes Mosaic GPU print that report). This compiles the kernel for each setting of
`--variants` (`probe_hopper.resolve`'s names: of its VARIANTS, or `tuned`, with overrides) at each T·g of
`--rows` (one sequence's query rows of a KV head: the suffix item's window is `hopper._window_rows(T·g)` rows
wide) and prints a line `== <variant> rows=<T·g> window=<n>` before each compile, so that the report that follows is
attributed. The spill lines decide, e.g., up to
which window 128-key suffix tiles fit the suffix warpgroup's registers.

  MOSAIC_GPU_DUMP_PTXAS=1 python -m scripts.tuning.probe_spills --variants s128q,q64 --rows 4,16,24,32,64 2>&1 \
    | grep -E "^==|spill|registers"
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp

from hydragen_jax.kernels import hopper
from scripts import cli
from scripts.tuning import probe_hopper


def shapes(rows: int, head_dim: int = 128, kv_heads: int = 8) -> tuple:
  """Struct shapes of a step with T·g = `rows`: g = min(rows, 8) query heads a KV head, T = rows / g."""
  group = min(rows, 8)
  if rows % group:
    raise ValueError(f"--rows {rows}: expected a multiple of 8 above 8 (T·g = T·8), or at most 8")
  steps = rows // group
  bf16 = jnp.bfloat16
  q = jax.ShapeDtypeStruct((64, steps, kv_heads * group, head_dim), bf16)
  prefix = jax.ShapeDtypeStruct((1024, kv_heads, head_dim), bf16)
  suffix = jax.ShapeDtypeStruct((64, 256, kv_heads, head_dim), bf16)
  return q, prefix, suffix


def compile_one(config: hopper.HopperConfig, rows: int) -> str | None:
  """Compiles the kernel for T·g = rows (None), or returns why it cannot (unsupported, or the error)."""
  q, prefix, suffix = shapes(rows)
  if (reason := hopper.supported(q, prefix, suffix, config)) is not None:
    return reason
  step = jax.jit(lambda *a: hopper.prefix_suffix_attention(*a, scale=0.1, config=config))
  lengths = jax.ShapeDtypeStruct((q.shape[0],), jnp.int32)
  try:
    step.lower(q, prefix, prefix, jax.ShapeDtypeStruct((), jnp.int32), suffix, suffix, lengths).compile()
  except Exception as error:  # noqa: BLE001 (a probe: report and go on)
    return f"{type(error).__name__}: {str(error)[:300]}"
  return None


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variants", default="s128q,q64", help="probe_hopper variants, comma-separated (`tuned` "
                      "at each T·g of --rows; overrides as `tuned+pair_registers=224`)")
  parser.add_argument("--rows", default="4,16,24,32,64", help="T·g values, comma-separated")
  args = parser.parse_args(argv)
  variants = cli.listed(parser, "--variants", args.variants, probe_hopper.known_variant)
  rows = cli.listed(parser, "--rows", args.rows, int, low=1)
  if os.environ.get("MOSAIC_GPU_DUMP_PTXAS") != "1":
    print("note: MOSAIC_GPU_DUMP_PTXAS=1 is not set: ptxas's report will not be printed", flush=True)
  for name in variants:
    for r in rows:
      config = probe_hopper.resolve(name, rows=r)
      print(f"== {name} rows={r} window={hopper._window_rows(r)}", flush=True)
      if (problem := compile_one(config, r)) is not None:
        print(f"   not compiled: {problem}", flush=True)


if __name__ == "__main__":
  main()
