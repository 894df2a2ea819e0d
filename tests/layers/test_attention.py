"""Full attention specifics (the mixer contract runs in tests/contract): the KV cache grows past the capacity it
was allocated with, and the model's logits agree across modes."""

import torch

import zoo
from zoo.layers.attention import Attention
from zoo.testing import run_chunks


def test_cache_grows_past_its_allocated_capacity():
    torch.manual_seed(0)
    mixer = Attention(32, num_heads=4, num_kv_heads=2).double()
    x = torch.randn(2, 23, 32, dtype=torch.float64)
    state = mixer.init_state(2, dtype=x.dtype, device="cpu", max_length=4)
    assert state.k.shape[2] == 4
    y, state = run_chunks(mixer, x, [3, 1, 9, 10], state=state)
    assert state.k.shape[2] >= 23 and state.length == 23
    torch.testing.assert_close(y, mixer(x)[0], rtol=0, atol=1e-12)


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
