"""The S4 / S4D state-space kernel: parameters under ``state-spaces/s4``'s names, initialisations, discretisation,
the convolution kernel and the recurrent forms.

Notation (per feature ``h``; ``N`` below is the *half* state size ``d_state/2``: one entry per conjugate pair)::

    A = diag(Lambda) - P Q^T,  Q = conj(P)      (DPLR, ``mode="dplr"``; ``mode="diag"``: A = diag(Lambda))
    Lambda = -f(A_real) - i g(A_imag),  dt = t(inv_dt)          f, g, t: the real / imag / dt transforms
    bilinear:  dA = (I - dt/2 A)^-1 (I + dt/2 A),  dB = (I - dt/2 A)^-1 dt B      (always for DPLR)
    zoh:       dA = exp(dt Lambda),  dB = (exp(dt Lambda) - 1)/Lambda B           (S4D default)
    x_t = dA x_{t-1} + dB u_t,   y_t = 2 Re(C x_t)            (the half state carries the conjugate pairs)
    K_l = 2 Re(C dA^l dB)                                       (the convolution kernel, y = K * u)

DPLR kernel (S4): the truncated generating function at the roots of unity of a length ``L'``,
``sum_{l<L'} K_l w^l = Ct (I - dA w)^-1 dB`` with ``Ct = C (I - dA^L')`` ("C tilde"), is a Cauchy product
evaluated through the Woodbury identity (rank ``r``), ``k(w) = 2/(1+w) [r_BC - r_BQ (I + r_PQ)^-1 r_PC]`` with
``r_XY = sum_n dt X_n Y_n / (z - dt Lambda_n)``, ``z = 2(1-w)/(1+w) = 2i tan(pi k/L')``, then an inverse real FFT.
At the Nyquist node ``w = -1`` the closed form ``(I + dA)^-1 dB = dt B / 2`` is used (no 0 * inf).
The stored ``C`` is ``Ct`` for ``L' = l_kernel`` once ``l_kernel > 0`` (the reference rewrites ``C`` in place);
``l_kernel = 0`` means ``C`` is the plain C. Longer kernels use ``Ct_2L = Ct_L (I + dA^L)`` (or
``Ct_L = C (I - dA^L)`` from a plain C), computed as a function, never written back.

S4D kernel: ``K = log_vandermonde(C dB, log dA, L)``.

Recurrent forms: the O(N) step (diagonal, or the reference's "linear" DPLR step: Woodbury on
``(2/dt - A)^-1``), and the dense real transition ``R`` (``[H, 2N, 2N]`` on ``(Re x, Im x)``, built by applying
the step to a basis) for propagating a state over a chunk; ``l . r`` with ``l = 2 (Re C, -Im C)`` is the output.
Parameter-only quantities (dense powers, the plain C behind ``Ct``, step coefficients) are computed in fp64 and
cached while autograd is off (keyed on the parameters' versions), so decoding discretises once.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.kernels.s4 import cauchy, log_vandermonde

TRANSFORMS = ("none", "exp", "relu", "sigmoid", "softplus")
DIAG_INITS = ("diag-lin", "diag-inv", "diag-legs", "diag-real", "diag")
INITS = ("legs", *DIAG_INITS)


def param_transform(p: Tensor, kind: str) -> Tensor:
    if kind == "none":
        return p
    if kind == "exp":
        return torch.exp(p)
    if kind == "relu":
        return F.relu(p) + 1e-4
    if kind == "sigmoid":
        return torch.sigmoid(p)
    if kind == "softplus":
        return F.softplus(p)
    raise ValueError(f"unknown transform {kind!r}; allowed: {list(TRANSFORMS)}")


def inv_transform(p: Tensor, kind: str) -> Tensor:
    p = p.clamp(min=1e-4)
    return {"none": lambda: p, "exp": lambda: torch.log(p), "relu": lambda: p, "sigmoid": lambda: torch.logit(p),
            "softplus": lambda: torch.log(torch.expm1(p))}[kind]()


# ---------------------------------------------------------------------------------------------- initialisation
def nplr_legs(N: int) -> tuple[Tensor, Tensor, Tensor]:
    """HiPPO-LegS in normal-plus-low-rank form, diagonalised in fp64: ``(Lambda, P, B)`` of half size ``N/2``.

    ``A_nk = -sqrt((2n+1)(2k+1))`` (n > k), ``-(n+1)`` (n = k); ``B_n = sqrt(2n+1)``; with ``P_n = sqrt(n+1/2)``,
    ``A + P P^T = -I/2 + S`` (S skew-symmetric) = ``V diag(Lambda) V*``; returned in the eigenbasis (``V* P``,
    ``V* B``, imaginary part of B clipped to [-2, 2]), keeping the eigenvalues with negative imaginary part."""
    q = torch.arange(N, dtype=torch.float64)
    r = torch.sqrt(2 * q + 1)
    A = -torch.tril(r[:, None] * r[None, :], -1) - torch.diag(q + 1)
    P = torch.sqrt(q + 0.5)
    S = A + P[:, None] * P[None, :] + 0.5 * torch.eye(N, dtype=torch.float64)  # skew-symmetric
    lam, V = torch.linalg.eigh(S.to(torch.complex128) * -1j)  # S = V diag(i lam) V*
    W = -0.5 + 1j * lam
    order = torch.argsort(W.imag)[: N // 2]
    W, V = W[order], V[:, order]
    Vh = V.conj().T
    B = Vh @ r.to(torch.complex128)
    B = torch.complex(B.real, B.imag.clamp(-2.0, 2.0))
    return W, Vh @ P.to(torch.complex128), B


def diag_init(init: str, N: int, S: int) -> tuple[Tensor, Tensor]:
    """S4D initialisations (``dplr(init=...)`` of the reference): ``(Lambda [S, N/2], B [S, N/2])``."""
    if init == "diag":  # half S4D-Inv, half S4D-Lin
        a, b = diag_init("diag-inv", N, S // 2), diag_init("diag-lin", N, S - S // 2)
        return torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])
    n = torch.arange(N // 2, dtype=torch.float64).expand(S, -1)
    real = torch.full_like(n, 0.5)
    B = torch.ones(S, N // 2, dtype=torch.complex128)
    if init == "diag-lin":
        imag = math.pi * n
    elif init == "diag-inv":
        imag = N / math.pi * (N / (1 + 2 * n) - 1)
    elif init == "diag-real":
        imag, real = torch.zeros_like(n), 1 + n
    elif init in ("diag-legs", "legs"):
        W, _, Bl = nplr_legs(N)
        imag, B = (-W.imag).expand(S, -1), Bl.expand(S, -1).clone()
    else:
        raise ValueError(f"unknown init {init!r}; allowed: {list(INITS)}")
    return -real - 1j * imag, B


def _nodes(L: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """For ``k < L/2`` (the Nyquist node excluded): ``z = 2i tan(pi k/L)`` and ``2/(1 + exp(-2 pi i k/L))``."""
    k = torch.arange((L + 1) // 2, dtype=torch.float64, device=device)
    th = math.pi * k / L
    z = 2j * torch.tan(th)
    scale = torch.exp(1j * th) / torch.cos(th)
    return z.to(dtype), scale.to(dtype)


# ---------------------------------------------------------------------------------------------- the kernel module
class SSMKernel(nn.Module):
    """Holds ``inv_dt, C, B, A_real, A_imag`` (+ ``P``, ``l_kernel`` for DPLR) with the reference's shapes."""

    def __init__(self, d_model: int, *, mode: str = "dplr", d_state: int = 64, channels: int = 1,
                 l_max: int | None = None, dt_min: float = 0.001, dt_max: float = 0.1, dt_tie: bool = True,
                 dt_transform: str = "exp", rank: int = 1, n_ssm: int | None = None, init: str = "legs",
                 disc: str = "zoh", real_transform: str = "exp", imag_transform: str = "none") -> None:
        super().__init__()
        self.H, self.N, self.channels, self.mode, self.rank = d_model, d_state // 2, channels, mode, rank
        self.n_ssm = n_ssm or d_model
        self.l_max, self.dt_min, self.dt_max, self.dt_tie = l_max, dt_min, dt_max, dt_tie
        self.dt_transform, self.init, self.disc = dt_transform, init, "bilinear" if mode == "dplr" else disc
        self.real_transform, self.imag_transform = real_transform, imag_transform
        H, N, S = self.H, self.N, self.n_ssm
        self.inv_dt = nn.Parameter(torch.empty(H, 1 if dt_tie else N))
        self.C = nn.Parameter(torch.empty(channels, H, N, 2))
        self.B = nn.Parameter(torch.empty(1, S, N, 2))
        self.A_real = nn.Parameter(torch.empty(S, N))
        self.A_imag = nn.Parameter(torch.empty(S, N))
        if mode == "dplr":
            self.P = nn.Parameter(torch.empty(rank, S, N, 2))
            self.register_buffer("l_kernel", torch.tensor(0))
            self.register_load_state_dict_post_hook(lambda m, _keys: m.sync_l_kernel())
        for p in self.parameters():
            p._optim = {"weight_decay": 0.0}  # the reference's optimizer hint: no weight decay on SSM parameters
        self._lk = 0
        self._cache: dict[str, tuple[Any, Any]] = {}

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        H, N, S, dev = self.H, self.N, self.n_ssm, self.C.device
        lo, hi = math.log(self.dt_min), math.log(self.dt_max)
        log_dt = torch.rand(self.inv_dt.shape, dtype=torch.float64) * (hi - lo) + lo
        inv_dt = log_dt if self.dt_transform == "exp" else inv_transform(log_dt.exp(), self.dt_transform)
        if self.init == "legs":
            W, P, B = nplr_legs(2 * N)  # rank > 1: the reference pads the LegS correction with zero rows
            P = torch.cat([P[None], P.new_zeros(self.rank - 1, N)]).unsqueeze(1).expand(self.rank, S, N)
            A, B = W.expand(S, N), B.expand(S, N)
        else:
            A, B = diag_init(self.init, 2 * N, S)
            P = torch.zeros(self.rank, S, N, dtype=torch.complex128)  # S4D inits: no low-rank part
        C = torch.randn(self.channels, H, N, dtype=torch.complex64)
        for name, value in (("inv_dt", inv_dt), ("C", torch.view_as_real(C)), ("B", torch.view_as_real(B)[None]),
                            ("A_real", inv_transform(-A.real, self.real_transform)),
                            ("A_imag", inv_transform(-A.imag, self.imag_transform))):
            getattr(self, name).copy_(value.to(dev))
        if self.mode == "dplr":
            self.P.copy_(torch.view_as_real(P).to(dev))
            self.l_kernel.zero_()
            self._lk = 0
            if self.l_max and not self.C.is_meta:  # as the reference after its first forward: C <- Ct(l_max)
                self.setup_C(self.l_max)

    @torch.no_grad()
    def setup_C(self, L: int) -> None:
        """Rewrite ``C`` as ``Ct`` for length ``L`` (the reference's ``_setup_C``; here only at init)."""
        ell = self._ct_ell(self.params(torch.float64), L)
        self.C.copy_(torch.view_as_real(self._ell_to_c(ell)).to(self.C.dtype))
        self.l_kernel.fill_(L)
        self._lk = L

    def sync_l_kernel(self) -> None:
        """Read ``l_kernel`` into a Python int (after loading, and in every prefill: decode never syncs)."""
        if self.mode == "dplr" and not self.l_kernel.is_meta:
            self._lk = int(self.l_kernel)

    # ------------------------------------------------------------------ parameters
    def params(self, dtype: torch.dtype) -> SimpleNamespace:
        """``dt [H, 1|N]``, ``A [H, N]``, ``B [H, N]``, ``C [C, H, N]`` (complex), ``P [r, H, N]`` in ``dtype``."""
        rep = self.H // self.n_ssm

        def cplx(t: Tensor) -> Tensor:
            return torch.view_as_complex(t.to(dtype).contiguous())

        dt = param_transform(self.inv_dt.to(dtype), self.dt_transform)
        A = -param_transform(self.A_real.to(dtype), self.real_transform) - 1j * param_transform(
            self.A_imag.to(dtype), self.imag_transform)
        p = SimpleNamespace(dt=dt, A=A.repeat(rep, 1), B=cplx(self.B)[0].repeat(rep, 1), C=cplx(self.C), P=None)
        if self.mode == "dplr":
            p.P = cplx(self.P).repeat(1, rep, 1)
        return p

    def _cached(self, name: str, dtype: torch.dtype, fn):
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            return fn()
        key = (dtype, self._lk, tuple((p._version, p.data_ptr()) for p in self.parameters()))
        hit = self._cache.get(name)
        if hit is None or hit[0] != key:
            hit = self._cache[name] = (key, fn())
        return hit[1]

    # ------------------------------------------------------------------ recurrent forms
    def step_params(self, dtype: torch.dtype) -> SimpleNamespace:
        """Coefficients of the O(N) step (fp64 math, cast to ``dtype``), cached while autograd is off."""
        return self._cached("step", dtype, lambda: self._step_params(dtype))

    def _coeffs(self, p: SimpleNamespace) -> SimpleNamespace:
        """Step coefficients from ``params``: diagonal ``dA, dB``; DPLR ``Dm = (2/dt - Lambda)^-1``,
        ``E = 2/dt + Lambda``, ``B2 = 2B``, ``P, Q, QD = Q Dm``, ``Minv = (I + Q^T Dm P)^-1`` (sums over all pairs)."""
        if self.mode == "diag":
            dtA = p.dt * p.A
            if self.disc == "zoh":
                return SimpleNamespace(dA=torch.exp(dtA), dB=p.B * torch.expm1(dtA) / p.A)
            return SimpleNamespace(dA=(1 + dtA / 2) / (1 - dtA / 2), dB=p.B * p.dt / (1 - dtA / 2))
        Dm = 1 / (2 / p.dt - p.A)  # [H, N]
        Q = p.P.conj()
        QDP = 2 * torch.einsum("rhn,hn,shn->hrs", Q, Dm, p.P).real
        Minv = torch.linalg.inv_ex(torch.eye(self.rank, dtype=QDP.dtype, device=QDP.device) + QDP)[0]  # [H, r, r]
        return SimpleNamespace(Dm=Dm, E=2 / p.dt + p.A, B2=2 * p.B, P=p.P, Q=Q, QD=Q * Dm, Minv=Minv.to(Dm.dtype))

    def _step_params(self, dtype: torch.dtype) -> SimpleNamespace:
        cd = torch.complex128 if dtype == torch.float64 else torch.complex64
        d = self.dense()  # shared with the chunked path (a prefill leaves it cached)
        out = SimpleNamespace(**{k: v.to(cd) for k, v in vars(d.sp).items()})
        out.dC = self._ell_to_c(d.ell).mul(2).to(cd)  # y = Re(dC x) on the half state
        return out

    def step(self, sp: SimpleNamespace, x: Tensor, u: Tensor) -> Tensor:
        """``x [..., H, N]`` complex, ``u [..., H]`` real -> the next state (bilinear DPLR or diagonal)."""
        if self.mode == "diag":
            return sp.dA * x + sp.dB * u[..., None]
        qx = 2 * torch.einsum("rhn,...hn->...rh", sp.Q, x).real
        y = sp.E * x - torch.einsum("rhn,...rh->...hn", sp.P, qx.to(x.dtype)) + sp.B2 * u[..., None]
        qy = 2 * torch.einsum("rhn,...hn->...rh", sp.QD, y).real.to(x.dtype)
        corr = torch.einsum("hrs,...sh->...rh", sp.Minv, qy)
        return sp.Dm * (y - torch.einsum("rhn,...rh->...hn", sp.P, corr))

    def dense(self) -> SimpleNamespace:
        """Real dense forms (fp64): transition ``R [H, 2N, 2N]``, input ``b [H, 2N]``, output ``ell [C, H, 2N]``
        (of the plain C), and the step coefficients ``sp``."""
        return self._cached("dense", torch.float64, self._dense)

    def _dense(self) -> SimpleNamespace:
        p = self.params(torch.float64)
        sp = self._coeffs(p)
        R = self._transition(sp)
        b = self._real(self.step(sp, torch.zeros_like(p.B), p.dt.new_ones(self.H)))
        return SimpleNamespace(R=R, b=b, ell=self._plain_ell(p, R), sp=sp)

    def powers(self, n: int, dtype: torch.dtype) -> list[Tensor]:
        """``[R, R^2, R^4, ..., R^(2^(n-1))]`` in ``dtype`` (squared in fp64)."""
        def make() -> list[Tensor]:
            out = [self.dense().R]
            for _ in range(n - 1):
                out.append(out[-1] @ out[-1])
            return [t.to(dtype) for t in out]

        return self._cached(f"powers{n}", dtype, make)

    def blocks(self, Q: int, dtype: torch.dtype) -> SimpleNamespace:
        """Per block of ``Q`` tokens: ``RQ = R^Q [H, 2N, 2N]``, the Krylov matrix ``kry[h, :, q] = R^(Q-1-q) b``
        and the observability rows ``obs[c, h, i] = l^T R^(i+1)`` (``i < Q``), in ``dtype``."""
        def make() -> SimpleNamespace:
            d = self.dense()
            kry, obs, Rm = d.b[..., None], (d.ell[:, :, None] @ d.R)[:, :, :1], d.R  # [H,2N,1], [C,H,1,2N]
            while kry.shape[-1] < Q:
                kry = torch.cat([kry, Rm @ kry], -1)
                obs = torch.cat([obs, obs @ Rm], -2)
                Rm = Rm @ Rm
            return SimpleNamespace(RQ=torch.linalg.matrix_power(d.R, Q).to(dtype),
                                   kry=kry[..., :Q].flip(-1).to(dtype), obs=obs[:, :, :Q].to(dtype))

        return self._cached(f"blocks{Q}", dtype, make)

    def _transition(self, sp: SimpleNamespace) -> Tensor:
        N = self.N
        basis = torch.eye(N, dtype=torch.complex128, device=self.C.device)
        basis = torch.cat([basis, 1j * basis])[:, None, :].expand(2 * N, self.H, N)  # [2N, H, N]
        cols = self.step(sp, basis, basis.real.new_zeros(2 * N, self.H))
        return self._real(cols).permute(1, 2, 0)  # [H, 2N(out), 2N(in)]

    @staticmethod
    def _real(x: Tensor) -> Tensor:
        return torch.cat([x.real, x.imag], -1)

    @staticmethod
    def _ell_to_c(ell: Tensor) -> Tensor:
        """Output functional ``l = 2 (Re c, -Im c)`` back to the complex half ``c``."""
        N = ell.shape[-1] // 2
        return torch.complex(ell[..., :N], -ell[..., N:]) / 2

    def _plain_ell(self, p: SimpleNamespace, R: Tensor | None) -> Tensor:
        """The output functional of the plain C: ``Ct (I - dA^l_kernel)^-1`` (DPLR with ``l_kernel > 0``)."""
        ell = torch.cat([2 * p.C.real, -2 * p.C.imag], -1)  # [C, H, 2N]
        if self.mode != "dplr" or self._lk == 0:
            return ell
        eye = torch.eye(2 * self.N, dtype=R.dtype, device=R.device)
        M = (eye - torch.linalg.matrix_power(R, self._lk)).mT  # l^T (I - R^L) = lt^T
        return torch.linalg.solve_ex(M, ell.permute(1, 2, 0))[0].permute(2, 0, 1)  # _ex: no host sync

    def _ct_ell(self, p: SimpleNamespace, L: int) -> Tensor:
        """``Ct`` (as its output functional) for length ``L``: doubling from ``l_kernel``, or from the plain C."""
        R = self._transition(self._coeffs(p))
        ell = torch.cat([2 * p.C.real, -2 * p.C.imag], -1)  # [C, H, 2N]
        if self._lk == 0:  # lt^T = l^T (I - R^L)
            return ell - torch.einsum("hst,chs->cht", torch.linalg.matrix_power(R, L), ell)
        Lk, RL = self._lk, torch.linalg.matrix_power(R, self._lk)
        while Lk < L:
            ell = ell + torch.einsum("hst,chs->cht", RL, ell)
            RL, Lk = RL @ RL, 2 * Lk
        return ell

    # ------------------------------------------------------------------ convolution kernel
    def kernel(self, L: int, dtype: torch.dtype) -> Tensor:
        """``K [C, H, L]`` real: taps ``2 Re(C dA^l dB)``, ``l < L`` (cached while autograd is off)."""
        if self.mode == "diag":
            return self._cached(f"kernel{L}", dtype, lambda: self._diag_kernel(L, dtype))
        Lk = self._lk
        if Lk and L <= Lk:
            Lp = Lk
        elif Lk:
            Lp = Lk << max(0, math.ceil(math.log2(L / Lk)))
        else:
            Lp = L
        return self._cached(f"kernel{Lp}", dtype, lambda: self._dplr_kernel(Lp, dtype))[..., :L]

    def _diag_kernel(self, L: int, dtype: torch.dtype) -> Tensor:
        p = self.params(dtype)
        dtA = p.dt * p.A
        if self.disc == "zoh":
            v, x = p.C * (p.B * torch.expm1(dtA) / p.A), dtA
        else:
            v, x = p.C * (p.B * p.dt / (1 - dtA / 2)), torch.log((1 + dtA / 2) / (1 - dtA / 2))
        return log_vandermonde(v, x, L)

    def _dplr_kernel(self, L: int, dtype: torch.dtype) -> Tensor:
        """Cauchy + Woodbury + inverse FFT at ``L`` nodes from ``Ct(L)``."""
        p = self.params(dtype)
        if L == self._lk:
            Ct = p.C
        else:  # a longer kernel (or a plain C): Ct for L as a function of the parameters
            Ct = self._ell_to_c(self._ct_ell(self.params(torch.float64), L)).to(p.C.dtype)
        r = self.rank
        Bs = torch.cat([p.B[None], p.P])  # [1 + r, H, N]
        Cs = torch.cat([Ct, p.P.conj()])  # [C + r, H, N]
        v = Bs[:, None] * Cs[None] * p.dt  # [1 + r, C + r, H, N]
        z, scale = _nodes(L, p.C.dtype, p.C.device)
        k = cauchy(v, z, p.dt * p.A)  # [1 + r, C + r, H, K]
        k00, k01, k10, k11 = k[:1, :-r], k[:1, -r:], k[1:, :-r], k[1:, -r:]
        if r == 1:
            kf = k00 - k01 * k10 / (1 + k11)
        else:  # r_BC - r_BQ (I + r_PQ)^-1 r_PC with [P index, Q index] blocks
            eye = torch.eye(r, dtype=k.dtype, device=k.device)
            X = torch.linalg.solve(eye + k11.permute(2, 3, 0, 1), k10.permute(2, 3, 0, 1))  # [H, K, r, C]
            kf = k00 - torch.einsum("ihk,hkic->chk", k01[0], X)[None]
        kf = kf[0] * scale  # [C, H, K]
        if L % 2 == 0:  # Nyquist node: (I + dA)^-1 dB = dt B / 2, no low-rank term
            nyq = (p.dt * (Ct * p.B).sum(-1, keepdim=True)).real  # [C, H, 1] = dt Re sum_n Ct_n B_n
            kf = torch.cat([kf, nyq.to(kf.dtype)], -1)
        return torch.fft.irfft(kf, n=L)
