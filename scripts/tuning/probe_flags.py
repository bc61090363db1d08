"""Probe (development tool): XLA flags on the compiled decode loop, each setting in a fresh process.

XLA_FLAGS are read once per process, so each setting runs `scripts.tuning.probe_host --untraced` (the decode loop of
a random 7B-shaped model, `--layers` layers, calls of `--steps` steps timed without the profiler) in a child process
of its own, for each batch; the settings are run `--rounds` times in turn (A B C A B C ...), so that a difference
can be told from the spread between processes. Prints per batch and mode the median ms a call of each setting and
its ratio to the first setting.

Settings (name -> flags): `base` (none: XLA's defaults and `models.COMPILER_OPTIONS`, CONCURRENT command buffers
among them), `lhs` (the command buffer in the scheduler's order, XLA's default), `concurrent` (the graph of the
fusions' data dependencies, so that independent kernels may overlap), `nopdl` / `pdl` (programmatic dependent launch
off / on: a kernel's successor may start its prologue before the kernel ends, Hopper and later; on by default in
this XLA), `nopdl_lhs`; or `name=--flag=value --flag=value` for any other. A flag set here wins over the same
option in `models.COMPILER_OPTIONS` (which leaves to XLA_FLAGS what they set).

Usage: python -m scripts.tuning.probe_flags [--settings lhs,base] [--batches 8,64] [--layers 8]
       [--rounds 1] [--modes none,hydragen] [--tiny]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import statistics
import subprocess
import sys
import time

import models
from scripts import cli

PDL_ON = "--xla_gpu_enable_pdl=true --xla_gpu_enable_pdl_launch=true"
PDL_OFF = "--xla_gpu_enable_pdl=false --xla_gpu_enable_pdl_launch=false"
CONCURRENT = "--xla_gpu_command_buffer_scheduling_mode=CONCURRENT"
LHS = "--xla_gpu_command_buffer_scheduling_mode=LHS"
SETTINGS = {"base": "", "lhs": LHS, "concurrent": CONCURRENT, "nopdl": PDL_OFF, "pdl": PDL_ON,
            "nopdl_lhs": f"{PDL_OFF} {LHS}"}
LINE = re.compile(r"\[(\w+) k=\d+\] untraced.*: while ([0-9.]+) ms")


def setting(spec: str) -> tuple[str, str]:
  """(name, flags) of `--settings` entry `spec`: a known name or `name=flags`."""
  if "=" in spec.split("--")[0]:
    name, flags = spec.split("=", 1)
    return name, flags
  if spec not in SETTINGS:
    raise ValueError(f"unknown setting {spec!r} (known: {', '.join(SETTINGS)}; or name=--flag=value)")
  return spec, SETTINGS[spec]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--settings", default="lhs,base",
                      help="comma-separated; an entry name=FLAGS may not contain a comma")
  parser.add_argument("--batches", default="8,64")
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--prefix", type=int, default=1024)
  parser.add_argument("--steps", type=int, default=16)
  parser.add_argument("--calls", type=int, default=9, help="untraced calls a process (median)")
  parser.add_argument("--rounds", type=int, default=1)
  parser.add_argument("--modes", default="none,hydragen")
  parser.add_argument("--timeout", type=float, default=150, help="seconds a child process may take")
  parser.add_argument("--tiny", action="store_true", help="a tiny model (a CPU check that the script runs)")
  args = parser.parse_args()
  settings = cli.listed(parser, "--settings", args.settings, setting)
  if len({name for name, _ in settings}) < len(settings):
    parser.error(f"--settings {args.settings!r}: a name given twice (use --rounds to repeat a setting)")
  batches = cli.listed(parser, "--batches", args.batches, int, low=1)
  cli.listed(parser, "--modes", args.modes, choices=models.MODES)
  cli.at_least(parser, args, layers=1, prefix=1, steps=1, calls=1, rounds=1, timeout=1)
  times = collections.defaultdict(list)  # (batch, mode, name) -> medians, one a process
  for batch in batches:
    for r in range(args.rounds):
      for name, flags in settings:
        env = dict(os.environ)
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
        cmd = [sys.executable, "-m", "scripts.tuning.probe_host", "--batch", str(batch), "--prefix",
               str(args.prefix), "--layers", str(args.layers), "--steps", str(args.steps), "--calls", "0",
               "--untraced", str(args.calls), "--modes", args.modes] + (["--tiny"] if args.tiny else [])
        t = time.perf_counter()
        try:
          p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
          out, rc = p.stdout, p.returncode
        except subprocess.TimeoutExpired as e:
          text = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
          out, rc, err = text(e.stdout), "timeout", text(e.stderr)
        else:
          err = p.stderr
        found = LINE.findall(out)
        for mode, ms in found:
          times[batch, mode, name].append(float(ms))
        print(f"== B={batch} round {r} {name} ({flags or 'default flags'}): rc={rc}, "
              f"{time.perf_counter() - t:.0f} s; " + ", ".join(f"{m} {ms} ms" for m, ms in found), flush=True)
        if rc != 0:
          print(err[-2000:], flush=True)
  print(f"\nmedian ms a call of {args.steps} steps ({args.layers} layers, P = {args.prefix}), ratio to "
        f"{settings[0][0]}:")
  for (batch, mode) in sorted({(b, m) for b, m, _ in times}):
    base = times.get((batch, mode, settings[0][0]))
    cells = []
    for name, _ in settings:
      v = times.get((batch, mode, name))
      if v:
        med = statistics.median(v)
        ratio = f" ({med / statistics.median(base):.3f})" if base else ""
        cells.append(f"{name} {med:.3f}{ratio} [{', '.join(f'{x:.3f}' for x in v)}]")
    print(f"  B={batch} {mode}: " + "; ".join(cells))


if __name__ == "__main__":
  main()
