"""``zoo bench`` / ``python scripts/bench.py``: run the registered cases and write the reports.

Subjects are the bench cases the registered mixers and families declare (``zoo bench --list``).

Examples::

    zoo bench --quick --out /tmp/bench                      # CI smoke run: every case once, tiny sizes
    zoo bench --max-T 4096                                  # T = 1k, 2k, 4k; reports in bench/results/
    zoo bench --mixers NAME,NAME --phases forward,decode --device cuda --max-T 65536
    zoo bench --import my_package.mixers --mixers my_mixer  # a mixer registered outside the package

The JSON report is rewritten after every case; a killed run started again with the same ``--out``/``--stem``
and options skips the cases already measured (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from zoo.bench.cases import PHASES, make_cases, subjects
from zoo.bench.machine import (
    gpu_peak_flops,
    keep_freed_memory,
    machine_info,
    measure_gemm_flops,
    measure_memory_bandwidth,
)
from zoo.bench.report import SCHEMA, write_json, write_reports
from zoo.bench.runner import RunOptions, finished, memory_probe, run_cases, scaling

# options a resumed run must share with the report it continues
RESUME_KEYS = ("mode", "device", "dtype", "batch", "warmup", "repeats", "Ts", "subjects", "phases", "malloc")


def _csv(value: str, allowed: list[str] | tuple[str, ...]) -> list[str]:
    items = list(allowed) if value == "all" else [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {list(allowed)} or 'all'")
    return items


def _subject_specs(value: str, allowed: list[str]) -> tuple[list[str], list[tuple[list[str] | None,
                                                                              list[int] | None]]]:
    """``NAME[:PHASE+PHASE][@T+T]`` entries (comma list; a subject may come back with other phases / lengths): the
    subjects, and per entry its own phases and lengths (None: the run's ``--phases`` / T)."""
    if value == "all":
        return list(allowed), []
    names, plan = [], []
    for item in filter(None, (v.strip() for v in value.split(","))):
        rest, _, lengths = item.partition("@")
        name, _, phases = rest.partition(":")
        if name not in allowed:
            raise argparse.ArgumentTypeError(f"unknown subject {name!r}; choose from {list(allowed)} or 'all'")
        ph = [p for p in phases.split("+") if p] or None
        bad = [p for p in ph or () if p not in PHASES]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown phases {bad} in {item!r}; choose from {list(PHASES)}")
        try:
            Ts = [int(t) for t in lengths.split("+") if t] or None
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"bad lengths in {item!r}: {e}") from None
        names.append(name)
        plan.append((ph, Ts))
    return names, plan


def parser(prog: str = "zoo bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="every case once at its 'quick' size, T 64, no warm-up: keeps the harness working, the "
                        "numbers mean nothing")
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="report directory (default bench/results)")
    p.add_argument("--stem", help="report file stem (default <device>-<date>, quick-<device>-<date> with --quick)")
    p.add_argument("--subjects", "--mixers", dest="subjects", default="all", metavar="NAME[,NAME]",
                   help="comma list of subjects or 'all' (default); an entry NAME:PHASE+PHASE@T+T restricts that "
                        "subject to its own phases and lengths (e.g. NAME:forward+decode@1024+16384); registered: "
                        f"{', '.join(sorted(subjects()))}")
    p.add_argument("--import", dest="imports", default="", metavar="MODULE[,MODULE]",
                   help="import these modules first (they register mixers, families or references)")
    p.add_argument("--list", action="store_true", help="list the subjects (and their references) and exit")
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
    p.add_argument("--no-floors", action="store_true",
                   help="do not time the GEMM floor of each case (its linear layers alone) nor measure the memory "
                        "bandwidth (the weight-streaming floor of decode cases)")
    p.add_argument("--gemm-n", type=int, default=None, help="size of the roofline matmul (default 2048; 256 quick)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--system-malloc", action="store_true",
                   help="leave glibc's malloc at its defaults (by default the run keeps freed memory for reuse, "
                        "for every implementation alike: see zoo.bench.machine.keep_freed_memory)")
    p.add_argument("--fresh", action="store_true",
                   help="measure every case again even if <out>/<stem>.json holds results of an earlier run (with "
                        "the default stem, into a new <stem>-N; an explicit --stem is replaced)")
    p.add_argument("--render", type=Path, metavar="JSON",
                   help="measure nothing: re-render the Markdown and PNG reports of an existing JSON report")
    return p


def _list_subjects() -> None:
    for name, s in sorted(subjects().items()):
        refs = ", ".join(filter(None, [s.reference, *s.case.gpu_kernels])) or "no reference"
        print(f"{name:<24} {s.kind:<6} ({s.owner}) vs {refs}: {s.description}")


def _resume(path: Path, options: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """The earlier report at ``path`` when it can be continued, else ``(None, why not)``."""
    if not path.is_file():
        return None, None
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return None, f"{path} is not a readable JSON report ({e}); pass --fresh or another --stem"
    if old.get("schema") != SCHEMA:
        return None, f"{path} has schema {old.get('schema')!r}, not {SCHEMA!r}; pass --fresh or another --stem"
    differ = {k: (old.get("options", {}).get(k), options[k]) for k in RESUME_KEYS
              if old.get("options", {}).get(k) != options[k]}
    if differ:
        return None, (f"{path} was measured with other options {differ} (stored, now); pass --fresh to replace it "
                      "or another --stem")
    return old, None


def main(argv: list[str] | None = None, prog: str = "zoo bench") -> int:
    args = parser(prog).parse_args(argv)
    if args.render:
        report = json.loads(args.render.read_text())
        paths = write_reports(report, args.render.parent, args.render.stem)
        print(f"zoo bench: rendered {paths['markdown']} and {len(paths['plots'])} plots from {args.render}")
        return 0
    for module in filter(None, (m.strip() for m in args.imports.split(","))):
        importlib.import_module(module)
    if args.list:
        _list_subjects()
        return 0
    try:
        names, plan = _subject_specs(args.subjects, sorted(subjects()))
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
                          progress=not args.no_progress, floors=not args.no_floors)
    else:
        Ts, T, size = [], args.min_T, "full"
        while T <= args.max_T:
            Ts.append(T)
            T *= 2
        Ts = args.Ts or Ts
        opts = RunOptions(args.warmup, args.repeats, not args.no_memory, args.max_case_seconds, not args.no_progress,
                          floors=not args.no_floors)
    specs = [item.strip() for item in args.subjects.split(",") if item.strip()] if args.subjects != "all" else names
    cases = make_cases(names, phases, Ts, dtype=dtype, device=str(device), size=size, batch=args.batch,
                       plan=None if args.quick else plan)
    now = dt.datetime.now(dt.timezone.utc)
    stem = args.stem or f"{'quick-' if args.quick else ''}{device.type}-{now.strftime('%Y-%m-%d')}"
    json_path = args.out / f"{stem}.json"
    if args.fresh and args.stem is None and json_path.exists():  # never replace a report by default
        base, n = stem, 2
        while (args.out / f"{base}-{n}.json").exists():
            n += 1
        stem, json_path = f"{base}-{n}", args.out / f"{base}-{n}.json"
        print(f"zoo bench: {args.out / base}.json exists; --fresh writes {json_path} "
              f"(pass --stem {base} to replace it)", file=sys.stderr)
    options = {"mode": "quick" if args.quick else "full", "device": device.type, "warmup": opts.warmup,
               "repeats": opts.repeats, "decode_repeats": opts.repeats_for("decode"), "batch": args.batch,
               "dtype": dtype, "Ts": Ts, "subjects": specs, "phases": phases, "memory": opts.memory,
               "max_case_seconds": opts.max_case_seconds, "decode_steps": opts.decode_steps,
               "spread_limit": opts.spread_limit, "floors": opts.floors,
               "malloc": "system" if args.system_malloc else "keep"}

    old, why_not = (None, None) if args.fresh else _resume(json_path, options)
    if why_not:
        print(f"zoo bench: {why_not}", file=sys.stderr)
        return 2
    done = {c["id"]: c for c in old["cases"] if finished(c)} if old else {}
    if old:
        left = sum(c.id not in done for c in cases)
        print(f"zoo bench: resuming {json_path}: {len(cases) - left} of {len(cases)} cases already measured")

    started = time.time()
    pending = [c for c in cases if c.id not in done]
    probe = memory_probe(pending, opts)  # its server imports torch/transformers while we collect machine info
    machine = machine_info(device)
    machine["allocator"] = "system default" if args.system_malloc else keep_freed_memory()
    if probe is not None:
        probe.idle_bytes  # noqa: B018 - wait for the server (and the idle baseline): nothing timed runs beside it
    machine["gemm"] = measure_gemm_flops(device, getattr(torch, dtype), n=args.gemm_n or (256 if args.quick else 2048))
    machine["peak_flops"] = gpu_peak_flops(device)
    if opts.floors:
        machine["memory_bandwidth"] = measure_memory_bandwidth(device, 2**26 if args.quick else None)
        opts.bandwidth = machine["memory_bandwidth"]["best_bytes_per_s"]
    this_run = {"started": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "argv": list(argv) if argv is not None else sys.argv[1:],
                "load_average_start": machine["load_average_start"], "gemm": machine["gemm"]}
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "created": old["created"] if old else this_run["started"],
        "mode": options["mode"],
        "argv": this_run["argv"],
        "options": options,
        "machine": old["machine"] if old else machine,
        "runs": [*(old.get("runs", []) if old else []), this_run],
        "complete": False,
        "wall_s": old.get("wall_s", 0.0) if old else 0.0,
        "cases": [],
        "scaling": [],
    }
    wall_before = report["wall_s"]
    args.out.mkdir(parents=True, exist_ok=True)

    def checkpoint(results: list[dict[str, Any]]) -> None:
        report["cases"] = results
        report["wall_s"] = wall_before + time.time() - started
        write_json(report, json_path)

    results = run_cases(cases, opts, probe, done=done, on_result=checkpoint)
    report["machine"]["load_average_end"] = this_run["load_average_end"] = list(os.getloadavg())
    report.update(cases=results, scaling=scaling(results), complete=True,
                  wall_s=wall_before + time.time() - started)
    paths = write_reports(report, args.out, stem)
    n_err = sum(r["status"] == "error" for r in results)
    n_flag = sum(bool(r.get("flags")) for r in results)
    print(f"zoo bench: {len(results)} cases ({n_err} with errors, {n_flag} flagged) in {report['wall_s']:.0f} s -> "
          f"{paths['json']}, {paths['markdown']}, {len(paths['plots'])} plots")
    return 1 if n_err else 0
