"""Feed-forward blocks: SwiGLU (``down(act(gate(x)) * up(x))``, Llama names) or a plain two-layer MLP."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class MLP(nn.Module):
    def __init__(
        self, d_model: int, intermediate_size: int, activation: str = "silu", gated: bool = True, bias: bool = False
    ) -> None:
        super().__init__()
        self.gated = gated
        self.act = ACTIVATIONS[activation]
        if gated:
            self.gate_proj = nn.Linear(d_model, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(d_model, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:  # [B, T, D] -> [B, T, D]
        h = self.act(self.gate_proj(x)) * self.up_proj(x) if self.gated else self.act(self.up_proj(x))
        return self.down_proj(h)
