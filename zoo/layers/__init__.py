"""Sequence mixers (one module each) and the shared parts they are built from."""

from zoo.layers import attention, infllmv2, lact, mamba2, s4, sparse_attention  # noqa: F401  (register the mixers)
from zoo.layers.base import Mixer, State

__all__ = ["Mixer", "State"]
