"""Multi-query associative recall (MQAR), the Zoology benchmark's task (Arora et al., arXiv 2312.04927), trained
from scratch on the CPU.

A row of ``L`` tokens starts with ``n`` key-value pairs ``k1 v1 k2 v2 ...`` (keys from ``[1, V/2)``, values from
``[V/2, V)``, distinct within a row); every key is asked again once in the rest of the row, at an even offset
drawn from Zoology's power law ``p(g) ~ g^(a - 1)`` (``a = 0.01``: most queries soon after the pairs), and the
model must predict its value right after the query key. All other positions hold random tokens and carry no
loss. Accuracy = the fraction of queries whose value is the argmax.

:func:`run_mqar` trains one small model per (mixer spec, ``d_model``) at the training length(s) and reports
accuracy at every evaluation length next to the in-distribution one, with the model's state bytes at that length
(the "state size" axis of Zoology's plots). A mixer spec is a swap spec (:mod:`zoo.swaps`) applied to the base
model (``n_layers`` attention blocks with MLPs), so ``"all: mamba2(d_state=16)"`` or ``"longgen(window=16)"`` work.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

import zoo
from zoo.swaps import swap_config
from zoo.train import Batch, TrainConfig, Trainer


def mqar_batch(batch_size: int, length: int, n_pairs: int, vocab_size: int, generator: torch.Generator, *,
               power_a: float = 0.01) -> tuple[Tensor, Tensor]:
    """``(input_ids, labels)`` ``[B, L]``: ``labels[t]`` is the value the model must predict *at* ``t - 1`` (the
    position of the query key; the loss shifts by one), ``-100`` elsewhere."""
    half = vocab_size // 2
    if half - 1 < n_pairs:
        raise ValueError(f"mqar: vocab_size={vocab_size} leaves {half - 1} keys for n_pairs={n_pairs}")
    if length % 2 or 4 * n_pairs > length:
        raise ValueError(f"mqar: length={length} must be even and >= 4 * n_pairs ({4 * n_pairs})")
    B, n = batch_size, n_pairs
    keys = torch.rand(B, half - 1, generator=generator).argsort(1)[:, :n] + 1
    values = torch.rand(B, vocab_size - half, generator=generator).argsort(1)[:, :n] + half
    ids = torch.randint(0, vocab_size, (B, length), generator=generator)  # random non-queries
    labels = torch.full((B, length), -100, dtype=torch.long)
    ids[:, 0:2 * n:2], ids[:, 1:2 * n:2] = keys, values
    space = (length - 2 * n) // 2
    p = power_a * torch.arange(1, space + 1, dtype=torch.float64) ** (power_a - 1)
    gaps = torch.multinomial(p.expand(B, -1), n, replacement=False, generator=generator)  # [B, n] distinct
    order = torch.rand(B, n, generator=generator).argsort(1)  # which key is asked in which slot
    q = 2 * n + 2 * gaps  # query key positions
    rows = torch.arange(B)[:, None]
    ids[rows, q] = keys.gather(1, order)
    labels[rows, q + 1] = values.gather(1, order)
    return ids, labels


def mqar_batches(batch_size: int, lengths: Sequence[int], n_pairs: int, vocab_size: int,
                 generator: torch.Generator):
    k = 0
    while True:
        ids, labels = mqar_batch(batch_size, lengths[k % len(lengths)], n_pairs, vocab_size, generator)
        k += 1
        yield Batch(ids, labels=labels)


@torch.no_grad()
def mqar_accuracy(model, ids: Tensor, labels: Tensor, batch_size: int = 64) -> float:
    correct = total = 0
    for b0 in range(0, len(ids), batch_size):
        x, y = ids[b0:b0 + batch_size], labels[b0:b0 + batch_size]
        pred = model(x).logits[:, :-1].argmax(-1)
        target = y[:, 1:]
        keep = target != -100
        correct += int((pred[keep] == target[keep]).sum())
        total += int(keep.sum())
    return correct / max(total, 1)


@dataclass
class MQARSetup:
    """Defaults: a narrower task than Zoology's (64 tokens of vocabulary, 4 pairs, rows of 32 at training), so a
    2-layer attention baseline (d_model 64) learns it on a CPU in minutes (measured: 0.98 at the training length
    after 1500 steps); evaluated at 1x, 2x and 4x the training length."""

    vocab_size: int = 64
    n_pairs: int = 4
    n_layers: int = 2
    d_models: Sequence[int] = (64,)
    train_lengths: Sequence[int] = (32,)
    eval_lengths: Sequence[int] = (32, 64, 128)
    steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 100
    eval_samples: int = 256
    head_dim: int = 16
    seed: int = 0
    attention: dict = field(default_factory=dict)  # extra mixer_defaults["attention"]


def base_config(setup: MQARSetup, d_model: int) -> zoo.ZooConfig:
    heads = max(1, d_model // setup.head_dim)
    return zoo.ZooConfig.from_dict({
        "vocab_size": setup.vocab_size, "d_model": d_model, "n_layers": setup.n_layers, "mixers": "attention",
        "mlp": {"intermediate_size": 2 * d_model},
        "mixer_defaults": {"attention": {"num_heads": heads, **setup.attention}},
        "max_position_embeddings": max(max(setup.eval_lengths), max(setup.train_lengths)),
        "tie_embeddings": True, "name": "mqar"})


def mqar_state_bytes(model, length: int) -> int:
    states = model.init_states(1, max_length=length)
    with torch.no_grad():
        model(torch.zeros(1, length, dtype=torch.long, device=model.device), states=states)
    return states.nbytes


def run_mqar(mixers: dict[str, str | None], setup: MQARSetup | None = None, *, progress: bool = True) -> dict:
    """Train and evaluate one model per (name in ``mixers``, ``d_model``); ``mixers``: name -> swap spec applied
    to the attention base (None = the base itself). Returns ``{"rows": [...], "summary": {...}}`` with rows
    ``{"variant", "d_model", "length", "accuracy", "state_bytes", "in_distribution", "train_seconds"}``."""
    setup = setup or MQARSetup()
    rows = []
    for name, spec in mixers.items():
        for d in setup.d_models:
            cfg = base_config(setup, d)
            if spec:
                cfg = swap_config(cfg, spec)[0]
            torch.manual_seed(setup.seed)
            model = zoo.create_model(cfg)
            g = torch.Generator().manual_seed(setup.seed)
            tcfg = TrainConfig(steps=setup.steps, lr=setup.lr, warmup_steps=setup.warmup_steps, weight_decay=0.1,
                               min_lr_ratio=0.05)
            t0 = time.perf_counter()
            eval_g = torch.Generator().manual_seed(setup.seed + 777)
            probe = mqar_batch(setup.eval_samples, setup.train_lengths[0], setup.n_pairs, setup.vocab_size, eval_g)
            Trainer(model, config=tcfg).fit(
                mqar_batches(setup.batch_size, setup.train_lengths, setup.n_pairs, setup.vocab_size, g),
                eval_fn=lambda m, step, probe=probe: {"acc": mqar_accuracy(m, *probe)}, progress=progress,
                desc=f"mqar {name} d={d}")
            seconds = time.perf_counter() - t0
            for L in setup.eval_lengths:
                eg = torch.Generator().manual_seed(setup.seed * 7919 + L)  # the same rows for every model
                ids, labels = mqar_batch(setup.eval_samples, L, setup.n_pairs, setup.vocab_size, eg)
                rows.append({"variant": name, "d_model": d, "length": L,
                             "accuracy": mqar_accuracy(model, ids, labels),
                             "state_bytes": mqar_state_bytes(model, L),
                             "in_distribution": L in setup.train_lengths, "train_seconds": seconds})
    return {"rows": rows, "summary": summarize_mqar(rows, max(setup.train_lengths))}


def summarize_mqar(rows: list[dict], train_length: int | None = None) -> dict:
    inside = [r["accuracy"] for r in rows if r["in_distribution"]]
    beyond = [r["accuracy"] for r in rows if not r["in_distribution"]]
    out = {"in_distribution": sum(inside) / len(inside) if inside else None,
           "extrapolated": sum(beyond) / len(beyond) if beyond else None, "train_length": train_length}
    for r in rows:
        out[f"accuracy@{r['length']}" + (f",d{r['d_model']}" if len({x['d_model'] for x in rows}) > 1 else "")] = \
            r["accuracy"]
    return out

