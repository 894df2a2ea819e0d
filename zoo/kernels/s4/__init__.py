"""S4 / S4D structured products with autograd: ``cauchy`` (DPLR generating function) and ``log_vandermonde``
(diagonal kernel). Dispatch (:mod:`zoo.kernels.backend`): the Triton kernels (:mod:`zoo.kernels.s4.triton`,
imported only when chosen) for CUDA tensors, the sliced torch reference (:mod:`zoo.kernels.s4.reference`)
otherwise; ``ZOO_BACKEND=torch|triton`` forces one. The SSM kernel built on them is :mod:`zoo.kernels.s4.ssm`.

    cauchy(v, z, w)          v [..., H, N], z [K], w [H, N]  ->  [..., H, K]   (complex)
    log_vandermonde(v, x, L) v [..., H, N], x [H, N]         ->  [..., H, L]   (real)

Neither path materialises an ``N x K`` (``N x L``) matrix in full; see ``reference.py`` for the formulas.
Gradients flow to ``v`` and ``w`` / ``x`` (the nodes ``z`` are constants).
"""

from __future__ import annotations

import torch
from torch import Tensor

from zoo.kernels.backend import triton_module, use_triton
from zoo.kernels.s4.reference import (
    cauchy_bwd_ref,
    cauchy_fwd_ref,
    cauchy_naive,
    log_vandermonde_naive,
    vandermonde_bwd_ref,
    vandermonde_fwd_ref,
)

__all__ = ["cauchy", "log_vandermonde", "cauchy_naive", "log_vandermonde_naive"]


def _impl(triton: bool, name: str):
    kernels = triton_module("zoo.kernels.s4.triton") if triton else None
    if kernels is not None:
        return getattr(kernels, f"{name}_triton")
    return {"cauchy_fwd": cauchy_fwd_ref, "cauchy_bwd": cauchy_bwd_ref,
            "vandermonde_fwd": vandermonde_fwd_ref, "vandermonde_bwd": vandermonde_bwd_ref}[name]


class _Cauchy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v: Tensor, z: Tensor, w: Tensor, triton: bool) -> Tensor:
        ctx.save_for_backward(v, z, w)
        ctx.triton = triton
        return _impl(triton, "cauchy_fwd")(v, z, w)

    @staticmethod
    def backward(ctx, g: Tensor):
        v, z, w = ctx.saved_tensors
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[2]):
            return None, None, None, None
        gv, gw = _impl(ctx.triton, "cauchy_bwd")(g.contiguous(), v, z, w)
        return gv, None, gw, None


class _Vandermonde(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v: Tensor, x: Tensor, L: int, triton: bool) -> Tensor:
        ctx.save_for_backward(v, x)
        ctx.triton = triton
        return _impl(triton, "vandermonde_fwd")(v, x, L)

    @staticmethod
    def backward(ctx, g: Tensor):
        v, x = ctx.saved_tensors
        if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
            return None, None, None, None
        gv, gx = _impl(ctx.triton, "vandermonde_bwd")(g.contiguous(), v, x)
        return gv, gx, None, None


def _check(v: Tensor, w: Tensor, name: str) -> None:
    if not (v.is_complex() and w.is_complex()):
        raise ValueError(f"{name}: v and the nodes must be complex tensors, got {v.dtype} and {w.dtype}")
    if v.dim() < 2 or v.shape[-2:] != w.shape:
        raise ValueError(f"{name}: v [..., H, N] and [H, N] must agree, got {tuple(v.shape)} and {tuple(w.shape)}")


def cauchy(v: Tensor, z: Tensor, w: Tensor) -> Tensor:
    """``sum_n v_n/(z_k - w_n) + conj(v_n)/(z_k - conj(w_n))`` for ``v [..., H, N]``, ``z [K]``, ``w [H, N]``."""
    _check(v, w, "cauchy")
    lead = v.shape[:-2]
    dtype = torch.promote_types(v.dtype, w.dtype)
    v3 = v.to(dtype).reshape(-1, *w.shape).contiguous()
    out = _Cauchy.apply(v3, z.to(dtype).contiguous(), w.to(dtype).contiguous(), use_triton(v3, w))
    return out.reshape(*lead, w.shape[0], z.shape[0])


def log_vandermonde(v: Tensor, x: Tensor, L: int) -> Tensor:
    """``2 Re sum_n v_n exp(x_n l)`` for ``l < L``, ``v [..., H, N]``, ``x [H, N]`` -> ``[..., H, L]``."""
    _check(v, x, "log_vandermonde")
    lead = v.shape[:-2]
    dtype = torch.promote_types(v.dtype, x.dtype)
    v3 = v.to(dtype).reshape(-1, *x.shape).contiguous()
    out = _Vandermonde.apply(v3, x.to(dtype).contiguous(), int(L), use_triton(v3, x))
    return out.reshape(*lead, x.shape[0], L)
