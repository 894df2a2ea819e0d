"""The mixer interface shared by every sequence-mixing layer in the zoo.

A mixer maps hidden states ``x: [B, T, D] -> y: [B, T, D]``. With ``state=None`` it runs the parallel
(training) form over the whole sequence; with a state it continues from it (a prefill chunk of any length
or a single decode token) and returns the updated state. Chunked prefill and token-by-token decode must
reproduce the parallel forward ("three modes agree").

Conventions every mixer follows:

* ``positions: [B, T]`` absolute positions (from the attention mask for left-padded batches).
* ``attention_mask: [B, T]`` 1 for real tokens, 0 for padding, for the tokens of *this call*; a padded
  token is a no-op for the state (never attended to, never written into a recurrent state).
* ``seq_idx: [B, T]`` document ids of packed sequences; nothing crosses a document boundary.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor, nn


class State:
    """Base class of the per-layer inference states (subclasses are dataclasses of tensors)."""

    def _tensors(self) -> list[Tensor]:
        out = []
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                out.append(v)
        return out

    @property
    def nbytes(self) -> int:
        """Bytes held by this state's tensors."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def reorder(self, batch_indices: Tensor) -> None:
        """Select / reorder batch rows in place (beam search)."""
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if isinstance(v, Tensor) and v.dim() > 0:
                setattr(self, f.name, v.index_select(0, batch_indices.to(v.device)))


class Mixer(nn.Module):
    """Base class: ``forward(x, *, positions, state, attention_mask, seq_idx) -> (y, state)``."""

    mixer_name: ClassVar[str] = ""
    # Groups of ``ZooConfig.mixer_defaults`` this mixer reads its defaults from.
    arg_groups: ClassVar[tuple[str, ...]] = ()

    def __init__(self, d_model: int, layer_idx: int = 0) -> None:
        super().__init__()
        self.d_model = d_model
        self.layer_idx = layer_idx

    @classmethod
    def check_args(cls, d_model: int, kwargs: dict[str, Any]) -> None:
        """Raise ``ValueError`` for inconsistent sizes at config time (override per mixer)."""

    def forward(
        self,
        x: Tensor,
        *,
        positions: Tensor | None = None,
        state: State | None = None,
        attention_mask: Tensor | None = None,
        seq_idx: Tensor | None = None,
    ) -> tuple[Tensor, State | None]:
        raise NotImplementedError

    def init_state(
        self, batch_size: int, *, dtype: torch.dtype, device: torch.device | str, max_length: int | None = None
    ) -> State:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}"


def default_positions(x: Tensor, offset: int = 0) -> Tensor:
    """``[B, T]`` positions ``offset .. offset+T-1`` for an unpadded batch."""
    B, T = x.shape[:2]
    return torch.arange(offset, offset + T, device=x.device).unsqueeze(0).expand(B, T)
