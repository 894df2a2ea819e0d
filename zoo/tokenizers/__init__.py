"""Tokenizers shipped with the zoo (no downloads): bytes (demo, tests) and, per family, their own (e.g. DNA k-mers)."""

from __future__ import annotations

import os
from pathlib import Path

from zoo.tokenizers.bytes import ByteTokenizer
from zoo.tokenizers.dna import DNAKmerTokenizer


def load_tokenizer(model_name: str | os.PathLike | None):
    """The tokenizer that goes with a checkpoint: GENERator's DNA k-mers, the checkpoint's own tokenizer files
    (transformers' ``AutoTokenizer``, optional), else UTF-8 bytes (the zoo's own models)."""
    path = Path(model_name) if model_name is not None else None
    if path is not None and path.is_dir():
        tok_cfg = path / "tokenizer_config.json"
        if tok_cfg.is_file() and '"DNAKmerTokenizer"' in tok_cfg.read_text():
            return DNAKmerTokenizer.from_pretrained(path)  # GENERator's 6-mer tokenizer, without its remote code
        if any(path.glob("tokenizer*")):
            from transformers import AutoTokenizer  # optional: only for checkpoints that ship a tokenizer

            return AutoTokenizer.from_pretrained(path)
    return ByteTokenizer()


__all__ = ["ByteTokenizer", "DNAKmerTokenizer", "load_tokenizer"]
