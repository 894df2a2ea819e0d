"""Torch compute of the sparse-attention mixers: masked SDPA, the blocked O(T * reach) parallel path, and the
bounded KV cache (:class:`SparseKVCache`). The mask rules live in :mod:`zoo.layers.masks`.

Shapes: ``q [B, H, T, D]``, ``k, v [B, Hkv, T, D]``, masks ``[B, Hm, Tq, Tk]`` with ``Hm`` in ``{1, Hkv}``
(a per-KV-head mask is shared by the ``G = H / Hkv`` query heads of that KV head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from zoo.layers.base import State
from zoo.layers.masks import Rule, allowed, extra_candidates


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


def _heads(rule: Rule, num_kv_heads: int, device: torch.device) -> Tensor | None:
    return torch.arange(num_kv_heads, device=device)[None, :, None, None] if rule.per_head else None


def _compact(cand: Tensor) -> tuple[Tensor, Tensor]:
    """``cand [B, Hm, T]`` bool -> indices of the True entries in ascending order ``[B, Hm, M]`` and a
    validity mask (rows have different counts; the tail is padding)."""
    counts = cand.sum(-1)
    M = int(counts.max()) if cand.numel() else 0
    idx = torch.sort((~cand).to(torch.int8), dim=-1, stable=True).indices[..., :M]
    ok = torch.arange(M, device=cand.device) < counts[..., None]
    return idx, ok


def blocked_attention(rule: Rule, q: Tensor, k: Tensor, v: Tensor, pos: Tensor, valid: Tensor | None,
                      doc: Tensor | None, scale: float, chunk: int) -> Tensor:
    """Parallel sparse attention, query chunk by query chunk; memory O(chunk * (chunk + reach + extras)).

    Query chunk ``[t0, t1)`` reads the key slots ``[t0 - reach, t1)`` (the local term never reaches
    further, since the slot distance of two real tokens of one document is at least their position
    distance) plus the gathered extra keys (sinks / vertical blocks) before ``t0 - reach``. With
    ``chunk >= T`` this is the plain dense-mask reference. ``pos, valid, doc``: ``[B, T]``.
    """
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    dev = q.device
    h = _heads(rule, Hkv, dev)
    slots = torch.arange(T, device=dev)
    cand = extra_candidates(rule, pos, Hkv) if chunk < T else None
    if cand is not None:
        if valid is not None:
            cand = cand & valid[:, None]
        idx, ok = _compact(cand)  # [B, Hm, M]
        Hm, M = idx.shape[1], idx.shape[2]
        gidx = idx[..., None].expand(B, Hkv, M, D)
        ek, ev = torch.gather(k, 2, gidx), torch.gather(v, 2, gidx)
        epos = torch.gather(pos[:, None].expand(B, Hm, T), 2, idx)
        edoc = torch.gather(doc[:, None].expand(B, Hm, T), 2, idx) if doc is not None else None
    outs = []
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        lo = max(0, t0 - rule.reach)
        qp = pos[:, None, t0:t1, None]  # [B, 1, Tq, 1]
        m = allowed(rule, qp, pos[:, None, None, lo:t1], h)
        if valid is not None:
            m = m & valid[:, None, None, lo:t1]
        if doc is not None:
            m = m & (doc[:, None, t0:t1, None] == doc[:, None, None, lo:t1])
        m = m | (slots[t0:t1, None] == slots[None, lo:t1])  # every query sees itself: no empty row
        keys, vals = k[:, :, lo:t1], v[:, :, lo:t1]
        if cand is not None and lo > 0:
            sel = ok & (idx < lo)
            n = int(sel.sum(-1).max())
            if n:
                me = allowed(rule, qp, epos[:, :, None, :n], h) & sel[:, :, None, :n]
                if edoc is not None:
                    me = me & (doc[:, None, t0:t1, None] == edoc[:, :, None, :n])
                Hb = max(m.shape[1], me.shape[1])
                m = torch.cat([m.expand(B, Hb, -1, -1), me.expand(B, Hb, -1, -1)], dim=-1)
                keys = torch.cat([keys, ek[:, :, :n]], dim=2)
                vals = torch.cat([vals, ev[:, :, :n]], dim=2)
        outs.append(masked_attention(q[:, :, t0:t1], keys, vals, m, scale))
    return torch.cat(outs, dim=2)


# ---------------------------------------------------------------------------------------------- cache
@dataclass
class SparseKVCache(State):
    """Bounded KV cache of a sparse-attention layer (keys after RoPE, absolute positions, -1 = empty slot).

    * ``k, v [B, Hkv, R, D]``, ``pos [B, 1, R]``: a ring of ``R = rule.ring_size`` slots, token at position
      ``p`` in slot ``rule.ring_slot(p)`` (latest wins): sinks + last ``window`` tokens (sliding window), the
      ``local_blocks`` most recent blocks (local-stride), the current block (block diagonal).
    * ``vk, vv [B, Hkv, C, D]``, ``vpos [B, Hkv, C]`` (local-stride only): each KV head's vertical blocks,
      compacted (slot ``(kb // stride) * bs + p % bs``); grows like ``N / vertical_stride``, as the pattern
      reads them. Empty (``C = 0``) for the other rules.
    """

    k: Tensor
    v: Tensor
    pos: Tensor
    vk: Tensor
    vv: Tensor
    vpos: Tensor
    next_pos: Tensor | None = None  # [B] position of each row's next real token (when positions are not given)
    vlen: int = 0  # used slots of the vertical store

    @property
    def nbytes(self) -> int:
        ring = sum(t.numel() * t.element_size() for t in (self.k, self.v, self.pos))
        per_slot = (self.vk[:, :, :1].numel() * 2) * self.vk.element_size() + self.vpos[:, :, :1].numel() * 8
        return ring + per_slot * self.vlen

    @classmethod
    def empty(cls, rule: Rule, B: int, Hkv: int, D: int, dtype: torch.dtype, device: torch.device | str
              ) -> SparseKVCache:
        R = rule.ring_size
        z = torch.zeros(B, Hkv, R, D, dtype=dtype, device=device)
        ve = torch.zeros(B, Hkv, 0, D, dtype=dtype, device=device)
        return cls(z, z.clone(), torch.full((B, 1, R), -1, dtype=torch.long, device=device),
                   ve, ve.clone(), torch.zeros(B, Hkv, 0, dtype=torch.long, device=device))

    def attend(self, rule: Rule, q: Tensor, k: Tensor, v: Tensor, pos: Tensor, real: Tensor, scale: float) -> Tensor:
        """Attention of a chunk (``q [B, H, T, D]``, its ``k, v``, ``pos, real [B, T]``) over the cache and
        itself. Ring keys use the local term only when a vertical store holds the extra keys (so no key is
        counted twice), the store keys the extra-and-not-local term, the chunk's own keys the whole rule."""
        B, Hkv, T = k.shape[0], k.shape[1], k.shape[2]
        dev = q.device
        h = _heads(rule, Hkv, dev)
        qp = pos[:, None, :, None]
        split = hasattr(rule, "vertical_slot")  # extra keys live in the vertical store, not in the ring
        m_ring = allowed(rule, qp, self.pos[:, :, None, :], h, "local" if split else "all")
        m_ring = m_ring & (self.pos >= 0)[:, :, None, :]
        eye = torch.arange(T, device=dev)
        m_new = (allowed(rule, qp, pos[:, None, None, :], h) & real[:, None, None, :]) | (eye[:, None] == eye)
        parts_m, parts_k, parts_v = [m_ring, m_new], [self.k, k], [self.v, v]
        if self.vlen:
            vp = self.vpos[:, :, : self.vlen]
            m_vert = allowed(rule, qp, vp[:, :, None, :], h, "extra") & (vp >= 0)[:, :, None, :]
            parts_m.insert(1, m_vert)
            parts_k.insert(1, self.vk[:, :, : self.vlen])
            parts_v.insert(1, self.vv[:, :, : self.vlen])
        Hb = max(p.shape[1] for p in parts_m)
        mask = torch.cat([p.expand(B, Hb, T, -1) for p in parts_m], dim=-1)
        return masked_attention(q, torch.cat(parts_k, 2), torch.cat(parts_v, 2), mask, scale)

    def write(self, rule: Rule, k: Tensor, v: Tensor, pos: Tensor, real: Tensor) -> None:
        """Store the chunk's real tokens (after :meth:`attend`)."""
        B, Hkv, T, D = k.shape
        self.k, self.v, self.pos = _scatter_latest(self.k, self.v, self.pos, rule.ring_slot(pos)[:, None],
                                                   k, v, pos, real[:, None])
        if hasattr(rule, "vertical_slot"):
            h = torch.arange(Hkv, device=k.device)[None, :, None]
            slot = rule.vertical_slot(pos[:, None, :], h).expand(B, Hkv, T)  # [B, Hkv, T]
            write = real[:, None] & (slot >= 0)
            if bool(write.any()):
                need = int(slot[write].max()) + 1
                if need > self.vk.shape[2]:
                    grow = max(need, 2 * self.vk.shape[2]) - self.vk.shape[2]
                    self.vk, self.vv = F.pad(self.vk, (0, 0, 0, grow)), F.pad(self.vv, (0, 0, 0, grow))
                    self.vpos = F.pad(self.vpos, (0, grow), value=-1)
                self.vk, self.vv, self.vpos = _scatter_latest(self.vk, self.vv, self.vpos, slot, k, v, pos, write)
                self.vlen = max(self.vlen, need)


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
