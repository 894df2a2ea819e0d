"""Dense vs InfLLM-v2 sparse prefill of one layer on the CPU (fp32): T in {8k, 32k, 64k}, iid and correlated inputs.

    python scripts/bench_infllmv2.py --out bench/results/infllmv2 --overwrite   # regenerate the committed report
    python scripts/bench_infllmv2.py --lengths 4096 8192 --inputs iid --out /tmp/infllmv2   # a shorter run
    python scripts/bench_infllmv2.py --gpu --lengths 32768 65536 131072   # CUDA: Triton kernels vs SDPA flash

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
from zoo.experiments.infllmv2_bench import Setup, gpu_kernel_bench, run  # noqa: E402


def main() -> None:
    d = Setup()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_out_args(p, "bench/results/infllmv2")
    p.add_argument("--lengths", type=int, nargs="+", default=d.lengths)
    p.add_argument("--inputs", nargs="+", default=d.inputs, choices=["iid", "correlated"])
    p.add_argument("--topk", type=int, default=d.sparse["topk"], help="blocks per query (window_size 0)")
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--gpu", action="store_true", help="time the Triton kernels against SDPA flash on CUDA instead")
    p.add_argument("--backward", action="store_true", help="with --gpu: forward + backward")
    a = p.parse_args()
    if a.gpu:
        for T in a.lengths:
            print(gpu_kernel_bench(T, backward=a.backward))
        return
    check_out(p, a)
    if a.threads:
        torch.set_num_threads(a.threads)
    s = Setup(lengths=a.lengths, inputs=a.inputs, repeats=a.repeats, sparse={**d.sparse, "topk": a.topk})
    run(s, a.out)
    print(f"wrote {a.out}/results.md, results.csv, speedup.png")


if __name__ == "__main__":
    main()
