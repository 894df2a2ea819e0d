"""Analytic FLOP counts (one multiply-add = 2 FLOPs; matmul-equivalent work only).

Elementwise work (RoPE, softmax exponentials, norms, gates, activations, decay factors) is not counted: these
counts are the dense linear algebra a perfect kernel has to do, so achieved FLOP/s is comparable with the
machine's GEMM FLOP/s.

* A mixer counts itself: :meth:`zoo.layers.base.Mixer.flops` (formulas in each mixer's docstring; pair counts of
  masked patterns come from the rules in :mod:`zoo.layers.masks`, tested against a brute-force enumeration).
* A model (``ZooForCausalLM``): the sum over its layers of the mixer's count plus the MLP (gated:
  ``3 x 2 T d i``, plain: ``2 x 2 T d i``), and the LM head ``2 T d V``; the embedding lookup is free.
* Backward = 2 x forward (gradients w.r.t. inputs and weights), so ``forward_backward = 3 x forward``.
* A kernel-level reference declares its own count (:class:`zoo.bench.adapters.KernelAdapter`).
"""

from __future__ import annotations

from typing import Any


def linear(tokens: int, d_in: int, d_out: int) -> int:
    return 2 * tokens * d_in * d_out


def mlp_flops(tokens: int, d_model: int, mlp: dict[str, Any]) -> int:
    """The block's MLP (:class:`zoo.layers.mlp.MLP`): gated (SwiGLU) has three projections, plain two."""
    return (3 if mlp.get("gated", True) else 2) * linear(tokens, d_model, mlp["intermediate_size"])


def model_flops(config: Any, *, T: int, context: int = 0, batch: int = 1) -> int:
    """Forward FLOPs of a ``ZooForCausalLM`` built from ``config`` over ``T`` new tokens after ``context``."""
    from zoo.registry import get_mixer

    d = config.d_model
    total = linear(batch * T, d, config.vocab_size)
    for i, layer in enumerate(config.layers):
        total += get_mixer(layer.mixer).flops(d, config.mixer_kwargs(i), T=T, context=context, batch=batch)
        if layer.mlp is not None:
            total += mlp_flops(batch * T, d, layer.mlp)
    return total


def with_backward(forward_flops: int) -> int:
    return 3 * forward_flops
