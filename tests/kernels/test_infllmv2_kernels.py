"""InfLLM-v2 kernels: the torch references against loop-built oracles, and the Triton kernels (under
TRITON_INTERPRET=1 without a GPU) against the references, forward and backward, for GQA groups of any size."""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import run_sm90_compile
from zoo.kernels.infllmv2 import compress_keys, select_blocks, visible_windows
from zoo.kernels.infllmv2.reference import block_scores_ref, sparse_attention_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_rmse(a, b):
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-12)).item()


def random_idx(B, Hkv, Tq, qpos, block_size, W, seed=0, pad_prob=0.25):
    """Distinct random visible blocks per query (the own block always present), -1 padded."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.full((B, Hkv, Tq, W), -1, dtype=torch.int32)
    for b in range(B):
        for h in range(Hkv):
            for i in range(Tq):
                bq = int(qpos[b, i]) // block_size
                cand = torch.randperm(bq, generator=g)[: W - 1].tolist() + [bq]
                keep = [c for c in cand if c == bq or torch.rand(1, generator=g).item() > pad_prob]
                idx[b, h, i, : len(keep)] = torch.tensor(sorted(keep), dtype=torch.int32)
    return idx


# ---------------------------------------------------------------------------------------------- oracles
def attention_oracle(q, k, v, qpos, idx, block_size, scale):
    """Per query: the explicit key list, then softmax (fp64)."""
    B, H, Tq, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    out = torch.zeros(B, H, Tq, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                blocks = {int(x) for x in idx[b, h // G, i] if x >= 0}
                keys = [t for t in range(k.shape[2]) if t <= qpos[b, i] and t // block_size in blocks]
                if keys:
                    att = torch.softmax(q[b, h, i].double() @ k[b, h // G, keys].double().T * scale, 0)
                    out[b, h, i] = att @ v[b, h // G, keys].double()
    return out


def scores_oracle(q, c1, c2, v1, e1, v2, block_size, stride, num_blocks, scale):
    B, H, Tq, D = q.shape
    Hkv = c1.shape[1]
    G, st = H // Hkv, block_size // stride
    out = torch.full((B, Hkv, Tq, num_blocks), -math.inf, dtype=torch.float64)
    for b in range(B):
        for h in range(Hkv):
            for i in range(Tq):
                S = []
                for j in range(int(e1[b, i])):
                    if j >= v1[b, i]:
                        S.append(0.0)
                        continue
                    tot = 0.0
                    for g in range(G):
                        qg = q[b, h * G + g, i].double()
                        norm_keys = c2[b, h, : v2[b, i]] if c2 is not None else c1[b, h, : v1[b, i]]
                        lse = (torch.logsumexp(norm_keys.double() @ qg * scale, 0).item() if len(norm_keys)
                               else -math.inf)
                        tot += math.exp(float(c1[b, h, j].double() @ qg) * scale - lse) if lse > -math.inf else math.inf
                    S.append(tot)
                for c in range(num_blocks):
                    vals = [S[j] for j in range(max(0, c * st - 1), c * st + st) if j < len(S)]
                    if vals:
                        out[b, h, i, c] = max(vals)
    return out


# ---------------------------------------------------------------------------------------------- references
def test_compress_and_visibility():
    k = torch.randn(1, 1, 11, 3, dtype=torch.float64)
    c = compress_keys(k, 4, 2)
    assert c.shape[2] == 4  # windows 0-3, 2-5, 4-7, 6-9 (8-11 is incomplete)
    torch.testing.assert_close(c[0, 0, 2], k[0, 0, 4:8].mean(0))
    pos = torch.arange(11)
    assert visible_windows(pos, 4, 2).tolist() == [0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def scores_case(G: int, exact: bool, B: int = 1, Hkv: int = 2, Tq: int = 9, D: int = 8):
    """Stage-1 inputs ``(q, c1, c2, v1, e1, v2)`` (fp64, seed 0): 14 C1 and 3 C2 windows, visible counts ``v1``,
    existing counts ``e1 >= v1`` (the reference prefill's existing-but-masked keys); ``c2`` None when ``exact``."""
    torch.manual_seed(0)
    q = torch.randn(B, Hkv * G, Tq, D, dtype=torch.float64)
    c1, c2 = torch.randn(B, Hkv, 14, D, dtype=torch.float64), torch.randn(B, Hkv, 3, D, dtype=torch.float64)
    v1 = torch.randint(0, 15, (B, Tq))
    e1 = torch.maximum(v1, torch.randint(0, 15, (B, Tq)))
    v2 = torch.randint(0, 4, (B, Tq))
    return q, c1, None if exact else c2, v1, e1, v2


@pytest.mark.parametrize("G,exact", [(1, False), (3, False), (2, True)])
def test_block_scores_ref_matches_oracle(G, exact):
    bs, s = 8, 2
    q, c1, c2, v1, e1, v2 = scores_case(G, exact)
    got = block_scores_ref(q, c1, c2, v1, e1, v2, block_size=bs, kernel_stride=s, num_blocks=4, scale=0.3)
    ref = scores_oracle(q, c1, c2, v1, e1, v2, bs, s, 4, 0.3)
    assert torch.equal(got.isinf(), ref.isinf())
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)


def test_select_blocks_forced_budget_ties_and_dense():
    bs = torch.tensor([[[[0.5, 0.2, 0.9, 0.2, 0.2, 7.0, 0.1]]]])  # one query at position 45 (block 5) of 7 blocks
    pos = torch.tensor([[45]])
    idx = select_blocks(bs, pos, block_size=8, init_blocks=1, local_blocks=1, budget=4)
    assert idx.tolist() == [[[[0, 2, 4, 5]]]]  # forced 0, 4, 5; best other: 2; block 6 is in the future
    idx = select_blocks(bs, pos, block_size=8, init_blocks=1, local_blocks=0, budget=4)
    assert idx.tolist() == [[[[0, 1, 2, 5]]]]  # forced 0, 5; then 2 (0.9), then 1 (0.2, tie with 3 and 4: lowest)
    idx = select_blocks(bs, pos, block_size=8, init_blocks=0, local_blocks=0, budget=2, width=6,
                        dense=torch.tensor([[True]]))
    assert idx.tolist() == [[[[0, 1, 2, 3, 4, 5]]]]


@pytest.mark.parametrize("tile", [1, 4, 16])
def test_sparse_attention_ref_matches_oracle(tile):
    torch.manual_seed(1)
    B, Hkv, G, Tq, N, D, bs = 2, 2, 3, 11, 40, 8, 4
    q = torch.randn(B, Hkv * G, Tq, D, dtype=torch.float64)
    k, v = torch.randn(B, Hkv, N, D, dtype=torch.float64), torch.randn(B, Hkv, N, D, dtype=torch.float64)
    qpos = torch.sort(torch.randint(0, N, (B, Tq)), dim=1).values
    idx = random_idx(B, Hkv, Tq, qpos, bs, 4)
    got = sparse_attention_ref(q, k, v, qpos, idx, block_size=bs, scale=0.4, query_tile=tile)
    torch.testing.assert_close(got, attention_oracle(q, k, v, qpos, idx, bs, 0.4), atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------- triton
def _scores_case(G, st, exact, dtype, seed=0):
    torch.manual_seed(seed)
    B, Hkv, Tq, D, s = 2, 2, 21, 24, 2
    bs = st * s
    n1 = 40
    q = torch.randn(B, Hkv * G, Tq, D)
    c1, c2 = torch.randn(B, Hkv, n1, D) * 0.5, torch.randn(B, Hkv, 10, D) * 0.5
    v1 = torch.randint(0, n1 + 1, (B, Tq))
    e1 = torch.maximum(v1, torch.randint(0, n1 + 1, (B, Tq)))
    v2 = torch.randint(0, 11, (B, Tq))
    v2[0, :3] = 0  # no normalising key: visible scores are +inf
    num_blocks = -(-n1 // st) + 1
    args = (q.to(DEVICE, dtype), c1.to(DEVICE, dtype), None if exact else c2.to(DEVICE, dtype), v1.to(DEVICE),
            e1.to(DEVICE), None if exact else v2.to(DEVICE))
    kw = dict(block_size=bs, kernel_stride=s, num_blocks=num_blocks, scale=D**-0.5, score_dtype=dtype)
    return args, kw


@pytest.mark.triton
@pytest.mark.parametrize("G,st,exact", [(1, 4, False), (2, 2, False), (3, 1, False), (16, 4, False), (4, 4, True)])
def test_block_scores_triton_matches_reference(G, st, exact):
    from zoo.kernels.infllmv2.triton import block_scores_triton

    args, kw = _scores_case(G, st, exact, torch.float32)
    got = block_scores_triton(*args, **kw)
    ref = block_scores_ref(*args, **kw)
    assert torch.equal(got.isinf(), ref.isinf()) and torch.equal(got == 0, ref == 0)
    fin = ref.isfinite()
    torch.testing.assert_close(got[fin], ref[fin], rtol=1e-4, atol=1e-5)


@pytest.mark.triton
def test_block_scores_triton_fp16_rounds_like_reference():
    from zoo.kernels.infllmv2.triton import block_scores_triton

    args, kw = _scores_case(2, 4, False, torch.float16, seed=3)
    got, ref = block_scores_triton(*args, **kw), block_scores_ref(*args, **kw)
    fin = ref.isfinite()
    assert torch.equal(got.isinf(), ref.isinf())
    assert rel_rmse(got[fin], ref[fin]) < 5e-3


def _attn_case(G, bs, dtype, seed=0, B=1, Hkv=2, Tq=9, N=70, D=24, W=4):
    torch.manual_seed(seed)
    q = torch.randn(B, Hkv * G, Tq, D)
    k, v = torch.randn(B, Hkv, N, D), torch.randn(B, Hkv, N, D)
    qpos = torch.sort(torch.randint(bs, N, (B, Tq)), dim=1).values
    idx = random_idx(B, Hkv, Tq, qpos, bs, W, seed=seed)
    idx[0, 0, 0] = -1  # a query with nothing selected: zeros, zero gradients
    do = torch.randn(B, Hkv * G, Tq, D)
    return [t.to(DEVICE, dtype) for t in (q, k, v)] + [qpos.to(DEVICE), idx.to(DEVICE), do.to(DEVICE, dtype)]


def _fwd_bwd(fn, q, k, v, qpos, idx, do, **kw):
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    o = fn(q, k, v, qpos, idx, **kw)
    return (o, *torch.autograd.grad(o, (q, k, v), do))


@pytest.mark.triton
@pytest.mark.parametrize("G,bs", [(1, 64), (2, 8), (3, 32), (16, 16)])
def test_sparse_attention_triton_matches_reference_fp32(G, bs):
    from zoo.kernels.infllmv2.triton import sparse_attention_triton

    *inputs, do = _attn_case(G, bs, torch.float32, N=3 * bs + 5)
    got = _fwd_bwd(sparse_attention_triton, *inputs, do, block_size=bs, scale=0.2)
    ref = _fwd_bwd(sparse_attention_ref, *inputs, do, block_size=bs, scale=0.2)
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)
    assert got[0][0, :G, 0].abs().max() == 0  # the empty query


@pytest.mark.triton
def test_sparse_attention_triton_fp16():
    from zoo.kernels.infllmv2.triton import sparse_attention_triton

    *inputs, do = _attn_case(4, 16, torch.float16, seed=2, N=60)
    got = _fwd_bwd(sparse_attention_triton, *inputs, do, block_size=16)
    ref = _fwd_bwd(sparse_attention_ref, *[t.float() if t.is_floating_point() else t for t in inputs], do.float(),
                   block_size=16)
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, ref):
        assert rel_rmse(a, b) < 5e-3, name


@pytest.mark.triton
def test_mixer_on_the_triton_backend_matches_brute_force(monkeypatch):
    """The whole mixer with ZOO_BACKEND=triton (both kernels) against the loop-built reference of the layer test."""
    from tests.layers.test_infllmv2 import CASES, brute_force, make

    monkeypatch.setenv("ZOO_BACKEND", "triton")
    m = make(dtype=torch.float32, **CASES["v2"]).to(DEVICE)
    x = torch.randn(1, 40, 32, device=DEVICE)
    with torch.no_grad():
        y = m(x)[0]
    torch.testing.assert_close(y.cpu().double(), brute_force(m.cpu().double(), x.cpu().double()), atol=1e-4, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_kernels_match_fp32_reference(dtype):
    from zoo.kernels.infllmv2.triton import block_scores_triton, sparse_attention_triton

    *inputs, do = _attn_case(16, 64, dtype, N=400, Tq=64, D=128, W=6)
    got = _fwd_bwd(sparse_attention_triton, *inputs, do, block_size=64)
    ref = _fwd_bwd(sparse_attention_ref, *[t.float() if t.is_floating_point() else t for t in inputs], do.float(),
                   block_size=64)
    for name, a, b in zip(("o", "dq", "dk", "dv"), got, ref):
        assert rel_rmse(a, b) < 2e-2, name
    args, kw = _scores_case(16, 4, False, dtype)
    got, ref = block_scores_triton(*args, **kw), block_scores_ref(*args, **kw)
    assert torch.equal(got.isinf(), ref.isinf())


_SM90_COMPILE = r"""
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import zoo.kernels.infllmv2.triton as K

att = dict(BLOCK_SIZE=64, BLOCK_H=16, BLOCK_N=64, BLOCK_D=128, HEAD_DIM=128, PRECISION="tf32")
jobs = [
    (K._block_scores_kernel, dict(TQ=1, GP=16, NB=16, ST=4, BLOCK_J2=64, BLOCK_D=128, HEAD_DIM=128, HAS_C2=True,
                                  ROUND=True, SCORE_DT=tl.bfloat16, PRECISION="tf32")),
    (K._block_scores_kernel, dict(TQ=8, GP=2, NB=16, ST=4, BLOCK_J2=64, BLOCK_D=64, HEAD_DIM=64, HAS_C2=False,
                                  ROUND=True, SCORE_DT=tl.float16, PRECISION="tf32")),
    (K._attn_fwd_kernel, att), (K._attn_bwd_dq_kernel, att), (K._attn_bwd_dkdv_kernel, att),
]
ints = {"Tq", "Hkv", "G", "n1", "n2", "num_blocks", "N", "W", "n_kblocks"} | {a for a in [
    "s_qb", "s_qh", "s_qt", "s_cb", "s_ch", "s_cj", "s_c2b", "s_c2h", "s_c2j", "s_vb", "s_ob", "s_oh", "s_ot",
    "s_kb", "s_kh", "s_kt", "s_vh", "s_vt", "s_pb", "s_ib", "s_ih", "s_it"]}
ptr = {"QPOS": "*i64", "IDX": "*i32", "V1": "*i32", "E1": "*i32", "V2": "*i32", "TOK": "*i32", "OFF": "*i32",
       "LSE": "*fp32", "DELTA": "*fp32", "Out": "*bf16"}
for fn, consts in jobs:
    sig = {}
    for a in fn.arg_names:
        if a in consts:
            sig[a] = "constexpr"
        elif a in ints:
            sig[a] = "i32"
        elif a in ("qk_scale", "sm_scale"):
            sig[a] = "fp32"
        else:
            sig[a] = ptr.get(a, "*bf16")
    if fn is K._block_scores_kernel:
        sig["Out"] = "*fp32"
    k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    assert k.metadata.shared <= 227 * 1024, (fn.__name__, k.metadata.shared)
    print(fn.__name__, "smem", k.metadata.shared)
"""


@pytest.mark.triton
@pytest.mark.slow
def test_infllmv2_kernels_compile_for_sm90():
    """Lower every kernel to an sm_90 cubin without a GPU (bf16, head dim 128, group 16 and group 2)."""
    run_sm90_compile(_SM90_COMPILE)
