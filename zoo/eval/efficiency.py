"""Efficiency at each context length: forward tokens/s, decode ms/token after that context, state bytes.

Wall-clock on whatever machine runs it (median of ``repeats``, after one warm-up call), with the load average
recorded per length: on a shared machine the numbers are indicative only. State bytes are exact
(``ModelState.nbytes`` after prefilling ``length`` tokens): a KV cache grows with the context, a sliding window
or a recurrent state does not.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


@torch.no_grad()
def measure_efficiency(model, lengths: Sequence[int] = (256, 1024, 4096), *, batch_size: int = 1,
                       decode_tokens: int = 16, repeats: int = 3, seed: int = 0, progress: bool = True) -> dict:
    """Rows ``{"length", "forward_tokens_per_s", "decode_ms_per_token", "state_bytes", "load_average"}``."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    V = model.config.vocab_size
    rows = []
    for L in tqdm(lengths, desc="efficiency", unit="length", disable=not progress, leave=False):
        ids = torch.randint(0, V, (batch_size, L), generator=g).to(model.device)
        fwd = _median_time(lambda ids=ids: model(ids), repeats)
        states = model.init_states(batch_size, max_length=L + decode_tokens + 1)
        model(ids, states=states)
        state_bytes = states.nbytes
        tok = torch.randint(0, V, (batch_size, 1), generator=g).to(model.device)
        model.step(tok, states)  # warm-up step
        t0 = time.perf_counter()
        for _ in range(decode_tokens):
            model.step(tok, states)
        decode = (time.perf_counter() - t0) / decode_tokens
        rows.append({"length": L, "forward_tokens_per_s": batch_size * L / fwd, "forward_s": fwd,
                     "decode_ms_per_token": 1e3 * decode, "state_bytes": state_bytes,
                     "load_average": os.getloadavg()[0]})
    last = rows[-1]
    summary = {"forward_tokens_per_s": last["forward_tokens_per_s"], "decode_ms_per_token": last["decode_ms_per_token"],
               "state_bytes": last["state_bytes"], "length": last["length"]}
    return {"rows": rows, "summary": summary}
