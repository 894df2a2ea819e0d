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

import math

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


def decode_step_(m, x: Tensor, state) -> Tensor:
    """One token through the Mamba-2 layer ``m`` (no padding, no autograd, no ``state_window``), the state updated
    in place: ``x [B, 1, d_model] -> [B, 1, d_model]``.

    The conv window rolls one slot and the conv is its multiply-sum with the taps; the SSM state is decayed in
    place (``mul_``) and takes the rank-1 input per group in place (``baddbmm_``); ``y = S C`` per group is one
    batched GEMV. The same math as the layer's reference step (``Mamba2._step``), which tests pin it to."""
    Bsz = x.shape[0]
    H, P, G, N = m.nheads, m.headdim, m.ngroups, m.d_state
    ssm = state.ssm_state  # [B, H, P, N], fp32 (fp64 stays fp64)
    acc = ssm.dtype
    zx = F.linear(x[:, 0], m.in_proj.weight, m.in_proj.bias)  # [B, d_in_proj]
    z0, x0, z, xBC, dt = zx.split([m.d_mlp, m.d_mlp, m.d_ssm, m.conv_dim, H], dim=-1)
    cs = state.conv_state  # [B, C, K]: the last K pre-conv inputs
    cs.copy_(cs.roll(-1, -1))
    cs[..., -1] = xBC
    xBC = (cs * m.conv1d.weight[:, 0]).sum(-1)  # [B, C]
    if m.conv1d.bias is not None:
        xBC = xBC.add_(m.conv1d.bias)
    xBC = F.silu(xBC, inplace=True)
    xs, Bm, Cm = xBC.to(acc).split([m.d_ssm, G * N, G * N], dim=-1)
    dt = F.softplus(dt.to(acc) + m.dt_bias.to(acc))  # [B, H]
    if m.dt_limit != (0.0, float("inf")):
        dt = dt.clamp(*m.dt_limit)
    if m.dt_scale != 1.0:
        dt = dt * m.dt_scale
    dA = dt * -torch.exp(m.A_log.to(acc))
    if m.decay_scale != 1.0:
        dA = dA + math.log(m.decay_scale)
    if m.input_scale != 1.0:
        Bm = Bm * m.input_scale
    dtx = xs.view(Bsz, H, P) * dt[..., None]  # [B, H, P]
    ssm.mul_(dA.exp_()[..., None, None])  # S = exp(dt A) S + dt x B^T
    Sg = ssm.view(Bsz * G, (H // G) * P, N)
    Sg.baddbmm_(dtx.view(Bsz * G, -1, 1), Bm.reshape(Bsz * G, 1, N))
    y = torch.bmm(Sg, Cm.reshape(Bsz * G, N, 1)).view(Bsz, H, P)
    D = m.D.to(acc)
    y = y.addcmul_(xs.view(Bsz, H, P), D.view(H, P) if m.D_has_hdim else D[:, None])
    thr = m._thresholds(ssm)
    if thr is not None:  # renormalise at every chunk_size-th real token (no host sync: a where on the scale)
        fire = (state.seen + 1) % m.chunk_size == 0
        scale = torch.clamp(thr.view(1, -1, 1, 1) / torch.linalg.vector_norm(ssm, dim=(-2, -1), keepdim=True)
                            .clamp_min(1e-30), max=1.0)
        ssm.mul_(torch.where(fire[:, None, None, None], scale, 1.0))
    state.seen.add_(1)
    y = y.view(Bsz, 1, m.d_ssm)
    if not m.rmsnorm:
        y = (y * F.silu(z.to(acc).view(Bsz, 1, m.d_ssm))).to(x.dtype)
    return m._out(y, z[:, None], z0[:, None], x0[:, None], x.dtype)
