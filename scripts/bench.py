"""Benchmark every zoo mixer against its reference and the machine's limits: ``python scripts/bench.py --help``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from zoo.bench.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
