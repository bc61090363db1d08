"""Option values of the scripts' command lines: a value a script cannot take ends in argparse's usage error (exit 2)
naming the option, the text given and what the option takes, before any work, not in a traceback from inside a run
(or, worse, a run of something else: a negative index is Python's from the end)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable


def listed(parser: argparse.ArgumentParser, option: str, text: str, kind: Callable = str, *,
           choices: Iterable[str] | None = None, low: float = 0, high: float | None = None) -> list:
  """The comma-separated values of `option`, each read by `kind` (str; int or float: a number in [low, high]; any
  other function raising ValueError for a value it does not take) and, given `choices`, one of them; a usage error
  names an empty value, one `kind` does not read, one out of range, one not among `choices` and a value given
  twice."""
  values, number = [], kind in (int, float)
  for v in str(text).split(","):
    try:
      values.append(kind(v))
      ok = v.strip() != "" and (not number or (values[-1] >= low and (high is None or values[-1] <= high)))
    except ValueError as e:
      if not number:  # kind's own message says what it takes
        parser.error(f"{option} {text!r}: {e}")
      ok = False
    if not ok:
      what = ("integers" if kind is int else "numbers") + (
          f" in [{low}, {high}]" if high is not None else f" >= {low}") if number else "values"
      parser.error(f"{option} {text!r}: expected comma-separated {what}; got {v!r}")
  if choices is not None:
    choices = list(choices)
    if bad := [v for v in values if v not in choices]:
      parser.error(f"{option} {text!r}: unknown {bad}; expected some of {', '.join(map(str, choices))}")
  if len(set(values)) < len(values):
    parser.error(f"{option} {text!r}: a value given twice (each is run once)")
  return values


def seed_configs(parser: argparse.ArgumentParser, option: str, text: str, count: int) -> list[int]:
  """Indices of the `count` seed configs (bench_attention.toml's rows, 0-based) in `text`; empty text: none."""
  if not str(text).strip():
    return []
  texts = str(text).split(",")
  if bad := [v for v in texts if not v.strip().isdecimal() or int(v) >= count]:
    parser.error(f"{option} {text!r}: expected indices of the seed configs, 0 to {count - 1}; got {bad}")
  values = [int(v) for v in texts]
  if len(set(values)) < len(values):
    parser.error(f"{option} {text!r}: a value given twice (each is run once)")
  return values


def at_least(parser: argparse.ArgumentParser, args: argparse.Namespace, **lows: float) -> None:
  """A usage error for the first option (by its dest name) whose value is below its low bound."""
  for dest, low in lows.items():
    value = getattr(args, dest)
    if value < low:
      parser.error(f"--{dest.replace('_', '-')} {value}: expected a number >= {low}")
