"""Registries of mixers, model families and presets (timm-style ``register_*`` / ``get_*`` / ``list_*``).

A leaf module: it imports nothing of the zoo. Importing ``zoo`` fills it (the mixer modules register themselves
with :func:`register_mixer`, the families with :func:`register_family`); a mixer or family written outside the
package registers the same way and then appears everywhere (config validation, ``zoo list``, the contract
suite, ``zoo bench``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_MIXERS: dict[str, type] = {}
_FAMILIES: dict[str, Any] = {}
_PRESETS: dict[str, tuple[Any, Any]] = {}  # name -> (family or None, Preset)
_FORMATS: dict[str, Any] = {}  # export format name -> Family-like object (config/key maps of a reference format)


# ---------------------------------------------------------------------------------------------- mixers
def register_mixer(name: str) -> Callable[[T], T]:
    """Class decorator: make a :class:`~zoo.layers.base.Mixer` subclass available under ``name``."""

    def wrap(cls: T) -> T:
        if name in _MIXERS:
            raise ValueError(f"mixer {name!r} is already registered (by {_MIXERS[name].__module__})")
        cls.mixer_name = name  # type: ignore[attr-defined]
        _MIXERS[name] = cls  # type: ignore[assignment]
        return cls

    return wrap


def unregister_mixer(name: str) -> None:
    """Remove a mixer (e.g. one registered by a test or a notebook)."""
    if _MIXERS.pop(name, None) is None:
        raise ValueError(f"unknown mixer {name!r}; registered mixers: {sorted(_MIXERS)}")


def get_mixer(name: str) -> type:
    try:
        return _MIXERS[name]
    except KeyError:
        raise ValueError(f"unknown mixer {name!r}; registered mixers: {sorted(_MIXERS)}") from None


def list_mixers(pattern: str = "*") -> list[str]:
    return sorted(n for n in _MIXERS if fnmatch.fnmatch(n, pattern))


# ---------------------------------------------------------------------------------------------- families
def register_family(name: str, family: Any) -> Any:
    """Register a family (presets, ``detect``, config maps, key table); its presets become known by name."""
    if name in _FAMILIES:
        raise ValueError(f"family {name!r} is already registered")
    formats = {name: family, **getattr(family, "export_formats", {})}
    taken = sorted(set(formats) & set(_FORMATS))
    if taken:
        raise ValueError(f"export format(s) {taken} of family {name!r} are already registered")
    for preset_name, preset in getattr(family, "presets", {}).items():
        register_preset(preset_name, preset, family)
    _FAMILIES[name] = family
    _FORMATS.update(formats)
    return family


def get_family(name: str) -> Any:
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown family {name!r}; registered families: {sorted(_FAMILIES)}") from None


def list_families() -> list[str]:
    return sorted(_FAMILIES)


def families() -> dict[str, Any]:
    return dict(_FAMILIES)


# ---------------------------------------------------------------------------------------------- export formats
def get_format(name: str) -> Any:
    """A reference format ``zoo convert --to`` writes: every family's own (``llama``, ``mamba2`` = mamba_ssm, ...)
    and the extra ones a family declares in ``export_formats`` (e.g. ``mamba2-transformers``)."""
    try:
        return _FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown export format {name!r}; available: {['zoo', *list_formats()]}") from None


def list_formats() -> list[str]:
    return sorted(_FORMATS)


# ---------------------------------------------------------------------------------------------- presets
def register_preset(name: str, preset: Any, family: Any = None) -> Any:
    """A named config (``zoo.models.family.Preset``), optionally of a family (whose checkpoint it describes)."""
    if name in _PRESETS:
        raise ValueError(f"preset {name!r} is already registered")
    _PRESETS[name] = (family, preset)
    return preset


def get_preset_entry(name: str) -> tuple[Any, Any]:
    """``(family or None, Preset)`` of a registered preset."""
    try:
        return _PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; available: {list_presets()}") from None


def list_presets(pattern: str = "*") -> list[str]:
    return sorted(n for n in _PRESETS if fnmatch.fnmatch(n, pattern))


def is_preset(name: str) -> bool:
    return name in _PRESETS
