"""Tokenizers shipped with the zoo (no downloads): bytes (demo, tests) and, per family, their own (e.g. DNA k-mers)."""

from __future__ import annotations

import os
from pathlib import Path

from zoo.tokenizers.bytes import ByteTokenizer
from zoo.tokenizers.dna import DNAKmerTokenizer


def load_tokenizer(model_name: str | os.PathLike | None):
    """The tokenizer that goes with a checkpoint directory: GENERator's DNA k-mers, the checkpoint's own tokenizer
    files (transformers' ``AutoTokenizer``, optional), else UTF-8 bytes (the zoo's own models)."""
    from zoo.checkpoint import tokenizer_files

    path = Path(model_name) if model_name is not None else None
    if path is None or not path.is_dir():
        return ByteTokenizer()
    tok_cfg = path / "tokenizer_config.json"
    if tok_cfg.is_file() and '"DNAKmerTokenizer"' in tok_cfg.read_text():
        return DNAKmerTokenizer.from_pretrained(path)  # GENERator's 6-mer tokenizer, without its remote code
    files = tokenizer_files(path)
    if files:
        try:
            from transformers import AutoTokenizer  # optional: only for checkpoints that ship a tokenizer
        except ImportError:
            raise ValueError(f"{path} ships a tokenizer ({', '.join(f.name for f in files)}), which needs "
                             "transformers: pip install 'long-context-zoo[hf]'") from None
        return AutoTokenizer.from_pretrained(path)
    return ByteTokenizer()


__all__ = ["ByteTokenizer", "DNAKmerTokenizer", "load_tokenizer"]
