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
from torch import Tensor

TILE = 1 << 22  # complex elements per [H, N, slice] tile (32 MiB in complex64)


def _slice(H: int, N: int, K: int, tile: int | None = None) -> int:
    return max(1, min(K, (tile or TILE) // max(1, H * N)))


def _resolvents(z: Tensor, w: Tensor) -> tuple[Tensor, Tensor]:
    """``R1 = 1/(z - w)``, ``R2 = 1/(z - conj w)`` as ``[H, N, K]``."""
    zz = z[None, None, :]
    return (zz - w[..., None]).reciprocal(), (zz - w.conj()[..., None]).reciprocal()


def cauchy_fwd_ref(v: Tensor, z: Tensor, w: Tensor, tile: int | None = None) -> Tensor:
    """``[M, H, N] x [K] x [H, N] -> [M, H, K]`` (see module docstring)."""
    M, H, N = v.shape
    K = z.shape[0]
    vv = torch.cat([v, v.conj()], -1).transpose(0, 1)  # [H, M, 2N]
    out = v.new_empty(H, M, K)
    step = _slice(H, 2 * N, K, tile)
    for k0 in range(0, K, step):
        r1, r2 = _resolvents(z[k0:k0 + step], w)
        out[..., k0:k0 + step] = torch.bmm(vv, torch.cat([r1, r2], 1))
    return out.transpose(0, 1)


def cauchy_bwd_ref(g: Tensor, v: Tensor, z: Tensor, w: Tensor, tile: int | None = None) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`cauchy_fwd_ref` w.r.t. ``v [M, H, N]`` and ``w [H, N]`` for ``g [M, H, K]``."""
    M, H, N = v.shape
    K = z.shape[0]
    gh = g.transpose(0, 1)  # [H, M, K]
    gv = v.new_zeros(H, M, N)
    gw = v.new_zeros(H, M, N)
    step = _slice(H, 2 * N, K, tile)
    for k0 in range(0, K, step):
        r1, r2 = _resolvents(z[k0:k0 + step], w)  # [H, N, k]
        gk = gh[..., k0:k0 + step]
        a = torch.cat([r1.conj(), r1.conj().square()], 1).transpose(1, 2)  # [H, k, 2N]
        b = torch.cat([r2, r2.square()], 1).transpose(1, 2)
        s = torch.bmm(gk, a) + torch.bmm(gk.conj(), b)  # [H, M, 2N]
        gv += s[..., :N]
        gw += s[..., N:]
    gw = (gw * v.transpose(0, 1).conj()).sum(1)
    return gv.transpose(0, 1), gw


def _powers(x: Tensor, l0: int, n: int) -> Tensor:
    """``exp(x l)`` for ``l = l0 .. l0+n-1`` as ``[H, N, n]``."""
    ls = torch.arange(l0, l0 + n, device=x.device, dtype=x.real.dtype)
    return torch.exp(x[..., None] * ls)


def vandermonde_fwd_ref(v: Tensor, x: Tensor, L: int, tile: int | None = None) -> Tensor:
    """``[M, H, N] x [H, N] -> [M, H, L]`` real: ``2 Re sum_n v_n exp(x_n l)``."""
    M, H, N = v.shape
    vh = v.transpose(0, 1)  # [H, M, N]
    out = v.real.new_empty(H, M, L)
    step = _slice(H, N, L, tile)
    for l0 in range(0, L, step):
        n = min(step, L - l0)
        out[..., l0:l0 + n] = 2 * torch.bmm(vh, _powers(x, l0, n)).real
    return out.transpose(0, 1)


def vandermonde_bwd_ref(g: Tensor, v: Tensor, x: Tensor, tile: int | None = None) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`vandermonde_fwd_ref` w.r.t. ``v [M, H, N]`` and ``x [H, N]`` for real ``g [M, H, L]``."""
    M, H, N = v.shape
    L = g.shape[-1]
    gh = g.transpose(0, 1).to(v.dtype)  # [H, M, L]
    gv = v.new_zeros(H, M, N)
    gx = v.new_zeros(H, M, N)
    step = _slice(H, N, L, tile)
    for l0 in range(0, L, step):
        n = min(step, L - l0)
        e = _powers(x, l0, n).conj()  # [H, N, n]
        ls = torch.arange(l0, l0 + n, device=x.device, dtype=x.real.dtype)
        gk = gh[..., l0:l0 + n]
        gv += torch.bmm(gk, e.transpose(1, 2))
        gx += torch.bmm(gk * ls, e.transpose(1, 2))
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
