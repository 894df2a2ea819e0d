"""Sharded training checkpoints with ``torch.distributed.checkpoint`` (DCP), exact resume, and consolidation.

A checkpoint is a directory ``<dir>/step-00000100/`` holding

* the DCP files (``.metadata`` + one ``*.distcp`` per rank): the model and optimizer state as each rank holds it
  (FSDP2 shards or DDP replicas, through ``torch.distributed.checkpoint.state_dict``, so a checkpoint saved with
  one strategy or world size loads with another), the LR scheduler, the step, and the training loop's extras
  (e.g. the data position: anything with ``state_dict`` / ``load_state_dict``, identical on every rank);
* ``rng-rank<r>.pt``: each rank's torch RNG states (CPU, and its CUDA device), restored on the same rank;
* ``config.json``: the model's ``ZooConfig``, so that :func:`consolidate` needs nothing else.

Resume is exact: the same world size and the same data reproduce the loss sequence of the run that was not
interrupted, because everything that decides the next step (weights, AdamW moments and step counts, the
schedule, the RNG, the data position) is restored. A save is written to ``step-N.partial`` and renamed when
every rank has finished, so a run killed while saving leaves the previous checkpoint as the latest.

:func:`consolidate` turns a checkpoint into a ``save_pretrained`` directory (one process, no process group);
:func:`save_pretrained_distributed` does the same from a running job (rank 0 writes).
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from zoo.checkpoint import load_state_dict_strict
from zoo.config import ZooConfig
from zoo.models.lm import ZooForCausalLM

__all__ = ["TrainState", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "consolidate",
           "gather_full_model", "save_pretrained_distributed"]

_STEP_DIR = re.compile(r"^step-(\d+)$")
CONFIG_NAME = "config.json"


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def _barrier() -> None:
    if _dist():
        dist.barrier()


def _inner(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


class TrainState(Stateful):
    """What a checkpoint holds: ``model`` (plain, DDP or FSDP2), ``optimizer``, ``scheduler`` (optional), the
    ``step`` count and ``extras`` (name -> object with ``state_dict``/``load_state_dict``, the same on every
    rank, e.g. the data position). DCP calls :meth:`state_dict` / :meth:`load_state_dict`."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None, *, step: int = 0,
                 extras: dict[str, Any] | None = None) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.step = step
        self.extras = dict(extras or {})

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        sd: dict[str, Any] = {"model": model_sd, "optim": optim_sd, "step": self.step,
                              "extras": {k: v.state_dict() for k, v in self.extras.items()}}
        if self.scheduler is not None:
            sd["scheduler"] = self.scheduler.state_dict()
        return sd

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(sd["scheduler"])
        for k, v in self.extras.items():
            v.load_state_dict(sd["extras"][k])
        self.step = int(sd["step"])


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The complete checkpoint (``step-N`` with DCP metadata) of the highest step in ``directory``, or None."""
    d = Path(directory)
    if not d.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in d.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / ".metadata").is_file()]
    return max(found)[1] if found else None


def save_checkpoint(directory: str | os.PathLike, state: TrainState, *, keep: int | None = None) -> Path:
    """Save ``state`` (every rank calls this) as ``directory/step-<state.step>``; ``keep``: how many of the newest
    checkpoints to keep (None: all). The directory must be shared by all ranks."""
    directory = Path(directory)
    final = directory / f"step-{state.step:08d}"
    tmp = directory / f"{final.name}.partial"
    if _rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    with warnings.catch_warnings():  # one process: DCP warns that it saves without a process group (intended)
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
        dcp.save({"train": state}, checkpoint_id=str(tmp), no_dist=not _dist())
    torch.save(_rng_state(), tmp / f"rng-rank{_rank()}.pt")
    _barrier()
    if _rank() == 0:
        config = getattr(_inner(state.model), "config", None)
        if config is not None:
            config.save(tmp / CONFIG_NAME)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep is not None:
            done = sorted((int(m.group(1)), p) for p in directory.iterdir()
                          if (m := _STEP_DIR.match(p.name)) and p != final)
            for _, old in done[:max(0, len(done) - (keep - 1))]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: str | os.PathLike, state: TrainState) -> int:
    """Load a checkpoint (every rank calls this) into ``state`` (built like the one saved: model wrapped and
    sharded, optimizer and scheduler created); restores this rank's RNG. Returns the step to continue from."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path} is not a complete distributed checkpoint (no .metadata)")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
        dcp.load({"train": state}, checkpoint_id=str(path), no_dist=not _dist())
    rng = path / f"rng-rank{_rank()}.pt"
    if rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=True))
    return state.step


def consolidate(path: str | os.PathLike, out: str | os.PathLike, *, dtype: torch.dtype | None = None,
                **save_kwargs: Any) -> Path:
    """Turn the checkpoint ``path`` into a ``save_pretrained`` directory ``out`` (one process, no process group
    needed): the full weights gathered from the shards, ``config.json``, ``model.safetensors``, the card."""
    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{path} has no {CONFIG_NAME}; is it a checkpoint written by save_checkpoint?")
    config = ZooConfig.load(path / CONFIG_NAME)
    model = ZooForCausalLM(config)
    sd = {k: v for k, v in model.state_dict().items()}
    with warnings.catch_warnings():  # DCP warns that it loads in a single process: that is the intent
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
        dcp.load({"train": {"model": sd}}, checkpoint_id=str(path), no_dist=not _dist())
    load_state_dict_strict(model, sd)
    if config.tie_embeddings:
        model.lm_head.weight = model.embedding.weight
    if dtype is not None:
        model.to(dtype)
    return model.save_pretrained(out, **save_kwargs)


def gather_full_model(model: nn.Module, device: torch.device | str = "cpu") -> ZooForCausalLM | None:
    """A plain copy of a (DDP-wrapped, FSDP2-sharded or sequence-parallel) zoo model with the full weights, on
    rank 0 (None on the other ranks; every rank calls this): for saving or for evaluating on one process."""
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if _rank() != 0:
        return None
    config = _inner(model).config
    with torch.device("meta"):
        plain = ZooForCausalLM(config)
    plain.to_empty(device="cpu")
    from zoo.hub import _reset_buffers

    _reset_buffers(plain)
    load_state_dict_strict(plain, sd)
    if config.tie_embeddings:
        plain.lm_head.weight = plain.embedding.weight
    return plain.to(device)


def save_pretrained_distributed(model: nn.Module, out: str | os.PathLike, **save_kwargs: Any) -> Path:
    """From a running job (every rank calls this): gather the full weights to rank 0 (on the CPU) and write a
    ``save_pretrained`` directory there."""
    plain = gather_full_model(model)
    if plain is not None:
        plain.save_pretrained(out, **save_kwargs)
    _barrier()
    return Path(out)
