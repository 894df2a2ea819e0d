"""The glue to ``cpu.cpp``, the native half of :mod:`zoo.kernels.infllmv2.cpu`: which library applies, the layouts it
reads (rows ``(b, h_kv, t)`` of ``G`` scaled query heads; K^T blocks; compressed keys as ``C^T [D, 64]`` chunks) and
the calls. :mod:`zoo.kernels.native` builds the library."""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch import Tensor

from zoo.kernels import native
from zoo.kernels.infllmv2.reference import _blocks_view
from zoo.kernels.native import run_threaded, transposed_blocks

__all__ = ["native_kernel", "attend_native", "block_scores_native", "stage1_native"]

NATIVE_RANGE_BYTES = 1 << 20  # output rows per call of the stage 2 kernel (their accumulators stay in L2)


def native_kernel(head_dim: int, block_size: int, dtype: torch.dtype, *, required: bool = False):
    """The built ``cpu.cpp`` for these sizes (a ``ctypes`` library), or ``None`` where it does not apply (fp64;
    a head dim or block size that is not a multiple of 16) or is not available (:func:`zoo.kernels.native.library`;
    ``required``: raise instead)."""
    if dtype == torch.float64 or head_dim % 16 or block_size % 16:
        if required:
            raise ValueError(f"infllmv2: the native kernel (cpu.cpp) takes fp32 math with head_dim and block_size "
                             f"multiples of 16, not {dtype}, head_dim={head_dim}, block_size={block_size}")
        return None
    lib = native.library(Path(__file__).with_name("cpu.cpp"), {"HEAD_DIM": head_dim, "BLOCK": block_size},
                         required=required)
    if lib is not None and lib.infllmv2_attend.argtypes is None:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.infllmv2_attend.argtypes = [i64] * 4 + [ptr] * 6
        stage1 = [i64, i64, i64, ptr, ptr, i64, ptr, i64, ptr, ptr, ptr, i64, i64]
        lib.infllmv2_block_scores.argtypes = [*stage1, ptr]
        lib.infllmv2_select.argtypes = [*stage1, ptr, ptr, *[i64] * 5, ptr]
        for fn in (lib.infllmv2_attend, lib.infllmv2_block_scores, lib.infllmv2_select):
            fn.restype = None
    return lib


def attend_native(lib, q: Tensor, k: Tensor, v: Tensor, qpos: Tensor, idx: Tensor, bs: int, scale: float,
                   threads: int | None) -> Tensor:
    """:func:`sparse_attention_cpu` through ``cpu.cpp``: rows ``(b, h_kv, t)`` of ``G`` heads in ranges of
    about 1 MB of output (a range's accumulators stay in L2), on :func:`run_threaded` threads."""
    B, H, Tq, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G, W, R = H // Hkv, idx.shape[-1], B * Hkv * Tq
    nb = -(-N // bs)
    qr = (q.float() * scale).view(B, Hkv, G, Tq, D).transpose(2, 3).contiguous()  # [B, Hkv, Tq, G, D]
    kT = transposed_blocks(k, bs)  # [B*Hkv, nb, D, bs]
    vb = _blocks_view(v.float(), bs).contiguous()  # [B*Hkv*nb, bs, D]
    blk = idx.long()
    base = (torch.arange(B)[:, None] * Hkv + torch.arange(Hkv)) * nb
    rows = torch.where(blk >= 0, blk + base[:, :, None, None], -1).contiguous()  # [B, Hkv, Tq, W] rows of kT / vb
    visible = torch.minimum(qpos[:, None, :, None] - blk * bs + 1, N - blk * bs).clamp_(0, bs)
    cnt = visible.masked_fill_(blk < 0, 0).to(torch.int32).contiguous()
    out = torch.empty(B, Hkv, Tq, G, D)
    step = max(1, NATIVE_RANGE_BYTES // (4 * G * D))

    def run(r0: int) -> None:
        lib.infllmv2_attend(r0, min(R, r0 + step), G, W, qr.data_ptr(), kT.data_ptr(), vb.data_ptr(),
                            rows.data_ptr(), cnt.data_ptr(), out.data_ptr())

    run_threaded(run, list(range(0, R, step)), threads)
    return out.transpose(2, 3).reshape(B, H, Tq, D).to(q.dtype)


def block_scores_native(q: Tensor, c1: Tensor, c2: Tensor | None, v1: Tensor, e1: Tensor, v2: Tensor | None, *,
                        block_size: int, kernel_stride: int, num_blocks: int, scale: float,
                        score_dtype: torch.dtype | None = None) -> Tensor:
    """:func:`block_scores_cpu` through ``cpu.cpp`` (fp32 math; an error when it cannot be built). Same values up to
    fp32 rounding: the terms below ``e^-87.3`` count as 0 (:func:`block_scores_cpu`: below ``e^FLOOR``)."""
    lib = native_kernel(q.shape[-1], block_size, torch.float32, required=True)
    out = stage1_native(lib, q, transposed_blocks(c1, 64), None if c2 is None else transposed_blocks(c2, 64), v1, e1,
                        v2, st=block_size // kernel_stride, num_blocks=num_blocks, scale=scale)
    return out.to(score_dtype).float() if score_dtype is not None and torch.finfo(score_dtype).bits < 32 else out


def stage1_native(lib, q: Tensor, c1T: Tensor, c2T: Tensor | None, v1: Tensor, e1: Tensor, v2: Tensor | None, *,
                   st: int, num_blocks: int, scale: float, select: dict | None = None) -> Tensor:
    """Stage 1 through ``cpu.cpp`` for the queries ``q [B, H, Tq, D]`` (counts ``[B, Tq]``; the compressed keys as
    :func:`~zoo.kernels.native.transposed_blocks` of 64): the pooled block scores
    ``[B, Hkv, Tq, num_blocks]`` (:func:`block_scores_cpu`), or with ``select`` (``qpos``, ``dense`` and the keyword
    arguments of :func:`select_blocks_cpu`) the selected blocks ``[B, Hkv, Tq, width]``."""
    B, H, Tq, D = q.shape
    BH = c1T.shape[0]
    Hkv = BH // B
    qr = (q.float() * scale).view(B, Hkv, H // Hkv, Tq, D).transpose(2, 3).contiguous()  # rows (b, h_kv, t)

    def per_row(x: Tensor, dtype: torch.dtype) -> Tensor:  # [B, Tq] -> [B, Hkv, Tq]
        return x[:, None, :].expand(B, Hkv, Tq).to(dtype).contiguous()

    cn, counts = (c1T, v1) if c2T is None else (c2T, v2)
    rows = [per_row(c, torch.int32) for c in (v1, e1, counts)]
    args = [B * Hkv * Tq, Tq, H // Hkv, qr.data_ptr(), c1T.data_ptr(), c1T[0].numel() // D, cn.data_ptr(),
            cn[0].numel() // D, *(r.data_ptr() for r in rows), st, num_blocks]
    if select is None:
        out = torch.empty(B, Hkv, Tq, num_blocks)
        lib.infllmv2_block_scores(*args, out.data_ptr())
        return out
    qpos, dense = per_row(select["qpos"], torch.int64), select["dense"]
    dense = None if dense is None else per_row(dense, torch.uint8)
    out = torch.empty(B, Hkv, Tq, select["width"], dtype=torch.int32)
    lib.infllmv2_select(*args, qpos.data_ptr(), None if dense is None else dense.data_ptr(), select["block_size"],
                        select["init_blocks"], select["local_blocks"], select["budget"], select["width"],
                        out.data_ptr())
    return out
