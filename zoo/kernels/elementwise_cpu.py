"""The glue to ``elementwise_cpu.cpp``: the Mamba-2 layer's causal conv (+ SiLU) and gated group RMSNorm, and the
rotary embedding of the attention layers, as one native pass each on the CPU in fp32 without autograd. Each returns
None where it does not apply or build (:mod:`zoo.kernels.native`); the caller then runs its torch version
(``zoo.layers.mamba2_ops._conv_forward``, ``zoo.kernels.gated_rmsnorm.reference.gated_rmsnorm_inference``,
``zoo.layers.rope._rotary_inference``)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch
from torch import Tensor

from zoo.kernels import native

__all__ = ["causal_conv_native", "gated_rmsnorm_native", "rotary_native"]


def _library():
    lib = native.library(Path(__file__).with_name("elementwise_cpu.cpp"), openmp=True)
    if lib is not None and lib.gated_rmsnorm.argtypes is None:
        i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int32
        lib.causal_conv_silu.argtypes = [i64] * 4 + [ptr, i64, i64, ptr, i64, i64, ptr, ptr, i32, ptr, i32]
        lib.causal_conv_silu.restype = None
        lib.gated_rmsnorm.argtypes = [i64] * 3 + [ptr, i64, ptr, ptr, i64, ptr, ptr, ctypes.c_float, i32, i32]
        lib.gated_rmsnorm.restype = None
        lib.rotary.argtypes = [i64] * 4 + [ptr, i64, i64, i64, ptr, ptr, i64, ptr, i64, i64, i64, i32]
        lib.rotary.restype = None
    return lib


def causal_conv_native(x: Tensor, prev: Tensor | None, w: Tensor, bias: Tensor | None,
                       activation: bool) -> Tensor | None:
    """``x [B, T, C]`` (channels contiguous, any batch / token strides), ``prev [B, K-1, C]`` or None (zeros), taps
    ``w [K, C]`` -> ``(silu)(bias + causal depthwise conv) [B, T, C]``, or None."""
    if not native.fp32_cpu(w, bias) or not native.fp32_cpu(x, prev, rows=True):
        return None
    lib = _library()
    if lib is None:
        return None
    Bsz, T, C = x.shape
    w, bias = w.contiguous(), None if bias is None else bias.contiguous()
    out = torch.empty(Bsz, T, C)
    lib.causal_conv_silu(Bsz, T, C, w.shape[0], x.data_ptr(), x.stride(0), x.stride(1),
                         None if prev is None else prev.data_ptr(), 0 if prev is None else prev.stride(0),
                         0 if prev is None else prev.stride(1), w.data_ptr(), None if bias is None else bias.data_ptr(),
                         int(activation), out.data_ptr(), torch.get_num_threads())
    return out


def gated_rmsnorm_native(x: Tensor, weight: Tensor, z: Tensor | None, *, bias: Tensor | None, eps: float,
                         group_size: int | None, norm_before_gate: bool) -> Tensor | None:
    """The arguments and result of ``gated_rmsnorm_inference`` (``x``, ``z`` with contiguous rows of any stride
    between them), or None."""
    d = x.shape[-1]
    if not native.fp32_cpu(weight, bias) or not native.fp32_cpu(x, z, rows=True) or x.dim() < 2:
        return None
    rows = x.shape[:-1].numel()
    xs = x.reshape(rows, d) if x.dim() > 2 else x  # a view for the layer's [B, T, d] (row stride kept)
    zs = None if z is None else z.reshape(rows, d)
    if xs.stride(-1) != 1 or (zs is not None and zs.stride(-1) != 1):
        return None
    lib = _library()
    if lib is None:
        return None
    out = torch.empty(x.shape)
    w, b = weight.contiguous(), None if bias is None else bias.contiguous()
    lib.gated_rmsnorm(rows, d, group_size or d, xs.data_ptr(), xs.stride(0), out.data_ptr(),
                      None if zs is None else zs.data_ptr(), 0 if zs is None else zs.stride(0), w.data_ptr(),
                      None if b is None else b.data_ptr(), eps, int(norm_before_gate), torch.get_num_threads())
    return out


def rotary_native(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor | None:
    """``x * cos + rotate_half(x) * sin`` for ``x [B, H, T, D]`` (any strides with contiguous channels; the result in
    ``x``'s layout) and ``cos, sin [B or 1, 1, T, D]`` (contiguous rows), or None."""
    B, H, T, D = x.shape
    if (not native.fp32_cpu(x, cos, sin, rows=True) or D % 2 or cos.shape != sin.shape
            or cos.shape[1:] != (1, T, D) or cos.shape[0] not in (1, B)
            or any(t.stride(-1) != 1 or t.stride(-2) != D or t.stride() != cos.stride() for t in (cos, sin))):
        return None
    lib = _library()
    if lib is None:
        return None
    out = torch.empty_like(x)
    if out.stride(-1) != 1:
        return None
    cb = cos.stride(0) if cos.shape[0] == B else 0  # 0: one set of angles for every row
    lib.rotary(B, T, H, D, x.data_ptr(), x.stride(0), x.stride(2), x.stride(1), cos.data_ptr(), sin.data_ptr(), cb,
               out.data_ptr(), out.stride(0), out.stride(2), out.stride(1), torch.get_num_threads())
    return out
