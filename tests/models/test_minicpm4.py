"""MiniCPM4 family: checkpoints in the hub's format (state dict + config.json written from the reference sheet, random
weights, GQA groups of 16 and of 8) load strictly, and their logits equal a hand-written MiniCPM forward (a Llama with
the three muP scalars and the hub's LongRoPE cache); sparse_config switches layers to InfLLM-v2."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

import zoo
from tests.helpers import max_abs
from zoo.hub import save_reference
from zoo.models.minicpm4 import enable_sparse

VOCAB, D, LAYERS, INTER = 300, 128, 2, 160


def write_checkpoint(path, *, heads, kv_heads, tie, rope_scaling=None, max_pos=64, sparse_config=None,
                     model_type=True, seed=0):
    torch.manual_seed(seed)
    hd = D // heads
    sd = {"model.embed_tokens.weight": torch.randn(VOCAB, D) * 0.5, "model.norm.weight": 1 + 0.1 * torch.randn(D)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(D)
        sd[p + "post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(D)
        sd[p + "self_attn.q_proj.weight"] = torch.randn(heads * hd, D) / math.sqrt(D)
        sd[p + "self_attn.k_proj.weight"] = torch.randn(kv_heads * hd, D) / math.sqrt(D)
        sd[p + "self_attn.v_proj.weight"] = torch.randn(kv_heads * hd, D) / math.sqrt(D)
        sd[p + "self_attn.o_proj.weight"] = torch.randn(D, heads * hd) / math.sqrt(D)
        sd[p + "mlp.gate_proj.weight"] = torch.randn(INTER, D) / math.sqrt(D)
        sd[p + "mlp.up_proj.weight"] = torch.randn(INTER, D) / math.sqrt(D)
        sd[p + "mlp.down_proj.weight"] = torch.randn(D, INTER) / math.sqrt(INTER)
    if not tie:
        sd["lm_head.weight"] = torch.randn(VOCAB, D) * 0.5
    cfg = {"architectures": ["MiniCPMForCausalLM"], "hidden_size": D, "intermediate_size": INTER,
           "num_hidden_layers": LAYERS, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
           "hidden_act": "silu", "rms_norm_eps": 1e-5, "vocab_size": VOCAB, "max_position_embeddings": max_pos,
           "rope_theta": 10000.0, "scale_emb": 12, "dim_model_base": 32, "scale_depth": 1.4,
           "bos_token_id": 1, "eos_token_id": [2, 299], "torch_dtype": "float32"}
    if model_type:
        cfg["model_type"] = "minicpm"
    if not tie:
        cfg["tie_word_embeddings"] = False  # absent = the class default, tied
    if rope_scaling is not None:
        cfg["rope_scaling"] = rope_scaling
    if sparse_config is not None:
        cfg["sparse_config"] = sparse_config
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    save_file(sd, str(path / "model.safetensors"))
    return sd, cfg


def minicpm_forward(sd, cfg, ids):
    """The hub's MiniCPMForCausalLM forward (eager attention), fp32, written from the reference sheet."""
    H, Hkv, L = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_hidden_layers"]
    hd = cfg["hidden_size"] // H
    T = ids.shape[1]
    eps = cfg["rms_norm_eps"]

    def rms(x, w):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return w * (x * torch.rsqrt(var + eps))

    # MiniCPMLongRoPE._set_cos_sin_cache(max_position_embeddings) / MiniCPMRotaryEmbedding
    inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))
    t = torch.arange(max(cfg["max_position_embeddings"], T)).float()
    rs, factor = cfg.get("rope_scaling"), 1.0
    if rs:
        orig, max_pos = rs["original_max_position_embeddings"], cfg["max_position_embeddings"]
        ext = torch.tensor(rs["long_factor"] if max(max_pos, T) > orig else rs["short_factor"])
        freqs = torch.outer(t, 1.0 / ext) * inv_freq
        factor = math.sqrt(1 + math.log(max_pos / orig) / math.log(orig))
    else:
        freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = (emb.cos() * factor)[:T], (emb.sin() * factor)[:T]

    def rot(x):
        x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    h = sd["model.embed_tokens.weight"][ids] * cfg["scale_emb"]
    res = cfg["scale_depth"] / math.sqrt(L)
    mask = torch.full((T, T), -math.inf).triu(1)
    for i in range(L):
        p = f"model.layers.{i}."
        x = rms(h, sd[p + "input_layernorm.weight"])
        q = (x @ sd[p + "self_attn.q_proj.weight"].T).view(1, T, H, hd).transpose(1, 2)
        k = (x @ sd[p + "self_attn.k_proj.weight"].T).view(1, T, Hkv, hd).transpose(1, 2)
        v = (x @ sd[p + "self_attn.v_proj.weight"].T).view(1, T, Hkv, hd).transpose(1, 2)
        q, k = rot(q), rot(k)
        k, v = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask, -1, dtype=torch.float32) @ v
        h = h + (att.transpose(1, 2).reshape(1, T, -1) @ sd[p + "self_attn.o_proj.weight"].T) * res
        x = rms(h, sd[p + "post_attention_layernorm.weight"])
        mlp = torch.nn.functional.silu(x @ sd[p + "mlp.gate_proj.weight"].T) * (x @ sd[p + "mlp.up_proj.weight"].T)
        h = h + (mlp @ sd[p + "mlp.down_proj.weight"].T) * res
    h = rms(h, sd["model.norm.weight"])
    head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    return (h / (cfg["hidden_size"] / cfg["dim_model_base"])) @ head.T


def longrope(hd, max_pos, orig, seed=7):
    g = torch.Generator().manual_seed(seed)
    return {"rope_type": "longrope", "original_max_position_embeddings": orig,
            "long_factor": (1 + 3 * torch.rand(hd // 2, generator=g)).tolist(),
            "short_factor": (1 + 0.2 * torch.rand(hd // 2, generator=g)).tolist()}


CASES = {  # heads, kv heads (group), tie, rope: (max_position_embeddings, original)
    "group16_untied_longrope_128k_recipe": (16, 1, False, (64, 48)),  # T = 40 < 48: the hub still uses long
    "group8_tied_longrope_shipped": (16, 2, True, (64, 64)),
    "group8_tied_plain_rope": (8, 1, True, None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_dense_logits_match_handwritten_minicpm(name, tmp_path):
    heads, kv, tie, rope = CASES[name]
    scaling = longrope(D // heads, *rope) if rope else None
    sd, cfg = write_checkpoint(tmp_path, heads=heads, kv_heads=kv, tie=tie, rope_scaling=scaling,
                               max_pos=rope[0] if rope else 64, model_type=name != "group8_tied_longrope_shipped")
    model = zoo.from_pretrained(tmp_path)
    c = model.config
    assert c.family == "minicpm4" and c.tie_embeddings == tie
    assert (model.lm_head.weight is model.embedding.weight) == tie
    assert c.mixer_kwargs(0)["num_kv_heads"] == kv and c.embedding_scale == 12
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert max_abs(model(ids).logits, minicpm_forward(sd, cfg, ids)) < 1e-4


SPARSE = {"kernel_size": 4, "kernel_stride": 2, "block_size": 8, "window_size": 8, "topk": 3, "init_blocks": 1}


def test_sparse_config_makes_infllmv2_layers_dense_below_dense_len(tmp_path):
    sd, cfg = write_checkpoint(tmp_path, heads=16, kv_heads=1, tie=False, sparse_config={**SPARSE, "dense_len": 64})
    model = zoo.from_pretrained(tmp_path)
    assert {ls.mixer for ls in model.config.layers} == {"infllmv2"}
    args = model.config.mixer_kwargs(0)
    assert (args["kernel_size"], args["dense_len"], args["use_nope"], args["variant"]) == (4, 64, False, "v2")
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():  # 40 < dense_len: every query dense
        assert max_abs(model(ids).logits, minicpm_forward(sd, cfg, ids)) < 1e-4


def test_enable_sparse_on_a_dense_checkpoint(tmp_path):
    sd, cfg = write_checkpoint(tmp_path, heads=16, kv_heads=2, tie=True)
    dense = zoo.from_pretrained(tmp_path)
    sparse = zoo.create_model(enable_sparse(dense.config, {**SPARSE, "dense_len": 16}))
    sparse.load_state_dict(dense.state_dict())  # no new parameters
    ids = torch.randint(0, VOCAB, (2, 45), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, out = dense(ids).logits, sparse(ids).logits
        assert max_abs(out[:, :15], ref[:, :15]) < 1e-4  # queries p + 1 < dense_len
        assert max_abs(out, ref) > 1e-3  # the sparse queries see fewer blocks
        # cached decode reproduces the parallel logits through the sparse layers
        states = sparse.init_states(2)
        steps = [sparse(ids[:, :20], states=states).logits]
        steps += [sparse(ids[:, t:t + 1], states=states).logits for t in range(20, 45)]
        assert max_abs(torch.cat(steps, 1), out) < 1e-4


def test_export_round_trip(tmp_path):
    sd, cfg = write_checkpoint(tmp_path / "ref", heads=16, kv_heads=1, tie=False,
                               rope_scaling=longrope(8, 64, 32), sparse_config={**SPARSE, "dense_len": 16})
    model = zoo.from_pretrained(tmp_path / "ref")
    save_reference(model, tmp_path / "out")
    out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    for key in ("scale_emb", "dim_model_base", "scale_depth", "rope_scaling", "num_key_value_heads"):
        assert out_cfg[key] == cfg[key], key
    assert out_cfg["sparse_config"] == {**SPARSE, "dense_len": 16, "use_nope": False}
    back = zoo.from_pretrained(tmp_path / "out")
    ids = torch.randint(0, VOCAB, (1, 30))
    with torch.no_grad():
        assert max_abs(back(ids).logits, model(ids).logits) == 0.0


def test_presets():
    for name, (kv, tie) in {"minicpm4-0.5b": (2, True), "minicpm4-8b": (2, False), "minicpm4.1-8b": (2, False)}.items():
        cfg = zoo.ZooConfig.from_preset(name)
        assert cfg.family == "minicpm4" and cfg.tie_embeddings == tie and cfg.mixer_kwargs(0)["num_kv_heads"] == kv
        assert cfg.embedding_scale == 12.0 and cfg.logit_scale == 256 / cfg.d_model
    assert zoo.ZooConfig.from_preset("minicpm4-0.5b").mixer_kwargs(0)["num_heads"] == 16  # groups of 8


def test_unknown_sparse_key_is_refused(tmp_path):
    write_checkpoint(tmp_path, heads=8, kv_heads=1, tie=True, sparse_config={"topk": 4, "blocksize": 8})
    with pytest.raises(ValueError, match="blocksize"):
        zoo.from_pretrained(tmp_path)
