"""check_mixer on mixers written outside the package: a correct one passes, deliberately broken ones fail with
a message naming the broken property."""

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

import zoo
from zoo.testing import check_mixer


@dataclass
class EMAState(zoo.State):
    s: Tensor  # [B, D] the running average


class EMA(zoo.Mixer):
    """A minimal outside mixer: ``s_t = a s_{t-1} + (1 - a) W_in x_t``, ``y_t = W_out s_t`` (padding skipped,
    reset at document starts)."""

    example_args = ({"decay": 0.8},)
    supports_packing = True

    def __init__(self, d_model: int, layer_idx: int = 0, *, decay: float = 0.9) -> None:
        super().__init__(d_model, layer_idx)
        self.decay = decay
        self.in_proj = nn.Linear(d_model, d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model, bias=False)

    def init_state(self, batch_size, *, dtype, device, max_length=None):
        return EMAState(torch.zeros(batch_size, self.d_model, dtype=dtype, device=device))

    def step_state(self, s: Tensor, u: Tensor, keep: Tensor) -> Tensor:
        return torch.where(keep[:, None], self.decay * s + (1 - self.decay) * u, s)

    def forward(self, x, *, positions=None, state=None, attention_mask=None, seq_idx=None):
        B, T, _ = x.shape
        u = self.in_proj(x)
        keep = torch.ones(B, T, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        s = state.s if state is not None else x.new_zeros(B, self.d_model)
        ys = []
        for t in range(T):
            if seq_idx is not None and t > 0:
                s = torch.where((seq_idx[:, t] != seq_idx[:, t - 1])[:, None], torch.zeros_like(s), s)
            s = self.step_state(s, u[:, t], keep[:, t])
            ys.append(s)
        if state is not None:
            state.s = s
        return self.out_proj(torch.stack(ys, 1)), state


class StateIgnoredOnDecode(EMA):
    def init_state(self, batch_size, *, dtype, device, max_length=None):
        return EMAState(torch.zeros(batch_size, self.d_model, dtype=dtype, device=device))

    def forward(self, x, *, positions=None, state=None, attention_mask=None, seq_idx=None):
        if state is not None and x.shape[1] == 1:  # decode forgets what came before
            state.s = torch.zeros_like(state.s)
        return super().forward(x, positions=positions, state=state, attention_mask=attention_mask, seq_idx=seq_idx)


class PaddingLeaksIntoState(EMA):
    def forward(self, x, *, positions=None, state=None, attention_mask=None, seq_idx=None):
        return super().forward(x, positions=positions, state=state, attention_mask=None, seq_idx=seq_idx)


class PackingLeaksAcrossDocuments(EMA):
    def forward(self, x, *, positions=None, state=None, attention_mask=None, seq_idx=None):
        return super().forward(x, positions=positions, state=state, attention_mask=attention_mask, seq_idx=None)


class SyncsPerToken(EMA):
    def forward(self, x, *, positions=None, state=None, attention_mask=None, seq_idx=None):
        if state is not None and bool(torch.isfinite(x).all()):  # a data-dependent branch: a host sync
            pass
        return super().forward(x, positions=positions, state=state, attention_mask=attention_mask, seq_idx=seq_idx)


@pytest.fixture()
def registered():
    names = []

    def register(cls, name):
        zoo.register_mixer(name)(cls)
        names.append(name)
        return name

    yield register
    for name in names:
        zoo.registry.unregister_mixer(name)


def test_a_correct_outside_mixer_passes(registered):
    name = registered(EMA, "test_ema")
    assert name in zoo.list_mixers()
    report = check_mixer("test_ema(decay=0.8)")
    assert report.passed == list(zoo.testing.PROPERTIES)


@pytest.mark.parametrize("cls,prop", [
    (StateIgnoredOnDecode, "three_modes"),
    (PaddingLeaksIntoState, "left_padding"),
    (PackingLeaksAcrossDocuments, "packing"),
    (SyncsPerToken, "decode_no_sync"),
])
def test_broken_mixers_fail_naming_the_property(registered, cls, prop):
    name = registered(cls, f"test_broken_{cls.__name__.lower()}")
    with pytest.raises(AssertionError, match=rf"check_mixer\('{name}\(decay=0.8\)'\): {prop}: "):
        check_mixer(f"{name}(decay=0.8)")


@dataclass
class LoggingState(EMAState):
    log: Tensor  # [B, tokens]: grows with every token


class KeepsEveryToken(EMA):  # declares state_growth="constant" (the default) but its state grows
    def init_state(self, batch_size, *, dtype, device, max_length=None):
        return LoggingState(torch.zeros(batch_size, self.d_model, dtype=dtype, device=device),
                            torch.zeros(batch_size, 0, dtype=dtype, device=device))

    def forward(self, x, *, positions=None, state=None, attention_mask=None, seq_idx=None):
        y, state = super().forward(x, positions=positions, state=state, attention_mask=attention_mask,
                                   seq_idx=seq_idx)
        if state is not None:
            state.log = torch.cat([state.log, x[:, :, 0]], 1)
        return y, state


def test_state_growth_is_checked(registered):
    name = registered(KeepsEveryToken, "test_keeps_every_token")
    with pytest.raises(AssertionError, match=r"nbytes: state_growth='constant' but nbytes after"):
        check_mixer(f"{name}(decay=0.8)", properties=["nbytes"])


def test_unknown_property_and_unknown_mixer():
    with pytest.raises(ValueError, match="unknown contract properties"):
        check_mixer("attention", properties=["speed"])
    with pytest.raises(ValueError, match="unknown mixer 'nope'"):
        check_mixer("nope")
