"""The one-token q/k/v projection of an attention decode step without autograd (the lean path of
:meth:`zoo.layers.sparse_attention.SparseAttention.project_step`), the same values as
:meth:`zoo.layers.attention.Attention.project`::

    q, k, v = q_proj(x), k_proj(x), v_proj(x)          x [B, d] -> [B, H, D], [B, Hkv, D], [B, Hkv, 1, D]
    q, k    = q_norm(q), k_norm(k)                     (qk_norm)
    ang     = p * cat([inv_freq, inv_freq])            [D] (every row at p = offset) or [B, 1, D] (positions)
    [q | k] = [q | k] cos(ang) + rotate_half([q | k]) sin(ang)   (x attention_factor; q and k in one buffer)

Partial rotary (``rotary_dim < head_dim``), and the length-dependent RoPE kinds without explicit positions, fall
back to :meth:`~zoo.layers.attention.Attention.project`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from zoo.layers.base import default_positions
from zoo.layers.rope import DYNAMIC_ROPE, rotate_half

if TYPE_CHECKING:
    from zoo.layers.attention import Attention


def project_step(attn: Attention, x: Tensor, positions: Tensor | None, offset: int) -> tuple[Tensor, Tensor, Tensor]:
    """``attn.project`` of one token per row without autograd (``x [B, 1, d]``; ``positions [B, 1]``, or None for
    rows at position ``offset``, a host-side int) in about 25 calls fewer: ``q`` and ``k`` rotated together (one
    concatenation; the angles of :meth:`~zoo.layers.rope.RotaryEmbedding.step`, computed once for both); the same
    values as ``attn.project``, which partial rotary falls back to."""
    rot = attn.rotary
    if rot is not None and (rot.dim != attn.head_dim or (positions is None and rot.kind in DYNAMIC_ROPE)):
        return attn.project(x, default_positions(x, offset) if positions is None else positions)
    B = x.shape[0]
    H, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    x2 = x.view(B, -1)
    q = attn.q_proj(x2).view(B, H, D)
    k = attn.k_proj(x2).view(B, Hkv, D)
    v = attn.v_proj(x2).view(B, Hkv, 1, D)
    if attn.qk_norm:
        q, k = attn.q_norm(q), attn.k_norm(k)
    if rot is not None:  # q and k rotated together, with the angles of this one position
        cos, sin = rot.step(offset, positions, q.dtype)
        qk = torch.cat([q, k], dim=1)  # [B, H + Hkv, D]
        q, k = torch.addcmul(qk * cos, rotate_half(qk), sin).split([H, Hkv], dim=1)  # few calls: one token
    return q.view(B, H, 1, D), k.view(B, Hkv, 1, D), v
