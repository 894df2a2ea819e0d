"""MASFormer / LongGen presets on a Llama checkpoint: placement, weights reused, save/load, generate, KV bytes."""

import pytest
import torch

import zoo
from zoo.models.hybrid import longgen_layers, masformer_layers

PRESETS = {
    "masformer_blockdiag": lambda m: zoo.masformer(m, block_size=8),
    "masformer_window": lambda m: zoo.masformer(m, [0, 3], local="sliding_window", window=6),
    "longgen_sink_window": lambda m: zoo.longgen(m, window=8, num_sink_tokens=2),
    "longgen_strided": lambda m: zoo.longgen(m, sparse="strided", block_size=4, local_blocks=2, vertical_stride=3),
}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    path = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def test_default_placements():
    assert masformer_layers(24) == [0, 1, 2, 3]  # bottom layers (l = 4 of 24)
    assert masformer_layers(6) == [0]
    assert longgen_layers(32) == list(range(10, 21))  # middle third: 11 layers
    assert longgen_layers(6) == [2, 3]
    assert longgen_layers(9) == [3, 4, 5]


def test_explicit_placement_on_a_config():
    cfg = zoo.ZooConfig.from_dict({"d_model": 32, "n_layers": 6, "vocab_size": 64, "mlp": {"intermediate_size": 64},
                                   "mixer_defaults": {"attention": {"num_heads": 4}}})
    out = zoo.longgen(cfg, full_layers=[0, -1], sparse="strided")
    assert isinstance(out, zoo.ZooConfig)
    assert [ls.mixer for ls in out.layers] == ["attention"] + ["block_sparse"] * 4 + ["attention"]
    out = zoo.masformer(cfg, "1-2", block_size=16)
    assert [ls.mixer for ls in out.layers] == ["block_diagonal", "attention", "attention"] + ["block_diagonal"] * 3
    assert out.layers[0].mixer_args == {"block_size": 16}
    with pytest.raises(ValueError, match="local"):
        zoo.masformer(cfg, local="dilated")
    with pytest.raises(ValueError, match="full_layers"):
        zoo.longgen(cfg, full_layers=[7])


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_on_llama_checkpoint_save_load_generate(preset, llama_dir, tmp_path):
    base = zoo.from_pretrained(llama_dir)
    ref_weights = {k: v.clone() for k, v in base.state_dict().items()}
    model = PRESETS[preset](base).eval()
    assert {k: v for k, v in model.state_dict().items()}.keys() == ref_weights.keys()
    assert all(torch.equal(v, ref_weights[k]) for k, v in model.state_dict().items())  # parameter-free swap
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    logits = model(ids).logits
    full_logits = zoo.from_pretrained(llama_dir)(ids).logits
    assert (logits - full_logits).abs().max() > 1e-3  # the sparse layers do change the model beyond the window
    model.save_pretrained(tmp_path)
    again = zoo.from_pretrained(tmp_path).eval()
    assert [ls.to_dict() for ls in again.config.layers] == [ls.to_dict() for ls in model.config.layers]
    assert torch.equal(again(ids).logits, logits)
    # chunked prefill + decode through the model's states reproduce the parallel logits
    states = model.init_states(2)
    parts = [model(ids[:, a:b], states=states).logits for a, b in [(0, 13), (13, 14), (14, 40)]]
    torch.testing.assert_close(torch.cat(parts, 1), logits, atol=1e-5, rtol=0)
    # generate works, and a left-padded row generates what it generates alone
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids[:1, :20]], 1)
    batch = torch.cat([padded, ids[1:, :25]], 0)
    mask = torch.ones_like(batch)
    mask[0, :5] = 0
    out_b = model.generate(batch, attention_mask=mask, max_new_tokens=6)
    assert out_b.shape == (2, 31)
    torch.testing.assert_close(out_b[0, 5:], model.generate(ids[:1, :20], max_new_tokens=6)[0])


def test_longgen_kv_bytes_are_bounded(llama_dir):
    base = zoo.from_pretrained(llama_dir)
    full_model = zoo.from_pretrained(llama_dir)
    model = zoo.longgen(base, window=8, num_sink_tokens=2)  # layers 2, 3 full; 0, 1, 4, 5 sink + window
    sizes = {}
    for name, m in (("hybrid", model), ("full", full_model)):
        states = m.init_states(1, max_length=8)
        for t0 in range(0, 192, 64):
            m(torch.randint(0, 128, (1, 64)), states=states)
            sizes[name, t0 + 64] = ([s.nbytes for s in states.layers])
    for n in (64, 128, 192):
        sparse_layers = [sizes["hybrid", n][i] for i in (0, 1, 4, 5)]
        assert sparse_layers == [sizes["hybrid", 64][0]] * 4  # constant: 2 sinks + 8 window slots
        assert [sizes["hybrid", n][i] for i in (2, 3)] == [sizes["full", n][i] for i in (2, 3)]
    assert sizes["full", 192][0] == 3 * sizes["full", 64][0]  # full attention grows with the context


@pytest.mark.parametrize("recipe", [zoo.longgen, zoo.masformer])
def test_recipes_refuse_to_reinitialise_non_attention_layers(recipe):
    cfg = zoo.ZooConfig.from_dict({"d_model": 32, "n_layers": 6, "vocab_size": 64,
                                   "mixers": {"default": "attention", "1,4": "mamba2(d_state=8, headdim=16)"},
                                   "mixer_defaults": {"attention": {"num_heads": 4}}})
    torch.manual_seed(0)
    model = zoo.create_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"layers \['1: mamba2', '4: mamba2'\] are not attention layers"):
        recipe(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing changed
    assert [ls.mixer for ls in model.config.layers].count("mamba2") == 2
    swapped = recipe(cfg, allow_reinit=True)  # asked for explicitly
    assert "mamba2" not in [ls.mixer for ls in swapped.layers]
