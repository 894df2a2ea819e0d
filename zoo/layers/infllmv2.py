r"""InfLLM-v2 dense/sparse switchable attention (MiniCPM4.1, arXiv 2509.24663): no parameters beyond attention's.

Arguments are MiniCPM4's ``sparse_config`` fields. Per KV head (its ``G`` query heads share everything below), for
a query at position ``p`` in block ``bq = p // block_size`` (``s`` = ``kernel_stride``, ``ks`` = ``kernel_size``)::

    dense query (p + 1 < dense_len):  plain causal attention (dense_len <= 0: never)
    C1[j] = mean(k[j s : j s + ks])            C2[j] = mean(k[4 j s : 4 j s + 4 ks])    (keys after RoPE)
    lse_g = logsumexp_{C2[j] ends <= p} q_g . C2[j] / sqrt(D)                 (variant "v1": over C1, exact)
    S[j]  = sum_g exp(q_g . C1[j] / sqrt(D) - lse_g)   for the C1 windows ending <= p
    BS[b] = max(S[b st - 1 .. b st + st - 1]),  st = block_size / s                     (pool 5 / stride 4 / pad 1)
    Sel(p) = {b < init_blocks} u {bq - window_size / block_size .. bq} u the best other blocks <= bq by BS
             (ties to the lower block), |Sel(p)| = topk + window_size / block_size   (variant "v1": = topk)
    o = softmax over {t <= p : t // block_size in Sel(p)} of q . k_t / sqrt(D), times v    (exact, fp32 softmax)

Selection runs without gradient (the reference's ``torch.no_grad()``); gradients reach q, k, v through the exact
attention over the selected blocks. Scores are rounded to the activation dtype before pooling (the reference kernel
writes bf16 / fp16). A query that sees no coarse key yet (``lse = -inf``) scores its visible C1 entries ``+inf``
and the others 0 (the kernel's ``NaN -> 0``).

**Three modes.** Every query's visible set depends only on its position and the keys up to it, so the parallel
forward, a chunked prefill and token-by-token decode agree. These are the reference's *decode* semantics. Its
one-shot prefill differs in two length-dependent quirks, reproduced by ``reference_prefill=True`` in the parallel
forward only (a state always uses the decode semantics; the hub's multi-token continuation of a sparse cache is
broken, so there is nothing to match there):

* the switch is per call: the whole prefill is dense iff its length ``L < dense_len`` (here: per query), which
  differs for queries ``p < dense_len - 1`` of a prefill with ``L >= dense_len`` whenever
  ``dense_len > (topk + window_size / block_size) * block_size`` (MiniCPM4: 8192 > 96 * 64);
* the stage-1 kernel's causal mask hides the last complete window of every query when ``L % s == s - 1`` (C1) or
  ``L % 4s == 4s - 1`` (C2): visible count ``clamp((p+1)//s - 1 + n(L) - (L - s + 1)//s, 0, n(L))``.

Left in both modes: ties between equal block scores go to the lower block, and forced blocks rank before
unnormalised (+inf) scores (the reference's CUDA top-k leaves both orders unspecified). ``use_nope`` scores with the
q, k before RoPE (the attention itself uses them after RoPE). Decode keeps the compressed keys in the state and
appends one as each stride fills (:mod:`zoo.layers.infllmv2_cache`; the tail of not yet compressed keys is the end
of the KV cache); its cost is bounded by the selected blocks, not the context. Kernels (CUDA: Triton; CPU
prefill: ``kernels/infllmv2/cpu.py``, whose stage 2 runs the fused C++ kernel ``cpu.cpp`` where a compiler
builds it and a block-stationary torch schedule otherwise; :mod:`zoo.kernels.infllmv2`): stage 1 fuses scoring, the
group sum and pooling; stage 2 attends over per-query block lists.
Shapes: ``x [B, T, d] -> q [B, H, T, D], k, v [B, Hkv, T, D] -> y [B, T, d]``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from zoo.kernels.backend import use_triton
from zoo.kernels.infllmv2 import (
    block_scores,
    compress_keys,
    select_blocks,
    select_cpu,
    sparse_attention,
    visible_windows,
)
from zoo.layers.attention import Attention
from zoo.layers.base import BenchCase, check_int
from zoo.layers.infllmv2_cache import InfLLMv2Cache
from zoo.layers.rope import apply_rotary
from zoo.registry import register_mixer

VARIANTS = ("v2", "v1")
CITATION = r"""@article{zhao2025infllmv2,
  title={{InfLLM-V2}: Dense-Sparse Switchable Attention for Seamless Short-to-Long Adaptation},
  author={Zhao, Weilin and others}, journal={arXiv preprint arXiv:2509.24663}, year={2025}
}"""


@register_mixer("infllmv2")
class InfLLMv2(Attention):
    arg_groups = ("attention",)
    example_args = (
        dict(kernel_size=4, kernel_stride=2, block_size=8, init_blocks=1, window_size=8, topk=3, dense_len=16),
        dict(kernel_size=4, kernel_stride=4, block_size=8, init_blocks=0, window_size=0, topk=2, dense_len=-1,
             variant="v1", use_nope=True),
    )
    demo_args = dict(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, window_size=32, topk=4,
                     dense_len=64)
    supports_packing = False
    dtypes = ("bfloat16", "float16")
    state_growth = "linear"
    bench_cases = (BenchCase(
        args={"full": dict(d_model=1024, num_heads=16, num_kv_heads=1, head_dim=64, kernel_size=32, kernel_stride=16,
                           block_size=64, init_blocks=1, window_size=2048, topk=64, dense_len=8192),
              "quick": dict(d_model=64, num_heads=4, num_kv_heads=1, kernel_size=4, kernel_stride=2, block_size=8,
                            init_blocks=1, window_size=8, topk=2, dense_len=16)},
        reference="mixer:attention",
        description="InfLLM-v2 (MiniCPM4 sparse_config, one GQA group of 16) against dense causal attention"),)
    citations = Attention.citations + (CITATION,)
    sequence_parallel = True  # Ulysses slices of whole KV-head groups: selection and attention stay per group
    query_tile: int | None = None  # CPU prefill: None = block-stationary (kernels/infllmv2/cpu.py), 1 / C = reference

    def __init__(self, d_model: int, layer_idx: int = 0, *, kernel_size: int = 32, kernel_stride: int = 16,
                 init_blocks: int = 1, block_size: int = 64, window_size: int = 2048, topk: int = 64,
                 dense_len: int = 8192, use_nope: bool = False, variant: str = "v2", reference_prefill: bool = False,
                 num_heads: int = 8, num_kv_heads: int | None = None, head_dim: int | None = None,
                 qkv_bias: bool = False, o_bias: bool = False, qk_norm: bool = False, qk_norm_eps: float = 1e-6,
                 rope: bool = True, rope_theta: float = 10000.0, rope_scaling: dict[str, Any] | None = None,
                 rotary_dim: int | None = None, softmax_scale: float | None = None,
                 max_position_embeddings: int = 4096) -> None:
        sparse = dict(kernel_size=kernel_size, kernel_stride=kernel_stride, init_blocks=init_blocks,
                      block_size=block_size, window_size=window_size, topk=topk, dense_len=dense_len, variant=variant)
        self.check_args(d_model, dict(sparse, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim))
        super().__init__(d_model, layer_idx, num_heads, num_kv_heads, head_dim, qkv_bias, o_bias, qk_norm,
                         qk_norm_eps, rope, rope_theta, rope_scaling, rotary_dim, softmax_scale,
                         max_position_embeddings)
        self.kernel_size, self.kernel_stride, self.block_size = kernel_size, kernel_stride, block_size
        self.init_blocks, self.window_size, self.topk, self.dense_len = init_blocks, window_size, topk, dense_len
        self.use_nope, self.variant, self.reference_prefill = use_nope, variant, reference_prefill
        self.local_blocks = window_size // block_size
        self.budget = topk + self.local_blocks if variant == "v2" else topk  # blocks per query, forced ones included

    @classmethod
    def check_args(cls, d_model: int, kwargs: dict[str, Any]) -> None:
        super().check_args(d_model, kwargs)
        if set(kwargs) <= {"num_heads", "num_kv_heads", "head_dim"}:
            return  # Attention.__init__'s own head-size check
        a = {"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "block_size": 64, "window_size": 2048,
             "topk": 64, "dense_len": 8192, "variant": "v2"}
        a.update({k: v for k, v in kwargs.items() if k in a})
        for name, low in (("kernel_size", 1), ("kernel_stride", 1), ("block_size", 1), ("init_blocks", 0),
                          ("window_size", 0), ("topk", 1)):
            check_int(f"infllmv2: {name}", a[name], low)
        if a["variant"] not in VARIANTS:
            raise ValueError(f"infllmv2: variant={a['variant']!r} is not one of {list(VARIANTS)} "
                             "(v2 = MiniCPM4.1 / paper, v1 = MiniCPM4 June 2025)")
        if a["kernel_stride"] > a["kernel_size"] or a["block_size"] % a["kernel_stride"]:
            raise ValueError(f"infllmv2: kernel_stride={a['kernel_stride']} must divide block_size="
                             f"{a['block_size']} and be at most kernel_size={a['kernel_size']}")
        local = a["window_size"] // a["block_size"]
        budget = a["topk"] + (local if a["variant"] == "v2" else 0)
        if budget < a["init_blocks"] + local + 1:
            raise ValueError(f"infllmv2: {budget} blocks per query (topk={a['topk']}) cannot hold the "
                             f"{a['init_blocks']} initial + {local + 1} local blocks that are always selected")

    @classmethod
    def boundaries(cls, args: dict[str, Any]) -> list[int]:
        ks, s = args.get("kernel_size", 32), args.get("kernel_stride", 16)
        out = set(super().boundaries(args)) | {4 * ks, 4 * s}
        if args.get("dense_len", 8192) > 1:
            out.add(args.get("dense_len", 8192) - 1)
        return sorted(out)

    @classmethod
    def flops(cls, d_model: int, args: dict[str, Any], *, T: int, context: int = 0, batch: int = 1) -> int:
        H = args.get("num_heads", 8)
        Hkv, D = args.get("num_kv_heads") or H, args.get("head_dim") or d_model // H
        ks, s, bsz = args.get("kernel_size", 32), args.get("kernel_stride", 16), args.get("block_size", 64)
        v2, dense_len = args.get("variant", "v2") == "v2", args.get("dense_len", 8192)
        budget = args.get("topk", 64) + (args.get("window_size", 2048) // bsz if v2 else 0)
        p = torch.arange(context, context + T, dtype=torch.float64)
        dense = p + 1 < dense_len
        keys = torch.where(dense, p + 1, torch.clamp(p + 1, max=budget * bsz))
        n1 = torch.clamp(torch.div(p + 1 - ks, s, rounding_mode="floor") + 1, min=0)
        n2 = torch.clamp(torch.div(p + 1 - 4 * ks, 4 * s, rounding_mode="floor") + 1, min=0) if v2 else n1
        scoring = torch.where(dense, 0.0, 2 * H * D * (n1 + n2))
        proj = 2 * T * d_model * (H * D + 2 * Hkv * D) + 2 * T * H * D * d_model
        return int(batch * (proj + float((4 * H * D * keys + scoring).sum())))

    # ------------------------------------------------------------------ projections and selection
    def _project(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """q, k, v (after RoPE) and the detached selection q, k (before RoPE with ``use_nope``)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        qs, ks = q, k
        if self.rotary is not None:
            cos, sin = self.rotary(positions, q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if not self.use_nope:
            qs, ks = q, k
        return q, k, v, qs.detach(), ks.detach()

    def _counts(self, qpos: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """Visible C1 / existing C1 / visible C2 counts ``[B, Tq]`` (``lengths``: the reference prefill's quirk)."""
        ks, s = self.kernel_size, self.kernel_stride
        sizes = [(ks, s)] + ([(4 * ks, 4 * s)] if self.variant == "v2" else [])
        out = []
        for size, stride in sizes:
            if lengths is None:
                vis = visible_windows(qpos, size, stride)
                out += [vis, vis]
            else:
                L = lengths[:, None]
                n = torch.clamp(torch.div(L - size, stride, rounding_mode="floor") + 1, min=0)
                off = n - torch.div(L - stride + 1, stride, rounding_mode="trunc")  # C++ integer division
                vis = torch.minimum(torch.clamp(torch.div(qpos + 1, stride, rounding_mode="floor") - 1 + off, min=0), n)
                out += [vis, n.expand_as(vis)]
        return out[0], out[1], (out[2] if len(out) > 2 else None)

    @torch.no_grad()
    def _select(self, qs: Tensor, qpos: Tensor, c1: Tensor, c2: Tensor | None, *, num_blocks: int, width: int,
                lengths: Tensor | None = None, dense: Tensor | None = None) -> Tensor:
        """Block indices ``[B, Hkv, Tq, width]`` of the queries ``qs [B, H, Tq, D]`` at ``qpos [B, Tq]``."""
        B, H, Tq, _ = qs.shape
        v1, e1, v2 = self._counts(qpos, lengths)
        if Tq > 1 and not use_triton(qs, c1):  # CPU prefill: query chunks on threads (cpu.py)
            return select_cpu(qs, qpos, c1, c2, v1, e1, v2, block_size=self.block_size,
                              kernel_stride=self.kernel_stride, num_blocks=num_blocks, scale=self.scale,
                              init_blocks=self.init_blocks, local_blocks=self.local_blocks, budget=self.budget,
                              width=width, score_dtype=qs.dtype, dense=dense)
        chunk = max(1, (1 << 24) // max(1, B * H * (c1.shape[2] + (0 if c2 is None else c2.shape[2]) + num_blocks)))
        out = []
        for t0 in range(0, Tq, chunk):
            sl = slice(t0, t0 + chunk)
            k1, k2 = c1, c2
            if Tq > 1:  # prefill: only the windows these queries can see (a host sync; decode keeps static shapes)
                k1 = c1[:, :, : int(e1[:, sl].max())]
                k2 = None if c2 is None else c2[:, :, : int(v2[:, sl].max())]
            bs = block_scores(qs[:, :, sl], k1, k2, v1[:, sl], e1[:, sl], None if v2 is None else v2[:, sl],
                              block_size=self.block_size, kernel_stride=self.kernel_stride, num_blocks=num_blocks,
                              scale=self.scale, score_dtype=qs.dtype)
            out.append(select_blocks(bs, qpos[:, sl], block_size=self.block_size, init_blocks=self.init_blocks,
                                     local_blocks=self.local_blocks, budget=self.budget, width=width,
                                     dense=None if dense is None else dense[:, sl]))
        return torch.cat(out, dim=2)

    def _compressed(self, keys: Tensor) -> tuple[Tensor, Tensor | None]:
        ks, s = self.kernel_size, self.kernel_stride
        c2 = compress_keys(keys, 4 * ks, 4 * s) if self.variant == "v2" else None
        return compress_keys(keys, ks, s), c2

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, *, positions: Tensor | None = None, state: InfLLMv2Cache | None = None,
                attention_mask: Tensor | None = None, seq_idx: Tensor | None = None
                ) -> tuple[Tensor, InfLLMv2Cache | None]:
        if seq_idx is not None:
            raise ValueError("infllmv2 does not support packed sequences (seq_idx): its compressed keys and blocks "
                             "would cross document boundaries")
        B, T, _ = x.shape
        real = None if attention_mask is None else attention_mask.bool()
        if state is None:
            if positions is None:
                positions = (torch.arange(T, device=x.device).expand(B, T) if real is None
                             else (real.long().cumsum(1) - 1).clamp(min=0))
            o = self._parallel(*self._project(x, positions), real)
        else:
            if real is None:
                real = torch.ones(B, T, dtype=torch.bool, device=x.device)
            if positions is None:
                positions = state.next_pos[:, None] + (real.long().cumsum(1) - 1).clamp(min=0)
            o = self._step(*self._project(x, positions), positions, real, state)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1)), state

    def check_sequence_parallel(self, size: int) -> None:
        super().check_sequence_parallel(size)
        if self.num_kv_heads % size:
            raise ValueError(f"infllmv2: sequence parallelism over {size} ranks needs num_kv_heads={self.num_kv_heads} "
                             f"divisible by {size} (a KV head's query group selects its blocks together)")

    def forward_sequence_parallel(self, x: Tensor, *, positions: Tensor, attention_mask: Tensor | None,
                                  seq_idx: Tensor | None, comm: Any) -> Tensor:
        """Ulysses (as :meth:`Attention.forward_sequence_parallel`) with whole KV-head groups per rank: every rank
        compresses, scores, selects and attends for its groups over the whole sequence."""
        if seq_idx is not None:
            raise ValueError("infllmv2 does not support packed sequences (seq_idx)")
        B, Tl, _ = x.shape
        parts = [comm.seq_to_heads(t) for t in self._project(x, positions)]  # q, k, v, qs, ks over all tokens
        real = None if attention_mask is None else comm.gather_seq(attention_mask).bool()
        o = comm.heads_to_seq(self._parallel(*parts, real))
        return self.o_proj(o.transpose(1, 2).reshape(B, Tl, -1))

    def _parallel(self, q: Tensor, k: Tensor, v: Tensor, qs: Tensor, ks: Tensor, real: Tensor | None) -> Tensor:
        """Whole sequences, computed in position space: padded tokens are moved behind the real ones (so they are
        in every real query's future) and the outputs moved back."""
        B, H, T, D = q.shape
        perm = lengths = None
        if real is not None and not bool(real.all()):
            perm = torch.sort((~real).to(torch.int8), dim=1, stable=True).indices  # real tokens first, in order
            q, k, v, qs, ks = (t.gather(2, perm[:, None, :, None].expand(-1, t.shape[1], -1, D))
                               for t in (q, k, v, qs, ks))
            lengths = real.sum(1)
        n_max = T if lengths is None else int(lengths.max())
        if self.reference_prefill:
            d = T if n_max < self.dense_len else 0  # the hub's per-call switch
        else:
            d = min(T, max(0, self.dense_len - 1))  # queries p with p + 1 < dense_len
        gqa = self.num_heads != self.num_kv_heads
        parts = []
        if d:
            parts.append(F.scaled_dot_product_attention(q[:, :, :d], k[:, :, :d], v[:, :, :d], is_causal=True,
                                                        scale=self.scale, enable_gqa=gqa))
        if d < T:
            qpos = torch.arange(d, T, device=q.device).expand(B, T - d)
            c1, c2 = self._compressed(ks)
            quirk_len = (lengths if lengths is not None else torch.full((B,), T, device=q.device)) \
                if self.reference_prefill else None
            idx = self._select(qs[:, :, d:], qpos, c1, c2, num_blocks=-(-T // self.block_size), width=self.budget,
                               lengths=quirk_len)
            parts.append(sparse_attention(q[:, :, d:], k, v, qpos, idx, block_size=self.block_size, scale=self.scale,
                                          query_tile=self.query_tile))
        o = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
        if perm is not None:
            o = torch.empty_like(o).scatter(2, perm[:, None, :, None].expand(-1, H, -1, D), o)
        return o

    def _step(self, q: Tensor, k: Tensor, v: Tensor, qs: Tensor, ks: Tensor, positions: Tensor, real: Tensor,
              state: InfLLMv2Cache) -> Tensor:
        """Continue from ``state`` with ``T`` tokens (a prefill chunk or one decode token)."""
        B, H, T, D = q.shape
        if T > 1 and bool(real.any()) and int(positions[real].max()) >= state.bound + T:
            raise ValueError(f"positions must be below the number of tokens absorbed ({state.bound + T})")
        state.grow(state.bound + T)
        cap = state.k.shape[2] - 1
        slot = torch.where(real, positions, cap)[:, None, :, None].expand(B, self.num_kv_heads, T, D)
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad or state.k.requires_grad):
            state.k, state.v = state.k.scatter(2, slot, k), state.v.scatter(2, slot, v)  # differentiable
        else:
            state.k.scatter_(2, slot, k)
            state.v.scatter_(2, slot, v)
        if self.use_nope:
            state.sk.scatter_(2, slot, ks.to(state.sk.dtype))
        old_next = state.next_pos
        state.next_pos = old_next + real.sum(1)
        state.bound += T
        state.append_compressed(old_next, positions, real)
        if state.bound < self.dense_len:  # every query is dense (positions < bound): causal attention on the cache
            n = state.bound
            mask = torch.arange(n, device=q.device) <= positions[:, None, :, None]
            return F.scaled_dot_product_attention(q, state.k[:, :, :n], state.v[:, :, :n], attn_mask=mask,
                                                  scale=self.scale, enable_gqa=self.num_heads != self.num_kv_heads)
        width = self.budget if self.dense_len < 2 else max(self.budget, (self.dense_len - 2) // self.block_size + 1)
        dense = positions + 1 < self.dense_len
        c2 = state.c2 if self.variant == "v2" else None
        idx = self._select(qs, positions, state.c1, c2, num_blocks=-(-state.bound // self.block_size), width=width,
                           dense=dense)
        return sparse_attention(q, state.k, state.v, positions, idx, block_size=self.block_size, scale=self.scale,
                                query_tile=1 if T == 1 else self.query_tile)

    def init_state(self, batch_size: int, *, dtype: torch.dtype, device: torch.device | str,
                   max_length: int | None = None) -> InfLLMv2Cache:
        return InfLLMv2Cache.empty(batch_size, self.num_kv_heads, self.head_dim, dtype, device,
                                   capacity=max_length or 256, block_size=self.block_size,
                                   windows=(self.kernel_size, self.kernel_stride), two_levels=self.variant == "v2",
                                   selection_keys=self.use_nope)

    def extra_repr(self) -> str:
        names = ("kernel_size", "kernel_stride", "block_size", "init_blocks", "window_size", "topk", "dense_len",
                 "variant", "use_nope")
        return ", ".join([f"layer_idx={self.layer_idx}"] + [f"{n}={getattr(self, n)!r}" for n in names])
