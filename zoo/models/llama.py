"""The Llama family: transformers ``LlamaForCausalLM`` checkpoints (``model_type: "llama"``).

Also the base of GENERator, MASFormer and LongGen (a Llama with other mixers in some layers).
Keys: ``model.layers.{i}.self_attn.*`` are the attention mixer's own names, so the table is prefix renames.
"""

from __future__ import annotations

from typing import Any

from zoo.config import ZooConfig
from zoo.models.family import Family, Preset, refuse_layers

CITATION = """@article{touvron2023llama,
  title={{LLaMA}: Open and Efficient Foundation Language Models},
  author={Touvron, Hugo and Lavril, Thibaut and Izacard, Gautier and others},
  journal={arXiv preprint arXiv:2302.13971},
  year={2023}
}"""

KEY_TABLE = [
    ("model.embed_tokens.", "embedding."),
    ("model.layers.{i}.self_attn.", "layers.{i}.mixer."),
    ("model.layers.{i}.input_layernorm.", "layers.{i}.norm."),
    ("model.layers.{i}.post_attention_layernorm.", "layers.{i}.mlp_norm."),
    ("model.layers.{i}.mlp.", "layers.{i}.mlp."),
    ("model.norm.", "norm_f."),
    ("lm_head.", "lm_head."),
]

HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def detect(cfg: dict[str, Any]) -> bool:
    return cfg.get("model_type") == "llama"


def rope_from_reference(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from transformers 4.x (``rope_theta``, ``rope_scaling``) or 5.x (``rope_parameters``)."""
    params = dict(cfg.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    scaling = params or cfg.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return theta, scaling


def config_from_reference(cfg: dict[str, Any]) -> ZooConfig:
    H = cfg["num_attention_heads"]
    theta, scaling = rope_from_reference(cfg)
    act = cfg.get("hidden_act", "silu")
    if act not in HF_ACTIVATIONS:
        raise ValueError(f"llama config: hidden_act={act!r} is not supported; supported: {sorted(HF_ACTIVATIONS)}")
    attention = {
        "num_heads": H,
        "num_kv_heads": cfg.get("num_key_value_heads") or H,
        "head_dim": cfg.get("head_dim") or cfg["hidden_size"] // H,
        "qkv_bias": bool(cfg.get("attention_bias", False)),
        "o_bias": bool(cfg.get("attention_bias", False)),
    }
    mlp = {"intermediate_size": cfg["intermediate_size"], "activation": HF_ACTIVATIONS[act],
           "bias": bool(cfg.get("mlp_bias", False))}
    return ZooConfig.from_dict({
        "vocab_size": cfg["vocab_size"],
        "d_model": cfg["hidden_size"],
        "n_layers": cfg["num_hidden_layers"],
        "mixers": cfg.get("zoo_mixers", "attention"),
        "mlp": mlp,
        "mixer_defaults": {"attention": attention},
        "norm": "rmsnorm",
        "norm_eps": cfg.get("rms_norm_eps", 1e-6),
        "tie_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "max_position_embeddings": cfg.get("max_position_embeddings", 2048),
        "initializer_range": cfg.get("initializer_range", 0.02),
        "pad_token_id": cfg.get("pad_token_id"),
        "bos_token_id": cfg.get("bos_token_id"),
        "eos_token_id": cfg.get("eos_token_id"),
        "family": "llama",
    })


def config_to_reference(config: ZooConfig, fmt: str = "llama") -> dict[str, Any]:
    """transformers ``LlamaConfig`` dict; ``fmt`` names the format in errors (Mistral and GENERator reuse this)."""
    bad = [i for i, ls in enumerate(config.layers) if ls.mixer != "attention" or ls.mixer_args or ls.mlp is None]
    refuse_layers(fmt, config, bad, "full-attention + MLP blocks that share one set of attention arguments")
    att = config.mixer_kwargs(0)
    mlp = config.layers[0].mlp
    if any(ls.mlp != mlp for ls in config.layers):
        refuse_layers(fmt, config, [i for i, ls in enumerate(config.layers) if ls.mlp != mlp],
                      f"one MLP shape for every layer (layer 0: {mlp})")
    inv = {v: k for k, v in HF_ACTIVATIONS.items() if k != "swish"}
    if att.get("qkv_bias", False) != att.get("o_bias", False) or att.get("qk_norm", False):
        raise ValueError(f"cannot export to the {fmt} format: it has one attention_bias flag and no QK-norm")
    if not mlp.get("gated", True):
        raise ValueError(f"cannot export to the {fmt} format: its MLP is gated (SwiGLU-style), the model's is not")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": mlp["intermediate_size"],
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": att["num_heads"],
        "num_key_value_heads": att.get("num_kv_heads") or att["num_heads"],
        "head_dim": att.get("head_dim") or config.d_model // att["num_heads"],
        "hidden_act": inv[mlp.get("activation", "silu")],
        "attention_bias": att.get("qkv_bias", False),
        "mlp_bias": mlp.get("bias", False),
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "rope_theta": config.rope_theta,
        **({"rope_scaling": config.rope_scaling} if config.rope_scaling else {}),  # None: transformers 5 warns
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": config.initializer_range,
        "pad_token_id": config.pad_token_id,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
    }


def _llama(d: int, n: int, heads: int, kv: int, inter: int, vocab: int, **kw: Any) -> dict[str, Any]:
    return {"vocab_size": vocab, "d_model": d, "n_layers": n, "mixers": "attention", "family": "llama",
            "mlp": {"intermediate_size": inter}, "norm": "rmsnorm",
            "mixer_defaults": {"attention": {"num_heads": heads, "num_kv_heads": kv}}, **kw}


PRESETS = {
    "llama-3.2-1b": Preset(
        _llama(2048, 16, 32, 8, 8192, 128256, norm_eps=1e-5, tie_embeddings=True, rope_theta=500000.0,
               max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001,
               rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192}),
        hub_id="meta-llama/Llama-3.2-1B", description="Llama 3.2 1B (GQA 32:8, tied head, llama3 RoPE scaling)"),
    "tinyllama-1.1b": Preset(
        _llama(2048, 22, 32, 4, 5632, 32000, norm_eps=1e-5, max_position_embeddings=2048,
               bos_token_id=1, eos_token_id=2),
        hub_id="TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", description="TinyLlama 1.1B (GQA 32:4)"),
}

FAMILY = Family(
    name="llama",
    detect=detect,
    config_from_reference=config_from_reference,
    config_to_reference=config_to_reference,
    key_table=KEY_TABLE,
    presets=PRESETS,
    model_card="llama",
    citations=(CITATION,),
)
