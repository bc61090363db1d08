"""Command line: `python -m experiments {run,bench-attention,plan,report,plot,list} ...`."""

from __future__ import annotations

import argparse
import os
import sys
import tomllib


def _run_options(parser) -> None:
    """The options shared by `run` and `bench-attention`."""
    parser.add_argument("--smoke", action="store_true", help="apply the config's [smoke] overrides (CPU-sized)")
    parser.add_argument("--out",
                        help="JSONL path (default experiments/results/NAME[-smoke]-DEVICE-YYYYmmdd-HHMMSS.jsonl)")
    parser.add_argument("--plot", action="store_true", help="also draw the plots next to the results")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key after [smoke], VALUE in TOML syntax (e.g. timing.repeats=9)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p_run = sub.add_parser("run", help="run the experiment described by a config (name or path to a .toml)")
    p_run.add_argument("config")
    _run_options(p_run)

    p_bench = sub.add_parser("bench-attention", help="run configs/bench_attention.toml (issue #5)")
    p_bench.add_argument("--select", help="comma-separated indexes of bench.configs rows to run (default: all)")
    _run_options(p_bench)

    p_plot = sub.add_parser("plot", help="draw PNG plots of one or more results files")
    p_plot.add_argument("results", nargs="+")
    p_plot.add_argument("--out", help="directory for the PNGs (default: next to the first results file)")

    sub.add_parser("list", help="list the configs in experiments/configs/")

    p_report = sub.add_parser(
        "report", help="without files: regenerate README.md's results section (between its report markers) from "
                       "experiments/results/; with files: (re)write each one's markdown tables")
    p_report.add_argument("results", nargs="*")
    p_report.add_argument("--readme", default=None, help="the README to update (default: the repository's)")
    p_report.add_argument("--results-dir", default=None, help="where the results files are (default: experiments/results)")
    p_report.add_argument("--device", help="device slug (e.g. nvidia-h200) or records' device; default: the one "
                               "the README's results marker names (where it has results), else the newest "
                               "accelerator run's")
    p_report.add_argument("--check", action="store_true", help="write nothing; exit 1 (printing the diff) if stale")
    p_report.add_argument("--no-plot", action="store_true", help="do not draw a missing combined e2e plot")

    p_plan = sub.add_parser("plan", help="a config's points and whether each fits in device memory (estimates; nothing runs)")
    p_plan.add_argument("config")
    p_plan.add_argument("--capacity-gb", type=float, default=None,
                        help="device bytes_limit in GB, of which the config's memory_fraction is usable, as in a run "
                             "(default: the config's device.memory_capacity_bytes if set, else this machine's "
                             "accelerator's, else 92%% of an 80 GB H100's, which plan then names on stderr)")
    p_plan.add_argument("--smoke", action="store_true")
    p_plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")

    args = parser.parse_args(argv)
    os.environ.setdefault("MPLBACKEND", "Agg")

    from experiments import config as config_lib

    if args.command == "list":
        for path in sorted(config_lib.CONFIG_DIR.glob("*.toml")):  # (read, not validated: a listing)
            print(f"{path.stem:16} {tomllib.loads(path.read_text()).get('description', '')}")
        return 0
    if args.command == "report":
        return report(args)
    if args.command == "plan":
        from experiments import runner

        try:
            cfg = config_lib.load(args.config, smoke=args.smoke, assignments=args.set)
        except config_lib.ConfigError as e:
            print(f"config error: {e}", file=sys.stderr)
            return 2
        device = cfg.get("device", {})
        if args.capacity_gb is not None and not 0 < args.capacity_gb < float("inf"):
            print(f"plan: --capacity-gb must be a finite number > 0, got {args.capacity_gb}", file=sys.stderr)
            return 2
        from experiments import memory

        capacity = args.capacity_gb * 1e9 if args.capacity_gb is not None else memory.device_capacity(device)
        if capacity is None:  # a CPU: no device memory to go by
            capacity = 80e9 * 0.92
            print("plan: no accelerator here and no device.memory_capacity_bytes in the config: estimating against "
                  "an 80 GB H100's bytes_limit (73.6 GB); --capacity-gb sets another", file=sys.stderr)
        for row in runner.experiment_module(cfg["kind"]).plan(cfg, int(capacity)):
            print(f"{'fits' if row['fits'] else 'OOM '}  {row['needed_bytes'] / 1e9:8.1f} GB  {row['point']}  "
                  f"{','.join(row['modes'])}")
        return 0
    if args.command == "plot":
        from experiments import plot, runner

        if missing := _missing(args.results):
            print(f"plot: no results file {missing}", file=sys.stderr)
            return 2
        if args.out is not None and (why := runner.not_a_folder(args.out)):
            print(f"plot: --out {args.out!r} {why}; expected a folder for the PNGs", file=sys.stderr)
            return 2
        try:
            drawn = plot.plot_files(args.results, args.out)
        except ValueError as e:  # an unreadable results file (records.read names it and the line)
            print(f"plot: {e}", file=sys.stderr)
            return 2
        for path in drawn:
            print(path)
        if not drawn:  # e.g. a run killed before its first point: said, not a silent success
            print(f"plot: nothing to plot in {', '.join(map(str, args.results))} (no measured records)",
                  file=sys.stderr)
            return 1
        return 0

    from experiments import runner

    name = "bench_attention" if args.command == "bench-attention" else args.config
    try:
        assignments = list(args.set)
        if getattr(args, "select", None) is not None:
            assignments.append(select_rows(name, args.smoke, args.select, assignments))
        path = runner.run(name, smoke=args.smoke, out=args.out, progress=not args.no_progress,
                          assignments=assignments)
    except config_lib.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.plot:
        from experiments import plot

        for png in plot.plot_files([path], None):
            print(png)
    return _failed_points(path)


def _failed_points(path) -> int:
    """1 where a point of the run failed (status "error": out-of-memory and skipped points are results), naming the
    first few, else 0: a run whose every point failed exited 0, and `gpu_full.sh` reports failures by the status."""
    from experiments import records

    failed = [r for r in records.read(path) if r.get("status") == "error"]
    if not failed:
        return 0
    print(f"[run] {len(failed)} point(s) failed (status error), e.g. {failed[0].get('reason', '')[:300]!r}; the "
          f"records are in {path}", file=sys.stderr)
    return 1


def report(args) -> int:
    """The `report` command (see its help)."""
    import pathlib

    from experiments import records, report as report_lib, runner

    if args.results:
        if args.check or args.device or args.readme or args.results_dir:
            print("report: --check, --device, --readme and --results-dir apply to the README's section, not to "
                  "files given by name (which get their markdown tables written)", file=sys.stderr)
            return 2
        if missing := _missing(args.results):
            print(f"report: no results file {missing}", file=sys.stderr)
            return 2
        for path in args.results:
            try:
                print(runner.write_report(path))
            except ValueError as e:  # an unreadable results file (records.read names it and the line)
                print(f"report: {e}", file=sys.stderr)
                return 2
        return 0
    readme = pathlib.Path(args.readme) if args.readme else records.REPO_ROOT / "README.md"
    if not readme.is_file():
        print(f"report: --readme {str(readme)!r}: no such file", file=sys.stderr)
        return 2
    results_dir = pathlib.Path(args.results_dir) if args.results_dir else records.RESULTS_DIR
    if not results_dir.is_dir() or not any(results_dir.glob("*.jsonl")):  # a typo must not empty the README's tables
        print(f"report: --results-dir {str(results_dir)!r} is not a folder of results files (*.jsonl)", file=sys.stderr)
        return 2
    try:
        changed, diff = report_lib.update_readme(readme, results_dir, device=args.device,
                                                 check=args.check, plot=not args.no_plot)
    except ValueError as e:
        print(f"report: {readme}: {e}", file=sys.stderr)
        return 2
    if args.check:
        print(diff or f"{readme}: results section up to date")
        return 1 if changed else 0
    print(f"{readme}: results section {'rewritten' if changed else 'unchanged'}")
    return 0


def _missing(paths: list[str]) -> str | None:
    """The first of `paths` that is not a file (quoted), else None."""
    import pathlib

    return next((repr(p) for p in paths if not pathlib.Path(p).is_file()), None)


def select_rows(name: str, smoke: bool, select: str, assignments: list[str]) -> str:
    """A `--set bench.configs=[...]` assignment keeping the rows whose indexes are listed in `select`."""
    from experiments import config as config_lib

    rows = config_lib.load(name, smoke=smoke, assignments=assignments)["bench"]["configs"]
    try:
        indexes = [int(i) for i in select.split(",") if i.strip()]
    except ValueError as e:
        raise config_lib.ConfigError(f"--select {select!r}: indexes must be in 0..{len(rows) - 1}") from e
    if not indexes or any(not 0 <= i < len(rows) for i in indexes):
        raise config_lib.ConfigError(f"--select {select!r}: indexes must be in 0..{len(rows) - 1}")
    picked = [rows[i] for i in indexes]
    inline = ", ".join("{ " + ", ".join(f"{k} = {v}" for k, v in row.items()) + " }" for row in picked)
    return f"bench.configs=[{inline}]"


if __name__ == "__main__":
    sys.exit(main())
