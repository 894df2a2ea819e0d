"""The zoo command: list, info, convert, generate and the demo (the README's main job)."""

import pytest
import torch

import zoo
from tests.helpers import make_hf_llama
from zoo.cli import main


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "attention" in out and "llama" in out and "llama-3.2-1b" in out


def test_info_preset_without_materialising(capsys):
    assert main(["info", "llama-3.2-1b"]) == 0
    out = capsys.readouterr().out
    assert "parameters=1,235,814,400" in out  # Llama 3.2 1B's published parameter count (tied head)
    # 8 kv heads x 64 dims x (k + v) x 4 bytes = 4096 bytes per token per layer, +1 for the padding mask
    assert "state bytes/token 4,097" in out


def test_convert_both_ways_and_generate(tmp_path, capsys):
    hf = make_hf_llama(tmp_path / "hf", vocab_size=300)
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "zoo")]) == 0
    assert main(["convert", str(tmp_path / "zoo"), str(tmp_path / "back"), "--to", "llama"]) == 0
    from transformers import LlamaForCausalLM

    back = LlamaForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager")
    ids = torch.randint(0, 300, (1, 8))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, hf(ids).logits)
    assert main(["generate", str(tmp_path / "zoo"), "--prompt", "hi", "--max-new-tokens", "4"]) == 0


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["info", str(tmp_path)]) == 2
    assert "has no config.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["frobnicate"])


def test_demo_runs_offline(capsys):
    from zoo.demo import run_demo

    result = run_demo(steps=30, print_fn=lambda s: None)
    assert result["reload_identical"]
    assert result["losses"][-1] < result["losses"][0]
    assert result["reused"] > 0 and len(result["samples"]) == 2
    assert zoo.list_mixers()
