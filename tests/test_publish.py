"""zoo publish: push -> offline pull round trips (hub cache filled by a fake uploader), validation that refuses a
corrupted folder before any Hub call, dry runs, sharding, branches, tokenizers, and the model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file, save_file

import zoo
import zoo.publish
from tests.helpers import FakeHfApi, make_hf_llama, make_word_tokenizer, max_abs
from zoo.cli import main
from zoo.publish import ValidationError, publish

pytestmark = pytest.mark.usefixtures("single_thread")

SWAP = ["0=sliding_window(window=8)", "2=mamba2(d_state=8, headdim=16, chunk_size=8)"]  # layer 1 stays attention


@pytest.fixture(scope="module")
def base_repo(tmp_path_factory, hub_cache):
    """A transformers Llama (3 layers, vocab 300) + a word tokenizer, in the hub cache as ``acme/tiny-llama-src``."""
    src = tmp_path_factory.mktemp("llama") / "src"
    make_hf_llama(src, vocab_size=300, seed=3)
    make_word_tokenizer(src)
    snap = Path(hub_cache) / "models--acme--tiny-llama-src" / "snapshots" / ("b" * 40)
    if not snap.exists():
        shutil.copytree(src, snap)
        (snap.parents[1] / "refs").mkdir(exist_ok=True)
        (snap.parents[1] / "refs" / "main").write_text("b" * 40)
    return "acme/tiny-llama-src"


@pytest.fixture()
def hub(monkeypatch):
    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    return FakeHfApi


def ids(vocab=300, seed=0):
    return torch.randint(0, vocab, (2, 21), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def hybrid(base_repo):
    model = zoo.from_pretrained(base_repo)
    return zoo.swap_layers(model, zoo.publish.parse_swap(SWAP))


# ---------------------------------------------------------------------------------------------- round trip
def test_push_then_offline_pull_of_a_three_mixer_hybrid(base_repo, hub):
    from huggingface_hub import ModelCard

    result = publish(base_repo, "acme/tiny-hybrid", swap=SWAP, private=True, commit_message="hybrid v1",
                     datasets=["acme/corpus"])
    assert result.uploaded and result.commit_url.endswith(FakeHfApi.SHA) and result.max_abs_diff == 0.0
    assert [c[0] for c in hub.calls] == ["create_repo", "upload_folder"]
    assert hub.calls[0] == ("create_repo", "acme/tiny-hybrid", True)
    assert hub.calls[1][2] == "hybrid v1"
    assert not result.folder.exists()  # the temporary folder is gone after the upload

    pulled = zoo.from_pretrained("acme/tiny-hybrid")  # HF_HUB_OFFLINE=1: from the cache the fake upload filled
    assert [ls.mixer for ls in pulled.config.layers] == ["sliding_window", "attention", "mamba2"]
    assert pulled.source.hub_id == "acme/tiny-hybrid" and pulled.source.revision == FakeHfApi.SHA
    for seed in (0, 1):
        assert torch.equal(logits(pulled, ids(seed=seed)), logits(result.model, ids(seed=seed)))

    snap = Path(pulled.source.path)
    assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in snap.iterdir()}
    card = ModelCard.load(snap / "README.md")
    assert {"attention", "sliding_window", "mamba2"} <= set(card.data.tags)
    assert card.data.base_model == "acme/tiny-llama-src" and card.data.datasets == ["acme/corpus"]
    assert card.data.library_name == "zoo" and card.data.license == "apache-2.0"
    assert "| 2 | `mamba2(chunk_size=8, d_state=8, headdim=16)` | 112 | 0 |" in card.text
    assert "| 1 | `attention` | 112 | 129 |" in card.text  # 2 kv heads x 8 dims x (k + v) x 4 bytes + 1 mask byte
    assert "Converted from the `llama`-format checkpoint [`acme/tiny-llama-src`]" in card.text
    assert "zoo.swap_layers(model, {\"0\": \"sliding_window(window=8)\"" in card.text
    assert "@inproceedings{dao2024transformers" in card.text and "@article{touvron2023llama" in card.text
    assert f"**{pulled.num_parameters():,} parameters**" in card.text


def test_published_logits_equal_the_in_memory_model(base_repo, hub):
    torch.manual_seed(1)
    model = hybrid(base_repo)
    publish(model, "acme/in-memory")
    assert torch.equal(logits(zoo.from_pretrained("acme/in-memory"), ids(seed=2)), logits(model, ids(seed=2)))


# ---------------------------------------------------------------------------------------------- validation
def _corrupt(kind):
    def corrupt(folder: Path) -> None:
        sd = load_file(folder / "model.safetensors")
        key = "layers.1.mixer.q_proj.weight"
        sd[key] = sd[key].clone()
        sd[key][0, 0] = float("nan") if kind == "nan" else sd[key][0, 0] + 0.5
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    return corrupt


@pytest.mark.parametrize("kind, why", [
    ("value", r"logits of the reloaded folder differ from the in-memory model's by max \|Δ\| = .* > tolerance"),
    ("nan", r"the written checkpoint holds non-finite \(NaN/Inf\) weights in 1 tensor\(s\): "
            r"\['layers.1.mixer.q_proj.weight'\]"),
])
def test_a_folder_corrupted_between_save_and_validate_is_not_uploaded(base_repo, hub, monkeypatch, tmp_path, kind,
                                                                      why, capsys):
    write = zoo.publish.write_folder

    def write_then_corrupt(model, folder, **kw):
        out = write(model, folder, **kw)
        _corrupt(kind)(folder)
        return out

    monkeypatch.setattr(zoo.publish, "write_folder", write_then_corrupt)
    with pytest.raises(ValidationError, match="validation failed: " + why):
        publish(base_repo, "acme/broken", swap=SWAP)
    assert main(["publish", base_repo, "acme/broken", "--out", str(tmp_path / "kept")]) == 2
    assert "validation failed" in capsys.readouterr().err
    assert hub.calls == []  # no repo created, nothing uploaded
    assert not (tmp_path / "kept" / "README.md").exists()  # stopped before the card; the files stay for inspection
    assert not (Path(huggingface_hub.constants.HF_HUB_CACHE) / "models--acme--broken").exists()


def test_a_model_with_nan_weights_is_refused_before_writing(base_repo, hub, tmp_path):
    model = zoo.from_pretrained(base_repo)
    with torch.no_grad():
        model.norm_f.weight[3] = float("inf")
    with pytest.raises(ValidationError, match=r"refusing to publish: .* \['norm_f.weight'\]"):
        publish(model, "acme/inf", out=tmp_path / "out")
    assert hub.calls == [] and not (tmp_path / "out").exists()


def test_dry_run_writes_and_validates_but_uploads_nothing(base_repo, hub, tmp_path, capsys):
    out = tmp_path / "dry"
    assert main(["publish", base_repo, "acme/dry", "--swap", SWAP[0], "--dry-run", "--out", str(out),
                 "--revision", "exp", "--private"]) == 0
    printed = capsys.readouterr().out
    assert "dry run: would upload to acme/dry@exp (private=True" in printed and "nothing was uploaded" in printed
    assert "max |Δ logits| = 0" in printed
    for name in ("README.md", "config.json", "model.safetensors", "tokenizer.json"):
        assert f"  {name}  (" in printed and (out / name).is_file()
    assert hub.calls == []
    assert not (Path(huggingface_hub.constants.HF_HUB_CACHE) / "models--acme--dry").exists()


# ---------------------------------------------------------------------------------------------- files
def test_sharded_publish_to_a_branch(base_repo, hub, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for stale in ("model.safetensors", "model-00001-of-00009.safetensors"):
        (out / stale).write_text("an earlier save")
    (out / "NOTES.txt").write_text("mine")
    result = publish(base_repo, "acme/sharded", out=out, max_shard_size="100KB", revision="v1")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (out / "model.safetensors").exists() and not (out / "model-00001-of-00009.safetensors").exists()
    assert (out / "NOTES.txt").read_text() == "mine"  # not ours: kept (and uploaded, as the folder is the user's)
    assert {n for n, _ in result.files} >= {"model.safetensors.index.json", "README.md", *shards}
    assert ("create_branch", "acme/sharded", "v1") in hub.calls and hub.calls[-1][-1] == "v1"
    pulled = zoo.from_pretrained("acme/sharded", revision="v1")
    assert torch.equal(logits(pulled, ids()), logits(zoo.from_pretrained(base_repo), ids()))


def test_publish_in_a_reference_format(base_repo, hub):
    from transformers import LlamaForCausalLM

    publish(base_repo, "acme/llama-again", to="llama")
    pulled = zoo.from_pretrained("acme/llama-again")
    assert pulled.source.format == "llama"
    hf = LlamaForCausalLM.from_pretrained(pulled.source.path, attn_implementation="eager").eval()
    assert max_abs(logits(hf, ids()), logits(pulled, ids())) < 1e-4
    card = (Path(pulled.source.path) / "README.md").read_text()
    assert "in the `llama` reference format" in card


def test_bad_requests_fail_before_loading(hub, capsys):
    with pytest.raises(ValueError, match="expected LAYERS=MIXER"):
        publish("zoo-tiny-attention", "acme/x", swap=["0-3"])
    with pytest.raises(ValueError, match="must look like 'namespace/name'"):
        publish("zoo-tiny-attention", "no-namespace")
    with pytest.raises(ValueError, match="unknown export format 'onnx'"):
        publish("zoo-tiny-attention", "acme/x", to="onnx")
    with pytest.raises(ValueError, match="has no published checkpoint: publishing it means publishing random"):
        publish("zoo-tiny-attention", "acme/x")
    assert hub.calls == []


def test_a_preset_with_random_init_and_a_json_swap(hub):
    result = publish("zoo-tiny-attention", "acme/tiny-random", random_init=True,
                     swap=['{"0-1": "block_diagonal(block_size=4)"}'])
    assert result.uploaded
    pulled = zoo.from_pretrained("acme/tiny-random")
    assert [ls.mixer for ls in pulled.config.layers] == ["block_diagonal"] * 2 + ["attention"] * 2
    card = (Path(pulled.source.path) / "README.md").read_text()
    assert "@article{zhang2023efficient" in card  # MASFormer, declared by the block_diagonal mixer


# ---------------------------------------------------------------------------------------------- model card
def test_card_evaluation_from_results_files(tmp_path):
    model = zoo.create_model("zoo-tiny-attention")
    table = tmp_path / "ablate.json"
    table.write_text(json.dumps({"title": "Layer-swap ablation", "description": "perplexity at 4K",
                                 "rows": [{"layers": "0-3", "mixer": "sliding_window", "ppl": 12.3456},
                                          {"layers": "0-3", "mixer": "attention", "ppl": 11.0}]}))
    lines = tmp_path / "runs.jsonl"
    lines.write_text('{"run": "a", "loss": 2.5}\n{"run": "b", "loss": 2.25, "note": "x|y"}\n')
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"schema": "zoo-bench/1", "mode": "quick", "created": "2026-01-01",
                                 "machine": {"cpu_model": "cpu", "load_average_start": [1.0, 2.0, 3.0]},
                                 "cases": [{"subject": "attention", "phase": "forward", "T": 64, "dtype": "float32",
                                            "device": "cpu", "reference": "ref", "speedup": 2.0, "status": "ok",
                                            "impls": {"zoo": {"time_s": {"median": 0.001}},
                                                      "ref": {"time_s": {"median": 0.002}}}},
                                           {"subject": "mamba2", "phase": "forward", "T": 64, "status": "ok",
                                            "impls": {}}]}))
    text = zoo.checkpoint.render_model_card(model, results=[table, lines, bench]).text
    assert "## Evaluation" in text and "### Layer-swap ablation" in text and "perplexity at 4K" in text
    assert "| layers | mixer | ppl |" in text and "| 0-3 | sliding_window | 12.35 |" in text
    assert "| run | loss | note |" in text and "| b | 2.25 | x\\|y |" in text and "| a | 2.5 | – |" in text
    assert "| attention | forward | 64 | float32 | cpu | 1 | ref | 2 | 2 | ok |" in text
    assert "| mamba2 |" not in text  # bench cases of mixers the model does not use are left out
    assert "load average 1.0/2.0/3.0" in text
    bad = tmp_path / "bad.json"
    bad.write_text('{"score": 3}')
    with pytest.raises(ValueError, match="expected a zoo bench report, or a results table"):
        zoo.checkpoint.render_model_card(model, results=bad)


def test_citations_are_the_mixers_data(monkeypatch):
    from zoo.layers.attention import Attention

    model = zoo.create_model("zoo-tiny-attention")
    monkeypatch.setattr(Attention, "citations", ("@misc{custom2099, title={A mixer's own paper}}",))
    text = zoo.checkpoint.render_model_card(model).text
    assert "@misc{custom2099" in text and "vaswani2017attention" not in text
