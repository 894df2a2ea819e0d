"""The S4 family: ``state-spaces/s4`` sequence models (S4 / S4D blocks, optionally interleaved with MLPs).

Reference layouts (``state-spaces/s4``), all mapped onto the zoo ``s4`` mixer, whose own names are the
reference ``FFTConv`` / ``S4Block`` ones (``kernel.{inv_dt,C,B,A_real,A_imag,P,l_kernel}``, ``D``,
``output_linear.0.*``):

* the training framework's ``SequenceModel`` backbone (``src/models/sequence/backbones/model.py``), e.g. the
  WikiText-103 LM: residual pre-norm blocks ``model.layers.{i}`` holding an ``S4Block`` (``.layer.layer.kernel.*``,
  ``.layer.layer.D``, ``.layer.output_linear.0.*``) or an ``FFN`` (``.layer.ff.0.0.*`` = Linear + GELU,
  ``.layer.ff.2.*``), each with its ``.norm.norm.*`` LayerNorm, and ``model.norm.norm.*``. An S4 block followed
  by an FFN block becomes one zoo block (mixer + MLP): ``[s4, s4, ffn] x 16`` -> 32 zoo blocks. The block
  interleaving is the one real transform (:func:`from_reference`); the key table is prefix renames.
  The framework's adaptive input / softmax (``encoder.*``, ``loss.*``: cutoffs, ``div_val``) has no zoo
  counterpart and is refused; ``embedding.*`` / ``lm_head.*`` are read under the zoo names.
  ``config.json`` for this layout is the framework's Hydra config as JSON: ``{"model": {"_name_": "model",
  "d_model", "n_layers", "prenorm", "norm", "layer": [...]}, "vocab_size": ...}``.
* a standalone ``S4Block`` (``models/s4/s4.py``): :func:`mixer_from_s4block` (``layer.kernel.`` -> ``kernel.``,
  ``layer.D`` -> ``D``).
* the minimal ``S4D`` (``models/s4/s4d.py``): :func:`mixer_from_s4d` with its real transforms (``log_dt [H]`` ->
  ``inv_dt [H, 1]``; its ``A = -exp(log_A_real) + i A_imag`` is the conjugate of the zoo's, so ``C`` is conjugated;
  B = 1; ``D [H]`` -> ``[1, H]``; the Conv1d ``output_linear.0.weight [2H, H, 1]`` squeezed).
* V3 checkpoints: :func:`v3_to_v4` (the reference's ``checkpoints/convert_v3_to_v4.py`` renames; V3 used
  ``dt = exp(log_dt)``, so converted weights need ``dt_transform="exp"``).

Presets: ``s4-wt103`` (the reference WikiText-103 model's shape: d_model 1024, ``[s4, s4, ffn(4x, GELU)] x 16``,
LayerNorm pre-norm, ``l_max`` 8192, ``n_ssm`` 1, softplus dt; plain tied embedding instead of the adaptive
input/softmax), ``s4d-wt103`` (S4D-Lin, ``configs/model/layer/s4d.yaml``) and ``s4d-legs-wt103``.
"""

from __future__ import annotations

from typing import Any

import torch

from zoo.config import ZooConfig
from zoo.layers.s4 import CITATIONS
from zoo.models.family import Family, Preset, RefConfig, StateDict, check_reference_fields, refuse_layers, rename_keys

# reference -> zoo prefixes; "blocks.{i}" are the reference's residual blocks, re-indexed by from_reference
KEY_TABLE = [
    ("model.layers.{i}.layer.output_linear.", "blocks.{i}.mixer.output_linear."),
    ("model.layers.{i}.layer.layer.", "blocks.{i}.mixer."),
    ("model.layers.{i}.layer.ff.0.0.", "blocks.{i}.mlp.up_proj."),
    ("model.layers.{i}.layer.ff.2.", "blocks.{i}.mlp.down_proj."),
    ("model.layers.{i}.norm.norm.", "blocks.{i}.norm."),
    ("model.norm.norm.", "norm_f."),
    ("embedding.", "embedding."),
    ("lm_head.", "lm_head."),
    ("encoder.", "unsupported.encoder."),
    ("loss.", "unsupported.loss."),
]
S4BLOCK_KEYS = [("layer.kernel.", "kernel."), ("layer.D", "D"), ("output_linear.", "output_linear.")]

# reference S4 layer options -> zoo s4 arguments (same names unless mapped)
LAYER_ARGS = ("d_state", "channels", "l_max", "mode", "init", "rank", "n_ssm", "dt_min", "dt_max", "dt_tie",
              "dt_transform", "disc", "real_transform", "imag_transform", "activation", "final_act", "swap_channels")
IGNORED = ("_name_", "dropout", "tie_dropout", "lr", "wd", "verbose", "transposed", "layer", "initializer",
           "weight_norm", "drop_kernel", "deterministic", "backend", "dt_fast")
ALIASES = {"measure": "init", "postact": "final_act"}  # deprecated reference names
# SequenceModel fields that do not change the forward pass (training / layout only); every other unknown one is refused
MODEL_NEUTRAL = ("_name_", "transposed", "dropout", "tie_dropout", "track_norms", "dropinp")
FFN_FIELDS = ("_name_", "expand", "activation", "dropout", "tie_dropout", "transposed", "initializer", "d_output")
NEUTRAL = {"gate": (None,), "bottleneck": (None,), "mult_act": (None, "id"), "gate_act": (None, "id"),
           "bidirectional": (False,), "bandlimit": (None,), "is_real": (False,)}


# ------------------------------------------------------------------------------------------------ config maps
def detect(cfg: dict[str, Any]) -> bool:
    model = cfg.get("model")
    if not isinstance(model, dict) or model.get("_name_") != "model":
        return False
    layers = model.get("layer") or []
    return any(isinstance(ly, dict) and ly.get("_name_") == "s4" for ly in (layers if isinstance(layers, list)
                                                                              else [layers]))


def _s4_args(ly: dict[str, Any], i: int) -> dict[str, Any]:
    unknown = sorted(set(ly) - set(LAYER_ARGS) - set(IGNORED) - set(ALIASES) - set(NEUTRAL))
    if unknown:
        raise ValueError(f"s4 reference config: layer {i} has unsupported options {unknown}")
    for k, ok in NEUTRAL.items():
        if ly.get(k, ok[0]) not in ok:
            raise ValueError(f"s4 reference config: layer {i} sets {k}={ly[k]!r}, which the causal zoo s4 mixer "
                             f"does not have (allowed: {list(ok)})")
    args = {k: ly[k] for k in LAYER_ARGS if k in ly}
    args.update({new: ly[old] for old, new in ALIASES.items() if ly.get(old) is not None})
    args.setdefault("activation", "gelu")
    return args


def _ffn_mlp(ly: dict[str, Any], i: int, d: int) -> dict[str, Any]:
    ref = RefConfig(ly, "s4", f"model.layer[{i}].")
    check_reference_fields(ly, FFN_FIELDS, "s4", f"config.json model.layer[{i}] (ffn)")
    if ly.get("d_output") not in (None, d):
        raise ref.fail("d_output", ly["d_output"], f"null or d_model={d} (a residual block)")
    act = ref.str("activation", "gelu")
    if act not in ("gelu", "relu", "silu"):
        raise ValueError(f"s4 reference config: ffn layer {i} activation={act!r} is not supported")
    size = ref.float("expand", 2.0) * d
    if size != int(size):
        raise ref.fail("expand", ly["expand"], f"a multiple of 1/d_model={d} (expand * d_model is the FFN width)")
    return {"intermediate_size": int(size), "activation": act, "gated": False, "bias": True}


def config_from_reference(cfg: dict[str, Any]) -> ZooConfig:
    top = RefConfig(cfg, "s4")
    model, ref = cfg["model"], RefConfig(cfg["model"], "s4", "model.")
    check_reference_fields(model, (*MODEL_NEUTRAL, "d_model", "n_layers", "prenorm", "norm", "residual", "n_repeat",
                                   "layer", "bidirectional", "pool"), "s4", "config.json model")
    if not ref.bool("prenorm", True):
        raise ValueError("s4 reference config: model.prenorm=false (post-norm) has no zoo counterpart")
    if ref.bool("bidirectional", False) or model.get("pool") is not None:
        raise ValueError("s4 reference config: model.bidirectional / model.pool have no counterpart in a causal LM")
    norm, eps = model.get("norm", "layer"), 1e-5
    if isinstance(norm, dict):
        nref = RefConfig(norm, "s4", "model.norm.")
        check_reference_fields(norm, ("_name_", "eps", "elementwise_affine"), "s4", "config.json model.norm")
        if not nref.bool("elementwise_affine", True):
            raise ValueError("s4 reference config: model.norm.elementwise_affine=false is not supported")
        norm, eps = norm.get("_name_", "layer"), nref.float("eps", 1e-5)
    if norm != "layer":
        raise ValueError(f"s4 reference config: model.norm={norm!r} is not supported (only 'layer')")
    if model.get("residual", "R") not in ("R", None) or model.get("n_repeat", 1) != 1:
        raise ValueError("s4 reference config: only the plain residual ('R') and n_repeat=1 are supported")
    d = ref.int("d_model")
    n_layers = ref.int("n_layers", 1)
    vocab = top.int("vocab_size")
    pattern = model["layer"] if isinstance(model["layer"], list) else [model["layer"]]
    if len(pattern) * n_layers > 1_000_000:
        raise ValueError(f"s4 reference config: model.n_layers={n_layers} x {len(pattern)} layers is absurd")
    kinds = []  # each pattern entry converted once (the pattern repeats n_layers times)
    for i, ly in enumerate(pattern):
        name = ly.get("_name_") if isinstance(ly, dict) else None
        if name == "s4":
            kinds.append(("s4", _s4_args(ly, i)))
        elif name in ("ffn", "ff"):
            kinds.append(("ffn", _ffn_mlp(ly, i, d)))
        else:
            kinds.append((name, None))
    flat = [kinds[i % len(kinds)] for i in range(len(kinds) * n_layers)]
    layers: list[dict[str, Any]] = []
    for i, (name, args) in enumerate(flat):
        if name == "s4":
            layers.append({"mixer": "s4", "mixer_args": dict(args), "mlp": None})
        elif name == "ffn" and layers and layers[-1]["mlp"] is None:
            layers[-1]["mlp"] = dict(args)
        else:
            raise ValueError(f"s4 reference config: layer {i} ({name!r}) cannot be placed: zoo blocks are an s4 "
                             f"mixer optionally followed by one ffn")
    return ZooConfig.from_dict({
        "vocab_size": vocab, "d_model": d, "n_layers": len(layers), "layers": layers,
        "norm": "layernorm", "norm_eps": eps, "tie_embeddings": top.bool("tie_embeddings", True),
        "family": "s4", "extra": {"reference_layers": [name for name, _ in flat]},
    })


def config_to_reference(config: ZooConfig) -> dict[str, Any]:
    def fits(ls: Any) -> bool:
        m = ls.mlp
        return ls.mixer == "s4" and (m is None or (not m.get("gated", True) and m.get("bias", False)))

    refuse_layers("s4", config, [i for i, ls in enumerate(config.layers) if not fits(ls)],
                  "s4 mixers, each optionally followed by the reference FFN (ungated, with bias)")
    if config.norm != "layernorm" or config.embedding_scale != 1 or config.residual_scale != 1 or \
            config.logit_scale != 1:
        raise ValueError("cannot export to the s4 format: LayerNorm pre-norm and no embedding/residual/logit scales")
    flat: list[dict[str, Any]] = []
    for i, ls in enumerate(config.layers):
        flat.append({"_name_": "s4", **config.mixer_kwargs(i)})
        if ls.mlp is not None:
            flat.append({"_name_": "ffn", "expand": ls.mlp["intermediate_size"] / config.d_model,
                         "activation": ls.mlp.get("activation", "silu")})
    return {"model": {"_name_": "model", "d_model": config.d_model, "n_layers": 1, "prenorm": True,
                      "norm": "layer", "residual": "R", "layer": flat},
            "vocab_size": config.vocab_size, "tie_embeddings": config.tie_embeddings}


# ------------------------------------------------------------------------------------------------ tensors
def _block_map(config: ZooConfig) -> list[tuple[int, str]]:
    """Reference block index -> (zoo layer, "mixer" | "mlp")."""
    out = []
    for j, ls in enumerate(config.layers):
        out.append((j, "mixer"))
        if ls.mlp is not None:
            out.append((j, "mlp"))
    return out


def from_reference(sd: StateDict, config: ZooConfig) -> StateDict:
    """Re-index the reference blocks onto zoo blocks (an FFN block's norm is the zoo block's ``mlp_norm``)."""
    bad = sorted(k for k in sd if k.startswith("unsupported."))
    if bad:
        raise ValueError(f"s4 checkpoint: {[k[len('unsupported.'):] for k in bad[:4]]}... belong to the adaptive "
                         f"input embedding / softmax of the reference LM task, which the zoo model does not have")
    blocks = _block_map(config)
    out: StateDict = {}
    for k, v in sd.items():
        if not k.startswith("blocks."):
            out[k] = v
            continue
        _, i, rest = k.split(".", 2)
        if int(i) >= len(blocks):
            raise ValueError(f"s4 checkpoint: {k!r} is beyond the config's {len(blocks)} reference blocks")
        j, part = blocks[int(i)]
        if rest.startswith("norm."):
            rest = ("norm." if part == "mixer" else "mlp_norm.") + rest[len("norm."):]
        out[f"layers.{j}.{rest}"] = v
    return out


def to_reference(sd: StateDict, config: ZooConfig) -> StateDict:
    index = {blk: i for i, blk in enumerate(_block_map(config))}
    out: StateDict = {}
    for k, v in sd.items():
        if not k.startswith("layers."):
            out[k] = v
            continue
        _, j, rest = k.split(".", 2)
        part = "mlp" if rest.startswith(("mlp.", "mlp_norm.")) else "mixer"
        if rest.startswith("mlp_norm."):
            rest = "norm." + rest[len("mlp_norm."):]
        out[f"blocks.{index[(int(j), part)]}.{rest}"] = v
    if config.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def mixer_from_s4block(sd: StateDict) -> StateDict:
    """A standalone ``S4Block`` state dict -> the zoo ``s4`` mixer's (prefix renames)."""
    return rename_keys(sd, S4BLOCK_KEYS, source="S4Block")


def mixer_to_s4block(sd: StateDict) -> StateDict:
    return rename_keys(sd, [(b, a) for a, b in S4BLOCK_KEYS], source="zoo s4 mixer")


def mixer_from_s4d(sd: StateDict) -> tuple[StateDict, dict[str, Any]]:
    """The minimal ``models/s4/s4d.py`` ``S4D`` state dict -> (zoo ``s4`` mixer state dict, mixer arguments)."""
    need = {"D", "kernel.C", "kernel.log_dt", "kernel.log_A_real", "kernel.A_imag", "output_linear.0.weight",
            "output_linear.0.bias"}
    if set(sd) != need:
        raise ValueError(f"not an s4d.py S4D state dict: expected keys {sorted(need)}, got {sorted(sd)}")
    c = sd["kernel.C"]
    H, N = c.shape[:2]
    B = torch.zeros(1, H, N, 2, dtype=c.dtype)
    B[..., 0] = 1
    out = {
        "D": sd["D"][None].clone(), "kernel.inv_dt": sd["kernel.log_dt"][:, None].clone(),
        "kernel.C": torch.stack([c[..., 0], -c[..., 1]], -1)[None],  # A -> conj(A) needs C -> conj(C)
        "kernel.B": B,
        "kernel.A_real": sd["kernel.log_A_real"].clone(), "kernel.A_imag": sd["kernel.A_imag"].clone(),
        "output_linear.0.weight": sd["output_linear.0.weight"][..., 0].clone(),
        "output_linear.0.bias": sd["output_linear.0.bias"].clone(),
    }
    args = {"d_state": 2 * N, "mode": "diag", "init": "diag-lin", "disc": "zoh", "dt_transform": "exp",
            "real_transform": "exp", "imag_transform": "none", "activation": "gelu", "final_act": "glu"}
    return out, args


def v3_to_v4(sd: StateDict) -> StateDict:
    """V3 names -> V4 (``checkpoints/convert_v3_to_v4.py``): ``log_dt [H]`` -> ``inv_dt [H, 1]``,
    ``inv_w_real`` / ``log_w_real`` -> ``A_real``, ``w_imag`` -> ``A_imag`` negated, ``kernel.kernel.L`` ->
    ``kernel.l_kernel``, ``kernel.kernel.`` -> ``kernel.``, ``layer.kernel`` / ``layer.D`` one level deeper."""
    out: StateDict = {}
    for k, v in sd.items():
        if "log_dt" in k:
            v, k = v.unsqueeze(-1), k.replace("log_dt", "inv_dt")
        k = k.replace("inv_w_real", "A_real").replace("log_w_real", "A_real").replace("w_imag", "A_imag")
        if k.endswith("A_imag"):
            v = -v
        k = k.replace("kernel.kernel.L", "kernel.kernel.l_kernel").replace("kernel.kernel", "kernel")
        k = k.replace("layer.kernel", "layer.layer.kernel").replace("layer.D", "layer.layer.D")
        out[k] = v
    return out


# ------------------------------------------------------------------------------------------------ presets
def _wt103(**s4: Any) -> dict[str, Any]:
    """``configs/experiment/lm/s4-wt103.yaml``: 16 x [s4, s4, ffn(expand 4, GELU)], d_model 1024, pre-norm."""
    mlp = {"intermediate_size": 4096, "activation": "gelu", "gated": False, "bias": True}
    layers = [{"mixer": "s4", "mixer_args": {}, "mlp": mlp if i % 2 else None} for i in range(32)]
    args = {"d_state": 64, "l_max": 8192, "n_ssm": 1, "dt_transform": "softplus", "final_act": "glu",
            "activation": "gelu", **s4}
    return {"vocab_size": 267735, "d_model": 1024, "n_layers": 32, "layers": layers, "mixer_defaults": {"s4": args},
            "norm": "layernorm", "norm_eps": 1e-5, "tie_embeddings": True, "max_position_embeddings": 8192,
            "family": "s4"}


PRESETS = {
    "s4-wt103": Preset(_wt103(), description="S4 LM in the shape of the reference WikiText-103 model (48 residual "
                       "blocks = 32 zoo blocks, 204M parameters without the embedding; a plain tied 267735 x 1024 "
                       "embedding instead of the reference's adaptive input/softmax)"),
    "s4d-wt103": Preset(_wt103(mode="diag", init="diag-lin"), description="the same LM with S4D-Lin layers "
                        "(configs/model/layer/s4d.yaml)"),
    "s4d-legs-wt103": Preset(_wt103(mode="diag", init="legs"), description="the same LM with S4D-LegS layers"),
}

FAMILY = Family(
    name="s4",
    detect=detect,
    config_from_reference=config_from_reference,
    config_to_reference=config_to_reference,
    key_table=KEY_TABLE,
    presets=PRESETS,
    from_reference=from_reference,
    to_reference=to_reference,
    reference_weights_name="pytorch_model.bin",
    model_card="s4",
    shardable=False,  # the reference reads one torch.load file
    # no position encoding: the SSM is defined at every length (past l_max the reference's convolution mode truncates
    # its kernel to l_max taps while the zoo keeps the full SSM: see zoo/layers/s4.py), so no position limit
    positions_past_max="allow",
    citations=CITATIONS,
)
