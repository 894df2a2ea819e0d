"""Native CPU kernels: small C++ files compiled on first use with the machine's compiler, loaded with ctypes.

A kernel here is one C++ source next to its op (e.g. ``zoo/kernels/infllmv2/cpu.cpp``) with ``extern "C"``
functions over raw pointers: no Python or torch headers, so it compiles in about a second, and a ctypes call releases
the GIL (the callers run row ranges on :func:`run_threaded` threads). Its torch version
stays beside it as the reference, and the op runs that version whenever the library is not available.

* ``ZOO_NATIVE``: ``auto`` (default, also when unset or empty): build and use the kernel, or fall back to the torch
  path with one warning when no compiler builds it; ``off`` (or ``0``): never; ``on`` (or ``1``): a build failure is
  an error. Read at each call.
* Compiler: :func:`find_compiler` (``$CXX``, else the first of ``g++``, ``c++``, ``clang++`` on ``PATH``); flags
  ``-O3 -march=native``, and ``-fopenmp`` for a kernel that runs its own threads (``library(..., openmp=True)``): its
  ``libgomp.so.1`` is the one torch has loaded already (same soname), so its threads are torch's intra-op team.
* Cache: ``$ZOO_CACHE`` (default ``$XDG_CACHE_HOME/zoo``, ``~/.cache/zoo``) ``/native/<name>-<hash>.so``; the hash
  covers the source and the headers it includes with quotes (``zoo/kernels/simd.h``), the macros, the flags, the
  compiler's version and the CPU's model and flags (``-march=native`` code is for this CPU only), so an edited
  source or another machine sharing the home directory builds anew. A build writes a temporary file in that
  directory and renames it: a concurrent or interrupted build leaves no half library behind.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shutil
import subprocess
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MODES", "mode", "library", "cache_dir", "find_compiler", "fp32_cpu", "transposed_blocks", "run_threaded"]

MODES = ("auto", "off", "on")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-fPIC", "-shared")
_ALIASES = {"": "auto", "0": "off", "1": "on", "false": "off", "true": "on"}
_LOADED: dict[tuple, ctypes.CDLL | None] = {}
_ERRORS: dict[tuple, Exception] = {}
_LOCK = threading.Lock()


def mode() -> str:
    """The validated value of ``ZOO_NATIVE`` (``auto`` when unset or empty)."""
    raw = os.environ.get("ZOO_NATIVE", "").strip().lower()
    value = _ALIASES.get(raw, raw)
    if value not in MODES:
        raise ValueError(f"ZOO_NATIVE={os.environ['ZOO_NATIVE']!r} is not one of {list(MODES)} (or 0 / 1)")
    return value


def cache_dir() -> Path:
    """Where built libraries live: ``$ZOO_CACHE/native`` (default ``$XDG_CACHE_HOME/zoo/native``)."""
    root = os.environ.get("ZOO_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "zoo"
    return Path(root).expanduser() / "native"


def library(source: Path, defines: dict[str, int] | None = None, *, required: bool = False,
            openmp: bool = False) -> ctypes.CDLL | None:
    """The compiled ``source`` with ``-D`` ``defines`` (and ``-fopenmp`` when ``openmp``), built on first use; ``None``
    when ``ZOO_NATIVE=off`` or when it cannot be built (one ``RuntimeWarning`` per source and macros, naming the
    compiler's complaint). ``required`` (or ``ZOO_NATIVE=on``): a build failure raises ``RuntimeError`` instead;
    ``required`` also overrides ``off``."""
    choice = mode()
    if choice == "off" and not required:
        return None
    required = required or choice == "on"
    compiler = find_compiler()
    key = (str(source), tuple(sorted((defines or {}).items())), openmp, compiler)
    with _LOCK:
        if key not in _LOADED:
            try:
                _LOADED[key] = ctypes.CDLL(str(_build(Path(source), defines or {}, compiler, openmp)))
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                _LOADED[key], _ERRORS[key] = None, e
                if not required:
                    warnings.warn(f"zoo: native kernel {Path(source).name} unavailable, using the torch path: {e}",
                                  RuntimeWarning, stacklevel=3)
        lib = _LOADED[key]
    if lib is None and required:
        raise RuntimeError(f"ZOO_NATIVE=on (or required) but {Path(source).name} cannot be built: "
                           f"{_ERRORS[key]}")
    return lib


def find_compiler() -> str | None:
    """``$CXX``, else the first of ``g++``, ``c++``, ``clang++`` on ``PATH`` (None: no compiler)."""
    return os.environ.get("CXX") or next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)


def fp32_cpu(*tensors: Tensor | None, rows: bool = False) -> bool:
    """Whether every tensor given (None skipped) is fp32 on the CPU, and with ``rows`` also has a contiguous last axis:
    what the native kernels read (the callers check the other strides they need)."""
    return all(t is None or (t.dtype == torch.float32 and t.device.type == "cpu" and (not rows or t.stride(-1) == 1))
               for t in tensors)


def transposed_blocks(x: Tensor, block: int) -> Tensor:
    """Keys ``x [B, Hkv, n, D]`` as the blocks ``K^T [D, block]`` the native attention kernels read:
    ``[B * Hkv, ceil(n / block), D, block]``, contiguous fp32, zeros past the keys."""
    B, Hkv, n, D = x.shape
    nb = -(-n // block)
    return F.pad(x.float(), (0, 0, 0, nb * block - n)).reshape(B * Hkv, nb, block, D).transpose(-1, -2).contiguous()


def _build(source: Path, defines: dict[str, int], compiler: str | None, openmp: bool = False) -> Path:
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++ or clang++)")
    text = b"".join(f.read_bytes() for f in _with_local_includes(source))
    flags = [*FLAGS, *(["-fopenmp"] if openmp else []), *(f"-D{k}={v}" for k, v in sorted(defines.items()))]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    digest = hashlib.sha256(b"\0".join([text, " ".join(flags).encode(), version.encode(), _cpu_id().encode()]))
    out = cache_dir() / f"{source.stem}-{digest.hexdigest()[:16]}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        run = subprocess.run([compiler, *flags, "-o", str(tmp), str(source)], capture_output=True, text=True,
                             timeout=600)
        if run.returncode:
            tail = (run.stderr or run.stdout).strip().splitlines()[-5:]
            raise RuntimeError(f"{compiler} exited with {run.returncode}: " + " | ".join(tail))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _with_local_includes(source: Path) -> list[Path]:
    """``source`` and the files its ``#include "..."`` lines name, recursively (their text is part of the hash)."""
    seen: list[Path] = []
    todo = [source.resolve()]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.append(f)
        todo += [(f.parent / m).resolve() for m in re.findall(r'^\s*#\s*include\s*"([^"]+)"', f.read_text(), re.M)]
    return seen


def _cpu_id() -> str:
    """The CPU's model and feature flags (Linux ``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    picked = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
    return "\n".join(sorted(set(picked))) or f"{platform.machine()} {platform.processor()}"


def run_threaded(fn, items: list, threads: int | None = None) -> None:
    """``fn(item)`` for every item, on ``threads`` Python threads (default ``torch.get_num_threads()``) that pull
    items until none is left, each with intra-op parallelism 1 (restored afterwards); in order on one thread."""
    workers = min(len(items), max(1, torch.get_num_threads() if threads is None else threads))
    if workers <= 1:
        for it in items:
            fn(it)
        return
    todo, lock = iter(items), threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                it = next(todo, None)
            if it is None:
                return
            fn(it)

    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as ex:
            for f in [ex.submit(worker) for _ in range(workers)]:
                f.result()
    finally:
        torch.set_num_threads(n_threads)
