"""Starting process groups: from ``torchrun``'s environment, or locally for CPU experiments and tests.

``init_distributed()`` is what a training script calls first: under ``torchrun`` (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` set) it joins the group (NCCL on CUDA, gloo on the CPU) and
picks this rank's GPU; without them it is a one-process run and initialises nothing.

``run_local(fn, world_size, *args, **kwargs)`` runs ``fn(rank, world_size, *args, **kwargs)`` in ``world_size``
local processes joined by a gloo group (a file store in a temporary directory: no ports), and returns their
results by rank.
"""

from __future__ import annotations

import datetime
import os
import pickle
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

__all__ = ["DistInfo", "init_distributed", "run_local"]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str | None = None, *, device: str | None = None) -> DistInfo:
    """Join the process group described by torchrun's environment variables (or the one already initialised);
    a plain ``python`` run without them is a single process and initialises nothing. ``device``: ``"cuda"`` /
    ``"cpu"`` (default: CUDA when available; each rank takes GPU ``LOCAL_RANK``)."""
    dev_type = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev_type not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    if dev_type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but CUDA is not available")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local_rank) if dev_type == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(device=dev)
    dist.init_process_group(backend or ("nccl" if dev.type == "cuda" else "gloo"),
                            device_id=dev if dev.type == "cuda" else None)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def _worker(rank: int, world_size: int, store_dir: str, timeout: float, fn: Callable, args: tuple,
            kwargs: dict) -> None:
    torch.set_num_threads(1)  # several processes share the cores
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout))
    try:
        result = fn(rank, world_size, *args, **kwargs)
        with open(Path(store_dir) / f"result-{rank}.pkl", "wb") as f:
            pickle.dump(result, f)
    except BaseException:
        (Path(store_dir) / f"error-{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def run_local(fn: Callable[..., Any], world_size: int, *args: Any, start_method: str = "fork",
              timeout: float = 300.0, **kwargs: Any) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` in ``world_size`` processes on this machine (gloo, CPU);
    returns the results in rank order. A rank that raises or dies is reported here as ``RuntimeError`` (with its
    traceback; the other ranks are terminated). ``fork`` (default) starts in milliseconds and shares what the
    parent imported; ``fn`` must be picklable with ``spawn``. ``timeout``: seconds a collective may wait."""
    with tempfile.TemporaryDirectory(prefix="zoo-dist-") as store_dir:
        try:
            mp.start_processes(_worker, args=(world_size, store_dir, timeout, fn, args, kwargs), nprocs=world_size,
                               join=True, start_method=start_method)
        except ProcessException as e:
            errors = sorted(Path(store_dir).glob("error-*.txt"))
            detail = "\n".join(f"--- {p.stem}\n{p.read_text()}" for p in errors) or str(e)
            raise RuntimeError(f"a rank failed:\n{detail}") from None
        results = []
        for r in range(world_size):
            with open(Path(store_dir) / f"result-{r}.pkl", "rb") as f:
                results.append(pickle.load(f))
        return results
