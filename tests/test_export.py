"""Export: zoo -> every reference format (``zoo convert --to``) -> the reference's own loader gives the zoo model's
logits; formats refuse, naming the layers, what they cannot hold; tokenizer files travel through conversion."""

from __future__ import annotations

import json
import re

import pytest
import torch

import zoo
from tests.helpers import make_hf_llama, make_word_tokenizer, max_abs
from zoo.cli import main
from zoo.tokenizers import DNAKmerTokenizer

pytestmark = pytest.mark.usefixtures("single_thread")

ATT = {"attention": {"num_heads": 4, "num_kv_heads": 2}}
MLP = {"intermediate_size": 48}
CONFIGS = {
    "llama": {"vocab_size": 97, "family": "llama", "mixers": "attention", "mlp": MLP, "mixer_defaults": ATT},
    "mistral": {"vocab_size": 97, "family": "mistral", "mixers": "sliding_window(window=5)", "mlp": MLP,
                "mixer_defaults": ATT},
    "generator": {"vocab_size": 4128, "family": "generator", "mixers": "attention", "mlp": MLP, "mixer_defaults": ATT,
                  "tie_embeddings": False, "bos_token_id": 1, "eos_token_id": 2},
    "mamba2": {"vocab_size": 96, "family": "mamba2", "mixers": "mamba2(d_state=8, headdim=16, chunk_size=8)",
               "tie_embeddings": True, "residual_in_fp32": True, "mixer_defaults": {"mamba2": {"norm_eps": 1e-5}}},
}
CONFIGS["mamba2-transformers"] = CONFIGS["mamba2"]


def zoo_model(fmt: str, seed: int = 0) -> zoo.ZooForCausalLM:
    torch.manual_seed(seed)
    model = zoo.create_model({"d_model": 32, "n_layers": 2, "norm_eps": 1e-5, **CONFIGS[fmt]}).eval()
    with torch.no_grad():  # move every tensor off its init value (norms 1, D 1, biases 0) so a dropped one shows
        for name, p in model.named_parameters():
            if name != "lm_head.weight" or not model.config.tie_embeddings:
                p.add_(0.05 * torch.randn_like(p))
    return model


def load_mamba_ssm_with_transformers(path):
    """An independent reader of a mamba_ssm directory (``MambaConfig`` JSON + ``pytorch_model.bin``, mamba_ssm's
    defaults for omitted ``ssm_cfg`` keys) into transformers' ``Mamba2ForCausalLM``."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    cfg = json.loads((path / "config.json").read_text())
    ssm = {"d_state": 128, "d_conv": 4, "expand": 2, "headdim": 64, "ngroups": 1, "chunk_size": 256, "bias": False,
           "conv_bias": True, **cfg["ssm_cfg"]}
    assert ssm.pop("layer") == "Mamba2" and cfg["d_intermediate"] == 0 and not cfg["attn_layer_idx"]
    vocab, multiple = cfg["vocab_size"], cfg.get("pad_vocab_size_multiple", 8)
    vocab += (multiple - vocab % multiple) % multiple
    hf = Mamba2ForCausalLM(Mamba2Config(
        vocab_size=vocab, hidden_size=cfg["d_model"], num_hidden_layers=cfg["n_layer"], state_size=ssm["d_state"],
        head_dim=ssm["headdim"], expand=ssm["expand"], num_heads=ssm["expand"] * cfg["d_model"] // ssm["headdim"],
        n_groups=ssm["ngroups"], conv_kernel=ssm["d_conv"], chunk_size=ssm["chunk_size"], use_bias=ssm["bias"],
        use_conv_bias=ssm["conv_bias"], tie_word_embeddings=cfg["tie_embeddings"], layer_norm_epsilon=1e-5,
        residual_in_fp32=cfg["residual_in_fp32"]))
    sd = torch.load(path / "pytorch_model.bin", weights_only=True)
    sd = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in sd.items()}
    hf.load_state_dict(sd, strict=True)
    return hf.eval()


def reference_loader(fmt: str, path):
    import transformers

    if fmt == "mamba2":
        return load_mamba_ssm_with_transformers(path)
    cls = {"llama": "LlamaForCausalLM", "generator": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
           "mamba2-transformers": "Mamba2ForCausalLM"}[fmt]
    kw = {} if fmt.startswith("mamba2") else {"attn_implementation": "eager"}
    return getattr(transformers, cls).from_pretrained(path, **kw).eval()


@pytest.mark.parametrize("fmt", ["llama", "mistral", "generator", "mamba2", "mamba2-transformers"])
def test_export_round_trips_through_the_reference_loader(fmt, tmp_path):
    model = zoo_model(fmt)
    model.save_pretrained(tmp_path / "zoo")
    assert main(["convert", str(tmp_path / "zoo"), str(tmp_path / "ref"), "--to", fmt]) == 0
    ref = reference_loader(fmt, tmp_path / "ref")
    ids = torch.randint(0, 90, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert max_abs(ref(ids).logits[..., :model.config.vocab_size], model(ids).logits) < 1e-4
        back = zoo.from_pretrained(tmp_path / "ref")  # and the zoo reads its own export back exactly
        assert torch.equal(back(ids).logits, model(ids).logits)


def test_lact_export_matches_the_independent_reference_lm(tmp_path):
    """zoo -> lact_swiglu (config.json + model.safetensors) -> the float64 reference LM of tests/layers."""
    from safetensors.torch import load_file

    from tests.layers.lact_reference import lact_lm
    from tests.models.test_lact_family import tiny_reference
    from zoo.models import lact

    torch.manual_seed(0)
    model = zoo.create_model(lact.config_from_reference(tiny_reference(3, True))).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.float().save_pretrained(tmp_path / "zoo")
    assert main(["convert", str(tmp_path / "zoo"), str(tmp_path / "ref"), "--to", "lact"]) == 0
    cfg = json.loads((tmp_path / "ref" / "config.json").read_text())
    sd = load_file(tmp_path / "ref" / "model.safetensors")
    x = torch.randint(0, 97, (2, 15), generator=torch.Generator().manual_seed(2))  # 3 chunks of 4 + 3
    torch.testing.assert_close(lact_lm(sd, cfg, x), model.double()(x).logits, atol=1e-9, rtol=1e-9)


HYBRID = {"vocab_size": 97, "d_model": 32, "n_layers": 4, "mlp": MLP, "mixer_defaults": ATT,
          "mixers": {"default": "attention", "1": "sliding_window(window=5)", "3": "mamba2(d_state=8, headdim=16)"}}


@pytest.mark.parametrize("fmt, named", [
    ("llama", ["1: sliding_window(window=5)", "3: mamba2(d_state=8, headdim=16)"]),
    ("generator", ["1: sliding_window(window=5)", "3: mamba2(d_state=8, headdim=16)"]),
    ("mistral", ["3: mamba2(d_state=8, headdim=16)"]),
    ("mamba2", ["1: sliding_window(window=5)"]),
    ("lact", ["0: attention", "1: sliding_window(window=5)", "2: attention", "3: mamba2(d_state=8, headdim=16)"]),
    ("mamba2-transformers", ["0: attention", "1: sliding_window(window=5)", "2: attention",
                             "3: mamba2(d_state=8, headdim=16)"]),
])
def test_formats_refuse_what_they_cannot_hold_naming_the_layers(fmt, named, tmp_path, capsys):
    zoo.create_model(HYBRID).save_pretrained(tmp_path / "zoo")
    assert main(["convert", str(tmp_path / "zoo"), str(tmp_path / "out"), "--to", fmt]) == 2
    err = capsys.readouterr().err
    assert f"cannot export to the {fmt}" in err and "format, which holds only" in err
    for layer in named:
        assert layer in err
    assert not (tmp_path / "out" / "config.json").exists()


def test_mixed_attention_kinds_are_named_for_mistral(tmp_path):
    cfg = {**HYBRID, "mixers": {"default": "sliding_window(window=5)", "2": "sliding_window(window=7)"}}
    with pytest.raises(ValueError, match=re.escape("2: sliding_window(window=7)")):
        zoo.checkpoint.save_reference(zoo.create_model(cfg), tmp_path, "mistral")


def test_unknown_format_lists_the_formats(tmp_path, capsys):
    zoo_model("llama").save_pretrained(tmp_path / "zoo")
    assert main(["convert", str(tmp_path / "zoo"), str(tmp_path / "out"), "--to", "gpt2"]) == 2
    assert "unknown export format 'gpt2'; available: ['zoo', 'generator', 'lact', 'llama', 'mamba2', " \
           "'mamba2-transformers', 'minicpm4', 'mistral', 's4']" in capsys.readouterr().err


def test_sharded_export_loads_in_transformers_and_mamba_ssm_refuses_shards(tmp_path, capsys):
    model = zoo_model("llama")
    model.save_pretrained(tmp_path / "zoo", max_shard_size="20KB")
    assert (tmp_path / "zoo" / "model.safetensors.index.json").is_file()
    assert main(["convert", str(tmp_path / "zoo"), str(tmp_path / "ref"), "--to", "llama",
                 "--max-shard-size", "20KB"]) == 0
    index = json.loads((tmp_path / "ref" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and "model.embed_tokens.weight" in index["weight_map"]
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        assert max_abs(reference_loader("llama", tmp_path / "ref")(ids).logits, model(ids).logits) < 1e-4
    zoo_model("mamba2").save_pretrained(tmp_path / "m")
    assert main(["convert", str(tmp_path / "m"), str(tmp_path / "ssm"), "--to", "mamba2",
                 "--max-shard-size", "10KB"]) == 2
    assert "reads one unsharded file" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- tokenizers
def test_tokenizer_files_travel_through_conversion_and_generate_uses_them(tmp_path, capsys):
    from transformers import AutoTokenizer

    make_hf_llama(tmp_path / "hf", vocab_size=300)
    make_word_tokenizer(tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "zoo")]) == 0
    assert "tokenizer files copied: 2" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "zoo"), str(tmp_path / "back"), "--to", "llama"]) == 0
    for d in ("zoo", "back"):
        assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in (tmp_path / d).iterdir()}
    capsys.readouterr()
    prompt = "the cat sat on the mat"
    assert main(["generate", str(tmp_path / "zoo"), "--prompt", prompt, "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")  # the source's tokenizer, read independently
    ids = torch.tensor([tok.encode(prompt)])
    assert ids.shape[1] == 6 and int(ids.max()) < 15  # word ids, not bytes
    out = zoo.from_pretrained(tmp_path / "hf").generate(ids, max_new_tokens=5)
    assert printed == tok.decode(out[0, ids.shape[1]:])


def test_dna_tokenizer_travels_with_a_generator_export(tmp_path):
    model = zoo_model("generator")
    model.save_pretrained(tmp_path / "zoo", tokenizer=DNAKmerTokenizer())
    assert main(["convert", str(tmp_path / "zoo"), str(tmp_path / "ref"), "--to", "generator"]) == 0
    assert DNAKmerTokenizer.from_pretrained(tmp_path / "ref").vocab_size == 4128
    assert (tmp_path / "ref" / "vocab.txt").read_text() == (tmp_path / "zoo" / "vocab.txt").read_text()
