"""``zoo bench`` / ``python scripts/bench.py``: run the registered cases and write the reports.

Examples::

    python scripts/bench.py --quick --out /tmp/bench            # CI smoke run: every case once, tiny sizes
    python scripts/bench.py --max-T 4096                         # T = 1k, 2k, 4k; reports in bench/results/
    python scripts/bench.py --subjects attention,mamba2 --phases forward,decode --device cuda --max-T 65536
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from zoo.bench.cases import PHASES, SUBJECTS, make_cases
from zoo.bench.machine import gpu_peak_flops, machine_info, measure_gemm_flops
from zoo.bench.report import SCHEMA, write_reports
from zoo.bench.runner import RunOptions, memory_probe, run_cases, scaling


def _csv(value: str, allowed: list[str] | tuple[str, ...]) -> list[str]:
    items = list(allowed) if value == "all" else [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {list(allowed)} or 'all'")
    return items


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zoo bench", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="every case once at tiny sizes (d_model 64, T 64), no warm-up: keeps the harness "
                        "working, the numbers mean nothing")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="report directory (default bench/results)")
    p.add_argument("--stem", help="report file stem (default <device>-<date>, quick-<device>-<date> with --quick)")
    p.add_argument("--subjects", default="all", help=f"comma list of {sorted(SUBJECTS)} or 'all'")
    p.add_argument("--phases", default="all", help=f"comma list of {list(PHASES)} or 'all'")
    p.add_argument("--min-T", type=int, default=1024, help="smallest sequence length / decode context (default 1024)")
    p.add_argument("--max-T", type=int, default=4096, help="largest T; T doubles from --min-T (default 4096)")
    p.add_argument("--Ts", type=lambda v: [int(t) for t in v.split(",")], default=None,
                   help="explicit comma list of T (overrides --min-T/--max-T; with --quick default 64)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-(impl, case) memory subprocesses")
    p.add_argument("--max-case-seconds", type=float, default=120.0,
                   help="once timing a case (all its implementations) takes longer, the larger T of that "
                        "subject/phase are skipped (default 120)")
    p.add_argument("--gemm-n", type=int, default=None, help="size of the roofline matmul (default 2048; 256 quick)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--render", type=Path, metavar="JSON",
                   help="measure nothing: re-render the Markdown and PNG reports of an existing JSON report")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.render:
        report = json.loads(args.render.read_text())
        paths = write_reports(report, args.render.parent, args.render.stem)
        print(f"zoo bench: rendered {paths['markdown']} and {len(paths['plots'])} plots from {args.render}")
        return 0
    try:
        subjects = _csv(args.subjects, sorted(SUBJECTS))
        phases = _csv(args.phases, PHASES)
    except argparse.ArgumentTypeError as e:
        print(f"zoo bench: {e}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("zoo bench: --device cuda but CUDA is not available on this machine", file=sys.stderr)
        return 2
    dtype = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass

    if args.quick:
        Ts, size = args.Ts or [64], "quick"
        opts = RunOptions(warmup=0, repeats=1, memory=not args.no_memory, max_case_seconds=float("inf"),
                          progress=not args.no_progress)
    else:
        Ts, T, size = [], args.min_T, "full"
        while T <= args.max_T:
            Ts.append(T)
            T *= 2
        Ts = args.Ts or Ts
        opts = RunOptions(args.warmup, args.repeats, not args.no_memory, args.max_case_seconds, not args.no_progress)
    cases = make_cases(subjects, phases, Ts, dtype=dtype, device=str(device), size=size, batch=args.batch)

    started = time.time()
    probe = memory_probe(cases, opts)  # its server imports torch/transformers while we collect machine info
    machine = machine_info(device)
    if probe is not None:
        probe.idle_bytes  # noqa: B018 - wait for the server (and the idle baseline): nothing timed runs beside it
    machine["gemm"] = measure_gemm_flops(device, getattr(torch, dtype), n=args.gemm_n or (256 if args.quick else 2048))
    machine["peak_flops"] = gpu_peak_flops(device)
    results = run_cases(cases, opts, probe)
    machine["load_average_end"] = list(os.getloadavg())
    now = dt.datetime.now(dt.timezone.utc)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "created": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "mode": "quick" if args.quick else "full",
        "argv": list(argv) if argv is not None else sys.argv[1:],
        "options": {"warmup": opts.warmup, "repeats": opts.repeats, "decode_repeats": opts.repeats_for("decode"),
                    "batch": args.batch, "dtype": dtype,
                    "Ts": Ts, "subjects": subjects, "phases": phases, "memory": opts.memory,
                    "max_case_seconds": opts.max_case_seconds, "decode_steps": opts.decode_steps},
        "machine": machine,
        "wall_s": time.time() - started,
        "cases": results,
        "scaling": scaling(results),
    }
    stem = args.stem or f"{'quick-' if args.quick else ''}{device.type}-{now.strftime('%Y-%m-%d')}"
    paths = write_reports(report, args.out, stem)
    n_err = sum(r["status"] == "error" for r in results)
    print(f"zoo bench: {len(results)} cases ({n_err} with errors) in {report['wall_s']:.0f} s -> {paths['json']}, "
          f"{paths['markdown']}, {len(paths['plots'])} plots")
    return 1 if n_err else 0
