""":class:`zoo.train.Trainer` on many processes: the same loop (``fit``: micro-batches, schedule, progress bar,
evaluation hook), with the distributed pieces in the hooks it leaves open.

* :meth:`DistributedTrainer.step`: every rank receives the same *global* micro-batches; each takes its rows (data
  parallel) and columns (sequence parallel) with :func:`~zoo.distributed.parallel.shard_batch` and
  back-propagates its share of the global mean loss (:func:`~zoo.distributed.parallel.lm_loss`), so the
  gradients, the clipped norm and the reported loss are those of one process training on the whole global batch;
* :meth:`DistributedTrainer.backward`: gradient synchronisation only on the last micro-batch (DDP ``no_sync``,
  FSDP2 ``set_requires_gradient_sync``), loss scaling for fp16;
* :meth:`DistributedTrainer.clip_and_step`: the global gradient norm (FSDP2's DTensor norm is reduced over the
  shards), unscaling, the optimizer and the schedule;
* after each step: a line of the JSON log (rank 0) and, every ``save_every`` steps, a distributed checkpoint of
  everything that decides the next step (:class:`~zoo.distributed.checkpoint.TrainState` with the data position
  and the loss scaler as extras), so :meth:`resume` continues with the identical loss sequence.

Mixed precision is autocast (``bf16``/``fp16`` compute, fp32 parameters, optimizer state and loss);
:func:`autocast_dtype` picks bf16 on GPUs that support it and fp32 on the CPU.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from zoo.distributed.checkpoint import TrainState, latest_checkpoint, load_checkpoint, save_checkpoint
from zoo.distributed.parallel import Parallelism, all_reduce_sum, lm_loss, shard_batch
from zoo.train import Batch, TrainConfig, Trainer

__all__ = ["DistributedTrainer", "PRECISIONS", "autocast_dtype", "broadcast_object"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast compute dtype for ``precision`` on ``device`` (None: fp32, no autocast). ``"auto"``: bf16 on a
    GPU that supports it, else fp16 on a GPU, fp32 on the CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {list(PRECISIONS)}")
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return _DTYPES[precision]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (itself in one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class DistributedTrainer(Trainer):
    """``Trainer`` for a model returned by :func:`~zoo.distributed.parallel.parallelize` (DDP, FSDP2, or plain on
    one process) in the layout ``par``. ``checkpoint_dir`` / ``save_every`` / ``keep``: distributed checkpoints
    (``save_every=0``: only when :meth:`save` is called); ``extras``: more checkpointed objects (name -> object
    with ``state_dict``/``load_state_dict``, e.g. the data stream); ``log_file``: JSON lines written by rank 0.
    The loss is always the (weighted) next-token loss of the global batch (``Trainer``'s ``loss_fn`` is not used:
    a custom loss would need its own global normalisation across ranks)."""

    def __init__(self, model: nn.Module, par: Parallelism, *, config: TrainConfig | None = None,
                 strategy: str = "none", precision: str = "fp32", checkpoint_dir: str | Path | None = None,
                 save_every: int = 0, keep: int | None = None, extras: dict[str, Any] | None = None,
                 log_file: str | Path | None = None, **kwargs: Any) -> None:
        super().__init__(model, config=config, **kwargs)
        self.par, self.strategy = par, strategy
        self.dtype = autocast_dtype(precision, par.device)
        self.scaler = None
        if self.dtype == torch.float16:  # bf16 has fp32's range; fp16 gradients need loss scaling
            if strategy == "fsdp":
                from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

                self.scaler = ShardedGradScaler(par.device.type)
            else:
                self.scaler = torch.amp.GradScaler(par.device.type)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.save_every, self.keep = save_every, keep
        self.extras = dict(extras or {})
        if self.scaler is not None:
            self.extras["grad_scaler"] = self.scaler
        self.log_file = Path(log_file) if log_file is not None and par.is_main else None
        self.last_grad_norm: float | None = None
        self.last_lr: float | None = None

    # ------------------------------------------------------------------------------------------ one step
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.par.device.type, dtype=self.dtype)

    def step(self, micro_batches: list[Batch]) -> float:
        """One optimizer step over the global ``micro_batches``; returns the global mean loss (the same on every
        rank and equal to what one process computes on the same batches)."""
        t0 = time.perf_counter()
        self.model.train()
        n = len(micro_batches)
        total = torch.zeros((), dtype=torch.float32, device=self.par.device)
        tokens = 0
        for k, mb in enumerate(micro_batches):
            shard = shard_batch(self.par, mb.input_ids, labels=mb.labels, seq_idx=mb.seq_idx,
                                attention_mask=mb.attention_mask, loss_weight=mb.loss_weight)
            with self.autocast():
                loss, share = lm_loss(self.model, shard)
            self.backward(loss / n, last=k == n - 1)
            total += share / n
            tokens += mb.n_tokens
        loss_value = float(all_reduce_sum(total))
        self.last_grad_norm = self.clip_and_step()
        self.step_count += 1
        self.after_step(loss_value, tokens, time.perf_counter() - t0)
        return loss_value

    def backward(self, loss: Tensor, *, last: bool) -> None:
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        if self.strategy == "ddp" and not last:
            with self.model.no_sync():
                loss.backward()
            return
        if self.strategy == "fsdp":
            self.model.set_requires_gradient_sync(last)
        loss.backward()

    def _params(self) -> list[Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def clip_and_step(self) -> float | None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        self.last_lr = self.optimizer.param_groups[0]["lr"]  # the rate this step uses
        # the global norm (FSDP2: a DTensor reduced over the shards), logged also when nothing is clipped
        limit = self.config.grad_clip if self.config.grad_clip is not None else float("inf")
        total = torch.nn.utils.clip_grad_norm_(self._params(), limit)
        norm = float(total.full_tensor() if hasattr(total, "full_tensor") else total)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def after_step(self, loss: float, tokens: int, seconds: float) -> None:
        """Log the step (rank 0; ``tokens``: of the global batch, ``seconds``: forward, backward and optimizer
        step) and save a checkpoint every ``save_every`` steps."""
        if self.log_file is not None:
            self.log({"event": "step", "step": self.step_count, "loss": loss,
                      "lr": self.last_lr, "grad_norm": self.last_grad_norm,
                      "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / max(seconds, 1e-9)})
        if self.checkpoint_dir is not None and self.save_every and self.step_count % self.save_every == 0:
            self.save()

    def log(self, record: dict[str, Any]) -> None:
        if self.log_file is not None:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            with self.log_file.open("a") as f:
                f.write(json.dumps(record, default=float) + "\n")

    # ------------------------------------------------------------------------------------------ checkpoints
    def train_state(self) -> TrainState:
        return TrainState(self.model, self.optimizer, self.scheduler, step=self.step_count, extras=self.extras)

    def save(self) -> Path:
        """A distributed checkpoint of the current step (every rank calls this)."""
        if self.checkpoint_dir is None:
            raise ValueError("this trainer has no checkpoint_dir")
        path = save_checkpoint(self.checkpoint_dir, self.train_state(), keep=self.keep)
        self.log({"event": "checkpoint", "step": self.step_count, "path": str(path)})
        return path

    def resume(self, path: str | Path | None = None) -> int:
        """Load ``path`` (default: the latest checkpoint in ``checkpoint_dir``; nothing when there is none) into
        the model, optimizer, schedule, extras and RNG; returns the step to continue from."""
        if path is None:
            path = latest_checkpoint(self.checkpoint_dir) if self.checkpoint_dir is not None else None
            if path is None:
                return self.step_count
        state = self.train_state()
        self.step_count = load_checkpoint(path, state)
        self.log({"event": "resume", "step": self.step_count, "path": str(path)})
        return self.step_count

