"""The README's main job (``zoo demo``): a layer-swap ablation of the embedded default model, offline, on a CPU.

The base is the default model shipped with the package (:mod:`zoo.assets`); the variants, the fine-tuning budget
and the evaluations are data, the packaged ablation spec ``zoo/assets/demo.yaml`` (swap-spec strings), run by
:func:`zoo.ablation.run_ablation`: results (resumable) in ``results.jsonl``, ``results.md``, ``results.csv`` and
the plots in the output directory. The demo prints the summary table and where the files are. The packaged spec
evaluates held-out loss by position (the variants of the default model) and MQAR retrieval (each variant's
architecture trained from scratch on the task, so the retrieval score measures a learned skill: accuracy at the
training length next to the accuracy past it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import zoo
from zoo.ablation import run_ablation
from zoo.ablation.spec import read_spec_file
from zoo.assets import DEMO_SPEC


def demo_spec(path: str | Path = DEMO_SPEC) -> dict[str, Any]:
    return read_spec_file(path)


def summary_section(markdown: str) -> str:
    """The "## Summary" table of a report."""
    part = markdown.split("## Summary", 1)[-1].split("\n## ", 1)[0]
    return "\n".join(line for line in part.strip().splitlines())


def run_demo(out_dir: str | Path = "zoo-demo", *, spec: dict | None = None, threads: int = 1,
             progress: bool = True, print_fn: Callable[[str], None] = print, base_model: Any = None) -> dict:
    """Run the demo ablation into ``out_dir``. ``threads``: torch intra-op threads (default 1: the model is small;
    with more threads OpenMP barriers stall whenever another process holds a core). ``spec``: another spec
    dict (tests use a tiny one)."""
    t0 = time.perf_counter()
    spec = spec or demo_spec()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        print_fn(f"zoo {zoo.__version__} demo: ablation {spec.get('name')!r} of the base model "
                 f"{spec.get('base', 'default')!r}, {len(spec['variants'])} variants x "
                 f"{len(spec['evaluations'])} evaluations, results in {out_dir}/")
        for v in spec["variants"]:
            print_fn(f"  {v['name']:<16} {v.get('swap') or '(the base as it is)'}")
        run = run_ablation(spec, out_dir, base_model=base_model, progress=progress, print_fn=print_fn)
    finally:
        torch.set_num_threads(previous)
    table = summary_section(run.report["markdown"].read_text())
    print_fn("")
    print_fn(table)
    print_fn("")
    print_fn("report: " + str(run.report["markdown"]))
    for key, path in run.report.items():
        if key.endswith("plot"):
            print_fn(f"plot:   {path}")
    elapsed = time.perf_counter() - t0
    print_fn(f"demo finished in {elapsed:.1f} s ({len(run.ran)} cells run, {len(run.skipped)} already done)")
    return {"run": run, "table": table, "elapsed": elapsed}
