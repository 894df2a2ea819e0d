"""zoo.hf: zoo checkpoints through transformers' Auto classes, generate(), Trainer and save_pretrained."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zoo
from tests.helpers import FakeHfApi
from zoo.checkpoint import load_weights

pytestmark = pytest.mark.usefixtures("single_thread")

hf_mod = pytest.importorskip("zoo.hf")

HYBRID = {"0": "sliding_window(window=6, num_sink_tokens=1)", "1": "mamba2(d_state=8, headdim=16, chunk_size=8)",
          "2": "block_diagonal(block_size=5)"}  # layer 3 stays attention


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tied 4-layer hybrid with four mixers, saved as a zoo checkpoint: (directory, the zoo model)."""
    torch.manual_seed(0)
    model = zoo.swap_layers(zoo.create_model("zoo-tiny-attention"), HYBRID).eval()
    path = tmp_path_factory.mktemp("hf") / "zoo"
    model.save_pretrained(path)
    return path, model


def ids(B=2, T=23, seed=0):
    return torch.randint(3, 512, (B, T), generator=torch.Generator().manual_seed(seed))


def auto(path, **kw):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, **kw)


def test_auto_model_loads_a_zoo_checkpoint_with_the_same_logits(ckpt):
    path, model = ckpt
    hf = auto(path)
    assert type(hf).__name__ == "ZooForCausalLMHF" and not hf.training
    assert hf.config.model_type == "zoo" and hf.config.tie_word_embeddings
    assert hf.model.lm_head.weight is hf.model.embedding.weight  # tied as transformers 5 declares it
    assert hf.all_tied_weights_keys == {"model.lm_head.weight": "model.embedding.weight"}
    x = ids()
    with torch.no_grad():
        assert torch.equal(hf(x).logits, model(x).logits)
        mask = torch.ones_like(x)
        mask[1, :4] = 0
        assert torch.equal(hf(x, attention_mask=mask).logits, model(x, attention_mask=mask).logits)


def test_auto_model_from_a_hub_id_offline(ckpt, monkeypatch):
    import huggingface_hub

    path, model = ckpt
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    huggingface_hub.HfApi().upload_folder(repo_id="acme/hf-hybrid", folder_path=str(path))
    hf = auto("acme/hf-hybrid")  # HF_HUB_OFFLINE=1: the cache the fake upload filled
    with torch.no_grad():
        assert torch.equal(hf(ids()).logits, model(ids()).logits)


def test_greedy_generate_matches_zoo_on_a_left_padded_batch(ckpt):
    path, model = ckpt
    hf = auto(path)
    x = ids(B=3, T=17, seed=1)
    mask = torch.ones_like(x)
    mask[0, :5] = 0
    mask[2, :11] = 0  # rows 0 and 2 left-padded
    x = x.masked_fill(mask == 0, 0)
    want = model.generate(x, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    got = hf.generate(x, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert got.shape == want.shape == (3, 29) and torch.equal(got, want)
    # a padded row generates what the row alone generates
    alone = hf.generate(x[2:, 11:], max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(alone[:, 6:], got[2:, 17:])


def test_cache_reorders_rows_like_beam_search_does(ckpt):
    path, _ = ckpt
    hf = auto(path)
    x = ids(B=2, T=13, seed=2)
    with torch.no_grad():
        out = hf(x, use_cache=True)
        cache = out.cache
        assert isinstance(cache, hf_mod.ZooCache) and cache.get_seq_length() == 13 and cache.batch_size == 2
        cache.reorder_cache(torch.tensor([1, 0]))
        nxt = torch.tensor([[7], [9]])
        step = hf(nxt, cache=cache).logits[:, -1]
        fresh = hf(torch.cat([x.flip(0), nxt], 1)).logits[:, -1]
    assert (step - fresh).abs().max() < 1e-5
    cache.batch_repeat_interleave(2)
    assert cache.batch_size == 4
    beams = hf.generate(x, max_new_tokens=4, num_beams=3, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert beams.shape == (2, 17)


def test_a_trainer_step_runs_and_saves_a_zoo_checkpoint(ckpt, tmp_path):
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments

    path, model = ckpt
    hf = auto(path)

    class Batches(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            x = ids(B=1, T=16, seed=10 + i)[0]
            return {"input_ids": x, "labels": x.clone(), "attention_mask": torch.ones_like(x)}

    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=4,
                             learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True)
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    result = Trainer(model=hf, args=args, train_dataset=Batches()).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    changed = [k for k, v in hf.state_dict().items() if not torch.equal(v, before[k])]
    assert "model.layers.1.mixer.A_log" in changed and "model.embedding.weight" in changed
    hf.save_pretrained(tmp_path / "saved", max_shard_size="200KB")
    assert (tmp_path / "saved" / "model.safetensors.index.json").is_file()
    back = zoo.from_pretrained(tmp_path / "saved")
    hf.eval()
    with torch.no_grad():
        assert torch.equal(back(ids()).logits, hf(ids()).logits)
        assert torch.equal(auto(tmp_path / "saved")(ids()).logits, hf(ids()).logits)
    assert "lm_head.weight" not in load_weights(tmp_path / "saved")  # tied: stored once


def test_resized_vocabulary_is_what_gets_saved(ckpt, tmp_path):
    path, _ = ckpt
    hf = auto(path)
    hf.resize_token_embeddings(520, mean_resizing=False)
    x = torch.tensor([[515, 3, 519]])
    with torch.no_grad():
        assert hf(x).logits.shape == (1, 3, 520)
    hf.save_pretrained(tmp_path)
    back = zoo.from_pretrained(tmp_path)
    assert back.config.vocab_size == 520 and torch.equal(back.embedding.weight, hf.model.embedding.weight)


def test_loss_follows_transformers_conventions(ckpt):
    path, model = ckpt
    hf = auto(path)
    x = ids(B=2, T=12, seed=3)
    labels = x.clone()
    labels[:, :4] = -100
    with torch.no_grad():
        logits = model(x).logits
        want = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        assert torch.allclose(hf(x, labels=labels).loss, want, atol=1e-6)


def test_packed_documents_from_position_ids(ckpt):
    path, model = ckpt
    hf = auto(path)
    a, b = ids(B=1, T=9, seed=4), ids(B=1, T=14, seed=5)
    pos = torch.cat([torch.arange(9), torch.arange(14)])[None]
    with torch.no_grad():
        packed = hf(torch.cat([a, b], 1), position_ids=pos).logits
        assert (packed[:, :9] - model(a).logits).abs().max() < 1e-5
        assert (packed[:, 9:] - model(b).logits).abs().max() < 1e-5


def test_config_round_trip_and_registration(ckpt, tmp_path):
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    path, model = ckpt
    cfg = AutoConfig.from_pretrained(path)
    assert isinstance(cfg, hf_mod.ZooConfigHF) and cfg.zoo_config.to_dict() == model.config.to_dict()
    assert cfg.hidden_size == 128 and cfg.num_hidden_layers == 4 and cfg.vocab_size == 512
    cfg.save_pretrained(tmp_path)
    assert zoo.ZooConfig.load(tmp_path / "config.json").to_dict() == model.config.to_dict()
    assert CONFIG_MAPPING["zoo"] is hf_mod.ZooConfigHF
    assert CONFIG_MAPPING["llama"].__module__.startswith("transformers.")  # transformers' own types untouched
    hf_mod._register()  # idempotent
    wrapped = hf_mod.from_zoo(model)
    assert wrapped.model is model and wrapped.model.embedding.weight.data_ptr() == model.embedding.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(wrapped(ids()).logits, model(ids()).logits)  # wrapping re-initialises nothing
        fresh = hf_mod.ZooForCausalLMHF(cfg)  # a new model: the zoo's init (norms 1, Mamba-2's A / dt / D)
        assert all(bool((fresh.model.layers[i].norm.weight == 1).all()) for i in range(4))
        assert bool((fresh.model.layers[1].mixer.D == 1).all()) and torch.isfinite(fresh(ids()).logits).all()


def test_an_untied_reference_conversion_through_the_adapter(tmp_path):
    from tests.helpers import make_hf_llama

    make_hf_llama(tmp_path / "hf", vocab_size=300, tie=False)
    zoo.swap_layers(zoo.from_pretrained(tmp_path / "hf"), {"1": "sliding_window(window=4)"}).save_pretrained(
        tmp_path / "zoo")
    model = zoo.from_pretrained(tmp_path / "zoo")
    hf = auto(tmp_path / "zoo")
    assert not hf.config.tie_word_embeddings and hf.model.lm_head.weight is not hf.model.embedding.weight
    x = torch.randint(0, 300, (2, 11))
    with torch.no_grad():
        assert torch.equal(hf(x).logits, model(x).logits)
    shutil.rmtree(tmp_path / "hf")


def test_the_core_does_not_import_transformers():
    code = "import sys, zoo; zoo.create_model('zoo-tiny-attention'); assert 'transformers' not in sys.modules"
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
