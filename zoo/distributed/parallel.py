"""Data parallelism (DDP, FSDP2) and the rank layout shared with sequence parallelism.

Layout: ``world_size = dp * sp`` ranks; rank ``r`` is sequence-parallel rank ``r % sp`` of data-parallel replica
``r // sp`` (the ranks of one sequence-parallel group are consecutive, so they share a node first). The global
batch ``[B, T]`` is the same on every rank (same data, same seed); replica ``d`` takes rows
``d B/dp .. (d+1) B/dp - 1`` and sequence rank ``s`` columns ``s T/sp .. (s+1) T/sp - 1`` of them.

Loss: the next-token cross-entropy of the whole global batch, mean over its (weighted) targets, exactly what a
single process computes on the same batch. Each rank computes the sum over its targets and divides by the
all-reduced global target weight; DDP and FSDP2 *average* gradients over the ranks, so the loss each rank
back-propagates is multiplied by ``world_size`` (:func:`lm_loss`). The sequence-parallel ranks of a replica are
data-parallel ranks for the gradient reduction too: their parameter gradients are partial sums over their tokens.

Sharding (``strategy``):

* ``"ddp"``: ``DistributedDataParallel`` (a full replica per rank, gradients all-reduced);
* ``"fsdp"``: FSDP2 ``fully_shard`` with every block (``model.layers[i]``: norm + mixer + MLP) a sharding unit,
  then the root (embedding, final norm, LM head; a tied head stays with its embedding). Parameters become DTensors
  sharded over all ranks; build the optimizer after :func:`parallelize`;
* ``"none"``: the model as it is (one process).

Activation checkpointing is the model's own (``gradient_checkpointing_enable``: every block's forward is
recomputed in the backward), which composes with both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.distributed.sequence_parallel import (
    SequenceComm,
    SequenceShard,
    enable_sequence_parallel,
    shard_sequence,
)

__all__ = ["STRATEGIES", "Parallelism", "setup_parallelism", "parallelize", "unwrap", "shard_batch", "lm_loss",
           "all_reduce_sum"]

STRATEGIES = ("none", "ddp", "fsdp")


@dataclass
class Parallelism:
    """This rank's place in the ``dp x sp`` layout (module docstring); ``sequence``: the sequence-parallel
    communicator (None without sequence parallelism)."""

    rank: int = 0
    world_size: int = 1
    sp_size: int = 1
    sequence: SequenceComm | None = None
    device: torch.device = torch.device("cpu")

    @property
    def dp_size(self) -> int:
        return self.world_size // self.sp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_parallelism(sequence_parallel: int = 1, *, device: torch.device | str | None = None) -> Parallelism:
    """The layout for the current process group (one process when torch.distributed is not initialised);
    ``sequence_parallel``: ranks per sequence (a divisor of the world size). Creates the sequence-parallel groups
    (every rank takes part in creating every group)."""
    initialized = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if initialized else 1
    rank = dist.get_rank() if initialized else 0
    sp = int(sequence_parallel)
    if sp < 1 or world % sp:
        raise ValueError(f"sequence_parallel={sequence_parallel} must be a positive divisor of the world size {world}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    comm = None
    if sp > 1:
        if sp == world:
            comm = SequenceComm(None)
        else:
            for d in range(world // sp):
                group = dist.new_group(list(range(d * sp, (d + 1) * sp)))
                if d == rank // sp:
                    comm = SequenceComm(group)
    return Parallelism(rank, world, sp, comm, dev)


def parallelize(model: nn.Module, strategy: str, par: Parallelism, *, activation_checkpointing: bool = False,
                reshard_after_forward: bool = True, mp_policy: Any = None) -> nn.Module:
    """Move ``model`` to ``par.device``, switch on sequence parallelism (``par.sequence``) and activation
    checkpointing, and wrap or shard it for ``strategy`` (module docstring). Returns the module to train (the DDP
    wrapper, or the model itself, sharded in place, for FSDP2). ``mp_policy``: an FSDP2
    ``MixedPrecisionPolicy`` (default: none; use autocast for bf16/fp16 compute with fp32 parameters)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is not one of {list(STRATEGIES)}")
    if strategy == "none" and par.world_size > 1:  # sequence ranks hold partial gradients too: they must be summed
        raise ValueError(f"strategy='none' on {par.world_size} processes: use 'ddp' or 'fsdp'")
    if not hasattr(model, "layers"):
        raise ValueError(f"expected a zoo model (with .layers), got {type(model).__name__}")
    model.to(par.device)
    if par.sequence is not None:
        enable_sequence_parallel(model, par.sequence.group)
    if activation_checkpointing:
        model.gradient_checkpointing_enable()
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[par.device.index] if par.device.type == "cuda" else None)
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        kw: dict[str, Any] = {"reshard_after_forward": reshard_after_forward}
        if mp_policy is not None:
            kw["mp_policy"] = mp_policy
        for block in model.layers:
            fully_shard(block, **kw)
        fully_shard(model, **kw)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The zoo model inside a DDP wrapper (an FSDP2 model is its own module)."""
    return getattr(model, "module", model)


def shard_batch(par: Parallelism, input_ids: Tensor, *, labels: Tensor | None = None, seq_idx: Tensor | None = None,
                attention_mask: Tensor | None = None, loss_weight: Tensor | None = None) -> SequenceShard:
    """This rank's rows (data parallel) and columns (sequence parallel) of the global batch ``[B, T]``, with
    global positions and next-token targets computed before the split."""
    B = input_ids.shape[0]
    if B % par.dp_size:
        raise ValueError(f"global batch size {B} is not divisible by the {par.dp_size} data-parallel replicas")
    n = B // par.dp_size
    rows = slice(par.dp_rank * n, (par.dp_rank + 1) * n)
    pick = lambda t: None if t is None else t[rows].to(par.device)  # noqa: E731
    return shard_sequence(par.sequence, pick(input_ids), labels=pick(labels), seq_idx=pick(seq_idx),
                          attention_mask=pick(attention_mask), loss_weight=pick(loss_weight))


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum over all ranks (identity in one process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
    return t


def lm_loss(model: nn.Module, shard: SequenceShard) -> tuple[Tensor, Tensor]:
    """``(loss_to_backward, loss_share)``: this rank's share of the global batch's mean next-token loss
    (``loss_share``, detached; the shares of all ranks sum to the global mean) and the same multiplied by the
    world size, whose backward under DDP/FSDP2's gradient averaging gives the gradient of the global mean."""
    logits = model(shard.input_ids, attention_mask=shard.attention_mask, positions=shard.positions,
                   seq_idx=shard.seq_idx).logits
    losses = F.cross_entropy(logits.float().transpose(1, 2), shard.targets, ignore_index=-100, reduction="none")
    weight = (shard.targets != -100).to(losses.dtype)
    if shard.target_weight is not None:
        weight = weight * shard.target_weight.to(losses.dtype)
    total = all_reduce_sum(weight.sum().detach()).clamp_min(1e-8)
    share = (losses * weight).sum() / total
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return share * world, share.detach()
