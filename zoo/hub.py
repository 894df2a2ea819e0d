"""Loading and saving checkpoints: zoo format, reference formats (via the families), and the Hugging Face Hub.

* Zoo format: ``config.json`` (``ZooConfig`` + ``zoo_version``), ``model.safetensors``, ``README.md`` card.
* Reference formats: detected from ``config.json`` by each family's ``detect``; weights from safetensors
  (sharded or not) first, else ``pytorch_model.bin`` read with ``torch.load(weights_only=True)`` only.
* Loading is strict: every checkpoint key used, every parameter filled, or an error listing both sides.
* Saving is atomic: everything is written into a temporary sibling directory, then renamed into place.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, save_model
from torch import Tensor

from zoo.config import ZooConfig
from zoo.models import detect_family, presets
from zoo.models.family import Family
from zoo.models.lm import ZooForCausalLM
from zoo.registry import get_family

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
_MODEL_CARDS = Path(__file__).resolve().parent.parent / "model_cards"


# ---------------------------------------------------------------------------------------------- resolving
def resolve(id_or_path: str | os.PathLike, *, revision: str | None = None, cache_dir: str | None = None,
            local_files_only: bool | None = None) -> Path:
    """A local directory as is; otherwise a hub repo id downloaded (or found in the cache) as a snapshot."""
    path = Path(id_or_path).expanduser()
    if path.is_dir():
        return path
    s = str(id_or_path)
    if path.exists() or s.startswith((".", "/", "~")) or s.count("/") != 1:
        raise FileNotFoundError(f"{s!r} is neither a checkpoint directory nor a hub repo id like 'org/name'")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(
        s, revision=revision, cache_dir=cache_dir, local_files_only=bool(local_files_only),
        allow_patterns=["*.json", "*.safetensors", "*.bin", "*.md", "*.txt", "*.model", "tokenizer*"],
    ))


def read_config_json(path: Path) -> dict[str, Any]:
    file = path / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{path} has no {CONFIG_NAME}; files there: {sorted(p.name for p in path.iterdir())}")
    try:
        cfg = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


# ---------------------------------------------------------------------------------------------- weights
def _load_safetensors(file: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"cannot read {file} (truncated or not a safetensors file?): {e}") from None


def _load_bin(file: Path) -> dict[str, Tensor]:
    try:
        sd = torch.load(str(file), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError) as e:
        raise ValueError(
            f"refusing to load {file}: it is not a plain tensor checkpoint, and only torch.load(weights_only=True) "
            f"is used on .bin files ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"{file} does not hold a flat dict of tensors")
    return sd


def load_weights(path: Path) -> dict[str, Tensor]:
    """A checkpoint's tensors: ``model.safetensors[.index.json]`` first, else ``pytorch_model.bin[.index.json]``."""
    for name, loader in (("model.safetensors", _load_safetensors), ("pytorch_model.bin", _load_bin)):
        index = path / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            sd: dict[str, Tensor] = {}
            for shard in shards:
                if not (path / shard).is_file():
                    raise FileNotFoundError(f"{index.name} names shard {shard!r}, which is missing from {path}")
                sd.update(loader(path / shard))
            return sd
        if (path / name).is_file():
            return loader(path / name)
    raise FileNotFoundError(
        f"no weights in {path}: expected model.safetensors or pytorch_model.bin (optionally sharded); "
        f"found {sorted(p.name for p in path.iterdir())}"
    )


def load_state_dict_strict(model: ZooForCausalLM, sd: dict[str, Tensor], *, strict: bool = True) -> None:
    """Fill every parameter of ``model`` from ``sd``; with ``strict``, any missing, unexpected or mis-shaped key
    is an error naming them all. A tied head may be absent from ``sd`` or present and equal to the embedding."""
    expected = model.state_dict()
    sd = dict(sd)
    if model.config.tie_embeddings:
        expected.pop("lm_head.weight")
        head = sd.pop("lm_head.weight", None)
        emb = sd.get("embedding.weight")
        if head is not None and emb is not None and not torch.equal(head, emb):
            raise ValueError("tie_embeddings is set but the checkpoint's lm_head.weight differs from embedding.weight")
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(sd) & set(expected)) if sd[k].shape != expected[k].shape]
    if shapes or (strict and (missing or unexpected)):
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing[:12]}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected[:12]}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {shapes[:12]}")
        raise ValueError("checkpoint does not match the model: " + "; ".join(parts))
    model.load_state_dict(sd, strict=False)


# ---------------------------------------------------------------------------------------------- loading
def from_pretrained(id_or_path: str | os.PathLike, *, revision: str | None = None, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None, strict: bool = True, cache_dir: str | None = None,
                    local_files_only: bool | None = None) -> ZooForCausalLM:
    """Load a zoo checkpoint, a reference-format checkpoint (any registered family), a preset's hub id, or a hub id."""
    target = str(id_or_path)
    swap = None
    if target in presets() and not Path(target).exists():  # a preset name: its published checkpoint
        preset = presets()[target][1]
        if not preset.hub_id:
            raise ValueError(f"preset {target!r} has no published checkpoint; use zoo.create_model({target!r})")
        target, revision, swap = preset.hub_id, revision or preset.revision, preset.swap
    path = resolve(target, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    cfg = read_config_json(path)
    if "zoo_version" in cfg:
        config = ZooConfig.from_dict(cfg)
        sd = load_weights(path)
    else:
        family = detect_family(cfg)
        config = family.config_from_reference(cfg)
        sd = family.state_dict_from_reference(load_weights(path), config)
    if strict:  # every parameter will be overwritten: skip random init by building on the meta device
        with torch.device("meta"):
            model = ZooForCausalLM(config)
        model.to_empty(device="cpu")
        _reset_buffers(model)
    else:
        model = ZooForCausalLM(config)
    load_state_dict_strict(model, sd, strict=strict)
    if config.tie_embeddings:
        model.lm_head.weight = model.embedding.weight
    if swap:  # a hybrid preset: the published checkpoint with some layers swapped (weights reused where they fit)
        from zoo.models.lm import swap_layers

        model = swap_layers(model, swap)
    model.to(device=device, dtype=dtype)
    return model.eval()


def _reset_buffers(model: ZooForCausalLM) -> None:
    """Recompute non-persistent buffers (RoPE frequencies, ...) after building on the meta device."""
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()


# ---------------------------------------------------------------------------------------------- saving
def _atomic_dir(path: Path):
    """Context manager: yields a temp dir next to ``path``; on success it replaces ``path``, on error it is removed."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)

    return cm()


def save_pretrained(model: ZooForCausalLM, path: str | os.PathLike, *, card: bool = True,
                    card_data: dict[str, Any] | None = None, tokenizer: Any = None) -> Path:
    """Write ``config.json`` (zoo format), ``model.safetensors`` and a ``README.md`` model card, atomically;
    with ``tokenizer`` (anything with ``save_pretrained(directory)``) its files go next to the weights."""
    path = Path(path)
    with _atomic_dir(path) as tmp:
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        model.config.save(tmp / CONFIG_NAME)
        save_model(model, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "zoo_version": _version()})
        if card:
            render_model_card(model, **(card_data or {})).save(str(tmp / CARD_NAME))
    return path


def save_reference(model: ZooForCausalLM, path: str | os.PathLike, family: str | Family | None = None) -> Path:
    """Export to a family's reference format (config.json + weights), e.g. a transformers Llama directory."""
    fam = get_family(family or model.config.family or "") if not isinstance(family, Family) else family
    ref_cfg = fam.config_to_reference(model.config)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight")
    ref_sd = fam.state_dict_to_reference(sd, model.config)
    path = Path(path)
    with _atomic_dir(path) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(ref_cfg, indent=2) + "\n")
        if fam.reference_weights_name.endswith(".bin"):
            torch.save(ref_sd, tmp / fam.reference_weights_name)
        else:
            save_file({k: v.clone() for k, v in ref_sd.items()}, str(tmp / fam.reference_weights_name),
                      metadata={"format": "pt"})
    return path


def push_to_hub(model: ZooForCausalLM, repo_id: str, *, private: bool | None = None,
                commit_message: str = "Upload zoo model", token: str | None = None,
                card_data: dict[str, Any] | None = None, tokenizer: Any = None) -> str:
    """Create the repo if needed and upload ``save_pretrained``'s files in one commit; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, Path(tmp) / "model", card_data=card_data, tokenizer=tokenizer)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(Path(tmp) / "model"),
                                 commit_message=commit_message, repo_type="model")
    return str(getattr(info, "commit_url", info))


# ---------------------------------------------------------------------------------------------- model cards
def render_model_card(model: ZooForCausalLM, **card_data: Any):
    """The ``README.md`` card: YAML metadata (``ModelCardData``) + the family's Markdown template."""
    from huggingface_hub import ModelCard, ModelCardData

    config = model.config
    family = config.family or "zoo"
    template = _MODEL_CARDS / f"{family}.md"
    if not template.is_file():
        template = _MODEL_CARDS / "default.md"
    mixers = sorted({ls.mixer for ls in config.layers})
    data = ModelCardData(
        library_name="zoo", pipeline_tag="text-generation", license=card_data.pop("license", "apache-2.0"),
        tags=["zoo", "long-context", *mixers, *card_data.pop("tags", [])],
        base_model=card_data.pop("base_model", None), **card_data,
    )
    layers = [{"index": i, "mixer": ls.spec_string, "mlp": ls.mlp["intermediate_size"] if ls.mlp else "-"}
              for i, ls in enumerate(config.layers)]
    return ModelCard.from_template(
        data, template_str=template.read_text(), model_name=config.name or family, family=family,
        n_params=f"{model.num_parameters():,}", d_model=config.d_model, n_layers=config.n_layers,
        vocab_size=config.vocab_size, layers=layers, mixers=mixers, zoo_version=_version(),
    )


def _version() -> str:
    from zoo import __version__

    return __version__
