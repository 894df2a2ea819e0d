"""Sequence parallelism: one sequence split over ``R`` ranks, ``T/R`` consecutive tokens each (rank ``r`` holds
tokens ``r T/R .. (r+1) T/R - 1``), with torch.distributed collectives only.

Everything a model does per token (embedding, norms, MLPs, projections, LM head, the loss) runs on the local
slice unchanged; only the mixers look across tokens, and a mixer class that declares ``sequence_parallel = True``
implements ``forward_sequence_parallel(x, *, positions, attention_mask, seq_idx, comm)`` with the primitives of
:class:`SequenceComm`:

* attention (DeepSpeed-Ulysses): ``seq_to_heads`` / ``heads_to_seq`` are all-to-alls that trade the sequence
  slice of all heads for all tokens of ``H/R`` heads and back; ``gather_seq`` all-gathers the per-token
  bookkeeping (global positions, padding mask, document ids);
* Mamba-2 (state passing): ``from_previous`` hands the previous rank's last tokens (the conv window) to the next
  one; ``carry_in`` folds every earlier rank's segment summary (final state from a zero start, decay across the
  segment) into this rank's initial state.

All of them are autograd functions whose backward is the transposed communication, so gradients cross ranks
exactly (a ``from_previous`` gradient goes back to the previous rank; ``carry_in``'s to every earlier one). Every
rank calls the same collectives in the same order, forward and backward.

Use::

    comm = enable_sequence_parallel(model, group)          # every mixer must support it (else ValueError)
    shard = shard_sequence(comm, input_ids, labels=labels, seq_idx=seq_idx)   # global positions, shifted targets
    logits = model(shard.input_ids, positions=shard.positions, seq_idx=shard.seq_idx).logits
    # loss: zoo.distributed.parallel.lm_loss over shard.targets (the targets cross the rank boundaries)

The positions must be given: without them the model would number each slice from 0 (a mixer cannot tell).
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from zoo.models.lm import token_positions

__all__ = ["SequenceComm", "SequenceShard", "enable_sequence_parallel", "disable_sequence_parallel",
           "shard_sequence", "shift_targets"]


def _gather(t: Tensor, group: Any, size: int) -> Tensor:
    """``[R, *t.shape]``: every rank's ``t`` (bool travels as uint8)."""
    src = t.contiguous()
    if src.dtype == torch.bool:
        src = src.to(torch.uint8)
    out = [torch.empty_like(src) for _ in range(size)]
    dist.all_gather(out, src, group=group)
    out = torch.stack(out)
    return out.bool() if t.dtype == torch.bool else out


def _all_to_all(x: Tensor, group: Any) -> Tensor:
    """``x [R, ...]``: block ``i`` goes to rank ``i``; returns ``[R, ...]`` with block ``j`` from rank ``j``."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def _seq_to_heads(x: Tensor, comm: SequenceComm) -> Tensor:
    B, H, Tl, D = x.shape
    R = comm.size
    y = _all_to_all(x.view(B, R, H // R, Tl, D).transpose(0, 1), comm.group)  # [R (sequence slice), B, H/R, Tl, D]
    return y.permute(1, 2, 0, 3, 4).reshape(B, H // R, R * Tl, D)


def _heads_to_seq(x: Tensor, comm: SequenceComm) -> Tensor:
    B, Hl, T, D = x.shape
    R = comm.size
    y = _all_to_all(x.view(B, Hl, R, T // R, D).permute(2, 0, 1, 3, 4), comm.group)  # [R (head slice), B, Hl, Tl, D]
    return y.transpose(0, 1).reshape(B, R * Hl, T // R, D)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, comm: SequenceComm) -> Tensor:
        ctx.comm = comm
        return _seq_to_heads(x, comm)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        return _heads_to_seq(g, ctx.comm), None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, comm: SequenceComm) -> Tensor:
        ctx.comm = comm
        return _heads_to_seq(x, comm)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        return _seq_to_heads(g, ctx.comm), None


class _FromPrevious(torch.autograd.Function):
    """Forward: the previous rank's tensor (zeros on rank 0). Backward: the next rank's gradient (zeros on the last)."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, comm: SequenceComm) -> Tensor:
        ctx.comm = comm
        every = _gather(t, comm.group, comm.size)
        return every[comm.rank - 1] if comm.rank > 0 else torch.zeros_like(t)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        comm = ctx.comm
        every = _gather(g, comm.group, comm.size)
        return (every[comm.rank + 1] if comm.rank < comm.size - 1 else torch.zeros_like(g)), None


def _expand(t: Tensor, like: Tensor) -> Tensor:
    return t.reshape(*t.shape, *[1] * (like.dim() - t.dim()))


class _CarryIn(torch.autograd.Function):
    """``S_in[0] = 0``, ``S_in[r+1] = keep[r+1] * (decay[r] * S_in[r] + final[r])``; returns this rank's ``S_in``.

    Backward: with ``g[r] = dL/dS_in[r]`` gathered, ``G[R-1] = g[R-1]``, ``G[r] = g[r] + keep[r+1] decay[r] G[r+1]``
    (the total gradient of ``S_in[r]``), so rank ``r`` gets ``dfinal = keep[r+1] G[r+1]`` and
    ``ddecay = sum(keep[r+1] G[r+1] * S_in[r])`` (zero on the last rank, whose summary reaches no one)."""

    @staticmethod
    def forward(ctx: Any, final: Tensor, decay: Tensor, keep: Tensor, comm: SequenceComm) -> Tensor:
        ctx.comm = comm
        finals = _gather(final, comm.group, comm.size)  # [R, B, H, P, N]
        decays = _gather(decay, comm.group, comm.size)  # [R, B, H]
        keeps = _gather(keep, comm.group, comm.size).to(final.dtype)  # [R, B]
        states = [torch.zeros_like(final)]
        for r in range(comm.rank):
            states.append(_expand(keeps[r + 1], final) * (_expand(decays[r], final) * states[-1] + finals[r]))
        ctx.save_for_backward(decays, keeps, states[-1])
        return states[-1]

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, Tensor, None, None]:
        comm = ctx.comm
        decays, keeps, s_in = ctx.saved_tensors
        grads = _gather(g, comm.group, comm.size)  # [R, B, H, P, N]
        r = comm.rank
        if r == comm.size - 1:
            return torch.zeros_like(g), torch.zeros_like(decays[r]), None, None
        total = grads[-1]  # G[R-1], then down to G[r+1]
        for q in range(comm.size - 2, r, -1):
            total = grads[q] + _expand(_expand(keeps[q + 1], decays[q]) * decays[q], g) * total
        d_final = _expand(keeps[r + 1], g) * total
        return d_final, (d_final * s_in).sum(tuple(range(decays.dim() - 1, g.dim()))), None, None


class SequenceComm:
    """The sequence-parallel group of this rank and the collectives the mixers use (module docstring)."""

    def __init__(self, group: Any = None) -> None:
        if not dist.is_initialized():
            raise ValueError("sequence parallelism needs torch.distributed initialised (torchrun, or "
                             "zoo.distributed.init_distributed())")
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def seq_to_heads(self, x: Tensor) -> Tensor:
        """``[B, H, T/R, D]`` (this rank's tokens, all heads) -> ``[B, H/R, T, D]`` (all tokens, this rank's heads)."""
        if x.shape[1] % self.size:
            raise ValueError(f"{x.shape[1]} heads cannot be split over {self.size} ranks")
        return _SeqToHeads.apply(x, self)

    def heads_to_seq(self, x: Tensor) -> Tensor:
        """``[B, H/R, T, D]`` -> ``[B, H, T/R, D]`` (the inverse of :meth:`seq_to_heads`)."""
        return _HeadsToSeq.apply(x, self)

    def gather_seq(self, t: Tensor) -> Tensor:
        """``[B, T/R, ...]`` -> ``[B, T, ...]`` in rank order (no gradient: positions, masks, document ids)."""
        every = _gather(t.detach(), self.group, self.size)  # [R, B, T/R, ...]
        return torch.cat(list(every), dim=1)

    def from_previous(self, t: Tensor) -> Tensor:
        """The previous rank's ``t`` (same shape on every rank; zeros on the first rank); differentiable."""
        if t.is_floating_point() and torch.is_grad_enabled() and t.requires_grad:
            return _FromPrevious.apply(t, self)
        every = _gather(t.detach(), self.group, self.size)
        return every[self.rank - 1] if self.rank > 0 else torch.zeros_like(t)

    def carry_in(self, final: Tensor, decay: Tensor, keep: Tensor | None = None) -> Tensor:
        """The state entering this rank's segment of a linear recurrence ``S_t = a_t S_{t-1} + b_t``.

        ``final [B, H, ...]``: this segment's final state from a zero start; ``decay [B, H]``: the product of
        its ``a_t``; ``keep [B]`` (bool): the carried state enters this segment (False where a new document
        starts at its first token; None = always). Differentiable in ``final`` and ``decay``."""
        if keep is None:
            keep = torch.ones(final.shape[0], dtype=torch.bool, device=final.device)
        return _CarryIn.apply(final, decay, keep, self)


# ---------------------------------------------------------------------------------------------- the model
def _mixers(model: nn.Module) -> list[nn.Module]:
    inner = getattr(model, "module", model)  # DistributedDataParallel
    if not hasattr(inner, "layers"):
        raise ValueError(f"expected a zoo model (with .layers), got {type(model).__name__}")
    return [block.mixer for block in inner.layers]


def _sequence_parallel_forward(self: nn.Module, x: Tensor, *, positions: Tensor | None = None, state: Any = None,
                               attention_mask: Tensor | None = None, seq_idx: Tensor | None = None
                               ) -> tuple[Tensor, None]:
    if state is not None:
        raise ValueError("a sequence-parallel mixer runs the parallel (training) forward only; call "
                         "disable_sequence_parallel(model) before generating")
    if positions is None:
        raise ValueError("a sequence-parallel mixer needs the global positions of its tokens (shard_sequence)")
    return self.forward_sequence_parallel(x, positions=positions, attention_mask=attention_mask, seq_idx=seq_idx,
                                          comm=self._sequence_comm), None


def enable_sequence_parallel(model: nn.Module, group: Any = None) -> SequenceComm:
    """Make every mixer of ``model`` (a zoo model, possibly DDP-wrapped) run sequence-parallel over ``group``
    (default: the whole world). Raises ``ValueError`` naming each layer whose mixer cannot. Parameter names,
    state dicts and sharding are untouched (the mixers' ``forward`` is replaced on the instances)."""
    comm = SequenceComm(group)
    mixers = _mixers(model)
    bad = []
    for i, mixer in enumerate(mixers):
        check = getattr(mixer, "check_sequence_parallel", None)
        try:
            if check is None:
                raise ValueError(f"{type(mixer).__name__} is not a zoo Mixer")
            check(comm.size)
        except ValueError as e:
            bad.append(f"layer {i}: {e}")
    if bad:
        raise ValueError(f"cannot run this model sequence-parallel over {comm.size} ranks:\n  " + "\n  ".join(bad))
    for mixer in mixers:
        mixer._sequence_comm = comm
        mixer.forward = types.MethodType(_sequence_parallel_forward, mixer)
    return comm


def disable_sequence_parallel(model: nn.Module) -> None:
    """Undo :func:`enable_sequence_parallel` (e.g. before generating with the trained model)."""
    for mixer in _mixers(model):
        mixer.__dict__.pop("forward", None)
        mixer.__dict__.pop("_sequence_comm", None)


# ---------------------------------------------------------------------------------------------- the data
def shift_targets(labels: Tensor, loss_weight: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Next-token targets aligned with the inputs: ``targets[:, t] = labels[:, t+1]``, ``-100`` at the end (and
    the weights likewise), so that a slice of the sequence carries the targets of its own positions."""
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]
    weight = None
    if loss_weight is not None:
        weight = torch.zeros_like(loss_weight)
        weight[:, :-1] = loss_weight[:, 1:]
    return targets, weight


@dataclass
class SequenceShard:
    """This rank's columns of a batch: model inputs plus ``targets`` (shifted labels) and ``target_weight``."""

    input_ids: Tensor
    positions: Tensor
    targets: Tensor
    seq_idx: Tensor | None = None
    attention_mask: Tensor | None = None
    target_weight: Tensor | None = None


def shard_sequence(comm: SequenceComm | None, input_ids: Tensor, *, labels: Tensor | None = None,
                   seq_idx: Tensor | None = None, attention_mask: Tensor | None = None,
                   loss_weight: Tensor | None = None) -> SequenceShard:
    """Positions and targets from the whole sequences ``[B, T]`` (as the model computes them), then this rank's
    ``T/R`` columns (``comm=None``: the whole batch)."""
    B, T = input_ids.shape
    positions = token_positions(B, T, attention_mask, seq_idx=seq_idx, device=input_ids.device)
    targets, weight = shift_targets(input_ids if labels is None else labels, loss_weight)
    if comm is None or comm.size == 1:
        return SequenceShard(input_ids, positions, targets, seq_idx, attention_mask, weight)
    if T % comm.size:
        raise ValueError(f"sequence length {T} is not divisible by the {comm.size} sequence-parallel ranks")
    n = T // comm.size
    cols = slice(comm.rank * n, (comm.rank + 1) * n)
    pick = lambda t: None if t is None else t[:, cols]  # noqa: E731
    return SequenceShard(input_ids[:, cols], positions[:, cols], targets[:, cols], pick(seq_idx),
                         pick(attention_mask), pick(weight))
