"""sliding_window against transformers' sliding-window attention: a random MistralForCausalLM (fp32, eager)
loaded through zoo.from_pretrained (Llama key table), logits at T > window and greedy generation."""

import pytest
import torch

import zoo


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=8,
                        max_position_embeddings=256, attn_implementation="eager")
    model = MistralForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("mistral")
    model.save_pretrained(path)
    return model, path


def test_logits_match_transformers_past_the_window(mistral):
    ref, path = mistral
    model = zoo.from_pretrained(path).eval()
    assert [ls.spec_string for ls in model.config.layers] == ["sliding_window(window=8)"] * 2
    ids = torch.randint(0, 128, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(ids).logits
    got = model(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    full = zoo.swap_layers(zoo.from_pretrained(path), {"all": "attention"})
    assert (full(ids).logits - expected).abs().max() > 1e-3  # the reference really used the window


def test_greedy_generation_matches_transformers(mistral):
    ref, path = mistral
    model = zoo.from_pretrained(path).eval()
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, max_new_tokens=16, eos_token_id=[]), expected)
