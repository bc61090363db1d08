"""Dispatch a loaded config to its experiment, write JSONL (+ markdown), return the output path."""

from __future__ import annotations

import pathlib

from experiments import config as config_lib
from experiments import records


def experiment_module(kind: str):
    if kind == "bench_attention":
        from experiments import bench_attention

        return bench_attention
    if kind in ("e2e_throughput", "long_document", "tree_apps"):
        from experiments import e2e

        return e2e
    raise config_lib.ConfigError(f"key 'kind': no experiment {kind!r}")


def run_config(cfg: dict, out: str | pathlib.Path | None = None, *, progress: bool = True) -> pathlib.Path:
    path = pathlib.Path(out) if out else records.default_output(cfg["name"], cfg["smoke"])
    if path.suffix == ".md":  # its markdown tables go to the same name with .md: they would replace the records
        raise config_lib.ConfigError(f"--out {str(path)!r}: the records' file cannot end in .md (its markdown tables "
                                     f"are written to {path.with_suffix('.md').name}); use e.g. "
                                     f"{path.with_suffix('.jsonl').name}")
    if out and (why := not_a_folder(str(path.absolute().parent))):  # (mkdir would raise FileExistsError and such)
        raise config_lib.ConfigError(f"--out {str(path)!r}: its folder {why}")
    if out and path.exists():  # an earlier run's records: never truncated by a new run
        raise config_lib.ConfigError(f"--out {str(path)!r} exists (an earlier run's results?): give a new name or "
                                     f"move it away first")
    module = experiment_module(cfg["kind"])
    print(f"[run] {cfg['name']} ({cfg['kind']}{', smoke' if cfg['smoke'] else ''}) -> {path}", flush=True)
    try:
        with records.RecordWriter(path, cfg) as writer:
            module.run(cfg, writer, progress=progress)
    except BaseException:
        if path.exists() and path.stat().st_size == 0:  # failed before its first record: no empty file left
            path.unlink()
        raise
    markdown = write_report(path)
    print(f"[run] wrote {path} and {markdown}", flush=True)
    return path


def not_a_folder(path: str) -> str | None:
    """Why `path` cannot be (or become) a folder: it or a folder above it is a file; None where it can."""
    for part in [path, *map(str, pathlib.Path(path).absolute().parents)]:
        if pathlib.Path(part).exists():
            return None if pathlib.Path(part).is_dir() else (
                "is a file" if part == path else f"lies under the file {part!r}")
    return None


def write_report(path: str | pathlib.Path) -> pathlib.Path:
    """The markdown tables of a results file (also of a partial one, e.g. after a timeout), next to it."""
    path = pathlib.Path(path)
    recs = records.read(path)
    if not recs:
        raise ValueError(f"{path}: no records")
    markdown = path.with_suffix(".md")
    experiment_module(recs[0]["experiment"]).write_markdown(markdown, recs)
    return markdown


def run(name_or_path: str, *, smoke: bool = False, out: str | None = None, progress: bool = True,
        assignments: list[str] | None = None) -> pathlib.Path:
    cfg = config_lib.load(name_or_path, smoke=smoke, assignments=assignments)
    return run_config(cfg, out, progress=progress)
