"""The one reader of ``ZOO_BACKEND``: which implementation the kernel dispatchers (``zoo/kernels/<op>/``) use.

* ``auto`` (default, also when unset or empty): the Triton kernel on CUDA tensors, the torch reference otherwise
  (also the reference when triton is not installed);
* ``torch``: always the torch reference;
* ``triton``: always the Triton kernel (on the CPU only under ``TRITON_INTERPRET=1``); an error when triton is
  not installed.

Any other value is a ``ValueError`` naming the allowed ones. The variable is read at each call, so tests can
switch it with ``monkeypatch.setenv``. A dispatcher may still run its reference for a call its kernel does not
cover (each ``<op>/__init__.py`` documents which).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from torch import Tensor

BACKENDS = ("auto", "torch", "triton")


def backend() -> str:
    """The validated value of ``ZOO_BACKEND`` (``auto`` when unset or empty)."""
    value = os.environ.get("ZOO_BACKEND", "").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"ZOO_BACKEND={os.environ['ZOO_BACKEND']!r} is not one of {list(BACKENDS)}")
    return value


def use_triton(*tensors: Tensor | None) -> bool:
    """True when a dispatcher should run its Triton kernel on these tensors (``None`` entries are ignored)."""
    choice = backend()
    if choice == "auto":
        return all(t.is_cuda for t in tensors if t is not None)
    return choice == "triton"


_IMPORTED: dict[str, ModuleType | ModuleNotFoundError] = {}


def triton_module(name: str) -> ModuleType | None:
    """Import a dispatcher's Triton module (e.g. ``"zoo.kernels.ssd.triton"``) once it chose Triton.

    Returns ``None`` when the ``triton`` package is not installed and the backend is ``auto`` (the dispatcher then
    runs its reference); raises ``RuntimeError`` when ``ZOO_BACKEND=triton`` asked for the kernel. Any other import
    error propagates (a broken kernel module is not hidden behind the reference).
    """
    hit = _IMPORTED.get(name)
    if hit is None:
        try:
            hit = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] != "triton":
                raise
            hit = e
        _IMPORTED[name] = hit
    if isinstance(hit, ModuleType):
        return hit
    if backend() == "triton":
        raise RuntimeError(f"ZOO_BACKEND=triton but {name} cannot be imported: {hit}") from hit
    return None
