"""zoo: interchangeable long-context sequence mixers composed into loadable, swappable language models."""

from zoo.assets import default_model
from zoo.config import LayerSpec, ZooConfig
from zoo.hub import from_pretrained, push_to_hub, save_pretrained
from zoo.layers.base import Mixer, State
from zoo.models import create_model, get_preset, list_presets, swap_layers
from zoo.models.hybrid import longgen, masformer
from zoo.models.lm import ZooForCausalLM
from zoo.registry import get_mixer, list_families, list_mixers, register_family, register_mixer
from zoo.version import __version__

__all__ = [
    "__version__", "ZooConfig", "LayerSpec", "Mixer", "State", "ZooForCausalLM",
    "create_model", "from_pretrained", "save_pretrained", "push_to_hub", "swap_layers",
    "masformer", "longgen", "default_model",
    "list_mixers", "list_families", "list_presets", "get_preset", "get_mixer", "register_mixer", "register_family",
]
