"""The S4 benchmark study on tiny sizes: every case runs, the report and files are written, the materialised path
is skipped above its cap with the size it would need."""

from __future__ import annotations

import csv

import pytest

from zoo.experiments.s4_bench import NAIVE_PEAK, Setup, naive_bytes, run

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("mode", ["dplr", "diag"])
def test_s4_bench_tiny(tmp_path, mode):
    cap = NAIVE_PEAK[mode] * naive_bytes(16, 64, 8, mode) / 2**30  # the materialised path fits at L=64 only
    s = Setup(lengths=[64, 128], widths=[16], d_state=8, mode=mode, scan_steps=32, repeats=1,
              kernel_cases=[(16, 128)], decode_width=16, decode_contexts=[32, 96], decode_steps=4, decode_rounds=2,
              naive_cap_gb=cap, isolate=False)
    out = run(s, tmp_path)
    rows = list(csv.DictReader(open(out / "results.csv")))
    status = {(r["kind"], r["L"]): r["status"] for r in rows}
    assert status[("naive", "64")] == "ok" and status[("naive", "128")].startswith("skipped: materialises")
    assert all(v == "ok" for (k, _), v in status.items() if k != "naive")
    scan = next(r for r in rows if r["kind"] == "scan" and r["L"] == "128")
    assert scan["scan_tokens_timed"] == "32"  # timed over 32 steps, scaled to 128
    md = (out / "results.md").read_text()
    assert "Decode at 96 vs 32 tokens of context" in md and "| 16 | 128 |" in md
    assert (out / "s4_bench.png").stat().st_size > 0
