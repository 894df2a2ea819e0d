"""The native CPU forward of the SSD scan (``zoo/kernels/ssd/cpu.cpp``) against the naive fp64 recurrence of
``test_ssd_ref`` (outputs and final state), and its dispatch: ``ssd_chunk_scan`` runs it on the CPU without
autograd, the reference with it."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import needs_compiler
from tests.kernels.test_ssd_ref import naive_scan
from zoo.kernels.ssd import ssd_chunk_scan, ssd_chunk_scan_ref
from zoo.kernels.ssd.cpu import ssd_forward_native

pytestmark = needs_compiler


def _inputs(Bsz: int, T: int, H: int, P: int, G: int, N: int, seed: int = 0):
    """x, B, C as slices of one packed conv output [B, T, H P + 2 G N] (the layer's strides), dt, A."""
    g = torch.Generator().manual_seed(seed)
    conv = torch.randn(Bsz, T, H * P + 2 * G * N, generator=g)
    x = conv[..., :H * P].unflatten(-1, (H, P))
    B = conv[..., H * P:H * P + G * N].unflatten(-1, (G, N))
    C = conv[..., H * P + G * N:].unflatten(-1, (G, N))
    dt = torch.nn.functional.softplus(torch.randn(Bsz, T, H, generator=g) - 1)
    A = -torch.rand(H, generator=g) * 2 - 0.1
    return x, dt, A, B, C


@pytest.mark.parametrize("Bsz,T,H,P,G,N,chunk", [
    (2, 100, 6, 16, 2, 16, 64),   # a short last chunk, two groups of three heads, one-vector columns
    (1, 257, 4, 32, 1, 48, 256),  # computational chunk 64 of 256; N not a multiple of the vector
    (1, 64, 3, 64, 3, 128, 32),   # one head per group, four-vector columns, chunk 32
    (2, 5, 5, 16, 1, 16, 16),     # fewer tokens than a chunk, 5 heads over 2 or 3 threads
])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native_forward_matches_naive_recurrence(Bsz, T, H, P, G, N, chunk, threads, monkeypatch):
    monkeypatch.setenv("ZOO_NATIVE", "on")
    x, dt, A, B, C = _inputs(Bsz, T, H, P, G, N)
    g = torch.Generator().manual_seed(1)
    D = torch.randn(H, P, generator=g) if P == 32 else torch.randn(H, generator=g)
    z = torch.randn(Bsz, T, H, P, generator=g)
    s0 = torch.randn(Bsz, H, P, N, generator=g)
    off = -torch.rand(Bsz, T, H, generator=g) * 0.1
    s0_given = s0.clone()
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for kw in (dict(D=D, z=z, initial_states=s0, dA_offset=off), {}):
            y, S = ssd_forward_native(x, dt, A, B, C, chunk_size=chunk, **kw)
            y_ref, S_ref = naive_scan(x, dt, A, B, C, **kw)
            torch.testing.assert_close(y.double(), y_ref, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(S.double(), S_ref, rtol=1e-4, atol=1e-4)
        assert torch.equal(s0, s0_given)  # the caller's initial state untouched
    finally:
        torch.set_num_threads(n)


def test_native_declines_what_it_does_not_cover(monkeypatch):
    monkeypatch.setenv("ZOO_NATIVE", "on")
    x, dt, A, B, C = _inputs(1, 40, 4, 16, 1, 16)
    assert ssd_forward_native(x, dt, A, B, C, chunk_size=8) is None  # computational chunk 8
    assert ssd_forward_native(x[..., :8], dt, A, B, C, chunk_size=64) is None  # head dim 8
    assert ssd_forward_native(x.double(), dt, A, B, C, chunk_size=64) is None  # fp64
    assert ssd_forward_native(x.transpose(2, 3), dt, A, B, C, chunk_size=64) is None  # a strided head row
    monkeypatch.setenv("ZOO_NATIVE", "off")
    assert ssd_forward_native(x, dt, A, B, C, chunk_size=64) is None


def test_dispatch_runs_native_without_autograd_and_reference_with_it(monkeypatch):
    """The same call through ``ssd_chunk_scan``: without autograd the native result (not bit-equal to the reference),
    with autograd the reference (bit-equal, gradients flow); packed documents and the state norm keep the reference."""
    monkeypatch.setenv("ZOO_NATIVE", "on")
    x, dt, A, B, C = _inputs(2, 70, 4, 16, 2, 16)
    with torch.no_grad():
        y_nat, s_nat = ssd_chunk_scan(x, dt, A, B, C, chunk_size=64)
    y_ref, s_ref = ssd_chunk_scan_ref(x, dt, A, B, C, chunk_size=64)
    assert torch.equal(y_nat, ssd_forward_native(x, dt, A, B, C, chunk_size=64)[0])
    torch.testing.assert_close(y_nat, y_ref, rtol=1e-4, atol=1e-4)
    xg = x.detach().clone().requires_grad_()
    y_grad, _ = ssd_chunk_scan(xg, dt, A, B, C, chunk_size=64)
    assert torch.equal(y_grad.detach(), ssd_chunk_scan_ref(x, dt, A, B, C, chunk_size=64)[0])
    y_grad.sum().backward()
    assert xg.grad is not None
    seq = torch.zeros(2, 70, dtype=torch.long)
    seq[:, 30:] = 1
    with torch.no_grad():
        y_seq, _ = ssd_chunk_scan(x, dt, A, B, C, chunk_size=64, seq_idx=seq)
    assert torch.equal(y_seq, ssd_chunk_scan_ref(x, dt, A, B, C, chunk_size=64, seq_idx=seq)[0])
