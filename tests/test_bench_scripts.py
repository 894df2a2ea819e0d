"""The per-architecture bench scripts never replace a report they did not write unless told: with ``results.md``
already in ``--out`` they stop with a usage error before measuring anything, and the file is untouched."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.mark.parametrize("name", ["bench_dna", "bench_infllmv2", "bench_lact", "bench_s4"])
def test_bench_script_refuses_to_overwrite_a_report(name, tmp_path, monkeypatch, capsys):
    report = tmp_path / "results.md"
    report.write_text("hand-written notes\n")
    monkeypatch.setattr(sys, "argv", [f"{name}.py", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(SCRIPTS / f"{name}.py"), run_name="__main__")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "results.md exists" in err and "--overwrite" in err
    assert report.read_text() == "hand-written notes\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.md"]
