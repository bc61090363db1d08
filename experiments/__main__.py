"""Command line: `python -m experiments {run,plot,bench-attention,list} ...`."""

from __future__ import annotations

import argparse
import os
import sys


def _run_options(parser) -> None:
    """The options shared by `run` and `bench-attention`."""
    parser.add_argument("--smoke", action="store_true", help="apply the config's [smoke] overrides (CPU-sized)")
    parser.add_argument("--out", help="JSONL path (default experiments/results/NAME-DEVICE-DATE.jsonl)")
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

    p_report = sub.add_parser("report", help="(re)write the markdown tables of results files")
    p_report.add_argument("results", nargs="+")

    p_plan = sub.add_parser("plan", help="a config's points and whether each fits in device memory (estimates; nothing runs)")
    p_plan.add_argument("config")
    p_plan.add_argument("--capacity-gb", type=float, default=80 * 0.92,
                        help="device bytes_limit in GB (default: 92%% of an 80 GB H100)")
    p_plan.add_argument("--smoke", action="store_true")
    p_plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")

    args = parser.parse_args(argv)
    os.environ.setdefault("MPLBACKEND", "Agg")

    from experiments import config as config_lib

    if args.command == "list":
        for path in sorted(config_lib.CONFIG_DIR.glob("*.toml")):
            print(path.stem)
        return 0
    if args.command == "report":
        from experiments import runner

        for path in args.results:
            print(runner.write_report(path))
        return 0
    if args.command == "plan":
        from experiments import runner

        cfg = config_lib.load(args.config, smoke=args.smoke, assignments=args.set)
        for row in runner.experiment_module(cfg["kind"]).plan(cfg, int(args.capacity_gb * 1e9)):
            print(f"{'fits' if row['fits'] else 'OOM '}  {row['needed_bytes'] / 1e9:8.1f} GB  {row['point']}  "
                  f"{','.join(row['modes'])}")
        return 0
    if args.command == "plot":
        from experiments import plot

        for path in plot.plot_files(args.results, args.out):
            print(path)
        return 0

    from experiments import runner

    name = "bench_attention" if args.command == "bench-attention" else args.config
    try:
        assignments = list(args.set)
        if getattr(args, "select", None):
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
    return 0


def select_rows(name: str, smoke: bool, select: str, assignments: list[str]) -> str:
    """A `--set bench.configs=[...]` assignment keeping the rows whose indexes are listed in `select`."""
    from experiments import config as config_lib

    rows = config_lib.load(name, smoke=smoke, assignments=assignments)["bench"]["configs"]
    try:
        picked = [rows[int(i)] for i in select.split(",") if i.strip()]
    except (ValueError, IndexError) as e:
        raise config_lib.ConfigError(f"--select {select!r}: indexes must be in 0..{len(rows) - 1}") from e
    inline = ", ".join("{ " + ", ".join(f"{k} = {v}" for k, v in row.items()) + " }" for row in picked)
    return f"bench.configs=[{inline}]"


if __name__ == "__main__":
    sys.exit(main())
