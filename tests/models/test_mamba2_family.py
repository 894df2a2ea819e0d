"""Mamba-2 family: random-weight transformers ``Mamba2ForCausalLM`` checkpoints in the transformers and mamba_ssm
layouts load through ``zoo.from_pretrained`` with matching logits; exports round-trip; presets and config errors.

transformers 5.24's ``MambaRMSNormGated`` groups its mean square by ``n_groups`` (the G>1 bug noted in the
reference sheet for 4.57 is fixed there), so the reference runs unpatched with ``n_groups=2``."""

from __future__ import annotations

import json

import pytest
import torch

import zoo
from zoo.checkpoint import _load_bin
from zoo.models.mamba2 import calibrate_state_norm, save_mamba_ssm, save_transformers

pytestmark = pytest.mark.usefixtures("single_thread")


VOCAB_REAL, VOCAB_PAD = 100, 112  # mamba_ssm pads 100 up to a multiple of 16


def hf_model(tie: bool, seed: int = 0):
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(seed)
    cfg = Mamba2Config(vocab_size=VOCAB_PAD, hidden_size=48, num_heads=8, head_dim=12, state_size=16, n_groups=2,
                       expand=2, conv_kernel=4, chunk_size=16, num_hidden_layers=3, tie_word_embeddings=tie,
                       layer_norm_epsilon=1e-5, residual_in_fp32=True, pad_token_id=0, bos_token_id=0,
                       eos_token_id=0)
    m = Mamba2ForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial values for every tensor (norms, D, biases are 1/0 at init)
        for name, p in m.named_parameters():
            if "A_log" in name:
                p.copy_(torch.linspace(-1.5, 1.5, p.numel()))
            elif name.endswith("lm_head.weight") and tie:
                continue
            else:
                p.add_(0.2 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """The same random weights in both layouts: (transformers dir, model), (mamba_ssm dir, model)."""
    root = tmp_path_factory.mktemp("mamba2_ref")
    untied = hf_model(tie=False)
    untied.save_pretrained(root / "hf")
    tied = hf_model(tie=True, seed=1)
    # mamba_ssm layout, written independently of the zoo converter: config per MambaConfig, keys per mamba_ssm
    sd = {k.replace("backbone.embeddings.", "backbone.embedding."): v.clone() for k, v in tied.state_dict().items()}
    sd["lm_head.weight"] = sd["backbone.embedding.weight"]
    (root / "ssm").mkdir()
    torch.save(sd, root / "ssm" / "pytorch_model.bin")
    (root / "ssm" / "config.json").write_text(json.dumps({
        "d_model": 48, "d_intermediate": 0, "n_layer": 3, "vocab_size": VOCAB_REAL,
        "ssm_cfg": {"layer": "Mamba2", "d_state": 16, "headdim": 12, "ngroups": 2, "chunk_size": 16},
        "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
        "pad_vocab_size_multiple": 16, "tie_embeddings": True}))
    return {"hf": (root / "hf", untied), "ssm": (root / "ssm", tied)}


def ids(seed=0, T=37, B=2):
    return torch.randint(0, VOCAB_REAL, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layout", ["hf", "ssm"])
def test_load_matches_transformers_logits(hf_dirs, layout):
    path, ref = hf_dirs[layout]
    model = zoo.from_pretrained(path)
    assert model.config.family == "mamba2" and model.config.vocab_size == VOCAB_PAD
    assert all(ls.mlp is None and ls.mixer == "mamba2" for ls in model.config.layers)
    x = ids()
    with torch.no_grad():
        want = ref(x).logits
        got = model(x).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    # left-padded batch: the real positions agree with transformers (which masks inputs, not dt)
    mask = torch.ones_like(x)
    mask[0, :9] = 0
    with torch.no_grad():
        want = ref(x, attention_mask=mask).logits
        got = model(x, attention_mask=mask).logits
    torch.testing.assert_close(got[0, 9:], want[0, 9:], rtol=0, atol=1e-4)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-4)


def test_greedy_generation_matches_transformers(hf_dirs):
    path, ref = hf_dirs["hf"]
    model = zoo.from_pretrained(path)
    x = ids(T=21, B=1)
    want = ref.generate(x, max_new_tokens=6, do_sample=False, eos_token_id=None)
    got = model.generate(x, max_new_tokens=6, eos_token_id=[])
    assert got.shape == want.shape == (1, 27) and torch.equal(got, want)


@pytest.mark.parametrize("layout", ["hf", "ssm"])
def test_export_round_trips(hf_dirs, layout, tmp_path):
    path, ref = hf_dirs[layout]
    model = zoo.from_pretrained(path)
    x = ids(1)
    with torch.no_grad():
        base = model(x).logits
    save_mamba_ssm(model, tmp_path / "ssm")
    save_transformers(model, tmp_path / "hf")
    # the mamba_ssm export: plain tensors, mamba_ssm key names (tied head still stored), a MambaConfig
    sd = _load_bin(tmp_path / "ssm" / "pytorch_model.bin")
    assert "backbone.embedding.weight" in sd and "lm_head.weight" in sd
    assert set(sd) == {k.replace("backbone.embeddings.", "backbone.embedding.") for k in ref.state_dict()} | {
        "lm_head.weight"}
    cfg = json.loads((tmp_path / "ssm" / "config.json").read_text())
    assert cfg["ssm_cfg"]["layer"] == "Mamba2" and cfg["ssm_cfg"]["ngroups"] == 2 and cfg["n_layer"] == 3
    # the transformers export loads in transformers and gives the same logits
    from transformers import Mamba2ForCausalLM

    hf2 = Mamba2ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf2(x).logits, base, rtol=0, atol=1e-4)
    for sub in ("ssm", "hf"):
        again = zoo.from_pretrained(tmp_path / sub)
        with torch.no_grad():
            assert torch.equal(again(x).logits, base)
    # and the zoo format
    model.save_pretrained(tmp_path / "zoo")
    with torch.no_grad():
        assert torch.equal(zoo.from_pretrained(tmp_path / "zoo")(x).logits, base)


def test_chunked_prefill_and_decode_match_parallel(hf_dirs):
    model = zoo.from_pretrained(hf_dirs["ssm"][0]).double()
    x = ids(2, T=40)
    with torch.no_grad():
        full = model(x).logits
        st = model.init_states(2)
        outs = [model(x[:, :13], states=st).logits, model(x[:, 13:30], states=st).logits]
        outs += [model(x[:, t:t + 1], states=st).logits for t in range(30, 40)]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-5)


def test_presets_shapes():
    cfg = zoo.ZooConfig.from_preset("mamba2-130m")
    with torch.device("meta"):
        m = zoo.create_model(cfg)
    sd = m.state_dict()
    assert sd["embedding.weight"].shape == (50288, 768)
    assert sd["layers.0.mixer.in_proj.weight"].shape == (3352, 768)
    assert sd["layers.0.mixer.conv1d.weight"].shape == (1792, 1, 4)
    assert sd["layers.0.mixer.norm.weight"].shape == (1536,)
    assert sd["layers.0.mixer.out_proj.weight"].shape == (768, 1536)
    assert sd["layers.0.mixer.A_log"].shape == (24,)
    assert len(m.layers) == 24 and all(b.mlp is None for b in m.layers)
    cfg = zoo.ZooConfig.from_preset("mamba2-2.7b")
    assert cfg.n_layers == 64 and cfg.d_model == 2560
    with torch.device("meta"):
        m = zoo.create_model("mamba2attn-2.7b")
    assert m.layers[0].mixer.in_proj.weight.shape == (10576, 2560)
    assert [i for i, ls in enumerate(m.config.layers) if ls.mixer == "attention"] == [9, 18, 27, 36, 45, 56]
    assert m.layers[9].mixer.q_proj.weight.shape == (3840, 2560)
    assert "mamba2" in zoo.list_families()
    assert {"mamba2-130m", "mamba2-370m", "mamba2-780m", "mamba2-1.3b", "mamba2-2.7b",
            "mamba2attn-2.7b"} <= set(zoo.models.list_presets())


@pytest.mark.parametrize("cfg,match", [
    ({"d_model": 8, "n_layer": 1, "vocab_size": 10, "ssm_cfg": {}}, "ssm_cfg.layer='Mamba1'"),
    ({"d_model": 8, "n_layer": 1, "vocab_size": 10, "ssm_cfg": {"layer": "Mamba2", "foo": 1}}, "unsupported ssm_cfg"),
    ({"d_model": 64, "n_layer": 2, "vocab_size": 10, "ssm_cfg": {"layer": "Mamba2", "headdim": 16},
      "attn_layer_idx": [1], "attn_cfg": {"num_heads": 4, "causal": True, "d_conv": 4}}, "attn_cfg.d_conv=4"),
    ({"model_type": "mamba2", "hidden_size": 64, "num_heads": 3, "head_dim": 64, "num_hidden_layers": 1,
      "vocab_size": 10}, "num_heads\\*head_dim=192"),
    ({"d_model": 64, "n_layer": 1, "vocab_size": 10, "ssm_cfg": {"layer": "Mamba2", "headdim": 48}},
     "not divisible by headdim=48"),
])
def test_reference_config_errors(tmp_path, cfg, match):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        zoo.from_pretrained(tmp_path)


def test_hybrid_attention_keys_round_trip(tmp_path):
    """mamba_ssm MHA layout without the qkv conv: packed in_proj <-> q/k/v, out_proj <-> o_proj."""
    ref_cfg = {"d_model": 64, "d_intermediate": 96, "n_layer": 3, "vocab_size": 50,
               "ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 16, "chunk_size": 8},
               "attn_layer_idx": [1], "attn_cfg": {"num_heads": 4, "num_heads_kv": 2, "head_dim": 16, "causal": True,
                                                   "rotary_emb_dim": 8, "qkv_proj_bias": False,
                                                   "out_proj_bias": False},
               "rms_norm": True, "residual_in_fp32": True, "pad_vocab_size_multiple": 8, "tie_embeddings": True}
    cfg = zoo.models.mamba2.config_from_reference(ref_cfg)
    m = zoo.create_model(cfg)
    save_mamba_ssm(m, tmp_path / "ssm")
    sd = _load_bin(tmp_path / "ssm" / "pytorch_model.bin")
    assert sd["backbone.layers.1.mixer.in_proj.weight"].shape == ((4 + 2 * 2) * 16, 64)
    assert sd["backbone.layers.1.mixer.out_proj.weight"].shape == (64, 64)
    assert sd["backbone.layers.0.mlp.fc1.weight"].shape == (2 * 128, 64)  # d_intermediate rounded up to 128
    back = zoo.from_pretrained(tmp_path / "ssm")
    x = torch.randint(0, 50, (1, 11))
    with torch.no_grad():
        assert torch.equal(back(x).logits, m(x).logits)


def test_calibrate_state_norm(hf_dirs, tmp_path):
    model = zoo.from_pretrained(hf_dirs["ssm"][0])
    x = ids(3, T=48)
    st = model.init_states(2)
    with torch.no_grad():
        model(x, states=st)
    expect = {i: 2.0 * torch.linalg.vector_norm(st.layers[i].ssm_state, dim=(-2, -1)).amax(0) for i in range(3)}
    thr = calibrate_state_norm(model, x, multiplier=2.0)
    assert sorted(thr) == [0, 1, 2] and all(len(v) == 8 for v in thr.values())
    for i in thr:
        torch.testing.assert_close(torch.tensor(thr[i]), expect[i], rtol=1e-6, atol=0)
        assert model.layers[i].mixer.state_norm_threshold == thr[i]
    st = model.init_states(2)
    with torch.no_grad():
        model(torch.cat([x, x, x], 1), states=st)  # 144 tokens: 9 boundaries of chunk_size 16
    for i in thr:
        assert (torch.linalg.vector_norm(st.layers[i].ssm_state, dim=(-2, -1)) <= torch.tensor(thr[i]) * 1.00001).all()
    model.save_pretrained(tmp_path / "cal")
    again = zoo.from_pretrained(tmp_path / "cal")
    assert again.layers[1].mixer.state_norm_threshold == thr[1]
    with pytest.raises(ValueError, match="inference-time mitigations"):
        save_mamba_ssm(model, tmp_path / "ssm")


def test_swap_attention_layer_to_mamba2_and_generate(tmp_path):
    torch.manual_seed(0)
    model = zoo.create_model({"vocab_size": 64, "d_model": 32, "n_layers": 2, "mixers": "attention",
                              "mlp": {"intermediate_size": 64}, "mixer_defaults": {"attention": {"num_heads": 4}}})
    zoo.swap_layers(model, {"1": "mamba2(d_state=8, headdim=8, chunk_size=8, decay_scale=0.99)"})
    assert model.layers[1].mixer.A_log.shape == (8,) and model.config.layers[1].mixer == "mamba2"
    x = torch.randint(0, 64, (2, 13))
    mask = torch.ones_like(x)
    mask[0, :4] = 0
    with torch.no_grad():
        out = model.generate(x, attention_mask=mask, max_new_tokens=5, eos_token_id=[])
        alone = model.generate(x[:1, 4:], max_new_tokens=5, eos_token_id=[])
    assert torch.equal(out[0, -5:], alone[0, -5:])  # the left-padded row generates what it generates alone
    model.save_pretrained(tmp_path / "swapped")
    again = zoo.from_pretrained(tmp_path / "swapped")
    with torch.no_grad():
        assert torch.equal(again(x).logits, model(x).logits)
