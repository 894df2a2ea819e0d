"""Sparse attention mixers against independent references: masks written from the formulas here (not via
zoo.layers.masks), dkernel's get_sparse_attn_mask re-derived, full attention when the pattern covers all."""

import math

import pytest
import torch

import zoo
from zoo.layers.attention import Attention
from zoo.layers.masks import LocalStrideRule, SlidingWindowRule, layout_to_token_mask, rule_layout
from zoo.layers.sparse_attention import BlockDiagonalAttention, BlockSparseAttention, SlidingWindowAttention

D_MODEL, H, HKV = 32, 4, 2


def ref_attention(q, k, v, mask, scale):
    """Plain softmax attention; ``mask [Hq or 1, T, T]`` per query head (True = attend)."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v


def sliding_mask(T, W, S):
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    return ((j <= i) & ((i - j < W) | (j < S)))[None]


def block_diag_mask(T, b):
    i, j = torch.arange(T)[:, None], torch.arange(T)[None]
    return ((j <= i) & (i // b == j // b))[None]


def dkernel_mask(T, num_heads, num_kv_heads, block_size, local_blocks, vert_stride, homo_head=False,
                 head_sliding_offset=0, num_dense_heads=0):
    """dkernel/utils.py:get_sparse_attn_mask (return_dense=True) re-derived: per-query-head token mask."""
    if homo_head:  # dkernel sets num_heads = 1; the one pattern is shared by every head
        step, pattern_heads = max(1, int(vert_stride / 1)), [0] * num_kv_heads
    else:
        step, pattern_heads = max(1, int(vert_stride / num_heads)), list(range(num_kv_heads))
    nb = math.ceil(T / block_size)
    rows = []
    for h in pattern_heads:
        if h < num_kv_heads - num_dense_heads:
            vert = [(kb + h * step + head_sliding_offset) % vert_stride == 0 for kb in range(nb)]
        else:
            vert = [True] * nb
        for _ in range(num_heads // num_kv_heads):
            rows.append(torch.tensor(vert))
    vert = torch.stack(rows)[:, None, :]  # [H, 1, nb]
    qb, kb = torch.arange(nb)[None, :, None], torch.arange(nb)[None, None, :]
    block = (qb >= kb) & ((qb - kb < local_blocks) | vert)
    dense = torch.kron(block.int(), torch.ones(block_size, block_size, dtype=torch.int))[:, :T, :T].bool()
    return dense & torch.tril(torch.ones(T, T, dtype=torch.bool))


def run_ref(m, x, mask):
    T = x.shape[1]
    q, k, v = m.project(x, torch.arange(T).expand(x.shape[0], T))
    o = ref_attention(q, k, v, mask, m.scale)
    return m.o_proj(o.transpose(1, 2).reshape(x.shape[0], T, -1))


def make(cls, **kw):
    torch.manual_seed(0)
    return cls(D_MODEL, 0, num_heads=H, num_kv_heads=HKV, **kw)


@pytest.mark.parametrize("chunk", [10**9, 5])
@pytest.mark.parametrize("W,S", [(8, 0), (5, 3), (1, 0), (3, 20)])
def test_sliding_window_matches_formula(W, S, chunk):
    m = make(SlidingWindowAttention, window=W, num_sink_tokens=S)
    m.chunk_size = chunk
    x = torch.randn(2, 37, D_MODEL)
    torch.testing.assert_close(m(x)[0], run_ref(m, x, sliding_mask(37, W, S)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk", [10**9, 4])
@pytest.mark.parametrize("args", [
    dict(num_heads=4, num_kv_heads=2, block_size=4, local_blocks=2, vertical_stride=3),
    dict(num_heads=8, num_kv_heads=2, block_size=2, local_blocks=1, vertical_stride=4),  # step 1 (stride <= H)
    dict(num_heads=2, num_kv_heads=2, block_size=4, local_blocks=2, vertical_stride=8),  # step 4
    dict(num_heads=4, num_kv_heads=4, block_size=4, local_blocks=3, vertical_stride=4, homo_head=True),
    dict(num_heads=4, num_kv_heads=2, block_size=2, local_blocks=2, vertical_stride=3, head_sliding_offset=1),
    dict(num_heads=4, num_kv_heads=4, block_size=4, local_blocks=1, vertical_stride=5, num_dense_heads=1),
])
def test_block_sparse_matches_dkernel_mask(args, chunk):
    torch.manual_seed(0)
    m = BlockSparseAttention(D_MODEL, 0, head_dim=8, **args)
    m.chunk_size = chunk
    x = torch.randn(2, 45, D_MODEL)
    mask = dkernel_mask(45, args["num_heads"], args["num_kv_heads"], args["block_size"], args["local_blocks"],
                        args["vertical_stride"], args.get("homo_head", False), args.get("head_sliding_offset", 0),
                        args.get("num_dense_heads", 0))
    torch.testing.assert_close(m(x)[0], run_ref(m, x, mask), atol=1e-5, rtol=0)


def test_dkernel_mask_shape_of_phi3_small_pattern():
    # the re-derived reference itself, checked by hand on a tiny case: 2 heads, stride 2 -> step 1,
    # head 0 sees even key blocks, head 1 odd ones, plus its own block (local_blocks=1)
    mask = dkernel_mask(8, 2, 2, 2, 1, 2)
    blocks = mask[:, 1::2, ::2]  # last query of each block vs first key of each block
    assert blocks[0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]]
    assert blocks[1].int().tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 1, 0, 1]]


@pytest.mark.parametrize("chunk", [10**9, 3])
@pytest.mark.parametrize("b", [1, 4, 7])
def test_block_diagonal_matches_formula(b, chunk):
    m = make(BlockDiagonalAttention, block_size=b)
    m.chunk_size = chunk
    x = torch.randn(2, 30, D_MODEL)
    ref = run_ref(m, x, block_diag_mask(30, b))
    torch.testing.assert_close(m(x)[0], ref, atol=1e-5, rtol=0)
    # the folded-SDPA fast path is skipped with an explicit all-ones mask -> the blocked path
    torch.testing.assert_close(m(x, attention_mask=torch.ones(2, 30))[0], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls,kw", [
    (SlidingWindowAttention, dict(window=40, num_sink_tokens=2)),
    (SlidingWindowAttention, dict(window=24)),
    (BlockSparseAttention, dict(block_size=4, local_blocks=6, vertical_stride=7)),
    (BlockSparseAttention, dict(block_size=2, local_blocks=1, vertical_stride=1)),
    (BlockDiagonalAttention, dict(block_size=32)),
])
@pytest.mark.parametrize("chunk", [10**9, 5])
def test_covering_pattern_equals_full_attention(cls, kw, chunk):
    torch.manual_seed(0)
    full = Attention(D_MODEL, 0, num_heads=H, num_kv_heads=HKV)
    m = cls(D_MODEL, 0, num_heads=H, num_kv_heads=HKV, **kw)
    m.load_state_dict(full.state_dict())  # same parameter names: the swap is parameter-free
    m.chunk_size = chunk
    x = torch.randn(2, 24, D_MODEL)
    mask = torch.tensor([[0] * 3 + [1] * 21, [1] * 24])
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    torch.testing.assert_close(m(x)[0], full(x)[0], atol=1e-5, rtol=0)
    y_m, y_f = m(x, positions=pos, attention_mask=mask)[0], full(x, positions=pos, attention_mask=mask)[0]
    torch.testing.assert_close(y_m[mask.bool()], y_f[mask.bool()], atol=1e-5, rtol=0)


@pytest.mark.parametrize("rule,kb,T", [
    (SlidingWindowRule(10, 0), 4, 37), (SlidingWindowRule(5, 6), 4, 30), (SlidingWindowRule(16, 3), 8, 50),
])
def test_sliding_window_layout_with_kernel_rule(rule, kb, T):
    n = -(-T // kb)
    tok = layout_to_token_mask(rule_layout(rule, n, n, kb), kb, T, rule.window, rule.num_sink_tokens)
    assert torch.equal(tok, sliding_mask(T, rule.window, rule.num_sink_tokens))
    # the layout is tight: every visited block holds at least one allowed pair
    blocks = sliding_mask(n * kb, rule.window, rule.num_sink_tokens)[0].view(n, kb, n, kb).any(3).any(1)
    assert torch.equal(rule_layout(rule, n, n, kb)[0], blocks)


def test_local_stride_layout_with_kernel_rule():
    rule = LocalStrideRule(4, 2, 3, num_heads=4, num_kv_heads=2, head_sliding_offset=1)
    T = 45
    n = -(-T // 4)
    tok = layout_to_token_mask(rule_layout(rule, n, n, 4), 4, T)  # [Hkv, T, T]
    ref = dkernel_mask(T, 4, 2, 4, 2, 3, head_sliding_offset=1)[::2]  # one row per KV head
    assert torch.equal(tok, ref)


def test_block_diagonal_layout_with_kernel_rule():
    from zoo.layers.masks import BlockDiagonalRule

    T, b, kb = 70, 16, 8
    n = -(-T // kb)
    tok = layout_to_token_mask(rule_layout(BlockDiagonalRule(b), n, n, kb), kb, T)
    assert torch.equal(tok, block_diag_mask(T, b))


@pytest.mark.parametrize("spec,arg", [
    ("sliding_window(window=0)", "window"),
    ("sliding_window(window=-4)", "window"),
    ("sliding_window", "window"),
    ("sliding_window(window=8, num_sink_tokens=-1)", "num_sink_tokens"),
    ("block_sparse(block_size=48)", "block_size"),
    ("block_sparse(block_size=0)", "block_size"),
    ("block_sparse(local_blocks=0)", "local_blocks"),
    ("block_sparse(vertical_stride=0)", "vertical_stride"),
    ("block_sparse(num_dense_heads=3)", "num_dense_heads"),
    ("block_diagonal(block_size=0)", "block_size"),
    ("block_diagonal", "block_size"),
])
def test_bad_args_fail_at_config_time(spec, arg):
    with pytest.raises(ValueError, match=arg):
        zoo.ZooConfig.from_dict({"d_model": 32, "n_layers": 2, "vocab_size": 64, "mixers": spec,
                                 "mixer_defaults": {"attention": {"num_heads": 4, "num_kv_heads": 2}}})


def test_bad_arg_type_fails_at_config_time():
    with pytest.raises(ValueError, match="window"):
        zoo.ZooConfig.from_dict({"d_model": 32, "n_layers": 1, "vocab_size": 64,
                                 "mixers": "sliding_window(window='8')"})
