"""Triton forward and backward of the fused gated RMSNorm; the math and the torch reference are in
:mod:`zoo.kernels.gated_rmsnorm.reference`.

Kernels: one program per (block of rows, group); the forward stores 1/rms per (row, group) in fp32; the backward
recomputes the rest and writes per-program partial sums of d weight / d bias, reduced in torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["gated_rmsnorm_triton"]


@triton.jit
def _gated_rmsnorm_fwd(
    x_ptr, z_ptr, w_ptr, b_ptr, y_ptr, rstd_ptr,
    M, D, GS, NG, eps, ROWS_PER_PROG,
    BLOCK: tl.constexpr, HAS_Z: tl.constexpr, HAS_B: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
):
    pid = tl.program_id(0)
    g = tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    mc = cols < GS
    ch = g * GS + cols
    w = tl.load(w_ptr + ch, mask=mc, other=0.0).to(tl.float32)
    if HAS_B:
        bb = tl.load(b_ptr + ch, mask=mc, other=0.0).to(tl.float32)
    row0 = pid * ROWS_PER_PROG
    for i in range(ROWS_PER_PROG):
        row = tl.cast(row0 + i, tl.int64)
        if row < M:
            off = row * D + ch
            x = tl.load(x_ptr + off, mask=mc, other=0.0).to(tl.float32)
            if HAS_Z:
                zz = tl.load(z_ptr + off, mask=mc, other=0.0).to(tl.float32)
                gate = zz * tl.sigmoid(zz)
                if not NORM_BEFORE_GATE:
                    x = x * gate
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / GS + eps)
            tl.store(rstd_ptr + row * NG + g, rstd)
            y = x * rstd * w
            if HAS_B:
                y += bb
            if HAS_Z:
                if NORM_BEFORE_GATE:
                    y = y * gate
            tl.store(y_ptr + off, y.to(y_ptr.dtype.element_ty), mask=mc)


@triton.jit
def _gated_rmsnorm_bwd(
    x_ptr, z_ptr, w_ptr, b_ptr, rstd_ptr, dy_ptr, dx_ptr, dz_ptr, dw_ptr, db_ptr,
    M, D, GS, NG, ROWS_PER_PROG,
    BLOCK: tl.constexpr, HAS_Z: tl.constexpr, HAS_B: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
):
    pid = tl.program_id(0)
    g = tl.program_id(1)
    cols = tl.arange(0, BLOCK)
    mc = cols < GS
    ch = g * GS + cols
    w = tl.load(w_ptr + ch, mask=mc, other=0.0).to(tl.float32)
    if HAS_B:
        bb = tl.load(b_ptr + ch, mask=mc, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    db = tl.zeros((BLOCK,), dtype=tl.float32)
    row0 = pid * ROWS_PER_PROG
    for i in range(ROWS_PER_PROG):
        row = tl.cast(row0 + i, tl.int64)
        if row < M:
            off = row * D + ch
            x = tl.load(x_ptr + off, mask=mc, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + off, mask=mc, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + row * NG + g)
            if HAS_Z:
                zz = tl.load(z_ptr + off, mask=mc, other=0.0).to(tl.float32)
                sg = tl.sigmoid(zz)
                gate = zz * sg
                dgate = sg * (1.0 + zz * (1.0 - sg))
                if NORM_BEFORE_GATE:
                    xhat = x * rstd
                    y0 = xhat * w
                    if HAS_B:
                        y0 += bb
                    tl.store(dz_ptr + off, (dy * y0 * dgate).to(dz_ptr.dtype.element_ty), mask=mc)
                    dy = dy * gate
                else:
                    u = x * gate
                    xhat = u * rstd
            else:
                xhat = x * rstd
            dw += dy * xhat
            db += dy
            dxhat = dy * w
            du = rstd * (dxhat - xhat * (tl.sum(dxhat * xhat, axis=0) / GS))
            if HAS_Z:
                if NORM_BEFORE_GATE:
                    dx = du
                else:
                    tl.store(dz_ptr + off, (du * x * dgate).to(dz_ptr.dtype.element_ty), mask=mc)
                    dx = du * gate
            else:
                dx = du
            tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mc)
    tl.store(dw_ptr + pid * D + ch, dw, mask=mc)
    if HAS_B:
        tl.store(db_ptr + pid * D + ch, db, mask=mc)


def _launch_shape(M: int, dev: torch.device) -> tuple[int, int]:
    target = 4 * torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 4
    rows_per_prog = max(1, triton.cdiv(M, target))
    return triton.cdiv(M, rows_per_prog), rows_per_prog


class GatedRMSNormTritonFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, z, bias, eps, group_size, norm_before_gate):
        shape = x.shape
        D = shape[-1]
        x2 = x.reshape(-1, D).contiguous()
        z2 = z.reshape(-1, D).contiguous() if z is not None else None
        M, NG = x2.shape[0], D // group_size
        y = torch.empty_like(x2)
        rstd = torch.empty(M, NG, device=x.device, dtype=torch.float32)
        n_prog, rpp = _launch_shape(M, x.device)
        block = triton.next_power_of_2(group_size)
        _gated_rmsnorm_fwd[(n_prog, NG)](
            x2, z2, weight, bias, y, rstd, M, D, group_size, NG, eps, rpp,
            BLOCK=block, HAS_Z=z is not None, HAS_B=bias is not None, NORM_BEFORE_GATE=norm_before_gate,
            num_warps=min(16, max(1, block // 256)),
        )
        ctx.save_for_backward(x2, z2, weight, bias, rstd)
        ctx.meta = (shape, group_size, norm_before_gate)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, z2, weight, bias, rstd = ctx.saved_tensors
        shape, group_size, norm_before_gate = ctx.meta
        M, D = x2.shape
        NG = D // group_size
        dy2 = dy.reshape(-1, D).contiguous()
        dx = torch.empty_like(x2)
        dz = torch.empty_like(z2) if z2 is not None else None
        n_prog, rpp = _launch_shape(M, x2.device)
        dw = torch.empty(n_prog, D, device=x2.device, dtype=torch.float32)
        db = torch.empty(n_prog, D, device=x2.device, dtype=torch.float32) if bias is not None else None
        block = triton.next_power_of_2(group_size)
        _gated_rmsnorm_bwd[(n_prog, NG)](
            x2, z2, weight, bias, rstd, dy2, dx, dz, dw, db, M, D, group_size, NG, rpp,
            BLOCK=block, HAS_Z=z2 is not None, HAS_B=bias is not None, NORM_BEFORE_GATE=norm_before_gate,
            num_warps=min(16, max(1, block // 256)),
        )
        return (
            dx.view(shape),
            dw.sum(0).to(weight.dtype),
            dz.view(shape) if dz is not None else None,
            db.sum(0).to(bias.dtype) if bias is not None else None,
            None,
            None,
            None,
        )


def gated_rmsnorm_triton(
    x: Tensor,
    weight: Tensor,
    z: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    group_size: int | None = None,
    norm_before_gate: bool = False,
) -> Tensor:
    """Triton gated RMSNorm; same arguments and result as :func:`gated_rmsnorm_ref`."""
    d = x.shape[-1]
    group_size = group_size or d
    if d % group_size:
        raise ValueError(f"group_size {group_size} must divide the last dimension {d}")
    if weight.shape != (d,) or (bias is not None and bias.shape != (d,)):
        raise ValueError(f"weight/bias must be [{d}], got {tuple(weight.shape)}"
                         f"{'' if bias is None else ', ' + str(tuple(bias.shape))}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"z must have x's shape {tuple(x.shape)}, got {tuple(z.shape)}")
    return GatedRMSNormTritonFn.apply(
        x, weight.contiguous(), z, bias.contiguous() if bias is not None else None, eps, group_size,
        norm_before_gate,
    )


