"""Triton Cauchy and Vandermonde kernels (forward and backward) for S4 / S4D; see ``reference.py`` for the math.

Complex tensors travel as separate real / imaginary fp32 (or fp64) planes. Every program owns one ``(m, h)`` row
and a block of output positions, and loops over the contracted axis in blocks, so nothing of size ``N x K`` ever
exists outside registers:

* ``cauchy`` forward: a block of nodes ``k``, loop over ``n`` with the conjugate-pair form
  ``v/(z-w) + conj(v)/(z-conj w) = 2 (z Re v - Re(v conj w)) / ((z - w)(z - conj w))`` (one division per pair);
* ``cauchy`` backward: a block of ``n``, loop over ``k``: ``sum_k g conj(R1) + conj(g) R2`` and the squared terms;
* ``vandermonde`` forward: a block of ``l``, loop over ``n``; backward: a block of ``n``, loop over ``l``.

The ``w`` / ``x`` gradients come out per ``m`` and are summed over ``m`` in torch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


def _planes(t: Tensor) -> tuple[Tensor, Tensor]:
    return t.real.contiguous(), t.imag.contiguous()


@triton.jit
def _cauchy_fwd_kernel(VR, VI, WR, WI, ZR, ZI, OR, OI, H, N, K,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_k = tl.program_id(0)
    h = tl.program_id(1)
    m = tl.program_id(2)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mk = offs_k < K
    zr = tl.load(ZR + offs_k, mask=mk, other=0.0)[None, :]
    zi = tl.load(ZI + offs_k, mask=mk, other=0.0)[None, :]
    acc_r = tl.zeros([BLOCK_K], dtype=OR.dtype.element_ty)
    acc_i = tl.zeros([BLOCK_K], dtype=OR.dtype.element_ty)
    row = (m * H + h) * N
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mn = offs_n < N
        vr = tl.load(VR + row + offs_n, mask=mn, other=0.0)[:, None]
        vi = tl.load(VI + row + offs_n, mask=mn, other=0.0)[:, None]
        wr = tl.load(WR + h * N + offs_n, mask=mn, other=-1.0)[:, None]
        wi = tl.load(WI + h * N + offs_n, mask=mn, other=0.0)[:, None]
        # numerator z Re v - Re(v conj w); denominator (z - w)(z - conj w) = z^2 - 2 Re(w) z + |w|^2
        num_r = zr * vr - (vr * wr + vi * wi)
        num_i = zi * vr
        den_r = zr * zr - zi * zi - 2.0 * wr * zr + wr * wr + wi * wi
        den_i = 2.0 * zr * zi - 2.0 * wr * zi
        inv = 1.0 / (den_r * den_r + den_i * den_i)
        acc_r += tl.sum((num_r * den_r + num_i * den_i) * inv, axis=0)
        acc_i += tl.sum((num_i * den_r - num_r * den_i) * inv, axis=0)
    out = (m * H + h) * K + offs_k
    tl.store(OR + out, 2.0 * acc_r, mask=mk)
    tl.store(OI + out, 2.0 * acc_i, mask=mk)


@triton.jit
def _cauchy_bwd_kernel(GR, GI, WR, WI, ZR, ZI, GVR, GVI, SWR, SWI, H, N, K,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = offs_n < N
    wr = tl.load(WR + h * N + offs_n, mask=mn, other=-1.0)[:, None]
    wi = tl.load(WI + h * N + offs_n, mask=mn, other=0.0)[:, None]
    dt = GVR.dtype.element_ty
    sv_r = tl.zeros([BLOCK_N], dtype=dt)
    sv_i = tl.zeros([BLOCK_N], dtype=dt)
    sw_r = tl.zeros([BLOCK_N], dtype=dt)
    sw_i = tl.zeros([BLOCK_N], dtype=dt)
    grow = (m * H + h) * K
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mk = offs_k < K
        zr = tl.load(ZR + offs_k, mask=mk, other=0.0)[None, :]
        zi = tl.load(ZI + offs_k, mask=mk, other=1.0)[None, :]
        gr = tl.load(GR + grow + offs_k, mask=mk, other=0.0)[None, :]
        gi = tl.load(GI + grow + offs_k, mask=mk, other=0.0)[None, :]
        # conj(R1) = conj(1/(z - w)) = (d1r + i d1i)/|d1|^2 with d1 = z - w
        d1r = zr - wr
        d1i = zi - wi
        q1 = 1.0 / (d1r * d1r + d1i * d1i)
        c1r = d1r * q1
        c1i = d1i * q1
        # R2 = 1/(z - conj w) = (d2r - i d2i)/|d2|^2 with d2 = z - conj w
        d2r = zr - wr
        d2i = zi + wi
        q2 = 1.0 / (d2r * d2r + d2i * d2i)
        r2r = d2r * q2
        r2i = -d2i * q2
        # g conj(R1) + conj(g) R2
        sv_r += tl.sum(gr * c1r - gi * c1i + gr * r2r + gi * r2i, axis=1)
        sv_i += tl.sum(gr * c1i + gi * c1r + gr * r2i - gi * r2r, axis=1)
        # g conj(R1)^2 + conj(g) R2^2
        s1r = c1r * c1r - c1i * c1i
        s1i = 2.0 * c1r * c1i
        s2r = r2r * r2r - r2i * r2i
        s2i = 2.0 * r2r * r2i
        sw_r += tl.sum(gr * s1r - gi * s1i + gr * s2r + gi * s2i, axis=1)
        sw_i += tl.sum(gr * s1i + gi * s1r + gr * s2i - gi * s2r, axis=1)
    out = (m * H + h) * N + offs_n
    tl.store(GVR + out, sv_r, mask=mn)
    tl.store(GVI + out, sv_i, mask=mn)
    tl.store(SWR + out, sw_r, mask=mn)
    tl.store(SWI + out, sw_i, mask=mn)


@triton.jit
def _vandermonde_fwd_kernel(VR, VI, XR, XI, OUT, H, N, L,
                            BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    pid_l = tl.program_id(0)
    h = tl.program_id(1)
    m = tl.program_id(2)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    ml = offs_l < L
    lf = offs_l.to(OUT.dtype.element_ty)[None, :]
    acc = tl.zeros([BLOCK_L], dtype=OUT.dtype.element_ty)
    row = (m * H + h) * N
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mn = offs_n < N
        vr = tl.load(VR + row + offs_n, mask=mn, other=0.0)[:, None]
        vi = tl.load(VI + row + offs_n, mask=mn, other=0.0)[:, None]
        xr = tl.load(XR + h * N + offs_n, mask=mn, other=0.0)[:, None]
        xi = tl.load(XI + h * N + offs_n, mask=mn, other=0.0)[:, None]
        mag = tl.exp(xr * lf)
        ph = xi * lf
        acc += tl.sum(mag * (vr * tl.cos(ph) - vi * tl.sin(ph)), axis=0)
    tl.store(OUT + (m * H + h) * L + offs_l, 2.0 * acc, mask=ml)


@triton.jit
def _vandermonde_bwd_kernel(G, VR, VI, XR, XI, GVR, GVI, SXR, SXI, H, N, L,
                            BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr):
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mn = offs_n < N
    xr = tl.load(XR + h * N + offs_n, mask=mn, other=0.0)[:, None]
    xi = tl.load(XI + h * N + offs_n, mask=mn, other=0.0)[:, None]
    dt = GVR.dtype.element_ty
    s0r = tl.zeros([BLOCK_N], dtype=dt)
    s0i = tl.zeros([BLOCK_N], dtype=dt)
    s1r = tl.zeros([BLOCK_N], dtype=dt)
    s1i = tl.zeros([BLOCK_N], dtype=dt)
    grow = (m * H + h) * L
    for l0 in range(0, L, BLOCK_L):
        offs_l = l0 + tl.arange(0, BLOCK_L)
        ml = offs_l < L
        lf = offs_l.to(dt)[None, :]
        g = tl.load(G + grow + offs_l, mask=ml, other=0.0)[None, :]
        # g conj(exp(x l)) = g exp(xr l) (cos(xi l) - i sin(xi l))
        a = g * tl.exp(xr * lf)
        ph = xi * lf
        er = a * tl.cos(ph)
        ei = -a * tl.sin(ph)
        s0r += tl.sum(er, axis=1)
        s0i += tl.sum(ei, axis=1)
        s1r += tl.sum(er * lf, axis=1)
        s1i += tl.sum(ei * lf, axis=1)
    out = (m * H + h) * N + offs_n
    tl.store(GVR + out, 2.0 * s0r, mask=mn)
    tl.store(GVI + out, 2.0 * s0i, mask=mn)
    tl.store(SXR + out, 2.0 * s1r, mask=mn)
    tl.store(SXI + out, 2.0 * s1i, mask=mn)


def _blocks(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(n)))


def cauchy_fwd_triton(v: Tensor, z: Tensor, w: Tensor) -> Tensor:
    M, H, N = v.shape
    K = z.shape[0]
    (vr, vi), (wr, wi), (zr, zi) = _planes(v), _planes(w), _planes(z)
    o_r = torch.empty(M, H, K, dtype=vr.dtype, device=v.device)
    o_i = torch.empty_like(o_r)
    BK, BN = _blocks(K, 128), _blocks(N, 32)
    _cauchy_fwd_kernel[(triton.cdiv(K, BK), H, M)](vr, vi, wr, wi, zr, zi, o_r, o_i, H, N, K,
                                                    BLOCK_N=BN, BLOCK_K=BK)
    return torch.complex(o_r, o_i)


def cauchy_bwd_triton(g: Tensor, v: Tensor, z: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    M, H, N = v.shape
    K = z.shape[0]
    (gr, gi), (wr, wi), (zr, zi) = _planes(g), _planes(w), _planes(z)
    outs = [torch.empty(M, H, N, dtype=wr.dtype, device=v.device) for _ in range(4)]
    BK, BN = _blocks(K, 64), _blocks(N, 32)
    _cauchy_bwd_kernel[(triton.cdiv(N, BN), H, M)](gr, gi, wr, wi, zr, zi, *outs, H, N, K,
                                                    BLOCK_N=BN, BLOCK_K=BK)
    gv = torch.complex(outs[0], outs[1])
    gw = (torch.complex(outs[2], outs[3]) * v.conj()).sum(0)
    return gv, gw


def vandermonde_fwd_triton(v: Tensor, x: Tensor, L: int) -> Tensor:
    M, H, N = v.shape
    (vr, vi), (xr, xi) = _planes(v), _planes(x)
    out = torch.empty(M, H, L, dtype=vr.dtype, device=v.device)
    BL, BN = _blocks(L, 128), _blocks(N, 32)
    _vandermonde_fwd_kernel[(triton.cdiv(L, BL), H, M)](vr, vi, xr, xi, out, H, N, L, BLOCK_N=BN, BLOCK_L=BL)
    return out


def vandermonde_bwd_triton(g: Tensor, v: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    M, H, N = v.shape
    L = g.shape[-1]
    (xr, xi) = _planes(x)
    outs = [torch.empty(M, H, N, dtype=xr.dtype, device=v.device) for _ in range(4)]
    BL, BN = _blocks(L, 64), _blocks(N, 32)
    _vandermonde_bwd_kernel[(triton.cdiv(N, BN), H, M)](g.contiguous(), *_planes(v), xr, xi, *outs, H, N, L,
                                                         BLOCK_N=BN, BLOCK_L=BL)
    gv = torch.complex(outs[0], outs[1])
    gx = (torch.complex(outs[2], outs[3]) * v.conj()).sum(0)
    return gv, gx
