r"""Block-sparse causal attention in plain torch: the layout helpers, the input checks and the reference (the CPU
path and the test oracle: masked attention over the token mask the layout implies).

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

__all__ = [
    "block_sparse_attention_ref",
    "dense_mask_from_layout",
    "sliding_window_block_mask",
    "local_stride_block_mask",
    "block_diagonal_block_mask",
]

# ----------------------------------------------------------------------------------------------------------------
# Layout helpers (pure torch, CPU by default)
# ----------------------------------------------------------------------------------------------------------------


def _num_blocks(T: int, block_size: int) -> int:
    return -(-T // block_size)


def sliding_window_block_mask(
    T: int, block_size: int, window: int | None, num_sink_tokens: int = 0, device: torch.device | str | None = None
) -> Tensor:
    """Blocks holding at least one key visible under causal + (``q - k < window`` or ``k < num_sink_tokens``).

    Returns bool ``[1, nB, nB]``. ``window=None`` gives every causal block (``qb >= kb``).
    """
    _check_window(window, num_sink_tokens)
    nb = _num_blocks(T, block_size)
    qb = torch.arange(nb, device=device)[:, None]
    kb = torch.arange(nb, device=device)[None, :]
    mask = kb <= qb
    if window is not None:
        k_last = torch.clamp((kb + 1) * block_size, max=T) - 1  # last key of block kb
        min_dist = torch.clamp(qb * block_size - k_last, min=0)  # smallest q - k over the pair (k <= q)
        mask = mask & ((min_dist < window) | (kb * block_size < num_sink_tokens))
    return mask[None]


def local_stride_block_mask(
    T: int,
    block_size: int,
    local_blocks: int,
    vert_stride: int,
    num_kv_heads: int,
    head_sliding_offset: int = 0,
    homo_head: bool = False,
    *,
    num_heads: int | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """dkernel's local + vertical-stride pattern (``dkernel/utils.py:get_sparse_attn_mask``), per KV head.

    ``local = (qb - kb) < local_blocks`` (counts the current block), ``vert = (kb + h * step + head_sliding_offset)
    % vert_stride == 0`` with ``step = max(1, int(vert_stride / num_heads))``, mask ``(local | vert) & (qb >= kb)``.
    dkernel computes ``step`` from the number of *query* heads (``num_heads``, default ``num_kv_heads``) and indexes
    the pattern by KV head ``h``. Returns bool ``[num_kv_heads, nB, nB]``, or ``[1, nB, nB]`` when ``homo_head``.
    """
    if local_blocks < 1 or vert_stride < 1 or num_kv_heads < 1:
        raise ValueError(
            f"local_stride_block_mask: local_blocks={local_blocks}, vert_stride={vert_stride} and "
            f"num_kv_heads={num_kv_heads} must all be >= 1"
        )
    nb = _num_blocks(T, block_size)
    n_q_heads = 1 if homo_head else (num_heads if num_heads is not None else num_kv_heads)
    step = max(1, int(vert_stride / n_q_heads))
    heads = torch.arange(1 if homo_head else num_kv_heads, device=device)[:, None, None]
    qb = torch.arange(nb, device=device)[None, :, None]
    kb = torch.arange(nb, device=device)[None, None, :]
    local = (qb - kb) < local_blocks
    vert = (kb + heads * step + head_sliding_offset) % vert_stride == 0
    return (local | vert) & (qb >= kb)


def block_diagonal_block_mask(T: int, block_size: int, device: torch.device | str | None = None) -> Tensor:
    """MASFormer block attention: each query block sees only its own block (causal inside). Bool ``[1, nB, nB]``."""
    nb = _num_blocks(T, block_size)
    return torch.eye(nb, dtype=torch.bool, device=device)[None]


def dense_mask_from_layout(
    block_mask: Tensor,
    block_size: int,
    T: int,
    window: int | None = None,
    num_sink_tokens: int = 0,
    num_heads: int | None = None,
) -> Tensor:
    """Token-level boolean mask ``[Hq or 1, T, T]`` (True = query i may attend key j) from a block layout.

    ``mask[h, i, j] = block_mask[h', i // bs, j // bs] & (j <= i) & (window is None | i - j < window |
    j < num_sink_tokens)``. A per-KV-head layout ``[Hkv, nB, nB]`` is expanded to ``num_heads`` query heads
    (head ``h`` uses layout head ``h // (num_heads / Hkv)``); a shared layout ``[1, nB, nB]`` stays ``[1, T, T]``.
    """
    _check_window(window, num_sink_tokens)
    nb = _num_blocks(T, block_size)
    if block_mask.dim() != 3 or block_mask.shape[-2:] != (nb, nb):
        raise ValueError(
            f"block_mask must have shape [Hkv or 1, {nb}, {nb}] for T={T}, block_size={block_size}; "
            f"got {tuple(block_mask.shape)}"
        )
    device = block_mask.device
    tok_block = torch.arange(T, device=device) // block_size
    mask = block_mask.bool()[:, tok_block[:, None], tok_block[None, :]]  # [Hm, T, T]
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    rule = j <= i
    if window is not None:
        rule = rule & ((i - j < window) | (j < num_sink_tokens))
    mask = mask & rule
    hm = mask.shape[0]
    if num_heads is not None and hm > 1:
        if num_heads % hm != 0:
            raise ValueError(f"num_heads={num_heads} is not a multiple of the layout's {hm} heads")
        mask = mask.repeat_interleave(num_heads // hm, dim=0)
    return mask


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
    """Plain-torch reference: SDPA with the dense boolean mask of :func:`dense_mask_from_layout`, computed in fp32
    (float64 for float64 inputs).

    q ``[B, H, T, D]``, k, v ``[B, Hkv, T, D]`` -> o ``[B, H, T, D]`` in ``q.dtype``. Rows with no visible key
    return zeros (they attend to themselves inside SDPA only to stay finite, then are zeroed, so their gradient
    is zero too). Differentiable; O(T^2) memory for the mask.
    """
    _check_inputs(q, k, v, block_mask, block_size, window, num_sink_tokens)
    B, H, T, D = q.shape
    group = H // k.shape[1]
    mask = dense_mask_from_layout(
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
    reach = sliding_window_block_mask(T, block_size, window, num_sink_tokens, device=block_mask.device)
    return block_mask.bool() & reach


def _visible_pairs(block_mask: Tensor, block_size: int, T: int, window, num_sink_tokens: int, num_heads: int) -> int:
    """Exact number of visible (query, key) pairs summed over query heads, computed in row chunks."""
    eff = _effective_layout(block_mask, block_size, T, window, num_sink_tokens)
    total = 0
    chunk = max(1, (1 << 24) // max(T, 1))
    tok_block = torch.arange(T, device=eff.device) // block_size
    j = torch.arange(T, device=eff.device)[None, :]
    for start in range(0, T, chunk):
        i = torch.arange(start, min(T, start + chunk), device=eff.device)[:, None]
        m = eff[:, tok_block[i[:, 0]][:, None], tok_block[None, :]] & (j <= i)
        if window is not None:
            m = m & ((i - j < window) | (j < num_sink_tokens))
        total += int(m.sum().item())
    return total * (num_heads // eff.shape[0])
