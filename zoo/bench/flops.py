"""Analytic FLOP counts (one multiply-add = 2 FLOPs; matmul-equivalent work only).

Elementwise work (RoPE, softmax exponentials, norms, gates, activations, the SSM decay factors) is not counted:
these formulas are the dense linear algebra a perfect kernel has to do, so achieved FLOP/s is comparable with
the machine's GEMM FLOP/s. ``B`` batch, ``T`` tokens, ``d`` d_model.

* Linear ``in -> out`` over ``N`` tokens: ``2 N in out``.
* Attention core, ``H`` query heads of size ``D``: ``QK^T`` and ``PV`` each cost ``2 D`` per (query, key) pair
  attended, so ``4 B H D P`` with ``P`` the number of attended pairs of one head (summed over heads when the
  pattern differs per head). Causal full attention: ``P = T (T + 1) / 2``; one decode token at context ``L``
  (``L`` keys including itself): ``P = L``. Sparse patterns count only the pairs they keep (``pairs_*`` below).
* Mamba-2 (SSD, chunk size ``Q``, ``H`` heads of size ``P``, state ``N``, ``G`` groups, ``d_inner = H P``)::

      in_proj  2 T d (2 d_inner + 2 G N + H)      conv1d  2 T (d_inner + 2 G N) d_conv
      SSD      2 T (Q G N  +  Q H P  +  2 H P N)  (C B^T within a chunk, its (masked) product with X,
                                                   B^T X into chunk states, C h out of the states)
      out_proj 2 T d_inner d
  One decode step: the projections and conv for ``T = 1`` plus ``4 H P N`` (state update ``dt B x^T`` and the
  read-out ``C h``).
* Backward = 2 x forward (gradients w.r.t. inputs and weights), so ``forward_backward = 3 x forward``.
* Model (``ZooForCausalLM``-style): the sum of its layers (mixer + gated MLP ``2 T d i * 3``) and the LM head
  ``2 T d V``; the embedding lookup is free.
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def linear(tokens: int, d_in: int, d_out: int) -> int:
    return 2 * tokens * d_in * d_out


# ---------------------------------------------------------------------------------------------- attended pairs
def pairs_causal(T: int) -> int:
    """Pairs ``(i, j)``, ``j <= i < T``."""
    return T * (T + 1) // 2


def pairs_sliding_window(T: int, window: int, num_sink_tokens: int = 0) -> int:
    """Query ``i`` sees keys ``i - window < j <= i`` (the window includes the query) plus the sinks
    ``j < num_sink_tokens``."""
    total = 0
    for i in range(T):
        lo = max(0, i - window + 1)
        total += i + 1 - lo + min(num_sink_tokens, lo)
    return total


def pairs_block_diagonal(T: int, block_size: int) -> int:
    """Causal attention inside consecutive blocks of ``block_size`` tokens only."""
    full, rest = divmod(T, block_size)
    return full * pairs_causal(block_size) + pairs_causal(rest)


def block_sparse_head_mask(n_blocks: int, local_blocks: int, vertical_stride: int, head: int,
                           head_sliding_offset: int) -> list[list[bool]]:
    """Block mask of one head (Phi-3-small / LongGen / vLLM ``get_sparse_attn_mask``): query block ``qb`` sees key
    block ``kb <= qb`` if ``qb - kb < local_blocks`` (local) or
    ``(kb + head * head_sliding_offset + 1) % vertical_stride == 0`` (vertical stripes, shifted per head)."""
    return [[kb <= qb and (qb - kb < local_blocks or (kb + head * head_sliding_offset + 1) % vertical_stride == 0)
             for kb in range(n_blocks)] for qb in range(n_blocks)]


def pairs_block_sparse(T: int, num_heads: int, block_size: int, local_blocks: int, vertical_stride: int,
                       homo_head: bool = False, head_sliding_offset: int | None = None) -> int:
    """Attended pairs summed over heads. Within a kept block pair every causal token pair counts (diagonal blocks
    are causal). ``head_sliding_offset`` defaults to ``max(1, vertical_stride // num_heads)``; ``homo_head``: every
    head uses head 0's pattern."""
    if head_sliding_offset is None:
        head_sliding_offset = max(1, vertical_stride // num_heads)
    n_blocks = math.ceil(T / block_size)
    sizes = [min(block_size, T - b * block_size) for b in range(n_blocks)]
    total = 0
    heads: Iterable[int] = [0] * num_heads if homo_head else range(num_heads)
    cache: dict[int, int] = {}
    for h in heads:
        if h not in cache:
            mask = block_sparse_head_mask(n_blocks, local_blocks, vertical_stride, h, head_sliding_offset)
            cache[h] = sum((pairs_causal(sizes[qb]) if qb == kb else sizes[qb] * sizes[kb])
                           for qb in range(n_blocks) for kb in range(qb + 1) if mask[qb][kb])
        total += cache[h]
    return total


# ---------------------------------------------------------------------------------------------- layers
def attention_projections(tokens: int, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int) -> int:
    return (linear(tokens, d_model, num_heads * head_dim) + 2 * linear(tokens, d_model, num_kv_heads * head_dim)
            + linear(tokens, num_heads * head_dim, d_model))


def attention_core(batch: int, num_heads: int, head_dim: int, pairs_per_head: int) -> int:
    """``pairs_per_head``: pairs of one head, times ``num_heads`` inside (use ``heads=1`` with a summed count)."""
    return 4 * batch * num_heads * head_dim * pairs_per_head


def mamba2_layer(tokens: int, d_model: int, *, d_state: int, d_conv: int, expand: int, headdim: int, ngroups: int,
                 chunk_size: int, decode: bool = False) -> int:
    d_inner = expand * d_model
    H = d_inner // headdim
    conv_dim = d_inner + 2 * ngroups * d_state
    proj = linear(tokens, d_model, 2 * d_inner + 2 * ngroups * d_state + H) + linear(tokens, d_inner, d_model)
    conv = 2 * tokens * conv_dim * d_conv
    if decode:
        ssd = tokens * 4 * H * headdim * d_state
    else:
        Q = chunk_size
        ssd = 2 * tokens * (Q * ngroups * d_state + Q * H * headdim + 2 * H * headdim * d_state)
    return proj + conv + ssd


def gated_mlp(tokens: int, d_model: int, intermediate: int) -> int:
    return 3 * linear(tokens, d_model, intermediate)


def with_backward(forward_flops: int) -> int:
    return 3 * forward_flops
