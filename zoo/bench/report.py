"""Reports of a run: ``<stem>.json`` (every raw number + machine info; rewritten after every case, so a killed
run leaves its finished cases), ``<stem>.md`` (ratio tables, flagged cases), ``<stem>.csv`` (one row per case and
implementation, floors included) and PNG plots (time vs T on log-log axes per subject; decode ms/token vs context
per subject)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

SCHEMA = "zoo-bench/2"  # 2: per-case load average, spread and flags; "complete"; "runs" (one per resumed run)
PHASE_COLORS = {"forward": "tab:blue", "forward_backward": "tab:red", "prefill": "tab:green", "decode": "tab:purple"}


def write_json(report: dict[str, Any], path: Path) -> Path:
    """Write atomically (a temporary file, then ``os.replace``): a run killed mid-write leaves the previous file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(report, indent=1, sort_keys=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------------------------------------- markdown
def _ms(e: dict[str, Any]) -> str:
    t = e["time_s"]
    return f"{t['median'] * 1e3:.3g} ({t['min'] * 1e3:.3g}–{t['max'] * 1e3:.3g})"


def _mb(e: dict[str, Any]) -> str:
    return f"{e['mem_bytes'] / 2**20:.0f}" if e.get("mem_status") == "ok" else "–"


def _gflops(e: dict[str, Any], roof: float | None) -> str:
    s = f"{e['flops_per_s'] / 1e9:.3g}"
    return f"{s} ({100 * e['flops_per_s'] / roof:.0f}%)" if roof else s


def _load(values: list[float] | None) -> str:
    return "/".join(f"{v:.1f}" for v in values) if values else "?"


def _case_load(r: dict[str, Any]) -> str:
    load = r.get("load_average")
    return f"{load['start'][0]:.1f}→{load['end'][0]:.1f}" if load else "–"


def floor_of(r: dict[str, Any]) -> tuple[str, float] | None:
    """The floor shown beside a case's ratio: the weight-streaming floor of a decode step, else the GEMM floor
    (``(kind, seconds)``), or None when the run measured none."""
    floors = r.get("floor") or {}
    for kind in (("stream", "gemm") if r.get("phase") == "decode" else ("gemm",)):
        f = floors.get(kind)
        if f and f.get("status") == "ok":
            t = f["time_s"]
            return kind, (t["median"] if isinstance(t, dict) else t)
    return None


def _floor_cells(r: dict[str, Any], z: dict[str, Any]) -> tuple[str, str]:
    f = floor_of(r)
    if f is None:
        return "–", "–"
    kind, t = f
    ratio = f"{z['time_s']['median'] / t:.2f}" if z.get("status") == "ok" else "–"
    return f"{t * 1e3:.3g} ({kind})", ratio


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    gemm = m["gemm"]
    roof = gemm["best_flops_per_s"]
    opts = report["options"]
    spread_limit = opts.get("spread_limit", 0.2)
    runs = report.get("runs", [])
    lines = [
        f"# zoo bench — {m['device']} — {report['created']}",
        "",
        f"Machine: {m.get('gpu_name') or m['cpu_model']}; {m['cpu_count']} CPU cores, torch threads "
        f"{m['torch_threads']}; torch {m['torch']}, transformers {m['transformers']}, zoo {m['zoo']}.",
        f"Measured GEMM ({gemm['dtype']}, {gemm['n']}^3, best of {gemm['repeats']}): {roof / 1e9:.4g} GFLOP/s "
        f"(median {gemm['flops_per_s'] / 1e9:.4g})"
        + "".join(f"; vendor peak {k}: {v / 1e12:.0f} TFLOP/s" for k, v in m.get("peak_flops", {}).items()) + ".",
        *([f"Measured read bandwidth ({m['memory_bandwidth']['bytes'] / 2**20:.0f} MiB summed, best of "
           f"{m['memory_bandwidth']['repeats']}): {m['memory_bandwidth']['best_bytes_per_s'] / 1e9:.3g} GB/s "
           f"(median {m['memory_bandwidth']['bytes_per_s'] / 1e9:.3g})."] if m.get("memory_bandwidth") else []),
        *([f"Command: `zoo bench {' '.join(report['argv'])}`."] if report.get("argv") else []),
        *([f"Allocator (the timed process; the memory columns come from fresh processes with glibc's mmap threshold "
           f"fixed at 1 MiB, zoo.bench.machine.fixed_mmap_threshold): "
           f"{m['allocator']}."] if m.get("allocator") else []),
        f"Load average (1/5/15 min) at start {_load(m.get('load_average_start'))}, at end "
        f"{_load(m.get('load_average_end'))} (other processes on the machine).",
        f"Mode: {report['mode']}; warm-up {opts['warmup']}, repeats {opts['repeats']} "
        f"(decode: {opts['decode_repeats']} single-token steps); batch {opts['batch']}; dtype {opts['dtype']}.",
    ]
    if len(runs) > 1:
        lines.append(f"Measured in {len(runs)} runs (resumed after an interruption): started "
                     + ", ".join(r["started"] for r in runs) + ".")
    if report.get("complete") is False:
        lines.append("**Incomplete**: the run was interrupted; rerun the same command to finish it.")
    lines += [
        "",
        "Times are the median (min–max) in ms of one call (decode: one token at context T). speedup = reference "
        "median / zoo median (> 1: zoo faster). GFLOP/s from the analytic FLOP counts (% of the measured GEMM). "
        "Memory: MB above an idle process (CPU) or CUDA peak above the pre-call allocation (GPU). "
        "max|Δ|: largest absolute difference of the forward outputs (same weights). load: the 1-minute load "
        f"average before→after the case. floor: the machine's floor for the case, measured in the same run -- "
        f"(gemm) the zoo implementation's linear layers alone on the case's shapes (timed in turns with the "
        f"implementations), (stream) for a decode step the bytes of its weights / the measured read bandwidth; "
        f"zoo/floor = zoo median / floor. ⚠: the case is flagged (timing spread (max−min)/median above "
        f"{100 * spread_limit:.0f}%, or a load above the core count): see the list below the table.",
        "",
        "| subject | phase | T | zoo ms | reference | ref ms | speedup | floor ms | zoo/floor | zoo GFLOP/s "
        "| ref GFLOP/s | zoo MB | ref MB | max\\|Δ\\| | load | status |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["cases"]:
        z = r["impls"].get("zoo", {})
        ref_name = r.get("reference") or "–"
        ref = r["impls"].get(ref_name, {})
        zok, rok = z.get("status") == "ok", ref.get("status") == "ok"
        speed = f"**{r['speedup']:.2f}**" if "speedup" in r else "–"
        diff = f"{r['max_abs_diff']:.1e}" if r.get("max_abs_diff") is not None else "–"
        status = r["status"] + (" ⚠" if r.get("flags") else "")
        floor_ms, floor_ratio = _floor_cells(r, z)
        lines.append(
            f"| {r['subject']} | {r['phase']} | {r['T']} | {_ms(z) if zok else '–'} | {ref_name} | "
            f"{_ms(ref) if rok else '–'} | {speed} | {floor_ms} | {floor_ratio} | {_gflops(z, roof) if zok else '–'} | "
            f"{_gflops(ref, roof) if rok else '–'} | {_mb(z) if zok else '–'} | {_mb(ref) if rok else '–'} | "
            f"{diff} | {_case_load(r)} | {status} |")
    dec = [r for r in report["cases"] if r["phase"] == "decode" and (r.get("floor") or {}).get("stream")
           and r["impls"].get("zoo", {}).get("status") == "ok"]
    if dec:
        lines += ["", "## Decode against its floors", "",
                  "gemv: the step's linear layers alone on one token, in a loop (their weights stay in cache when they "
                  "fit); stream: the bytes of the weights a step reads / the measured read bandwidth (weights from "
                  "memory).", "",
                  "| subject | context | zoo ms | gemv floor ms | zoo/gemv | weight MB | stream floor ms "
                  "| zoo/stream |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in dec:
            zt = r["impls"]["zoo"]["time_s"]["median"]
            g, st = r["floor"].get("gemm", {}), r["floor"]["stream"]
            gt = g["time_s"]["median"] if g.get("status") == "ok" else None
            lines.append(f"| {r['subject']} | {r['T']} | {zt * 1e3:.3g} | {f'{gt * 1e3:.3g}' if gt else '–'} | "
                         f"{f'{zt / gt:.2f}' if gt else '–'} | {st['bytes'] / 2**20:.0f} | {st['time_s'] * 1e3:.3g} | "
                         f"{zt / st['time_s']:.2f} |")
    flagged = [r for r in report["cases"] if r.get("flags")]
    if flagged:
        lines += ["", f"## Flagged cases ({len(flagged)} of {len(report['cases'])})", "",
                  "Numbers to trust less: the timing spread exceeded the limit, or other processes loaded the "
                  "machine beyond its cores while the case ran.", ""]
        lines += [f"- {r['id']}: {'; '.join(r['flags'])}" for r in flagged]
    kernels = [(r, k, e) for r in report["cases"] for k, e in r["impls"].items()
               if e.get("scope") == "kernel" and e.get("status") == "ok"]
    if kernels:
        lines += ["", "## Kernel-level references (core op only, same shapes)", "",
                  "| subject | phase | T | kernel | ms | GFLOP/s |", "|---|---|---:|---|---:|---:|"]
        lines += [f"| {r['subject']} | {r['phase']} | {r['T']} | {k} | {_ms(e)} | {_gflops(e, roof)} |"
                  for r, k, e in kernels]
    lines += ["", "## Scaling (least-squares slope of log time / log memory against log T)", "",
              "| subject | phase | impl | T | time exponent | memory exponent |", "|---|---|---|---|---:|---:|"]
    for s in report["scaling"]:
        te = f"{s['time_exponent']:.2f}" if s["time_exponent"] is not None else "–"
        me = f"{s['mem_exponent']:.2f}" if s["mem_exponent"] is not None else "–"
        lines.append(f"| {s['subject']} | {s['phase']} | {s['impl']} | {', '.join(map(str, s['T']))} | {te} | {me} |")
    skipped = sorted({(r["subject"], r["status"]) for r in report["cases"] if r["status"] != "ok"})
    if skipped:
        lines += ["", "## Not measured", ""] + [f"- {s}: {why}" for s, why in skipped]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- plots
def plots(report: dict[str, Any], out_dir: Path, stem: str) -> list[Path]:
    """``<stem>-scaling.png`` (time vs T, log-log, one panel per subject, a line per implementation and phase) and
    ``<stem>-decode.png`` (decode ms/token vs context, one panel per subject)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for decode in (False, True):
        series = [s for s in report["scaling"] if (s["phase"] == "decode") == decode]
        subjects = sorted({s["subject"] for s in series})
        if not subjects:
            continue
        cols = min(3, len(subjects))
        rows = -(-len(subjects) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.9 * rows), squeeze=False)
        for ax, subject in zip(axes.flat, subjects):
            for s in (s for s in series if s["subject"] == subject):
                ys = s["ms_per_token"] if decode else [t * 1e3 for t in s["time_s"]]
                k = s["time_exponent"]
                label = s["impl"] + ("" if decode else f" {s['phase']}") + (f" (T^{k:.2f})" if k is not None else "")
                # colour = phase, line = implementation (solid: zoo, dashed: references)
                ax.plot(s["T"], ys, "-" if s["impl"] == "zoo" else "--", marker="o" if s["impl"] == "zoo" else "s",
                        color=PHASE_COLORS.get(s["phase"]), label=label)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("context length" if decode else "sequence length T")
            ax.set_ylabel("ms per token" if decode else "ms per call")
            ax.set_title(subject)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(subjects):]:
            ax.axis("off")
        what = "decode ms/token vs context" if decode else "time vs T (log-log)"
        fig.suptitle(f"zoo bench: {what} — {report['machine']['device']}, {report['created']}")
        fig.tight_layout()
        path = out_dir / f"{stem}-{'decode' if decode else 'scaling'}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


CSV_COLUMNS = ("case", "subject", "phase", "T", "impl", "status", "median_s", "min_s", "max_s", "repeats", "spread",
               "mem_bytes", "speedup", "load_start", "load_end", "flags")


def csv_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (case, implementation), and one per floor measured (impl ``floor:gemm`` / ``floor:stream``)."""
    rows = []
    for r in report["cases"]:
        load = r.get("load_average") or {}
        base = {"case": r["id"], "subject": r["subject"], "phase": r["phase"], "T": r["T"],
                "load_start": (load.get("start") or [None])[0], "load_end": (load.get("end") or [None])[0],
                "flags": "; ".join(r.get("flags") or [])}
        entries = [(impl, e) for impl, e in r["impls"].items()]
        entries += [(f"floor:{kind}", f) for kind, f in (r.get("floor") or {}).items()]
        for impl, e in entries:
            t = e.get("time_s")
            t = t if isinstance(t, dict) else ({"median": t, "min": t, "max": t, "n": None} if t else {})
            rows.append({**base, "impl": impl, "status": e.get("status"), "median_s": t.get("median"),
                         "min_s": t.get("min"), "max_s": t.get("max"), "repeats": t.get("n"),
                         "spread": e.get("spread"), "mem_bytes": e.get("mem_bytes"),
                         "speedup": r.get("speedup") if impl == "zoo" else None})
    return rows


def write_csv(report: dict[str, Any], path: Path) -> Path:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        w.writerows(csv_rows(report))
    return path


def write_reports(report: dict[str, Any], out_dir: Path, stem: str) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = write_json(report, out_dir / f"{stem}.json")
    md_path = out_dir / f"{stem}.md"
    md_path.write_text(markdown(report))
    csv_path = write_csv(report, out_dir / f"{stem}.csv")
    pngs = plots(report, out_dir, stem)
    return {"json": json_path, "markdown": md_path, "csv": csv_path, "plots": pngs}
