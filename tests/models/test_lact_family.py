"""The LaCT family: the released lact_swiglu configs convert (and the broken 3B one fails clearly), the key/shape
table of the spec sheet matches the 760M model, a reference-format checkpoint with random weights loads strictly
and its logits equal an independent float64 reference LM, and greedy generation (incremental, crossing chunk
boundaries) equals the reference's recompute-the-prefix decoding."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import zoo
from tests.layers.lact_reference import lact_lm
from zoo.checkpoint import save_reference
from zoo.models import lact as fam

pytestmark = pytest.mark.usefixtures("single_thread")

COMMON = {"model_type": "lact_swiglu", "num_hidden_layers": 24, "num_lact_heads": 4, "inter_multi": 1,
          "qkv_bias": False, "attn_qk_norm": False, "qkv_silu": True, "lact_chunk_size": 2048, "window_size": 2048,
          "lr_dim": 1, "lr_parameterization": "mamba", "learnable_ttt_scale": True, "w0_w2_low_rank": 32,
          "fw_init_gain": 0.5, "use_momentum": True, "rope_theta": 1000000, "norm_eps": 1e-06,
          "tie_word_embeddings": False, "max_position_embeddings": 32768, "initializer_range": 0.02,
          "vocab_size": 32000, "hidden_act": "swish", "attention_bias": False, "bos_token_id": 1, "eos_token_id": 2,
          "fuse_cross_entropy": True, "fuse_norm": True, "use_cache": True}
# lact_llm/configs/*.json (sheet §1.1)
RELEASED = {
    "760M_momentum": {**COMMON, "hidden_size": 1536, "num_attn_heads": 24, "use_muon": False},
    "760M_momentum_muon": {**COMMON, "hidden_size": 1536, "num_attn_heads": 24, "use_muon": True},
    "760M_momentum_fused_kernel": {**COMMON, "hidden_size": 1536, "num_attn_heads": 24, "use_muon": False,
                                   "no_v_silu": True, "use_fused_kernel": True, "fp32_states": True},
    "3B_momentum_muon": {**COMMON, "hidden_size": 3072, "num_attn_heads": 24, "use_muon": True},
}


@pytest.mark.parametrize("name", list(RELEASED))
def test_released_configs_convert(name):
    ref = RELEASED[name]
    cfg = fam.config_from_reference(ref)
    d = ref["hidden_size"]
    assert (cfg.d_model, cfg.n_layers, cfg.vocab_size, cfg.rope_theta, cfg.norm_eps) == (d, 24, 32000, 1e6, 1e-6)
    assert not cfg.tie_embeddings and cfg.max_position_embeddings == 32768
    assert {ls.mixer for ls in cfg.layers} == {"lact"}
    assert cfg.layers[0].mlp["intermediate_size"] == {1536: 4096, 3072: 8192}[d]  # fla GatedMLP width
    args = cfg.mixer_kwargs(0)
    assert args["chunk_size"] == 2048 and args["window_size"] == 2048 and args["w0_w2_low_rank"] == 32
    assert args["use_muon"] == ref["use_muon"] and args["use_momentum"] and args["learnable_ttt_scale"]
    assert args["no_v_silu"] == ref.get("no_v_silu", False)
    assert args["use_fused_kernel"] == ref.get("use_fused_kernel", False)
    back = fam.config_to_reference(cfg)
    for key in ("hidden_size", "num_attn_heads", "num_lact_heads", "lact_chunk_size", "window_size", "use_muon",
                "use_momentum", "w0_w2_low_rank", "no_v_silu", "use_fused_kernel", "fp32_states", "rope_theta"):
        assert back[key] == ref.get(key, back[key]), key
    assert fam.config_from_reference(back).to_dict() == cfg.to_dict()


def test_broken_3b_config_fails_with_the_field_named():
    """3B_lact_swiglu_nh4_fwlow_rank_momentum.json has num_attn_heads=25 and hidden 3072 (not divisible)."""
    with pytest.raises(ValueError, match="num_attn_heads=25"):
        fam.config_from_reference({**COMMON, "hidden_size": 3072, "num_attn_heads": 25, "use_muon": False})
    assert fam.detect({"model_type": "lact_swiglu"}) and not fam.detect({"model_type": "llama"})


def reference_shapes(ref: dict) -> dict[str, tuple[int, ...]]:
    """Every key of LaCTForCausalLM's state dict and its shape, from the sheet (§1.2, §1.5)."""
    d, nh, r, V = ref["hidden_size"], ref["num_lact_heads"], ref["w0_w2_low_rank"], ref["vocab_size"]
    dh = d // nh
    inter = 256 * -(-int(d * 4 * 2 / 3) // 256)
    out = {"model.embeddings.weight": (V, d), "model.norm.weight": (d,), "lm_head.weight": (V, d)}
    for i in range(ref["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({p + "attn_norm.weight": (d,), p + "mlp_norm.weight": (d,),
                    p + "mlp.gate_proj.weight": (inter, d), p + "mlp.up_proj.weight": (inter, d),
                    p + "mlp.down_proj.weight": (d, inter),
                    p + "attn.qkv.weight": (3 * d, d), p + "attn.o_proj.weight": (d, d),
                    p + "attn.w1": (nh, dh, dh), p + "attn.lr_proj.weight": (3 * nh, d),
                    p + "attn.lr_proj.bias": (3 * nh,), p + "attn.qk_scale": (d, 2), p + "attn.qk_offset": (d, 2),
                    p + "attn.ttt_scale_proj.weight": (nh, d), p + "attn.ttt_scale_proj.bias": (nh,),
                    p + "attn.ttt_norm.weight": (dh,), p + "attn.momentum_proj.0.weight": (nh, d),
                    p + "attn.momentum_proj.0.bias": (nh,)})
        for w in ("w0", "w2"):
            if r > 0:
                out.update({p + f"attn.{w}.w_left": (nh, dh, r), p + f"attn.{w}.w_right": (nh, r, dh)})
            else:
                out[p + f"attn.{w}"] = (nh, dh, dh)
    return out


def test_760m_key_and_shape_table_and_size():
    ref = RELEASED["760M_momentum_muon"]
    cfg = fam.config_from_reference(ref)
    with torch.device("meta"):
        model = zoo.create_model(cfg)
    sd = fam.FAMILY.state_dict_to_reference(model.state_dict(), cfg)
    assert {k: tuple(v.shape) for k, v in sd.items()} == reference_shapes(ref)
    assert round(model.num_parameters() / 1e9, 2) == 0.80  # sheet: 760M ~ 0.80B


def tiny_reference(low_rank: int, muon: bool) -> dict:
    return {**COMMON, "hidden_size": 32, "num_hidden_layers": 2, "num_attn_heads": 4, "num_lact_heads": 2,
            "lact_chunk_size": 4, "window_size": 6, "w0_w2_low_rank": low_rank, "use_muon": muon, "vocab_size": 97,
            "rope_theta": 10000.0, "intermediate_size": 48}


def write_reference_checkpoint(path, ref: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = reference_shapes(ref)
    shapes.update({k: (ref["intermediate_size"], 32) if "gate" in k or "up_" in k else (32, ref["intermediate_size"])
                   for k in shapes if ".mlp." in k})
    sd = {k: torch.randn(s, generator=g) * (0.3 if len(s) > 1 else 0.1) + (1.0 if k.endswith("norm.weight") else 0)
          for k, s in shapes.items()}
    for k in sd:
        if k.endswith("qk_scale"):
            sd[k] = 1 + 0.2 * torch.randn(sd[k].shape, generator=g)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(ref))
    save_file(sd, str(path / "model.safetensors"))
    return sd


@pytest.mark.parametrize("low_rank,muon", [(3, True), (-1, False)])
def test_reference_checkpoint_loads_strictly_and_matches_the_reference_lm(tmp_path, low_rank, muon):
    ref = tiny_reference(low_rank, muon)
    sd = write_reference_checkpoint(tmp_path / "ref", ref, seed=1)
    model = zoo.from_pretrained(tmp_path / "ref").double()
    ids = torch.randint(0, 97, (2, 15), generator=torch.Generator().manual_seed(2))  # 3 chunks of 4 + 3
    expected = lact_lm(sd, ref, ids)
    torch.testing.assert_close(model(ids).logits, expected, atol=1e-9, rtol=1e-9)
    # export: the same keys and config back
    out = save_reference(model.float(), tmp_path / "back", "lact")
    back = json.loads((out / "config.json").read_text())
    assert {k: back[k] for k in ref if k in back} == {k: ref[k] for k in ref if k in back}
    from safetensors.torch import load_file
    again = load_file(str(out / "model.safetensors"))
    assert sorted(again) == sorted(sd)
    torch.testing.assert_close(again, sd)


def test_generation_equals_recomputing_the_prefix(tmp_path):
    """The reference recomputes the whole prefix at every generated token; the zoo decodes from its state.
    Greedy continuations over several chunk boundaries (chunk 4, prompt 6, 10 new tokens) must agree."""
    ref = tiny_reference(3, True)
    sd = write_reference_checkpoint(tmp_path / "ref", ref, seed=3)
    model = zoo.from_pretrained(tmp_path / "ref").double()
    ids = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(4))
    expected = ids
    for _ in range(10):
        nxt = lact_lm(sd, ref, expected)[:, -1].argmax(-1, keepdim=True)
        expected = torch.cat([expected, nxt], 1)
    assert torch.equal(model.generate(ids, max_new_tokens=10, eos_token_id=[]), expected)
