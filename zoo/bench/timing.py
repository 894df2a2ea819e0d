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


def fit_exponent(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of ``log y`` against ``log x`` (``y ~ c x^k`` -> ``k``); ``None`` with < 2 usable points."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y is not None and y > 0]
    if len(pts) < 2 or len({p[0] for p in pts}) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
