"""The registry of benchmark references: what a zoo implementation is timed against.

A reference is a factory ``(zoo_module, args, batch) -> Adapter`` registered by name with
:func:`register_reference`, written next to the code it mirrors (a family registers its transformers layer and
model, a mixer package its kernels). The harness builds the zoo implementation first (``zoo_module``: a mixer,
or a ``ZooForCausalLM`` for model cases); the factory builds the reference with the *same weights*
(:func:`~zoo.bench.adapters.load_same_weights`), so both compute the same function and their outputs are
compared. ``args`` are the case's arguments at the run's size (``d_model`` + the mixer's keyword arguments, or a
``ZooConfig`` dict), ``batch`` the batch size. Heavy imports (transformers, mamba_ssm) stay inside the factory.

* ``scope="layer"``: the same layer or model (all four phases; its FLOPs are the zoo implementation's);
  ``scope="kernel"``: a core op on the case's shapes (forward phases; a :class:`~zoo.bench.adapters.KernelAdapter`
  declaring its own input width and FLOPs).
* ``preload``: modules the CPU memory probe's forkserver imports once, so that a fresh child starts fast.
* ``gpu_only``: timed on CUDA only (kernel references).

``mixer:<name>`` needs no registration: the registered mixer ``<name>`` built with the zoo module's arguments
(those it accepts) and weights, e.g. a masked variant timed against the dense mixer it restricts.

A leaf: imports torch, the standard library and :mod:`zoo.bench.adapters` only.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from zoo.bench.adapters import Adapter, ZooMixerAdapter, load_same_weights

Factory = Callable[[nn.Module, dict[str, Any], int], Adapter]
MIXER_PREFIX = "mixer:"


@dataclass(frozen=True)
class Reference:
    name: str
    factory: Factory
    scope: str = "layer"
    preload: tuple[str, ...] = ()
    gpu_only: bool = False
    description: str = ""

    @property
    def module(self) -> str:
        """The module that defines the factory (imported by the memory probe's fresh processes)."""
        return getattr(self.factory, "__module__", "") or ""

    def build(self, zoo_module: nn.Module, args: dict[str, Any], batch: int) -> Adapter:
        adapter = self.factory(zoo_module, args, batch)
        adapter.scope = self.scope
        return adapter


_REFERENCES: dict[str, Reference] = {}


def register_reference(name: str, *, scope: str = "layer", preload: tuple[str, ...] | list[str] = (),
                       gpu_only: bool = False, description: str = "") -> Callable[[Factory], Factory]:
    """Decorator: register ``factory(zoo_module, args, batch) -> Adapter`` as the reference ``name``."""
    if scope not in ("layer", "kernel"):
        raise ValueError(f"reference {name!r}: scope={scope!r} must be 'layer' or 'kernel'")
    if name.startswith(MIXER_PREFIX):
        raise ValueError(f"reference names starting with {MIXER_PREFIX!r} are reserved (any registered mixer)")

    def wrap(factory: Factory) -> Factory:
        old = _REFERENCES.get(name)
        if old is not None and (old.module, old.factory.__qualname__) != (factory.__module__, factory.__qualname__):
            raise ValueError(f"reference {name!r} is already registered (by {old.module})")
        _REFERENCES[name] = Reference(name, factory, scope, tuple(preload), gpu_only,
                                      description or (inspect.getdoc(factory) or "").split("\n")[0])
        return factory

    return wrap


def unregister_reference(name: str) -> None:
    if _REFERENCES.pop(name, None) is None:
        raise ValueError(f"unknown reference {name!r}; registered: {list_references()}")


def list_references() -> list[str]:
    return sorted(_REFERENCES)


def get_reference(name: str) -> Reference:
    if name.startswith(MIXER_PREFIX):
        mixer = name[len(MIXER_PREFIX):]
        return Reference(name, _mixer_factory(mixer), "layer", (), False,
                         f"the registered mixer {mixer!r}, same arguments and weights")
    try:
        return _REFERENCES[name]
    except KeyError:
        raise ValueError(f"unknown bench reference {name!r}; registered: {list_references()} "
                         f"or '{MIXER_PREFIX}<registered mixer>'") from None


def required_mixers(name: str) -> tuple[str, ...]:
    """Mixers a reference needs registered (``mixer:<name>`` needs ``<name>``)."""
    return (name[len(MIXER_PREFIX):],) if name.startswith(MIXER_PREFIX) else ()


def preload_modules(names: list[str] | tuple[str, ...] | None = None, *, include_gpu_only: bool = False) -> list[str]:
    """The ``preload`` modules of the references ``names`` (default: every registered one), in order, once."""
    refs = [_REFERENCES[n] for n in (names if names is not None else list_references()) if n in _REFERENCES]
    out: list[str] = []
    for ref in refs:
        if ref.gpu_only and not include_gpu_only:
            continue
        out += [m for m in ref.preload if m not in out]
    return out


def _mixer_factory(mixer: str) -> Factory:
    def build(zoo_module: nn.Module, args: dict[str, Any], batch: int) -> Adapter:
        from zoo.config import mixer_parameters  # lazy: the registry is filled by importing zoo
        from zoo.registry import get_mixer

        cls = get_mixer(mixer)
        accepted = mixer_parameters(cls)
        kwargs = {k: v for k, v in args.items() if k in accepted}
        d = args["d_model"]
        ref = cls(d, 0, **kwargs)
        load_same_weights(ref, zoo_module.state_dict(), what=f"{MIXER_PREFIX}{mixer}")
        return ZooMixerAdapter(ref, batch, lambda T, context, B: cls.flops(d, kwargs, T=T, context=context, batch=B))

    return build
