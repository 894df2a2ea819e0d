"""DNA benchmarks: the vectorised 6-mer tokenizer vs a per-k-mer Python implementation (same run, ids checked
equal), and generation tokens/s of a small random GENERator-shaped model. Writes Markdown + CSV + PNG.

    python scripts/bench_dna.py --out bench/results/dna --overwrite   # regenerate the committed report

A run stops before measuring when --out already holds a results.md (the committed reports carry hand-written
notes); --overwrite replaces it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from zoo.experiments import add_out_args, check_out  # noqa: E402
from zoo.experiments.dna_bench import Setup, run  # noqa: E402


def main() -> None:
    d = Setup()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_out_args(p, "bench/results/dna")
    p.add_argument("--lengths", type=int, nargs="+", default=d.lengths, help="sequence lengths (bp)")
    p.add_argument("--naive-repeats", type=int, default=d.naive_repeats)
    p.add_argument("--fast-repeats", type=int, default=d.fast_repeats)
    p.add_argument("--gen-d-model", type=int, default=d.gen_d_model)
    p.add_argument("--gen-layers", type=int, default=d.gen_layers)
    p.add_argument("--gen-batches", type=int, nargs="+", default=d.gen_batches)
    p.add_argument("--gen-new-tokens", type=int, default=d.gen_new_tokens)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: small models on a shared box stall on thread barriers)")
    a = p.parse_args()
    check_out(p, a)
    if a.threads:
        torch.set_num_threads(a.threads)
    s = Setup(lengths=a.lengths, naive_repeats=a.naive_repeats, fast_repeats=a.fast_repeats,
              gen_d_model=a.gen_d_model, gen_layers=a.gen_layers, gen_batches=a.gen_batches,
              gen_new_tokens=a.gen_new_tokens)
    out = run(s, a.out)
    print((out / "results.md").read_text())


if __name__ == "__main__":
    main()
