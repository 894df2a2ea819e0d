"""zoo ablate: a two-variant, one-evaluation spec writes the table, CSV and plot; a rerun skips finished cells; a
killed run resumes; specs are validated naming the bad entry."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import zoo
from zoo.ablation import load_spec, parse_spec, read_results, register_evaluation, run_ablation
from zoo.cli import main

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = zoo.create_model(zoo.ZooConfig.from_dict({
        "vocab_size": 259, "d_model": 16, "n_layers": 2, "mixers": "attention", "mlp": {"intermediate_size": 32},
        "mixer_defaults": {"attention": {"num_heads": 2}}, "tie_embeddings": True,
        "extra": {"train_length": 16}}))
    path = tmp_path_factory.mktemp("base") / "tiny"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    f = tmp_path_factory.mktemp("corpus") / "text.txt"
    f.write_text("def f(x):\n    return x + 1\n\n" * 100)
    return f


def spec(base_dir, corpus, **over):
    return {"name": "tiny", "base": str(base_dir), "data": {"corpus": str(corpus)},
            "variants": [{"name": "full"}, {"name": "window", "swap": "all: sliding_window(window=4)"}],
            "evaluations": [{"kind": "loss", "length": 48, "windows": 2}], **over}


def test_cli_writes_table_csv_and_plot_and_a_rerun_skips(base_dir, corpus, tmp_path, capsys):
    import yaml

    f = tmp_path / "spec.yaml"
    f.write_text(yaml.safe_dump(spec(base_dir, corpus)))
    out = tmp_path / "out"
    assert main(["ablate", str(f), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| full |" in printed and "| window |" in printed and "ran 2 cells, skipped 0" in printed
    for name in ("results.jsonl", "results.md", "results.csv", "loss_vs_position.png", "spec.json"):
        assert (out / name).is_file(), name
    md = (out / "results.md").read_text()
    assert "loss ≤16" in md and "loss >16" in md and "`all: sliding_window(window=4)`" in md
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("variant,evaluation,kind,position,position_end,loss") and len(csv_lines) > 4
    recs = read_results(out / "results.jsonl")
    assert [r["cell"] for r in recs] == ["full/loss", "window/loss"]
    meta = recs[0]["meta"]
    assert meta["seed"] == 0 and meta["torch"] == torch.__version__ and meta["zoo"] == zoo.__version__
    assert meta["device"] in ("cpu", "cuda") and len(meta["load_average"]) == 2
    assert recs[1]["variant_info"]["swapped_layers"] == [0, 1]
    assert main(["ablate", str(f), "--out", str(out), "--no-progress"]) == 0
    assert "ran 0 cells, skipped 2" in capsys.readouterr().out
    assert len(read_results(out / "results.jsonl")) == 2
    # a changed evaluation is a new cell; the old lines stay but are not reported
    assert main(["ablate", str(f), "--out", str(out), "--no-progress", "--eval", 'loss:{"length": 32}']) == 0
    assert "ran 2 cells, skipped 0" in capsys.readouterr().out


KILLER = textwrap.dedent("""
    import os, signal, sys, json
    from zoo.ablation import register_evaluation, run_ablation

    @register_evaluation("probe")
    def probe(ctx, **params):
        if ctx.variant.name == "window":
            os.kill(os.getpid(), signal.SIGKILL)  # killed in the middle of the second cell
        return {"rows": [{"x": 1}], "summary": {"value": 1.0}}

    run_ablation(json.loads(sys.argv[1]), sys.argv[2], progress=False)
""")


def test_a_killed_run_resumes(base_dir, corpus, tmp_path):
    s = spec(base_dir, corpus, evaluations=[{"kind": "probe"}])
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", KILLER, json.dumps(s), str(out)], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert [r["cell"] for r in read_results(out / "results.jsonl")] == ["full/probe"]
    with open(out / "results.jsonl", "a") as f:
        f.write('{"cell": "window/probe", "fingerp')  # a line torn by the kill

    @register_evaluation("probe")
    def probe(ctx, **params):
        return {"rows": [{"x": 2}], "summary": {"value": 2.0}}

    run = run_ablation(s, out, progress=False, print_fn=lambda _: None)
    assert run.skipped == ["full/probe"] and run.ran == ["window/probe"]
    assert [r["summary"]["value"] for r in run.records] == [1.0, 2.0]
    assert [r["cell"] for r in read_results(out / "results.jsonl")] == ["full/probe", "window/probe"]
    assert "| full | 1.000 |" in run.report["markdown"].read_text()


def test_fine_tuned_variants_are_cached(base_dir, corpus, tmp_path):
    s = spec(base_dir, corpus, finetune={"steps": 2, "batch_size": 2, "seq_len": 16},
             variants=[{"name": "m", "swap": "1: mamba2(expand=1, headdim=8, d_state=8, ngroups=2, chunk_size=8)",
                        "init": "derive", "trainable": "swapped", "finetune": True}])
    run = run_ablation(s, tmp_path, progress=False, print_fn=lambda _: None)
    info = run.records[0]["variant_info"]
    assert info["finetune"]["steps"] == 2 and info["init"] == "derive" and info["swapped_layers"] == [1]
    saved = list((tmp_path / "models").iterdir())
    assert len(saved) == 1 and (saved[0] / "model.safetensors").is_file()
    s["evaluations"] = [{"kind": "loss", "length": 32, "windows": 1}]
    again = run_ablation(s, tmp_path, progress=False, print_fn=lambda _: None)  # new cell, same fine-tuned model
    assert again.ran == ["m/loss"] and again.records[0]["variant_info"] == info


@pytest.mark.parametrize("bad,message", [
    ({"variants": [{"name": "a", "swap": "0: nope"}]}, "variants[0] (a): swap spec '0: nope': unknown mixer 'nope'"),
    ({"variants": [{"name": "a"}, {"name": "a"}]}, "variant names must be unique"),
    ({"variants": [{"name": "a", "init": "copy"}]}, "init='copy' is not one of"),
    ({"evaluations": [{"kind": "perplexity"}]}, "evaluations[0]: unknown kind 'perplexity'"),
    ({"variants": []}, "give at least one variant"),
    ({"finetune": {"step": 3}}, "finetune: unknown key(s) ['step']"),
    ({"bogus": 1}, "unknown key(s) ['bogus']"),
])
def test_bad_specs_name_the_entry(bad, message):
    raw = {"variants": [{"name": "a"}], "evaluations": [{"kind": "loss"}], **bad}
    with pytest.raises(ValueError) as e:
        parse_spec(raw)
    assert message in str(e.value)


def test_packaged_demo_spec_is_valid():
    from zoo.assets import DEMO_SPEC

    s = load_spec(DEMO_SPEC)
    assert [v.name for v in s.variants] == ["attention", "sliding_window", "mamba2", "longgen"]
    assert {e.kind for e in s.evaluations} == {"loss", "mqar"}


def test_packaged_demo_mqar_swaps_fit_the_mqar_model():
    """The demo's retrieval evaluation (MQAR, trained from scratch per variant) resolves every variant's swap
    (its own or the spec's scaled override) against the MQAR base model, without training anything."""
    from zoo.assets import DEMO_SPEC
    from zoo.eval.mqar import MQARSetup, base_config
    from zoo.swaps import swap_config

    s = load_spec(DEMO_SPEC)
    params = dict(next(e for e in s.evaluations if e.kind == "mqar").params)
    swaps = params.pop("swaps")
    setup = MQARSetup(**params)
    assert max(setup.eval_lengths) > max(setup.train_lengths)  # it measures past the training length
    for v in s.variants:
        spec = swaps.get(v.name, v.swap)
        for d in setup.d_models:
            cfg = base_config(setup, d)
            if spec:
                cfg = swap_config(cfg, spec)[0]
            zoo.create_model(cfg)


def _mqar_ctx(swap, **spec_extra):
    from zoo.ablation.evaluations import EvalContext

    spec = parse_spec({"variants": [{"name": "a"}, {"name": "w", "swap": swap}],
                       "evaluations": [{"kind": "mqar"}], **spec_extra})
    return EvalContext(spec=spec, variant=spec.variants[1], model=lambda: None, tokenizer=None, train_length=None,
                       corpus=lambda split: [])


def test_mqar_evaluation_uses_the_swaps_override():
    from zoo.ablation.evaluations import get_evaluation

    tiny = {"vocab_size": 32, "n_pairs": 2, "d_models": [16], "train_lengths": [16], "eval_lengths": [16, 32],
            "steps": 1, "batch_size": 2, "eval_samples": 2}
    run = get_evaluation("mqar")
    own = run(_mqar_ctx("all: sliding_window(window=64)"), **tiny)["rows"]
    scaled = run(_mqar_ctx("all: sliding_window(window=64)"), swaps={"w": "all: sliding_window(window=4)"},
                 **tiny)["rows"]
    assert scaled[1]["state_bytes"] < own[1]["state_bytes"]  # the override's window 4 is used, not 64
    with pytest.raises(ValueError, match=r"mqar: swaps names unknown variant\(s\) \['x'\]"):
        run(_mqar_ctx(None), swaps={"x": None}, **tiny)


def test_state_collapse_experiment_on_tiny_sizes(tmp_path):
    from zoo.experiments.state_collapse import Setup, run

    s = Setup(steps=2, batch_size=2, train_len=32, curriculum=[16], eval_lengths=[32, 64], eval_depths=[0.5],
              eval_samples=1, loss_length=64, d_model=32, headdim=16, d_state=8, chunk_size=8)
    run(s, tmp_path, progress=False)
    md = (tmp_path / "results.md").read_text()
    for name in ("baseline", "decay_scale=0.9688", "input_scale=0.7", "dt_scale=0.5", "state_norm (calibrated x2)",
                 "state_window=32", "passkey ≤32", "loss >32"):
        assert name in md, name
    assert "step 2: length 32" in (tmp_path / "training.md").read_text()  # the curriculum ends at train_len
    stamp = (tmp_path / "base" / "model.safetensors").stat().st_mtime_ns
    run(s, tmp_path, progress=False)  # resumes: the base is not trained again, every cell is skipped
    assert (tmp_path / "base" / "model.safetensors").stat().st_mtime_ns == stamp
    assert len(read_results(tmp_path / "results.jsonl")) == 12


def test_committed_state_collapse_report_shows_the_task_learned_and_the_collapse():
    """reports/state_collapse (scripts/state_collapse.py): the baseline learned passkey retrieval at its training
    length (>= 90%), and past it both its passkey accuracy and its loss collapse."""
    from pathlib import Path

    records = {r["cell"]: r for r in read_results(Path(__file__).resolve().parents[1] / "reports" / "state_collapse"
                                                  / "results.jsonl")}
    pk, loss = records["baseline/passkey"]["summary"], records["baseline/loss"]["summary"]
    L = pk["train_length"]
    assert pk[f"accuracy@{L}"] >= 0.9
    longest = max(int(k.split("@")[1]) for k in pk if k.startswith("accuracy@"))
    assert longest >= 16 * L and pk[f"accuracy@{longest}"] <= 0.5 * pk[f"accuracy@{L}"]
    assert loss["extrapolated"] > 2 * loss["in_distribution"]
