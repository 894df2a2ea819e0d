"""Acceptance (gloo, CPU): a tiny hybrid model (attention + Mamba-2 + sliding window + MLPs, tied head, packed
documents) trained for a few steps on 2 processes with DDP, with FSDP2 (+ activation checkpointing), with sequence
parallelism, and on 4 processes (2 replicas x 2 sequence ranks) follows the single-process loss curve of the same
global batches; a run killed after a distributed checkpoint resumes with the identical loss sequence; the
checkpoint consolidates to a ``save_pretrained`` directory holding the single-process run's weights."""

from __future__ import annotations

import os
import signal

import pytest
import torch

import zoo
from zoo.distributed import (
    TrainState,
    all_reduce_sum,
    consolidate,
    latest_checkpoint,
    lm_loss,
    load_checkpoint,
    parallelize,
    run_local,
    save_checkpoint,
    save_pretrained_distributed,
    setup_parallelism,
    shard_batch,
)

CONFIG = {"vocab_size": 64, "d_model": 32, "n_layers": 3, "tie_embeddings": True,
          "mixers": {"0": "attention", "1": "mamba2(d_state=8, headdim=8, chunk_size=8)",
                     "2": "sliding_window(window=6)"},
          "mlp": {"intermediate_size": 64}, "mixer_defaults": {"attention": {"num_heads": 4, "num_kv_heads": 2}}}
STEPS, B, T, LR = 5, 4, 16, 3e-2


class Batches:
    """Deterministic packed batches (two documents per row, the second one's first token is no target) cycling
    through three, so that the loss falls quickly; the position is part of the checkpoint."""

    def __init__(self) -> None:
        self.next = 0

    def __call__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 + self.next % 3)
        self.next += 1
        ids = (torch.randint(0, 64, (B, 1), generator=g) * 5 ** torch.arange(T) + 3 * torch.arange(T)) % 64
        seq = (torch.arange(T) >= torch.randint(3, T - 3, (B, 1), generator=g)).long()
        labels = ids.masked_fill(torch.cat([torch.zeros(B, 1, dtype=torch.bool), seq[:, 1:] != seq[:, :-1]], 1), -100)
        return ids, labels, seq

    def state_dict(self) -> dict:
        return {"next": self.next}

    def load_state_dict(self, sd: dict) -> None:
        self.next = int(sd["next"])


def _optimizer(model: torch.nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 2))


def _clip(model: torch.nn.Module) -> float:
    """Clip to norm 0.5; returns the norm before clipping (AdamW is blind to a uniform gradient scale, so the
    tests compare the norms too)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def single_process_run(config: dict = CONFIG, steps: int = STEPS) -> tuple[list[tuple[float, float]], dict]:
    """The reference: one process, the model's own loss on the whole global batch; (loss, gradient norm) per step."""
    torch.manual_seed(0)
    model = zoo.create_model(config)
    opt, sched = _optimizer(model)
    data, curve = Batches(), []
    for _ in range(steps):
        ids, labels, seq = data()
        loss = model(ids, labels=labels, seq_idx=seq).loss
        loss.backward()
        norm = _clip(model)
        opt.step(), sched.step(), opt.zero_grad()
        curve.append((loss.item(), norm))
    return curve, {k: v.clone() for k, v in model.state_dict().items()}


def _train(rank: int, world: int, strategy: str, sp: int, ckpt_dir: str | None = None, *, ac: bool = False,
           save_at: tuple[int, ...] = (), kill_at: int | None = None, resume: bool = False,
           export: str | None = None, config: dict = CONFIG, steps: int = STEPS,
           backend: str | None = None) -> list[tuple[float, float]]:
    if backend is not None:
        os.environ["ZOO_BACKEND"] = backend
    par = setup_parallelism(sp)
    torch.manual_seed(0)
    model = parallelize(zoo.create_model(config), strategy, par, activation_checkpointing=ac)
    opt, sched = _optimizer(model)
    data = Batches()
    state = TrainState(model, opt, sched, extras={"data": data})
    if resume:
        load_checkpoint(latest_checkpoint(ckpt_dir), state)
    curve = []
    while state.step < steps:
        if state.step == kill_at:  # a crash: no cleanup, no exception
            os.kill(os.getpid(), signal.SIGKILL)
        ids, labels, seq = data()
        loss, share = lm_loss(model, shard_batch(par, ids, labels=labels, seq_idx=seq))
        loss.backward()
        norm = _clip(model)
        opt.step(), sched.step(), opt.zero_grad()
        curve.append((all_reduce_sum(share).item(), norm))
        state.step += 1
        if state.step in save_at:
            save_checkpoint(ckpt_dir, state, keep=2)
    if export:
        save_pretrained_distributed(model, export)
    return curve


@pytest.fixture(scope="module")
def reference() -> tuple[list[tuple[float, float]], dict]:
    curve, weights = single_process_run()
    losses = [loss for loss, _ in curve]
    assert max(losses) - min(losses) > 0.05  # the curve moves: equal curves are not trivially equal
    return curve, weights


def _assert_close(curve: list[tuple[float, float]], ref: list[tuple[float, float]]) -> None:
    assert len(curve) == len(ref)
    for step, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(curve, ref)):
        assert loss == pytest.approx(ref_loss, abs=2e-5), f"step {step}: loss {loss} vs {ref_loss}"
        assert norm == pytest.approx(ref_norm, rel=1e-4), f"step {step}: gradient norm {norm} vs {ref_norm}"


@pytest.mark.parametrize("world, strategy, sp, ac", [
    (2, "ddp", 1, False),
    (2, "fsdp", 1, True),
    (2, "fsdp", 2, False),  # sequence parallel: each rank holds half of every sequence
    (4, "ddp", 2, True),  # 2 replicas x 2 sequence ranks
])
def test_matches_single_process(reference, world: int, strategy: str, sp: int, ac: bool) -> None:
    for curve in run_local(_train, world, strategy, sp, ac=ac):
        _assert_close(curve, reference[0])


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_kill_and_resume_continues_the_loss_sequence(reference, tmp_path, strategy: str) -> None:
    ckpt = str(tmp_path / "ckpt")
    full = run_local(_train, 2, strategy, 1, str(tmp_path / "uninterrupted"), save_at=(2,))[0]
    with pytest.raises(RuntimeError, match="a rank failed"):
        run_local(_train, 2, strategy, 1, ckpt, save_at=(1, 2), kill_at=3)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-00000001", "step-00000002"]
    export = str(tmp_path / "live")
    resumed = run_local(_train, 2, strategy, 1, ckpt, save_at=(STEPS,), resume=True, export=export)
    assert resumed[0] == resumed[1] == full[2:]  # bit for bit
    _assert_close(full, reference[0])

    # consolidation: the last checkpoint as a save_pretrained directory == the live export == the reference weights
    out = consolidate(latest_checkpoint(ckpt), tmp_path / "consolidated")
    a, b = zoo.from_pretrained(out), zoo.from_pretrained(export)
    assert a.lm_head.weight is a.embedding.weight
    for name, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[name]), name
        torch.testing.assert_close(value, reference[1][name], atol=2e-5, rtol=0, msg=name)


@pytest.mark.triton
@pytest.mark.slow
def test_triton_kernels_under_fsdp_with_sequence_parallel() -> None:
    """The Mamba-2 SSD and gated-norm Triton kernels (interpreter) inside FSDP2 with the state passed between
    sequence ranks (the kernel's initial state and its gradient): the torch single-process curve."""
    config = {**CONFIG, "mixers": {**CONFIG["mixers"], "1": "mamba2(d_state=8, headdim=8, chunk_size=16)"}}
    ref, _ = single_process_run(config, steps=2)
    for curve in run_local(_train, 2, "fsdp", 2, config=config, steps=2, backend="triton"):
        _assert_close(curve, ref)
