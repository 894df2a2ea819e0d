"""Gated RMSNorm (Mamba-2's ``RMSNormGated``) in plain torch: the CPU path and the test oracle.

Per row of ``d`` channels split into groups of ``group_size`` channels (mean of squares per group, in fp32)::

    norm_before_gate=False (Mamba-2 default):  u = x * silu(z);  y = u / sqrt(mean_g(u^2) + eps) * weight (+ bias)
    norm_before_gate=True:                      y = (x / sqrt(mean_g(x^2) + eps) * weight (+ bias)) * silu(z)

``z=None`` gives a plain group RMSNorm. Output in x.dtype; computed in fp32 (fp64 for fp64 input).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gated_rmsnorm_inference", "gated_rmsnorm_ref", "rms_scale"]


_EPS: dict[tuple[float, torch.dtype, torch.device], Tensor] = {}


def rms_scale(x: Tensor, eps: float | Tensor) -> Tensor:
    """``rsqrt(mean(x^2) + eps)`` over the last axis, ``[..., 1]`` (for inference: ends in place): the mean square
    from ``vector_norm`` (no squared copy of ``x``), ``eps`` added by ``addcmul`` (a float ``eps`` becomes a 0-d
    tensor of ``x``'s dtype and device, made once per triple). Three kernels; the inference norms share it."""
    n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    if not isinstance(eps, Tensor):
        key = (eps, n.dtype, n.device)
        eps = _EPS.get(key)
        if eps is None:
            eps = _EPS[key] = torch.tensor(key[0], dtype=n.dtype, device=n.device)
    return torch.addcmul(eps, n, n, value=1.0 / x.shape[-1]).rsqrt_()


def gated_rmsnorm_ref(
    x: Tensor,
    weight: Tensor,
    z: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    group_size: int | None = None,
    norm_before_gate: bool = False,
) -> Tensor:
    """Plain-torch reference (mamba_ssm ``rms_norm_ref`` semantics: fp32 compute, weight applied in fp32; fp64
    inputs are computed in fp64)."""
    dtype = x.dtype
    acc = torch.promote_types(dtype, torch.float32)
    d = x.shape[-1]
    group_size = group_size or d
    x = x.to(acc)
    if z is not None and not norm_before_gate:
        x = x * F.silu(z.to(acc))
    xg = x.unflatten(-1, (d // group_size, group_size))
    out = (xg * torch.rsqrt(xg.pow(2).mean(-1, keepdim=True) + eps)).flatten(-2) * weight.to(acc)
    if bias is not None:
        out = out + bias.to(acc)
    if z is not None and norm_before_gate:
        out = out * F.silu(z.to(acc))
    return out.to(dtype)


def gated_rmsnorm_inference(
    x: Tensor,
    weight: Tensor,
    z: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    group_size: int | None = None,
    norm_before_gate: bool = False,
) -> Tensor:
    """:func:`gated_rmsnorm_ref` without autograd (the CPU path of inference): one buffer updated in place, the
    mean of squares from ``vector_norm`` (no squared copy); same arguments and result (to rounding)."""
    dtype = x.dtype
    acc = torch.promote_types(dtype, torch.float32)
    d = x.shape[-1]
    group_size = group_size or d
    if z is not None and not norm_before_gate:
        u = F.silu(z.to(acc)).mul_(x)
    else:
        u = x.to(acc, copy=True)
    ug = u.unflatten(-1, (d // group_size, group_size))
    ug.mul_(rms_scale(ug, eps))
    u.mul_(weight.to(acc))
    if bias is not None:
        u.add_(bias.to(acc))
    if z is not None and norm_before_gate:
        u.mul_(F.silu(z.to(acc)))
    return u.to(dtype)
