"""Publish a checkpoint to the Hugging Face Hub: convert, validate, render the card, upload.

Same as ``zoo publish`` (``python scripts/publish.py --help``; the steps are in :mod:`zoo.publish`), e.g.::

    python scripts/publish.py path/to/llama me/llama-hybrid --swap "1-11=block_diagonal(block_size=512)" --dry-run
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from zoo.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["publish", *sys.argv[1:]]))
