"""Torch compute of the Mamba-2 mixer's CPU fast paths, each pinned by tests to the plain path it replaces.

* :func:`causal_conv` — the causal depthwise conv (+ bias, + SiLU) over ``[B, T, C]`` continuing ``K - 1`` earlier
  inputs. :func:`causal_conv_ref` is the plain autograd version (also the one that honours ``seq_idx``);
  :class:`_CausalConvSiLU` computes the same with one output buffer accumulated in place (``K`` passes, no
  concatenation, no zero-filled slice gradients) and a hand-written backward (the transposed conv, the per-tap
  weight dots, the bias sum).
* :func:`decode_step_` — one token of the recurrence written into the state in place (no per-token allocation of the
  ``[B, H, P, N]`` state): ``S <- exp(dt A) S + dt x B^T``, ``y = S C + D x``; the conv as a multiply-sum over the
  rolling window.

Shapes: ``x [B, T, C]``, ``prev [B, K - 1, C]`` (the inputs before ``x``, oldest first), conv weight ``w [K, C]``
(tap ``k`` multiplies input ``t - (K - 1) + k``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def causal_conv_ref(x: Tensor, prev: Tensor | None, w: Tensor, bias: Tensor | None,
                    seq_idx: Tensor | None = None) -> Tensor:
    """``out_t = bias + sum_k w[k] x_{t - (K-1) + k}`` with ``x_{<0}`` from ``prev`` (zeros when ``None``); a tap
    reads only inputs of the same document (``seq_idx [B, T]``). Plain autograd ops."""
    K, T = w.shape[0], x.shape[1]
    if prev is None:
        prev = x.new_zeros(x.shape[0], K - 1, x.shape[2])
    full = torch.cat([prev, x], dim=1)  # [B, K-1+T, C]
    seq = None if seq_idx is None else torch.cat([seq_idx[:, :1].expand(-1, K - 1), seq_idx], dim=1)
    out = full[:, K - 1:] * w[K - 1]
    for k in range(K - 1):  # tap k reads input t - (K-1) + k, only from the same document
        tap = full[:, k:k + T]
        if seq is not None:
            tap = tap * (seq[:, k:k + T] == seq_idx)[..., None].to(tap.dtype)
        out = out.addcmul(tap, w[k])
    if bias is not None:
        out = out + bias
    return out


def _conv_forward(x: Tensor, prev: Tensor | None, w: Tensor, bias: Tensor | None) -> Tensor:
    """The conv into one buffer: ``bias + w[K-1] x`` then each earlier tap added in place on shifted slices."""
    K, T = w.shape[0], x.shape[1]
    out = torch.addcmul(bias, x, w[K - 1]) if bias is not None else x * w[K - 1]
    for s in range(1, K):  # tap K-1-s reads input t - s
        if s < T:
            out[:, s:].addcmul_(x[:, :T - s], w[K - 1 - s])
        if prev is not None:  # outputs t < s read prev[K-1+t-s]
            n = min(s, T)
            out[:, :n].addcmul_(prev[:, K - 1 - s:K - 1 - s + n], w[K - 1 - s])
    return out


class _CausalConvSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, prev: Tensor | None, w: Tensor, bias: Tensor | None,  # type: ignore[override]
                activation: bool) -> Tensor:
        pre = _conv_forward(x, prev, w, bias)
        ctx.activation = activation
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, prev, w, pre if activation else None)
        return F.silu(pre) if activation else pre

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy: Tensor):  # type: ignore[override]
        x, prev, w, pre = ctx.saved_tensors
        K, T = w.shape[0], x.shape[1]
        g = torch.ops.aten.silu_backward(gy, pre) if ctx.activation else gy  # d/d(pre-activation)
        need_x, need_prev, need_w, need_b = ctx.needs_input_grad[:4]
        gx = gprev = gw = gb = None
        if need_x:  # the transposed conv: x_u feeds out_{u+s} through w[K-1-s]
            gx = g * w[K - 1]
            for s in range(1, min(K, T)):
                gx[:, :T - s].addcmul_(g[:, s:], w[K - 1 - s])
        if need_prev and prev is not None:
            gprev = torch.zeros_like(prev)
            for s in range(1, K):
                n = min(s, T)
                gprev[:, K - 1 - s:K - 1 - s + n].addcmul_(g[:, :n], w[K - 1 - s])
        if need_w:
            dims = (0, 1)
            gw = torch.empty_like(w)
            gw[K - 1] = (g * x).sum(dims)
            for s in range(1, K):
                acc = (g[:, s:] * x[:, :T - s]).sum(dims) if s < T else torch.zeros_like(w[0])
                if prev is not None:
                    n = min(s, T)
                    acc = acc + (g[:, :n] * prev[:, K - 1 - s:K - 1 - s + n]).sum(dims)
                gw[K - 1 - s] = acc
        if need_b and ctx.has_bias:
            gb = g.sum((0, 1))
        return gx, gprev, gw, gb, None


def causal_conv(x: Tensor, prev: Tensor | None, w: Tensor, bias: Tensor | None, *, activation: bool = True,
                seq_idx: Tensor | None = None) -> Tensor:
    """``silu(causal_conv_ref(x, prev, w, bias))`` (without the SiLU when ``activation`` is False): the fused
    path, or the plain one when ``seq_idx`` is given."""
    if seq_idx is not None:
        out = causal_conv_ref(x, prev, w, bias, seq_idx)
        return F.silu(out) if activation else out
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, prev, w, bias))):
        out = _conv_forward(x, prev, w, bias)  # no autograd: the activation in place too
        return F.silu(out, inplace=True) if activation else out
    return _CausalConvSiLU.apply(x, prev, w, bias, activation)
