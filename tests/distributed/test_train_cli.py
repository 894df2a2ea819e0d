"""``zoo train`` end to end (gloo, CPU): one process on text with periodic evaluation and a save_pretrained result;
2 processes under ``torchrun`` (DDP) and under FSDP2 + sequence parallelism + activation checkpointing + gradient
accumulation, stopped and resumed, follow the single-process loss sequence of the same global batches; the
distributed loop on one process is ``zoo.train.Trainer``'s; refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import zoo
from zoo.cli import main
from zoo.distributed import Parallelism, run_local
from zoo.distributed.trainer import DistributedTrainer
from zoo.train import TrainConfig, Trainer, packed_batches

VOCAB, EOS = 64, 63
CONFIG = {"vocab_size": VOCAB, "d_model": 32, "n_layers": 3, "tie_embeddings": True, "eos_token_id": EOS,
          "mixers": {"0": "attention", "1": "mamba2(d_state=8, headdim=8, chunk_size=8)",
                     "2": "sliding_window(window=6)"},
          "mlp": {"intermediate_size": 64}, "mixer_defaults": {"attention": {"num_heads": 4, "num_kv_heads": 2}}}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    """Documents of arithmetic progressions mod 60 (random start, stride, length), each ended by EOS."""
    rng = np.random.default_rng(0)
    parts = []
    for _ in range(300):
        n, start, stride = rng.integers(4, 40), rng.integers(0, 60), rng.integers(1, 7)
        parts += [(start + stride * np.arange(n)) % 60, [EOS]]
    path = tmp_path_factory.mktemp("data") / "tokens.npy"
    np.save(path, np.concatenate(parts).astype(np.uint16))
    return path


def _args(out: Path, data: Path, *extra: str, model: tuple[str, ...] = ("--config", json.dumps(CONFIG))) -> list[str]:
    return ["train", *model, "--data", str(data), "--out", str(out), "--seq-len", "16",
            "--batch-size", "4", "--steps", "4", "--warmup-steps", "1", "--lr", "1e-2", "--no-progress",
            "--eval", "none", *extra]


def _log(out: Path, event: str = "step") -> list[dict]:
    return [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if r["event"] == event]


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in _log(out)]


def _assert_curves_match(out: Path, ref: Path) -> None:
    got, want = _log(out), _log(ref)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], abs=2e-5), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), a["step"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, token_file) -> Path:
    """The single-process run every distributed run is compared with (2 micro-batches per step)."""
    out = tmp_path_factory.mktemp("runs") / "single"
    assert main(_args(out, token_file, "--grad-accum", "2")) == 0
    losses = _losses(out)
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.1  # it learns: matching curves are not trivially equal
    return out


def test_single_process_text_with_evaluation_and_final_model(tmp_path, capsys) -> None:
    text = tmp_path / "corpus"
    text.mkdir()
    for i in range(12):  # documents: files; held out by a hash of their names
        (text / f"doc{i}.txt").write_text(" ".join(f"line {j} of document {i}." for j in range(40)))
    config = {**CONFIG, "vocab_size": 259, "eos_token_id": 258}
    out = tmp_path / "run"
    args = ["train", "--config", json.dumps(config), "--data", str(text), "--out", str(out), "--seq-len", "32",
            "--batch-size", "2", "--steps", "4", "--eval-every", "2", "--eval", 'loss:{"length": 64, "windows": 2}',
            "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "trained to step 4" in printed and "eval at step 4: loss/loss" in printed
    assert [r["step"] for r in _log(out, "eval")] == [2, 4]
    assert all(np.isfinite(r["loss/loss"]) for r in _log(out, "eval"))
    model = zoo.from_pretrained(out / "final")
    assert model.config.extra["train_length"] == 32 and model.config.extra["train_steps"] == 4

    # the final checkpoint consolidates to the same weights; rerunning the finished command trains nothing
    assert main(["consolidate", str(out / "checkpoints"), str(tmp_path / "consolidated")]) == 0
    again = zoo.from_pretrained(tmp_path / "consolidated")
    for name, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[name]), name
    assert main(args) == 0
    assert "trained to step 4 (resumed from 4)" in capsys.readouterr().out
    assert len(_log(out)) == 4


def test_distributed_trainer_on_one_process_is_the_trainer(token_file) -> None:
    """DistributedTrainer (shard_batch + lm_loss + its clip/step) on one process == zoo.train.Trainer."""
    from zoo.data import load_token_file

    stream, docs = load_token_file(token_file, eos_token_id=EOS)
    cfg = TrainConfig(steps=3, lr=1e-2, warmup_steps=1, grad_accum=2)

    curves = []
    for base in (Trainer, DistributedTrainer):
        class Recording(base):  # the gradient norms too: AdamW and clipping hide a uniform gradient scale
            def clip_and_step(self) -> float | None:
                self.norms.append(super().clip_and_step())
                return self.norms[-1]

        torch.manual_seed(0)
        model = zoo.create_model(CONFIG)
        trainer = Recording(model, config=cfg) if base is Trainer else Recording(model, Parallelism(), config=cfg)
        trainer.norms = []
        data = packed_batches(stream, docs, 16, 4, generator=torch.Generator().manual_seed(0))
        curves.append((trainer.fit(data, progress=False).losses, trainer.norms))
    assert curves[0][0] == pytest.approx(curves[1][0], abs=1e-6)
    assert curves[0][1] == pytest.approx(curves[1][1], rel=1e-5)


def _train_rank(rank: int, world: int, args: list[str]) -> int:
    return main(args)


def test_fsdp_sequence_parallel_stop_and_resume_follows_single_process(tmp_path, token_file, reference) -> None:
    out = tmp_path / "fsdp"
    args = _args(out, token_file, "--strategy", "fsdp", "--sequence-parallel", "2", "--activation-checkpointing",
                 "--grad-accum", "2", "--eval-data", str(token_file), "--eval-every", "2",
                 "--eval", 'loss:{"length": 32, "windows": 2}')  # evaluation on the gathered weights
    assert run_local(_train_rank, 2, [*args, "--stop-at", "2"]) == [0, 0]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000002"] and not (out / "final").exists()
    assert run_local(_train_rank, 2, args) == [0, 0]
    assert [r["step"] for r in _log(out, "resume")] == [2]
    assert [r["step"] for r in _log(out, "eval")] == [2, 4] and all(np.isfinite(r["loss/loss"])
                                                                    for r in _log(out, "eval"))
    _assert_curves_match(out, reference)
    # the result: the full weights of the sharded model, as one process would have them
    model, ref = zoo.from_pretrained(out / "final"), zoo.from_pretrained(reference / "final")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, ref.state_dict()[name], atol=2e-5, rtol=0, msg=name)


@pytest.mark.slow
def test_torchrun_ddp_follows_single_process(tmp_path, token_file, reference) -> None:
    """The README's command: ``torchrun --nproc-per-node 2 -m zoo train ...`` (gloo on the CPU)."""
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "zoo", *_args(out, token_file, "--strategy", "ddp", "--grad-accum", "2", "--device", "cpu")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trained to step 4" in proc.stdout
    assert _log(out, "start")[0]["world_size"] == 2
    _assert_curves_match(out, reference)


def test_refusals(tmp_path, token_file, capsys) -> None:
    base = ["train", "--data", str(token_file), "--out", str(tmp_path / "x"), "--no-progress"]
    assert main([*base, "--config", json.dumps(CONFIG), "--model", "default"]) == 2
    assert "exactly one of --model" in capsys.readouterr().err
    assert main([*base, "--config", json.dumps(CONFIG), "--eval", "nonsense"]) == 2
    assert "unknown evaluation 'nonsense'" in capsys.readouterr().err
    assert main([*base, "--config", json.dumps({**CONFIG, "vocab_size": 32, "eos_token_id": 31})]) == 2
    assert "token id 63 >= the model's vocab_size 32" in capsys.readouterr().err
    assert main([*base, "--config", "no-such-preset"]) == 2
    assert "neither a preset" in capsys.readouterr().err
    assert main(["consolidate", str(tmp_path), str(tmp_path / "y")]) == 2
    assert "neither a checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_follows_fp32_on_one_process(token_file, precision: str) -> None:
    """The autocast paths (bf16; fp16 with its loss scaler, checkpointed) run and stay near the fp32 curve; the CPU
    default is fp32."""
    from zoo.data import load_token_file
    from zoo.distributed import autocast_dtype

    assert autocast_dtype("auto", torch.device("cpu")) is None
    stream, docs = load_token_file(token_file, eos_token_id=EOS)
    curves = {}
    for p in ("fp32", precision):
        torch.manual_seed(0)
        trainer = DistributedTrainer(zoo.create_model(CONFIG), Parallelism(), precision=p,
                                     config=TrainConfig(steps=3, lr=1e-2, warmup_steps=1, grad_clip=None))
        data = packed_batches(stream, docs, 16, 4, generator=torch.Generator().manual_seed(0))
        curves[p] = trainer.fit(data, progress=False).losses
    assert ("grad_scaler" in trainer.extras) == (precision == "fp16")
    assert curves[precision] != curves["fp32"]  # it did compute in low precision
    assert curves[precision] == pytest.approx(curves["fp32"], abs=3e-2)


def test_layout_refusals_come_before_training(tmp_path, token_file) -> None:
    def train(rank: int, world: int, *extra: Any) -> str:
        try:
            from zoo.distributed.run import run_training
            from zoo.train_run import TrainRun

            kw = {"seq_len": 16, "batch_size": 4, **dict(zip(extra[::2], extra[1::2]))}
            run_training(TrainRun(config=json.dumps(CONFIG), data=str(token_file), out=str(tmp_path / str(extra)),
                                  steps=1, evals=["none"], progress=False, **kw))
        except ValueError as e:
            return str(e)
        return "trained"

    assert run_local(train, 2, "batch_size", 3) == ["--batch-size 3 is not divisible by the 2 data-parallel "
                                                    "replicas (2 processes / --sequence-parallel 1)"] * 2
    assert "--seq-len 15 is not divisible by --sequence-parallel 2" in run_local(
        train, 2, "seq_len", 15, "sequence_parallel", 2)[0]
    config = {**CONFIG, "mixers": "infllmv2(kernel_size=4, kernel_stride=2, block_size=8, window_size=8, topk=3)"}
    with pytest.raises(ValueError, match=r"\['infllmv2'\] cannot keep packed documents apart"):
        from zoo.distributed.run import run_training
        from zoo.train_run import TrainRun

        run_training(TrainRun(config=json.dumps(config), data=str(token_file), out=str(tmp_path / "i"), steps=1,
                              evals=["none"], progress=False))


def test_from_a_checkpoint_with_a_swap_trains_only_the_swapped_mixers(tmp_path, token_file, reference) -> None:
    out = tmp_path / "swapped"
    model = ("--model", str(reference / "final"), "--swap", "2: attention", "--trainable", "swapped")
    assert main(_args(out, token_file, "--steps", "1", model=model)) == 0
    before, after = zoo.from_pretrained(reference / "final"), zoo.from_pretrained(out / "final")
    assert [ls.mixer for ls in after.config.layers] == ["attention", "mamba2", "attention"]
    changed = {k for k, v in after.state_dict().items()
               if k not in before.state_dict() or not torch.equal(v, before.state_dict()[k])}
    assert changed and all(k.startswith("layers.2.mixer.") for k in changed)
