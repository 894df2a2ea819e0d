"""Block-sparse attention: Triton kernel (under TRITON_INTERPRET=1 without a GPU) == torch reference, forward and
backward, and the reference == independent oracles (plain causal SDPA, a loop-built mask, hand-written layouts)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import zoo.kernels.block_sparse_attention.triton as bsa
from tests.helpers import run_sm90_compile
from zoo.kernels.block_sparse_attention import block_sparse_attention, block_sparse_attention_ref
from zoo.kernels.block_sparse_attention.triton import block_sparse_attention_triton
from zoo.layers.masks import BlockDiagonalRule, LocalStrideRule, SlidingWindowRule, layout_to_token_mask, rule_layout


# Layouts come from the mixers' rules (zoo.layers.masks); these name the shapes the cases below use.
def sliding_window_layout(T, bs, window, sinks=0):
    nb = -(-T // bs)
    return rule_layout(SlidingWindowRule(window, sinks), nb, nb, bs)


def local_stride_layout(T, bs, local_blocks, stride, num_kv_heads, *, num_heads=None, homo_head=False):
    nb = -(-T // bs)
    rule = LocalStrideRule(bs, local_blocks, stride, num_heads or num_kv_heads, num_kv_heads, homo_head=homo_head)
    return rule_layout(rule, nb, nb, bs)


def block_diagonal_layout(T, bs):
    nb = -(-T // bs)
    return rule_layout(BlockDiagonalRule(bs), nb, nb, bs)


def _inputs(B, H, Hkv, T, D, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(B, Hkv, T, D, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(B, Hkv, T, D, generator=g).to(device=device, dtype=dtype)
    do = torch.randn(B, H, T, D, generator=g).to(device=device, dtype=dtype)
    return q, k, v, do


def _fwd_bwd(fn, q, k, v, do, **kw):
    q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
    o = fn(q, k, v, **kw)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    return o, dq, dk, dv


def _rel_rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-12)).item()


# (name, B, H, Hkv, T, D, block_size, layout builder, window, num_sink_tokens)
CASES = {
    "causal_all_ones": (1, 2, 2, 100, 48, 16, lambda T, bs: torch.ones(1, -(-T // bs), -(-T // bs), dtype=torch.bool),
                        None, 0),
    "window_gqa": (1, 4, 2, 100, 48, 16, lambda T, bs: sliding_window_layout(T, bs, 40), 40, 0),
    "window_sinks_mqa": (1, 2, 1, 200, 80, 32, lambda T, bs: sliding_window_layout(T, bs, 50, 5), 50, 5),
    "local_stride_gqa_per_head": (1, 4, 2, 150, 48, 16,
                                  lambda T, bs: local_stride_layout(T, bs, 2, 3, 2, num_heads=4), None, 0),
    "block_diagonal": (1, 2, 2, 100, 80, 32, lambda T, bs: block_diagonal_layout(T, bs), None, 0),
    "bs128_window_sinks": (1, 2, 1, 200, 64, 128, lambda T, bs: sliding_window_layout(T, bs, 90, 3), 90, 3),
    "bs64_local_stride_homo": (1, 2, 2, 230, 48, 64,
                               lambda T, bs: local_stride_layout(T, bs, 1, 2, 2, homo_head=True), None, 0),
}
FP16_CASES = ["causal_all_ones", "window_gqa", "window_sinks_mqa", "local_stride_gqa_per_head", "block_diagonal"]


def _run_case(name, dtype):
    B, H, Hkv, T, D, bs, build, window, sinks = CASES[name]
    layout = build(T, bs)
    q, k, v, do = _inputs(B, H, Hkv, T, D, dtype)
    kw = dict(block_mask=layout, block_size=bs, window=window, num_sink_tokens=sinks)
    got = _fwd_bwd(block_sparse_attention_triton, q, k, v, do, **kw)
    # fp32 reference from the same (rounded) inputs
    want = _fwd_bwd(block_sparse_attention_ref, q.float(), k.float(), v.float(), do.float(), **kw)
    return got, want


@pytest.mark.triton
@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_reference_fp32(name):
    got, want = _run_case(name, torch.float32)
    for label, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape
        err = (a - b).abs().max().item()
        assert err < 1e-4, f"{name} {label}: max abs err {err:.3e}"


@pytest.mark.triton
@pytest.mark.parametrize("name", FP16_CASES)
def test_triton_matches_reference_fp16(name):
    got, want = _run_case(name, torch.float16)
    for label, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        assert a.dtype == torch.float16 and torch.isfinite(a).all()
        rel = _rel_rmse(a, b)
        assert rel < 5e-3, f"{name} {label}: rmse/rms {rel:.3e}"


@pytest.mark.triton
def test_triton_strided_inputs_and_custom_scale():
    """q, k, v as [B, T, H, D] views transposed to [B, H, T, D] (what a mixer produces), explicit scale."""
    B, H, Hkv, T, D, bs = 2, 4, 2, 70, 32, 16
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, T, H, D, generator=g).transpose(1, 2)
    k = torch.randn(B, T, Hkv, D, generator=g).transpose(1, 2)
    v = torch.randn(B, T, Hkv, D, generator=g).transpose(1, 2)
    do = torch.randn(B, T, H, D, generator=g).transpose(1, 2)
    assert not q.is_contiguous()
    layout = local_stride_layout(T, bs, 2, 2, Hkv, num_heads=H)
    kw = dict(block_mask=layout, block_size=bs, window=30, num_sink_tokens=2, scale=0.3)
    got = _fwd_bwd(block_sparse_attention_triton, q, k, v, do, **kw)
    want = _fwd_bwd(block_sparse_attention_ref, q, k, v, do, **kw)
    for label, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        err = (a - b).abs().max().item()
        assert err < 1e-4, f"{label}: max abs err {err:.3e}"


@pytest.mark.triton
def test_triton_empty_rows_are_zero():
    """Rows with no visible key (inactive diagonal, or a window that excludes an active block's keys): zeros, no NaN,
    zero gradient; other rows still exact."""
    B, H, Hkv, T, D, bs = 1, 4, 2, 64, 16, 16
    layout = torch.zeros(Hkv, 4, 4, dtype=torch.bool)
    layout[0, 3, 0] = True  # kv head 0: query block 3 sees key block 0 only -> with window 40, rows >= 55 see nothing
    layout[0, 1, 1] = True
    layout[1, 2, 1] = True
    layout[1, 2, 2] = True
    q, k, v, do = _inputs(B, H, Hkv, T, D, torch.float32, seed=5)
    kw = dict(block_mask=layout, block_size=bs, window=40, num_sink_tokens=0)
    o, dq, dk, dv = _fwd_bwd(block_sparse_attention_triton, q, k, v, do, **kw)
    want = _fwd_bwd(block_sparse_attention_ref, q, k, v, do, **kw)
    for a in (o, dq, dk, dv):
        assert torch.isfinite(a).all()
    dense = layout_to_token_mask(layout, bs, T, window=40, num_heads=H)  # [H, T, T]
    empty = ~dense.any(-1)  # [H, T]
    assert empty[0, 55:].all() and not empty[0, 48:55].any() and empty[0, :16].all()
    assert (o[0][empty] == 0).all() and (dq[0][empty] == 0).all()
    assert o[0][~empty].abs().sum() > 0
    for label, a, b in zip(("o", "dq", "dk", "dv"), (o, dq, dk, dv), want):
        err = (a - b).abs().max().item()
        assert err < 1e-4, f"{label}: max abs err {err:.3e}"


def test_layout_tables_and_cache():
    """CSR rows list the active key blocks (causal, window-reachable) ascending; CSC is the transpose; the cache
    returns the same tables for the same unchanged tensor and rebuilds them after an in-place edit."""
    T, bs = 80, 16  # 5 blocks
    layout = local_stride_layout(T, bs, 2, 3, 2, num_heads=2)
    layout[0, 4, 4] = False
    tables = bsa._get_layout(layout, bs, T, None, 0, torch.device("cpu"))
    for h in range(2):
        for qb in range(5):
            n = int(tables.row_cnt[h, qb])
            assert tables.row_idx[h, qb, :n].tolist() == layout[h, qb].nonzero().flatten().tolist()
        for kb in range(5):
            n = int(tables.col_cnt[h, kb])
            assert tables.col_idx[h, kb, :n].tolist() == layout[h, :, kb].nonzero().flatten().tolist()
    windowed = bsa._get_layout(layout, bs, T, 20, 0, torch.device("cpu"))  # window 20: distance-2 blocks unreachable
    assert windowed.row_idx[0, 3, : int(windowed.row_cnt[0, 3])].tolist() == [2, 3]  # block 0 (vertical) dropped
    assert bsa._get_layout(layout, bs, T, None, 0, torch.device("cpu")) is tables
    layout[1, 4, 2] = False
    rebuilt = bsa._get_layout(layout, bs, T, None, 0, torch.device("cpu"))
    assert rebuilt is not tables and int(rebuilt.row_cnt[1, 4]) == int(tables.row_cnt[1, 4]) - 1 == 2


# ----------------------------------------------------------------------------------------------------------------
# Reference vs independent oracles
# ----------------------------------------------------------------------------------------------------------------


def test_reference_all_ones_is_plain_causal_sdpa():
    B, H, Hkv, T, D, bs = 2, 4, 2, 77, 24, 16
    q, k, v, do = _inputs(B, H, Hkv, T, D, torch.float64, seed=1)
    nb = -(-T // bs)
    o = block_sparse_attention_ref(q, k, v, block_mask=torch.ones(1, nb, nb, dtype=torch.bool), block_size=bs)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    assert o.dtype == torch.float64
    assert (o - want).abs().max().item() < 1e-5


def test_reference_matches_loop_built_mask():
    """Per-element mask built with Python loops from the token rule, explicit softmax in float64."""
    B, H, Hkv, T, D, bs, window, sinks = 1, 4, 2, 37, 8, 8, 11, 3
    layout = local_stride_layout(T, bs, 2, 2, Hkv, num_heads=H)
    layout[1, 4, 0] = False  # make the layout irregular
    q, k, v, _ = _inputs(B, H, Hkv, T, D, torch.float64, seed=2)
    mask = torch.zeros(H, T, T, dtype=torch.bool)
    for h in range(H):
        for i in range(T):
            for j in range(T):
                mask[h, i, j] = bool(layout[h // 2, i // bs, j // bs]) and j <= i and (i - j < window or j < sinks)
    assert torch.equal(layout_to_token_mask(layout, bs, T, window, sinks, num_heads=H), mask)
    scale = 1 / math.sqrt(D)
    s = torch.einsum("bhid,bhjd->bhij", q, k.repeat_interleave(2, 1)) * scale
    p = torch.softmax(s.masked_fill(~mask[None], float("-inf")), dim=-1)
    want = torch.einsum("bhij,bhjd->bhid", p, v.repeat_interleave(2, 1))
    got = block_sparse_attention_ref(q, k, v, block_mask=layout, block_size=bs, window=window, num_sink_tokens=sinks)
    assert (got - want).abs().max().item() < 1e-10


# ----------------------------------------------------------------------------------------------------------------
# Dispatch and errors
# ----------------------------------------------------------------------------------------------------------------


def _tiny():
    q, k, v, _ = _inputs(1, 2, 1, 40, 16, torch.float32, seed=4)
    return q, k, v, dict(block_mask=sliding_window_layout(40, 16, 20), block_size=16, window=20)


def test_dispatch_cpu_default_uses_reference(monkeypatch):
    monkeypatch.delenv("ZOO_BACKEND", raising=False)
    called = []
    monkeypatch.setattr(bsa, "block_sparse_attention_triton", lambda *a, **kw: called.append(1))
    q, k, v, kw = _tiny()
    torch.testing.assert_close(block_sparse_attention(q, k, v, **kw), block_sparse_attention_ref(q, k, v, **kw))
    assert not called


@pytest.mark.triton
def test_dispatch_env_override(monkeypatch):
    q, k, v, kw = _tiny()
    calls = []
    real = bsa.block_sparse_attention_triton
    monkeypatch.setattr(bsa, "block_sparse_attention_triton", lambda *a, **k_: calls.append(1) or real(*a, **k_))
    monkeypatch.setenv("ZOO_BACKEND", "triton")
    o_tri = block_sparse_attention(q, k, v, **kw)
    assert calls == [1]
    monkeypatch.setenv("ZOO_BACKEND", "torch")
    o_ref = block_sparse_attention(q, k, v, **kw)
    assert calls == [1]
    assert (o_tri - o_ref).abs().max().item() < 1e-5
    monkeypatch.setenv("ZOO_BACKEND", "cuda")
    with pytest.raises(ValueError, match="ZOO_BACKEND"):
        block_sparse_attention(q, k, v, **kw)


def test_bad_inputs_raise_clear_errors():
    q, k, v, kw = _tiny()
    with pytest.raises(ValueError, match=r"block_mask must be \[1 or Hkv=1, 3, 3\]"):
        block_sparse_attention_ref(q, k, v, **{**kw, "block_mask": torch.ones(1, 4, 4, dtype=torch.bool)})
    with pytest.raises(ValueError, match="multiple of num kv heads"):
        block_sparse_attention_ref(q[:, :1].expand(1, 3, 40, 16), k.expand(1, 2, 40, 16), v.expand(1, 2, 40, 16),
                                   **kw)
    with pytest.raises(ValueError, match="window must be None or >= 1"):
        block_sparse_attention_ref(q, k, v, **{**kw, "window": 0})
    with pytest.raises(ValueError, match="num_sink_tokens must be >= 0"):
        block_sparse_attention_ref(q, k, v, **{**kw, "num_sink_tokens": -1})
    with pytest.raises(ValueError, match="share a dtype"):
        block_sparse_attention_ref(q.double(), k, v, **kw)


@pytest.mark.triton
def test_triton_refuses_unsupported_configs():
    q, k, v, kw = _tiny()
    with pytest.raises(ValueError, match="block_size in"):
        block_sparse_attention_triton(q, k, v, **{**kw, "block_size": 8,
                                                  "block_mask": sliding_window_layout(40, 8, 20)})
    big = torch.zeros(1, 1, 40, 160)
    with pytest.raises(ValueError, match="head_dim <= 128"):
        block_sparse_attention_triton(big, big, big, **kw)
    if bsa._interpreting():
        with pytest.raises(ValueError, match="bf16"):
            block_sparse_attention_triton(q.bfloat16(), k.bfloat16(), v.bfloat16(), **kw)


# ----------------------------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1.5e-2), (torch.float16, 5e-3), (torch.float32, 1e-5)])
@pytest.mark.parametrize("pattern", ["local_stride", "window_sinks", "block_diagonal"])
def test_gpu_matches_fp32_reference(dtype, tol, pattern):
    B, H, Hkv, T, D, bs = 2, 8, 2, 1000, 128, 64
    window, sinks = (300, 64) if pattern == "window_sinks" else (None, 0)
    layout = {
        "local_stride": lambda: local_stride_layout(T, bs, 4, 4, Hkv, num_heads=H),
        "window_sinks": lambda: sliding_window_layout(T, bs, window, sinks),
        "block_diagonal": lambda: block_diagonal_layout(T, bs),
    }[pattern]()
    q, k, v, do = _inputs(B, H, Hkv, T, D, dtype, device="cuda")
    kw = dict(block_mask=layout.cuda(), block_size=bs, window=window, num_sink_tokens=sinks)
    got = _fwd_bwd(block_sparse_attention, q, k, v, do, **kw)
    want = _fwd_bwd(block_sparse_attention_ref, q.float(), k.float(), v.float(), do.float(), **kw)
    for label, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        assert a.dtype == dtype
        rel = _rel_rmse(a, b)
        assert rel < tol, f"{pattern} {dtype} {label}: rmse/rms {rel:.3e}"


def test_bench_flop_count_matches_loop_count():
    """The kernel bench's pair count (row chunks of the layout expansion) == pairs counted by Python loops."""
    T, bs, window, sinks = 70, 16, 30, 7
    for layout, heads in [(local_stride_layout(T, bs, 3, 4, 2, num_heads=4), 4), (block_diagonal_layout(T, bs), 2)]:
        want = sum(bool(layout[h // (heads // layout.shape[0]), i // bs, j // bs])
                   for h in range(heads) for i in range(T) for j in range(i + 1) if i - j < window or j < sinks)
        assert bsa._visible_pairs(layout, bs, T, window, sinks, heads) == want


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_bench_runs():
    res = bsa.bench_block_sparse(2048, num_heads=8, num_kv_heads=2, backward=True)
    assert all(math.isfinite(x) and x > 0 for x in res.values())
    assert 0 < res["density"] < 1


_SM90_COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import zoo.kernels.block_sparse_attention.triton as K

ptrs = dict(LSE="*fp32", DELTA="*fp32", ROW_CNT="*i32", ROW_IDX="*i32", COL_CNT="*i32", COL_IDX="*i32",
            qk_scale="fp32", sm_scale="fp32")
ints = ("T", "window", "num_sink", "H", "HKV", "GROUP", "T_PAD")  # and the strides s_*; Q, K, V, O and grads: bf16
kernels = dict(fwd=K._bsa_fwd_kernel, dq=K._bsa_bwd_dq_kernel, dkdv=K._bsa_bwd_dkdv_kernel)
# bf16, window + sinks: whole tiles (block 64, D 128) and sub-tiled layout blocks (block 128, D 64)
for bs, D in ((64, 128), (128, 64)):
    for kind, fn in kernels.items():
        bm, bn, bd, warps = K._tiles(kind, bs, D)
        consts = dict(BLOCK_SIZE=bs, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, HEAD_DIM=D, HAS_WINDOW=True,
                      PRECISION="tf32", SUBTILED=min(bm, bn) < bs)
        sig = {a: "constexpr" if a in consts else ptrs.get(a) or ("i32" if a.startswith("s_") or a in ints else "*bf16")
               for a in fn.arg_names}
        k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
        assert k.metadata.shared <= 227 * 1024, (kind, bs, D, k.metadata.shared)
"""


@pytest.mark.triton
@pytest.mark.slow
def test_triton_compiles_for_sm90():
    """Lower the forward, dQ and dK/dV kernels to sm_90 cubins without a GPU (bundled ptxas; bf16, window + sinks,
    whole and sub-tiled layout blocks): MLIR-lowering errors and shared-memory overruns the interpreter cannot see."""
    run_sm90_compile(_SM90_COMPILE)
