"""``zoo train``: train any zoo model on one process or many (``torchrun``), from scratch or from a checkpoint,
optionally after a layer swap, with resumable distributed checkpoints and a ``save_pretrained`` result.

The pieces are the package's own: the model (``zoo.create_model`` / ``zoo.from_pretrained``, ``zoo.swap_layers``),
the data (:mod:`zoo.data` token files, or text through a tokenizer and :mod:`zoo.eval.corpus`, packed with
document ids by :func:`zoo.train.packed_batches` and checkpointable through :class:`zoo.data.ResumableBatches`),
the layout and wrapping (:mod:`zoo.distributed.parallel`), the loop (:class:`zoo.train.Trainer` as
:class:`~zoo.distributed.trainer.DistributedTrainer`), the evaluations (:mod:`zoo.ablation.evaluations`, run on
rank 0 on the full weights) and the checkpoints (:mod:`zoo.distributed.checkpoint`).

Every rank builds the same model (same seed) and draws the same global batches (``batch_size`` rows of
``seq_len`` tokens per micro-batch, ``grad_accum`` micro-batches per step); each trains on its rows (data
parallel) and columns (sequence parallel), so the loss curve does not depend on the number of processes.

The output directory holds ``log.jsonl`` (one line per step, evaluation and checkpoint), ``checkpoints/step-N``
(DCP; a rerun with the same arguments resumes from the latest) and ``final/`` (``save_pretrained``, with the
recipe in ``config.extra``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

import zoo
from zoo.data import TOKEN_FILE_SUFFIXES, ResumableBatches, load_token_file
from zoo.distributed.checkpoint import gather_full_model, save_pretrained_distributed
from zoo.distributed.launch import init_distributed
from zoo.distributed.parallel import Parallelism, parallelize, setup_parallelism, unwrap
from zoo.distributed.trainer import DistributedTrainer, broadcast_object
from zoo.train import TrainConfig, packed_batches
from zoo.train_run import TrainRun, parse_eval

__all__ = ["run_training", "build_model", "load_training_data", "make_eval_fn"]

MAX_EVAL_TOKENS = 1 << 21  # documents read from an evaluation token file
MAX_CHECKED_TOKENS = 1 << 27  # token files up to this size are checked against the vocabulary once


# ---------------------------------------------------------------------------------------------- pieces
def _read_config(spec: str) -> zoo.ZooConfig:
    if spec.lstrip().startswith("{"):
        return zoo.ZooConfig.from_dict(json.loads(spec))
    path = Path(spec)
    if path.is_file():
        if path.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(path.read_text())
        else:
            raw = json.loads(path.read_text())
        return zoo.ZooConfig.from_dict(raw)
    if path.is_dir() and (path / "config.json").is_file():
        return zoo.ZooConfig.load(path / "config.json")
    if spec in zoo.list_presets():
        return zoo.ZooConfig.from_preset(spec)
    raise ValueError(f"--config {spec!r} is neither a preset ({', '.join(zoo.list_presets())}), a config file, a "
                     "checkpoint directory nor inline JSON")


def build_model(run: TrainRun) -> nn.Module:
    """The model to train (fp32 parameters), the same on every rank: seeded random init or a checkpoint, then the
    swap."""
    torch.manual_seed(run.seed)
    if run.config is not None:
        model = zoo.create_model(_read_config(run.config))
    elif run.model == "default" and not Path(run.model).exists():
        model = zoo.default_model()
    else:
        model = zoo.from_pretrained(run.model)
    if any(p.is_floating_point() and p.dtype != torch.float32 for p in model.parameters()):
        model.float()  # autocast computes in bf16/fp16; parameters and optimizer state stay fp32
    if run.swap:
        torch.manual_seed(run.seed)  # fresh mixers initialised alike on every rank
        zoo.swap_layers(model, run.swap, init=run.swap_init, trainable=run.trainable)
    return model


def _tokenizer(run: TrainRun, model: nn.Module) -> Any:
    from zoo.tokenizers import ByteTokenizer, load_tokenizer

    if run.tokenizer == "bytes":
        return ByteTokenizer()
    if run.tokenizer is not None:
        return load_tokenizer(run.tokenizer)
    source = getattr(model, "source", None)
    return load_tokenizer(source.path if source is not None else None)


def _is_token_file(path: str) -> bool:
    return Path(path).suffix.lower() in TOKEN_FILE_SUFFIXES and Path(path).is_file()


def load_training_data(source: str, split: str, *, tokenizer: Any, eos_token_id: int | None, token_dtype: str
                       ) -> tuple[Any, Any]:
    """``(stream, doc_ids)``: a token file as it is (``split`` ignored), or the ``split`` of a text corpus
    tokenized, each document followed by ``eos_token_id`` (when set) and numbered."""
    if _is_token_file(source):
        return load_token_file(source, dtype=token_dtype, eos_token_id=eos_token_id)
    from zoo.eval.corpus import load_corpus, pack_documents

    docs = load_corpus(source, split).token_documents(tokenizer)
    if not docs:
        raise ValueError(f"the {split} split of {source!r} holds no tokens")
    return pack_documents(docs, eos_token_id)


def _documents(stream: Any, doc_ids: Any, limit: int = MAX_EVAL_TOKENS) -> list[torch.Tensor]:
    """The documents of the first ``limit`` tokens of a stream, as tensors (for the evaluations)."""
    n = min(stream.numel(), limit)
    ids = stream[torch.arange(n)]
    if doc_ids is None:
        return [ids]
    docs = doc_ids[torch.arange(n)]
    cuts = (torch.nonzero(docs[1:] != docs[:-1]).flatten() + 1).tolist()
    return [d for d in torch.tensor_split(ids, cuts) if d.numel() > 1]


def _check_vocab(stream: Any, vocab_size: int, what: str) -> None:
    if stream.numel() > MAX_CHECKED_TOKENS:
        return
    top = int(stream.max())
    if top >= vocab_size:
        raise ValueError(f"{what} holds token id {top} >= the model's vocab_size {vocab_size}")


def _check_layout(run: TrainRun, model: nn.Module, par: Parallelism, *, packed: bool) -> None:
    """Refuse early (before any step) what the first step would refuse."""
    if run.batch_size % par.dp_size:
        raise ValueError(f"--batch-size {run.batch_size} is not divisible by the {par.dp_size} data-parallel "
                         f"replicas ({par.world_size} processes / --sequence-parallel {par.sp_size})")
    if run.seq_len % par.sp_size:
        raise ValueError(f"--seq-len {run.seq_len} is not divisible by --sequence-parallel {par.sp_size}")
    if packed:
        names = sorted({spec.mixer for spec, block in zip(model.config.layers, model.layers)
                        if not getattr(block.mixer, "supports_packing", False)})
        if names:
            raise ValueError(f"mixer(s) {names} cannot keep packed documents apart (no seq_idx support): "
                             "train with --no-packing")


def _eval_model(model: nn.Module, par: Parallelism, strategy: str) -> nn.Module | None:
    """A model rank 0 can run alone with the current weights (every rank calls this; None elsewhere)."""
    if par.sequence is None and strategy in ("none", "ddp"):
        return unwrap(model) if par.is_main else None  # a full replica already
    return gather_full_model(model, device=par.device)  # FSDP2 shards / sequence-parallel mixers: a plain copy


def make_eval_fn(run: TrainRun, trainer: DistributedTrainer, evals: list[str], tokenizer: Any,
                 heldout: list[torch.Tensor] | None):
    """``eval_fn(model, step)`` for ``Trainer.fit``: the evaluations on rank 0, their numeric summaries on every
    rank (``"<kind>/<key>"``), the full results in the log."""
    from zoo.ablation.evaluations import EvalContext, get_evaluation
    from zoo.ablation.spec import AblationSpec, Variant

    parsed = [parse_eval(e) for e in evals]
    variant = Variant(name="train", swap=run.swap)
    spec = AblationSpec(name="train", variants=[variant], evaluations=[], seed=run.seed, train_length=run.seq_len)

    def corpus(split: str) -> list[torch.Tensor]:
        if heldout is None:
            raise ValueError("this evaluation needs held-out text: give --eval-data (a token file or text)")
        return heldout

    def load_docs(source: str, split: str) -> list[torch.Tensor]:
        stream, doc_ids = load_training_data(source, split, tokenizer=tokenizer, eos_token_id=None,
                                             token_dtype=run.token_dtype)
        return _documents(stream, doc_ids)

    def eval_fn(model: nn.Module, step: int) -> dict[str, Any]:
        plain = _eval_model(model, trainer.par, trainer.strategy)
        metrics: dict[str, Any] = {}
        if plain is not None:
            plain.eval()
            ctx = EvalContext(spec=spec, variant=variant, model=lambda: plain, tokenizer=tokenizer,
                              train_length=run.seq_len, corpus=corpus, progress=False,
                              extras={"load_docs": load_docs})
            full = {}
            for name, kind, params in parsed:
                t0 = time.perf_counter()
                with trainer.autocast():
                    res = get_evaluation(kind)(ctx, **params)
                full[name] = {**res, "seconds": round(time.perf_counter() - t0, 3)}
                metrics.update({f"{name}/{k}": v for k, v in res["summary"].items() if isinstance(v, float)})
            trainer.log({"event": "eval", "step": step, **metrics, "results": full})
        return broadcast_object(metrics)

    return eval_fn


# ---------------------------------------------------------------------------------------------- the run
def run_training(run: TrainRun) -> dict[str, Any]:
    """Train as ``run`` says (module docstring); every rank calls this. Returns (on every rank) the losses of the
    steps run now, the evaluations, the step reached, and the paths written."""
    info = init_distributed(device=run.device)
    par = setup_parallelism(run.sequence_parallel, device=info.device)
    strategy = run.strategy if run.strategy != "auto" else ("ddp" if par.world_size > 1 else "none")
    model = build_model(run)
    config = model.config
    tokenizer = _tokenizer(run, model)
    eos = run.eos_token_id if run.eos_token_id is not None else config.eos_token_id
    stream, doc_ids = load_training_data(run.data, "train", tokenizer=tokenizer, eos_token_id=eos,
                                         token_dtype=run.token_dtype)
    _check_vocab(stream, config.vocab_size, f"the training data {run.data!r}")
    _check_layout(run, model, par, packed=run.packing and doc_ids is not None)
    heldout = None
    if run.eval_data is not None or not _is_token_file(run.data):
        eval_source = run.eval_data if run.eval_data is not None else run.data
        heldout = _documents(*load_training_data(eval_source, "heldout", tokenizer=tokenizer, eos_token_id=None,
                                                 token_dtype=run.token_dtype))
    evals = run.evals if run.evals is not None else (["loss"] if heldout is not None else [])
    evals = [e for e in evals if e.strip() != "none"]

    wrapped = parallelize(model, strategy, par, activation_checkpointing=run.activation_checkpointing)
    cfg = TrainConfig(steps=run.steps, lr=run.lr, min_lr_ratio=run.min_lr_ratio, warmup_steps=run.warmup_steps,
                      weight_decay=run.weight_decay, grad_clip=run.grad_clip, grad_accum=run.grad_accum,
                      eval_every=run.eval_every, log_every=run.log_every)
    data = ResumableBatches(lambda g: packed_batches(stream, doc_ids, run.seq_len, run.batch_size, generator=g,
                                                     use_seq_idx=run.packing), seed=run.seed)
    out = Path(run.out)
    trainer = DistributedTrainer(wrapped, par, config=cfg, strategy=strategy, precision=run.precision,
                                 checkpoint_dir=out / "checkpoints", save_every=run.save_every, keep=run.keep,
                                 extras={"data": data}, log_file=out / "log.jsonl")
    start = trainer.resume() if run.resume else 0
    if start == 0:
        trainer.log({"event": "start", "world_size": par.world_size, "strategy": strategy,
                     "sequence_parallel": par.sp_size, "precision": str(trainer.dtype or torch.float32),
                     "device": str(par.device), "parameters": unwrap(wrapped).num_parameters(),
                     "run": asdict(run)})
    eval_fn = make_eval_fn(run, trainer, evals, tokenizer, heldout) if evals else None
    losses, result_evals, seconds, tokens = [], [], 0.0, 0
    end = min(run.steps, run.stop_at) if run.stop_at is not None else run.steps
    if end > start:
        result = trainer.fit(data, steps=end - start, eval_fn=eval_fn, progress=run.progress and par.is_main,
                             desc=f"train ({par.world_size} proc, {strategy})")
        losses, result_evals, seconds, tokens = result.losses, result.evals, result.seconds, result.tokens
    if run.save_every == 0 or trainer.step_count % run.save_every:  # (else saved by the last step)
        trainer.save()
    summary = {"steps": trainer.step_count, "resumed_from": start, "losses": losses, "evals": result_evals,
               "seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds if seconds else None,
               "final": None, "checkpoints": str(out / "checkpoints"), "log": str(out / "log.jsonl")}
    if trainer.step_count >= run.steps:  # finished (not stopped early by stop_at): the save_pretrained result
        unwrap(wrapped).config.extra = {**config.extra, "train_length": run.seq_len, "trained_by": "zoo train",
                                        "train_steps": trainer.step_count, "train_data": str(run.data),
                                        "train_recipe": asdict(run)}
        tok_dir = getattr(getattr(model, "source", None), "path", None) if run.tokenizer is None else run.tokenizer
        from zoo.checkpoint import tokenizer_files

        tokenizer_dir = tok_dir if tok_dir and tokenizer_files(tok_dir) else None
        summary["final"] = str(save_pretrained_distributed(wrapped, out / "final", tokenizer=tokenizer_dir))
    trainer.log({"event": "end" if summary["final"] else "stop", **{k: v for k, v in summary.items() if k != "losses"}})
    return summary


