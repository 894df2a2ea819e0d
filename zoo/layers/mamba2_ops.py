"""Torch compute of the Mamba-2 mixer's CPU fast paths, each pinned by tests to the plain path it replaces.

* :func:`causal_conv` — the causal depthwise conv (+ bias, + SiLU) over ``[B, T, C]`` continuing ``K - 1`` earlier
  inputs. :func:`causal_conv_ref` is the plain autograd version (also the one that honours ``seq_idx``);
  :class:`_CausalConvSiLU` computes the same with one output buffer accumulated in place (``K`` passes, no
  concatenation, no zero-filled slice gradients) and a hand-written backward (the transposed conv, the per-tap
  weight dots, the bias sum). :func:`layer_conv` applies it with a layer's weights (``Mamba2._conv``).
* :func:`decode_step_` — one token of the recurrence written into the state in place (no per-token allocation of the
  ``[B, H, P, N]`` state): ``S <- exp(dt A) S + dt x B^T``, ``y = S C + D x``; the conv as a multiply-sum over the
  rolling window. About 35 calls per token (72 aten events with the nested ones; the step before issue 17: 130): what
  the step derives from the parameters comes from a :class:`DecodePlan` cached on the layer, the state's views from a
  cache on the state.
  Measured on the 2-core CPU, most of what a step costs beyond its two GEMVs in a multi-layer model is memory: the
  ``[B, H, P, N]`` state comes back from DRAM every token, and every small op after a GEMV starts with cold caches
  (the step fused by ``torch.compile`` measured no faster in the 24-layer model, one thread: so there is no compiled
  variant).
* :func:`tiled_forward` — on the CPU, a parallel forward / prefill (unpadded, unpacked, no mitigation) longer than
  ``Mamba2.tile_len`` runs in tiles of that many tokens (the conv window and the SSM state carried between them), so
  that the elementwise passes over ``[tile, d_in_proj]`` stay in cache; with autograd and ``tile_checkpoint`` each
  tile's inner part (:func:`_tile_mix`) is recomputed in the backward (activation memory of one tile).

Shapes: ``x [B, T, C]``, ``prev [B, K - 1, C]`` (the inputs before ``x``, oldest first), conv weight ``w [K, C]``
(tap ``k`` multiplies input ``t - (K - 1) + k``).
"""

from __future__ import annotations

import ctypes
import math
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor

import zoo.kernels.ssd as ssd_kernels
from zoo.kernels import native
from zoo.kernels.elementwise_cpu import causal_conv_native
from zoo.kernels.gated_rmsnorm.reference import rms_scale
from zoo.kernels.ssd import ssd_chunk_scan
from zoo.layers.mamba2_paths import thresholds


def causal_conv_ref(x: Tensor, prev: Tensor | None, w: Tensor, bias: Tensor | None,
                    seq_idx: Tensor | None = None, prev_seq: Tensor | None = None) -> Tensor:
    """``out_t = bias + sum_k w[k] x_{t - (K-1) + k}`` with ``x_{<0}`` from ``prev`` (zeros when ``None``); a tap
    reads only inputs of the same document (``seq_idx [B, T]``; the ``prev`` inputs belong to the documents
    ``prev_seq [B, K-1]``, default the first token's). Plain autograd ops."""
    K, T = w.shape[0], x.shape[1]
    if prev is None:
        prev = x.new_zeros(x.shape[0], K - 1, x.shape[2])
    full = torch.cat([prev, x], dim=1)  # [B, K-1+T, C]
    seq = None
    if seq_idx is not None:
        before = seq_idx[:, :1].expand(-1, K - 1) if prev_seq is None else prev_seq
        seq = torch.cat([before, seq_idx], dim=1)
    out = full[:, K - 1:] * w[K - 1]
    for k in range(K - 1):  # tap k reads input t - (K-1) + k, only from the same document
        tap = full[:, k:k + T]
        if seq is not None:
            tap = tap * (seq[:, k:k + T] == seq_idx)[..., None].to(tap.dtype)
        out = out.addcmul(tap, w[k])
    if bias is not None:
        out = out + bias
    return out


def _conv_forward(x: Tensor, prev: Tensor | None, w: Tensor, bias: Tensor | None, activation: bool = False,
                  rows: int = 128) -> Tensor:
    """The conv into one buffer, ``rows`` tokens at a time (a block's taps, and its SiLU in place with
    ``activation``, run while it is in cache): ``bias + w[K-1] x``, then each earlier tap added in place from the
    shifted inputs (``prev`` before the first token)."""
    K, T = w.shape[0], x.shape[1]
    dtype = torch.result_type(x, w) if bias is None else torch.promote_types(torch.result_type(x, w), bias.dtype)
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    for r0 in range(0, T, rows):
        r1 = min(T, r0 + rows)
        o = out[:, r0:r1]
        if bias is not None:
            torch.addcmul(bias, x[:, r0:r1], w[K - 1], out=o)
        else:
            torch.mul(x[:, r0:r1], w[K - 1], out=o)
        for s in range(1, K):  # tap K-1-s: output t reads input t - s (prev[K-1+t-s] for t < s)
            lo = max(r0, s)  # first output of the block that reads x
            if lo < r1:
                o[:, lo - r0:].addcmul_(x[:, lo - s:r1 - s], w[K - 1 - s])
            if prev is not None and r0 < s:
                n = min(s, r1) - r0
                o[:, :n].addcmul_(prev[:, K - 1 - s + r0:K - 1 - s + r0 + n], w[K - 1 - s])
        if activation:
            F.silu(o, inplace=True)
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
        out = causal_conv_native(x, prev, w, bias, activation)  # no autograd: one native pass (fp32, CPU)
        return _conv_forward(x, prev, w, bias, activation) if out is None else out  # or in place, per block
    return _CausalConvSiLU.apply(x, prev, w, bias, activation)


def layer_conv(m, xBC: Tensor, prev: Tensor | None, seq_idx: Tensor | None, prev_seq: Tensor | None = None
               ) -> Tensor:
    """``silu`` of the causal depthwise conv of the layer ``m`` on ``xBC [B, T, C]`` (+ bias) after ``prev [B, K-1,
    C]``, the ``K-1`` inputs before it (None: zeros). ``seq_idx [B, T]``: taps read only their own document; the
    ``prev`` tokens belong to the documents ``prev_seq [B, K-1]`` (None: the first token's).

    Computed as ``d_conv`` shifted multiply-adds in the ``[B, T, C]`` layout (no transposes)."""
    w = m.conv1d.weight[:, 0].t().to(xBC.dtype).contiguous()  # [K, C], contiguous: a strided tap runs ~2.5x slower
    bias = None if m.conv1d.bias is None else m.conv1d.bias.to(xBC.dtype)
    prev = None if prev is None else prev.to(xBC.dtype)
    if prev_seq is None:  # one buffer accumulated in place, a hand-written backward
        return causal_conv(xBC, prev, w, bias, seq_idx=seq_idx)
    return F.silu(causal_conv_ref(xBC, prev, w, bias, seq_idx, prev_seq))


class DecodePlan:
    """What a layer's decode step reads every token besides the in/out projection weights, derived once from the
    parameters in the step's dtypes instead of per token: ``negA = -exp(A_log)``; the in_proj bias with ``dt_bias``
    in the ``dt`` slots (the GEMV adds it; None when ``dt`` must be cast to the accumulation dtype first, then
    ``dt_bias`` is added after the cast); ``D`` per channel ``[d_ssm]``; the conv taps as ``[C, K]`` and
    ``[K, C]`` and the conv bias (in the conv state's dtype); the norm weight and ``eps``; the thresholds.

    ``key``: the dtypes, ``state_norm_threshold``, ``decay_scale`` and every source parameter's storage and version
    counter: an in-place update (optimizer step, ``load_state_dict``), ``.to()``, ``param.data = ...`` or a new
    threshold (``calibrate_state_norm``) makes a new plan."""

    __slots__ = ("key", "negA", "in_bias", "dt_bias", "D", "conv_w", "conv_wt", "conv_b", "norm_w", "eps",
                 "thresholds", "log_decay_scale", "native")


def _sources(m) -> tuple:
    """The parameters a plan derives from (through the module dicts: ``nn.Module.__getattr__`` is slow)."""
    mods, own = m._modules, m._parameters
    conv = mods["conv1d"]._parameters
    return (own["A_log"], own["dt_bias"], own["D"], conv["weight"], conv["bias"], mods["in_proj"]._parameters["bias"],
            mods["norm"]._parameters["weight"] if m.rmsnorm else None)


def _plan_key(m, conv_dtype: torch.dtype, acc: torch.dtype, sources: tuple) -> tuple:
    thr = m.state_norm_threshold
    key = [conv_dtype, acc, tuple(thr) if isinstance(thr, list) else thr, m.decay_scale]
    for t in sources:
        if t is not None:
            key += (t._version, t.data_ptr())
        else:
            key.append(None)
    return tuple(key)


def decode_plan(m, conv_dtype: torch.dtype, acc: torch.dtype, io_dtype: torch.dtype) -> DecodePlan:
    """``m``'s :class:`DecodePlan` for a step with these dtypes (conv state, accumulation, layer input): the cached
    one while its key holds, else a new one (cached on the module as a plain attribute: no state-dict entry)."""
    sources = _sources(m)
    key = _plan_key(m, conv_dtype, acc, sources) + (io_dtype,)
    plan = m.__dict__.get("_decode_plan")
    if plan is not None and plan.key == key:
        return plan
    A_log, dt_bias, D, conv_w, conv_b, in_b, norm_w = (None if t is None else t.detach() for t in sources)
    H, P = m.nheads, m.headdim
    plan = DecodePlan()
    plan.key = key
    with torch.no_grad():
        plan.negA = -torch.exp(A_log.to(acc))
        plan.dt_bias = dt_bias.to(acc)
        plan.in_bias = None
        if io_dtype == acc:  # dt leaves the GEMV in the accumulation dtype: the GEMV adds dt_bias
            n_in = m._modules["in_proj"].out_features
            bias = torch.zeros(n_in, dtype=acc, device=A_log.device) if in_b is None else in_b.to(acc, copy=True)
            bias[n_in - H:] += plan.dt_bias
            plan.in_bias = bias
        plan.D = D.to(acc) if m.D_has_hdim else D.to(acc).repeat_interleave(P)  # [d_ssm]
        plan.conv_w = conv_w[:, 0].to(conv_dtype).contiguous()  # [C, K]
        plan.conv_wt = plan.conv_w.t().contiguous()  # [K, C]
        plan.conv_b = None if conv_b is None else conv_b.to(conv_dtype)
        plan.norm_w = None if norm_w is None else norm_w.to(acc)
        plan.eps = None if norm_w is None else torch.tensor(m._modules["norm"].eps, dtype=acc, device=A_log.device)
        thr = thresholds(m, plan.negA)
        plan.thresholds = None if thr is None else thr.view(1, H, 1, 1).clone()
        plan.log_decay_scale = math.log(m.decay_scale)
        plan.native = None  # the fused step's library and fixed arguments, looked up on the first step
    m.__dict__["_decode_plan"] = plan
    return plan


def state_views(m, state) -> tuple:
    """``(ssm, conv, S [B G, hg P, N], window [B, K, C] or None)``: the state's views the step writes through, made
    once per pair of state tensors (cached on the state; a reorder or prefill that replaces a tensor makes new ones).
    ``window`` is the conv state seen as ``[B, K, C]`` when that is its memory layout (``init_state`` and the
    prefills leave it so): the shift is then a copy of contiguous rows and the taps reduce over the outer axis."""
    ssm, cs = state.ssm_state, state.conv_state
    v = state.__dict__.get("_decode_views")
    if v is not None and v[0] is ssm and v[1] is cs and v[2].data_ptr() == ssm.data_ptr():
        return v
    G = m.ngroups
    win = cs.transpose(1, 2)
    v = (ssm, cs, ssm.view(ssm.shape[0] * G, -1, ssm.shape[-1]), win if win.is_contiguous() else None)
    state.__dict__["_decode_views"] = v  # not a dataclass field: reorder / keep_rows / nbytes never see it
    return v


def decode_step_(m, x: Tensor, state) -> Tensor:
    """One token through the Mamba-2 layer ``m`` (no padding, no autograd, no ``state_window``), the state updated
    in place: ``x [B, 1, d_model] -> [B, 1, d_model]``.

    About 35 calls and two GEMVs: the in_proj GEMV (adding ``dt_bias``); the conv window shifted by one
    concatenation copied into the state and its multiply-sum with the taps (bias included); ``dt``, the decay and
    ``dt x``; the SSM state decayed in place (``mul_``), the rank-1 input added per group in place (``baddbmm_``),
    ``y = S C`` as one batched GEMV; the gated group RMSNorm; the out_proj GEMV. Parameter-derived tensors come from
    :func:`decode_plan`; no dtype cast runs where the dtypes agree; no host synchronisation. The same math as the
    layer's reference step (:func:`zoo.layers.mamba2_paths.step`), which tests pin it to.

    In fp32 with ``d_state`` a multiple of 16 and no state-norm thresholds, everything between the two GEMVs is one
    call of the fused C++ step (``kernels/ssd/decode_cpu.cpp``, :mod:`zoo.kernels.native`; the SSM state read and
    written once), where it builds and ``ZOO_NATIVE`` is not ``off``."""
    Bsz = x.shape[0]
    H, P, G, N = m.nheads, m.headdim, m.ngroups, m.d_state
    ssm = state.ssm_state  # [B, H, P, N], fp32 (fp64 stays fp64)
    cs = state.conv_state  # [B, C, K]: the last K pre-conv inputs
    acc = ssm.dtype
    plan = decode_plan(m, cs.dtype, acc, x.dtype)
    mods = m._modules
    in_proj = mods["in_proj"]._parameters
    # every per-token tensor stays [B, 1, *] (the layer's own layout): no reshapes in and out
    zx = F.linear(x, in_proj["weight"], in_proj["bias"] if plan.in_bias is None else plan.in_bias)  # [B, 1, n]
    _, _, Sg, cw = state_views(m, state)
    if plan.native is None:
        plan.native = native_step(m, plan)
    if plan.native and cw is not None and x.dtype == ssm.dtype == cs.dtype and ssm.is_contiguous() and \
            native.mode() != "off":
        fn, params = plan.native
        y = torch.empty(Bsz, 1, m.d_mlp + m.d_ssm, dtype=x.dtype)
        fn(params, Bsz, zx.data_ptr(), cw.data_ptr(), ssm.data_ptr(), y.data_ptr())
        state.seen.add_(1)
        out_proj = mods["out_proj"]._parameters
        return F.linear(y, out_proj["weight"], out_proj["bias"])
    z0, x0, z, xBC, dt = zx.split(m._decode_split, dim=-1)
    if cw is not None:  # the window as [B, K, C] rows: shift by one row, taps summed over the outer axis
        win = torch.cat([cw[:, 1:], xBC], dim=1)  # [B, K, C]: the window ending at this token
        cw.copy_(win)
        xBC = win.mul_(plan.conv_wt).sum(1, keepdim=True)  # [B, 1, C]
    else:  # any other layout of the [B, C, K] conv state
        win = torch.cat([cs[..., 1:], xBC.view(Bsz, -1, 1)], dim=-1)
        cs.copy_(win)
        xBC = win.mul_(plan.conv_w).sum(-1).view(Bsz, 1, -1)
    if plan.conv_b is not None:
        xBC.add_(plan.conv_b)
    xBC = F.silu(xBC, inplace=True)  # [B, 1, C]
    if xBC.dtype != acc:
        xBC = xBC.to(acc)
    xs, Bm, Cm = xBC.split(m._decode_xbc_split, dim=-1)  # [d_ssm, G N, G N]
    dt = F.softplus(dt if plan.in_bias is not None else dt.to(acc) + plan.dt_bias)  # [B, 1, H]
    if m.dt_limit != (0.0, float("inf")):
        dt = dt.clamp_(*m.dt_limit)
    if m.dt_scale != 1.0:
        dt = dt.mul_(m.dt_scale)
    decay = torch.mul(dt, plan.negA)  # dt A  [B, 1, H]
    if m.decay_scale != 1.0:
        decay.add_(plan.log_decay_scale)
    if m.input_scale != 1.0:
        Bm = Bm * m.input_scale
    xh = xs.view(Bsz, H, P)
    dtx = xh * dt.view(Bsz, H, 1)  # [B, H, P]
    ssm.mul_(decay.exp_().view(Bsz, H, 1, 1))  # S = exp(dt A) S + dt x B^T
    Sg.baddbmm_(dtx.view(Bsz * G, -1, 1), Bm.reshape(Bsz * G, 1, N))
    y = torch.bmm(Sg, Cm.reshape(Bsz * G, N, 1)).view(Bsz, 1, m.d_ssm).addcmul_(xs, plan.D)  # y = S C + D x
    if plan.thresholds is not None:  # renormalise every chunk_size-th real token (no host sync: a where on the scale)
        fire = (state.seen + 1) % m.chunk_size == 0
        scale = torch.clamp(plan.thresholds / torch.linalg.vector_norm(ssm, dim=(-2, -1), keepdim=True)
                            .clamp_min(1e-30), max=1.0)
        ssm.mul_(torch.where(fire[:, None, None, None], scale, 1.0))
    state.seen.add_(1)
    if z.dtype != acc:
        z = z.to(acc)
    if plan.norm_w is None:  # no norm: the gate only
        y = y.mul_(F.silu(z))
    else:  # rmsnorm over groups of gs channels: y / sqrt(mean(y^2) + eps) * w, gated before (or after) it
        gs = m.d_ssm // G
        gate_first = not mods["norm"].norm_before_gate
        if gate_first:
            y = F.silu(z).mul_(y)
        yg = y if G == 1 else y.view(Bsz, G, gs)  # [B, 1, d_ssm] or [B, G, gs]
        yg.mul_(rms_scale(yg, plan.eps))
        y = y.mul_(plan.norm_w)
        if not gate_first:
            y = y.mul_(F.silu(z))
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    if m.d_mlp > 0:
        y = torch.cat([F.silu(z0) * x0, y], dim=-1)
    out_proj = mods["out_proj"]._parameters
    return F.linear(y, out_proj["weight"], out_proj["bias"])  # [B, 1, d_model]


class Mamba2Params(ctypes.Structure):
    """A layer's sizes and parameter pointers as ``kernels/ssd/decode_cpu.cpp`` reads them (its ``Mamba2Params``)."""

    _fields_ = [*((n, ctypes.c_int64) for n in ("d_mlp", "d_ssm", "H", "P", "G", "N", "K")),
                *((n, ctypes.c_void_p) for n in ("conv_w", "conv_b", "neg_a", "d", "norm_w")),
                *((n, ctypes.c_float) for n in ("dt_lo", "dt_hi", "dt_scale", "input_scale", "log_decay_scale",
                                                "eps")),
                ("gate_first", ctypes.c_int32)]


def native_step(m, plan: DecodePlan) -> tuple | bool:
    """The fused step of ``kernels/ssd/decode_cpu.cpp`` for this plan: ``(function, Mamba2Params)`` (the parameters'
    pointers are the plan's tensors, alive while it is), or False where it does not apply (not fp32 on the CPU, ``dt``
    cast after the GEMV, state-norm thresholds, ``d_state`` not a multiple of 16) or cannot be built (then the torch
    calls of :func:`decode_step_` run)."""
    if (plan.negA.dtype != torch.float32 or plan.negA.device.type != "cpu" or plan.in_bias is None
            or plan.thresholds is not None or plan.conv_wt.dtype != torch.float32 or m.d_state % 16):
        return False
    lib = native.library(Path(ssd_kernels.__file__).with_name("decode_cpu.cpp"))
    if lib is None:
        return False
    fn = lib.mamba2_decode
    fn.argtypes = [ctypes.POINTER(Mamba2Params), ctypes.c_int64] + [ctypes.c_void_p] * 4
    fn.restype = None
    norm = m._modules["norm"] if plan.norm_w is not None else None
    lo, hi = m.dt_limit
    params = Mamba2Params(m.d_mlp, m.d_ssm, m.nheads, m.headdim, m.ngroups, m.d_state, plan.conv_wt.shape[0],
                          plan.conv_wt.data_ptr(), None if plan.conv_b is None else plan.conv_b.data_ptr(),
                          plan.negA.data_ptr(), plan.D.data_ptr(), None if norm is None else plan.norm_w.data_ptr(),
                          lo, hi, m.dt_scale, m.input_scale, plan.log_decay_scale,
                          0.0 if norm is None else norm.eps, 0 if norm is None else int(not norm.norm_before_gate))
    return fn, params


def tiled_forward(m, x: Tensor, state) -> Tensor:
    """The parallel forward / prefill of an unpadded, unpacked call in tiles of ``tile_len`` tokens (CPU)."""
    Bsz, T, _ = x.shape
    K, L = m.d_conv, m.tile_len
    lo = 2 * m.d_mlp + m.d_ssm  # xBC's columns in zxbcdt: [lo, lo + conv_dim)
    if state is not None:
        prev, h = state.conv_state[..., 1:].transpose(1, 2).to(x.dtype), state.ssm_state
    else:
        prev, h = x.new_zeros(Bsz, K - 1, m.conv_dim), None
    grad = torch.is_grad_enabled()
    outs = []
    for t0 in range(0, T, L):
        zxbcdt = m.in_proj(x[:, t0:t0 + L])
        if grad and m.tile_checkpoint:
            y, h = torch.utils.checkpoint.checkpoint(_tile_mix, m, zxbcdt, prev, h, use_reentrant=False)
        else:
            y, h = _tile_mix(m, zxbcdt, prev, h)
        xBC = zxbcdt[..., lo:lo + m.conv_dim]
        window = xBC if xBC.shape[1] >= K else torch.cat([prev, xBC], dim=1)
        prev = window[:, -(K - 1):] if K > 1 else window[:, :0]
        outs.append(m.out_proj(y.to(x.dtype)))
    if state is not None:
        state.conv_state = window[:, -K:].to(state.conv_state.dtype, copy=True).transpose(1, 2)  # [B, K, C] rows
        state.ssm_state = h
        state.seen = state.seen + T
    return torch.cat(outs, dim=1)


def _tile_mix(m, zxbcdt: Tensor, prev: Tensor, h0: Tensor | None) -> tuple[Tensor, Tensor]:
    """A tile's inner part, a pure function (recomputed in the backward): ``zxbcdt [B, L, d_in_proj]``, the
    ``d_conv - 1`` pre-conv inputs before it ``prev``, the entering state ``h0`` -> the out_proj input and the
    state after the tile (``Mamba2._out_proj_input``: ``out_proj`` stays outside the recomputed part)."""
    H, P = m.nheads, m.headdim
    z0, x0, z, xBC, dt = zxbcdt.split([m.d_mlp, m.d_mlp, m.d_ssm, m.conv_dim, H], dim=-1)
    xs, Bm, Cm, dt, off, A, D = m._ssm_inputs(m._conv(xBC, prev, None), dt, None)
    zg = None if m.rmsnorm else z.unflatten(-1, (H, P))
    y, h = ssd_chunk_scan(xs, dt, A, Bm, Cm, chunk_size=m.chunk_size, D=D, z=zg, initial_states=h0,
                          dA_offset=off)
    return m._out_proj_input(y.reshape(zxbcdt.shape[0], zxbcdt.shape[1], m.d_ssm), z, z0, x0), h
