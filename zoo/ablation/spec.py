"""The ablation spec: base model x swap variants x evaluations (YAML, JSON, a dict, or command-line flags).

```yaml
name: demo
seed: 0
base: default                 # the embedded default model; or a checkpoint dir, hub id or preset name
train_length: 256             # the base's training length (default: config.extra["train_length"])
data:                         # fine-tuning data: corpus rows + passkey rows per batch
  corpus: stdlib              # or a text file / directory
  passkey_rows: 2
finetune: {steps: 60, lr: 1.0e-3, batch_size: 8, seq_len: 256}   # defaults for variants with finetune: true
variants:
  - name: attention           # no swap: the base as it is
  - name: sliding_window
    swap: "all: sliding_window(window=64)"
  - name: mamba2
    swap: "every 2nd from 1: mamba2(expand=1, headdim=32, d_state=32, ngroups=4)"
    init: derive              # reuse | fresh | derive (zoo.swap_layers)
    trainable: all            # all | swapped | swapped_blocks
    finetune: true            # or a dict overriding the defaults
evaluations:
  - kind: loss                # zoo.ablation.evaluations: loss, passkey, mqar, efficiency (+ registered ones)
    length: 1024
  - kind: passkey
    lengths: [256, 512, 1024]
```
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from zoo.models.lm import SWAP_INITS, SWAP_TRAINABLE
from zoo.swaps import parse_swap_spec

FINETUNE_DEFAULTS = {"steps": 50, "lr": 1e-3, "batch_size": 8, "seq_len": None, "warmup_steps": 10,
                     "min_lr_ratio": 0.1, "weight_decay": 0.0, "grad_clip": 1.0, "grad_accum": 1}
DATA_DEFAULTS = {"corpus": "stdlib", "passkey_rows": 0, "passkey_answer_weight": 10.0}
TOP_KEYS = {"name", "seed", "base", "train_length", "tokenizer", "data", "finetune", "variants", "evaluations",
            "threads", "description"}


@dataclass
class Variant:
    name: str
    swap: str | None = None  # canonical swap spec text (None: the base as it is)
    init: str = "reuse"
    trainable: str = "all"
    finetune: dict[str, Any] | None = None  # resolved fine-tuning settings, None = no fine-tuning

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Evaluation:
    name: str
    kind: str
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AblationSpec:
    name: str
    variants: list[Variant]
    evaluations: list[Evaluation]
    base: Any = "default"
    seed: int = 0
    train_length: int | None = None
    tokenizer: str = "bytes"
    data: dict[str, Any] = field(default_factory=lambda: dict(DATA_DEFAULTS))
    threads: int | None = None
    description: str = ""

    def fingerprint(self, *parts: Any) -> str:
        """A short hash of what a result depends on (zoo version, base, seed, data and the given parts)."""
        from zoo.version import __version__

        blob = json.dumps([__version__, self.base, self.seed, self.train_length, self.tokenizer, self.data, *parts],
                          sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "base": self.base, "seed": self.seed,
                "train_length": self.train_length, "tokenizer": self.tokenizer, "data": self.data,
                "threads": self.threads, "variants": [v.to_dict() for v in self.variants],
                "evaluations": [e.to_dict() for e in self.evaluations]}


def _err(where: str, msg: str) -> ValueError:
    return ValueError(f"ablation spec, {where}: {msg}")


def parse_spec(raw: dict[str, Any] | AblationSpec) -> AblationSpec:
    """Validate a spec dict (e.g. loaded from YAML); errors name the offending entry."""
    from zoo.ablation.evaluations import list_evaluations

    if isinstance(raw, AblationSpec):
        return raw
    if not isinstance(raw, dict):
        raise _err("top level", f"expected a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise _err("top level", f"unknown key(s) {unknown}; allowed: {sorted(TOP_KEYS)}")
    ft_defaults = {**FINETUNE_DEFAULTS, **(raw.get("finetune") or {})}
    bad = sorted(set(ft_defaults) - set(FINETUNE_DEFAULTS))
    if bad:
        raise _err("finetune", f"unknown key(s) {bad}; allowed: {sorted(FINETUNE_DEFAULTS)}")
    data = {**DATA_DEFAULTS, **(raw.get("data") or {})}
    bad = sorted(set(data) - set(DATA_DEFAULTS))
    if bad:
        raise _err("data", f"unknown key(s) {bad}; allowed: {sorted(DATA_DEFAULTS)}")
    variants_raw = raw.get("variants") or []
    if not variants_raw:
        raise _err("variants", "give at least one variant (e.g. {name: baseline})")
    variants, names = [], set()
    for k, v in enumerate(variants_raw):
        if isinstance(v, str):
            v = {"name": v}
        where = f"variants[{k}]"
        if not isinstance(v, dict) or "name" not in v:
            raise _err(where, "expected a mapping with 'name' (and 'swap', 'init', 'trainable', 'finetune'), "
                              f"got {v!r}")
        extra = sorted(set(v) - {"name", "swap", "init", "trainable", "finetune"})
        if extra:
            raise _err(where, f"unknown key(s) {extra}; allowed: ['finetune', 'init', 'name', 'swap', 'trainable']")
        name = str(v["name"])
        if name in names or "/" in name:
            raise _err(where, f"variant names must be unique and contain no '/': {name!r}")
        names.add(name)
        swap = v.get("swap")
        if swap is not None:
            try:
                swap = parse_swap_spec(swap).to_string()
            except ValueError as e:
                raise _err(f"{where} ({name})", str(e)) from None
        init, trainable = v.get("init", "reuse"), v.get("trainable", "all")
        if init not in SWAP_INITS:
            raise _err(f"{where} ({name})", f"init={init!r} is not one of {list(SWAP_INITS)}")
        if trainable not in SWAP_TRAINABLE:
            raise _err(f"{where} ({name})", f"trainable={trainable!r} is not one of {list(SWAP_TRAINABLE)}")
        ft = v.get("finetune", False)
        if ft is True:
            ft = dict(ft_defaults)
        elif isinstance(ft, dict):
            bad = sorted(set(ft) - set(FINETUNE_DEFAULTS))
            if bad:
                raise _err(f"{where} ({name}).finetune", f"unknown key(s) {bad}; allowed: {sorted(FINETUNE_DEFAULTS)}")
            ft = {**ft_defaults, **ft}
        elif ft in (False, None):
            ft = None
        else:
            raise _err(f"{where} ({name})", f"finetune must be true, false or a mapping, got {ft!r}")
        variants.append(Variant(name, swap, init, trainable, ft))
    evals, enames = [], set()
    known = list_evaluations()
    for k, e in enumerate(raw.get("evaluations") or []):
        if isinstance(e, str):
            e = {"kind": e}
        if not isinstance(e, dict) or "kind" not in e:
            raise _err(f"evaluations[{k}]", f"expected a mapping with 'kind', got {e!r}")
        e = copy.deepcopy(e)
        kind = e.pop("kind")
        name = str(e.pop("name", kind))
        if kind not in known:
            raise _err(f"evaluations[{k}]", f"unknown kind {kind!r}; available: {known}")
        if name in enames or "/" in name:
            raise _err(f"evaluations[{k}]", f"evaluation names must be unique and contain no '/': {name!r} "
                                            "(give 'name' to run one kind twice)")
        enames.add(name)
        evals.append(Evaluation(name, kind, e))
    if not evals:
        raise _err("evaluations", f"give at least one evaluation; available kinds: {known}")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int):
        raise _err("seed", f"must be an int, got {seed!r}")
    return AblationSpec(name=str(raw.get("name", "ablation")), variants=variants, evaluations=evals,
                        base=raw.get("base", "default"), seed=seed, train_length=raw.get("train_length"),
                        tokenizer=raw.get("tokenizer", "bytes"), data=data, threads=raw.get("threads"),
                        description=str(raw.get("description", "")))


def read_spec_file(path: str | Path) -> dict[str, Any]:
    """The raw mapping of a YAML (``.yaml``/``.yml``) or JSON spec file."""
    path = Path(path)
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:  # pragma: no cover - PyYAML is a dependency
            raise ValueError("reading a YAML spec needs PyYAML (pip install pyyaml); or write it as JSON") from None
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None


def load_spec(path: str | Path) -> AblationSpec:
    """A validated spec from a YAML or JSON file."""
    return parse_spec(read_spec_file(path))
