"""Tokenizers shipped with the zoo (no downloads): bytes (demo, tests) and, per family, their own (e.g. DNA k-mers)."""

from __future__ import annotations

import os
from pathlib import Path

from zoo.tokenizers.bytes import ByteTokenizer
from zoo.tokenizers.dna import DNAKmerTokenizer


def load_tokenizer(path: str | os.PathLike | None):
    """The tokenizer shipped with a checkpoint directory: GENERator's DNA k-mers, else any other tokenizer files
    through transformers' ``AutoTokenizer`` (optional); :class:`ByteTokenizer` (the zoo's own models) when the
    directory has none or ``path`` is not a directory."""
    from zoo.checkpoint import tokenizer_files

    path = Path(path) if path is not None else None
    files = tokenizer_files(path) if path is not None else []
    tok_cfg = path / "tokenizer_config.json" if path is not None else None
    if tok_cfg is not None and tok_cfg.is_file() and '"DNAKmerTokenizer"' in tok_cfg.read_text():
        return DNAKmerTokenizer.from_pretrained(path)  # GENERator's 6-mer tokenizer, without its remote code
    if files:
        try:
            from transformers import AutoTokenizer  # optional: only for checkpoints that ship a tokenizer
        except ImportError:
            raise ValueError(f"{path} ships a tokenizer ({', '.join(f.name for f in files)}), which needs "
                             "transformers: pip install 'long-context-zoo[hf]'") from None
        return AutoTokenizer.from_pretrained(path)
    return ByteTokenizer()


__all__ = ["ByteTokenizer", "DNAKmerTokenizer", "load_tokenizer"]
