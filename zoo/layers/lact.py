"""LaCT: large-chunk test-time training + sliding-window attention (Zhang et al., "Test-Time Training Done
Right", arXiv 2505.23884), following the released language-model layer ``LaCTSWIGLULayer`` (``lact_swiglu``).

One ``qkv`` projection feeds two branches whose outputs are summed before ``o_proj`` (``d`` model width, ``H``
attention heads of ``hd = d / H``, ``nh`` fast-weight heads of ``dh = d / nh``, hidden ``dH = int(dh * inter_multi)``)::

    q, k, v   = qkv(x).chunk(3)                       (+ RMSNorm over all of d when attn_qk_norm)
    attention = SWA(rope(q), rope(k), v)              key j visible to query i iff i - window_size < j <= i
    fq, fk    = q * qk_scale[:, 0] + qk_offset[:, 0],  k * qk_scale[:, 1] + qk_offset[:, 1];   fv = v
    fq, fk, fv = silu(.) (qkv_silu; not fv if no_v_silu);  fq, fk = fq / (||fq|| + 1e-5), ...  (per fw head)
    fq, fk    = rope(fq), rope(fk)                    with the *attention* head split (unless ttt_nope)
    lr        = softplus(lr_proj(x) + inv_softplus(base_lr))   [B, T, nh, 3] -> lr0, lr1, lr2
    m         = sigmoid(momentum_proj(x))                       [B, T, nh]   (use_momentum)
    o_ttt     = LaCT(W_init, fq, fk, fv, lr, m)                 (zoo.kernels.lact: apply then update per chunk)
    y         = o_proj(attention + ttt_norm(o_ttt) * silu(ttt_scale_proj(x)))   (scale: learnable_ttt_scale)

with ``W_init``: ``w0 = w0.w_left @ w0.w_right + 0.5 I`` (``w0_w2_low_rank > 0``, same for ``w2``) and ``w1``.
Token ``t`` of a document (``t`` = real tokens before it) is read with the fast weights after chunks
``< t // chunk_size``; a chunk updates them once it holds ``chunk_size`` tokens.

Beyond the reference (which recomputes the prefix at every generated token, and whose TTT ignores padding and
document boundaries): incremental decoding with a constant-size :class:`LaCTState`; padding never enters a chunk
and packed documents (``seq_idx``) each start from ``W_init`` (``ttt_respect_masks=False`` reproduces the leak).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.kernels.lact import (
    document_index,
    from_heads,
    lact_chunked,
    masked_chunk_update,
    ragged_layout,
    swiglu_apply,
    to_heads,
)
from zoo.layers.base import BenchCase, Mixer, State, check_int
from zoo.layers.masks import SlidingWindowRule
from zoo.layers.norm import RMSNorm
from zoo.layers.rope import RotaryEmbedding, apply_rotary
from zoo.layers.sparse_ops import SparseKVCache, cached_window_attention
from zoo.registry import register_mixer


@dataclass
class LaCTState(State):
    """``w0, w1, w2 [B, nh, ...]`` fast weights (fp32; fp64 stays) after every full chunk; ``mom*`` momenta, ``main*``
    prenorm sums (or None); ``buf [B, C, fk | fv | lr | m]`` the unfinished chunk (slots ``< count % C``, rest 0);
    ``count [B]`` tokens absorbed; ``attn`` the window's ring. Host hints, not counts: ``phases`` holds every value
    ``count % C`` may have (exact after a multi-token call, a superset after masked single tokens), so a decode step
    knows without a sync whether a row may complete its chunk; ``fresh``: nothing absorbed yet."""

    w0: Tensor
    w1: Tensor
    w2: Tensor
    buf: Tensor
    count: Tensor
    attn: SparseKVCache
    mom0: Tensor | None = None
    mom1: Tensor | None = None
    mom2: Tensor | None = None
    main0: Tensor | None = None
    main1: Tensor | None = None
    main2: Tensor | None = None
    phases: frozenset = frozenset({0})
    fresh: bool = True

    @property
    def nbytes(self) -> int:
        return super().nbytes + self.attn.nbytes

    def reorder(self, batch_indices: Tensor) -> None:
        super().reorder(batch_indices)
        self.attn.reorder(batch_indices)

    def get(self, name: str) -> tuple[Tensor, Tensor, Tensor] | None:
        t = tuple(getattr(self, f"{name}{i}") for i in range(3))
        return None if t[0] is None else tuple(x.flatten(0, 1) for x in t)  # type: ignore[return-value]

    def put(self, name: str, ws: tuple[Tensor, ...] | None) -> None:
        for i, w in enumerate(ws or ()):
            setattr(self, f"{name}{i}", w.reshape(getattr(self, f"{name}{i}").shape))


class LowRankFastWeight(nn.Module):
    """``W = w_left @ w_right + 0.5 I``: ``w_left [nh, dH, r]``, ``w_right [nh, r, dh]`` (reference names)."""

    def __init__(self, num_heads: int, out_features: int, in_features: int, rank: int, init_gain: float) -> None:
        super().__init__()
        self.rank, self.init_gain = rank, init_gain
        self.w_left = nn.Parameter(torch.empty(num_heads, out_features, rank))
        self.w_right = nn.Parameter(torch.empty(num_heads, rank, in_features))

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_left, std=self.init_gain / math.sqrt(self.rank))
        nn.init.normal_(self.w_right, std=self.init_gain / math.sqrt(self.w_right.shape[-1]))

    def forward(self) -> Tensor:
        W = self.w_left @ self.w_right
        return W + 0.5 * torch.eye(W.shape[1], W.shape[2], dtype=W.dtype, device=W.device)


CITATION = """@article{zhang2025test,
  title={Test-Time Training Done Right},
  author={Zhang, Tianyuan and others},
  journal={arXiv preprint arXiv:2505.23884},
  year={2025}
}"""


@register_mixer("lact")
class LaCT(Mixer):
    arg_groups = ("lact",)
    citations = (CITATION,)
    _small = {"num_attn_heads": 4, "num_lact_heads": 2}
    example_args = (
        {**_small, "chunk_size": 8, "window_size": 6},
        {**_small, "chunk_size": 8, "window_size": 6, "use_muon": True, "w0_w2_low_rank": 4, "attn_qk_norm": True},
        {**_small, "chunk_size": 6, "window_size": 10, "use_momentum": False, "ttt_prenorm": True,
         "no_v_silu": True, "learnable_ttt_scale": False, "inter_multi": 2.0, "qkv_bias": True},
    )
    demo_args = {"num_attn_heads": 4, "num_lact_heads": 2, "chunk_size": 64, "window_size": 64}
    supports_packing = True
    dtypes = ("float16", "bfloat16")
    state_growth = "constant"
    bench_cases = (BenchCase(
        args={"full": {"d_model": 1536, "num_attn_heads": 24, "num_lact_heads": 4, "w0_w2_low_rank": 32,
                       "chunk_size": 2048, "window_size": 2048},
              "quick": {"d_model": 256, "num_attn_heads": 4, "num_lact_heads": 2, "chunk_size": 256,
                        "window_size": 256}},
        reference=None, description="LaCT-760M layer (SWA 2048 + SwiGLU fast weights, chunk 2048, momentum)"),)
    del _small

    def __init__(self, d_model: int, layer_idx: int = 0, *, num_attn_heads: int = 32, num_lact_heads: int = 4,
                 inter_multi: float = 1.0, window_size: int = 2048, chunk_size: int = 2048, qkv_bias: bool = False,
                 attn_qk_norm: bool = False, qkv_silu: bool = True, no_v_silu: bool = False, lr_dim: int = 1,
                 use_muon: bool = False, lr_parameterization: str = "mamba", learnable_ttt_scale: bool = True,
                 ttt_prenorm: bool = False, ttt_nope: bool = False, rope_theta: float = 10000.0,
                 w0_w2_low_rank: int = -1, use_momentum: bool = True, ttt_loss_type: str = "dot_product",
                 fw_init_gain: float = 0.5, use_fused_kernel: bool = False, base_lr: float = 1e-3,
                 ttt_respect_masks: bool = True) -> None:
        super().__init__(d_model, layer_idx)
        kw = {k: v for k, v in locals().items() if k not in ("self", "d_model", "layer_idx", "__class__")}
        self.check_args(d_model, kw)
        self.H, self.hd = num_attn_heads, d_model // num_attn_heads
        self.nh, self.dh = num_lact_heads, d_model // num_lact_heads
        self.dH = int(self.dh * inter_multi)
        self.window_size, self.chunk_size, self.use_muon = window_size, chunk_size, use_muon
        self.qkv_silu, self.no_v_silu, self.ttt_prenorm, self.ttt_nope = qkv_silu, no_v_silu, ttt_prenorm, ttt_nope
        self.use_momentum, self.learnable_ttt_scale, self.attn_qk_norm = use_momentum, learnable_ttt_scale, attn_qk_norm
        self.joint_muon, self.ttt_respect_masks = use_fused_kernel, ttt_respect_masks
        self.base_lr_inv = base_lr + math.log(-math.expm1(-base_lr))  # inv_softplus
        self.rule = SlidingWindowRule(window_size)

        self.qkv = nn.Linear(d_model, 3 * d_model, bias=qkv_bias)
        if attn_qk_norm:
            self.q_norm, self.k_norm = RMSNorm(d_model, 1e-5), RMSNorm(d_model, 1e-5)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        self.rotary = RotaryEmbedding(self.hd, rope_theta)
        for name in ("w0", "w2"):  # [nh, dH, dh]: low rank + 0.5 I, or dense
            setattr(self, name, LowRankFastWeight(self.nh, self.dH, self.dh, w0_w2_low_rank, fw_init_gain)
                    if w0_w2_low_rank > 0 else nn.Parameter(torch.empty(self.nh, self.dH, self.dh)))
        self.w1 = nn.Parameter(torch.empty(self.nh, self.dh, self.dH))
        self.lr_proj = nn.Linear(d_model, 3 * self.nh * lr_dim)
        self.qk_scale, self.qk_offset = nn.Parameter(torch.ones(d_model, 2)), nn.Parameter(torch.zeros(d_model, 2))
        if learnable_ttt_scale:
            self.ttt_scale_proj = nn.Linear(d_model, self.nh)
        self.ttt_norm = RMSNorm(self.dh, 1e-5)
        if use_momentum:
            self.momentum_proj = nn.Sequential(nn.Linear(d_model, self.nh), nn.Sigmoid())
        self.reset_mixer_parameters()

    @classmethod
    def check_args(cls, d_model: int, kwargs: dict[str, Any]) -> None:
        for name, default in (("num_attn_heads", 32), ("num_lact_heads", 4), ("window_size", 2048),
                              ("chunk_size", 2048)):
            v = kwargs.get(name, default)
            check_int(f"lact: {name}", v)
            if name.startswith("num_") and d_model % v:
                raise ValueError(f"lact: d_model={d_model} is not divisible by {name}={v}")
        if (d_model // kwargs.get("num_attn_heads", 32)) % 2:
            raise ValueError(f"lact: attention head dim d_model/num_attn_heads={d_model // kwargs['num_attn_heads']} "
                             "must be even (RoPE)")
        if int(d_model // kwargs.get("num_lact_heads", 4) * kwargs.get("inter_multi", 1.0)) <= 0:
            raise ValueError(f"lact: inter_multi={kwargs.get('inter_multi')} leaves no fast-weight hidden units")
        for name, allowed in (("lr_dim", (1,)), ("lr_parameterization", ("mamba",)),
                              ("ttt_loss_type", ("dot_product",))):
            if kwargs.get(name, allowed[0]) not in allowed:
                raise ValueError(f"lact: {name}={kwargs[name]!r} is not supported; allowed: {list(allowed)} "
                                 "(every released configuration)")
        if not kwargs.get("base_lr", 1e-3) > 0:
            raise ValueError(f"lact: base_lr={kwargs['base_lr']!r} must be > 0")

    @torch.no_grad()
    def reset_mixer_parameters(self) -> None:
        """The reference's ``_init_weights`` for the layer's own tensors (Linear layers: the model's normal init)."""
        self.qk_scale.fill_(1.0), self.qk_offset.zero_(), self.ttt_norm.weight.fill_(1.0)
        for w in (self.w0, self.w2):
            if isinstance(w, LowRankFastWeight):
                w.reset_parameters()
            else:
                nn.init.normal_(w, std=1 / math.sqrt(self.dh))
        nn.init.normal_(self.w1, std=1 / math.sqrt(self.dH))

    def initial_fast_weights(self, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """``W_init`` as ``[nh, ...]`` in ``dtype`` (differentiable)."""
        w0, w2 = (w() if isinstance(w, LowRankFastWeight) else w for w in (self.w0, self.w2))
        return w0.to(dtype), self.w1.to(dtype), w2.to(dtype)

    # ------------------------------------------------------------------ state
    def init_state(self, batch_size: int, *, dtype: torch.dtype, device: torch.device | str,
                   max_length: int | None = None) -> LaCTState:
        """Constant size (``max_length`` is not needed)."""
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        with torch.no_grad():
            ws = [w.to(device).expand(batch_size, *w.shape).clone() for w in self.initial_fast_weights(acc)]
        F_ = 2 * self.d_model + 4 * self.nh  # fk | fv | lr (3 per head) | m (1 per head)
        st = LaCTState(*ws, buf=torch.zeros(batch_size, self.chunk_size, F_, dtype=acc, device=device),
                       count=torch.zeros(batch_size, dtype=torch.long, device=device),
                       attn=SparseKVCache.empty(self.rule, batch_size, self.H, self.hd, dtype, device))
        if self.use_momentum:
            st.mom0, st.mom1, st.mom2 = (torch.zeros_like(w) for w in ws)
        if self.ttt_prenorm:
            st.main0, st.main1, st.main2 = (w.clone() for w in ws)
        return st

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, *, positions: Tensor | None = None, state: LaCTState | None = None,
                attention_mask: Tensor | None = None, seq_idx: Tensor | None = None
                ) -> tuple[Tensor, LaCTState | None]:
        B, T, d = x.shape
        if state is not None and seq_idx is not None:
            raise ValueError("lact: seq_idx (packed sequences) is supported by the parallel forward only")
        real = None if attention_mask is None else attention_mask.bool()
        if seq_idx is not None:  # packed: every document starts at position 0 (as the reference's varlen RoPE)
            positions = document_index(real, seq_idx)[0]
        elif positions is None:
            rel = torch.arange(T, device=x.device).expand(B, T) if real is None else \
                (real.long().cumsum(1) - 1).clamp(min=0)
            positions = rel if state is None else state.count[:, None] + rel
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.attn_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        # the TTT branch's q / k: per-channel scale and offset (the LM code; the paper puts them on attention)
        fq, fk, fv = (q * self.qk_scale[:, 0] + self.qk_offset[:, 0]).to(acc), \
            (k * self.qk_scale[:, 1] + self.qk_offset[:, 1]).to(acc), v.to(acc)
        cos, sin = self.rotary(positions, q.dtype)
        qh, kh, vh = (t.view(B, T, self.H, self.hd).transpose(1, 2) for t in (q, k, v))
        o = cached_window_attention(self.rule, apply_rotary(qh, cos, sin), apply_rotary(kh, cos, sin), vh, positions,
                                    real, seq_idx, None if state is None else state.attn, self.hd**-0.5)

        if self.qkv_silu:
            fq, fk = F.silu(fq), F.silu(fk)
            fv = fv if self.no_v_silu else F.silu(fv)
        fq, fk = (t.view(B, T, self.nh, self.dh) for t in (fq, fk))
        fq, fk = (t / (t.norm(dim=-1, keepdim=True) + 1e-5) for t in (fq, fk))
        if not self.ttt_nope:
            cos, sin = cos.to(acc), sin.to(acc)
            fq, fk = (apply_rotary(t.reshape(B, T, self.H, self.hd).transpose(1, 2), cos, sin).transpose(1, 2)
                      for t in (fq, fk))
        fq, fk = fq.reshape(B, T, d), fk.reshape(B, T, d)
        lr = F.softplus(self.lr_proj(x).to(acc) + self.base_lr_inv)  # [B, T, nh * 3]
        mom = self.momentum_proj(x).to(acc) if self.use_momentum else lr.new_zeros(B, T, self.nh)
        tok = torch.cat([fk, fv, lr, mom], dim=-1)  # what a chunk update reads, per token
        keep = real if self.ttt_respect_masks else None
        if state is not None and T == 1:
            y = self._ttt_step(fq, tok, keep, state)
        else:
            y = self._ttt(fq, tok, keep, seq_idx if self.ttt_respect_masks else None, state)
        y = self.ttt_norm(y.view(B, T, self.nh, self.dh))
        if self.learnable_ttt_scale:
            y = y * F.silu(self.ttt_scale_proj(x)).to(y.dtype)[..., None]
        return self.o_proj(o + y.reshape(B, T, d).to(o.dtype)), state

    def _start(self, R: int, acc: torch.dtype) -> tuple[Any, Any, Any, Any]:
        """``W_init`` (differentiable), prenorm mains, zero momenta and the row norms for ``R`` rows x heads."""
        ws = tuple(w.repeat(R, 1, 1) for w in self.initial_fast_weights(acc))
        moms = tuple(torch.zeros_like(w) for w in ws) if self.use_momentum else None
        norms = tuple(w.norm(dim=2, keepdim=True) for w in ws)
        return ws, (ws if self.ttt_prenorm else None), moms, norms

    def _ttt(self, fq: Tensor, tok: Tensor, real: Tensor | None, seq_idx: Tensor | None,
             state: LaCTState | None) -> Tensor:
        """TTT branch of a parallel forward or a prefill chunk: ``fq [B, T, d]``, ``tok [B, T, F]`` -> ``[B, T, d]``."""
        B, T, d = fq.shape
        C, nh = self.chunk_size, self.nh
        opts = dict(chunk_size=C, use_muon=self.use_muon, joint_muon=self.joint_muon)
        if state is None and real is None and seq_idx is None:  # plain rows: no re-layout
            ws, mains, moms, norms = self._start(B, fq.dtype)
            k, v, lr, m = (to_heads(t, nh) for t in tok.split([d, d, 3 * nh, nh], -1))
            out, *_ = lact_chunked(ws, to_heads(fq, nh), k, v, lr, m if moms else None, norms=norms, mains=mains,
                                   moms=moms, final_update=False, **opts)
            return from_heads(out, nh)
        # ragged: every document (or row with a state) in its own chunk-aligned row of the layout
        keep = torch.ones(B, T, dtype=torch.bool, device=fq.device) if real is None else real
        src, dst, D, L, lengths = ragged_layout(keep, seq_idx, None if state is None else state.count % C, C)
        qv = fq.new_zeros(D * L, d).index_copy(0, dst, fq.reshape(B * T, d)[src]).view(D, L, d)
        Ft = tok.shape[-1]
        base = tok.new_zeros(D, L, Ft)
        if state is not None:  # the current chunk's earlier tokens come first
            base = torch.cat([state.buf, base[:, C:]], 1)
        tv = base.view(D * L, Ft).index_copy(0, dst, tok.reshape(B * T, Ft)[src]).view(D, L, Ft)
        ws, mains, moms, norms = self._start(D, fq.dtype)
        if state is not None and not state.fresh:
            ws, mains, moms = state.get("w"), state.get("main"), state.get("mom")
        k, v, lr, m = (to_heads(t, nh) for t in tv.split([d, d, 3 * nh, nh], -1))
        out, ws, mains, moms = lact_chunked(ws, to_heads(qv, nh), k, v, lr, m if moms else None, norms=norms,
                                            mains=mains, moms=moms, lengths=lengths.repeat_interleave(nh),
                                            final_update=state is not None, **opts)
        y = fq.new_zeros(B * T, d).index_copy(0, src, from_heads(out, nh).reshape(D * L, d)[dst])
        if state is not None:
            start = (lengths // C * C)[:, None] + torch.arange(C, device=fq.device)  # the unfinished chunk
            buf = tv.gather(1, start.clamp(max=L - 1)[..., None].expand(D, C, Ft))
            state.buf = buf * (torch.arange(C, device=fq.device) < (lengths % C)[:, None])[..., None]  # stale: 0
            state.put("w", ws), state.put("main", mains), state.put("mom", moms)
            state.count = state.count + keep.sum(1)
            state.phases, state.fresh = frozenset((state.count % C).tolist()), False
        return y.view(B, T, d)

    def _ttt_step(self, fq: Tensor, tok: Tensor, real: Tensor | None, state: LaCTState) -> Tensor:
        """One token per row, no host synchronisation: apply, append to the chunk, update rows whose chunk fills."""
        B, _, d = fq.shape
        C, nh = self.chunk_size, self.nh
        if state.fresh:
            ws, mains, moms, _ = self._start(B, fq.dtype)
        else:
            ws, mains, moms = state.get("w"), state.get("main"), state.get("mom")
        y = swiglu_apply(*ws, to_heads(fq, nh))  # apply first: [B * nh, 1, dh]
        slot = (state.count % C)[:, None, None].expand(B, 1, tok.shape[-1])
        if real is not None:
            tok = torch.where(real[..., None], tok, state.buf.gather(1, slot))
        grad = torch.is_grad_enabled() and (tok.requires_grad or state.buf.requires_grad)
        state.buf = state.buf.scatter(1, slot, tok) if grad else state.buf.scatter_(1, slot, tok)
        if C - 1 in state.phases:  # some row may complete its chunk: update, keep it where it did
            full = state.count % C == C - 1
            full = full if real is None else full & real[:, 0]
            k, v, lr, m = (to_heads(t, nh) for t in state.buf.split([d, d, 3 * nh, nh], -1))
            norms = self._start(B, fq.dtype)[3]
            ws, mains, moms = masked_chunk_update(ws, mains, moms, k, v, lr, m, full.repeat_interleave(nh), norms,
                                                  chunk_size=C, use_muon=self.use_muon, joint_muon=self.joint_muon)
            state.buf = state.buf * ~full[:, None, None]  # a completed chunk leaves an empty buffer
        state.put("w", ws), state.put("main", mains), state.put("mom", moms)
        state.count = state.count + (1 if real is None else real[:, 0].long())
        shifted = {(p + 1) % C for p in state.phases}
        state.phases, state.fresh = frozenset(shifted if real is None else shifted | state.phases), False
        return from_heads(y, nh)

    # ------------------------------------------------------------------ self-description
    @classmethod
    def flops(cls, d_model: int, args: dict[str, Any], *, T: int, context: int = 0, batch: int = 1) -> int:
        """Projections, window attention and TTT (apply ``6 dh dH`` per token and head; every full chunk
        ``12 C dh dH`` per head + Newton-Schulz when use_muon). ``context == 0``: the parallel forward (the last
        chunk never updates); otherwise the state's eager updates."""
        d, nh, C, W = d_model, args.get("num_lact_heads", 4), args.get("chunk_size", 2048), args.get("window_size",
                                                                                                     2048)
        dh, dH = d // nh, int(d // nh * args.get("inter_multi", 1.0))
        side = nh * (3 + bool(args.get("use_momentum", True)) + bool(args.get("learnable_ttt_scale", True)))
        proj = 2 * T * d * (4 * d + side)
        a, b = context + 1, context + T  # query i sees min(W, its 1-based position) keys
        lo = min(b, W)
        keys = (max(0, lo - a + 1) * (a + lo) // 2 if a <= lo else 0) + W * (b - max(a - 1, W) if b > W else 0)
        attn = 4 * d * keys  # QK^T and PV over all heads (H * hd = d)
        updates = (T - 1) // C if context == 0 else (context + T) // C - context // C
        m, n = min(dH, dh), max(dH, dh)
        muon = (5 * (4 * m * m * n + 2 * m**3)) * (3 if args.get("use_muon", False) else 0)
        ttt = nh * (6 * T * dh * dH + updates * (12 * C * dh * dH + muon))
        return batch * (proj + attn + ttt)

    def extra_repr(self) -> str:
        return (f"layer_idx={self.layer_idx}, heads={self.H}, lact_heads={self.nh}, dh={self.dh}, dH={self.dH}, window="
                f"{self.window_size}, chunk={self.chunk_size}, muon={self.use_muon}, momentum={self.use_momentum}")
