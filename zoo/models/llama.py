"""The Llama family: transformers ``LlamaForCausalLM`` checkpoints (``model_type: "llama"``).

Also the base of GENERator, MASFormer and LongGen (a Llama with other mixers in some layers).
Keys: ``model.layers.{i}.self_attn.*`` are the attention mixer's own names, so the table is prefix renames.
"""

from __future__ import annotations

from typing import Any

from zoo.config import ZooConfig, check_rope_scaling
from zoo.models.family import Family, Preset, RefConfig, check_reference_fields

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


# config.json fields the Llama reader uses (anything else but transformers' neutral fields is refused)
FIELDS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "attention_bias", "mlp_bias", "rms_norm_eps",
    "tie_word_embeddings", "rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings",
    "initializer_range", "pad_token_id", "bos_token_id", "eos_token_id", "pretraining_tp",
})


def rope_from_reference(cfg: dict[str, Any], fmt: str = "llama") -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from transformers 4.x (``rope_theta``, ``rope_scaling``) or 5.x (``rope_parameters``)."""
    ref = RefConfig(cfg, fmt)
    params = dict(ref.dict("rope_parameters", {}))
    theta = RefConfig(params, fmt, "rope_parameters.").float("rope_theta", None)
    params.pop("rope_theta", None)
    if theta is None:
        theta = ref.float("rope_theta", 10000.0)
    scaling = params or ref.dict("rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    check_rope_scaling(scaling, f"{fmt} config: rope_scaling")
    return theta, scaling


def config_from_reference(cfg: dict[str, Any]) -> ZooConfig:
    return reference_config(cfg, "llama", "attention", FIELDS)


def reference_config(cfg: dict[str, Any], fmt: str, mixers: Any, fields: frozenset[str]) -> ZooConfig:
    """A transformers Llama-layout ``config.json`` (Llama, Mistral, GENERator) -> ZooConfig with ``mixers`` in every
    layer; every field is type- and range-checked here, naming the reference field."""
    check_reference_fields(cfg, fields, fmt)
    ref = RefConfig(cfg, fmt)
    d, H = ref.int("hidden_size"), ref.int("num_attention_heads")
    head_dim = ref.int("head_dim", None)
    if head_dim is None and d % H:
        raise ValueError(f"{fmt} config: hidden_size={d} is not divisible by num_attention_heads={H} and head_dim is "
                         "not given")
    theta, scaling = rope_from_reference(cfg, fmt)
    act = ref.str("hidden_act", "silu")
    if act not in HF_ACTIVATIONS:
        raise ValueError(f"{fmt} config: hidden_act={act!r} is not supported; supported: {sorted(HF_ACTIVATIONS)}")
    ref.int("pretraining_tp", 1)  # tensor-parallel slicing of the same matmuls: no change to the math
    attention = {
        "num_heads": H,
        "num_kv_heads": ref.int("num_key_value_heads", H),
        "head_dim": head_dim or d // H,
        "qkv_bias": ref.bool("attention_bias", False),
        "o_bias": ref.bool("attention_bias", False),
    }
    mlp = {"intermediate_size": ref.int("intermediate_size"), "activation": HF_ACTIVATIONS[act],
           "bias": ref.bool("mlp_bias", False)}
    n_layers = ref.int("num_hidden_layers")
    try:
        return ZooConfig.from_dict({
            "vocab_size": ref.int("vocab_size"),
            "d_model": d,
            "n_layers": n_layers,
            "mixers": mixers,
            "mlp": mlp,
            "mixer_defaults": {"attention": attention},
            "norm": "rmsnorm",
            "norm_eps": ref.float("rms_norm_eps", 1e-6),
            "tie_embeddings": ref.bool("tie_word_embeddings", False),
            "rope_theta": theta,
            "rope_scaling": scaling,
            "max_position_embeddings": ref.int("max_position_embeddings", 2048),
            "initializer_range": ref.float("initializer_range", 0.02, positive=False),
            "pad_token_id": ref.token_id("pad_token_id"),
            "bos_token_id": ref.token_id("bos_token_id"),
            "eos_token_id": ref.token_id("eos_token_id", many=True),
            "family": fmt,
        })
    except ValueError as e:
        raise ValueError(f"{fmt} config: {e}") from None


def config_to_reference(config: ZooConfig) -> dict[str, Any]:
    bad = [i for i, ls in enumerate(config.layers) if ls.mixer != "attention" or ls.mixer_args or ls.mlp is None]
    if bad:
        raise ValueError(f"cannot export to the llama format: layers {bad} are not plain attention + MLP blocks")
    att = config.mixer_kwargs(0)
    mlp = config.layers[0].mlp
    inv = {v: k for k, v in HF_ACTIVATIONS.items() if k != "swish"}
    if att.get("qkv_bias", False) != att.get("o_bias", False) or att.get("qk_norm", False):
        raise ValueError("cannot export to the llama format: it has one attention_bias flag and no QK-norm")
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
        "rope_scaling": config.rope_scaling,
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
    positions_past_max="warn",  # RoPE extrapolates, as in transformers; warned once per model
)
