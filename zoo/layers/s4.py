"""S4 / S4D mixer: the causal ``S4Block`` of ``state-spaces/s4`` (``models/s4/s4.py``: ``FFTConv`` around an
``SSMKernelDPLR`` / ``SSMKernelDiag``, then the output linear), with parallel, chunked and recurrent forms.

Shapes: ``x [B, T, H]`` (``H = d_model``), ``C = channels``, ``N = d_state / 2`` (one entry per conjugate pair)::

    u = x, padded tokens set to 0                                                 [B, T, H]
    y[b, t, c, h] = sum_{l <= t} K[c, h, l] u[b, t - l, h] + D[c, h] u[b, t, h]    [B, T, C, H]
    out = output_linear(activation(y flattened over (c h)))      final_act "glu": Linear(C H, 2H) then GLU

``K`` is the SSM kernel ``K_l = 2 Re(C dA^l dB)`` of :mod:`zoo.kernels.s4.ssm` (DPLR + HiPPO-LegS with the Cauchy
kernel, Woodbury and an inverse FFT; or diagonal S4D with the Vandermonde kernel). The same map in three forms:

* parallel (``state=None``): causal FFT convolution (``rfft`` length 2T) with the kernel's first T taps;
* a chunk continuing from a state ``x0 [B, H, N]``: that convolution plus the state's contribution
  ``2 Re(C dA^(t+1) x0)``; the new state ``dA^T x0 + sum_j dA^(T-1-j) dB u_j``, by blocks of ``chunk_size`` tokens
  (a Krylov matrix inside a block, the dense ``dA^chunk_size`` between blocks, binary powers for ``dA^T x0``);
* one token: the O(N) recurrence ``x <- dA x + dB u``, ``y = 2 Re(C x)`` (the DPLR "linear" step: Woodbury on
  ``(2/dt - A)^-1``), its coefficients computed once and cached while autograd is off.

Padding: the real tokens of a row are moved behind its padded ones (stably); with zero inputs in front, the
convolution of a left-padded row equals the unpadded one exactly (time invariance), and the state advances by the
number of real tokens only, so a padded token neither enters nor decays it. Packing (``seq_idx``): each document
is convolved on its own (gathered into its own row), so nothing crosses a boundary.

Differences from the reference code (which wins over the spec sheet where they disagree):

* Beyond ``l_max`` tokens the reference truncates its kernel to ``l_max`` taps (a windowed convolution that its
  own step mode does not compute); here the kernel continues (``Ct`` doubled as a function), so all three forms
  are the same SSM at every length. Up to ``l_max`` (and always when ``l_max=None``) outputs are the same.
* ``C`` and ``l_kernel`` are never rewritten during a forward: with ``l_max`` set they are set up at init (what
  the reference's first forward does in place); a loaded checkpoint keeps its ``l_kernel``.
* ``activation`` may not be a GLU and ``bidirectional`` does not exist (a causal mixer); ``dropout`` is left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.kernels.s4.ssm import INITS, TRANSFORMS, SSMKernel
from zoo.layers.base import BenchCase, Mixer, State, document_positions
from zoo.registry import register_mixer

ACTIVATIONS = {"id": nn.Identity, "identity": nn.Identity, "linear": nn.Identity, "gelu": nn.GELU,
               "silu": nn.SiLU, "swish": nn.SiLU, "tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU,
               "sigmoid": nn.Sigmoid, "softplus": nn.Softplus}
MODES = {"dplr": "dplr", "nplr": "dplr", "s4": "dplr", "diag": "diag", "s4d": "diag"}


@dataclass
class S4State(State):
    """``ssm_state [B, H, N]`` complex64 (complex128 with fp64 parameters): the conjugate-pair half of the
    ``d_state``-dimensional state, in the kernel's (diagonal or DPLR) coordinates."""

    ssm_state: Tensor


CITATIONS = ("""@inproceedings{gu2022efficiently,
  title={Efficiently Modeling Long Sequences with Structured State Spaces},
  author={Gu, Albert and Goel, Karan and R{\'e}, Christopher},
  booktitle={International Conference on Learning Representations},
  year={2022}
}""", """@inproceedings{gu2022parameterization,
  title={On the Parameterization and Initialization of Diagonal State Space Models},
  author={Gu, Albert and Gupta, Ankit and Goel, Karan and R{\'e}, Christopher},
  booktitle={Advances in Neural Information Processing Systems},
  year={2022}
}""")


@register_mixer("s4")
class S4(Mixer):
    arg_groups = ("s4",)
    example_args = (
        {"d_state": 8, "l_max": 12, "chunk_size": 8},  # S4 (DPLR, LegS): kernels longer than l_kernel double Ct
        {"d_state": 8, "mode": "diag", "init": "diag-lin", "chunk_size": 8},  # S4D-Lin, ZOH
        {"d_state": 8, "channels": 2, "n_ssm": 1, "dt_transform": "softplus", "rank": 2, "chunk_size": 8},
        {"d_state": 8, "mode": "diag", "init": "diag-inv", "disc": "bilinear", "final_act": "id",
         "activation": "silu", "chunk_size": 8},
    )
    demo_args = {"d_state": 16, "l_max": 256}
    supports_packing = True
    dtypes = ("float16", "bfloat16")  # the SSM math runs in fp32 whatever the parameter dtype
    state_growth = "constant"
    citations = CITATIONS
    bench_cases = (
        BenchCase(args={"full": {"d_model": 1024, "d_state": 64, "l_max": 16384},
                        "quick": {"d_model": 64, "d_state": 16, "l_max": 512}},
                  description="S4 (DPLR, HiPPO-LegS): FFT convolution; O(N) recurrent decode"),
        BenchCase(name="s4d", args={"full": {"d_model": 1024, "d_state": 64, "mode": "diag", "init": "diag-lin"},
                                    "quick": {"d_model": 64, "d_state": 16, "mode": "diag", "init": "diag-lin"}},
                  description="S4D-Lin: Vandermonde kernel, FFT convolution; diagonal recurrent decode"),
    )

    def __init__(self, d_model: int, layer_idx: int = 0, d_state: int = 64, channels: int = 1,
                 l_max: int | None = None, mode: str = "dplr", init: str = "legs", rank: int = 1,
                 n_ssm: int | None = None, dt_min: float = 0.001, dt_max: float = 0.1, dt_tie: bool = True,
                 dt_transform: str = "exp", disc: str = "zoh", real_transform: str = "exp",
                 imag_transform: str = "none", activation: str | None = "gelu", final_act: str | None = "glu",
                 swap_channels: bool = False, chunk_size: int = 64) -> None:
        super().__init__(d_model, layer_idx)
        kw = dict(locals())
        for k in ("self", "d_model", "layer_idx", "__class__"):
            kw.pop(k, None)
        self.check_args(d_model, kw)
        self.channels, self.d_state, self.chunk_size, self.swap_channels = channels, d_state, chunk_size, swap_channels
        self.mode = MODES[mode]
        self.D = nn.Parameter(torch.empty(channels, d_model))
        self.kernel = SSMKernel(d_model, mode=self.mode, d_state=d_state, channels=channels, l_max=l_max,
                                dt_min=dt_min, dt_max=dt_max, dt_tie=dt_tie, dt_transform=dt_transform, rank=rank,
                                n_ssm=n_ssm, init=init, disc=disc, real_transform=real_transform,
                                imag_transform=imag_transform)
        self.activation = ACTIVATIONS[activation or "id"]()
        d_out = channels * d_model
        if final_act is None:
            self.output_linear = nn.Identity()
        elif final_act == "glu":
            self.output_linear = nn.Sequential(nn.Linear(d_out, 2 * d_model), nn.GLU(-1))
        else:
            self.output_linear = nn.Sequential(nn.Linear(d_out, d_model), ACTIVATIONS[final_act]())
        self.reset_mixer_parameters()

    @classmethod
    def check_args(cls, d_model: int, kwargs: dict[str, Any]) -> None:
        def choice(name: str, default: Any, allowed: Any) -> Any:
            v = kwargs.get(name, default)
            if v not in allowed:
                raise ValueError(f"s4: {name}={v!r} is not one of {sorted(allowed, key=str)}")
            return v

        for name, default in (("d_state", 64), ("channels", 1), ("rank", 1), ("chunk_size", 64)):
            v = kwargs.get(name, default)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"s4: {name}={v!r} must be a positive int")
        if kwargs.get("d_state", 64) % 2:
            raise ValueError(f"s4: d_state={kwargs['d_state']} must be even (conjugate pairs)")
        mode = MODES[choice("mode", "dplr", MODES)]
        init = choice("init", "legs", INITS)
        if mode == "dplr" and init != "legs":
            raise ValueError(f"s4: init={init!r} is an S4D initialisation; use mode='diag' (DPLR supports 'legs')")
        for name in ("dt_transform", "real_transform", "imag_transform"):
            choice(name, "none" if name == "imag_transform" else "exp", TRANSFORMS)
        choice("disc", "zoh", ("zoh", "bilinear"))
        choice("activation", "gelu", {None, *ACTIVATIONS})
        final = choice("final_act", "glu", {None, "glu", *ACTIVATIONS})
        if final is None and kwargs.get("channels", 1) != 1:
            raise ValueError("s4: final_act=None needs channels=1 (no output linear maps C*H back to H)")
        S = kwargs.get("n_ssm") or d_model
        if not isinstance(S, int) or S <= 0 or d_model % S:
            raise ValueError(f"s4: n_ssm={S} must be a positive divisor of d_model={d_model}")
        if init == "diag" and S % 2:
            raise ValueError(f"s4: init='diag' splits the n_ssm={S} copies into S4D-Inv and S4D-Lin halves; "
                             "it must be even")
        lo, hi = kwargs.get("dt_min", 0.001), kwargs.get("dt_max", 0.1)
        if not 0 < lo <= hi:
            raise ValueError(f"s4: dt_min={lo}, dt_max={hi} must satisfy 0 < dt_min <= dt_max")
        lm = kwargs.get("l_max")
        if lm is not None and (not isinstance(lm, int) or lm <= 0):
            raise ValueError(f"s4: l_max={lm!r} must be a positive int or None")

    @classmethod
    def boundaries(cls, args: dict[str, Any]) -> list[int]:
        return sorted({args.get("chunk_size", 64), *([args["l_max"]] if args.get("l_max") else [])})

    @torch.no_grad()
    def reset_mixer_parameters(self) -> None:
        """The reference's init: ``D ~ N(0, 1)``; the kernel's dt, A, B, P, C (see ``SSMKernel``)."""
        self.D.normal_()
        self.kernel.reset_parameters()

    # ------------------------------------------------------------------ state
    def init_state(self, batch_size: int, *, dtype: torch.dtype, device: torch.device | str,
                   max_length: int | None = None) -> S4State:
        cd = torch.complex128 if dtype == torch.float64 else torch.complex64
        return S4State(ssm_state=torch.zeros(batch_size, self.d_model, self.d_state // 2, dtype=cd, device=device))

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, *, positions: Tensor | None = None, state: S4State | None = None,
                attention_mask: Tensor | None = None, seq_idx: Tensor | None = None
                ) -> tuple[Tensor, S4State | None]:
        T = x.shape[1]
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        mask = None if attention_mask is None else attention_mask.to(torch.bool)
        u = x.to(acc)
        if mask is not None:
            u = u * mask[..., None]
        if state is not None and seq_idx is not None:
            raise ValueError("s4: seq_idx (packed documents) is supported in the parallel forward only (state=None)")
        if state is None or T > 1:
            self.kernel.sync_l_kernel()  # (never in the one-token step: no host synchronisation there)
        if T == 0:
            y = u.new_zeros(*u.shape[:2], self.channels, self.d_model)
        elif state is None:
            y = self._parallel(u, mask, seq_idx)
        elif T == 1:
            y = self._step(u[:, 0], state, mask)[:, None]
        else:
            y = self._chunk(u, state, mask)
        y = y + u[:, :, None, :] * self.D.to(acc)  # [B, T, C, H]
        if self.swap_channels:
            y = y.transpose(-1, -2)
        y = self.activation(y.flatten(-2)).to(x.dtype)
        return self.output_linear(y), state

    def _conv(self, u: Tensor) -> Tensor:
        """Causal FFT convolution ``[B, T, H] -> [B, T, C, H]`` with the kernel's first T taps."""
        T = u.shape[1]
        k = self.kernel.kernel(T, u.dtype)  # [C, H, T]
        uf = torch.fft.rfft(u.transpose(1, 2), n=2 * T)  # [B, H, T+1]
        y = torch.fft.irfft(uf[:, None] * torch.fft.rfft(k, n=2 * T), n=2 * T)[..., :T]  # [B, C, H, T]
        return y.permute(0, 3, 1, 2)

    @staticmethod
    def _align(mask: Tensor) -> Tensor:
        """``[B, T]`` permutation putting each row's padded tokens first, real tokens after, in order."""
        return torch.argsort(mask.to(torch.int8), dim=1, stable=True)

    def _parallel(self, u: Tensor, mask: Tensor | None, seq_idx: Tensor | None) -> Tensor:
        if seq_idx is not None:
            return self._packed(u, seq_idx)
        if mask is None:
            return self._conv(u)
        perm = self._align(mask)
        y = self._conv(u.gather(1, perm[..., None].expand_as(u)))
        return torch.empty_like(y).scatter_(1, perm[..., None, None].expand_as(y), y)

    def _packed(self, u: Tensor, seq_idx: Tensor) -> Tensor:
        """Each document of ``seq_idx [B, T]`` gathered into its own row ``[S, T_max, H]``, convolved, scattered."""
        B, T, H = u.shape
        off = document_positions(seq_idx)  # index inside the document
        doc = (off == 0).flatten().cumsum(0).view(B, T) - 1  # document number over the whole batch
        buf = u.new_zeros(int(doc[-1, -1]) + 1, int(off.max()) + 1, H)
        buf = buf.index_put((doc, off), u)
        return self._conv(buf)[doc, off]

    def _step(self, u: Tensor, state: S4State, mask: Tensor | None) -> Tensor:
        """One token ``u [B, H]`` -> ``[B, C, H]``; the state is advanced unless the token is padding."""
        sp = self.kernel.step_params(u.dtype)
        x = state.ssm_state
        new = self.kernel.step(sp, x, u)
        if mask is not None:
            new = torch.where(mask[:, :1, None], new, x)
        state.ssm_state = new
        return torch.einsum("chn,bhn->bch", sp.dC, new).real

    def _chunk(self, u: Tensor, state: S4State, mask: Tensor | None) -> Tensor:
        """A chunk from ``state``: convolution + the state's contribution; the state after the real tokens."""
        B, T, H = u.shape
        N, Q = self.d_state // 2, self.chunk_size
        x0 = state.ssm_state
        perm = None
        n_real = torch.full((B,), T, device=u.device)
        if mask is not None:
            perm, n_real = self._align(mask), mask.sum(1)
            u = u.gather(1, perm[..., None].expand_as(u))
        y = self._conv(u)
        blk = self.kernel.blocks(Q, u.dtype)
        nb = -(-T // Q)
        loc = torch.einsum("bnqh,hsq->nbhs", F.pad(u, (0, 0, nb * Q - T, 0)).view(B, nb, Q, H), blk.kry)
        xin = torch.zeros_like(loc[0])  # state from the inputs (zeros in front change nothing)
        x0r = torch.cat([x0.real, x0.imag], -1).to(u.dtype)  # [B, H, 2N]
        free, ys = x0r, []  # free evolution of x0, observed at the real tokens (compact time)
        for i in range(nb):
            ys.append(torch.einsum("chqs,bhs->bqch", blk.obs, free))
            free = torch.einsum("hst,bht->bhs", blk.RQ, free)
            xin = torch.einsum("hst,bht->bhs", blk.RQ, xin) + loc[i]
        ys = torch.cat(ys, 1)[:, :T]  # [B, T, C, H]
        for k, Pk in enumerate(self.kernel.powers(max(1, T.bit_length()), u.dtype)):  # x0 part: R^n_real x0
            x0r = torch.where(((n_real >> k) & 1).bool()[:, None, None], torch.einsum("hst,bht->bhs", Pk, x0r), x0r)
        new = xin + x0r
        state.ssm_state = torch.complex(new[..., :N], new[..., N:]).to(x0.dtype)
        if perm is None:
            return y + ys
        idx = torch.arange(T, device=u.device) - (T - n_real)[:, None]  # the real token each position is
        ys = ys.gather(1, idx.clamp(min=0)[..., None, None].expand_as(ys)) * (idx >= 0)[..., None, None]
        y = y + ys
        return torch.empty_like(y).scatter_(1, perm[..., None, None].expand_as(y), y)

    # ------------------------------------------------------------------ self-description
    @classmethod
    def flops(cls, d_model: int, args: dict[str, Any], *, T: int, context: int = 0, batch: int = 1) -> int:
        """Forward FLOPs: output linear and D skip; T > 1: kernel generation (Cauchy over ``(1+r)(C+r)`` rows
        at ``max(T, l_max)/2`` nodes, or Vandermonde) + three FFTs of length 2T per feature (``5 n log2 n``);
        T = 1: the O(N) step (``~(12 + 8 rank) N`` per feature) and the readout."""
        H, C = d_model, args.get("channels", 1)
        N, r = args.get("d_state", 64) // 2, args.get("rank", 1)
        out = 2 * T * C * H * (2 * H if args.get("final_act", "glu") == "glu" else H) + 2 * T * C * H
        if T == 1 and context > 0:
            return batch * (out + H * N * (12 + 8 * r) + 8 * C * H * N)
        n = 2 * T
        fft = int(5 * n * math.log2(n)) // 2 * (batch * H + C * H + batch * C * H) + 6 * (T + 1) * batch * C * H
        if MODES[args.get("mode", "dplr")] == "diag":
            gen = 8 * C * H * N * T
        else:
            K = max(T, args.get("l_max") or 0) // 2 + 1
            gen = H * K * N * (2 * 10 + 8 * 2 * (1 + r) * (C + r)) + int(5 * 2 * K * math.log2(2 * K)) * C * H
        return batch * out + gen + fft

    def extra_repr(self) -> str:
        k = self.kernel
        return (f"layer_idx={self.layer_idx}, mode={self.mode}, d_state={self.d_state}, channels={self.channels}, "
                f"init={k.init}, l_max={k.l_max}, dt_transform={k.dt_transform}")
