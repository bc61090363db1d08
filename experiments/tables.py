"""Markdown tables of results (bench-attention and end-to-end)."""

from __future__ import annotations

import re

CASE_KEYS = ("batch", "prefix", "out", "q_heads", "kv_heads")

# The paper's end-to-end numbers (arXiv 2402.05099 v2, Table 3; CodeLlama-13b, 8 x A100-40GB, batch 1024, 128 new
# tokens): Hydragen's thousand tok/s per shared-prefix length, and the no-attention upper bound's.
PAPER_HYDRAGEN_KTOK_S = {1024: 15.6, 2048: 15.5, 4096: 15.3, 8192: 14.8, 16384: 14.0}
PAPER_NONE_KTOK_S = 18.5


def fmt_tokens(tokens: int) -> str:
    """1024 -> '1K', 16384 -> '16K'; other counts as they are."""
    return f"{tokens // 1024}K" if tokens and tokens % 1024 == 0 else str(tokens)


def paper_hydragen_over_none(prefix: int) -> float | None:
    """The paper's Hydragen / No Attention at this prefix length (None where the paper has no point)."""
    value = PAPER_HYDRAGEN_KTOK_S.get(prefix)
    return None if value is None else value / PAPER_NONE_KTOK_S


def fmt_rate(v) -> str:
    if v is None:
        return "–"
    if v >= 999_950:  # the unit after rounding: 999 960 is 1.00M, not 1000.0k
        return f"{v / 1e6:.2f}M"
    if v >= 999.5:
        return f"{v / 1e3:.1f}k"
    return f"{v:.0f}"


def _fmt_gb(nbytes: float | None) -> str:
    if nbytes is None:  # a non-finite number, written as null (records._clean)
        return "–"
    return f"{nbytes / 1e9:.2f}" if nbytes >= 1e7 else f"{nbytes / 1e9:.2e}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def group_cases(summaries: list[dict]) -> tuple[list[tuple], list[str], dict]:
    """Bench summaries by case (CASE_KEYS values, in first-seen order): (cases, variants, {case: {variant: rec}})."""
    cases, variants, by = [], [], {}
    for rec in summaries:
        case = tuple(rec["point"][k] for k in CASE_KEYS)
        if case not in by:
            cases.append(case)
            by[case] = {}
        if rec["mode"] not in variants:
            variants.append(rec["mode"])
        by[case][rec["mode"]] = rec
    return cases, variants, by


def case_cells(case: tuple) -> list[str]:
    b, p, out, hq, hkv = case
    return [str(b), str(p), str(out), f"{hq}/{hkv}"]


def cell(rec: dict | None, key: str, fmt) -> str:
    if rec is None:
        return "–"
    if rec["status"] != "ok":
        return rec["status"].upper()
    value = rec["results"].get(key)
    return "–" if value is None else fmt(value)


def bench_results_table(summaries: list[dict]) -> str:
    """tok/s per variant (Simpson over s = 1, out/2, out), floor tok/s, KV bytes at s = out."""
    cases, variants, by = group_cases(summaries)
    header = ["B", "P", "out", "Hq/Hkv"] + [f"{v} tok/s" for v in variants] + ["floor tok/s", "KV GB per-seq copies / prefix once"]
    rows = []
    for case in cases:
        recs = by[case]
        any_rec = next(iter(recs.values()))
        floor_rate = any_rec["results"].get("floor_tokens_per_s")
        copied = next((r["results"].get("kv_cache_bytes_at_out") for n, r in recs.items()
                       if n.endswith("per_sequence") and r["results"].get("kv_cache_bytes_at_out")), None)
        shared = next((r["results"].get("kv_cache_bytes_at_out") for n, r in recs.items()
                       if not n.endswith("per_sequence") and r["results"].get("kv_cache_bytes_at_out")), None)
        kv = f"{_fmt_gb(copied)} / {_fmt_gb(shared)}" if copied and shared else "–"
        rows.append(case_cells(case) + [cell(recs.get(v), "tokens_per_s", fmt_rate) for v in variants]
                    + [fmt_rate(floor_rate), kv])
    return table(header, rows)


def bench_floor_table(summaries: list[dict]) -> str:
    """Fraction of the floor per variant (Simpson-averaged) and hydragen's speedup over each other variant."""
    cases, variants, by = group_cases(summaries)
    others = [v for v in variants if v != "hydragen"]
    header = (["B", "P", "out", "Hq/Hkv"] + [f"{v} floor frac" for v in variants]
              + [f"hydragen / {v}" for v in others if "hydragen" in variants])
    rows = []
    for case in cases:
        recs = by[case]
        cells = [cell(recs.get(v), "floor_fraction", lambda x: f"{x:.3f}") for v in variants]
        if "hydragen" in variants:
            cells += [cell(recs.get("hydragen"), f"speedup_vs_{v}", lambda x: f"{x:.2f}x") for v in others]
        rows.append(case_cells(case) + cells)
    return table(header, rows)


def rates_line(rates: dict | None) -> str:
    """The device rates of a run (its `device_rates` record), one sentence; '' without one."""
    if not rates or rates["status"] != "ok":
        return ""
    from experiments import device_rates

    text = device_rates.describe(rates["results"])
    return text[0].upper() + text[1:] + ", measured at the start of the run."


def bench_markdown(summaries: list[dict], rates: dict | None) -> str:
    parts = ["# bench-attention results", ""]
    if summaries:
        s0 = summaries[0]
        parts.append(f"Device `{s0['device']}`, JAX {s0['jax_version']}, {s0['date_utc']}, commit "
                     f"`{s0['git_commit']}`, config `{s0['config']}`{' (smoke)' if s0['smoke'] else ''}, "
                     f"hydragen backend `{s0['point'].get('backend')}`.")
        parts.append("")
    if rates:
        parts += [rates_line(rates), ""]
    parts += ["## Throughput (tok/s = B / Simpson mean step time over s = 1, out/2, out)", "",
              bench_results_table(summaries), "",
              "## Fraction of the floor (floor time / measured time, Simpson-averaged) and speedups", "",
              bench_floor_table(summaries), ""]
    parts += bench_not_measured(summaries)
    return "\n".join(parts)


def not_measured(rows: list[tuple[str, str, dict]]) -> list[str]:
    """A "Not measured" section for the cells a table shows as OOM / ERROR / SKIPPED: one bullet per row and
    (status, reason), naming its modes, so that a run's own markdown says why (a run cut off mid-row, an anchor not
    installed). `rows`: (row label, mode, record) in table order; nothing where every record is ok."""
    groups: dict[tuple[str, str, str], list[str]] = {}
    for label, mode, rec in rows:
        if rec["status"] != "ok":
            reason = " ".join((rec.get("reason") or "no reason recorded").split())  # one line (XLA's are several)
            parts = re.split(r"; (?=s=\d+: )", reason)
            per_s = {re.sub(r"^s=\d+: ", "", part) for part in parts}
            if len(parts) >= 3 and len(per_s) == 1 and reason.startswith("s="):  # the same reason at each of the
                reason = per_s.pop()  # three timed s (Simpson's: every s), said once; fewer s keep their names
            groups.setdefault((label, rec["status"].upper(), reason), []).append(mode)
    if not groups:
        return []
    lines = ["## Not measured", ""]
    lines += [f"- {label}, {', '.join(modes)}: {status}: {reason}" for (label, status, reason), modes in groups.items()]
    return lines + [""]


def bench_not_measured(summaries: list[dict]) -> list[str]:
    cases, _, by = group_cases(summaries)
    return not_measured([(f"B={b} P={p} out={out} {hq}/{hkv}", mode, rec)
                         for b, p, out, hq, hkv in cases for mode, rec in by[(b, p, out, hq, hkv)].items()])


def e2e_not_measured(records: list[dict]) -> list[str]:
    """`not_measured` of e2e records, their rows in the tables' order (by the points' values)."""
    order = sorted(records, key=lambda rec: tuple((v is None, v if isinstance(v, (int, float)) else 0)
                                                  for v in rec["point"].values()))
    return not_measured([(" ".join(f"{k}={v}" for k, v in rec["point"].items()), rec["mode"], rec) for rec in order])


def by_point(records: list[dict], point_keys) -> dict[tuple, dict[str, dict]]:
    """{point (its values of point_keys): {mode: record}}, points and modes in the order the records have them."""
    by: dict[tuple, dict[str, dict]] = {}
    for rec in records:
        by.setdefault(tuple(rec["point"].get(k) for k in point_keys), {})[rec["mode"]] = rec
    return by


def e2e_table(records: list[dict], point_keys: list[str], value_key: str = "tokens_per_s") -> str:
    """One row per point (point_keys), one column per mode."""
    rows_by = by_point(records, point_keys)
    modes = list(dict.fromkeys(rec["mode"] for rec in records))
    order = sorted(rows_by, key=lambda key: tuple((v is None, v if isinstance(v, (int, float)) else 0) for v in key))
    fmt = fmt_rate if value_key.endswith("per_s") else (
        (lambda x: f"{x:.3f}") if value_key == "floor_fraction" else (lambda x: f"{x:.3g}"))  # fractions as elsewhere
    header = list(point_keys) + [f"{m} {value_key}" for m in modes]
    rows = [[str(v) for v in key] + [cell(rows_by[key].get(m), value_key, fmt) for m in modes] for key in order]
    return table(header, rows)


def tp_speedup_table(records: list[dict]) -> str:
    """Per (prefix, batch) row and mode: tok/s at each device count n > the smallest over tok/s at the smallest
    (`x` cells; OOM etc. where one of the two did not run)."""
    sizes = sorted({r["point"]["tp"] for r in records})
    by = {(r["point"]["tp"], r["point"].get("prefix"), r["point"]["batch"], r["mode"]): r for r in records}
    modes = list(dict.fromkeys(r["mode"] for r in records))
    rows = []
    for prefix, batch in sorted({(r["point"].get("prefix"), r["point"]["batch"]) for r in records},
                                key=lambda k: tuple(v or 0 for v in k)):
        row = [str(prefix), str(batch)]
        for n in sizes[1:]:
            for m in modes:
                row.append(_speedup_cell(by.get((n, prefix, batch, m)), by.get((sizes[0], prefix, batch, m))))
        rows.append(row)
    header = ["prefix", "batch"] + [f"{m} tp={n} / tp={sizes[0]}" for n in sizes[1:] for m in modes]
    return table(header, rows)


def _speedup_cell(rec: dict | None, base: dict | None) -> str:
    """rec's tok/s over base's ('1.93x'), the status of the one that did not run ('OOM'), or '–'."""
    failed = next((r for r in (rec, base) if r is not None and r["status"] != "ok"), None)
    if failed is not None:
        return failed["status"].upper()
    a, b = result(rec, "tokens_per_s"), result(base, "tokens_per_s")
    return f"{a / b:.2f}x" if a and b else "–"


def relative_table(records: list[dict], x_key: str, value_key: str = "tokens_per_s") -> str:
    """`value_key` (tokens/s) of each mode divided by its value at the smallest `x_key` (where that one
    succeeded)."""
    modes, xs, by = [], [], {}
    for rec in records:
        x = rec["point"][x_key]
        if rec["mode"] not in modes:
            modes.append(rec["mode"])
        if x not in xs:
            xs.append(x)
        by[(x, rec["mode"])] = rec
    xs.sort()
    rows = []
    for x in xs:
        row = [str(x)]
        for m in modes:
            base, rec = by.get((xs[0], m)), by.get((x, m))
            if rec is None or rec["status"] != "ok":
                row.append(rec["status"].upper() if rec else "–")
            elif base is None or base["status"] != "ok" or None in (result(base, value_key), result(rec, value_key)):
                row.append("–")
            else:
                row.append(f"{result(rec, value_key) / result(base, value_key):.3f}")
        rows.append(row)
    what = "" if value_key == "tokens_per_s" else f"{value_key} "
    return table([x_key] + [f"{m} {what}(rel. to {x_key} {xs[0]})" for m in modes], rows)


def result(rec: dict | None, key: str):
    """A result of an ok record, else None."""
    if rec is None or rec["status"] != "ok":
        return None
    return rec["results"].get(key)


def has_floors(records: list[dict]) -> bool:
    return any(result(r, "floor_s") is not None for r in records)


def _attention_floors(rec: dict) -> tuple[float, float]:
    """(attention floor with a layer's levels in one op, with each level alone) in seconds a step, cache writes
    included."""
    r = rec["results"]
    write = r["floor_parts_s"]["cache_write"]
    return r["attention_floor_s"], sum(r["attention_level_floor_s"].values()) + write


def hydragen_vs_none_rows(records: list[dict], point_keys: list[str]) -> list[tuple[tuple, dict]]:
    """Points where both hydragen and none ran: (point values, {hydragen_over_none, paper, extra_s, attention_s,
    levels_s}); the floors are None where the records have none."""
    by = by_point(records, point_keys)
    rows = []
    for key in sorted(by, key=lambda k: tuple(v if isinstance(v, (int, float)) else 0 for v in k)):
        hyd, none = by[key].get("hydragen"), by[key].get("none")
        if result(hyd, "mean_step_s") is None or result(none, "mean_step_s") is None:
            continue
        extra = hyd["results"]["mean_step_s"] - none["results"]["mean_step_s"]
        attention, levels = _attention_floors(hyd) if result(hyd, "attention_floor_s") is not None else (None, None)
        rates = result(hyd, "tokens_per_s"), result(none, "tokens_per_s")  # null where not finite (records._clean)
        rows.append((key, {"hydragen_over_none": rates[0] / rates[1] if None not in rates and rates[1] else None,
                           "paper": paper_hydragen_over_none(hyd["point"].get("prefix")), "extra_s": extra,
                           "attention_s": attention, "levels_s": levels}))
    return rows


def ms(x) -> str:
    return "–" if x is None else f"{x * 1e3:.3f}"


def ratio(a, b, digits: int = 2) -> str:
    return "–" if a is None or not b else f"{a / b:.{digits}f}"


def hydragen_vs_none_table(records: list[dict], point_keys: list[str]) -> str:
    """Hydragen against the no-attention upper bound: the throughput ratio (and the paper's), and Hydragen's extra
    time a step against the attention's own floor (its levels in one op, and each level alone; cache writes
    included)."""
    header = list(point_keys) + ["hydragen / none", "paper (13B, B=1024)", "hydragen − none (ms a step)",
                                 "attention floor (ms)", "extra / attention floor", "levels apart (ms)",
                                 "extra / levels apart"]
    rows = []
    for key, v in hydragen_vs_none_rows(records, point_keys):
        rows.append([str(x) for x in key] + [
            "–" if v["hydragen_over_none"] is None else f"{v['hydragen_over_none']:.3f}",
            "–" if v["paper"] is None else f"{v['paper']:.2f}", ms(v["extra_s"]),
            ms(v["attention_s"]), ratio(v["extra_s"], v["attention_s"]), ms(v["levels_s"]),
            ratio(v["extra_s"], v["levels_s"])])
    return table(header, rows)


def prefix_ratio_line(records: list[dict], long: int = 16384, short: int = 1024) -> str:
    """Each mode's tok/s at prefix `long` over `short`, next to the same ratio of its floors (and the paper's
    Hydragen); '' where a prefix is missing."""
    by = {(r["point"].get("prefix"), r["mode"]): r for r in records}
    parts = []
    for mode in dict.fromkeys(r["mode"] for r in records):
        a, b = by.get((long, mode)), by.get((short, mode))
        if result(a, "tokens_per_s") is None or result(b, "tokens_per_s") is None:
            continue
        text = f"{mode} {ratio(a['results']['tokens_per_s'], b['results']['tokens_per_s'])}"
        if result(a, "floor_tokens_per_s") is not None and result(b, "floor_tokens_per_s") is not None:
            text += f" (floors {ratio(a['results']['floor_tokens_per_s'], b['results']['floor_tokens_per_s'])})"
        parts.append(text)
    if not parts:
        return ""
    paper = PAPER_HYDRAGEN_KTOK_S.get(long), PAPER_HYDRAGEN_KTOK_S.get(short)
    note = f"; paper, Hydragen: {paper[0] / paper[1]:.2f}" if None not in paper else ""
    return (f"Throughput at a {fmt_tokens(long)} prefix / at {fmt_tokens(short)}: " + ", ".join(parts) + note
            + ".")


def tree_table(records: list[dict]) -> str:
    """tree_apps: decode time per variant, the time saved relative to the one-level decomposition, and (where
    recorded) the fraction of the step floor."""
    base = next((r for r in records if r["mode"] == "one_level" and r["status"] == "ok"), None)
    floors = has_floors(records)
    rows = []
    for rec in records:
        p = rec["point"]
        cells = [rec["mode"], str(p.get("levels")), str(p.get("batch"))]
        if rec["status"] == "ok":
            r = rec["results"]
            decode, base_decode = r.get("decode_s"), result(base, "decode_s")  # null where not finite
            saved = f"{1 - decode / base_decode:+.1%}" if decode is not None and base_decode else "–"
            full = f"{r['decode_s_full']:.3f}" if r.get("decode_s_full") is not None else "–"
            cells += ["–" if decode is None else f"{decode:.4g}", full, fmt_rate(r.get("tokens_per_s")),
                      _fmt_gb(r.get("cache_bytes")), saved]
            if floors:
                cells.append(cell(rec, "floor_fraction", lambda x: f"{x:.3f}"))
        else:
            cells += [rec["status"].upper()] + ["–"] * (5 if floors else 4)
        rows.append(cells)
    header = ["variant", "shared levels", "B", "decode s (G x mean step)", "decode s (whole G steps)", "tok/s",
              "cache GB", "time saved vs one_level"] + (["fraction of the step floor"] if floors else [])
    return table(header, rows)
