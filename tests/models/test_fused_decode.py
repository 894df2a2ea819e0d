"""The fused decode step of a pure Mamba-2 model (``zoo.models.fused_decode``, one native call for all blocks and
the head) against the model's block-by-block step and its checked forward in fp64: logits and every state, over
the options the kernel takes, with two threads (the weight rows and the state split between them). Speed is
measured by ``zoo bench``, never here."""

from __future__ import annotations

import copy

import pytest
import torch

import zoo
import zoo.models.lm as lm
from tests.helpers import needs_compiler
from zoo.models import fused_decode

pytestmark = needs_compiler

VOCAB = 53  # not a multiple of 4: the head's last rows take the one-row path
D_MODEL = 40  # not a multiple of 16: every dot product has a tail


def _model(n_layers: int = 3, layers: list | None = None, **mixer) -> zoo.ZooForCausalLM:
    torch.manual_seed(0)
    args = {"d_state": 16, "headdim": 8, "ngroups": 2, "chunk_size": 8, "expand": 2, **mixer}
    cfg = zoo.ZooConfig(vocab_size=VOCAB, d_model=D_MODEL, n_layers=n_layers,
                        layers=layers or [zoo.LayerSpec("mamba2", args)] * n_layers)
    m = zoo.create_model(cfg).eval()
    with torch.no_grad():  # away from the initialisation's ones and zeros: every parameter matters
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def _states_close(a, b, **tol) -> None:
    for sa, sb in zip(a.layers, b.layers):
        for name in ("conv_state", "ssm_state", "seen"):
            torch.testing.assert_close(getattr(sa, name), getattr(sb, name), **tol)
    assert torch.equal(a.next_position, b.next_position) and a.offset == b.offset


def _blockwise(model, ids, states):
    saved, lm.stack_step = lm.stack_step, lambda *args: None
    try:
        return model.step(ids, states)
    finally:
        lm.stack_step = saved


@pytest.mark.parametrize("mixer,config", [
    ({}, {}),
    ({"norm_before_gate": True, "ngroups": 1}, {"embedding_scale": 2.0, "logit_scale": 0.5}),
    ({"rmsnorm": False, "conv_bias": False, "bias": True, "D_has_hdim": True}, {}),
    ({"d_ssm": 48, "dt_scale": 0.7, "input_scale": 1.3, "decay_scale": 0.9}, {"tie_embeddings": True}),
])
def test_fused_step_matches_blockwise_step_and_fp64_forward(mixer, config, monkeypatch):
    monkeypatch.setenv("ZOO_NATIVE", "on")
    m = _model(**mixer)
    for k, v in config.items():
        setattr(m.config, k, v)
    if config.get("tie_embeddings"):
        m.lm_head.weight = m.embedding.weight
    ref = copy.deepcopy(m).double()
    ids = torch.randint(0, VOCAB, (3, 14), generator=torch.Generator().manual_seed(1))
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            fused, blocks, exact = m.init_states(3), m.init_states(3), ref.init_states(3)
            for s in (fused, blocks):
                m(ids[:, :5], states=s)
            ref(ids[:, :5], states=exact)
            for t in range(5, 14):
                tok = ids[:, t:t + 1]
                got = m.step(tok, fused)
                assert "_stack_decode" in m.__dict__  # the fused step ran
                torch.testing.assert_close(got, _blockwise(m, tok, blocks), rtol=2e-5, atol=2e-5)
                want = ref(tok, states=exact, logits_to_keep=1).logits[:, -1]
                torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
            _states_close(fused, blocks, rtol=2e-5, atol=2e-5)
    finally:
        torch.set_num_threads(n)


def test_fused_step_follows_parameter_and_state_changes(monkeypatch):
    """An in-place parameter update (new plan), a reorder of the states (new tensors) and a prefill between steps
    (new conv window and counters) all reach the fused step."""
    monkeypatch.setenv("ZOO_NATIVE", "on")
    m = _model(n_layers=2)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fused, blocks = m.init_states(2), m.init_states(2)
        for s in (fused, blocks):
            m(ids[:, :4], states=s)
        m.step(ids[:, 4:5], fused), _blockwise(m, ids[:, 4:5], blocks)
        m.layers[1].mixer.A_log.add_(0.3)
        m.layers[0].norm.weight.mul_(1.5)
        for s in (fused, blocks):
            s.reorder(torch.tensor([1, 0]))
            m(ids[:, 5:8], states=s)
        for t in range(8, 12):
            torch.testing.assert_close(m.step(ids[:, t:t + 1], fused), _blockwise(m, ids[:, t:t + 1], blocks),
                                       rtol=2e-5, atol=2e-5)
        _states_close(fused, blocks, rtol=2e-5, atol=2e-5)


def test_fused_step_declines_what_it_does_not_cover(monkeypatch):
    """None (and nothing touched) for: a hybrid stack, a batch over MAX_BATCH, autograd, fp64, ZOO_NATIVE=off,
    state-norm thresholds; the model's step then runs its blocks."""
    m = _model(n_layers=2)
    ids = torch.randint(0, VOCAB, (2, 1))

    def declines(model, batch=2, dtype=torch.float32) -> bool:
        states = model.init_states(batch)
        h = model.embedding(ids[:1].expand(batch, 1)).to(dtype)
        before = copy.deepcopy(states)
        out = fused_decode.stack_step(model, h, states)
        return out is None and all(torch.equal(getattr(a, f), getattr(b, f)) for a, b in zip(before.layers,
                                   states.layers) for f in ("ssm_state", "conv_state") if hasattr(a, f))

    with torch.no_grad():
        assert not declines(m)
        assert declines(m, batch=fused_decode.MAX_BATCH + 1)
        assert declines(m, dtype=torch.float64)
        monkeypatch.setenv("ZOO_NATIVE", "off")
        assert declines(m)
        monkeypatch.setenv("ZOO_NATIVE", "auto")
        hybrid = _model(layers=[zoo.LayerSpec("mamba2", {"d_state": 16, "headdim": 8}),
                                zoo.LayerSpec("attention", {"num_heads": 4}, {"intermediate_size": 48})],
                        n_layers=2)
        assert declines(hybrid)
        m.layers[1].mixer.state_norm_threshold = 0.5
        assert declines(m)
    assert declines(_model(n_layers=1))  # autograd on
