"""Llama family: parity with transformers' LlamaForCausalLM (an independent reference), export, generation."""

import json

import pytest
import torch

import zoo
from tests.helpers import make_hf_llama, max_abs
from zoo.hub import save_reference


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf-llama")
    model = make_hf_llama(path)  # GQA 8:2 (4:1), untied, rope_theta 5e5, odd vocab 1001
    return path, model


def test_config_is_mapped(hf_llama):
    path, hf = hf_llama
    model = zoo.from_pretrained(path)
    cfg = model.config
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers) == (1001, 64, 3)
    att = cfg.mixer_kwargs(0)
    assert (att["num_heads"], att["num_kv_heads"], att["head_dim"], att["rope_theta"]) == (8, 2, 8, 500000.0)
    assert not cfg.tie_embeddings and cfg.layers[0].mlp["intermediate_size"] == 112


def test_logits_match_transformers(hf_llama):
    path, hf = hf_llama
    model = zoo.from_pretrained(path)
    ids = torch.randint(0, 1001, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids).logits
    assert max_abs(out, ref) < 1e-4


def test_logits_match_transformers_left_padded(hf_llama):
    path, hf = hf_llama
    model = zoo.from_pretrained(path)
    ids = torch.randint(0, 1001, (2, 20), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
        out = model(ids, attention_mask=mask).logits
    real = mask.bool()
    assert max_abs(out[real], ref[real]) < 1e-4


def test_export_back_to_transformers(hf_llama, tmp_path):
    from transformers import LlamaForCausalLM

    path, hf = hf_llama
    model = zoo.from_pretrained(path)
    save_reference(model, tmp_path / "exported")
    cfg = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["num_key_value_heads"] == 2
    back = LlamaForCausalLM.from_pretrained(tmp_path / "exported", attn_implementation="eager").eval()
    ids = torch.randint(0, 1001, (1, 16))
    with torch.no_grad():
        assert max_abs(back(ids).logits, hf(ids).logits) == 0.0


def test_tied_llama_with_llama3_rope(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    hf = make_hf_llama(tmp_path, tie=True, rope_scaling=scaling, seed=3)
    model = zoo.from_pretrained(tmp_path)
    assert model.config.tie_embeddings and model.lm_head.weight is model.embedding.weight
    assert model.config.rope_scaling["rope_type"] == "llama3"
    ids = torch.randint(0, 1001, (1, 100))
    with torch.no_grad():
        assert max_abs(model(ids).logits, hf(ids).logits) < 1e-4


def test_greedy_generate_matches_transformers_batched_left_padding(hf_llama):
    path, hf = hf_llama
    model = zoo.from_pretrained(path)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 1001, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :7] = 0
    ids = ids.masked_fill(mask == 0, 0)
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, max_new_tokens=15, do_sample=False, pad_token_id=0,
                          eos_token_id=None)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=15, eos_token_id=None, pad_token_id=0)
    assert torch.equal(out, ref)


def test_padded_row_generates_like_unpadded_row(hf_llama):
    path, _ = hf_llama
    model = zoo.from_pretrained(path)
    ids = torch.randint(3, 1001, (1, 9), generator=torch.Generator().manual_seed(5))
    alone = model.generate(ids, max_new_tokens=10, eos_token_id=None)
    padded = torch.cat([torch.zeros(1, 6, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 6, dtype=torch.long), torch.ones_like(ids)], 1)
    out = model.generate(padded, attention_mask=mask, max_new_tokens=10, eos_token_id=None)
    assert torch.equal(out[:, 6:], alone)


def test_sharded_checkpoint_loads(tmp_path):
    from transformers import LlamaForCausalLM

    hf = make_hf_llama(tmp_path / "one", seed=6)
    LlamaForCausalLM.from_pretrained(tmp_path / "one").save_pretrained(tmp_path / "sharded", max_shard_size="60KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    model = zoo.from_pretrained(tmp_path / "sharded")
    ids = torch.randint(0, 1001, (1, 7))
    with torch.no_grad():
        assert max_abs(model(ids).logits, hf(ids).logits) < 1e-4


def test_gradient_checkpointing_gives_same_gradients(hf_llama):
    path, _ = hf_llama
    model = zoo.from_pretrained(path).train()
    ids = torch.randint(0, 1001, (2, 11))
    model(ids, labels=ids).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, ref[n], atol=1e-6), n
