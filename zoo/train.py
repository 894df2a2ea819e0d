"""A small single-process training loop: AdamW, linear warm-up + cosine decay, gradient clipping, gradient
accumulation, packed sequences (``seq_idx``), a progress bar and a periodic evaluation hook.

The pieces are separable so that other launchers (DDP / FSDP) can reuse them: the model, the data (any iterator
of :class:`Batch`), the optimizer (:func:`make_optimizer`) and the schedule (:func:`make_scheduler`) are built
apart and handed to :class:`Trainer`, whose :meth:`Trainer.step` is one optimizer step over ``grad_accum``
micro-batches and whose :meth:`Trainer.backward` is the one place a wrapper needs to change (e.g. ``no_sync`` on
all but the last micro-batch).

    trainer = Trainer(model, config=TrainConfig(steps=500, lr=3e-3))
    result = trainer.fit(packed_batches(stream, doc_ids, seq_len=256, batch_size=16), eval_fn=my_eval)

Loss: next-token cross-entropy over ``labels`` (aligned with ``input_ids`` and shifted inside, transformers-
style; ``-100`` = ignored), optionally weighted per target position (``loss_weight``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm


@dataclass
class TrainConfig:
    steps: int = 1000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 50
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = 1.0
    grad_accum: int = 1  # micro-batches per optimizer step
    eval_every: int = 0  # steps between eval_fn calls (0: only at the end)
    log_every: int = 10  # steps between progress-bar updates

    def __post_init__(self) -> None:
        for name in ("steps", "grad_accum"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be positive, got {self.lr!r}")
        if self.warmup_steps < 0 or self.eval_every < 0:
            raise ValueError("TrainConfig.warmup_steps and eval_every must be >= 0")


@dataclass
class Batch:
    """``input_ids [B, T]``; ``labels [B, T]`` (default: ``input_ids``; -100 = no loss), ``seq_idx [B, T]``
    (packed documents), ``attention_mask [B, T]``, ``loss_weight [B, T]`` (weight of each target position)."""

    input_ids: Tensor
    labels: Tensor | None = None
    seq_idx: Tensor | None = None
    attention_mask: Tensor | None = None
    loss_weight: Tensor | None = None

    @property
    def n_tokens(self) -> int:
        return self.input_ids.numel()

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(None if t is None else t.to(device) for t in
                       (self.input_ids, self.labels, self.seq_idx, self.attention_mask, self.loss_weight)))


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)  # {"step": ..., **eval_fn(model, step)}
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------- pieces
def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; matrices decay, vectors (norms, biases, Mamba-2's ``A_log``,
    ``dt_bias``, ``D``) do not. Tied weights are counted once."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=config.betas)


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of ``lr`` at ``step`` (0-based): linear warm-up to 1, then cosine down to ``min_lr_ratio``."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))


def token_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """Next-token losses ``[B, T-1]`` (position ``t`` predicts ``labels[:, t+1]``; ignored targets give 0)."""
    return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:], ignore_index=-100,
                           reduction="none")


def causal_lm_loss(model: nn.Module, batch: Batch) -> Tensor:
    """Mean next-token cross-entropy over the non-ignored targets, weighted by ``loss_weight`` when given."""
    logits = model(batch.input_ids, attention_mask=batch.attention_mask, seq_idx=batch.seq_idx).logits
    labels = batch.labels if batch.labels is not None else batch.input_ids
    losses = token_losses(logits, labels)
    weight = (labels[:, 1:] != -100).to(losses.dtype)
    if batch.loss_weight is not None:
        weight = weight * batch.loss_weight[:, 1:].to(losses.dtype)
    return (losses * weight).sum() / weight.sum().clamp_min(1e-8)


# ---------------------------------------------------------------------------------------------- the loop
class Trainer:
    """One model, one optimizer, one schedule. :meth:`step` = one optimizer step over micro-batches; :meth:`fit`
    = the loop with progress bar and evaluation hook. Subclass and override :meth:`backward` (or
    :meth:`clip_and_step`) to add distributed behaviour."""

    def __init__(self, model: nn.Module, *, config: TrainConfig | None = None,
                 optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                 loss_fn: Callable[[nn.Module, Batch], Tensor] = causal_lm_loss) -> None:
        self.model = model
        self.config = config or TrainConfig()
        self.optimizer = optimizer or make_optimizer(model, self.config)
        self.scheduler = scheduler if scheduler is not None else make_scheduler(self.optimizer, self.config)
        self.loss_fn = loss_fn
        self.step_count = 0

    def backward(self, loss: Tensor, *, last: bool) -> None:
        """``last``: this is the final micro-batch of the step (gradient synchronisation point)."""
        loss.backward()

    def clip_and_step(self) -> float | None:
        norm = None
        if self.config.grad_clip is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.config.grad_clip))
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def step(self, micro_batches: list[Batch]) -> float:
        """Forward/backward over ``micro_batches`` (their mean loss), clip, optimizer and schedule step; returns
        the mean loss."""
        self.model.train()
        total = 0.0
        for k, mb in enumerate(micro_batches):
            loss = self.loss_fn(self.model, mb) / len(micro_batches)
            self.backward(loss, last=k == len(micro_batches) - 1)
            total += float(loss.detach())
        self.clip_and_step()
        self.step_count += 1
        return total

    def fit(self, data: Iterable[Batch], *, steps: int | None = None,
            eval_fn: Callable[[nn.Module, int], dict[str, Any]] | None = None, progress: bool = True,
            desc: str = "train") -> TrainResult:
        """Run ``steps`` (default ``config.steps``) optimizer steps pulling ``grad_accum`` batches each from
        ``data``; ``eval_fn(model, step)`` runs every ``eval_every`` steps and after the last one (in eval mode,
        without gradients), its dict is logged in ``result.evals`` and shown on the bar."""
        cfg = self.config
        steps = cfg.steps if steps is None else steps
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        it: Iterator[Batch] = iter(data)
        result = TrainResult()
        t0 = time.perf_counter()
        bar = tqdm(range(steps), desc=desc, unit="step", disable=not progress, leave=False, dynamic_ncols=True)
        shown: dict[str, str] = {}
        for s in bar:
            micro = [next(it) for _ in range(cfg.grad_accum)]
            loss = self.step(micro)
            result.losses.append(loss)
            result.tokens += sum(mb.n_tokens for mb in micro)
            last = s == steps - 1
            # the cadence counts optimizer steps since the start of training (a resumed run keeps it)
            if eval_fn is not None and (last or (cfg.eval_every and self.step_count % cfg.eval_every == 0)):
                self.model.eval()
                with torch.no_grad():
                    metrics = eval_fn(self.model, self.step_count)
                result.evals.append({"step": self.step_count, **metrics})
                shown = {k: f"{v:.3g}" for k, v in metrics.items() if isinstance(v, (int, float))}
            if last or s % cfg.log_every == 0:
                recent = result.losses[-cfg.log_every:]
                tok_s = result.tokens / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix({"loss": f"{sum(recent) / len(recent):.3f}", "tok/s": f"{tok_s:,.0f}",
                                 **{f"eval_{k}": v for k, v in shown.items()}}, refresh=False)
        bar.close()
        result.steps = steps
        result.seconds = time.perf_counter() - t0
        self.model.eval()
        return result


def train(model: nn.Module, data: Iterable[Batch], config: TrainConfig | None = None, **kwargs: Any) -> TrainResult:
    """``Trainer(model, config=config).fit(data, **kwargs)``."""
    loss_fn = kwargs.pop("loss_fn", causal_lm_loss)
    return Trainer(model, config=config, loss_fn=loss_fn).fit(data, **kwargs)


# ---------------------------------------------------------------------------------------------- data
def packed_batches(stream: Tensor, doc_ids: Tensor | None, seq_len: int | Callable[[], int], batch_size: int, *,
                   generator: torch.Generator | None = None, use_seq_idx: bool = True) -> Iterator[Batch]:
    """Endless random windows of ``seq_len`` tokens from a packed ``stream [N]`` of documents (``doc_ids [N]``).

    With ``use_seq_idx`` each window carries ``seq_idx`` (so no mixer looks across a document boundary) and the
    first token of every document after the window's first is not a target (nothing of its document precedes
    it). ``seq_len`` may be a callable (a curriculum: called once per batch)."""
    n = stream.numel()
    while True:
        T = seq_len() if callable(seq_len) else seq_len
        if n <= T:
            raise ValueError(f"the token stream ({n} tokens) is not longer than seq_len={T}")
        starts = torch.randint(0, n - T, (batch_size,), generator=generator)
        idx = starts[:, None] + torch.arange(T)
        ids = stream[idx]
        if doc_ids is None or not use_seq_idx:
            yield Batch(ids)
            continue
        docs = doc_ids[idx]
        seq_idx = docs - docs[:, :1]
        labels = ids.clone()
        labels[:, 1:][docs[:, 1:] != docs[:, :-1]] = -100
        yield Batch(ids, labels=labels, seq_idx=seq_idx)


def concat_batches(*sources: Iterable[Batch]) -> Iterator[Batch]:
    """Row-wise concatenation of one batch from each source per step (same ``T``): a fixed mixture of tasks."""
    its = [iter(s) for s in sources]
    while True:
        parts = [next(it) for it in its]
        if len(parts) == 1:
            yield parts[0]
            continue

        def cat(name: str, fill: Callable[[Batch], Tensor], parts: list[Batch] = parts) -> Tensor | None:
            vals = [getattr(p, name) for p in parts]
            if all(v is None for v in vals):
                return None
            return torch.cat([v if v is not None else fill(p) for v, p in zip(vals, parts)])

        yield Batch(torch.cat([p.input_ids for p in parts]),
                    labels=cat("labels", lambda p: p.input_ids),
                    seq_idx=cat("seq_idx", lambda p: torch.zeros_like(p.input_ids)),
                    attention_mask=cat("attention_mask", lambda p: torch.ones_like(p.input_ids)),
                    loss_weight=cat("loss_weight", lambda p: torch.ones(p.input_ids.shape)))
