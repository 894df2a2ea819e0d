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


TINY_DEMO = {"name": "tiny-demo", "base": "default", "data": {"corpus": "stdlib", "passkey_rows": 1},
             "finetune": {"steps": 2, "batch_size": 2, "seq_len": 128},
             "variants": [{"name": "attention"},
                          {"name": "window", "swap": "all: sliding_window(window=16)", "finetune": True}],
             "evaluations": [{"kind": "loss", "length": 64, "windows": 1},
                             {"kind": "mqar", "vocab_size": 32, "n_pairs": 2, "d_models": [16],
                              "train_lengths": [16], "eval_lengths": [16, 32], "steps": 2, "batch_size": 4,
                              "eval_samples": 8, "swaps": {"window": "all: sliding_window(window=8)"}}]}


def test_demo_runs_offline(tmp_path, single_thread):
    """The demo's code path (the packaged default model, an ablation with the loss and the MQAR retrieval, the
    table and plots) on a tiny spec."""
    from zoo.demo import run_demo

    lines = []
    result = run_demo(tmp_path, spec=TINY_DEMO, progress=False, print_fn=lines.append)
    out = "\n".join(lines)
    assert "| attention |" in out and "| window |" in out and "mqar ≤16" in out and "mqar >16" in out
    assert "mqar: accuracy at lengths ≤16, the training length (in distribution)" in out  # the legend
    assert "attention none; window `all: sliding_window(window=8)`." in (tmp_path / "results.md").read_text()
    assert f"plot:   {tmp_path / 'loss_vs_position.png'}" in out and (tmp_path / "accuracy_vs_length.png").is_file()
    assert [r["cell"] for r in result["run"].records] == ["attention/loss", "attention/mqar", "window/loss",
                                                          "window/mqar"]
    assert result["run"].records[2]["variant_info"]["finetune"]["steps"] == 2


def test_the_packaged_demo_uses_no_mixer_names_in_code():
    import inspect

    import zoo.demo

    source = inspect.getsource(zoo.demo)
    assert not [name for name in zoo.list_mixers() if name in source]


def test_swap_and_eval_commands(tmp_path, capsys, single_thread):
    assert main(["swap", "default", str(tmp_path / "sw"), "every 2nd from 1: sliding_window(window=8)"]) == 0
    out = capsys.readouterr().out
    assert "  1: attention -> sliding_window(window=8)" in out and "  0: attention\n" in out
    assert zoo.from_pretrained(tmp_path / "sw").config.layers[3].mixer == "sliding_window"
    assert main(["swap", "default", str(tmp_path / "no"), "longgen", "--dry-run"]) == 0
    assert not (tmp_path / "no").exists()
    assert main(["swap", "default", str(tmp_path / "no"), "0: nope"]) == 2
    assert "unknown mixer 'nope'" in capsys.readouterr().err
    assert main(["eval", "passkey", str(tmp_path / "sw"), "--lengths", "128", "--depths", "0.5", "--samples",
                 "1"]) == 0
    assert '"train_length": 256' in capsys.readouterr().out
    assert main(["eval", "loss", "default", "--length", "32", "--windows", "1", "--bucket", "16"]) == 0
    assert "in_distribution" in capsys.readouterr().out
    assert main(["eval", "efficiency", "default", "--lengths", "16", "--decode-tokens", "1", "--repeats", "1"]) == 0
    assert main(["eval", "mqar", "--mixer", "attention=", "--steps", "1", "--train-length", "16", "--eval-lengths",
                 "16", "--pairs", "2", "--vocab-size", "16", "--d-models", "16"]) == 0
    assert "attention | 16 | 16 |" in capsys.readouterr().out


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
