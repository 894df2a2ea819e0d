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


def test_unknown_model_lists_the_presets(capsys):
    assert main(["info", "bogus"]) == 2
    err = capsys.readouterr().err
    assert "'bogus' is not a checkpoint directory, a preset name or a hub repo id" in err
    assert "llama-3.2-1b" in err and "zoo-tiny-attention" in err


def test_hub_id_offline_names_the_repo(capsys):
    # conftest sets HF_HUB_OFFLINE=1 with an empty cache
    assert main(["info", "nobody/not-cached"]) == 2
    err = capsys.readouterr().err
    assert "cannot get hub repo 'nobody/not-cached'" in err and "HF_HUB_OFFLINE" in err


def test_convert_to_mamba2_writes_strict_json(tmp_path):
    import json

    for limit in ([0.0, float("inf")], [0.01, 0.5]):  # the default (omitted), and finite bounds
        layer = zoo.LayerSpec("mamba2", {"d_state": 8, "headdim": 16, "dt_limit": limit})
        cfg = zoo.ZooConfig(vocab_size=64, d_model=32, n_layers=2, layers=[layer, layer], family="mamba2")
        model = zoo.create_model(cfg)
        model.save_pretrained(tmp_path / "zoo")
        assert main(["convert", str(tmp_path / "zoo"), str(tmp_path / "ssm"), "--to", "mamba2"]) == 0
        ref = json.loads((tmp_path / "ssm" / "config.json").read_text(),
                         parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
        assert all(not isinstance(v, dict) for v in ref["ssm_cfg"].values())  # plain values mamba_ssm can read
        back = zoo.from_pretrained(tmp_path / "ssm")
        ids = torch.randint(0, 64, (1, 9))
        with torch.no_grad():
            assert torch.equal(back(ids).logits, model(ids).logits)
    layer = zoo.LayerSpec("mamba2", {"d_state": 8, "headdim": 16, "dt_limit": [0.01, float("inf")]})
    zoo.create_model(zoo.ZooConfig(vocab_size=64, d_model=32, n_layers=1, layers=[layer], family="mamba2")
                     ).save_pretrained(tmp_path / "zoo")
    assert main(["convert", str(tmp_path / "zoo"), str(tmp_path / "inf"), "--to", "mamba2"]) == 2
    assert not (tmp_path / "inf" / "config.json").exists()


def _subcommands():
    import argparse

    from zoo.cli import build_parser

    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(action.choices)


@pytest.mark.parametrize("command", _subcommands())
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "-h"])
    assert exit_info.value.code == 0
    assert "usage: zoo" in capsys.readouterr().out
