"""Rotary position embedding (RoPE), rotate-half (GPT-NeoX / Llama) layout.

``inv_freq[j] = theta^(-2j/d)`` for ``j < d/2``; ``angle[t, j] = pos_t * inv_freq[j]``;
``rope(x) = x * cos(angle) + rotate_half(x) * sin(angle)`` with ``rotate_half([a, b]) = [-b, a]``.
Scaling variants (as transformers' ``rope_scaling``): ``linear`` (positions / factor) and ``llama3``
(piecewise frequency scaling by wavelength). Angles are computed in fp32, as transformers does.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

ROPE_TYPES = ("default", "linear", "llama3")


def rope_inv_freq(dim: int, theta: float, scaling: dict[str, Any] | None = None) -> Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: {list(ROPE_TYPES)}")


class RotaryEmbedding(nn.Module):
    def __init__(self, dim: int, theta: float = 10000.0, scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.dim, self.theta, self.scaling = dim, theta, scaling
        self.register_buffer("inv_freq", rope_inv_freq(dim, theta, scaling), persistent=False)

    def reset_buffers(self) -> None:
        """Recompute ``inv_freq`` (after the module was built on the meta device)."""
        self.inv_freq = rope_inv_freq(self.dim, self.theta, self.scaling).to(self.inv_freq.device)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``positions: [B, T]`` -> ``cos, sin: [B, 1, T, dim]`` (broadcast over heads)."""
        angles = positions.float()[..., None] * self.inv_freq.float()  # [B, T, dim/2]
        emb = torch.cat((angles, angles), dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of ``x: [B, H, T, D]``; the rest pass through."""
    rd = cos.shape[-1]
    if rd == x.shape[-1] and not (torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad
                                                                or sin.requires_grad)):
        return _rotary_inference(x, cos, sin)
    if rd == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    xr, xp = x[..., :rd], x[..., rd:]
    return torch.cat((xr * cos + rotate_half(xr) * sin, xp), dim=-1)


def _rotary_inference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x * cos + rotate_half(x) * sin`` without autograd, written half by half into one buffer of ``x``'s layout
    (two passes instead of five, no concatenated copy): ``[x1 c1 - x2 s1, x2 c2 + x1 s2]``."""
    h = x.shape[-1] // 2
    out = torch.empty_like(x)
    x1, x2, o1, o2 = x[..., :h], x[..., h:], out[..., :h], out[..., h:]
    torch.mul(x1, cos[..., :h], out=o1).addcmul_(x2, sin[..., :h], value=-1)
    torch.mul(x2, cos[..., h:], out=o2).addcmul_(x1, sin[..., h:])
    return out
