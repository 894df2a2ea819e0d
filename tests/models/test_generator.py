"""GENERator family: a GENERator-shaped transformers checkpoint (custom class name in config.json) loads as the
``generator`` family with transformers' logits; presets against the sheet's sizes; export; long-context hybrids."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import zoo
from tests.helpers import make_hf_generator, make_hf_llama, max_abs
from zoo import genomics
from zoo.hub import save_reference
from zoo.models import detect_family
from zoo.models.generator import long_context

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors on a shared 2-core box


@pytest.fixture(scope="module")
def hf_generator(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf-generator")
    return path, make_hf_generator(path)


def test_custom_class_checkpoint_loads_with_transformers_logits(hf_generator):
    path, hf = hf_generator
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["GENERatorForCausalLM"] and cfg["model_type"] == "llama"
    model = zoo.from_pretrained(path)
    assert model.config.family == "generator" and model.config.vocab_size == 4128
    ids = torch.randint(0, 4128, (2, 23), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    with torch.no_grad():
        assert max_abs(model(ids).logits, hf(ids).logits) < 1e-4
        real = mask.bool()
        assert max_abs(model(ids, attention_mask=mask).logits[real], hf(ids, attention_mask=mask).logits[real]) < 1e-4


def test_detection():
    llama_cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000}
    assert detect_family(llama_cfg).name == "llama"
    assert detect_family({**llama_cfg, "architectures": ["GENERatorForCausalLM"]}).name == "generator"
    assert detect_family({**llama_cfg, "auto_map": {"AutoModelForCausalLM":
                                                    "modeling_generator.GENERatorForCausalLM"}}).name == "generator"
    assert detect_family({**llama_cfg, "vocab_size": 4128}).name == "generator"  # the Feb-2025 plain-Llama release
    assert detect_family({**llama_cfg, "model_type": "mistral", "vocab_size": 4128}).name == "mistral"


def test_plain_llama_release_loads_too(tmp_path):
    hf = make_hf_generator(tmp_path, custom_class=False, seed=1)
    model = zoo.from_pretrained(tmp_path)
    ids = torch.randint(0, 4128, (1, 12))
    with torch.no_grad():
        assert model.config.family == "generator" and max_abs(model(ids).logits, hf(ids).logits) < 1e-4


def test_presets_have_the_published_sizes():
    # the sheet: 3B = 11,993,051,136 bytes of fp32 parameters (2.998B); 1.2B = one 4,648,274,384-byte
    # model.safetensors (fp32 parameters + a JSON header of a few tens of kB)
    with torch.device("meta"):
        m3 = zoo.create_model("generator-eukaryote-3b-base")
        m1 = zoo.create_model("generator-eukaryote-1.2b-base")
    assert m3.num_parameters() * 4 == 11_993_051_136
    assert 0 < 4_648_274_384 - m1.num_parameters() * 4 < 64_000
    for m, (d, n, head_dim) in ((m1, (2048, 26, 64)), (m3, (3072, 30, 96))):
        c = m.config
        att = c.mixer_kwargs(0)
        assert (c.d_model, c.n_layers, c.max_position_embeddings, c.rope_theta, c.tie_embeddings) == (
            d, n, 16384, 500000.0, False)
        assert (att["num_heads"], att["num_kv_heads"], m.layers[0].mixer.head_dim) == (32, 4, head_dim)
    fam, preset = zoo.registry.get_preset_entry("generator-eukaryote-1.2b-base")
    assert fam.name == "generator" and preset.hub_id == "GenerTeam/GENERator-eukaryote-1.2b-base"
    assert preset.revision == "5e872c94264891f9adf59d8ea64e426bb68badb5"


def test_export_is_a_plain_transformers_llama(hf_generator, tmp_path):
    from transformers import LlamaForCausalLM

    path, hf = hf_generator
    save_reference(zoo.from_pretrained(path), tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in cfg and cfg["vocab_size"] == 4128
    back = LlamaForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    ids = torch.randint(0, 4128, (1, 10))
    with torch.no_grad():
        assert max_abs(back(ids).logits, hf(ids).logits) == 0.0


def test_long_context_recipes(hf_generator):
    path, _ = hf_generator
    base = zoo.from_pretrained(path)
    ids = torch.randint(32, 4128, (1, 40))
    with torch.no_grad():
        ref = base(ids).logits
        swa = long_context(zoo.from_pretrained(path), "sliding_window", window=64)  # window > T: same as full
        assert all(ls.mixer == "sliding_window" for ls in swa.config.layers)
        assert max_abs(swa(ids).logits, ref) < 1e-5
        short = long_context(zoo.from_pretrained(path), "sliding_window", window=8)
        assert max_abs(short(ids).logits[:, :8], ref[:, :8]) < 1e-5 and max_abs(short(ids).logits, ref) > 1e-3
    hybrid = long_context(base.config, "mamba2_hybrid", every=2, headdim=8, d_state=16)
    assert [ls.mixer for ls in hybrid.layers] == ["mamba2", "sliding_window"]
    assert all(ls.mlp == base.config.layers[0].mlp for ls in hybrid.layers)
    small = dict(kernel_size=8, kernel_stride=4, block_size=8, window_size=16, topk=2)
    with torch.no_grad():  # InfLLM-V2 reads the attention weights: dense below dense_len, sparse above
        dense = long_context(zoo.from_pretrained(path), "infllmv2", dense_len=64, **small)
        assert all(ls.mixer == "infllmv2" for ls in dense.config.layers)
        assert max_abs(dense(ids).logits, ref) < 1e-5
        sparse = long_context(zoo.from_pretrained(path), "infllmv2", dense_len=16, **small)
        assert max_abs(sparse(ids).logits, ref) > 1e-4
    with pytest.raises(ValueError, match="available"):
        long_context(base.config, "yarn")


def test_hybrid_presets_load_the_pinned_checkpoint_and_swap(hf_generator, hub_cache):
    path, hf = hf_generator
    _, preset = zoo.registry.get_preset_entry("generator-eukaryote-1.2b-base")
    snap = Path(hub_cache) / "models--GenerTeam--GENERator-eukaryote-1.2b-base" / "snapshots" / preset.revision
    if not snap.exists():
        shutil.copytree(path, snap)
    swa = zoo.from_pretrained("generator-eukaryote-1.2b-base-swa")  # offline: found in the cache at the pin
    assert [ls.spec_string for ls in swa.config.layers] == ["sliding_window(num_sink_tokens=0, window=16384)"] * 2
    ids = torch.randint(32, 4128, (1, 16))
    with torch.no_grad():
        assert max_abs(swa(ids).logits, hf(ids).logits) < 1e-4  # window 16384 > T: the weights are the checkpoint's
    _, tok = genomics.load("generator-eukaryote-1.2b-base-swa")  # the tokenizer files of the cached snapshot
    assert tok.vocab_size == 4128
    cfg = zoo.ZooConfig.from_preset("generator-eukaryote-1.2b-base-mamba2")
    assert [ls.mixer for ls in cfg.layers[:4]] == ["mamba2", "sliding_window"] * 2 and cfg.n_layers == 26


def test_saved_model_gets_the_generator_card(hf_generator, tmp_path):
    model = zoo.from_pretrained(hf_generator[0])
    model.save_pretrained(tmp_path / "ckpt")
    card = (tmp_path / "ckpt" / "README.md").read_text()
    assert "GENERator" in card and "98,304 bp" in card and "| 1 | `attention` | 64 |" in card


def test_plain_llama_is_still_llama(tmp_path):
    make_hf_llama(tmp_path)
    assert zoo.from_pretrained(tmp_path).config.family == "llama"
