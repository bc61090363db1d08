"""Result records: run metadata, JSON-lines writing and reading."""

from __future__ import annotations

import datetime
import json
import math
import os
import pathlib
import subprocess
import time
import warnings
from typing import Iterable, Iterator

import jax

from hydragen_jax import tuning

REQUIRED_KEYS = ("config", "experiment", "record", "point", "mode", "status", "results", "device", "jax_version",
                 "date_utc", "git_commit", "smoke")
STATUSES = ("ok", "oom", "skipped", "error")
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"


def _git(*args: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit() -> str | None:
    """The code's commit: $HYDRAGEN_JAX_COMMIT where set (a copy of the tree whose .git is not the code's, as on the
    device machine: pass the commit on its command line), else `git rev-parse HEAD`, with `-dirty` appended where
    tracked files differ from it (uncommitted edits, or a stale .git beside a newer tree: the commit is then not
    the code that ran); None without either (and where the code is not a checkout: an installed copy inside another
    repository named that one's HEAD)."""
    if commit := os.environ.get("HYDRAGEN_JAX_COMMIT", "").strip():
        return commit
    tracked = _git("ls-files", "--error-unmatch", "experiments/records.py")
    if tracked is None or tracked.returncode != 0:  # an installed copy (pip install .): a repository around it is
        return None  # not its code's (one that tracks this file is: this tree's own, or a monorepo's)
    head = _git("rev-parse", "HEAD")
    if head is None or head.returncode != 0 or not head.stdout.strip():
        return None
    status = _git("status", "--porcelain", "--untracked-files=no")
    dirty = status is not None and status.returncode == 0 and status.stdout.strip()
    return head.stdout.strip() + ("-dirty" if dirty else "")


def device_kind() -> str:
    device = jax.devices()[0]
    return f"{device.platform}:{device.device_kind}"


def resolve_backend(chosen: str | None, cpu_backend: str | None, gpu: bool, on_gpu: str | None) -> str | None:
    """The backend a config's choice means on a device: `chosen`, except "auto": `on_gpu` on a GPU (`gpu`), else
    `cpu_backend` (the runners resolve it for this run's device, the report for a record's)."""
    if chosen != "auto":
        return chosen
    return on_gpu if gpu else cpu_backend


def device_slug(device: str | None = None) -> str:
    """A device as results files name it, the tuning files' slug ('gpu:NVIDIA H100 80GB HBM3' or its kind ->
    'nvidia-h100-80gb-hbm3'); None: this run's device (`device_kind`)."""
    return tuning.slug((device_kind() if device is None else device).split(":", 1)[-1])


def metadata() -> dict:
    return {
        "device": device_kind(),
        "jax_version": jax.__version__,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "compilation_cache": os.environ.get("JAX_COMPILATION_CACHE_DIR"),
    }


def default_output(config_name: str, smoke: bool) -> pathlib.Path:
    """`RESULTS_DIR/NAME[-smoke]-DEVICE-YYYYmmdd-HHMMSS.jsonl`, a name no file has yet (two runs of one config
    started in the same second: the second takes the next second's stamp, the form `report` reads)."""
    suffix = "-smoke" if smoke else ""
    while True:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        path = RESULTS_DIR / f"{config_name}{suffix}-{device_slug()}-{stamp}.jsonl"
        if not path.exists():
            return path
        time.sleep(0.25)


def _clean(value):
    """JSON-safe: non-finite floats become None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class RecordWriter:
    """Appends one JSON object per line, flushing each so that a killed run keeps what it measured."""

    def __init__(self, path: pathlib.Path, config: dict):
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.base = {"config": config["name"], "experiment": config["kind"], "smoke": bool(config["smoke"]),
                     **metadata()}
        self._file = open(self.path, "x")  # exclusive: an existing file (another run's records) is never truncated
        self.records: list[dict] = []

    def write(self, *, record: str, point: dict, mode: str | None, status: str, results: dict | None = None,
              reason: str | None = None) -> dict:
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        rec = {**self.base, "record": record, "point": point, "mode": mode, "status": status,
               "results": results or {}}
        if reason is not None:
            rec["reason"] = reason
        rec = _clean(rec)
        self._file.write(json.dumps(rec) + "\n")
        self._file.flush()
        self.records.append(rec)
        return rec

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read(path: str | pathlib.Path) -> list[dict]:
    """The records of a JSONL file. A last line cut off mid-write (no newline after it, not JSON: a run killed
    while writing it) is left out with a warning, so that a killed run keeps what it measured; any other line that
    is not a record raises ValueError naming the file and line."""
    records = []
    with open(path) as f:
        lines = f.readlines()
    for line_no, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if line_no == len(lines) and not raw.endswith("\n"):
                warnings.warn(f"{path}:{line_no}: the last line is cut off ({e}): left out (a run killed while "
                              "writing it)", stacklevel=2)
                break
            raise ValueError(f"{path}:{line_no}: not a JSON record ({e}; a run killed while writing it?)") from e
        missing = [k for k in REQUIRED_KEYS if k not in rec]
        if missing:
            raise ValueError(f"{path}:{line_no}: record lacks keys {missing}")
        records.append(rec)
    return records


def read_many(paths: Iterable[str | pathlib.Path]) -> Iterator[dict]:
    for path in paths:
        yield from read(path)
