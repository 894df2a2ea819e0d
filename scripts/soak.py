"""Decode soak: ``generate`` 100k tokens on the CPU with a small model of every bounded-state mixer (from the
registry), recording state bytes, process memory and finiteness; writes soak.md / soak.csv / soak.png.

    python scripts/soak.py --tokens 100000 --out reports/soak
    python scripts/soak.py --mixers s4 --keep      # soak one (new) mixer, keep the others' recorded runs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from zoo.experiments.soak import bounded_mixers, held, run  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=100_000)
    p.add_argument("--mixers", nargs="+", default=None, help=f"default: every bounded-state mixer {bounded_mixers()}")
    p.add_argument("--sample-every", type=int, default=1000)
    p.add_argument("--out", default="reports/soak")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the other mixers' runs recorded in OUT/soak.csv")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    results = run(a.tokens, a.out, mixers=a.mixers, sample_every=a.sample_every, seed=a.seed, keep=a.keep)
    for r in results:
        print(f"{r.spec}: {'held' if held(r) else 'DID NOT HOLD'} (state {r.samples[-1]['state_bytes']:,} B, "
              f"RSS {r.rss_growth() / 1e6:+.2f} MB, finite {r.finite})")
    print(f"wrote {a.out}/soak.md, soak.csv, soak.png")
    return 0 if all(held(r) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
