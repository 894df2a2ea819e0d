"""The Mistral family: transformers ``MistralForCausalLM`` checkpoints (``model_type: "mistral"``).

Weights are named exactly like Llama's (same key table); the difference is ``sliding_window``: when set, every
layer is ``sliding_window(window=sliding_window)`` (transformers' mask ``i - W < j <= i``), else ``attention``.
"""

from __future__ import annotations

from typing import Any

from zoo.config import ZooConfig
from zoo.models import llama
from zoo.models.family import Family, RefConfig, refuse_layers

CITATION = """@article{jiang2023mistral,
  title={Mistral {7B}},
  author={Jiang, Albert Q. and Sablayrolles, Alexandre and Mensch, Arthur and others},
  journal={arXiv preprint arXiv:2310.06825},
  year={2023}
}"""


def detect(cfg: dict[str, Any]) -> bool:
    return cfg.get("model_type") == "mistral"


def config_from_reference(cfg: dict[str, Any]) -> ZooConfig:
    window = RefConfig(cfg, "mistral").int("sliding_window", None)
    mixers = {"mixer": "sliding_window", "mixer_args": {"window": window}} if window else "attention"
    return llama.reference_config(cfg, "mistral", mixers, llama.FIELDS | {"sliding_window"})


def config_to_reference(config: ZooConfig) -> dict[str, Any]:
    holds = "one attention kind in every layer: all `attention`, or all the same `sliding_window(window=W)`"
    refuse_layers("mistral", config, [i for i, ls in enumerate(config.layers)
                                      if ls.mixer not in ("attention", "sliding_window")], holds)
    kinds = [(ls.mixer, sorted(ls.mixer_args.items())) for ls in config.layers]
    refuse_layers("mistral", config, [i for i, k in enumerate(kinds) if k != kinds[0]], holds)
    window = None
    if kinds[0][0] == "sliding_window":
        args = dict(kinds[0][1])
        if args.get("num_sink_tokens", 0):
            raise ValueError("cannot export to the mistral format: it has no sink tokens "
                             f"(num_sink_tokens={args['num_sink_tokens']})")
        window = args["window"]
        plain = config.with_mixers("attention")
    else:
        plain = config
    ref = llama.config_to_reference(plain, "mistral")  # raises for anything but attention + MLP blocks
    return {**ref, "architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": window}


FAMILY = Family(
    name="mistral",
    detect=detect,
    config_from_reference=config_from_reference,
    config_to_reference=config_to_reference,
    key_table=llama.KEY_TABLE,
    presets={},
    model_card="mistral",
    citations=(CITATION,),
    positions_past_max="warn",  # RoPE extrapolates (full-attention configs); warned once per model
)
