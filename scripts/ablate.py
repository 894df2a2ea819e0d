"""Layer-swap ablation: base model x swap variants x evaluations -> results.jsonl (resumable), results.md,
results.csv and PNG plots. The same as `zoo ablate`; see `python scripts/ablate.py -h`.

    python scripts/ablate.py zoo/assets/demo.yaml --out ablations/demo
    python scripts/ablate.py --base default --variant full= --variant swa="all: sliding_window(window=64)" \
        --eval loss --eval passkey --out ablations/swa
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from zoo.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["ablate", *sys.argv[1:]]))
