"""Experiments built on the zoo (each module: logic; ``scripts/``: thin command-line wrappers)."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_out_args", "check_out"]


def add_out_args(parser: argparse.ArgumentParser, default: str) -> None:
    """``--out DIR`` (default ``default``) and ``--overwrite`` for a script that writes a report into a directory."""
    parser.add_argument("--out", default=default, help=f"results directory (default {default})")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the report already in --out (without it a run stops before measuring: the "
                             "committed reports carry hand-written notes)")


def check_out(parser: argparse.ArgumentParser, args: argparse.Namespace, report: str = "results.md") -> None:
    """Stop with a usage error, before any measuring, when ``args.out`` already holds ``report`` and
    ``--overwrite`` was not given."""
    path = Path(args.out) / report
    if path.exists() and not args.overwrite:
        parser.error(f"{path} exists (a committed report?): pass --overwrite to replace it, or another --out")
