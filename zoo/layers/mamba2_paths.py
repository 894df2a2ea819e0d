"""The Mamba-2 mixer's secondary paths and its initialisation from attention (:mod:`zoo.layers.mamba2` holds the math
and the layer; each function here takes the layer ``m`` first and is called by one of its methods).

* :func:`scan` — the chunked SSD scan of a parallel forward / prefill, with the Stuffed-Mamba state
  renormalisation (``state_norm_threshold``, per-head :func:`thresholds`) aligned to each row's real tokens.
* :func:`step` — the reference recurrent step of one token (padding, autograd, ``state_window``); the lean
  in-place step :func:`zoo.layers.mamba2_ops.decode_step_` is pinned to it by tests.
* :func:`windowed_scan` — ``state_window = r``: the output reads ``S_t - (prod of the last r decays) S_{t-r}``,
  two chunked scans over [ring of the last ``r`` tokens | new tokens].
* :func:`forward_sequence_parallel` — one rank's segment (``zoo.distributed``): rank ``r`` of ``R`` scans its
  segment from the state the earlier segments leave, computed from each segment's zero-start final state and
  total decay (the recurrence is linear); the conv reads the previous rank's last ``d_conv - 1`` inputs.
  Gradients flow back across ranks through the same collectives.
* :func:`derive_from_attention` — ``Mamba2.derive_from``: the weights from an attention layer (C <- q, B <- k,
  x <- v, out <- o).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.kernels.ssd import ssd_chunk_scan

if TYPE_CHECKING:
    from zoo.layers.mamba2 import Mamba2, Mamba2State


def thresholds(m: Mamba2, like: Tensor) -> Tensor | None:
    """Per-head thresholds ``[H]`` in the accumulation dtype of ``like`` (fp32, or fp64 for fp64 input); None
    when off (an infinite threshold never fires, so its code path is skipped too)."""
    thr = m.state_norm_threshold
    if thr is None or all(math.isinf(v) for v in (thr if isinstance(thr, (list, tuple)) else [thr])):
        return None
    acc = torch.float64 if like.dtype == torch.float64 else torch.float32
    return torch.as_tensor(thr, dtype=acc, device=like.device).expand(m.nheads)


def scan(m: Mamba2, xs: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, D: Tensor, zg: Tensor | None,
         off: Tensor | None, mask: Tensor | None, seq_idx: Tensor | None, state: Mamba2State | None) -> Tensor:
    """The chunked scan ``y [B, T, H, P]`` continuing ``state`` (its ``ssm_state`` replaced by the final one)."""
    thr = thresholds(m, xs)
    extra: dict[str, Any] = {}
    if thr is not None:  # align renormalisation boundaries to each row's count of real tokens
        first = torch.zeros(xs.shape[0], dtype=torch.long, device=xs.device)
        if mask is not None:
            counts = mask.sum(1)
            first = mask.long().argmax(1)
            last = mask.shape[1] - 1 - mask.flip(1).long().argmax(1)
            if bool(((last - first + 1 != counts) & (counts > 0)).any()):
                raise ValueError("mamba2 state_norm_threshold: attention_mask must be left/right padding "
                                 "(the real tokens of a row contiguous)")
        seen = state.seen if state is not None else torch.zeros_like(first)
        extra = dict(state_norm_threshold=thr, chunk_offset=seen - first, renorm_mask=mask)
    y, final = ssd_chunk_scan(xs, dt, A, Bm, Cm, chunk_size=m.chunk_size, D=D, z=zg, seq_idx=seq_idx,
                              initial_states=state.ssm_state if state is not None else None,
                              dA_offset=off, **extra)
    if state is not None:
        state.ssm_state = final
    return y


def step(m: Mamba2, x: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, D: Tensor, off: Tensor | None,
         mask: Tensor | None, state: Mamba2State) -> Tensor:
    """One token: ``x [B, H, P]``, ``dt [B, H]``, ``Bm, Cm [B, G, N]`` -> ``y [B, H, P]`` (state updated)."""
    Bsz, H, P = x.shape
    G, N = m.ngroups, m.d_state
    acc = state.ssm_state.dtype
    xf, Bg, Cg = x.to(acc), Bm.to(acc)[:, :, None, None, :], Cm.to(acc)  # B as [B, G, 1, 1, N] (no copies)
    dt, A = dt.to(acc), A.to(acc)
    dA = dt * A if off is None else dt * A + off[:, 0].to(acc)  # [B, H]
    dtx = (dt[..., None] * xf).view(Bsz, G, H // G, P, 1)
    h = ((torch.exp(dA)[..., None, None] * state.ssm_state).view(Bsz, G, H // G, P, N)
         .addcmul_(dtx, Bg).view(Bsz, H, P, N))  # S = exp(dt A) S + dt x B^T
    state.ssm_state = h
    read = h
    if m.state_window:  # advance the lagged state by the token leaving the window, then subtract it
        odtx = (state.win_dt[:, 0, :, None] * state.win_x[:, 0]).view(Bsz, G, H // G, P, 1)
        lag = ((torch.exp(state.win_dt[:, 0] * A + state.win_off[:, 0])[..., None, None] * state.lag_state)
               .view(Bsz, G, H // G, P, N).addcmul_(odtx, state.win_B[:, 0][:, :, None, None, :])
               .view(Bsz, H, P, N))
        state.lag_state = lag
        o = off[:, 0].to(acc) if off is not None else torch.zeros_like(dt)
        state.win_x = torch.cat([state.win_x[:, 1:], xf[:, None]], 1)
        state.win_dt = torch.cat([state.win_dt[:, 1:], dt[:, None]], 1)
        state.win_B = torch.cat([state.win_B[:, 1:], Bm.to(acc)[:, None]], 1)
        state.win_off = torch.cat([state.win_off[:, 1:], o[:, None]], 1)
        wdecay = torch.exp((state.win_dt.double() * A.double() + state.win_off.double()).sum(1)).to(acc)
        read = h - wdecay[..., None, None] * lag
    # y = S C per group as one batched GEMV: [B, G, hg*P, N] @ [B, G, N, 1]
    y = torch.matmul(read.view(Bsz, G, (H // G) * P, N), Cg[..., None]).view(Bsz, H, P)
    y = y.addcmul(xf, D.to(acc)[:, None] if D.dim() == 1 else D.to(acc))
    thr = thresholds(m, state.ssm_state)
    if thr is not None:
        seen = state.seen + (1 if mask is None else mask[:, 0].long())
        fire = (seen % m.chunk_size == 0) if mask is None else (seen % m.chunk_size == 0) & mask[:, 0]
        norm = torch.linalg.vector_norm(h, dim=(-2, -1), keepdim=True).clamp_min(1e-30)
        scale = torch.clamp(thr.view(1, -1, 1, 1) / norm, max=1.0)
        state.ssm_state = torch.where(fire[:, None, None, None], h * scale, h)
    return y.to(x.dtype)


def windowed_scan(m: Mamba2, xs: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, D: Tensor,
                  zg: Tensor | None, off: Tensor | None, seq_idx: Tensor | None, state: Mamba2State | None) -> Tensor:
    """``y_t = C_t (S_t - prod_{t-r<j<=t} alpha_j S_{t-r}) + D x_t`` over [ring of r past tokens | new tokens]."""
    Bsz, T, H, P = xs.shape
    r = m.state_window
    acc = torch.float64 if xs.dtype == torch.float64 else torch.float32
    dt = dt.to(acc)
    off = off.to(acc) if off is not None else torch.zeros_like(dt)
    if state is None:
        wx, wdt = xs.new_zeros(Bsz, r, H, P, dtype=acc), dt.new_zeros(Bsz, r, H)
        wB, woff = Bm.new_zeros(Bsz, r, *Bm.shape[2:], dtype=acc), dt.new_zeros(Bsz, r, H)
        lag0 = None
    else:
        wx, wdt, wB, woff, lag0 = state.win_x, state.win_dt, state.win_B, state.win_off, state.lag_state
    cx, cdt = torch.cat([wx, xs.to(acc)], 1), torch.cat([wdt, dt], 1)
    cB, coff = torch.cat([wB, Bm.to(acc)], 1), torch.cat([woff, off], 1)
    seq = None if seq_idx is None else torch.cat([seq_idx[:, :1].expand(-1, r), seq_idx], 1)
    # full state S_t: a scan over the ring + new tokens from the lagged state (ring outputs discarded)
    cC = torch.cat([Cm.new_zeros(Bsz, r, *Cm.shape[2:], dtype=acc), Cm.to(acc)], 1)
    y_full, h_end = ssd_chunk_scan(cx, cdt, A, cB, cC, chunk_size=m.chunk_size, dA_offset=coff,
                                   initial_states=lag0, seq_idx=seq)
    # C_t . S_{t-r}: the first T tokens with the queries shifted by r
    y_lag, lag_end = ssd_chunk_scan(cx[:, :T], cdt[:, :T], A, cB[:, :T], Cm.to(acc), chunk_size=m.chunk_size,
                                    dA_offset=coff[:, :T], initial_states=lag0,
                                    seq_idx=None if seq is None else seq[:, :T])
    cum = F.pad((cdt.double() * A.double() + coff.double()).cumsum(1), (0, 0, 1, 0))  # [B, r+T+1, H]
    wdecay = torch.exp(cum[:, r + 1:] - cum[:, 1:T + 1]).to(acc)  # prod of the r decays ending at t
    if seq is not None:
        wdecay = wdecay * (seq[:, :T] == seq[:, r:]).to(acc)[..., None]
    y = y_full[:, r:] - wdecay[..., None] * y_lag + xs.to(acc) * (D.to(acc)[:, None] if D.dim() == 1 else D.to(acc))
    if zg is not None:
        y = y * F.silu(zg.to(acc))
    if state is not None:
        state.ssm_state = h_end
        state.lag_state = lag_end
        state.win_x, state.win_dt, state.win_B, state.win_off = cx[:, -r:], cdt[:, -r:], cB[:, -r:], coff[:, -r:]
    return y.to(xs.dtype)


def forward_sequence_parallel(m: Mamba2, x: Tensor, attention_mask: Tensor | None, seq_idx: Tensor | None,
                              comm: Any) -> Tensor:
    """This rank's segment ``x [B, T/R, d]`` of a sequence split over ``R`` ranks, scanned from the previous
    segments' final state (exact forward and backward; ``comm`` carries the gradients back across ranks).

    The recurrence is linear, so each rank first summarises its segment alone: the final state from a zero
    start ``S_r = sum_t exp(sum_{u>t} a_u) dt_t x_t B_t^T`` and the decay across it ``d_r = exp(sum_t a_t)``
    (0 if a document starts inside). ``comm.carry_in`` gathers them and folds the earlier ranks' summaries,
    ``S_in[r+1] = keep_{r+1} (d_r S_in[r] + S_r)``, into this rank's initial state for the chunked scan. The conv
    window comes from the previous rank's last ``d_conv - 1`` inputs (``comm.from_previous``)."""
    Bsz, T, _ = x.shape
    H, P, G, K = m.nheads, m.headdim, m.ngroups, m.d_conv
    if T < max(K - 1, 1):
        raise ValueError(f"mamba2: a sequence-parallel segment of {T} tokens is shorter than the conv window "
                         f"({K - 1} tokens); use fewer ranks or longer sequences")
    mask = None if attention_mask is None else attention_mask.to(torch.bool)
    z0, x0, z, xBC, dt = m._in_proj(x, mask)
    prev = comm.from_previous(xBC[:, T - (K - 1):])  # [B, K-1, conv_dim], zeros on the first rank
    prev_seq = None if seq_idx is None else comm.from_previous(seq_idx[:, T - max(K - 1, 1):])
    xs, Bm, Cm, dt, off, A, D = m._ssm_inputs(
        m._conv(xBC, prev, seq_idx, None if prev_seq is None else prev_seq[:, prev_seq.shape[1] - (K - 1):]),
        dt, mask)
    acc = dt.dtype
    dA = dt * A if off is None else dt * A + off  # [B, T, H]
    w = torch.exp(dA.flip(1).cumsum(1).flip(1) - dA) * dt  # exp(sum of the later log-decays) dt_t
    decay = torch.exp(dA.sum(1))  # [B, H]
    keep = None
    if seq_idx is not None:  # only the segment's last document reaches its end; a start inside cuts the carry
        w = w * (seq_idx == seq_idx[:, -1:])[..., None]
        decay = decay * (seq_idx[:, :1] == seq_idx[:, -1:])
        keep = seq_idx[:, 0] == prev_seq[:, -1]  # the previous rank's last document continues here
    xw = (xs.to(acc) * w[..., None]).view(Bsz, T, G, H // G, P)
    final = torch.einsum("btgjp,btgn->bgjpn", xw, Bm.to(acc)).reshape(Bsz, H, P, m.d_state)
    init = comm.carry_in(final, decay, keep)  # [B, H, P, N]
    zg = None if m.rmsnorm else z.unflatten(-1, (H, P))
    y, _ = ssd_chunk_scan(xs, dt, A, Bm, Cm, chunk_size=m.chunk_size, D=D, z=zg, seq_idx=seq_idx,
                          initial_states=init, dA_offset=off)
    return m._out(y.reshape(Bsz, T, m.d_ssm), z, z0, x0, x.dtype)


@torch.no_grad()
def derive_from_attention(m: Mamba2, old: nn.Module) -> bool:
    """Initialise from an attention layer ("The Mamba in the Llama", Wang et al., arXiv 2408.15237).

    Causal attention without the softmax, ``y_t = sum_{s<=t} (q_t . k_s) v_s``, is the SSD recurrence with
    ``C = q``, ``B = k``, ``x = v`` and no decay. So: the x rows of ``in_proj`` <- ``W_v`` (head ``h`` reads
    its KV head), B <- ``W_k``, C <- ``W_q`` (group ``g``: the mean over its query heads; exact with
    ``ngroups = num_heads``), ``out_proj`` <- ``W_o``; the conv starts as the identity and ``D = 0``
    (attention has no skip); z, dt and A keep their initialisation. Needs ``headdim = head_dim`` and
    ``nheads = num_heads`` (``d_ssm = num_heads * head_dim``); a ``d_state`` below ``head_dim`` takes the first
    ``d_state`` dimensions, a larger one leaves the rest as initialised. Any layer with ``q_proj, k_proj,
    v_proj, o_proj`` and ``num_heads, num_kv_heads, head_dim`` qualifies."""
    if not all(isinstance(getattr(old, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "o_proj")):
        return False
    Hq, Hkv, Dh = old.num_heads, old.num_kv_heads, old.head_dim
    H, P, G, N = m.nheads, m.headdim, m.ngroups, m.d_state
    if P != Dh or H != Hq:
        raise ValueError(f"mamba2 derive_from attention ({Hq} heads x {Dh}): needs headdim={Dh} and "
                         f"nheads={Hq} (d_ssm={Hq * Dh}, e.g. mamba2(headdim={Dh}, d_ssm={Hq * Dh}) or "
                         f"expand={Hq * Dh}/d_model), got headdim={P}, nheads={H}")
    d = m.in_proj.weight.shape[1]
    kv = torch.arange(Hq) // (Hq // Hkv)  # the KV head each query head reads
    Wq = old.q_proj.weight.view(Hq, Dh, d)
    Wk = old.k_proj.weight.view(Hkv, Dh, d)[kv]  # [Hq, Dh, d]
    Wv = old.v_proj.weight.view(Hkv, Dh, d)[kv]
    n = min(N, Dh)
    W = m.in_proj.weight  # rows [z0, x0, z, x, B, C, dt]
    x0 = 2 * m.d_mlp + m.d_ssm
    W[x0:x0 + m.d_ssm] = Wv.reshape(H * P, d)
    b0 = x0 + m.d_ssm
    W[b0:b0 + G * N].view(G, N, d)[:, :n] = Wk.view(G, Hq // G, Dh, d).mean(1)[:, :n]
    c0 = b0 + G * N
    W[c0:c0 + G * N].view(G, N, d)[:, :n] = Wq.view(G, Hq // G, Dh, d).mean(1)[:, :n]
    m.conv1d.weight.zero_()
    m.conv1d.weight[:, 0, -1] = 1.0
    if m.conv1d.bias is not None:
        m.conv1d.bias.zero_()
    m.D.zero_()
    m.out_proj.weight[:, m.d_mlp:] = old.o_proj.weight
    return True
