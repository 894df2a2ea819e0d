"""The chunked SSD reference against a naive sequential recurrence in fp64 (an independent oracle)."""

from __future__ import annotations

import pytest
import torch

from zoo.kernels.ssd import ssd_chunk_scan, ssd_chunk_scan_ref

pytestmark = pytest.mark.usefixtures("single_thread")


def naive_scan(x, dt, A, B, C, *, D=None, z=None, initial_states=None, seq_idx=None, dA_offset=None,
               state_norm_threshold=None, chunk_size=None, chunk_offset=0):
    """h_t = exp(dt_t A + off_t) h_{t-1} + dt_t x_t B_t^T ; y_t = h_t C_t + D x_t ; token by token."""
    Bsz, T, H, P = x.shape
    G, N = B.shape[-2:]
    hg = H // G
    h = torch.zeros(Bsz, H, P, N, dtype=torch.float64) if initial_states is None else initial_states.double().clone()
    ys = []
    for t in range(T):
        if seq_idx is not None and t > 0:
            same = (seq_idx[:, t] == seq_idx[:, t - 1]).double()[:, None, None, None]
            h = h * same
        a = dt[:, t].double() * A.double()
        if dA_offset is not None:
            a = a + dA_offset[:, t].double()
        Bt = B[:, t].double().repeat_interleave(hg, 1)  # [B, H, N]
        Ct = C[:, t].double().repeat_interleave(hg, 1)
        dtx = dt[:, t].double()[..., None] * x[:, t].double()  # [B, H, P]
        h = torch.exp(a)[..., None, None] * h + dtx[..., None] * Bt[:, :, None]
        y = (h * Ct[:, :, None]).sum(-1)  # the output of a boundary token reads the state before renormalising
        if state_norm_threshold is not None and (chunk_offset + t + 1) % chunk_size == 0:
            n = torch.linalg.vector_norm(h, dim=(-2, -1), keepdim=True)
            h = h * torch.clamp(state_norm_threshold.double().view(1, H, 1, 1) / n, max=1.0)
        if D is not None:
            y = y + x[:, t].double() * D.double().view(H, -1)
        if z is not None:
            y = y * torch.nn.functional.silu(z[:, t].double())
        ys.append(y)
    return torch.stack(ys, 1), h


def make(Bsz=2, T=37, H=6, P=5, G=3, N=7, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(Bsz, T, H, P, generator=g, dtype=dtype)
    dt = torch.nn.functional.softplus(torch.randn(Bsz, T, H, generator=g, dtype=dtype) - 1)
    A = -torch.rand(H, generator=g, dtype=dtype) * 3 - 0.1
    B = torch.randn(Bsz, T, G, N, generator=g, dtype=dtype)
    C = torch.randn(Bsz, T, G, N, generator=g, dtype=dtype)
    return x, dt, A, B, C


@pytest.mark.parametrize("T,Q", [(37, 8), (32, 8), (5, 16), (1, 4)])
@pytest.mark.parametrize("G", [1, 3])
def test_ref_matches_naive(T, Q, G):
    x, dt, A, B, C = make(T=T, G=G)
    g = torch.Generator().manual_seed(1)
    D = torch.randn(6, dtype=torch.float64, generator=g)
    z = torch.randn_like(x)
    h0 = torch.randn(2, 6, 5, 7, dtype=torch.float64, generator=g)
    y, S = ssd_chunk_scan_ref(x, dt, A, B, C, chunk_size=Q, D=D, z=z, initial_states=h0)
    y_ref, S_ref = naive_scan(x, dt, A, B, C, D=D, z=z, initial_states=h0)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(S, S_ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("G", [1, 3])
@pytest.mark.parametrize("seq", [False, True])
def test_ref_chunk_by_chunk_passing_matches_naive(G, seq):
    """Without autograd and with 32+ chunks the state passing and the off-diagonal output run chunk by chunk with the
    running state in cache (``_passing_in_cache``): == the naive recurrence (outputs and final state; batch 2,
    grouped B / C, documents, ragged last chunk); the caller's initial state is not modified."""
    x, dt, A, B, C = make(T=4 * 67, G=G)
    g = torch.Generator().manual_seed(2)
    h0 = torch.randn(2, 6, 5, 7, dtype=torch.float64, generator=g)
    h0_before = h0.clone()
    ids = torch.arange(x.shape[1]).expand(2, -1)
    seq_idx = (ids >= torch.tensor([[100], [7]])).long() + (ids >= 200).long() if seq else None
    with torch.no_grad():
        y, S = ssd_chunk_scan_ref(x, dt, A, B, C, chunk_size=8, D=torch.ones(6, dtype=torch.float64),
                                  initial_states=h0, seq_idx=seq_idx)
    y_ref, S_ref = naive_scan(x, dt, A, B, C, D=torch.ones(6, dtype=torch.float64), initial_states=h0,
                              seq_idx=seq_idx)
    assert -(-x.shape[1] // 8) >= 32  # the chunk-by-chunk path
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(S, S_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(h0, h0_before, rtol=0, atol=0)


def test_ref_D_per_channel_and_fp32():
    x, dt, A, B, C = make(dtype=torch.float32)
    D = torch.randn(6, 5)
    y, S = ssd_chunk_scan_ref(x, dt, A, B, C, chunk_size=16, D=D)
    y_ref, S_ref = naive_scan(x, dt, A, B, C, D=D)
    assert y.dtype == torch.float32 and S.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_ref, rtol=0, atol=2e-4)
    torch.testing.assert_close(S.double(), S_ref, rtol=0, atol=2e-4)


def test_ref_seq_idx():
    x, dt, A, B, C = make(T=40, G=3)
    seq = torch.tensor([[0] * 5 + [1] * 20 + [2] * 15, [0] * 9 + [1] * 1 + [2] * 30])
    h0 = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    y, S = ssd_chunk_scan_ref(x, dt, A, B, C, chunk_size=8, seq_idx=seq, initial_states=h0)
    y_ref, S_ref = naive_scan(x, dt, A, B, C, seq_idx=seq, initial_states=h0)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(S, S_ref, rtol=0, atol=1e-10)


def test_ref_decay_offset_and_state_norm():
    x, dt, A, B, C = make(T=45)
    off = torch.full_like(dt, -0.01)
    thr = torch.rand(6, dtype=torch.float64) + 0.5
    for offset in (0, 3):
        y, S = ssd_chunk_scan_ref(x, dt, A, B, C, chunk_size=8, dA_offset=off, state_norm_threshold=thr,
                                  chunk_offset=offset)
        y_ref, S_ref = naive_scan(x, dt, A, B, C, dA_offset=off, state_norm_threshold=thr, chunk_size=8,
                                  chunk_offset=offset)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
        torch.testing.assert_close(S, S_ref, rtol=0, atol=1e-10)
    # per-row offsets: each row equals its own single-row run
    offs = torch.tensor([5, 2])
    y, S = ssd_chunk_scan_ref(x, dt, A, B, C, chunk_size=8, state_norm_threshold=thr, chunk_offset=offs)
    for b in range(2):
        y_ref, S_ref = naive_scan(x[b:b + 1], dt[b:b + 1], A, B[b:b + 1], C[b:b + 1], state_norm_threshold=thr,
                                  chunk_size=8, chunk_offset=int(offs[b]))
        torch.testing.assert_close(y[b:b + 1], y_ref, rtol=0, atol=1e-10)
        torch.testing.assert_close(S[b:b + 1], S_ref, rtol=0, atol=1e-10)


def test_ref_block_size_with_state_norm():
    """The computational block (a divisor of chunk_size) changes rounding only; the norm still acts per chunk."""
    x, dt, A, B, C = make(T=45)
    thr = torch.rand(6, dtype=torch.float64) + 0.5
    y_ref, S_ref = naive_scan(x, dt, A, B, C, state_norm_threshold=thr, chunk_size=16, chunk_offset=5)
    for block in (4, 8, 16):
        y, S = ssd_chunk_scan_ref(x, dt, A, B, C, chunk_size=16, block_size=block, state_norm_threshold=thr,
                                  chunk_offset=5)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
        torch.testing.assert_close(S, S_ref, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="block_size=5 must be a positive divisor of chunk_size=16"):
        ssd_chunk_scan_ref(x, dt, A, B, C, chunk_size=16, block_size=5)


def test_ref_gradients_match_naive():
    x, dt, A, B, C = make(T=19, Bsz=1)
    D = torch.randn(6, dtype=torch.float64)
    h0 = torch.randn(1, 6, 5, 7, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, dt, A, B, C, D, h0)]
    w = torch.randn(1, 19, 6, 5, dtype=torch.float64)
    ws = torch.randn(1, 6, 5, 7, dtype=torch.float64)
    y, S = ssd_chunk_scan_ref(*leaves[:5], chunk_size=4, D=leaves[5], initial_states=leaves[6])
    g1 = torch.autograd.grad((y * w).sum() + (S * ws).sum(), leaves)
    y, S = naive_scan(*leaves[:5], D=leaves[5], initial_states=leaves[6])
    g2 = torch.autograd.grad((y * w).sum() + (S * ws).sum(), leaves)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_dispatch_uses_reference_on_cpu(monkeypatch):
    x, dt, A, B, C = make(dtype=torch.float32)
    y1, s1 = ssd_chunk_scan(x, dt, A, B, C, chunk_size=8)
    y2, s2 = ssd_chunk_scan_ref(x, dt, A, B, C, chunk_size=8)
    assert torch.equal(y1, y2) and torch.equal(s1, s2)
    monkeypatch.setenv("ZOO_BACKEND", "cuda")
    with pytest.raises(ValueError, match="ZOO_BACKEND='cuda'"):
        ssd_chunk_scan(x, dt, A, B, C, chunk_size=8)


def test_bad_groups():
    x, dt, A, B, C = make(G=3)
    with pytest.raises(ValueError, match="multiple of ngroups"):
        ssd_chunk_scan_ref(x, dt, A, B.repeat(1, 1, 2, 1)[..., :4, :], C.repeat(1, 1, 2, 1)[..., :4, :], chunk_size=8)


def _sequential_states(xw, B_c, a, s0):
    """Chunk states by one GEMM, then the plain per-chunk loop (autograd through every step): the oracle."""
    S_c = torch.matmul(xw, B_c).view(*a.shape, *s0.shape[2:])
    S, ins = s0, []
    for c in range(S_c.shape[1]):
        ins.append(S)
        S = S_c[:, c] + a[:, c, :, None, None] * S
    return torch.stack(ins, 1), S


@pytest.mark.parametrize("n", [1, 2, 5, 33, 34, 50, 70])
def test_chunk_states_match_sequential(n):
    """The fused chunk-state GEMM + scan (sequential for short scans, blocked with a ragged tail for long ones) and
    its reverse-scan backward equal the step-by-step recurrence and its autograd gradients; a = 0 (a document
    boundary) included; two groups of two heads."""
    from zoo.kernels.ssd.reference import chunk_states

    g = torch.Generator().manual_seed(n)
    Bsz, G, hg, P, Q, N = 2, 2, 2, 3, 4, 5
    xw = torch.randn(Bsz, n, G, hg * P, Q, dtype=torch.float64, generator=g)
    B_c = torch.randn(Bsz, n, G, Q, N, dtype=torch.float64, generator=g)
    a = torch.rand(Bsz, n, G * hg, dtype=torch.float64, generator=g)
    a[0, n // 2, 1] = 0.0
    s0 = torch.randn(Bsz, G * hg, P, N, dtype=torch.float64, generator=g)
    w1 = torch.randn(Bsz, n, G * hg, P, N, dtype=torch.float64, generator=g)
    w2 = torch.randn_like(s0)
    outs = []
    for fn in (chunk_states, _sequential_states):
        leaves = [t.clone().requires_grad_() for t in (xw, B_c, a, s0)]
        prev, final = fn(*leaves)
        grads = torch.autograd.grad((prev * w1).sum() + (final * w2).sum(), leaves)
        outs.append((prev, final, *grads))
    for x, y in zip(*outs):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-11)
