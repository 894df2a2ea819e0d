"""Three modes agree for the sparse mixers (parallel == chunked prefill == decode, far past the window),
gradients, left padding, packing, and the bounded caches (constant bytes, reorder)."""

import pytest
import torch

from zoo.layers.sparse_attention import BlockDiagonalAttention, BlockSparseAttention, SlidingWindowAttention

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


def run_chunks(m, x, sizes, attention_mask=None):
    """Chunked calls; with a mask, positions are computed from it as the model does (the model owns time)."""
    st = m.init_state(x.shape[0], dtype=x.dtype, device=x.device)
    pos = (attention_mask.cumsum(1) - 1).clamp(min=0) if attention_mask is not None else None
    ys, t = [], 0
    for n in sizes:
        am = attention_mask[:, t:t + n] if attention_mask is not None else None
        y, st = m(x[:, t:t + n], state=st, attention_mask=am, positions=None if pos is None else pos[:, t:t + n])
        ys.append(y)
        t += n
    assert t == x.shape[1]
    return torch.cat(ys, 1), st


@pytest.mark.parametrize("name", list(MIXERS))
def test_three_modes_agree_far_past_window(name):
    m = make(name)
    T = 40  # >= 3x every window / local span above (window 8, local spans 8 and 6, block 5)
    x = torch.randn(2, T, D_MODEL)
    y = m(x)[0]
    y_chunked, _ = run_chunks(m, x, [3, 17, 1, 19])
    y_decode, _ = run_chunks(m, x, [1] * T)
    with torch.no_grad():  # decode steps write the cache in place (no autograd)
        y_decode_inplace, st = run_chunks(m, x, [5] + [1] * (T - 5))
    torch.testing.assert_close(y_chunked, y, atol=1e-5, rtol=0)
    torch.testing.assert_close(y_decode, y, atol=1e-5, rtol=0)
    torch.testing.assert_close(y_decode_inplace, y, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["window+sinks", "block_sparse"])
def test_prefill_longer_than_the_internal_piece(name):
    m = make(name, num_kv_heads=4)
    m.prefill_chunk = 7  # a chunk is attended in pieces; the cache continues across them
    x = torch.randn(1, 40, D_MODEL)
    y_chunked, _ = run_chunks(m, x, [30, 10])
    torch.testing.assert_close(y_chunked, m(x)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(MIXERS))
def test_gradients_parallel_vs_chunked_prefill(name):
    m = make(name)
    x = torch.randn(2, 30, D_MODEL, requires_grad=True)
    r = torch.randn(2, 30, D_MODEL)
    (m(x)[0] * r).sum().backward()
    gx, gp = x.grad.clone(), {n: p.grad.clone() for n, p in m.named_parameters()}
    x.grad = None
    m.zero_grad()
    (run_chunks(m, x, [4, 13, 13])[0] * r).sum().backward()
    torch.testing.assert_close(x.grad, gx, atol=1e-5, rtol=0)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, gp[n], atol=1e-4, rtol=0, msg=n)


@pytest.mark.parametrize("name", list(MIXERS))
def test_left_padded_row_equals_unpadded_row(name):
    m = make(name)
    T, pad = 31, 6
    x = torch.randn(1, T, D_MODEL)
    y_alone = m(x)[0]
    xp = torch.cat([torch.randn(1, pad, D_MODEL), x], 1)
    batch = torch.cat([xp, torch.randn(1, T + pad, D_MODEL)], 0)
    mask = torch.ones(2, T + pad, dtype=torch.long)
    mask[0, :pad] = 0
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    y_par = m(batch, positions=pos, attention_mask=mask)[0]
    torch.testing.assert_close(y_par[0, pad:], y_alone[0], atol=1e-5, rtol=0)
    m.chunk_size = 4  # the blocked path with padding
    torch.testing.assert_close(m(batch, positions=pos, attention_mask=mask)[0][0, pad:], y_alone[0],
                               atol=1e-5, rtol=0)
    y_dec, _ = run_chunks(m, batch, [pad + 5] + [1] * (T - 5), attention_mask=mask)
    torch.testing.assert_close(y_dec[0, pad:], y_alone[0], atol=1e-5, rtol=0)
    assert torch.isfinite(y_dec).all() and torch.isfinite(y_par).all()


@pytest.mark.parametrize("name", list(MIXERS))
@pytest.mark.parametrize("chunk", [10**9, 4])
def test_packed_documents_do_not_interact(name, chunk):
    m = make(name)
    m.chunk_size = chunk
    lens = [13, 9, 20]
    docs = [torch.randn(1, n, D_MODEL) for n in lens]
    seq_idx = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])[None]
    y = m(torch.cat(docs, 1), seq_idx=seq_idx)[0]  # positions restart at each document
    torch.testing.assert_close(y, torch.cat([m(d)[0] for d in docs], 1), atol=1e-5, rtol=0)


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


@pytest.mark.parametrize("name", ["window+sinks", "block_sparse"])
def test_reorder_state(name):
    m = make(name)
    x = torch.randn(2, 30, D_MODEL)
    st = run_chunks(m, x[:, :25], [25])[1]
    st.reorder(torch.tensor([1, 0]))
    y_swapped = run_chunks_from(m, x.flip(0)[:, 25:], st)
    torch.testing.assert_close(y_swapped, m(x)[0].flip(0)[:, 25:], atol=1e-5, rtol=0)


def run_chunks_from(m, x, st):
    ys = []
    for t in range(x.shape[1]):
        y, st = m(x[:, t:t + 1], state=st)
        ys.append(y)
    return torch.cat(ys, 1)


def test_packed_input_with_state_is_rejected():
    m = make("window")
    st = m.init_state(1, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="seq_idx"):
        m(torch.randn(1, 4, D_MODEL), state=st, seq_idx=torch.zeros(1, 4, dtype=torch.long))
