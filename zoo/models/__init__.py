"""The model class and the families (presets + checkpoint converters), registered by name."""

from __future__ import annotations

from zoo.config import ZooConfig
from zoo.models import llama, mamba2, minicpm4, mistral, tiny
from zoo.models.family import Family, Preset
from zoo.models.lm import ZooForCausalLM, create_model, swap_layers
from zoo.registry import families, register_family

for _family in (llama.FAMILY, mamba2.FAMILY, mistral.FAMILY, minicpm4.FAMILY):
    register_family(_family.name, _family)


def presets() -> dict[str, tuple[Family | None, Preset]]:
    out: dict[str, tuple[Family | None, Preset]] = {name: (None, p) for name, p in tiny.PRESETS.items()}
    out.update({name: (fam, p) for fam in families().values() for name, p in fam.presets.items()})
    return out


def list_presets() -> list[str]:
    return sorted(presets())


def get_preset(name: str) -> ZooConfig:
    try:
        family, preset = presets()[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; available: {list_presets()}") from None
    return ZooConfig.from_dict({**preset.config, "name": name})


def detect_family(reference_config: dict) -> Family:
    matches = [f for f in families().values() if f.detect(reference_config)]
    if not matches:
        hint = reference_config.get("model_type") or sorted(reference_config)[:8]
        raise ValueError(
            f"config.json is in no known format (model_type/keys: {hint!r}); "
            f"known: zoo checkpoints (with 'zoo_version') and the families {sorted(families())}"
        )
    return matches[0]


__all__ = ["ZooForCausalLM", "create_model", "swap_layers", "list_presets", "get_preset", "detect_family"]
