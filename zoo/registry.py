"""Registries of mixers and model families (timm-style ``register_*`` / ``get_*`` / ``list_*``)."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_MIXERS: dict[str, type] = {}
_FAMILIES: dict[str, Any] = {}


def register_mixer(name: str) -> Callable[[T], T]:
    """Class decorator: make a :class:`~zoo.layers.base.Mixer` subclass available under ``name``."""

    def wrap(cls: T) -> T:
        if name in _MIXERS:
            raise ValueError(f"mixer {name!r} is already registered (by {_MIXERS[name].__module__})")
        cls.mixer_name = name  # type: ignore[attr-defined]
        _MIXERS[name] = cls  # type: ignore[assignment]
        return cls

    return wrap


def get_mixer(name: str) -> type:
    _ensure_loaded()
    try:
        return _MIXERS[name]
    except KeyError:
        raise ValueError(f"unknown mixer {name!r}; registered mixers: {sorted(_MIXERS)}") from None


def list_mixers(pattern: str = "*") -> list[str]:
    _ensure_loaded()
    return sorted(n for n in _MIXERS if fnmatch.fnmatch(n, pattern))


def register_family(name: str, family: Any) -> Any:
    """Register a family module/object: it provides presets, ``detect``, ``config_from_reference`` and converters."""
    if name in _FAMILIES:
        raise ValueError(f"family {name!r} is already registered")
    _FAMILIES[name] = family
    return family


def get_family(name: str) -> Any:
    _ensure_loaded()
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown family {name!r}; registered families: {sorted(_FAMILIES)}") from None


def list_families() -> list[str]:
    _ensure_loaded()
    return sorted(_FAMILIES)


def families() -> dict[str, Any]:
    _ensure_loaded()
    return dict(_FAMILIES)


def _ensure_loaded() -> None:
    # Importing the sub-packages runs the @register_* decorators.
    import zoo.layers  # noqa: F401
    import zoo.models  # noqa: F401
