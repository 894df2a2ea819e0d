"""The README's Tour runs as written (offline: the hub and the reference checkpoints are local stand-ins)."""

import re
from pathlib import Path

import torch

import zoo
from tests.helpers import make_hf_llama

README = Path(__file__).resolve().parents[1] / "README.md"


def test_tour_runs(tmp_path, monkeypatch):
    block = re.search(r"## Tour\n\n```python\n(.+?)\n```", README.read_text(), re.S).group(1)
    make_hf_llama(tmp_path / "llama", vocab_size=512)
    mamba = zoo.ZooConfig.from_dict({"vocab_size": 512, "d_model": 64, "n_layers": 2, "family": "mamba2",
                                     "mixers": "mamba2(d_state=16, headdim=16)"})
    zoo.create_model(mamba).save_pretrained(tmp_path / "mamba")
    stand_ins = {"path/to/transformers-llama": tmp_path / "llama", "state-spaces/mamba2-130m": tmp_path / "mamba"}
    real_from_pretrained = zoo.from_pretrained
    pushed = []
    monkeypatch.setattr(zoo, "from_pretrained", lambda name, **kw: real_from_pretrained(stand_ins[name], **kw))
    monkeypatch.setattr(zoo.ZooForCausalLM, "push_to_hub", lambda self, repo, **kw: pushed.append(repo))
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)
    model = namespace["model"]
    assert [ls.mixer for ls in model.config.layers] == [
        "sliding_window", "mamba2", "sliding_window", "sliding_window", "mamba2", "sliding_window"]
    assert namespace["ids"].shape == (2, 16 + 32)
    assert (tmp_path / "out" / "model.safetensors").is_file() and pushed == ["me/my-hybrid"]
    assert torch.isfinite(namespace["out"].loss)
    listed = re.search(r"zoo.list_mixers\(\)\s+# (\[.*?\])", block).group(1)
    assert eval(listed) == zoo.list_mixers()


def test_outside_mixer_example_passes_the_contract():
    block = re.search(r"A mixer written outside the package.*?```python\n(.+?)\n```", README.read_text(), re.S).group(1)
    try:
        exec(compile(block, str(README), "exec"), {})  # ends with check_mixer("ema(decay=0.8)")
        assert "ema" in zoo.list_mixers()
    finally:
        if "ema" in zoo.list_mixers():
            zoo.registry.unregister_mixer("ema")


def test_tour_lists_the_registered_families():
    listed = re.search(r"zoo.list_families\(\)\s+# (\[.*?\])", README.read_text()).group(1)
    assert eval(listed) == zoo.list_families()
