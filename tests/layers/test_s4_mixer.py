"""S4 / S4D mixer against an independent reference written from the paper's definitions, the reference's
parameter names and shapes, HiPPO-LegS (three modes, padding, packing: the contract suite, tests/contract).

The reference: materialise the full (conjugate-doubled) ``A = diag(Lambda) - P P^*`` per feature, discretise
(bilinear for S4; ZOH or bilinear for S4D), recover the plain ``C`` from the stored ``C~ = C (I - dA^L)``
(``L = l_kernel``), unroll ``x_t = dA x_{t-1} + dB u_t``, ``y_t = C x_t`` in float64, then ``+ D u``, the
activation and the output linear. Nothing of the zoo's kernel code (Cauchy, Woodbury, FFT, Vandermonde,
dense transitions) is used.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zoo.kernels.s4.ssm import nplr_legs, param_transform
from zoo.layers.s4 import S4
from zoo.models.s4 import mixer_from_s4block

pytestmark = pytest.mark.usefixtures("single_thread")

H = 8


def c64(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_complex(t.detach().double().contiguous())


def paper_reference(m: S4, x: torch.Tensor) -> torch.Tensor:
    """The S4 block from its definitions, in float64, by unrolling the recurrence."""
    k = m.kernel
    rep = H // k.n_ssm
    dt = param_transform(k.inv_dt.detach().double(), k.dt_transform)[:, 0]  # [H] (dt_tie)
    lam = -param_transform(k.A_real.detach().double(), k.real_transform) - 1j * param_transform(
        k.A_imag.detach().double(), k.imag_transform)
    lam, B = lam.repeat(rep, 1), c64(k.B)[0].repeat(rep, 1)  # [H, N]
    Cs = c64(k.C)  # [C, H, N]
    lam, B, Cs = (torch.cat([t, t.conj()], -1) for t in (lam, B, Cs))  # conjugate-doubled: [.., 2N]
    n2 = lam.shape[-1]
    eye = torch.eye(n2, dtype=torch.complex128)
    if m.mode == "dplr":
        P = c64(k.P).repeat(1, rep, 1)
        P = torch.cat([P, P.conj()], -1)  # [r, H, 2N]
        A = torch.diag_embed(lam) - torch.einsum("rhn,rhm->hnm", P, P.conj())  # Lambda - P P^*
        dtA = dt[:, None, None] * A
        inv = torch.linalg.inv(eye - dtA / 2)
        dA, dB = inv @ (eye + dtA / 2), (inv @ (dt[:, None] * B)[..., None])[..., 0]
        Lk = int(k.l_kernel)
        if Lk:  # the stored C is C~ = C (I - dA^Lk)
            Cs = torch.einsum("chn,hnm->chm", Cs, torch.linalg.inv(eye - torch.linalg.matrix_power(dA, Lk)))
    elif k.disc == "zoh":
        dA, dB = torch.diag_embed(torch.exp(dt[:, None] * lam)), torch.expm1(dt[:, None] * lam) / lam * B
    else:
        dA = torch.diag_embed((1 + dt[:, None] * lam / 2) / (1 - dt[:, None] * lam / 2))
        dB = dt[:, None] * B / (1 - dt[:, None] * lam / 2)
    u = x.double()
    state = torch.zeros(x.shape[0], H, n2, dtype=torch.complex128)
    ys = []
    for t in range(x.shape[1]):
        state = torch.einsum("hnm,bhm->bhn", dA, state) + dB * u[:, t, :, None]
        ys.append(torch.einsum("chn,bhn->bch", Cs, state).real)
    y = torch.stack(ys, 1) + u[:, :, None, :] * m.D.detach().double()  # [B, T, C, H]
    y = m.activation.double()(y.flatten(-2))
    lin = m.output_linear[0]
    y = F.linear(y, lin.weight.detach().double(), lin.bias.detach().double())
    return F.glu(y, -1) if isinstance(m.output_linear[1], torch.nn.GLU) else m.output_linear[1].double()(y)


def randomise(m: S4, seed: int) -> S4:
    """Move every parameter off its structured init (incl. a full-rank P), keeping A stable."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name in ("kernel.A_real", "kernel.inv_dt"):
                p.add_(0.2 * torch.randn(p.shape, generator=g))
            elif p.dtype.is_floating_point:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return m


CASES = {
    "s4-legs-doubling": (dict(d_state=8, l_max=16), 40),  # T > l_kernel: C~ doubled
    "s4-legs-short": (dict(d_state=8, l_max=64), 40),  # T < l_kernel: a truncated kernel
    "s4-plain-C": (dict(d_state=8), 33),  # l_max None: l_kernel 0, C is the plain C
    "s4-rank2-channels": (dict(d_state=8, l_max=20, rank=2, channels=2, n_ssm=2, dt_transform="softplus"), 37),
    "s4d-lin-zoh": (dict(d_state=8, mode="diag", init="diag-lin"), 40),
    "s4d-inv-bilinear": (dict(d_state=8, mode="diag", init="diag-inv", disc="bilinear", final_act="id"), 40),
    "s4d-legs-softplus": (dict(d_state=8, mode="diag", init="legs", dt_transform="softplus", n_ssm=1), 40),
}


@pytest.mark.parametrize("name", list(CASES))
def test_conv_mode_matches_paper_reference(name):
    args, T = CASES[name]
    torch.manual_seed(0)
    m = randomise(S4(H, **args), seed=1)
    x = torch.randn(2, T, H)
    y, _ = m(x)
    ref = paper_reference(m, x)
    assert (y.double() - ref).abs().max().item() < 1e-4
    assert ref.abs().max().item() > 0.1  # not a trivially small output


def test_checkpoint_l_kernel_is_honoured():
    """A state dict with the reference's exact keys/shapes (standalone ``S4Block``) loads strictly, incl. a
    non-power-of-two ``l_kernel``; outputs then follow ``C~ = C (I - dA^l_kernel)`` below and above it."""
    N, S, C, r = 4, 1, 1, 1
    g = torch.Generator().manual_seed(3)
    ref_sd = {
        "layer.D": torch.randn(C, H, generator=g),
        "layer.kernel.inv_dt": torch.empty(H, 1).uniform_(-4, -1, generator=g),
        "layer.kernel.C": torch.randn(C, H, N, 2, generator=g),
        "layer.kernel.B": torch.randn(1, S, N, 2, generator=g),
        "layer.kernel.A_real": torch.empty(S, N).uniform_(-1.5, 0.5, generator=g),
        "layer.kernel.A_imag": torch.empty(S, N).uniform_(0, 5, generator=g),
        "layer.kernel.P": 0.5 * torch.randn(r, S, N, 2, generator=g),
        "layer.kernel.l_kernel": torch.tensor(24),
        "output_linear.0.weight": torch.randn(2 * H, H, generator=g) / 3,
        "output_linear.0.bias": torch.randn(2 * H, generator=g),
    }
    m = S4(H, d_state=2 * N, n_ssm=S, l_max=64)  # its own l_kernel (64) is replaced by the checkpoint's
    m.load_state_dict(mixer_from_s4block(ref_sd), strict=True)
    assert int(m.kernel.l_kernel) == 24 and m.kernel.l_kernel.dtype == torch.int64
    for T in (17, 24, 50):
        x = torch.randn(2, T, H, generator=g)
        assert (m(x)[0].double() - paper_reference(m, x)).abs().max().item() < 1e-4


@pytest.mark.parametrize("args", [dict(), dict(mode="diag", dt_tie=False, n_ssm=2, channels=3, rank=2)])
def test_reference_parameter_names_and_shapes(args):
    """The sheet's state_dict table (with the standalone ``S4Block``'s ``layer.`` prefix stripped)."""
    d_state, C = 16, args.get("channels", 1)
    m = S4(H, d_state=d_state, **args)
    S, N = args.get("n_ssm") or H, d_state // 2
    expected = {"D": (C, H), "kernel.inv_dt": (H, 1) if args.get("dt_tie", True) else (H, N),
                "kernel.C": (C, H, N, 2), "kernel.B": (1, S, N, 2), "kernel.A_real": (S, N), "kernel.A_imag": (S, N),
                "output_linear.0.weight": (2 * H, C * H), "output_linear.0.bias": (2 * H,)}
    if m.mode == "dplr":
        expected.update({"kernel.P": (1, S, N, 2), "kernel.l_kernel": ()})
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == expected


def test_legs_init_is_hippo():
    """``diag(Lambda) - P P^*`` of the LegS init is unitarily similar to HiPPO-LegS (lower triangular,
    diagonal ``-(n+1)``): eigenvalues -1 .. -N (fp64: the matrix is far from normal); the module stores it."""
    lam, P, _ = nplr_legs(8)
    lam, P = torch.cat([lam, lam.conj()]), torch.cat([P, P.conj()])
    ev = torch.linalg.eigvals(torch.diag(lam) - P[:, None] * P.conj()[None, :])
    assert ev.imag.abs().max() < 1e-8
    torch.testing.assert_close(ev.real.sort().values, -torch.arange(8, 0, -1, dtype=torch.float64), atol=1e-8,
                               rtol=0)
    k = S4(H, d_state=8).kernel
    torch.testing.assert_close(-torch.exp(k.A_real.double()) - 1j * k.A_imag.double(), lam[:4].expand(H, 4))
    torch.testing.assert_close(c64(k.P)[0], P[:4].expand(H, 4))


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="d_state=7 must be even"):
        S4(H, d_state=7)
    with pytest.raises(ValueError, match="n_ssm=3 must be a positive divisor"):
        S4(H, n_ssm=3)
    with pytest.raises(ValueError, match="S4D initialisation"):
        S4(H, init="diag-lin")
    m = S4(H, d_state=4)
    with pytest.raises(ValueError, match="seq_idx"):
        m(torch.randn(1, 4, H), state=m.init_state(1, dtype=torch.float32, device="cpu"),
          seq_idx=torch.zeros(1, 4, dtype=torch.long))
