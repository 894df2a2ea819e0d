"""S4 / S4D benchmarks: convolution vs recurrence vs the reference's materialised kernel path, kernel-generation
memory, and decode cost against context length.

Cases (one fresh process each, so that peak memory is the case's own; ``torch`` threads fixed):

* ``forward``: the zoo ``s4`` layer's parallel forward over ``L`` tokens (kernel generation included: the kernel
  cache is cleared before every call), batch 1, fp32;
* ``naive``: the same forward with the kernel's structured product computed the way ``state-spaces/s4``'s
  fallback does (``cauchy_naive``: the ``[rows, H, N, L/2+1]`` Cauchy matrix materialised; S4D:
  ``log_vandermonde_naive``, ``exp(dtA l)`` as ``[H, N/2, L]``); skipped (with the matrix size) when its
  estimated peak would exceed ``naive_cap_gb``;
* ``scan``: the recurrent form over the same tokens, one O(N) step per token (timed over ``scan_steps`` tokens
  and scaled to ``L`` when ``L`` is longer; the per-token cost does not depend on the position);
* ``kernel``: kernel generation alone (``SSMKernel.kernel``) at ``H x L``: time and peak memory (target < 1 GB at
  H=1024, L=8192; the materialised path needs ~8.6 GB there);
* ``decode``: prefill each context length into its own state, then time single-token steps, the contexts in
  alternating rounds (minimum per context, so that load changes hit both alike; target: 16k within 1.1x of 1k).

Memory is the peak RSS during the measured call minus the RSS before it (Linux: the peak is reset first through
``/proc/self/clear_refs``; elsewhere ``ru_maxrss``), i.e. activations and temporaries on top of weights and
inputs. Every row records the load average.
"""

from __future__ import annotations

import csv
import multiprocessing as mp
import os
import resource
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm


@dataclass
class Setup:
    lengths: list[int] = field(default_factory=lambda: [1024, 8192, 16384])
    widths: list[int] = field(default_factory=lambda: [256, 1024])
    d_state: int = 64
    mode: str = "dplr"  # "dplr" (S4) or "diag" (S4D-Lin)
    scan_steps: int = 1024
    repeats: int = 2
    kernel_cases: list[tuple[int, int]] = field(default_factory=lambda: [(1024, 8192)])
    decode_width: int = 1024
    decode_contexts: list[int] = field(default_factory=lambda: [1024, 16384])
    decode_steps: int = 100
    decode_rounds: int = 5
    naive_cap_gb: float = 3.5
    threads: int = 1
    isolate: bool = True  # one spawned process per case (False: in-process, for tests)


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _start_peak() -> int:
    """Reset the peak RSS to the current RSS where Linux allows it (``clear_refs``); returns the baseline."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kb("VmRSS") * 1024
    except (OSError, TypeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def _peak() -> int:
    hwm = _status_kb("VmHWM")
    if hwm is not None:
        return hwm * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def naive_bytes(H: int, L: int, d_state: int, mode: str = "dplr", rank: int = 1, channels: int = 1) -> int:
    """Bytes of the matrix the reference's fallback materialises: DPLR, the Cauchy matrix
    ``(1+r)(C+r) x H x 2(N/2) x (L/2+1)`` complex64 (``_conj`` doubles the state); S4D, ``exp(dtA l)`` as
    ``H x N/2 x L`` complex64."""
    if mode == "diag":
        return H * (d_state // 2) * L * 8
    return (1 + rank) * (channels + rank) * H * d_state * (L // 2 + 1) * 8


# peak memory of the materialised path relative to its matrix (the Cauchy quotient is formed once; the
# Vandermonde needs x * l and exp of it at the same time)
NAIVE_PEAK = {"dplr": 1.25, "diag": 2.0}


def _layer(H: int, s: Setup, L: int):
    from zoo.layers.s4 import S4

    torch.manual_seed(0)
    kw = {"l_max": L} if s.mode == "dplr" else {"mode": "diag", "init": "diag-lin"}
    return S4(H, d_state=s.d_state, **kw).eval()


def _timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


@torch.no_grad()
def measure(kind: str, H: int, L: int, s: Setup) -> dict[str, Any]:
    """One case in the current process: ``{"time_s", "mem_bytes", ...}``."""
    torch.set_num_threads(s.threads)
    row: dict[str, Any] = {"kind": kind, "mode": s.mode, "H": H, "L": L, "load_avg_1m": os.getloadavg()[0]}
    size = naive_bytes(H, L, s.d_state, s.mode)
    if kind == "naive" and NAIVE_PEAK[s.mode] * size > s.naive_cap_gb * 2**30:
        row.update(status=f"skipped: materialises {size / 2**30:.1f} GiB")
        return row
    m = _layer(H, s, L)
    x = torch.randn(1, L, H)
    if kind in ("forward", "naive"):
        def run() -> None:
            m.kernel._cache.clear()
            if kind == "naive":  # the reference's fallback product, for this call only
                from zoo.kernels.s4 import cauchy_naive, log_vandermonde_naive, ssm

                name, naive = ("cauchy", cauchy_naive) if s.mode == "dplr" else ("log_vandermonde",
                                                                                 log_vandermonde_naive)
                saved = getattr(ssm, name)
                setattr(ssm, name, naive)
                try:
                    m(x)
                finally:
                    setattr(ssm, name, saved)
            else:
                m(x)
    elif kind == "kernel":
        def run() -> None:
            m.kernel._cache.clear()
            m.kernel.sync_l_kernel()
            m.kernel.kernel(L, torch.float32)
    elif kind == "scan":
        n = min(L, s.scan_steps)
        st = m.init_state(1, dtype=torch.float32, device="cpu")
        m(x[:, :1], state=st)  # discretise once (cached)
        row["scan_tokens_timed"] = n

        def run() -> None:
            for t in range(n):
                m(x[:, t:t + 1], state=st)
    elif kind == "decode":  # every context in this process, timed in alternating rounds (min per context)
        states = {}
        for c in s.decode_contexts:
            states[c] = m.init_state(1, dtype=torch.float32, device="cpu")
            m(x[:, :c], state=states[c])  # prefill (untimed)
            m(x[:, :1], state=states[c])
        best = dict.fromkeys(states, float("inf"))
        for _ in range(s.decode_rounds):
            for c, st in states.items():
                t0 = time.perf_counter()
                for _ in range(s.decode_steps):
                    m(x[:, :1], state=st)
                best[c] = min(best[c], time.perf_counter() - t0)
        row.update(status="ok", ms_by_context={c: 1e3 * b / s.decode_steps for c, b in best.items()})
        return row
    else:
        raise ValueError(f"unknown case kind {kind!r}")
    before = _start_peak()
    t0 = time.perf_counter()
    run()  # warm-up run: its peak is the memory figure
    first = time.perf_counter() - t0
    row["mem_bytes"] = max(0, _peak() - before)
    row["time_s"] = min(first, _timed(run, s.repeats - 1)) if s.repeats > 1 else first
    if kind == "scan" and L > row["scan_tokens_timed"]:
        row["time_s"] *= L / row["scan_tokens_timed"]
    row["status"] = "ok"
    return row


def _child(kind: str, H: int, L: int, s: Setup, queue: Any) -> None:
    try:
        queue.put(("ok", measure(kind, H, L, s)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        queue.put(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"))


def _isolated(kind: str, H: int, L: int, s: Setup) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    proc = ctx.Process(target=_child, args=(kind, H, L, s, queue))
    proc.start()
    proc.join()
    if queue.empty():
        return {"kind": kind, "mode": s.mode, "H": H, "L": L, "status": f"died (exit code {proc.exitcode})"}
    status, value = queue.get()
    if status != "ok":
        return {"kind": kind, "mode": s.mode, "H": H, "L": L, "status": "error: " + value.splitlines()[0]}
    return value


def cases(s: Setup) -> list[tuple[str, int, int]]:
    out = [(k, H, L) for H in s.widths for L in s.lengths for k in ("forward", "naive", "scan")]
    out += [("kernel", H, L) for H, L in s.kernel_cases]
    out.append(("decode", s.decode_width, max(s.decode_contexts)))
    return out


def run(s: Setup, out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from zoo.bench.machine import cpu_model

    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "threads": s.threads,
               "load_average_start": list(os.getloadavg())}
    rows = []
    for kind, H, L in tqdm(cases(s), desc="s4 bench"):
        row = _isolated(kind, H, L, s) if s.isolate else measure(kind, H, L, s)
        by_context = row.pop("ms_by_context", None)
        if by_context is None:
            rows.append(row)
        else:  # one row per context
            rows += [{**row, "L": c, "ms_per_token": ms} for c, ms in by_context.items()]
    machine["load_average_end"] = list(os.getloadavg())
    write_csv(rows, out / "results.csv")
    (out / "results.md").write_text(report(rows, s, machine))
    plot(rows, out / "s4_bench.png")
    return out


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    keys = ["kind", "mode", "H", "L", "status", "time_s", "mem_bytes", "ms_per_token", "scan_tokens_timed",
            "load_avg_1m"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def _fmt_t(r: dict[str, Any] | None) -> str:
    if r is None:
        return "-"
    if r.get("status") != "ok":
        return r.get("status", "?")
    return f"{r['time_s']:.3f} s"


def _fmt_m(r: dict[str, Any] | None) -> str:
    return f"{r['mem_bytes'] / 2**20:.0f} MiB" if r and r.get("status") == "ok" else "-"


def report(rows: list[dict[str, Any]], s: Setup, machine: dict[str, Any]) -> str:
    get = {(r["kind"], r["H"], r["L"]): r for r in rows}
    name = "S4 (DPLR, HiPPO-LegS)" if s.mode == "dplr" else "S4D-Lin"
    lines = [f"# {name} benchmark", "",
             f"CPU: {machine['cpu']} ({machine['cores']} cores), torch {machine['torch']}, {s.threads} thread(s), "
             f"fp32, batch 1, d_state {s.d_state}. Load average (1/5/15 min) at start "
             f"{'/'.join(f'{v:.2f}' for v in machine['load_average_start'])}, at end "
             f"{'/'.join(f'{v:.2f}' for v in machine['load_average_end'])}; per row below.", "",
             "## Forward: FFT convolution vs recurrent scan vs the reference's materialised kernel path", "",
             "| H | L | FFT conv (zoo) | peak mem | materialised kernel path | peak mem | recurrent scan | load |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for H in s.widths:
        for L in s.lengths:
            f, n, sc = get.get(("forward", H, L)), get.get(("naive", H, L)), get.get(("scan", H, L))
            scan = _fmt_t(sc) + (f" (from {sc['scan_tokens_timed']} steps)" if sc and sc.get("status") == "ok"
                                 and sc["scan_tokens_timed"] < L else "")
            lines.append(f"| {H} | {L} | {_fmt_t(f)} | {_fmt_m(f)} | {_fmt_t(n)} | {_fmt_m(n)} | {scan} | "
                         f"{(f or {}).get('load_avg_1m', float('nan')):.2f} |")
    lines += ["", "## Kernel generation", "", "| H | L | time | peak mem (zoo) | materialised matrix | load |",
              "|---:|---:|---:|---:|---:|---:|"]
    for H, L in s.kernel_cases:
        r = get.get(("kernel", H, L))
        size = naive_bytes(H, L, s.d_state, s.mode) / 2**30
        lines.append(f"| {H} | {L} | {_fmt_t(r)} | {_fmt_m(r)} | {size:.1f} GiB | "
                     f"{(r or {}).get('load_avg_1m', float('nan')):.2f} |")
    lines += ["", "## Decode (one token after a prefill of L tokens)", "", "| H | context | ms / token | load |",
              "|---:|---:|---:|---:|"]
    dec = [get.get(("decode", s.decode_width, L)) for L in s.decode_contexts]
    for L, r in zip(s.decode_contexts, dec):
        ms = f"{r['ms_per_token']:.3f}" if r and r.get("status") == "ok" else (r or {}).get("status", "-")
        lines.append(f"| {s.decode_width} | {L} | {ms} | {(r or {}).get('load_avg_1m', float('nan')):.2f} |")
    ok = [r for r in dec if r and r.get("status") == "ok"]
    if len(ok) == len(dec) >= 2:
        lines += ["", f"Decode at {s.decode_contexts[-1]} vs {s.decode_contexts[0]} tokens of context: "
                  f"{ok[-1]['ms_per_token'] / ok[0]['ms_per_token']:.2f}x (the state has a constant size)."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for kind, style in (("forward", "-o"), ("naive", "--s"), ("scan", ":^")):
        for H in sorted({r["H"] for r in rows if r["kind"] == kind}):
            pts = sorted((r["L"], r) for r in rows if r["kind"] == kind and r["H"] == H and r.get("status") == "ok")
            if not pts:
                continue
            axes[0].plot([p[0] for p in pts], [p[1]["time_s"] for p in pts], style, label=f"{kind} H={H}")
            axes[1].plot([p[0] for p in pts], [p[1]["mem_bytes"] / 2**20 for p in pts], style, label=f"{kind} H={H}")
    for ax, label in zip(axes, ("time (s)", "peak memory increase (MiB)")):
        ax.set_xscale("log", base=2)
        if all(v > 0 for line in ax.get_lines() for v in line.get_ydata()):
            ax.set_yscale("log")
        ax.set_xlabel("sequence length L")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

