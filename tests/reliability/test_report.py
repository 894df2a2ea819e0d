"""The reliability table is computed from the tests' log and the soak's CSV; the soak writes its report."""

from __future__ import annotations

import json

from zoo.experiments.reliability import read_log, read_soak, render, summarize
from zoo.experiments.soak import bounded_mixers, read_results, run, soak, write_report


def test_table_counts_cases_and_outcomes(tmp_path):
    log = tmp_path / "log.jsonl"
    records = [
        {"category": "hostile checkpoint files", "test": "a[1]", "outcome": "passed", "cases": 1},
        {"category": "hostile checkpoint files", "test": "a[2]", "outcome": "failed", "cases": 1},
        {"category": "random compositions", "test": "p", "outcome": "passed", "cases": 16},
        {"category": "bad runtime inputs", "test": "s", "outcome": "skipped", "cases": 1},
    ]
    log.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    s = summarize(read_log(log))
    assert s["hostile checkpoint files"] == {"tests": 2, "cases": 2, "held": 1, "broke": 1, "skipped": 0}
    assert s["random compositions"]["cases"] == 16 and s["bad runtime inputs"]["skipped"] == 1
    csv = tmp_path / "soak.csv"
    csv.write_text("mixer,spec,tokens,rss_bytes,state_bytes,finite,seconds\n"
                   "m,m(a=1),100,1000000,64,1,1.0\nm,m(a=1),500,1000000,64,1,2.0\nm,m(a=1),1000,1003000,64,1,3.0\n"
                   "w,w(b=2),500,1000000,64,1,1.0\nw,w(b=2),1000,9000000,96,1,2.0\n")
    soak = read_soak(csv)
    assert [(r["spec"], r["held"], r["state_constant"]) for r in soak] == [("m(a=1)", True, True),
                                                                           ("w(b=2)", False, False)]
    md = render(s, soak, load=(1.0, 2.0, 3.0))
    assert "| 2 | 2 | 1 | 1 |" in md and "| 1 | 16 | 16 | 0 |" in md
    assert "| `m(a=1)` | 1,000 | 64 | yes | +0.00 MB | 0.00 MB | yes | not recorded | yes |" in md
    assert "| `w(b=2)` | 1,000 | 96 | NO |" in md and "1.0 / 2.0 / 3.0" in md


def test_soak_report_is_written(tmp_path):
    r = soak(bounded_mixers()[0], 40, sample_every=10, n_layers=1)
    write_report([r], tmp_path)
    md = (tmp_path / "soak.md").read_text()
    assert f"| `{r.spec}` | 40 |" in md and "load avg" in md
    assert (tmp_path / "soak.csv").read_text().count("\n") == 1 + len(r.samples)
    assert (tmp_path / "soak.png").stat().st_size > 1000


def test_soak_report_keeps_other_mixers_runs(tmp_path):
    """``run(keep=True)`` soaks only the given mixers and keeps the runs recorded for the others (a newly registered
    mixer is soaked alone); the CSV round-trips every sample and the load average."""
    first, second = bounded_mixers()[:2]
    a = soak(first, 30, sample_every=10, n_layers=1)
    a.load = (1.25, 2.5, 3.75)
    write_report([a], tmp_path)
    back = read_results(tmp_path / "soak.csv")
    assert [(r.mixer, r.spec, r.tokens, r.load, r.samples) for r in back] == \
        [(a.mixer, a.spec, 30, a.load, [{**s, "seconds": round(s["seconds"], 2)} for s in a.samples])]
    new = run(20, tmp_path, mixers=[second], sample_every=10, progress=False, keep=True)
    assert [r.mixer for r in new] == [second]
    assert {r.mixer: r.tokens for r in read_results(tmp_path / "soak.csv")} == {first: 30, second: 20}
    md = (tmp_path / "soak.md").read_text()
    assert f"| `{a.spec}` | 30 |" in md and "1.2 / 2.5 / 3.8" in md and f"| `{new[0].spec}` | 20 |" in md
    table = render({}, read_soak(tmp_path / "soak.csv"))  # the README table quotes each run's load
    assert f"| `{a.spec}` | 30 |" in table and "| 1.2 / 2.5 / 3.8 |" in table
    run(20, tmp_path, mixers=[second], sample_every=10, progress=False)  # without keep: only the new run
    assert [r.mixer for r in read_results(tmp_path / "soak.csv")] == [second]
