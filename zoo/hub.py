"""Loading models: zoo checkpoints, reference-format checkpoints (via the families) and Hugging Face Hub ids.

``from_pretrained`` resolves a local directory, a preset name (its published checkpoint) or a hub repo id
(``huggingface_hub.snapshot_download``, honouring ``HF_HUB_OFFLINE`` and the cache), detects the format from
``config.json`` and loads strictly. The file formats, saving and the Hub upload live in :mod:`zoo.checkpoint`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from zoo.checkpoint import (
    CheckpointSource,
    checkpoint_numel,
    load_state_dict_strict,
    load_weights,
    push_to_hub,
    read_config_json,
    render_model_card,
    save_pretrained,
    save_reference,
)
from zoo.config import ZooConfig
from zoo.limits import check_fits_memory, check_matches_checkpoint, parameter_count
from zoo.models import detect_family
from zoo.models.lm import ZooForCausalLM
from zoo.registry import get_preset_entry, is_preset, list_presets

__all__ = ["from_pretrained", "resolve", "save_pretrained", "save_reference", "push_to_hub", "render_model_card"]


# ---------------------------------------------------------------------------------------------- resolving
def resolve(id_or_path: str | os.PathLike, *, revision: str | None = None, cache_dir: str | None = None,
            local_files_only: bool | None = None) -> Path:
    """A local directory as is; otherwise a hub repo id downloaded (or found in the cache) as a snapshot."""
    s = str(id_or_path)
    if not s.strip():
        raise ValueError("the model id is empty: give a checkpoint directory, a preset name or a hub repo id "
                         "like 'org/name'")
    path = Path(id_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists() or s.startswith((".", "/", "~")) or s.count("/") != 1:
        raise FileNotFoundError(f"{s!r} is not a checkpoint directory, a preset name or a hub repo id like "
                                f"'org/name'; presets: {list_presets()}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(
            s, revision=revision, cache_dir=cache_dir, local_files_only=bool(local_files_only),
            allow_patterns=["*.json", "*.safetensors", "*.bin", "*.md", "*.txt", "*.model", "*.jinja", "tokenizer*"],
        ))
    except Exception as e:  # offline, no network, no such repo or revision: the exception types vary by cause
        at = f" at revision {revision!r}" if revision else ""
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        hint = ("HF_HUB_OFFLINE is set, so only the local cache was searched and it does not hold this repo"
                if offline or local_files_only else "check the repo id, your network and your token")
        raise OSError(f"cannot get hub repo {s!r}{at}: {hint} ({type(e).__name__}: {e})") from e


# ---------------------------------------------------------------------------------------------- loading
def from_pretrained(id_or_path: str | os.PathLike, *, revision: str | None = None, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None, strict: bool = True, cache_dir: str | None = None,
                    local_files_only: bool | None = None, strict_finite: bool = False) -> ZooForCausalLM:
    """Load a zoo checkpoint, a reference-format checkpoint (any registered family), a preset's hub id, or a hub id.

    Nothing in the checkpoint is trusted blindly, and every check runs before the model is allocated: the config
    (types and ranges, fields a family does not implement), the parameter count it implies against the tensors the
    checkpoint holds and the memory available, the shard index (plain file names inside the directory; index and
    shards agree). Then the weights: dtype kinds must match; non-finite values are a warning naming the tensors, or
    an error with ``strict_finite=True``."""
    target = str(id_or_path)
    swap = None
    if is_preset(target) and not Path(target).exists():  # a preset name: its published checkpoint
        preset = get_preset_entry(target)[1]
        if not preset.hub_id:
            raise ValueError(f"preset {target!r} has no published checkpoint; use zoo.create_model({target!r})")
        target, revision, swap = preset.hub_id, revision or preset.revision, preset.swap
    path = resolve(target, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    cfg = read_config_json(path)
    family = None
    if "zoo_version" in cfg:
        config = ZooConfig.from_dict(cfg)
        fmt = "zoo"
    else:
        family = detect_family(cfg)
        config = family.config_from_reference(cfg)
        fmt = family.name
    n_params = parameter_count(config)  # sizes first: nothing is read or allocated for an absurd config
    held = checkpoint_numel(path)  # from the safetensors headers (None for .bin)
    if strict and held is not None:
        check_matches_checkpoint(config, n_params, held, path)
    check_fits_memory(config, n_params=n_params, what=f"loading {target!r}")
    sd = load_weights(path)
    if strict and held is None:
        check_matches_checkpoint(config, n_params, sum(t.numel() for t in sd.values()), path)
    if family is not None:
        sd = family.state_dict_from_reference(sd, config)
    if strict:  # every parameter will be overwritten: skip random init by building on the meta device
        with torch.device("meta"):
            model = ZooForCausalLM(config)
        model.to_empty(device="cpu")
        _reset_buffers(model)
    else:
        model = ZooForCausalLM(config)
    load_state_dict_strict(model, sd, strict=strict, strict_finite=strict_finite)
    if config.tie_embeddings:
        model.lm_head.weight = model.embedding.weight
    if swap:  # a hybrid preset: the published checkpoint with some layers swapped (weights reused where they fit)
        from zoo.models.lm import swap_layers

        model = swap_layers(model, swap)
    model.to(device=device, dtype=dtype)
    model.source = _source(path, str(id_or_path), target, revision, fmt, swap)
    return model.eval()


def _source(path: Path, asked: str, target: str, revision: str | None, fmt: str,
            swap: dict | None) -> CheckpointSource:
    """What ``model.source`` records: a hub snapshot's repo id and commit, or the local directory."""
    hub_id = None
    if not Path(target).expanduser().is_dir():  # resolved from the hub (or its cache)
        hub_id = target
        if path.parent.name == "snapshots":
            revision = path.name  # the commit the snapshot holds
    return CheckpointSource(path=str(path), id=asked, hub_id=hub_id, revision=revision, format=fmt,
                            swap=dict(swap) if swap else None)


def _reset_buffers(model: ZooForCausalLM) -> None:
    """Recompute non-persistent buffers (RoPE frequencies, ...) after building on the meta device."""
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
