"""Size bounds checked before anything is allocated: the parameters a config implies, against the memory available
and against the tensors a checkpoint actually holds.

A config is data from a file: ``vocab_size: 10**12`` or ``n_layers: 10**5`` must fail in milliseconds with a message,
not after minutes of building modules or reading weights, and never by exhausting the machine's memory.
:func:`parameter_count` builds each *distinct* block once on the meta device (no memory, ~1 ms), so it costs the same
for 2 layers as for 10**5 identical ones.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from zoo.config import ZooConfig

__all__ = ["ModelTooLarge", "parameter_count", "available_memory", "check_fits_memory", "check_matches_checkpoint"]


class ModelTooLarge(MemoryError, ValueError):
    """A config whose parameters do not fit in the available memory (also a ``ValueError``: the config is the bad
    input)."""


def parameter_count(config: ZooConfig) -> int:
    """The number of parameters a model built from ``config`` has (a tied head counted once), without building it."""
    from zoo.layers.norm import make_norm
    from zoo.models.lm import Block  # the model module imports this one

    per_kind: dict[str, int] = {}
    total = 0
    for i, layer in enumerate(config.layers):
        key = repr((layer.mixer, sorted(config.mixer_kwargs(i).items()), layer.mlp))
        if key not in per_kind:
            with torch.device("meta"):
                per_kind[key] = sum(p.numel() for p in Block(config, i).parameters())
        total += per_kind[key]
    with torch.device("meta"):
        norm = sum(p.numel() for p in make_norm(config.norm, config.d_model, config.norm_eps).parameters())
    heads = 1 if config.tie_embeddings else 2
    return total + norm + heads * config.vocab_size * config.d_model


def available_memory() -> int | None:
    """Bytes of memory this process can still get (Linux ``MemAvailable``, else free pages); None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _fmt(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1024 or unit == "PB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} PB"


def _describe(config: ZooConfig) -> str:
    return f"vocab_size={config.vocab_size:,}, d_model={config.d_model:,}, n_layers={config.n_layers:,}"


def check_fits_memory(config: ZooConfig, *, dtype: torch.dtype = torch.float32, n_params: int | None = None,
                      what: str = "building this model") -> int:
    """:class:`ModelTooLarge` naming the config's sizes when its parameters (in ``dtype``) exceed the available memory.
    Returns the parameter count."""
    n = parameter_count(config) if n_params is None else n_params
    need = n * torch.empty((), dtype=dtype).element_size()
    avail = available_memory()
    if avail is not None and need > avail:
        raise ModelTooLarge(f"{what} needs {_fmt(need)} for {n:,} parameters ({_describe(config)}) but only "
                          f"{_fmt(avail)} of memory is available; refusing before allocating anything")
    return n


def check_matches_checkpoint(config: ZooConfig, n_params: int, checkpoint_numel: int, where: Any) -> None:
    """A strict load fills every parameter from the checkpoint, so the checkpoint holds at least as many values as
    the config implies (it may hold more: a tied head stored twice). A config implying more than 1.5x the
    checkpoint's values cannot describe it: refused here, from the files' headers, before the weights are read and
    before any module is built. Smaller mismatches (a missing tensor) are left to the strict loader, which names the
    keys; building that model costs at most 1.5x what the checkpoint already holds."""
    if n_params > checkpoint_numel + checkpoint_numel // 2:
        raise ValueError(f"config.json in {where} implies {n_params:,} parameters ({_describe(config)}) but the "
                         f"checkpoint's tensors hold only {checkpoint_numel:,} values: the config does not describe "
                         "these weights; refusing before allocating the model")
