"""What the run ran on: CPU/GPU model, cores, library versions, and the measured GEMM FLOP/s (the roofline)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from typing import Any

import torch

from zoo.bench.timing import time_calls

# Vendor dense peaks (no sparsity), FLOP/s, by a substring of torch.cuda.get_device_name().
GPU_PEAK_FLOPS: dict[str, dict[str, float]] = {
    "H200": {"bfloat16": 790e12, "float16": 790e12},
    "H100": {"bfloat16": 790e12, "float16": 790e12},  # SXM; the H200 has the same tensor cores
}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - absent or broken optional dependency
        return None


# glibc's mallopt parameters (<malloc.h>)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def _mallopt(settings: tuple[tuple[int, int], ...]) -> str | None:
    """Apply glibc ``mallopt`` settings ``(parameter, value)``; None when done, else why not."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = all(libc.mallopt(param, ctypes.c_int(value)) == 1 for param, value in settings)
    except (OSError, AttributeError) as e:
        return f"mallopt unavailable: {e}"
    return None if ok else "mallopt refused the settings"


def keep_freed_memory(limit: int = 1 << 30, top_pad: int = 64 << 20) -> str:
    """Make glibc's malloc keep freed memory for reuse in this process (``mallopt``): blocks up to ``limit`` bytes come
    from the heap instead of their own ``mmap``, the heap is trimmed only when more than ``limit`` bytes are free at
    its top, and it grows ``top_pad`` bytes at a time. By default a freed block of a few MB goes back to the system
    and the next one of that size faults its pages in again (~3 us per 4 KiB page here: a Mamba-2 forward at 4k took
    2k-18k such faults per call, none after this). The usual CPU-benchmark remedy (jemalloc or tcmalloc preloaded,
    as ``torch.backends.xeon.run_cpu`` does) without a preload; it applies to every implementation the process times.

    Returns what was set, for the report, or why nothing was (not glibc, or ``mallopt`` refused)."""
    why = _mallopt(((_M_MMAP_THRESHOLD, limit), (_M_TRIM_THRESHOLD, limit), (_M_TOP_PAD, top_pad)))
    if why is not None:
        return f"system default ({why})"
    return (f"glibc malloc keeping freed memory (mallopt: mmap and trim thresholds {limit / 2**20:.0f} MiB, "
            f"top pad {top_pad / 2**20:.0f} MiB)")


def fixed_mmap_threshold(limit: int = 1 << 20) -> str:
    """Fix glibc's mmap threshold at ``limit`` bytes in this process (the memory probe's children): every block above
    it is mapped and unmapped on its own, so the peak RSS follows the live tensors. By default the threshold rises
    (up to 32 MiB) each time a mapped block is freed, after which blocks of that size come from the heap, where freed
    memory stays: the peak then depends on the allocator's history (one forward+backward case at 16k read 494 or 534
    MB, its reference 485 to 696 MB; fixed: the same number every time). Returns what was set, or why nothing was."""
    why = _mallopt(((_M_MMAP_THRESHOLD, limit),))
    return f"system default ({why})" if why else f"glibc mmap threshold fixed at {limit / 2**20:.0f} MiB"


def machine_info(device: torch.device) -> dict[str, Any]:
    import zoo

    info: dict[str, Any] = {
        "device": device.type,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "zoo": zoo.__version__,
        "mamba_ssm": _version("mamba_ssm"),
        "triton": _version("triton"),
        # Other processes share the cores of a CI or dev box: the load says how quiet the run was.
        "load_average_start": list(os.getloadavg()),
    }
    try:
        with open("/proc/meminfo") as f:
            info["memory_bytes"] = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu_name=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    return info


def gpu_peak_flops(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {}
    name = torch.cuda.get_device_name(device)
    for key, peaks in GPU_PEAK_FLOPS.items():
        if key in name:
            return dict(peaks)
    return {}


def measure_gemm_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> dict[str, Any]:
    """FLOP/s of one ``[n, n] @ [n, n]`` matmul (``2 n^3`` FLOPs): median and best of ``repeats``. The best is the
    roofline of the reports (on a shared machine the median includes time lost to other processes)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    timing, _ = time_calls(lambda _: a @ b, warmup=2, repeats=repeats, device=device)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "repeats": repeats, "median_s": timing.median,
            "flops_per_s": 2 * n**3 / timing.median, "best_flops_per_s": 2 * n**3 / timing.min}


def measure_memory_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 5) -> dict[str, Any]:
    """Read bandwidth in bytes/s: a sum over an fp32 buffer much larger than the last-level cache (``nbytes``,
    default 1 GiB on CPU -- at most an eighth of the machine's memory -- and 2 GiB on GPU), median and best of
    ``repeats``. It is the denominator of the weight-streaming floor of a decode step (parameter bytes / bandwidth)."""
    if nbytes is None:
        nbytes = 2**31 if device.type == "cuda" else 2**30
        try:
            with open("/proc/meminfo") as f:
                nbytes = min(nbytes, int(f.readline().split()[1]) * 1024 // 8)
        except (OSError, ValueError, IndexError):
            pass
    buf = torch.ones(max(1, nbytes // 4), device=device, dtype=torch.float32)
    timing, _ = time_calls(lambda _: buf.sum(), warmup=1, repeats=repeats, device=device)
    n = buf.numel() * 4
    return {"bytes": n, "repeats": repeats, "median_s": timing.median, "bytes_per_s": n / timing.median,
            "best_bytes_per_s": n / timing.min}
