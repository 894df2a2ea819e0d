"""Peak memory of one (implementation, case) on the CPU: max RSS of a fresh process that builds and runs it.

Each measurement runs in its own child of a ``multiprocessing`` *forkserver* whose server process has imported
torch, zoo and the modules the registered references declare (``register_reference(..., preload=...)``) but run
nothing: a child starts clean (no allocator caches, no tensors of earlier cases) in milliseconds instead of
re-importing for seconds. The child first imports the modules that define the case's mixers and references when
they live outside the package (``Case.modules``), so mixers registered by a plugin are measured too. It builds
the implementation alone (a reference from a zoo module on the meta device: no second set of weights), runs the
phase once and reports ``ru_maxrss``; the report gives the delta against the ``ru_maxrss`` of an idle child (same
imports, nothing built), i.e. weights + inputs + state + activations. Each child fixes glibc's mmap threshold first
(:func:`zoo.bench.machine.fixed_mmap_threshold`), so that the peak follows the live tensors rather than the
allocator's history (``mem_allocator`` in the results says what was set).

On CUDA the memory is measured in the timing process instead (``torch.cuda.max_memory_allocated``).
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.spawn
import resource
import sys
import traceback
from typing import Any

BASE_PRELOAD = ["torch", "zoo", "zoo.layers", "zoo.models", "zoo.bench.cases"]


def preload(references: list[str] | None = None) -> list[str]:
    """What the forkserver imports: the zoo, then the ``preload`` modules of ``references`` (default: all)."""
    from zoo.bench.references import preload_modules

    return BASE_PRELOAD + [m for m in preload_modules(references) if m not in BASE_PRELOAD]


def _maxrss_bytes() -> int:
    # Linux reports kilobytes, macOS bytes.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _job(case_dict: dict[str, Any] | None, impl: str | None, threads: int, decode_steps: int, queue: Any) -> None:
    try:
        from zoo.bench.machine import fixed_mmap_threshold

        allocator = fixed_mmap_threshold()  # before the first tensor: the peak follows the live tensors
        import torch

        torch.set_num_threads(threads)
        if case_dict is not None and impl is not None:
            import importlib

            from zoo.bench.cases import Case, build, make_input, phase_callables

            case = Case.from_dict(case_dict)
            for module in case.modules:
                importlib.import_module(module)
            adapter = build(case, [impl])[impl]
            x = make_input(case, adapter, decode_steps)
            step, setup = phase_callables(case, adapter, x, decode_steps)
            step(setup() if setup else None)
        queue.put(("ok", (_maxrss_bytes(), allocator)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which records it
        queue.put(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"))


class MemoryProbe:
    """Runs memory measurements in fresh forkserver children; ``idle_bytes`` is the baseline subtracted."""

    def __init__(self, threads: int, decode_steps: int, references: list[str] | None = None) -> None:
        self.ctx = mp.get_context("forkserver")
        self.ctx.set_forkserver_preload(preload(references))
        self.threads, self.decode_steps = threads, decode_steps
        self._idle_bytes: int | None = None

    def start(self) -> MemoryProbe:
        """Start the server now (it imports torch/transformers, seconds) so that it overlaps other work."""
        from multiprocessing import forkserver

        forkserver.ensure_running()
        return self

    @property
    def idle_bytes(self) -> int:
        if self._idle_bytes is None:
            status, value = self._run(None, None)
            if status != "ok":
                raise RuntimeError(f"idle memory probe failed: {value}")
            self._idle_bytes = value[0]
        return self._idle_bytes

    def _run(self, case_dict: dict[str, Any] | None, impl: str | None) -> tuple[str, Any]:
        queue = self.ctx.SimpleQueue()
        proc = self.ctx.Process(target=_job, args=(case_dict, impl, self.threads, self.decode_steps, queue))
        # The job lives in this importable module: the child must not re-run the caller's __main__ (a script,
        # pytest, stdin), which multiprocessing does by default.
        original = multiprocessing.spawn.get_preparation_data

        def without_main(name: str) -> dict[str, Any]:
            data = original(name)
            data.pop("init_main_from_path", None)
            data.pop("init_main_from_name", None)
            return data

        multiprocessing.spawn.get_preparation_data = without_main
        try:
            proc.start()
        finally:
            multiprocessing.spawn.get_preparation_data = original
        proc.join()
        if queue.empty():
            return "error", f"memory worker died with exit code {proc.exitcode} (killed for memory?)"
        return queue.get()

    def measure(self, case_dict: dict[str, Any], impl: str) -> dict[str, Any]:
        idle = self.idle_bytes
        status, value = self._run(case_dict, impl)
        if status != "ok":
            return {"mem_status": "error", "mem_error": value.splitlines()[0]}
        peak, allocator = value
        return {"mem_status": "ok", "mem_bytes": peak - idle, "peak_rss_bytes": peak, "idle_rss_bytes": idle,
                "mem_method": "cpu_subprocess_maxrss_delta", "mem_allocator": allocator}
