r"""Block-sparse causal attention: a flash-attention-style Triton forward and backward that visits only the
active key blocks of each query block. The rule and the torch reference are in
:mod:`zoo.kernels.block_sparse_attention.reference`.

Forward (online softmax, base 2; ``c = s * log2(e)``), for one query tile ``Q_m`` and each visited key tile ``K_n``::

    X = c * Q_m K_n^T  (masked to -inf outside S)      m' = max(m, rowmax X)
    P = exp2(X - m')    l = l * exp2(m - m') + rowsum P    A = A * exp2(m - m') + P V_n    m = m'
    O_m = A / l          LSE_m = m + log2(l)     (LSE = +inf, O = 0 for an empty row)

Backward (FlashAttention-2 recomputation): ``Delta_i = sum_d dO_id O_id``; ``P = exp2(c Q K^T - LSE)``;
``dV = P^T dO``; ``dP = dO V^T``; ``dS = P * (dP - Delta)``; ``dQ = s dS K``; ``dK = s dS^T Q``.

Kernel structure
----------------
* The block layout (after dropping blocks above the diagonal and blocks the window/sinks make invisible) is turned
  into a CSR-like table: per (layout head, query block) the count and the ascending list of active key blocks; and
  the transposed (CSC) table: per (layout head, key block) the list of query blocks that visit it. The tables are
  cached per (unchanged) ``block_mask`` tensor object, so a layout kept as a buffer is converted once.
* Kernel tiles (``_TILES``: fwd 64 x 64, dQ 64 x 32, dK/dV 32 x 64, each capped at ``block_size``) may be smaller
  than a layout block; a layout block is then visited as sub-tiles.
  A tile pair is skipped when no pair in it is visible; the token mask (causal, ``k < T``, window/sinks) is applied
  only when the pair is not entirely visible (diagonal, ragged last block, window edge), so interior blocks run
  unmasked.
* ``_bsa_fwd_kernel``: grid (query tiles, B*H); loops over the CSR list; writes O and LSE (fp32, base 2).
* ``_bsa_delta_kernel``: ``Delta = rowsum(dO * O)`` in fp32.
* ``_bsa_bwd_dq_kernel``: grid (query tiles, B*H); loops over the CSR list; writes dQ.
* ``_bsa_bwd_dkdv_kernel``: grid (key tiles, B*Hkv); loops over the CSC list and, inside, over the H/Hkv query heads
  of the group (GQA accumulated in registers, no atomics); writes dK and dV.
* Head dims up to 128 that are not powers of two are padded to ``BLOCK_D = next_pow2(D)`` with masked loads.
  Accumulation and softmax statistics are fp32; fp32 inputs use IEEE (not TF32) dots.
* Shared ``@triton.jit`` helpers: ``_block_list`` (count and indices of a layout row of the CSR/CSC table),
  ``_tile_pair`` (is a query-tile x key-tile pair visible at all, and is it only partly visible) and
  ``_token_visible`` (the token rule); the three attention kernels differ only in what they accumulate.
"""

from __future__ import annotations

import math
import os
import weakref
from collections import OrderedDict

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from zoo.kernels.block_sparse_attention.reference import _check_inputs, _effective_layout, _visible_pairs
from zoo.layers.masks import LocalStrideRule, local_stride_layout

__all__ = ["block_sparse_attention_triton", "bench_block_sparse", "SUPPORTED_BLOCK_SIZES", "MAX_HEAD_DIM"]

SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)
MAX_HEAD_DIM = 128


# ----------------------------------------------------------------------------------------------------------------
# Layout -> CSR / CSC tables
# ----------------------------------------------------------------------------------------------------------------


def _to_index_table(layout: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of a bool ``[Hm, N, M]`` layout -> counts int32 ``[Hm, N]`` and ascending active indices int32
    ``[Hm, N, R]`` (R = max count, at least 1; entries past the count are 0 and never read)."""
    hm, n, m = layout.shape
    counts = layout.sum(-1, dtype=torch.int32)
    width = max(1, int(counts.max().item())) if counts.numel() else 1
    cols = torch.arange(m, device=layout.device, dtype=torch.int32)
    key = torch.where(layout, cols, cols + m)  # active first, each group ascending
    idx = key.sort(dim=-1).values[..., :width]
    idx = torch.where(idx < m, idx, torch.zeros_like(idx)).to(torch.int32).contiguous()
    return counts.contiguous(), idx


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _block_list(CNT, IDX, head, blk, s_cnt_h, s_idx_h, s_idx_r):
    """Row ``blk`` of layout head ``head`` of a CSR/CSC table: the number of active blocks and a pointer to their
    ascending indices."""
    return tl.load(CNT + head * s_cnt_h + blk), IDX + head * s_idx_h + blk * s_idx_r


@triton.jit
def _tile_visible(q_lo, k_lo, T, window, num_sink, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  SUBTILED: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Whether query tile ``[q_lo, q_lo + BLOCK_M)`` x key tile ``[k_lo, k_lo + BLOCK_N)`` holds a visible pair.

    Sub-tiles of a layout block may hold none; a whole block of the effective layout always does (static True)."""
    if SUBTILED:
        q_hi = q_lo + BLOCK_M - 1  # may exceed T - 1 (padding rows, never stored)
        k_hi = k_lo + BLOCK_N - 1
        visible = (k_lo <= q_hi) & (q_lo < T) & (k_lo < T)
        if HAS_WINDOW:
            visible = visible & ((q_lo - tl.minimum(k_hi, T - 1) < window) | (k_lo < num_sink))
    else:
        visible = True
    return visible


@triton.jit
def _tile_partial(q_lo, k_lo, T, window, num_sink, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  HAS_WINDOW: tl.constexpr):
    """Whether some pair of the tile pair is invisible (diagonal, ragged last block, window edge): then the token
    mask is applied; interior tiles run unmasked."""
    q_hi = q_lo + BLOCK_M - 1
    k_hi = k_lo + BLOCK_N - 1
    partial = (k_hi > q_lo) | (k_hi >= T)
    if HAS_WINDOW:
        partial = partial | ((q_hi - k_lo >= window) & (k_hi >= num_sink))
    return partial


@triton.jit
def _token_visible(q_idx, k_idx, T, window, num_sink, HAS_WINDOW: tl.constexpr):
    """The token rule on broadcastable query / key index tensors: causal, key < T, inside the window or a sink."""
    ok = (k_idx <= q_idx) & (k_idx < T)
    if HAS_WINDOW:
        ok = ok & ((q_idx - k_idx < window) | (k_idx < num_sink))
    return ok


@triton.jit
def _bsa_fwd_kernel(
    Q, K, V, Out, LSE,  # q [B,H,T,D], k/v [B,Hkv,T,D], out [B,H,T,D], lse [B*H, T_pad] fp32
    ROW_CNT, ROW_IDX,  # [Hm, nB] int32, [Hm, nB, R] int32
    qk_scale, T, window, num_sink,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_ob, s_oh, s_ot,
    H, GROUP, s_cnt_h, s_idx_h, s_idx_r, T_PAD,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
    SUBTILED: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = tl.cast(pid_bh // H, tl.int64)
    h = tl.cast(pid_bh % H, tl.int64)
    hk = h // GROUP
    q_lo = pid_m * BLOCK_M
    qb = q_lo // BLOCK_SIZE
    offs_m = q_lo + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    q_ptrs = Q + b * s_qb + h * s_qh + offs_m[:, None].to(tl.int64) * s_qt + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < T) & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    k_base = K + b * s_kb + hk * s_kh
    v_base = V + b * s_vb + hk * s_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    cnt, idx_base = _block_list(ROW_CNT, ROW_IDX, hk, qb, s_cnt_h, s_idx_h, s_idx_r)
    for i in range(0, cnt):
        kb = tl.load(idx_base + i)
        for j in range(0, BLOCK_SIZE // BLOCK_N):
            k_lo = kb * BLOCK_SIZE + j * BLOCK_N
            if _tile_visible(q_lo, k_lo, T, window, num_sink, BLOCK_M, BLOCK_N, SUBTILED, HAS_WINDOW):
                partial = _tile_partial(q_lo, k_lo, T, window, num_sink, BLOCK_M, BLOCK_N, HAS_WINDOW)
                offs_n = k_lo + offs_n0
                n_ok = offs_n < T
                kt = tl.load(
                    k_base + offs_n[None, :].to(tl.int64) * s_kt + offs_d[:, None],
                    mask=n_ok[None, :] & d_ok[:, None], other=0.0,
                )  # [BLOCK_D, BLOCK_N]
                s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], base-2 logits
                if partial:
                    ok = _token_visible(offs_m[:, None], offs_n[None, :], T, window, num_sink, HAS_WINDOW)
                    s = tl.where(ok, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.exp2(s - m_safe[:, None])
                alpha = tl.exp2(m_i - m_safe)
                l_i = l_i * alpha + tl.sum(p, 1)
                vv = tl.load(
                    v_base + offs_n[:, None].to(tl.int64) * s_vt + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0,
                )  # [BLOCK_N, BLOCK_D]
                acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision=PRECISION)
                m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(l_safe))
    m_ok = offs_m < T
    o_ptrs = Out + b * s_ob + h * s_oh + offs_m[:, None].to(tl.int64) * s_ot + offs_d[None, :]
    tl.store(o_ptrs, o.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + pid_bh * T_PAD + offs_m, lse, mask=m_ok)

@triton.jit
def _bsa_delta_kernel(
    Out, DO, DELTA,  # o, do [B,H,T,D] (strides), delta [B*H, T_pad] fp32
    T, s_ob, s_oh, s_ot, s_db, s_dh, s_dt, H, T_PAD,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = tl.cast(pid_bh // H, tl.int64)
    h = tl.cast(pid_bh % H, tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    msk = (offs_m[:, None] < T) & (offs_d[None, :] < HEAD_DIM)
    row_off = offs_m[:, None].to(tl.int64)
    o = tl.load(Out + b * s_ob + h * s_oh + row_off * s_ot + offs_d[None, :], mask=msk, other=0.0)
    do = tl.load(
        DO + b * s_db + h * s_dh + row_off * s_dt + offs_d[None, :], mask=msk, other=0.0
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh * T_PAD + offs_m, delta, mask=offs_m < T)

@triton.jit
def _bsa_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA,  # q/do/dq [B,H,T,D]; k/v [B,Hkv,T,D]; lse/delta [B*H, T_pad] fp32
    ROW_CNT, ROW_IDX,
    qk_scale, sm_scale, T, window, num_sink,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_db, s_dh, s_dt, s_gb, s_gh, s_gt,
    H, GROUP, s_cnt_h, s_idx_h, s_idx_r, T_PAD,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
    SUBTILED: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = tl.cast(pid_bh // H, tl.int64)
    h = tl.cast(pid_bh % H, tl.int64)
    hk = h // GROUP
    q_lo = pid_m * BLOCK_M
    qb = q_lo // BLOCK_SIZE
    offs_m = q_lo + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    m_ok = offs_m < T
    row_off = offs_m[:, None].to(tl.int64)

    q = tl.load(Q + b * s_qb + h * s_qh + row_off * s_qt + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :],
                other=0.0)  # [BLOCK_M, BLOCK_D]
    do = tl.load(DO + b * s_db + h * s_dh + row_off * s_dt + offs_d[None, :],
                 mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    lse = tl.load(LSE + pid_bh * T_PAD + offs_m, mask=m_ok, other=float("inf"))  # [BLOCK_M]
    delta = tl.load(DELTA + pid_bh * T_PAD + offs_m, mask=m_ok, other=0.0)  # [BLOCK_M]
    k_base = K + b * s_kb + hk * s_kh
    v_base = V + b * s_vb + hk * s_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    cnt, idx_base = _block_list(ROW_CNT, ROW_IDX, hk, qb, s_cnt_h, s_idx_h, s_idx_r)
    for i in range(0, cnt):
        kb = tl.load(idx_base + i)
        for j in range(0, BLOCK_SIZE // BLOCK_N):
            k_lo = kb * BLOCK_SIZE + j * BLOCK_N
            if _tile_visible(q_lo, k_lo, T, window, num_sink, BLOCK_M, BLOCK_N, SUBTILED, HAS_WINDOW):
                partial = _tile_partial(q_lo, k_lo, T, window, num_sink, BLOCK_M, BLOCK_N, HAS_WINDOW)
                offs_n = k_lo + offs_n0
                n_ok = offs_n < T
                kk = tl.load(k_base + offs_n[:, None].to(tl.int64) * s_kt + offs_d[None, :],
                             mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
                vt = tl.load(v_base + offs_n[None, :].to(tl.int64) * s_vt + offs_d[:, None],
                             mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
                s = tl.dot(q, tl.trans(kk), input_precision=PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
                if partial:
                    ok = _token_visible(offs_m[:, None], offs_n[None, :], T, window, num_sink, HAS_WINDOW)
                    s = tl.where(ok, s, float("-inf"))
                p = tl.exp2(s - lse[:, None])
                dp = tl.dot(do, vt, input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
                ds = p * (dp - delta[:, None])
                dq += tl.dot(ds.to(kk.dtype), kk, input_precision=PRECISION)

    dq = dq * sm_scale
    tl.store(DQ + b * s_gb + h * s_gh + row_off * s_gt + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])

@triton.jit
def _bsa_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA,  # q/do [B,H,T,D]; k/v/dk/dv [B,Hkv,T,D]; lse/delta [B*H, T_pad] fp32
    COL_CNT, COL_IDX,  # [Hm, nB] int32, [Hm, nB, C] int32: query blocks visiting each key block
    qk_scale, sm_scale, T, window, num_sink,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_db, s_dh, s_dt,
    s_dkb, s_dkh, s_dkt, s_dvb, s_dvh, s_dvt,
    H, HKV, GROUP, s_cnt_h, s_idx_h, s_idx_r, T_PAD,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
    SUBTILED: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = tl.cast(pid_bk // HKV, tl.int64)
    hk = tl.cast(pid_bk % HKV, tl.int64)
    k_lo = pid_n * BLOCK_N
    kb = k_lo // BLOCK_SIZE
    offs_n = k_lo + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    n_ok = offs_n < T
    col_off = offs_n[:, None].to(tl.int64)

    kk = tl.load(K + b * s_kb + hk * s_kh + col_off * s_kt + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                 other=0.0)  # [BLOCK_N, BLOCK_D]
    vv = tl.load(V + b * s_vb + hk * s_vh + col_off * s_vt + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                 other=0.0)  # [BLOCK_N, BLOCK_D]
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    cnt, idx_base = _block_list(COL_CNT, COL_IDX, hk, kb, s_cnt_h, s_idx_h, s_idx_r)
    for i in range(0, cnt):
        qb = tl.load(idx_base + i)
        for j in range(0, BLOCK_SIZE // BLOCK_M):
            q_lo = qb * BLOCK_SIZE + j * BLOCK_M
            if _tile_visible(q_lo, k_lo, T, window, num_sink, BLOCK_M, BLOCK_N, SUBTILED, HAS_WINDOW):
                partial = _tile_partial(q_lo, k_lo, T, window, num_sink, BLOCK_M, BLOCK_N, HAS_WINDOW)
                offs_m = q_lo + offs_m0
                m_ok = offs_m < T
                row_off = offs_m[:, None].to(tl.int64)
                # [BLOCK_N, BLOCK_M]
                okt = _token_visible(offs_m[None, :], offs_n[:, None], T, window, num_sink, HAS_WINDOW)
                for g in range(0, GROUP):
                    h = hk * GROUP + g
                    bh = b * H + h
                    q = tl.load(Q + b * s_qb + h * s_qh + row_off * s_qt + offs_d[None, :],
                                mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
                    do = tl.load(DO + b * s_db + h * s_dh + row_off * s_dt + offs_d[None, :],
                                 mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
                    lse = tl.load(LSE + bh * T_PAD + offs_m, mask=m_ok, other=float("inf"))  # [BLOCK_M]
                    delta = tl.load(DELTA + bh * T_PAD + offs_m, mask=m_ok, other=0.0)  # [BLOCK_M]
                    st = tl.dot(kk, tl.trans(q), input_precision=PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
                    if partial:
                        st = tl.where(okt, st, float("-inf"))
                    pt = tl.exp2(st - lse[None, :])
                    dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
                    dpt = tl.dot(vv, tl.trans(do), input_precision=PRECISION)  # [BLOCK_N, BLOCK_M]
                    dst = pt * (dpt - delta[None, :])
                    dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)

    dk = dk * sm_scale
    tl.store(DK + b * s_dkb + hk * s_dkh + col_off * s_dkt + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=n_ok[:, None] & d_ok[None, :])
    tl.store(DV + b * s_dvb + hk * s_dvh + col_off * s_dvt + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=n_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Launchers and autograd
# ----------------------------------------------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Tile shapes per kernel (BLOCK_M query rows, BLOCK_N key rows), capped by the layout block size. Chosen so the
# sm_90 build (compiled offline with Triton's bundled ptxas, bf16, D = 64 and 128) has no register spills:
# fwd 64 x 64, dQ 64 x 32, dK/dV 32 x 64; 8 warps for BLOCK_D > 64 with full-size tiles, else 4. Not tuned on a GPU.
_TILES = {"fwd": (64, 64), "dq": (64, 32), "dkdv": (32, 64)}


def _tiles(kind: str, block_size: int, head_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps) of kernel ``kind`` for a layout block size and head dim."""
    bm, bn = (min(block_size, x) for x in _TILES[kind])
    block_d = max(16, triton.next_power_of_2(head_dim))
    num_warps = 8 if block_d > 64 and bm * bn >= 2048 else 4
    return bm, bn, block_d, num_warps


def _last_dim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class _Layout:
    """CSR (rows: key blocks per query block) and CSC (cols: query blocks per key block) tables of a layout."""

    def __init__(self, block_mask: Tensor, block_size: int, T: int, window: int | None, num_sink_tokens: int):
        eff = _effective_layout(block_mask, block_size, T, window, num_sink_tokens)  # [Hm, nB, nB]
        self.heads = eff.shape[0]
        self.row_cnt, self.row_idx = _to_index_table(eff)  # [Hm, nB], [Hm, nB, R]
        self.col_cnt, self.col_idx = _to_index_table(eff.transpose(1, 2))  # [Hm, nB], [Hm, nB, C]

    @staticmethod
    def strides(cnt: Tensor, idx: Tensor) -> tuple[int, int, int]:
        shared = cnt.shape[0] == 1  # one layout for all kv heads: head stride 0
        return (0 if shared else cnt.stride(0), 0 if shared else idx.stride(0), idx.stride(1))


_LAYOUT_CACHE: OrderedDict[tuple, tuple[weakref.ref, int, _Layout]] = OrderedDict()
_LAYOUT_CACHE_SIZE = 16


def _get_layout(
    block_mask: Tensor, block_size: int, T: int, window: int | None, num_sink_tokens: int, device: torch.device
) -> _Layout:
    """CSR/CSC tables for ``block_mask``, reused while the same tensor object is passed unchanged.

    A hit needs the very same tensor (weak reference) at the same ``_version`` (in-place writes bump it), so a
    mixer that keeps its layout as a buffer builds the tables (a sort and two host syncs) once per shape.
    """
    key = (id(block_mask), block_size, T, window, num_sink_tokens, str(device))
    hit = _LAYOUT_CACHE.get(key)
    if hit is not None and hit[0]() is block_mask and hit[1] == block_mask._version:
        _LAYOUT_CACHE.move_to_end(key)
        return hit[2]
    layout = _Layout(block_mask.to(device), block_size, T, window, num_sink_tokens)
    _LAYOUT_CACHE[key] = (weakref.ref(block_mask), block_mask._version, layout)
    while len(_LAYOUT_CACHE) > _LAYOUT_CACHE_SIZE:
        _LAYOUT_CACHE.popitem(last=False)
    return layout


def _fwd(q: Tensor, k: Tensor, v: Tensor, layout: _Layout, block_size: int, window, num_sink: int, scale: float):
    B, H, T, D = q.shape
    hkv = k.shape[1]
    bm, bn, bd, nw = _tiles("fwd", block_size, D)
    n_m = triton.cdiv(T, bm)
    t_pad = n_m * bm
    o = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B * H, t_pad), dtype=torch.float32, device=q.device)
    s_cnt, s_idx_h, s_idx_r = _Layout.strides(layout.row_cnt, layout.row_idx)
    _bsa_fwd_kernel[(n_m, B * H)](
        q, k, v, o, lse, layout.row_cnt, layout.row_idx,
        scale * math.log2(math.e), T, int(window or 0), int(num_sink),
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        H, H // hkv, s_cnt, s_idx_h, s_idx_r, t_pad,
        BLOCK_SIZE=block_size, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, HEAD_DIM=D,
        HAS_WINDOW=window is not None, PRECISION=_precision(q.dtype), SUBTILED=min(bm, bn) < block_size,
        num_warps=nw, num_stages=2,
    )
    return o, lse


def _bwd(do: Tensor, q, k, v, o, lse, layout: _Layout, block_size: int, window, num_sink: int, scale: float):
    B, H, T, D = q.shape
    hkv = k.shape[1]
    t_pad = lse.shape[1]
    delta = torch.empty_like(lse)
    bm, _, bd, _ = _tiles("fwd", block_size, D)
    _bsa_delta_kernel[(triton.cdiv(T, bm), B * H)](
        o, do, delta, T, *o.stride()[:3], *do.stride()[:3], H, t_pad, BLOCK_M=bm, BLOCK_D=bd, HEAD_DIM=D
    )
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    qk_scale = scale * math.log2(math.e)

    def consts(kind: str) -> tuple[int, int, dict]:
        bm, bn, bd, nw = _tiles(kind, block_size, D)
        return bm, bn, dict(
            BLOCK_SIZE=block_size, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, HEAD_DIM=D, HAS_WINDOW=window is not None,
            PRECISION=_precision(q.dtype), SUBTILED=min(bm, bn) < block_size, num_warps=nw, num_stages=2,
        )

    bm, _, kw = consts("dq")
    s_cnt, s_idx_h, s_idx_r = _Layout.strides(layout.row_cnt, layout.row_idx)
    _bsa_bwd_dq_kernel[(triton.cdiv(T, bm), B * H)](
        q, k, v, do, dq, lse, delta, layout.row_cnt, layout.row_idx,
        qk_scale, scale, T, int(window or 0), int(num_sink),
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3],
        H, H // hkv, s_cnt, s_idx_h, s_idx_r, t_pad, **kw,
    )
    _, bn, kw = consts("dkdv")
    s_cnt, s_idx_h, s_idx_r = _Layout.strides(layout.col_cnt, layout.col_idx)
    _bsa_bwd_dkdv_kernel[(triton.cdiv(T, bn), B * hkv)](
        q, k, v, do, dk, dv, lse, delta, layout.col_cnt, layout.col_idx,
        qk_scale, scale, T, int(window or 0), int(num_sink),
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        H, hkv, H // hkv, s_cnt, s_idx_h, s_idx_r, t_pad, **kw,
    )
    return dq, dk, dv


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs: exact IEEE dots (this path is also a numerical reference); fp16/bf16: tensor-core default.
    return "ieee" if dtype == torch.float32 else "tf32"


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, layout: _Layout, block_size: int, window, num_sink: int, scale: float):
        q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
        o, lse = _fwd(q, k, v, layout, block_size, window, num_sink, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.layout, ctx.block_size, ctx.window, ctx.num_sink, ctx.scale = layout, block_size, window, num_sink, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _bwd(
            _last_dim_contiguous(do), q, k, v, o, lse, ctx.layout, ctx.block_size, ctx.window, ctx.num_sink, ctx.scale
        )
        return dq, dk, dv, None, None, None, None, None


def block_sparse_attention_triton(
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
    """The Triton path (differentiable). Same contract as
    :func:`~zoo.kernels.block_sparse_attention.reference.block_sparse_attention_ref`.

    Needs ``block_size in {16, 32, 64, 128}`` and ``D <= 128``; fp16 / bf16 / fp32 on a GPU, fp16 / fp32 under
    ``TRITON_INTERPRET=1`` (the interpreter computes bf16 wrongly, so bf16 is refused there).
    """
    _check_inputs(q, k, v, block_mask, block_size, window, num_sink_tokens)
    D = q.shape[-1]
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(
            f"Triton block-sparse attention supports block_size in {SUPPORTED_BLOCK_SIZES}; got {block_size}"
        )
    if D > MAX_HEAD_DIM:
        raise ValueError(f"Triton block-sparse attention supports head_dim <= {MAX_HEAD_DIM}; got {D}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"Triton block-sparse attention supports fp16, bf16 and fp32; got {q.dtype}")
    if q.dtype == torch.bfloat16 and _interpreting():
        raise ValueError("bf16 is computed wrongly by the Triton interpreter (TRITON_INTERPRET=1); use fp16 or fp32")
    if not q.is_cuda and not _interpreting():
        raise ValueError("Triton block-sparse attention needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    T = q.shape[2]
    layout = _get_layout(block_mask, block_size, T, window, int(num_sink_tokens), q.device)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    return _BlockSparseAttention.apply(q, k, v, layout, block_size, window, int(num_sink_tokens), scale)


# ----------------------------------------------------------------------------------------------------------------
# GPU micro-benchmark (for scripts/bench.py; never run in CI)
# ----------------------------------------------------------------------------------------------------------------


def bench_block_sparse(
    T: int,
    *,
    batch: int = 1,
    num_heads: int = 32,
    num_kv_heads: int = 8,
    head_dim: int = 128,
    block_size: int = 64,
    block_mask: Tensor | None = None,
    window: int | None = None,
    num_sink_tokens: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    backward: bool = False,
) -> dict[str, float]:
    """Time the Triton kernel against ``F.scaled_dot_product_attention`` (flash backend, causal) on CUDA.

    Default layout: Phi-3-small's local-stride pattern (16 local blocks, vertical stride 8, per KV head).
    TFLOP/s count only the active work: ``4 * D * (visible pairs)`` forward (QK^T and PV), x 2.5 with backward;
    SDPA counts ``4 * D * T (T + 1) / 2`` per head. Returns ms, TFLOP/s for both, and the density.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("bench_block_sparse needs a CUDA GPU")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = torch.device("cuda")
    if block_mask is None:
        nb = -(-T // block_size)
        rule = LocalStrideRule(block_size, 16, 8, num_heads=num_heads, num_kv_heads=num_kv_heads)
        block_mask = local_stride_layout(nb, nb, rule, device=dev)
    block_mask = block_mask.to(dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(batch, num_heads, T, head_dim, device=dev, dtype=dtype, generator=gen)
    k = torch.randn(batch, num_kv_heads, T, head_dim, device=dev, dtype=dtype, generator=gen)
    v = torch.randn(batch, num_kv_heads, T, head_dim, device=dev, dtype=dtype, generator=gen)
    if backward:
        for x in (q, k, v):
            x.requires_grad_(True)
    do = torch.randn(batch, num_heads, T, head_dim, device=dev, dtype=dtype, generator=gen)
    kw = dict(block_mask=block_mask, block_size=block_size, window=window, num_sink_tokens=num_sink_tokens)

    def run_sparse():
        o = block_sparse_attention_triton(q, k, v, **kw)
        if backward:
            torch.autograd.grad(o, (q, k, v), do)

    group = num_heads // num_kv_heads
    kf = k.repeat_interleave(group, 1).detach().requires_grad_(backward)
    vf = v.repeat_interleave(group, 1).detach().requires_grad_(backward)

    def run_flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            o = F.scaled_dot_product_attention(q, kf, vf, is_causal=True)
        if backward:
            torch.autograd.grad(o, (q, kf, vf), do)

    ms_sparse = triton.testing.do_bench(run_sparse)
    ms_flash = triton.testing.do_bench(run_flash)
    mult = 2.5 if backward else 1.0
    pairs = _visible_pairs(block_mask, block_size, T, window, num_sink_tokens, num_heads)
    flops_sparse = 4.0 * head_dim * pairs * batch * mult
    flops_flash = 4.0 * head_dim * (T * (T + 1) / 2) * num_heads * batch * mult
    return {
        "ms_sparse": ms_sparse,
        "ms_flash": ms_flash,
        "tflops_sparse": flops_sparse / ms_sparse * 1e-9,
        "tflops_flash": flops_flash / ms_flash * 1e-9,
        "density": pairs / (num_heads * T * (T + 1) / 2),
    }
