"""``zoo train`` / ``zoo consolidate``: the flags (:class:`TrainRun`) and the command-line parser, kept light (the
distributed machinery is imported when a command runs). The run itself is :func:`zoo.distributed.run.run_training`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

__all__ = ["TrainRun", "parse_eval", "add_train_commands", "STRATEGIES", "PRECISIONS"]

STRATEGIES = ("none", "ddp", "fsdp")  # zoo.distributed.parallel.STRATEGIES
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # zoo.distributed.trainer.PRECISIONS


@dataclass
class TrainRun:
    """Everything ``zoo train`` needs (the command-line flags, one to one)."""

    out: str = "zoo-train"
    model: str | None = None  # checkpoint directory, hub id, preset (its checkpoint) or "default"
    config: str | None = None  # from scratch: preset name, config file (.json/.yaml) or inline JSON
    swap: str | None = None  # a zoo.swaps spec applied before training
    swap_init: str = "reuse"
    trainable: str = "all"
    data: str = "stdlib"  # token file (.npy/.bin/.safetensors), text file or directory, or "stdlib"
    eval_data: str | None = None  # default: the held-out split of a text corpus
    tokenizer: str | None = None  # "bytes", or a directory with tokenizer files (default: the model's own)
    token_dtype: str = "uint16"  # raw .bin token files
    eos_token_id: int | None = None  # document boundaries in token files (default: the config's eos_token_id)
    packing: bool = True  # seq_idx document boundaries inside windows
    seq_len: int = 256
    batch_size: int = 8  # global rows per micro-batch
    grad_accum: int = 1
    steps: int = 1000  # the length of the run (the schedule's)
    stop_at: int | None = None  # end this invocation at this step (checkpointed; a rerun continues to ``steps``)
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float | None = 1.0
    evals: list[str] | None = None  # "kind" or "kind:{json params}"; None: "loss" when there is held-out text
    eval_every: int = 0
    log_every: int = 10
    seed: int = 0
    strategy: str = "auto"  # auto (ddp on many processes) | none | ddp | fsdp
    sequence_parallel: int = 1
    activation_checkpointing: bool = False
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    device: str | None = None  # cuda | cpu (default: cuda when available)
    save_every: int = 0  # 0: a checkpoint at the end only
    keep: int | None = 2
    resume: bool = True  # continue from the latest checkpoint in out/checkpoints
    progress: bool = True

    def __post_init__(self) -> None:
        if (self.model is None) == (self.config is None):
            raise ValueError("give exactly one of --model (a checkpoint to start from) and --config (from scratch)")
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "sequence_parallel"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.strategy != "auto" and self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r} is not one of {['auto', *STRATEGIES]}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} is not one of {list(PRECISIONS)}")
        if self.stop_at is not None and self.stop_at < 1:
            raise ValueError(f"stop_at must be >= 1, got {self.stop_at!r}")
        if self.evals is not None:
            for e in self.evals:
                if e.strip() != "none":
                    parse_eval(e)



def parse_eval(text: str) -> tuple[str, str, dict[str, Any]]:
    """``"kind"`` or ``"kind:{json}"`` -> ``(name, kind, params)`` (an evaluation of :mod:`zoo.ablation`)."""
    from zoo.ablation.evaluations import get_evaluation

    kind, _, params = text.partition(":")
    kind = kind.strip()
    get_evaluation(kind)  # ValueError naming the available ones
    try:
        parsed = json.loads(params) if params.strip() else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"--eval {text!r}: the parameters are not JSON: {e}") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"--eval {text!r}: the parameters must be a JSON object")
    return kind, kind, parsed



# ---------------------------------------------------------------------------------------------- the CLI
def add_train_commands(sub: Any) -> None:
    """``zoo train`` and ``zoo consolidate`` on the ``zoo`` command's subparsers."""
    d = TrainRun.__dataclass_fields__
    s = sub.add_parser("train", help="train a model on one process or many (torchrun): DDP / FSDP2 / sequence "
                                     "parallel, resumable distributed checkpoints",
                       description="Train any zoo model. Under torchrun every process runs this command; see the "
                                   "README section 'Training on many GPUs'.")
    g = s.add_argument_group("model")
    g.add_argument("--model", default=None, help="start from a checkpoint: directory, hub id, preset or 'default'")
    g.add_argument("--config", default=None, help="from scratch: a preset name, a config file (.json/.yaml), a "
                                                  "checkpoint directory (its config only) or inline JSON")
    g.add_argument("--swap", default=None, help="swap layers before training (zoo.swaps grammar), e.g. "
                                                "'every 2nd from 1: mamba2'")
    g.add_argument("--swap-init", default="reuse", choices=["reuse", "fresh", "derive"])
    g.add_argument("--trainable", default="all", choices=["all", "swapped", "swapped_blocks"])
    g = s.add_argument_group("data")
    g.add_argument("--data", default="stdlib", help="token file (.npy/.bin/.safetensors), a text file or "
                                                     "directory, or 'stdlib' (default: the Python stdlib's source)")
    g.add_argument("--eval-data", default=None, help="held-out data (default: the held-out split of a text corpus)")
    g.add_argument("--tokenizer", default=None, help="'bytes' or a directory with tokenizer files (default: the "
                                                     "model checkpoint's own, else bytes)")
    g.add_argument("--token-dtype", default=d["token_dtype"].default, help="dtype of raw .bin token files")
    g.add_argument("--eos-token-id", type=int, default=None,
                   help="document separator in token files (default: the model config's eos_token_id)")
    g.add_argument("--no-packing", dest="packing", action="store_false",
                   help="let windows look across document boundaries (no seq_idx)")
    g.add_argument("--seq-len", type=int, default=d["seq_len"].default)
    g.add_argument("--batch-size", type=int, default=d["batch_size"].default,
                   help="global rows per micro-batch (split over the data-parallel replicas)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g = s.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=d["steps"].default)
    g.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="stop this invocation at STEP with a checkpoint (e.g. a time-limited job slot); rerunning "
                        "the same command continues to --steps with the identical loss sequence")
    g.add_argument("--lr", type=float, default=d["lr"].default)
    g.add_argument("--min-lr-ratio", type=float, default=d["min_lr_ratio"].default)
    g.add_argument("--warmup-steps", type=int, default=d["warmup_steps"].default)
    g.add_argument("--weight-decay", type=float, default=d["weight_decay"].default)
    g.add_argument("--grad-clip", type=float, default=d["grad_clip"].default, help="0: no clipping")
    g.add_argument("--seed", type=int, default=0)
    g = s.add_argument_group("evaluation and logging")
    g.add_argument("--eval", dest="evals", action="append", default=None, metavar="KIND[:JSON]",
                   help="an ablation evaluation (loss, passkey, mqar, efficiency) with optional JSON parameters, "
                        "e.g. 'loss:{\"length\": 1024}' (repeatable; 'none': no evaluation; default: loss when "
                        "there is held-out text)")
    g.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (0: at the end only)")
    g.add_argument("--log-every", type=int, default=d["log_every"].default)
    g.add_argument("--no-progress", dest="progress", action="store_false")
    g = s.add_argument_group("parallelism and precision")
    g.add_argument("--strategy", default="auto", choices=["auto", *STRATEGIES],
                   help="auto: ddp on many processes, none on one")
    g.add_argument("--sequence-parallel", type=int, default=1, help="ranks per sequence (Ulysses / state passing)")
    g.add_argument("--activation-checkpointing", action="store_true", help="recompute every block in the backward")
    g.add_argument("--precision", default="auto", choices=list(PRECISIONS),
                   help="autocast dtype (auto: bf16 on GPU, fp32 on CPU)")
    g.add_argument("--device", default=None, choices=["cuda", "cpu"])
    g = s.add_argument_group("output and checkpoints")
    g.add_argument("--out", default=d["out"].default, help="run directory: log.jsonl, checkpoints/, final/")
    g.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: at the end only)")
    g.add_argument("--keep", type=int, default=2, help="checkpoints kept (0: all)")
    g.add_argument("--no-resume", dest="resume", action="store_false",
                   help="start over even when OUT/checkpoints holds a checkpoint")
    s.set_defaults(fn=cmd_train)
    s = sub.add_parser("consolidate", help="a distributed training checkpoint -> a save_pretrained directory")
    s.add_argument("checkpoint", help="a checkpoints/step-N directory, or a directory of them (the latest)")
    s.add_argument("out")
    s.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    s.set_defaults(fn=cmd_consolidate)


def cmd_train(args: argparse.Namespace) -> int:
    names = {f.name for f in fields(TrainRun)}
    kw = {k: v for k, v in vars(args).items() if k in names}
    kw["grad_clip"] = kw["grad_clip"] or None
    kw["keep"] = kw["keep"] or None
    from zoo.distributed.run import run_training

    joined = torch.distributed.is_initialized()  # a caller's process group stays; one this run started ends
    summary = run_training(TrainRun(**kw))
    if torch.distributed.is_initialized():
        rank = torch.distributed.get_rank()
        if not joined:
            torch.distributed.destroy_process_group()
        if rank:
            return 0
    losses = summary["losses"]
    last = f", last loss {losses[-1]:.4f}" if losses else ""
    speed = f", {summary['tokens_per_s']:,.0f} tokens/s" if summary["tokens_per_s"] else ""
    print(f"trained to step {summary['steps']} (resumed from {summary['resumed_from']}){last}{speed}")
    for e in summary["evals"][-1:]:
        print("eval at step {}: {}".format(e["step"], ", ".join(f"{k} {v:.4g}" for k, v in e.items()
                                                                   if k != "step" and isinstance(v, float))))
    if summary["final"]:
        print(f"model: {summary['final']}")
    else:
        print(f"stopped at step {summary['steps']} of {args.steps}: rerun the same command to continue")
    print(f"log: {summary['log']}\ncheckpoints: {summary['checkpoints']}")
    return 0


def cmd_consolidate(args: argparse.Namespace) -> int:
    from zoo.distributed.checkpoint import consolidate, latest_checkpoint

    path = Path(args.checkpoint)
    if not (path / ".metadata").is_file():
        latest = latest_checkpoint(path)
        if latest is None:
            raise ValueError(f"{path} is neither a checkpoint (step-N with .metadata) nor a directory holding one")
        path = latest
    dtype = getattr(torch, args.dtype) if args.dtype else None
    print(f"wrote {consolidate(path, args.out, dtype=dtype)} (from {path})")
    return 0
