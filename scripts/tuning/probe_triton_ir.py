"""Probe (development tool): what Triton made of the fused Triton kernel, read from the IR XLA's Triton pipeline dumps.

The question it answers (issue 12's B = 64 steps, experiments/PERF_NOTES.md, sessions 57-58): is the kernel's
key/value stream software-pipelined (Triton's `num_stages`: asynchronous copies into shared memory, or TMA), or does
each key block wait for its own load (`tt.load` into registers)? Which tensor-core path do its products take
(`ttng.warp_group_dot`: Hopper's wgmma; `tt.dot` left at the end: mma.sync), and how much shared memory does a
program take, which bounds how many programs an SM holds?

  python -m scripts.tuning.probe_triton_ir [--shapes 64x1024x128x32x32] [--variants auto,auto_w8] [--keep DIR]

XLA 0.11.2 writes no PTX into its dump (`--xla_dump_to` alone, or with `--xla_gpu_dump_llvmir`: session 58), but with
`--xla_dump_emitter_re=triton` it writes each Triton kernel's IR before every pass of its pipeline
(`<module>.<kernel>.triton-to-llvm.txt`, "IR Dump Before <Pass>" sections, 50-100 MB for this kernel). The probe
reads the TritonGPU IR that goes into the lowering to LLVM (`ConvertTritonGPUToLLVM`; loops counted before
`SCFToControlFlowPass` turns them into branches). Registers are not in it (ptxas assigns them later: Nsight Compute's
`scripts/tuning/probe_ncu_step.py` reads them). Each (shape, variant) step is compiled as `sweep_kernels` times it
(`step_fn`: the Triton kernels, their merge); every kernel whose name holds "hydragen" is summarised. On a machine
without a GPU nothing is compiled for Triton: it says so and exits 2.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import sys
import tempfile

from scripts import cli

# Operations counted in the TritonGPU IR (generic form: names quoted), by what they say about the kernel.
COUNTED = {
    "async copies": r'"ttg\.async_copy_global_to_local"',  # cp.async into shared memory: Triton's pipelining
    "async waits": r'"ttg\.async_wait"',
    "TMA copies": r'"ttng\.async_tma_copy_global_to_local"',
    "wgmma dots": r'"ttng\.warp_group_dot"',  # Hopper's warpgroup products
    "mma dots": r'"tt\.dot"',  # left as tt.dot until the lowering: mma.sync (or FMA)
    "direct loads": r'"tt\.load"',  # global loads into registers
    "shared loads": r'"ttg\.local_load"',
    "stores": r'"tt\.store"',
}
FINAL_PASS = "ConvertTritonGPUToLLVM"  # the section before it holds the TritonGPU IR the lowering takes
LOOP_PASS = "SCFToControlFlowPass"  # loops are still scf.for before it
_SECTION = re.compile(r"^// -----// IR Dump Before (\w+)", re.M)
# KiB of shared memory an SM has, by compute capability (the CUDA programming guide's table; 1 KiB of it is
# reserved for each resident block)
SM_SHARED_KIB = {"9.0": 228, "8.0": 164, "8.6": 100, "8.7": 164, "8.9": 100, "10.0": 228, "12.0": 100}


def sections(text: str) -> dict[str, str]:
  """A Triton pass dump -> pass name -> the IR before that pass (the first section of each name)."""
  found = {}
  marks = list(_SECTION.finditer(text))
  for mark, after in zip(marks, marks[1:] + [None]):
    found.setdefault(mark.group(1), text[mark.end():after.start() if after else len(text)])
  return found


def read_kernel(text: str) -> dict[str, int | None]:
  """One kernel's pass dump -> the `COUNTED` operations of its final TritonGPU IR, its loops, warps and shared
  memory (bytes, as Triton allocated it: None where the dump does not say)."""
  found = sections(text)
  if FINAL_PASS not in found:
    raise ValueError(f"no 'IR Dump Before {FINAL_PASS}' section: not a Triton pass dump of XLA's")
  final = found[FINAL_PASS]
  counts: dict[str, int | None] = {what: len(re.findall(pattern, final)) for what, pattern in COUNTED.items()}
  counts["loops"] = len(re.findall(r'"scf\.for"', found.get(LOOP_PASS, "")))
  for key, pattern in (("warps", r'"?ttg\.num-warps"?\s*=\s*(\d+)'), ("shared bytes", r'"?ttg\.shared"?\s*=\s*(\d+)')):
    m = re.search(pattern, final)
    counts[key] = int(m.group(1)) if m else None
  return counts


def pipelined(counts: dict[str, int | None]) -> bool:
  """Whether a kernel streams through asynchronous copies (cp.async or TMA) rather than loads that each block on
  their own data."""
  return bool(counts["async copies"] or counts["TMA copies"])


def programs_per_sm(shared_bytes: int | None, capability: str) -> int | None:
  """How many programs of `shared_bytes` an SM of this compute capability holds by shared memory alone (None where
  either is unknown)."""
  kib = SM_SHARED_KIB.get(capability)
  if shared_bytes is None or kib is None:
    return None
  return (kib << 10) // (shared_bytes + 1024)


def summary(name: str, counts: dict[str, int | None], capability: str) -> str:
  """One kernel's line: whether it is pipelined, its counts, and its programs an SM by shared memory."""
  text = ", ".join(f"{what} {n}" for what, n in counts.items())
  per_sm = programs_per_sm(counts["shared bytes"], capability)
  fit = f"; {per_sm} programs an SM by shared memory (sm_{capability})" if per_sm is not None else ""
  return f"  {name}: {'pipelined' if pipelined(counts) else 'NOT pipelined'} ({text}){fit}"


def kernel_dumps(paths, contains: str = "hydragen") -> dict[str, pathlib.Path]:
  """The Triton pass dumps among `paths` whose kernel name holds `contains`: kernel name -> file."""
  found = {}
  for path in paths:
    name = path.name
    if name.endswith(".triton-to-llvm.txt"):
      kernel = name[:-len(".triton-to-llvm.txt")].rsplit(".", 1)[-1]
      if contains in kernel:
        found[kernel] = path
  return found


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--shapes", default="64x1024x128x32x32", help="BxPxOUTxHQxHKV, comma-separated")
  parser.add_argument("--variants", default="auto", help="sweep_kernels.VARIANTS names, comma-separated")
  parser.add_argument("--length", type=int, default=64, help="the suffix length the step is compiled with")
  parser.add_argument("--keep", default=None, metavar="DIR", help="keep XLA's dump here (default: a temporary one)")
  args = parser.parse_args(argv)
  root = pathlib.Path(args.keep) if args.keep else pathlib.Path(tempfile.mkdtemp(prefix="triton_ir_"))
  # XLA reads its flags when its backend starts: set before any JAX work. Each compile's kernels are the dump files
  # it adds (a later compile of the same kernel name writes a file of its own name only if the module differs).
  flags = f"--xla_dump_to={root} --xla_dump_emitter_re=triton"
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
  import jax  # noqa: PLC0415 (after XLA_FLAGS)
  import jax.numpy as jnp  # noqa: PLC0415

  from scripts.tuning import sweep_kernels  # noqa: PLC0415

  try:  # usage errors before any work (the dump folder made above goes with them)
    shapes = cli.listed(parser, "--shapes", args.shapes, sweep_kernels.parse_shape)
    variants = cli.listed(parser, "--variants", args.variants, choices=sweep_kernels.VARIANTS)
    cli.at_least(parser, args, length=1)
  except SystemExit:
    if not args.keep:
      shutil.rmtree(root, ignore_errors=True)
    raise
  device = jax.devices()[0]
  if device.platform != "gpu":
    print("probe_triton_ir: no GPU here, so no Triton kernel is compiled (run it on the GPU machine).",
          file=sys.stderr)
    if not args.keep:
      shutil.rmtree(root, ignore_errors=True)
    return 2
  capability = str(getattr(device, "compute_capability", ""))
  print(f"{device.device_kind} (compute capability {capability})", flush=True)
  for shape, cfg in zip(args.shapes.split(","), shapes):
    for variant in variants:
      fn, blocks = sweep_kernels.step_fn(cfg, sweep_kernels.VARIANTS[variant])
      before = set(root.rglob("*"))
      data = sweep_kernels.config_inputs(cfg, 0)
      jax.jit(fn).lower(*data, jnp.full((cfg[0],), args.length, jnp.int32)).compile()
      dumps = kernel_dumps(sorted(set(root.rglob("*")) - before))
      print(f"{shape} {variant}: prefix {blocks[0]}, suffix {blocks[1]}", flush=True)
      if not dumps:
        print("  no hydragen kernel's Triton dump in what this compile wrote", flush=True)
      for kernel, path in dumps.items():
        print(summary(kernel, read_kernel(path.read_text()), capability), flush=True)
  print(f"dump: {root}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
