"""Triton SSD chunk scan (forward + backward) against an independent fp64 sequential recurrence.

Runs under ``TRITON_INTERPRET=1`` on the CPU (tests/conftest.py sets it when CUDA is absent); shapes are tiny.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import run_sm90_compile
from zoo.kernels.ssd.triton import SSDChunkScanTritonFn, ssd_chunk_scan_triton

NAMES = ("x", "dt", "A", "B", "C", "D", "z", "initial_states")
# `triton` tests run interpreted on the CPU; where CUDA exists (no interpreter) the same tests run compiled on it
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def recurrence_ref(x, dt, A, B, C, D=None, z=None, initial_states=None, seq_idx=None):
    """Token-by-token fp64 recurrence.

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t ⊗ B_t;  y_t = h_t C_t + D x_t;  y *= silu(z); reset where seq_idx changes.
    """
    Bt, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    Bh = B.repeat_interleave(H // G, dim=2)  # [Bt,T,H,N]
    Ch = C.repeat_interleave(H // G, dim=2)
    h = initial_states.double() if initial_states is not None else x.new_zeros(Bt, H, P, N)
    ys = []
    for t in range(T):
        if seq_idx is not None and t > 0:
            h = h * (seq_idx[:, t] == seq_idx[:, t - 1]).double()[:, None, None, None]
        h = torch.exp(dt[:, t] * A)[:, :, None, None] * h + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None]
        y = torch.einsum("bhpn,bhn->bhp", h, Ch[:, t])
        if D is not None:
            Dd = D.double()
            y = y + (Dd[:, None] if Dd.dim() == 1 else Dd) * x[:, t]
        ys.append(y)
    y = torch.stack(ys, 1)
    if z is not None:
        y = y * F.silu(z.double())
    return y, h


def chunked_ref(x, dt, A, B, C, chunk_size):
    """Plain chunked SSD (ssd_minimal style, fp64, no D/z/seq_idx): a second, structurally different oracle."""
    Bt, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    pad = (-T) % chunk_size
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    Bh = B.repeat_interleave(H // G, dim=2)
    Ch = C.repeat_interleave(H // G, dim=2)
    x, dt, Bh, Ch = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, Bh, Ch))
    nc = x.shape[1] // chunk_size
    sh = lambda t: t.reshape(Bt, nc, chunk_size, *t.shape[2:])  # noqa: E731
    x, dt, Bh, Ch = map(sh, (x, dt, Bh, Ch))
    a = torch.cumsum(dt * A, dim=2)  # [Bt,nc,Q,H]
    seg = a[:, :, :, None, :] - a[:, :, None, :, :]  # [Bt,nc,l,s,H]
    causal = torch.tril(torch.ones(chunk_size, chunk_size, dtype=torch.bool))[None, None, :, :, None]
    L = torch.exp(seg.masked_fill(~causal, float("-inf")))
    y = torch.einsum("bclhn,bcshn,bclsh,bcsh,bcshp->bclhp", Ch, Bh, L, dt, x)
    decay = torch.exp(a[:, :, -1:, :] - a)  # [Bt,nc,Q,H]
    st = torch.einsum("bcshn,bcsh,bcshp->bchpn", Bh, decay * dt, x)
    s = x.new_zeros(Bt, H, P, N)
    for c in range(nc):
        y[:, c] += torch.einsum("bhpn,bqhn,bqh->bqhp", s, Ch[:, c], torch.exp(a[:, c]))
        s = torch.exp(a[:, c, -1])[:, :, None, None] * s + st[:, c]
    return y.reshape(Bt, nc * chunk_size, H, P)[:, :T], s


def make_inputs(Bt, T, H, P, G, N, *, dtype, D=None, z=False, init=False, seq=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = r(Bt, T, H, P).to(dtype)
    dt = F.softplus(r(Bt, T, H) - 1.0).to(dtype)
    A = -(torch.rand(H, generator=g) * 2 + 0.3)
    B = (r(Bt, T, G, N) / N**0.25).to(dtype)
    C = (r(Bt, T, G, N) / N**0.25).to(dtype)
    Dt = {None: None, "h": r(H), "hp": r(H, P)}[D]
    zt = r(Bt, T, H, P).to(dtype) if z else None
    it = r(Bt, H, P, N) if init else None
    seq_idx = None
    if seq:
        # non-decreasing document ids with boundaries inside chunks, on chunk edges and a 1-token document
        seq_idx = torch.zeros(Bt, T, dtype=torch.int32)
        for b in range(Bt):
            cuts = sorted({5 + 7 * b, 32, 33, T // 2 + 3 * b, T - 9})
            for cut in cuts:
                if 0 < cut < T:
                    seq_idx[b, cut:] += 1
    return dict(x=x, dt=dt, A=A, B=B, C=C, D=Dt, z=zt, initial_states=it), seq_idx


def rel_rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def run_both(inputs, seq_idx, chunk_size, block_q=None, grad_y=True, grad_final=True, seed=1):
    """Outputs and gradients of (kernel, fp64 recurrence) for random upstream gradients."""
    names = [k for k in NAMES if inputs[k] is not None]
    inputs = {k: (v.to(DEVICE) if v is not None else None) for k, v in inputs.items()}
    seq_idx = seq_idx.to(DEVICE) if seq_idx is not None else None
    results = []
    for which in ("kernel", "ref"):
        leaves = {k: inputs[k].detach().clone().requires_grad_(True) for k in names}
        args = {k: leaves.get(k) for k in NAMES}
        if which == "kernel":
            if block_q is None:
                y, fs = ssd_chunk_scan_triton(
                    args["x"], args["dt"], args["A"], args["B"], args["C"], chunk_size=chunk_size, D=args["D"],
                    z=args["z"], initial_states=args["initial_states"], seq_idx=seq_idx,
                )
            else:
                y, fs = SSDChunkScanTritonFn.apply(
                    args["x"], args["dt"], args["A"], args["B"], args["C"], chunk_size, args["D"], args["z"],
                    args["initial_states"], seq_idx, block_q,
                )
        else:
            y, fs = recurrence_ref(**args, seq_idx=seq_idx)
        g = torch.Generator().manual_seed(seed)
        gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.device)
        gf = torch.randn(fs.shape, generator=g, dtype=torch.float64).to(y.device)
        loss = 0
        if grad_y:
            loss = loss + (y.double() * gy).sum()
        if grad_final:
            loss = loss + (fs.double() * gf).sum()
        grads = torch.autograd.grad(loss, [leaves[k] for k in names], allow_unused=True)
        grads = [torch.zeros_like(leaves[k]) if gr is None else gr for k, gr in zip(names, grads)]
        results.append(({"y": y, "final_states": fs}, dict(zip(names, grads))))
    return results


def dA_condition(inputs, seq_idx, grad_y=True, grad_final=True, seed=1) -> torch.Tensor:
    """sum_t |d loss / d(dt_t A) * dt_t| per head: the size of the terms that dA = sum_t (...) adds up.

    dA is one number per head summing Bt*T terms that largely cancel (the terms are often 10-300x the sum), so
    its error is judged against this scale, not against |dA| itself."""
    args = {k: (v.detach().double().clone() if v is not None else None) for k, v in inputs.items()}
    dA_tok = (args["dt"] * args["A"]).requires_grad_(True)
    args["dt"] = dA_tok / args["A"]
    y, fs = recurrence_ref(**args, seq_idx=seq_idx)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.device)
    gf = torch.randn(fs.shape, generator=g, dtype=torch.float64).to(y.device)
    loss = (y * gy).sum() * grad_y + (fs * gf).sum() * grad_final
    (gtok,) = torch.autograd.grad(loss, [dA_tok])
    return (gtok * args["dt"]).abs().sum((0, 1))


def check(results, tol_rel: float, tol_max: float | None = None, dA_scale=None, tol_dA: float | None = None):
    (out_k, grad_k), (out_r, grad_r) = results
    report = {}
    for name in out_k:
        report[name] = (out_k[name], out_r[name])
    for name in grad_r:
        report["d" + name] = (grad_k[name], grad_r[name])
    errors = []
    for name, (a, b) in report.items():
        assert a.shape == b.shape, name
        if name == "dA" and dA_scale is not None:
            e = ((a.double() - b).abs() / dA_scale.to(b.device)).max().item()
            if e > tol_dA:
                errors.append(f"dA: max |err| / sum|terms| = {e:.2e} (tolerance {tol_dA:.0e})")
            continue
        r = rel_rmse(a, b)
        m = (a.double() - b).abs().max().item()
        scale = max(1.0, b.abs().max().item())
        if r > tol_rel or (tol_max is not None and m > tol_max * scale):
            errors.append(f"{name}: rel_rmse={r:.2e} max_abs={m:.2e} (ref max {scale:.2e})")
    assert not errors, "; ".join(errors)


CASES = [
    # (Bt, T, H, P, G, N, chunk, block_q, D, z, init, seq)
    pytest.param(2, 64, 2, 16, 1, 16, 16, None, None, False, False, False, id="plain"),
    pytest.param(2, 80, 4, 24, 2, 16, 32, None, "hp", True, True, True, id="all-P24-G2-ragged"),
    pytest.param(1, 50, 4, 16, 4, 32, 16, None, "h", False, True, False, id="Dh-init-G4-ragged"),
    pytest.param(2, 96, 2, 16, 1, 16, 64, 16, "h", True, False, True, id="blocks-in-chunk-seq-z"),
    pytest.param(1, 70, 2, 20, 2, 24, 32, 16, None, False, True, True, id="P20-N24-blocks-seq-init"),
    pytest.param(1, 40, 2, 72, 1, 80, 16, None, "hp", True, True, True, id="P72-N80-state-tiles"),
    pytest.param(2, 20, 2, 16, 2, 16, 32, None, "h", True, True, False, id="T-shorter-than-chunk"),
]


@pytest.mark.triton
@pytest.mark.parametrize("Bt,T,H,P,G,N,chunk,block_q,D,z,init,seq", CASES)
def test_ssd_triton_fp32(Bt, T, H, P, G, N, chunk, block_q, D, z, init, seq):
    inputs, seq_idx = make_inputs(Bt, T, H, P, G, N, dtype=torch.float32, D=D, z=z, init=init, seq=seq)
    res = run_both(inputs, seq_idx, chunk, block_q)
    assert res[0][0]["y"].dtype == torch.float32 and res[0][0]["final_states"].dtype == torch.float32
    check(res, tol_rel=1e-5, tol_max=1e-4, dA_scale=dA_condition(inputs, seq_idx), tol_dA=5e-6)


@pytest.mark.triton
@pytest.mark.parametrize("Bt,T,H,P,G,N,chunk,block_q,D,z,init,seq", [CASES[0], CASES[1], CASES[3]])
def test_ssd_triton_fp16(Bt, T, H, P, G, N, chunk, block_q, D, z, init, seq):
    inputs, seq_idx = make_inputs(Bt, T, H, P, G, N, dtype=torch.float16, D=D, z=z, init=init, seq=seq)
    res = run_both(inputs, seq_idx, chunk, block_q)
    assert res[0][0]["y"].dtype == torch.float16 and res[0][0]["final_states"].dtype == torch.float32
    assert res[0][1]["x"].dtype == torch.float16 and res[0][1]["B"].dtype == torch.float16
    check(res, tol_rel=5e-3, dA_scale=dA_condition(inputs, seq_idx), tol_dA=2e-3)


@pytest.mark.triton
@pytest.mark.parametrize("grad_y,grad_final", [(True, False), (False, True)])
def test_ssd_triton_partial_upstream(grad_y, grad_final):
    """Only y or only final_states receives a gradient (the other arrives as None / zeros)."""
    inputs, seq_idx = make_inputs(1, 48, 2, 16, 1, 16, dtype=torch.float32, D="h", init=True, seq=True, seed=3)
    res = run_both(inputs, seq_idx, 16, grad_y=grad_y, grad_final=grad_final)
    check(res, tol_rel=1e-5, tol_max=1e-4, dA_scale=dA_condition(inputs, seq_idx, grad_y, grad_final), tol_dA=5e-6)


@pytest.mark.triton
def test_oracles_agree():
    """The recurrence oracle equals an independently written chunked oracle (guards the oracle itself)."""
    inputs, _ = make_inputs(2, 45, 4, 8, 2, 8, dtype=torch.float64, seed=5)
    args = {k: inputs[k] for k in ("x", "dt", "A", "B", "C")}
    y1, s1 = recurrence_ref(**args)
    y2, s2 = chunked_ref(**args, chunk_size=16)
    torch.testing.assert_close(y1, y2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s1, s2, rtol=1e-10, atol=1e-10)


@pytest.mark.triton
def test_ssd_triton_bad_input():
    inputs, _ = make_inputs(1, 32, 2, 16, 1, 16, dtype=torch.float32)
    args = [inputs[k] for k in ("x", "dt", "A", "B", "C")]
    with pytest.raises(ValueError, match="chunk_size must be a power of two"):
        ssd_chunk_scan_triton(*args, chunk_size=24)
    with pytest.raises(ValueError, match="D must be"):
        ssd_chunk_scan_triton(*args, chunk_size=16, D=torch.ones(3))
    with pytest.raises(ValueError, match="H % G == 0"):
        ssd_chunk_scan_triton(*args[:3], torch.randn(1, 32, 3, 16), torch.randn(1, 32, 3, 16), chunk_size=16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_ssd_triton_cuda(dtype):
    """On a GPU: bf16 / fp32 (TF32 off for fp32 via input_precision='ieee') against the fp64 recurrence."""
    inputs, seq_idx = make_inputs(2, 300, 4, 64, 2, 64, dtype=dtype, D="h", z=True, init=True, seq=True)
    inputs = {k: (v.cuda() if v is not None else None) for k, v in inputs.items()}
    bf16 = dtype == torch.bfloat16
    check(run_both(inputs, seq_idx.cuda(), 64), tol_rel=2e-2 if bf16 else 1e-5,
          dA_scale=dA_condition(inputs, seq_idx.cuda()), tol_dA=1e-2 if bf16 else 1e-5)


_SM90_COMPILE = r"""
import sys
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import zoo.kernels.ssd.triton as K

P, N, BQ, Q = 64, 128, 32, 256
ints = dict(T="i32", H="i32", G="i32", P="i32", N="i32", NC="i32")
x = "*bf16"
ptrs = dict(x_ptr=x, B_ptr=x, C_ptr=x, z_ptr=x, y_ptr=x, y0_ptr=x, dout_ptr=x, dx_ptr=x, dz_ptr=x, seq_ptr="*i32")
dot = dict(PREC="tf32", DT=tl.bfloat16)
scan = dict(CHUNK=Q, BLOCK_Q=BQ, BLOCK_P=P, BLOCK_N=N, HAS_Z=True, HAS_SEQ=True, **dot)
jobs = [
    (K._chunk_state_fwd, dict(CHUNK=Q, BLOCK_S=BQ, BLOCK_P=64, BLOCK_N=64, HAS_SEQ=True, **dot), 4),
    (K._state_passing_fwd, dict(CHUNK=Q, BLOCK=1024, HAS_INIT=True, HAS_SEQ=True), 4),
    (K._chunk_scan_fwd, dict(scan, HAS_D=True, D_HDIM=True), 8),
    (K._chunk_dstate_bwd, dict(scan, BLOCK_P=64, BLOCK_N=64), 4),
    (K._chunk_scan_bwd_dc, scan, 8),
    (K._state_passing_bwd, dict(CHUNK=Q, BLOCK=1024, HAS_DFINAL=True, HAS_SEQ=True), 4),
    (K._chunk_scan_bwd_dx, dict(scan, HAS_D=True, D_HDIM=True), 8),
]
for fn, consts, warps in jobs:
    sig = {a: "constexpr" if a in consts else ints.get(a) or ptrs.get(a, "*fp32") for a in fn.arg_names}
    k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
    assert k.metadata.shared <= 227 * 1024, (fn.__name__, k.metadata.shared)
    print(fn.__name__, "smem", k.metadata.shared)
"""


@pytest.mark.triton
@pytest.mark.slow
def test_ssd_triton_compiles_for_sm90():
    """Lower every kernel to an sm_90 cubin without a GPU (bundled ptxas): catches MLIR-lowering errors and
    shared-memory overruns that the interpreter cannot see (bf16, P=64, N=128, chunk 256, seq_idx, z, D[H,P])."""
    run_sm90_compile(_SM90_COMPILE)
