"""Markdown tables of results (bench-attention and end-to-end)."""

from __future__ import annotations

CASE_KEYS = ("batch", "prefix", "out", "q_heads", "kv_heads")


def _fmt_rate(v) -> str:
    if v is None:
        return "–"
    if v >= 1e6:
        return f"{v / 1e6:.2f}M"
    if v >= 1e3:
        return f"{v / 1e3:.1f}k"
    return f"{v:.0f}"


def _fmt_gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f}" if nbytes >= 1e7 else f"{nbytes / 1e9:.2e}"


def _table(header: list[str], rows: list[list[str]]) -> str:
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


def _case_cells(case: tuple) -> list[str]:
    b, p, out, hq, hkv = case
    return [str(b), str(p), str(out), f"{hq}/{hkv}"]


def _cell(rec: dict | None, key: str, fmt) -> str:
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
        rows.append(_case_cells(case) + [_cell(recs.get(v), "tokens_per_s", _fmt_rate) for v in variants]
                    + [_fmt_rate(floor_rate), kv])
    return _table(header, rows)


def bench_floor_table(summaries: list[dict]) -> str:
    """Fraction of the floor per variant (Simpson-averaged) and hydragen's speedup over each other variant."""
    cases, variants, by = group_cases(summaries)
    others = [v for v in variants if v != "hydragen"]
    header = (["B", "P", "out", "Hq/Hkv"] + [f"{v} floor frac" for v in variants]
              + [f"hydragen / {v}" for v in others if "hydragen" in variants])
    rows = []
    for case in cases:
        recs = by[case]
        cells = [_cell(recs.get(v), "floor_fraction", lambda x: f"{x:.3f}") for v in variants]
        if "hydragen" in variants:
            cells += [_cell(recs.get("hydragen"), f"speedup_vs_{v}", lambda x: f"{x:.2f}x") for v in others]
        rows.append(_case_cells(case) + cells)
    return _table(header, rows)


def bench_markdown(summaries: list[dict], rates: dict | None) -> str:
    parts = ["# bench-attention results", ""]
    if summaries:
        s0 = summaries[0]
        parts.append(f"Device `{s0['device']}`, JAX {s0['jax_version']}, {s0['date_utc']}, commit "
                     f"`{s0['git_commit']}`, config `{s0['config']}`{' (smoke)' if s0['smoke'] else ''}, "
                     f"hydragen backend `{s0['point'].get('backend')}`.")
        parts.append("")
    if rates:
        r = rates["results"]
        copy_bw = r.get("copy_bandwidth_bytes_per_s", r["bandwidth_bytes_per_s"])
        read_bw = r.get("read_bandwidth_bytes_per_s")
        read = f", read-only {read_bw / 1e12:.3f} TB/s" if read_bw else ""
        parts.append(f"Floor bandwidth {r['bandwidth_bytes_per_s'] / 1e12:.3f} TB/s (the larger of: copy "
                     f"{copy_bw / 1e12:.3f} TB/s over {r['copy_bytes'] / 2**30:.2f} GiB read + written{read}), "
                     f"bf16 matmul {r['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s (n = {r['matmul_n']}).")
        parts.append("")
    parts += ["## Throughput (tok/s = B / Simpson mean step time over s = 1, out/2, out)", "",
              bench_results_table(summaries), "",
              "## Fraction of the floor (floor time / measured time, Simpson-averaged) and speedups", "",
              bench_floor_table(summaries), ""]
    return "\n".join(parts)


def e2e_table(records: list[dict], point_keys: list[str], value_key: str = "tokens_per_s") -> str:
    """One row per point (point_keys), one column per mode."""
    modes, rows_by, order = [], {}, []
    for rec in records:
        key = tuple(rec["point"].get(k) for k in point_keys)
        if key not in rows_by:
            rows_by[key] = {}
            order.append(key)
        if rec["mode"] not in modes:
            modes.append(rec["mode"])
        rows_by[key][rec["mode"]] = rec
    order.sort(key=lambda key: tuple((v is None, v if isinstance(v, (int, float)) else 0) for v in key))
    fmt = _fmt_rate if value_key.endswith("per_s") else (lambda x: f"{x:.3g}")
    header = list(point_keys) + [f"{m} {value_key}" for m in modes]
    rows = [[str(v) for v in key] + [_cell(rows_by[key].get(m), value_key, fmt) for m in modes] for key in order]
    return _table(header, rows)


def relative_table(records: list[dict], x_key: str) -> str:
    """tokens/s of each mode divided by its value at the smallest `x_key` (where that one succeeded)."""
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
            elif base is None or base["status"] != "ok":
                row.append("–")
            else:
                row.append(f"{rec['results']['tokens_per_s'] / base['results']['tokens_per_s']:.3f}")
        rows.append(row)
    return _table([x_key] + [f"{m} (rel. to {x_key} {xs[0]})" for m in modes], rows)


def tree_table(records: list[dict]) -> str:
    """tree_apps: decode time per variant and the time saved relative to the one-level decomposition."""
    base = next((r for r in records if r["mode"] == "one_level" and r["status"] == "ok"), None)
    rows = []
    for rec in records:
        p = rec["point"]
        cells = [rec["mode"], str(p.get("levels")), str(p.get("batch"))]
        if rec["status"] == "ok":
            r = rec["results"]
            saved = f"{1 - r['decode_s'] / base['results']['decode_s']:+.1%}" if base else "–"
            full = f"{r['decode_s_full']:.3f}" if r.get("decode_s_full") is not None else "–"
            cells += [f"{r['decode_s']:.4g}", full, _fmt_rate(r["tokens_per_s"]), _fmt_gb(r["cache_bytes"]), saved]
        else:
            cells += [rec["status"].upper(), "–", "–", "–", "–"]
        rows.append(cells)
    header = ["variant", "shared levels", "B", "decode s (G x mean step)", "decode s (whole G steps)", "tok/s",
              "cache GB",
              "time saved vs one_level"]
    return _table(header, rows)
