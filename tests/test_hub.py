"""Hub I/O: exact round trips, the offline hub path, model cards, and clear errors on bad checkpoints."""

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import zoo
from tests.helpers import FakeHfApi, make_hf_llama
from zoo.checkpoint import load_weights


@pytest.fixture()
def tiny():
    torch.manual_seed(0)
    return zoo.create_model("zoo-tiny-attention").eval()


def logits(model, seed=0):
    ids = torch.randint(0, model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def test_save_load_round_trip_is_exact(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "m")
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == ["README.md", "config.json", "model.safetensors"]
    assert "zoo_version" in json.loads((tmp_path / "m" / "config.json").read_text())
    assert "lm_head.weight" not in load_file(tmp_path / "m" / "model.safetensors")  # tied: stored once
    back = zoo.from_pretrained(tmp_path / "m")
    assert back.lm_head.weight is back.embedding.weight
    assert torch.equal(logits(back), logits(tiny))


def test_model_card_has_metadata_and_layers(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "m")
    from huggingface_hub import ModelCard

    card = ModelCard.load(tmp_path / "m" / "README.md")
    assert card.data.library_name == "zoo" and card.data.pipeline_tag == "text-generation"
    assert "attention" in card.data.tags
    assert "| 3 | `attention` | 256 |" in card.text


def test_dtype_and_device_at_load(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "m")
    back = zoo.from_pretrained(tmp_path / "m", dtype=torch.float16)
    assert back.embedding.weight.dtype == torch.float16 and back.device.type == "cpu"


def test_push_to_hub_then_from_pretrained_offline(tiny, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    url = tiny.push_to_hub("acme/tiny-zoo", private=True, commit_message="first")
    assert url.endswith("0123456789abcdef0123456789abcdef01234567")
    assert ("create_repo", "acme/tiny-zoo", True) in FakeHfApi.calls
    back = zoo.from_pretrained("acme/tiny-zoo")  # HF_HUB_OFFLINE=1: resolved from the populated cache
    assert torch.equal(logits(back), logits(tiny))


def test_offline_missing_repo_is_a_clear_error():
    from huggingface_hub.errors import LocalEntryNotFoundError

    with pytest.raises(OSError, match=r"cannot get hub repo 'acme/not-cached': HF_HUB_OFFLINE is set") as info:
        zoo.from_pretrained("acme/not-cached")
    assert isinstance(info.value.__cause__, LocalEntryNotFoundError)  # the hub's own error stays attached


def test_reference_llama_from_hub_cache(tmp_path, hub_cache):
    hf = make_hf_llama(tmp_path / "src")
    snap = Path(hub_cache) / "models--acme--tiny-llama" / "snapshots" / ("a" * 40)
    shutil.copytree(tmp_path / "src", snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("a" * 40)
    model = zoo.from_pretrained("acme/tiny-llama")
    ids = torch.randint(0, 1001, (1, 9))
    with torch.no_grad():
        assert (model(ids).logits - hf(ids).logits).abs().max() < 1e-4


# ------------------------------------------------------------------------------------------- bad input
@pytest.fixture()
def saved(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def _edit_weights(path, fn):
    sd = load_file(path / "model.safetensors")
    fn(sd)
    save_file(sd, path / "model.safetensors")


def test_missing_key(saved):
    _edit_weights(saved, lambda sd: sd.pop("layers.1.mixer.k_proj.weight"))
    with pytest.raises(ValueError, match=r"missing keys \(1\): \['layers.1.mixer.k_proj.weight'\]"):
        zoo.from_pretrained(saved)


def test_unexpected_key(saved):
    _edit_weights(saved, lambda sd: sd.__setitem__("layers.0.mixer.extra.weight", torch.zeros(3)))
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): \['layers.0.mixer.extra.weight'\]"):
        zoo.from_pretrained(saved)


def test_misshaped_key(saved):
    _edit_weights(saved, lambda sd: sd.__setitem__("norm_f.weight", torch.ones(7)))
    with pytest.raises(ValueError, match=r"norm_f.weight: checkpoint \(7,\) vs model \(128,\)"):
        zoo.from_pretrained(saved)


def test_truncated_safetensors(saved):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read .*model.safetensors \(truncated or not a safetensors file"):
        zoo.from_pretrained(saved)


def test_unknown_config_format(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_sw3", "n_embd": 8}))
    with pytest.raises(ValueError, match=r"config.json is in no known format \(model_type/keys: 'gpt_sw3'\)"):
        zoo.from_pretrained(tmp_path)


def test_missing_config_and_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        zoo.from_pretrained(tmp_path)
    make_hf_llama(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights in"):
        zoo.from_pretrained(tmp_path)


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(_Payload.marker),))


def test_pickle_bin_with_code_is_refused(tmp_path):
    make_hf_llama(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    _Payload.marker = str(tmp_path / "pwned")
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({**sd, "evil": _Payload()}, f)
    with pytest.raises(ValueError, match=r"refusing to load .*pytorch_model.bin.*weights_only=True"):
        zoo.from_pretrained(tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_plain_tensor_bin_loads(tmp_path):
    hf = make_hf_llama(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    assert set(load_weights(tmp_path)) == set(sd)
    ids = torch.randint(0, 1001, (1, 5))
    with torch.no_grad():
        assert (zoo.from_pretrained(tmp_path)(ids).logits - hf(ids).logits).abs().max() < 1e-4


def test_failed_save_leaves_nothing_behind(tiny, tmp_path, monkeypatch):
    import zoo.hub

    tiny.save_pretrained(tmp_path / "m")
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(zoo.checkpoint, "save_model", boom)
    with pytest.raises(OSError, match="disk full"):
        tiny.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp dirs left
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before  # old checkpoint intact


def test_swap_layers_round_trips(tiny, tmp_path):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    zoo.swap_layers(tiny, {"1,3": "attention(num_heads=2, num_kv_heads=1)"})
    assert tiny.config.layers[1].mixer_args == {"num_heads": 2, "num_kv_heads": 1}
    # q_proj keeps its shape (2 heads x 64) and is reused; k/v shrink to one kv head and are re-initialised
    assert torch.equal(tiny.state_dict()["layers.1.mixer.q_proj.weight"], before["layers.1.mixer.q_proj.weight"])
    assert tiny.state_dict()["layers.1.mixer.k_proj.weight"].shape == (64, 128)
    assert torch.equal(tiny.state_dict()["layers.0.mixer.k_proj.weight"], before["layers.0.mixer.k_proj.weight"])
    tiny.save_pretrained(tmp_path / "s")
    assert torch.equal(logits(zoo.from_pretrained(tmp_path / "s")), logits(tiny))
    with pytest.raises(ValueError, match="unknown mixer 'nope'"):
        zoo.swap_layers(tiny, {"0": "nope"})


# ---------------------------------------------------------------------------------------------- saving safely
def test_save_keeps_the_users_other_files(tiny, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    tiny.save_pretrained(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["README.md", "config.json", "model.safetensors", "notes.txt", "sub", "tokenizer.json"]
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert torch.equal(logits(zoo.from_pretrained(tmp_path)), logits(tiny))


def test_save_to_a_file_path_is_refused(tiny, tmp_path):
    target = tmp_path / "afile"
    target.write_text("not a directory")
    with pytest.raises(NotADirectoryError, match="exists and is not a directory"):
        tiny.save_pretrained(target)
    assert target.read_text() == "not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_save_into_the_current_directory(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny.save_pretrained(".")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_failed_save_leaves_the_previous_checkpoint_and_no_temp_files(tiny, tmp_path, monkeypatch):
    tiny.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    other = zoo.create_model("zoo-tiny-attention")

    def broken_save_model(model, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(zoo.checkpoint, "save_model", broken_save_model)
    with pytest.raises(OSError, match="disk full"):
        other.save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp files, old files intact
    assert torch.equal(logits(zoo.from_pretrained(tmp_path)), logits(tiny))


def test_saved_files_and_directories_follow_the_umask(tiny, tmp_path):
    import os

    old = os.umask(0o027)
    try:
        tiny.save_pretrained(tmp_path / "a" / "b")
    finally:
        os.umask(old)
    assert (tmp_path / "a" / "b").stat().st_mode & 0o777 == 0o750
    for f in (tmp_path / "a" / "b").iterdir():
        assert f.stat().st_mode & 0o777 == 0o640, f.name


def test_save_removes_stale_shards_of_an_earlier_save_only(tiny, tmp_path):
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                 "model.safetensors.index.json", "model-notes.safetensors.txt", "other.safetensors"):
        (tmp_path / name).write_text("x")
    tiny.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "README.md", "config.json", "model-notes.safetensors.txt", "model.safetensors", "other.safetensors"]
    assert torch.equal(logits(zoo.from_pretrained(tmp_path)), logits(tiny))


def test_configs_are_strict_json(tmp_path):
    """Non-finite floats (mamba2's dt_limit upper bound) are written as transformers does, and read back."""
    cfg = zoo.ZooConfig(vocab_size=64, d_model=32, n_layers=1, layers=[
        zoo.LayerSpec("mamba2", {"d_state": 8, "headdim": 16, "dt_limit": (0.0, float("inf"))})])
    cfg.save(tmp_path / "config.json")
    text = (tmp_path / "config.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert '"__float__": "Infinity"' in text
    back = zoo.ZooConfig.load(tmp_path / "config.json")
    assert back.layers[0].mixer_args["dt_limit"] == [0.0, float("inf")]
    assert zoo.ZooConfig.from_json(cfg.to_json()).to_json() == cfg.to_json()
