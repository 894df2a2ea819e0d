"""The MiniCPM4 family: OpenBMB ``MiniCPMForCausalLM`` checkpoints (MiniCPM4-0.5B / 8B, MiniCPM4.1-8B; remote-code
``model_type: "minicpm"``), dense or with InfLLM-v2 sparse attention (``sparse_config``).

A Llama with three muP scalars, all ``ZooConfig`` fields::

    h = embed(ids) * scale_emb                                        -> embedding_scale
    h = h + block(h) * scale_depth / sqrt(num_hidden_layers)          -> residual_scale (attention and MLP)
    logits = lm_head(norm(h) / (hidden_size / dim_model_base))         -> logit_scale = dim_model_base / hidden_size

Keys are Llama's (``model.layers.{i}.self_attn.{q,k,v,o}_proj`` ...; InfLLM-v2 adds no parameter), the head is tied
when ``tie_word_embeddings`` is true or absent (the class default; MiniCPM4-0.5B ships no ``lm_head``).
``head_dim = hidden_size / num_attention_heads`` (no config key).

RoPE: the hub's ``MiniCPMLongRoPE`` builds its cos/sin cache at init for ``max_position_embeddings`` (long factors iff
that exceeds ``original_max_position_embeddings``) and multiplies cos and sin by ``sqrt(1 + ln(max/orig) / ln(orig))``.
The zoo's ``longrope`` (transformers' rule) picks the factors per call by the call's length, so the converter writes
the hub's choice into the dict: the long factors as ``short_factor`` too when ``max > orig`` (the 128k recipe), and the
hub's ``attention_factor`` explicitly; the original dict is kept in ``extra`` for the export. Differences left: the
hub keeps the long-factor cache once a call exceeded ``max_position_embeddings`` (sticky); the zoo decides per call.
The hub multiplies ``(t / ext) * inv_freq`` where transformers computes ``t * (1 / (ext * base^...))`` (fp32 rounding).

Sparse attention: a ``sparse_config`` in config.json makes every layer ``infllmv2`` with those arguments (the hub's
defaults for missing keys) and ``variant="v2"`` (MiniCPM4.1's code; MiniCPM4's June-2025 code is ``v1``, which
config.json does not tell apart: use :func:`enable_sparse` with ``variant="v1"``). The released configs ship
without it; :func:`enable_sparse` switches it on for them (no new weights).
"""

from __future__ import annotations

import copy
import math
from typing import Any

from zoo.config import ZooConfig
from zoo.models import llama
from zoo.models.family import Family, Preset, RefConfig, check_reference_fields

CITATION = """@article{minicpm4,
  title={{MiniCPM4}: Ultra-Efficient {LLMs} on End Devices},
  author={{MiniCPM Team}},
  journal={arXiv preprint arXiv:2506.07900},
  year={2025}
}"""

# MiniCPMInfLLMv2Attention.__init__: self.config.sparse_config.get(<key>, <default>)
SPARSE_DEFAULTS = {"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "block_size": 64, "window_size": 2048,
                   "topk": 64, "use_nope": False, "dense_len": 8192}
ARCH = "MiniCPMForCausalLM"


def detect(cfg: dict[str, Any]) -> bool:
    archs = cfg.get("architectures")
    return cfg.get("model_type") == "minicpm" or (isinstance(archs, list) and ARCH in archs
                                                   and cfg.get("model_type") in (None, "minicpm"))


def _rope(cfg: dict[str, Any]) -> dict[str, Any] | None:
    scaling = RefConfig(cfg, "minicpm").dict("rope_scaling", None)
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind != "longrope":
        return {**scaling, "rope_type": kind}
    max_pos = RefConfig(cfg, "minicpm").int("max_position_embeddings", 2048)
    ref = RefConfig(scaling, "minicpm", "rope_scaling.")
    orig = ref.int("original_max_position_embeddings")
    for name in ("long_factor", "short_factor"):
        if not isinstance(scaling.get(name), list):
            raise ref.fail(name, scaling.get(name), "a list of numbers")
    long = max_pos > orig  # the hub's cache is built for max_position_embeddings
    return {"rope_type": "longrope", "long_factor": list(scaling["long_factor"]),
            "short_factor": list(scaling["long_factor"] if long else scaling["short_factor"]),
            "original_max_position_embeddings": orig,
            "attention_factor": math.sqrt(1 + math.log(max_pos / orig) / math.log(orig))}


def sparse_args(sparse_config: dict[str, Any], variant: str = "v2") -> dict[str, Any]:
    """``infllmv2`` mixer arguments from a MiniCPM ``sparse_config`` (the hub's defaults for missing keys)."""
    unknown = sorted(set(sparse_config) - set(SPARSE_DEFAULTS))
    if unknown:
        raise ValueError(f"minicpm4 sparse_config: unknown key(s) {unknown}; known: {sorted(SPARSE_DEFAULTS)}")
    return {**SPARSE_DEFAULTS, **sparse_config, "variant": variant}


# config.json fields the reader uses (MiniCPM's configuration_minicpm.py; mup_denominator is "only used for Eagle
# Head", auto_map names the remote code, which is never run); anything else is refused
FIELDS = frozenset({"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "hidden_act", "rms_norm_eps", "max_position_embeddings", "rope_theta",
                    "rope_scaling", "scale_emb", "dim_model_base", "scale_depth", "tie_word_embeddings",
                    "attention_bias", "sparse_config", "pad_token_id", "bos_token_id", "eos_token_id",
                    "initializer_range", "pretraining_tp", "mup_denominator", "auto_map"})


def config_from_reference(cfg: dict[str, Any]) -> ZooConfig:
    check_reference_fields(cfg, FIELDS, "minicpm")
    ref = RefConfig(cfg, "minicpm")
    H, D, L = ref.int("num_attention_heads"), ref.int("hidden_size"), ref.int("num_hidden_layers")
    ref.int("pretraining_tp", 1)
    act = ref.str("hidden_act", "silu")
    if act not in llama.HF_ACTIVATIONS:
        raise ValueError(f"minicpm config: hidden_act={act!r} is not supported; supported: "
                         f"{sorted(llama.HF_ACTIVATIONS)}")
    if D % H:
        raise ValueError(f"minicpm config: hidden_size={D} is not divisible by num_attention_heads={H}")
    bias = ref.bool("attention_bias", False)
    attention = {"num_heads": H, "num_kv_heads": ref.int("num_key_value_heads", H), "head_dim": D // H,
                 "qkv_bias": bias, "o_bias": bias}
    sparse = ref.dict("sparse_config", None)
    mixers = "attention"
    if sparse is not None:
        args = sparse_args(sparse)
        mixers = "infllmv2(" + ", ".join(f"{k}={v!r}" for k, v in args.items()) + ")"
    mup = {k: ref.float(k, 1.0) for k in ("scale_emb", "dim_model_base", "scale_depth")}  # positive finite numbers
    try:
        return ZooConfig.from_dict({
            "vocab_size": ref.int("vocab_size"), "d_model": D, "n_layers": L, "mixers": mixers,
            "mlp": {"intermediate_size": ref.int("intermediate_size"), "activation": llama.HF_ACTIVATIONS[act]},
            "mixer_defaults": {"attention": attention},
            "norm": "rmsnorm", "norm_eps": ref.float("rms_norm_eps", 1e-6),
            "tie_embeddings": ref.bool("tie_word_embeddings", True),
            "embedding_scale": float(mup["scale_emb"]),
            "residual_scale": float(mup["scale_depth"]) / math.sqrt(L),
            "logit_scale": float(mup["dim_model_base"]) / D,
            "rope_theta": ref.float("rope_theta", 10000.0), "rope_scaling": _rope(cfg),
            "max_position_embeddings": ref.int("max_position_embeddings", 2048),
            "initializer_range": ref.float("initializer_range", 0.02, positive=False),
            "pad_token_id": ref.token_id("pad_token_id"), "bos_token_id": cfg.get("bos_token_id", 1),
            "eos_token_id": cfg.get("eos_token_id", 2), "family": "minicpm4",
            "extra": {"minicpm": {**mup, "rope_scaling": copy.deepcopy(cfg.get("rope_scaling"))}},
        })
    except ValueError as e:
        raise ValueError(f"minicpm config: {e}") from None


def enable_sparse(config: ZooConfig, sparse_config: dict[str, Any] | None = None, *, variant: str = "v2",
                  layers: str = "all") -> ZooConfig:
    """A copy of ``config`` whose ``layers`` use InfLLM-v2 with MiniCPM's ``sparse_config`` (default: the
    recommended one of the MiniCPM README), for checkpoints released without it. Weights are unchanged."""
    args = sparse_args(sparse_config or {}, variant)
    return config.with_mixers({layers: "infllmv2(" + ", ".join(f"{k}={v!r}" for k, v in args.items()) + ")"})


def config_to_reference(config: ZooConfig) -> dict[str, Any]:
    kinds = {(ls.mixer, tuple(sorted(ls.mixer_args.items()))) for ls in config.layers}
    if len(kinds) != 1 or next(iter(kinds))[0] not in ("attention", "infllmv2") or any(
            ls.mlp is None for ls in config.layers):
        raise ValueError("cannot export to the minicpm format: every layer must be the same attention or infllmv2 "
                         "mixer with an MLP")
    mixer, margs = next(iter(kinds))
    att = config.mixer_kwargs(0)
    H, D, L = att["num_heads"], config.d_model, config.n_layers
    if (att.get("head_dim") or D // H) != D // H or att.get("qk_norm") or att.get("rotary_dim"):
        raise ValueError("cannot export to the minicpm format: it has head_dim = hidden_size / heads, full RoPE "
                         "and no QK-norm")
    if att.get("qkv_bias", False) != att.get("o_bias", False):
        raise ValueError("cannot export to the minicpm format: it has one attention_bias flag")
    saved = config.extra.get("minicpm", {})
    L_scale = math.sqrt(L)

    def mup(name: str, value: float) -> float:  # keep the checkpoint's own literal when it still matches
        return saved[name] if name in saved and math.isclose(saved[name], value, rel_tol=1e-9) else value

    rope = config.rope_scaling
    if rope is not None and rope.get("rope_type") == "longrope" and saved.get("rope_scaling"):
        rope = saved["rope_scaling"]
    out = {
        "architectures": [ARCH], "model_type": "minicpm",
        "vocab_size": config.vocab_size, "hidden_size": D,
        "intermediate_size": config.layers[0].mlp["intermediate_size"],
        "num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": att.get("num_kv_heads") or H,
        "hidden_act": {v: k for k, v in llama.HF_ACTIVATIONS.items() if k != "swish"}[
            config.layers[0].mlp.get("activation", "silu")],
        "attention_bias": att.get("qkv_bias", False), "rms_norm_eps": config.norm_eps,
        "max_position_embeddings": config.max_position_embeddings, "rope_theta": config.rope_theta,
        "rope_scaling": rope, "tie_word_embeddings": config.tie_embeddings,
        "scale_emb": mup("scale_emb", config.embedding_scale),
        "dim_model_base": mup("dim_model_base", config.logit_scale * D),
        "scale_depth": mup("scale_depth", config.residual_scale * L_scale),
        "initializer_range": config.initializer_range, "pad_token_id": config.pad_token_id,
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
    }
    if mixer == "infllmv2":
        full = config.mixer_kwargs(0)
        out["sparse_config"] = {k: full.get(k, v) for k, v in SPARSE_DEFAULTS.items()}
    return out


def _minicpm(d: int, n: int, heads: int, kv: int, inter: int, *, tie: bool, eps: float, max_pos: int) -> dict:
    return {"vocab_size": 73448, "d_model": d, "n_layers": n, "mixers": "attention", "family": "minicpm4",
            "mlp": {"intermediate_size": inter}, "norm": "rmsnorm", "norm_eps": eps, "tie_embeddings": tie,
            "mixer_defaults": {"attention": {"num_heads": heads, "num_kv_heads": kv}},
            "embedding_scale": 12.0, "residual_scale": 1.4 / math.sqrt(n), "logit_scale": 256 / d,
            "max_position_embeddings": max_pos, "bos_token_id": 1, "eos_token_id": [2, 73440], "pad_token_id": 2,
            "extra": {"minicpm": {"scale_emb": 12, "dim_model_base": 256, "scale_depth": 1.4}}}


# Architecture only: the LongRoPE factors are read from each checkpoint's config.json when it is loaded (the shipped
# configs have max_position_embeddings == original, i.e. the short factors), so the presets use plain RoPE.
PRESETS = {
    "minicpm4-0.5b": Preset(_minicpm(1024, 24, 16, 2, 4096, tie=True, eps=1e-5, max_pos=32768),
                            hub_id="openbmb/MiniCPM4-0.5B", revision="5253c7f",
                            description="MiniCPM4-0.5B (GQA 16:2 = groups of 8, tied head; dense only)"),
    "minicpm4-8b": Preset(_minicpm(4096, 32, 32, 2, 16384, tie=False, eps=1e-6, max_pos=32768),
                          hub_id="openbmb/MiniCPM4-8B", revision=None,
                          description="MiniCPM4-8B (GQA 32:2 = groups of 16; trained with InfLLM-v2 v1, ships dense)"),
    "minicpm4.1-8b": Preset(_minicpm(4096, 32, 32, 2, 16384, tie=False, eps=1e-6, max_pos=65536),
                            hub_id="openbmb/MiniCPM4.1-8B", revision="7329b6e",
                            description="MiniCPM4.1-8B (InfLLM-v2 v2 / LSE approximation; ships dense)"),
}

FAMILY = Family(
    name="minicpm4",
    detect=detect,
    config_from_reference=config_from_reference,
    config_to_reference=config_to_reference,
    key_table=llama.KEY_TABLE,
    presets=PRESETS,
    model_card="minicpm4",
    citations=(llama.CITATION, CITATION),
    positions_past_max="warn",  # RoPE (LongRoPE) extrapolates past the configured length; warned once per model
)
