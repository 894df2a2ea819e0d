"""Train the embedded default model (zoo/assets/default_model) on the Python standard library's source plus
passkey samples, on the CPU. Reproducible: the recipe, seed and Python version are saved in its config.json.

    python scripts/train_default_model.py --out zoo/assets/default_model
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from zoo.experiments.default_model import DefaultModelSetup, train_default_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="zoo/assets/default_model")
    for f in fields(DefaultModelSetup):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    setup = DefaultModelSetup(**{f.name: getattr(a, f.name) for f in fields(DefaultModelSetup)})
    res = train_default_model(setup, a.out)
    for e in res["evals"]:
        print(json.dumps(e))
    print(f"trained in {res['seconds']:.0f} s; wrote {a.out}")


if __name__ == "__main__":
    main()
