"""Mask rules of the sparse-attention mixers, shared by the torch paths, the bounded KV caches and the kernel.

Every rule is a predicate over *token indices* ``i`` (query) and ``j`` (key): the position of the token
inside its sequence (document), i.e. the number of real tokens before it. With left padding these are the
positions derived from the attention mask (``cumsum(mask) - 1``), so a padded row sees exactly what the
unpadded row sees. Block indices are ``qb = i // bs``, ``kb = j // bs`` (absolute, from the sequence start).

Every rule is ``allowed(i, j, h) = (j <= i) & (local(i, j) | extra(j, h))``, with ``h`` the KV head:

* sliding window + sinks (transformers / Mistral convention, StreamingLLM sinks at absolute positions)::

      local = i - j < window             (window tokens *including* the current one)
      extra = j < num_sink_tokens

* local + vertical stride (dkernel ``get_sparse_attn_mask``, LongGen "BlockSparse", Phi-3-small)::

      local = qb - kb < local_blocks      (block-granular; the count includes the current block)
      extra = (kb + h * step + head_sliding_offset) % vertical_stride == 0
      step  = max(1, int(vertical_stride / num_heads))   (num_heads = query heads, h = KV head index)

  ``homo_head``: every head uses the pattern of ``h = 0``; the last ``num_dense_heads`` KV heads are dense
  (``extra = True``). Diagonal blocks are token-causal (``j <= i``).

* block diagonal (MASFormer local attention)::

      local = i // bs == j // bs,         extra = False

``local(i, j)`` implies ``i - j <= reach`` (the chunked path and the caches rely on it); ``extra`` depends
only on the key, so the keys it admits can be gathered once per sequence ("extra candidates").

Block layouts (``[Hm, nQB, nKB]`` bool, ``Hm`` = 1 or the number of KV heads) tell a block-sparse kernel which
key blocks each query block visits; inside a visited block the kernel applies
``(j <= i) & (window is None or i - j < window or j < num_sink_tokens)``. The layouts live here only
(``rule_layout`` and the three builders; the kernel, its tests and benchmarks use them), and so does their
expansion to tokens (``layout_to_token_mask``), so tests can check ``layout (x) in-block rule == allowed``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


# ---------------------------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class SlidingWindowRule:
    window: int
    num_sink_tokens: int = 0
    per_head = False

    @property
    def reach(self) -> int:
        return self.window - 1

    def local(self, i: Tensor, j: Tensor) -> Tensor:
        return (i - j) < self.window

    def extra(self, j: Tensor, h: Tensor | None = None) -> Tensor | None:
        return (j < self.num_sink_tokens) if self.num_sink_tokens > 0 else None

    # cache: sinks in slots [0, S), the other tokens in a ring of `window` slots (latest wins)
    @property
    def ring_size(self) -> int:
        return self.num_sink_tokens + self.window

    def ring_slot(self, p: Tensor) -> Tensor:
        S = self.num_sink_tokens
        return torch.where(p < S, p, S + (p - S).remainder(self.window))

    # Once the ring holds ring_size tokens of consecutive positions, every slot is visible to the newest query
    # (the sinks, and the window ending at it): a decode step then attends to the whole ring without a mask.
    ring_all_visible = True

    def ring_slot_int(self, p: int) -> int:
        S = self.num_sink_tokens
        return p if p < S else S + (p - S) % self.window

    def kernel_args(self, kernel_block: int) -> tuple[int | None, int]:
        return self.window, self.num_sink_tokens

    # counts of keys per query (FLOPs), closed forms of ``allowed`` (tested against a brute-force enumeration)
    def local_count(self, i: Tensor) -> Tensor:
        return (i + 1).clamp(max=self.window)

    def extra_count(self, i: Tensor, h: Tensor | None = None) -> Tensor:
        return (i - self.window + 1).clamp(min=0, max=self.num_sink_tokens)


@dataclass(frozen=True)
class LocalStrideRule:
    block_size: int
    local_blocks: int
    vertical_stride: int
    num_heads: int
    num_kv_heads: int
    head_sliding_offset: int = 0
    homo_head: bool = False
    num_dense_heads: int = 0
    per_head = True

    @property
    def step(self) -> int:
        return max(1, int(self.vertical_stride / (1 if self.homo_head else self.num_heads)))

    @property
    def reach(self) -> int:
        return self.local_blocks * self.block_size - 1

    def local(self, i: Tensor, j: Tensor) -> Tensor:
        return (i // self.block_size - j // self.block_size) < self.local_blocks

    def vertical(self, kb: Tensor, h: Tensor) -> Tensor:
        """``kb`` block indices, ``h`` KV-head indices (broadcastable)."""
        if self.homo_head:
            h = torch.zeros_like(h)
        vert = (kb + h * self.step + self.head_sliding_offset).remainder(self.vertical_stride) == 0
        if self.num_dense_heads:
            vert = vert | (h >= self.num_kv_heads - self.num_dense_heads)
        return vert

    def extra(self, j: Tensor, h: Tensor | None = None) -> Tensor | None:
        assert h is not None
        return self.vertical(j // self.block_size, h)

    @property
    def ring_size(self) -> int:  # the local blocks
        return self.local_blocks * self.block_size

    def ring_slot(self, p: Tensor) -> Tensor:
        return p.remainder(self.ring_size)

    def vertical_slot(self, p: Tensor, h: Tensor) -> Tensor:
        """Slot of token ``p`` in head ``h``'s store of vertical blocks, -1 if that head never needs it again
        once it leaves the local window (dense heads keep every token)."""
        kb = p // self.block_size
        slot = (kb // self.vertical_stride) * self.block_size + p.remainder(self.block_size)
        if self.num_dense_heads:
            dense = h >= self.num_kv_heads - self.num_dense_heads
            slot = torch.where(dense, p, slot)
        return torch.where(self.vertical(kb, h), slot, torch.full_like(slot, -1))

    def local_count(self, i: Tensor) -> Tensor:
        first = ((i // self.block_size - self.local_blocks + 1) * self.block_size).clamp(min=0)
        return i - first + 1

    def extra_count(self, i: Tensor, h: Tensor | None = None) -> Tensor:
        """Keys of the vertical blocks before the local ones: whole blocks ``kb <= qb - local_blocks``."""
        assert h is not None
        last = i // self.block_size - self.local_blocks  # last non-local key block (< 0: none)
        if self.homo_head:
            h = torch.zeros_like(h)
        c = h * self.step + self.head_sliding_offset  # kb is vertical iff (kb + c) % stride == 0
        s = self.vertical_stride
        n_vert = torch.div(last + c, s, rounding_mode="floor") - torch.div(c - 1, s, rounding_mode="floor")
        if self.num_dense_heads:
            n_vert = torch.where(h >= self.num_kv_heads - self.num_dense_heads, last + 1, n_vert)
        return torch.where(last >= 0, n_vert * self.block_size, torch.zeros_like(n_vert))

    def vertical_capacity(self, n_tokens: int) -> int:
        """Slots of the vertical store that positions ``< n_tokens`` can need (a bound computed on the host)."""
        if n_tokens <= 0:
            return 0
        if self.num_dense_heads:
            return n_tokens
        return ((n_tokens - 1) // (self.block_size * self.vertical_stride) + 1) * self.block_size

    def kernel_args(self, kernel_block: int) -> tuple[int | None, int]:
        return None, 0


@dataclass(frozen=True)
class BlockDiagonalRule:
    block_size: int
    per_head = False

    @property
    def reach(self) -> int:
        return self.block_size - 1

    def local(self, i: Tensor, j: Tensor) -> Tensor:
        return (i // self.block_size) == (j // self.block_size)

    def extra(self, j: Tensor, h: Tensor | None = None) -> Tensor | None:
        return None

    @property
    def ring_size(self) -> int:  # the current block
        return self.block_size

    def ring_slot(self, p: Tensor) -> Tensor:
        return p.remainder(self.block_size)

    def kernel_args(self, kernel_block: int) -> tuple[int | None, int]:
        return None, 0

    def local_count(self, i: Tensor) -> Tensor:
        return i % self.block_size + 1

    def extra_count(self, i: Tensor, h: Tensor | None = None) -> Tensor:
        return torch.zeros_like(i)


Rule = SlidingWindowRule | LocalStrideRule | BlockDiagonalRule


def allowed(rule: Rule, i: Tensor, j: Tensor, h: Tensor | None = None, part: str = "all") -> Tensor:
    """Token predicate (broadcasting ``i``, ``j``, ``h``). ``part``: ``"all"`` the rule, ``"local"`` its local
    term only, ``"extra"`` keys admitted by the extra term and not by the local one (used by caches that
    store the two kinds of keys apart, so that no key is counted twice)."""
    causal = j <= i
    local = rule.local(i, j)
    if part == "local":
        return causal & local
    extra = rule.extra(j, h)
    if part == "extra":
        return causal & ~local & extra if extra is not None else torch.zeros_like(causal)
    return causal & (local | extra) if extra is not None else causal & local


def attended_pairs(rule: Rule, T: int, context: int = 0, num_kv_heads: int = 1) -> int:
    """Number of (query, key, KV head) triples the rule allows for the queries at positions
    ``context .. context + T - 1`` (keys: every earlier position, from 0), summed over the ``num_kv_heads`` KV
    heads. The attention FLOPs of those queries are ``4 * head_dim * (num_heads / num_kv_heads) * pairs``."""
    i = torch.arange(context, context + T, dtype=torch.long)
    local = int(rule.local_count(i).sum())
    if not rule.per_head:
        return num_kv_heads * (local + int(rule.extra_count(i).sum()))
    h = torch.arange(num_kv_heads, dtype=torch.long)[:, None]
    return num_kv_heads * local + int(rule.extra_count(i[None, :], h).sum())


def extra_candidates(rule: Rule, pos: Tensor, num_kv_heads: int, heads: Tensor | None = None) -> Tensor | None:
    """``pos [B, T]`` -> ``[B, Hm, T]`` bool: keys the extra term may admit (sinks, vertical blocks), or None.
    ``heads [num_kv_heads]``: the KV-head index of each head (default ``arange``; a subset of heads, e.g. one
    rank's slice under sequence parallelism)."""
    if heads is None:
        heads = torch.arange(num_kv_heads, device=pos.device)
    h = heads[None, :, None] if rule.per_head else None
    e = rule.extra(pos[:, None, :], h)
    return e if e is None or e.shape[1] > 1 else e.expand(pos.shape[0], 1, pos.shape[1])


# ---------------------------------------------------------------------------------------------- layouts
def _block_grid(n_q_blocks: int, n_k_blocks: int, device: torch.device | str | None) -> tuple[Tensor, Tensor]:
    qb = torch.arange(n_q_blocks, device=device)[:, None]
    kb = torch.arange(n_k_blocks, device=device)[None, :]
    return qb, kb


def sliding_window_layout(n_q_blocks: int, n_k_blocks: int, block_size: int, window: int,
                          num_sink_tokens: int = 0, device: torch.device | str | None = None) -> Tensor:
    """``[1, nQB, nKB]``: blocks holding a pair (i, j) with ``j <= i`` and (``i - j < window`` or ``j < S``)."""
    qb, kb = _block_grid(n_q_blocks, n_k_blocks, device)
    min_dist = ((qb - kb) * block_size - (block_size - 1)).clamp(min=0)  # smallest i - j over the block pair
    return ((kb <= qb) & ((min_dist < window) | (kb * block_size < num_sink_tokens)))[None]


def local_stride_layout(n_q_blocks: int, n_k_blocks: int, rule: LocalStrideRule,
                        device: torch.device | str | None = None) -> Tensor:
    """``[Hkv or 1, nQB, nKB]``: dkernel's block mask ``(qb >= kb) & ((qb - kb < L) | vertical(kb, h))``."""
    qb, kb = _block_grid(n_q_blocks, n_k_blocks, device)
    Hm = 1 if rule.homo_head and not rule.num_dense_heads else rule.num_kv_heads
    h = torch.arange(Hm, device=device)[:, None, None]
    return (kb <= qb) & ((qb - kb < rule.local_blocks) | rule.vertical(kb, h))


def block_diagonal_layout(n_q_blocks: int, n_k_blocks: int, kernel_block: int, block_size: int,
                          device: torch.device | str | None = None) -> Tensor:
    """``[1, nQB, nKB]`` for kernel blocks of ``kernel_block`` tokens (``block_size % kernel_block == 0``)."""
    if block_size % kernel_block:
        raise ValueError(f"block_size={block_size} must be a multiple of the kernel block {kernel_block}")
    qb, kb = _block_grid(n_q_blocks, n_k_blocks, device)
    r = block_size // kernel_block
    return ((kb <= qb) & (qb // r == kb // r))[None]


def rule_layout(rule: Rule, n_q_blocks: int, n_k_blocks: int, kernel_block: int,
                device: torch.device | str | None = None) -> Tensor:
    if isinstance(rule, SlidingWindowRule):
        return sliding_window_layout(n_q_blocks, n_k_blocks, kernel_block, rule.window, rule.num_sink_tokens, device)
    if isinstance(rule, LocalStrideRule):
        if kernel_block != rule.block_size:
            raise ValueError(f"local-stride layouts use kernel blocks of block_size={rule.block_size}")
        return local_stride_layout(n_q_blocks, n_k_blocks, rule, device)
    return block_diagonal_layout(n_q_blocks, n_k_blocks, kernel_block, rule.block_size, device)


def layout_to_token_mask(layout: Tensor, block_size: int, T: int, window: int | None = None,
                         num_sink_tokens: int = 0, *, num_heads: int | None = None,
                         rows: tuple[int, int] | None = None) -> Tensor:
    """Expand a block layout ``[Hm, nQB, nKB]`` to the token mask ``[Hm, T, T]`` with the kernel's in-block rule::

        mask[h, i, j] = layout[h, i // bs, j // bs] & (j <= i) & (window is None | i - j < window | j < sinks)

    The one expansion of a layout (the block-sparse kernel's reference, its FLOP count and the tests use it).
    ``num_heads``: expand a per-KV-head layout (``Hm > 1``) to that many query heads (head ``h`` reads layout head
    ``h // (num_heads / Hm)``); a shared layout stays ``[1, ...]``. ``rows=(start, stop)``: only those queries
    (``[Hm, stop - start, T]``), to count a long sequence in pieces."""
    nb = -(-T // block_size)
    if layout.dim() != 3 or tuple(layout.shape[1:]) != (nb, nb):
        raise ValueError(f"layout must have shape [Hm, {nb}, {nb}] for T={T}, block_size={block_size}; "
                         f"got {tuple(layout.shape)}")
    start, stop = rows if rows is not None else (0, T)
    i = torch.arange(start, stop, device=layout.device)[:, None]
    j = torch.arange(T, device=layout.device)[None, :]
    mask = layout.bool()[:, i // block_size, j // block_size] & (j <= i)  # [Hm, rows, T]
    if window is not None:
        mask = mask & (((i - j) < window) | (j < num_sink_tokens))
    hm = mask.shape[0]
    if num_heads is not None and hm > 1:
        if num_heads % hm:
            raise ValueError(f"num_heads={num_heads} is not a multiple of the layout's {hm} heads")
        mask = mask.repeat_interleave(num_heads // hm, dim=0)
    return mask
