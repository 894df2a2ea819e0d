"""State collapse of a tiny Mamba-2 (Stuffed Mamba), as a `zoo ablate` run: train on a synthetic passkey task at a
short length (CPU, minutes) until retrieval is learned, then compare the training-free mitigations far beyond the
training length by passkey accuracy and by loss per position.

    python scripts/state_collapse.py --out reports/state_collapse
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from zoo.experiments.state_collapse import Setup, run  # noqa: E402


def main() -> None:
    d = Setup()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="reports/state_collapse", help="results directory (reruns resume)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--train-len", type=int, default=d.train_len)
    p.add_argument("--curriculum", type=int, nargs="+", default=d.curriculum)
    p.add_argument("--d-state", type=int, default=d.d_state)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--eval-lengths", type=int, nargs="+", default=d.eval_lengths)
    p.add_argument("--eval-samples", type=int, default=d.eval_samples)
    p.add_argument("--loss-length", type=int, default=d.loss_length)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    s = Setup(steps=a.steps, batch_size=a.batch_size, train_len=a.train_len, curriculum=a.curriculum,
              d_state=a.d_state, lr=a.lr, eval_lengths=a.eval_lengths, eval_samples=a.eval_samples,
              loss_length=a.loss_length, seed=a.seed)
    out = run(s, a.out)
    print(f"wrote {out}/results.md, results.csv, loss_vs_position.png, accuracy_vs_length.png, training.md")


if __name__ == "__main__":
    main()
