"""Probe (development tool): what Triton made of the fused Triton kernel, read from the PTX that XLA compiled.

The question it answers (issue 12's B = 64 steps, experiments/PERF_NOTES.md, session 57): is the kernel's key/value
stream software-pipelined (Triton's `num_stages`: asynchronous copies into shared memory, `cp.async` with its
commit/wait groups, or TMA's `cp.async.bulk.tensor`), or does each key block wait for its own load (`ld.global`
into registers)? How wide are its global loads (`.v4`: 16 bytes a thread), which tensor-core instructions does it
use (`wgmma.mma_async` on a Hopper, `mma.sync` elsewhere), and, where `ptxas` is found, how many registers, spills
and bytes of shared memory does each kernel take?

  python -m scripts.tuning.probe_triton_ptx [--shapes 64x1024x128x32x32] [--variants auto,auto_w8] [--keep DIR]

Each (shape, variant) step is compiled as `sweep_kernels` times it (`step_fn`: the Triton kernels, their merge),
with XLA's dump (`--xla_dump_to`, set here before JAX starts its backend) collecting the module's PTX (the files each
compile adds); every kernel entry whose name holds "hydragen" is summarised. On a machine without a GPU there is no PTX: it says so and exits 2.
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

# PTX instructions counted in a kernel's body, by what they say about it.
COUNTED = {
    "cp.async": r"\bcp\.async\.c[ag]\.shared\.global",  # Ampere-style asynchronous copies (Triton's pipelining)
    "cp.async waits": r"\bcp\.async\.wait_group",
    "TMA copies": r"\bcp\.async\.bulk\.tensor",
    "mbarrier waits": r"\bmbarrier\.try_wait",
    "wgmma": r"\bwgmma\.mma_async",
    "mma.sync": r"\bmma\.sync\.aligned",
    # direct global loads by width (their qualifiers, e.g. `.nc` or `.L1::evict_last`, may come before `.v4`)
    "ld.global v4": r"\bld\.global(?:\.[\w:]+)*?\.v4\.",
    "ld.global v2": r"\bld\.global(?:\.[\w:]+)*?\.v2\.",
    "ld.global scalar": r"\bld\.global(?!(?:\.[\w:]+)*?\.v[248]\.)(?:\.[\w:]+)*\s",
    "st.global": r"\bst\.global",
    "bar.sync": r"\bbar\.sync|\bbarrier\.sync",
    "ex2": r"\bex2\.approx",
}
_ENTRY = re.compile(r"\.entry\s+([\w$.]+)\s*\(")


def kernel_bodies(ptx: str, contains: str = "hydragen") -> dict[str, str]:
  """The `.entry` functions of a PTX text whose name holds `contains`: name -> text from the entry to the end of its
  body (the closing brace that balances its first opening one)."""
  bodies = {}
  for match in _ENTRY.finditer(ptx):
    name = match.group(1)
    if contains not in name:
      continue
    start = ptx.index("{", match.end())
    depth, i = 0, start
    while i < len(ptx):
      depth += {"{": 1, "}": -1}.get(ptx[i], 0)
      if depth == 0:
        break
      i += 1
    bodies[name] = ptx[match.start():i + 1]
  return bodies


def instruction_counts(body: str) -> dict[str, int]:
  """How many of each `COUNTED` instruction a kernel's PTX body holds (static counts: an unrolled loop's copies
  count each; a loop's body once)."""
  return {what: len(re.findall(pattern, body)) for what, pattern in COUNTED.items()}


def pipelined(counts: dict[str, int]) -> bool:
  """Whether a kernel streams through asynchronous copies (cp.async groups or TMA) rather than loads that each block
  on their own data."""
  return counts["cp.async"] > 0 or counts["TMA copies"] > 0


_PTXAS_FUNCTION = re.compile(r"Compiling entry function '([\w$.]+)'")
_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def ptxas_resources(text: str) -> dict[str, dict[str, int]]:
  """`ptxas -v`'s report (its stderr) -> per entry function: registers, spill stores and loads (bytes), static
  shared memory (bytes; Triton's pipelining buffers are dynamic shared memory, not counted there)."""
  found, name = {}, None
  for line in text.splitlines():
    if m := _PTXAS_FUNCTION.search(line):
      name = m.group(1)
      found[name] = {}
    elif name is not None:
      if m := _PTXAS_USED.search(line):
        found[name]["registers"] = int(m.group(1))
        if s := _PTXAS_SMEM.search(line):
          found[name]["static smem"] = int(s.group(1))
      if m := _PTXAS_SPILL.search(line):
        found[name]["spill stores"], found[name]["spill loads"] = int(m.group(1)), int(m.group(2))
  return found


def find_ptxas() -> str | None:
  """A `ptxas` binary: on PATH, under CUDA's usual homes, or in the pip `nvidia-cuda-nvcc` package; None if none."""
  if path := shutil.which("ptxas"):
    return path
  candidates = list(pathlib.Path("/usr/local").glob("cuda*/bin/ptxas"))
  try:
    import nvidia.cuda_nvcc  # noqa: PLC0415 (optional: the CUDA wheels' compiler)
    candidates += list(pathlib.Path(list(nvidia.cuda_nvcc.__path__)[0]).glob("bin/ptxas"))
  except ImportError:
    pass
  return str(candidates[0]) if candidates else None


def arch_of(ptx: str) -> str:
  """The PTX's `.target` (e.g. "sm_90a"), for ptxas."""
  m = re.search(r"^\s*\.target\s+(sm_\w+)", ptx, re.M)
  return m.group(1) if m else "sm_90a"


def summary(name: str, counts: dict[str, int], resources: dict[str, int] | None) -> str:
  """One kernel's line: its counts, whether it is pipelined, and ptxas' resources where known."""
  text = ", ".join(f"{what} {n}" for what, n in counts.items())
  res = ", ".join(f"{what} {n}" for what, n in (resources or {}).items()) or "ptxas: not run"
  return f"  {name}: {'pipelined' if pipelined(counts) else 'NOT pipelined'} ({text}); {res}"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--shapes", default="64x1024x128x32x32", help="BxPxOUTxHQxHKV, comma-separated")
  parser.add_argument("--variants", default="auto", help="sweep_kernels.VARIANTS names, comma-separated")
  parser.add_argument("--length", type=int, default=64, help="the suffix length the step is compiled with")
  parser.add_argument("--keep", default=None, metavar="DIR", help="keep XLA's dump here (default: a temporary one)")
  args = parser.parse_args(argv)
  root = pathlib.Path(args.keep) if args.keep else pathlib.Path(tempfile.mkdtemp(prefix="triton_ptx_"))
  # XLA reads its flags when its backend starts: set before any JAX work. One dump folder; each compile's PTX is
  # the files it adds there.
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={root}".strip()
  import jax  # noqa: PLC0415 (after XLA_FLAGS)
  import jax.numpy as jnp  # noqa: PLC0415

  from scripts.tuning import sweep_kernels  # noqa: PLC0415

  if jax.devices()[0].platform != "gpu":
    print("probe_triton_ptx: no GPU here, so no PTX to read (run it on the GPU machine).", file=sys.stderr)
    if not args.keep:
      shutil.rmtree(root, ignore_errors=True)
    return 2
  ptxas = find_ptxas()
  print(f"{jax.devices()[0].device_kind}; ptxas: {ptxas or 'not found (no registers / spills)'}", flush=True)
  for shape in args.shapes.split(","):
    cfg = sweep_kernels.parse_shape(shape)
    for variant in args.variants.split(","):
      fn, blocks = sweep_kernels.step_fn(cfg, sweep_kernels.VARIANTS[variant])
      before = set(root.rglob("*"))
      data = sweep_kernels.config_inputs(cfg, 0)
      jax.jit(fn).lower(*data, jnp.full((cfg[0],), args.length, jnp.int32)).compile()
      added = sorted(set(root.rglob("*")) - before)
      print(f"{shape} {variant}: prefix {blocks[0]}, suffix {blocks[1]}", flush=True)
      ptx = {p: p.read_text() for p in added if p.suffix == ".ptx"}
      found = {p: kernel_bodies(text) for p, text in ptx.items()}  # each dumped file's hydragen kernels
      bodies = {name: body for kernels in found.values() for name, body in kernels.items()}
      if not bodies:
        kinds = collections.Counter(p.suffix or p.name for p in added if p.is_file())
        print(f"  no hydragen kernel in the PTX this compile dumped ({len(ptx)} PTX files; it wrote "
              f"{dict(kinds)})", flush=True)
        continue
      resources = {}
      for path, kernels in found.items():
        if ptxas and kernels:  # ptxas reads the dumped file itself
          done = subprocess.run([ptxas, f"-arch={arch_of(ptx[path])}", "-v", str(path), "-o", os.devnull],
                                capture_output=True, text=True, check=False)
          resources.update(ptxas_resources(done.stderr + done.stdout))
      for name, body in bodies.items():
        print(summary(name, instruction_counts(body), resources.get(name)), flush=True)
  print(f"dump: {root}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
