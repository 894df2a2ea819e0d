"""SSD (state-space duality) chunked scan of Mamba-2, in plain torch: the CPU path and the test oracle.

Per head ``h`` (group ``g = h // (H / G)``), with state ``S_t in R^{P x N}`` and ``S_{-1}`` = ``initial_states``::

    a_t = dt_t * A_h (+ dA_offset_t)          log-decay of step t
    S_t = exp(a_t) * S_{t-1} + dt_t * x_t (outer) B_t
    y_t = S_t C_t + D * x_t                   (then y_t *= silu(z_t) if z is given)

Chunked form (chunks of ``Q = chunk_size`` tokens, ``Acs`` = cumsum of ``a`` inside a chunk):

* intra-chunk (quadratic, like masked attention): ``y_l += sum_{s<=l} (C_l . B_s) exp(Acs_l - Acs_s) dt_s x_s``
* chunk states: ``S_c = sum_s exp(Acs_last - Acs_s) dt_s x_s (outer) B_s``
* inter-chunk passing (sequential over chunks only): ``S_in[c+1] = exp(Acs_last[c]) S_in[c] + S_c``
* off-diagonal output: ``y_l += exp(Acs_l) C_l . S_in[c]``; without autograd and with 32 chunks or more, this
  and the passing run chunk by chunk with the running state in cache (the chunk states are never stored)

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

import math

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
    xf, dtf = x.to(acc), dt.to(acc)  # [B, T, H, P], [B, T, H]
    Bf, Cf = B.to(acc), C.to(acc)
    seq = seq_idx
    rmask = renorm_mask
    if shifted:
        sh = (chunk_offset % chunk_size).long()
        Tp = -(-(T + int(sh.max())) // Q) * Q
        xf, dtf, dA, Bf, Cf = (_shift_rows(t, sh, Tp) for t in (xf, dtf, dA, Bf, Cf))
        if seq is not None:  # no-op shift tokens: give them the neighbouring document id
            seq = torch.cat([seq[:, :1].expand(Bsz, int(sh.max())), seq, seq[:, -1:].expand(Bsz, Tp)], 1)
            seq = _unshift_rows(seq, int(sh.max()) - sh, Tp)
        rmask = _shift_rows(torch.ones(Bsz, T, dtype=torch.bool, device=dev) if rmask is None else rmask.bool(),
                            sh, Tp)
    else:
        Tp = -(-T // Q) * Q
        if Tp != T:
            pad = Tp - T
            xf, dtf = F.pad(xf, (0, 0, 0, 0, 0, pad)), F.pad(dtf, (0, 0, 0, pad))
            dA = F.pad(dA, (0, 0, 0, pad))
            Bf, Cf = F.pad(Bf, (0, 0, 0, 0, 0, pad)), F.pad(Cf, (0, 0, 0, 0, 0, pad))
            if seq is not None:
                seq = torch.cat([seq, seq[:, -1:].expand(Bsz, pad)], 1)
            if rmask is not None:
                rmask = F.pad(rmask.bool(), (0, pad))
    nc = Tp // Q
    track = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, dt, A, B, C, initial_states, dA_offset))

    # ---- chunked views
    x_c = xf.view(Bsz, nc, Q, H, P)
    dt_c = dtf.view(Bsz, nc, Q, H).transpose(2, 3)  # [B, c, H, Q]
    B_c = Bf.view(Bsz, nc, Q, G, N).transpose(2, 3)  # [B, c, G, Q, N]
    C_c = Cf.view(Bsz, nc, Q, G, N).transpose(2, 3)  # [B, c, G, Q, N]
    Acs = dA.view(Bsz, nc, Q, H).transpose(2, 3).cumsum(-1)  # [B, c, H, Q]

    # ---- 1. intra-chunk: M = (C B^T) * exp(segsum) (causal), Y_diag = M @ (dt x)
    # The causal (and same-document) mask goes on C B^T (one [Q, Q] per group, not per head); the log-decays
    # Acs_l - Acs_s are <= 0 below the diagonal (Acs is non-increasing), clamping the rest to 0 keeps exp finite.
    causal = torch.ones(Q, Q, dtype=torch.bool, device=dev).tril()
    Lmask = causal if seq is None else causal & (seq.view(Bsz, nc, 1, Q, 1) == seq.view(Bsz, nc, 1, 1, Q))
    CB = torch.matmul(C_c, B_c.transpose(-1, -2)).masked_fill_(~Lmask, 0.0)  # [B, c, G, Q, Q]
    M = torch.sub(Acs[..., :, None], Acs[..., None, :]).clamp_max_(0.0).exp_().view(Bsz, nc, G, hg, Q, Q)
    M = (M * CB[:, :, :, None] if track else M.mul_(CB[:, :, :, None])).view(Bsz, nc, H, Q, Q)
    if track:
        xdt = x_c.transpose(2, 3) * dt_c[..., None]  # dt x [B, c, H, Q, P]
    else:  # written head-major in the same pass (the batched GEMM then reads it without a copy)
        xdt = torch.mul(x_c.transpose(2, 3), dt_c[..., None], out=x_c.new_empty(Bsz, nc, H, Q, P))
    y = torch.matmul(M, xdt)  # [B, c, H, Q, P]
    del M, CB, xdt
    y = y.permute(0, 1, 3, 2, 4)  # [B, c, Q, H, P]

    # ---- 2. chunk states: S_c = sum_s exp(Acs_last - Acs_s) dt_s x_s (outer) B_s, per group as one GEMM
    w_end = torch.exp(Acs[..., -1:] - Acs) * dt_c  # [B, c, H, Q]
    if seq is not None:
        seq_c = seq.view(Bsz, nc, Q)
        w_end = w_end * (seq_c == seq_c[..., -1:])[:, :, None].to(acc)
    xw = x_c * w_end.transpose(2, 3)[..., None]  # [B, c, Q, H, P]
    xw = xw.view(Bsz, nc, Q, G, hg * P).permute(0, 1, 3, 4, 2)  # [B, c, G, hg*P, Q]

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
    y_off = None
    if state_norm_threshold is None and not track and nc >= _IN_CACHE_MIN_CHUNKS:  # chunk by chunk: y_off, S
        y_off, S = _passing_in_cache(xw, B_c, C_c, chunk_decay, S)
    elif state_norm_threshold is None:  # [B, c, H, P, N]: the state entering each chunk; the final state
        S_prev, S = chunk_states(xw, B_c, chunk_decay, S)
    else:  # renormalised at boundaries: sequential, per-chunk pieces unbound once (not indexed per chunk)
        S_c = torch.matmul(xw, B_c).view(Bsz, nc, H, P, N)  # [B, c, H, P, N]
        S_cs, decays, fires = S_c.unbind(1), chunk_decay.unbind(1), fire.unbind(1)
        S_in = []
        for c in range(nc):
            S_in.append(S)
            S = S_cs[c].addcmul(decays[c][:, :, None, None], S)
            norm = torch.linalg.vector_norm(S, dim=(-2, -1), keepdim=True)
            scale = torch.clamp(thr / norm.clamp_min(torch.finfo(acc).tiny), max=1.0)
            S = torch.where(fires[c][:, None, None, None], S * scale, S)
        S_prev = torch.stack(S_in, 1)

    # ---- 4. off-diagonal output: y_l += exp(Acs_l) C_l . S_prev, per group as one GEMM
    if y_off is None:
        Sg = S_prev.view(Bsz, nc, G, hg * P, N)
        y_off = torch.matmul(C_c, Sg.transpose(-1, -2))  # [B, c, G, Q, hg*P]
    out_decay = torch.exp(Acs)  # [B, c, H, Q]
    if seq is not None:
        out_decay = out_decay * keep_tok[:, :, None]
    y_off = y_off.reshape(Bsz, nc, G, Q, hg, P).mul_(out_decay.view(Bsz, nc, G, hg, Q).transpose(3, 4)[..., None])
    y_off = y_off.permute(0, 1, 3, 2, 4, 5) if G == 1 else y_off.permute(0, 1, 3, 2, 4, 5).contiguous()
    y = y_off.reshape(Bsz, nc, Q, H, P).add_(y).view(Bsz, Tp, H, P)  # [B, T, H, P]
    y = _unshift_rows(y, sh, T) if shifted else y[:, :T]

    if D is not None:
        Dv = D.to(acc).view(H, -1)  # [H, 1] or [H, P]
        y = y.addcmul(x.to(acc), Dv) if track or shifted else y.addcmul_(x.to(acc), Dv)
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y.to(out_dtype), S


# ---------------------------------------------------------------------------------------------- inter-chunk scan
def _scan_(u: Tensor, a: Tensor, s0: Tensor, reverse: bool = False) -> Tensor:
    """In-place inclusive linear scan along dim 1 of ``u [B, n, H, ...]`` with decays ``a [B, n, H]``:
    ``u[c] <- a[c] * u[c -/+ 1] + u[c]`` (forward: from ``u[-1] = s0``; reverse: from ``u[n] = s0``).

    Blocked, so it issues ~``2 sqrt(n)`` elementwise calls instead of ``n``: inside blocks of ``k`` steps the scan
    runs for all blocks at once from a zero entry (``k`` calls), the block entries are chained (``n / k`` calls),
    then every element gets its block entry times its decay from the block start (one call). The leftover
    ``n mod k`` steps (at the end, or the start when reversed) run one by one. Returns ``u``."""
    n = u.shape[1]
    if n == 0:
        return u
    k = max(1, round(math.sqrt(n))) if n > 32 else n + 1  # short scans: one step at a time, one pass
    nb = n // k
    m = nb * k
    lo = n - m if reverse else 0  # the blocked part is [lo, lo + m)
    ex = (...,) + (None,) * (u.dim() - a.dim())  # a[B, ., H] against u[B, ., H, P, N]
    if nb:
        U = u[:, lo:lo + m].unflatten(1, (nb, k))  # [B, nb, k, H, ...] (a view)
        Av = a[:, lo:lo + m].unflatten(1, (nb, k))  # [B, nb, k, H]
        steps = range(k - 2, -1, -1) if reverse else range(1, k)
        for i in steps:  # local scans from a zero entry, all blocks at once
            U[:, :, i].addcmul_(Av[:, :, i][ex], U[:, :, i + 1 if reverse else i - 1])
        # decay from each block's entry to each element (inclusive of the element's own step)
        d = (Av.flip(2).cumprod(2).flip(2) if reverse else Av.cumprod(2))  # [B, nb, k, H]
        e = torch.empty_like(U[:, :, 0])  # [B, nb, H, ...]: the state entering each block
        s, last = s0, (0 if reverse else k - 1)
        for b in (range(nb - 1, -1, -1) if reverse else range(nb)):
            e[:, b] = s
            s = U[:, b, last].addcmul(d[:, b, last][ex], s)
        U.addcmul_(d[(...,) + (None,) * (U.dim() - d.dim())], e[:, :, None])
    else:
        s = s0
    rest = range(lo - 1, -1, -1) if reverse else range(m, n)
    for c in rest:
        u[:, c].addcmul_(a[:, c][ex], s)
        s = u[:, c]
    return u


_IN_CACHE_MIN_CHUNKS = 32  # measured on the CPU (Mamba-2 layer, d_model 768, 64-token blocks): at 16 chunks the
# batched form is as fast (1k tokens: 40-44 against 42-47 ms), at 32 (a 2048-token tile) the loop is 9-10% faster


def _passing_in_cache(xw: Tensor, B_c: Tensor, C_c: Tensor, a: Tensor, s0: Tensor) -> tuple[Tensor, Tensor]:
    """Steps 3 and 4 without autograd, one chunk at a time: ``y_off[c] = C_c S_in[c]^T``, then ``S_in[c + 1] = a[c]
    S_in[c] + xw_c B_c`` in place (``xw [B, n, G, hg*P, Q]``, ``B_c, C_c [B, n, G, Q, N]``, ``a [B, n, H]``, ``s0
    [B, H, P, N]``) -> ``y_off [B, n, G, Q, hg*P]`` and the final state. The running state (786 KB at the bench
    shape) stays in cache; the batched form writes every chunk's state and reads it back twice (25 MB per 2048
    tokens with 64-token blocks)."""
    Bsz, n, G, HP, Q = xw.shape
    N = B_c.shape[-1]
    S = s0.clone()  # [B, H, P, N]
    Sg = S.view(Bsz * G, HP, N)
    y_off = xw.new_empty(n, Bsz * G, Q, HP)
    for c in range(n):
        torch.bmm(C_c[:, c].reshape(Bsz * G, Q, N), Sg.transpose(-1, -2), out=y_off[c])
        S.mul_(a[:, c, :, None, None])
        Sg.baddbmm_(xw[:, c].reshape(Bsz * G, HP, Q), B_c[:, c].reshape(Bsz * G, Q, N))
    return y_off.view(n, Bsz, G, Q, HP).transpose(0, 1).contiguous(), S  # a copy only when Bsz > 1


class _ChunkStates(torch.autograd.Function):
    """Chunk states and their passing in one buffer ``buf [B, n + 1, H, P, N]``: the per-group GEMM writes
    ``S_c = xw @ B_c`` into ``buf[:, 1:]``, the scan runs there in place from ``buf[:, 0] = s0``, so ``buf[:, c]``
    is the state entering chunk ``c`` and ``buf[:, n]`` the final state (no copy of the chunk states).

    Backward (the same scan in reverse, no per-chunk autograd nodes): ``G[n] = g_final``,
    ``G[c] = g_prev[c] + a[c] G[c + 1]``; ``dS_c[c] = G[c + 1]``, ``da[c] = <G[c + 1], S_in[c]>``, ``ds0 = G[0]``,
    then the GEMM's two gradients."""

    @staticmethod
    def forward(ctx, xw: Tensor, B_c: Tensor, a: Tensor, s0: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        Bsz, n, H = a.shape
        G, Q, N = B_c.shape[2:]
        buf = s0.new_empty(Bsz, n + 1, *s0.shape[1:])
        torch.matmul(xw, B_c, out=buf[:, 1:].view(Bsz, n, G, -1, N))
        buf[:, 0] = s0
        _scan_(buf[:, 1:], a, s0)
        ctx.save_for_backward(xw, B_c, a, buf)
        return buf[:, :n], buf[:, n].clone()  # the final state outlives the buffer (a decode state)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_prev: Tensor, g_final: Tensor):  # type: ignore[override]
        xw, B_c, a, buf = ctx.saved_tensors
        Bsz, n, H = a.shape
        G, Q, N = B_c.shape[2:]
        Gr = torch.empty_like(g_prev)  # Gr[c] = dL/dS_in[c + 1] = dL/dS_c[c]
        Gr[:, n - 1] = g_final
        Gr[:, :-1] = g_prev[:, 1:]
        _scan_(Gr[:, :-1], a[:, 1:], g_final, reverse=True)
        g_s0 = g_prev[:, 0].addcmul(a[:, 0][..., None, None], Gr[:, 0])
        Gg = Gr.view(Bsz, n, G, -1, N)
        g_xw = torch.matmul(Gg, B_c.transpose(-1, -2)) if ctx.needs_input_grad[0] else None
        g_B = torch.matmul(xw.transpose(-1, -2), Gg) if ctx.needs_input_grad[1] else None
        g_a = Gr.mul_(buf[:, :n]).sum((-2, -1)) if ctx.needs_input_grad[2] else None
        return g_xw, g_B, g_a, g_s0


def chunk_states(xw: Tensor, B_c: Tensor, a: Tensor, s0: Tensor) -> tuple[Tensor, Tensor]:
    """``S_c = xw @ B_c`` (``xw [B, n, G, hg*P, Q]``, ``B_c [B, n, G, Q, N]``, viewed ``[B, n, H, P, N]``), then the
    recurrence ``S_in[c + 1] = a[c] S_in[c] + S_c[c]`` from ``S_in[0] = s0``: returns the states entering each chunk
    ``[B, n, H, P, N]`` and the final state ``[B, H, P, N]``."""
    return _ChunkStates.apply(xw, B_c, a, s0)
