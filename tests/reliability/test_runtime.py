"""Bad runtime input gets a clear error, never a silently different answer; padding in any layout generate accepts
gives the unpadded prompt's tokens; checks run once per call, never in the per-token decode step."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch

import zoo
import zoo.models.lm
from zoo.registry import get_mixer, list_mixers
from zoo.testing import GROUP_DEFAULTS, no_host_sync, run_chunks

pytestmark = [pytest.mark.reliability("bad runtime inputs"), pytest.mark.usefixtures("single_thread")]

V = 61


def mixer_model(name: str, *, n_layers: int = 2, dtype=torch.float64, **config) -> zoo.ZooForCausalLM:
    """A small model of ``n_layers`` layers of mixer ``name`` (its first example arguments), with an MLP."""
    cls = get_mixer(name)
    args = (cls.example_args or ({},))[0]
    torch.manual_seed(0)
    cfg = zoo.ZooConfig(vocab_size=V, d_model=32, n_layers=n_layers,
                        layers=[zoo.LayerSpec(name, args, {"intermediate_size": 48})] * n_layers,
                        mixer_defaults={g: a for g, a in GROUP_DEFAULTS.items() if g in cls.arg_groups}, **config)
    return zoo.create_model(cfg).to(dtype).eval()


@pytest.fixture(scope="module")
def model():
    return mixer_model("attention", dtype=torch.float32)


def ids(B=2, T=9, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("make,match", [
    (lambda: ids().float(), r"input_ids must be an integer tensor \(int64 or int32\) of token ids, got torch.float32"),
    (lambda: ids().to(torch.int16), r"must be an integer tensor \(int64 or int32\)"),
    (lambda: ids().bool(), r"must be an integer tensor \(int64 or int32\)"),
    (lambda: ids()[0], r"input_ids must be a \[B, T\] tensor, got torch.Size\(\[9\]\)"),
    (lambda: ids()[None], r"input_ids must be a \[B, T\] tensor, got torch.Size\(\[1, 2, 9\]\)"),
    (lambda: [[1, 2, 3]], r"input_ids must be a \[B, T\] tensor, got <class 'list'>"),
    (lambda: torch.zeros(1, 0, dtype=torch.long), r"input_ids is empty \(shape \(1, 0\)\)"),
    (lambda: torch.zeros(0, 4, dtype=torch.long), r"input_ids is empty \(shape \(0, 4\)\)"),
    (lambda: ids().index_fill(1, torch.tensor([3]), V), rf"token ids must be in \[0, {V}\) \(vocab_size\), got min "
                                                        rf"\d+, max {V}"),
    (lambda: ids().index_fill(1, torch.tensor([3]), -1), rf"token ids must be in \[0, {V}\) \(vocab_size\), got min "
                                                         r"-1"),
])
def test_bad_input_ids(model, make, match):
    with pytest.raises(ValueError, match=match):
        model(make())


def mask_with(**rows):
    m = torch.ones(2, 9, dtype=torch.long)
    for r, cols in rows.items():
        m[int(r[1:]), cols] = 0
    return m


@pytest.mark.parametrize("mask,match", [
    (torch.full((2, 9), 2), r"attention_mask must hold only 0 \(padding\) and 1 \(token\), found \[2\]"),
    (torch.ones(2, 9) * 0.5, r"found \[0.5\]"),
    (torch.tensor([[1] * 9, [-1] + [1] * 8]), r"found \[-1\]"),
    (torch.ones(2, 8, dtype=torch.long), r"attention_mask must be \[B, T\]=\[2, 9\] like input_ids, got \(2, 8\)"),
    (torch.ones(3, 9, dtype=torch.long), r"got \(3, 9\)"),
    (torch.ones(9, dtype=torch.long), r"got \(9,\)"),
    (torch.ones(2, 9, 1, dtype=torch.long), r"got \(2, 9, 1\)"),
    ([[1] * 9] * 2, r"attention_mask must be \[B, T\]"),
    (mask_with(r1=slice(None)), r"attention_mask rows \[1\] have no real token, or padding between real tokens"),
    (mask_with(r0=slice(3, 5)), r"attention_mask rows \[0\] have no real token, or padding between real tokens"),
    (mask_with(r0=slice(0, 2), r1=[4]), r"rows \[1\]"),
])
def test_bad_attention_masks(model, mask, match):
    with pytest.raises(ValueError, match=match):
        model(ids(), attention_mask=mask)


def test_masks_that_are_fine(model):
    for m in (torch.ones(2, 9, dtype=torch.bool), mask_with(r0=slice(0, 3)), mask_with(r0=slice(6, None)),
              mask_with(r0=slice(0, 2), r1=slice(7, None)), torch.ones(2, 9)):
        model(ids(), attention_mask=m)


def test_seq_idx_is_checked(model):
    with pytest.raises(ValueError, match=r"seq_idx \(packed documents\) must be an integer \[B, T\]=\[2, 9\]"):
        model(ids(), seq_idx=torch.zeros(2, 9))
    with pytest.raises(ValueError, match=r"seq_idx .* parallel forward only .* with states"):
        model(ids(), seq_idx=torch.zeros(2, 9, dtype=torch.long), states=model.init_states(2))


def test_states_of_another_batch_size_or_model_are_refused(model):
    with pytest.raises(ValueError, match=r"states were built for batch size 3, but input_ids has 2 rows; use "
                                         r"model.init_states\(2\)"):
        model(ids(), states=model.init_states(3))
    other = mixer_model("attention", n_layers=3, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"states must be this model's ModelState"):
        model(ids(), states=other.init_states(2))
    with pytest.raises(ValueError, match=r"states must be this model's ModelState"):
        model(ids(), states=[None, None])


def test_padding_after_tokens_with_states_is_refused_with_pad_left_advice(model):
    states = model.init_states(2)
    with pytest.raises(ValueError, match=r"attention_mask rows \[0\] put padding after real tokens, .* pad on the "
                                         r"LEFT \(e.g. tokenizer.padding_side = 'left'\)"):
        model(ids(), attention_mask=mask_with(r0=slice(6, None)), states=states)
    states = model.init_states(2)
    model(ids(T=4), states=states)  # rows have absorbed tokens: a later chunk cannot start with padding
    with pytest.raises(ValueError, match=r"rows \[1\] put padding after real tokens"):
        model(ids(T=3), attention_mask=torch.tensor([[1, 1, 1], [0, 1, 1]]), states=states)


@pytest.mark.parametrize("name", list_mixers())
def test_chunked_prefill_of_a_left_padded_batch_with_all_padding_chunks(name, cases):
    """Row 0 is padded for 7 tokens, so its first chunks are all padding: legitimate (only a whole prompt needs a
    token per row); every chunk schedule gives the parallel forward's logits at the real tokens."""
    m = mixer_model(name)
    x = ids(T=20)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[0, :7] = 0
    with torch.no_grad():
        ref = m(x, attention_mask=mask).logits
        alone = m(x[:1, 7:]).logits
        torch.testing.assert_close(ref[0, 7:], alone[0], rtol=0, atol=1e-9)
        for schedule in ([3, 3, 1, 13], [5, 5, 5, 5], [1] * 20, [7, 13]):
            got, _ = run_chunks(m, x, schedule, attention_mask=mask)
            torch.testing.assert_close(got[0, 7:], ref[0, 7:], rtol=0, atol=1e-9)
            torch.testing.assert_close(got[1], ref[1], rtol=0, atol=1e-9)
            cases.add()


# ------------------------------------------------------------------------------------------- generate
@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=0), r"max_new_tokens must be a positive int, got 0"),
    (dict(max_new_tokens=-1), r"max_new_tokens must be a positive int, got -1"),
    (dict(max_new_tokens=2.5), r"max_new_tokens must be a positive int, got 2.5"),
    (dict(max_new_tokens=True), r"max_new_tokens must be a positive int, got True"),
    (dict(max_new_tokens=None), r"max_new_tokens must be a positive int, got None"),
    (dict(do_sample="yes"), r"do_sample must be True or False, got 'yes'"),
    (dict(do_sample=True, temperature=0.0), r"temperature must be a positive finite number when sampling, got 0.0"),
    (dict(do_sample=True, temperature=float("nan")), r"temperature must be a positive finite number when sampling"),
    (dict(do_sample=True, temperature=float("inf")), r"temperature must be a positive finite number when sampling"),
    (dict(do_sample=True, temperature=-1.0), r"temperature must be a positive finite number when sampling"),
    (dict(do_sample=True, temperature="1"), r"temperature must be a positive finite number when sampling"),
    (dict(do_sample=True, top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    (dict(do_sample=True, top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
    (dict(do_sample=True, top_p=float("nan")), r"top_p must be in \(0, 1\], got nan"),
    (dict(do_sample=True, top_k=-1), r"top_k must be a non-negative int \(0 = off\), got -1"),
    (dict(do_sample=True, top_p=True), r"top_p must be in \(0, 1\], got True"),
    (dict(do_sample=True, top_k=2.5), r"top_k must be a non-negative int \(0 = off\), got 2.5"),
    (dict(do_sample=True, top_k=True), r"top_k must be a non-negative int"),
    (dict(eos_token_id=V), rf"eos_token_id must be ids in \[0, {V}\), got {V}"),
    (dict(eos_token_id=[1, -1]), r"eos_token_id must be ids in \[0, 61\), got \[1, -1\]"),
    (dict(eos_token_id="2"), r"eos_token_id must be ids in \[0, 61\), got '2'"),
    (dict(pad_token_id=V), rf"pad_token_id must be an id in \[0, {V}\), got {V}"),
    (dict(pad_token_id=1.0), r"pad_token_id must be an id in \[0, 61\), got 1.0"),
    (dict(suppress_tokens=[V]), rf"suppress_tokens must be ids in \[0, {V}\)"),
    (dict(suppress_tokens=[0.5]), r"suppress_tokens must be integer ids"),
    (dict(suppress_tokens=list(range(V))), r"suppress_tokens suppresses the whole vocabulary"),
    (dict(attention_mask=torch.full((2, 9), 2)), r"attention_mask must hold only 0 \(padding\) and 1 \(token\)"),
    (dict(attention_mask=mask_with(r1=slice(None))), r"attention_mask rows \[1\] have no real token: generate needs "
                                                     r"at least one token per row"),
    (dict(attention_mask=torch.ones(2, 10)), r"attention_mask must have the shape of input_ids \(2, 9\)"),
    (dict(attention_mask="all"), r"attention_mask must have the shape of input_ids"),
])
def test_bad_generate_arguments(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model.generate(ids(), max_new_tokens=kwargs.pop("max_new_tokens", 3), **kwargs)


@pytest.mark.parametrize("make,match", [
    (lambda: ids().float(), r"input_ids must be an integer tensor"),
    (lambda: ids().index_fill(1, torch.tensor([0]), V + 5), rf"token ids must be in \[0, {V}\)"),
    (lambda: ids()[0], r"input_ids must be a \[B, T\] tensor"),
])
def test_bad_generate_prompts(model, make, match):
    with pytest.raises(ValueError, match=match):
        model.generate(make(), max_new_tokens=3)


@pytest.mark.parametrize("name", list_mixers())
def test_right_and_middle_padded_prompts_generate_the_unpadded_tokens(name, cases):
    """Right padding (and padding between tokens) is handled: each row generates what its unpadded prompt does."""
    m = mixer_model(name)
    x = ids(B=3, T=14, seed=1)
    mask = torch.ones_like(x)
    mask[0, 10:] = 0  # right-padded
    mask[1, 2:5] = 0  # padding in the middle
    mask[2, :3] = 0  # left-padded
    out = m.generate(x, attention_mask=mask, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(out[:, :14], x)  # the prompt is returned as given
    for r in range(3):
        alone = m.generate(x[r:r + 1][mask[r:r + 1].bool()][None], max_new_tokens=6, eos_token_id=[])
        assert out[r, 14:].tolist() == alone[0, -6:].tolist(), f"row {r}"
        cases.add()


@pytest.mark.parametrize("name", list_mixers())
def test_decode_step_makes_no_host_sync_and_no_input_checks(name, monkeypatch):
    m = mixer_model(name, dtype=torch.float32)
    x = ids()
    calls = []
    original = zoo.models.lm.ZooForCausalLM.check_inputs
    monkeypatch.setattr(zoo.models.lm.ZooForCausalLM, "check_inputs",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    states = m.init_states(2)
    with torch.no_grad():
        m(x, states=states)
        token = x[:, -1:]
        for _ in range(3):
            with no_host_sync():
                token = m.step(token, states).argmax(-1, keepdim=True)
    assert len(calls) == 1  # the prefill's call only
    calls.clear()
    m.generate(x, max_new_tokens=40, eos_token_id=[])
    assert len(calls) == 1  # once per generate call


def test_generate_decode_keeps_no_per_token_objects():
    """Decoding allocates nothing per token that outlives the step (the output ids go into preallocated blocks):
    the number of live objects is the same after 300 and after 1500 new tokens."""
    m = mixer_model("mamba2", n_layers=1, dtype=torch.float32)

    class Counter:
        def __init__(self):
            self.n, self.at = -1, {}

        def put(self, _):
            self.n += 1
            if self.n in (300, 1500):
                gc.collect()
                self.at[self.n] = len(gc.get_objects())

        def end(self):
            pass

    c = Counter()
    m.generate(ids(B=1, T=4), max_new_tokens=1600, eos_token_id=[], streamer=c)
    assert c.at[1500] - c.at[300] <= 20, c.at


# ------------------------------------------------------------------------------------------- positions
def llama_like(family: str | None, mixer: str = "attention", max_pos: int = 16) -> zoo.ZooForCausalLM:
    return mixer_model(mixer, dtype=torch.float32, family=family, max_position_embeddings=max_pos)


@pytest.mark.parametrize("family", ["llama", "mistral", "generator", None])
def test_rope_families_warn_once_past_max_position_embeddings(family):
    m = llama_like(family)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(ids(T=16))  # exactly max_position_embeddings tokens: fine
    with pytest.warns(UserWarning, match=r"the sequence reaches 17 tokens, past max_position_embeddings=16: RoPE "
                                         r"extrapolates .* \(warned once per model\)"):
        m(ids(T=17))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(ids(T=20))  # once per model
        m.generate(ids(T=10), max_new_tokens=10, eos_token_id=[])
    with pytest.warns(UserWarning, match=r"reaches 20 tokens, past max_position_embeddings=16"):  # generate: up front
        llama_like(family).generate(ids(T=10), max_new_tokens=10, eos_token_id=[])


def test_positions_with_states_count_real_tokens_only():
    m = llama_like("llama")
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[:, :4] = 0  # 16 real tokens per row: within the limit
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        states = m.init_states(2)
        m(ids(T=20), attention_mask=mask, states=states)
    with pytest.warns(UserWarning, match=r"reaches 17 tokens"):
        m(ids(T=1), states=states)


def test_ssm_families_rope_free_and_dynamic_ntk_models_have_no_position_limit():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mixer_model("attention", dtype=torch.float32, family="llama", max_position_embeddings=16,
                    rope_scaling={"rope_type": "dynamic", "factor": 2.0})(ids(T=30))
        llama_like("mamba2", "attention").generate(ids(T=10), max_new_tokens=20, eos_token_id=[])
        llama_like(None, "mamba2").generate(ids(T=10), max_new_tokens=20, eos_token_id=[])
        llama_like("llama", "mamba2")(ids(T=30))
        llama_like("s4", "s4").generate(ids(T=10), max_new_tokens=20, eos_token_id=[])
    assert zoo.registry.get_family("s4").positions_past_max == "allow"  # the family's documented choice


def test_a_family_may_refuse_positions_past_the_limit(monkeypatch):
    monkeypatch.setattr(zoo.registry.get_family("llama"), "positions_past_max", "error")
    m = llama_like("llama")
    m(ids(T=16))
    with pytest.raises(ValueError, match=r"the sequence reaches 17 tokens, past max_position_embeddings=16 of this "
                                         r"llama model, which refuses to extrapolate"):
        m(ids(T=17))
    with pytest.raises(ValueError, match=r"reaches 19 tokens"):
        m.generate(ids(T=10), max_new_tokens=9)


def test_family_policy_values_are_validated():
    from zoo.models.family import Family

    with pytest.raises(ValueError, match=r"positions_past_max='ignore' must be one of 'warn', 'error', 'allow'"):
        Family("x", lambda c: False, lambda c: None, lambda c: {}, [], positions_past_max="ignore")
