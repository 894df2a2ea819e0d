"""Dense vs InfLLM-v2 sparse prefill of one attention layer on the CPU (fp32), same weights.

For each sequence length and input kind, one ``infllmv2`` layer and one ``attention`` layer with the same
``q/k/v/o_proj`` weights run a no-grad parallel forward (a prefill) over ``[1, T, d_model]``. Timed: the whole
layer (projections included) for both; the sparse layer step by step (the calls of its forward with
``dense_len=-1``), so that its split into block selection (stage 1: compressed keys, scores, pooling, top-k) and
attention over the selected blocks (stage 2) is reported too. Dense and sparse runs alternate (repeat r: dense,
then sparse), and each time is the minimum over the repeats, so a burst of load from other processes hits both.
Recorded per case: the schedule of stage 2 (``native``: the fused C++ kernel ``cpu.cpp``; ``block-stationary
(torch)`` where it cannot be built or ``ZOO_NATIVE=off``: :mod:`zoo.kernels.infllmv2.cpu`; or the reference's per
query / tile of 16 queries, when ``InfLLMv2.query_tile`` is set), the mean union of blocks per
16-query tile, the load average before and after (``os.getloadavg()``, 1 minute), and the machine.

Input kinds: ``iid`` (independent Gaussian tokens: neighbouring queries select unrelated blocks, the worst case for
any schedule that shares gathers between queries) and ``correlated`` (an AR(1) process ``x_t = rho x_{t-1} +
sqrt(1 - rho^2) e_t``: neighbouring queries select nearly the same blocks).
"""

from __future__ import annotations

import csv
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from zoo.kernels.infllmv2 import sparse_attention
from zoo.kernels.infllmv2.cpu_native import native_kernel
from zoo.layers.attention import Attention
from zoo.layers.infllmv2 import InfLLMv2


@dataclass
class Setup:
    lengths: list[int] = field(default_factory=lambda: [8192, 32768, 65536])
    inputs: list[str] = field(default_factory=lambda: ["iid", "correlated"])
    d_model: int = 1024
    num_heads: int = 16
    num_kv_heads: int = 1  # one GQA group of 16, as MiniCPM4-8B's 32:2
    head_dim: int = 64
    sparse: dict[str, Any] = field(default_factory=lambda: dict(
        kernel_size=32, kernel_stride=16, block_size=64, init_blocks=1, window_size=0, topk=64, dense_len=-1))
    rho: float = 0.999
    repeats: int = 1
    seed: int = 0


def make_input(kind: str, T: int, d: int, rho: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(1, T, d, generator=g)
    if kind == "iid":
        return e
    if kind != "correlated":
        raise ValueError(f"unknown input kind {kind!r}; use 'iid' or 'correlated'")
    # x_t = rho x_{t-1} + c e_t as a scan in chunks: x = rho^t * cumsum(c e_t rho^-t), renormalised per chunk
    x = torch.empty_like(e)
    c = (1 - rho * rho) ** 0.5
    prev = e[:, 0]
    x[:, 0] = prev
    chunk = 256
    for t0 in range(1, T, chunk):
        n = min(chunk, T - t0)
        powers = rho ** torch.arange(1, n + 1, dtype=torch.float64)
        acc = torch.cumsum(c * e[:, t0:t0 + n].double() / powers[None, :, None], dim=1) * powers[None, :, None]
        x[:, t0:t0 + n] = (acc + prev.double()[:, None] * powers[None, :, None]).float()
        prev = x[:, t0 + n - 1]
    return x


def _timed(fn) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


@torch.no_grad()
def measure(s: Setup, T: int, kind: str) -> dict[str, Any]:
    torch.manual_seed(s.seed)
    heads = dict(num_heads=s.num_heads, num_kv_heads=s.num_kv_heads, head_dim=s.head_dim)
    sparse = InfLLMv2(s.d_model, 0, **heads, **s.sparse).eval()
    dense = Attention(s.d_model, 0, **heads).eval()
    dense.load_state_dict(sparse.state_dict())
    x = make_input(kind, T, s.d_model, s.rho, s.seed)
    load0 = os.getloadavg()[0]
    t_dense, best = math.inf, None
    pos = torch.arange(T)[None]
    for _ in range(s.repeats):  # alternate dense and sparse: a burst of load hits both
        t_dense = min(t_dense, _timed(lambda: dense(x))[1])
        # the sparse layer's forward, step by step (the calls it makes, timed separately; dense_len -1: all sparse)
        t0 = time.perf_counter()
        q, k, v, qs, ks = sparse._project(x, pos)
        t1 = time.perf_counter()
        idx = _select(sparse, qs, ks, pos, T)
        t2 = time.perf_counter()
        o = sparse_attention(q, k, v, pos, idx, block_size=sparse.block_size, scale=sparse.scale,
                             query_tile=sparse.query_tile)
        t3 = time.perf_counter()
        sparse.o_proj(o.transpose(1, 2).reshape(1, T, -1))
        t4 = time.perf_counter()
        if best is None or t4 - t0 < best[0]:
            best = (t4 - t0, t2 - t1, t3 - t2)
    t_sparse, t_select, t_attend = best
    nb = -(-T // sparse.block_size)
    C = 16
    ids = idx[:, :, : (T // C) * C].long().reshape(1, -1, T // C, C * idx.shape[-1])
    sel = torch.zeros(*ids.shape[:3], nb + 1, dtype=torch.bool).scatter_(-1, torch.where(ids >= 0, ids, nb), True)
    return dict(T=T, input=kind, dense_s=t_dense, sparse_s=t_sparse, speedup=t_dense / t_sparse,
                select_s=t_select, attend_s=t_attend, schedule=_schedule(sparse),
                blocks_per_query=float((idx >= 0).sum(-1).float().mean()),
                union_per_tile16=float(sel[..., :nb].sum(-1).float().mean()),
                load_before=load0, load_after=os.getloadavg()[0], threads=torch.get_num_threads())


def _select(m: InfLLMv2, qs: torch.Tensor, ks: torch.Tensor, pos: torch.Tensor, T: int) -> torch.Tensor:
    c1, c2 = m._compressed(ks)
    return m._select(qs, pos, c1, c2, num_blocks=-(-T // m.block_size), width=m.budget)


def _schedule(m: InfLLMv2) -> str:
    if m.query_tile is not None:
        return "per query" if m.query_tile == 1 else f"tile {m.query_tile}"
    fused = native_kernel(m.head_dim, m.block_size, torch.float32) is not None
    return "native (cpu.cpp)" if fused else "block-stationary (torch)"


def write_report(s: Setup, rows: list[dict[str, Any]], out: Path) -> None:
    from zoo.bench.machine import cpu_model

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    sp = s.sparse
    lines = [
        "# InfLLM-v2 sparse vs dense prefill (CPU, fp32)", "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads. One layer, d_model {s.d_model}, {s.num_heads} heads / "
        f"{s.num_kv_heads} KV heads (groups of {s.num_heads // s.num_kv_heads}), head_dim {s.head_dim}, batch 1.",
        f"Sparse: kernel {sp['kernel_size']}/{sp['kernel_stride']}, blocks of {sp['block_size']}, "
        f"{sp['topk'] + sp['window_size'] // sp['block_size']} blocks per query ({sp['init_blocks']} initial, "
        f"window {sp['window_size']}), dense_len {sp['dense_len']} (sparse for every query). "
        f"Dense: the zoo `attention` layer (causal SDPA). Times: min of {s.repeats} run(s), dense and sparse "
        "alternating, seconds.", "",
        "| T | input | dense | sparse | speedup | select | attend | schedule | blocks/query | union/16 q | load |",
        "|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['T']} | {r['input']} | {r['dense_s']:.2f} | {r['sparse_s']:.2f} | {r['speedup']:.2f}x "
                     f"| {r['select_s']:.2f} | {r['attend_s']:.2f} | {r['schedule']} | {r['blocks_per_query']:.1f} "
                     f"| {r['union_per_tile16']:.1f} | {r['load_before']:.1f} -> {r['load_after']:.1f} |")
    lines += ["", "`union/16 q`: distinct blocks the 16 queries of a tile select together (what a tile gathers).",
              "Setup: " + str(asdict(s))]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in s.inputs:
        sub = [r for r in rows if r["input"] == kind]
        ax.plot([r["T"] for r in sub], [r["speedup"] for r in sub], marker="o", label=f"{kind} inputs")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("dense time / sparse time")
    ax.set_title("InfLLM-v2 prefill speedup over dense (CPU, fp32)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "speedup.png", dpi=120)
    plt.close(fig)


def run(s: Setup, out: str | Path) -> list[dict[str, Any]]:
    rows = []
    cases = [(T, kind) for T in s.lengths for kind in s.inputs]
    for T, kind in tqdm(cases, desc="infllmv2 bench", unit="case"):
        rows.append(measure(s, T, kind))
        write_report(s, rows, Path(out))  # partial results survive an interrupted long run
    return rows


def gpu_kernel_bench(T: int, *, num_heads: int = 32, num_kv_heads: int = 2, head_dim: int = 128,
                     dtype: torch.dtype = torch.bfloat16, sparse: dict[str, Any] | None = None,
                     backward: bool = False) -> dict[str, float]:
    """CUDA only (not run in this project's CPU sessions): the attention core of one layer at MiniCPM4-8B's head
    sizes, InfLLM-v2 (compression + fused block scoring + top-k + sparse attention, Triton) against SDPA's flash
    backend (causal), both on the same q, k, v; milliseconds by ``triton.testing.do_bench``."""
    if not torch.cuda.is_available():
        raise RuntimeError("gpu_kernel_bench needs a CUDA GPU")
    import torch.nn.functional as F
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sp = {**Setup().sparse, "window_size": 2048, **(sparse or {})}
    m = InfLLMv2(num_heads * head_dim, 0, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                 **sp).to("cuda", dtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, num_heads, T, head_dim, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(1, num_kv_heads, T, head_dim, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(1, num_kv_heads, T, head_dim, device="cuda", dtype=dtype, generator=g)
    do = torch.randn_like(q)
    pos = torch.arange(T, device="cuda")[None]
    for t in (q, k, v):
        t.requires_grad_(backward)

    def sparse_fn():
        with torch.no_grad():
            c1, c2 = m._compressed(k)
            idx = m._select(q, pos, c1, c2, num_blocks=-(-T // m.block_size), width=m.budget)
        o = sparse_attention(q, k, v, pos, idx, block_size=m.block_size, scale=m.scale)
        if backward:
            torch.autograd.grad(o, (q, k, v), do)

    def flash_fn():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        if backward:
            torch.autograd.grad(o, (q, k, v), do)

    ms_sparse, ms_flash = triton.testing.do_bench(sparse_fn), triton.testing.do_bench(flash_fn)
    return {"T": T, "ms_sparse": ms_sparse, "ms_flash": ms_flash, "speedup": ms_flash / ms_sparse}
