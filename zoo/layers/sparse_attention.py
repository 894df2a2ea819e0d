"""Sparse attention mixers: sliding window (+ sinks), dkernel local + vertical stride, MASFormer block diagonal.

All three are :class:`~zoo.layers.attention.Attention` with another mask, so their parameters (``q_proj,
k_proj, v_proj, o_proj``) are those of full attention and a swap is parameter-free. For query token ``i``,
key token ``j`` (token indices = positions within the sequence, see :mod:`zoo.layers.masks`)::

    o_i = sum_{j : allowed(i, j, h)} softmax_j(q_i . k_j * scale) v_j
    sliding_window:  allowed = j <= i  &  (i - j < window  |  j < num_sink_tokens)
    block_sparse:    allowed = j <= i  &  (qb - kb < local_blocks  |  (kb + h*step + offset) % vertical_stride == 0)
    block_diagonal:  allowed = j <= i  &  i // block_size == j // block_size

Token indices come from ``positions`` (the model derives them from the attention mask, so a left-padded row
equals the unpadded row: sinks are the first *real* tokens, the window counts real tokens). RoPE uses the same
absolute positions (no StreamingLLM re-rotation). Packed rows (``seq_idx``, parallel forward only): with no
explicit positions they restart at every document, so each document has its own sinks and blocks.

Parallel forward: the block-sparse Triton kernel on CUDA (unpadded, unpacked rows; imported lazily, optional),
else a pattern-specific torch path where one exists (block diagonal: blocks folded into the batch, one causal
SDPA; a window covering ``T``: causal SDPA), else :func:`~zoo.layers.sparse_ops.blocked_attention` (dense mask
when ``T <= chunk_size``, otherwise query chunks over the reachable keys: memory and time
O(T * (chunk + reach + extras)), never a T x T mask). With a state: a bounded
:class:`~zoo.layers.sparse_ops.SparseKVCache`; chunks of any length are processed in pieces of at most
``prefill_chunk`` tokens; a decode step (one real token, no autograd) writes the cache in place first.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from zoo.kernels.backend import backend
from zoo.layers.attention import Attention, dense_reference_case
from zoo.layers.attention_step import project_step
from zoo.layers.base import check_int, check_power_of_two, default_positions, document_positions
from zoo.layers.masks import BlockDiagonalRule, LocalStrideRule, Rule, SlidingWindowRule
from zoo.layers.sparse_cpu import block_sparse_attention_cpu, block_sparse_supported, window_attention
from zoo.layers.sparse_ops import SparseKVCache, block_diagonal_attention, blocked_attention, kernel_attention
from zoo.registry import register_mixer

LONGFORMER = """@article{beltagy2020longformer,
  title={Longformer: The Long-Document Transformer},
  author={Beltagy, Iz and Peters, Matthew E. and Cohan, Arman},
  journal={arXiv preprint arXiv:2004.05150},
  year={2020}
}"""
STREAMING_LLM = """@inproceedings{xiao2024efficient,
  title={Efficient Streaming Language Models with Attention Sinks},
  author={Xiao, Guangxuan and Tian, Yuandong and Chen, Beidi and Han, Song and Lewis, Mike},
  booktitle={International Conference on Learning Representations (ICLR)},
  year={2024}
}"""
SPARSE_TRANSFORMER = """@article{child2019generating,
  title={Generating Long Sequences with Sparse Transformers},
  author={Child, Rewon and Gray, Scott and Radford, Alec and Sutskever, Ilya},
  journal={arXiv preprint arXiv:1904.10509},
  year={2019}
}"""
LONGGEN = """@inproceedings{ge2025little,
  title={A Little Goes a Long Way: Efficient Long Context Training and Inference with Partial Contexts},
  author={Ge, Suyu and others},
  booktitle={International Conference on Learning Representations (ICLR)},
  year={2025}
}"""
MASFORMER = """@article{zhang2023efficient,
  title={Efficient Long-Range Transformers: You Need to Attend More, but Not Necessarily at Every Layer},
  author={Zhang, Qingru and others},
  journal={arXiv preprint arXiv:2310.12442},
  year={2023}
}"""


class SparseAttention(Attention):
    """Shared machinery; subclasses define :attr:`rule` and the kernel block size."""

    chunk_size: int = 128  # query chunk of the torch parallel path (T <= chunk_size: one dense mask)
    prefill_chunk: int = 512  # longest piece attended at once with a cache
    state_growth = "constant"
    demo_args = None
    example_args = ()

    @property
    def rule(self) -> Rule:
        return self._rule

    def kernel_block(self) -> int | None:
        return None

    def forward(
        self,
        x: Tensor,
        *,
        positions: Tensor | None = None,
        state: SparseKVCache | None = None,
        attention_mask: Tensor | None = None,
        seq_idx: Tensor | None = None,
    ) -> tuple[Tensor, SparseKVCache | None]:
        B, T, _ = x.shape
        # a decode step (one real token per row, no autograd): in-place write, then attend; no host sync
        decode = state is not None and T == 1 and attention_mask is None and not torch.is_grad_enabled()
        if decode and seq_idx is None and state.full_ring_ready(self.rule):  # lean: no mask, no scatter, no copy
            q, k, v = self.project_step(x, positions, state.length)
            o = state.full_ring_step(self.rule, q, k, v, self.scale)
            return self.o_proj(o.view(B, T, -1)), state
        real = torch.ones(B, T, dtype=torch.bool, device=x.device) if attention_mask is None \
            else attention_mask.bool()
        if state is not None:
            if seq_idx is not None:
                raise ValueError("seq_idx (packed sequences) is supported by the parallel forward only, "
                                 "not with a state")
            if positions is None:  # standalone use: rows without padding before this call
                positions = (default_positions(x, state.length) if attention_mask is None
                             else state.length + (real.long().cumsum(1) - 1).clamp(min=0))
            if attention_mask is not None:
                state.padded = True
            if decode:
                q, k, v = self.project(x, positions)
                state.write_step(self.rule, k, v, positions)
                o = state.attend(self.rule, q, None, None, positions, real, self.scale)
                return self.o_proj(o.transpose(1, 2).reshape(B, T, -1)), state
            q, k, v = self.project(x, positions)
            o = None
            if (T > self.window_fast_min and state.length == 0 and attention_mask is None
                    and not torch.is_grad_enabled()):  # into an empty cache: the parallel fast path, then write
                o = self._prefill_fast(q, k, v, positions, state)
            if o is None:
                o = state.prefill(self.rule, q, k, v, positions, real, self.scale, self.prefill_chunk)
        else:
            plain = positions is None and attention_mask is None and seq_idx is None
            if positions is None:
                if seq_idx is not None:
                    positions = document_positions(seq_idx)
                elif attention_mask is not None:
                    positions = (real.long().cumsum(1) - 1).clamp(min=0)
                else:
                    positions = torch.arange(T, device=x.device).expand(B, T)
            q, k, v = self.project(x, positions)
            o = self.attend_parallel(q, k, v, positions, attention_mask, seq_idx, by_slot=True if plain else None)
        del q, k, v  # not needed any more: freed before o_proj allocates its output (peak memory)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1)), state

    def project_step(self, x: Tensor, positions: Tensor | None, offset: int) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`project` of one token per row without autograd, in fewer calls (``positions`` None: every row at
        ``offset``): :func:`zoo.layers.attention_step.project_step`."""
        return project_step(self, x, positions, offset)

    def attend_parallel(self, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, attention_mask: Tensor | None = None,
                        seq_idx: Tensor | None = None, *, kv_heads: Tensor | None = None,
                        by_slot: bool | None = None) -> Tensor:
        """The stateless sparse attention of projected ``q [B, h, T, D]``, ``k, v [B, h_kv, T, D]`` at
        ``positions [B, T]``; ``kv_heads [h_kv]``: the rule's KV-head index of each KV head given (None: all, in
        order). ``by_slot``: token index == slot (no padding, no packing: the kernel and the pattern-specific paths
        apply); None = find out."""
        B, _, T, _ = q.shape
        if by_slot is None:
            by_slot = attention_mask is None and seq_idx is None and \
                torch.equal(positions, torch.arange(T, device=q.device).expand(B, T))
        head_slice = kv_heads is not None and self.rule.per_head  # the kernel's layouts start at head 0
        o = None
        if by_slot and q.is_cuda and backend() != "torch" and not head_slice:
            o = self._kernel(q, k, v)
        if by_slot and o is None and not head_slice:  # the pattern paths read heads from 0 too
            o = self._fast(q, k, v)
        if o is None:
            valid = None if attention_mask is None else attention_mask.bool()
            o = blocked_attention(self.rule, q, k, v, positions, valid, seq_idx, self.scale, self.chunk_size,
                                  by_slot=by_slot, heads=kv_heads if head_slice else None)
        return o

    def _fast(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor | None:
        """A pattern-specific torch path for unpadded, unpacked rows (token index = slot), or None."""
        return None

    # a prefill into an empty cache longer than this takes the parallel fast path (then writes the cache)
    window_fast_min = 256

    def _prefill_fast(self, q: Tensor, k: Tensor, v: Tensor, positions: Tensor, state: SparseKVCache
                      ) -> Tensor | None:
        """A prefill of unpadded rows into an empty cache through the pattern's parallel fast path (no autograd):
        ``o [B, H, T, D]`` with the cache written, or None (nothing done) when the pattern has no fast path or the
        positions are not the slots (a check made once per prefill, never in a decode step)."""
        B, T = positions.shape
        if not torch.equal(positions, torch.arange(T, device=q.device).expand(B, T)):
            return None
        o = self._kernel(q, k, v) if q.is_cuda and backend() != "torch" else None
        o = self._fast(q, k, v) if o is None else o
        if o is None:
            return None
        state.write(self.rule, k, v, positions, torch.ones(B, T, dtype=torch.bool, device=q.device))
        return o

    def _kernel(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor | None:
        """The block-sparse Triton kernel (another module; optional) on an unpadded batch, or None."""
        return kernel_attention(self.rule, q, k, v, self.kernel_block(), self.scale)

    def init_state(self, batch_size: int, *, dtype: torch.dtype, device: torch.device | str,
                   max_length: int | None = None) -> SparseKVCache:
        """A ring of ``rule.ring_size`` slots; a vertical store (local-stride) preallocated for ``max_length``
        tokens, growing beyond it when needed."""
        return SparseKVCache.empty(self.rule, batch_size, self.num_kv_heads, self.head_dim, dtype, device,
                                   max_length=max_length or 0)

    @staticmethod
    def _base_size_check(kwargs: dict[str, Any]) -> bool:
        """True for ``Attention.__init__``'s own head-size check, which passes only these keys."""
        return set(kwargs) <= {"num_heads", "num_kv_heads", "head_dim"}


@register_mixer("sliding_window")
class SlidingWindowAttention(SparseAttention):
    """``j <= i & (i - j < window | j < num_sink_tokens)``: transformers/Mistral window + StreamingLLM sinks."""
    citations = Attention.citations + (LONGFORMER, STREAMING_LLM)

    arg_groups = ("attention",)
    example_args = ({"window": 8, "num_sink_tokens": 2}, {"window": 5})
    demo_args = {"window": 32}
    sequence_parallel = True  # the rule does not depend on the head: Ulysses head slices are exact
    bench_cases = dense_reference_case({"window": 1024, "num_sink_tokens": 0}, {"window": 16, "num_sink_tokens": 4},
                                       "sliding window + sinks")

    def __init__(self, d_model: int, layer_idx: int = 0, *, window: int, num_sink_tokens: int = 0,
                 num_heads: int = 8, num_kv_heads: int | None = None, head_dim: int | None = None,
                 qkv_bias: bool = False, o_bias: bool = False, qk_norm: bool = False, qk_norm_eps: float = 1e-6,
                 rope: bool = True, rope_theta: float = 10000.0, rope_scaling: dict[str, Any] | None = None,
                 rotary_dim: int | None = None, softmax_scale: float | None = None,
                 max_position_embeddings: int = 4096) -> None:
        self.check_args(d_model, dict(window=window, num_sink_tokens=num_sink_tokens, num_heads=num_heads,
                                      num_kv_heads=num_kv_heads, head_dim=head_dim))
        super().__init__(d_model, layer_idx, num_heads, num_kv_heads, head_dim, qkv_bias, o_bias, qk_norm,
                         qk_norm_eps, rope, rope_theta, rope_scaling, rotary_dim, softmax_scale,
                         max_position_embeddings)
        self.window, self.num_sink_tokens = window, num_sink_tokens
        self._rule = self.rule_for(d_model, dict(window=window, num_sink_tokens=num_sink_tokens))

    @classmethod
    def rule_for(cls, d_model: int, args: dict[str, Any]) -> SlidingWindowRule:
        return SlidingWindowRule(args["window"], args.get("num_sink_tokens", 0))

    @classmethod
    def check_args(cls, d_model: int, kwargs: dict[str, Any]) -> None:
        super().check_args(d_model, kwargs)
        if cls._base_size_check(kwargs):
            return
        if kwargs.get("window") is None:
            raise ValueError("sliding_window needs window=<tokens, including the current one>")
        check_int("window", kwargs["window"])
        check_int("num_sink_tokens", kwargs.get("num_sink_tokens", 0), 0)

    def kernel_block(self) -> int | None:
        return 64

    def _fast(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor | None:
        gqa = self.num_heads != self.num_kv_heads
        if q.shape[2] <= self.window:  # the window covers everything: causal attention
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=gqa)
        if self.num_sink_tokens == 0 and not torch.is_grad_enabled():  # chunks over strided key windows
            return window_attention(q, k, v, self.window, self.scale, self.window_chunk)
        return None

    window_chunk = 64  # query chunk of the CPU window path (masked pairs per chunk: chunk / (chunk + window))

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, window={self.window}, num_sink_tokens={self.num_sink_tokens}"


@register_mixer("block_sparse")
class BlockSparseAttention(SparseAttention):
    """dkernel / Phi-3-small local + vertical-stride pattern (LongGen "BlockSparse"), per KV head."""
    citations = Attention.citations + (SPARSE_TRANSFORMER, LONGGEN)

    arg_groups = ("attention",)
    example_args = ({"block_size": 4, "local_blocks": 2, "vertical_stride": 3},
                    {"block_size": 2, "local_blocks": 3, "vertical_stride": 4, "homo_head": True,
                     "head_sliding_offset": 1},
                    {"block_size": 4, "local_blocks": 1, "vertical_stride": 3, "num_dense_heads": 1})
    state_growth = "linear"  # the vertical blocks are kept: N / vertical_stride tokens per KV head
    sequence_parallel = True  # per-head pattern: each rank's head slice is given its KV-head indices
    bench_cases = dense_reference_case(  # LongGen-style strided blocks
        {"block_size": 64, "local_blocks": 16, "vertical_stride": 8}, {"block_size": 8, "local_blocks": 2,
                                                                       "vertical_stride": 4},
        "strided block-sparse (local + vertical)")

    def __init__(self, d_model: int, layer_idx: int = 0, *, block_size: int = 64, local_blocks: int = 16,
                 vertical_stride: int = 8, head_sliding_offset: int = 0, homo_head: bool = False,
                 num_dense_heads: int = 0,
                 num_heads: int = 8, num_kv_heads: int | None = None, head_dim: int | None = None,
                 qkv_bias: bool = False, o_bias: bool = False, qk_norm: bool = False, qk_norm_eps: float = 1e-6,
                 rope: bool = True, rope_theta: float = 10000.0, rope_scaling: dict[str, Any] | None = None,
                 rotary_dim: int | None = None, softmax_scale: float | None = None,
                 max_position_embeddings: int = 4096) -> None:
        args = dict(block_size=block_size, local_blocks=local_blocks, vertical_stride=vertical_stride,
                    head_sliding_offset=head_sliding_offset, homo_head=homo_head, num_dense_heads=num_dense_heads,
                    num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)
        self.check_args(d_model, args)
        super().__init__(d_model, layer_idx, num_heads, num_kv_heads, head_dim, qkv_bias, o_bias, qk_norm,
                         qk_norm_eps, rope, rope_theta, rope_scaling, rotary_dim, softmax_scale,
                         max_position_embeddings)
        self.block_size, self.local_blocks, self.vertical_stride = block_size, local_blocks, vertical_stride
        self._rule = self.rule_for(d_model, args)

    @classmethod
    def rule_for(cls, d_model: int, args: dict[str, Any]) -> LocalStrideRule:
        a = cls.resolved_args(args)
        H = a["num_heads"]
        return LocalStrideRule(a["block_size"], a["local_blocks"], a["vertical_stride"], H, a["num_kv_heads"] or H,
                               a["head_sliding_offset"], a["homo_head"], a["num_dense_heads"])

    @classmethod
    def check_args(cls, d_model: int, kwargs: dict[str, Any]) -> None:
        super().check_args(d_model, kwargs)
        if cls._base_size_check(kwargs):
            return
        check_power_of_two("block_size", kwargs.get("block_size", 64))
        check_int("local_blocks", kwargs.get("local_blocks", 16))
        check_int("vertical_stride", kwargs.get("vertical_stride", 8))
        check_int("head_sliding_offset", kwargs.get("head_sliding_offset", 0), 0)
        Hkv = kwargs.get("num_kv_heads") or kwargs.get("num_heads", 8)
        nd = kwargs.get("num_dense_heads", 0)
        check_int("num_dense_heads", nd, 0)
        if nd > Hkv:
            raise ValueError(f"num_dense_heads={nd} exceeds the number of KV heads {Hkv}")
        if nd and kwargs.get("homo_head", False):
            raise ValueError("num_dense_heads needs homo_head=False (dkernel asserts the same)")

    def kernel_block(self) -> int | None:
        return self.block_size if self.block_size >= 16 else None

    def _fast(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor | None:
        if q.shape[2] <= self.block_size * self.local_blocks:  # the local blocks cover everything: causal
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                                  enable_gqa=self.num_heads != self.num_kv_heads)
        if block_sparse_supported(self._rule, q):
            return block_sparse_attention_cpu(q, k, v, self._rule, self.scale)  # the active blocks only
        return None

    def extra_repr(self) -> str:
        r = self._rule
        return (f"layer_idx={self.layer_idx}, block_size={r.block_size}, local_blocks={r.local_blocks}, "
                f"vertical_stride={r.vertical_stride}, step={r.step}, offset={r.head_sliding_offset}, "
                f"homo_head={r.homo_head}, num_dense_heads={r.num_dense_heads}")


@register_mixer("block_diagonal")
class BlockDiagonalAttention(SparseAttention):
    """MASFormer local attention: each query sees the earlier tokens of its own block of ``block_size``."""
    citations = Attention.citations + (MASFORMER,)

    arg_groups = ("attention",)
    example_args = ({"block_size": 5}, {"block_size": 8})
    sequence_parallel = True
    bench_cases = dense_reference_case({"block_size": 1024}, {"block_size": 16}, "block-diagonal causal attention")

    def __init__(self, d_model: int, layer_idx: int = 0, *, block_size: int,
                 num_heads: int = 8, num_kv_heads: int | None = None, head_dim: int | None = None,
                 qkv_bias: bool = False, o_bias: bool = False, qk_norm: bool = False, qk_norm_eps: float = 1e-6,
                 rope: bool = True, rope_theta: float = 10000.0, rope_scaling: dict[str, Any] | None = None,
                 rotary_dim: int | None = None, softmax_scale: float | None = None,
                 max_position_embeddings: int = 4096) -> None:
        self.check_args(d_model, dict(block_size=block_size, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                      head_dim=head_dim))
        super().__init__(d_model, layer_idx, num_heads, num_kv_heads, head_dim, qkv_bias, o_bias, qk_norm,
                         qk_norm_eps, rope, rope_theta, rope_scaling, rotary_dim, softmax_scale,
                         max_position_embeddings)
        self.block_size = block_size
        self._rule = self.rule_for(d_model, dict(block_size=block_size))

    @classmethod
    def rule_for(cls, d_model: int, args: dict[str, Any]) -> BlockDiagonalRule:
        return BlockDiagonalRule(args["block_size"])

    @classmethod
    def check_args(cls, d_model: int, kwargs: dict[str, Any]) -> None:
        super().check_args(d_model, kwargs)
        if cls._base_size_check(kwargs):
            return
        if kwargs.get("block_size") is None:
            raise ValueError("block_diagonal needs block_size=<tokens per block>")
        check_int("block_size", kwargs["block_size"])

    def _fast(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor | None:
        return block_diagonal_attention(q, k, v, self.block_size, self.scale)

    def kernel_block(self) -> int | None:
        kb = min(64, self.block_size)
        return kb if kb >= 16 and self.block_size % kb == 0 and kb & (kb - 1) == 0 else None

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, block_size={self.block_size}"
