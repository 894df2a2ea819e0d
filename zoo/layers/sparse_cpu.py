"""CPU fast paths of the sparse-attention mixers over unpadded, unpacked rows (token index = slot), pinned by tests
to the masked reference (:func:`zoo.layers.sparse_ops.blocked_attention`). Both read key windows as overlapping
strided *views* (no copies of keys per query chunk) and give SDPA additive float masks that broadcast with stride 0.

* :func:`window_attention` -- sliding window without sinks: query chunks of ``C`` tokens over the ``C + window - 1``
  keys ending at their last token; one ``[C, C + window - 1]`` mask shared by every chunk (no bool -> float
  conversion inside SDPA, no per-chunk or per-GQA-group mask copies).
* :func:`block_sparse_attention_cpu` -- dkernel's local + vertical-stride pattern (:class:`~zoo.layers.masks.
  LocalStrideRule`) in time and memory proportional to the active blocks, forward and backward. Per query block
  ``qb`` the keys split in two disjoint parts, each an SDPA (flash) call:

  - local: the ``local_blocks`` blocks ending at ``qb`` (a strided window, block-causal mask shared by all blocks);
  - vertical: KV head ``h``'s vertical blocks (``kb = r_h mod vertical_stride``) before the local window, gathered
    once per head into a compact sequence; query block ``qb`` reads a prefix of it. Query blocks go in groups that
    share one prefix (stride-0 over the group), a ``[group, Hkv, 1, keys]`` mask drops what a block must not see.

  The two parts merge by their log-sum-exps. The backward runs the flash backward of each part with the *merged*
  output and log-sum-exp (exact for a partition of the keys), summing the query gradients and scattering the key
  gradients back (windows overlap-added, vertical blocks index-added), in groups of query blocks, so memory stays
  that of the inputs, the output and one group's gradients.

GQA: the ``G = H / Hkv`` query heads of a KV head are folded into the query axis (``[.., Hkv, G * bs, D]``), so the
per-KV-head vertical mask broadcasts over them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from zoo.layers.masks import LocalStrideRule

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
NEG_INF = float("-inf")


def window_attention(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float, chunk: int = 64) -> Tensor:
    """Sliding-window causal attention (``i - window < j <= i``), ``q [B, H, T, D]``, ``k, v [B, Hkv, T, D]``.
    Returns ``o [B, H, T, D]`` laid out as ``[B, T, H, D]`` (``o.transpose(1, 2).reshape(B, T, H * D)`` is a view).
    Only the first chunks, whose windows reach before the sequence, get masks of their own."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    C = min(chunk, T)
    nC = -(-T // C)
    pad, right = window - 1, nC * C - T
    Ck = C + pad
    kp, vp = F.pad(k, (0, 0, pad, right)), F.pad(v, (0, 0, pad, right))  # [B, Hkv, pad + nC * C, D]
    qp = F.pad(q, (0, 0, 0, right)) if right else q
    a = torch.arange(C, device=q.device)[:, None]
    b = torch.arange(Ck, device=q.device)[None, :]
    base = torch.zeros(C, Ck, dtype=q.dtype, device=q.device).masked_fill_((b < a) | (b > a + pad), NEG_INF)
    out = q.new_empty(B, nC * C, H, D)
    first = min(nC, -(-pad // C))  # chunks whose key window starts before token 0
    for r in range(B):
        qc = qp[r].view(H, nC, C, D).transpose(0, 1)  # [nC, H, C, D] (a view)
        kw = kp[r].unfold(1, Ck, C).permute(1, 0, 3, 2)  # [nC, Hkv, Ck, D] (overlapping windows, a view)
        vw = vp[r].unfold(1, Ck, C).permute(1, 0, 3, 2)
        for c0, c1 in ((0, first), (first, nC)):
            if c1 <= c0:
                continue
            m = base.expand(c1 - c0, 1, C, Ck)
            if c0 == 0:  # keys before the sequence start: masked
                lo = pad - torch.arange(c0, c1, device=q.device) * C
                m = m.masked_fill(b < lo[:, None, None, None], NEG_INF)
            o = F.scaled_dot_product_attention(qc[c0:c1], kw[c0:c1], vw[c0:c1], attn_mask=m, scale=scale,
                                               enable_gqa=H != Hkv)
            out[r, c0 * C:c1 * C] = o.transpose(1, 2).reshape((c1 - c0) * C, H, D)
    return out[:, :T].transpose(1, 2)


# ---------------------------------------------------------------------------------------------- block sparse
def block_sparse_supported(rule: object, q: Tensor) -> bool:
    """Whether :func:`block_sparse_attention_cpu` covers this rule and input (local + vertical stride without dense
    heads, fp32 / fp64 on the CPU)."""
    return (isinstance(rule, LocalStrideRule) and rule.num_dense_heads == 0 and q.device.type == "cpu"
            and q.dtype in (torch.float32, torch.float64))


class _Plan:
    """Block bookkeeping of one sequence length: which compact vertical blocks each query block reads per head."""

    def __init__(self, rule: LocalStrideRule, nb: int, Hkv: int, device: torch.device, group: int) -> None:
        bs, S = rule.block_size, rule.vertical_stride
        self.bs, self.nb, self.local = bs, nb, rule.local_blocks
        h = torch.zeros(Hkv, dtype=torch.long) if rule.homo_head else torch.arange(Hkv)
        self.residue = (-(h * rule.step + rule.head_sliding_offset)) % S  # [Hkv]: kb = r_h (mod S) is vertical
        # compact vertical blocks of head h: kb = r_h + S * i, i < n_h (blocks that exist)
        n = ((nb - self.residue + S - 1) // S).clamp(min=0)  # [Hkv]
        self.nv = int(n.max()) if Hkv else 0
        i = torch.arange(self.nv)
        self.blocks = (self.residue[:, None] + S * i[None, :]).clamp(max=max(nb - 1, 0))  # [Hkv, nv]
        # query block qb reads the compact blocks i < m[qb, h]: the vertical blocks before its local window
        first_local = (torch.arange(nb) - self.local + 1).clamp(min=0)  # [nb]
        self.m = ((first_local[:, None] - self.residue[None, :] + S - 1) // S).clamp(min=0)  # [nb, Hkv]
        self.groups = []  # (qb0, qb1, L): query blocks [qb0, qb1) read the first L compact blocks
        for qb0 in range(0, nb, group):
            qb1 = min(nb, qb0 + group)
            L = int(self.m[qb1 - 1].max())
            if L:
                self.groups.append((qb0, qb1, L))
        self.device = device

    def vertical_mask(self, qb0: int, qb1: int, L: int, dtype: torch.dtype) -> Tensor:
        """``[qb1 - qb0, Hkv, 1, L * bs]``: 0 where the query block reads the compact key, -inf elsewhere."""
        seen = torch.arange(L)[None, None, :] < self.m[qb0:qb1, :, None]  # [g, Hkv, L] compact blocks read
        mask = torch.zeros(seen.shape, dtype=dtype).masked_fill_(~seen, NEG_INF)
        return mask.repeat_interleave(self.bs, dim=-1)[:, :, None].to(self.device)

    def empty_rows(self, qb0: int, qb1: int) -> Tensor:
        """``[qb1 - qb0, Hkv, 1]``: True where a query block reads no vertical key (its log-sum-exp is -inf)."""
        return (self.m[qb0:qb1] == 0)[..., None].to(self.device)


def _local_mask(bs: int, local: int, G: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[G * bs, local * bs]``: the last of the ``local`` blocks causal, the others visible (folded GQA rows)."""
    W = local * bs
    a = torch.arange(bs, device=device)[:, None] + (local - 1) * bs
    b = torch.arange(W, device=device)[None, :]
    m = torch.zeros(bs, W, dtype=dtype, device=device).masked_fill_(b > a, NEG_INF)
    return m.repeat(G, 1)


class _BlockSparseCPU(torch.autograd.Function):
    """Query blocks in ranges of ``group`` (the vertical groups' ranges): each range's queries are folded, its key
    windows taken as views of ``k, v`` (a small padded copy only where a window leaves ``[0, T)``), so no folded or
    padded copy of a whole tensor exists; the output is written in its final ``[B, T, H, D]`` layout."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, rule: LocalStrideRule, scale: float,  # type: ignore[override]
                group: int) -> Tensor:
        B, H, T, D = q.shape
        Hkv = k.shape[1]
        G, bs, local = H // Hkv, rule.block_size, rule.local_blocks
        nb = -(-T // bs)
        plan = _Plan(rule, nb, Hkv, q.device, group)
        vgroups = {qb0: (qb1, L) for qb0, qb1, L in plan.groups}
        lmask = _local_mask(bs, local, G, q.dtype, q.device)
        o = q.new_empty(B, nb * bs, H, D)
        lse_f = q.new_empty(B, nb, Hkv, G * bs)
        for r in range(B):
            if plan.groups:
                kv, vv = _gather_vertical(k[r], plan, T), _gather_vertical(v[r], plan, T)
            for c0 in range(0, nb, group):
                c1 = min(nb, c0 + group)
                qf = _fold_range(q[r], Hkv, G, bs, c0, c1)  # [n, Hkv, G*bs, D]
                kw, vw = _windows(k[r], c0, c1, bs, local), _windows(v[r], c0, c1, bs, local)
                out, lse = _flash(qf, kw, vw, attn_mask=_range_local_mask(lmask, c0, c1, bs, local), scale=scale)
                if c0 in vgroups:
                    c1_, L = vgroups[c0]
                    kpre = kv[:, :L * bs].expand(c1 - c0, Hkv, L * bs, D)
                    vpre = vv[:, :L * bs].expand(c1 - c0, Hkv, L * bs, D)
                    o_v, lse_v = _flash(qf, kpre, vpre, attn_mask=plan.vertical_mask(c0, c1, L, q.dtype), scale=scale)
                    lse_v = lse_v.masked_fill(plan.empty_rows(c0, c1), NEG_INF)
                    new = torch.logaddexp(lse, lse_v)
                    out = out * (lse - new).exp_()[..., None] + o_v * (lse_v - new).exp_()[..., None]
                    lse = new
                o[r, c0 * bs:c1 * bs] = _unfold_range(out, G).transpose(0, 1)  # [n*bs, H, D]
                lse_f[r, c0:c1] = lse
        res = o[:, :T].transpose(1, 2)  # [B, H, T, D] laid out as [B, T, H, D]
        ctx.save_for_backward(q, k, v, res, lse_f)  # the output itself (refolded per range in the backward)
        ctx.rule, ctx.scale, ctx.group = rule, scale, group
        return res

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):  # type: ignore[override]
        q, k, v, o, lse_f = ctx.saved_tensors
        rule, scale, group = ctx.rule, ctx.scale, ctx.group
        B, H, T, D = q.shape
        Hkv = k.shape[1]
        G, bs, local = H // Hkv, rule.block_size, rule.local_blocks
        nb = -(-T // bs)
        padl = (local - 1) * bs
        plan = _Plan(rule, nb, Hkv, q.device, group)
        vgroups = {qb0: (qb1, L) for qb0, qb1, L in plan.groups}
        lmask = _local_mask(bs, local, G, q.dtype, q.device)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        for r in range(B):
            dkp = k.new_zeros(Hkv, padl + nb * bs, D)  # key gradients, left-padded like the windows' rows
            dvp = v.new_zeros(Hkv, padl + nb * bs, D)
            if plan.groups:
                kv, vv = _gather_vertical(k[r], plan, T), _gather_vertical(v[r], plan, T)
                dkv, dvv = torch.zeros_like(kv), torch.zeros_like(vv)
            for c0 in range(0, nb, group):
                c1 = min(nb, c0 + group)
                qf, gf = _fold_range(q[r], Hkv, G, bs, c0, c1), _fold_range(g[r], Hkv, G, bs, c0, c1)
                out, lse = _fold_range(o[r], Hkv, G, bs, c0, c1), lse_f[r, c0:c1]  # padded rows: out 0, grad 0
                kw, vw = _windows(k[r], c0, c1, bs, local), _windows(v[r], c0, c1, bs, local)
                gq, gk, gv = _flash_bwd(gf, qf, kw, vw, out, lse, 0.0, False,
                                        attn_mask=_range_local_mask(lmask, c0, c1, bs, local), scale=scale)
                _overlap_add(dkp, gk, c0, bs, local)
                _overlap_add(dvp, gv, c0, bs, local)
                if c0 in vgroups:
                    c1_, L = vgroups[c0]
                    kpre = kv[:, :L * bs].expand(c1 - c0, Hkv, L * bs, D)
                    vpre = vv[:, :L * bs].expand(c1 - c0, Hkv, L * bs, D)
                    gq2, gk2, gv2 = _flash_bwd(gf, qf, kpre, vpre, out, lse, 0.0, False,
                                               attn_mask=plan.vertical_mask(c0, c1, L, q.dtype), scale=scale)
                    gq = gq + gq2
                    dkv[:, :L * bs] += gk2.sum(0)
                    dvv[:, :L * bs] += gv2.sum(0)
                rows = _unfold_range(gq, G)  # [H, n*bs, D]
                dq[r, :, c0 * bs:min(T, c1 * bs)] = rows[:, :min(T, c1 * bs) - c0 * bs]
            if plan.groups:
                _scatter_vertical(dkp, dkv, plan, padl)
                _scatter_vertical(dvp, dvv, plan, padl)
            dk[r] = dkp[:, padl:padl + T]
            dv[r] = dvp[:, padl:padl + T]
        return dq, dk, dv, None, None, None


def _fold_range(x: Tensor, Hkv: int, G: int, bs: int, c0: int, c1: int) -> Tensor:
    """Query blocks ``c0..c1`` of ``x [H, T, D]`` -> ``[c1 - c0, Hkv, G * bs, D]`` (zero rows past ``T``): GQA heads
    folded into the rows."""
    H, T, D = x.shape
    n = c1 - c0
    seg = x[:, c0 * bs:min(T, c1 * bs)]
    if seg.shape[1] != n * bs:
        seg = F.pad(seg, (0, 0, 0, n * bs - seg.shape[1]))
    return seg.unflatten(0, (Hkv, G)).unflatten(2, (n, bs)).permute(2, 0, 1, 3, 4).reshape(n, Hkv, G * bs, D)


def _unfold_range(xf: Tensor, G: int) -> Tensor:
    """Inverse of :func:`_fold_range`: ``[n, Hkv, G * bs, D]`` -> ``[H, n * bs, D]``."""
    n, Hkv, Gbs, D = xf.shape
    bs = Gbs // G
    return xf.view(n, Hkv, G, bs, D).permute(1, 2, 0, 3, 4).reshape(Hkv * G, n * bs, D)


def _windows(x: Tensor, c0: int, c1: int, bs: int, local: int) -> Tensor:
    """The key windows of query blocks ``c0..c1``: ``[c1 - c0, Hkv, local * bs, D]``, window ``c`` = rows ``[(c -
    local + 1) * bs, (c + 1) * bs)`` of ``x [Hkv, T, D]`` (zeros outside ``[0, T)``, masked). A view of ``x`` when
    the windows stay inside it, else a padded copy of just these rows."""
    T = x.shape[1]
    lo, hi = (c0 - local + 1) * bs, c1 * bs
    seg = x[:, max(lo, 0):min(hi, T)]
    if lo < 0 or hi > T:
        seg = F.pad(seg, (0, 0, max(-lo, 0), max(hi - T, 0)))
    return seg.unfold(1, local * bs, bs).permute(1, 0, 3, 2)


def _range_local_mask(lmask: Tensor, c0: int, c1: int, bs: int, local: int) -> Tensor:
    """The local masks of query blocks ``c0..c1`` (keys before token 0 masked for the first blocks)."""
    m = lmask.expand(c1 - c0, 1, *lmask.shape)
    return _left_masked(m, c0, bs, (local - 1) * bs) if c0 < local - 1 else m


def _left_masked(m: Tensor, c0: int, bs: int, padl: int) -> Tensor:
    """The local masks of query blocks ``c0..`` with the keys before token 0 (left padding) masked."""
    n, W = m.shape[0], m.shape[-1]
    lo = padl - (c0 + torch.arange(n, device=m.device)) * bs  # keys b < lo are padding
    b = torch.arange(W, device=m.device)
    return m.masked_fill(b[None, None, None, :] < lo[:, None, None, None], NEG_INF)


def _gather_vertical(x: Tensor, plan: _Plan, T: int) -> Tensor:
    """``[Hkv, T, D]`` -> each head's vertical blocks in order, ``[Hkv, nv * bs, D]`` (a copy of 1/stride of x)."""
    Hkv, _, D = x.shape
    Tp = plan.nb * plan.bs
    xb = (F.pad(x, (0, 0, 0, Tp - T)) if Tp != T else x).view(Hkv, plan.nb, plan.bs, D)
    idx = plan.blocks.to(x.device)[..., None, None].expand(Hkv, plan.nv, plan.bs, D)
    return torch.gather(xb, 1, idx).reshape(Hkv, plan.nv * plan.bs, D)


def _scatter_vertical(dxp: Tensor, dxv: Tensor, plan: _Plan, padl: int) -> None:
    """Add the compact vertical gradients ``[Hkv, nv * bs, D]`` back at their blocks of ``dxp`` (left-padded). The
    entries past a head's last vertical block (clamped onto the last block) are never read: their gradient is 0."""
    Hkv, _, D = dxv.shape
    body = dxp[:, padl:padl + plan.nb * plan.bs].view(Hkv, plan.nb, plan.bs, D)
    idx = plan.blocks.to(dxp.device)[..., None, None].expand(Hkv, plan.nv, plan.bs, D)
    body.scatter_add_(1, idx, dxv.view(Hkv, plan.nv, plan.bs, D))


def _overlap_add(dxp: Tensor, gw: Tensor, c0: int, bs: int, local: int) -> None:
    """Add window gradients ``gw [n, Hkv, local * bs, D]`` of query blocks ``c0..c0+n`` into ``dxp [Hkv, padl +
    Tp, D]``: window ``c`` covers the padded rows ``[c * bs, (c + local) * bs)``."""
    n, Hkv, W, D = gw.shape
    gb = gw.view(n, Hkv, local, bs, D)
    body = dxp[:, c0 * bs:(c0 + n + local - 1) * bs].view(Hkv, n + local - 1, bs, D)
    for j in range(local):
        body[:, j:j + n] += gb[:, :, j].transpose(0, 1)


def block_sparse_attention_cpu(q: Tensor, k: Tensor, v: Tensor, rule: LocalStrideRule, scale: float,
                               group: int | None = None) -> Tensor:
    """Local + vertical-stride block-sparse causal attention of unpadded rows, ``q [B, H, T, D]``, ``k, v [B, Hkv,
    T, D]`` -> ``o [B, H, T, D]`` (laid out as ``[B, T, H, D]``); differentiable. ``group``: query blocks per
    vertical call (default: the vertical stride, over which the vertical prefix grows by at most one block)."""
    return _BlockSparseCPU.apply(q, k, v, rule, scale, group or rule.vertical_stride)
