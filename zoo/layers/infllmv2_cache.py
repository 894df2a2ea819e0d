"""The ``infllmv2`` mixer's decode state: a KV cache in position space plus the compressed keys of every complete
window, appended one per stride as the cache fills (as the reference's decode does).

Slot ``t`` of ``k, v [B, Hkv, cap + 1, D]`` holds the row's token at position ``t``; the last slot takes padded
tokens. ``c1 [B, Hkv, n1(cap), D]`` holds the means of the windows ``k[j s : j s + ks]`` and, for the v2 selection,
``c2 [B, Hkv, n2(cap), D]`` those of ``k[4 j s : 4 j s + 4 ks]`` (``n(cap) = (cap - size) // stride + 1``). With
``use_nope`` the windows average the pre-RoPE selection keys ``sk`` instead of ``k``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from zoo.kernels.infllmv2 import compress_keys, visible_windows
from zoo.layers.base import State


@dataclass
class InfLLMv2Cache(State):
    """KV cache in position space (slot ``t`` = the row's token at position ``t``; the last slot takes padded tokens)
    plus the compressed keys of every complete window: ``k, v, sk [B, Hkv, cap + 1, D]`` (``sk``: pre-RoPE selection
    keys with ``use_nope``, else empty), ``c1 [B, Hkv, n1(cap), D]``, ``c2 [B, Hkv, n2(cap), D]`` (v2)."""

    k: Tensor
    v: Tensor
    sk: Tensor
    c1: Tensor
    c2: Tensor
    next_pos: Tensor  # [B] position of each row's next real token: the state's count of absorbed tokens
    bound: int = 0  # host-side upper bound of next_pos (all tokens absorbed, padded too): sizes the buffers

    windows: tuple[int, int, int, int] = (1, 1, 1, 1)  # (kernel_size, kernel_stride) of c1, then of c2
    block_size: int = 1  # cap + 1 stays a multiple of it (the key blocks are then a view)
    two_levels: bool = True  # c2 is kept (the v2 selection)

    @classmethod
    def empty(cls, batch_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
              device: torch.device | str, *, capacity: int, block_size: int, windows: tuple[int, int],
              two_levels: bool, selection_keys: bool) -> InfLLMv2Cache:
        """A cache for ``capacity`` tokens (rounded up to whole blocks); ``windows = (kernel_size, kernel_stride)``."""
        ks, s = windows

        def z(n: int) -> Tensor:
            return torch.zeros(batch_size, num_kv_heads, n, head_dim, dtype=dtype, device=device)

        cap = _round(capacity, block_size)
        return cls(k=z(cap + 1), v=z(cap + 1), sk=z(cap + 1 if selection_keys else 0),
                   c1=z(max(0, (cap - ks) // s + 1)),
                   c2=z(max(0, (cap - 4 * ks) // (4 * s) + 1) if two_levels else 0),
                   next_pos=torch.zeros(batch_size, dtype=torch.long, device=device),
                   windows=(ks, s, 4 * ks, 4 * s), block_size=block_size, two_levels=two_levels)

    @property
    def nbytes(self) -> int:  # bytes of the slots and windows written so far, not the reserved capacity
        def per(t: Tensor) -> int:
            return t[:, :, :1].numel() * t.element_size()

        def n(size: int, stride: int) -> int:
            return max(0, (self.bound - size) // stride + 1)

        slots = per(self.k) + per(self.v) + per(self.sk)
        ks, s, ks2, s2 = self.windows
        return (slots * self.bound + per(self.c1) * n(ks, s) + per(self.c2) * n(ks2, s2)
                + self.next_pos.numel() * self.next_pos.element_size())

    def grow(self, need: int) -> None:
        """Room for ``need`` tokens: the capacity at least doubles (rounded up to whole blocks)."""
        cap = self.k.shape[2] - 1
        if need <= cap:
            return
        new = _round(max(need, 2 * cap), self.block_size)
        for name in ("k", "v", "sk"):
            t = getattr(self, name)
            if t.shape[2]:
                setattr(self, name, F.pad(t[:, :, :cap], (0, 0, 0, new + 1 - cap)))
        ks, s, ks2, s2 = self.windows
        for name, size, stride in (("c1", ks, s), ("c2", ks2, s2)):
            t = getattr(self, name)
            n = max(0, (new - size) // stride + 1) if (name == "c1" or self.two_levels) else 0
            if n > t.shape[2]:
                setattr(self, name, F.pad(t, (0, 0, 0, n - t.shape[2])))

    @torch.no_grad()
    def append_compressed(self, old_next: Tensor, positions: Tensor, real: Tensor) -> None:
        """Write the compressed keys of the windows completed by the call that wrote ``positions [B, T]`` (``real``:
        not padding) after ``old_next`` (one per stride as it fills)."""
        src = self.sk if self.sk.shape[2] else self.k
        ks, s, ks2, s2 = self.windows
        levels = [(self.c1, ks, s)] + ([(self.c2, ks2, s2)] if self.two_levels else [])
        B, Hkv, _, D = src.shape
        for buf, size, stride in levels:
            if buf.shape[2] == 0:  # the buffers cannot hold a complete window yet
                continue
            if positions.shape[1] == 1:  # decode: no host synchronisation
                start = positions[:, 0] + 1 - size
                ok = real[:, 0] & (start >= 0) & (start % stride == 0)
                win = (start.clamp(min=0)[:, None] + torch.arange(size, device=src.device)).clamp(max=src.shape[2] - 1)
                new = compress_keys(src.gather(2, win[:, None, :, None].expand(B, Hkv, size, D)), size, stride)
                j = torch.div(start, stride, rounding_mode="floor").clamp(min=0)
                j = j[:, None, None, None].expand(B, Hkv, 1, D)
                buf.scatter_(2, j, torch.where(ok[:, None, None, None], new.to(buf.dtype), buf.gather(2, j)))
            else:  # prefill chunk: recompute the windows between the least and the most advanced row
                lo = int(visible_windows(old_next - 1, size, stride).min())
                hi = int(visible_windows(self.next_pos - 1, size, stride).max())
                if hi > lo:
                    seg = src[:, :, lo * stride: (hi - 1) * stride + size]
                    buf[:, :, lo:hi] = compress_keys(seg, size, stride).to(buf.dtype)


def _round(cap: int, block_size: int) -> int:
    """Capacity with ``cap + 1`` slots a multiple of the block size (the blocks are then a view)."""
    return -(-(cap + 1) // block_size) * block_size - 1
