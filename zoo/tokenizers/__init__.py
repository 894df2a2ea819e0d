"""Tokenizers shipped with the zoo (no downloads): bytes (demo, tests) and, per family, their own (e.g. DNA k-mers)."""

from zoo.tokenizers.bytes import ByteTokenizer

__all__ = ["ByteTokenizer"]
