"""Sequence mixers (one module each) and the shared parts they are built from."""

import zoo.layers.mamba2  # noqa: F401  (registers "mamba2")
from zoo.layers import attention  # noqa: F401  (registers "attention")
from zoo.layers.base import Mixer, State

__all__ = ["Mixer", "State"]
