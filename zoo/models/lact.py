"""The LaCT family: the released ``lact_swiglu`` language models (``a1600012888/LaCT``, ``lact_llm/``).

Every block is ``h = h + attn(attn_norm(h)); h = h + mlp(mlp_norm(h))`` with a :class:`~zoo.layers.lact.LaCT`
mixer (sliding-window attention + SwiGLU fast weights) and fla's ``GatedMLP`` (``gate_proj, up_proj,
down_proj``), RMSNorm everywhere, untied head. Keys (flame's ``convert_dcp_to_hf`` output)::

    model.embeddings.weight                embedding.weight
    model.layers.{i}.attn_norm.*           layers.{i}.norm.*
    model.layers.{i}.attn.*                layers.{i}.mixer.*     (the mixer keeps the reference's names)
    model.layers.{i}.mlp_norm.* / mlp.*    layers.{i}.mlp_norm.* / mlp.*
    model.norm.weight / lm_head.weight     norm_f.weight / lm_head.weight

No LM checkpoint is published (only configs), so the presets carry no hub id. Config fields that only choose
fused kernels or storage precision upstream (``fuse_norm``, ``fuse_swiglu``, ``fuse_cross_entropy``,
``last_layer_fuse_norm``, ``fp32_states``) are kept in ``ZooConfig.extra`` for the export; ``use_fused_kernel``
changes the maths with Muon (Newton-Schulz on the stacked ``[dw0; dw2]``) and is a mixer argument.
"""

from __future__ import annotations

from typing import Any

from zoo.config import ZooConfig, check_argument_type
from zoo.layers.lact import CITATION
from zoo.models.family import Family, Preset, RefConfig, check_reference_fields, refuse_layers
from zoo.registry import get_mixer

KEY_TABLE = [
    ("model.embeddings.", "embedding."),
    ("model.layers.{i}.attn_norm.", "layers.{i}.norm."),
    ("model.layers.{i}.attn.", "layers.{i}.mixer."),
    ("model.layers.{i}.mlp_norm.", "layers.{i}.mlp_norm."),
    ("model.layers.{i}.mlp.", "layers.{i}.mlp."),
    ("model.norm.", "norm_f."),
    ("lm_head.", "lm_head."),
]

# LaCTSWIGLUConfig defaults of the mixer fields (reference name -> (zoo argument, default))
MIXER_FIELDS = {
    "num_attn_heads": ("num_attn_heads", 32), "num_lact_heads": ("num_lact_heads", 4),
    "inter_multi": ("inter_multi", 1.0), "window_size": ("window_size", 2048),
    "lact_chunk_size": ("chunk_size", 2048), "qkv_bias": ("qkv_bias", False),
    "attn_qk_norm": ("attn_qk_norm", False), "qkv_silu": ("qkv_silu", True), "no_v_silu": ("no_v_silu", False),
    "lr_dim": ("lr_dim", 1), "use_muon": ("use_muon", False), "lr_parameterization": ("lr_parameterization", "mamba"),
    "learnable_ttt_scale": ("learnable_ttt_scale", True), "ttt_prenorm": ("ttt_prenorm", False),
    "ttt_nope": ("ttt_nope", False), "w0_w2_low_rank": ("w0_w2_low_rank", -1),
    "use_momentum": ("use_momentum", True), "ttt_loss_type": ("ttt_loss_type", "dot_product"),
    "fw_init_gain": ("fw_init_gain", 0.5), "use_fused_kernel": ("use_fused_kernel", False),
}
# fields that pick kernels / storage precision only; kept for the export
PASSTHROUGH = {"fuse_norm": True, "last_layer_fuse_norm": True, "fuse_swiglu": True, "fuse_cross_entropy": True,
               "fp32_states": False, "use_cache": True}


def detect(cfg: dict[str, Any]) -> bool:
    return cfg.get("model_type") == "lact_swiglu"


def mlp_width(d: int, hidden_ratio: float = 4, intermediate_size: int | None = None) -> int:
    """fla ``GatedMLP``: ``256 * ceil(int(d * hidden_ratio * 2 / 3) / 256)`` unless given."""
    if intermediate_size:
        return int(intermediate_size)
    return 256 * -(-int(d * hidden_ratio * 2 / 3) // 256)


def zoo_dict(cfg: dict[str, Any]) -> dict[str, Any]:
    """A ``lact_swiglu`` config.json -> ``ZooConfig.from_dict`` input (not validated here)."""
    if cfg.get("hidden_act", "swish") not in ("swish", "silu"):
        raise ValueError(f"lact_swiglu config: hidden_act={cfg['hidden_act']!r} unsupported (only 'swish')")
    if cfg.get("window_size", 2048) is None:
        raise ValueError("lact_swiglu config: window_size=None (full attention in the layer) is not supported; "
                         "the lact mixer needs a window")
    if cfg.get("elementwise_affine", True) is False:
        raise ValueError("lact_swiglu config: elementwise_affine=False is not supported (RMSNorms have weights)")
    mixer = {zoo: cfg.get(ref, default) for ref, (zoo, default) in MIXER_FIELDS.items()}
    for name, (arg, _) in MIXER_FIELDS.items():  # types named by the config.json field
        if name in cfg:
            check_argument_type("lact_swiglu config", name, cfg[name], get_mixer("lact"), arg)
    ref = RefConfig(cfg, "lact_swiglu")
    mixer["inter_multi"] = ref.float("inter_multi", 1.0)
    d = ref.int("hidden_size", 2048)
    return {
        "vocab_size": ref.int("vocab_size", 32000), "d_model": d, "n_layers": ref.int("num_hidden_layers", 24),
        "mixers": "lact", "mixer_defaults": {"lact": mixer},
        "mlp": {"intermediate_size": mlp_width(d, ref.float("hidden_ratio", 4.0), ref.int("intermediate_size", None)),
                "activation": "silu"},
        "norm": "rmsnorm", "norm_eps": ref.float("norm_eps", 1e-6),
        "tie_embeddings": ref.bool("tie_word_embeddings", False),
        "rope_theta": ref.float("rope_theta", 10000.0),
        "max_position_embeddings": ref.int("max_position_embeddings", 2048),
        "initializer_range": ref.float("initializer_range", 0.006, positive=False),
        "pad_token_id": ref.token_id("pad_token_id"), "bos_token_id": cfg.get("bos_token_id", 1),
        "eos_token_id": cfg.get("eos_token_id", 2), "family": "lact",
        "extra": {"lact_swiglu": {k: cfg.get(k, v) for k, v in PASSTHROUGH.items()}},
    }


# config.json fields the reader uses or knows to be neutral ("attention_bias" is present in the released configs but
# unused by the model); anything else is refused (zoo.models.family.check_reference_fields)
FIELDS = frozenset({*MIXER_FIELDS, *PASSTHROUGH, "hidden_act", "window_size", "elementwise_affine", "hidden_size",
                    "num_hidden_layers", "vocab_size", "hidden_ratio", "intermediate_size", "norm_eps",
                    "tie_word_embeddings", "rope_theta", "max_position_embeddings", "initializer_range",
                    "pad_token_id", "bos_token_id", "eos_token_id", "attention_bias"})


def config_from_reference(cfg: dict[str, Any]) -> ZooConfig:
    check_reference_fields(cfg, FIELDS, "lact_swiglu")
    try:
        return ZooConfig.from_dict(zoo_dict(cfg))
    except ValueError as e:
        raise ValueError(f"lact_swiglu config.json cannot be built: {e}") from None


def config_to_reference(config: ZooConfig) -> dict[str, Any]:
    holds = "the same lact mixer + MLP in every layer"
    refuse_layers("lact", config, [i for i, ls in enumerate(config.layers) if ls.mixer != "lact" or ls.mlp is None],
                  holds)
    first = (sorted(config.mixer_kwargs(0).items()), config.layers[0].mlp)
    refuse_layers("lact", config, [i for i in range(config.n_layers)
                                   if (sorted(config.mixer_kwargs(i).items()), config.layers[i].mlp) != first], holds)
    mlp = config.layers[0].mlp
    if mlp.get("activation", "silu") != "silu" or not mlp.get("gated", True) or mlp.get("bias", False):
        raise ValueError("cannot export to the lact_swiglu format: its MLP is a bias-free SwiGLU")
    if config.norm != "rmsnorm" or config.embedding_scale != 1 or config.residual_scale != 1 or \
            config.logit_scale != 1:
        raise ValueError("cannot export to the lact_swiglu format: RMSNorm and no embedding/residual/logit scales")
    args = config.mixer_kwargs(0)
    if not args.get("ttt_respect_masks", True):
        raise ValueError("cannot export ttt_respect_masks=False: the reference has no such switch (it always leaks)")
    if args.get("base_lr", 1e-3) != 1e-3:
        raise ValueError(f"cannot export base_lr={args['base_lr']}: the reference hard-codes 1e-3")
    out: dict[str, Any] = {"architectures": ["LaCTForCausalLM"], "model_type": "lact_swiglu",
                           "hidden_size": config.d_model, "num_hidden_layers": config.n_layers,
                           "vocab_size": config.vocab_size, "hidden_act": "swish",
                           "intermediate_size": mlp["intermediate_size"], "hidden_ratio": 4,
                           "norm_eps": config.norm_eps, "tie_word_embeddings": config.tie_embeddings,
                           "rope_theta": config.rope_theta, "max_position_embeddings": config.max_position_embeddings,
                           "initializer_range": config.initializer_range, "pad_token_id": config.pad_token_id,
                           "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    for ref, (zoo, default) in MIXER_FIELDS.items():
        out[ref] = args.get(zoo, default)
    out.update({**PASSTHROUGH, **config.extra.get("lact_swiglu", {})})
    return out


def _released(d: int, heads: int, muon: bool, **kw: Any) -> dict[str, Any]:
    """The shared fields of ``lact_llm/configs/*.json``."""
    return {"model_type": "lact_swiglu", "hidden_size": d, "num_hidden_layers": 24, "num_attn_heads": heads,
            "num_lact_heads": 4, "inter_multi": 1, "qkv_bias": False, "attn_qk_norm": False, "qkv_silu": True,
            "lact_chunk_size": 2048, "window_size": 2048, "use_muon": muon, "lr_dim": 1,
            "lr_parameterization": "mamba", "learnable_ttt_scale": True, "w0_w2_low_rank": 32, "fw_init_gain": 0.5,
            "use_momentum": True, "rope_theta": 1000000, "norm_eps": 1e-06, "tie_word_embeddings": False,
            "max_position_embeddings": 32768, "initializer_range": 0.02, "vocab_size": 32000, "hidden_act": "swish",
            "bos_token_id": 1, "eos_token_id": 2, "fuse_norm": True, "fuse_cross_entropy": True, **kw}


# The released configs (3B_..._momentum.json says num_attn_heads=25, which 3072 does not divide: the preset uses
# the 24 heads of 3B_..._momentum_muon.json and the paper).
RELEASED = {
    "lact-760m-momentum": _released(1536, 24, False),
    "lact-760m-muon": _released(1536, 24, True),
    "lact-760m-fused-kernel": _released(1536, 24, False, no_v_silu=True, use_fused_kernel=True, fp32_states=True),
    "lact-3b-momentum": _released(3072, 24, False),
    "lact-3b-muon": _released(3072, 24, True),
}
PRESETS = {name: Preset(zoo_dict(cfg), description=f"LaCT {name[5:]} (lact_llm/configs; no published weights)")
           for name, cfg in RELEASED.items()}

FAMILY = Family(
    name="lact",
    detect=detect,
    config_from_reference=config_from_reference,
    config_to_reference=config_to_reference,
    key_table=KEY_TABLE,
    presets=PRESETS,
    model_card="lact",
    citations=(CITATION,),
)
