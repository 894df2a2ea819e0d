"""Mamba-2 mixer specifics (the mixer contract runs in tests/contract over Mamba2.example_args): transformers parity,
the mitigations neutral when off, the state norm over long runs, errors."""

from __future__ import annotations

import pytest
import torch

from zoo.config import ZooConfig
from zoo.layers.mamba2 import Mamba2
from zoo.testing import run_chunks

pytestmark = pytest.mark.usefixtures("single_thread")

D_MODEL = 24
SMALL = dict(d_state=8, headdim=6, ngroups=2, chunk_size=8)  # H = 48 / 6 = 8 heads, 2 groups


def make_layer(seed: int = 0, **kw) -> Mamba2:
    torch.manual_seed(seed)
    m = Mamba2(D_MODEL, 0, **{**SMALL, **kw})
    with torch.no_grad():  # non-trivial values everywhere (the default init has zero conv bias, unit norm, ...)
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
        m.A_log.copy_(torch.linspace(-2.0, 1.0, m.nheads))
    return m.double()


MITIGATIONS = {
    "baseline": {},
    "decay_scale": dict(decay_scale=0.9),
    "input_scale": dict(input_scale=0.6),
    "dt_scale": dict(dt_scale=0.3),
    "state_norm": dict(state_norm_threshold=0.05),
    "state_norm_per_head": dict(state_norm_threshold=[0.02, 0.05, 0.1, 0.5, 1.0, 0.03, 0.04, 0.2]),
    "state_window": dict(state_window=5),
    "window_and_decay": dict(state_window=11, decay_scale=0.95),
    "no_rmsnorm_Dhdim": dict(rmsnorm=False, D_has_hdim=True),
    "d_ssm": dict(d_ssm=24),
}


def test_mitigations_neutral_bit_for_bit():
    x = torch.randn(2, 37, D_MODEL, dtype=torch.float64)
    base = make_layer()(x)[0]
    base_chunked = run_chunks(make_layer(), x, [5, 1, 31])[0]
    neutral = dict(decay_scale=1.0, input_scale=1.0, dt_scale=1.0, state_norm_threshold=float("inf"))
    for k, v in neutral.items():
        m = make_layer(**{k: v})
        assert torch.equal(m(x)[0], base), k
        assert torch.equal(run_chunks(m, x, [5, 1, 31])[0], base_chunked), k
    # a window covering the whole sequence is the identity up to rounding (a state difference, not a skip)
    torch.testing.assert_close(make_layer(state_window=64)(x)[0], base, rtol=0, atol=1e-10)


def test_transformers_mixer_parity():
    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    cfg = Mamba2Config(hidden_size=D_MODEL, num_heads=8, head_dim=6, state_size=8, n_groups=2, expand=2,
                       chunk_size=8, num_hidden_layers=1, conv_kernel=4)
    torch.manual_seed(0)
    hf = Mamba2Mixer(cfg, 0).eval()
    m = make_layer().float()
    hf.load_state_dict(m.state_dict())
    x = torch.randn(2, 29, D_MODEL)
    with torch.no_grad():
        torch.testing.assert_close(m(x)[0], hf(x), rtol=0, atol=1e-5)


def test_state_norm_bounds_state_over_64k_tokens():
    torch.manual_seed(0)
    kw = dict(d_state=8, headdim=8, ngroups=1, chunk_size=256, expand=1)
    m = Mamba2(16, 0, **kw)
    with torch.no_grad():
        m.A_log.fill_(-9.0)  # almost no decay: without normalisation the state grows with the input length
        m.dt_bias.fill_(1.0)
    x = torch.randn(1, 65536, 16) + 1.0
    thr = 5.0
    norms = {}
    for t in (None, thr):
        m.state_norm_threshold = t
        st = m.init_state(1, dtype=torch.float32, device="cpu")
        peak = torch.zeros(m.nheads)
        with torch.no_grad():
            for i in range(0, 65536, 4096):  # calls end on chunk boundaries: the state was just renormalised
                y, st = m(x[:, i:i + 4096], state=st)
                assert torch.isfinite(y).all()
                peak = torch.maximum(peak, torch.linalg.vector_norm(st.ssm_state[0], dim=(-2, -1)))
        norms[t] = peak
    assert (norms[None] > 10 * thr).all()  # the test is meaningful: the unnormalised state does blow past thr
    assert (norms[thr] <= thr * (1 + 1e-5)).all()
    with torch.no_grad():
        y, _ = m(x)
    assert torch.isfinite(y).all()


def test_state_norm_rejects_interior_padding():
    m = make_layer(state_norm_threshold=1.0)
    mask = torch.ones(1, 10, dtype=torch.long)
    mask[0, 4] = 0
    with pytest.raises(ValueError, match="contiguous"):
        m(torch.randn(1, 10, D_MODEL, dtype=torch.float64), attention_mask=mask)


@pytest.mark.parametrize("args,match", [
    (dict(headdim=7), "not divisible by headdim=7"),
    (dict(ngroups=3), "not divisible by ngroups=3"),
    (dict(decay_scale=1.5), "decay_scale=1.5 must be in"),
    (dict(dt_scale=0.0), "dt_scale=0.0 must be a positive"),
    (dict(state_norm_threshold=[1.0, 2.0]), "nheads=8"),
    (dict(state_norm_threshold=-1.0), "must be positive"),
    (dict(state_window=4, state_norm_threshold=1.0), "cannot be combined"),
    (dict(d_state=0), "d_state=0 must be a positive int"),
])
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        ZooConfig(d_model=D_MODEL, n_layers=1, vocab_size=16,
                  layers=[{"mixer": "mamba2", "mixer_args": {**SMALL, **args}}])
    with pytest.raises(ValueError, match=match):
        Mamba2(D_MODEL, 0, **{**SMALL, **args})
