"""Normalisations: RMSNorm (Llama / Mamba), LayerNorm, and the group-wise gated RMSNorm of Mamba-2."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.kernels.gated_rmsnorm import gated_rmsnorm
from zoo.kernels.gated_rmsnorm.reference import rms_scale


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x^2) + eps) * weight``, computed in fp32 (fp64 stays fp64) and cast back (as
    transformers' Llama)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype, w = x.dtype, self.weight
        if (dtype == torch.float32 or dtype == torch.float64) and w.dtype == dtype and not (
                torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)):
            return _rms_inference(x, w, self.eps)
        x = x.to(torch.promote_types(dtype, torch.float32))
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def _rms_inference(x: Tensor, w: Tensor, eps: float) -> Tensor:
    """:class:`RMSNorm` of an fp32 / fp64 ``x`` with a weight of its dtype, without autograd: five kernels
    (:func:`~zoo.kernels.gated_rmsnorm.reference.rms_scale`, then two multiplies) instead of the reference's eight
    calls. The same math (``(x * rsqrt(mean(x^2) + eps)) * w``) to rounding; the decode step of every layer runs it
    twice."""
    return (x * rms_scale(x, eps)).mul_(w)


class GatedRMSNorm(nn.Module):
    """Mamba-2's ``RMSNormGated``: ``rmsnorm_group(x * silu(z)) * weight`` (or gate after the norm).

    The mean square is taken over groups of ``group_size`` channels (``d_inner // ngroups``), in fp32 (fp64 stays
    fp64).
    """

    def __init__(self, dim: int, eps: float = 1e-5, group_size: int | None = None, norm_before_gate: bool = False):
        super().__init__()
        self.eps = eps
        self.group_size = group_size or dim
        self.norm_before_gate = norm_before_gate
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        return gated_rmsnorm(x, self.weight, z, eps=self.eps, group_size=self.group_size,
                             norm_before_gate=self.norm_before_gate)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters) computed in fp32 (fp64 stays fp64) and cast back to the input's dtype, like
    :class:`RMSNorm`: it accepts an fp32 residual (``residual_in_fp32``) in a low-precision model."""

    def forward(self, x: Tensor) -> Tensor:
        dtype = torch.promote_types(torch.promote_types(x.dtype, torch.float32), self.weight.dtype)
        return F.layer_norm(x.to(dtype), self.normalized_shape, self.weight.to(dtype),
                            None if self.bias is None else self.bias.to(dtype), self.eps).to(x.dtype)


def make_norm(kind: str, dim: int, eps: float) -> nn.Module:
    if kind == "rmsnorm":
        return RMSNorm(dim, eps)
    if kind == "layernorm":
        return LayerNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r}; allowed: ['rmsnorm', 'layernorm']")
