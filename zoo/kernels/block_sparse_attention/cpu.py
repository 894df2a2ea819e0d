"""The glue to ``cpu.cpp``: the local + vertical-stride forward (:class:`~zoo.layers.masks.LocalStrideRule`) as one
native kernel over the active key blocks, with the log-sum-exp the backward of :mod:`zoo.layers.sparse_cpu` reads.
:mod:`zoo.kernels.native` builds the library; where it does not apply or build, the caller runs its torch
schedule."""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch import Tensor

from zoo.kernels import native

__all__ = ["block_sparse_native", "block_sparse_backward_native"]

ITEMS_PER_CALL = 16  # work items (16 queries of one head) per kernel call, calls pulled by the threads


def _library(head_dim: int, block: int):
    lib = native.library(Path(__file__).with_name("cpu.cpp"), {"HEAD_DIM": head_dim, "BLOCK": block})
    if lib is not None and lib.block_sparse_attend.argtypes is None:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.block_sparse_attend.argtypes = [i64] * 8 + [ptr, ptr, i64, i64, i64, ctypes.c_float, ptr, i64, ptr,
                                                       i64, i64, i64, ptr, ptr]
        lib.block_sparse_attend.restype = None
        strided = [ptr, i64, i64, i64]
        lib.block_sparse_backward.argtypes = [i64] * 8 + [ptr, *strided * 3, ptr, ptr, ctypes.c_float,
                                                          *strided * 2, ptr, ptr, ptr]
        lib.block_sparse_backward.restype = None
    return lib


def block_sparse_native(q: Tensor, k: Tensor, v: Tensor, block_size: int, local_blocks: int, vertical_stride: int,
                        residue: Tensor, scale: float) -> tuple[Tensor, Tensor] | None:
    """``q [B, H, T, D]``, ``k, v [B, Hkv, T, D]`` (any strides with unit stride in a row; q is read in place),
    ``residue [Hkv]``: KV head ``h`` reads the vertical blocks ``kb = residue[h] (mod vertical_stride)`` before
    its local ones -> ``(o [B, T, H, D], lse [B, H, T])``; ``None`` where the kernel does not apply (not fp32 on
    the CPU, a head dim or block size that is not a multiple of 16) or cannot be built."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    if D % 16 or block_size % 16 or not native.fp32_cpu(q, k, v, rows=True):
        return None
    block = 64 if block_size % 64 == 0 else block_size  # kernel blocks of at most 64 keys (scores in registers)
    lib = _library(D, block)
    if lib is None:
        return None
    res = residue.to(torch.int64).contiguous()
    out = torch.empty(B, T, H, D)
    lse = torch.empty(B, H, T)
    G, items = H // Hkv, -(-T // 16)  # work items per head

    def run(call: tuple[int, int, int, int]) -> None:
        i0, i1, kT_ptr, v_ptr = call
        lib.block_sparse_attend(i0, i1, H, G, T, block_size, local_blocks, vertical_stride, res.data_ptr(),
                                q.data_ptr(), *q.stride()[:3], scale, kT_ptr, 0, v_ptr, 0, 0, D, out.data_ptr(),
                                lse.data_ptr())

    for b in range(B):
        for h in range(Hkv):  # copies of one KV head at a time (its keys as K^T blocks, its values with rows D
            kT = native.transposed_blocks(k[b:b + 1, h:h + 1], block)  # apart: the layer's rows H_kv * D apart
            vh = v[b, h].contiguous()  # alias in L1 and cost ~30%); q is read in place
            first, end = (b * H + h * G) * items, (b * H + (h + 1) * G) * items
            native.run_threaded(run, [(i0, min(end, i0 + ITEMS_PER_CALL), kT.data_ptr(), vh.data_ptr())
                                      for i0 in range(first, end, ITEMS_PER_CALL)])
    return out, lse


def block_sparse_backward_native(q: Tensor, k: Tensor, v: Tensor, o: Tensor, g: Tensor, lse: Tensor,
                                 block_size: int, local_blocks: int, vertical_stride: int, residue: Tensor,
                                 scale: float) -> tuple[Tensor, Tensor, Tensor] | None:
    """The gradients ``(dq [B, H, T, D], dk, dv [B, Hkv, T, D])`` of :func:`block_sparse_native` from its output
    ``o``, log-sum-exp ``lse [B, H, T]`` and the output gradient ``g [B, H, T, D]`` (q, k, v, o, g read in place);
    ``None`` where the kernel does not apply or cannot be built. Key blocks of 32 (16 for blocks of 16): a block's
    K^T, V^T, dK and dV stay in L1 while the query tiles that read it pass."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    if D % 16 or block_size % 16 or not native.fp32_cpu(q, k, v, o, g, rows=True):
        return None
    lib = _library(D, 32 if block_size % 32 == 0 else 16)
    if lib is None:
        return None
    delta = torch.empty(B, H, T)  # the kernel's scratch: dO_i . O_i
    res = residue.to(torch.int64).contiguous()
    dq = torch.zeros(B, H, T, D)
    dk, dv = torch.empty(B, Hkv, T, D), torch.empty(B, Hkv, T, D)
    lse = lse.contiguous()

    def strided(t: Tensor) -> tuple[int, ...]:
        return t.data_ptr(), *t.stride()[:3]

    def run(item: int) -> None:
        lib.block_sparse_backward(item, item + 1, H, H // Hkv, T, block_size, local_blocks, vertical_stride,
                                  res.data_ptr(), *strided(q), *strided(g), *strided(o), lse.data_ptr(),
                                  delta.data_ptr(), scale, *strided(k), *strided(v), dq.data_ptr(), dk.data_ptr(),
                                  dv.data_ptr())

    native.run_threaded(run, list(range(B * Hkv)))
    return dq, dk, dv
