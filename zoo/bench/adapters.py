"""One interface for every implementation the harness times: ``forward(x)``, ``new_state(max_length)``,
``step(x, state)``, so the four phases are written once (:func:`zoo.bench.cases.phase_callables`).

A leaf module (torch only): the reference factories of :mod:`zoo.bench.references`, registered by the families
and mixers that own them, build these.

* :class:`ZooMixerAdapter` / :class:`ZooModelAdapter`: the zoo's own mixer or ``ZooForCausalLM``;
* :class:`Adapter` subclasses written next to a reference (e.g. a transformers layer with its own cache);
* :class:`KernelAdapter`: a core op timed on the case's shapes (forward phases only), which declares its own input
  width and FLOP count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


class Adapter:
    """One implementation of a case. ``scope``: "layer" (the whole mixer / model) or "kernel" (a core op only).

    ``width``: the last dimension of the hidden states this implementation reads (``None``: the subject's own
    input, ``d_model`` for a mixer, token ids for a model)."""

    scope = "layer"
    width: int | None = None
    module: nn.Module | None = None

    def forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def new_state(self, max_length: int) -> Any:
        raise NotImplementedError

    def step(self, x: Tensor, state: Any) -> Tensor:
        raise NotImplementedError

    def prepare(self, x: Tensor) -> None:
        """Called once with the case's input ``[B, T, width]`` before anything is timed (build shape-dependent
        inputs here)."""

    def parameters(self) -> list[Tensor]:
        return list(self.module.parameters()) if self.module is not None else []

    def supports(self, phase: str) -> bool:
        return True

    def flops(self, T: int, context: int, batch: int) -> int | None:
        """Forward FLOPs of one call over ``T`` tokens after ``context``; ``None``: the subject's own count
        (a layer-level reference computes the same function as the zoo implementation)."""
        return None


class ZooMixerAdapter(Adapter):
    """A zoo mixer; ``flops(T, context, batch)``: its own count when it serves as a reference for another mixer
    (``mixer:<name>``, e.g. a dense layer timed against a masked variant of it), else the subject's."""

    def __init__(self, mixer: nn.Module, batch: int,
                 flops: Callable[[int, int, int], int] | None = None) -> None:
        self.module, self.batch, self._flops = mixer, batch, flops

    def flops(self, T: int, context: int, batch: int) -> int | None:
        return self._flops(T, context, batch) if self._flops is not None else None

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x)[0]

    def new_state(self, max_length: int) -> Any:
        p = next(self.module.parameters())
        return self.module.init_state(self.batch, dtype=p.dtype, device=p.device, max_length=max_length)

    def step(self, x: Tensor, state: Any) -> Tensor:
        return self.module(x, state=state)[0]


class ZooModelAdapter(Adapter):
    def __init__(self, model: nn.Module, batch: int) -> None:
        self.module, self.batch = model, batch

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x).logits

    def new_state(self, max_length: int) -> Any:
        return self.module.init_states(self.batch, max_length=max_length)

    def step(self, x: Tensor, state: Any) -> Tensor:
        """The next-token logits: one token through the model's unchecked decode step (no input checks, no host
        synchronisation), a longer prefill through the checked forward keeping the last position's logits."""
        if x.shape[1] == 1:
            return self.module.step(x, state)
        return self.module(x, states=state, logits_to_keep=1).logits[:, -1]


class KernelAdapter(Adapter):
    """A core kernel timed on the case's shapes (forward phases only), without the layer's weights.

    ``fn(x, *aux) -> y`` with ``x [B, T, width]``; ``inputs(x) -> aux``: the kernel's other inputs for that ``x``
    (leaf tensors, built once before timing; their gradients are what ``forward_backward`` computes);
    ``flops(T, batch)``: forward FLOPs of one call."""

    scope = "kernel"

    def __init__(self, fn: Callable[..., Tensor], *, width: int, flops: Callable[[int, int], int],
                 inputs: Callable[[Tensor], list[Tensor]] | None = None) -> None:
        self.fn, self.width, self._flops, self._inputs = fn, width, flops, inputs
        self.aux: list[Tensor] = []

    def prepare(self, x: Tensor) -> None:
        self.aux = list(self._inputs(x)) if self._inputs is not None else []

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x, *self.aux)

    def parameters(self) -> list[Tensor]:
        return self.aux

    def supports(self, phase: str) -> bool:
        return phase in ("forward", "forward_backward")

    def flops(self, T: int, context: int, batch: int) -> int | None:
        return self._flops(T, batch)


def load_same_weights(dst: nn.Module, state_dict: dict[str, Tensor], *, what: str = "") -> None:
    """Load ``state_dict`` (the zoo implementation's weights, already renamed to ``dst``'s names) into ``dst``:
    every key of each side must have its counterpart, so the two compute the same function. Tensors on the meta
    device (the memory probe builds the zoo side there: weights do not change memory) are checked, not copied."""
    own = dst.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise ValueError(f"{what or type(dst).__name__}: the zoo weights do not fit the reference: missing "
                         f"{missing[:8]}, unexpected {unexpected[:8]}")
    bad = [k for k, v in state_dict.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise ValueError(f"{what or type(dst).__name__}: shapes differ for {bad[:8]}")
    if any(v.is_meta for v in state_dict.values()):
        return
    with torch.no_grad():
        dst.load_state_dict(state_dict, strict=True)
