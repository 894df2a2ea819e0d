"""SSD (state-space duality) chunked scan of Mamba-2, in plain torch: the CPU path and the test oracle.

Per head ``h`` (group ``g = h // (H / G)``), with state ``S_t in R^{P x N}`` and ``S_{-1}`` = ``initial_states``::

    a_t = dt_t * A_h (+ dA_offset_t)          log-decay of step t
    S_t = exp(a_t) * S_{t-1} + dt_t * x_t (outer) B_t
    y_t = S_t C_t + D * x_t                   (then y_t *= silu(z_t) if z is given)

Chunked form (chunks of ``Q = chunk_size`` tokens, ``Acs`` = cumsum of ``a`` inside a chunk):

* intra-chunk (quadratic, like masked attention): ``y_l += sum_{s<=l} (C_l . B_s) exp(Acs_l - Acs_s) dt_s x_s``
* chunk states: ``S_c = sum_s exp(Acs_last - Acs_s) dt_s x_s (outer) B_s``
* inter-chunk passing (sequential over chunks only): ``S_in[c+1] = exp(Acs_last[c]) S_in[c] + S_c``
* off-diagonal output: ``y_l += exp(Acs_l) C_l . S_in[c]``

Everything accumulates in fp32 (fp64 inputs stay fp64). ``T`` need not be a multiple of ``Q``: the tail is
padded with no-op tokens (``dt = 0``: no decay, no input). ``seq_idx [B, T]`` (non-decreasing document ids):
nothing crosses a document boundary; ``initial_states`` belong to the document of the first token.

Extras used by the Mamba-2 layer's state-collapse mitigations (all off by default, and then not touched):

* ``dA_offset [B, T, H]``: added to the log-decay (Stuffed Mamba "forget more": ``log alpha += log c``).
* ``state_norm_threshold [H]``: at every ``chunk_size`` boundary the state is renormalised per head,
  ``S <- S * min(1, thr / ||S||_F)`` (the boundary token's own output reads the state before it). Boundaries
  fall every ``chunk_size`` tokens counted from ``-chunk_offset``: ``chunk_offset [B]`` (or int) shifts each row
  right by ``chunk_offset % chunk_size`` no-op tokens, so a stream that started ``k`` tokens earlier normalises
  at the same absolute positions as an unsplit run. ``renorm_mask [B, T]``: a boundary whose last token is
  masked (padding) does not fire.
* ``block_size``: the computational chunk (a divisor of ``chunk_size``; smaller on the CPU, where the
  ``O(T * Q)`` intra-chunk part dominates); it changes rounding only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _shift_rows(t: Tensor, shifts: Tensor, length: int) -> Tensor:
    """Place row ``b`` of ``t [B, T, ...]`` at offset ``shifts[b]`` in zeros ``[B, length, ...]``."""
    Bsz, T = t.shape[:2]
    out = t.new_zeros((Bsz, length, *t.shape[2:]))
    rows = torch.arange(Bsz, device=t.device)[:, None]
    cols = torch.arange(T, device=t.device)[None, :] + shifts[:, None]
    return out.index_put((rows, cols), t)


def _unshift_rows(t: Tensor, shifts: Tensor, T: int) -> Tensor:
    rows = torch.arange(t.shape[0], device=t.device)[:, None]
    cols = torch.arange(T, device=t.device)[None, :] + shifts[:, None]
    return t[rows, cols]


def _cpu_block(chunk_size: int, target: int = 64) -> int:
    """The largest divisor of ``chunk_size`` that is at most ``target`` (``chunk_size`` if that is tiny)."""
    if chunk_size <= target:
        return chunk_size
    d = max(q for q in range(1, target + 1) if chunk_size % q == 0)
    return d if d >= 16 else chunk_size


def ssd_chunk_scan_ref(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    *,
    chunk_size: int,
    D: Tensor | None = None,
    z: Tensor | None = None,
    initial_states: Tensor | None = None,
    seq_idx: Tensor | None = None,
    dA_offset: Tensor | None = None,
    state_norm_threshold: Tensor | None = None,
    chunk_offset: Tensor | int | None = None,
    renorm_mask: Tensor | None = None,
    block_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """``x [B, T, H, P]``, ``dt [B, T, H]`` (after softplus), ``A [H]`` (< 0), ``B, C [B, T, G, N]``,
    ``D [H]`` or ``[H, P]``, ``z [B, T, H, P]``, ``initial_states [B, H, P, N]``.

    Returns ``y [B, T, H, P]`` (dtype of ``x``) and ``final_states [B, H, P, N]`` (fp32, or fp64 for fp64 input).

    ``block_size``: the computational chunk length (a divisor of ``chunk_size``; default ``min(chunk_size, 64)``
    on the CPU, where the intra-chunk quadratic term dominates, else ``chunk_size``). It changes rounding only;
    ``chunk_size`` alone sets where the state norm applies.
    """
    Bsz, T, H, P = x.shape
    G, N = B.shape[-2:]
    if H % G:
        raise ValueError(f"number of heads H={H} must be a multiple of ngroups G={G}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if block_size is None:
        block_size = _cpu_block(chunk_size) if x.device.type == "cpu" else chunk_size
    if block_size <= 0 or chunk_size % block_size:
        raise ValueError(f"block_size={block_size} must be a positive divisor of chunk_size={chunk_size}")
    Q, hg = block_size, H // G
    every = chunk_size // block_size  # the state norm applies after every `every`-th block
    out_dtype = x.dtype
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    dev = x.device

    # ---- shifts (for state-norm alignment) and padding to whole chunks
    if isinstance(chunk_offset, int):
        chunk_offset = torch.full((Bsz,), chunk_offset, dtype=torch.long, device=dev) if chunk_offset else None
    shifted = chunk_offset is not None and bool((chunk_offset % chunk_size).any())
    dA = dt.to(acc) * A.to(acc)  # [B, T, H]
    if dA_offset is not None:
        dA = dA + dA_offset.to(acc)
    xdt = x.to(acc) * dt.to(acc)[..., None]  # [B, T, H, P]
    Bf, Cf = B.to(acc), C.to(acc)
    seq = seq_idx
    rmask = renorm_mask
    if shifted:
        sh = (chunk_offset % chunk_size).long()
        Tp = -(-(T + int(sh.max())) // Q) * Q
        xdt, dA, Bf, Cf = (_shift_rows(t, sh, Tp) for t in (xdt, dA, Bf, Cf))
        if seq is not None:  # no-op shift tokens: give them the neighbouring document id
            seq = torch.cat([seq[:, :1].expand(Bsz, int(sh.max())), seq, seq[:, -1:].expand(Bsz, Tp)], 1)
            seq = _unshift_rows(seq, int(sh.max()) - sh, Tp)
        rmask = _shift_rows(torch.ones(Bsz, T, dtype=torch.bool, device=dev) if rmask is None else rmask.bool(),
                            sh, Tp)
    else:
        Tp = -(-T // Q) * Q
        if Tp != T:
            pad = Tp - T
            xdt = F.pad(xdt, (0, 0, 0, 0, 0, pad))
            dA = F.pad(dA, (0, 0, 0, pad))
            Bf, Cf = F.pad(Bf, (0, 0, 0, 0, 0, pad)), F.pad(Cf, (0, 0, 0, 0, 0, pad))
            if seq is not None:
                seq = torch.cat([seq, seq[:, -1:].expand(Bsz, pad)], 1)
            if rmask is not None:
                rmask = F.pad(rmask.bool(), (0, pad))
    nc = Tp // Q

    # ---- chunked views
    xdt_c = xdt.view(Bsz, nc, Q, H, P)
    B_c = Bf.view(Bsz, nc, Q, G, N).transpose(2, 3)  # [B, c, G, Q, N]
    C_c = Cf.view(Bsz, nc, Q, G, N).transpose(2, 3)  # [B, c, G, Q, N]
    Acs = dA.view(Bsz, nc, Q, H).transpose(2, 3).cumsum(-1)  # [B, c, H, Q]

    # ---- 1. intra-chunk: M = (C B^T) * exp(segsum) (causal), Y_diag = M @ (dt x)
    CB = torch.matmul(C_c, B_c.transpose(-1, -2))  # [B, c, G, Q, Q]
    causal = torch.ones(Q, Q, dtype=torch.bool, device=dev).tril()
    Lmask = causal if seq is None else causal & (seq.view(Bsz, nc, 1, Q, 1) == seq.view(Bsz, nc, 1, 1, Q))
    M = (Acs[..., :, None] - Acs[..., None, :]).masked_fill_(~Lmask, float("-inf")).exp_()  # [B, c, H, Q, Q]
    M = (M.view(Bsz, nc, G, hg, Q, Q) * CB[:, :, :, None]).view(Bsz, nc, H, Q, Q)
    y = torch.matmul(M, xdt_c.permute(0, 1, 3, 2, 4))  # [B, c, H, Q, P]
    del M, CB
    y = y.permute(0, 1, 3, 2, 4)  # [B, c, Q, H, P]

    # ---- 2. chunk states: S_c = sum_s exp(Acs_last - Acs_s) dt_s x_s (outer) B_s, per group as one GEMM
    decay_end = torch.exp(Acs[..., -1:] - Acs)  # [B, c, H, Q]
    if seq is not None:
        seq_c = seq.view(Bsz, nc, Q)
        decay_end = decay_end * (seq_c == seq_c[..., -1:])[:, :, None].to(acc)
    xw = xdt_c * decay_end.transpose(2, 3)[..., None]  # [B, c, Q, H, P]
    xw = xw.view(Bsz, nc, Q, G, hg * P).permute(0, 1, 3, 4, 2)  # [B, c, G, hg*P, Q]
    S_c = torch.matmul(xw, B_c).view(Bsz, nc, H, P, N)  # [B, c, H, P, N]

    # ---- 3. inter-chunk state passing (sequential over chunks)
    S = (initial_states.to(acc) if initial_states is not None
         else torch.zeros(Bsz, H, P, N, dtype=acc, device=dev))
    chunk_decay = torch.exp(Acs[..., -1])  # [B, c, H]
    if seq is not None:  # the carried state survives into chunk c only for tokens of the previous chunk's document
        prev_last = torch.cat([seq[:, :1], seq_c[:, :-1, -1]], 1)  # [B, c]
        keep_tok = (seq_c == prev_last[..., None]).to(acc)  # [B, c, Q]
        chunk_decay = chunk_decay * keep_tok[..., -1:]
    if state_norm_threshold is not None:
        thr = state_norm_threshold.to(acc).view(1, H, 1, 1).expand(Bsz, H, 1, 1)
        fire = (torch.ones(Bsz, nc, dtype=torch.bool, device=dev) if rmask is None
                else rmask.view(Bsz, nc, Q)[..., -1].bool())
        if not shifted and Tp != T:  # a padded tail chunk has not reached its boundary
            fire = fire.clone()
            fire[:, -1] = False
        elif shifted:  # the boundary is reached only if the row's real tokens reach the chunk end
            ends = torch.arange(1, nc + 1, device=dev) * Q
            fire = fire & (ends[None, :] <= (T + sh)[:, None])
        fire = fire & (torch.arange(1, nc + 1, device=dev) % every == 0)[None, :]
    track = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, dt, A, B, C, initial_states))
    S_prev = None if track else S_c.new_empty(Bsz, nc, H, P, N)
    S_in = []
    for c in range(nc):
        if track:
            S_in.append(S)
        else:
            S_prev[:, c] = S
        S = S_c[:, c].addcmul(chunk_decay[:, c, :, None, None], S)
        if state_norm_threshold is not None:
            norm = torch.linalg.vector_norm(S, dim=(-2, -1), keepdim=True)
            scale = torch.clamp(thr / norm.clamp_min(torch.finfo(acc).tiny), max=1.0)
            S = torch.where(fire[:, c, None, None, None], S * scale, S)
    if track:
        S_prev = torch.stack(S_in, 1)  # [B, c, H, P, N]: state entering each chunk

    # ---- 4. off-diagonal output: y_l += exp(Acs_l) C_l . S_prev, per group as one GEMM
    Sg = S_prev.view(Bsz, nc, G, hg * P, N)
    y_off = torch.matmul(C_c, Sg.transpose(-1, -2))  # [B, c, G, Q, hg*P]
    out_decay = torch.exp(Acs)  # [B, c, H, Q]
    if seq is not None:
        out_decay = out_decay * keep_tok[:, :, None]
    y_off = y_off.view(Bsz, nc, G, Q, hg, P).mul_(out_decay.view(Bsz, nc, G, hg, Q).transpose(3, 4)[..., None])
    y_off = y_off.permute(0, 1, 3, 2, 4, 5) if G == 1 else y_off.permute(0, 1, 3, 2, 4, 5).contiguous()
    y = y_off.reshape(Bsz, nc, Q, H, P).add_(y).view(Bsz, Tp, H, P)  # [B, T, H, P]
    y = _unshift_rows(y, sh, T) if shifted else y[:, :T]

    if D is not None:
        Dv = D.to(acc).view(H, -1)  # [H, 1] or [H, P]
        y = y.addcmul(x.to(acc), Dv)
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y.to(out_dtype), S
