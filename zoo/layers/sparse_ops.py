"""Torch compute of the sparse-attention mixers: masked SDPA, the blocked O(T * reach) parallel path, the
dispatch to the block-sparse Triton kernel (:func:`kernel_attention`), the bounded KV cache
(:class:`SparseKVCache`) and LaCT's window branch over it (:func:`cached_window_attention`). The mask rules live
in :mod:`zoo.layers.masks`.

Shapes: ``q [B, H, T, D]``, ``k, v [B, Hkv, T, D]``, masks ``[B, Hm, Tq, Tk]`` with ``Hm`` in ``{1, Hkv}``
(a per-KV-head mask is shared by the ``G = H / Hkv`` query heads of that KV head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from zoo.layers.base import State
from zoo.layers.masks import Rule, SlidingWindowRule, allowed, extra_candidates, rule_layout


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """Softmax attention with a boolean ``mask [B, Hm, Tq, Tk]`` (True = attend); GQA by folding the
    ``G`` query heads of a KV head into the query axis so the mask never has to be repeated over heads."""
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    G = H // Hkv
    if G > 1:
        q = q.reshape(B, Hkv, G * Tq, D)
        Hm = mask.shape[1]
        mask = mask[:, :, None].expand(B, Hm, G, Tq, Tk).reshape(B, Hm, G * Tq, Tk)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return o.reshape(B, H, Tq, D)


def _heads(rule: Rule, num_kv_heads: int, device: torch.device, heads: Tensor | None = None) -> Tensor | None:
    if not rule.per_head:
        return None
    return (torch.arange(num_kv_heads, device=device) if heads is None else heads)[None, :, None, None]


def _compact(cand: Tensor) -> tuple[Tensor, Tensor]:
    """``cand [B, Hm, T]`` bool -> indices of the True entries in ascending order ``[B, Hm, M]`` and a
    validity mask (rows have different counts; the tail is padding)."""
    counts = cand.sum(-1)
    M = int(counts.max()) if cand.numel() else 0
    idx = torch.sort((~cand).to(torch.int8), dim=-1, stable=True).indices[..., :M]
    ok = torch.arange(M, device=cand.device) < counts[..., None]
    return idx, ok


def blocked_attention(rule: Rule, q: Tensor, k: Tensor, v: Tensor, pos: Tensor, valid: Tensor | None,
                      doc: Tensor | None, scale: float, chunk: int, max_elems: int = 1 << 24,
                      by_slot: bool = False, heads: Tensor | None = None) -> Tensor:
    """Parallel sparse attention by query chunks; memory and time O(T * (chunk + reach + extras)).

    Query chunk ``[t0, t0 + chunk)`` reads the key slots ``[t0 - reach, t0 + chunk)`` (the local term never
    reaches further: the slot distance of two real tokens of one document is at least their position
    distance) plus the gathered extra keys (sinks / vertical blocks) before ``t0 - reach``. Chunks are
    batched (``unfold``) in groups of about ``max_elems`` mask entries, so SDPA sees many independent rows.
    With ``chunk >= T`` this is the plain dense-mask reference. ``pos, valid, doc``: ``[B, T]``;
    ``by_slot``: the positions are ``arange(T)`` (no padding, no packing). ``heads [Hkv]``: the rule's KV-head
    index of each head of ``k`` (default ``arange(Hkv)``; a head slice under sequence parallelism).
    """
    B, H, T, D = q.shape
    Hkv, dev = k.shape[1], q.device
    C = min(chunk, T)
    nC = -(-T // C)
    pad = min(rule.reach, (nC - 1) * C)
    Ck = C + pad
    right = nC * C - T
    h = _heads(rule, Hkv, dev, heads)
    h5 = h[:, None] if h is not None else None  # [1, 1, Hkv, 1, 1] against [B, g, Hm, C, Ck]
    valid_given = valid is not None
    if valid is None:
        valid = torch.ones(B, T, dtype=torch.bool, device=dev)
    kp, vp = F.pad(k, (0, 0, pad, right)), F.pad(v, (0, 0, pad, right))
    posp = F.pad(pos, (pad, right), value=-1)
    validp = F.pad(valid, (pad, right), value=False)
    docp = F.pad(doc, (pad, right), value=-1) if doc is not None else None
    qpos = F.pad(pos, (0, right)).view(B, nC, C)
    qdoc = F.pad(doc, (0, right)).view(B, nC, C) if doc is not None else None
    kpos_w, kval_w = posp.unfold(1, Ck, C), validp.unfold(1, Ck, C)  # [B, nC, Ck]
    kdoc_w = docp.unfold(1, Ck, C) if docp is not None else None
    qc = F.pad(q, (0, 0, 0, right)).view(B, H, nC, C, D)
    eye = torch.arange(C, device=dev)[:, None] + pad == torch.arange(Ck, device=dev)[None, :]
    cand = extra_candidates(rule, pos, Hkv, heads) if nC > 1 else None
    if cand is not None:
        idx, ok = _compact(cand & valid[:, None])  # [B, Hm, M]
        Hm, M = idx.shape[1], idx.shape[2]
        gidx = idx[..., None].expand(B, Hkv, M, D)
        ek, ev = torch.gather(k, 2, gidx), torch.gather(v, 2, gidx)
        epos = torch.gather(pos[:, None].expand(B, Hm, T), 2, idx)
        edoc = torch.gather(doc[:, None].expand(B, Hm, T), 2, idx) if doc is not None else None
    g = max(1, min(nC, max_elems // (B * C * Ck * (Hkv if rule.per_head else 1))))
    outs = []
    # a window without sinks over unpadded, unpacked rows depends on i - j only: one [C, Ck] mask for all
    # chunks (the first ones also drop the left padding of the key windows)
    shared = by_slot and valid_given is False and doc is None and cand is None and \
        isinstance(rule, SlidingWindowRule) and rule.num_sink_tokens == 0
    if shared:
        a, b = torch.arange(C, device=dev)[:, None], torch.arange(Ck, device=dev)[None, :]
        base = allowed(rule, a + pad, b)  # [C, Ck]
    for c0 in range(0, nC, g):
        c1 = min(nC, c0 + g)
        n_c = c1 - c0
        qp = qpos[:, c0:c1, None, :, None]  # [B, g, 1, C, 1]
        if shared:
            first = pad - torch.arange(c0, c1, device=dev) * C  # key-window offsets still in the left padding
            m = base & (b >= first[:, None, None, None]) if c0 * C < pad else base.expand(1, n_c, 1, C, Ck)
            m = m.expand(B, n_c, 1, C, Ck)
        else:
            m = allowed(rule, qp, kpos_w[:, c0:c1, None, None, :], h5) & kval_w[:, c0:c1, None, None, :]
            if qdoc is not None:
                m = m & (qdoc[:, c0:c1, None, :, None] == kdoc_w[:, c0:c1, None, None, :])
            m = m | eye  # every query sees itself: no empty row
        keys = kp.unfold(2, Ck, C)[:, :, c0:c1].permute(0, 2, 1, 4, 3)  # [B, g, Hkv, Ck, D]
        vals = vp.unfold(2, Ck, C)[:, :, c0:c1].permute(0, 2, 1, 4, 3)
        lo = torch.arange(c0, c1, device=dev) * C - pad  # first key slot of each chunk's window
        n = int((idx < lo[-1]).logical_and(ok).sum(-1).max()) if cand is not None else 0
        if n:
            sel = (idx[:, None, :, :n] < lo[None, :, None, None]) & ok[:, None, :, :n]  # [B, g, Hm, n]
            me = allowed(rule, qp, epos[:, None, :, None, :n], h5) & sel[:, :, :, None, :]
            if edoc is not None:
                me = me & (qdoc[:, c0:c1, None, :, None] == edoc[:, None, :, None, :n])
            Hb = max(m.shape[2], me.shape[2])
            m = torch.cat([m.expand(B, n_c, Hb, C, Ck), me.expand(B, n_c, Hb, C, n)], dim=-1)
            keys = torch.cat([keys, ek[:, None, :, :n].expand(B, n_c, Hkv, n, D)], dim=3)
            vals = torch.cat([vals, ev[:, None, :, :n].expand(B, n_c, Hkv, n, D)], dim=3)
        Tk = keys.shape[3]
        o = masked_attention(qc[:, :, c0:c1].transpose(1, 2).reshape(B * n_c, H, C, D),
                             keys.reshape(B * n_c, Hkv, Tk, D), vals.reshape(B * n_c, Hkv, Tk, D),
                             m.reshape(B * n_c, m.shape[2], C, Tk), scale)
        outs.append(o.view(B, n_c, H, C, D).transpose(1, 2).reshape(B, H, n_c * C, D))
    return torch.cat(outs, dim=2)[:, :, :T]


# ---------------------------------------------------------------------------------------------- Triton kernel
def kernel_attention(rule: Rule, q: Tensor, k: Tensor, v: Tensor, block_size: int | None, scale: float
                     ) -> Tensor | None:
    """The block-sparse Triton kernel (:mod:`zoo.kernels.block_sparse_attention`, imported lazily: optional) over
    the rule's block layout for unpadded, unpacked rows (token index = slot), kernel block ``block_size``; None when
    there is no kernel block or no kernel."""
    if block_size is None:
        return None
    try:
        from zoo.kernels.block_sparse_attention import block_sparse_attention
    except ImportError:
        return None
    T = q.shape[2]
    n = -(-T // block_size)
    layout = rule_layout(rule, n, n, block_size, device=q.device)
    window, sinks = rule.kernel_args(block_size)
    return block_sparse_attention(q, k, v, block_mask=layout, block_size=block_size, window=window,
                                  num_sink_tokens=sinks, scale=scale)


# ---------------------------------------------------------------------------------------------- cache
@dataclass
class SparseKVCache(State):
    """Bounded KV cache of a sparse-attention layer (keys after RoPE, absolute positions, -1 = empty slot).

    * ``k, v [B, Hkv, R, D]``, ``pos [B, 1, R]``: a ring of ``R = rule.ring_size`` slots, token at position
      ``p`` in slot ``rule.ring_slot(p)`` (latest wins): sinks + last ``window`` tokens (sliding window), the
      ``local_blocks`` most recent blocks (local-stride), the current block (block diagonal).
    * ``vk, vv [B, Hkv, C, D]``, ``vpos [B, Hkv, C]`` (local-stride only): each KV head's vertical blocks,
      compacted (slot ``(kb // stride) * bs + p % bs``); grows like ``N / vertical_stride``, as the pattern
      reads them. Empty (``C = 0``) for the other rules. ``vlen`` slots are in use: the host-side bound
      ``rule.vertical_capacity(length)`` (positions never exceed the slots absorbed), so writes need no sync.
    * ``length``: token slots absorbed (padding included), the cache's one count.
    """

    k: Tensor
    v: Tensor
    pos: Tensor
    vk: Tensor
    vv: Tensor
    vpos: Tensor
    length: int = 0
    vlen: int = 0
    padded: bool = False  # a call with an attention mask wrote into it (positions may then lag the slots)

    @property
    def nbytes(self) -> int:
        ring = sum(t.numel() * t.element_size() for t in (self.k, self.v, self.pos))
        per_slot = (self.vk[:, :, :1].numel() * 2) * self.vk.element_size() + self.vpos[:, :, :1].numel() * 8
        return ring + per_slot * self.vlen

    @classmethod
    def empty(cls, rule: Rule, B: int, Hkv: int, D: int, dtype: torch.dtype, device: torch.device | str,
              max_length: int = 0) -> SparseKVCache:
        R = rule.ring_size
        C = rule.vertical_capacity(max_length) if hasattr(rule, "vertical_capacity") else 0
        z = torch.zeros(B, Hkv, R, D, dtype=dtype, device=device)
        ve = torch.zeros(B, Hkv, C, D, dtype=dtype, device=device)
        return cls(z, z.clone(), torch.full((B, 1, R), -1, dtype=torch.long, device=device),
                   ve, ve.clone(), torch.full((B, Hkv, C), -1, dtype=torch.long, device=device))

    def _reserve_vertical(self, rule: Rule) -> None:
        """Make room in the vertical store for every position below ``length`` (host-side bound, no sync)."""
        need = rule.vertical_capacity(self.length)
        if need > self.vk.shape[2]:
            grow = max(need, 2 * self.vk.shape[2]) - self.vk.shape[2]
            self.vk, self.vv = F.pad(self.vk, (0, 0, 0, grow)), F.pad(self.vv, (0, 0, 0, grow))
            self.vpos = F.pad(self.vpos, (0, grow), value=-1)
        self.vlen = max(self.vlen, need)

    def attend(self, rule: Rule, q: Tensor, k: Tensor | None, v: Tensor | None, pos: Tensor, real: Tensor,
               scale: float) -> Tensor:
        """Attention of a chunk (``q [B, H, T, D]``, its ``k, v``, ``pos, real [B, T]``) over the cache and
        itself. Ring keys use the local term only when a vertical store holds the extra keys (so no key is
        counted twice), the store keys the extra-and-not-local term, the chunk's own keys the whole rule."""
        B, Hkv, T = q.shape[0], self.k.shape[1], q.shape[2]
        dev = q.device
        h = _heads(rule, Hkv, dev)
        qp = pos[:, None, :, None]
        split = hasattr(rule, "vertical_slot")  # extra keys live in the vertical store, not in the ring
        m_ring = allowed(rule, qp, self.pos[:, :, None, :], h, "local" if split else "all")
        m_ring = m_ring & (self.pos >= 0)[:, :, None, :]
        parts_m, parts_k, parts_v = [m_ring], [self.k], [self.v]
        if k is not None:  # the chunk's own keys (not yet written)
            eye = torch.arange(T, device=dev)
            m_new = (allowed(rule, qp, pos[:, None, None, :], h) & real[:, None, None, :]) | (eye[:, None] == eye)
            parts_m.append(m_new)
            parts_k.append(k)
            parts_v.append(v)
        if self.vlen:
            vp = self.vpos[:, :, : self.vlen]
            m_vert = allowed(rule, qp, vp[:, :, None, :], h, "extra") & (vp >= 0)[:, :, None, :]
            parts_m.insert(1, m_vert)
            parts_k.insert(1, self.vk[:, :, : self.vlen])
            parts_v.insert(1, self.vv[:, :, : self.vlen])
        if len(parts_m) == 1:  # decode step after an in-place write: no copy of the ring
            return masked_attention(q, self.k, self.v, m_ring, scale)
        Hb = max(p.shape[1] for p in parts_m)
        mask = torch.cat([p.expand(B, Hb, T, -1) for p in parts_m], dim=-1)
        return masked_attention(q, torch.cat(parts_k, 2), torch.cat(parts_v, 2), mask, scale)

    def full_ring_ready(self, rule: Rule) -> bool:
        """Whether this decode step can take :meth:`full_ring_step` (host-side facts only, no sync): the rule's full
        ring is all visible (``rule.ring_all_visible``), no padded call has written into the cache, and the ring is
        full after this token."""
        return getattr(rule, "ring_all_visible", False) and not self.padded and self.length + 1 >= rule.ring_size

    def full_ring_step(self, rule: Rule, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor | None:
        """The decode step of a rule whose full ring is all visible (:meth:`full_ring_ready`): write ``k, v
        [B, Hkv, 1, D]`` into the slot of position ``length`` (a host-side index: no scatter, no sync) and attend
        to the whole ring without a mask. One query per head and no mask, so the ``G`` query heads of a KV head fold
        into its query axis (``q [B, Hkv, G, D]``): one SDPA over the ring, no repeated keys. Returns ``o [B, H, 1,
        D]``, or None (nothing written) when the step does not apply."""
        if not self.full_ring_ready(rule):
            return None
        slot = rule.ring_slot_int(self.length)
        self.k.narrow(2, slot, 1).copy_(k)
        self.v.narrow(2, slot, 1).copy_(v)
        self.pos.narrow(2, slot, 1).fill_(self.length)
        self.length += 1
        B, H, _, D = q.shape
        Hkv = k.shape[1]
        o = F.scaled_dot_product_attention(q.reshape(B, Hkv, H // Hkv, D), self.k, self.v, scale=scale)
        return o.view(B, H, 1, D)

    def write_step(self, rule: Rule, k: Tensor, v: Tensor, pos: Tensor) -> None:
        """In-place write of one real token per row (``k, v [B, Hkv, 1, D]``, ``pos [B, 1]``), O(Hkv * D).
        Only for decode without autograd; written *before* :meth:`attend` (safe for a single token: the
        slot it overwrites holds a key no later query can see)."""
        B, Hkv, _, D = k.shape
        self.length += 1
        slot = rule.ring_slot(pos)[:, None]  # [B, 1, 1]
        self.k.scatter_(2, slot[..., None].expand(B, Hkv, 1, D), k)
        self.v.scatter_(2, slot[..., None].expand(B, Hkv, 1, D), v)
        self.pos.scatter_(2, slot, pos[:, None])
        if hasattr(rule, "vertical_slot"):
            self._reserve_vertical(rule)
            vs = rule.vertical_slot(pos[:, None, :], torch.arange(Hkv, device=k.device)[None, :, None])
            vs = vs.expand(B, Hkv, 1)
            w, idx = vs >= 0, vs.clamp(min=0)  # heads that keep this token beyond the local window
            gi = idx[..., None].expand(B, Hkv, 1, D)
            self.vk.scatter_(2, gi, torch.where(w[..., None], k, self.vk.gather(2, gi)))
            self.vv.scatter_(2, gi, torch.where(w[..., None], v, self.vv.gather(2, gi)))
            self.vpos.scatter_(2, idx, torch.where(w, pos[:, None].expand(B, Hkv, 1), self.vpos.gather(2, idx)))

    def prefill(self, rule: Rule, q: Tensor, k: Tensor, v: Tensor, pos: Tensor, real: Tensor, scale: float,
                chunk: int = 512) -> Tensor:
        """Continue with ``T`` tokens: each piece of ``chunk`` tokens attends to the cache and itself
        (:meth:`attend`), then is written (:meth:`write`) -> ``o [B, H, T, D]``."""
        outs = []
        for t0 in range(0, q.shape[2], chunk):
            sl = slice(t0, t0 + chunk)
            q_, k_, v_ = q[:, :, sl], k[:, :, sl], v[:, :, sl]
            outs.append(self.attend(rule, q_, k_, v_, pos[:, sl], real[:, sl], scale))
            self.write(rule, k_, v_, pos[:, sl], real[:, sl])
        return torch.cat(outs, dim=2)

    def write(self, rule: Rule, k: Tensor, v: Tensor, pos: Tensor, real: Tensor) -> None:
        """Store the chunk's real tokens (after :meth:`attend`)."""
        B, Hkv, T, D = k.shape
        self.length += T
        self.k, self.v, self.pos = _scatter_latest(self.k, self.v, self.pos, rule.ring_slot(pos)[:, None],
                                                   k, v, pos, real[:, None])
        if hasattr(rule, "vertical_slot"):
            self._reserve_vertical(rule)
            h = torch.arange(Hkv, device=k.device)[None, :, None]
            slot = rule.vertical_slot(pos[:, None, :], h).expand(B, Hkv, T)  # [B, Hkv, T]
            write = real[:, None] & (slot >= 0)
            self.vk, self.vv, self.vpos = _scatter_latest(self.vk, self.vv, self.vpos, slot, k, v, pos, write)


def _scatter_latest(bk: Tensor, bv: Tensor, bpos: Tensor, slot: Tensor, k: Tensor, v: Tensor, pos: Tensor,
                    write: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Write token ``t`` of ``k, v [B, Hkv, T, D]`` into slot ``slot[b, hs, t]`` of ``bk, bv [B, Hkv, C, D]``
    where ``write``; when several tokens of the chunk map to one slot the latest wins (ring semantics).
    ``Hs`` (the head axis of ``slot``, ``bpos``) is 1 (same slots for all heads) or ``Hkv``."""
    B, Hkv, T, D = k.shape
    Hs, C = slot.shape[1], bk.shape[2]
    t = torch.arange(T, device=k.device).expand(B, Hs, T)
    src = torch.full((B, Hs, C), -1, dtype=torch.long, device=k.device)
    src = src.scatter_reduce(2, slot.clamp(min=0), torch.where(write, t, -1), "amax", include_self=True)
    has, g = src >= 0, src.clamp(min=0)  # [B, Hs, C]
    gi = g[..., None].expand(B, Hkv, C, D)
    nk = torch.where(has[..., None], torch.gather(k, 2, gi), bk)
    nv = torch.where(has[..., None], torch.gather(v, 2, gi), bv)
    npos = torch.where(has, torch.gather(pos[:, None].expand(B, Hs, T), 2, g), bpos)
    return nk, nv, npos


# ---------------------------------------------------------------------------------------------- CPU fast paths
def _fold(x: Tensor, C: int, nC: int) -> Tensor:
    """``[B, H, T, D]`` -> ``[B * nC, H, C, D]`` (right-padded to ``nC * C``)."""
    B, H, T, D = x.shape
    x = F.pad(x, (0, 0, 0, nC * C - T))
    return x.view(B, H, nC, C, D).transpose(1, 2).reshape(B * nC, H, C, D)


def block_diagonal_attention(q: Tensor, k: Tensor, v: Tensor, block_size: int, scale: float) -> Tensor:
    """Block-diagonal causal attention of unpadded rows (token index = slot): the blocks folded into the batch,
    one causal SDPA call (differentiable)."""
    B, H, T, D = q.shape
    C = min(block_size, T)
    nC = -(-T // C)
    o = F.scaled_dot_product_attention(_fold(q, C, nC), _fold(k, C, nC), _fold(v, C, nC), is_causal=True,
                                       scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return o.view(B, nC, H, C, D).transpose(1, 2).reshape(B, H, nC * C, D)[:, :, :T]


# ---------------------------------------------------------------------------------------------- LaCT's window
def cached_window_attention(rule: SlidingWindowRule, q: Tensor, k: Tensor, v: Tensor, positions: Tensor,
                            real: Tensor | None, seq_idx: Tensor | None, cache: SparseKVCache | None,
                            scale: float) -> Tensor:
    """The sliding-window branch of :class:`~zoo.layers.lact.LaCT`: ``q, k, v [B, H, T, hd]`` (after RoPE) ->
    ``[B, T, H * hd]``. Without a cache: causal SDPA when the window covers unpadded, unpacked rows, else
    :func:`blocked_attention`; with one: a decode step (one real token, no key gradient) writes in place then
    attends, longer calls attend and write in pieces of 512 tokens."""
    B, _, T, _ = q.shape
    if cache is None:
        by_slot = real is None and seq_idx is None and \
            torch.equal(positions, torch.arange(T, device=q.device).expand(B, T))
        if by_slot and T <= rule.window:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        else:
            o = blocked_attention(rule, q, k, v, positions, real, seq_idx, scale, 128, by_slot=by_slot)
    else:
        ok = torch.ones(B, T, dtype=torch.bool, device=q.device) if real is None else real
        if T == 1 and real is None and not (torch.is_grad_enabled() and k.requires_grad):
            cache.write_step(rule, k, v, positions)  # decode: in place, then attend
            o = cache.attend(rule, q, None, None, positions, ok, scale)
        else:
            o = cache.prefill(rule, q, k, v, positions, ok, scale)
    return o.transpose(1, 2).reshape(B, T, -1)
