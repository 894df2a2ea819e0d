"""The benchmark harness: ``zoo bench`` end to end (--quick), subjects and references from the registries (a mixer
and a reference registered here, outside the package), resuming a killed run, flags, FLOP counts by hand.

Speed is never asserted: only that every case runs and the reports are complete and parse.
"""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import zoo
import zoo.bench.runner as runner
from zoo.bench.adapters import KernelAdapter, ZooMixerAdapter, load_same_weights
from zoo.bench.cases import PHASES, UNAVAILABLE, Case, case_flops, make_cases, subjects
from zoo.bench.cli import main as bench_main
from zoo.bench.flops import model_flops
from zoo.bench.memory import MemoryProbe
from zoo.bench.references import get_reference, preload_modules, register_reference, unregister_reference
from zoo.bench.report import SCHEMA, markdown
from zoo.bench.runner import RunOptions, case_flags, run_case, spread
from zoo.bench.timing import Timing, fit_exponent
from zoo.cli import main as zoo_main
from zoo.layers.base import BenchCase, Mixer, State
from zoo.registry import register_mixer, unregister_mixer


# ---------------------------------------------------------------------------------------------- --quick end to end
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    out = tmp_path_factory.mktemp("bench")
    rc = zoo_main(["bench", "--quick", "--no-memory", "--out", str(out), "--stem", "quick", "--no-progress",
                   "--system-malloc"])  # the test process keeps glibc's defaults (the soak tests measure its RSS)
    return rc, out


def test_quick_run_succeeds_and_writes_reports(quick_run: tuple[int, Path]) -> None:
    rc, out = quick_run
    assert rc == 0
    assert (out / "quick.json").is_file() and (out / "quick.md").is_file()
    for png in ("quick-scaling.png", "quick-decode.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "quick.md").read_text()
    assert "| subject | phase | T | zoo ms | reference |" in md and "## Scaling" in md
    import csv

    report = json.loads((out / "quick.json").read_text())
    rows = list(csv.DictReader((out / "quick.csv").open()))
    assert {(r["case"], r["impl"]) for r in rows} >= {(c["id"], i) for c in report["cases"] for i in c["impls"]}
    assert any(r["impl"] == "floor:gemm" for r in rows)  # the floors measured in the same run


def test_quick_json_holds_every_registered_case(quick_run: tuple[int, Path]) -> None:
    _, out = quick_run
    report = json.loads((out / "quick.json").read_text())
    assert report["schema"] == SCHEMA and report["mode"] == "quick" and report["complete"] is True
    machine = report["machine"]
    for key in ("cpu_model", "cpu_count", "torch", "transformers", "device", "load_average_start"):
        assert key in machine
    assert machine["gemm"]["flops_per_s"] > 0

    expected = make_cases(sorted(subjects()), list(PHASES), [64], dtype="float32", device="cpu", size="quick")
    by_id = {c["id"]: c for c in report["cases"]}
    assert sorted(by_id) == sorted(c.id for c in expected)
    kinds = {c["kind"] for c in report["cases"]}
    assert kinds == {"mixer", "model"}  # families declare model cases
    for case in expected:
        r = by_id[case.id]
        assert r["status"] == "ok", (case.id, r["status"], r["impls"])
        assert len(r["load_average"]["start"]) == 3 and len(r["load_average"]["end"]) == 3 and r["cores"] >= 1
        for impl, e in r["impls"].items():
            assert e["status"] == "ok", (case.id, impl, e)
            t = e["time_s"]
            assert t["n"] == 1 and t["min"] <= t["median"] <= t["max"] and t["median"] > 0
            assert e["flops"] > 0 and e["flops_per_s"] > 0
        if r.get("reference"):
            assert r["speedup"] > 0
            # a registered layer reference computes the same function with the same weights
            if r["phase"] == "forward" and not r["reference"].startswith("mixer:"):
                assert r["max_abs_diff"] < 1e-4, (case.id, r["max_abs_diff"])
    for s in report["scaling"]:
        assert {"subject", "phase", "impl", "T", "time_s", "time_exponent", "mem_exponent"} <= set(s)


def test_render_rewrites_reports_from_json(quick_run: tuple[int, Path]) -> None:
    _, out = quick_run
    (out / "quick.md").unlink()
    assert bench_main(["--render", str(out / "quick.json")]) == 0
    assert (out / "quick.md").read_text().startswith("# zoo bench")


def test_memory_of_every_reference_in_fresh_processes(tmp_path: Path) -> None:
    """One phase, one subject per reference, with the memory probe: each implementation (a reference built alone,
    from a zoo module on the meta device) runs in a forkserver child."""
    one_per_reference = {}
    for name, subject in sorted(subjects().items()):
        if "forward" in subject.phases:  # (a decode-only subject, e.g. mamba2_model, has no forward case)
            one_per_reference.setdefault((subject.kind, subject.reference), name)
    names = ",".join(sorted(one_per_reference.values()))
    assert bench_main(["--quick", "--phases", "forward", "--mixers", names, "--out", str(tmp_path), "--stem", "m",
                       "--no-progress"]) == 0
    report = json.loads((tmp_path / "m.json").read_text())
    assert len(report["cases"]) == len(one_per_reference)
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    for r in report["cases"]:
        for impl, e in r["impls"].items():
            assert e["mem_status"] == "ok" and isinstance(e["mem_bytes"], int), (r["id"], impl, e)
            assert e["mem_allocator"].startswith("glibc mmap threshold fixed" if glibc else "system default")


def test_memory_probe_is_repeatable() -> None:
    """With the mmap threshold fixed in each child, the same case reads the same peak: three probes of one case give
    the same bytes (it read 494 or 534 MB for one block-sparse case at the allocator's defaults)."""
    if not (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"):
        pytest.skip("the threshold is a glibc setting")
    case = Case("mamba2", "forward", 256, "float32", "cpu", size="quick", impls=("zoo",))
    probe = MemoryProbe(1, 4).start()
    peaks = {probe.measure(case.to_dict(), "zoo")["mem_bytes"] for _ in range(3)}
    assert len(peaks) == 1, peaks


def test_zoo_bench_help_and_options_through_the_zoo_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        zoo_main(["bench", "-h"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: zoo bench") and "--mixers" in out and "--quick" in out and "--fresh" in out
    assert zoo_main(["bench", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in subjects())


def test_cli_rejects_unknown_subject(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_main(["--quick", "--subjects", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_bench_code_names_no_mixer_or_family() -> None:
    """zoo/bench iterates the registries: no registered mixer's name, nor the name of a family that declares bench
    cases, appears in its source."""
    from zoo.registry import families

    benched = {name for name, f in families().items() if getattr(f, "bench_cases", ())}
    names = sorted({*zoo.list_mixers(), *benched}, key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(n) for n in names))
    for path in sorted(Path(zoo.__file__).parent.joinpath("bench").glob("*.py")):
        hits = [(i, line) for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
        assert not hits, f"{path.name}: {hits[:3]}"


def test_every_declared_case_builds_at_both_sizes() -> None:
    for name, subject in subjects().items():
        for size in ("quick", "full"):
            with torch.device("meta"):
                module = subject.build_zoo(size)
            assert sum(p.numel() for p in module.parameters()) > 0, (name, size)
            assert subject.flops(size, T=64, context=0, batch=1) > subject.flops(size, T=1, context=63, batch=1) > 0


# ---------------------------------------------------------------------------------------------- a mixer from outside
@dataclass
class _SumState(State):
    total: Tensor  # [B, D] sum of the inputs absorbed
    count: Tensor  # [B] tokens absorbed


class RunningMean(Mixer):
    """``y_t = proj(mean(x_1 .. x_t))``: a tiny mixer written outside the package."""

    example_args = ({},)
    bench_cases = (BenchCase(args={"full": {"d_model": 64}, "quick": {"d_model": 16}}, reference="tiny_twin",
                             name="tiny_outside", phases=("forward", "decode")),)

    def __init__(self, d_model: int, layer_idx: int = 0, *, bias: bool = False) -> None:
        super().__init__(d_model, layer_idx)
        self.proj = nn.Linear(d_model, d_model, bias=bias)

    @classmethod
    def flops(cls, d_model, args, *, T, context=0, batch=1):
        return batch * 2 * T * d_model * d_model

    def forward(self, x, *, positions=None, state=None, attention_mask=None, seq_idx=None):
        B, T, D = x.shape
        total, count = (x.new_zeros(B, D), x.new_zeros(B)) if state is None else (state.total, state.count)
        sums = total[:, None] + x.cumsum(1)
        counts = count[:, None] + torch.arange(1, T + 1, dtype=x.dtype, device=x.device)
        y = self.proj(sums / counts[..., None])
        if state is not None:
            state.total, state.count = sums[:, -1], counts[:, -1]
        return y, state

    def init_state(self, batch_size, *, dtype, device, max_length=None):
        return _SumState(torch.zeros(batch_size, self.d_model, dtype=dtype, device=device),
                         torch.zeros(batch_size, dtype=dtype, device=device))


def _twin(zoo_module: nn.Module, args: dict, batch: int) -> ZooMixerAdapter:
    """The same mixer again, weights loaded from the zoo one."""
    twin = RunningMean(args["d_model"])
    load_same_weights(twin, zoo_module.state_dict())
    return ZooMixerAdapter(twin, batch)


@pytest.fixture
def outside_mixer():
    register_mixer("tiny_outside")(RunningMean)
    register_reference("tiny_twin")(_twin)
    yield "tiny_outside"
    unregister_mixer("tiny_outside")
    unregister_reference("tiny_twin")


def _tiny_args(out: Path, *extra: str) -> list[str]:
    return ["bench", "--mixers", "tiny_outside", "--quick", "--no-memory", "--out", str(out), "--stem", "t",
            "--no-progress", "--system-malloc", *extra]


def test_zoo_bench_mixers_runs_a_mixer_registered_outside(outside_mixer, tmp_path: Path) -> None:
    assert zoo_main(_tiny_args(tmp_path)) == 0
    report = json.loads((tmp_path / "t.json").read_text())
    assert [c["id"] for c in report["cases"]] == ["tiny_outside/forward/T=64/float32/cpu",
                                                 "tiny_outside/decode/T=64/float32/cpu"]
    for r in report["cases"]:
        assert r["status"] == "ok" and r["reference"] == "tiny_twin" and r["speedup"] > 0
        assert r["impls"]["zoo"]["flops"] == 2 * (64 if r["phase"] == "forward" else 1) * 16 * 16
    assert report["cases"][0]["max_abs_diff"] == 0.0  # same weights


def test_a_killed_run_resumes_where_it_stopped(outside_mixer, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    real, calls = runner.run_case, []

    def dies_on_the_second_case(case, opts, probe):
        calls.append(case.id)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the run is killed while it measures the second case
        return real(case, opts, probe)

    monkeypatch.setattr(runner, "run_case", dies_on_the_second_case)
    with pytest.raises(KeyboardInterrupt):
        zoo_main(_tiny_args(tmp_path))
    partial = json.loads((tmp_path / "t.json").read_text())  # written as each case finished
    assert partial["complete"] is False and [c["phase"] for c in partial["cases"]] == ["forward"]

    calls.clear()
    monkeypatch.setattr(runner, "run_case", lambda case, opts, probe: calls.append(case.id) or real(case, opts, probe))
    assert zoo_main(_tiny_args(tmp_path)) == 0
    assert calls == ["tiny_outside/decode/T=64/float32/cpu"]  # the finished case is not measured again
    full = json.loads((tmp_path / "t.json").read_text())
    assert full["complete"] is True and len(full["runs"]) == 2
    assert [c["phase"] for c in full["cases"]] == ["forward", "decode"]
    assert full["cases"][0] == partial["cases"][0]
    assert "Measured in 2 runs" in (tmp_path / "t.md").read_text()

    # other options: refused (the file would mix two settings); --fresh measures everything again
    assert zoo_main(_tiny_args(tmp_path, "--phases", "forward")) == 2
    calls.clear()
    assert zoo_main(_tiny_args(tmp_path, "--fresh")) == 0
    assert len(calls) == 2


def test_the_run_keeps_freed_memory_unless_told_not_to(outside_mixer, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import zoo.bench.cli as cli

    calls: list[int] = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(1) or "kept (test)")
    args = _tiny_args(tmp_path)
    args.remove("--system-malloc")
    assert zoo_main(args) == 0
    report = json.loads((tmp_path / "t.json").read_text())
    assert calls == [1] and report["options"]["malloc"] == "keep" and report["machine"]["allocator"] == "kept (test)"
    assert "Allocator (the timed process" in (tmp_path / "t.md").read_text()
    assert zoo_main(_tiny_args(tmp_path)) == 2  # resuming with the other allocator setting is refused
    assert zoo_main(_tiny_args(tmp_path, "--fresh")) == 0 and calls == [1]
    assert json.loads((tmp_path / "t.json").read_text())["machine"]["allocator"] == "system default"


_FAULTS = """
import resource, sys, torch
from zoo.bench.machine import keep_freed_memory
if sys.argv[1] == "keep":
    print(keep_freed_memory())
faults = []
for i in range(6):  # 48 MiB: above the largest threshold glibc picks by itself (32 MiB), so mmapped each time
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.empty(12 << 20).fill_(1.0)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del x
print(sum(faults[3:]))  # the steady state: the heap holds a free block of that size by then
"""


@pytest.mark.skipif(not (sys.platform == "linux" and platform.libc_ver()[0] == "glibc"), reason="glibc's mallopt")
def test_keep_freed_memory_stops_page_faults_of_reallocated_blocks() -> None:
    def faults(mode: str) -> tuple[int, str]:
        out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True)
        *head, last = out.stdout.split("\n")[:-1]
        return int(last), " ".join(head)

    default, _ = faults("system")
    kept, how = faults("keep")
    assert how.startswith("glibc malloc keeping freed memory")
    # 3 x 12288 pages of 4 KiB (or 3 x 24 transparent huge pages) faulted in again by default, none when kept
    assert default >= 60 and kept * 10 <= default, (default, kept)


def test_fresh_never_replaces_a_report_under_the_default_stem(outside_mixer, tmp_path: Path) -> None:
    args = ["bench", "--mixers", "tiny_outside", "--quick", "--no-memory", "--out", str(tmp_path), "--no-progress",
            "--system-malloc"]
    assert zoo_main(args) == 0
    first = sorted(tmp_path.glob("*.json"))
    assert len(first) == 1
    before = first[0].read_bytes()
    assert zoo_main([*args, "--fresh"]) == 0
    second = tmp_path / f"{first[0].stem}-2.json"
    assert second.exists() and first[0].read_bytes() == before  # the earlier report is untouched
    assert zoo_main([*args, "--fresh", "--stem", first[0].stem]) == 0  # an explicit stem is replaced
    assert set(tmp_path.glob("*.json")) == {first[0], second}


def test_an_unregistered_reference_mixer_is_skipped_not_an_error(outside_mixer,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    case = BenchCase(args=RunningMean.bench_cases[0].args, reference="mixer:no_such_mixer", name="tiny_outside")
    monkeypatch.setattr(RunningMean, "bench_cases", (case,))
    c = make_cases(["tiny_outside"], ["forward"], [32], dtype="float32", device="cpu", size="quick")[0]
    r = run_case(c, RunOptions(warmup=0, repeats=1, memory=False, progress=False), probe=None)
    assert r["impls"]["mixer:no_such_mixer"] == {"status": UNAVAILABLE, "missing_mixers": ["no_such_mixer"]}
    assert r["impls"]["zoo"]["status"] == "ok"  # the zoo implementation is still measured
    assert r["status"] == UNAVAILABLE


# ---------------------------------------------------------------------------------------------- references
def test_reference_registry() -> None:
    for name in ("transformers_llama_attention", "transformers_llama", "transformers_mamba2"):
        ref = get_reference(name)
        assert ref.scope == "layer" and not ref.gpu_only and ref.module.startswith("zoo.models.")
    assert get_reference("sdpa_flash").gpu_only and get_reference("mamba_ssm").scope == "kernel"
    preload = preload_modules()
    assert "transformers.models.llama.modeling_llama" in preload
    assert not any(m.startswith("mamba_ssm") for m in preload)  # GPU-only references are not preloaded on CPU
    with pytest.raises(ValueError, match="unknown bench reference 'nope'"):
        get_reference("nope")
    with pytest.raises(ValueError, match="reserved"):
        register_reference("mixer:x")
    with pytest.raises(ValueError, match="already registered"):
        register_reference("transformers_llama")(lambda m, a, b: None)


def test_reference_refuses_weights_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match="missing"):
        load_same_weights(nn.Linear(4, 4), {"weight": torch.zeros(4, 4)})
    with pytest.raises(ValueError, match="shapes differ"):
        load_same_weights(nn.Linear(4, 4, bias=False), {"weight": torch.zeros(4, 5)})


# ---------------------------------------------------------------------------------------------- flags
def test_flags_name_noisy_and_loaded_cases() -> None:
    assert spread({"n": 3, "min": 1.0, "max": 1.5, "median": 1.25}) == pytest.approx(0.4)
    assert spread({"n": 1, "min": 1.0, "max": 1.0, "median": 1.0}) is None
    result = {"id": "s/forward/T=64/float32/cpu", "impls": {"zoo": {"spread": 0.3}, "ref": {"spread": 0.1}},
              "load_average": {"start": [1.0, 1.0, 1.0], "end": [3.0, 1.0, 1.0]}}
    assert case_flags(result, 2) == ["spread 30% (zoo)", "load 3.0 > 2 cores"]
    assert case_flags(result, 4) == ["spread 30% (zoo)"]
    assert case_flags({**result, "impls": {}}, 4) == []


def test_markdown_lists_flagged_cases(quick_run: tuple[int, Path]) -> None:
    _, out = quick_run
    report = json.loads((out / "quick.json").read_text())
    for r in report["cases"]:
        r["flags"] = []
    report["cases"][0]["flags"] = ["spread 35% (zoo)"]
    md = markdown(report)
    assert "## Flagged cases (1 of" in md and f"- {report['cases'][0]['id']}: spread 35% (zoo)" in md
    assert md.count(" ⚠ |") == 1


# ---------------------------------------------------------------------------------------------- FLOP counts
def test_case_flops_quick_attention_by_hand() -> None:
    # quick attention: d=64, H=4, Hkv=2, D=16 (q and o 64x64, k and v 64x32).
    proj_per_token = 2 * 64 * (64 + 32 + 32 + 64)  # 24576
    mk = lambda phase: Case("attention", phase, 64, "float32", "cpu", "quick")  # noqa: E731
    fwd = 64 * proj_per_token + 4 * 4 * 16 * (64 * 65 // 2)
    assert case_flops(mk("forward")) == fwd == 2105344
    assert case_flops(mk("prefill")) == fwd
    assert case_flops(mk("forward_backward")) == 3 * fwd
    assert case_flops(mk("decode")) == proj_per_token + 4 * 4 * 16 * 65  # one query over 65 keys
    kernel = KernelAdapter(lambda x: x, width=8, flops=lambda T, B: 7 * T * B)  # a kernel counts itself
    assert case_flops(mk("forward"), kernel) == 7 * 64 and case_flops(mk("forward_backward"), kernel) == 21 * 64


def test_mamba2_flops_by_hand() -> None:
    # d=4, N=2, d_conv=2, expand=2, P=2, G=1, Q=2, T=4: d_inner 8, H 4, conv_dim 12.
    # in_proj 2*4*4*(16+4+4) = 768, out_proj 2*4*8*4 = 256, conv 2*4*12*2 = 192,
    # SSD 2*4*(Q*G*N + Q*H*P + 2*H*P*N) = 8*(4 + 16 + 32) = 416.
    kw = dict(d_state=2, d_conv=2, expand=2, headdim=2, ngroups=1, chunk_size=2)
    mamba2 = zoo.get_mixer("mamba2")
    assert mamba2.flops(4, kw, T=4) == 768 + 256 + 192 + 416
    # decode, one token: in 192 + out 64 + conv 48 + 4*H*P*N = 64
    assert mamba2.flops(4, kw, T=1, context=3) == 192 + 64 + 48 + 64


def test_model_flops_by_hand() -> None:
    # 2 blocks of attention (d 8, 2 heads of 4, 1 KV head) + gated MLP 16 (+ one block without MLP), vocab 10.
    cfg = zoo.ZooConfig.from_dict({
        "vocab_size": 10, "d_model": 8, "n_layers": 3,
        "layers": [{"mixer": "attention", "mixer_args": {"num_heads": 2, "num_kv_heads": 1},
                    "mlp": {"intermediate_size": 16}}] * 2
        + [{"mixer": "attention", "mixer_args": {"num_heads": 2, "num_kv_heads": 1}, "mlp": None}]})
    T = 5
    attn = 2 * T * 8 * (2 * 2 * 4 + 2 * 1 * 4) + 4 * 4 * 2 * (T * (T + 1) // 2)  # 1920 + 480
    mlp = 3 * 2 * T * 8 * 16  # gate, up, down
    head = 2 * T * 8 * 10
    assert model_flops(cfg, T=T) == 3 * attn + 2 * mlp + head


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
    assert Timing.of([2.0]).median == 2.0


# ---------------------------------------------------------------------------------------------- floors, interleaving
def test_time_interleaved_runs_implementations_in_turns_and_isolates_errors() -> None:
    from zoo.bench.timing import time_interleaved

    order: list[str] = []

    def boom(_: object) -> None:
        order.append("bad")
        raise RuntimeError("no")

    calls = {"a": (lambda _: order.append("a") or 1, None), "bad": (boom, None),
             "b": (lambda s: order.append("b") or s, lambda: 7)}
    out = time_interleaved(calls, warmup=1, repeats=3)
    assert order == ["a", "bad", "b", "a", "b", "a", "b", "a", "b"]  # turns; the failing one dropped at once
    assert isinstance(out["bad"], RuntimeError)
    assert out["a"][0].n == out["b"][0].n == 3 and out["b"][1] == 7


def test_floors_count_linear_weights_once_and_skip_looked_up_tables() -> None:
    from zoo.bench.floors import GemmFloorAdapter, gemm_floor_callables, streamed_parameter_bytes

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.table = nn.Embedding(10, 4), nn.Embedding(6, 4)
            self.lin = nn.Linear(4, 3)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight  # tied: streamed once, by the head
            self.register_buffer("scale", torch.ones(5))
            self.register_buffer("index", torch.arange(3))

    net = Net()
    # head/emb 10x4, lin 4x3 + 3, the float buffer 5; the looked-up table and the integer buffer do not count
    assert streamed_parameter_bytes(net) == 4 * (40 + 12 + 3 + 5)
    ad = GemmFloorAdapter(net, batch=2)
    assert [tuple(m.weight.shape) for m in ad.linears] == [(3, 4), (10, 4)]
    for phase, T in (("forward", 5), ("forward_backward", 5), ("decode", 5)):
        step, setup = gemm_floor_callables(ad, phase, T)
        if setup:
            setup()
        step(None)
        assert all(tuple(x.shape) == (2, 1 if phase == "decode" else T, 4) for x in ad.inputs)
    assert net.lin.weight.grad is not None and net.lin.weight.grad.shape == (3, 4)


def test_subject_specs_restrict_phases_and_lengths_per_subject() -> None:
    import argparse

    from zoo.bench.cli import _subject_specs

    names, plan = _subject_specs("mamba2:forward+decode@1024+4096,attention,mamba2:forward_backward+forward@1024",
                                 ["attention", "mamba2"])
    assert names == ["mamba2", "attention", "mamba2"]
    assert plan == [(["forward", "decode"], [1024, 4096]), (None, None), (["forward_backward", "forward"], [1024])]
    cases = make_cases(names, ["prefill"], [2048], dtype="float32", device="cpu", size="full", plan=plan)
    assert [(c.subject, c.phase, c.T) for c in cases] == [("mamba2", "forward", 1024), ("mamba2", "forward", 4096),
                                                         ("mamba2", "decode", 1024), ("mamba2", "decode", 4096),
                                                         ("attention", "prefill", 2048),
                                                         ("mamba2", "forward_backward", 1024)]
    for bad in ("nope", "mamba2:fly", "mamba2@1k"):
        with pytest.raises(argparse.ArgumentTypeError):
            _subject_specs(bad, ["mamba2"])
