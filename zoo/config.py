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
# ``model_type`` of zoo checkpoints (registered with transformers' Auto classes by ``zoo.hf``; no transformers type).
MODEL_TYPE = "zoo"


def parse_mixer_spec(spec: str | dict) -> tuple[str, dict[str, Any]]:
    """``"sliding_window(window=1024, num_sink_tokens=4)"`` -> ``("sliding_window", {...})``.

    Also accepts ``{"mixer": name, "mixer_args": {...}}``. Argument values are Python literals.
    """
    if isinstance(spec, dict):
        return spec["mixer"], dict(spec.get("mixer_args", {}))
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
        return {"mixer": self.mixer, "mixer_args": copy.deepcopy(self.mixer_args), "mlp": copy.deepcopy(self.mlp)}

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
        self.layers = [LayerSpec(**ls) if isinstance(ls, dict) else ls for ls in self.layers]
        if not self.layers:
            self.layers = [LayerSpec() for _ in range(self.n_layers)]
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"ZooConfig.{name} must be a positive int, got {v!r}")
        if self.norm not in NORMS:
            raise ValueError(f"ZooConfig.norm={self.norm!r} is not one of {list(NORMS)}")
        if len(self.layers) != self.n_layers:
            raise ValueError(f"ZooConfig.layers has {len(self.layers)} entries but n_layers={self.n_layers}")
        self._check_mixer_defaults()
        for i, layer in enumerate(self.layers):
            cls = get_mixer(layer.mixer)
            self._check_args(f"layers[{i}].mixer_args", cls, layer.mixer_args)
            self._check_mlp(f"layers[{i}].mlp", layer.mlp)
            try:
                cls.check_args(self.d_model, self.mixer_kwargs(i))
            except (ValueError, TypeError) as e:
                raise ValueError(f"layers[{i}] ({layer.spec_string}): {e}") from None

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
            if not isinstance(value, MLP_FIELDS[key]):
                raise ValueError(f"{where}: {key}={value!r} should be {MLP_FIELDS[key].__name__}")
        if "intermediate_size" not in mlp or mlp["intermediate_size"] <= 0:
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
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)}
        d["layers"] = [ls.to_dict() for ls in self.layers]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ZooConfig:
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
        if mixers is not None or mlp is not None:
            if d.get("layers"):
                raise ValueError("give either 'layers' or the short forms 'mixers'/'mlp', not both")
            n = d.get("n_layers", cls.n_layers)
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
    """Expand the short forms into ``n_layers`` explicit layer dicts."""
    if isinstance(mixers, str) or (isinstance(mixers, dict) and "mixer" in mixers):
        mixers = {"default": mixers}
    layers: list[dict | None] = [None] * n_layers
    default = mixers.get("default")
    for sel, spec in mixers.items():
        if sel == "default":
            continue
        name, args = parse_mixer_spec(spec)
        for i in parse_layer_selector(sel, n_layers):
            layers[i] = {"mixer": name, "mixer_args": args, "mlp": copy.deepcopy(mlp)}
    for i in range(n_layers):
        if layers[i] is None:
            if default is None:
                raise ValueError(f"short form 'mixers' leaves layer {i} unassigned and has no 'default'")
            name, args = parse_mixer_spec(default)
            layers[i] = {"mixer": name, "mixer_args": args, "mlp": copy.deepcopy(mlp)}
    return layers  # type: ignore[return-value]


def mixer_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The configurable constructor arguments of a mixer class (everything but d_model / layer_idx)."""
    sig = inspect.signature(cls.__init__)
    hints = typing.get_type_hints(cls.__init__)
    out = {}
    for name, p in sig.parameters.items():
        if name in ("self", "d_model", "layer_idx") or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        out[name] = p.replace(annotation=hints.get(name, Any))
    return out


def _type_ok(value: Any, ann: Any) -> bool:
    if ann is Any or ann is inspect.Parameter.empty:
        return True
    origin = typing.get_origin(ann)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(ann))
    if ann is type(None):
        return value is None
    if ann is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if ann is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (tuple, list):
        return isinstance(value, (tuple, list))
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(ann, type):
        return isinstance(value, ann)
    return True


def _type_name(ann: Any) -> str:
    return getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
