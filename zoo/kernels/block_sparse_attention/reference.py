r"""Block-sparse causal attention in plain torch: the input checks and the reference (the CPU path and the test
oracle: masked attention over the token mask the layout implies, :func:`zoo.layers.masks.layout_to_token_mask`).

Per batch ``b`` and query head ``h`` (key/value head ``g = h // (H / Hkv)``, GQA), with ``s = scale`` (default
``1/sqrt(D)``)::

    S(i) = { j : block_mask[g', i // bs, j // bs]  and  j <= i
                 and (window is None  or  i - j < window  or  j < num_sink_tokens) }
    o_i  = sum_{j in S(i)} softmax_j(s * q_i . k_j) v_j              (o_i = 0 when S(i) is empty)

where ``bs = block_size`` and ``g' = g`` for a per-KV-head layout ``block_mask [Hkv, nB, nB]`` or ``g' = 0`` for a
shared one ``[1, nB, nB]``, ``nB = ceil(T / bs)``. Blocks above the diagonal hold no causal key and are ignored.
A query row whose visible set is empty (its diagonal block inactive and no other visible key) returns zeros and
gets zero gradients; the diagonal block always contains the query itself, so with it active no row is empty.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from zoo.layers.masks import layout_to_token_mask, sliding_window_layout

__all__ = ["block_sparse_attention_ref"]

# Layouts (which key blocks each query block visits) are built from the mixers' rules in zoo.layers.masks
# (``rule_layout``, ``sliding_window_layout``, ``local_stride_layout``, ``block_diagonal_layout``), and expanded to
# tokens there too (``layout_to_token_mask``): one source for each rule.


def _num_blocks(T: int, block_size: int) -> int:
    return -(-T // block_size)


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------


def _check_window(window: int | None, num_sink_tokens: int) -> None:
    if window is not None and int(window) < 1:
        raise ValueError(f"window must be None or >= 1 (q - k < window keeps the current token); got {window}")
    if int(num_sink_tokens) < 0:
        raise ValueError(f"num_sink_tokens must be >= 0; got {num_sink_tokens}")


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, block_mask: Tensor, block_size: int, window, num_sink_tokens):
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be [B, H, T, D] / [B, Hkv, T, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    B, H, T, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[2] != T or k.shape[3] != D:
        raise ValueError(f"k and v must be [B={B}, Hkv, T={T}, D={D}]; got {tuple(k.shape)} and {tuple(v.shape)}")
    hkv = k.shape[1]
    if H % hkv != 0:
        raise ValueError(f"num query heads H={H} must be a multiple of num kv heads Hkv={hkv}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if int(block_size) < 1:
        raise ValueError(f"block_size must be >= 1; got {block_size}")
    nb = _num_blocks(T, block_size)
    if block_mask.dim() != 3 or block_mask.shape[0] not in (1, hkv) or block_mask.shape[-2:] != (nb, nb):
        raise ValueError(
            f"block_mask must be [1 or Hkv={hkv}, {nb}, {nb}] (nB = ceil(T={T} / block_size={block_size})); "
            f"got {tuple(block_mask.shape)}"
        )
    _check_window(window, num_sink_tokens)


# ----------------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------------


def block_sparse_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    block_mask: Tensor,
    block_size: int,
    window: int | None = None,
    num_sink_tokens: int = 0,
    scale: float | None = None,
) -> Tensor:
    """Plain-torch reference: SDPA with the dense boolean mask of :func:`zoo.layers.masks.layout_to_token_mask`, in fp32
    (float64 for float64 inputs).

    q ``[B, H, T, D]``, k, v ``[B, Hkv, T, D]`` -> o ``[B, H, T, D]`` in ``q.dtype``. Rows with no visible key
    return zeros (they attend to themselves inside SDPA only to stay finite, then are zeroed, so their gradient
    is zero too). Differentiable; O(T^2) memory for the mask.
    """
    _check_inputs(q, k, v, block_mask, block_size, window, num_sink_tokens)
    B, H, T, D = q.shape
    group = H // k.shape[1]
    mask = layout_to_token_mask(
        block_mask.to(q.device), block_size, T, window, num_sink_tokens, num_heads=H
    )  # [H or 1, T, T]
    has_any = mask.any(-1, keepdim=True)  # [H or 1, T, 1]
    eye = torch.eye(T, dtype=torch.bool, device=q.device)
    safe = mask | (eye & ~has_any)
    cdt = torch.promote_types(q.dtype, torch.float32)  # fp32 math for half inputs, float64 stays float64
    kf = k.to(cdt).repeat_interleave(group, dim=1) if group > 1 else k.to(cdt)
    vf = v.to(cdt).repeat_interleave(group, dim=1) if group > 1 else v.to(cdt)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    o = F.scaled_dot_product_attention(q.to(cdt), kf, vf, attn_mask=safe[None], scale=scale)  # [B, H, T, D]
    o = torch.where(has_any[None], o, torch.zeros((), dtype=o.dtype, device=o.device))
    return o.to(q.dtype)


# ----------------------------------------------------------------------------------------------------------------
# What the kernel visits (its CSR/CSC tables are built from this) and the pairs it computes (bench FLOPs)
# ----------------------------------------------------------------------------------------------------------------


def _effective_layout(block_mask: Tensor, block_size: int, T: int, window: int | None, num_sink_tokens: int) -> Tensor:
    """block_mask AND causal blocks AND blocks holding a visible key under the window/sink rule: bool [Hm, nB, nB]."""
    nb = _num_blocks(T, block_size)
    if window is None:
        reach = torch.ones(nb, nb, dtype=torch.bool, device=block_mask.device).tril()[None]
    else:
        reach = sliding_window_layout(nb, nb, block_size, window, num_sink_tokens, device=block_mask.device)
    return block_mask.bool() & reach


def _visible_pairs(block_mask: Tensor, block_size: int, T: int, window, num_sink_tokens: int, num_heads: int) -> int:
    """Exact number of visible (query, key) pairs summed over query heads, counted in row chunks."""
    eff = _effective_layout(block_mask, block_size, T, window, num_sink_tokens)
    chunk = max(1, (1 << 24) // max(T, 1))
    total = sum(int(layout_to_token_mask(eff, block_size, T, window, num_sink_tokens,
                                         rows=(start, min(T, start + chunk))).sum())
                for start in range(0, T, chunk))
    return total * (num_heads // eff.shape[0])
