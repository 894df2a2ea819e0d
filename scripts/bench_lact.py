"""LaCT benchmarks: FLOP utilisation of the TTT update vs chunk size, layer forward time vs T, decode time per
token vs context (one LaCT-760M layer by default). Writes Markdown + CSV + PNG.

    python scripts/bench_lact.py --out bench/results/lact --overwrite   # regenerate the committed report
    python scripts/bench_lact.py --quick --out /tmp/lact   # small sizes, a minute

A run stops before measuring when --out already holds a results.md (the committed reports carry hand-written
notes); --overwrite replaces it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from zoo.experiments import add_out_args, check_out  # noqa: E402
from zoo.experiments.lact_bench import Setup, run  # noqa: E402


def main() -> None:
    d = Setup()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_out_args(p, "bench/results/lact")
    p.add_argument("--parts", nargs="+", default=["utilisation", "forward", "decode"],
                   choices=["utilisation", "forward", "decode"])
    p.add_argument("--chunk-sizes", type=int, nargs="+", default=d.chunk_sizes)
    p.add_argument("--forward-lengths", type=int, nargs="+", default=d.forward_lengths)
    p.add_argument("--decode-contexts", type=int, nargs="+", default=d.decode_contexts)
    p.add_argument("--decode-tokens", type=int, default=d.decode_tokens)
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="d_model 256, short lengths (checks the script runs)")
    a = p.parse_args()
    check_out(p, a)
    s = Setup(chunk_sizes=a.chunk_sizes, forward_lengths=a.forward_lengths, decode_contexts=a.decode_contexts,
              decode_tokens=a.decode_tokens, repeats=a.repeats, threads=a.threads)
    if a.quick:
        s = Setup(d_model=256, num_attn_heads=4, num_lact_heads=2, w0_w2_low_rank=8, window_size=256, chunk_size=256,
                  chunk_sizes=[128, 256], forward_lengths=[256, 1024], decode_contexts=[256, 1024], decode_tokens=8,
                  prefill_piece=512, repeats=2, gemm_n=512, threads=a.threads)
    out = run(s, a.out, tuple(a.parts))
    print(f"wrote {out}/results.md")


if __name__ == "__main__":
    main()
