"""The benchmark harness: the --quick run end to end, FLOP formulas against hand counts, the exponent fit.

Speed is never asserted: only that every case runs and the reports are complete and parse.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

import zoo
from zoo.bench import flops as F
from zoo.bench.cases import PHASES, SUBJECTS, UNAVAILABLE, Case, case_flops, make_cases
from zoo.bench.cli import main
from zoo.bench.runner import RunOptions, run_case
from zoo.bench.timing import Timing, fit_exponent


# ---------------------------------------------------------------------------------------------- --quick end to end
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    out = tmp_path_factory.mktemp("bench")
    rc = main(["--quick", "--out", str(out), "--stem", "quick", "--no-progress"])
    return rc, out


def test_quick_run_succeeds_and_writes_reports(quick_run: tuple[int, Path]) -> None:
    rc, out = quick_run
    assert rc == 0
    assert (out / "quick.json").is_file() and (out / "quick.md").is_file()
    for png in ("quick-scaling.png", "quick-decode.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "quick.md").read_text()
    assert "| subject | phase | T | zoo ms | reference |" in md and "## Scaling" in md


def test_quick_json_holds_every_registered_case(quick_run: tuple[int, Path]) -> None:
    _, out = quick_run
    report = json.loads((out / "quick.json").read_text())
    assert report["schema"] == "zoo-bench/1" and report["mode"] == "quick"
    machine = report["machine"]
    for key in ("cpu_model", "cpu_count", "torch", "transformers", "device", "load_average_start"):
        assert key in machine
    assert machine["gemm"]["flops_per_s"] > 0

    expected = make_cases(sorted(SUBJECTS), list(PHASES), [64], dtype="float32", device="cpu", size="quick")
    by_id = {c["id"]: c for c in report["cases"]}
    assert sorted(by_id) == sorted(c.id for c in expected)
    registered = set(zoo.list_mixers())
    for case in expected:
        r = by_id[case.id]
        available = all(m in registered for m in SUBJECTS[case.subject].zoo_mixers)
        assert r["status"] == ("ok" if available else UNAVAILABLE), (case.id, r["status"], r["impls"])
        for impl, e in r["impls"].items():
            if impl == "zoo" and not available:
                assert e["status"] == UNAVAILABLE
                continue
            assert e["status"] == "ok", (case.id, impl, e)
            t = e["time_s"]
            assert t["n"] == 1 and t["min"] <= t["median"] <= t["max"] and t["median"] > 0
            assert e["flops"] > 0 and e["flops_per_s"] > 0
            assert e["mem_status"] == "ok" and isinstance(e["mem_bytes"], int), (case.id, impl, e)
        if r["status"] == "ok" and r.get("reference"):
            assert r["speedup"] > 0
    for s in report["scaling"]:
        assert {"subject", "phase", "impl", "T", "time_s", "time_exponent", "mem_exponent"} <= set(s)


def test_render_rewrites_reports_from_json(quick_run: tuple[int, Path]) -> None:
    _, out = quick_run
    (out / "quick.md").unlink()
    assert main(["--render", str(out / "quick.json")]) == 0
    assert (out / "quick.md").read_text().startswith("# zoo bench")


def test_unregistered_mixer_is_skipped_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = dataclasses.replace(SUBJECTS["sliding_window"], zoo_mixers=("no_such_mixer",))
    monkeypatch.setitem(SUBJECTS, "sliding_window", fake)
    case = make_cases(["sliding_window"], ["forward"], [32], dtype="float32", device="cpu", size="quick")[0]
    r = run_case(case, RunOptions(warmup=0, repeats=1, memory=False, progress=False), probe=None)
    assert r["status"] == UNAVAILABLE
    assert r["impls"]["zoo"] == {"status": UNAVAILABLE, "missing_mixers": ["no_such_mixer"]}
    assert r["impls"]["dense_sdpa"]["status"] == "ok"  # the baseline is still measured


def test_cli_rejects_unknown_subject(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--quick", "--subjects", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- FLOP formulas
def test_attention_flops_hand_count() -> None:
    # B=1, T=4, d=8, 2 query heads, 1 kv head, head_dim 4.
    # q: 2*4*8*8 = 512, k: 2*4*8*4 = 256, v: 256, o: 512 -> 1536; causal pairs 4*5/2 = 10, core 4*1*2*4*10 = 320.
    assert F.attention_projections(4, 8, 2, 1, 4) == 1536
    assert F.pairs_causal(4) == 10
    assert F.attention_core(1, 2, 4, 10) == 320


def test_case_flops_attention_quick() -> None:
    # quick attention: d=64, H=4, Hkv=2, D=16 (q and o 64x64, k and v 64x32).
    proj_per_token = 2 * 64 * (64 + 32 + 32 + 64)  # 24576
    mk = lambda phase: Case("attention", phase, 64, "float32", "cpu", "quick")
    fwd = 64 * proj_per_token + 4 * 4 * 16 * (64 * 65 // 2)
    assert case_flops(mk("forward"), "zoo") == fwd == 2105344
    assert case_flops(mk("prefill"), "transformers") == fwd
    assert case_flops(mk("forward_backward"), "zoo") == 3 * fwd
    assert case_flops(mk("decode"), "zoo") == proj_per_token + 4 * 4 * 16 * 65  # one query over 65 keys


def test_mamba2_flops_hand_count() -> None:
    # d=4, N=2, d_conv=2, expand=2, P=2, G=1, Q=2, T=4: d_inner 8, H 4, conv_dim 12.
    # in_proj 2*4*4*(16+4+4) = 768, out_proj 2*4*8*4 = 256, conv 2*4*12*2 = 192,
    # SSD 2*4*(Q*G*N + Q*H*P + 2*H*P*N) = 8*(4 + 16 + 32) = 416.
    kw = dict(d_state=2, d_conv=2, expand=2, headdim=2, ngroups=1, chunk_size=2)
    assert F.mamba2_layer(4, 4, **kw) == 768 + 256 + 192 + 416
    # decode, one token: in 192 + out 64 + conv 48 + 4*H*P*N = 64
    assert F.mamba2_layer(1, 4, decode=True, **kw) == 192 + 64 + 48 + 64


def _brute_pairs(T: int, keep) -> int:
    return sum(1 for i in range(T) for j in range(i + 1) if keep(i, j))


@pytest.mark.parametrize("T", [1, 7, 33])
def test_sparse_pair_counts_match_brute_force(T: int) -> None:
    assert F.pairs_causal(T) == _brute_pairs(T, lambda i, j: True)
    assert F.pairs_sliding_window(T, 5, 2) == _brute_pairs(T, lambda i, j: i - j < 5 or j < 2)
    assert F.pairs_block_diagonal(T, 4) == _brute_pairs(T, lambda i, j: i // 4 == j // 4)
    bs, local, stride, H = 4, 2, 3, 3
    for homo in (False, True):
        expected = 0
        for h in range(H):
            shift = (0 if homo else h) * max(1, stride // H)
            expected += _brute_pairs(T, lambda i, j, shift=shift: (i // bs - j // bs < local)
                                     or ((j // bs) + shift + 1) % stride == 0)
        assert F.pairs_block_sparse(T, H, bs, local, stride, homo_head=homo) == expected


# ---------------------------------------------------------------------------------------------- statistics
def test_fit_exponent_on_synthetic_power_laws() -> None:
    Ts = [1024, 2048, 4096, 8192]
    assert fit_exponent(Ts, [3e-9 * T**2 for T in Ts]) == pytest.approx(2.0, abs=1e-9)
    assert fit_exponent(Ts, [5e-6 * T for T in Ts]) == pytest.approx(1.0, abs=1e-9)
    noisy = [1e-6 * T**1.5 * f for T, f in zip(Ts, [1.05, 0.95, 1.02, 0.98])]
    assert fit_exponent(Ts, noisy) == pytest.approx(1.5, abs=0.05)
    assert fit_exponent([1024], [1.0]) is None
    assert fit_exponent([1024, 1024], [1.0, 2.0]) is None


def test_timing_summary() -> None:
    t = Timing.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (t.median, t.min, t.max, t.q1, t.q3, t.n) == (3.0, 1.0, 5.0, 2.0, 4.0, 5)
    assert math.isclose(Timing.of([2.0]).median, 2.0)
