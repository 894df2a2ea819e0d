"""Causal softmax attention with GQA/MQA, RoPE, optional QK-norm, and a KV-cache state.

For queries ``q_i`` and keys/values ``k_j, v_j`` of one head (``D = head_dim``)::

    o_i = sum_{j in S(i)} softmax_j(q_i . k_j * scale) v_j,     scale = 1 / sqrt(D)

with ``S(i) = {j <= i}`` (causal), minus padded keys, minus keys of other documents (``seq_idx``).
Query head ``h`` reads key/value head ``h // (num_heads / num_kv_heads)``.
Shapes: ``x [B, T, d_model] -> q [B, H, T, D], k, v [B, Hkv, T, D] -> o [B, T, H*D] -> y [B, T, d_model]``.

Parameter names follow transformers' Llama: ``q_proj, k_proj, v_proj, o_proj`` (+ ``q_norm, k_norm``), so
every attention variant of the zoo (sliding window, sinks, block-sparse) reuses these weights as they are.
The cache stores keys after RoPE, in arrival order; a query at cache index ``n`` sees slots ``<= n``.

Sequence parallelism (DeepSpeed-Ulysses, :meth:`Attention.forward_sequence_parallel`): each of ``R`` ranks
projects its ``T/R`` tokens (RoPE at their global positions), an all-to-all trades sequence slices for head slices
(``[B, H, T/R, D] -> [B, H/R, T, D]``), every rank attends its heads over the whole sequence, and the inverse
all-to-all brings the outputs back to sequence slices before ``o_proj``. Exact because heads never interact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.layers.base import BenchCase, Mixer, State, default_positions
from zoo.layers.masks import Rule, attended_pairs
from zoo.layers.norm import RMSNorm
from zoo.layers.rope import ROPE_TYPES, RotaryEmbedding, apply_rotary, rope_type
from zoo.registry import register_mixer


@dataclass
class KVCache(State):
    """Keys (after RoPE) and values in arrival order: ``k, v [B, Hkv, capacity, D]``, ``valid [B, capacity]``."""

    k: Tensor
    v: Tensor
    valid: Tensor
    length: int = 0
    has_padding: bool = False  # any invalid slot so far: attention then needs the key mask

    @property
    def nbytes(self) -> int:  # bytes actually holding tokens, not the reserved capacity
        per_slot = (self.k[:, :, :1].numel() + self.v[:, :, :1].numel()) * self.k.element_size()
        return per_slot * self.length + self.valid[:, : self.length].numel()

    def append(self, k: Tensor, v: Tensor, valid: Tensor) -> None:
        """Write ``T`` new slots, growing the buffers (doubling) when they are full."""
        T = k.shape[2]
        end = self.length + T
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad or self.k.requires_grad):
            # differentiable path (training through a chunked prefill): no in-place writes into saved tensors
            self.k = torch.cat([self.k[:, :, : self.length], k], 2)
            self.v = torch.cat([self.v[:, :, : self.length], v], 2)
            self.valid = torch.cat([self.valid[:, : self.length], valid], 1)
            self.length = end
            return
        if end > self.k.shape[2]:
            grow = max(end, 2 * self.k.shape[2]) - self.k.shape[2]
            self.k = F.pad(self.k, (0, 0, 0, grow))
            self.v = F.pad(self.v, (0, 0, 0, grow))
            self.valid = F.pad(self.valid, (0, grow))
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.valid[:, self.length : end] = valid
        self.length = end


CITATION = r"""@inproceedings{vaswani2017attention,
  title={Attention Is All You Need},
  author={Vaswani, Ashish and Shazeer, Noam and Parmar, Niki and Uszkoreit, Jakob and Jones, Llion and
          Gomez, Aidan N. and Kaiser, {\L}ukasz and Polosukhin, Illia},
  booktitle={Advances in Neural Information Processing Systems},
  volume={30},
  year={2017}
}"""


@register_mixer("attention")
class Attention(Mixer):
    arg_groups = ("attention",)
    citations = (CITATION,)
    example_args = ({}, {"num_kv_heads": 1, "qk_norm": True, "qkv_bias": True, "rotary_dim": 4})
    demo_args = {}
    supports_packing = True
    dtypes = ("float16", "bfloat16")
    state_growth = "linear"
    sequence_parallel = True
    bench_cases = (BenchCase(
        args={"full": {"d_model": 768, "num_heads": 12, "num_kv_heads": 4, "head_dim": 64},
              "quick": {"d_model": 64, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16}},
        reference="transformers_llama_attention", gpu_kernels=("sdpa_flash",),
        description="zoo attention vs transformers LlamaAttention (sdpa), same weights"),)

    def __init__(
        self,
        d_model: int,
        layer_idx: int = 0,
        num_heads: int = 8,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm: bool = False,
        qk_norm_eps: float = 1e-6,
        rope: bool = True,
        rope_theta: float = 10000.0,
        rope_scaling: dict[str, Any] | None = None,
        rotary_dim: int | None = None,
        softmax_scale: float | None = None,
        max_position_embeddings: int = 4096,
    ) -> None:
        super().__init__(d_model, layer_idx)
        self.check_args(d_model, dict(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim))
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_dim = head_dim or d_model // num_heads
        self.scale = softmax_scale if softmax_scale is not None else self.head_dim**-0.5
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        self.q_proj = nn.Linear(d_model, H * D, bias=qkv_bias)
        self.k_proj = nn.Linear(d_model, Hkv * D, bias=qkv_bias)
        self.v_proj = nn.Linear(d_model, Hkv * D, bias=qkv_bias)
        self.o_proj = nn.Linear(H * D, d_model, bias=o_bias)
        if qk_norm:
            self.q_norm = RMSNorm(D, qk_norm_eps)
            self.k_norm = RMSNorm(D, qk_norm_eps)
        self.qk_norm = qk_norm
        self.rotary = (RotaryEmbedding(rotary_dim or D, rope_theta, rope_scaling, max_position_embeddings)
                       if rope else None)

    @classmethod
    def check_args(cls, d_model: int, kwargs: dict[str, Any]) -> None:
        H = kwargs.get("num_heads", 8)
        Hkv = kwargs.get("num_kv_heads") or H
        if H <= 0 or Hkv <= 0 or H % Hkv:
            raise ValueError(f"num_heads={H} must be a positive multiple of num_kv_heads={Hkv}")
        if kwargs.get("head_dim") is None and d_model % H:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={H}; give head_dim explicitly")
        rd, D = kwargs.get("rotary_dim"), kwargs.get("head_dim") or d_model // H
        if rd is not None and (rd > D or rd % 2):
            raise ValueError(f"rotary_dim={rd} must be even and at most head_dim={D}")
        scaling = kwargs.get("rope_scaling")
        if scaling is not None and rope_type(scaling) not in ROPE_TYPES:
            raise ValueError(f"rope_scaling type {rope_type(scaling)!r} is not supported; "
                             f"supported: {list(ROPE_TYPES)}")

    @classmethod
    def rule_for(cls, d_model: int, args: dict[str, Any]) -> Rule | None:
        """The visibility rule of :mod:`zoo.layers.masks` (None: full causal attention)."""
        return None

    @classmethod
    def flops(cls, d_model: int, args: dict[str, Any], *, T: int, context: int = 0, batch: int = 1) -> int:
        """Projections ``2 T d (2 H D + 2 Hkv D)`` + ``QK^T`` and ``PV`` at ``4 D`` per attended (query, key) pair
        of each query head (pairs from the rule: causal ``T context + T (T + 1) / 2`` per head for full attention)."""
        a = cls.resolved_args(args)
        H = a["num_heads"]
        Hkv = a["num_kv_heads"] or H
        D = a["head_dim"] or d_model // H
        rule = cls.rule_for(d_model, a)
        pairs = Hkv * (T * context + T * (T + 1) // 2) if rule is None else attended_pairs(rule, T, context, Hkv)
        return batch * (2 * T * d_model * (2 * H * D + 2 * Hkv * D) + 4 * D * (H // Hkv) * pairs)

    # ------------------------------------------------------------------ projections
    def project(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x [B, T, d]`` -> ``q [B, H, T, D]``, ``k, v [B, Hkv, T, D]`` with RoPE applied."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None:
            cos, sin = self.rotary(positions, q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return q, k, v

    def forward(
        self,
        x: Tensor,
        *,
        positions: Tensor | None = None,
        state: KVCache | None = None,
        attention_mask: Tensor | None = None,
        seq_idx: Tensor | None = None,
    ) -> tuple[Tensor, KVCache | None]:
        B, T, _ = x.shape
        if positions is None:
            positions = default_positions(x, state.length if state is not None else 0)
        q, k, v = self.project(x, positions)
        if state is None:
            o = self.attend_parallel(q, k, v, positions, attention_mask, seq_idx)
        else:
            valid = attention_mask.bool() if attention_mask is not None else x.new_ones(B, T, dtype=torch.bool)
            state.has_padding = state.has_padding or (attention_mask is not None and not bool(valid.all()))
            offset = state.length
            state.append(k, v, valid)
            o = self.attend(q, state.k[:, :, : state.length], state.v[:, :, : state.length],
                            key_valid=state.valid[:, : state.length] if state.has_padding else None, q_offset=offset)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1)), state

    def attend_parallel(self, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, attention_mask: Tensor | None = None,
                        seq_idx: Tensor | None = None, *, kv_heads: Tensor | None = None) -> Tensor:
        """The stateless attention of projected ``q [B, h, T, D]``, ``k, v [B, h_kv, T, D]`` (any head subset with
        the layer's query/KV head ratio, or ratio 1) at ``positions [B, T]``; ``attention_mask``, ``seq_idx``
        ``[B, T]``; ``kv_heads [h_kv]``: the layer's KV-head index of each KV head given (None: all of them, in
        order; only patterns that differ per head read it). Returns ``o [B, h, T, D]``."""
        return self.attend(q, k, v, key_valid=attention_mask, seq_idx=seq_idx)

    def check_sequence_parallel(self, size: int) -> None:
        super().check_sequence_parallel(size)
        H, Hkv = self.num_heads, self.num_kv_heads
        if H % size or (Hkv % size and size % Hkv):
            raise ValueError(f"{self.mixer_name}: sequence parallelism over {size} ranks needs num_heads={H} "
                             f"divisible by {size} and num_kv_heads={Hkv} divisible by it or dividing it")

    def forward_sequence_parallel(self, x: Tensor, *, positions: Tensor, attention_mask: Tensor | None,
                                  seq_idx: Tensor | None, comm: Any) -> Tensor:
        """Ulysses (module docstring): ``x [B, T/R, d]`` -> ``y [B, T/R, d]``; KV heads are repeated to the query
        heads first when there are fewer of them than ranks."""
        B, Tl, _ = x.shape
        q, k, v = self.project(x, positions)  # [B, H, T/R, D], [B, Hkv, T/R, D]
        kv_heads = torch.arange(self.num_kv_heads, device=x.device)  # the KV head of each k/v head
        if self.num_kv_heads % comm.size:
            group = self.num_heads // self.num_kv_heads
            k, v = (t.repeat_interleave(group, 1) for t in (k, v))
            kv_heads = kv_heads.repeat_interleave(group)
        q, k, v = (comm.seq_to_heads(t) for t in (q, k, v))  # [B, H/R, T, D], [B, Hkv/R, T, D]
        n = k.shape[1]
        o = self.attend_parallel(q, k, v, comm.gather_seq(positions),
                                 None if attention_mask is None else comm.gather_seq(attention_mask),
                                 None if seq_idx is None else comm.gather_seq(seq_idx),
                                 kv_heads=kv_heads[comm.rank * n:(comm.rank + 1) * n])
        o = comm.heads_to_seq(o)  # [B, H, T/R, D]
        return self.o_proj(o.transpose(1, 2).reshape(B, Tl, -1))

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        key_valid: Tensor | None = None,
        seq_idx: Tensor | None = None,
        q_offset: int = 0,
    ) -> Tensor:
        """Causal attention of ``q [B, H, Tq, D]`` (cache indices ``q_offset..``) over ``k, v [B, Hkv, Tk, D]``."""
        Tq, Tk = q.shape[2], k.shape[2]
        gqa = self.num_heads != self.num_kv_heads
        if key_valid is None and seq_idx is None and q_offset + Tq == Tk and (q_offset == 0 or Tq == 1):
            # no mask needed: a prefill from the start is plain causal, one new token sees every key
            return F.scaled_dot_product_attention(q, k, v, is_causal=Tq > 1, scale=self.scale, enable_gqa=gqa)
        q_idx = torch.arange(q_offset, q_offset + Tq, device=q.device)
        k_idx = torch.arange(Tk, device=q.device)
        mask = (k_idx[None, :] <= q_idx[:, None])[None, None]  # [1, 1, Tq, Tk]
        if key_valid is not None:
            mask = mask & key_valid.bool()[:, None, None, :]
        if seq_idx is not None:
            mask = mask & (seq_idx[:, None, :, None] == seq_idx[:, None, None, :])
        mask = mask | (k_idx[None, :] == q_idx[:, None])  # a (padded) query always sees itself: no empty rows
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=gqa)

    def init_state(
        self, batch_size: int, *, dtype: torch.dtype, device: torch.device | str, max_length: int | None = None
    ) -> KVCache:
        cap = max_length or 256
        shape = (batch_size, self.num_kv_heads, cap, self.head_dim)
        return KVCache(
            k=torch.zeros(shape, dtype=dtype, device=device),
            v=torch.zeros(shape, dtype=dtype, device=device),
            valid=torch.zeros(batch_size, cap, dtype=torch.bool, device=device),
        )


def dense_reference_case(full: dict[str, Any], quick: dict[str, Any], what: str) -> tuple[BenchCase, ...]:
    """A masked pattern's benchmark case (the sparse-attention mixers): against dense causal attention (the
    ``attention`` mixer) with the same weights, at the head sizes of the attention case."""
    heads = Attention.bench_cases[0].args
    return (BenchCase(args={"full": {**heads["full"], **full}, "quick": {**heads["quick"], **quick}},
                      reference="mixer:attention", description=f"{what} vs dense causal SDPA attention, same weights"),)
