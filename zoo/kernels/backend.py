"""The one reader of ``ZOO_BACKEND``: which implementation the kernel dispatchers (``zoo/kernels/<op>/``) use.

* ``auto`` (default, also when unset): the Triton kernel on CUDA tensors, the torch reference otherwise;
* ``torch``: always the torch reference;
* ``triton``: always the Triton kernel (on the CPU only under ``TRITON_INTERPRET=1``).

The variable is read at each call, so tests can switch it with ``monkeypatch.setenv``.
"""

from __future__ import annotations

import os

from torch import Tensor

BACKENDS = ("auto", "torch", "triton")


def backend() -> str:
    """The validated value of ``ZOO_BACKEND`` (``auto`` when unset or empty)."""
    value = os.environ.get("ZOO_BACKEND", "").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"ZOO_BACKEND={os.environ['ZOO_BACKEND']!r} is not one of {list(BACKENDS)}")
    return value


def use_triton(*tensors: Tensor) -> bool:
    """True when a dispatcher should run its Triton kernel on these tensors."""
    choice = backend()
    if choice == "auto":
        return all(t.is_cuda for t in tensors if t is not None)
    return choice == "triton"
