"""Block-sparse causal attention: ``block_sparse_attention`` dispatches between the plain-torch reference
(:mod:`zoo.kernels.block_sparse_attention.reference`: the rule, masked SDPA) and the
flash-attention-style Triton forward/backward over the active blocks
(:mod:`zoo.kernels.block_sparse_attention.triton`, imported only when chosen).

Dispatch (:mod:`zoo.kernels.backend`): the Triton kernel for CUDA tensors, the reference otherwise;
``ZOO_BACKEND=torch`` forces the reference, ``ZOO_BACKEND=triton`` the kernel (CPU tensors under
``TRITON_INTERPRET=1``). No fallback: a call the kernel does not support (``block_size`` outside
``{16, 32, 64, 128}``, head dim > 128, float64) is a ``ValueError`` on the Triton path; pass CPU tensors or set
``ZOO_BACKEND=torch`` for the reference.
"""

from __future__ import annotations

from torch import Tensor

from zoo.kernels.backend import triton_module, use_triton
from zoo.kernels.block_sparse_attention.reference import block_sparse_attention_ref

__all__ = ["block_sparse_attention", "block_sparse_attention_ref"]


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    block_mask: Tensor,
    block_size: int,
    window: int | None = None,
    num_sink_tokens: int = 0,
    scale: float | None = None,
) -> Tensor:
    """q ``[B, H, T, D]``, k, v ``[B, Hkv, T, D]``, block_mask bool ``[Hkv or 1, nB, nB]`` (a layout of
    :mod:`zoo.layers.masks`, e.g. ``rule_layout``) -> o ``[B, H, T, D]``
    (the rule: :mod:`~zoo.kernels.block_sparse_attention.reference`), on the backend chosen as the module
    docstring says."""
    kw = dict(block_mask=block_mask, block_size=block_size, window=window, num_sink_tokens=num_sink_tokens,
              scale=scale)
    if use_triton(q):
        kernels = triton_module("zoo.kernels.block_sparse_attention.triton")
        if kernels is not None:
            return kernels.block_sparse_attention_triton(q, k, v, **kw)
    return block_sparse_attention_ref(q, k, v, **kw)
