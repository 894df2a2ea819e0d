"""A model family is data: presets, a detector for its reference ``config.json``, config maps both ways,
and a key table (ordered prefix renames with ``{i}`` for the layer index) plus a few named transforms."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from zoo.config import ZooConfig
from zoo.layers.base import BenchCase

StateDict = dict[str, Tensor]


@dataclass
class Preset:
    config: dict[str, Any]  # ZooConfig.from_dict input
    hub_id: str | None = None
    revision: str | None = None
    description: str = ""
    # Layers to swap (``zoo.swap_layers`` spec) after loading ``hub_id``: a hybrid built from a published checkpoint.
    swap: dict[str, str] | None = None


@dataclass
class Family:
    name: str
    detect: Callable[[dict[str, Any]], bool]
    config_from_reference: Callable[[dict[str, Any]], ZooConfig]
    config_to_reference: Callable[[ZooConfig], dict[str, Any]]
    key_table: list[tuple[str, str]]  # (reference prefix, zoo prefix)
    presets: dict[str, Preset] = field(default_factory=dict)
    # transforms applied after renaming (reference -> zoo) and before renaming back (zoo -> reference)
    from_reference: Callable[[StateDict, ZooConfig], StateDict] | None = None
    to_reference: Callable[[StateDict, ZooConfig], StateDict] | None = None
    reference_weights_name: str = "model.safetensors"
    model_card: str = "default"
    # The family whose reference format this one refines (same model_type, e.g. GENERator is a Llama): when both
    # detect a config.json, the refining family wins.
    specializes: str | None = None
    # Model-level benchmark cases (``BenchCase(kind="model")``, args per size = a ZooConfig dict): ``zoo bench``.
    bench_cases: tuple[BenchCase, ...] = ()
    # Further reference formats this family writes (``zoo convert --to NAME``), e.g. Mamba-2's transformers layout
    # next to its own mamba_ssm one: name -> a Family-like object (config_to_reference, key table, weights name).
    export_formats: dict[str, Family] = field(default_factory=dict)
    # Whether the reference loaders of this format read sharded weights (``<stem>-00001-of-0000N`` + index).
    shardable: bool = True
    # BibTeX entries of the papers behind the family's architecture / checkpoints (model cards list them).
    citations: tuple[str, ...] = ()

    def state_dict_from_reference(self, sd: StateDict, config: ZooConfig) -> StateDict:
        out = rename_keys(sd, self.key_table, source="reference")
        return self.from_reference(out, config) if self.from_reference else out

    def state_dict_to_reference(self, sd: StateDict, config: ZooConfig) -> StateDict:
        sd = self.to_reference(dict(sd), config) if self.to_reference else dict(sd)
        return rename_keys(sd, [(b, a) for a, b in self.key_table], source="zoo")


def refuse_layers(fmt: str, config: ZooConfig, bad: list[int], holds: str) -> None:
    """``ValueError`` naming the layers (index, mixer spec, MLP) of ``config`` that the reference format ``fmt``
    cannot hold; ``holds``: what the format holds, e.g. "plain attention + MLP blocks". No-op when ``bad`` is empty."""
    if not bad:
        return
    shown = [f"{i}: {config.layers[i].spec_string}" + ("" if config.layers[i].mlp else " without MLP") for i in bad]
    more = f" and {len(bad) - 12} more" if len(bad) > 12 else ""
    raise ValueError(f"cannot export to the {fmt} format, which holds only {holds}: layer(s) "
                     f"{'; '.join(shown[:12])}{more} do not fit (convert to 'zoo', or swap them first)")


def _prefix_regex(prefix: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(prefix).replace(re.escape("{i}"), r"(?P<i>\d+)"))


def rename_keys(sd: StateDict, table: list[tuple[str, str]], *, source: str) -> StateDict:
    """Rename every key by the first matching ``(from_prefix, to_prefix)`` row; unmatched keys are an error."""
    compiled = [(_prefix_regex(a), b) for a, b in table]
    out: StateDict = {}
    unmatched = []
    for key, value in sd.items():
        for rx, target in compiled:
            m = rx.match(key)
            if m:
                new = target.replace("{i}", m.group("i")) if "i" in rx.groupindex else target
                out[new + key[m.end():]] = value
                break
        else:
            unmatched.append(key)
    if unmatched:
        raise KeyError(f"{len(unmatched)} {source} checkpoint key(s) match no row of the key table: {unmatched[:10]}")
    return out
