"""Gated RMSNorm (Mamba-2's ``RMSNormGated``): ``gated_rmsnorm`` dispatches between the plain-torch reference
(:mod:`zoo.kernels.gated_rmsnorm.reference`, the math) and the fused Triton forward/backward
(:mod:`zoo.kernels.gated_rmsnorm.triton`, imported only when chosen).

Dispatch (:mod:`zoo.kernels.backend`): the Triton kernel for CUDA tensors, the reference otherwise;
``ZOO_BACKEND=torch`` forces the reference, ``ZOO_BACKEND=triton`` the kernel (CPU tensors under
``TRITON_INTERPRET=1``). No fallback: every call the reference takes, the kernel takes. On the torch path a call
without autograd (no tensor requiring grad, or grad mode off) runs
:func:`~zoo.kernels.gated_rmsnorm.reference.gated_rmsnorm_inference` (the same math in one buffer, in place), or
on the CPU in fp32 its one-pass native version (:func:`zoo.kernels.elementwise_cpu.gated_rmsnorm_native`,
``ZOO_NATIVE``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from zoo.kernels.backend import triton_module, use_triton
from zoo.kernels.elementwise_cpu import gated_rmsnorm_native
from zoo.kernels.gated_rmsnorm.reference import gated_rmsnorm_inference, gated_rmsnorm_ref

__all__ = ["gated_rmsnorm", "gated_rmsnorm_ref"]


def gated_rmsnorm(
    x: Tensor,
    weight: Tensor,
    z: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    group_size: int | None = None,
    norm_before_gate: bool = False,
) -> Tensor:
    """The arguments and result of :func:`~zoo.kernels.gated_rmsnorm.reference.gated_rmsnorm_ref`, on the backend
    chosen as the module docstring says."""
    kw = dict(bias=bias, eps=eps, group_size=group_size, norm_before_gate=norm_before_gate)
    if use_triton(x):
        kernels = triton_module("zoo.kernels.gated_rmsnorm.triton")
        if kernels is not None:
            return kernels.gated_rmsnorm_triton(x, weight, z, **kw)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, z, bias))):
        out = gated_rmsnorm_native(x, weight, z, **kw) if x.device.type == "cpu" else None
        return gated_rmsnorm_inference(x, weight, z, **kw) if out is None else out
    return gated_rmsnorm_ref(x, weight, z, **kw)
