"""Full attention: three modes agree (parallel == chunked prefill == token decode), forward and backward."""

import pytest
import torch

import zoo
from zoo.layers.attention import Attention


def run_modes(mixer, x, chunks):
    """Parallel output, and the output of the same sequence fed through the state in ``chunks``."""
    y_par, _ = mixer(x)
    state = mixer.init_state(x.shape[0], dtype=x.dtype, device=x.device, max_length=4)  # forces cache growth
    outs, start = [], 0
    for n in chunks:
        y, state = mixer(x[:, start:start + n], state=state)
        outs.append(y)
        start += n
    assert start == x.shape[1]
    return y_par, torch.cat(outs, 1)


@pytest.mark.parametrize("kv_heads,qk_norm", [(2, False), (8, False), (1, True)])
def test_three_modes_agree(kv_heads, qk_norm):
    torch.manual_seed(0)
    mixer = Attention(64, num_heads=8, num_kv_heads=kv_heads, qk_norm=qk_norm, qkv_bias=True)
    x = torch.randn(2, 23, 64)
    y_par, y_chunked = run_modes(mixer, x, [7, 1, 10, 5])
    _, y_decode = run_modes(mixer, x, [1] * 23)
    assert (y_par - y_chunked).abs().max() < 1e-5
    assert (y_par - y_decode).abs().max() < 1e-5


def test_three_modes_agree_backward():
    torch.manual_seed(1)
    mixer = Attention(32, num_heads=4, num_kv_heads=2)
    x = torch.randn(1, 12, 32, requires_grad=True)
    g = torch.randn(1, 12, 32)
    y_par, y_chunk = run_modes(mixer, x, [5, 4, 3])
    (gx_par,) = torch.autograd.grad((y_par * g).sum(), x)
    (gx_chunk,) = torch.autograd.grad((y_chunk * g).sum(), x)
    assert (gx_par - gx_chunk).abs().max() < 1e-5
    gw_par = torch.autograd.grad((mixer(x)[0] * g).sum(), mixer.q_proj.weight)[0]
    gw_chunk = torch.autograd.grad((run_modes(mixer, x, [5, 7])[1] * g).sum(), mixer.q_proj.weight)[0]
    assert (gw_par - gw_chunk).abs().max() < 1e-5


def test_packed_sequences_do_not_attend_across_documents():
    torch.manual_seed(2)
    mixer = Attention(32, num_heads=4)
    a, b = torch.randn(1, 5, 32), torch.randn(1, 7, 32)
    packed = torch.cat([a, b], 1)
    seq_idx = torch.tensor([[0] * 5 + [1] * 7])
    positions = torch.tensor([list(range(5)) + list(range(7))])
    y, _ = mixer(packed, positions=positions, seq_idx=seq_idx)
    assert torch.allclose(y[:, :5], mixer(a)[0], atol=1e-6)
    assert torch.allclose(y[:, 5:], mixer(b)[0], atol=1e-6)


def test_model_three_modes_agree_logits():
    torch.manual_seed(3)
    model = zoo.create_model("zoo-tiny-attention").eval()
    ids = torch.randint(0, 512, (2, 19))
    with torch.no_grad():
        full = model(ids).logits
        states = model.init_states(2)
        chunked = torch.cat([model(ids[:, s:e], states=states).logits for s, e in [(0, 6), (6, 7), (7, 19)]], 1)
        states = model.init_states(2)
        steps = torch.cat([model(ids[:, t:t + 1], states=states).logits for t in range(19)], 1)
    assert (full - chunked).abs().max() < 1e-5
    assert (full - steps).abs().max() < 1e-5
    assert states.offset == 19 and states.nbytes > 0


def test_state_reorder_and_nbytes_grow_linearly():
    mixer = Attention(32, num_heads=4, num_kv_heads=2)
    state = mixer.init_state(3, dtype=torch.float32, device="cpu")
    mixer(torch.randn(3, 10, 32), state=state)
    n10 = state.nbytes
    mixer(torch.randn(3, 10, 32), state=state)
    assert state.nbytes == 2 * n10
    k_row2 = state.k[2].clone()
    state.reorder(torch.tensor([2, 0]))
    assert state.k.shape[0] == 2 and torch.equal(state.k[0], k_row2)
