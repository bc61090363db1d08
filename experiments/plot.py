"""PNG plots (matplotlib, Agg) of results files, one or two figures per experiment kind."""

from __future__ import annotations

import collections
import pathlib
from typing import Iterable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments import records, tables  # noqa: E402


def _title(recs: list[dict], what: str) -> str:
    """What, the device and JAX of the first record, and the records' date (the first and last of runs of several)."""
    r = recs[0]
    smoke = " (smoke)" if r["smoke"] else ""
    dates = sorted({x["date_utc"][:10] for x in recs})
    when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
    return f"{what}{smoke}\n{r['device']}, JAX {r['jax_version']}, {when}"


def _log_if_data(ax, axis: str = "y", base: float = 10) -> None:
    """Log scale only when the axis has positive finite data (an all-OOM plot stays linear)."""
    values = []
    for line in ax.get_lines():
        values += list(line.get_ydata() if axis == "y" else line.get_xdata())
    for patch in ax.patches:
        values.append(patch.get_height() if axis == "y" else patch.get_x())
    for coll in ax.collections:
        offsets = coll.get_offsets()
        if len(offsets):
            values += list(np.asarray(offsets)[:, 1 if axis == "y" else 0])
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    if np.any(np.isfinite(arr) & (arr > 0)):
        (ax.set_yscale if axis == "y" else ax.set_xscale)("log", **({"base": base} if base != 10 else {}))


def _mark_failures(ax, xs, recs_by_x):
    """Write OOM / SKIPPED / ERROR at the foot of the bars that have no value."""
    for x, rec in zip(xs, recs_by_x):
        if rec is not None and rec["status"] != "ok":
            ax.annotate(rec["status"].upper(), (x, 0.02), xycoords=("data", "axes fraction"), fontsize=6,
                        rotation=90, ha="center", va="bottom", color="red")


def plot_bench(recs: list[dict], out_dir: pathlib.Path, stem: str) -> list[pathlib.Path]:
    summaries = [r for r in recs if r["record"] == "summary"]
    if not summaries:  # a run stopped before its summaries: rebuilt from its steps, as `report` does
        from experiments import bench_attention

        summaries = bench_attention.summaries_from_steps(recs)
    if not summaries:
        return []
    cases, variants, by = tables.group_cases(summaries)
    labels = [f"B={b}\nP={p}\nout={out}\n{hq}/{hkv}" for b, p, out, hq, hkv in cases]
    x = np.arange(len(cases))
    width = 0.8 / max(1, len(variants))
    paths = []
    for key, ylabel, fname, log in (("tokens_per_s", "tokens/s (Simpson over s)", "tokens_per_s", True),
                                    ("floor_fraction", "fraction of the floor", "floor_fraction", False)):
        fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(cases)), 4.8))
        for i, v in enumerate(variants):
            vals = [tables.result(by[c].get(v, {"status": "missing", "results": {}}), key) for c in cases]
            heights = [np.nan if val is None else val for val in vals]
            xs = x + (i - (len(variants) - 1) / 2) * width
            ax.bar(xs, heights, width, label=v)
            _mark_failures(ax, xs, [by[c].get(v) for c in cases])
        if key == "tokens_per_s":
            floors = [next(iter(by[c].values()))["results"].get("floor_tokens_per_s") for c in cases]
            ax.scatter(x, [np.nan if f is None else f for f in floors], marker="_", s=400, color="black",
                       label="floor", zorder=3)
        else:
            ax.axhline(1.0, color="black", lw=0.8, ls="--")
        if log:
            _log_if_data(ax)
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_ylabel(ylabel)
        ax.set_title(_title(summaries, f"Shared-prefix decode attention: {ylabel}"), fontsize=9)
        ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, not over them
        paths.append(_save(fig, out_dir / f"{stem}-{fname}.png"))
    return paths


def _series(recs: list[dict], x_key: str, group_key: str | None, y_key: str):
    """{group: {mode: [(x, y or None, rec)]}}"""
    out: dict = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in recs:
        g = r["point"].get(group_key) if group_key else None
        out[g][r["mode"]].append((r["point"][x_key], tables.result(r, y_key), r))
    return out


def plot_e2e_throughput(recs: list[dict], out_dir: pathlib.Path, stem: str) -> list[pathlib.Path]:
    """tok/s vs batch per prefix (a panel each; dashed: each mode's step floor), and below, where the records have
    floors, the fraction of the floor."""
    recs = [r for r in recs if r["record"] == "decode"]
    if not recs:
        return []
    series = _series(recs, "batch", "prefix", "tokens_per_s")
    floors = _series(recs, "batch", "prefix", "floor_tokens_per_s")
    fractions = _series(recs, "batch", "prefix", "floor_fraction")
    groups = sorted(series)
    rows = 2 if tables.has_floors(recs) else 1
    fig, axes = plt.subplots(rows, len(groups), figsize=(4 * len(groups), 4 * rows), squeeze=False, sharey="row")
    for col, g in enumerate(groups):
        ax = axes[0][col]
        for i, (mode, pts) in enumerate(series[g].items()):
            color = f"C{i}"
            _line(ax, pts, mode, color)
            if rows == 2:
                _line(ax, floors[g][mode], None, color, ls="--", marker=None)
                _line(axes[1][col], fractions[g][mode], mode, color)
        _log_if_data(ax, "x", base=2)
        _log_if_data(ax)
        ax.set_title(f"prefix {g}" + (" (dashed: step floor)" if rows == 2 else ""), fontsize=9)
        axes[-1][col].set_xlabel("batch size")
        if rows == 2:
            _log_if_data(axes[1][col], "x", base=2)
            axes[1][col].axhline(1.0, color="black", lw=0.8, ls="--")
    axes[0][0].set_ylabel("decode tokens/s")
    axes[0][0].legend(fontsize=7, loc="best", framealpha=1.0)  # where it covers the fewest points
    if rows == 2:
        axes[1][0].set_ylabel("fraction of the step floor")
    fig.suptitle(_title(recs, "End-to-end decode throughput"), fontsize=9)
    return [_save(fig, out_dir / f"{stem}-throughput.png")]


def _line(ax, pts, label, color, ls="-", marker="o") -> None:
    """One series [(x, y or None, rec)], sorted by x; failed points annotated at the axis' foot."""
    pts = sorted(pts, key=lambda p: p[0])
    ax.plot([p[0] for p in pts], [np.nan if p[1] is None else p[1] for p in pts], marker=marker, ls=ls,
            color=color, label=label)
    for x, y, rec in pts:
        if y is None and rec["status"] != "ok":
            ax.annotate(rec["status"].upper(), (x, 0), xycoords=("data", "axes fraction"), fontsize=6,
                        rotation=90, va="bottom", color="red")


def _save(fig, path: pathlib.Path) -> pathlib.Path:
    """Lays out, writes (PNG, 120 dpi) and closes the figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_long_document(recs: list[dict], out_dir: pathlib.Path, stem: str) -> list[pathlib.Path]:
    """tok/s vs prefix, the same relative to the shortest prefix (dashed: the step floor's, where recorded), and
    the fraction of the floor."""
    recs = [r for r in recs if r["record"] == "decode"]
    if not recs:
        return []
    series = _series(recs, "prefix", None, "tokens_per_s")[None]
    floors = _series(recs, "prefix", None, "floor_tokens_per_s")[None]
    fractions = _series(recs, "prefix", None, "floor_fraction")[None]
    with_floors = tables.has_floors(recs)
    fig, axes = plt.subplots(1, 3 if with_floors else 2, figsize=(15 if with_floors else 10, 4))
    for i, (mode, pts) in enumerate(series.items()):
        color = f"C{i}"
        _line(axes[0], pts, mode, color)
        _line(axes[1], _relative(pts), mode, color)
        if with_floors:
            _line(axes[0], floors[mode], None, color, ls="--", marker=None)
            _line(axes[1], _relative(floors[mode]), None, color, ls="--", marker=None)
            _line(axes[2], fractions[mode], mode, color)
    for ax in axes:
        _log_if_data(ax, "x", base=2)
        ax.set_xlabel("shared prefix length (tokens)")
    _log_if_data(axes[0])
    axes[0].set_ylabel("decode tokens/s" + (" (dashed: step floor)" if with_floors else ""))
    axes[1].set_ylabel("throughput relative to the shortest prefix")
    axes[1].axhline(1.0, color="black", lw=0.8, ls="--")
    if with_floors:
        axes[2].set_ylabel("fraction of the step floor")
        axes[2].axhline(1.0, color="black", lw=0.8, ls="--")
    axes[0].legend(fontsize=7)
    batch = recs[0]["point"].get("batch")
    fig.suptitle(_title(recs, f"Long shared document, batch {batch}"), fontsize=9)
    return [_save(fig, out_dir / f"{stem}-relative.png")]


def _relative(pts):
    """A series divided by its value at the smallest x (NaN where that one is missing)."""
    pts = sorted(pts, key=lambda p: p[0])
    base = pts[0][1] if pts else None
    return [(x, None if y is None or not base else y / base, rec) for x, y, rec in pts]


def plot_tree_apps(recs: list[dict], out_dir: pathlib.Path, stem: str) -> list[pathlib.Path]:
    """Decode time per variant; where recorded, the floor's decode time (black mark) and the fraction over each
    bar."""
    recs = [r for r in recs if r["record"] == "decode"]
    if not recs:
        return []
    labels = [r["mode"] for r in recs]
    vals = [np.nan if v is None else v for v in (tables.result(r, "decode_s") for r in recs)]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(labels, vals, color=["C0", "C1", "C2", "C3"][: len(labels)])
    for i, r in enumerate(recs):
        if r["status"] != "ok":
            ax.annotate(r["status"].upper(), (i, 0), fontsize=8, ha="center", va="bottom", color="red")
        elif r["results"].get("floor_s") is not None:
            floor_decode = r["point"]["generate"] * r["results"]["floor_s"]
            ax.scatter([i], [floor_decode], marker="_", s=400, color="black", zorder=3,
                       label="step floor x G" if i == 0 else None)
            ax.annotate(f"{r['results']['floor_fraction']:.2f} of floor", (i, vals[i]), fontsize=7, ha="center",
                        va="bottom")
    ax.set_xlim(-0.5, len(recs) - 0.5)  # every variant's tick and label (an OOM bar has no height to reach it)
    ax.set_ylabel("decode time (s)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    p = recs[0]["point"]
    ax.set_title(_title(recs, f"APPS-like tree: {p.get('problems')} problems x {p.get('samples')} samples"),
                 fontsize=9)
    return [_save(fig, out_dir / f"{stem}-time.png")]


PLOTTERS = {
    "bench_attention": plot_bench,
    "e2e_throughput": plot_e2e_throughput,
    "long_document": plot_long_document,
    "tree_apps": plot_tree_apps,
}


def plot_records(recs: list[dict], out_dir: str | pathlib.Path, stem: str) -> list[pathlib.Path]:
    """One plot set per experiment kind and device: records of several devices never share a line (their
    throughputs are not one curve); with several, each device's PNGs carry its slug ("-nvidia-h200")."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    groups = collections.defaultdict(list)
    for r in recs:
        if "tp" in r["point"] and r["mode"] is not None:  # tensor parallel runs: one series per mode and device count
            r = {**r, "mode": f"{r['mode']} tp={r['point']['tp']}"}
        groups[r["experiment"], r["device"]].append(r)
    kinds = {kind for kind, _ in groups}
    devices = {device for _, device in groups}
    short = {d: records.device_slug(d) for d in devices}  # the results files' slug ("nvidia-h200")
    if len(set(short.values())) < len(devices):  # two devices of one slug ("NVIDIA H200", "nvidia h200"): numbered
        short = {d: f"{short[d]}-{i}" for i, d in enumerate(sorted(devices), 1)}
    for (kind, device), group in groups.items():
        plotter = PLOTTERS.get(kind)
        if plotter is None:
            continue
        name = stem if len(kinds) == 1 else f"{stem}-{kind}"
        if len(devices) > 1:
            name += "-" + short[device]
        paths += plotter(group, out_dir, name)
    return paths


def plot_files(paths: Iterable[str | pathlib.Path], out_dir: str | pathlib.Path | None) -> list[pathlib.Path]:
    paths = [pathlib.Path(p) for p in paths]
    recs = list(records.read_many(paths))
    out_dir = pathlib.Path(out_dir) if out_dir else paths[0].parent
    stem = paths[0].stem if len(paths) == 1 else "combined"
    return plot_records(recs, out_dir, stem)
