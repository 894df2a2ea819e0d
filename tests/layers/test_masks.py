"""The mask rules of zoo.layers.masks against an independent brute-force enumeration: the attended pairs (the FLOP
counts of the sparse mixers) and the block layouts (the block-sparse kernel), counted with Python loops over
(i, j, h) from the formulas in the module docstring, not with the module's code."""

from __future__ import annotations

import pytest
import torch

from zoo.layers.masks import (
    BlockDiagonalRule,
    LocalStrideRule,
    SlidingWindowRule,
    attended_pairs,
    layout_to_token_mask,
    rule_layout,
)
from zoo.layers.sparse_attention import BlockDiagonalAttention, BlockSparseAttention, SlidingWindowAttention


# ---------------------------------------------------------------------------------------------- the docstring
def sliding_allowed(i: int, j: int, h: int, *, window: int, sinks: int) -> bool:
    return j <= i and (i - j < window or j < sinks)


def local_stride_allowed(i: int, j: int, h: int, *, bs: int, local_blocks: int, stride: int, num_heads: int,
                         num_kv_heads: int, offset: int = 0, homo: bool = False, dense: int = 0) -> bool:
    qb, kb = i // bs, j // bs
    step = max(1, int(stride / num_heads))  # num_heads = query heads, h = KV head index
    extra = (kb + (0 if homo else h) * step + offset) % stride == 0
    if h >= num_kv_heads - dense:  # the last num_dense_heads KV heads are dense
        extra = True
    return j <= i and (qb - kb < local_blocks or extra)


def block_diagonal_allowed(i: int, j: int, h: int, *, bs: int) -> bool:
    return j <= i and i // bs == j // bs


def brute_pairs(allowed, T: int, context: int, heads: int, **kw) -> int:
    """(query, key, KV head) triples for the queries at positions context .. context + T - 1."""
    return sum(allowed(i, j, h, **kw) for h in range(heads) for i in range(context, context + T)
               for j in range(i + 1))


# (T, context, num_heads, num_kv_heads, mixer arguments)
SLIDING = [(37, 0, 4, 2, dict(window=5, num_sink_tokens=0)), (40, 0, 4, 2, dict(window=8, num_sink_tokens=3)),
           (512, 0, 12, 4, dict(window=100, num_sink_tokens=4)), (20, 0, 4, 1, dict(window=64, num_sink_tokens=2)),
           (16, 50, 4, 2, dict(window=8, num_sink_tokens=3)), (1, 99, 4, 2, dict(window=16, num_sink_tokens=4))]
LOCAL_STRIDE = [
    (512, 0, 12, 4, dict(block_size=16, local_blocks=4, vertical_stride=8)),  # the T=512/12/4/16 case
    (512, 0, 12, 4, dict(block_size=16, local_blocks=16, vertical_stride=8, head_sliding_offset=3)),
    (45, 0, 4, 2, dict(block_size=4, local_blocks=2, vertical_stride=3, head_sliding_offset=1)),
    (40, 0, 4, 2, dict(block_size=2, local_blocks=3, vertical_stride=4, homo_head=True, head_sliding_offset=1)),
    (48, 0, 4, 2, dict(block_size=4, local_blocks=1, vertical_stride=3, num_dense_heads=1)),
    (64, 0, 8, 8, dict(block_size=4, local_blocks=2, vertical_stride=16, head_sliding_offset=5)),  # step 2
    (10, 60, 4, 2, dict(block_size=4, local_blocks=2, vertical_stride=3, head_sliding_offset=2)),
    (1, 77, 4, 2, dict(block_size=8, local_blocks=2, vertical_stride=4)),
]
BLOCK_DIAGONAL = [(70, 0, 4, 2, dict(block_size=16)), (512, 0, 12, 4, dict(block_size=64)),
                  (13, 21, 4, 2, dict(block_size=8)), (1, 100, 4, 2, dict(block_size=16))]


def _sliding(T, ctx, H, Hkv, a):
    rule = SlidingWindowRule(a["window"], a["num_sink_tokens"])
    return rule, brute_pairs(sliding_allowed, T, ctx, Hkv, window=a["window"], sinks=a["num_sink_tokens"])


def _local_stride(T, ctx, H, Hkv, a):
    rule = LocalStrideRule(a["block_size"], a["local_blocks"], a["vertical_stride"], H, Hkv,
                           a.get("head_sliding_offset", 0), a.get("homo_head", False), a.get("num_dense_heads", 0))
    return rule, brute_pairs(local_stride_allowed, T, ctx, Hkv, bs=a["block_size"], local_blocks=a["local_blocks"],
                             stride=a["vertical_stride"], num_heads=H, num_kv_heads=Hkv,
                             offset=a.get("head_sliding_offset", 0), homo=a.get("homo_head", False),
                             dense=a.get("num_dense_heads", 0))


def _block_diagonal(T, ctx, H, Hkv, a):
    return BlockDiagonalRule(a["block_size"]), brute_pairs(block_diagonal_allowed, T, ctx, Hkv, bs=a["block_size"])


CASES = ([(SlidingWindowAttention, _sliding, *c) for c in SLIDING]
         + [(BlockSparseAttention, _local_stride, *c) for c in LOCAL_STRIDE]
         + [(BlockDiagonalAttention, _block_diagonal, *c) for c in BLOCK_DIAGONAL])


@pytest.mark.parametrize("cls,rule_and_count,T,context,H,Hkv,args", CASES,
                         ids=[f"{c[0].mixer_name}-T{c[2]}-ctx{c[3]}-{i}" for i, c in enumerate(CASES)])
def test_attended_pairs_and_flops_match_brute_force(cls, rule_and_count, T, context, H, Hkv, args):
    rule, want = rule_and_count(T, context, H, Hkv, args)
    assert attended_pairs(rule, T, context, Hkv) == want
    # the mixer's FLOPs (the attention docstring): projections 2 T d (2 H D + 2 Hkv D), 4 D per pair per query head
    d, D, batch = 64, 16, 2
    flops = cls.flops(d, {**args, "num_heads": H, "num_kv_heads": Hkv, "head_dim": D}, T=T, context=context,
                      batch=batch)
    assert flops == batch * (2 * T * d * (2 * H * D + 2 * Hkv * D) + 4 * D * (H // Hkv) * want)


def test_full_attention_flops_count_every_causal_pair():
    from zoo.layers.attention import Attention

    T, ctx, H, Hkv, d, D = 30, 7, 6, 2, 48, 8
    pairs = sum(1 for _ in range(Hkv) for i in range(ctx, ctx + T) for j in range(i + 1))
    assert Attention.flops(d, {"num_heads": H, "num_kv_heads": Hkv, "head_dim": D}, T=T, context=ctx) == \
        2 * T * d * (2 * H * D + 2 * Hkv * D) + 4 * D * (H // Hkv) * pairs


# ---------------------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("rule_and_count,T,kb,H,Hkv,args", [
    (_sliding, 37, 4, 4, 2, dict(window=10, num_sink_tokens=3)),
    (_local_stride, 45, 4, 4, 2, dict(block_size=4, local_blocks=2, vertical_stride=3, head_sliding_offset=1)),
    (_local_stride, 48, 4, 4, 2, dict(block_size=4, local_blocks=1, vertical_stride=3, num_dense_heads=1)),
    (_block_diagonal, 70, 8, 4, 2, dict(block_size=16)),
])
def test_layout_expansion_is_the_rule(rule_and_count, T, kb, H, Hkv, args):
    """``layout (x) the kernel's in-block rule`` == the docstring's predicate, per KV head, element by element."""
    rule, _ = rule_and_count(T, 0, H, Hkv, args)
    n = -(-T // kb)
    window, sinks = rule.kernel_args(kb)
    tok = layout_to_token_mask(rule_layout(rule, n, n, kb), kb, T, window, sinks)  # [Hm, T, T]
    allowed = {_sliding: sliding_allowed, _local_stride: local_stride_allowed,
               _block_diagonal: block_diagonal_allowed}[rule_and_count]
    kw = {_sliding: dict(window=args.get("window"), sinks=args.get("num_sink_tokens")),
          _local_stride: dict(bs=args.get("block_size"), local_blocks=args.get("local_blocks"),
                              stride=args.get("vertical_stride"), num_heads=H, num_kv_heads=Hkv,
                              offset=args.get("head_sliding_offset", 0), dense=args.get("num_dense_heads", 0)),
          _block_diagonal: dict(bs=args.get("block_size"))}[rule_and_count]
    want = torch.tensor([[[allowed(i, j, h, **kw) for j in range(T)] for i in range(T)]
                         for h in range(tok.shape[0])])
    assert torch.equal(tok, want)
    # row pieces and the query-head expansion give the same mask
    assert torch.equal(layout_to_token_mask(rule_layout(rule, n, n, kb), kb, T, window, sinks, rows=(5, 17)),
                       tok[:, 5:17])
    if tok.shape[0] > 1:
        per_q = layout_to_token_mask(rule_layout(rule, n, n, kb), kb, T, window, sinks, num_heads=H)
        assert torch.equal(per_q, tok.repeat_interleave(H // Hkv, 0))


def test_local_stride_layout_matches_hand_written_dkernel_pattern():
    # 8 blocks, local_blocks=2, vertical_stride=3, 2 kv heads, 2 query heads -> step = max(1, int(3 / 2)) = 1.
    # head 0: vertical blocks kb % 3 == 0 -> {0, 3, 6}; head 1: (kb + 1) % 3 == 0 -> {2, 5}.
    head0 = ["10000000", "11000000", "11100000", "10110000", "10011000", "10011100", "10010110", "10010011"]
    head1 = ["10000000", "11000000", "01100000", "00110000", "00111000", "00101100", "00100110", "00100111"]
    got = rule_layout(LocalStrideRule(16, 2, 3, num_heads=2, num_kv_heads=2), 8, 8, 16).int()
    want = torch.tensor([[[int(c) for c in row] for row in head] for head in (head0, head1)])
    assert torch.equal(got, want)
    # dkernel's step uses the query-head count: 8 query heads, stride 4 -> step 1 (not 4 // 2 = 2 for 2 kv heads)
    lay = rule_layout(LocalStrideRule(16, 1, 4, num_heads=8, num_kv_heads=2), 8, 8, 16)
    assert lay[1, 7].nonzero().flatten().tolist() == [3, 7]  # (kb + 1) % 4 == 0 -> {3, 7}; local {7}
    homo = rule_layout(LocalStrideRule(16, 1, 4, num_heads=2, num_kv_heads=2, head_sliding_offset=1,
                                       homo_head=True), 8, 8, 16)
    assert homo.shape == (1, 8, 8) and homo[0, 7].nonzero().flatten().tolist() == [3, 7]


def test_layout_expansion_refuses_a_layout_of_another_length():
    with pytest.raises(ValueError, match=r"layout must have shape \[Hm, 3, 3\]"):
        layout_to_token_mask(torch.ones(1, 4, 4, dtype=torch.bool), 16, 40)
