"""The CPU fast paths pinned to the reference paths they stand in for (outputs, gradients, states): Mamba-2 tiles vs
one piece and the lean in-place decode step vs the reference step; sliding window's strided-window prefill and
full-ring decode vs the masked paths; block_sparse's active-block attention vs the masked reference. Speed is
measured by ``zoo bench``, never here."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.helpers import needs_compiler
from zoo.layers.mamba2 import Mamba2
from zoo.layers.mamba2_ops import _conv_forward, causal_conv, causal_conv_ref
from zoo.layers.masks import LocalStrideRule
from zoo.layers.sparse_attention import BlockSparseAttention, SlidingWindowAttention
from zoo.layers.sparse_cpu import block_sparse_attention_cpu, window_attention
from zoo.layers.sparse_ops import blocked_attention

pytestmark = pytest.mark.usefixtures("single_thread")

D_MODEL = 24
EXACT = dict(rtol=0, atol=1e-11)  # fp64: the same math in another order


def _mamba(seed: int = 0, **kw) -> Mamba2:
    torch.manual_seed(seed)
    m = Mamba2(D_MODEL, 0, **{"d_state": 8, "headdim": 6, "ngroups": 2, "chunk_size": 8, **kw})
    with torch.no_grad():  # non-trivial values everywhere (the default init has zero conv bias, unit norm, ...)
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
        m.A_log.copy_(torch.linspace(-2.0, 1.0, m.nheads))
    return m.double()


def _state_tensors(st) -> dict[str, torch.Tensor]:
    return {k: v for k, v in vars(st).items() if isinstance(v, torch.Tensor)}


# ---------------------------------------------------------------------------------------------- Mamba-2 tiles
@pytest.mark.parametrize("kw", [{}, {"d_ssm": 24, "decay_scale": 0.9}, {"rmsnorm": False, "D_has_hdim": True}])
@pytest.mark.parametrize("checkpoint", [True, False])
def test_mamba2_tiles_match_one_piece(kw, checkpoint):
    """Tiles of 16 tokens (ragged tail; chunk 8) == the one-piece reference: output, the input's and every
    parameter's gradient, and the state after a prefill continuing a state."""
    m = _mamba(**kw)
    m.tile_checkpoint = checkpoint
    x = torch.randn(2, 45, D_MODEL, dtype=torch.float64)
    results = []
    for tile in (None, 16):
        m.tile_len = tile
        m.zero_grad()
        xi = x.clone().requires_grad_()
        y, _ = m(xi)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        grads = [xi.grad] + [p.grad.clone() for p in m.parameters()]
        with torch.no_grad():
            st = m.init_state(2, dtype=torch.float64, device="cpu")
            m(x[:, :3], state=st)
            yp, st = m(x[:, 3:], state=st)
        results.append((y, *grads, yp, *_state_tensors(st).values()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **EXACT)


# ---------------------------------------------------------------------------------------------- Mamba-2 conv
@pytest.mark.parametrize("T", [1, 2, 7, 40])
@pytest.mark.parametrize("with_prev", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_blocked_causal_conv_matches_the_plain_conv(T, with_prev, with_bias):
    """The conv written block by block (blocks of 3 and of 128 rows: blocks shorter than the kernel, a ragged last
    one, one block for all) == the plain shifted-sum conv; with the SiLU in place per block == SiLU after it; the
    autograd path's gradients (input, prev, taps, bias) == the plain conv's."""
    torch.manual_seed(T)
    x = torch.randn(2, T, 5, dtype=torch.float64)
    prev = torch.randn(2, 3, 5, dtype=torch.float64) if with_prev else None
    w = torch.randn(4, 5, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64) if with_bias else None
    ref = causal_conv_ref(x, prev, w, b)
    for rows in (3, 128):
        torch.testing.assert_close(_conv_forward(x, prev, w, b, rows=rows), ref, **EXACT)
        torch.testing.assert_close(_conv_forward(x, prev, w, b, True, rows=rows), torch.nn.functional.silu(ref),
                                   **EXACT)
    leaves = [t.clone().requires_grad_() for t in (x, prev, w, b) if t is not None]
    grads = []
    for fn in (causal_conv, lambda *a: torch.nn.functional.silu(causal_conv_ref(*a))):
        args = iter(leaves)
        call = [next(args) if t is not None else None for t in (x, prev, w, b)]
        y = fn(*call)
        grads.append(torch.autograd.grad((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum(),
                                         leaves))
        grads[-1] = (y.detach(), *grads[-1])
    for a, c in zip(*grads):
        torch.testing.assert_close(a, c, **EXACT)


# ---------------------------------------------------------------------------------------------- Mamba-2 decode
DECODE_ARGS = [{}, {"decay_scale": 0.9, "input_scale": 0.6, "dt_scale": 0.3}, {"state_norm_threshold": 0.05},
               {"rmsnorm": False, "D_has_hdim": True}, {"d_ssm": 24}, {"dt_limit": (0.01, 0.5)}]


@pytest.mark.parametrize("kw", DECODE_ARGS)
def test_mamba2_lean_decode_step_matches_reference_step(kw):
    """The in-place step (taken by one unmasked token without autograd) == the reference step of ``_forward``,
    token by token over chunk boundaries (renormalisation points), outputs and states; its state tensors are
    updated in place (same storage)."""
    m = _mamba(**kw)
    x = torch.randn(2, 30, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        lean = m.init_state(2, dtype=torch.float64, device="cpu")
        m(x[:, :5], state=lean)
        ref = copy.deepcopy(lean)
        ptrs = {k: t.data_ptr() for k, t in _state_tensors(lean).items()}
        for t in range(5, 30):
            y_lean, lean = m(x[:, t:t + 1], state=lean)
            y_ref = m._forward(x[:, t:t + 1], ref, None, None)
            torch.testing.assert_close(y_lean, y_ref, **EXACT)
            for k, v in _state_tensors(ref).items():
                torch.testing.assert_close(getattr(lean, k), v, **EXACT)
    assert {k: t.data_ptr() for k, t in _state_tensors(lean).items()} == ptrs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mamba2_lean_decode_low_precision(dtype):
    """fp32 / fp16 parameters: the lean step keeps the fp32 state and agrees with the reference step."""
    m = _mamba().to(dtype)
    x = torch.randn(1, 12, D_MODEL).to(dtype)
    with torch.no_grad():
        lean = m.init_state(1, dtype=dtype, device="cpu")
        m(x[:, :4], state=lean)
        ref = copy.deepcopy(lean)
        for t in range(4, 12):
            y_lean, lean = m(x[:, t:t + 1], state=lean)
            y_ref = m._forward(x[:, t:t + 1], ref, None, None)
            tol = 1e-5 if dtype == torch.float32 else 2e-3
            torch.testing.assert_close(y_lean, y_ref, rtol=tol, atol=tol)
            assert lean.ssm_state.dtype == torch.float32
            torch.testing.assert_close(lean.ssm_state, ref.ssm_state, rtol=tol, atol=tol)


def _forbid_host_sync(monkeypatch) -> None:
    def boom(*a, **k):
        raise AssertionError("host synchronisation in the decode step")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, boom)


def test_decode_steps_make_no_host_sync(monkeypatch):
    """Mamba-2 (with the state norm's where), sliding window on its full ring: no .item() / bool(tensor)."""
    m = _mamba(state_norm_threshold=0.05).float()
    sw = SlidingWindowAttention(D_MODEL, 0, window=4, num_sink_tokens=1, num_heads=4, num_kv_heads=2)
    x = torch.randn(2, 16, D_MODEL)
    with torch.no_grad():
        sm = m(x[:, :3], state=m.init_state(2, dtype=torch.float32, device="cpu"))[1]
        ss = sw(x[:, :3], state=sw.init_state(2, dtype=torch.float32, device="cpu"))[1]
        _forbid_host_sync(monkeypatch)
        for t in range(3, 16):
            _, sm = m(x[:, t:t + 1], state=sm)
            _, ss = sw(x[:, t:t + 1], state=ss)


# ---------------------------------------------------------------------------------------------- sliding window
def _sliding(**kw) -> SlidingWindowAttention:
    torch.manual_seed(0)
    return SlidingWindowAttention(D_MODEL, 0, num_heads=4, num_kv_heads=2, **kw).double()


@pytest.mark.parametrize("T,window,chunk,group", [(50, 7, 8, 32), (64, 20, 8, 3), (9, 4, 16, 1), (33, 3, 4, 2),
                                                  (40, 1, 8, 2), (61, 30, 4, 5), (12, 20, 4, 2), (70, 16, 16, 1)])
def test_window_attention_matches_masked_reference(T, window, chunk, group):
    """The strided-window prefill (the first ``window`` queries causal, then chunks under one shared band mask) ==
    the masked blocked reference, fp64: GQA folded into the rows, ragged last chunk, window below / above the chunk
    and above ``T``, windows crossing groups of chunks."""
    g = torch.Generator().manual_seed(T)
    q = torch.randn(2, 4, T, 8, dtype=torch.float64, generator=g)
    k, v = (torch.randn(2, 2, T, 8, dtype=torch.float64, generator=g) for _ in range(2))
    m = _sliding(window=window)
    pos = torch.arange(T).expand(2, T)
    ref = blocked_attention(m.rule, q, k, v, pos, None, None, 0.3, 16, by_slot=True)
    torch.testing.assert_close(window_attention(q, k, v, window, 0.3, chunk, group), ref, **EXACT)


@needs_compiler
@pytest.mark.parametrize("T,window,H,Hkv,D", [(150, 37, 4, 2, 16), (77, 64, 3, 3, 32), (61, 200, 2, 1, 96),
                                              (40, 1, 4, 4, 16), (130, 16, 8, 2, 64), (128, 50, 4, 2, 16)])
def test_native_window_attention_matches_masked_reference(T, window, H, Hkv, D, monkeypatch):
    """fp32: sliding_window_cpu.cpp (16 queries per item, the last item ragged, windows ending inside a block and
    spanning several, a window of 1, one larger than T, T a multiple of the block (no padding), GQA groups of 1-4,
    D 16-96) == the masked blocked reference (fp64) and the torch schedule (``ZOO_NATIVE=off``)."""
    g = torch.Generator().manual_seed(T)
    q = torch.randn(2, T, H, D, generator=g).transpose(1, 2)  # q, k, v as the layer makes them: strided views
    k = torch.randn(2, T, Hkv, D, generator=g).transpose(1, 2)
    v = torch.randn(2, T, Hkv, D, generator=g).transpose(1, 2)
    m = SlidingWindowAttention(H * D, 0, num_heads=H, num_kv_heads=Hkv, head_dim=D, window=window).double()
    ref = blocked_attention(m.rule, q.double(), k.double(), v.double(), torch.arange(T).expand(2, T), None, None,
                            0.3, 16, by_slot=True)
    got = window_attention(q, k, v, window, 0.3)
    assert got.transpose(1, 2).is_contiguous()  # [B, H, T, D] seen over a [B, T, H, D] buffer, as the torch path
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5)  # fp32 sums over up to 200 keys
    monkeypatch.setenv("ZOO_NATIVE", "off")
    torch.testing.assert_close(got, window_attention(q, k, v, window, 0.3), rtol=0, atol=1e-5)


@pytest.mark.parametrize("sinks", [0, 2])
def test_sliding_window_prefill_and_decode_fast_paths_match_reference(sinks):
    """Prefill into an empty cache through the parallel fast path, then decode on the full ring without a mask ==
    the chunked masked prefill and the masked decode (forced by marking the cache padded): outputs and caches."""
    m = _sliding(window=6, num_sink_tokens=sinks)
    m.window_fast_min = 8
    x = torch.randn(2, 40, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        y_par, _ = m(x)
        fast = m.init_state(2, dtype=torch.float64, device="cpu")
        y_fast, fast = m(x[:, :30], state=fast)
        m.window_fast_min = 10**9
        ref = m.init_state(2, dtype=torch.float64, device="cpu")
        y_ref, ref = m(x[:, :30], state=ref)
        torch.testing.assert_close(y_fast, y_ref, **EXACT)
        torch.testing.assert_close(y_fast, y_par[:, :30], **EXACT)
        ref.padded = True  # the masked step
        for t in range(30, 40):
            yf, fast = m(x[:, t:t + 1], state=fast)
            yr, ref = m(x[:, t:t + 1], state=ref)
            torch.testing.assert_close(yf, yr, **EXACT)
            torch.testing.assert_close(yf, y_par[:, t:t + 1], **EXACT)
        assert fast.length == ref.length == 40
        for name in ("k", "v", "pos"):
            torch.testing.assert_close(getattr(fast, name), getattr(ref, name), rtol=0, atol=0)


def test_sliding_window_decode_fills_the_ring_then_goes_lean():
    """From an empty cache, token by token: the masked step until the ring is full, then the lean one == the
    parallel forward throughout."""
    m = _sliding(window=5, num_sink_tokens=1)
    x = torch.randn(1, 14, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        y_par, _ = m(x)
        st = m.init_state(1, dtype=torch.float64, device="cpu")
        ys = [m(x[:, t:t + 1], state=st)[0] for t in range(14)]
    torch.testing.assert_close(torch.cat(ys, 1), y_par, **EXACT)


# ---------------------------------------------------------------------------------------------- block sparse
BLOCK_RULES = [
    dict(block_size=4, local_blocks=2, vertical_stride=3),
    dict(block_size=2, local_blocks=3, vertical_stride=4, homo_head=True, head_sliding_offset=1),
    dict(block_size=4, local_blocks=1, vertical_stride=2),
    dict(block_size=8, local_blocks=2, vertical_stride=5, head_sliding_offset=3),
]


@pytest.mark.parametrize("args", BLOCK_RULES)
@pytest.mark.parametrize("T,group", [(45, 2), (64, 2), (45, None), (64, None)])
def test_block_sparse_cpu_matches_masked_reference(args, T, group):
    """Active key blocks only (local windows + the vertical blocks every block of a range reads + the ones only some
    read, merged by log-sum-exp) == the masked reference: output and the gradients of q, k, v (GQA 4 / 2, batch 2,
    ragged last block; ranges of 2 query blocks and of the vertical stride)."""
    rule = LocalStrideRule(args["block_size"], args["local_blocks"], args["vertical_stride"], 4, 2,
                           args.get("head_sliding_offset", 0), args.get("homo_head", False), 0)
    g = torch.Generator().manual_seed(T)
    q = torch.randn(2, 4, T, 8, dtype=torch.float64, generator=g)
    k, v = (torch.randn(2, 2, T, 8, dtype=torch.float64, generator=g) for _ in range(2))
    w = torch.randn(2, 4, T, 8, dtype=torch.float64, generator=g)
    outs = []
    for fn in (lambda a, b, c: block_sparse_attention_cpu(a, b, c, rule, 0.3, group=group),
               lambda a, b, c: blocked_attention(rule, a, b, c, torch.arange(T).expand(2, T), None, None, 0.3, 16,
                                                 by_slot=True)):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        o = fn(*leaves)
        outs.append((o, *torch.autograd.grad((o * w).sum(), leaves)))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, **EXACT)


@needs_compiler
@pytest.mark.parametrize("T,bs,local,stride,H,Hkv,D,offset,homo", [
    (150, 16, 2, 3, 4, 2, 16, 0, False), (200, 32, 3, 2, 2, 2, 32, 1, False), (300, 64, 2, 2, 2, 1, 16, 0, True),
    (256, 16, 1, 4, 4, 4, 96, 2, False), (290, 128, 1, 2, 2, 2, 16, 0, False), (97, 16, 4, 3, 3, 1, 64, 5, False)])
def test_native_block_sparse_matches_masked_reference(T, bs, local, stride, H, Hkv, D, offset, homo, monkeypatch):
    """fp32: the native forward and backward (block_sparse_attention/cpu.cpp: active blocks only; kernel blocks of
    64 (forward) and 32 (backward) inside larger blocks, blocks of 16 as they are; ragged last block, item and
    tile, GQA 1-3, D 16-96, per-head and shared vertical residues; q, k, v and the output gradient read through
    the layer's strides) == the masked reference (fp64): output and the gradients of q, k, v; and == the torch
    schedule (``ZOO_NATIVE=off``)."""
    rule = LocalStrideRule(bs, local, stride, H, Hkv, offset, homo, 0)
    g = torch.Generator().manual_seed(T)
    q = torch.randn(2, T, H, D, generator=g).transpose(1, 2)  # the layer's strided views
    k = torch.randn(2, T, Hkv, D, generator=g).transpose(1, 2)
    v = torch.randn(2, T, Hkv, D, generator=g).transpose(1, 2)
    w = torch.randn(2, T, H, D, generator=g).transpose(1, 2)  # the output gradient as the layer gives it

    def run(fn, *xs):
        leaves = [t.detach().clone().requires_grad_() for t in xs]
        o = fn(*leaves)
        return (o, *torch.autograd.grad((o * w.to(o.dtype)).sum(), leaves))

    monkeypatch.setenv("ZOO_NATIVE", "on")  # a failed build is an error, not the torch schedule
    got = run(lambda a, b, c: block_sparse_attention_cpu(a, b, c, rule, D ** -0.5), q, k, v)
    ref = run(lambda a, b, c: blocked_attention(rule, a, b, c, torch.arange(T).expand(2, T), None, None, D ** -0.5, 16,
                                                by_slot=True), q.double(), k.double(), v.double())
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-5)  # fp32 sums over up to 300 keys
    monkeypatch.setenv("ZOO_NATIVE", "off")
    for a, b in zip(got, run(lambda a, b, c: block_sparse_attention_cpu(a, b, c, rule, D ** -0.5), q, k, v)):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("local_blocks", [2, 13])
def test_block_sparse_layer_fast_paths_match_reference(local_blocks):
    """The layer: parallel forward and backward through the CPU path (13 local blocks of 4 cover the 50 tokens:
    causal SDPA) == with the fast path off; a prefill into an empty cache through it leaves the same cache (ring
    and vertical store) and the same next decode steps."""
    torch.manual_seed(0)
    m = BlockSparseAttention(D_MODEL, 0, num_heads=4, num_kv_heads=2, block_size=4, local_blocks=local_blocks,
                             vertical_stride=3).double()
    m.window_fast_min = 8
    x = torch.randn(2, 50, D_MODEL, dtype=torch.float64)
    runs = []
    for fast in (True, False):
        if not fast:
            m._fast = lambda q, k, v: None
        m.zero_grad()
        xi = x.clone().requires_grad_()
        y, _ = m(xi)
        y.pow(2).sum().backward()
        with torch.no_grad():
            st = m.init_state(2, dtype=torch.float64, device="cpu")
            yp, st = m(x[:, :40], state=st)
            steps = [m(x[:, t:t + 1], state=st)[0] for t in range(40, 50)]
        runs.append((y, xi.grad, *(p.grad.clone() for p in m.parameters()), yp, *steps,
                     *(st.k, st.v, st.pos, st.vk[:, :, :st.vlen], st.vv[:, :, :st.vlen], st.vpos[:, :, :st.vlen])))
    del m._fast
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, **EXACT)
