r"""InfLLM-v2 Triton kernels (same contracts as :mod:`zoo.kernels.infllmv2.reference`), for any GQA group size.

* ``_block_scores_kernel`` (stage 1, no backward: selection is not differentiable): one program per
  (``TQ`` queries, batch row x KV head); its ``BLOCK_M = TQ * GP`` rows are the ``G`` heads (padded to the power of
  two ``GP``) of ``TQ`` consecutive queries, so a group of any size fills a tensor-core tile. Pass 1: online
  log-sum-exp over the visible coarse keys C2 (or over C1 for the exact form); pass 2, per tile of ``NB`` blocks:
  ``exp2(s - lse)`` over the ``NB * ST`` compressed keys, the sum over each query's heads (a reshape
  ``[TQ, GP, J] -> sum``), rounding to the score dtype, and the max over each block's ``ST`` own entries and its
  one left neighbour (recomputed from ``C1[b*ST - 1]``, so tiles are independent).
* ``_attn_fwd_kernel`` / ``_attn_bwd_dq_kernel`` (stage 2): one program per (query, batch row x KV head); rows are
  the query's ``G`` heads (padded to ``BLOCK_H >= 16``), the loop runs over its selected blocks (``-1`` skipped) in
  sub-tiles of ``BLOCK_N`` keys, causal inside the query's own block; online softmax in base 2, fp32 statistics.
* ``_attn_bwd_dkdv_kernel``: one program per (key block, batch row x KV head) loops over the queries that selected
  the block (a CSC table built with a sort), accumulating dK, dV in registers: no atomics, deterministic.

``block_size / kernel_stride`` must be a power of two (the pooling reshape); the block size any power of two.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = 1.4426950408889634


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _pow2(x: int) -> int:
    return triton.next_power_of_2(max(1, x))


def _check(q: Tensor, name: str) -> None:
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{name}: Triton path supports fp16, bf16 and fp32; got {q.dtype}")
    if q.dtype == torch.bfloat16 and _interpreting():
        raise ValueError(f"{name}: bf16 is computed wrongly by the Triton interpreter; use fp16 or fp32")
    if not q.is_cuda and not _interpreting():
        raise ValueError(f"{name}: needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")


# ---------------------------------------------------------------------------------------------- stage 1
@triton.jit
def _block_scores_kernel(
    Q, C1, C2, V1, E1, V2, Out,
    s_qb, s_qh, s_qt, s_cb, s_ch, s_cj, s_c2b, s_c2h, s_c2j, s_vb, s_ob, s_oh, s_ot,
    Tq, Hkv, G, n1, n2, num_blocks, qk_scale,
    TQ: tl.constexpr, GP: tl.constexpr, NB: tl.constexpr, ST: tl.constexpr, BLOCK_J2: tl.constexpr,
    BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_C2: tl.constexpr, ROUND: tl.constexpr,
    SCORE_DT: tl.constexpr, PRECISION: tl.constexpr,
):
    BLOCK_M: tl.constexpr = TQ * GP
    BLOCK_J: tl.constexpr = NB * ST
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = tl.cast(pid_bh // Hkv, tl.int64)
    hk = tl.cast(pid_bh % Hkv, tl.int64)
    rows = tl.arange(0, BLOCK_M)
    tok = pid_t * TQ + rows // GP
    g = rows % GP
    row_ok = (tok < Tq) & (g < G)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * s_qb + (hk * G + g)[:, None].to(tl.int64) * s_qh + tok[:, None].to(tl.int64) * s_qt
                + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    v1 = tl.load(V1 + b * s_vb + tok, mask=tok < Tq, other=0)
    v2 = tl.load(V2 + b * s_vb + tok, mask=tok < Tq, other=0)
    # ---- pass 1: log2-sum-exp per row over the normalising keys (C2, or C1 itself for the exact form)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_C2:
        n_norm = n2
        base2 = C2 + b * s_c2b + hk * s_c2h
        sj2 = s_c2j
        vis2 = v2
    else:
        n_norm = n1
        base2 = C1 + b * s_cb + hk * s_ch
        sj2 = s_cj
        vis2 = v1
    for j0 in range(0, n_norm, BLOCK_J2):
        offs_j = j0 + tl.arange(0, BLOCK_J2)
        ct = tl.load(base2 + offs_j[None, :].to(tl.int64) * sj2 + offs_d[:, None],
                     mask=(offs_j[None, :] < n_norm) & d_ok[:, None], other=0.0)
        s = tl.dot(q, ct, input_precision=PRECISION) * qk_scale
        s = tl.where(offs_j[None, :] < vis2[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))  # base 2
    # ---- pass 2: scores, group sum, rounding, max pooling
    tq = pid_t * TQ + tl.arange(0, TQ)
    e1_t = tl.load(E1 + b * s_vb + tq, mask=tq < Tq, other=0)
    base1 = C1 + b * s_cb + hk * s_ch
    for nb0 in range(0, num_blocks, NB):
        offs_j = nb0 * ST + tl.arange(0, BLOCK_J)
        ct = tl.load(base1 + offs_j[None, :].to(tl.int64) * s_cj + offs_d[:, None],
                     mask=(offs_j[None, :] < n1) & d_ok[:, None], other=0.0)
        s = tl.dot(q, ct, input_precision=PRECISION) * qk_scale
        p = tl.where((offs_j[None, :] < v1[:, None]) & row_ok[:, None], tl.exp2(s - lse[:, None]), 0.0)
        S = tl.sum(tl.reshape(p, (TQ, GP, BLOCK_J)), 1)  # [TQ, BLOCK_J]
        S = tl.where(offs_j[None, :] < e1_t[:, None], S, float("-inf"))
        if ROUND:  # the reference kernel writes its scores in the activation dtype
            S = S.to(SCORE_DT).to(tl.float32)
        own = tl.max(tl.reshape(S, (TQ, NB, ST)), 2)  # [TQ, NB]
        # the left neighbour of each block: entry b*ST - 1
        offs_b = nb0 + tl.arange(0, NB)
        jh = offs_b * ST - 1
        ch = tl.load(base1 + jh[None, :].to(tl.int64) * s_cj + offs_d[:, None],
                     mask=(jh[None, :] >= 0) & (jh[None, :] < n1) & d_ok[:, None], other=0.0)
        sh = tl.dot(q, ch, input_precision=PRECISION) * qk_scale
        ph = tl.where((jh[None, :] >= 0) & (jh[None, :] < v1[:, None]) & row_ok[:, None],
                      tl.exp2(sh - lse[:, None]), 0.0)
        Sh = tl.sum(tl.reshape(ph, (TQ, GP, NB)), 1)
        Sh = tl.where((jh[None, :] >= 0) & (jh[None, :] < e1_t[:, None]), Sh, float("-inf"))
        if ROUND:
            Sh = Sh.to(SCORE_DT).to(tl.float32)
        pooled = tl.maximum(own, Sh)
        optr = Out + b * s_ob + hk * s_oh + tq[:, None].to(tl.int64) * s_ot + offs_b[None, :]
        tl.store(optr, pooled, mask=(tq[:, None] < Tq) & (offs_b[None, :] < num_blocks))


def block_scores_triton(q: Tensor, c1: Tensor, c2: Tensor | None, v1: Tensor, e1: Tensor, v2: Tensor | None, *,
                        block_size: int, kernel_stride: int, num_blocks: int, scale: float,
                        score_dtype: torch.dtype | None = None) -> Tensor:
    """Fused stage 1 (see :func:`~zoo.kernels.infllmv2.reference.block_scores_ref`) -> ``[B, Hkv, Tq, nB]`` fp32."""
    _check(q, "block_scores_triton")
    B, H, Tq, D = q.shape
    Hkv, n1 = c1.shape[1], c1.shape[2]
    G = H // Hkv
    st = block_size // kernel_stride
    if st & (st - 1):
        raise ValueError(f"block_scores_triton needs block_size / kernel_stride to be a power of two; got {st}")
    GP = _pow2(G)
    TQ = max(1, 16 // GP)  # rows = TQ queries x GP heads >= 16
    NB = 16  # blocks per tile: the halo dot needs >= 16 columns
    out = torch.empty(B, Hkv, Tq, num_blocks, dtype=torch.float32, device=q.device)
    c1 = c1.to(q.dtype).contiguous()
    has_c2 = c2 is not None
    c2t = c2.to(q.dtype).contiguous() if has_c2 else c1
    v1, e1 = v1.to(torch.int32).contiguous(), e1.to(torch.int32).contiguous()
    v2t = v2.to(torch.int32).contiguous() if has_c2 else v1
    q = q if q.stride(-1) == 1 else q.contiguous()
    rnd = score_dtype in (torch.float16, torch.bfloat16)
    _block_scores_kernel[(triton.cdiv(Tq, TQ), B * Hkv)](
        q, c1, c2t, v1, e1, v2t, out,
        *q.stride()[:3], *c1.stride()[:3], *c2t.stride()[:3], v1.stride(0), *out.stride()[:3],
        Tq, Hkv, G, n1, c2t.shape[2] if has_c2 else n1, num_blocks, scale * LOG2E,
        TQ=TQ, GP=GP, NB=NB, ST=st, BLOCK_J2=64, BLOCK_D=max(16, _pow2(D)), HEAD_DIM=D, HAS_C2=has_c2,
        ROUND=rnd, SCORE_DT=tl.bfloat16 if score_dtype == torch.bfloat16 else tl.float16,
        PRECISION=_precision(q.dtype), num_warps=4,
    )
    return out


# ---------------------------------------------------------------------------------------------- stage 2
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, QPOS, IDX, Out, LSE,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_pb, s_ib, s_ih, s_it, s_ob, s_oh, s_ot,
    Tq, N, Hkv, G, W, qk_scale,
    BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
):
    t = tl.cast(tl.program_id(0), tl.int64)
    pid_bh = tl.program_id(1)
    b = tl.cast(pid_bh // Hkv, tl.int64)
    hk = tl.cast(pid_bh % Hkv, tl.int64)
    g = tl.arange(0, BLOCK_H)
    g_ok = g < G
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_n0 = tl.arange(0, BLOCK_N)
    qrow = (hk * G + g).to(tl.int64)
    q = tl.load(Q + b * s_qb + qrow[:, None] * s_qh + t * s_qt + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    p_q = tl.load(QPOS + b * s_pb + t)
    k_base = K + b * s_kb + hk * s_kh
    v_base = V + b * s_vb + hk * s_vh
    i_base = IDX + b * s_ib + hk * s_ih + t * s_it
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for i in range(0, W):
        blk = tl.load(i_base + i)
        if blk >= 0:
            for n0 in range(0, BLOCK_SIZE, BLOCK_N):
                offs_n = blk * BLOCK_SIZE + n0 + offs_n0
                ok = (offs_n <= p_q) & (offs_n < N) & (n0 + offs_n0 < BLOCK_SIZE)
                kt = tl.load(k_base + offs_n[None, :].to(tl.int64) * s_kt + offs_d[:, None],
                             mask=ok[None, :] & d_ok[:, None], other=0.0)
                s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
                s = tl.where(ok[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.exp2(s - m_safe[:, None])
                alpha = tl.exp2(m_i - m_safe)
                l_i = l_i * alpha + tl.sum(p, 1)
                vv = tl.load(v_base + offs_n[:, None].to(tl.int64) * s_vt + offs_d[None, :],
                             mask=ok[:, None] & d_ok[None, :], other=0.0)
                acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision=PRECISION)
                m_i = m_new
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    tl.store(Out + b * s_ob + qrow[:, None] * s_oh + t * s_ot + offs_d[None, :], o.to(Out.dtype.element_ty),
             mask=g_ok[:, None] & d_ok[None, :])
    lse = tl.where(empty, float("inf"), m_i + tl.log2(l_safe))
    tl.store(LSE + ((b * Hkv + hk) * G + g) * Tq + t, lse, mask=g_ok)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, QPOS, IDX, LSE, DELTA,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_pb, s_ib, s_ih, s_it,
    Tq, N, Hkv, G, W, qk_scale, sm_scale,
    BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
):
    t = tl.cast(tl.program_id(0), tl.int64)
    pid_bh = tl.program_id(1)
    b = tl.cast(pid_bh // Hkv, tl.int64)
    hk = tl.cast(pid_bh % Hkv, tl.int64)
    g = tl.arange(0, BLOCK_H)
    g_ok = g < G
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_n0 = tl.arange(0, BLOCK_N)
    qrow = (hk * G + g).to(tl.int64)
    rmask = g_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * s_qb + qrow[:, None] * s_qh + t * s_qt + offs_d[None, :], mask=rmask, other=0.0)
    do = tl.load(DO + b * s_qb + qrow[:, None] * s_qh + t * s_qt + offs_d[None, :], mask=rmask, other=0.0)
    stat = ((b * Hkv + hk) * G + g) * Tq + t
    lse = tl.load(LSE + stat, mask=g_ok, other=float("inf"))
    delta = tl.load(DELTA + stat, mask=g_ok, other=0.0)
    p_q = tl.load(QPOS + b * s_pb + t)
    k_base = K + b * s_kb + hk * s_kh
    v_base = V + b * s_vb + hk * s_vh
    i_base = IDX + b * s_ib + hk * s_ih + t * s_it
    dq = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for i in range(0, W):
        blk = tl.load(i_base + i)
        if blk >= 0:
            for n0 in range(0, BLOCK_SIZE, BLOCK_N):
                offs_n = blk * BLOCK_SIZE + n0 + offs_n0
                ok = (offs_n <= p_q) & (offs_n < N) & (n0 + offs_n0 < BLOCK_SIZE)
                kk = tl.load(k_base + offs_n[:, None].to(tl.int64) * s_kt + offs_d[None, :],
                             mask=ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
                vv = tl.load(v_base + offs_n[:, None].to(tl.int64) * s_vt + offs_d[None, :],
                             mask=ok[:, None] & d_ok[None, :], other=0.0)
                s = tl.dot(q, tl.trans(kk), input_precision=PRECISION) * qk_scale
                p = tl.where(ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
                dp = tl.dot(do, tl.trans(vv), input_precision=PRECISION)
                ds = p * (dp - delta[:, None])
                dq += tl.dot(ds.to(kk.dtype), kk, input_precision=PRECISION)
    tl.store(DQ + b * s_qb + qrow[:, None] * s_qh + t * s_qt + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=rmask)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, QPOS, TOK, OFF, LSE, DELTA,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_pb,
    Tq, N, Hkv, G, n_kblocks, qk_scale, sm_scale,
    BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_k = tl.program_id(0)  # key block x sub-tile
    pid_bh = tl.program_id(1)
    b = tl.cast(pid_bh // Hkv, tl.int64)
    hk = tl.cast(pid_bh % Hkv, tl.int64)
    n_sub: tl.constexpr = (BLOCK_SIZE + BLOCK_N - 1) // BLOCK_N
    kb = pid_k // n_sub
    n0 = (pid_k % n_sub) * BLOCK_N
    g = tl.arange(0, BLOCK_H)
    g_ok = g < G
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_n = kb * BLOCK_SIZE + n0 + tl.arange(0, BLOCK_N)
    n_ok = (offs_n < N) & (n0 + tl.arange(0, BLOCK_N) < BLOCK_SIZE)
    kmask = n_ok[:, None] & d_ok[None, :]
    kk = tl.load(K + b * s_kb + hk * s_kh + offs_n[:, None].to(tl.int64) * s_kt + offs_d[None, :], mask=kmask,
                 other=0.0)
    vv = tl.load(V + b * s_vb + hk * s_vh + offs_n[:, None].to(tl.int64) * s_vt + offs_d[None, :], mask=kmask,
                 other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    qrow = (hk * G + g).to(tl.int64)
    rmask = g_ok[:, None] & d_ok[None, :]
    seg = pid_bh * n_kblocks + kb
    lo = tl.load(OFF + seg)
    hi = tl.load(OFF + seg + 1)
    for e in range(lo, hi):
        t = tl.load(TOK + e).to(tl.int64)
        q = tl.load(Q + b * s_qb + qrow[:, None] * s_qh + t * s_qt + offs_d[None, :], mask=rmask, other=0.0)
        do = tl.load(DO + b * s_qb + qrow[:, None] * s_qh + t * s_qt + offs_d[None, :], mask=rmask, other=0.0)
        stat = ((b * Hkv + hk) * G + g) * Tq + t
        lse = tl.load(LSE + stat, mask=g_ok, other=float("inf"))
        delta = tl.load(DELTA + stat, mask=g_ok, other=0.0)
        p_q = tl.load(QPOS + b * s_pb + t)
        ok = (offs_n <= p_q) & n_ok
        st = tl.dot(kk, tl.trans(q), input_precision=PRECISION) * qk_scale  # [BLOCK_N, BLOCK_H]
        pt = tl.where(ok[:, None] & g_ok[None, :], tl.exp2(st - lse[None, :]), 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dpt = tl.dot(vv, tl.trans(do), input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
    base = b * s_kb + hk * s_kh + offs_n[:, None].to(tl.int64) * s_kt + offs_d[None, :]
    tl.store(DK + base, (dk * sm_scale).to(DK.dtype.element_ty), mask=kmask)
    tl.store(DV + b * s_vb + hk * s_vh + offs_n[:, None].to(tl.int64) * s_vt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kmask)


def _tiles(block_size: int, G: int, D: int) -> tuple[int, int, int]:
    return max(16, _pow2(G)), max(16, min(64, _pow2(block_size))), max(16, _pow2(D))


class _SparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, qpos, idx, block_size: int, scale: float):
        B, H, Tq, D = q.shape
        Hkv, N = k.shape[1], k.shape[2]
        G = H // Hkv
        BH, BN, BD = _tiles(block_size, G, D)
        o = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
        _attn_fwd_kernel[(Tq, B * Hkv)](
            q, k, v, qpos, idx, o, lse,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], qpos.stride(0), *idx.stride()[:3], *o.stride()[:3],
            Tq, N, Hkv, G, idx.shape[-1], scale * LOG2E,
            BLOCK_SIZE=block_size, BLOCK_H=BH, BLOCK_N=BN, BLOCK_D=BD, HEAD_DIM=D, PRECISION=_precision(q.dtype),
            num_warps=4,
        )
        ctx.save_for_backward(q, k, v, qpos, idx, o, lse)
        ctx.block_size, ctx.scale = block_size, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, qpos, idx, o, lse = ctx.saved_tensors
        bs, scale = ctx.block_size, ctx.scale
        B, H, Tq, D = q.shape
        Hkv, N = k.shape[1], k.shape[2]
        G = H // Hkv
        BH, BN, BD = _tiles(bs, G, D)
        do = do.contiguous()
        delta = (do.float() * o.float()).sum(-1).contiguous()  # [B, H, Tq]
        dq = torch.empty_like(q)
        kw = dict(BLOCK_SIZE=bs, BLOCK_H=BH, BLOCK_N=BN, BLOCK_D=BD, HEAD_DIM=D, PRECISION=_precision(q.dtype),
                  num_warps=4)
        _attn_bwd_dq_kernel[(Tq, B * Hkv)](
            q, k, v, do, dq, qpos, idx, lse, delta,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], qpos.stride(0), *idx.stride()[:3],
            Tq, N, Hkv, G, idx.shape[-1], scale * LOG2E, scale, **kw,
        )
        # CSC: per (row, key block) the queries that selected it, ascending
        nkb = -(-N // bs)
        W = idx.shape[-1]
        ids = idx.long().reshape(B * Hkv, Tq * W)
        row = torch.arange(B * Hkv, device=q.device)[:, None].expand_as(ids)
        tok = torch.arange(Tq, device=q.device).repeat_interleave(W)[None].expand_as(ids)
        valid = ids >= 0
        key = (row * nkb + ids)[valid]
        order = torch.argsort(key * Tq + tok[valid])
        toks = tok[valid][order].to(torch.int32).contiguous()
        counts = torch.bincount(key, minlength=B * Hkv * nkb)
        off = torch.zeros(B * Hkv * nkb + 1, dtype=torch.int32, device=q.device)
        off[1:] = counts.cumsum(0)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        n_sub = -(-bs // BN)
        _attn_bwd_dkdv_kernel[(nkb * n_sub, B * Hkv)](
            q, k, v, do, dk, dv, qpos, toks, off, lse, delta,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], qpos.stride(0),
            Tq, N, Hkv, G, nkb, scale * LOG2E, scale, **kw,
        )
        return dq, dk, dv, None, None, None, None


def sparse_attention_triton(q: Tensor, k: Tensor, v: Tensor, qpos: Tensor, idx: Tensor, *, block_size: int,
                            scale: float | None = None) -> Tensor:
    """Stage 2 (see :func:`~zoo.kernels.infllmv2.reference.sparse_attention_ref`), differentiable.
    Block size a power of two, head dim <= 256; a query without a visible key returns zeros."""
    _check(q, "sparse_attention_triton")
    if block_size & (block_size - 1):
        raise ValueError(f"sparse_attention_triton needs a power-of-two block_size; got {block_size}")
    if q.shape[-1] > 256:
        raise ValueError(f"sparse_attention_triton supports head_dim <= 256; got {q.shape[-1]}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    k = k.to(q.dtype)
    v = v.to(q.dtype)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    return _SparseAttention.apply(q, k, v, qpos.contiguous(), idx.to(torch.int32).contiguous(), block_size, scale)


__all__ = ["block_scores_triton", "sparse_attention_triton"]
