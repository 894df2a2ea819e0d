"""S4 / S4D benchmarks: FFT convolution vs recurrent scan vs the materialised-Cauchy path, kernel-generation memory,
decode cost against context length (Markdown + CSV + PNG).

    python scripts/bench_s4.py --out bench/results/s4 --overwrite   # regenerate the committed report
    python scripts/bench_s4.py --mode diag --out bench/results/s4d --overwrite

A run stops before measuring when --out already holds a results.md (the committed reports carry hand-written
notes); --overwrite replaces it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from zoo.experiments import add_out_args, check_out  # noqa: E402
from zoo.experiments.s4_bench import Setup, run  # noqa: E402


def main() -> None:
    d = Setup()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_out_args(p, "bench/results/s4")
    p.add_argument("--mode", choices=["dplr", "diag"], default=d.mode, help="S4 (dplr) or S4D-Lin (diag)")
    p.add_argument("--lengths", type=int, nargs="+", default=d.lengths)
    p.add_argument("--widths", type=int, nargs="+", default=d.widths)
    p.add_argument("--d-state", type=int, default=d.d_state)
    p.add_argument("--scan-steps", type=int, default=d.scan_steps, help="recurrent tokens timed (scaled to L)")
    p.add_argument("--decode-width", type=int, default=d.decode_width)
    p.add_argument("--decode-contexts", type=int, nargs="+", default=d.decode_contexts)
    p.add_argument("--decode-steps", type=int, default=d.decode_steps, help="tokens per timed round")
    p.add_argument("--decode-rounds", type=int, default=d.decode_rounds)
    p.add_argument("--naive-cap-gb", type=float, default=d.naive_cap_gb,
                   help="skip the materialised path when its Cauchy matrix alone exceeds this")
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--threads", type=int, default=d.threads, help="torch intra-op threads per case")
    a = p.parse_args()
    check_out(p, a)
    s = Setup(lengths=a.lengths, widths=a.widths, d_state=a.d_state, mode=a.mode, scan_steps=a.scan_steps,
              repeats=a.repeats, kernel_cases=[(max(a.widths), 8192)], decode_width=a.decode_width,
              decode_contexts=a.decode_contexts, decode_steps=a.decode_steps, decode_rounds=a.decode_rounds,
              naive_cap_gb=a.naive_cap_gb,
              threads=a.threads)
    out = run(s, a.out)
    print(f"wrote {out}/results.md, results.csv, s4_bench.png")


if __name__ == "__main__":
    main()
