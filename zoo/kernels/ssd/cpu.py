"""The glue to ``cpu.cpp``: the chunked SSD scan's forward as one native call on the CPU (fp32, no autograd), the
state of a thread's heads kept in cache over the whole sequence. :func:`zoo.kernels.ssd.ssd_chunk_scan` calls it
where it applies; elsewhere, or where it does not build (:mod:`zoo.kernels.native`), the reference runs."""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from zoo.kernels import native
from zoo.kernels.ssd.reference import _cpu_block

__all__ = ["ssd_forward_native"]


def _library():
    lib = native.library(Path(__file__).with_name("cpu.cpp"), openmp=True)
    if lib is not None and lib.ssd_forward.argtypes is None:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        lib.ssd_forward.argtypes = [i64] * 7 + [ptr, i64, i64, ptr, i64, i64, ptr, ptr, i64, i64, ptr, i64, i64,
                                                ptr, ptr, ctypes.c_int32, ptr, ptr, ctypes.c_int32]
        lib.ssd_forward.restype = None
    return lib


def ssd_forward_native(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, chunk_size: int,
                       D: Tensor | None = None, z: Tensor | None = None, initial_states: Tensor | None = None,
                       dA_offset: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
    """:func:`~zoo.kernels.ssd.reference.ssd_chunk_scan_ref` for these arguments (same shapes, ``y`` and the final
    state), or None where the kernel does not apply: not all fp32 on the CPU, a head dim or computational chunk
    (``min(chunk_size, 64)``) that is not a multiple of 16, a head / state row that is not contiguous. ``x``, ``B``,
    ``C`` and ``dt`` are read in place (e.g. slices of one conv output: any batch and token strides)."""
    Bsz, T, H, P = x.shape
    G, N = B.shape[-2:]
    Q = _cpu_block(chunk_size)
    if (P % 16 or Q % 16 or H % G or not native.fp32_cpu(A, D, z, initial_states, dA_offset)
            or not native.fp32_cpu(x, dt, B, C, rows=True) or x.stride(-2) != P or B.stride(-2) != N
            or C.stride(-2) != N):
        return None
    lib = _library()
    if lib is None:
        return None
    state = (torch.zeros(Bsz, H, P, N) if initial_states is None
             else initial_states.to(torch.float32, memory_format=torch.contiguous_format, copy=True))
    y = torch.empty(Bsz, T, H, P)
    A, Dc = A.contiguous(), None if D is None else D.contiguous()
    off = None if dA_offset is None else dA_offset.contiguous()
    lib.ssd_forward(Bsz, T, H, P, G, N, Q, x.data_ptr(), x.stride(0), x.stride(1), dt.data_ptr(), dt.stride(0),
                    dt.stride(1), A.data_ptr(), B.data_ptr(), B.stride(0), B.stride(1), C.data_ptr(), C.stride(0),
                    C.stride(1), None if off is None else off.data_ptr(), None if Dc is None else Dc.data_ptr(),
                    int(Dc is not None and Dc.dim() == 2), state.data_ptr(), y.data_ptr(), torch.get_num_threads())
    if z is not None:
        y.mul_(F.silu(z))
    return y, state
