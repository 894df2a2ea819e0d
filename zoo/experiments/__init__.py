"""Experiments built on the zoo (each module: logic; ``scripts/``: thin command-line wrappers)."""
