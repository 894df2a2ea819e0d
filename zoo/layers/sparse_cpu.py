"""CPU fast paths of the sparse-attention mixers over unpadded, unpacked rows (token index = slot), pinned by tests
to the masked reference (:func:`zoo.layers.sparse_ops.blocked_attention`). Both read key windows as overlapping
strided *views* of ``k, v`` (no padded or per-chunk copies of the keys), give the flash kernel additive float masks
that broadcast with stride 0, work in groups of query blocks (every temporary is the size of one group: a fold of
the group's queries, its outputs) and write the output straight into its final ``[B, T, H, D]`` layout.

* :func:`window_attention` -- sliding window without sinks: the first ``window`` queries see every earlier key
  (one causal call); the rest go in chunks of ``C`` queries over the ``C + window - 1`` keys ending at their last
  token, one ``[C, C + window - 1]`` band mask shared by every chunk. In fp32 with a head dim that is a multiple of
  16, the native kernel ``zoo/kernels/sliding_window_cpu.cpp`` (:mod:`zoo.kernels.native`) runs instead where it
  builds: 16 queries per work item over the 64-key blocks of their windows, nothing masked but the window's edges.
* :func:`block_sparse_attention_cpu` -- dkernel's local + vertical-stride pattern (:class:`~zoo.layers.masks.
  LocalStrideRule`) in time and memory proportional to the active blocks, forward and backward. Per range of
  query blocks (``group``, default twice the vertical stride) the keys of each query block split in up to three
  disjoint parts, each a flash call:

  - local: the ``local_blocks`` blocks ending at the query block (a strided window, block-causal mask shared by
    all blocks);
  - common vertical: KV head ``h``'s vertical blocks (``kb = r_h mod vertical_stride``, gathered once per head into
    a compact sequence) that every query block of the range reads: one call over the range's queries, no mask;
  - extra vertical: the few compact blocks after those that only some query blocks of the range read
    (stride 0 over the range, a ``[n, Hkv, 1, keys]`` mask).

  The parts merge by their log-sum-exps. In fp32 with a head dim and block size that are multiples of 16 the
  native kernels of ``zoo/kernels/block_sparse_attention/cpu.cpp`` run instead (forward: the active key blocks of
  16 queries at a time, one online softmax; backward: key-block stationary per KV head; ~16% and ~30% less time
  at 16k). The torch backward runs the flash backward of each part with the *merged*
  output and log-sum-exp (exact for a partition of the keys), summing the query gradients and adding the key
  gradients back (windows of a few query blocks at a time, overlap-added; vertical blocks index-added into the
  compact sequence, then scattered), into key-gradient buffers in ``k``'s own layout that are returned as views.

GQA: the ``G = H / Hkv`` query heads of a KV head are folded into the query rows (``[.., Hkv, G * C, D]``), so the
masks (per KV head at most) broadcast over them and the flash kernel sees longer query blocks.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from zoo.kernels import native
from zoo.kernels.block_sparse_attention.cpu import block_sparse_backward_native, block_sparse_native
from zoo.layers.masks import LocalStrideRule

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
NEG_INF = float("-inf")
_BWD_BLOCKS = 4  # query blocks per flash backward of the local windows (their key gradients are local x larger)


def window_attention(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float, chunk: int = 64,
                     group: int = 128) -> Tensor:
    """Sliding-window causal attention (``i - window < j <= i``), ``q [B, H, T, D]``, ``k, v [B, Hkv, T, D]``.
    Returns ``o [B, H, T, D]`` laid out as ``[B, T, H, D]`` (``o.transpose(1, 2).reshape(B, T, H * D)`` is a view).

    The first ``window`` queries see every earlier key: one causal call. The rest go in chunks of ``chunk``
    queries, ``group`` chunks per flash call: the group's queries folded (GQA heads into the rows; a copy of the
    group only), its key windows strided views of ``k, v`` (a padded copy of the group's rows only past ``T``),
    one ``[G * chunk, chunk + window - 1]`` band mask shared by every chunk (stride 0), the output written straight
    into the final layout. Every temporary is the size of one group."""
    native_out = _window_native(q, k, v, window, scale)
    if native_out is not None:
        return native_out
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    out = q.new_empty(B, T, H, D)
    t0 = min(T, window)
    head = F.scaled_dot_product_attention(q[:, :, :t0], k[:, :, :t0], v[:, :, :t0], is_causal=True, scale=scale,
                                          enable_gqa=G > 1)
    out[:, :t0] = head.transpose(1, 2)
    if t0 == T:
        return out.transpose(1, 2)
    C = min(chunk, T - t0)
    nC = -(-(T - t0) // C)
    Ck = C + window - 1
    a = torch.arange(C, device=q.device)[:, None]
    b = torch.arange(Ck, device=q.device)[None, :]
    band = torch.zeros(C, Ck, dtype=q.dtype, device=q.device).masked_fill_((b < a) | (b >= a + window), NEG_INF)
    band = band.repeat(G, 1)  # [G * C, Ck]: folded rows (g, c)
    for r in range(B):
        qr, body = q[r, :, t0:], out[r, t0:]  # [H, T - t0, D], [T - t0, H, D]
        for c0 in range(0, nC, group):
            c1 = min(nC, c0 + group)
            n = c1 - c0
            qf = _fold_range(qr, Hkv, G, C, c0, c1).transpose(0, 1)  # [n, Hkv, G * C, D]
            kw, vw = _windows(k[r], c0, c1, C, Ck, t0), _windows(v[r], c0, c1, C, Ck, t0)
            o, _ = _flash(qf, kw, vw, attn_mask=band.expand(n, 1, G * C, Ck), scale=scale)  # [n, Hkv, G * C, D]
            rows = o.reshape(n, Hkv, G, C, D).permute(0, 3, 1, 2, 4)  # [n, C, Hkv, G, D]
            if c1 * C <= T - t0:
                _rows(body, c0, c1, C, Hkv, G).copy_(rows)
            else:  # ragged last chunk
                body[c0 * C:] = rows.reshape(n * C, H, D)[:T - t0 - c0 * C]
    return out.transpose(1, 2)


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
        # qb0 -> (Lc, L): query blocks [qb0, qb0 + group) all read the compact blocks < Lc (every head), some of
        # them the blocks Lc..L-1 too (L - Lc <= group / vertical_stride + 1)
        self.groups: dict[int, tuple[int, int]] = {}
        for qb0 in range(0, nb, group):
            qb1 = min(nb, qb0 + group)
            L = int(self.m[qb1 - 1].max())
            if L:
                self.groups[qb0] = (int(self.m[qb0].min()), L)
        self.device = device

    def vertical_mask(self, qb0: int, qb1: int, Lc: int, L: int, dtype: torch.dtype) -> Tensor:
        """``[qb1 - qb0, Hkv, 1, (L - Lc) * bs]``: 0 where the query block reads the compact key (blocks Lc..L-1),
        -inf elsewhere."""
        seen = torch.arange(Lc, L)[None, None, :] < self.m[qb0:qb1, :, None]  # [g, Hkv, L - Lc] blocks read
        mask = torch.zeros(seen.shape, dtype=dtype).masked_fill_(~seen, NEG_INF)
        return mask.repeat_interleave(self.bs, dim=-1)[:, :, None].to(self.device)

    def empty_rows(self, qb0: int, qb1: int, Lc: int) -> Tensor:
        """``[qb1 - qb0, Hkv, 1]``: True where a query block reads none of the compact blocks from ``Lc`` on (its
        log-sum-exp there is -inf)."""
        return (self.m[qb0:qb1] <= Lc)[..., None].to(self.device)


def _local_mask(bs: int, local: int, G: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[G * bs, local * bs]``: the last of the ``local`` blocks causal, the others visible (folded GQA rows)."""
    W = local * bs
    a = torch.arange(bs, device=device)[:, None] + (local - 1) * bs
    b = torch.arange(W, device=device)[None, :]
    m = torch.zeros(bs, W, dtype=dtype, device=device).masked_fill_(b > a, NEG_INF)
    return m.repeat(G, 1)


class _BlockSparseCPU(torch.autograd.Function):
    """Query blocks in ranges of ``group``. Each range's queries are folded once
    (``[Hkv, n, G * bs, D]``: viewed per block for the local and the masked vertical part, as one sequence for the
    common vertical part), its key windows are views of ``k, v`` (a small padded copy only where a window leaves
    ``[0, T)``), so no folded or padded copy of a whole tensor exists; the output is written in its final
    ``[B, T, H, D]`` layout and the key gradients accumulate in ``[B, T, Hkv, D]`` buffers returned as views.

    Up to three flash calls per range, a partition of each query's keys, merged by log-sum-exp: the local windows
    (per block, block-causal mask), the vertical blocks every query block of the range reads (one call over the
    range's queries, no mask, no copy of the keys per block), the last few vertical blocks only some of
    them read (per block, masked)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, rule: LocalStrideRule, scale: float,  # type: ignore[override]
                group: int) -> Tensor:
        bs, Hkv = rule.block_size, k.shape[1]
        plan = _Plan(rule, -(-q.shape[2] // bs), Hkv, q.device, group)
        fused = block_sparse_native(q, k, v, bs, rule.local_blocks, rule.vertical_stride, plan.residue, scale)
        if fused is None:
            res, lse = _block_sparse_forward(q, k, v, rule, scale, group, plan)  # lse [B, nb, Hkv, G * bs]
        else:  # the native kernel: lse [B, H, T]
            out, lse = fused
            res = out.transpose(1, 2)
        ctx.save_for_backward(q, k, v, res, lse)  # the output itself (refolded per range in the backward)
        ctx.rule, ctx.scale, ctx.group, ctx.native = rule, scale, group, fused is not None
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
        if ctx.native:  # the native forward's lse [B, H, T]: the native backward, else refolded for the torch one
            g = g if g.stride(-1) == 1 else g.contiguous()
            grads = block_sparse_backward_native(q, k, v, o, g, lse_f, bs, local, rule.vertical_stride,
                                                 plan.residue, scale)
            if grads is not None:
                return *grads, None, None, None
            lse_f = F.pad(lse_f, (0, nb * bs - T)).view(B, Hkv, G, nb, bs)
            lse_f = lse_f.permute(0, 3, 1, 2, 4).reshape(B, nb, Hkv, G * bs)
        lmask = _local_mask(bs, local, G, q.dtype, q.device)
        dq = q.new_empty(B, T, H, D).transpose(1, 2)
        # key gradients in [B, rows, Hkv, D] (left-padded like the windows' rows), returned as views
        dkp = k.new_zeros(B, padl + nb * bs, Hkv, D)
        dvp = v.new_zeros(B, padl + nb * bs, Hkv, D)
        for r in range(B):
            dkr, dvr = dkp[r].transpose(0, 1), dvp[r].transpose(0, 1)  # [Hkv, rows, D] views
            if plan.groups:
                kv, vv = _gather_vertical(k[r], plan, T), _gather_vertical(v[r], plan, T)
                dkv, dvv = torch.zeros_like(kv), torch.zeros_like(vv)
            for c0 in range(0, nb, group):
                c1 = min(nb, c0 + group)
                n = c1 - c0
                qg, gg = _fold_range(q[r], Hkv, G, bs, c0, c1), _fold_range(g[r], Hkv, G, bs, c0, c1)
                og = _fold_range(o[r], Hkv, G, bs, c0, c1)  # padded rows: out 0, grad 0
                qf, gf, out = qg.transpose(0, 1), gg.transpose(0, 1), og.transpose(0, 1)
                lse = lse_f[r, c0:c1]  # [n, Hkv, G*bs]
                kw, vw = _windows(k[r], c0, c1, bs, local * bs), _windows(v[r], c0, c1, bs, local * bs)
                lm = _range_local_mask(lmask, c0, c1, bs, local)
                gq = torch.empty_like(qf)
                for s0 in range(0, n, _BWD_BLOCKS):  # the window gradients [s, Hkv, local * bs, D] of a few blocks
                    s1 = min(n, s0 + _BWD_BLOCKS)
                    gq[s0:s1], gk, gv = _flash_bwd(gf[s0:s1], qf[s0:s1], kw[s0:s1], vw[s0:s1], out[s0:s1],
                                                   lse[s0:s1], 0.0, False, attn_mask=lm[s0:s1], scale=scale)
                    _overlap_add(dkr, gk, c0 + s0, bs, local)
                    _overlap_add(dvr, gv, c0 + s0, bs, local)
                if c0 in plan.groups:
                    Lc, L = plan.groups[c0]
                    if Lc:
                        lc = lse.transpose(0, 1).reshape(1, Hkv, n * G * bs)
                        gqc, gkc, gvc = _flash_bwd(gg.view(1, Hkv, -1, D), qg.view(1, Hkv, -1, D),
                                                   kv[None, :, :Lc * bs], vv[None, :, :Lc * bs],
                                                   og.view(1, Hkv, -1, D), lc, 0.0, False, scale=scale)
                        gq += gqc[0].view(Hkv, n, G * bs, D).transpose(0, 1)
                        dkv[:, :Lc * bs] += gkc[0]
                        dvv[:, :Lc * bs] += gvc[0]
                    if L > Lc:
                        kx = kv[:, Lc * bs:L * bs].expand(n, Hkv, (L - Lc) * bs, D)
                        vx = vv[:, Lc * bs:L * bs].expand(n, Hkv, (L - Lc) * bs, D)
                        gqx, gkx, gvx = _flash_bwd(gf, qf, kx, vx, out, lse, 0.0, False,
                                                   attn_mask=plan.vertical_mask(c0, c1, Lc, L, q.dtype), scale=scale)
                        gq += gqx
                        dkv[:, Lc * bs:L * bs] += gkx.sum(0)
                        dvv[:, Lc * bs:L * bs] += gvx.sum(0)
                t0, t1 = c0 * bs, min(T, c1 * bs)
                rows = gq.reshape(n, Hkv, G, bs, D).permute(0, 3, 1, 2, 4).reshape(n * bs, H, D)
                dq[r].transpose(0, 1)[t0:t1] = rows[:t1 - t0]
            if plan.groups:
                _scatter_vertical(dkr, dkv, plan, padl)
                _scatter_vertical(dvr, dvv, plan, padl)
        dk = dkp[:, padl:padl + T].transpose(1, 2)  # [B, Hkv, T, D] views in k's layout
        dv = dvp[:, padl:padl + T].transpose(1, 2)
        return dq, dk, dv, None, None, None


def _block_sparse_forward(q: Tensor, k: Tensor, v: Tensor, rule: LocalStrideRule, scale: float, group: int,
                          plan: _Plan) -> tuple[Tensor, Tensor]:
    """The torch schedule of :class:`_BlockSparseCPU`'s forward: ``(o [B, H, T, D]`` laid out as ``[B, T, H, D]``,
    ``lse [B, nb, Hkv, G * bs])``."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    G, bs, local, nb = H // Hkv, rule.block_size, rule.local_blocks, plan.nb
    lmask = _local_mask(bs, local, G, q.dtype, q.device)
    o = q.new_empty(B, nb * bs, H, D)
    lse_f = q.new_empty(B, nb, Hkv, G * bs)
    for r in range(B):
        if plan.groups:
            kv, vv = _gather_vertical(k[r], plan, T), _gather_vertical(v[r], plan, T)
        for c0 in range(0, nb, group):
            c1 = min(nb, c0 + group)
            n = c1 - c0
            qg = _fold_range(q[r], Hkv, G, bs, c0, c1)  # [Hkv, n, G*bs, D]
            qf = qg.transpose(0, 1)  # [n, Hkv, G*bs, D] (a view)
            kw, vw = _windows(k[r], c0, c1, bs, local * bs), _windows(v[r], c0, c1, bs, local * bs)
            out, lse = _flash(qf, kw, vw, attn_mask=_range_local_mask(lmask, c0, c1, bs, local), scale=scale)
            if c0 in plan.groups:
                Lc, L = plan.groups[c0]
                parts = [(out, lse)]
                if Lc:  # every block of the range reads these: one call over the range's queries
                    oc, lc = _flash(qg.view(1, Hkv, n * G * bs, D), kv[None, :, :Lc * bs],
                                    vv[None, :, :Lc * bs], scale=scale)
                    parts.append((oc[0].view(Hkv, n, G * bs, D).transpose(0, 1),
                                  lc[0].view(Hkv, n, G * bs).transpose(0, 1)))
                if L > Lc:
                    kx = kv[:, Lc * bs:L * bs].expand(n, Hkv, (L - Lc) * bs, D)
                    vx = vv[:, Lc * bs:L * bs].expand(n, Hkv, (L - Lc) * bs, D)
                    ox, lx = _flash(qf, kx, vx, attn_mask=plan.vertical_mask(c0, c1, Lc, L, q.dtype),
                                    scale=scale)
                    parts.append((ox, lx.masked_fill(plan.empty_rows(c0, c1, Lc), NEG_INF)))
                out, lse = _merge(parts)
            # [n, Hkv, G, bs, D] -> rows of o: [n, bs, Hkv, G, D]
            _rows(o[r], c0, c1, bs, Hkv, G).copy_(out.reshape(n, Hkv, G, bs, D).permute(0, 3, 1, 2, 4))
            lse_f[r, c0:c1] = lse
    return o[:, :T].transpose(1, 2), lse_f


def _merge(parts: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Attention over a partition of the keys from each part's ``(out [.., D], lse [..])``: ``sum_i out_i *
    exp(lse_i - lse)`` with ``lse = logsumexp_i lse_i`` (a part a row does not read has ``lse_i = -inf``)."""
    lse = torch.stack([p[1] for p in parts]).logsumexp(0)
    out = parts[0][0].mul_((parts[0][1] - lse).exp_()[..., None])  # in place: the parts are fresh kernel outputs
    for o_i, l_i in parts[1:]:
        out.addcmul_(o_i, (l_i - lse).exp_()[..., None])
    return out, lse


def _rows(x: Tensor, c0: int, c1: int, bs: int, Hkv: int, G: int) -> Tensor:
    """Rows of query blocks ``c0..c1`` of ``x [T', H, D]`` as ``[n, bs, Hkv, G, D]`` (a view)."""
    return x[c0 * bs:c1 * bs].view(c1 - c0, bs, Hkv, G, x.shape[-1])


def _window_native(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float, items: int = 64) -> Tensor | None:
    """:func:`window_attention` through ``sliding_window_cpu.cpp`` (fp32 CPU tensors, head dim a multiple of 16),
    ``items`` work items of 16 queries per call on :func:`~zoo.kernels.native.run_threaded` threads; None where it
    does not apply or cannot be built."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    if D % 16 or not native.fp32_cpu(q, k, v, rows=True):
        return None
    lib = native.library(Path(native.__file__).with_name("sliding_window_cpu.cpp"), {"HEAD_DIM": D, "BLOCK": 64})
    if lib is None:
        return None
    fn = lib.sliding_window_attend
    if fn.argtypes is None:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        fn.argtypes = [i64] * 6 + [ptr, i64, i64, i64, ctypes.c_float, ptr, ptr, i64, i64, i64, ptr]
        fn.restype = None
    kT = native.transposed_blocks(k, 64)  # copies of the keys as K^T blocks and of the values with rows D apart:
    v = v.contiguous()  # rows H_kv * D apart (the layer's view) alias in L1 and cost ~10%; q is read in place
    out = torch.empty(B, T, H, D)
    total = B * H * -(-T // 16)

    def run(i0: int) -> None:
        fn(i0, min(total, i0 + items), H, H // Hkv, T, window, q.data_ptr(), *q.stride()[:3], scale, kT.data_ptr(),
           v.data_ptr(), *v.stride()[:3], out.data_ptr())

    native.run_threaded(run, list(range(0, total, items)))
    return out.transpose(1, 2)


def _fold_range(x: Tensor, Hkv: int, G: int, bs: int, c0: int, c1: int) -> Tensor:
    """Query blocks ``c0..c1`` of ``x [H, T, D]`` -> ``[Hkv, c1 - c0, G * bs, D]`` contiguous (zero rows past
    ``T``): the GQA heads of each KV head folded into the rows of each block."""
    H, T, D = x.shape
    n = c1 - c0
    seg = x[:, c0 * bs:min(T, c1 * bs)]
    if seg.shape[1] != n * bs:
        seg = F.pad(seg, (0, 0, 0, n * bs - seg.shape[1]))
    return seg.unflatten(0, (Hkv, G)).unflatten(2, (n, bs)).transpose(1, 2).reshape(Hkv, n, G * bs, D)


def _windows(x: Tensor, c0: int, c1: int, bs: int, W: int, offset: int = 0) -> Tensor:
    """The key windows of query blocks ``c0..c1``: ``[c1 - c0, Hkv, W, D]``, window ``c`` = rows ``[offset + (c + 1)
    * bs - W, offset + (c + 1) * bs)`` of ``x [Hkv, T, D]`` (zeros outside ``[0, T)``, masked). A view of ``x`` when
    the windows stay inside it, else a padded copy of just these rows."""
    T = x.shape[1]
    lo, hi = offset + (c0 + 1) * bs - W, offset + c1 * bs
    seg = x[:, max(lo, 0):min(hi, T)]
    if lo < 0 or hi > T:
        seg = F.pad(seg, (0, 0, max(-lo, 0), max(hi - T, 0)))
    return seg.unfold(1, W, bs).permute(1, 0, 3, 2)


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
    if n <= local:  # window by window
        for i in range(n):
            dxp[:, (c0 + i) * bs:(c0 + i) * bs + W] += gw[i]
        return
    gb = gw.view(n, Hkv, local, bs, D)  # block offset by block offset
    body = dxp[:, c0 * bs:(c0 + n + local - 1) * bs].view(Hkv, n + local - 1, bs, D)
    for j in range(local):
        body[:, j:j + n] += gb[:, :, j].transpose(0, 1)


def block_sparse_attention_cpu(q: Tensor, k: Tensor, v: Tensor, rule: LocalStrideRule, scale: float,
                               group: int | None = None) -> Tensor:
    """Local + vertical-stride block-sparse causal attention of unpadded rows, ``q [B, H, T, D]``, ``k, v [B, Hkv,
    T, D]`` -> ``o [B, H, T, D]`` (laid out as ``[B, T, H, D]``); differentiable. ``group``: query blocks per range
    (default: twice the vertical stride; over a range the vertical prefix grows by at most two blocks, the masked
    extra part, while fewer ranges mean fewer kernel launches and synchronisations)."""
    return _BlockSparseCPU.apply(q, k, v, rule, scale, group or 2 * rule.vertical_stride)
