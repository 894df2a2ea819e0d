"""Loss (and perplexity) by token position on long held-out text: length extrapolation and state collapse.

Windows of ``length`` tokens are cut from held-out documents at least that long (evenly spread over them, the
same windows for every model), each scored with one parallel forward; the per-token next-token losses are
averaged over windows per position and then over position buckets. A model that is fine within its training
length and breaks beyond it shows a loss that rises after ``train_length`` (RoPE attention past its trained
positions; Mamba-2's state collapse); a model that holds shows a flat or falling curve.

``summary``: the mean loss inside the training length (positions < ``train_length``, "in distribution") and
beyond it, with their perplexities, and the loss of the last bucket.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from zoo.train import token_losses


@dataclass
class LossResult:
    rows: list[dict]  # {"position": bucket start, "position_end": end (exclusive), "loss": mean nats}
    summary: dict
    per_position: Tensor  # [length - 1] mean loss at each position


def eval_windows(docs: list[Tensor], length: int, n_windows: int, stream: Tensor | None = None) -> Tensor:
    """``[n, length]`` windows: from documents of at least ``length`` tokens, evenly spread over their total
    extent; when no document is long enough, from ``stream`` (the documents packed) instead."""
    long_docs = [d for d in docs if len(d) >= length]
    if not long_docs:
        if stream is None or stream.numel() < length:
            raise ValueError(f"no held-out document (nor the packed stream) has {length} tokens")
        starts = torch.linspace(0, stream.numel() - length, n_windows).long().unique()
        return torch.stack([stream[s:s + length] for s in starts.tolist()])
    spans = torch.tensor([len(d) - length + 1 for d in long_docs], dtype=torch.float64)
    total = float(spans.sum())
    cum = torch.cumsum(spans, 0)
    out = []
    for j in range(n_windows):
        x = (j + 0.5) * total / n_windows
        i = int(torch.searchsorted(cum, torch.tensor(x, dtype=torch.float64), right=True).clamp(max=len(cum) - 1))
        start = int(x - (float(cum[i - 1]) if i else 0.0))
        start = min(max(start, 0), len(long_docs[i]) - length)
        out.append(long_docs[i][start:start + length])
    return torch.stack(out)


def default_bucket(length: int) -> int:
    return max(1, length // 16)


@torch.no_grad()
def loss_by_position(model, windows: Tensor, *, train_length: int | None = None, bucket: int | None = None,
                     batch_size: int = 4, progress: bool = True) -> LossResult:
    """Per-position mean next-token loss of ``model`` over ``windows [n, L]``, bucketed by ``bucket`` positions
    (default ``L // 16``)."""
    model.eval()
    n, L = windows.shape
    bucket = bucket or default_bucket(L)
    total = torch.zeros(L - 1, dtype=torch.float64)
    bar = tqdm(total=n, desc="loss", unit="window", disable=not progress, leave=False)
    for b0 in range(0, n, batch_size):
        ids = windows[b0:b0 + batch_size].to(model.device)
        losses = token_losses(model(ids).logits, ids)  # [b, L-1]
        total += losses.double().sum(0).cpu()
        bar.update(ids.shape[0])
    bar.close()
    per_pos = total / n
    rows = []
    for s in range(0, L - 1, bucket):
        e = min(s + bucket, L - 1)
        rows.append({"position": s, "position_end": e, "loss": float(per_pos[s:e].mean())})
    summary: dict = {"loss": float(per_pos.mean()), "last_bucket_loss": rows[-1]["loss"], "length": L,
                     "windows": n}
    if train_length is not None:
        inside, beyond = per_pos[:train_length - 1], per_pos[train_length - 1:]
        summary["in_distribution"] = float(inside.mean()) if inside.numel() else None
        summary["extrapolated"] = float(beyond.mean()) if beyond.numel() else None
        summary["train_length"] = train_length
        for k in ("in_distribution", "extrapolated"):
            if summary[k] is not None:
                summary[f"ppl_{k}"] = math.exp(summary[k])
    return LossResult(rows, summary, per_pos.float())
