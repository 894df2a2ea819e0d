"""RoPE scaling variants against transformers (an independent reference): the init functions of
``transformers.modeling_rope_utils`` (inverse frequencies + attention factor) and whole Llama models built with
each ``rope_scaling`` type (which also exercises transformers' per-call ``dynamic_rope_update``)."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import zoo
from tests.helpers import make_hf_llama, max_abs
from zoo.layers.attention import Attention
from zoo.layers.rope import RotaryEmbedding, rope_parameters

HEAD_DIM = 16
MAX_POS = 64


def hf_config(scaling: dict) -> LlamaConfig:
    return LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                       max_position_embeddings=MAX_POS, rope_scaling=dict(scaling))


LONG = [1.0 + 0.37 * i for i in range(HEAD_DIM // 2)]
SHORT = [1.0 + 0.05 * i for i in range(HEAD_DIM // 2)]
CASES = {
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    "yarn_mscale": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "mscale": 0.7,
                    "mscale_all_dim": 0.9, "beta_fast": 16, "beta_slow": 2},
    "yarn_no_truncate": {"rope_type": "yarn", "factor": 3.0, "original_max_position_embeddings": 16,
                         "truncate": False},
    "yarn_attention_factor": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32,
                              "attention_factor": 1.3},
    "longrope": {"rope_type": "longrope", "long_factor": LONG, "short_factor": SHORT,
                 "original_max_position_embeddings": 16},
    "longrope_factor": {"rope_type": "longrope", "long_factor": LONG, "short_factor": SHORT,
                        "original_max_position_embeddings": 32, "factor": 1.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("seq_len", [None, 20, 40, 200])
def test_init_functions_match_transformers(name, seq_len):
    scaling = CASES[name]
    ref_inv, ref_af = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf_config(scaling), "cpu", seq_len=seq_len)
    inv, af = rope_parameters(HEAD_DIM, 10000.0, scaling, MAX_POS, seq_len=seq_len)
    torch.testing.assert_close(inv, ref_inv.float(), rtol=1e-6, atol=0)
    assert af == pytest.approx(ref_af, rel=1e-12)


def test_longrope_switches_factors_with_the_length_of_the_call():
    rot = RotaryEmbedding(HEAD_DIM, 10000.0, CASES["longrope"], MAX_POS)
    short_pos = torch.arange(16)[None]  # max + 1 = 16 = original: short factors
    long_pos = torch.arange(17)[None]
    cos_s, _ = rot(short_pos, torch.float32)
    cos_l, _ = rot(long_pos, torch.float32)
    inv_s = rope_parameters(HEAD_DIM, 10000.0, CASES["longrope"], MAX_POS, seq_len=16)[0]
    inv_l = rope_parameters(HEAD_DIM, 10000.0, CASES["longrope"], MAX_POS, seq_len=17)[0]
    af = rope_parameters(HEAD_DIM, 10000.0, CASES["longrope"], MAX_POS)[1]
    assert af > 1.0  # factor max_pos / original = 4
    torch.testing.assert_close(cos_s[0, 0, 5, : HEAD_DIM // 2], torch.cos(5 * inv_s) * af)
    torch.testing.assert_close(cos_l[0, 0, 5, : HEAD_DIM // 2], torch.cos(5 * inv_l) * af)


@pytest.mark.parametrize("name", [None, *CASES])
def test_one_token_step_equals_forward(name):
    """``RotaryEmbedding.step`` (a decode step's angles) == ``forward`` at that position, from the positions and, for
    the static kinds, from a host-side offset; the length-dependent kinds refuse an offset alone."""
    rot = RotaryEmbedding(HEAD_DIM, 10000.0, CASES.get(name), MAX_POS)
    pos = torch.tensor([[5], [40], [100]])
    cos, sin = rot(pos, torch.float64)  # [B, 1, 1, D]
    got = rot.step(0, pos, torch.float64)  # [B, 1, D]
    assert torch.equal(got[0], cos[:, 0]) and torch.equal(got[1], sin[:, 0])
    if rot.kind in ("dynamic", "longrope"):
        with pytest.raises(ValueError, match="needs the positions"):
            rot.step(40, None, torch.float64)
    else:
        cos1, sin1 = rot.step(40, None, torch.float64)  # [D]
        assert torch.equal(cos1, cos[1, 0, 0]) and torch.equal(sin1, sin[1, 0, 0])


@pytest.mark.parametrize("name", ["yarn", "yarn_mscale", "longrope", "dynamic"])
def test_llama_with_scaled_rope_matches_transformers(name, tmp_path):
    """Whole models: T = 100 > max_position_embeddings (64 in make_hf_llama's config below), so longrope takes the
    long factors and dynamic NTK rescales its base in the call, as transformers' forward does."""
    scaling = dict(CASES[name])
    hf = make_hf_llama(tmp_path, rope_scaling=scaling, max_position_embeddings=MAX_POS, head_dim=HEAD_DIM,
                       num_attention_heads=4, rope_theta=10000.0, seed=5)
    model = zoo.from_pretrained(tmp_path)
    assert model.config.rope_scaling["rope_type"] == scaling["rope_type"]
    for T in (30, 100):
        ids = torch.randint(0, 1001, (1, T), generator=torch.Generator().manual_seed(T))
        with torch.no_grad():
            assert max_abs(model(ids).logits, hf(ids).logits) < 1e-4, T


def test_unknown_rope_type_is_refused_at_config_time():
    with pytest.raises(ValueError, match="not supported"):
        Attention.check_args(64, {"num_heads": 4, "rope_scaling": {"rope_type": "nope"}})
