"""Sparse-attention caches (the mixer contract runs in tests/contract): prefill in internal pieces, the exact
bytes of the bounded rings, the vertical-block store of the strided pattern, packed input refused with a state."""

import pytest
import torch

from zoo.layers.sparse_attention import BlockDiagonalAttention, BlockSparseAttention, SlidingWindowAttention
from zoo.testing import run_chunks

D_MODEL = 32
MIXERS = {
    "window": (SlidingWindowAttention, dict(window=8)),
    "window+sinks": (SlidingWindowAttention, dict(window=6, num_sink_tokens=3)),
    "block_sparse": (BlockSparseAttention, dict(block_size=4, local_blocks=2, vertical_stride=3)),
    "block_sparse_homo_offset": (BlockSparseAttention, dict(block_size=2, local_blocks=3, vertical_stride=4,
                                                            homo_head=True, head_sliding_offset=1)),
    "block_diagonal": (BlockDiagonalAttention, dict(block_size=5)),
}


def make(name, num_kv_heads=2):
    cls, kw = MIXERS[name]
    torch.manual_seed(0)
    return cls(D_MODEL, 0, num_heads=4, num_kv_heads=num_kv_heads, **kw)


@pytest.mark.parametrize("name", ["window+sinks", "block_sparse"])
def test_prefill_longer_than_the_internal_piece(name):
    m = make(name, num_kv_heads=4)
    m.prefill_chunk = 7  # a chunk is attended in pieces; the cache continues across them
    x = torch.randn(1, 40, D_MODEL)
    y_chunked, _ = run_chunks(m, x, [30, 10])
    torch.testing.assert_close(y_chunked, m(x)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["window", "window+sinks", "block_diagonal"])
def test_cache_bytes_stay_constant(name):
    m = make(name)
    x = torch.randn(1, 80, D_MODEL)
    st = m.init_state(1, dtype=torch.float32, device="cpu")
    sizes = []
    for t0 in range(0, 80, 10):
        st = m(x[:, t0:t0 + 10], state=st)[1]
        sizes.append(st.nbytes)
    assert len(set(sizes)) == 1
    cls, kw = MIXERS[name]
    slots = kw.get("window", 0) + kw.get("num_sink_tokens", 0) + kw.get("block_size", 0) * (cls is
                                                                                            BlockDiagonalAttention)
    assert sizes[0] == slots * (2 * 2 * 8 * 4 + 8)  # k and v of 2 KV heads x 8 dims fp32 + an int64 position


def test_block_sparse_cache_keeps_local_and_own_vertical_blocks():
    m = make("block_sparse")  # block 4, 2 local blocks, stride 3, 4 q heads -> step max(1, 3 // 4) = 1
    x = torch.randn(1, 96, D_MODEL)
    st = run_chunks(m, x, [50, 46])[1]
    # 24 blocks: KV head h keeps the blocks kb with (kb + h) % 3 == 0 (8 of them, 32 tokens), plus the ring
    kept = (st.vpos[0, :, : st.vlen] >= 0).sum(-1)
    assert kept.tolist() == [32, 32]
    for h in range(2):
        blocks = sorted({int(p) // 4 for p in st.vpos[0, h, : st.vlen] if p >= 0})
        assert blocks == [kb for kb in range(24) if (kb + h) % 3 == 0]
    assert sorted(st.pos[0, 0].tolist()) == list(range(88, 96))  # the ring: the last 2 blocks


def test_packed_input_with_state_is_rejected():
    m = make("window")
    st = m.init_state(1, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="seq_idx"):
        m(torch.randn(1, 4, D_MODEL), state=st, seq_idx=torch.zeros(1, 4, dtype=torch.long))
