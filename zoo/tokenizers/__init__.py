"""Tokenizers shipped with the zoo (no downloads): bytes (demo, tests) and, per family, their own (e.g. DNA k-mers)."""

from zoo.tokenizers.bytes import ByteTokenizer
from zoo.tokenizers.dna import DNAKmerTokenizer

__all__ = ["ByteTokenizer", "DNAKmerTokenizer"]
