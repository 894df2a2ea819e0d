"""The README's reliability table, produced from what the tests and the soak actually ran (never written by hand).

``scripts/reliability_report.py`` runs ``tests/reliability`` with ``ZOO_RELIABILITY_LOG`` set (each test appends
``{category, test, outcome, cases}``; see ``tests/reliability/conftest.py``), reads the long soak's
``reports/soak/soak.csv`` if present, and writes ``reports/reliability.md`` with :func:`render`.
"""

from __future__ import annotations

import csv
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

# what each test category tries, in the table's words and order
CATEGORIES = {
    "hostile checkpoint files": "Hostile checkpoint files (shard indexes reaching outside, shards disagreeing with "
                                "their index, NaN/Inf/integer weights, ill-typed or absurd configs, unimplemented "
                                "reference fields, directory-like ids)",
    "bad runtime inputs": "Bad runtime inputs (ids, masks, states, generate arguments, padding layouts, positions "
                          "past the limit, host syncs in decode)",
    "random compositions": "Random model compositions of registered mixers (forward, backward, save/load, three "
                           "modes, left-padded generation)",
    "random invalid configs": "Random invalid configs and ill-typed mixer arguments (ValueError naming the field); "
                              "every field of each family's reference config.json replaced by hostile values "
                              "(ValueError, never another exception or an allocation)",
    "decode soak tokens": "Decode soak in CI (tokens generated through every bounded-state mixer)",
}


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def summarize(records: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per category: tests, cases tried, cases held (passed tests), cases not held (failed tests), skipped tests."""
    out: dict[str, dict[str, int]] = defaultdict(lambda: {"tests": 0, "cases": 0, "held": 0, "broke": 0,
                                                          "skipped": 0})
    for r in records:
        s = out[r["category"]]
        s["tests"] += 1
        if r["outcome"] == "skipped":
            s["skipped"] += 1
            continue
        s["cases"] += r["cases"]
        s["held" if r["outcome"] == "passed" else "broke"] += r["cases"]
    return dict(out)


def read_soak(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Per mixer of a soak CSV (``zoo.experiments.soak``): tokens, state bytes first/last, RSS growth, finiteness."""
    rows: dict[str, list[dict[str, str]]] = defaultdict(list)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            rows[row["spec"]].append(row)
    out = []
    for spec, rs in rows.items():
        after = [r for r in rs if int(r["tokens"]) >= 0.2 * int(rs[-1]["tokens"])] or rs
        growth = int(after[-1]["rss_bytes"]) - int(after[0]["rss_bytes"])
        ids = 8 * (int(after[-1]["tokens"]) - int(after[0]["tokens"]))
        states = {int(r["state_bytes"]) for r in rs}
        finite = all(r["finite"] == "1" for r in rs)
        load = tuple(float(rs[-1][c]) for c in ("load1", "load5", "load15")) if "load1" in rs[-1] else None
        out.append({"spec": spec, "tokens": int(rs[-1]["tokens"]), "state_constant": len(states) == 1, "load": load,
                    "state_bytes": max(states), "rss_growth": growth, "output_bytes": ids, "finite": finite,
                    "held": len(states) == 1 and finite and growth <= ids + (1 << 20)})
    return out


def render(summary: dict[str, dict[str, int]], soak: list[dict[str, Any]] | None = None, *, load: Any = None,
           soak_load: str | None = None) -> str:
    lines = [
        "# Reliability",
        "",
        "Produced by `python scripts/reliability_report.py` from the tests it ran (`tests/reliability`) and the last "
        "long soak (`reports/soak/soak.csv`, `python scripts/soak.py`); not written by hand.",
        "",
        "| what was tried | tests | cases tried | held | did not hold |",
        "|---|---:|---:|---:|---:|",
    ]
    for cat in [*CATEGORIES, *sorted(set(summary) - set(CATEGORIES))]:
        if cat not in summary:
            continue
        s = summary[cat]
        skipped = f" ({s['skipped']} skipped)" if s["skipped"] else ""
        lines.append(f"| {CATEGORIES.get(cat, cat)} | {s['tests']} | {s['cases']:,} | {s['held']:,} | "
                     f"{s['broke']:,}{skipped} |")
    if soak:
        lines += ["", "Long decode soak (`generate`, sampling, batch 1, CPU"
                  + (f"; {soak_load}" if soak_load else "") + "):", "",
                  "| mixer | tokens | state bytes | state constant | RSS growth after 20% | output ids | "
                  "outputs finite | load avg at the end (1/5/15 min) | held |",
                  "|---|---:|---:|:---:|---:|---:|:---:|---|:---:|"]
        for r in soak:
            ran_at = " / ".join(f"{x:.1f}" for x in r["load"]) if r.get("load") else "not recorded"
            lines.append(f"| `{r['spec']}` | {r['tokens']:,} | {r['state_bytes']:,} | "
                         f"{'yes' if r['state_constant'] else 'NO'} | {r['rss_growth'] / 1e6:+.2f} MB | "
                         f"{r['output_bytes'] / 1e6:.2f} MB | {'yes' if r['finite'] else 'NO'} | {ran_at} | "
                         f"{'yes' if r['held'] else 'NO'} |")
    if load is not None:
        lines += ["", f"Load average while the tests ran (1/5/15 min): {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}."]
    return "\n".join(lines) + "\n"
