"""Train any zoo model on one process or many: the same as `zoo train`; see `python scripts/train.py -h` and the
README section "Training on many GPUs".

    python scripts/train.py --config '{"d_model": 256, "n_layers": 8, "mixers": "attention", "vocab_size": 259}' \
        --data stdlib --steps 2000 --out runs/small
    torchrun --standalone --nproc-per-node 8 scripts/train.py --model runs/small/final --data tokens.bin \
        --swap "every 2nd from 1: mamba2" --strategy fsdp --activation-checkpointing --out runs/hybrid
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from zoo.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
