r"""InfLLM-v2 ops in plain torch: the oracle of the Triton kernels and of the CPU prefill schedules (``cpu.py``), and
the one-token decode step.

Notation (one batch row ``b``, one KV head ``h`` with the ``G`` query heads ``g`` of its group; keys stored in
*position space*, slot ``t`` = the token at position ``t``; ``bs`` = block size, ``s`` = kernel stride,
``st = bs / s``)::

    compress_keys:  C[j] = mean(k[j*s : j*s + size])  for the n = (N - size)//s + 1 full windows
    visible_windows(p) = max(0, (p + 1 - size)//s + 1)      windows ending at or before position p

    block_scores (stage 1 + group reduction + max pooling), query i at position p:
      lse_g  = logsumexp_{j2 < v2} (q_g . C2[j2] * scale)          (-inf when v2 = 0; exact: over C1[j < v1])
      S[j]   = sum_g exp(q_g . C1[j] * scale - lse_g)  for j < v1  (+inf when lse_g = -inf)
             = 0                                        for v1 <= j < e1   (the reference prefill's masked keys)
             = -inf                                     for j >= e1        (not a key of this query)
      S is rounded to ``score_dtype`` (the reference kernel writes the activation dtype, bf16 / fp16)
      BS[b]  = max_{j in [b*st - 1, b*st + st)} S[j]      (-inf when no entry)   (max_pool1d(st + 1, st, pad 1))

    select_blocks: the ``budget`` best blocks b <= p // bs by (BS desc, b asc), forced blocks
      (b < init_blocks or p//bs - local_blocks <= b <= p//bs) first (+inf); a dense query takes every b <= p//bs
      -> idx [.., W] ascending, -1 padded

    sparse_attention (stage 2): o_i = softmax_{t in K(i)} (q_i . k_t * scale) v_t,
      K(i) = {t <= p : t // bs in idx[i]}  (all G heads of a group share idx)

Shapes: q ``[B, H, Tq, D]`` (H = Hkv * G, head h reads KV head h // G), qpos ``[B, Tq]`` long, k / v ``[B, Hkv, N, D]``,
compressed keys ``[B, Hkv, n, D]``, visibility counts ``[B, Tq]`` long, block scores ``[B, Hkv, Tq, nB]`` fp32,
block indices ``[B, Hkv, Tq, W]`` int32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "compress_keys",
    "visible_windows",
    "block_scores_ref",
    "select_blocks",
    "sparse_attention_ref",
]


def compress_keys(k: Tensor, size: int, stride: int) -> Tensor:
    """Mean-pooled keys ``[B, Hkv, n, D]`` over the full windows ``[j*stride, j*stride + size)`` of ``k [B, Hkv, N, D]``
    (no padding: a partial last window is dropped, as the reference's ``CompressK``); accumulated in fp32 (fp64
    stays fp64), returned in k.dtype."""
    B, Hkv, N, D = k.shape
    if N < size:
        return k.new_zeros(B, Hkv, 0, D)
    return k.unfold(2, size, stride).to(torch.promote_types(k.dtype, torch.float32)).mean(-1).to(k.dtype)


def visible_windows(pos: Tensor, size: int, stride: int) -> Tensor:
    """How many windows ``[j*stride, j*stride + size)`` end at or before each position of ``pos`` (long tensor)."""
    return torch.clamp(torch.div(pos + 1 - size, stride, rounding_mode="floor") + 1, min=0)


def block_scores_ref(q: Tensor, c1: Tensor, c2: Tensor | None, v1: Tensor, e1: Tensor, v2: Tensor | None, *,
                     block_size: int, kernel_stride: int, num_blocks: int, scale: float,
                     score_dtype: torch.dtype | None = None) -> Tensor:
    """Stage-1 scores of ``q [B, H, Tq, D]`` against the compressed keys ``c1 [B, Hkv, n1, D]``, normalised by the
    log-sum-exp over ``c2 [B, Hkv, n2, D]`` (None: over ``c1`` itself, the exact / v1 form), summed over each GQA
    group and max-pooled into ``num_blocks`` blocks -> ``[B, Hkv, Tq, num_blocks]`` fp32 (see the module docstring).
    ``v1, e1, v2 [B, Tq]``: visible / existing ``c1`` entries and visible ``c2`` entries of each query."""
    B, H, Tq, D = q.shape
    Hkv, n1 = c1.shape[1], c1.shape[2]
    G = H // Hkv
    st = block_size // kernel_stride
    cdt = torch.promote_types(q.dtype, torch.float32)
    qg = q.to(cdt).reshape(B * Hkv, G * Tq, D)  # rows (g, t) of one KV head

    def logits(c: Tensor, shift: Tensor | None = None) -> Tensor:  # [B*Hkv, G*Tq, n] = q . c * scale - shift
        ct = c.to(cdt).reshape(B * Hkv, c.shape[2], D).transpose(1, 2)
        if shift is None:
            return torch.bmm(qg, ct).mul_(scale)
        return torch.baddbmm(shift.expand(-1, -1, c.shape[2]), qg, ct, beta=-1.0, alpha=scale)

    def masked(x: Tensor, count: Tensor) -> Tensor:  # -inf at entries j >= count (per query)
        j = torch.arange(x.shape[-1], device=q.device)
        hide = (j >= count[:, None, None, :, None]).expand(B, Hkv, G, Tq, x.shape[-1])
        return x.view(B, Hkv, G, Tq, -1).masked_fill_(hide, -math.inf).view_as(x)

    if c2 is None:
        lse = torch.logsumexp(masked(logits(c1), v1), dim=-1, keepdim=True)
    else:
        assert v2 is not None
        lse = torch.logsumexp(masked(logits(c2), v2), dim=-1, keepdim=True)
    # exp(x - (-inf)) = +inf for a query that sees no normalising key yet; masked keys are 0 (the kernel's NaN -> 0)
    p = masked(logits(c1, lse), v1).exp_()
    S = p.view(B, Hkv, G, Tq, n1).sum(2)  # [B, Hkv, Tq, n1]
    j1 = torch.arange(n1, device=q.device)
    S = S.masked_fill_(j1 >= e1[:, None, :, None], -math.inf)
    if score_dtype is not None and torch.finfo(score_dtype).bits < 32:
        S = S.to(score_dtype)
    S = S.float()
    L = num_blocks * st
    S = F.pad(S, (0, L - n1), value=-math.inf) if L > n1 else S[..., :L]
    pooled = F.max_pool1d(S.reshape(-1, 1, L), kernel_size=st + 1, stride=st, padding=1)[..., :num_blocks]
    return pooled.reshape(B, Hkv, Tq, num_blocks)


def forced_blocks(qpos: Tensor, nB: int, *, block_size: int, init_blocks: int, local_blocks: int,
                  dense: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Block indices ``b [nB]``, each query's own block ``bq [B, 1, Tq, 1]`` and the blocks every query keeps
    whatever their scores, ``forced [B, 1 | Hkv, Tq, nB]``: the initial blocks, the local window, and every block of
    a query marked ``dense [B, Tq]``."""
    bq = torch.div(qpos, block_size, rounding_mode="floor")[:, None, :, None]  # [B, 1, Tq, 1]
    b = torch.arange(nB, device=qpos.device)
    forced = (b < init_blocks) | ((b >= bq - local_blocks) & (b <= bq))
    if dense is not None:
        forced = forced | dense[:, None, :, None]
    return b, bq, forced


def select_blocks(bs: Tensor, qpos: Tensor, *, block_size: int, init_blocks: int, local_blocks: int, budget: int,
                  width: int | None = None, dense: Tensor | None = None) -> Tensor:
    """Block indices ``[B, Hkv, Tq, W]`` (int32, ascending, -1 padded) from block scores ``bs [B, Hkv, Tq, nB]``.

    A query at position ``p`` (block ``bq = p // block_size``) keeps the forced blocks (``b < init_blocks`` or
    ``bq - local_blocks <= b <= bq``) and fills ``budget`` slots with the best remaining blocks ``b <= bq`` by score,
    ties to the lower block index (scores of -inf still fill, as the reference's decode top-k; a score of +inf ranks
    after the forced blocks, where the reference's top-k order of equal +inf keys is unspecified); a query
    with ``dense[b, i]`` takes every block ``b <= bq``. ``W = width`` (default ``budget``) must cover them all."""
    B, Hkv, Tq, nB = bs.shape
    W = width or budget
    b, bq, forced = forced_blocks(qpos, nB, block_size=block_size, init_blocks=init_blocks,
                                  local_blocks=local_blocks, dense=dense)
    fin = torch.finfo(torch.float32)
    # finite keys for the scored blocks: a visible block always outranks a future one (-inf), a forced block (+inf)
    # outranks an unnormalised +inf score (the reference's top-k leaves the order of such ties unspecified)
    key = torch.clamp(bs.float(), min=fin.min, max=fin.max)
    key = torch.where(forced, math.inf, key)
    key = torch.where(b > bq, -math.inf, key)
    if nB < W:
        key = F.pad(key, (0, W - nB), value=-math.inf)
    ranked = torch.sort(key, dim=-1, descending=True, stable=True)
    top, order = ranked.values[..., :W], ranked.indices[..., :W]
    keep = top > -math.inf
    if W > budget:
        rank = torch.arange(W, device=bs.device)
        keep = keep & ((rank < budget) if dense is None else ((rank < budget) | dense[:, None, :, None]))
    idx = torch.where(keep, order, nB + W).sort(dim=-1).values
    return torch.where(idx < nB + W, idx, -1).to(torch.int32)


def _compact(member: Tensor) -> tuple[Tensor, Tensor]:
    """``member [..., M]`` bool -> the True positions in ascending order ``[..., U]`` (U = max count) and their
    validity (rows have different counts; the tail is padding)."""
    counts = member.sum(-1)
    U = max(1, int(counts.max())) if member.numel() else 1
    order = torch.sort((~member).to(torch.int8), dim=-1, stable=True).indices[..., :U]
    return order, torch.arange(U, device=member.device) < counts[..., None]


def sparse_attention_ref(q: Tensor, k: Tensor, v: Tensor, qpos: Tensor, idx: Tensor, *, block_size: int,
                         scale: float | None = None, query_tile: int | None = None, max_elems: int = 1 << 24) -> Tensor:
    """Stage 2: attention of ``q [B, H, Tq, D]`` (positions ``qpos [B, Tq]``) over the keys of the selected blocks
    ``idx [B, Hkv, Tq, W]`` of ``k, v [B, Hkv, N, D]`` (causal: keys ``t <= qpos``) -> ``[B, H, Tq, D]`` in q.dtype.
    Unselected blocks are never read. Two schedules, the same result:

    * ``query_tile=1``: each query gathers its own blocks (whole blocks, one ``index_select``) and attends with a
      batched matmul; cost ~ W blocks per query. No host synchronisation (the decode step).
    * ``query_tile=C > 1``: a tile of C queries gathers the union of its queries' blocks once and masks per query
      (one fused SDPA call per group of tiles); cost ~ (union size) per query, cheaper when neighbours agree.
    * ``None``: pick by the measured union sizes (a host synchronisation; prefill only).

    Differentiable; fp32 math for half inputs (fp64 stays fp64). A query without any visible key returns zeros."""
    B, H, Tq, D = q.shape
    N = k.shape[2]
    if query_tile is None:
        query_tile = _choose_tile(idx, -(-N // block_size))
    if query_tile <= 1 or Tq == 1:
        return _per_query(q, k, v, qpos, idx, block_size, scale, max_elems)
    return _per_tile(q, k, v, qpos, idx, block_size, scale, query_tile, max_elems)


# measured on a 2-core CPU: gathering one block costs about as much as attending to it with 8 query rows
_GATHER_COST = 2.0
_AUTO_TILE = 16


def _choose_tile(idx: Tensor, n_blocks: int) -> int:
    """1 or ``_AUTO_TILE``: per query a tile reads ``U / C`` gathers and does ``U`` blocks of work, a lone query
    reads and works ``W`` blocks (U = the tile's union size)."""
    B, Hkv, Tq, W = idx.shape
    C = _AUTO_TILE
    if Tq < 2 * C:
        return 1
    nT = Tq // C
    ids = idx[:, :, : nT * C].long().view(B, Hkv, nT, C, W)
    sel = torch.zeros(B, Hkv, nT, n_blocks + 1, dtype=torch.bool, device=idx.device)
    sel.scatter_(-1, torch.where(ids >= 0, ids, n_blocks).flatten(-2), True)
    union = sel[..., :n_blocks].sum(-1).float().mean().item()
    own = (idx >= 0).sum(-1).float().mean().item()
    return C if union * (1 + _GATHER_COST / C) < own * (1 + _GATHER_COST) else 1


def _blocks_view(x: Tensor, bs: int) -> Tensor:
    """``[B, Hkv, N, D]`` -> ``[B * Hkv * ceil(N / bs), bs, D]`` (a view when contiguous and N % bs == 0)."""
    B, Hkv, N, D = x.shape
    nb = -(-N // bs)
    if N % bs:
        x = F.pad(x, (0, 0, 0, nb * bs - N))
    return x.reshape(B * Hkv * nb, bs, D)


def _per_query(q: Tensor, k: Tensor, v: Tensor, qpos: Tensor, idx: Tensor, bs: int, scale: float | None,
               max_elems: int) -> Tensor:
    B, H, Tq, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G, W = H // Hkv, idx.shape[-1]
    nb = -(-N // bs)
    scale = D**-0.5 if scale is None else scale
    cdt = torch.promote_types(q.dtype, torch.float32)
    kb, vb = _blocks_view(k, bs), _blocks_view(v, bs)
    rows = (torch.arange(B, device=q.device)[:, None] * Hkv + torch.arange(Hkv, device=q.device)) * nb  # [B, Hkv]
    offs = torch.arange(bs, device=q.device)
    step = max(1, max_elems // max(1, B * Hkv * W * bs * (2 * D + G)))
    outs = []
    for t0 in range(0, Tq, step):
        t1 = min(Tq, t0 + step)
        n = B * Hkv * (t1 - t0)
        blk = idx[:, :, t0:t1].long()  # [B, Hkv, c, W]
        flat = (rows[:, :, None, None] + blk.clamp(min=0)).reshape(-1)
        kg = kb.index_select(0, flat).to(cdt).view(n, W * bs, D)
        vg = vb.index_select(0, flat).to(cdt).view(n, W * bs, D)
        kpos = blk.clamp(min=0)[..., None] * bs + offs  # [B, Hkv, c, W, bs]; keys >= N are after every query
        ok = ((blk >= 0)[..., None] & (kpos <= qpos[:, None, t0:t1, None, None])).reshape(n, 1, W * bs)
        empty = ~ok.any(-1, keepdim=True)
        qq = q[:, :, t0:t1].to(cdt).view(B, Hkv, G, t1 - t0, D).transpose(2, 3).reshape(n, G, D)
        s = torch.bmm(qq, kg.transpose(1, 2)).mul_(scale).masked_fill_(~(ok | empty), -math.inf)  # autograd-safe
        o = torch.bmm(torch.softmax(s, dim=-1), vg).masked_fill(empty, 0.0)  # [n, G, D]
        outs.append(o.view(B, Hkv, t1 - t0, G, D))
    o = torch.cat(outs, dim=2).permute(0, 1, 3, 2, 4).reshape(B, H, Tq, D)
    return o.to(q.dtype)


def _per_tile(q: Tensor, k: Tensor, v: Tensor, qpos: Tensor, idx: Tensor, bs: int, scale: float | None, C: int,
              max_elems: int) -> Tensor:
    B, H, Tq, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G, W = H // Hkv, idx.shape[-1]
    nBk = -(-N // bs)
    scale = D**-0.5 if scale is None else scale
    cdt = torch.promote_types(q.dtype, torch.float32)
    C = min(C, Tq)
    nT = -(-Tq // C)
    pad = nT * C - Tq
    qt = F.pad(q, (0, 0, 0, pad)).view(B, Hkv, G, nT, C, D).permute(0, 1, 3, 2, 4, 5)  # [B, Hkv, nT, G, C, D]
    pos = F.pad(qpos, (0, pad), value=-1).view(B, 1, nT, C)
    ids = F.pad(idx.long(), (0, 0, 0, pad), value=-1).view(B, Hkv, nT, C, W)
    sel = torch.zeros(B, Hkv, nT, C, nBk + 1, dtype=torch.bool, device=q.device)
    sel.scatter_(-1, torch.where(ids >= 0, ids, nBk), True)
    blocks, ok = _compact(sel[..., :nBk].any(3))  # [B, Hkv, nT, U]: the union of the tile's blocks
    U = blocks.shape[-1]
    blocks = blocks.clamp(min=0)
    kb, vb = _blocks_view(k, bs), _blocks_view(v, bs)
    rows = (torch.arange(B, device=q.device)[:, None] * Hkv + torch.arange(Hkv, device=q.device)) * nBk
    offs = torch.arange(bs, device=q.device)
    step = max(1, max_elems // max(1, B * Hkv * (G * C * U * bs + 2 * U * bs * D + C * U * bs)))
    outs = []
    for t0 in range(0, nT, step):
        t1 = min(nT, t0 + step)
        n = B * Hkv * (t1 - t0)
        blk, okt = blocks[:, :, t0:t1], ok[:, :, t0:t1]
        # did each query of the tile select each gathered block
        member = sel[:, :, t0:t1].gather(-1, blk[:, :, :, None, :].expand(-1, -1, -1, C, -1)) & okt[:, :, :, None]
        # a real query always sees itself (its own block is selected); a query with no block is padding
        empty = ~member.any(-1, keepdim=True)  # [B, Hkv, g, C, 1]
        member = member | (empty & (torch.arange(U, device=q.device) == 0))  # padding: one block, no NaN; 0 below
        kidx = (blk[..., None] * bs + offs).flatten(-2)  # [B, Hkv, g, U*bs] key positions (>= N: after every query)
        m = member.repeat_interleave(bs, dim=-1) & ((kidx[:, :, :, None, :] <= pos[:, :, t0:t1, :, None]) | empty)
        flat = (rows[:, :, None, None] + blk).reshape(-1)
        kg = kb.index_select(0, flat).to(cdt).view(n, 1, U * bs, D)
        vg = vb.index_select(0, flat).to(cdt).view(n, 1, U * bs, D)
        qq = qt[:, :, t0:t1].to(cdt).reshape(n, G, C, D)
        o = F.scaled_dot_product_attention(qq, kg, vg, attn_mask=m.reshape(n, 1, C, U * bs), scale=scale,
                                           enable_gqa=G > 1)
        o = o.masked_fill(empty.reshape(n, 1, C, 1), 0.0)
        outs.append(o.view(B, Hkv, t1 - t0, G, C, D))
    o = torch.cat(outs, dim=2).permute(0, 1, 3, 2, 4, 5).reshape(B, H, nT * C, D)[:, :, :Tq]
    return o.to(q.dtype)
