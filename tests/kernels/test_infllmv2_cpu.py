"""InfLLM-v2 CPU prefill schedules (zoo/kernels/infllmv2/cpu.py) against the loop-built oracles and the references:
block-stationary stage 2 (forward without and with gradient, backward), chunked stage 1 and the top-k selection."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from tests.helpers import needs_compiler
from tests.kernels.test_infllmv2_kernels import attention_oracle, random_idx, scores_case, scores_oracle
from zoo.kernels import native
from zoo.kernels.infllmv2 import cpu, cpu_native, select_blocks
from zoo.kernels.infllmv2.cpu import block_scores_cpu, select_blocks_cpu, select_cpu, sparse_attention_cpu
from zoo.kernels.infllmv2.reference import block_scores_ref, sparse_attention_ref

# small chunks / segments / batches so that every code path (several segments and batches, masked and plain
# chunks, padding slots, threads) runs at test sizes
SMALL = dict(chunk=2, seg_pairs=24, batch_rows=16)


def _case(G, *, B=2, Hkv=2, Tq=13, N=43, D=8, bs=4, W=5, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    q = torch.randn(B, Hkv * G, Tq, D, dtype=dtype)
    k, v = torch.randn(B, Hkv, N, D, dtype=dtype), torch.randn(B, Hkv, N, D, dtype=dtype)
    qpos = torch.sort(torch.randint(0, N, (B, Tq)), dim=1).values
    idx = random_idx(B, Hkv, Tq, qpos, bs, W, seed=seed)
    return q, k, v, qpos, idx


@pytest.mark.parametrize("G", [1, 3, 8, 16])
@pytest.mark.parametrize("threads", [1, 2])
def test_sparse_attention_cpu_matches_oracle(G, threads):
    q, k, v, qpos, idx = _case(G, D=4 if G == 16 else 8)
    # queries with no visible key: no block at all, and only a block after the query
    idx[0, 0, 1] = -1
    idx[1, 1, 0] = -1
    idx[1, 1, 0, 0] = int(qpos[1, 0]) // 4 + 1
    want = attention_oracle(q, k, v, qpos, idx, 4, 0.4)
    with torch.no_grad():
        got = sparse_attention_cpu(q, k, v, qpos, idx, block_size=4, scale=0.4, threads=threads, **SMALL)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    assert got[0, :G, 1].abs().max() == 0 and got[1, G:, 0].abs().max() == 0
    got = sparse_attention_cpu(q, k, v, qpos, idx, block_size=4, scale=0.4)  # default sizes: one segment
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("G", [8, 16])
def test_sparse_attention_cpu_backward_matches_reference(G):
    q, k, v, qpos, idx = _case(G, D=4, Tq=9, N=30)
    idx[0, 1, 2] = -1  # a query with no key: zero output, zero gradient
    do = torch.randn_like(q)
    grads = []
    for fn in (lambda *a: sparse_attention_cpu(*a, block_size=4, scale=0.4, **SMALL),
               lambda *a: sparse_attention_ref(*a, block_size=4, scale=0.4, query_tile=1)):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = fn(*leaves, qpos, idx)
        grads.append((out, *torch.autograd.grad(out, leaves, do)))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    with torch.no_grad():  # the online (no-gradient) path gives the merged path's forward
        torch.testing.assert_close(sparse_attention_cpu(q, k, v, qpos, idx, block_size=4, scale=0.4, **SMALL),
                                   grads[0][0], atol=1e-10, rtol=0)


def test_sparse_attention_cpu_fp32_half_and_partial_last_block():
    q, k, v, qpos, idx = _case(4, dtype=torch.float32, N=42, seed=3)  # N % bs != 0
    qpos[:, -1] = 41
    idx = random_idx(2, 2, 13, qpos, 4, 5, seed=3)
    want = attention_oracle(q, k, v, qpos, idx, 4, 0.4)
    with torch.no_grad():
        got = sparse_attention_cpu(q, k, v, qpos, idx, block_size=4, scale=0.4, **SMALL)
        half = sparse_attention_cpu(q.half(), k.half(), v.half(), qpos, idx, block_size=4, scale=0.4, **SMALL)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.double(), want, atol=2e-2, rtol=0)


def test_large_scores_stay_exact():
    """Scores spread far beyond exp's range (the FLOOR clamp): still the softmax of the visible keys."""
    q, k, v, qpos, idx = _case(2, seed=5)
    q = q * 40
    want = attention_oracle(q, k, v, qpos, idx, 4, 0.4)
    with torch.no_grad():
        got = sparse_attention_cpu(q.float(), k.float(), v.float(), qpos, idx, block_size=4, scale=0.4, **SMALL)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)


def test_first_block_off_diagonal_with_scores_far_below_floor():
    """A query whose own block is not selected meets its first keys in an unmasked batch (no running max yet), with
    every score far below e^FLOOR: the softmax over them is still exact, not uniform."""
    q, k, v, qpos, idx = _case(2, Tq=10, N=40, seed=6)
    k[..., 0], q[..., 0] = 1.0, -500.0  # scores 0.4 * (-500 + noise): about -200
    qpos = torch.arange(20, 30).expand(2, 10)
    idx = torch.full_like(idx, -1)
    idx[..., :3] = torch.tensor([0, 2, 3], dtype=idx.dtype)  # earlier blocks only, fully visible
    want = attention_oracle(q, k, v, qpos, idx, 4, 0.4)
    uniform = v[:, :, [0, 1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 15]].mean(2, keepdim=True).repeat_interleave(2, 1)
    assert (want - uniform).abs().amax(-1).min() > 1e-2  # the case is sharp enough: no query's softmax is uniform
    with torch.no_grad():
        for kw in (SMALL, {}):
            got = sparse_attention_cpu(q, k, v, qpos, idx, block_size=4, scale=0.4, **kw)
            torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("G,exact", [(1, False), (3, False), (16, False), (2, True)])
def test_block_scores_cpu_matches_oracle(G, exact):
    bs, s = 8, 2
    args = q, c1, c2, v1, e1, v2 = scores_case(G, exact, B=2)
    v2[0, :2] = 0  # no normalising key: visible scores are +inf
    kw = dict(block_size=bs, kernel_stride=s, num_blocks=5, scale=0.3)
    got = block_scores_cpu(*args, **kw)
    ref = scores_oracle(q, c1, c2, v1, e1, v2, bs, s, 5, 0.3)
    assert torch.equal(got.isinf(), ref.isinf())
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-6)
    # the reference rounds the same way to a half score dtype
    a32 = tuple(t.float() if t is not None and t.is_floating_point() else t for t in args)
    torch.testing.assert_close(block_scores_cpu(*a32, **kw, score_dtype=torch.bfloat16),
                               block_scores_ref(*a32, **kw, score_dtype=torch.bfloat16), rtol=1e-2, atol=0)


def test_select_blocks_cpu_equals_reference():
    g = torch.Generator().manual_seed(0)
    B, Hkv, Tq, nB = 2, 2, 40, 12
    bs = torch.randint(0, 4, (B, Hkv, Tq, nB), generator=g).float()  # many ties
    bs[0, 0, :5] = -math.inf
    bs[1, 1, 3:9] = math.inf
    bs[0, 1, 7, 2] = -0.0
    qpos = torch.sort(torch.randint(0, nB * 8, (B, Tq), generator=g), dim=1).values
    dense = torch.rand(B, Tq, generator=g) < 0.2
    for kw in (dict(init_blocks=1, local_blocks=1, budget=4), dict(init_blocks=0, local_blocks=0, budget=3),
               dict(init_blocks=2, local_blocks=2, budget=6, width=9), dict(init_blocks=1, local_blocks=0, budget=15),
               dict(init_blocks=1, local_blocks=1, budget=3, width=nB, dense=dense)):
        want = select_blocks(bs, qpos, block_size=8, **kw)
        assert torch.equal(select_blocks_cpu(bs, qpos, block_size=8, **kw), want), kw


@pytest.mark.parametrize("exact", [False, True])
def test_select_cpu_equals_reference_stage_1(exact):
    torch.manual_seed(2)
    B, Hkv, G, T, D, ks, s, bsz = 2, 2, 4, 90, 8, 4, 2, 8
    qs = torch.randn(B, Hkv * G, T, D, dtype=torch.float64)
    c1, c2 = torch.randn(B, Hkv, 44, D, dtype=torch.float64), torch.randn(B, Hkv, 10, D, dtype=torch.float64)
    qpos = torch.arange(T).expand(B, T)
    v1 = torch.clamp(torch.div(qpos + 1 - ks, s, rounding_mode="floor") + 1, min=0)
    v2 = None if exact else torch.clamp(torch.div(qpos + 1 - 4 * ks, 4 * s, rounding_mode="floor") + 1, min=0)
    c2 = None if exact else c2
    nB = -(-T // bsz)
    sel = dict(init_blocks=1, local_blocks=1, budget=4)
    scores = block_scores_ref(qs, c1, c2, v1, v1, v2, block_size=bsz, kernel_stride=s, num_blocks=nB, scale=0.3)
    want = select_blocks(scores, qpos, block_size=bsz, width=5, **sel)
    for rows, threads in ((1 << 18, 1), (64, 2)):  # one chunk; many small chunks on two threads
        got = select_cpu(qs, qpos, c1, c2, v1, v1, v2, block_size=bsz, kernel_stride=s, num_blocks=nB, scale=0.3,
                         width=5, rows=rows, threads=threads, **sel)
        assert torch.equal(got, want)


def test_block_scores_cpu_with_far_apart_scores():
    """Terms below e^FLOOR count as 0 (no slow exp path): the scores still match the reference to 1e-20."""
    torch.manual_seed(4)
    B, Hkv, G, Tq, D = 1, 1, 4, 6, 8
    q = torch.randn(B, Hkv * G, Tq, D, dtype=torch.float64) * 30
    c1 = torch.randn(B, Hkv, 16, D, dtype=torch.float64)
    v1 = e1 = torch.full((B, Tq), 16)
    kw = dict(block_size=2, kernel_stride=2, num_blocks=16, scale=1.0)  # exact variant (normalised over C1)
    got = block_scores_cpu(q, c1, None, v1, e1, None, **kw)
    want = block_scores_ref(q, c1, None, v1, e1, None, **kw)
    assert want.min() < 1e-30  # the case is extreme enough
    torch.testing.assert_close(got, want, atol=1e-20, rtol=1e-9)


# --- the fused C++ kernel (cpu.cpp through zoo.kernels.native) ---------------------------------------------



@needs_compiler
@pytest.mark.parametrize("G,D,bs", [(16, 64, 64), (5, 32, 16), (1, 16, 32), (4, 128, 16), (3, 16, 48)])
@pytest.mark.parametrize("threads", [1, 2])
def test_native_sparse_attention_matches_oracle(G, D, bs, threads, monkeypatch):
    """Every head-tile remainder (G mod 4), vector-multiple D and block sizes, a partial last block, queries without
    a visible key, several kernel calls (a range of 3 rows each) on 1 and 2 threads."""
    monkeypatch.setattr(cpu_native, "NATIVE_RANGE_BYTES", 3 * 4 * G * D)
    q, k, v, qpos, idx = _case(G, D=D, bs=bs, N=5 * bs - 3, Tq=11, W=3, dtype=torch.float32, seed=G + D)
    qpos[:, -1] = 5 * bs - 4  # the last key: its block is partial
    idx = random_idx(2, 2, 11, qpos, bs, 3, seed=G)
    idx[0, 0, 1] = -1  # no block at all
    idx[1, 1, 0] = -1
    idx[1, 1, 0, 0] = int(qpos[1, 0]) // bs + 1  # only a block after the query
    want = attention_oracle(q, k, v, qpos, idx, bs, 0.3)
    with torch.no_grad():
        got = sparse_attention_cpu(q, k, v, qpos, idx, block_size=bs, scale=0.3, threads=threads, native=True)
        torch_schedule = sparse_attention_cpu(q, k, v, qpos, idx, block_size=bs, scale=0.3, native=False)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)  # fp32: sums over up to 3 blocks of keys
    torch.testing.assert_close(got, torch_schedule, atol=1e-5, rtol=0)
    assert got[0, :G, 1].abs().max() == 0 and got[1, G:, 0].abs().max() == 0


@needs_compiler
def test_native_sparse_attention_far_apart_scores_and_half_inputs():
    """Scores spread far beyond exp's range (maxima rising across blocks: rescaled accumulators, terms flushed to 0),
    a first block met with every score near -200, and fp16 inputs (fp32 math, fp16 out)."""
    q, k, v, qpos, idx = _case(4, D=16, bs=16, N=64, Tq=12, W=4, dtype=torch.float32, seed=11)
    idx = random_idx(2, 2, 12, qpos, 16, 4, seed=11)
    for scale_q in (40.0, -500.0):
        qq = q * scale_q if scale_q > 0 else q.clone().index_fill_(-1, torch.tensor([0]), scale_q)
        kk = k if scale_q > 0 else k.clone().index_fill_(-1, torch.tensor([0]), 1.0)
        want = attention_oracle(qq, kk, v, qpos, idx, 16, 0.4)
        with torch.no_grad():
            got = sparse_attention_cpu(qq, kk, v, qpos, idx, block_size=16, scale=0.4, native=True)
            torch_schedule = sparse_attention_cpu(qq, kk, v, qpos, idx, block_size=16, scale=0.4, native=False)
        # scores of magnitude ~200 carry fp32 rounding of ~1e-5 into exp: both fp32 paths sit ~4e-5 off the fp64
        # oracle, and within a few ulp of each other
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=0)
        torch.testing.assert_close(got, torch_schedule, atol=2e-6, rtol=0)
    want = attention_oracle(q.half(), k.half(), v.half(), qpos, idx, 16, 0.4)
    with torch.no_grad():
        half = sparse_attention_cpu(q.half(), k.half(), v.half(), qpos, idx, block_size=16, scale=0.4, native=True)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.double(), want, atol=2e-3, rtol=0)


@needs_compiler
def test_native_kernel_is_used_only_where_it_applies(monkeypatch):
    """Default (ZOO_NATIVE unset): fp32 without gradient takes the kernel; fp64, gradient, a head dim that is not a
    multiple of 16, ``native=False`` and ``ZOO_NATIVE=off`` take the torch schedule."""
    calls = []
    real = cpu.attend_native
    monkeypatch.setattr(cpu, "attend_native", lambda *a: calls.append(1) or real(*a))
    q, k, v, qpos, idx = _case(2, D=16, bs=16, N=40, Tq=6, W=2, dtype=torch.float32)
    idx = random_idx(2, 2, 6, qpos, 16, 2)
    run = functools.partial(sparse_attention_cpu, block_size=16, scale=0.4)
    with torch.no_grad():
        run(q, k, v, qpos, idx)
        assert len(calls) == 1
        run(q.double(), k.double(), v.double(), qpos, idx)
        run(q, k, v, qpos, idx, native=False)
        run(q[..., :8], k[..., :8], v[..., :8], qpos, idx)
        monkeypatch.setenv("ZOO_NATIVE", "off")
        run(q, k, v, qpos, idx)
    monkeypatch.delenv("ZOO_NATIVE")
    run(q.requires_grad_(True), k, v, qpos, idx)
    assert len(calls) == 1


def test_native_unavailable_falls_back_to_the_torch_schedule(monkeypatch, tmp_path):
    """No compiler: one RuntimeWarning, then the torch schedule's result; ``native=True`` raises instead."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(native, "_LOADED", {})
    q, k, v, qpos, idx = _case(2, D=16, bs=16, N=40, Tq=6, W=2, dtype=torch.float32)
    idx = random_idx(2, 2, 6, qpos, 16, 2)
    with torch.no_grad():
        with pytest.warns(RuntimeWarning, match="cpu.cpp unavailable, using the torch path"):
            got = sparse_attention_cpu(q, k, v, qpos, idx, block_size=16, scale=0.4)
        torch.testing.assert_close(got, sparse_attention_cpu(q, k, v, qpos, idx, block_size=16, scale=0.4,
                                                             native=False), atol=0, rtol=0)
        with pytest.raises(RuntimeError, match="cpu.cpp cannot be built"):
            sparse_attention_cpu(q, k, v, qpos, idx, block_size=16, scale=0.4, native=True)


@needs_compiler
@pytest.mark.parametrize("G,exact", [(1, False), (5, False), (16, False), (4, True)])
def test_native_block_scores_match_oracle(G, exact):
    """Stage 1 in cpu.cpp: every head-tile remainder, both normalisers, queries without a normalising key (+inf),
    existing-but-masked entries (0), no visible entry at all (-inf), and a half score dtype (rounded as the
    reference rounds)."""
    bs, s = 16, 2
    q, c1, c2, v1, e1, v2 = scores_case(G, exact, B=2, D=16)
    v2[0, :2] = 0
    v1[1, 0], e1[1, 0] = 0, 0
    args = tuple(t.float() if t is not None and t.is_floating_point() else t for t in (q, c1, c2, v1, e1, v2))
    kw = dict(block_size=bs, kernel_stride=s, num_blocks=3, scale=0.3)
    got = cpu_native.block_scores_native(*args, **kw)
    ref = scores_oracle(*args, bs, s, 3, 0.3)
    assert torch.equal(got.isinf(), ref.isinf()) and torch.equal(got == math.inf, ref == math.inf)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cpu_native.block_scores_native(*args, **kw, score_dtype=torch.bfloat16),
                               block_scores_ref(*args, **kw, score_dtype=torch.bfloat16), rtol=1e-2, atol=0)


def _exact_scores_case(T=150, G=1, seed=0):
    """Integer q and compressed keys, scale 1: every logit is an exact small integer, so the block scores order
    the same in every fp32 path (distinct logits differ by e), and equal logits tie exactly (lower block first)."""
    g = torch.Generator().manual_seed(seed)
    ks, s, bsz, D = 8, 4, 16, 16
    qs = torch.randint(-1, 2, (2, 2 * G, T, D), generator=g).float()
    n1, n2 = (T - ks) // s + 1, (T - 4 * ks) // (4 * s) + 1
    c1 = torch.randint(-1, 2, (2, 2, n1, D), generator=g).float()
    c1[:, :, 10:14] = c1[:, :, 2:3]  # equal keys: tied scores
    c2 = torch.randint(-1, 2, (2, 2, n2, D), generator=g).float()
    qpos = torch.arange(T).expand(2, T)
    v1 = torch.clamp(torch.div(qpos + 1 - ks, s, rounding_mode="floor") + 1, min=0)
    v2 = torch.clamp(torch.div(qpos + 1 - 4 * ks, 4 * s, rounding_mode="floor") + 1, min=0)  # 0 early: +inf scores
    v2[:, 100:110] = 0  # +inf scores where they compete with the forced blocks for the budget
    return qs, qpos, c1, c2, v1, v2, dict(block_size=bsz, kernel_stride=s, num_blocks=-(-T // bsz), scale=1.0)


@needs_compiler
@pytest.mark.parametrize("budget,width,dense", [(3, 3, False), (3, 6, True), (12, 12, False)])
def test_native_selection_equals_reference_on_exact_scores(budget, width, dense):
    """The top-k in cpu.cpp against select_blocks on the fp64 reference scores: forced initial and local blocks,
    ties, +inf scores (no normalising key yet) ranking after the forced blocks, -inf (nothing visible), dense rows
    taking every visible block (width > budget), and several chunks on two threads."""
    qs, qpos, c1, c2, v1, v2, kw = _exact_scores_case()
    sel = dict(init_blocks=1, local_blocks=1, budget=budget, width=width)
    rows = torch.zeros(2, qs.shape[2], dtype=torch.bool)
    rows[:, 40::7] = dense
    scores = block_scores_ref(qs.double(), c1.double(), c2.double(), v1, v1, v2, **kw)
    want = select_blocks(scores, qpos, block_size=kw["block_size"], **sel, dense=rows if dense else None)
    for threads in (1, 2):
        got = select_cpu(qs, qpos, c1, c2, v1, v1, v2, **kw, **sel, dense=rows if dense else None, threads=threads)
        assert torch.equal(got, want)
    # and the same through the half-score-dtype route (pooled scores from the kernel, rounded, selected in torch)
    scores = block_scores_ref(qs.double(), c1.double(), c2.double(), v1, v1, v2, **kw, score_dtype=torch.bfloat16)
    want = select_blocks(scores, qpos, block_size=kw["block_size"], **sel, dense=rows if dense else None)
    got = select_cpu(qs, qpos, c1, c2, v1, v1, v2, **kw, **sel, dense=rows if dense else None,
                     score_dtype=torch.bfloat16)
    assert torch.equal(got, want)
