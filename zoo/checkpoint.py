"""Checkpoint files: the zoo format on disk, reference-format weights, model cards, and the Hub upload.

* Zoo format: ``config.json`` (``ZooConfig`` + ``zoo_version``), ``model.safetensors``, ``README.md`` card.
* Weights: safetensors (sharded or not) first, else ``pytorch_model.bin`` read with
  ``torch.load(weights_only=True)`` only.
* Loading is strict: every checkpoint key used, every parameter filled, or an error listing both sides.
* Saving writes only the checkpoint's own files into the target directory, each atomically (a temp file in the
  same directory, then ``os.replace``); other files there are kept, a path that is a file is refused. With
  ``max_shard_size`` the weights are split into ``model-00001-of-0000N.safetensors`` shards plus
  ``model.safetensors.index.json`` (transformers' layout); weight files of an earlier save that this one did not
  write (stale shards, an index, the unsharded file) are removed, nothing else.
* Tokenizer files travel with checkpoints: ``tokenizer=`` takes a tokenizer object (``save_pretrained(dir)``) or
  a directory whose tokenizer files (:data:`TOKENIZER_PATTERNS`) are copied.

This module works on any model with ``config``/``state_dict``; resolving ids and building models is
:mod:`zoo.hub`'s job.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import math
import os
import pickle
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file, save_model
from torch import Tensor, nn

from zoo.config import json_restore, json_safe
from zoo.registry import get_format, list_formats
from zoo.version import __version__

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
# Files of a tokenizer saved next to the weights (transformers' fast/slow tokenizers, sentencepiece, the DNA k-mers).
TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt",
                      "spiece.model", "sentencepiece*.model", "chat_template.*")


@dataclass
class CheckpointSource:
    """Where a loaded model came from (``model.source``; the model card's "source checkpoint and conversion")."""

    path: str  # the local directory that was read
    id: str  # what was asked for: a directory, a hub repo id or a preset name
    hub_id: str | None = None  # the hub repo, when it came from the hub
    revision: str | None = None  # the commit of the hub snapshot (or the requested revision)
    format: str = "zoo"  # "zoo", or the family whose reference format was converted
    swap: dict[str, Any] | None = None  # layers swapped after loading (``zoo.swap_layers`` spec)


def tokenizer_files(path: str | os.PathLike) -> list[Path]:
    """The tokenizer files in the directory ``path`` (:data:`TOKENIZER_PATTERNS`), sorted; [] if none."""
    path = Path(path)
    if not path.is_dir():
        return []
    return sorted(f for f in path.iterdir()
                  if f.is_file() and any(fnmatch.fnmatch(f.name, pat) for pat in TOKENIZER_PATTERNS))


MAX_CONFIG_BYTES = 16 << 20  # a config.json is a few KB; a larger one is not read into memory


def read_config_json(path: Path) -> dict[str, Any]:
    file = path / CONFIG_NAME
    if not file.is_file():  # the directory's contents are not listed: the id may be any directory (/etc, ~, ..)
        raise FileNotFoundError(f"{str(path)!r} is not a checkpoint directory: it has no {CONFIG_NAME}")
    size = file.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"{file} is {size:,} bytes; a config.json is at most {MAX_CONFIG_BYTES:,}: "
                         "refusing to read it")
    try:
        cfg = json_restore(json.loads(file.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


# ---------------------------------------------------------------------------------------------- weights
WEIGHT_FORMATS = ("model.safetensors", "pytorch_model.bin")


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
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in sd.items()):
        raise ValueError(f"{file} does not hold a flat dict of tensors")
    return sd


def _safetensors_header(file: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """``name -> (shape, dtype)`` from a safetensors file's header only (no tensor data is read)."""
    try:
        with safe_open(str(file), framework="pt") as f:
            out = {}
            for k in f.keys():
                sl = f.get_slice(k)
                out[k] = (tuple(sl.get_shape()), str(sl.get_dtype()))
            return out
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"cannot read {file} (truncated or not a safetensors file?): {e}") from None


def _plain_shard_name(name: Any, index: Path) -> str:
    """A shard entry of an index must be a plain file name in the checkpoint directory: never a path that reaches
    elsewhere (``../x``, ``/abs``, ``sub/x``, ``C:\\x``), so loading never reads outside the checkpoint."""
    ok = (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
          and "\x00" not in name and ":" not in name and Path(name).name == name)
    if not ok:
        raise ValueError(f"{index.name} names shard {name!r}, which is not a plain file name inside {index.parent}; "
                         "refusing to read anything outside the checkpoint directory")
    return name


def _read_index(index: Path) -> dict[str, str]:
    """``weight_map`` (tensor name -> shard file name) of a shard index, every entry validated."""
    try:
        data = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{index} is not valid JSON: {e}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index} must hold a JSON object with a non-empty 'weight_map' {{tensor name: shard file}}")
    return {str(k): _plain_shard_name(v, index) for k, v in weight_map.items()}


def weight_files(path: Path) -> tuple[list[Path], Path | None, dict[str, str] | None]:
    """The checkpoint's weight files: ``model.safetensors[.index.json]`` first, else ``pytorch_model.bin[.index.json]``.
    Returns ``(files, index file or None, weight_map or None)``; the index is validated (plain shard names only)."""
    for name in WEIGHT_FORMATS:
        index = path / f"{name}.index.json"
        if index.is_file():
            weight_map = _read_index(index)
            files = [path / shard for shard in sorted(set(weight_map.values()))]
            for f in files:
                if not f.is_file():
                    raise FileNotFoundError(f"{index.name} names shard {f.name!r}, which is missing from {path}")
            return files, index, weight_map
        if (path / name).is_file():
            return [path / name], None, None
    # the directory's contents are not listed (it may be any directory)
    raise FileNotFoundError(f"no weights in {path}: expected model.safetensors or pytorch_model.bin (optionally "
                            "sharded with an .index.json)")


def _check_shard(index: Path | None, weight_map: dict[str, str] | None, file: Path, names: Any,
                 owner: dict[str, str]) -> None:
    """Every tensor of a shard appears in no other shard and is listed for this shard by the index."""
    for k in names:
        if k in owner:
            raise ValueError(f"tensor {k!r} is in two weight files, {owner[k]} and {file.name}; refusing to pick one")
        owner[k] = file.name
        if weight_map is not None and weight_map.get(k) != file.name:
            listed = f"lists it in {weight_map[k]}" if k in weight_map else "does not list it"
            raise ValueError(f"shard {file.name} holds tensor {k!r} but the index {index.name} {listed}; refusing a "
                             "checkpoint whose index and shards disagree")


def _check_index_covered(index: Path | None, weight_map: dict[str, str] | None, owner: dict[str, str]) -> None:
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(owner))
        if missing:
            raise ValueError(f"{index.name} lists tensors that are in none of its shards: {missing[:8]}")


def checkpoint_numel(path: Path) -> int | None:
    """How many values the checkpoint's tensors hold, from the safetensors headers alone (nothing is loaded), with
    the index and shards cross-checked; None for ``.bin`` checkpoints (their sizes are known only once read)."""
    files, index, weight_map = weight_files(path)
    if files[0].suffix != ".safetensors":
        return None
    owner: dict[str, str] = {}
    total = 0
    for f in files:
        header = _safetensors_header(f)
        _check_shard(index, weight_map, f, header, owner)
        total += sum(math.prod(shape) for shape, _ in header.values())
    _check_index_covered(index, weight_map, owner)
    return total


def load_weights(path: Path) -> dict[str, Tensor]:
    """A checkpoint's tensors: ``model.safetensors[.index.json]`` first, else ``pytorch_model.bin[.index.json]``.

    A shard index may name plain files of this directory only; a tensor found in two shards, or in a shard the index
    does not assign it to, or listed by the index but in no shard, is an error naming the files."""
    files, index, weight_map = weight_files(path)
    loader = _load_safetensors if files[0].suffix == ".safetensors" else _load_bin
    sd: dict[str, Tensor] = {}
    owner: dict[str, str] = {}
    for f in files:
        shard = loader(f)
        _check_shard(index, weight_map, f, shard, owner)
        sd.update(shard)
    _check_index_covered(index, weight_map, owner)
    return sd


def _nonfinite(t: Tensor, chunk: int = 1 << 24) -> bool:
    """Whether a floating tensor holds a NaN or an infinity (checked in chunks: no full-size temporary)."""
    flat = t.detach().reshape(-1)
    return any(not bool(torch.isfinite(flat[i:i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def load_state_dict_strict(model: nn.Module, sd: dict[str, Tensor], *, strict: bool = True,
                           strict_finite: bool = False) -> None:
    """Fill every parameter of ``model`` from ``sd``; with ``strict``, any missing, unexpected or mis-shaped key
    is an error naming them all. A tied head may be absent from ``sd`` or present and equal to the embedding.

    Never trusted blindly: a tensor whose kind differs from the parameter's (integer or bool values where the model
    has floats, or the reverse) is an error, not a silent cast; non-finite values (NaN/Inf) are reported by tensor
    name, as a warning, or an error with ``strict_finite=True``."""
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
    common = sorted(set(sd) & set(expected))
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in common if sd[k].shape != expected[k].shape]
    kinds = [f"{k}: checkpoint {sd[k].dtype} vs model {expected[k].dtype}" for k in common
             if (sd[k].is_floating_point(), sd[k].is_complex(), sd[k].dtype == torch.bool)
             != (expected[k].is_floating_point(), expected[k].is_complex(), expected[k].dtype == torch.bool)]
    if shapes or kinds or (strict and (missing or unexpected)):
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing[:12]}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected[:12]}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {shapes[:12]}")
        if kinds:
            parts.append(f"dtype kinds differ, refusing to cast ({len(kinds)}): {kinds[:12]}")
        raise ValueError("checkpoint does not match the model: " + "; ".join(parts))
    bad = [k for k in common if sd[k].is_floating_point() and _nonfinite(sd[k])]
    if bad:
        msg = f"checkpoint has non-finite values (NaN or Inf) in {len(bad)} tensor(s): {bad[:12]}"
        if strict_finite:
            raise ValueError(msg)
        warnings.warn(msg + " (pass strict_finite=True to refuse such checkpoints)", stacklevel=3)
    model.load_state_dict(sd, strict=False)


# ---------------------------------------------------------------------------------------------- saving
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def checkpoint_dir(path: str | os.PathLike) -> Path:
    """``path`` as a directory to save into: created (honouring the umask) if missing, refused if it is a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"cannot save a checkpoint to {str(path)!r}: it exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def staged_files(path: Path) -> Iterator[Callable[[str], Path]]:
    """Write a checkpoint's own files atomically, leaving every other file of ``path`` alone.

    Yields ``stage(name) -> temp path`` (a hidden temp file in ``path`` itself, so the final rename cannot cross
    file systems). When the block succeeds, each staged file is given the umask's permissions and renamed over
    ``path / name`` (``os.replace``); when it fails, the temp files are removed and the files already in ``path``
    (a previous checkpoint included) are untouched."""
    staged: dict[str, Path] = {}

    def stage(name: str) -> Path:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=path)
        os.close(fd)
        staged[name] = Path(tmp)
        return Path(tmp)

    try:
        yield stage
    except BaseException:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
        raise
    mode = 0o666 & ~_umask()
    for name, tmp in staged.items():
        os.chmod(tmp, mode)
        os.replace(tmp, path / name)


def remove_stale_shards(path: Path, weights_name: str, written: set[str]) -> list[str]:
    """Delete the weight files of an earlier save of a checkpoint that this save did not write: shards
    ``<stem>-NNNNN-of-NNNNN<ext>`` and ``<weights_name>.index.json`` (what transformers removes); nothing else."""
    stem, ext = os.path.splitext(weights_name)
    pattern = re.compile(rf"^{re.escape(stem)}(-\d{{5}}-of-\d{{5}})?{re.escape(ext)}(\.index\.json)?$")
    removed = []
    for f in path.iterdir():
        if f.is_file() and f.name not in written and pattern.match(f.name):
            f.unlink()
            removed.append(f.name)
    return removed


def stage_weights(stage: Callable[[str], Path], sd: dict[str, Tensor], weights_name: str, *,
                  max_shard_size: int | str | None = None, metadata: dict[str, str] | None = None,
                  shardable: bool = True) -> set[str]:
    """Write ``sd`` as ``weights_name`` (``.safetensors`` or a plain-tensor ``.bin``) through ``stage``, or, when it
    exceeds ``max_shard_size`` (bytes or a string like ``"5GB"``), as ``<stem>-00001-of-0000N<ext>`` shards plus
    ``<weights_name>.index.json``. Returns the names written (for :func:`remove_stale_shards`)."""
    metadata = {"format": "pt", **(metadata or {})}
    sd = {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}
    write = ((lambda part, file: torch.save(part, file)) if weights_name.endswith(".bin")
             else (lambda part, file: save_file(part, str(file), metadata=metadata)))
    if max_shard_size is None:
        write(sd, stage(weights_name))
        return {weights_name}
    from huggingface_hub import split_torch_state_dict_into_shards

    stem, ext = os.path.splitext(weights_name)
    split = split_torch_state_dict_into_shards(sd, filename_pattern=stem + "{suffix}" + ext,
                                               max_shard_size=max_shard_size)
    if not split.is_sharded:
        write(sd, stage(weights_name))
        return {weights_name}
    if not shardable:
        total = sum(v.numel() * v.element_size() for v in sd.values())
        raise ValueError(f"{weights_name}: this format's reference loader reads one unsharded file, but the weights "
                         f"({total / 2**30:.2f} GiB) exceed max_shard_size={max_shard_size!r}; pass a larger one")
    for name, keys in split.filename_to_tensors.items():
        write({k: sd[k] for k in keys}, stage(name))
    index = {"metadata": {**split.metadata, **metadata}, "weight_map": dict(sorted(split.tensor_to_filename.items()))}
    stage(weights_name + ".index.json").write_text(json.dumps(index, indent=2) + "\n")
    return set(split.filename_to_tensors) | {weights_name + ".index.json"}


def stage_tokenizer(stage: Callable[[str], Path], path: Path, tokenizer: Any) -> list[str]:
    """Stage a tokenizer's files: ``tokenizer`` is an object with ``save_pretrained(directory)``, or a directory
    whose tokenizer files are copied (none there: nothing written). Returns the file names."""
    if tokenizer is None:
        return []
    if isinstance(tokenizer, (str, os.PathLike)):
        if not Path(tokenizer).is_dir():
            raise NotADirectoryError(f"tokenizer={str(tokenizer)!r}: expected a directory holding tokenizer files")
        files = tokenizer_files(tokenizer)
        for f in files:
            shutil.copyfile(f, stage(f.name))
        return [f.name for f in files]
    with tempfile.TemporaryDirectory(prefix=".tokenizer.", dir=path) as tok_dir:
        tokenizer.save_pretrained(tok_dir)
        files = sorted(f for f in Path(tok_dir).iterdir() if f.is_file())
        for f in files:
            shutil.copyfile(f, stage(f.name))
        return [f.name for f in files]


def save_pretrained(model: nn.Module, path: str | os.PathLike, *, card: bool = True,
                    card_data: dict[str, Any] | None = None, tokenizer: Any = None,
                    max_shard_size: int | str | None = None, state_dict: dict[str, Tensor] | None = None) -> Path:
    """Write ``config.json`` (zoo format), ``model.safetensors`` (or shards + index past ``max_shard_size``) and a
    ``README.md`` model card into the directory ``path`` (created if needed). Each file is written atomically; other
    files in the directory are kept. ``tokenizer``: an object with ``save_pretrained(directory)`` (e.g. a
    ``DNAKmerTokenizer``) or a directory whose tokenizer files are copied. ``state_dict``: the tensors to write
    instead of ``model.state_dict()`` (same keys; e.g. from a training loop)."""
    path = checkpoint_dir(path)
    metadata = {"format": "pt", "zoo_version": __version__}
    with staged_files(path) as stage:
        model.config.save(stage(CONFIG_NAME))
        if max_shard_size is None and state_dict is None:
            save_model(model, str(stage(WEIGHTS_NAME)), metadata=metadata)  # drops the tied head itself
            written = {WEIGHTS_NAME}
        else:
            sd = dict(state_dict if state_dict is not None else model.state_dict())
            if model.config.tie_embeddings:
                sd.pop("lm_head.weight", None)  # stored once, as embedding.weight
            written = stage_weights(stage, sd, WEIGHTS_NAME, max_shard_size=max_shard_size, metadata=metadata)
        stage_tokenizer(stage, path, tokenizer)
        if card:
            render_model_card(model, **(card_data or {})).save(str(stage(CARD_NAME)))
    remove_stale_shards(path, WEIGHTS_NAME, written)
    return path


def save_reference(model: nn.Module, path: str | os.PathLike, family: Any = None, *,
                   max_shard_size: int | str | None = None, tokenizer: Any = None, card: bool = False,
                   card_data: dict[str, Any] | None = None) -> Path:
    """Export to a reference format (config.json + weights), e.g. a transformers Llama directory. ``family``: a
    registered export format's name (``zoo.registry.list_formats()``) or a ``Family`` object (default: the model's
    own family). Raises ``ValueError`` naming the layers the format cannot hold."""
    if family is None:
        if not model.config.family:
            raise ValueError("the model has no family (a zoo-native config): name the export format, one of "
                             f"{list_formats()}")
        family = model.config.family
    fam = get_format(family) if isinstance(family, str) else family
    ref_cfg = fam.config_to_reference(model.config)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight")
    ref_sd = fam.state_dict_to_reference(sd, model.config)
    if not fam.reference_weights_name.endswith(".bin"):  # safetensors refuses tensors sharing memory
        seen: set[int] = set()
        for k, v in ref_sd.items():
            ptr = v.untyped_storage().data_ptr()
            if ptr in seen:
                ref_sd[k] = v.clone()
            seen.add(ptr)
    path = checkpoint_dir(path)
    weights = fam.reference_weights_name
    with staged_files(path) as stage:
        stage(CONFIG_NAME).write_text(json.dumps(json_safe(ref_cfg), indent=2, allow_nan=False) + "\n")
        written = stage_weights(stage, ref_sd, weights, max_shard_size=max_shard_size, shardable=fam.shardable)
        stage_tokenizer(stage, path, tokenizer)
        if card:
            render_model_card(model, **{"export_format": fam.name, **(card_data or {})}).save(str(stage(CARD_NAME)))
    remove_stale_shards(path, weights, written)
    return path


def push_to_hub(model: nn.Module, repo_id: str, *, private: bool | None = None,
                commit_message: str = "Upload zoo model", token: str | None = None,
                card_data: dict[str, Any] | None = None, tokenizer: Any = None, revision: str | None = None,
                max_shard_size: int | str | None = None) -> str:
    """Create the repo if needed and upload ``save_pretrained``'s files in one commit; returns the commit URL.
    Uploads without checks; ``zoo.publish.publish`` (``zoo publish``) validates the folder first."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, Path(tmp) / "model", card_data=card_data, tokenizer=tokenizer,
                        max_shard_size=max_shard_size)
        kwargs = {"revision": revision} if revision else {}
        info = api.upload_folder(repo_id=repo_id, folder_path=str(Path(tmp) / "model"),
                                 commit_message=commit_message, repo_type="model", **kwargs)
    return str(getattr(info, "commit_url", info))


def render_model_card(model: nn.Module, **card_data: Any):
    """The ``README.md`` card (see :func:`zoo.cards.render_model_card`)."""
    from zoo.cards import render_model_card as render

    return render(model, **card_data)
