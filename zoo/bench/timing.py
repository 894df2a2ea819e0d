"""Wall-clock timing (``time.perf_counter`` on CPU, ``torch.cuda.Event`` pairs on GPU) and the scaling fit."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass
class Timing:
    """Seconds per call over ``n`` timed repeats (after the warm-up ones)."""

    median: float
    min: float
    max: float
    q1: float
    q3: float
    n: int
    samples: list[float]

    @classmethod
    def of(cls, samples: list[float]) -> Timing:
        s = sorted(samples)
        if len(s) >= 2:
            q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive")
        else:
            q1 = q3 = s[0]
        return cls(statistics.median(s), s[0], s[-1], q1, q3, len(s), list(samples))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(step: Callable[[Any], Any], *, setup: Callable[[], Any] | None = None, warmup: int = 1,
               repeats: int = 5, device: torch.device | str = "cpu") -> tuple[Timing, Any]:
    """Time ``step(setup())``: ``setup`` (untimed) runs before every call. Returns the timing and the last result."""
    device = torch.device(device)
    result = None
    for _ in range(warmup):
        result = step(setup() if setup else None)
    synchronize(device)
    samples = []
    for _ in range(repeats):
        arg = setup() if setup else None
        synchronize(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = step(arg)
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            result = step(arg)
            samples.append(time.perf_counter() - t0)
    return Timing.of(samples), result


def time_interleaved(calls: dict[str, tuple[Callable[[Any], Any], Callable[[], Any] | None]], *, warmup: int = 1,
                     repeats: int = 5, device: torch.device | str = "cpu"
                     ) -> dict[str, tuple[Timing, Any] | BaseException]:
    """Time several implementations in turns: every warm-up call of each, then repeat ``r`` of each before repeat
    ``r + 1`` of any, so that a change of load or clock during the case touches all of them alike (their ratios are
    what the reports compare). ``calls[name] = (step, setup)`` as :func:`time_calls`. An implementation that raises
    is dropped from the turns and reported by its exception; the others go on."""
    device = torch.device(device)
    out: dict[str, tuple[Timing, Any] | BaseException] = {}
    samples: dict[str, list[float]] = {name: [] for name in calls}
    results: dict[str, Any] = {}

    def call(name: str, timed: bool) -> None:
        step, setup = calls[name]
        try:
            arg = setup() if setup else None
            synchronize(device)
            if timed and device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                results[name] = step(arg)
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                results[name] = step(arg)
                synchronize(device)
                if timed:
                    samples[name].append(time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - reported per implementation
            out[name] = e

    for timed, n in ((False, warmup), (True, repeats)):
        for _ in range(n):
            for name in calls:
                if name not in out:
                    call(name, timed)
    for name in calls:
        if name not in out:
            out[name] = (Timing.of(samples[name]), results.get(name))
    return out


def fit_exponent(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ``log y`` against ``log x`` (``y ~ c x^k`` -> ``k``); ``None`` with < 2 usable points."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y is not None and y > 0]
    if len(pts) < 2 or len({p[0] for p in pts}) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
