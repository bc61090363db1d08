"""What the sweeps of one tuning field share (`sweep_gemm`, `sweep_levels`): their `--out` and `--commit` options,
and writing the measured field, with its provenance note, into the device's tuning file."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import time

import jax

from experiments import records
from hydragen_jax import tuning as tuning_lib


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--out", default=None, help="tuning file to write (default: the device's)")
  parser.add_argument("--base", default=None, help="tuning file whose other fields the written file keeps "
                      "(default: the one in force, $HYDRAGEN_JAX_TUNING's where set, else the device's)")
  parser.add_argument("--commit", default=None, help="default: $HYDRAGEN_JAX_COMMIT, else git rev-parse HEAD")


def check_out(parser: argparse.ArgumentParser, args: argparse.Namespace, not_measured: str | None) -> None:
  """`--out` is required where the run measures nothing (`not_measured` names why: "--tiny", "off a GPU", ...), so
  that the device's own file is written only by a real measurement. `--out` and `--log` must be files in existing
  folders and `--base` a readable tuning file: each refused here, before the sweep's minutes, not after them."""
  if args.out is None and not_measured:
    parser.error(f"--out FILE is needed with {not_measured} (the default writes the device's own tuning file)")
  for option in ("out", "log"):
    value = getattr(args, option, None)
    if value is not None and (why := tuning_lib.file_path_problem(value)):
      parser.error(f"--{option} {value!r}: {why}; expected a file path in an existing folder")
  if getattr(args, "base", None) is not None:
    try:
      tuning_lib.load(args.base)
    except (OSError, ValueError) as e:
      parser.error(f"--base {args.base!r}: not a readable tuning file: {e}")


@dataclasses.dataclass(frozen=True)
class Run:
  """One sweep's identity: the device, the file it starts from, the command line, and its start time."""
  script: str
  argv: list[str]
  kind: str
  base: tuning_lib.TuningFile
  start: float

  @classmethod
  def begin(cls, script: str, argv: list[str] | None, base: str | None = None) -> Run:
    kind = tuning_lib.device_kind()
    return cls(script, list(sys.argv[1:] if argv is None else argv), kind, base_file(base, kind), time.time())

  def write(self, args: argparse.Namespace, field: str | tuple[str, ...], tune: tuning_lib.Tuning, measured: str,
            not_measured: str | None = None) -> str:
    """Writes `tune` (the base's tuning with `field`, or several fields, measured) to `--out` or the device's file,
    the note saying where, when and by what it was measured, then `measured` (the times and the choice); returns
    the path."""
    command = f"python -m scripts.tuning.{self.script} " + " ".join(self.argv)
    commit = args.commit or records.git_commit()
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    caveat = f", NOT A MEASUREMENT ({not_measured})" if not_measured else ""
    note = (f"measured on {self.kind} by `{command}` ({date}, commit {commit}, {time.time() - self.start:.0f} s"
            f"{caveat}): {measured}")
    out = args.out or str(tuning_lib.data_file(self.kind))
    tuning_lib.write(out, tuning_lib.with_measured_field(self.base, self.kind, tune, field, note, command=command,
                                                        date=date, commit=commit))
    return out


def base_file(path: str | None, kind: str) -> tuning_lib.TuningFile:
  """The file a sweep starts from and whose other fields it keeps: `path` (--base), else the tuning in force, the
  file $HYDRAGEN_JAX_TUNING names where it is set (a sweep started from the device's file instead wrote the
  package's values over a user's own file), else the device's (`tuning.file_for`)."""
  if path:
    return tuning_lib.load(path)
  if env := os.environ.get(tuning_lib.TUNING_ENV):
    return tuning_lib.load(env)
  return tuning_lib.file_for(kind)


def off_gpu() -> str | None:
  """"off a GPU" where JAX's default backend is not a GPU, else None."""
  return None if jax.default_backend() == "gpu" else "off a GPU"
