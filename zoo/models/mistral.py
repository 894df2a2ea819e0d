"""The Mistral family: transformers ``MistralForCausalLM`` checkpoints (``model_type: "mistral"``).

Weights are named exactly like Llama's (same key table); the difference is ``sliding_window``: when set, every
layer is ``sliding_window(window=sliding_window)`` (transformers' mask ``i - W < j <= i``), else ``attention``.
"""

from __future__ import annotations

from typing import Any

from zoo.config import ZooConfig
from zoo.models import llama
from zoo.models.family import Family, RefConfig


def detect(cfg: dict[str, Any]) -> bool:
    return cfg.get("model_type") == "mistral"


def config_from_reference(cfg: dict[str, Any]) -> ZooConfig:
    window = RefConfig(cfg, "mistral").int("sliding_window", None)
    mixers = {"mixer": "sliding_window", "mixer_args": {"window": window}} if window else "attention"
    return llama.reference_config(cfg, "mistral", mixers, llama.FIELDS | {"sliding_window"})


def config_to_reference(config: ZooConfig) -> dict[str, Any]:
    kinds = {(ls.mixer, tuple(sorted(ls.mixer_args.items()))) for ls in config.layers}
    window = None
    if len(kinds) == 1 and next(iter(kinds))[0] == "sliding_window":
        args = dict(next(iter(kinds))[1])
        if args.get("num_sink_tokens", 0):
            raise ValueError("cannot export to the mistral format: it has no sink tokens")
        window = args["window"]
        plain = config.with_mixers("attention")
    else:
        plain = config
    ref = llama.config_to_reference(plain)  # raises for anything but plain attention + MLP blocks
    return {**ref, "architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": window}


FAMILY = Family(
    name="mistral",
    detect=detect,
    config_from_reference=config_from_reference,
    config_to_reference=config_to_reference,
    key_table=llama.KEY_TABLE,
    presets={},
    model_card="mistral",
    positions_past_max="warn",  # RoPE extrapolates (full-attention configs); warned once per model
)
