"""Mamba-2 mixer (``mamba_ssm.modules.mamba2.Mamba2`` semantics) with Stuffed-Mamba state-collapse mitigations.

Math (per head ``h`` with ``P = headdim`` channels, group ``g = h // (H / G)``, state ``S in R^{P x N}``)::

    z, xBC, dt_raw = split(in_proj(u), [d_ssm, d_ssm + 2 G N, H])        (+ z0, x0 first when d_ssm < d_inner)
    x, B, C  = split(silu(causal_depthwise_conv(xBC)), [d_ssm, G N, G N])  (conv over xBC only)
    dt       = softplus(dt_raw + dt_bias)   (identity above 20, as the kernel), clamped to dt_limit
    A        = -exp(A_log)
    S_t      = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T ;   y_t = S_t C_t + D x_t
    out      = out_proj(rmsnorm_group(y * silu(z)) * norm.weight)            (groups of d_ssm / G channels)

The parallel path is the chunked SSD scan (``zoo.kernels.ssd``); with a state the call continues from it
(``initial_states``, the conv window of the last ``d_conv`` pre-conv inputs), and single tokens take the
recurrent step (without autograd and padding: the lean in-place step of ``zoo.layers.mamba2_ops``, pinned to the
reference step by tests). A padded token (``attention_mask == 0``) is a no-op: its conv input is zero, ``dt = 0``.
``seq_idx`` (packed documents): neither the conv nor the state crosses a document boundary.

The reference step, the mitigations' scans and the sequence-parallel forward are in ``zoo.layers.mamba2_paths``;
the CPU fast paths (conv, decode step, tiled prefill) in ``zoo.layers.mamba2_ops``.

State-collapse mitigations (Chen et al., "Stuffed Mamba", arXiv 2410.07145 v1), all off by default, and then
bit-for-bit neutral (the code paths are skipped, not multiplied by 1):

* ``decay_scale = c``: ``alpha_t' = c * alpha_t`` (``log alpha += log c``; "forget more").
* ``input_scale = b``: ``B' = b * B`` ("remember less").
* ``dt_scale = s``: ``dt' = s * dt`` after the softplus (the LongMamba baseline).
* ``state_norm_threshold``: after every ``chunk_size`` real tokens counted from the sequence start, each head's
  state is renormalised ``S <- S * min(1, thr / ||S||_F)``. The released code multiplies by ``||S|| / thr``,
  which *amplifies* an oversized state; this implements the described (intended) renormalisation.
  Per-head thresholds can be calibrated with ``zoo.models.mamba2.calibrate_state_norm``.
* ``state_window = r``: the output reads the state of the last ``r`` tokens only,
  ``S_t^win = S_t - (prod_{j=t-r+1..t} alpha_j) S_{t-r}`` (the state itself runs on). Kept exactly via a
  lagged state and a ring buffer of the last ``r`` tokens' ``(x, dt, B, log-decay offset)``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.layers import mamba2_paths as paths
from zoo.layers.base import BenchCase, Mixer, State
from zoo.layers.mamba2_ops import decode_step_, layer_conv, tiled_forward
from zoo.layers.norm import GatedRMSNorm
from zoo.registry import register_mixer


@dataclass
class Mamba2State(State):
    """``conv_state [B, conv_dim, d_conv]`` (last pre-conv inputs; stored as ``[B, d_conv, conv_dim]`` rows by
    ``init_state`` and the prefills, any layout accepted), ``ssm_state [B, H, P, N]`` fp32,
    ``seen [B]`` real tokens consumed; with ``state_window``: ``lag_state`` (the state ``r`` tokens ago) and the
    ring of the last ``r`` tokens ``win_x [B, r, H, P]``, ``win_dt [B, r, H]``, ``win_B [B, r, G, N]``,
    ``win_off [B, r, H]``."""

    conv_state: Tensor
    ssm_state: Tensor
    seen: Tensor
    lag_state: Tensor | None = None
    win_x: Tensor | None = None
    win_dt: Tensor | None = None
    win_B: Tensor | None = None
    win_off: Tensor | None = None


_SMALL = {"d_state": 8, "headdim": 8, "chunk_size": 8}

CITATION = """@inproceedings{dao2024transformers,
  title={Transformers are {SSM}s: Generalized Models and Efficient Algorithms Through Structured State Space Duality},
  author={Dao, Tri and Gu, Albert},
  booktitle={International Conference on Machine Learning (ICML)},
  year={2024}
}"""


@register_mixer("mamba2")
class Mamba2(Mixer):
    arg_groups = ("mamba2",)
    citations = (CITATION,)
    example_args = (
        _SMALL,
        {**_SMALL, "ngroups": 2, "D_has_hdim": True, "decay_scale": 0.9},
        {**_SMALL, "state_norm_threshold": 0.5, "dt_scale": 0.5},
        {**_SMALL, "state_norm_threshold": [0.02, 0.05, 0.1, 0.5, 1.0, 0.03, 0.04, 0.2]},
        {**_SMALL, "state_window": 5, "input_scale": 0.5, "decay_scale": 0.95},
        {**_SMALL, "rmsnorm": False, "d_ssm": 32},
    )
    demo_args = {"d_state": 16, "headdim": 16, "chunk_size": 32}
    supports_packing = True
    dtypes = ("float16", "bfloat16")
    state_growth = "constant"
    sequence_parallel = True  # state passing across ranks (forward_sequence_parallel)
    bench_cases = (BenchCase(
        args={"full": {"d_model": 768, "d_state": 128, "d_conv": 4, "expand": 2, "headdim": 64, "ngroups": 1,
                       "chunk_size": 256},
              "quick": {"d_model": 64, "d_state": 16, "d_conv": 4, "expand": 2, "headdim": 16, "ngroups": 1,
                        "chunk_size": 16}},
        reference="transformers_mamba2", gpu_kernels=("mamba_ssm",),
        description="zoo mamba2 vs transformers Mamba2Mixer (torch path off-GPU), same weights"),)

    def __init__(
        self,
        d_model: int,
        layer_idx: int = 0,
        d_state: int = 128,
        d_conv: int = 4,
        conv_init: float | None = None,
        expand: int = 2,
        headdim: int = 64,
        d_ssm: int | None = None,
        ngroups: int = 1,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        D_has_hdim: bool = False,
        rmsnorm: bool = True,
        norm_before_gate: bool = False,
        norm_eps: float = 1e-5,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_limit: tuple[float, float] = (0.0, float("inf")),
        bias: bool = False,
        conv_bias: bool = True,
        chunk_size: int = 256,
        decay_scale: float = 1.0,
        input_scale: float = 1.0,
        dt_scale: float = 1.0,
        state_norm_threshold: float | list[float] | None = None,
        state_window: int | None = None,
    ) -> None:
        super().__init__(d_model, layer_idx)
        kw = dict(locals())
        kw.pop("self"), kw.pop("d_model"), kw.pop("layer_idx"), kw.pop("__class__", None)
        self.check_args(d_model, kw)
        self.d_state, self.d_conv, self.expand, self.headdim, self.ngroups = d_state, d_conv, expand, headdim, ngroups
        self.d_inner = expand * d_model
        self.d_ssm = d_ssm or self.d_inner
        self.d_mlp = self.d_inner - self.d_ssm
        self.nheads = self.d_ssm // headdim
        self.chunk_size, self.rmsnorm, self.D_has_hdim = chunk_size, rmsnorm, D_has_hdim
        self.conv_init, self.A_init_range = conv_init, tuple(A_init_range)
        self.dt_min, self.dt_max, self.dt_init_floor, self.dt_limit = dt_min, dt_max, dt_init_floor, tuple(dt_limit)
        self.decay_scale, self.input_scale, self.dt_scale = decay_scale, input_scale, dt_scale
        self.state_norm_threshold = state_norm_threshold
        self.state_window = state_window
        G, N, H = ngroups, d_state, self.nheads
        self.conv_dim = self.d_ssm + 2 * G * N
        self._decode_split = [self.d_mlp, self.d_mlp, self.d_ssm, self.conv_dim, H]  # in_proj's parts
        self._decode_xbc_split = [self.d_ssm, G * N, G * N]  # the conv output's parts
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * G * N + H, bias=bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1,
                                bias=conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.A_log = nn.Parameter(torch.empty(H))
        self.D = nn.Parameter(torch.empty(self.d_ssm if D_has_hdim else H))
        if rmsnorm:
            self.norm = GatedRMSNorm(self.d_ssm, eps=norm_eps, group_size=self.d_ssm // G,
                                     norm_before_gate=norm_before_gate)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        self.reset_mixer_parameters()

    @classmethod
    def check_args(cls, d_model: int, kwargs: dict[str, Any]) -> None:
        def positive(name: str, default: Any, kind: type = int) -> Any:
            v = kwargs.get(name, default)
            if not isinstance(v, kind) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"mamba2: {name}={v!r} must be a positive {kind.__name__}")
            return v

        d_state, d_conv = positive("d_state", 128), positive("d_conv", 4)
        expand, headdim, G = positive("expand", 2), positive("headdim", 64), positive("ngroups", 1)
        positive("chunk_size", 256)
        del d_state, d_conv
        d_inner = expand * d_model
        d_ssm = kwargs.get("d_ssm") or d_inner
        if not 0 < d_ssm <= d_inner:
            raise ValueError(f"mamba2: d_ssm={d_ssm} must be in (0, d_inner={d_inner}]")
        if d_ssm % headdim:
            raise ValueError(f"mamba2: d_ssm={d_ssm} (expand*d_model unless given) is not divisible by "
                             f"headdim={headdim}")
        H = d_ssm // headdim
        if H % G:
            raise ValueError(f"mamba2: nheads={H} (d_ssm/headdim) is not divisible by ngroups={G}")
        lo, hi = kwargs.get("A_init_range", (1.0, 16.0))
        if not 0 < lo <= hi:
            raise ValueError(f"mamba2: A_init_range=({lo}, {hi}) must satisfy 0 < low <= high")
        lo, hi = kwargs.get("dt_limit", (0.0, float("inf")))
        if not 0 <= lo < hi:
            raise ValueError(f"mamba2: dt_limit=({lo}, {hi}) must satisfy 0 <= low < high")
        for name in ("decay_scale", "input_scale", "dt_scale"):
            v = kwargs.get(name, 1.0)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise ValueError(f"mamba2: {name}={v!r} must be a positive float (1.0 = off)")
        if kwargs.get("decay_scale", 1.0) > 1:
            raise ValueError(f"mamba2: decay_scale={kwargs['decay_scale']} must be in (0, 1] (alpha' = c * alpha)")
        thr = kwargs.get("state_norm_threshold")
        if thr is not None:
            vals = list(thr) if isinstance(thr, (list, tuple)) else [thr]
            if isinstance(thr, (list, tuple)) and len(vals) != H:
                raise ValueError(f"mamba2: state_norm_threshold has {len(vals)} values; give one float or nheads={H}")
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in vals):
                raise ValueError(f"mamba2: state_norm_threshold={thr!r} must be positive (a float or a list of floats)")
        r = kwargs.get("state_window")
        if r is not None:
            positive("state_window", None)
            if thr is not None:
                raise ValueError("mamba2: state_window and state_norm_threshold cannot be combined; pick one")

    @classmethod
    def packing_supported(cls, args: dict[str, Any]) -> bool:
        return args.get("state_norm_threshold") is None

    @classmethod
    def flops(cls, d_model: int, args: dict[str, Any], *, T: int, context: int = 0, batch: int = 1) -> int:
        """``in_proj 2 T d (2 d_inner + 2 G N + H)`` + ``conv 2 T (d_ssm + 2 G N) d_conv`` + ``out_proj
        2 T d_inner d`` + the scan: chunked SSD ``2 T (Q G N + Q H P + 2 H P N)`` (``C B^T`` in a chunk, its
        masked product with ``X``, ``B^T X`` into chunk states, ``C h`` out of them), or ``4 H P N`` per token
        for a decode step (state update ``dt x B^T`` and read-out ``C h``)."""
        a = cls.resolved_args(args)
        d_inner = a["expand"] * d_model
        d_ssm = a["d_ssm"] or d_inner
        P, N, G = a["headdim"], a["d_state"], a["ngroups"]
        H = d_ssm // P
        proj = 2 * T * d_model * (2 * d_inner + 2 * G * N + H) + 2 * T * d_inner * d_model
        conv = 2 * T * (d_ssm + 2 * G * N) * a["d_conv"]
        if T == 1 and context > 0:
            scan = 4 * H * P * N
        else:
            Q = min(a["chunk_size"], T)
            scan = 2 * T * (Q * G * N + Q * H * P + 2 * H * P * N)
        return batch * (proj + conv + scan)

    @torch.no_grad()
    def reset_mixer_parameters(self) -> None:
        """mamba_ssm's init: dt ~ logU(dt_min, dt_max) (>= floor), dt_bias = softplus^-1(dt); A ~ U(A_init_range)."""
        H = self.nheads
        dev = self.dt_bias.device
        dt = torch.exp(torch.rand(H, device=dev) * (math.log(self.dt_max) - math.log(self.dt_min))
                       + math.log(self.dt_min)).clamp(min=self.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log.copy_(torch.log(torch.empty(H, device=dev).uniform_(*self.A_init_range)))
        self.D.fill_(1.0)
        if self.conv_init is not None:
            self.conv1d.weight.uniform_(-self.conv_init, self.conv_init)
        if self.rmsnorm:
            self.norm.weight.fill_(1.0)

    @torch.no_grad()
    def derive_from(self, old: nn.Module) -> bool:
        """From attention ("The Mamba in the Llama": C <- q, B <- k, x <- v): ``paths.derive_from_attention``."""
        return paths.derive_from_attention(self, old)

    # ------------------------------------------------------------------ state
    def init_state(self, batch_size: int, *, dtype: torch.dtype, device: torch.device | str,
                   max_length: int | None = None) -> Mamba2State:
        H, P, N, G = self.nheads, self.headdim, self.d_state, self.ngroups
        acc = torch.float64 if dtype == torch.float64 else torch.float32  # states accumulate in fp32 (fp64 stays)
        # conv_state [B, C, K] laid out as [B, K, C] in memory (as the prefills leave it): rows shift in a decode step
        window = torch.zeros(batch_size, self.d_conv, self.conv_dim, dtype=dtype, device=device).transpose(1, 2)
        st = Mamba2State(conv_state=window,
                         ssm_state=torch.zeros(batch_size, H, P, N, dtype=acc, device=device),
                         seen=torch.zeros(batch_size, dtype=torch.long, device=device))
        if self.state_window:
            r = self.state_window
            st.lag_state = torch.zeros_like(st.ssm_state)
            st.win_x = torch.zeros(batch_size, r, H, P, dtype=acc, device=device)
            st.win_dt = torch.zeros(batch_size, r, H, dtype=acc, device=device)
            st.win_B = torch.zeros(batch_size, r, G, N, dtype=acc, device=device)
            st.win_off = torch.zeros(batch_size, r, H, dtype=acc, device=device)
        return st

    # ------------------------------------------------------------------ forward
    # CPU: a plain parallel forward / prefill longer than this runs in tiles (mamba2_ops.tiled_forward); None: one piece
    tile_len: int | None = 2048  # measured at d_model 768: 1.60x vs 1.67x its GEMM floor at 4k with 1024 (16k: same)
    tile_checkpoint: bool = True  # recompute each tile's inner part in the backward (False: keep activations)

    def forward(self, x: Tensor, *, positions: Tensor | None = None, state: Mamba2State | None = None,
                attention_mask: Tensor | None = None, seq_idx: Tensor | None = None
                ) -> tuple[Tensor, Mamba2State | None]:
        T = x.shape[1]
        mask = None if attention_mask is None else attention_mask.to(torch.bool)
        if seq_idx is not None and state is not None and self.state_window:
            raise ValueError("mamba2: state_window with seq_idx is supported in the parallel forward only")
        if seq_idx is not None and self.state_norm_threshold is not None:
            raise ValueError("mamba2: state_norm_threshold with seq_idx (packed documents) is not supported: the "
                             "renormalisation points would not restart at each document")
        if state is not None and T == 1 and mask is None and not self.state_window and not torch.is_grad_enabled():
            return decode_step_(self, x, state), state  # the lean in-place step (zoo.layers.mamba2_ops)
        plain = mask is None and seq_idx is None and not self.state_window and paths.thresholds(self, x) is None
        if plain and self.tile_len and T > self.tile_len and x.device.type == "cpu":
            return tiled_forward(self, x, state), state
        return self._forward(x, state, mask, seq_idx), state

    def _forward(self, x: Tensor, state: Mamba2State | None, mask: Tensor | None, seq_idx: Tensor | None) -> Tensor:
        """One piece: the reference path of every mode."""
        Bsz, T, _ = x.shape
        H, P = self.nheads, self.headdim
        previous = copy.copy(state) if state is not None and mask is not None else None
        z0, x0, z, xBC, dt = self._in_proj(x, mask)
        prev = None if state is None else state.conv_state[..., 1:].transpose(1, 2)  # [B, K-1, conv_dim]
        if state is not None:
            full = torch.cat([prev.to(xBC.dtype), xBC], dim=1)
            state.conv_state = full[:, -self.d_conv:].to(state.conv_state.dtype, copy=True).transpose(1, 2)
        xs, Bm, Cm, dt, off, A, D = self._ssm_inputs(self._conv(xBC, prev, seq_idx), dt, mask)
        zg = None if self.rmsnorm else z.unflatten(-1, (H, P))
        if state is not None and T == 1:
            y = paths.step(self, xs[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], D, off, mask, state)[:, None]
            if zg is not None:
                y = (y * F.silu(zg.to(state.ssm_state.dtype))).to(xs.dtype)
        elif self.state_window:
            y = paths.windowed_scan(self, xs, dt, A, Bm, Cm, D, zg, off, seq_idx, state)
        else:
            y = paths.scan(self, xs, dt, A, Bm, Cm, D, zg, off, mask, seq_idx, state)
        if state is not None:
            state.seen = state.seen + (T if mask is None else mask.sum(1))
        if previous is not None:  # rows that were all padding in this call keep their state (conv window, ring)
            state.keep_rows(~mask.any(1), previous)
        return self._out(y.reshape(Bsz, T, self.d_ssm), z, z0, x0, x.dtype)

    # ------------------------------------------------------------------ sequence parallelism
    def check_sequence_parallel(self, size: int) -> None:
        super().check_sequence_parallel(size)
        if self.state_norm_threshold is not None or self.state_window:
            raise ValueError("mamba2: sequence parallelism passes a linear state between ranks; state_norm_threshold "
                             "and state_window are not supported with it")

    def forward_sequence_parallel(self, x: Tensor, *, positions: Tensor, attention_mask: Tensor | None,
                                  seq_idx: Tensor | None, comm: Any) -> Tensor:
        """This rank's segment ``x [B, T/R, d]`` of a sequence split over ``R`` ranks, scanned from the previous
        segments' final state (:func:`zoo.layers.mamba2_paths.forward_sequence_parallel`)."""
        return paths.forward_sequence_parallel(self, x, attention_mask, seq_idx, comm)

    def _in_proj(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``in_proj`` split into ``z0, x0 [B, T, d_mlp]``, ``z [B, T, d_ssm]``, ``xBC [B, T, conv_dim]`` (the conv
        input, zero at padded tokens) and the raw ``dt [B, T, H]``."""
        z0, x0, z, xBC, dt = self.in_proj(x).split([self.d_mlp, self.d_mlp, self.d_ssm, self.conv_dim, self.nheads],
                                                   dim=-1)
        if mask is not None:
            xBC = xBC * mask[..., None].to(xBC.dtype)
        return z0, x0, z, xBC, dt

    def _ssm_inputs(self, conv: Tensor, dt: Tensor, mask: Tensor | None
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor, Tensor]:
        """The activated conv output ``silu(conv(xBC)) [B, T, conv_dim]`` and raw ``dt`` -> the scan's ``x [B, T, H,
        P]``, ``B, C [B, T, G, N]``, ``dt [B, T, H]`` (fp32/fp64, zero at padded tokens), log-decay offset (or None),
        ``A [H]``, ``D``."""
        H, P, G, N = self.nheads, self.headdim, self.ngroups, self.d_state
        xs, Bm, Cm = conv.split([self.d_ssm, G * N, G * N], dim=-1)
        xs, Bm, Cm = xs.unflatten(-1, (H, P)), Bm.unflatten(-1, (G, N)), Cm.unflatten(-1, (G, N))
        acc = torch.float64 if conv.dtype == torch.float64 else torch.float32
        dt = F.softplus(dt.to(acc) + self.dt_bias.to(acc))  # [B, T, H]
        if self.dt_limit != (0.0, float("inf")):
            dt = dt.clamp(*self.dt_limit)
        if self.dt_scale != 1.0:
            dt = dt * self.dt_scale
        if mask is not None:
            dt = dt * mask[..., None]
        if self.input_scale != 1.0:
            Bm = Bm * self.input_scale
        off = None
        if self.decay_scale != 1.0:
            off = torch.full_like(dt, math.log(self.decay_scale))
            if mask is not None:
                off = off * mask[..., None]
        A = -torch.exp(self.A_log.to(acc))  # [H]
        D = self.D.view(H, P) if self.D_has_hdim else self.D
        return xs, Bm, Cm, dt, off, A, D

    def _out(self, y: Tensor, z: Tensor, z0: Tensor, x0: Tensor, dtype: torch.dtype) -> Tensor:
        """``y [B, T, d_ssm]`` -> :meth:`_out_proj_input`, then ``out_proj``."""
        return self.out_proj(self._out_proj_input(y, z, z0, x0).to(dtype))

    def _out_proj_input(self, y: Tensor, z: Tensor, z0: Tensor, x0: Tensor) -> Tensor:
        """``y [B, T, d_ssm]`` -> the gated norm and the MLP part of ``in_proj`` (``d_ssm < d_inner``) before it."""
        if self.rmsnorm:
            y = self.norm(y, z)
        if self.d_mlp > 0:
            y = torch.cat([F.silu(z0) * x0, y.to(x0.dtype)], dim=-1)
        return y

    def _conv(self, xBC: Tensor, prev: Tensor | None, seq_idx: Tensor | None, prev_seq: Tensor | None = None
              ) -> Tensor:
        """SiLU of the causal depthwise conv (+ bias) of ``xBC [B, T, C]`` after ``prev [B, K-1, C]``."""
        return layer_conv(self, xBC, prev, seq_idx, prev_seq)

    def extra_repr(self) -> str:
        mit = {k: getattr(self, k) for k in ("decay_scale", "input_scale", "dt_scale") if getattr(self, k) != 1.0}
        mit.update({k: getattr(self, k) for k in ("state_norm_threshold", "state_window") if getattr(self, k)})
        return (f"layer_idx={self.layer_idx}, d_state={self.d_state}, nheads={self.nheads}, headdim={self.headdim}, "
                f"ngroups={self.ngroups}, chunk_size={self.chunk_size}" + "".join(f", {k}={v}" for k, v in mit.items()))
