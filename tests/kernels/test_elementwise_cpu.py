"""The native elementwise passes (``zoo/kernels/elementwise_cpu.cpp``) against their torch versions in fp64: the
Mamba-2 causal conv (+ SiLU) against the plain shifted-sum conv, the gated group RMSNorm against its reference, the
rotary embedding against ``x cos + rotate_half(x) sin``; and their dispatch (no autograd, fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import needs_compiler
from zoo.kernels.elementwise_cpu import causal_conv_native, gated_rmsnorm_native, rotary_native
from zoo.kernels.gated_rmsnorm import gated_rmsnorm
from zoo.kernels.gated_rmsnorm.reference import gated_rmsnorm_ref
from zoo.layers.mamba2_ops import causal_conv, causal_conv_ref
from zoo.layers.rope import apply_rotary, rotate_half

pytestmark = needs_compiler
TOL = dict(rtol=2e-5, atol=2e-5)


@pytest.fixture(params=[1, 2, 3], ids=lambda n: f"threads{n}")
def threads(request, monkeypatch):
    monkeypatch.setenv("ZOO_NATIVE", "on")
    n = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(n)


@pytest.mark.parametrize("T,K", [(1, 4), (3, 4), (37, 4), (9, 2), (6, 1)])
@pytest.mark.parametrize("with_prev,with_bias,activation", [(True, True, True), (False, False, True),
                                                            (True, False, False)])
def test_native_conv_matches_the_plain_conv(T, K, with_prev, with_bias, activation, threads):
    """Inputs as a slice of a wider row (the layer's xBC inside in_proj's output), 37 channels (a vector tail),
    fewer tokens than taps, no earlier inputs (zeros)."""
    g = torch.Generator().manual_seed(T * 10 + K)
    wide = torch.randn(2, T, 50, generator=g)
    x = wide[..., 5:42]  # [2, T, 37], token stride 50
    prev = torch.randn(2, K - 1, 37, generator=g) if with_prev else None
    w, b = torch.randn(K, 37, generator=g), torch.randn(37, generator=g) if with_bias else None
    ref = causal_conv_ref(*(None if t is None else t.double() for t in (x, prev, w, b)))
    ref = torch.nn.functional.silu(ref) if activation else ref
    out = causal_conv_native(x, prev, w, b, activation)
    torch.testing.assert_close(out.double(), ref, **TOL)
    with torch.no_grad():  # the layer's entry point runs it
        assert torch.equal(causal_conv(x, prev, w, b, activation=activation), out)


@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("group_size,with_z,with_bias", [(None, True, False), (12, True, True), (24, False, False)])
def test_native_gated_rmsnorm_matches_the_reference(norm_before_gate, group_size, with_z, with_bias, threads):
    """``x`` and ``z`` as slices of wider rows, 3-D and 2-D, groups of 12 / 24 of 72 channels (vector tails)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 7, 80, generator=g)[..., 8:]  # [3, 7, 72], row stride 80
    z = torch.randn(3, 7, 100, generator=g)[..., 20:92] if with_z else None
    w, b = torch.randn(72, generator=g), torch.randn(72, generator=g) if with_bias else None
    kw = dict(bias=b, eps=1e-5, group_size=group_size, norm_before_gate=norm_before_gate)
    ref = gated_rmsnorm_ref(x.double(), w.double(), None if z is None else z.double(),
                            **{**kw, "bias": None if b is None else b.double()})
    out = gated_rmsnorm_native(x, w, z, **kw)
    torch.testing.assert_close(out.double(), ref, **TOL)
    out2 = gated_rmsnorm_native(x[0], w, None if z is None else z[0], **kw)  # 2-D
    torch.testing.assert_close(out2, out[0], rtol=0, atol=0)
    with torch.no_grad():
        assert torch.equal(gated_rmsnorm(x, w, z, **kw), out)
    assert gated_rmsnorm_native(x.double(), w.double(), None, **kw) is None  # fp64: the torch path


@pytest.mark.parametrize("D", [64, 36])  # 36: half of 18, a vector tail
@pytest.mark.parametrize("shared_angles", [True, False])
def test_native_rotary_matches_rotate_half(D, shared_angles, threads):
    """``q [B, H, T, D]`` as the projections' transposed view (and a contiguous one), angles shared by the batch rows
    or per row; the result keeps ``x``'s layout."""
    g = torch.Generator().manual_seed(D)
    x = torch.randn(2, 9, 5, D, generator=g).transpose(1, 2)  # [B, H=5, T=9, D], token-major memory
    cos = torch.randn(1 if shared_angles else 2, 1, 9, D, generator=g)
    sin = torch.randn(cos.shape, generator=g)
    ref = x.double() * cos.double() + rotate_half(x.double()) * sin.double()
    for xi in (x, x.contiguous()):
        out = rotary_native(xi, cos, sin)
        torch.testing.assert_close(out.double(), ref, **TOL)
        assert out.stride() == xi.stride()
        with torch.no_grad():
            assert torch.equal(apply_rotary(xi, cos, sin), out)
    expanded = rotary_native(x, cos.expand(2, 1, 9, D), sin.expand(2, 1, 9, D))  # a stride-0 batch of angles
    assert torch.equal(expanded, rotary_native(x, cos, sin))
