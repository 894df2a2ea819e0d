"""InfLLM-v2 kernels: fused block scoring (stage 1 + GQA-group reduction + max pooling) and attention over
per-query selected blocks (stage 2, forward and backward). ``reference.py`` holds the plain-torch versions (the CPU
path and the test oracle), ``triton.py`` the fused kernels (imported lazily); the functions here dispatch with
:func:`zoo.kernels.backend.use_triton` (Triton on CUDA tensors; ``ZOO_BACKEND=torch|triton`` overrides), except
for shapes the kernels do not take (a block size or ``block_size / kernel_stride`` that is not a power of two, fp64,
head dim > 256), which always run the reference."""

from __future__ import annotations

import torch
from torch import Tensor

from zoo.kernels.backend import use_triton
from zoo.kernels.infllmv2.cpu import select_cpu, sparse_attention_cpu
from zoo.kernels.infllmv2.reference import (
    block_scores_ref,
    compress_keys,
    select_blocks,
    sparse_attention_ref,
    visible_windows,
)


def _pow2(n: int) -> bool:
    return n > 0 and not n & (n - 1)


__all__ = ["block_scores", "sparse_attention", "compress_keys", "select_blocks", "visible_windows",
           "block_scores_ref", "sparse_attention_ref", "select_cpu", "sparse_attention_cpu"]


def block_scores(q: Tensor, c1: Tensor, c2: Tensor | None, v1: Tensor, e1: Tensor, v2: Tensor | None, *,
                 block_size: int, kernel_stride: int, num_blocks: int, scale: float,
                 score_dtype: torch.dtype | None = None) -> Tensor:
    """Block scores ``[B, Hkv, Tq, num_blocks]`` (see :func:`~zoo.kernels.infllmv2.reference.block_scores_ref`)."""
    kw = dict(block_size=block_size, kernel_stride=kernel_stride, num_blocks=num_blocks, scale=scale,
              score_dtype=score_dtype)
    st = block_size // kernel_stride
    if use_triton(q, c1) and _pow2(st) and q.dtype != torch.float64:
        from zoo.kernels.infllmv2.triton import block_scores_triton

        return block_scores_triton(q, c1, c2, v1, e1, v2, **kw)
    return block_scores_ref(q, c1, c2, v1, e1, v2, **kw)


def sparse_attention(q: Tensor, k: Tensor, v: Tensor, qpos: Tensor, idx: Tensor, *, block_size: int,
                     scale: float | None = None, query_tile: int | None = None) -> Tensor:
    """Attention over the selected blocks (see :func:`~zoo.kernels.infllmv2.reference.sparse_attention_ref`). Without
    Triton: ``query_tile=None`` and several queries -> the block-stationary CPU schedule
    (:func:`~zoo.kernels.infllmv2.cpu.sparse_attention_cpu`); one query, or an explicit ``query_tile`` (1: per query,
    C: tiles of C queries) -> the reference's schedules."""
    if use_triton(q, k, v) and _pow2(block_size) and q.dtype != torch.float64 and q.shape[-1] <= 256:
        from zoo.kernels.infllmv2.triton import sparse_attention_triton

        return sparse_attention_triton(q, k, v, qpos, idx, block_size=block_size, scale=scale)
    if query_tile is None and q.shape[2] > 1:
        return sparse_attention_cpu(q, k, v, qpos, idx, block_size=block_size, scale=scale)
    return sparse_attention_ref(q, k, v, qpos, idx, block_size=block_size, scale=scale, query_tile=query_tile or 1)
