"""Run the cases: time every implementation of a case in this process, back to back, then its memory.

Per case: availability (an implementation whose mixers are not registered is "skipped: mixer not available"),
build all implementations with shared weights, time each (warm-up + repeats), record FLOPs and achieved FLOP/s,
the forward outputs' max abs difference from the reference, memory (a fresh process per implementation on CPU,
CUDA peak allocation on GPU), the load average before and after the case, and flags: a timing spread
``(max - min) / median`` above ``spread_limit`` (20%), or a 1-minute load average above the core count (other
processes competed for the cores).

Budget: once a (subject, phase) case takes more than ``max_case_seconds`` or does not fit in memory, its larger
``T`` are skipped with that reason (a time-vs-T series stops where the machine's limits are).

Resume: :func:`run_cases` takes the results of an earlier (killed) run by case id and runs only the others;
``on_result`` is called after every case, so the caller can write the report as it goes.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

import zoo
from zoo.bench.cases import UNAVAILABLE, Case, build, case_flops, make_input, phase_callables, subjects
from zoo.bench.floors import GemmFloorAdapter, gemm_floor_callables, streamed_parameter_bytes
from zoo.bench.memory import MemoryProbe
from zoo.bench.timing import fit_exponent, time_interleaved

DECODE_MIN_REPEATS = 40  # single-token steps are cheap: time at least this many (medians of 10 swung 2x under load)
SPREAD_LIMIT = 0.2
FLOOR = "floor:gemm"  # the GEMM floor's entry while timing (stored under result['floor'])


@dataclass
class RunOptions:
    warmup: int = 1
    repeats: int = 5
    memory: bool = True
    max_case_seconds: float = 120.0  # of timing (all implementations of a case), memory probes excluded
    progress: bool = True
    spread_limit: float = SPREAD_LIMIT
    floors: bool = True  # time the GEMM floor of every case (the zoo implementation's linear layers alone)
    bandwidth: float | None = None  # measured read bandwidth, bytes/s: the weight-streaming floor of decode cases

    def repeats_for(self, phase: str) -> int:
        return max(self.repeats, DECODE_MIN_REPEATS) if phase == "decode" and self.repeats > 1 else self.repeats

    @property
    def decode_steps(self) -> int:
        return self.warmup + self.repeats_for("decode") + 1


def cores() -> int:
    """Cores this process may run on (the load average is compared with it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or "out of memory" in str(e).lower() or isinstance(
        e, getattr(torch.cuda, "OutOfMemoryError", ()))


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]


def _max_abs_diff(a: Any, b: Any) -> float | None:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
        return None
    return float((a.float() - b.float()).abs().max())


def spread(timing: dict[str, Any]) -> float | None:
    """``(max - min) / median`` of the timed repeats (``None`` with fewer than two)."""
    if timing.get("n", 0) < 2 or not timing.get("median"):
        return None
    return (timing["max"] - timing["min"]) / timing["median"]


def case_flags(result: dict[str, Any], n_cores: int, spread_limit: float = SPREAD_LIMIT) -> list[str]:
    """Why a case's numbers deserve less trust: implementations whose timing spread exceeds ``spread_limit``,
    and a 1-minute load average (before or after the case) above the number of cores."""
    flags = []
    for impl, e in result.get("impls", {}).items():
        s = e.get("spread")
        if s is not None and s > spread_limit:
            flags.append(f"spread {100 * s:.0f}% ({impl})")
    load = result.get("load_average")
    if load:
        peak = max(load["start"][0], load["end"][0])
        if peak > n_cores:
            flags.append(f"load {peak:.1f} > {n_cores} cores")
    return flags


def _base_result(case: Case) -> dict[str, Any]:
    subject = subjects()[case.subject]
    return {"id": case.id, **case.to_dict(), "kind": subject.kind, "mixer_args": subject.args(case.size),
            "impls": {}}


def run_case(case: Case, opts: RunOptions, probe: MemoryProbe | None) -> dict[str, Any]:
    subject = subjects()[case.subject]
    registered = set(zoo.list_mixers())
    result = _base_result(case)
    load_start = list(os.getloadavg())
    runnable = []
    for impl in case.impls:
        missing = [m for m in subject.requirements(impl, case.size) if m not in registered]
        if missing:
            result["impls"][impl] = {"status": UNAVAILABLE, "missing_mixers": missing}
        else:
            runnable.append(impl)
    try:
        adapters = build(case, runnable)
    except Exception as e:  # noqa: BLE001 - a case that cannot be built is reported, the run goes on
        for impl in runnable:
            result["impls"][impl] = {"status": "skipped: does not fit" if _is_oom(e) else f"error: {_short(e)}"}
        adapters = {}
    device = torch.device(case.device)
    outputs: dict[str, Any] = {}
    prepared: dict[str, tuple[Any, Any]] = {}
    for impl, ad in adapters.items():
        entry: dict[str, Any] = {"scope": ad.scope}
        result["impls"][impl] = entry
        if not ad.supports(case.phase):
            entry["status"] = f"skipped: {impl} is a kernel-only reference (forward phases only)"
            continue
        try:
            x = make_input(case, ad, opts.decode_steps)
            prepared[impl] = phase_callables(case, ad, x, opts.decode_steps)
            del x
        except Exception as e:  # noqa: BLE001
            entry["status"] = "skipped: does not fit" if _is_oom(e) else f"error: {_short(e)}"
    floor_ad = None
    zoo_ad = adapters.get("zoo")
    if opts.floors and zoo_ad is not None and zoo_ad.module is not None and "zoo" in prepared:
        floor_ad = GemmFloorAdapter(zoo_ad.module, case.batch)
        if floor_ad.linears:
            prepared[FLOOR] = gemm_floor_callables(floor_ad, case.phase, case.T)
    reps = opts.repeats_for(case.phase)
    if device.type == "cuda":  # one implementation at a time: the CUDA peak memory is per implementation
        timed: dict[str, Any] = {}
        for impl, call in prepared.items():
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            t0 = time.perf_counter()
            timed[impl] = time_interleaved({impl: call}, warmup=opts.warmup, repeats=reps, device=device)[impl]
            if impl in result["impls"]:
                result["impls"][impl].update(wall_s=time.perf_counter() - t0, mem_status="ok",
                                             mem_bytes=torch.cuda.max_memory_allocated(device) - before,
                                             mem_method="cuda_max_allocated_delta")
    else:  # in turns (ratios survive a change of load during the case)
        t0 = time.perf_counter()
        timed = time_interleaved(prepared, warmup=opts.warmup, repeats=reps, device=device)
        wall = time.perf_counter() - t0
    total = sum(sum(r[0].samples) for r in timed.values() if not isinstance(r, BaseException)) or 1.0
    for impl, r in timed.items():
        if impl == FLOOR:
            if isinstance(r, BaseException):
                result["floor"] = {"gemm": {"status": f"error: {_short(r)}"}}
            else:
                result["floor"] = {"gemm": {"status": "ok", "time_s": r[0].to_dict(),
                                            "linears": len(floor_ad.linears) if floor_ad else 0}}
            continue
        entry = result["impls"][impl]
        if isinstance(r, BaseException):
            entry["status"] = "skipped: does not fit" if _is_oom(r) else f"error: {_short(r)}"
            continue
        timing, out = r
        ad = adapters[impl]
        if device.type != "cuda":  # the case's wall time shared by the implementations in proportion
            entry["wall_s"] = wall * sum(timing.samples) / total
        entry["status"] = "ok"
        entry["time_s"] = timing.to_dict()
        entry["spread"] = spread(entry["time_s"])
        entry["flops"] = case_flops(case, ad)
        entry["flops_per_s"] = entry["flops"] / timing.median
        if case.phase == "forward" and ad.scope == "layer":
            outputs[impl] = out
    del timed, prepared
    if case.phase == "decode" and opts.bandwidth and zoo_ad is not None and zoo_ad.module is not None:
        nbytes = streamed_parameter_bytes(zoo_ad.module)
        result.setdefault("floor", {})["stream"] = {"status": "ok", "bytes": nbytes,
                                                    "bandwidth_bytes_per_s": opts.bandwidth,
                                                    "time_s": nbytes / opts.bandwidth}
    del floor_ad, zoo_ad
    del adapters
    if probe is not None and device.type == "cpu":
        for impl, entry in result["impls"].items():
            if entry.get("status") == "ok":
                entry.update(probe.measure(case.to_dict(), impl))

    ok = {k: v for k, v in result["impls"].items() if v.get("status") == "ok"}
    ref = case.reference
    if "zoo" in ok and ref in ok:
        result["speedup"] = ok[ref]["time_s"]["median"] / ok["zoo"]["time_s"]["median"]
        if "zoo" in outputs and ref in outputs:
            result["max_abs_diff"] = _max_abs_diff(outputs["zoo"], outputs[ref])
    statuses = [v["status"] for v in result["impls"].values()]
    if any(s.startswith("error") for s in statuses):
        result["status"] = "error"
    elif result["impls"].get("zoo", {}).get("status") == UNAVAILABLE:
        result["status"] = UNAVAILABLE
    elif all(s == "ok" or "kernel-only" in s for s in statuses):
        result["status"] = "ok"
    else:
        result["status"] = next(s for s in statuses if s != "ok")
    result["load_average"] = {"start": load_start, "end": list(os.getloadavg())}
    result["cores"] = cores()
    result["flags"] = case_flags(result, result["cores"], opts.spread_limit)
    return result


def memory_probe(cases: list[Case], opts: RunOptions) -> MemoryProbe | None:
    """The CPU memory probe, started (call early: its server's imports overlap the caller's work)."""
    if opts.memory and any(c.device == "cpu" for c in cases):
        refs = sorted({impl for c in cases for impl in c.impls if impl != "zoo"})
        return MemoryProbe(torch.get_num_threads(), opts.decode_steps, refs).start()
    return None


def finished(result: dict[str, Any]) -> bool:
    """A result a resumed run keeps (errors are run again)."""
    return result.get("status") not in (None, "error")


def run_cases(cases: list[Case], opts: RunOptions, probe: MemoryProbe | None = None, *,
              done: dict[str, dict[str, Any]] | None = None,
              on_result: Callable[[list[dict[str, Any]]], None] | None = None) -> list[dict[str, Any]]:
    """Run ``cases`` in order; a case whose id is in ``done`` (a finished result of an earlier run) is not run
    again. ``on_result(results so far)`` is called after each case that ran."""
    done = done or {}
    stopped: dict[tuple[str, str, str], str] = {}
    results = []
    bar = tqdm(cases, desc="bench", unit="case", disable=not opts.progress)
    for case in bar:
        bar.set_postfix_str(case.id)
        key = (case.subject, case.phase, case.device)
        if case.id in done and finished(done[case.id]):
            res = done[case.id]
        elif key in stopped:
            res = {**_base_result(case), "status": stopped[key]}
        else:
            t0 = time.perf_counter()
            res = run_case(case, opts, probe)
            res["case_wall_s"] = time.perf_counter() - t0
        results.append(res)
        if res is not done.get(case.id) and on_result is not None:
            seen = {r["id"] for r in results}
            on_result(results + [r for k, r in done.items() if k not in seen and finished(r)])
        if key in stopped:
            continue
        if res["status"].startswith(("skipped: over the time budget", "skipped: does not fit at")):
            stopped[key] = res["status"]  # a resumed run's series stops where the earlier one stopped
        elif any(v.get("status") == "skipped: does not fit" for v in res["impls"].values()):
            stopped[key] = f"skipped: does not fit at T={case.T}"
        elif sum(e.get("wall_s", 0.0) for e in res["impls"].values()) > opts.max_case_seconds:
            stopped[key] = (f"skipped: over the time budget ({opts.max_case_seconds:g} s of timing per case) "
                            f"at T={case.T}")
    return results


def scaling(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (subject, phase, impl): time and memory against T, and their fitted exponents (log-log slope)."""
    series: dict[tuple[str, str, str, str, str], list[tuple[int, float, float | None]]] = defaultdict(list)
    for r in results:
        for impl, e in r["impls"].items():
            if e.get("status") == "ok":
                series[(r["subject"], r["phase"], impl, r["dtype"], r["device"])].append(
                    (r["T"], e["time_s"]["median"], e.get("mem_bytes")))
    out = []
    for (subject, phase, impl, dtype, device), pts in sorted(series.items()):
        pts.sort()
        Ts, times, mems = [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]
        entry = {"subject": subject, "phase": phase, "impl": impl, "dtype": dtype, "device": device, "T": Ts,
                 "time_s": times, "mem_bytes": mems, "time_exponent": fit_exponent(Ts, times),
                 "mem_exponent": fit_exponent(Ts, mems) if all(m is not None for m in mems) else None}
        if phase == "decode":
            entry["ms_per_token"] = [t * 1e3 for t in times]
        out.append(entry)
    return out
