"""generate(): sampling controls, EOS handling, streamer protocol."""

import torch

import zoo
from zoo.generation import sample_next


def model():
    torch.manual_seed(0)
    return zoo.create_model("zoo-tiny-attention").eval()


def test_top_k_1_and_tiny_top_p_are_greedy():
    m = model()
    ids = torch.randint(0, 512, (2, 6))
    greedy = m.generate(ids, max_new_tokens=8, eos_token_id=None)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(m.generate(ids, max_new_tokens=8, do_sample=True, top_k=1, eos_token_id=None, generator=g),
                       greedy)
    assert torch.equal(m.generate(ids, max_new_tokens=8, do_sample=True, top_p=1e-6, eos_token_id=None,
                                  generator=g), greedy)


def test_sampling_respects_top_k_support():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0, 3.0]]).repeat(2000, 1)
    draws = sample_next(logits, do_sample=True, top_k=2, generator=torch.Generator().manual_seed(1))
    assert set(draws.tolist()) == {1, 2}
    draws = sample_next(logits, do_sample=True, top_p=0.5, generator=torch.Generator().manual_seed(1))
    assert set(draws.tolist()) == {1}  # p(1) = 0.66 > 0.5 already


def test_eos_stops_and_pads_finished_rows():
    m = model()
    ids = torch.randint(0, 512, (2, 5), generator=torch.Generator().manual_seed(3))
    free = m.generate(ids, max_new_tokens=6, eos_token_id=None)
    eos = int(free[0, 5])  # row 0's first new token plays "eos"
    out = m.generate(ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=511)
    assert int(out[0, 5]) == eos and (out[0, 6:] == 511).all()
    row1 = free[1, 5:].tolist()
    n = row1.index(eos) + 1 if eos in row1 else len(row1)  # row 1 runs until its own eos (or the end)
    assert out[1, 5:5 + n].tolist() == row1[:n]
    if eos not in row1:
        assert out.shape[1] == free.shape[1]


class Streamer:
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, t):
        self.chunks.append(t)

    def end(self):
        self.ended = True


def test_streamer_receives_prompt_then_each_token():
    m = model()
    ids = torch.randint(0, 512, (1, 4))
    s = Streamer()
    out = m.generate(ids, max_new_tokens=5, eos_token_id=None, streamer=s)
    assert s.ended and torch.equal(s.chunks[0], ids)
    assert torch.equal(torch.cat([c.view(1, -1) for c in s.chunks], 1), out)


import pytest  # noqa: E402


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=0), r"max_new_tokens must be a positive int, got 0"),
    (dict(max_new_tokens=-3), r"max_new_tokens must be a positive int, got -3"),
    (dict(max_new_tokens=2.5), r"max_new_tokens must be a positive int, got 2.5"),
    (dict(do_sample=True, top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
    (dict(do_sample=True, top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    (dict(do_sample=True, top_k=-1), r"top_k must be a non-negative int"),
    (dict(do_sample=True, temperature=0.0), r"temperature must be a positive finite number when sampling"),
    (dict(do_sample=True, temperature=float("nan")), r"temperature must be a positive finite number"),
    (dict(attention_mask=torch.ones(2, 5, dtype=torch.long)), r"attention_mask must have the shape of input_ids"),
])
def test_bad_generate_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        model().generate(torch.randint(0, 512, (2, 6)), **kwargs)


def test_empty_prompt_is_refused():
    with pytest.raises(ValueError, match=r"input_ids is empty \(shape \(1, 0\)\)"):
        model().generate(torch.zeros(1, 0, dtype=torch.long))


def test_forward_refuses_a_mask_of_another_length():
    m = model()
    ids = torch.randint(0, 512, (2, 6))
    with pytest.raises(ValueError, match=r"attention_mask must be \[B, T\]=\[2, 6\] like input_ids, got \(2, 7\)"):
        m(ids, attention_mask=torch.ones(2, 7, dtype=torch.long))
    states = m.init_states(2)
    m(ids, states=states)
    m(ids[:, :1], attention_mask=torch.ones(2, 7, dtype=torch.long), states=states)  # transformers-style [B, seen+T]
    with pytest.raises(ValueError, match=r"or \[B, offset \+ T\]=\[2, 8\]"):
        m(ids[:, :1], attention_mask=torch.ones(2, 5, dtype=torch.long), states=states)
