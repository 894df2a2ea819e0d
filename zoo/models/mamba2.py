"""The Mamba-2 family: ``mamba_ssm`` (``state-spaces/mamba2-*``) and transformers ``Mamba2ForCausalLM`` checkpoints.

Both layouts hold the same tensors; only the embedding name differs::

    mamba_ssm      backbone.embedding.weight   backbone.layers.{i}.{norm,mixer.*}   backbone.norm_f   lm_head
    transformers   backbone.embeddings.weight  (same)

Blocks are mixer-only (``LayerSpec.mlp=None``) unless ``d_intermediate > 0`` (mamba_ssm's GatedMLP: ``fc1`` packs
``[up | gate]``, ``fc2`` = down; mapped onto the zoo SwiGLU). The vocabulary is padded up to
``pad_vocab_size_multiple``; the head is tied (mamba_ssm still stores ``lm_head.weight``, which we write back).

Hybrid ``mamba2attn`` checkpoints: mamba_ssm's ``MHA`` packs ``q|k|v`` in one ``in_proj`` (split here into the
zoo attention's ``q_proj/k_proj/v_proj``; ``out_proj`` -> ``o_proj``) with partial rotary (``rotary_emb_dim``,
rotate-half). Its optional depthwise causal conv over ``qkv`` (``d_conv > 0``; ``mamba2attn-2.7b`` uses 4) and
the fused MLP (``mlp_dim > 0``) have no counterpart in the zoo ``attention`` mixer: such configs are refused with
a ``ValueError`` naming the field (the preset itself builds, without that conv).

Export: :func:`save_mamba_ssm` (config.json + ``pytorch_model.bin``; ``zoo convert --to mamba2``) and
:func:`save_transformers` (config.json + ``model.safetensors``; ``zoo convert --to mamba2-transformers``, the
family's ``export_formats`` entry). :func:`calibrate_state_norm` sets per-layer, per-head state-norm
thresholds from a prompt (Stuffed Mamba, method 2).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from zoo.bench.adapters import Adapter, KernelAdapter, load_same_weights
from zoo.bench.references import register_reference
from zoo.checkpoint import save_reference
from zoo.config import MAX_LAYERS, LayerSpec, ZooConfig
from zoo.layers.attention import Attention
from zoo.layers.base import BenchCase
from zoo.layers.mamba2 import CITATION as MAMBA2_CITATION
from zoo.layers.mamba2 import Mamba2
from zoo.models.family import Family, Preset, RefConfig, StateDict, check_reference_fields, refuse_layers

MAMBA_SSM_KEYS = [
    ("backbone.embedding.", "embedding."),
    ("backbone.embeddings.", "embedding."),  # transformers' name, accepted on load
    ("backbone.layers.{i}.norm2.", "layers.{i}.mlp_norm."),
    ("backbone.layers.{i}.norm.", "layers.{i}.norm."),
    ("backbone.layers.{i}.mixer.", "layers.{i}.mixer."),
    ("backbone.layers.{i}.mlp.", "layers.{i}.mlp."),
    ("backbone.norm_f.", "norm_f."),
    ("lm_head.", "lm_head."),
]
TRANSFORMERS_KEYS = [(a, b) for a, b in MAMBA_SSM_KEYS if a != "backbone.embedding."]

# mamba_ssm Mamba2 constructor arguments the zoo mixer takes under the same name
MIXER_ARGS = ("d_state", "d_conv", "conv_init", "expand", "headdim", "d_ssm", "ngroups", "A_init_range",
              "D_has_hdim", "rmsnorm", "norm_before_gate", "dt_min", "dt_max", "dt_init_floor", "dt_limit", "bias",
              "conv_bias", "chunk_size")
IGNORED_SSM_ARGS = ("layer", "use_mem_eff_path", "process_group", "sequence_parallel", "device", "dtype")
SSM_FMT = "mamba2 (mamba_ssm)"  # the family's own export format, named in errors
MITIGATIONS = {"decay_scale": 1.0, "input_scale": 1.0, "dt_scale": 1.0, "state_norm_threshold": None,
               "state_window": None}


# ------------------------------------------------------------------------------------------------ detection
def is_mamba_ssm_config(cfg: dict[str, Any]) -> bool:
    return "ssm_cfg" in cfg and "d_model" in cfg and "n_layer" in cfg


def detect(cfg: dict[str, Any]) -> bool:
    return cfg.get("model_type") == "mamba2" or is_mamba_ssm_config(cfg)


def _pad_vocab(v: int, multiple: int) -> int:
    return v if multiple <= 1 or v % multiple == 0 else v + multiple - v % multiple


# ------------------------------------------------------------------------------------------------ config maps
def config_from_reference(cfg: dict[str, Any]) -> ZooConfig:
    fmt = "mamba_ssm" if is_mamba_ssm_config(cfg) else "transformers mamba2"
    try:
        return _from_mamba_ssm(cfg) if fmt == "mamba_ssm" else _from_transformers(cfg)
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith(fmt) else f"{fmt} config: {msg}") from None


# config.json fields each reader uses (anything else but the neutral fields of zoo.models.family is refused)
MAMBA_SSM_FIELDS = frozenset({"d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx",
                              "attn_cfg", "rms_norm", "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple",
                              "tie_embeddings", "norm_epsilon"})
ATTN_CFG_FIELDS = frozenset({"num_heads", "num_heads_kv", "head_dim", "qkv_proj_bias", "out_proj_bias",
                             "rotary_emb_dim", "rotary_emb_base", "rotary_emb_interleaved", "softmax_scale", "causal",
                             "d_conv", "mlp_dim"})
TRANSFORMERS_FIELDS = frozenset({
    "vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "head_dim", "state_size", "expand", "conv_kernel",
    "n_groups", "use_bias", "use_conv_bias", "chunk_size", "time_step_min", "time_step_max", "time_step_floor",
    "time_step_limit", "layer_norm_epsilon", "hidden_act", "rms_norm", "residual_in_fp32", "tie_word_embeddings",
    "initializer_range", "pad_token_id", "bos_token_id", "eos_token_id"})


def _from_mamba_ssm(cfg: dict[str, Any]) -> ZooConfig:
    from zoo.layers.mamba2 import Mamba2

    check_reference_fields(cfg, MAMBA_SSM_FIELDS, "mamba_ssm")
    ref = RefConfig(cfg, "mamba_ssm")
    ssm = dict(ref.dict("ssm_cfg", {}))
    layer = ssm.get("layer", "Mamba1")  # mamba_ssm's default when the key is absent
    if layer != "Mamba2":
        raise ValueError(f"mamba_ssm config: ssm_cfg.layer={layer!r} is not supported by the mamba2 family "
                         f"(only 'Mamba2'; mamba_ssm defaults to 'Mamba1' when the key is missing)")
    unknown = sorted(set(ssm) - set(MIXER_ARGS) - set(IGNORED_SSM_ARGS))
    if unknown:
        raise ValueError(f"mamba_ssm config: unsupported ssm_cfg keys {unknown}; supported: {sorted(MIXER_ARGS)}")
    eps = ref.float("norm_epsilon", 1e-5)
    mixer = {k: (tuple(v) if isinstance(v, list) else v) for k, v in ssm.items() if k in MIXER_ARGS}
    ZooConfig._check_args("mamba_ssm config: ssm_cfg", Mamba2, mixer)  # types, named as ssm_cfg fields
    mixer["norm_eps"] = 1e-5  # RMSNormGated is built with eps=1e-5 whatever norm_epsilon is
    n, d = ref.int("n_layer", maximum=MAX_LAYERS), ref.int("d_model")  # n_layer is iterated below
    d_int = ref.int("d_intermediate", 0, minimum=0)
    mlp = {"intermediate_size": -(-d_int // 128) * 128, "activation": "silu", "gated": True} if d_int else None
    attn_idx = cfg.get("attn_layer_idx") or []
    if not isinstance(attn_idx, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in attn_idx):
        raise ValueError(f"mamba_ssm config: attn_layer_idx={attn_idx!r} must be a list of layer indices")
    bad = sorted({i for i in attn_idx if not 0 <= i < n} | {i for i in attn_idx if attn_idx.count(i) > 1})
    if bad:
        raise ValueError(f"mamba_ssm config: attn_layer_idx has entries out of range [0, n_layer={n}) or repeated: "
                         f"{bad}")
    attn_cfg = ref.dict("attn_cfg", {})
    attention = _attention_args(attn_cfg, cfg) if attn_idx else None
    layers = [{"mixer": "attention", "mixer_args": dict(attention), "mlp": mlp} if i in set(attn_idx)
              else {"mixer": "mamba2", "mixer_args": {}, "mlp": mlp} for i in range(n)]
    multiple = ref.int("pad_vocab_size_multiple", 8)
    vocab = ref.int("vocab_size")
    return ZooConfig.from_dict({
        "vocab_size": _pad_vocab(vocab, multiple),
        "d_model": d, "n_layers": n, "layers": layers,
        "mixer_defaults": {"mamba2": mixer},
        "norm": "rmsnorm" if ref.bool("rms_norm", True) else "layernorm", "norm_eps": eps,
        "tie_embeddings": ref.bool("tie_embeddings", True),
        "residual_in_fp32": ref.bool("residual_in_fp32", True),
        "rope_theta": RefConfig(attn_cfg, "mamba_ssm", "attn_cfg.").float("rotary_emb_base", 10000.0),
        "family": "mamba2",
        "extra": {"mamba_ssm_vocab_size": vocab, "pad_vocab_size_multiple": multiple},
    })


def _attention_args(attn: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """mamba_ssm ``MHA`` kwargs -> zoo ``attention`` args, refusing what the zoo mixer cannot express."""
    check_reference_fields(attn, ATTN_CFG_FIELDS, "mamba_ssm", "attn_cfg")
    ref = RefConfig(attn, "mamba_ssm", "attn_cfg.")
    for key, ok, why in (
        ("d_conv", ref.int("d_conv", 0, minimum=0) == 0, "a depthwise causal conv over q|k|v, which the zoo "
                                                         "attention lacks"),
        ("mlp_dim", ref.int("mlp_dim", 0, minimum=0) == 0, "an MLP fused into the attention projections"),
        ("causal", ref.bool("causal", False), "non-causal attention"),
        ("rotary_emb_interleaved", not ref.bool("rotary_emb_interleaved", False), "interleaved (GPT-J) rotary"),
    ):
        if not ok:
            raise ValueError(f"mamba_ssm config: attn_cfg.{key}={attn.get(key)!r} means {why}; not supported "
                             f"(layers {cfg.get('attn_layer_idx')})")
    H = ref.int("num_heads")
    rd = ref.int("rotary_emb_dim", 0, minimum=0)
    args: dict[str, Any] = {"num_heads": H, "num_kv_heads": ref.int("num_heads_kv", H),
                            "head_dim": ref.int("head_dim", None) or cfg["d_model"] // H,
                            "qkv_bias": ref.bool("qkv_proj_bias", True), "o_bias": ref.bool("out_proj_bias", True),
                            "rope": rd > 0}
    if rd:
        args["rotary_dim"] = rd
    if attn.get("softmax_scale") is not None:
        args["softmax_scale"] = ref.float("softmax_scale")
    return args


def _from_transformers(cfg: dict[str, Any]) -> ZooConfig:
    check_reference_fields(cfg, TRANSFORMERS_FIELDS, "transformers mamba2")
    ref = RefConfig(cfg, "transformers mamba2")
    d, expand, hd = ref.int("hidden_size"), ref.int("expand", 2), ref.int("head_dim", 64)
    H = ref.int("num_heads", 128)
    if H * hd != expand * d:
        raise ValueError(f"transformers mamba2 config: num_heads*head_dim={H * hd} != expand*hidden_size={expand * d}")
    if ref.str("hidden_act", "silu") != "silu":
        raise ValueError(f"transformers mamba2 config: hidden_act={cfg['hidden_act']!r} unsupported (only 'silu')")
    eps = ref.float("layer_norm_epsilon", 1e-5)
    limit = cfg.get("time_step_limit", (0.0, float("inf")))
    if not isinstance(limit, (list, tuple)) or len(limit) != 2:
        raise ValueError(f"transformers mamba2 config: time_step_limit={limit!r} must be a pair [low, high]")
    lim = RefConfig({"time_step_limit[0]": limit[0], "time_step_limit[1]": limit[1]}, "transformers mamba2")
    mixer = {"d_state": ref.int("state_size", 128), "d_conv": ref.int("conv_kernel", 4), "expand": expand,
             "headdim": hd, "ngroups": ref.int("n_groups", 8), "bias": ref.bool("use_bias", False),
             "conv_bias": ref.bool("use_conv_bias", True), "chunk_size": ref.int("chunk_size", 256),
             "dt_min": ref.float("time_step_min", 0.001), "dt_max": ref.float("time_step_max", 0.1),
             "dt_init_floor": ref.float("time_step_floor", 1e-4), "norm_eps": eps,
             "dt_limit": (lim.float("time_step_limit[0]", positive=False),
                          lim.float("time_step_limit[1]", finite=False))}
    return ZooConfig.from_dict({
        "vocab_size": ref.int("vocab_size"), "d_model": d, "n_layers": ref.int("num_hidden_layers"),
        "mixers": "mamba2", "mixer_defaults": {"mamba2": mixer}, "norm": "rmsnorm", "norm_eps": eps,
        "tie_embeddings": ref.bool("tie_word_embeddings", False),
        "residual_in_fp32": ref.bool("residual_in_fp32", True),
        "initializer_range": ref.float("initializer_range", 0.02, positive=False),
        "pad_token_id": ref.token_id("pad_token_id"), "bos_token_id": ref.token_id("bos_token_id"),
        "eos_token_id": ref.token_id("eos_token_id", many=True), "family": "mamba2",
    })


def _mixer_args(config: ZooConfig, fmt: str) -> dict[str, Any]:
    """The (shared) Mamba-2 arguments of every mamba2 layer; refuses per-layer differences and mitigations."""
    idx = [i for i, ls in enumerate(config.layers) if ls.mixer == "mamba2"]
    if not idx:
        raise ValueError(f"cannot export to the {fmt} format: the model has no mamba2 layer")
    args = [config.mixer_kwargs(i) for i in idx]
    for i, a in zip(idx, args):
        on = {k: a[k] for k, off in MITIGATIONS.items() if a.get(k, off) != off}
        if on:
            raise ValueError(f"cannot export to the {fmt} format: layer {i} uses inference-time mitigations {on}, "
                             f"which have no field there; turn them off (swap_layers) before exporting")
    first = f"layer {idx[0]}: {config.layers[idx[0]].spec_string}"
    refuse_layers(fmt, config, [i for i, a in zip(idx, args) if a != args[0]],
                  f"one set of Mamba-2 arguments for every mamba2 layer ({first})")
    return {**_mixer_defaults(), **args[0]}


def config_to_reference(config: ZooConfig) -> dict[str, Any]:
    """mamba_ssm ``MambaConfig`` dict (``config.json`` of ``state-spaces/mamba2-*``)."""
    holds = "mamba2 layers (+ mamba_ssm MHA `attention` layers sharing one set of arguments), one MLP shape"
    refuse_layers(SSM_FMT, config, [i for i, ls in enumerate(config.layers)
                                        if ls.mixer not in ("mamba2", "attention")], holds)
    a = _mixer_args(config, SSM_FMT)
    if a["norm_eps"] != 1e-5:
        raise ValueError(f"cannot export to the {SSM_FMT} format: its gated norm eps is fixed at 1e-5, "
                         f"the model uses norm_eps={a['norm_eps']}")
    attn_idx = [i for i, ls in enumerate(config.layers) if ls.mixer == "attention"]
    refuse_layers(SSM_FMT, config, [i for i in attn_idx
                                        if config.mixer_kwargs(i) != config.mixer_kwargs(attn_idx[0])], holds)
    mlp = config.layers[0].mlp
    refuse_layers(SSM_FMT, config, [i for i, ls in enumerate(config.layers) if ls.mlp != mlp], holds)
    if mlp is not None and (not mlp.get("gated", True) or mlp.get("activation", "silu") != "silu" or mlp.get("bias")):
        raise ValueError(f"cannot export to the {SSM_FMT} format: only gated SiLU MLPs without bias, got {mlp}")
    defaults = _mixer_defaults()
    ssm = {"layer": "Mamba2", **{k: _to_json(a[k]) for k in MIXER_ARGS if _norm(a[k]) != _norm(defaults[k])}}
    attn_cfg: dict[str, Any] = {}
    if attn_idx:
        at = config.mixer_kwargs(attn_idx[0])
        attn_cfg = {"num_heads": at["num_heads"], "num_heads_kv": at.get("num_kv_heads") or at["num_heads"],
                    "head_dim": at.get("head_dim") or config.d_model // at["num_heads"], "causal": True,
                    "qkv_proj_bias": at.get("qkv_bias", False), "out_proj_bias": at.get("o_bias", False),
                    "rotary_emb_dim": (at.get("rotary_dim") or at.get("head_dim") or 0) if at.get("rope", True) else 0,
                    "rotary_emb_base": config.rope_theta, "d_conv": 0}
    return {
        "d_model": config.d_model, "d_intermediate": mlp["intermediate_size"] if mlp else 0,
        "n_layer": config.n_layers, "vocab_size": config.vocab_size, "ssm_cfg": ssm,
        "attn_layer_idx": attn_idx, "attn_cfg": attn_cfg, "rms_norm": config.norm == "rmsnorm",
        "residual_in_fp32": config.residual_in_fp32, "fused_add_norm": True, "pad_vocab_size_multiple": 1,
        "tie_embeddings": config.tie_embeddings,
    }


def _mixer_defaults() -> dict[str, Any]:
    """The zoo mixer's constructor defaults, which are mamba_ssm's ``Mamba2`` defaults (the same names and values)."""
    from zoo.config import mixer_parameters
    from zoo.layers.mamba2 import Mamba2

    return {k: p.default for k, p in mixer_parameters(Mamba2).items()}


def _norm(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def _to_json(v: Any) -> Any:
    """A mamba_ssm ``ssm_cfg`` value as strict JSON (mamba_ssm reads plain values only, so there is no way to write
    a non-finite float that both strict parsers and mamba_ssm accept: refused)."""
    if isinstance(v, (list, tuple)):
        return [_to_json(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError(f"cannot export to the {SSM_FMT} format: the value {v} (e.g. a dt_limit bound other than the "
                         "default (0.0, inf)) has no strict-JSON form that mamba_ssm reads")
    return v


def config_to_transformers(config: ZooConfig) -> dict[str, Any]:
    """transformers ``Mamba2Config`` dict."""
    a = _mixer_args(config, "mamba2-transformers")
    bad = [i for i, ls in enumerate(config.layers) if ls.mixer != "mamba2" or ls.mlp is not None]
    refuse_layers("mamba2-transformers", config, bad, "mamba2 layers without MLP")
    defaults = _mixer_defaults()
    unsupported = {k: a[k] for k in ("d_ssm", "D_has_hdim", "norm_before_gate") if a[k] != defaults[k]}
    if not a["rmsnorm"] or unsupported or config.norm != "rmsnorm" or a["norm_eps"] != config.norm_eps:
        raise ValueError(f"cannot export to the transformers mamba2 format: it has no field for {unsupported or a}")
    lim = a["dt_limit"]
    return {
        "architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2",
        "vocab_size": config.vocab_size, "hidden_size": config.d_model, "num_hidden_layers": config.n_layers,
        "num_heads": a["expand"] * config.d_model // a["headdim"], "head_dim": a["headdim"],
        "state_size": a["d_state"], "expand": a["expand"], "conv_kernel": a["d_conv"], "n_groups": a["ngroups"],
        "use_bias": a["bias"], "use_conv_bias": a["conv_bias"], "chunk_size": a["chunk_size"],
        "time_step_min": a["dt_min"], "time_step_max": a["dt_max"], "time_step_floor": a["dt_init_floor"],
        "time_step_limit": [lim[0], lim[1]], "layer_norm_epsilon": config.norm_eps, "hidden_act": "silu",
        "rms_norm": True, "residual_in_fp32": config.residual_in_fp32,
        "tie_word_embeddings": config.tie_embeddings, "initializer_range": config.initializer_range,
        "pad_token_id": config.pad_token_id, "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
    }


# ------------------------------------------------------------------------------------------------ tensors
def from_reference(sd: StateDict, config: ZooConfig) -> StateDict:
    """After renaming: split mamba_ssm's packed MLP ``fc1`` and MHA ``in_proj``; drop a tied ``lm_head``."""
    sd = dict(sd)
    for i, ls in enumerate(config.layers):
        p = f"layers.{i}."
        if ls.mlp is not None and p + "mlp.fc1.weight" in sd:
            up, gate = sd.pop(p + "mlp.fc1.weight").chunk(2, dim=0)
            sd[p + "mlp.up_proj.weight"], sd[p + "mlp.gate_proj.weight"] = up, gate
            sd[p + "mlp.down_proj.weight"] = sd.pop(p + "mlp.fc2.weight")
        if ls.mixer == "attention":
            a = config.mixer_kwargs(i)
            H, Hkv = a["num_heads"], a.get("num_kv_heads") or a["num_heads"]
            hd = a.get("head_dim") or config.d_model // H
            for kind in ("weight", "bias"):
                key = f"{p}mixer.in_proj.{kind}"
                if key in sd:
                    q, k, v = sd.pop(key).split([H * hd, Hkv * hd, Hkv * hd], dim=0)
                    sd[f"{p}mixer.q_proj.{kind}"], sd[f"{p}mixer.k_proj.{kind}"] = q, k
                    sd[f"{p}mixer.v_proj.{kind}"] = v
                key = f"{p}mixer.out_proj.{kind}"
                if key in sd:
                    sd[f"{p}mixer.o_proj.{kind}"] = sd.pop(key)
    return sd


def to_reference(sd: StateDict, config: ZooConfig) -> StateDict:
    """Inverse of :func:`from_reference`; mamba_ssm keeps ``lm_head.weight`` in its state dict even when tied."""
    sd = dict(sd)
    for i, ls in enumerate(config.layers):
        p = f"layers.{i}."
        if ls.mlp is not None:
            sd[p + "mlp.fc1.weight"] = torch.cat([sd.pop(p + "mlp.up_proj.weight"), sd.pop(p + "mlp.gate_proj.weight")])
            sd[p + "mlp.fc2.weight"] = sd.pop(p + "mlp.down_proj.weight")
        if ls.mixer == "attention":
            for kind in ("weight", "bias"):
                parts = [sd.pop(f"{p}mixer.{n}_proj.{kind}", None) for n in ("q", "k", "v")]
                if parts[0] is not None:
                    sd[f"{p}mixer.in_proj.{kind}"] = torch.cat(parts)
                o = sd.pop(f"{p}mixer.o_proj.{kind}", None)
                if o is not None:
                    sd[f"{p}mixer.out_proj.{kind}"] = o
    if config.tie_embeddings and "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd["embedding.weight"]
    return sd


def _hf_to_reference(sd: StateDict, config: ZooConfig) -> StateDict:
    sd = dict(sd)
    if config.tie_embeddings:
        sd.pop("lm_head.weight", None)  # transformers re-ties it on load
    return sd


# ------------------------------------------------------------------------------------------------ presets
def _preset(d: int, n: int, hub: str, desc: str, **kw: Any) -> Preset:
    cfg = {"vocab_size": 50288, "d_model": d, "n_layers": n, "mixers": "mamba2", "mlp": None, "norm": "rmsnorm",
           "norm_eps": 1e-5, "tie_embeddings": True, "residual_in_fp32": True, "family": "mamba2",
           "mixer_defaults": {"mamba2": {"norm_eps": 1e-5}},
           "extra": {"mamba_ssm_vocab_size": 50277, "pad_vocab_size_multiple": 16}, **kw}
    return Preset(cfg, hub_id=hub, description=desc)


_ATTN_2P7B = {"num_heads": 30, "num_kv_heads": 30, "head_dim": 128, "rotary_dim": 64, "qkv_bias": False,
              "o_bias": False}
PRESETS = {
    "mamba2-130m": _preset(768, 24, "state-spaces/mamba2-130m", "Mamba-2 130M (24 x 768, Pile 300B)"),
    "mamba2-370m": _preset(1024, 48, "state-spaces/mamba2-370m", "Mamba-2 370M (48 x 1024)"),
    "mamba2-780m": _preset(1536, 48, "state-spaces/mamba2-780m", "Mamba-2 780M (48 x 1536)"),
    "mamba2-1.3b": _preset(2048, 48, "state-spaces/mamba2-1.3b", "Mamba-2 1.3B (48 x 2048)"),
    "mamba2-2.7b": _preset(2560, 64, "state-spaces/mamba2-2.7b", "Mamba-2 2.7B (64 x 2560)"),
    "mamba2attn-2.7b": _preset(
        2560, 64, None,  # the published checkpoint's MHA has a qkv conv (d_conv 4) the zoo attention lacks
        "Mamba-2 + 6 attention layers 2.7B architecture (zoo attention without mamba_ssm's qkv conv: "
        "random init only; state-spaces/mamba2attn-2.7b does not load)",
        mixers={"default": "mamba2", "9,18,27,36,45,56": {"mixer": "attention", "mixer_args": _ATTN_2P7B}}),
}


# ------------------------------------------------------------------------------------------------ benchmarks
# References for ``zoo bench``, built from the zoo mixer with the same weights (imports lazy).
class HFMamba2Adapter(Adapter):
    """transformers ``Mamba2Mixer`` (its pure-torch path off-GPU) continued through a ``DynamicCache``."""

    def __init__(self, mixer: nn.Module, config: Any) -> None:
        self.module, self.config = mixer, config

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x)

    def new_state(self, max_length: int) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.config)

    def step(self, x: Tensor, state: Any) -> Tensor:
        return self.module(x, cache=state)


@register_reference("transformers_mamba2", preload=("transformers", "transformers.modeling_utils",
                                                     "transformers.cache_utils",
                                                     "transformers.models.mamba2.modeling_mamba2"))
def bench_transformers_mamba2(zoo_module: nn.Module, args: dict[str, Any], batch: int) -> Adapter:
    """transformers Mamba2Mixer (torch path off-GPU) with the zoo mixer's weights."""
    from transformers import Mamba2Config
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    kwargs = {k: v for k, v in args.items() if k != "d_model"}
    one = ZooConfig(vocab_size=256, d_model=args["d_model"], n_layers=1, family="mamba2",
                    norm_eps=kwargs.get("norm_eps", 1e-5), layers=[LayerSpec("mamba2", kwargs, None)])
    cfg = Mamba2Config(**config_to_transformers(one))
    ref = Mamba2Mixer(cfg, 0)
    load_same_weights(ref, zoo_module.state_dict(), what="transformers Mamba2Mixer")
    return HFMamba2Adapter(ref, cfg)


@register_reference("mamba_ssm", scope="kernel", gpu_only=True)
def bench_mamba_ssm(zoo_module: nn.Module, args: dict[str, Any], batch: int) -> Adapter:
    """mamba_ssm's mamba_chunk_scan_combined (the SSD scan alone) on the mixer's shapes, CUDA only."""
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    m = zoo_module
    H, P, N, G, Q = m.nheads, m.headdim, m.d_state, m.ngroups, m.chunk_size

    def inputs(x: Tensor) -> list[Tensor]:  # x [B, T, H*P]: dt, A, B, C, D of the scan
        B, T, dev, dt_ = x.shape[0], x.shape[1], x.device, x.dtype
        return [torch.rand(B, T, H, device=dev, dtype=dt_).requires_grad_(),
                -torch.rand(H, device=dev, dtype=torch.float32).requires_grad_(),
                torch.randn(B, T, G, N, device=dev, dtype=dt_).requires_grad_(),
                torch.randn(B, T, G, N, device=dev, dtype=dt_).requires_grad_(),
                torch.randn(H, device=dev, dtype=torch.float32).requires_grad_()]

    def fn(x: Tensor, dt: Tensor, A: Tensor, Bm: Tensor, Cm: Tensor, D: Tensor) -> Tensor:
        return mamba_chunk_scan_combined(x.view(x.shape[0], x.shape[1], H, P), dt, A, Bm, Cm, Q, D=D)

    # C B^T within a chunk, its masked product with X, B^T X into chunk states, C h out of them (Mamba2.flops)
    return KernelAdapter(fn, width=H * P, inputs=inputs,
                         flops=lambda T, B: 2 * B * T * (Q * G * N + Q * H * P + 2 * H * P * N))


def _bench_hybrid(size: str, vocab: int, inter: int) -> dict[str, Any]:
    heads, ssm = Attention.bench_cases[0].args[size], Mamba2.bench_cases[0].args[size]
    if heads["d_model"] != ssm["d_model"]:
        raise ValueError("the attention and mamba2 bench cases must share d_model")
    drop = lambda a: {k: v for k, v in a.items() if k != "d_model"}  # noqa: E731
    return {"vocab_size": vocab, "d_model": ssm["d_model"], "n_layers": 2,
            "layers": [{"mixer": "mamba2", "mixer_args": drop(ssm), "mlp": None},
                       {"mixer": "attention", "mixer_args": drop(heads), "mlp": {"intermediate_size": inter}}]}


class HFMamba2ModelAdapter(HFMamba2Adapter):
    """transformers ``Mamba2ForCausalLM`` (torch path off-GPU) continued through a ``DynamicCache``; a step returns
    the last token's logits (``logits_to_keep=1``), as the zoo model's decode step and prefill do."""

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x, use_cache=False).logits

    def step(self, x: Tensor, state: Any) -> Tensor:
        return self.module(x, cache=state, use_cache=True, logits_to_keep=1).logits[:, -1]


@register_reference("transformers_mamba2_model", preload=("transformers", "transformers.modeling_utils",
                                                           "transformers.models.mamba2.modeling_mamba2"))
def bench_transformers_mamba2_model(zoo_model: nn.Module, args: dict[str, Any], batch: int) -> Adapter:
    """transformers Mamba2ForCausalLM (torch path off-GPU) with the zoo model's weights."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    cfg = Mamba2Config(**config_to_transformers(zoo_model.config))
    ref = Mamba2ForCausalLM(cfg)
    sd = TRANSFORMERS_FORMAT.state_dict_to_reference(zoo_model.state_dict(), zoo_model.config)
    if cfg.tie_word_embeddings:
        sd["lm_head.weight"] = sd.get("lm_head.weight", sd["backbone.embeddings.weight"])
    load_same_weights(ref, sd, what="transformers Mamba2ForCausalLM")
    return HFMamba2ModelAdapter(ref, cfg)


def _bench_stack(size: str) -> dict[str, Any]:
    """The mamba2-130m shape (24 x 768, vocab 50288) with random weights; 2 x 64 in the quick size."""
    cfg = PRESETS["mamba2-130m"].config if size == "full" else {
        **PRESETS["mamba2-130m"].config, "d_model": 64, "n_layers": 2, "vocab_size": 256,
        "mixer_defaults": {"mamba2": {"norm_eps": 1e-5, "d_state": 16, "headdim": 16, "chunk_size": 16}}}
    return {k: v for k, v in cfg.items() if k not in ("extra",)}


# export-only variant for the transformers layout (``zoo convert --to mamba2-transformers``)
TRANSFORMERS_FORMAT = Family(
    name="mamba2-transformers", detect=lambda cfg: cfg.get("model_type") == "mamba2",
    config_from_reference=config_from_reference, config_to_reference=config_to_transformers,
    key_table=TRANSFORMERS_KEYS, from_reference=from_reference, to_reference=_hf_to_reference,
    reference_weights_name="model.safetensors", model_card="mamba2", citations=(MAMBA2_CITATION,),
    positions_past_max="allow",
)
FAMILY = Family(
    name="mamba2", detect=detect, config_from_reference=config_from_reference,
    config_to_reference=config_to_reference, key_table=MAMBA_SSM_KEYS, presets=PRESETS,
    from_reference=from_reference, to_reference=to_reference, reference_weights_name="pytorch_model.bin",
    model_card="mamba2", export_formats={"mamba2-transformers": TRANSFORMERS_FORMAT},
    shardable=False,  # mamba_ssm's loader reads one pytorch_model.bin
    citations=(MAMBA2_CITATION,),
    positions_past_max="allow",  # mamba_ssm has no position limit (attention layers of hybrids included)
    bench_cases=(BenchCase(
        kind="model", name="hybrid_model", reference=None,
        args={"full": _bench_hybrid("full", 4096, 2048), "quick": _bench_hybrid("quick", 256, 128)},
        description="ZooForCausalLM with [mamba2, attention + MLP] blocks (no reference)"),
        BenchCase(
            kind="model", name="mamba2_model", reference="transformers_mamba2_model", phases=("decode",),
            lengths=(1024, 4096), args={"full": _bench_stack("full"), "quick": _bench_stack("quick")},
            description="the mamba2-130m shape (24 x 768, random weights) vs transformers Mamba2ForCausalLM: "
                        "decode against the weight-streaming floor")),
)


def save_mamba_ssm(model, path: str | os.PathLike) -> Path:
    """Write a ``state-spaces/mamba2-*`` style directory: ``config.json`` + ``pytorch_model.bin`` (plain tensors)."""
    return save_reference(model, path, FAMILY)


def save_transformers(model, path: str | os.PathLike) -> Path:
    """Write a transformers ``Mamba2ForCausalLM`` directory: ``config.json`` + ``model.safetensors``."""
    return save_reference(model, path, TRANSFORMERS_FORMAT)


# ------------------------------------------------------------------------------------------------ mitigations
@torch.no_grad()
def calibrate_state_norm(model, input_ids: Tensor, multiplier: float = 2.0, *, apply: bool = True
                         ) -> dict[int, list[float]]:
    """Stuffed Mamba method 2: run ``input_ids`` (a calibration prompt, ``[B, T]``) with states, take every mamba2
    layer's final per-head state norm ``||S||_F`` (max over the batch) times ``multiplier`` as that layer's
    thresholds. With ``apply`` they are set on the mixers and in ``model.config`` (so a save keeps them).
    (The released code stores the multiplier but never applies it; here it is applied.)"""
    from zoo.layers.mamba2 import Mamba2

    if not multiplier > 0 or math.isinf(multiplier):
        raise ValueError(f"calibrate_state_norm: multiplier={multiplier!r} must be a positive finite float")
    idx = [i for i, blk in enumerate(model.layers) if isinstance(blk.mixer, Mamba2)]
    if not idx:
        raise ValueError("calibrate_state_norm: the model has no mamba2 layer")
    saved = {i: model.layers[i].mixer.state_norm_threshold for i in idx}
    for i in idx:  # calibrate on the unnormalised states
        model.layers[i].mixer.state_norm_threshold = None
    try:
        states = model.init_states(input_ids.shape[0])
        model(input_ids, states=states)
    finally:
        for i in idx:
            model.layers[i].mixer.state_norm_threshold = saved[i]
    out = {}
    for i in idx:
        norms = torch.linalg.vector_norm(states.layers[i].ssm_state.float(), dim=(-2, -1)).amax(0)  # [H]
        out[i] = [float(v) * multiplier for v in norms.clamp_min(1e-6)]
    if apply:
        for i, thr in out.items():
            if model.layers[i].mixer.state_window:
                raise ValueError(f"calibrate_state_norm: layer {i} uses state_window, which excludes state norm")
            model.layers[i].mixer.state_norm_threshold = thr
            model.config.layers[i].mixer_args["state_norm_threshold"] = thr
    return out
