"""Triton gated RMSNorm (forward + backward) against its torch reference and an in-file fp64 formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import run_sm90_compile
from zoo.kernels.gated_rmsnorm import gated_rmsnorm, gated_rmsnorm_ref
from zoo.kernels.gated_rmsnorm.reference import gated_rmsnorm_inference
from zoo.kernels.gated_rmsnorm.triton import gated_rmsnorm_triton


def formula_fp64(x, w, z, b, eps, group_size, norm_before_gate):
    """mamba_ssm RMSNormGated written out in fp64: mean of squares per group of ``group_size`` channels."""
    x, w = x.double(), w.double()
    if z is not None and not norm_before_gate:
        x = x * F.silu(z.double())
    shp = x.shape
    xg = x.reshape(*shp[:-1], shp[-1] // group_size, group_size)
    y = (xg / torch.sqrt((xg * xg).mean(-1, keepdim=True) + eps)).reshape(shp) * w
    if b is not None:
        y = y + b.double()
    if z is not None and norm_before_gate:
        y = y * F.silu(z.double())
    return y


def rel_rmse(a, b):
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


CASES = [
    # (shape, group_size, has_z, has_bias, norm_before_gate)
    pytest.param((2, 7, 48), 24, True, False, False, id="mamba2-G2"),
    pytest.param((3, 40), 40, True, True, True, id="before-gate-bias"),
    pytest.param((2, 5, 36), 12, False, False, False, id="no-z-G3-nonpow2"),
    pytest.param((1, 9, 64), 16, True, True, False, id="G4-bias"),
]


@pytest.mark.triton
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 5e-3)])
@pytest.mark.parametrize("shape,group_size,has_z,has_bias,nbg", CASES)
def test_gated_rmsnorm_triton(shape, group_size, has_z, has_bias, nbg, dtype, tol):
    g = torch.Generator().manual_seed(0)
    d = shape[-1]
    x = torch.randn(*shape, generator=g).to(dtype)
    z = torch.randn(*shape, generator=g).to(dtype) if has_z else None
    w = 1 + 0.3 * torch.randn(d, generator=g)
    b = 0.1 * torch.randn(d, generator=g) if has_bias else None
    dy = torch.randn(*shape, generator=g, dtype=torch.float64)
    if torch.cuda.is_available():  # no interpreter there: run the same check compiled on the GPU
        x, z, w, b, dy = (t.cuda() if t is not None else None for t in (x, z, w, b, dy))
    results = []
    for fn in ("kernel", "fp64"):
        leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, w, z, b)]
        xx, ww, zz, bb = leaves
        if fn == "kernel":
            y = gated_rmsnorm_triton(xx, ww, zz, bias=bb, eps=1e-5, group_size=group_size, norm_before_gate=nbg)
            assert y.dtype == dtype and y.shape == x.shape
        else:
            y = formula_fp64(xx, ww, zz, bb, 1e-5, group_size, nbg)
        used = [t for t in leaves if t is not None]
        grads = torch.autograd.grad((y.double() * dy).sum(), used)
        results.append([y, *grads])
    for name, a, r in zip(["y", "dx", "dw", "dz", "db"][: len(results[0])], *results):
        assert rel_rmse(a, r) < tol, f"{name}: rel_rmse {rel_rmse(a, r):.2e}"


@pytest.mark.triton
def test_gated_rmsnorm_ref_matches_formula_and_layer(monkeypatch):
    from zoo.layers.norm import GatedRMSNorm

    g = torch.Generator().manual_seed(1)
    x, z = torch.randn(2, 6, 32, generator=g), torch.randn(2, 6, 32, generator=g)
    w = torch.randn(32, generator=g)
    for nbg in (False, True):
        ref = gated_rmsnorm_ref(x, w, z, group_size=8, norm_before_gate=nbg)
        torch.testing.assert_close(ref.double(), formula_fp64(x, w, z, None, 1e-5, 8, nbg), rtol=1e-5, atol=1e-5)
        layer = GatedRMSNorm(32, eps=1e-5, group_size=8, norm_before_gate=nbg)
        layer.weight.data.copy_(w)
        torch.testing.assert_close(layer(x, z), ref, rtol=1e-6, atol=1e-6)
    # the CPU dispatch: the reference under autograd, its in-place inference variant otherwise (or the native pass in
    # fp32: tests/kernels/test_elementwise_cpu.py)
    wg = w.clone().requires_grad_()
    assert torch.equal(gated_rmsnorm(x, wg, z, group_size=8), gated_rmsnorm_ref(x, wg, z, group_size=8))
    monkeypatch.setenv("ZOO_NATIVE", "off")
    with torch.no_grad():
        assert torch.equal(gated_rmsnorm(x, wg, z, group_size=8), gated_rmsnorm_inference(x, w, z, group_size=8))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_gated_rmsnorm_inference_matches_reference(dtype):
    """The in-place inference path equals the reference: gate before / after the norm, no gate, bias, groups."""
    g = torch.Generator().manual_seed(2)
    x, z = torch.randn(3, 5, 48, generator=g).to(dtype), torch.randn(3, 5, 48, generator=g).to(dtype)
    w, b = torch.randn(48, generator=g).to(dtype), torch.randn(48, generator=g).to(dtype)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    for kw in ({"z": z}, {"z": z, "norm_before_gate": True}, {"z": None}, {"z": z, "bias": b, "group_size": 16}):
        z_ = kw.pop("z")
        ref = gated_rmsnorm_ref(x, w, z_, **kw)
        out = gated_rmsnorm_inference(x, w, z_, **kw)
        assert out.dtype == ref.dtype == dtype
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


@pytest.mark.triton
def test_gated_rmsnorm_bad_input():
    x = torch.randn(2, 30)
    with pytest.raises(ValueError, match="group_size 7 must divide"):
        gated_rmsnorm_triton(x, torch.ones(30), group_size=7)
    with pytest.raises(ValueError, match="weight/bias must be"):
        gated_rmsnorm_triton(x, torch.ones(31))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gated_rmsnorm_cuda(dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 257, 1536, generator=g).to(dtype).cuda().requires_grad_(True)
    z = torch.randn(4, 257, 1536, generator=g).to(dtype).cuda().requires_grad_(True)
    w = (1 + 0.3 * torch.randn(1536, generator=g)).cuda().requires_grad_(True)
    y = gated_rmsnorm_triton(x, w, z, group_size=768)
    r = formula_fp64(x, w, z, None, 1e-5, 768, False)
    dy = torch.randn_like(r)
    ga = torch.autograd.grad((y.double() * dy).sum(), (x, w, z))
    gr = torch.autograd.grad((r * dy).sum(), (x, w, z))
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert rel_rmse(y, r) < tol
    for a, b in zip(ga, gr):
        assert rel_rmse(a, b) < tol


_SM90_COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import zoo.kernels.gated_rmsnorm.triton as K

ints = dict(M="i32", D="i32", GS="i32", NG="i32", ROWS_PER_PROG="i32", eps="fp32")
for dt in ("bf16", "fp32"):
    ptrs = dict(x_ptr=f"*{dt}", z_ptr=f"*{dt}", y_ptr=f"*{dt}", dy_ptr=f"*{dt}", dx_ptr=f"*{dt}", dz_ptr=f"*{dt}")
    for fn in (K._gated_rmsnorm_fwd, K._gated_rmsnorm_bwd):
        for nbg in (False, True):
            consts = dict(BLOCK=8192, HAS_Z=True, HAS_B=True, NORM_BEFORE_GATE=nbg)
            sig = {a: "constexpr" if a in consts else ints.get(a) or ptrs.get(a, "*fp32") for a in fn.arg_names}
            k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=16))
            assert k.metadata.shared <= 227 * 1024, (fn.__name__, k.metadata.shared)
"""


@pytest.mark.triton
@pytest.mark.slow
def test_gated_rmsnorm_compiles_for_sm90():
    """Lower both kernels to sm_90 cubins without a GPU (group of 8192 channels, 16 warps, bf16 and fp32)."""
    run_sm90_compile(_SM90_COMPILE)
