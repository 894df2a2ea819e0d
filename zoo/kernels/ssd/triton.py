"""Fused Triton kernels for Mamba-2's chunked state-space-duality (SSD) scan, forward and backward.

Math, per batch row b and head h (state ``h_t`` is ``[P, N]``, head h reads B/C group ``h // (H // G)``)::

    h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t ⊗ B_t          (h_{-1} = initial_states or 0)
    y_t = h_t C_t + D * x_t ;   y_t <- y_t * silu(z_t)           final_states = h_{T-1} (fp32)

With ``seq_idx`` (non-decreasing document ids), the state is reset where the id changes: nothing crosses a
document boundary; ``initial_states`` belongs to the document at t = 0.

Chunked form (chunk of Q tokens, a_l = cumsum_{i<=l} dt_i A inside the chunk, S_c = state entering chunk c)::

    y_l   = sum_{s<=l} (C_l . B_s) exp(a_l - a_s) dt_s x_s   +   exp(a_l) S_c C_l   + D x_l
    st_c  = sum_s exp(a_Q - a_s) dt_s x_s ⊗ B_s                   (chunk-local end state)
    S_c+1 = exp(a_Q) S_c + st_c                                    (sequential over chunks)

With seq_idx the pair terms, the exp(a_l) S_c term, the st_c terms and the exp(a_Q) S_c carry are masked to pairs in
the same document (ids compared with the chunk's last token / the previous chunk's last token).

Forward pipeline (3 kernels, all accumulation in fp32)::

    _chunk_state_fwd   grid (nc, Bt*H, tiles of P×N): dt·A cumsum in the chunk (written to dA_cs) + st_c
    _state_passing_fwd grid (Bt*H, tiles of P*N):     S_0..S_nc (S_nc = final_states)
    _chunk_scan_fwd    grid (nc*Q/BQ, Bt*H):           C·Bᵀ, causal decay, intra-chunk y, + exp(a)·C·S_c,
                                                       + D skip, z gate (all fused)

Backward pipeline (4 Triton kernels + O(T·H) torch glue)::

    _chunk_dstate_bwd     grid (nc, Bt*H, tiles of P×N): Lc = sum_l exp(a_l) dy_l ⊗ C_l (grad of y w.r.t. S_c)
    _chunk_scan_bwd_dc    grid (nc*Q/BQ, Bt*H): dC (per head) and the "+" part of d a_l
    _state_passing_bwd    grid (Bt*H, tiles): G_c = Lc + exp(a_Q) G_c+1 (G_nc = d final_states) → d st_c, d init,
                                             and d a_Q = <S_c+1, G_c+1>
    _chunk_scan_bwd_dx    grid (nc*Q/BQ, Bt*H): dx, dB (per head), ddt, the "-" part of d a_s, dz, dD partials
    torch:                reverse cumsum of d a inside chunks → ddt += A·d(dtA), dA; sums over heads of a group.

Saved for backward: the inputs, dA_cs [Bt,H,T] fp32, the chunk-entry states S_0..S_nc [Bt,nc+1,H,P,N] fp32 and,
with z, the pre-gate output [Bt,T,H,P] (x.dtype). Layouts are contiguous: x/z/y [Bt,T,H,P], dt [Bt,T,H],
B/C [Bt,T,G,N]. Dot operands are cast to the input dtype (bf16/fp16 tensor cores, fp32 accumulation); fp32 inputs
use exact fp32 dots unless ``torch.backends.cuda.matmul.allow_tf32`` is set.

Shared ``@triton.jit`` helpers hold the pointer arithmetic once: the programs' prologues (``_state_tile_prologue``
for the (chunk, head, state tile) grids, ``_row_block_prologue`` for the (chunk row block, head) grids,
``_flat_state_prologue`` for the state-passing grids), ``_row`` (the row of a token/chunk of one head in a
``[Bt, T, heads, ...]`` tensor) and the tile loads ``_load_rows`` / ``_load_cols`` / ``_load_dt`` / ``_load_dy``.
The math and the torch reference (with the arguments this kernel does not take) are in
:mod:`zoo.kernels.ssd.reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["ssd_chunk_scan_triton", "SSDChunkScanTritonFn"]


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(n))


# ----------------------------------------------------------------------------------------------------------------
# shared helpers: the programs' prologues, token-major offsets and tile loads, dots
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _mm(a, b, DT: tl.constexpr, PREC: tl.constexpr):
    """a @ b with operands in DT (the input dtype: bf16/fp16 tensor cores, or fp32 with PREC) and fp32 result."""
    return tl.dot(a.to(DT), b.to(DT), input_precision=PREC)


@triton.jit
def _head(bh, H, G):
    """Batch row, head and B/C group of the flattened program index ``bh = b * H + h``."""
    b = bh // H
    h = bh % H
    return b, h, h // (H // G)


@triton.jit
def _chunk_span(c, T, CHUNK: tl.constexpr):
    """First token of chunk ``c`` and the end of its tokens (the last chunk may be short)."""
    start = c * CHUNK
    return start, tl.minimum(start + CHUNK, T)


@triton.jit
def _state_tile_prologue(T, H, G, P, N, CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """Grid (chunk, batch*head, tile of the [P, N] state; tiles over N fastest): the program's coordinates."""
    c = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    tile = tl.program_id(2)
    b, h, g = _head(bh, H, G)
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    offs_p = (tile // n_tiles_n) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = (tile % n_tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    start, end = _chunk_span(c, T, CHUNK)
    return c, bh, b, h, g, tile, offs_p, offs_n, offs_p < P, offs_n < N, start, end


@triton.jit
def _row_block_prologue(T, H, G, P, N, CHUNK: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    """Grid (chunk * row blocks, batch*head): block ``blk`` of BLOCK_Q rows of chunk ``c``, the whole [P, N]."""
    NLB: tl.constexpr = CHUNK // BLOCK_Q
    pid0 = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    c = pid0 // NLB
    blk = pid0 % NLB
    b, h, g = _head(bh, H, G)
    offs_p = tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    start, end = _chunk_span(c, T, CHUNK)
    return pid0, c, blk, bh, b, h, g, offs_p, offs_n, offs_p < P, offs_n < N, start, end


@triton.jit
def _flat_state_prologue(H, P, N, BLOCK: tl.constexpr):
    """Grid (batch*head, tile of the flattened P*N state) of the state-passing kernels."""
    bh = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    offs = tile * BLOCK + tl.arange(0, BLOCK)
    return bh, bh // H, bh % H, tile, offs, offs < P * N


@triton.jit
def _row(b, t, head, T, NH):
    """Row index of (batch b, token or chunk t, head/group ``head``) in a ``[Bt, T, NH, ...]`` tensor; ``t`` may be
    an index tensor. Times the row length (P, N or P*N) plus the channel offsets gives the element offsets."""
    return (b * T + t) * NH + head


@triton.jit
def _load_rows(ptr, b, t, head, offs, mask_t, mask_c, T, NH, D):
    """[tokens t, channels offs] tile of head ``head`` of a ``[Bt, T, NH, D]`` tensor, 0 outside the masks."""
    return tl.load(ptr + _row(b, t[:, None], head, T, NH) * D + offs[None, :], mask=mask_t[:, None] & mask_c[None, :],
                   other=0.0)


@triton.jit
def _load_cols(ptr, b, t, head, offs, mask_t, mask_c, T, NH, D):
    """The transposed tile [channels offs, tokens t] of :func:`_load_rows`."""
    return tl.load(ptr + _row(b, t[None, :], head, T, NH) * D + offs[:, None], mask=mask_t[None, :] & mask_c[:, None],
                   other=0.0)


@triton.jit
def _load_dt(dt_ptr, b, t, h, mask, T, H):
    """dt of head h at tokens t in fp32 (0 where masked)."""
    return tl.load(dt_ptr + _row(b, t, h, T, H), mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_dy(dout_ptr, z_ptr, off, mask, HAS_Z: tl.constexpr):
    """Gradient w.r.t. the pre-gate output: dout * silu(z)."""
    dy = tl.load(dout_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        zz = tl.load(z_ptr + off, mask=mask, other=0.0).to(tl.float32)
        dy = dy * zz * tl.sigmoid(zz)
    return dy


# ----------------------------------------------------------------------------------------------------------------
# forward kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _chunk_state_fwd(
    x_ptr, dt_ptr, A_ptr, B_ptr, seq_ptr, dacs_ptr, st_ptr,
    T, H, G, P, N, NC,
    CHUNK: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SEQ: tl.constexpr,
    PREC: tl.constexpr, DT: tl.constexpr,
):
    c, bh, b, h, g, tile, offs_p, offs_n, mp, mn, start, end = _state_tile_prologue(
        T, H, G, P, N, CHUNK, BLOCK_P, BLOCK_N)
    A_h = tl.load(A_ptr + h).to(tl.float32)

    # pass 1: a_Q = sum of dt*A over the chunk
    a_q = 0.0
    for s0 in range(0, CHUNK, BLOCK_S):
        ts = start + tl.cast(s0, tl.int64) + tl.arange(0, BLOCK_S)
        dts = _load_dt(dt_ptr, b, ts, h, ts < end, T, H)
        a_q += tl.sum(dts * A_h, axis=0)
    if HAS_SEQ:
        seq_last = tl.load(seq_ptr + b * T + end - 1)

    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    run = 0.0
    for s0 in range(0, CHUNK, BLOCK_S):
        ts = start + tl.cast(s0, tl.int64) + tl.arange(0, BLOCK_S)
        ms = ts < end
        dts = _load_dt(dt_ptr, b, ts, h, ms, T, H)
        da = dts * A_h
        cs = tl.cumsum(da, axis=0) + run
        run += tl.sum(da, axis=0)
        tl.store(dacs_ptr + bh * T + ts, cs, mask=ms & ((ts * 0 + tile) == 0))
        scale = tl.exp(tl.minimum(a_q - cs, 0.0)) * dts
        if HAS_SEQ:
            seq_s = tl.load(seq_ptr + b * T + ts, mask=ms, other=-1)
            scale = tl.where(seq_s == seq_last, scale, 0.0)
        scale = tl.where(ms, scale, 0.0)
        xt = _load_cols(x_ptr, b, ts, h, offs_p, ms, mp, T, H, P)  # x^T: [BLOCK_P, BLOCK_S]
        bs = _load_rows(B_ptr, b, ts, g, offs_n, ms, mn, T, G, N)
        acc += _mm(xt, bs.to(tl.float32) * scale[:, None], DT, PREC)
    st_off = _row(b, c, h, NC, H) * P * N
    tl.store(st_ptr + st_off + offs_p[:, None] * N + offs_n[None, :], acc, mask=mp[:, None] & mn[None, :])


@triton.jit
def _state_passing_fwd(
    st_ptr, dacs_ptr, seq_ptr, init_ptr, sall_ptr,
    T, H, P, N, NC,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr,
):
    bh, b, h, tile, offs, m = _flat_state_prologue(H, P, N, BLOCK)
    if HAS_INIT:
        s = tl.load(init_ptr + bh * P * N + offs, mask=m, other=0.0).to(tl.float32)
    else:
        s = tl.zeros((BLOCK,), dtype=tl.float32)
    if HAS_SEQ:
        seq_prev = tl.load(seq_ptr + b * T)
    for ci in range(NC):
        c = tl.cast(ci, tl.int64)
        tl.store(sall_ptr + _row(b, c, h, NC + 1, H) * P * N + offs, s, mask=m)
        last = tl.minimum((c + 1) * CHUNK, T) - 1
        decay = tl.exp(tl.load(dacs_ptr + bh * T + last))
        if HAS_SEQ:
            seq_c = tl.load(seq_ptr + b * T + last)
            decay = tl.where(seq_c == seq_prev, decay, 0.0)
            seq_prev = seq_c
        st = tl.load(st_ptr + _row(b, c, h, NC, H) * P * N + offs, mask=m, other=0.0)
        s = decay * s + st
    tl.store(sall_ptr + _row(b, NC, h, NC + 1, H) * P * N + offs, s, mask=m)


@triton.jit
def _chunk_scan_fwd(
    x_ptr, dt_ptr, dacs_ptr, B_ptr, C_ptr, seq_ptr, sall_ptr, D_ptr, z_ptr, y_ptr, y0_ptr,
    T, H, G, P, N, NC,
    CHUNK: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_D: tl.constexpr, D_HDIM: tl.constexpr, HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr,
    PREC: tl.constexpr, DT: tl.constexpr,
):
    pid0, c, lb, bh, b, h, g, offs_p, offs_n, mp, mn, start, end = _row_block_prologue(
        T, H, G, P, N, CHUNK, BLOCK_Q, BLOCK_P, BLOCK_N)
    tl_ = start + lb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    ml = tl_ < end

    a_l = tl.load(dacs_ptr + bh * T + tl_, mask=ml, other=0.0)
    c_l = _load_rows(C_ptr, b, tl_, g, offs_n, ml, mn, T, G, N)
    # S_c^T: [BLOCK_N, BLOCK_P]
    s_t = tl.load(sall_ptr + _row(b, c, h, NC + 1, H) * P * N + offs_p[None, :] * N + offs_n[:, None],
                  mask=mp[None, :] & mn[:, None], other=0.0).to(DT)
    off_scale = tl.exp(a_l)
    if HAS_SEQ:
        seq_l = tl.load(seq_ptr + b * T + tl_, mask=ml, other=-1)
        seq_prev = tl.load(seq_ptr + b * T + tl.maximum(start - 1, 0))
        off_scale = tl.where(seq_l == seq_prev, off_scale, 0.0)
    acc = _mm(c_l, s_t, DT, PREC) * off_scale[:, None]

    for s0 in range(0, (lb + 1) * BLOCK_Q, BLOCK_Q):
        ts = start + tl.cast(s0, tl.int64) + tl.arange(0, BLOCK_Q)
        ms = ts < end
        a_s = tl.load(dacs_ptr + bh * T + ts, mask=ms, other=0.0)
        dts = _load_dt(dt_ptr, b, ts, h, ms, T, H)
        b_s = _load_rows(B_ptr, b, ts, g, offs_n, ms, mn, T, G, N)
        x_s = _load_rows(x_ptr, b, ts, h, offs_p, ms, mp, T, H, P)
        cb = _mm(c_l, tl.trans(b_s), DT, PREC)  # [L, S]
        mask = (ts[None, :] <= tl_[:, None]) & ms[None, :] & ml[:, None]
        if HAS_SEQ:
            seq_s = tl.load(seq_ptr + b * T + ts, mask=ms, other=-2)
            mask = mask & (seq_s[None, :] == seq_l[:, None])
        w = cb * tl.exp(tl.where(mask, a_l[:, None] - a_s[None, :], float("-inf"))) * dts[None, :]
        acc += _mm(w, x_s, DT, PREC)

    io_mask = ml[:, None] & mp[None, :]
    io_off = _row(b, tl_[:, None], h, T, H) * P + offs_p[None, :]
    if HAS_D:
        x_l = tl.load(x_ptr + io_off, mask=io_mask, other=0.0).to(tl.float32)
        if D_HDIM:
            d = tl.load(D_ptr + h * P + offs_p, mask=mp, other=0.0).to(tl.float32)
            acc += x_l * d[None, :]
        else:
            acc += x_l * tl.load(D_ptr + h).to(tl.float32)
    if HAS_Z:
        tl.store(y0_ptr + io_off, acc.to(y0_ptr.dtype.element_ty), mask=io_mask)
        zz = tl.load(z_ptr + io_off, mask=io_mask, other=0.0).to(tl.float32)
        acc = acc * zz * tl.sigmoid(zz)
    tl.store(y_ptr + io_off, acc.to(y_ptr.dtype.element_ty), mask=io_mask)


# ----------------------------------------------------------------------------------------------------------------
# backward kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _chunk_dstate_bwd(
    dacs_ptr, C_ptr, seq_ptr, z_ptr, dout_ptr, lc_ptr,
    T, H, G, P, N, NC,
    CHUNK: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr,
    PREC: tl.constexpr, DT: tl.constexpr,
):
    """Lc = sum_l exp(a_l) dy_l ⊗ C_l: the gradient of chunk c's outputs w.r.t. the state entering it."""
    c, bh, b, h, g, tile, offs_p, offs_n, mp, mn, start, end = _state_tile_prologue(
        T, H, G, P, N, CHUNK, BLOCK_P, BLOCK_N)
    if HAS_SEQ:
        seq_prev = tl.load(seq_ptr + b * T + tl.maximum(start - 1, 0))
    lc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for l0 in range(0, CHUNK, BLOCK_Q):
        tl_ = start + tl.cast(l0, tl.int64) + tl.arange(0, BLOCK_Q)
        ml = tl_ < end
        scale = tl.where(ml, tl.exp(tl.load(dacs_ptr + bh * T + tl_, mask=ml, other=0.0)), 0.0)
        if HAS_SEQ:
            seq_l = tl.load(seq_ptr + b * T + tl_, mask=ml, other=-1)
            scale = tl.where(seq_l == seq_prev, scale, 0.0)
        # dy^T: [BLOCK_P, BLOCK_Q]
        dyt = _load_dy(dout_ptr, z_ptr, _row(b, tl_[None, :], h, T, H) * P + offs_p[:, None],
                       ml[None, :] & mp[:, None], HAS_Z)
        c_l = _load_rows(C_ptr, b, tl_, g, offs_n, ml, mn, T, G, N)
        lc += _mm(dyt * scale[None, :], c_l, DT, PREC)
    tl.store(lc_ptr + _row(b, c, h, NC, H) * P * N + offs_p[:, None] * N + offs_n[None, :], lc,
             mask=mp[:, None] & mn[None, :])


@triton.jit
def _chunk_scan_bwd_dc(
    x_ptr, dt_ptr, dacs_ptr, B_ptr, C_ptr, seq_ptr, sall_ptr, z_ptr, dout_ptr,
    dC_ptr, dap_ptr,
    T, H, G, P, N, NC,
    CHUNK: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr,
    PREC: tl.constexpr, DT: tl.constexpr,
):
    """dC_l (per head) and the "+" part of d a_l, for one block of BLOCK_Q output rows l."""
    pid0, c, lb, bh, b, h, g, offs_p, offs_n, mp, mn, start, end = _row_block_prologue(
        T, H, G, P, N, CHUNK, BLOCK_Q, BLOCK_P, BLOCK_N)
    l0 = lb * BLOCK_Q
    # S_c: [BLOCK_P, BLOCK_N]
    s_c = tl.load(sall_ptr + _row(b, c, h, NC + 1, H) * P * N + offs_p[:, None] * N + offs_n[None, :],
                  mask=mp[:, None] & mn[None, :], other=0.0)
    tl_ = start + l0 + tl.arange(0, BLOCK_Q)
    ml = tl_ < end
    a_l = tl.load(dacs_ptr + bh * T + tl_, mask=ml, other=0.0)
    c_l = _load_rows(C_ptr, b, tl_, g, offs_n, ml, mn, T, G, N)
    dy_d = _load_dy(dout_ptr, z_ptr, _row(b, tl_[:, None], h, T, H) * P + offs_p[None, :],
                    ml[:, None] & mp[None, :], HAS_Z).to(DT)
    off_scale = tl.where(ml, tl.exp(a_l), 0.0)
    if HAS_SEQ:
        seq_prev = tl.load(seq_ptr + b * T + tl.maximum(start - 1, 0))
        seq_l = tl.load(seq_ptr + b * T + tl_, mask=ml, other=-1)
        off_scale = tl.where(seq_l == seq_prev, off_scale, 0.0)
    dc = _mm(dy_d, s_c, DT, PREC) * off_scale[:, None]  # [L, N]
    dap = tl.sum(dc * c_l.to(tl.float32), axis=1)
    for s0 in range(0, l0 + BLOCK_Q, BLOCK_Q):
        ts = start + s0 + tl.arange(0, BLOCK_Q)
        ms = ts < end
        a_s = tl.load(dacs_ptr + bh * T + ts, mask=ms, other=0.0)
        dts = _load_dt(dt_ptr, b, ts, h, ms, T, H)
        b_s = _load_rows(B_ptr, b, ts, g, offs_n, ms, mn, T, G, N)
        x_s = _load_rows(x_ptr, b, ts, h, offs_p, ms, mp, T, H, P)
        mask = (ts[None, :] <= tl_[:, None]) & ms[None, :] & ml[:, None]
        if HAS_SEQ:
            seq_s = tl.load(seq_ptr + b * T + ts, mask=ms, other=-2)
            mask = mask & (seq_s[None, :] == seq_l[:, None])
        mdt = tl.exp(tl.where(mask, a_l[:, None] - a_s[None, :], float("-inf"))) * dts[None, :]
        cb = _mm(c_l, tl.trans(b_s), DT, PREC)  # [L, S]
        dyx = _mm(dy_d, tl.trans(x_s), DT, PREC)  # [L, S]
        t1 = dyx * mdt
        dc += _mm(t1, b_s, DT, PREC)
        # the diagonal (s == l) adds +v and -v to the same position: leave it out of d a (less cancellation)
        dap += tl.sum(tl.where(ts[None, :] < tl_[:, None], t1 * cb, 0.0), axis=1)
    tl.store(dC_ptr + _row(b, tl_[:, None], h, T, H) * N + offs_n[None, :], dc, mask=ml[:, None] & mn[None, :])
    tl.store(dap_ptr + bh * T + tl_, dap, mask=ml)


@triton.jit
def _state_passing_bwd(
    lc_ptr, sall_ptr, dacs_ptr, seq_ptr, dfinal_ptr, dst_ptr, dinit_ptr, daq_ptr,
    T, H, P, N, NC,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, HAS_DFINAL: tl.constexpr, HAS_SEQ: tl.constexpr,
):
    bh, b, h, tile, offs, m = _flat_state_prologue(H, P, N, BLOCK)
    n_tiles = tl.num_programs(1)
    if HAS_DFINAL:
        gr = tl.load(dfinal_ptr + bh * P * N + offs, mask=m, other=0.0).to(tl.float32)
    else:
        gr = tl.zeros((BLOCK,), dtype=tl.float32)
    for ci in range(NC):
        c = tl.cast(NC - 1 - ci, tl.int64)
        # gr = gradient w.r.t. the state at the end of chunk c
        tl.store(dst_ptr + _row(b, c, h, NC, H) * P * N + offs, gr, mask=m)
        s_end = tl.load(sall_ptr + _row(b, c + 1, h, NC + 1, H) * P * N + offs, mask=m, other=0.0)
        tl.store(daq_ptr + (bh * NC + c) * n_tiles + tile, tl.sum(s_end * gr, axis=0))
        last = tl.minimum((c + 1) * CHUNK, T) - 1
        decay = tl.exp(tl.load(dacs_ptr + bh * T + last))
        if HAS_SEQ:
            seq_c = tl.load(seq_ptr + b * T + last)
            seq_prev = tl.load(seq_ptr + b * T + tl.maximum(c * CHUNK - 1, 0))
            decay = tl.where(seq_c == seq_prev, decay, 0.0)
        gr = tl.load(lc_ptr + _row(b, c, h, NC, H) * P * N + offs, mask=m, other=0.0) + decay * gr
    tl.store(dinit_ptr + bh * P * N + offs, gr, mask=m)


@triton.jit
def _chunk_scan_bwd_dx(
    x_ptr, dt_ptr, dacs_ptr, B_ptr, C_ptr, seq_ptr, dst_ptr, D_ptr, z_ptr, y0_ptr, dout_ptr,
    dx_ptr, dB_ptr, ddt_ptr, dam_ptr, dz_ptr, dD_ptr,
    T, H, G, P, N, NC,
    CHUNK: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_D: tl.constexpr, D_HDIM: tl.constexpr, HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr,
    PREC: tl.constexpr, DT: tl.constexpr,
):
    NSB: tl.constexpr = CHUNK // BLOCK_Q
    pid0, c, sb, bh, b, h, g, offs_p, offs_n, mp, mn, start, end = _row_block_prologue(
        T, H, G, P, N, CHUNK, BLOCK_Q, BLOCK_P, BLOCK_N)
    ts = start + sb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    ms = ts < end

    a_s = tl.load(dacs_ptr + bh * T + ts, mask=ms, other=0.0)
    a_q = tl.load(dacs_ptr + bh * T + end - 1)
    dts = _load_dt(dt_ptr, b, ts, h, ms, T, H)
    b_s = _load_rows(B_ptr, b, ts, g, offs_n, ms, mn, T, G, N)
    io_off = _row(b, ts[:, None], h, T, H) * P + offs_p[None, :]
    io_mask = ms[:, None] & mp[None, :]
    x_s = tl.load(x_ptr + io_off, mask=io_mask, other=0.0)
    # gradient w.r.t. the chunk-end state: [BLOCK_P, BLOCK_N]
    gr = tl.load(dst_ptr + _row(b, c, h, NC, H) * P * N + offs_p[:, None] * N + offs_n[None, :],
                 mask=mp[:, None] & mn[None, :], other=0.0).to(DT)
    decay = tl.exp(tl.minimum(a_q - a_s, 0.0))
    if HAS_SEQ:
        seq_s = tl.load(seq_ptr + b * T + ts, mask=ms, other=-2)
        seq_last = tl.load(seq_ptr + b * T + end - 1)
        decay = tl.where(seq_s == seq_last, decay, 0.0)
    decay = tl.where(ms, decay, 0.0)
    xg = _mm(x_s, gr, DT, PREC)  # [S, N]
    wp = tl.sum(xg * b_s.to(tl.float32), axis=1)
    db = xg * (decay * dts)[:, None]
    ddt = decay * wp
    dam = decay * dts * wp
    dx = _mm(b_s, tl.trans(gr), DT, PREC) * (decay * dts)[:, None]  # [S, P]

    for l0 in range(sb * BLOCK_Q, CHUNK, BLOCK_Q):
        tl_ = start + l0 + tl.arange(0, BLOCK_Q)
        ml = tl_ < end
        a_l = tl.load(dacs_ptr + bh * T + tl_, mask=ml, other=0.0)
        c_l = _load_rows(C_ptr, b, tl_, g, offs_n, ml, mn, T, G, N)
        dy_d = _load_dy(dout_ptr, z_ptr, _row(b, tl_[:, None], h, T, H) * P + offs_p[None, :],
                        ml[:, None] & mp[None, :], HAS_Z).to(DT)
        mask = (tl_[None, :] >= ts[:, None]) & ml[None, :] & ms[:, None]
        if HAS_SEQ:
            seq_l = tl.load(seq_ptr + b * T + tl_, mask=ml, other=-1)
            mask = mask & (seq_l[None, :] == seq_s[:, None])
        mt = tl.exp(tl.where(mask, a_l[None, :] - a_s[:, None], float("-inf")))  # [S, L]
        cbt = _mm(b_s, tl.trans(c_l), DT, PREC)  # [S, L]
        dyxt = _mm(x_s, tl.trans(dy_d), DT, PREC)  # [S, L]
        p1 = cbt * mt
        dx += _mm(p1, dy_d, DT, PREC) * dts[:, None]
        db += _mm(dyxt * mt, c_l, DT, PREC) * dts[:, None]
        pd = p1 * dyxt
        ddt += tl.sum(pd, axis=1)
        dam += tl.sum(tl.where(tl_[None, :] > ts[:, None], pd, 0.0), axis=1) * dts

    dout_s = tl.load(dout_ptr + io_off, mask=io_mask, other=0.0).to(tl.float32)
    if HAS_Z:
        zz = tl.load(z_ptr + io_off, mask=io_mask, other=0.0).to(tl.float32)
        sg = tl.sigmoid(zz)
        y0 = tl.load(y0_ptr + io_off, mask=io_mask, other=0.0).to(tl.float32)
        tl.store(dz_ptr + io_off, (dout_s * y0 * sg * (1.0 + zz * (1.0 - sg))).to(dz_ptr.dtype.element_ty),
                 mask=io_mask)
        dy_s = dout_s * zz * sg
    else:
        dy_s = dout_s
    if HAS_D:
        if D_HDIM:
            d = tl.load(D_ptr + h * P + offs_p, mask=mp, other=0.0).to(tl.float32)
            dx += dy_s * d[None, :]
        else:
            dx += dy_s * tl.load(D_ptr + h).to(tl.float32)
        tl.store(dD_ptr + ((b * NC * NSB + pid0) * H + h) * P + offs_p, tl.sum(dy_s * x_s.to(tl.float32), axis=0),
                 mask=mp)
    tl.store(dx_ptr + io_off, dx.to(dx_ptr.dtype.element_ty), mask=io_mask)
    tl.store(dB_ptr + _row(b, ts[:, None], h, T, H) * N + offs_n[None, :], db, mask=ms[:, None] & mn[None, :])
    tl.store(ddt_ptr + _row(b, ts, h, T, H), ddt, mask=ms)
    tl.store(dam_ptr + bh * T + ts, dam, mask=ms)


# ----------------------------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------------------------


_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _dot_config(dtype: torch.dtype) -> dict:
    """Dot operands in the input dtype; fp32 dots use TF32 only when torch allows it for matmuls (default: no)."""
    if dtype not in _TL_DTYPE:
        raise TypeError(f"ssd_chunk_scan_triton supports float32, float16 and bfloat16 inputs, got {dtype}")
    tf32 = dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32
    return dict(DT=_TL_DTYPE[dtype], PREC="tf32" if tf32 else "ieee")


def _fwd(x, dt, A, B, C, chunk_size, D, z, init, seq, block_q):
    Bt, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    nc = triton.cdiv(T, chunk_size)
    dev = x.device
    BP, BN = _pow2(P), _pow2(N)
    dot = _dot_config(x.dtype)
    dacs = torch.empty(Bt, H, T, device=dev, dtype=torch.float32)
    st = torch.empty(Bt, nc, H, P, N, device=dev, dtype=torch.float32)
    sp, sn = min(BP, 64), min(BN, 64)  # the chunk-state kernel tiles the [P, N] state over a grid axis
    _chunk_state_fwd[(nc, Bt * H, triton.cdiv(P, sp) * triton.cdiv(N, sn))](
        x, dt, A, B, seq, dacs, st, T, H, G, P, N, nc,
        CHUNK=chunk_size, BLOCK_S=block_q, BLOCK_P=sp, BLOCK_N=sn, HAS_SEQ=seq is not None, **dot,
        num_warps=4,
    )
    sall = torch.empty(Bt, nc + 1, H, P, N, device=dev, dtype=torch.float32)
    block = min(1024, triton.next_power_of_2(P * N))
    _state_passing_fwd[(Bt * H, triton.cdiv(P * N, block))](
        st, dacs, seq, init, sall, T, H, P, N, nc,
        CHUNK=chunk_size, BLOCK=block, HAS_INIT=init is not None, HAS_SEQ=seq is not None, num_warps=4,
    )
    y = torch.empty_like(x)
    y0 = torch.empty_like(x) if z is not None else None
    _chunk_scan_fwd[(nc * (chunk_size // block_q), Bt * H)](
        x, dt, dacs, B, C, seq, sall, D, z, y, y0, T, H, G, P, N, nc,
        CHUNK=chunk_size, BLOCK_Q=block_q, BLOCK_P=BP, BLOCK_N=BN,
        HAS_D=D is not None, D_HDIM=D is not None and D.dim() == 2, HAS_Z=z is not None,
        HAS_SEQ=seq is not None, **dot, num_warps=8,
    )
    return y, y0, dacs, sall


def _bwd(dout, dfinal, x, dt, A, B, C, chunk_size, D, z, init, seq, block_q, dacs, sall, y0):
    Bt, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    nc = triton.cdiv(T, chunk_size)
    nsb = chunk_size // block_q
    dev = x.device
    BP, BN = _pow2(P), _pow2(N)
    dot = _dot_config(x.dtype)
    f32 = torch.float32
    has_seq = seq is not None

    dC_h = torch.empty(Bt, T, H, N, device=dev, dtype=f32)
    dap = torch.empty(Bt, H, T, device=dev, dtype=f32)
    lc = torch.empty(Bt, nc, H, P, N, device=dev, dtype=f32)
    sp, sn = min(BP, 64), min(BN, 64)
    _chunk_dstate_bwd[(nc, Bt * H, triton.cdiv(P, sp) * triton.cdiv(N, sn))](
        dacs, C, seq, z, dout, lc, T, H, G, P, N, nc,
        CHUNK=chunk_size, BLOCK_Q=block_q, BLOCK_P=sp, BLOCK_N=sn, HAS_Z=z is not None, HAS_SEQ=has_seq,
        **dot, num_warps=4,
    )
    _chunk_scan_bwd_dc[(nc * nsb, Bt * H)](
        x, dt, dacs, B, C, seq, sall, z, dout, dC_h, dap, T, H, G, P, N, nc,
        CHUNK=chunk_size, BLOCK_Q=block_q, BLOCK_P=BP, BLOCK_N=BN, HAS_Z=z is not None, HAS_SEQ=has_seq,
        **dot, num_warps=8,
    )
    block = min(1024, triton.next_power_of_2(P * N))
    n_tiles = triton.cdiv(P * N, block)
    dst = torch.empty(Bt, nc, H, P, N, device=dev, dtype=f32)
    dinit = torch.empty(Bt, H, P, N, device=dev, dtype=f32)
    daq = torch.empty(Bt, H, nc, n_tiles, device=dev, dtype=f32)
    _state_passing_bwd[(Bt * H, n_tiles)](
        lc, sall, dacs, seq, dfinal, dst, dinit, daq, T, H, P, N, nc,
        CHUNK=chunk_size, BLOCK=block, HAS_DFINAL=dfinal is not None, HAS_SEQ=has_seq, num_warps=4,
    )
    dx = torch.empty_like(x)
    dB_h = torch.empty(Bt, T, H, N, device=dev, dtype=f32)
    ddt = torch.empty(Bt, T, H, device=dev, dtype=f32)
    dam = torch.empty(Bt, H, T, device=dev, dtype=f32)
    dz = torch.empty_like(z) if z is not None else None
    dD_part = torch.empty(Bt, nc * nsb, H, P, device=dev, dtype=f32) if D is not None else None
    _chunk_scan_bwd_dx[(nc * nsb, Bt * H)](
        x, dt, dacs, B, C, seq, dst, D, z, y0, dout, dx, dB_h, ddt, dam, dz, dD_part, T, H, G, P, N, nc,
        CHUNK=chunk_size, BLOCK_Q=block_q, BLOCK_P=BP, BLOCK_N=BN,
        HAS_D=D is not None, D_HDIM=D is not None and D.dim() == 2, HAS_Z=z is not None, HAS_SEQ=has_seq,
        **dot, num_warps=8,
    )

    # d a_l (gradient w.r.t. the in-chunk cumsum of dt*A); a_Q's own gradient lands on each chunk's last token.
    da = dap - dam
    last = (torch.arange(nc, device=dev) + 1).mul_(chunk_size).clamp_(max=T) - 1
    da[:, :, last] += daq.sum(-1)
    pad = nc * chunk_size - T
    d_dA = torch.nn.functional.pad(da, (0, pad)).view(Bt, H, nc, chunk_size)
    d_dA = d_dA.flip(-1).cumsum(-1).flip(-1).reshape(Bt, H, nc * chunk_size)[:, :, :T]  # d(dt*A) [Bt,H,T]
    A32 = A.float()
    ddt = ddt + d_dA.transpose(1, 2) * A32
    dA = (d_dA * dt.float().transpose(1, 2)).sum((0, 2))
    dB = dB_h.view(Bt, T, G, H // G, N).sum(3)
    dC = dC_h.view(Bt, T, G, H // G, N).sum(3)
    dD = None
    if D is not None:
        dD = dD_part.sum((0, 1))
        if D.dim() == 1:
            dD = dD.sum(-1)
        dD = dD.to(D.dtype)
    return (dx, ddt.to(dt.dtype), dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype), dD, dz,
            dinit.to(init.dtype) if init is not None else None)


class SSDChunkScanTritonFn(torch.autograd.Function):
    """Autograd wrapper: Triton forward and backward. ``block_q`` (power of two ≤ chunk_size) tiles the chunk."""

    @staticmethod
    def forward(ctx, x, dt, A, B, C, chunk_size, D, z, initial_states, seq_idx, block_q):
        ctx.set_materialize_grads(False)
        y, y0, dacs, sall = _fwd(x, dt, A, B, C, chunk_size, D, z, initial_states, seq_idx, block_q)
        ctx.save_for_backward(x, dt, A, B, C, D, z, initial_states, seq_idx, dacs, sall, y0)
        ctx.chunk_size = chunk_size
        ctx.block_q = block_q
        return y, sall[:, -1].clone()

    @staticmethod
    def backward(ctx, dy, dfinal):
        x, dt, A, B, C, D, z, init, seq, dacs, sall, y0 = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(x)
        dy = dy.contiguous()
        if dfinal is not None:
            dfinal = dfinal.contiguous()
        dx, ddt, dA, dB, dC, dD, dz, dinit = _bwd(
            dy, dfinal, x, dt, A, B, C, ctx.chunk_size, D, z, init, seq, ctx.block_q, dacs, sall, y0
        )
        return dx, ddt, dA, dB, dC, None, dD, dz, dinit, None, None


def ssd_chunk_scan_triton(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    chunk_size: int,
    D: Tensor | None = None,
    z: Tensor | None = None,
    initial_states: Tensor | None = None,
    seq_idx: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Chunked SSD scan with Triton kernels (forward and backward).

    x [Bt,T,H,P]; dt [Bt,T,H] (positive, already softplus'd / clamped); A [H] (negative); B, C [Bt,T,G,N];
    D None | [H] | [H,P]; z None | [Bt,T,H,P] (y = (y + D x) * silu(z)); initial_states None | [Bt,H,P,N];
    seq_idx None | [Bt,T] int (non-decreasing document ids; state resets where the id changes).
    Returns y [Bt,T,H,P] in x.dtype and final_states [Bt,H,P,N] in fp32. ``chunk_size``: a power of two ≥ 16.
    """
    Bt, T, H, P = x.shape
    if x.dim() != 4 or dt.shape != (Bt, T, H) or A.shape != (H,):
        raise ValueError(f"expected x [Bt,T,H,P], dt [Bt,T,H], A [H]; got {tuple(x.shape)}, {tuple(dt.shape)}, "
                         f"{tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (Bt, T) or C.shape != B.shape or H % B.shape[2] != 0:
        raise ValueError(f"expected B, C [Bt,T,G,N] with H % G == 0; got {tuple(B.shape)}, {tuple(C.shape)}")
    N = B.shape[3]
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 16, got {chunk_size}")
    if D is not None and D.shape not in ((H,), (H, P)):
        raise ValueError(f"D must be [H] or [H,P] = [{H}] or [{H},{P}], got {tuple(D.shape)}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"z must have x's shape {tuple(x.shape)}, got {tuple(z.shape)}")
    if initial_states is not None and initial_states.shape != (Bt, H, P, N):
        raise ValueError(f"initial_states must be [{Bt},{H},{P},{N}], got {tuple(initial_states.shape)}")
    if seq_idx is not None:
        if seq_idx.shape != (Bt, T):
            raise ValueError(f"seq_idx must be [{Bt},{T}], got {tuple(seq_idx.shape)}")
        seq_idx = seq_idx.to(torch.int32).contiguous()
    if B.dtype != x.dtype or C.dtype != x.dtype:  # the dots run in x.dtype
        B, C = B.to(x.dtype), C.to(x.dtype)
    # 32-row tiles: sm_90 compiles of the scan kernels (P=64, N=128, bf16, 8 warps) spill least at this size
    block_q = min(chunk_size, 32)
    c = lambda t: None if t is None else t.contiguous()  # noqa: E731
    return SSDChunkScanTritonFn.apply(
        c(x), c(dt), c(A), c(B), c(C), chunk_size, c(D), c(z), c(initial_states), seq_idx, block_q
    )
