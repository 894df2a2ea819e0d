"""Mamba-2's chunked SSD scan: ``ssd_chunk_scan`` dispatches between the plain-torch reference
(:mod:`zoo.kernels.ssd.reference`, the math and all arguments) and the fused Triton kernels
(:mod:`zoo.kernels.ssd.triton`, imported only when chosen).

Dispatch (:mod:`zoo.kernels.backend`): the Triton kernel for CUDA tensors, the reference otherwise;
``ZOO_BACKEND=torch`` forces the reference, ``ZOO_BACKEND=triton`` the kernel (CPU tensors under
``TRITON_INTERPRET=1``). On the CPU a call without autograd, packed documents or the mitigations other than
``dA_offset`` runs the native forward (:mod:`zoo.kernels.ssd.cpu`, fp32) where it applies and builds
(``ZOO_NATIVE``). Fallback: the Triton kernel does not implement the state-collapse mitigations, so a call that
sets any of ``dA_offset``, ``state_norm_threshold``, ``chunk_offset``, ``renorm_mask`` or ``block_size`` runs the
reference whatever the backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from zoo.kernels.backend import triton_module, use_triton
from zoo.kernels.ssd.cpu import ssd_forward_native
from zoo.kernels.ssd.reference import ssd_chunk_scan_ref

__all__ = ["ssd_chunk_scan", "ssd_chunk_scan_ref"]

# arguments only the reference implements (a call setting one of them runs the reference)
REFERENCE_ONLY = ("dA_offset", "state_norm_threshold", "chunk_offset", "renorm_mask", "block_size")
# arguments the native CPU forward takes (a call setting another one runs the reference)
NATIVE_ARGS = {"D", "z", "initial_states", "dA_offset"}


def ssd_chunk_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, *, chunk_size: int,
                   **kwargs) -> tuple[Tensor, Tensor]:
    """``y [B, T, H, P]``, ``final_states [B, H, P, N]``: the arguments of
    :func:`~zoo.kernels.ssd.reference.ssd_chunk_scan_ref`, on the backend chosen as the module docstring says."""
    if use_triton(x) and all(kwargs.get(k) is None for k in REFERENCE_ONLY):
        kernels = triton_module("zoo.kernels.ssd.triton")
        if kernels is not None:
            call = {k: v for k, v in kwargs.items() if k not in REFERENCE_ONLY}  # those are None here
            return kernels.ssd_chunk_scan_triton(x, dt, A, B, C, chunk_size=chunk_size, **call)
    native = {k: v for k, v in kwargs.items() if k in NATIVE_ARGS}
    if (x.device.type == "cpu" and all(v is None for k, v in kwargs.items() if k not in NATIVE_ARGS)
            and not (torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad
                                                     for t in (x, dt, A, B, C, *native.values())))):
        out = ssd_forward_native(x, dt, A, B, C, chunk_size=chunk_size, **native)
        if out is not None:
            return out
    return ssd_chunk_scan_ref(x, dt, A, B, C, chunk_size=chunk_size, **kwargs)
