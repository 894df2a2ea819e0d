"""Model configuration: :class:`ZooConfig` (model-wide fields) and :class:`LayerSpec` (one per block).

A config is plain data with a JSON round trip. Every field is validated at construction, so that a bad
mixer name, argument or size fails here with a message naming the field, the value and what is allowed,
never deep inside a forward pass.

Per-layer mixers have a short form::

    ZooConfig.from_dict({..., "mixers": {"default": "attention", "0-3,8": "sliding_window(window=1024)"}})

and mixer arguments shared by many layers live in ``mixer_defaults``, keyed by the mixer's argument group
(all attention variants share the group ``"attention"``, so swapping between them reuses one set of head
sizes): ``mixer_defaults={"attention": {"num_heads": 32, "num_kv_heads": 8}}``.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import inspect
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from zoo.registry import get_mixer, get_preset_entry, list_mixers
from zoo.version import __version__

NORMS = ("rmsnorm", "layernorm")
MLP_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
MLP_FIELDS = {"intermediate_size": int, "activation": str, "gated": bool, "bias": bool}
# Model-wide values handed to every mixer whose constructor takes an argument of that name.
CONTEXT_FIELDS = ("rope_theta", "rope_scaling", "max_position_embeddings")
# RoPE scaling variants (transformers' ``rope_scaling``; the key ``rope_type``, or the older ``type``; computed in
# zoo.layers.rope) and their fields: name -> (required, kind) with kind "pos" (a positive finite number), "int" (a
# positive int), "num" (a finite number), "bool", or "factors" (a non-empty list of positive numbers).
ROPE_SCALING: dict[str, dict[str, tuple[bool, str]]] = {
    "default": {},
    "linear": {"factor": (True, "pos")},
    "llama3": {"factor": (True, "pos"), "low_freq_factor": (True, "pos"), "high_freq_factor": (True, "pos"),
               "original_max_position_embeddings": (True, "int")},
    "yarn": {"factor": (False, "pos"), "original_max_position_embeddings": (False, "int"),
             "attention_factor": (False, "pos"), "mscale": (False, "num"), "mscale_all_dim": (False, "num"),
             "beta_fast": (False, "pos"), "beta_slow": (False, "pos"), "truncate": (False, "bool")},
    "longrope": {"short_factor": (True, "factors"), "long_factor": (True, "factors"), "factor": (False, "pos"),
                 "original_max_position_embeddings": (False, "int"), "attention_factor": (False, "pos")},
    "dynamic": {"factor": (True, "pos"), "original_max_position_embeddings": (False, "int")},
}
LAYER_FIELDS = ("mixer", "mixer_args", "mlp")
# A sanity bound checked before a layer list is built (the largest published models have a few hundred layers).
MAX_LAYERS = 1_000_000
# ``model_type`` of zoo checkpoints (registered with transformers' Auto classes by ``zoo.hf``; no transformers type).
MODEL_TYPE = "zoo"


def parse_mixer_spec(spec: str | dict) -> tuple[str, dict[str, Any]]:
    """``"sliding_window(window=1024, num_sink_tokens=4)"`` -> ``("sliding_window", {...})``.

    Also accepts ``{"mixer": name, "mixer_args": {...}}``. Argument values are Python literals.
    """
    if isinstance(spec, dict):
        if not isinstance(spec.get("mixer"), str) or not isinstance(spec.get("mixer_args", {}), dict):
            raise ValueError(f"mixer spec {spec!r} must look like {{'mixer': name, 'mixer_args': {{...}}}}")
        return spec["mixer"], dict(spec.get("mixer_args", {}))
    if not isinstance(spec, str):
        raise ValueError(f"mixer spec {spec!r} must be a string like 'sliding_window(window=1024)' or a dict")
    m = re.fullmatch(r"\s*([A-Za-z_][\w]*)\s*(?:\((.*)\))?\s*", spec, flags=re.S)
    if not m:
        raise ValueError(f"cannot parse mixer spec {spec!r}; expected 'name' or 'name(key=value, ...)'")
    name, argstr = m.group(1), m.group(2)
    args: dict[str, Any] = {}
    if argstr and argstr.strip():
        try:
            call = ast.parse(f"f({argstr})", mode="eval").body
            assert isinstance(call, ast.Call) and not call.args
            args = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
        except (SyntaxError, ValueError, AssertionError):
            raise ValueError(
                f"cannot parse the arguments of mixer spec {spec!r}; use keyword literals like window=1024"
            ) from None
    return name, args


def parse_layer_selector(selector: str, n_layers: int) -> list[int]:
    """``"0-3,8"`` -> ``[0, 1, 2, 3, 8]``; ``"all"`` -> every layer; negative indices count from the end."""
    if not isinstance(selector, str) and not _int(selector):
        raise ValueError(f"bad layer selector {selector!r}: use an index or a string like '0-3,8'")
    if selector in ("all", "default", "*"):
        return list(range(n_layers))
    out: list[int] = []
    for part in str(selector).split(","):
        part = part.strip()
        m = re.fullmatch(r"(-?\d+)(?:-(-?\d+))?", part)
        if not m:
            raise ValueError(f"bad layer selector {selector!r}: {part!r} is not an index or a range like '0-3'")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        lo, hi = (i + n_layers if i < 0 else i for i in (lo, hi))
        if not (0 <= lo <= hi < n_layers):
            raise ValueError(f"layer selector {selector!r} is out of range for n_layers={n_layers}")
        out.extend(range(lo, hi + 1))
    return sorted(set(out))


@dataclass
class LayerSpec:
    """One block: a mixer (by registry name) with its arguments, and an optional MLP (``None``: no MLP)."""

    mixer: str = "attention"
    mixer_args: dict[str, Any] = field(default_factory=dict)
    mlp: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"mixer": self.mixer, "mixer_args": _copy(self.mixer_args), "mlp": _copy(self.mlp)}

    @property
    def spec_string(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in sorted(self.mixer_args.items()))
        return f"{self.mixer}({args})" if args else self.mixer


@dataclass
class ZooConfig:
    vocab_size: int = 32000
    d_model: int = 512
    n_layers: int = 4
    layers: list[LayerSpec] = field(default_factory=list)
    mixer_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    embedding_scale: float = 1.0
    residual_scale: float = 1.0
    logit_scale: float = 1.0
    residual_in_fp32: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    family: str | None = None
    name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.layers, (list, tuple)):
            raise ValueError(f"ZooConfig.layers must be a list of layer specs, got {self.layers!r}")
        if not _positive_int(self.n_layers) or self.n_layers > MAX_LAYERS:
            raise ValueError(f"ZooConfig.n_layers must be a positive int <= {MAX_LAYERS:,}, got {self.n_layers!r}")
        self.layers = [_layer_spec(i, ls) for i, ls in enumerate(self.layers)]
        if not self.layers:
            self.layers = [LayerSpec() for _ in range(self.n_layers)]
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Every field's type and range, then every layer's mixer and arguments; ``ValueError`` naming the field.
        Runs before anything is allocated (a model is built only from a validated config); layers with the same
        spec are checked once, so a config of 10**5 identical layers validates in well under a second per 10**4."""
        for name in ("vocab_size", "d_model", "n_layers", "max_position_embeddings"):
            v = getattr(self, name)
            if not _positive_int(v):
                raise ValueError(f"ZooConfig.{name} must be a positive int, got {v!r}")
        if self.norm not in NORMS:
            raise ValueError(f"ZooConfig.norm={self.norm!r} is not one of {list(NORMS)}")
        if not _real(self.norm_eps) or not self.norm_eps > 0:
            raise ValueError(f"ZooConfig.norm_eps must be a positive finite float, got {self.norm_eps!r}")
        for name in ("tie_embeddings", "residual_in_fp32"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ZooConfig.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("embedding_scale", "residual_scale", "logit_scale"):
            if not _real(getattr(self, name)):
                raise ValueError(f"ZooConfig.{name} must be a finite float, got {getattr(self, name)!r}")
        if not _real(self.initializer_range) or self.initializer_range < 0:
            raise ValueError(f"ZooConfig.initializer_range must be a finite float >= 0, got {self.initializer_range!r}")
        if not _real(self.rope_theta) or not self.rope_theta > 0:
            raise ValueError(f"ZooConfig.rope_theta must be a positive finite float, got {self.rope_theta!r}")
        check_rope_scaling(self.rope_scaling, "ZooConfig.rope_scaling")
        self._check_token_ids()
        for name in ("family", "name"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"ZooConfig.{name} must be a string or null, got {getattr(self, name)!r}")
        if not isinstance(self.extra, dict):
            raise ValueError(f"ZooConfig.extra must be a dict, got {self.extra!r}")
        if len(self.layers) != self.n_layers:
            raise ValueError(f"ZooConfig.layers has {len(self.layers)} entries but n_layers={self.n_layers}")
        self._check_mixer_defaults()
        checked: set[str] = set()
        for i, layer in enumerate(self.layers):
            layer = self.layers[i] = _layer_spec(i, layer)
            key = repr((layer.mixer, sorted(layer.mixer_args.items()), layer.mlp))
            if key in checked:  # the same spec, the same model-wide context: already validated
                continue
            cls = get_mixer(layer.mixer)
            self._check_args(f"layers[{i}].mixer_args", cls, layer.mixer_args)
            self._check_mlp(f"layers[{i}].mlp", layer.mlp)
            try:
                cls.check_args(self.d_model, self.mixer_kwargs(i))
            except (ValueError, TypeError) as e:
                raise ValueError(f"layers[{i}] ({layer.spec_string}): {e}") from None
            checked.add(key)

    def _check_token_ids(self) -> None:
        V = self.vocab_size
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            v = getattr(self, name)
            ids = v if name == "eos_token_id" and isinstance(v, (list, tuple)) else [v]
            if v is None or (ids and all(_int(i) and 0 <= i < V for i in ids)):
                continue
            what = "an int or a non-empty list of ints" if name == "eos_token_id" else "an int"
            raise ValueError(f"ZooConfig.{name} must be null or {what} in [0, vocab_size={V}), got {v!r}")

    def _check_mixer_defaults(self) -> None:
        """Every group names the argument group of some registered mixer, and every argument is accepted (with
        the right type) by at least one mixer of that group: a misspelt group or argument is an error."""
        if not isinstance(self.mixer_defaults, dict):
            raise ValueError(f"ZooConfig.mixer_defaults must be a dict of dicts, got {self.mixer_defaults!r}")
        members: dict[str, list[type]] = {}
        for name in list_mixers():
            cls = get_mixer(name)
            for group in cls.arg_groups:
                members.setdefault(group, []).append(cls)
        for group, args in self.mixer_defaults.items():
            if group not in members:
                raise ValueError(f"ZooConfig.mixer_defaults has an unknown group {group!r}; "
                                 f"groups of the registered mixers: {sorted(members)}")
            if not isinstance(args, dict):
                raise ValueError(f"ZooConfig.mixer_defaults[{group!r}] must be a dict, got {args!r}")
            params = [mixer_parameters(cls) for cls in members[group]]
            for key, value in args.items():
                accepting = [p[key] for p in params if key in p]
                if not accepting:
                    allowed = sorted(set().union(*params))
                    raise ValueError(f"ZooConfig.mixer_defaults[{group!r}] has an unknown argument {key!r}; "
                                     f"allowed: {allowed}")
                if not any(_type_ok(value, p.annotation) for p in accepting):
                    raise ValueError(f"ZooConfig.mixer_defaults[{group!r}]: {key}={value!r} should be "
                                     f"{_type_name(accepting[0].annotation)}")

    @staticmethod
    def _check_args(where: str, cls: type, args: dict[str, Any]) -> None:
        params = mixer_parameters(cls)
        if not isinstance(args, dict):
            raise ValueError(f"{where} must be a dict of keyword arguments, got {args!r}")
        for key, value in args.items():
            if key not in params:
                raise ValueError(
                    f"{where}: mixer {cls.mixer_name!r} has no argument {key!r}; allowed: {sorted(params)}"
                )
            if not _type_ok(value, params[key].annotation):
                raise ValueError(
                    f"{where}: argument {key}={value!r} of mixer {cls.mixer_name!r} "
                    f"should be {_type_name(params[key].annotation)}"
                )

    @staticmethod
    def _check_mlp(where: str, mlp: dict[str, Any] | None) -> None:
        if mlp is None:
            return
        if not isinstance(mlp, dict):
            raise ValueError(f"{where} must be a dict like {{'intermediate_size': 2048}} or None, got {mlp!r}")
        for key, value in mlp.items():
            if key not in MLP_FIELDS:
                raise ValueError(f"{where}: unknown MLP field {key!r}; allowed: {sorted(MLP_FIELDS)}")
            if not isinstance(value, MLP_FIELDS[key]) or (MLP_FIELDS[key] is int and isinstance(value, bool)):
                raise ValueError(f"{where}: {key}={value!r} should be {MLP_FIELDS[key].__name__}")
        if "intermediate_size" not in mlp or not _positive_int(mlp["intermediate_size"]):
            raise ValueError(f"{where}: needs a positive 'intermediate_size', got {mlp!r}")
        if mlp.get("activation", "silu") not in MLP_ACTIVATIONS:
            raise ValueError(f"{where}: activation {mlp['activation']!r} is not one of {list(MLP_ACTIVATIONS)}")

    # ------------------------------------------------------------------ mixer arguments
    def mixer_kwargs(self, layer_idx: int) -> dict[str, Any]:
        """The full keyword arguments of layer ``layer_idx``'s mixer: model-wide context, then the mixer's
        group defaults, then the layer's own arguments (later wins); only arguments the mixer accepts."""
        layer = self.layers[layer_idx]
        cls = get_mixer(layer.mixer)
        params = mixer_parameters(cls)
        kwargs = {k: getattr(self, k) for k in CONTEXT_FIELDS if k in params}
        for group in cls.arg_groups:
            kwargs.update({k: v for k, v in self.mixer_defaults.get(group, {}).items() if k in params})
        kwargs.update(layer.mixer_args)
        return kwargs

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: _copy(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "layers"}
        d["layers"] = [ls.to_dict() for ls in self.layers]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ZooConfig:
        if not isinstance(d, dict):
            raise ValueError(f"a ZooConfig is built from a dict (a JSON object), got {type(d).__name__}")
        d = dict(d)
        d.pop("zoo_version", None)
        model_type = d.pop("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise ValueError(f"not a zoo config: model_type={model_type!r} (zoo checkpoints have {MODEL_TYPE!r}; "
                             "reference formats load through zoo.from_pretrained)")
        known = {f.name for f in dataclasses.fields(cls)}
        mixers = d.pop("mixers", None)
        mlp = d.pop("mlp", None)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ZooConfig field(s) {unknown}; allowed: {sorted(known | {'mixers', 'mlp'})}")
        n = d.get("n_layers", cls.n_layers)
        if not _positive_int(n) or n > MAX_LAYERS:
            raise ValueError(f"ZooConfig.n_layers must be a positive int <= {MAX_LAYERS:,}, got {n!r}")
        if mixers is not None or mlp is not None:
            if d.get("layers"):
                raise ValueError("give either 'layers' or the short forms 'mixers'/'mlp', not both")
            d["layers"] = expand_layers(n, mixers or "attention", mlp)
        return cls(**d)

    def to_json(self, **kw: Any) -> str:
        """Strict JSON: non-finite floats are written as ``{"__float__": "Infinity"}`` (transformers' convention)."""
        return json.dumps(json_safe(self.to_dict()), indent=2, allow_nan=False, **kw)

    @classmethod
    def from_json(cls, text: str) -> ZooConfig:
        return cls.from_dict(json_restore(json.loads(text)))

    def save(self, path: str | os.PathLike) -> None:
        """``config.json`` of a zoo checkpoint: ``zoo_version``, ``model_type: "zoo"`` (what transformers' Auto
        classes dispatch on after ``import zoo.hf``) and the fields."""
        text = json.dumps(json_safe({"zoo_version": __version__, "model_type": MODEL_TYPE, **self.to_dict()}),
                          indent=2, allow_nan=False)
        Path(path).write_text(text + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> ZooConfig:
        return cls.from_json(Path(path).read_text())

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ZooConfig:
        """The config of a registered preset (a family's published checkpoint, or a zoo-native config)."""
        _, preset = get_preset_entry(name)
        cfg = cls.from_dict({**preset.config, "name": name})
        return cfg.replace(**overrides) if overrides else cfg

    def replace(self, **changes: Any) -> ZooConfig:
        """A copy with some fields changed. A new ``n_layers`` repeats the layer spec of a uniform config."""
        d = self.to_dict()
        n = changes.get("n_layers", self.n_layers)
        if n != self.n_layers and "layers" not in changes and "mixers" not in changes:
            if any(ls != self.layers[0] for ls in self.layers):
                raise ValueError(f"cannot change n_layers {self.n_layers} -> {n} of a config whose layers differ; "
                                 "give 'layers' (or the short form 'mixers') as well")
            changes = {**changes, "layers": [self.layers[0].to_dict() for _ in range(n)]}
        d.update(changes)
        if "mixers" in changes or "mlp" in changes:
            d.pop("layers")
        return ZooConfig.from_dict(d)

    def with_mixers(self, mixers: dict[str, str] | str) -> ZooConfig:
        """A copy whose selected layers use other mixers (MLPs kept): ``cfg.with_mixers({"0-3": "mamba2"})``."""
        new = copy.deepcopy(self)
        selections = {"all": mixers} if isinstance(mixers, str) else mixers
        for sel, spec in selections.items():
            name, args = parse_mixer_spec(spec)
            for i in parse_layer_selector(sel, self.n_layers):
                new.layers[i] = LayerSpec(name, args, new.layers[i].mlp)
        new.validate()
        return new


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by ``{"__float__": "Infinity" | "-Infinity" | "NaN"}`` (the form
    transformers 5 writes), so that ``json.dumps(..., allow_nan=False)`` produces strict JSON; tuples become lists."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")}
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def json_restore(obj: Any) -> Any:
    """Inverse of :func:`json_safe`."""
    if isinstance(obj, dict):
        if set(obj) == {"__float__"}:
            return float(obj["__float__"])
        return {k: json_restore(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_restore(v) for v in obj]
    return obj


def expand_layers(n_layers: int, mixers: dict[str, Any] | str, mlp: dict[str, Any] | None) -> list[dict]:
    """Expand the short forms into ``n_layers`` explicit layer dicts (each with its own argument dicts)."""
    if isinstance(mixers, str) or (isinstance(mixers, dict) and "mixer" in mixers):
        mixers = {"default": mixers}
    if not isinstance(mixers, dict):
        raise ValueError(f"ZooConfig short form 'mixers' must be a mixer spec or a dict {{selector: spec}}, "
                         f"got {mixers!r}")
    if mlp is not None and not isinstance(mlp, dict):
        raise ValueError(f"ZooConfig short form 'mlp' must be a dict like {{'intermediate_size': 2048}} or None, "
                         f"got {mlp!r}")
    if not _positive_int(n_layers) or n_layers > MAX_LAYERS:
        raise ValueError(f"ZooConfig.n_layers must be a positive int <= {MAX_LAYERS:,}, got {n_layers!r}")
    layers: list[dict | None] = [None] * n_layers
    for sel, spec in mixers.items():
        if sel == "default":
            continue
        name, args = parse_mixer_spec(spec)
        for i in parse_layer_selector(sel, n_layers):
            layers[i] = {"mixer": name, "mixer_args": copy.deepcopy(args), "mlp": copy.deepcopy(mlp)}
    default = parse_mixer_spec(mixers["default"]) if mixers.get("default") is not None else None
    for i in range(n_layers):
        if layers[i] is None:
            if default is None:
                raise ValueError(f"short form 'mixers' leaves layer {i} unassigned and has no 'default'")
            layers[i] = {"mixer": default[0], "mixer_args": copy.deepcopy(default[1]), "mlp": copy.deepcopy(mlp)}
    return layers  # type: ignore[return-value]


def mixer_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The configurable constructor arguments of a mixer class (everything but d_model / layer_idx)."""
    return dict(_mixer_parameters(cls))


@functools.cache
def _mixer_parameters(cls: type) -> dict[str, inspect.Parameter]:  # signature + type hints: ~1 ms, once per class
    sig = inspect.signature(cls.__init__)
    hints = typing.get_type_hints(cls.__init__)
    out = {}
    for name, p in sig.parameters.items():
        if name in ("self", "d_model", "layer_idx") or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        out[name] = p.replace(annotation=hints.get(name, Any))
    return out


def _copy(obj: Any) -> Any:
    """A deep copy of plain config data (dicts, lists, tuples, scalars): ``copy.deepcopy`` costs ~20x more, which
    adds up over 10**5 layers."""
    if isinstance(obj, dict):
        return {k: _copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_copy(v) for v in obj]
    if isinstance(obj, (str, int, float, bool, type(None), tuple)):
        return obj if not isinstance(obj, tuple) else tuple(_copy(v) for v in obj)
    return copy.deepcopy(obj)


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _positive_int(v: Any) -> bool:
    return _int(v) and v > 0


def _real(v: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_rope_scaling(scaling: Any, where: str) -> None:
    """``None`` or a dict naming a supported variant (``rope_type`` or ``type``) with every field it needs and only
    fields it uses (:data:`ROPE_SCALING`), each of the right kind and range."""
    if scaling is None:
        return
    if not isinstance(scaling, dict):
        raise ValueError(f"{where} must be null or a dict like {{'rope_type': 'linear', 'factor': 2.0}}, "
                         f"got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if not isinstance(kind, str) or kind not in ROPE_SCALING:
        raise ValueError(f"{where}: rope_type {kind!r} is not supported; supported: {sorted(ROPE_SCALING)}")
    fields = ROPE_SCALING[kind]
    unknown = sorted(set(scaling) - set(fields) - {"rope_type", "type"})
    if unknown:
        raise ValueError(f"{where}: fields {unknown} are not used by rope_type {kind!r} (fields: {list(fields)}); "
                         "refusing to ignore them")
    checks = {"pos": (lambda v: _real(v) and v > 0, "a positive number"), "int": (_positive_int, "a positive int"),
              "num": (_real, "a finite number"), "bool": (lambda v: isinstance(v, bool), "true or false"),
              "factors": (lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(_real(x) and x > 0 for x in v),
                          "a non-empty list of positive numbers")}
    for name, (required, what) in fields.items():
        v = scaling.get(name)
        if v is None and not required:
            continue
        ok, text = checks[what]
        if not ok(v):
            raise ValueError(f"{where}: {name} must be {text} for rope_type {kind!r}, "
                             f"got {'nothing' if name not in scaling else repr(v)}")
    if kind == "llama3" and scaling["low_freq_factor"] == scaling["high_freq_factor"]:
        raise ValueError(f"{where}: llama3 needs low_freq_factor != high_freq_factor (it divides by their "
                         f"difference), got {scaling['low_freq_factor']!r} for both")


def _layer_spec(i: int, ls: Any) -> LayerSpec:
    """``layers[i]`` as a :class:`LayerSpec` (from a dict), or ``ValueError`` naming what is wrong with it."""
    if isinstance(ls, dict):
        unknown = sorted(set(ls) - set(LAYER_FIELDS))
        if unknown:
            raise ValueError(f"ZooConfig.layers[{i}] has unknown field(s) {unknown}; allowed: {list(LAYER_FIELDS)}")
        ls = LayerSpec(**ls)
    if not isinstance(ls, LayerSpec):
        raise ValueError(f"ZooConfig.layers[{i}] must be a dict like {{'mixer': 'attention', 'mixer_args': {{}}, "
                         f"'mlp': None}}, got {ls!r}")
    if not isinstance(ls.mixer, str):
        raise ValueError(f"ZooConfig.layers[{i}].mixer must be a mixer name (str), got {ls.mixer!r}")
    if not isinstance(ls.mixer_args, dict) or not all(isinstance(k, str) for k in ls.mixer_args):
        raise ValueError(f"ZooConfig.layers[{i}].mixer_args must be a dict of keyword arguments, got {ls.mixer_args!r}")
    return ls


def check_argument_type(where: str, shown: str, value: Any, cls: type, name: str) -> None:
    """``ValueError("{where}: {shown}=<value> should be <type>")`` unless ``value`` fits the type of argument ``name``
    of mixer class ``cls`` (for readers whose config field ``shown`` feeds that argument)."""
    ann = mixer_parameters(cls)[name].annotation
    if not _type_ok(value, ann):
        raise ValueError(f"{where}: {shown}={value!r} should be {_type_name(ann)}")


def _type_ok(value: Any, ann: Any) -> bool:
    if ann is Any or ann is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(ann))
    if ann is type(None):
        return value is None
    if ann is float:  # NaN is never a meaningful argument (an infinite bound or threshold may be)
        return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if ann is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple:  # tuple[float, float] (a fixed length), tuple[int, ...]
        args = typing.get_args(ann)
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_type_ok(v, args[0]) for v in value)
        return not args or (len(value) == len(args) and all(_type_ok(v, a) for v, a in zip(value, args)))
    if origin is list:
        args = typing.get_args(ann)
        return isinstance(value, (tuple, list)) and (not args or all(_type_ok(v, args[0]) for v in value))
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(ann, type):
        return isinstance(value, ann)
    return True


def _type_name(ann: Any) -> str:
    if typing.get_origin(ann) is not None:  # tuple[float, float], list[int], int | None
        return str(ann).replace("typing.", "")
    return getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
