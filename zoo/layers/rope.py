"""Rotary position embedding (RoPE), rotate-half (GPT-NeoX / Llama) layout, with transformers' scaling variants.

``inv_freq[j] = theta^(-2j/d)`` for ``j < d/2``; ``angle[t, j] = pos_t * inv_freq[j]``;
``rope(x) = a * (x * cos(angle) + rotate_half(x) * sin(angle))`` with ``rotate_half([a, b]) = [-b, a]`` and an
attention factor ``a`` (1 except for ``yarn`` / ``longrope``; it multiplies cos and sin, so the logits by ``a^2``).
Angles are computed in fp32, as transformers does. ``rope_scaling`` (transformers' ``rope_scaling`` /
``rope_parameters`` dict, key ``rope_type`` or ``type``) follows ``transformers.modeling_rope_utils``:

* ``linear``: ``inv_freq / factor``.
* ``llama3``: piecewise by wavelength (``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``).
* ``yarn``: ``inv_freq = extrap * (1 - ramp) + interp * ramp`` (``extrap = inv_freq``, ``interp = inv_freq /
  factor``, a 0..1 ramp over the dims between ``find_correction_dim(beta_fast)`` and ``(beta_slow)``, floored /
  ceiled unless ``truncate`` is False); ``a = attention_factor`` or ``0.1 ln(factor) + 1`` (the ratio of the
  ``mscale`` / ``mscale_all_dim`` forms when both are given). ``factor`` defaults to ``max_position_embeddings /
  original_max_position_embeddings``.
* ``longrope``: ``inv_freq = 1 / (ext * theta^(2j/d))`` with ``ext = long_factor`` when the call's sequence length
  ``max(positions) + 1`` exceeds ``original_max_position_embeddings``, else ``short_factor`` (chosen per call, as
  transformers' ``dynamic_rope_update``); ``a = attention_factor`` or ``sqrt(1 + ln(f) / ln(orig))`` for
  ``f = factor`` (default ``max_position_embeddings / orig``) above 1, else 1.
* ``dynamic`` (dynamic NTK): ``theta' = theta * (factor * L / max_pos - (factor - 1)) ^ (d / (d - 2))`` for the
  call's length ``L = max(positions) + 1`` when it exceeds ``max_position_embeddings`` (otherwise plain RoPE).

``longrope`` and ``dynamic`` depend on the length of the call (as in transformers), so a sequence crossing
``original_max_position_embeddings`` / ``max_position_embeddings`` gets other angles in one parallel call than in
a token-by-token decode whose cache was rotated earlier; transformers behaves the same. One difference: transformers'
``dynamic`` keeps the largest length seen so far (a call shorter than an earlier long one, but still above
``max_position_embeddings``, reuses the earlier frequencies); here every call uses its own length (stateless).
The per-call choice is made with tensor ops (``torch.where``), never a host synchronisation.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from zoo.kernels.elementwise_cpu import rotary_native

ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope", "dynamic")


def rope_type(scaling: dict[str, Any] | None) -> str:
    """The scaling type of a transformers-style ``rope_scaling`` dict (``"default"`` for None)."""
    s = scaling or {}
    return s.get("rope_type", s.get("type", "default"))


def _base_inv_freq(dim: int, theta: float | Tensor) -> Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _original_max(scaling: dict[str, Any], max_position_embeddings: int | None) -> int:
    orig = scaling.get("original_max_position_embeddings") or max_position_embeddings
    if orig is None:
        raise ValueError(f"rope_scaling {rope_type(scaling)!r} needs original_max_position_embeddings "
                         "(or the model's max_position_embeddings)")
    return int(orig)


def _yarn(dim: int, theta: float, scaling: dict[str, Any], max_pos: int | None) -> tuple[Tensor, float]:
    orig = _original_max(scaling, max_pos)
    factor = scaling.get("factor")
    if factor is None:
        factor = (max_pos or orig) / orig

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrap, interp = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # share of the extrapolated (unscaled) frequency
    return interp * (1 - keep) + extrap * keep, float(attention_factor)


def _longrope_attention_factor(scaling: dict[str, Any], max_pos: int | None) -> float:
    orig = _original_max(scaling, max_pos)
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = scaling.get("factor")
    if factor is None:
        factor = (max_pos or orig) / orig
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))


def _longrope_inv_freq(dim: int, theta: float, factors: list[float]) -> Tensor:
    if len(factors) != dim // 2:
        raise ValueError(f"longrope factors must have rotary_dim/2 = {dim // 2} entries, got {len(factors)}")
    ext = torch.tensor(factors, dtype=torch.float32)
    return 1.0 / (ext * theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def rope_parameters(dim: int, theta: float, scaling: dict[str, Any] | None = None,
                    max_position_embeddings: int | None = None, seq_len: int | None = None) -> tuple[Tensor, float]:
    """``(inv_freq [dim/2], attention_factor)`` for a sequence of ``seq_len`` tokens (None: the static value:
    ``longrope`` short factors, ``dynamic`` unscaled), the counterpart of transformers' ``ROPE_INIT_FUNCTIONS``
    (fp32, as transformers)."""
    kind = rope_type(scaling)
    if kind == "default":
        return _base_inv_freq(dim, theta), 1.0
    assert scaling is not None
    if kind == "linear":
        return _base_inv_freq(dim, theta) / scaling["factor"], 1.0
    if kind == "llama3":
        inv_freq = _base_inv_freq(dim, theta)
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        return _yarn(dim, theta, scaling, max_position_embeddings)
    if kind == "longrope":
        orig = _original_max(scaling, max_position_embeddings)
        long = seq_len is not None and seq_len > orig
        factors = scaling["long_factor"] if long else scaling["short_factor"]
        return _longrope_inv_freq(dim, theta, factors), _longrope_attention_factor(scaling, max_position_embeddings)
    if kind == "dynamic":
        if max_position_embeddings is None:
            raise ValueError("rope_scaling 'dynamic' needs the model's max_position_embeddings")
        L = max(seq_len or 0, max_position_embeddings)
        factor = scaling["factor"]
        base = theta * ((factor * L / max_position_embeddings) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(dim, base), 1.0
    raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: {list(ROPE_TYPES)}")


def rope_inv_freq(dim: int, theta: float, scaling: dict[str, Any] | None = None,
                  max_position_embeddings: int | None = None) -> Tensor:
    """The static inverse frequencies (see :func:`rope_parameters`)."""
    return rope_parameters(dim, theta, scaling, max_position_embeddings)[0]


DYNAMIC_ROPE = ("dynamic", "longrope")  # RoPE kinds whose frequencies depend on the call's positions


class RotaryEmbedding(nn.Module):
    def __init__(self, dim: int, theta: float = 10000.0, scaling: dict[str, Any] | None = None,
                 max_position_embeddings: int | None = None) -> None:
        super().__init__()
        self.dim, self.theta, self.scaling = dim, theta, scaling
        self.max_position_embeddings = max_position_embeddings
        self.kind = rope_type(scaling)
        inv_freq, self.attention_factor = rope_parameters(dim, theta, scaling, max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        if self.kind == "longrope":
            self.original_max = _original_max(scaling or {}, max_position_embeddings)
            self.register_buffer("long_inv_freq", self._long(), persistent=False)

    def _long(self) -> Tensor:
        return _longrope_inv_freq(self.dim, self.theta, (self.scaling or {})["long_factor"])

    def reset_buffers(self) -> None:
        """Recompute the frequency buffers (after the module was built on the meta device)."""
        dev = self.inv_freq.device
        self.inv_freq = rope_parameters(self.dim, self.theta, self.scaling, self.max_position_embeddings)[0].to(dev)
        if self.kind == "longrope":
            self.long_inv_freq = self._long().to(dev)

    def _call_inv_freq(self, positions: Tensor) -> Tensor:
        """``[dim/2]`` fp32 frequencies of this call (the length-dependent types choose with tensor ops)."""
        inv = self.inv_freq.float()
        if self.kind == "longrope":
            inv = torch.where(positions.max() + 1 > self.original_max, self.long_inv_freq.float(), inv)
        elif self.kind == "dynamic":
            max_pos = self.max_position_embeddings
            factor = self.scaling["factor"]  # type: ignore[index]
            # the same tensor expression (fp32) as transformers' _compute_dynamic_ntk_parameters with a tensor length
            L = torch.clamp(positions.max() + 1, min=max_pos)
            base = self.theta * ((factor * L / max_pos) - (factor - 1)) ** (self.dim / (self.dim - 2))
            exponent = torch.arange(0, self.dim, 2, dtype=torch.int64, device=positions.device).float() / self.dim
            inv = 1.0 / (base ** exponent)
        return inv

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``positions: [B, T]`` -> ``cos, sin: [B, 1, T, dim]`` (broadcast over heads), times the attention factor."""
        emb = positions.float()[..., None] * self._doubled_freqs(positions)  # [B, T, dim], fp32 for every dtype
        cos, sin = self._cos_sin(emb, dtype)
        return cos[:, None], sin[:, None]

    def step(self, offset: int, positions: Tensor | None, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``cos, sin`` of one token per row, the values of :meth:`forward` with fewer calls (a decode step):
        ``[dim]`` for every row at the host-side ``offset`` (``positions`` None; the static kinds only: the
        length-dependent ones need the positions), else ``[B, 1, dim]`` from ``positions [B, 1]``."""
        if positions is None:
            if self.kind in DYNAMIC_ROPE:
                raise ValueError(f"RotaryEmbedding.step: the {self.kind!r} RoPE needs the positions")
            return self._cos_sin(self._doubled_inv_freq() * float(offset), dtype)
        return self._cos_sin(positions.float()[..., None] * self._doubled_freqs(positions), dtype)

    def _doubled_freqs(self, positions: Tensor) -> Tensor:
        """``cat([inv, inv])`` of this call's fp32 frequencies ``[dim]`` (cached for the static kinds)."""
        if self.kind in DYNAMIC_ROPE:
            inv = self._call_inv_freq(positions)
            return torch.cat((inv, inv))
        return self._doubled_inv_freq()

    def _cos_sin(self, emb: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        cos, sin = emb.cos(), emb.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return (cos, sin) if cos.dtype == dtype else (cos.to(dtype), sin.to(dtype))

    def _doubled_inv_freq(self) -> Tensor:
        """``cat([inv_freq, inv_freq])`` in fp32 (the static kinds), cached until the buffer is replaced or written."""
        inv = self._buffers["inv_freq"]
        key = (inv.data_ptr(), inv._version)
        c = self.__dict__.get("_doubled")
        if c is None or c[0] != key:
            c = (key, torch.cat([inv, inv]).float())
            self.__dict__["_doubled"] = c
        return c[1]


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of ``x: [B, H, T, D]``; the rest pass through."""
    rd = cos.shape[-1]
    if rd == x.shape[-1] and cos.dtype == x.dtype and not (torch.is_grad_enabled() and (
            x.requires_grad or cos.requires_grad or sin.requires_grad)):
        return _rotary_inference(x, cos, sin)
    if rd == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    xr, xp = x[..., :rd], x[..., rd:]
    return torch.cat((xr * cos + rotate_half(xr) * sin, xp), dim=-1)


def _rotary_inference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x * cos + rotate_half(x) * sin`` without autograd, written half by half into one buffer of ``x``'s layout
    (two passes instead of five, no concatenated copy): ``[x1 c1 - x2 s1, x2 c2 + x1 s2]``; in fp32 on the CPU one
    native pass (:func:`zoo.kernels.elementwise_cpu.rotary_native`)."""
    out = rotary_native(x, cos, sin) if x.device.type == "cpu" else None  # one native pass (fp32)
    if out is not None:
        return out
    h = x.shape[-1] // 2
    out = torch.empty_like(x)
    x1, x2, o1, o2 = x[..., :h], x[..., h:], out[..., :h], out[..., h:]
    torch.mul(x1, cos[..., :h], out=o1).addcmul_(x2, sin[..., :h], value=-1)
    torch.mul(x2, cos[..., h:], out=o2).addcmul_(x1, sin[..., h:])
    return out
