"""The model class and the families (presets + checkpoint converters), registered by name."""

from __future__ import annotations

from zoo.config import ZooConfig
from zoo.models import generator, lact, llama, mamba2, minicpm4, mistral, s4, tiny
from zoo.models.family import Family
from zoo.models.lm import ZooForCausalLM, create_model, swap_layers
from zoo.registry import families, list_presets, register_family, register_preset

for _family in (llama.FAMILY, mamba2.FAMILY, mistral.FAMILY, generator.FAMILY, lact.FAMILY, minicpm4.FAMILY,
                s4.FAMILY):
    register_family(_family.name, _family)
for _name, _preset in tiny.PRESETS.items():
    register_preset(_name, _preset)


def get_preset(name: str) -> ZooConfig:
    """The config of a registered preset (same as ``ZooConfig.from_preset(name)``)."""
    return ZooConfig.from_preset(name)


def detect_family(reference_config: dict) -> Family:
    matches = [f for f in families().values() if f.detect(reference_config)]
    if not matches:
        hint = reference_config.get("model_type") or sorted(reference_config)[:8]
        raise ValueError(
            f"config.json is in no known format (model_type/keys: {hint!r}); "
            f"known: zoo checkpoints (with 'zoo_version') and the families {sorted(families())}"
        )
    refined = {f.specializes for f in matches}
    return [f for f in matches if f.name not in refined][0]


__all__ = ["ZooForCausalLM", "create_model", "swap_layers", "list_presets", "get_preset", "detect_family"]
