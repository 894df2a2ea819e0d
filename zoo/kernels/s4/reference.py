"""Cauchy and Vandermonde products of S4 / S4D in plain torch: the CPU path and the oracle of the Triton kernels.

Shapes: ``v [M, H, N]`` (complex; ``M`` stacks the batched B/C products), ``w, x [H, N]`` (complex), ``z [K]``
(complex nodes). ``N`` is half the state size: each term stands for a conjugate pair.

    cauchy(v, z, w)[m, h, k]        = sum_n v/(z_k - w_n) + conj(v)/(z_k - conj(w_n))
    log_vandermonde(v, x, L)[m, h, l] = 2 Re sum_n v_n exp(x_n l),   l = 0 .. L-1

Both are computed in slices of the node axis ``K`` / ``L`` (``[H, N, slice]`` tiles of at most ``TILE`` complex
elements, contracted with a batched matmul), so memory stays bounded whatever the length; the backward passes
are written out (no autograd graph over the tiles). The naive versions materialise the whole ``[.., N, K]``
matrix as ``state-spaces/s4``'s fallback does; they are kept for tests and the memory benchmark only.

Gradients follow PyTorch's complex convention (``grad = conj(g) d out/d conj(p) + g conj(d out/d p)``)::

    cauchy:      grad_v = sum_k g conj(R1) + conj(g) R2,   grad_w = sum_m conj(v) sum_k g conj(R1)^2 + conj(g) R2^2
                 with R1 = 1/(z - w), R2 = 1/(z - conj(w))
    vandermonde: grad_v = 2 sum_l g conj(E),              grad_x = 2 sum_m conj(v) sum_l g l conj(E),  E = exp(x l)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

TILE = 1 << 22  # complex elements per [H, N, slice] tile of exp(x l) (32 MiB in complex64)
VAND_SLICE = 256  # columns of the one exp(x j) tile of the Vandermonde product (the rest by shifts)
SMALL_TILE = 1 << 16  # real elements per [h, N, k] tile of the Cauchy matrix (256 KiB in fp32: stays in cache)


def _slice(H: int, N: int, K: int, tile: int | None = None) -> int:
    return max(1, min(K, (tile or TILE) // max(1, H * N)))


class _Sym:
    """``S = 2 / ((z - w)(z - conj w))`` on ``[h, N, k]`` tiles as real and imaginary planes, in real arithmetic
    into preallocated buffers (small tiles stay in cache; no allocator traffic). One conjugate pair sums to
    ``v/(z-w) + conj(v)/(z-conj w) = (z Re v - Re(v conj w)) S``."""

    def __init__(self, z: Tensor, w: Tensor) -> None:
        self.zr, self.zi = z.real.contiguous(), z.imag.contiguous()
        self.q, self.p2 = self.zr * self.zr - self.zi * self.zi, 2 * self.zi * self.zr
        self.a2, self.w2 = (-2 * w.real)[..., None].contiguous(), w.abs().square()[..., None].contiguous()
        self.bufs: dict[tuple[int, ...], tuple[Tensor, Tensor, Tensor]] = {}

    def __call__(self, hs: slice, ks: slice) -> tuple[Tensor, Tensor]:
        a2, w2, zr, zi = self.a2[hs], self.w2[hs], self.zr[ks], self.zi[ks]
        shape = (a2.shape[0], a2.shape[1], zr.shape[0])
        if shape not in self.bufs:
            self.bufs[shape] = tuple(zr.new_empty(shape) for _ in range(3))
        re, im, inv = self.bufs[shape]
        torch.add(w2, self.q[ks], out=re).addcmul_(a2, zr)  # Re (z - w)(z - conj w)
        torch.addcmul(self.p2[ks], a2, zi, out=im)  # Im (z - w)(z - conj w) = 2 zi (zr - Re w)
        torch.mul(re, re, out=inv).addcmul_(im, im).reciprocal_().mul_(2)
        return re.mul_(inv), im.mul_(inv).neg_()


def _tiles(H: int, N: int, K: int, tile: int | None) -> tuple[int, int]:
    kb = min(K, 256)
    return max(1, min(H, (tile or SMALL_TILE) // (N * kb))), kb


def cauchy_fwd_ref(v: Tensor, z: Tensor, w: Tensor, tile: int | None = None) -> Tensor:
    """``[M, H, N] x [K] x [H, N] -> [M, H, K]`` (see module docstring)."""
    M, H, N = v.shape
    K = z.shape[0]
    wh = w[None]
    coef = torch.cat([v.real, -(v.real * wh.real + v.imag * wh.imag)]).transpose(0, 1).contiguous()  # [H, 2M, N]
    out = v.new_empty(H, M, K)
    sym = _Sym(z, w)
    hb, kb = _tiles(H, N, K, tile)
    for h0 in range(0, H, hb):
        hs = slice(h0, h0 + hb)
        for k0 in range(0, K, kb):
            ks = slice(k0, k0 + kb)
            sr, si = sym(hs, ks)
            p = torch.complex(torch.bmm(coef[hs], sr), torch.bmm(coef[hs], si))  # [h, 2M, k]
            out[hs, :, ks] = z[ks] * p[:, :M] + p[:, M:]
    return out.transpose(0, 1)


def cauchy_bwd_ref(g: Tensor, v: Tensor, z: Tensor, w: Tensor, tile: int | None = None) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`cauchy_fwd_ref` w.r.t. ``v [M, H, N]`` and ``w [H, N]`` for ``g [M, H, K]``.

    With ``out = sum_n (z vr - c) S``, ``c = vr a + vi b`` (``w = a + ib``), ``dS/da = (z - a) S^2``,
    ``dS/db = -b S^2`` and ``G = Re sum_k g conj(z)^p conj(S^q)`` (five contractions over ``k``)."""
    M, H, N = v.shape
    K = z.shape[0]
    zc = z.conj()
    gh = g.transpose(0, 1)  # [H, M, K]
    gz = torch.cat([gh, gh * zc, gh * zc * zc], 1)  # [H, 3M, K]
    gr, gi = gz.real.contiguous(), gz.imag.contiguous()
    G = v.real.new_zeros(2, H, 3 * M, N)  # [S, S^2] x [g, g conj z, g conj z^2]
    sym = _Sym(z, w)
    hb, kb = _tiles(H, N, K, tile)
    for h0 in range(0, H, hb):
        hs = slice(h0, h0 + hb)
        for k0 in range(0, K, kb):
            ks = slice(k0, k0 + kb)
            sr, si = sym(hs, ks)
            s2r, s2i = sr * sr - si * si, 2 * sr * si
            a_r, a_i = gr[hs, :, ks], gi[hs, :, ks]
            for q, (xr, xi) in enumerate(((sr, si), (s2r, s2i))):  # Re sum_k a conj(s) = ar sr + ai si
                G[q, hs] += torch.bmm(a_r, xr.transpose(1, 2)) + torch.bmm(a_i, xi.transpose(1, 2))
    G1, G2 = G[0, :, :M].transpose(0, 1), G[0, :, M:2 * M].transpose(0, 1)  # [M, H, N]
    G3, G4, G5 = (G[1, :, i * M:(i + 1) * M].transpose(0, 1) for i in range(3))
    a, b = w.real, w.imag
    vr, vi = v.real, v.imag
    c = vr * a + vi * b
    gv = torch.complex(G2 - a * G1, -b * G1)
    ga = (-vr * G1 + vr * (G5 - a * G4) - c * (G4 - a * G3)).sum(0)
    gb = (-vi * G1 - b * (vr * G4 - c * G3)).sum(0)
    return gv, torch.complex(ga, gb)


def _powers(x: Tensor, js: Tensor) -> tuple[Tensor, Tensor]:
    """``exp(x j)`` for the exponents ``js`` as real and imaginary ``[..., N, len(js)]`` planes (real exp / cos /
    sin: torch's complex ``exp`` on the CPU is an order of magnitude slower)."""
    mag = torch.exp(x.real[..., None] * js)
    ph = x.imag[..., None] * js
    return mag * torch.cos(ph), mag * torch.sin(ph)


def _grid(x: Tensor, L: int, tile: int | None) -> tuple[int, int, Tensor, Tensor, Tensor]:
    """Slices of ``step`` positions: ``exp(x (l0 + j)) = exp(x l0) exp(x j)``: the tile ``E [H, N, step]`` (real,
    imag) and the shifts ``exp(x l0) [H, S, N]`` of the ``S`` slice starts ``l0``."""
    H, N = x.shape
    step = min(_slice(H, N, L, tile), VAND_SLICE)
    S = -(-L // step)
    l0 = torch.arange(S, device=x.device, dtype=x.real.dtype) * step
    er, ei = _powers(x, torch.arange(step, device=x.device, dtype=x.real.dtype))
    sr, si = _powers(x, l0)  # [H, N, S]
    return step, S, torch.stack([er, ei]), torch.complex(sr, si).transpose(1, 2), l0


def vandermonde_fwd_ref(v: Tensor, x: Tensor, L: int, tile: int | None = None) -> Tensor:
    """``[M, H, N] x [H, N] -> [M, H, L]`` real: ``2 Re sum_n v_n exp(x_n l)``: one ``[H, M S, 2N] @ [H, 2N, step]``
    product, the slice shifts folded into ``v``."""
    M, H, N = v.shape
    step, S, E, shift, _ = _grid(x, L, tile)
    vl = v.transpose(0, 1)[:, :, None, :] * shift[:, None]  # [H, M, S, N]
    coef = torch.cat([vl.real, -vl.imag], -1).reshape(H, M * S, 2 * N)
    out = torch.bmm(coef, torch.cat([E[0], E[1]], 1))  # [H, M S, step]
    return 2 * out.view(H, M, S * step)[..., :L].transpose(0, 1)


def vandermonde_bwd_ref(g: Tensor, v: Tensor, x: Tensor, tile: int | None = None) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`vandermonde_fwd_ref` w.r.t. ``v [M, H, N]`` and ``x [H, N]`` for real ``g [M, H, L]``."""
    M, H, N = v.shape
    L = g.shape[-1]
    step, S, E, shift, l0 = _grid(x, L, tile)
    gh = F.pad(g.transpose(0, 1).to(v.real.dtype), (0, S * step - L)).reshape(H, M * S, step)
    gj = gh * torch.arange(step, device=g.device, dtype=gh.dtype)
    Et = E.transpose(2, 3)  # [2, H, step, N]

    def conj_sum(a: Tensor) -> Tensor:  # sum_j a_j conj(exp(x j)) per slice -> [H, M, S, N]
        return torch.complex(torch.bmm(a, Et[0]), -torch.bmm(a, Et[1])).view(H, M, S, N)

    A, B = conj_sum(gh), conj_sum(gj)
    sc = shift.conj()[:, None]  # [H, 1, S, N]
    gv = (A * sc).sum(2)
    gx = ((B + l0[:, None] * A) * sc).sum(2)
    return 2 * gv.transpose(0, 1), 2 * (gx * v.transpose(0, 1).conj()).sum(1)


# ---------------------------------------------------------------------------------------------- naive (materialised)
def cauchy_naive(v: Tensor, z: Tensor, w: Tensor) -> Tensor:
    """The reference repository's fallback: conjugate-double ``v, w`` and materialise ``[..., 2N, K]``."""
    v2, w2 = torch.cat([v, v.conj()], -1), torch.cat([w, w.conj()], -1)
    return (v2[..., None] / (z - w2[..., None])).sum(-2)


def log_vandermonde_naive(v: Tensor, x: Tensor, L: int) -> Tensor:
    """Materialises ``exp(x l)`` as ``[..., N, L]``."""
    e = torch.exp(x[..., None] * torch.arange(L, device=x.device, dtype=x.real.dtype))
    return 2 * torch.einsum("...n,...nl->...l", v, e).real
