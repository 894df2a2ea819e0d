"""Autoregressive generation over per-layer mixer states: one prefill call, then one call per token.

Batched prompts are padded (left padding is the usual layout; right-padded rows are left-aligned first);
positions come from the attention mask, so a padded row generates the same tokens as the row alone. Finished
rows (after ``eos_token_id``) are filled with ``pad_token_id``.
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
OUT_BLOCK = 4096  # new tokens are written into preallocated blocks of this many steps (no per-token allocations)
PREALLOC_TOKENS = 1 << 16  # at most this many new tokens are reserved in growing states up front (they grow beyond)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_generate_args(input_ids: Tensor, attention_mask: Tensor | None, *, max_new_tokens: Any, do_sample: Any,
                        temperature: Any, top_k: Any, top_p: Any, vocab_size: int | None = None,
                        eos_token_id: Any = None, pad_token_id: Any = None) -> None:
    """``ValueError`` naming the bad argument; run once per ``generate`` call, never per token. (The ids themselves,
    their range and the mask's values are checked by the model's ``check_inputs`` on the prompt's forward.)"""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [B, T] tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): generate needs a prompt of at least "
                         "one token per row (e.g. the BOS token)")
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(getattr(attention_mask, 'shape', ())) or attention_mask!r}")
        if attention_mask.dtype != torch.bool and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
        empty = (~attention_mask.bool().any(1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"attention_mask rows {empty[:8]} have no real token: generate needs at least one token "
                             "per row (e.g. the BOS token)")
    if not _int(max_new_tokens) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not isinstance(do_sample, bool):
        raise ValueError(f"do_sample must be True or False, got {do_sample!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and not isinstance(top_p, bool) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if top_k is not None and not (_int(top_k) and top_k >= 0):
        raise ValueError(f"top_k must be a non-negative int (0 = off), got {top_k!r}")
    if do_sample and not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
                          and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number when sampling, got {temperature!r}")
    V = vocab_size
    for name, v, many in (("eos_token_id", eos_token_id, True), ("pad_token_id", pad_token_id, False)):
        ids = list(v) if many and isinstance(v, (list, tuple)) else [v]
        if v is not None and not all(_int(i) and 0 <= i < (V if V is not None else i + 1) for i in ids):
            raise ValueError(f"{name} must be {'ids' if many else 'an id'} in [0, {V}), got {v!r}")


def _left_align(input_ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Move every row's real tokens to the end, keeping their order (right- or middle-padded rows become
    left-padded), so a row generates exactly what its unpadded prompt generates."""
    order = torch.sort(mask.to(torch.int8), dim=1, stable=True).indices  # padding first, tokens in their order
    return input_ids.gather(1, order), mask.gather(1, order)


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
    """Returns ``[B, T + n]`` (the prompt as given, followed by the new tokens; ``n <= max_new_tokens``).

    Padding: ``attention_mask`` marks padding with 0. Left padding is the usual layout; right-padded (or
    middle-padded) rows are handled too: their real tokens are moved to the end before the prompt runs, so every
    row generates the same tokens as its unpadded prompt (the returned prompt part is ``input_ids`` unchanged).
    ``suppress_tokens``: ids that are never generated (their logits are set to -inf before sampling or argmax,
    as transformers' ``suppress_tokens``), e.g. the special tokens of a DNA k-mer vocabulary.
    Memory: the new tokens go into preallocated blocks, so decoding allocates nothing per token that outlives the
    step (bounded-state models decode at flat memory).
    """
    V = model.config.vocab_size
    check_generate_args(input_ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                        temperature=temperature, top_k=top_k, top_p=top_p, vocab_size=V,
                        eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    B, T = input_ids.shape
    device = input_ids.device
    eos = eos_token_id if eos_token_id is not None else model.config.eos_token_id
    eos_ids = torch.tensor([eos] if isinstance(eos, int) else (eos or []), dtype=torch.long, device=device)
    pad = pad_token_id if pad_token_id is not None else (model.config.pad_token_id
                                                         if model.config.pad_token_id is not None
                                                         else (int(eos_ids[0]) if len(eos_ids) else 0))
    bias = None  # -inf at the suppressed ids, built (and checked) once per call
    if suppress_tokens is not None:
        banned = torch.as_tensor(suppress_tokens).reshape(-1)
        if banned.is_floating_point() or banned.dtype == torch.bool:
            raise ValueError(f"suppress_tokens must be integer ids, got {suppress_tokens!r}")
        banned = banned.long()
        if banned.numel() and (int(banned.min()) < 0 or int(banned.max()) >= V):
            raise ValueError(f"suppress_tokens must be ids in [0, {V}), got {banned.tolist()[:8]}...")
        bias = torch.zeros(V, device=device)
        bias[banned.to(device)] = float("-inf")
        if bool(torch.isinf(bias).all()):
            raise ValueError("suppress_tokens suppresses the whole vocabulary")
    prompt, mask = input_ids, attention_mask
    if mask is not None:
        real = mask.bool()
        if bool((real[:, :-1] & ~real[:, 1:]).any()):  # a pad after a token: right/middle padding
            prompt, mask = _left_align(input_ids, real)
        model.check_positions(int(real.sum(1).max()) + max_new_tokens)
    else:
        model.check_positions(T + max_new_tokens)
    states = model.init_states(B, max_length=T + min(max_new_tokens, PREALLOC_TOKENS))
    if streamer is not None:
        streamer.put(input_ids.cpu())

    logits = model(prompt, attention_mask=mask, states=states, logits_to_keep=1).logits[:, -1]
    blocks: list[Tensor] = []  # [B, OUT_BLOCK] each; the last one partly filled
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    n = 0
    for step in range(max_new_tokens):
        if bias is not None:
            logits = logits.float() + bias
        token = sample_next(logits, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                            generator=generator)
        if len(eos_ids):
            token = torch.where(finished, torch.full_like(token, pad), token)
            finished = finished | torch.isin(token, eos_ids)
        if step % OUT_BLOCK == 0:
            blocks.append(torch.empty(B, min(OUT_BLOCK, max_new_tokens - step), dtype=torch.long, device=device))
        blocks[-1][:, step % OUT_BLOCK] = token
        n = step + 1
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
    new = torch.cat(blocks, dim=1)[:, :n]  # [B, n]
    if len(eos_ids):  # stop after the first step at which every row had finished
        done = torch.isin(new, eos_ids).cummax(1).values.all(0)  # [n]: every row finished at or before step i
        if bool(done.any()):
            new = new[:, : int(done.long().argmax()) + 1]
    return torch.cat([input_ids, new], dim=1)
