"""S4 Cauchy and Vandermonde products: the sliced torch reference against the materialised formula (forward, and
backward against autograd through it), the Triton kernels against the reference under the interpreter, dispatch."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import run_sm90_compile
from zoo.kernels import s4 as K
from zoo.kernels.s4 import reference as R

pytestmark = pytest.mark.usefixtures("single_thread")


def inputs(dtype: torch.dtype, M=3, H=5, N=19, n_nodes=300, seed=0, imaginary_nodes=True):
    g = torch.Generator().manual_seed(seed)
    real = torch.float64 if dtype == torch.complex128 else torch.float32
    v = torch.randn(M, H, N, 2, generator=g, dtype=real)
    w = torch.stack([-torch.rand(H, N, generator=g, dtype=real) - 0.01, 3 * torch.randn(H, N, generator=g, dtype=real)],
                    -1)
    if imaginary_nodes:  # the DPLR nodes 2i tan(pi k / L)
        z = 2j * torch.tan(torch.pi * torch.arange(n_nodes, dtype=torch.float64) / (2 * n_nodes + 1))
    else:
        z = torch.complex(*torch.randn(2, n_nodes, generator=g, dtype=torch.float64)) * 3
    x = torch.stack([-0.05 * torch.rand(H, N, generator=g, dtype=real), torch.randn(H, N, generator=g, dtype=real)],
                    -1)
    return (torch.view_as_complex(v), z.to(dtype), torch.view_as_complex(w), torch.view_as_complex(x))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def naive_with_grads(fn, args, g, wrt):
    leaves = [a.detach().clone().requires_grad_(i in wrt) for i, a in enumerate(args)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, [leaves[i] for i in wrt], g)
    return out.detach(), grads


@pytest.mark.parametrize("dtype,tol", [(torch.complex128, 1e-12), (torch.complex64, 1e-4)])
@pytest.mark.parametrize("imaginary", [True, False])
def test_cauchy_reference_matches_materialised(dtype, tol, imaginary):
    v, z, w, _ = inputs(dtype, imaginary_nodes=imaginary)
    g = torch.randn(v.shape[0], v.shape[1], z.shape[0], dtype=dtype, generator=torch.Generator().manual_seed(1))
    out, (gv, gw) = naive_with_grads(R.cauchy_naive, (v, z, w), g, (0, 2))
    for tile in (None, 3000):  # one tile / many tiles (partial ones at both ends of h and k)
        assert rel(R.cauchy_fwd_ref(v, z, w, tile=tile), out) < tol
        rv, rw = R.cauchy_bwd_ref(g, v, z, w, tile=tile)
        assert rel(rv, gv) < tol and rel(rw, gw) < tol


@pytest.mark.parametrize("dtype,tol", [(torch.complex128, 1e-12), (torch.complex64, 1e-4)])
def test_vandermonde_reference_matches_materialised(dtype, tol):
    v, _, _, x = inputs(dtype)
    L = 301
    g = torch.randn(v.shape[0], v.shape[1], L, dtype=v.real.dtype, generator=torch.Generator().manual_seed(1))
    out, (gv, gx) = naive_with_grads(lambda a, b: R.log_vandermonde_naive(a, b, L), (v, x), g, (0, 1))
    for tile in (None, 500):
        assert rel(R.vandermonde_fwd_ref(v, x, L, tile=tile), out) < tol
        rv, rx = R.vandermonde_bwd_ref(g, v, x, tile=tile)
        assert rel(rv, gv) < tol and rel(rx, gx) < tol


def _both_backends(monkeypatch, fn, args, g):
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("ZOO_BACKEND", backend)
        leaves = [a.detach().clone().requires_grad_(a.is_complex()) if isinstance(a, torch.Tensor) else a
                  for a in args]
        out = fn(*leaves)
        grads = torch.autograd.grad(out, [a for a in leaves if isinstance(a, torch.Tensor) and a.requires_grad], g)
        results[backend] = (out, *grads)
    return results


@pytest.mark.triton
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-12)])
def test_cauchy_triton_matches_reference(monkeypatch, dtype, tol):
    cd = torch.complex64 if dtype == torch.float32 else torch.complex128
    v, z, w, _ = inputs(cd, M=2, H=3, N=37, n_nodes=150)  # N and K not multiples of the blocks
    v = v.reshape(2, 1, 3, 37)  # leading batch dims are flattened by the dispatcher
    g = torch.randn(2, 1, 3, 150, dtype=cd, generator=torch.Generator().manual_seed(1))
    r = _both_backends(monkeypatch, lambda a, b: K.cauchy(a, z, b), (v, w), g)
    for a, b in zip(r["triton"], r["torch"]):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert rel(a, b) < tol


@pytest.mark.triton
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-12)])
def test_vandermonde_triton_matches_reference(monkeypatch, dtype, tol):
    cd = torch.complex64 if dtype == torch.float32 else torch.complex128
    v, _, _, x = inputs(cd, M=2, H=3, N=37)
    L = 170
    g = torch.randn(2, 3, L, dtype=dtype, generator=torch.Generator().manual_seed(1))
    r = _both_backends(monkeypatch, lambda a, b: K.log_vandermonde(a, b, L), (v, x), g)
    for a, b in zip(r["triton"], r["torch"]):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert rel(a, b) < tol


def test_dispatch_and_errors(monkeypatch):
    v, z, w, x = inputs(torch.complex64, H=2, N=4, n_nodes=8)
    calls = []
    monkeypatch.setattr(R, "cauchy_fwd_ref", lambda *a: calls.append("ref") or torch.zeros(3, 2, 8, dtype=v.dtype))
    monkeypatch.setattr(K, "cauchy_fwd_ref", R.cauchy_fwd_ref)
    K.cauchy(v, z, w)  # CPU tensors, ZOO_BACKEND unset: the reference
    assert calls == ["ref"]
    with pytest.raises(ValueError, match="must be complex"):
        K.cauchy(v.real, z, w)
    with pytest.raises(ValueError, match="must agree"):
        K.log_vandermonde(v, x[:1], 4)


@pytest.mark.gpu
def test_s4_kernels_cuda():
    v, z, w, x = (t.cuda() for t in inputs(torch.complex64, M=4, H=64, N=32, n_nodes=2049))
    torch.testing.assert_close(K.cauchy(v, z, w).cpu(), R.cauchy_fwd_ref(*(t.cpu() for t in (v, z, w))),
                               rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(K.log_vandermonde(v, x, 4096).cpu(), R.vandermonde_fwd_ref(v.cpu(), x.cpu(), 4096),
                               rtol=1e-4, atol=1e-3)


_SM90_COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import zoo.kernels.s4.triton as K

for fn, consts in ((K._cauchy_fwd_kernel, dict(BLOCK_N=32, BLOCK_K=128)),
                   (K._cauchy_bwd_kernel, dict(BLOCK_N=32, BLOCK_K=64)),
                   (K._vandermonde_fwd_kernel, dict(BLOCK_N=32, BLOCK_L=128)),
                   (K._vandermonde_bwd_kernel, dict(BLOCK_N=32, BLOCK_L=64))):
    sig = {a: "constexpr" if a in consts else ("i32" if a in ("H", "N", "K", "L") else "*fp32") for a in fn.arg_names}
    k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    assert k.metadata.shared <= 227 * 1024, (fn.__name__, k.metadata.shared)
"""


@pytest.mark.triton
@pytest.mark.slow
def test_s4_kernels_compile_for_sm90():
    """Lower the four kernels to sm_90 cubins without a GPU (fp32)."""
    run_sm90_compile(_SM90_COMPILE)
