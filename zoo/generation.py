"""Autoregressive generation over per-layer mixer states: one prefill call, then one call per token.

Batched prompts are left-padded; positions come from the attention mask, so a padded row generates the
same tokens as the row alone. Finished rows (after ``eos_token_id``) are filled with ``pad_token_id``.
The arguments are checked once per call; the decode steps (``model.step``) make no host synchronisation
except the periodic "have all rows finished?" check.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def sample_next(logits: Tensor, *, do_sample: bool, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """``logits [B, V]`` -> ``[B]`` next tokens: argmax, or sampling with temperature / top-k / top-p."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / max(temperature, 1e-6)
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest set whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


STOP_CHECK_EVERY = 16  # decode steps between checks whether every row has finished (a host sync)


def check_generate_args(input_ids: Tensor, attention_mask: Tensor | None, *, max_new_tokens: Any, do_sample: bool,
                        temperature: Any, top_k: Any, top_p: Any) -> None:
    """``ValueError`` naming the bad argument; run once per ``generate`` call, never per token."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [B, T] tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): generate needs a prompt of at least "
                         "one token per row (e.g. the BOS token)")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if top_k is not None and not (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 0):
        raise ValueError(f"top_k must be a non-negative int (0 = off), got {top_k!r}")
    if do_sample and not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number when sampling, got {temperature!r}")


@torch.no_grad()
def generate(
    model: Any,
    input_ids: Tensor,
    *,
    attention_mask: Tensor | None = None,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    streamer: Any = None,
    generator: torch.Generator | None = None,
    suppress_tokens: list[int] | Tensor | None = None,
) -> Tensor:
    """Returns ``[B, T + n]`` (prompt followed by the new tokens; ``n <= max_new_tokens``).

    ``suppress_tokens``: ids that are never generated (their logits are set to -inf before sampling or argmax,
    as transformers' ``suppress_tokens``), e.g. the special tokens of a DNA k-mer vocabulary.
    """
    check_generate_args(input_ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                        temperature=temperature, top_k=top_k, top_p=top_p)
    B, T = input_ids.shape
    eos = eos_token_id if eos_token_id is not None else model.config.eos_token_id
    eos_ids = torch.tensor([eos] if isinstance(eos, int) else (eos or []), device=input_ids.device)
    pad = pad_token_id if pad_token_id is not None else (model.config.pad_token_id
                                                         if model.config.pad_token_id is not None
                                                         else (int(eos_ids[0]) if len(eos_ids) else 0))
    bias = None  # -inf at the suppressed ids, built (and checked) once per call
    if suppress_tokens is not None:
        V = model.config.vocab_size
        banned = torch.as_tensor(suppress_tokens, dtype=torch.long).reshape(-1)
        if banned.numel() and (int(banned.min()) < 0 or int(banned.max()) >= V):
            raise ValueError(f"suppress_tokens must be ids in [0, {V}), got {banned.tolist()[:8]}...")
        bias = torch.zeros(V, device=input_ids.device)
        bias[banned.to(input_ids.device)] = float("-inf")
        if bool(torch.isinf(bias).all()):
            raise ValueError("suppress_tokens suppresses the whole vocabulary")
    states = model.init_states(B, max_length=T + max_new_tokens)
    if streamer is not None:
        streamer.put(input_ids.cpu())

    logits = model(input_ids, attention_mask=attention_mask, states=states, logits_to_keep=1).logits[:, -1]
    tokens = []
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for step in range(max_new_tokens):
        if bias is not None:
            logits = logits.float() + bias
        token = sample_next(logits, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                            generator=generator)
        if len(eos_ids):
            token = torch.where(finished, torch.full_like(token, pad), token)
            finished = finished | torch.isin(token, eos_ids)
        tokens.append(token)
        if streamer is not None:
            streamer.put(token.cpu())
        if step + 1 == max_new_tokens:
            break
        # the loop's only host sync: every STOP_CHECK_EVERY tokens (each token with a streamer, which syncs anyway);
        # the trim below makes the output exactly what a check at every token gives
        check = streamer is not None or (step + 1) % STOP_CHECK_EVERY == 0
        if len(eos_ids) and check and bool(finished.all()):
            break
        logits = model.step(token[:, None], states)
    if streamer is not None:
        streamer.end()
    new = torch.stack(tokens, dim=1)  # [B, n]
    if len(eos_ids):  # stop after the first step at which every row had finished
        done = torch.isin(new, eos_ids).cummax(1).values.all(0)  # [n]: every row finished at or before step i
        if bool(done.any()):
            new = new[:, : int(done.long().argmax()) + 1]
    return torch.cat([input_ids, new], dim=1)
