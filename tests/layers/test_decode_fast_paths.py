"""The lean decode paths of issue 17 pinned to the reference paths they stand in for: the Mamba-2 step's cached
plan (invalidated when parameters or thresholds change) and both conv-window layouts, the RMSNorm inference path,
``ZooForCausalLM.step`` vs the checked forward, and the sliding window's one-token projection (every RoPE kind).
Speed is measured by ``zoo bench``, never here."""

from __future__ import annotations

import copy

import pytest
import torch

import zoo
from tests.helpers import needs_compiler
from zoo.layers.mamba2 import Mamba2
from zoo.layers.norm import RMSNorm
from zoo.layers.sparse_attention import SlidingWindowAttention
from zoo.testing import GROUP_DEFAULTS

pytestmark = pytest.mark.usefixtures("single_thread")

D_MODEL = 24
EXACT = dict(rtol=0, atol=1e-10)


def _mamba(**kw) -> Mamba2:
    torch.manual_seed(0)
    m = Mamba2(D_MODEL, 0, **{"d_state": 8, "headdim": 6, "ngroups": 2, "chunk_size": 8, **kw})
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
        m.A_log.copy_(torch.linspace(-2.0, 1.0, m.nheads))
    return m.double()


def _steps_match(m: Mamba2, lean, ref, x: torch.Tensor, tol: dict) -> None:
    for t in range(x.shape[1]):
        y_lean, lean = m(x[:, t:t + 1], state=lean)
        y_ref = m._forward(x[:, t:t + 1], ref, None, None)
        torch.testing.assert_close(y_lean, y_ref, **tol)
        for name in ("conv_state", "ssm_state", "seen"):
            torch.testing.assert_close(getattr(lean, name), getattr(ref, name), **tol)


@pytest.mark.parametrize("kw", [{"norm_before_gate": True}, {"conv_bias": False, "bias": True},
                                {"ngroups": 1, "state_norm_threshold": [0.05, 0.1, 0.02, 1.0] * 2}])
def test_mamba2_lean_step_options_and_both_window_layouts(kw):
    """The lean step == the reference step with the conv state in its [B, K, C] memory layout (init_state and the
    prefills) and in a plain contiguous [B, C, K] one (after a reorder): outputs and states, fp64."""
    m = _mamba(**kw)
    x = torch.randn(3, 20, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        lean = m.init_state(3, dtype=torch.float64, device="cpu")
        assert lean.conv_state.transpose(1, 2).is_contiguous()
        m(x[:, :4], state=lean)
        assert lean.conv_state.transpose(1, 2).is_contiguous()
        ref = copy.deepcopy(lean)
        _steps_match(m, lean, ref, x[:, 4:10], EXACT)
        order = torch.tensor([2, 0, 1])
        lean.reorder(order)
        ref.reorder(order)
        assert lean.conv_state.is_contiguous()  # the other layout
        _steps_match(m, lean, ref, x[order, 10:], EXACT)


def test_mamba2_plan_follows_parameter_and_threshold_changes():
    """The plan cached on the layer is rebuilt when a parameter is written in place, replaced (``.data``), or the
    thresholds / decay_scale change after construction: the lean step keeps matching the reference step."""
    m = _mamba()
    x = torch.randn(2, 12, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        lean = m.init_state(2, dtype=torch.float64, device="cpu")
        m(x[:, :3], state=lean)
        ref = copy.deepcopy(lean)
        _steps_match(m, lean, ref, x[:, 3:5], EXACT)
        m.A_log.add_(0.3)
        m.dt_bias.data = m.dt_bias.data + 0.2
        m.conv1d.weight.mul_(1.5)
        m.norm.weight.sub_(0.1)
        m.D.add_(0.5)
        _steps_match(m, lean, ref, x[:, 5:8], EXACT)
        m.state_norm_threshold = [0.01] * m.nheads
        m.decay_scale = 0.8
        _steps_match(m, lean, ref, x[:, 8:], EXACT)


def test_mamba2_lean_step_fp32_within_1e5():
    m = _mamba().float()
    x = torch.randn(2, 14, D_MODEL)
    with torch.no_grad():
        lean = m.init_state(2, dtype=torch.float32, device="cpu")
        m(x[:, :4], state=lean)
        _steps_match(m, lean, copy.deepcopy(lean), x[:, 4:], dict(rtol=1e-5, atol=1e-5))


@needs_compiler
@pytest.mark.parametrize("kw", [{}, {"norm_before_gate": True, "D_has_hdim": True}, {"rmsnorm": False, "bias": True},
                                {"conv_bias": False, "d_ssm": 24, "ngroups": 1},
                                {"dt_limit": (0.01, 0.5), "dt_scale": 0.7, "input_scale": 0.5, "decay_scale": 0.9}])
def test_mamba2_native_step_matches_the_reference_and_torch_steps(kw, monkeypatch):
    """fp32 with d_state 16: the fused step of kernels/ssd/decode_cpu.cpp (every option it takes: norm before or
    after the gate, no norm, per-channel D, biases, the MLP part of a d_ssm < d_inner layer, the Stuffed-Mamba
    scales) == the reference step and the torch calls of the lean step, outputs and states. Thresholds (state-norm
    renormalisation) keep the torch calls."""
    m = _mamba(d_state=16, **kw).float()
    x = torch.randn(2, 14, D_MODEL)
    with torch.no_grad():
        lean = m.init_state(2, dtype=torch.float32, device="cpu")
        m(x[:, :4], state=lean)
        torch_calls = copy.deepcopy(lean)
        _steps_match(m, lean, copy.deepcopy(lean), x[:, 4:], dict(rtol=1e-5, atol=1e-5))
        assert m._decode_plan.native  # the fused step ran
        monkeypatch.setenv("ZOO_NATIVE", "off")
        for t in range(4, 14):
            m(x[:, t:t + 1], state=torch_calls)
        for name in ("conv_state", "ssm_state", "seen"):
            torch.testing.assert_close(getattr(torch_calls, name), getattr(lean, name), rtol=1e-5, atol=1e-5)
    m.state_norm_threshold = [0.05] * m.nheads
    with torch.no_grad():
        m(x[:, :1], state=m.init_state(2, dtype=torch.float32, device="cpu"))
    assert m._decode_plan.native is False


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rmsnorm_inference_path_matches_the_reference(dtype):
    """Without autograd RMSNorm takes its five-kernel path; with autograd the reference one: same values."""
    torch.manual_seed(0)
    norm = RMSNorm(40, eps=1e-3).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 40, dtype=dtype) * 3
    y_ref = norm(x.clone().requires_grad_()).detach()  # autograd: the reference expression
    with torch.no_grad():
        y = norm(x)
    tol = EXACT if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(y_ref, (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-3)) * norm.weight, **tol)


def _model(mixer: str, **config) -> zoo.ZooForCausalLM:
    cls = zoo.registry.get_mixer(mixer)
    torch.manual_seed(0)
    cfg = zoo.ZooConfig(vocab_size=53, d_model=32, n_layers=2,
                        layers=[zoo.LayerSpec(mixer, cls.example_args[0], {"intermediate_size": 40})] * 2,
                        mixer_defaults={g: a for g, a in GROUP_DEFAULTS.items() if g in cls.arg_groups}, **config)
    return zoo.create_model(cfg).double().eval()


@pytest.mark.parametrize("mixer,config", [
    ("mamba2", {}), ("mamba2", {"residual_in_fp32": False, "embedding_scale": 2.0, "logit_scale": 0.5}),
    ("sliding_window", {}), ("attention", {"norm": "layernorm", "tie_embeddings": True})])
def test_model_step_matches_the_checked_forward(mixer, config):
    """``step`` (the lean one-token path generate uses) == ``forward(..., logits_to_keep=1)`` token by token:
    logits and the model's time (next positions, offset)."""
    m = _model(mixer, **config)
    ids = torch.randint(0, 53, (2, 26), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = m.init_states(2), m.init_states(2)
        m(ids[:, :6], states=a)
        m(ids[:, :6], states=b)
        for t in range(6, 26):
            la = m.step(ids[:, t:t + 1], a)
            lb = m(ids[:, t:t + 1], states=b, logits_to_keep=1).logits[:, -1]
            torch.testing.assert_close(la, lb, **EXACT)
        assert torch.equal(a.next_position, b.next_position) and a.offset == b.offset


ROPES = [None, {"rope_type": "linear", "factor": 2.0},
         {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
         {"rope_type": "dynamic", "factor": 2.0},
         {"rope_type": "longrope", "long_factor": [1.0 + 0.3 * i for i in range(4)],
          "short_factor": [1.0 + 0.05 * i for i in range(4)], "original_max_position_embeddings": 8}]


@pytest.mark.parametrize("scaling", ROPES)
@pytest.mark.parametrize("extra", [{}, {"qk_norm": True}, {"rotary_dim": 4}])
@pytest.mark.parametrize("given", [True, False])
def test_sliding_window_project_step_matches_project(scaling, extra, given):
    """The one-token projection (q and k rotated together; positions given, or the host-side offset) == the
    reference projection, past max_position_embeddings too (the length-dependent RoPE kinds)."""
    if scaling and scaling["rope_type"] == "longrope" and "rotary_dim" in extra:
        scaling = {**scaling, "long_factor": scaling["long_factor"][:2], "short_factor": scaling["short_factor"][:2]}
    torch.manual_seed(0)
    m = SlidingWindowAttention(D_MODEL, 0, window=4, num_heads=4, num_kv_heads=2, head_dim=8, rope_scaling=scaling,
                               max_position_embeddings=16, **extra).double()
    x = torch.randn(3, 1, D_MODEL, dtype=torch.float64)
    for offset in (5, 40):
        pos = torch.full((3, 1), offset)
        with torch.no_grad():
            lean = m.project_step(x, pos if given else None, offset)
            ref = m.project(x, pos)
        for a, b in zip(lean, ref):
            torch.testing.assert_close(a, b, **EXACT)


def test_sliding_window_lean_step_fp32_and_no_positions():
    """Standalone use (no positions): the lean full-ring step == the parallel forward, fp32."""
    torch.manual_seed(0)
    m = SlidingWindowAttention(D_MODEL, 0, window=5, num_sink_tokens=1, num_heads=6, num_kv_heads=2, head_dim=4)
    x = torch.randn(2, 20, D_MODEL)
    with torch.no_grad():
        y_par, _ = m(x)
        st = m.init_state(2, dtype=torch.float32, device="cpu")
        ys = [m(x[:, t:t + 1], state=st)[0] for t in range(20)]
    torch.testing.assert_close(torch.cat(ys, 1), y_par, rtol=1e-5, atol=1e-5)
