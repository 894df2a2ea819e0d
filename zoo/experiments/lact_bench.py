"""LaCT benchmarks: FLOP utilisation of the test-time-training update, layer forward time vs T, decode time per
token vs context. Default sizes: one LaCT-760M layer (d 1536, 24 attention heads, 4 fast-weight heads of 384,
low rank 32, window 2048, chunk 2048, momentum).

1. **Utilisation**: the chunk update (``swiglu_descent`` + ``fast_weight_step``: ``12 C dh dH`` FLOPs per head, plus
   ``3 x 5 (4 m^2 n + 2 m^3)`` for Newton-Schulz with Muon) and the whole per-chunk step (apply + update,
   ``18 C dh dH``), timed at each chunk size; achieved FLOP/s over the fp32 GEMM FLOP/s (``[n, n] @ [n, n]``)
   measured in the same process, in turns with the update (best over the rounds for both: on a shared machine
   the median includes time lost to other processes; medians are reported too).
2. **Forward**: the mixer's parallel forward (no grad) at each T; FLOPs from ``LaCT.flops``.
3. **Decode**: states prefilled (in pieces) to each context, then single-token steps timed in turns across the
   contexts: the steady per-token time (median) and the step that completes a chunk (the update), timed at the
   next chunk boundary; amortised = steady + (boundary - steady) / C.

Every case records ``os.getloadavg()``. ``run`` writes ``results.md``, ``utilisation.csv``, ``forward.csv``,
``decode.csv`` and ``lact.png`` into the output directory.
"""

from __future__ import annotations

import csv
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from zoo.bench.machine import machine_info
from zoo.bench.timing import time_calls
from zoo.kernels.lact import fast_weight_step, lact_chunked, row_norms, swiglu_descent
from zoo.layers.lact import LaCT


@dataclass
class Setup:
    d_model: int = 1536
    num_attn_heads: int = 24
    num_lact_heads: int = 4
    w0_w2_low_rank: int = 32
    window_size: int = 2048
    chunk_size: int = 2048
    chunk_sizes: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096])
    forward_lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192, 16384])
    decode_contexts: list[int] = field(default_factory=lambda: [1024, 4096, 16384, 32768])
    decode_tokens: int = 32
    prefill_piece: int = 4096
    repeats: int = 3
    gemm_n: int = 2048
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    seed: int = 0

    def mixer_args(self, **kw: Any) -> dict[str, Any]:
        return {"num_attn_heads": self.num_attn_heads, "num_lact_heads": self.num_lact_heads,
                "w0_w2_low_rank": self.w0_w2_low_rank, "window_size": self.window_size,
                "chunk_size": self.chunk_size, **kw}


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def muon_flops(dh: int, dH: int) -> int:
    """Newton-Schulz on the three chunk gradients (5 iterations on the wide orientation ``[m, n]``, ``m <= n``)."""
    m, n = min(dh, dH), max(dh, dH)
    return 3 * 5 * (4 * m * m * n + 2 * m**3)


def _chunk_fns(ws: Any, norms: Any, moms: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lr: torch.Tensor,
               m: torch.Tensor, use_muon: bool) -> tuple[Any, Any]:
    """The chunk update alone, and one chunk's apply + update."""
    def update() -> Any:
        dws = swiglu_descent(*ws, k, v, lr[..., 0:1], lr[..., 1:2], lr[..., 2:3])
        return fast_weight_step(ws, None, moms, dws, m.mean(1, keepdim=True), norms, use_muon=use_muon)

    def step() -> Any:  # the chunk read with the current weights, then the update
        return lact_chunked(ws, q, k, v, lr, m, chunk_size=k.shape[1], use_muon=use_muon, norms=norms, moms=moms)

    return update, step


def _timed(fn: Any, *args: Any, **kw: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t0, out


@torch.no_grad()
def utilisation(s: Setup, bar: Any = None) -> list[dict[str, Any]]:
    """Per chunk size and Muon on/off: achieved FLOP/s of the chunk update and of the per-chunk step. The GEMM
    reference, the update and the step are timed in turns (``repeats`` rounds), so that all three meet the same
    load; best and median of each."""
    nh, dh = s.num_lact_heads, s.d_model // s.num_lact_heads
    g = torch.Generator().manual_seed(s.seed)
    ws = tuple(torch.randn(nh, dh, dh, generator=g) / dh**0.5 for _ in range(3))
    norms = row_norms(ws)
    moms = tuple(torch.zeros_like(w) for w in ws)
    A, Bm = torch.randn(s.gemm_n, s.gemm_n, generator=g), torch.randn(s.gemm_n, s.gemm_n, generator=g)
    rows = []
    for C in s.chunk_sizes:
        q, k, v = (torch.nn.functional.normalize(torch.randn(nh, C, dh, generator=g), dim=-1) for _ in range(3))
        lr = torch.rand(nh, C, 3, generator=g) * 1e-2
        m = torch.rand(nh, C, 1, generator=g)
        for use_muon in (False, True):
            update, step = _chunk_fns(ws, norms, moms, q, k, v, lr, m, use_muon)
            fns = {"gemm": partial(torch.mm, A, Bm), "update": update, "step": step}
            for fn in fns.values():  # warm-up
                fn()
            times: dict[str, list[float]] = {n: [] for n in fns}
            for _ in range(s.repeats):
                for name, fn in fns.items():
                    times[name].append(_timed(fn)[0])
            best = {n: min(t) for n, t in times.items()}
            med = {n: statistics.median(t) for n, t in times.items()}
            extra = nh * muon_flops(dh, dh) if use_muon else 0
            f_gemm, f_up, f_step = 2 * s.gemm_n**3, nh * 12 * C * dh * dh + extra, nh * 18 * C * dh * dh + extra
            rows.append({
                "chunk_size": C, "use_muon": use_muon, "heads": nh, "dh": dh,
                "gemm_gflops_best": f_gemm / best["gemm"] / 1e9, "gemm_gflops_median": f_gemm / med["gemm"] / 1e9,
                "update_gflop": f_up / 1e9, "update_s_best": best["update"], "update_s_median": med["update"],
                "update_gflops_best": f_up / best["update"] / 1e9,
                "update_utilisation": f_up / best["update"] / (f_gemm / best["gemm"]),
                "update_utilisation_median": f_up / med["update"] / (f_gemm / med["gemm"]),
                "step_gflops_best": f_step / best["step"] / 1e9,
                "step_utilisation": f_step / best["step"] / (f_gemm / best["gemm"]),
                "load_avg": _load(),
            })
            if bar is not None:
                bar.update(1)
    return rows


def _mixer(s: Setup) -> LaCT:
    torch.manual_seed(s.seed)
    mixer = LaCT(s.d_model, **s.mixer_args()).eval()
    with torch.no_grad():  # the LM's normal(0.02) init for the projections
        for name, p in mixer.named_parameters():
            if name.endswith(".weight") and p.dim() == 2:
                p.normal_(0, 0.02)
    return mixer


def forward_times(s: Setup, bar: Any = None) -> list[dict[str, Any]]:
    mixer, rows = _mixer(s), []
    for T in s.forward_lengths:
        with torch.no_grad():
            t, _ = time_calls(mixer, setup=partial(torch.randn, 1, T, s.d_model), warmup=1, repeats=s.repeats)
        flops = LaCT.flops(s.d_model, s.mixer_args(), T=T)
        rows.append({"T": T, "s_median": t.median, "s_best": t.min, "ms_per_token": t.median / T * 1e3,
                     "gflops_best": flops / t.min / 1e9, "load_avg": _load()})
        if bar is not None:
            bar.update(1)
    return rows


@torch.no_grad()
def decode_times(s: Setup, bar: Any = None) -> list[dict[str, Any]]:
    """States prefilled to every context first; then the single-token steps of all contexts are timed in turns (so
    they meet the same load); then each state is advanced (untimed) to its next chunk boundary and the step that
    completes the chunk is timed."""
    mixer = _mixer(s)
    C = s.chunk_size
    g = torch.Generator().manual_seed(s.seed)

    def feed(state: Any, n: int) -> Any:
        for t0 in range(0, n, s.prefill_piece):
            _, state = mixer(torch.randn(1, min(s.prefill_piece, n - t0), s.d_model, generator=g), state=state)
        return state

    states = {}
    for ctx in s.decode_contexts:
        states[ctx] = feed(mixer.init_state(1, dtype=torch.float32, device="cpu"), ctx)
        if bar is not None:
            bar.update(0.5)
    samples: dict[int, list[float]] = {ctx: [] for ctx in states}
    for _ in range(s.decode_tokens):
        for ctx in states:
            dt, (_, states[ctx]) = _timed(mixer, torch.randn(1, 1, s.d_model, generator=g), state=states[ctx])
            samples[ctx].append(dt)
    rows = []
    for ctx, state in states.items():
        state = feed(state, (C - 1 - int(state.count[0]) % C) % C)  # to the next chunk boundary
        boundary, (_, state) = _timed(mixer, torch.randn(1, 1, s.d_model, generator=g), state=state)
        steady = statistics.median(samples[ctx])
        rows.append({"context": ctx, "steady_ms_median": steady * 1e3,
                     "steady_ms_mean": statistics.mean(samples[ctx]) * 1e3, "steady_ms_max": max(samples[ctx]) * 1e3,
                     "boundary_step_ms": boundary * 1e3, "boundary_context": int(state.count[0]) - 1,
                     "amortised_ms": (steady + (boundary - steady) / C) * 1e3, "state_bytes": state.nbytes,
                     "load_avg": _load()})
        if bar is not None:
            bar.update(0.5)
    return rows


def write_report(s: Setup, info: dict[str, Any], util: list[dict[str, Any]], fwd: list[dict[str, Any]],
                 dec: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("utilisation", util), ("forward", fwd), ("decode", dec)):
        if rows:
            with open(out / f"{name}.csv", "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    for muon in (False, True):
        pts = [r for r in util if r["use_muon"] == muon]
        ax[0].plot([r["chunk_size"] for r in pts], [100 * r["update_utilisation"] for r in pts], marker="o",
                   label=f"update{' + Muon' if muon else ''}")
    ax[0].axhline(50, color="gray", ls="--", lw=1)
    ax[0].set(xscale="log" if util else "linear", xlabel="chunk size", ylabel="% of measured fp32 GEMM FLOP/s",
              title="TTT update")
    ax[0].legend(fontsize=8)
    ax[1].plot([r["T"] for r in fwd], [r["s_median"] for r in fwd], marker="o")
    log = "log" if fwd else "linear"  # a part left out (--parts) leaves its panel empty
    ax[1].set(xscale=log, yscale=log, xlabel="T", ylabel="seconds", title="layer forward (median)")
    ax[2].plot([r["context"] for r in dec], [r["steady_ms_median"] for r in dec], marker="o", label="steady (median)")
    ax[2].plot([r["context"] for r in dec], [r["amortised_ms"] for r in dec], marker="s", label="amortised")
    ax[2].set(xscale="log" if dec else "linear", xlabel="context", ylabel="ms / token", title="decode",
              ylim=(0, None))
    ax[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "lact.png", dpi=110)
    plt.close(fig)

    lines = ["# LaCT benchmarks (CPU)", "",
             f"Layer: d_model {s.d_model}, {s.num_attn_heads} attention heads, {s.num_lact_heads} fast-weight heads "
             f"(dh {s.d_model // s.num_lact_heads}), low rank {s.w0_w2_low_rank}, window {s.window_size}, chunk "
             f"{s.chunk_size}, momentum; fp32, batch 1. Produced by `python scripts/bench_lact.py`; raw numbers in "
             "the CSV files, plot `lact.png`.", "",
             f"Machine: {info.get('cpu_model')}, {info.get('affinity_cores')} cores, torch {info.get('torch')}, "
             f"{info.get('torch_threads')} threads; load average at start {info.get('load_average_start')} "
             "(other processes share the cores: every case records its own).", ""]
    if util:
        lines += ["## FLOP utilisation of the TTT update", "",
                  "| chunk | Muon | GEMM GFLOP/s (best) | update GFLOP/s (best) | update util. | update util. "
                  "(medians) | apply+update util. | load |", "|---:|---|---:|---:|---:|---:|---:|---|"]
        lines += [f"| {r['chunk_size']} | {'yes' if r['use_muon'] else 'no'} | {r['gemm_gflops_best']:.1f} | "
                  f"{r['update_gflops_best']:.1f} | {100 * r['update_utilisation']:.0f}% | "
                  f"{100 * r['update_utilisation_median']:.0f}% | {100 * r['step_utilisation']:.0f}% | "
                  f"{r['load_avg'][0]} |" for r in util]
        lines.append("")
    if fwd:
        lines += ["## Layer forward time vs T", "", "| T | median s | ms / token | GFLOP/s (best) | load |",
                  "|---:|---:|---:|---:|---|"]
        lines += [f"| {r['T']} | {r['s_median']:.3f} | {r['ms_per_token']:.3f} | {r['gflops_best']:.1f} | "
                  f"{r['load_avg'][0]} |" for r in fwd]
        lines.append("")
    if dec:
        base = dec[0]
        lines += ["## Decode time per token vs context", "",
                  "| context | steady ms (median) | ratio to first | chunk-completing step ms | amortised ms | "
                  "state bytes | load |", "|---:|---:|---:|---:|---:|---:|---|"]
        lines += [f"| {r['context']} | {r['steady_ms_median']:.2f} | "
                  f"{r['steady_ms_median'] / base['steady_ms_median']:.2f} | {r['boundary_step_ms']:.1f} | "
                  f"{r['amortised_ms']:.2f} | {r['state_bytes']} | {r['load_avg'][0]} |" for r in dec]
        lines.append("")
    lines += ["## Settings", "", "```", *(f"{k} = {v}" for k, v in asdict(s).items()), "```", ""]
    (out / "results.md").write_text("\n".join(lines))


def run(s: Setup, out: str | Path, parts: tuple[str, ...] = ("utilisation", "forward", "decode")) -> Path:
    if s.threads:
        torch.set_num_threads(s.threads)
    out = Path(out)
    info = machine_info(torch.device("cpu"))
    total = (2 * len(s.chunk_sizes) if "utilisation" in parts else 0) + \
        (len(s.forward_lengths) if "forward" in parts else 0) + (len(s.decode_contexts) if "decode" in parts else 0)
    with tqdm(total=total, desc="lact bench") as bar:
        util = utilisation(s, bar) if "utilisation" in parts else []
        fwd = forward_times(s, bar) if "forward" in parts else []
        dec = decode_times(s, bar) if "decode" in parts else []
    info["load_average_end"] = _load()
    write_report(s, info, util, fwd, dec, out)
    return out
