"""Publishing a checkpoint to the Hugging Face Hub: load, convert, **validate**, render the card, upload.

``publish(source, repo_id, ...)`` (and ``zoo publish``):

1. load ``source``: a zoo checkpoint, a reference-format checkpoint (any registered family), a hub id or a preset
   name (its published checkpoint; a preset without one only with ``random_init=True``), optionally swap layers
   (``swap={"0-3": "sliding_window(window=1024)"}``, the ``zoo.swap_layers`` form) and cast (``dtype``);
2. refuse non-finite weights in the model;
3. write the folder: ``to="zoo"`` (default) or a reference format (``zoo.registry.list_formats()``), weights
   sharded past ``max_shard_size`` (index file), the source checkpoint's tokenizer files copied along;
4. validate it: reload the written folder with ``zoo.from_pretrained`` and compare logits on a fixed probe input
   against the in-memory model (refused when ``max|Δ| > atol * max(1, max|logits|)``, default ``atol`` 1e-5 = fp32
   noise), and refuse non-finite weights in what was written. A failure raises :class:`ValidationError` naming the
   cause, and nothing is uploaded;
5. render the model card (``README.md``) into the folder;
6. upload: ``HfApi.create_repo(exist_ok=True)`` (+ ``create_branch`` for a ``revision`` other than main), then
   one ``upload_folder`` commit. ``dry_run=True`` stops before any Hub call and reports what would be uploaded.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from zoo.checkpoint import CARD_NAME, CheckpointSource, save_pretrained, save_reference
from zoo.config import parse_layer_selector, parse_mixer_spec
from zoo.models.lm import ZooForCausalLM, create_model, swap_layers
from zoo.registry import get_format, get_preset_entry, is_preset

PROBE_SHAPE = (2, 48)  # rows x tokens of the validation probe; row 1 is left-padded by 7 tokens
PROBE_PAD = 7
DEFAULT_MAX_SHARD_SIZE = "5GB"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ValidationError(ValueError):
    """The written folder does not reproduce the model (or holds non-finite weights): nothing was uploaded."""


@dataclass
class PublishResult:
    repo_id: str
    folder: Path  # the written folder (a temporary one is removed after the upload unless kept)
    files: list[tuple[str, int]]  # (relative path, bytes) of what is / would be uploaded
    max_abs_diff: float  # validation: max |Δ logits| between the reloaded folder and the in-memory model
    tolerance: float
    uploaded: bool = False
    commit_url: str | None = None
    revision: str | None = None
    private: bool | None = None
    commit_message: str = ""
    notes: list[str] = field(default_factory=list)
    model: ZooForCausalLM | None = field(default=None, repr=False)  # the in-memory model that was validated

    def summary(self) -> str:
        total = sum(n for _, n in self.files)
        rev = self.revision or "main"
        head = (f"uploaded to {self.repo_id}@{rev}: {self.commit_url}" if self.uploaded else
                f"dry run: would upload to {self.repo_id}@{rev} (private={self.private}, "
                f"commit message {self.commit_message!r}); nothing was uploaded")
        lines = [head, f"folder: {self.folder}",
                 f"validation: reloaded folder vs in-memory model, max |Δ logits| = {self.max_abs_diff:.3g} "
                 f"(tolerance {self.tolerance:.3g}) on a {PROBE_SHAPE[0]}x{PROBE_SHAPE[1]} probe",
                 f"{len(self.files)} files, {total / 2**20:.2f} MiB:"]
        lines += [f"  {name}  ({size:,} bytes)" for name, size in self.files]
        return "\n".join(lines + self.notes)


# ---------------------------------------------------------------------------------------------- steps
def parse_swap(items: list[str] | dict[str, Any] | str | None) -> dict[str, Any] | None:
    """``["0-3=sliding_window(window=8)", "5=mamba2"]`` (or a JSON object string, or a dict) -> a
    ``zoo.swap_layers`` spec; each mixer spec is parsed here so a typo fails before anything is loaded."""
    if items is None or items == [] or items == {}:
        return None
    if isinstance(items, str):
        items = [items]
    if isinstance(items, list):
        spec: dict[str, Any] = {}
        for item in items:
            if item.lstrip().startswith("{"):
                try:
                    spec.update(json.loads(item))
                except json.JSONDecodeError as e:
                    raise ValueError(f"--swap {item!r} is not a JSON object: {e}") from None
                continue
            selector, sep, mixer = item.partition("=")
            if not sep or not selector.strip() or not mixer.strip():
                raise ValueError(f"--swap {item!r}: expected LAYERS=MIXER, e.g. '0-3=sliding_window(window=1024)'")
            spec[selector.strip()] = mixer.strip()
        items = spec
    for mixer in items.values():
        parse_mixer_spec(mixer)
    return dict(items)


def load_source(source: str, *, random_init: bool = False, seed: int = 0) -> ZooForCausalLM:
    """A zoo / reference checkpoint directory, hub id or preset (its checkpoint; without one, a random init only
    when ``random_init``)."""
    import zoo

    if is_preset(source) and not Path(source).exists():
        _, preset = get_preset_entry(source)
        if not preset.hub_id:
            if not random_init:
                raise ValueError(f"preset {source!r} has no published checkpoint: publishing it means publishing "
                                 "random weights; pass random_init=True (--random-init) if that is the intent")
            torch.manual_seed(seed)
            model = create_model(source)
            model.source = CheckpointSource(path="", id=source, format="zoo")
            return model.eval()
    return zoo.from_pretrained(source)


def nonfinite(named: Iterator[tuple[str, Tensor]]) -> list[str]:
    return [k for k, v in named if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def probe_inputs(vocab_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The fixed validation probe: ids ``[2, 48]`` from seed 0; row 1 left-padded by 7 tokens."""
    ids = torch.randint(0, vocab_size, PROBE_SHAPE, generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :PROBE_PAD] = 0
    return ids, mask


@torch.no_grad()
def probe_logits(model: ZooForCausalLM) -> Tensor:
    ids, mask = probe_inputs(model.config.vocab_size, model.device)
    logits = model(ids, attention_mask=mask).logits.float()
    logits[1, :PROBE_PAD] = 0  # padded positions carry no meaning
    return logits


def write_folder(model: ZooForCausalLM, folder: Path, *, to: str = "zoo", max_shard_size: int | str | None = None,
                 tokenizer: Any = None) -> Path:
    """Step 3: the checkpoint files (no card yet) in ``folder``."""
    if to == "zoo":
        return save_pretrained(model, folder, card=False, max_shard_size=max_shard_size, tokenizer=tokenizer)
    return save_reference(model, folder, get_format(to), max_shard_size=max_shard_size, tokenizer=tokenizer)


def validate_folder(model: ZooForCausalLM, folder: Path, *, atol: float = 1e-5) -> tuple[float, float]:
    """Step 4: reload ``folder`` and compare; returns ``(max |Δ logits|, tolerance)`` or raises ValidationError."""
    import zoo

    try:
        back = zoo.from_pretrained(folder, dtype=model.dtype, device=model.device)
    except (ValueError, KeyError, OSError) as e:
        raise ValidationError(f"validation failed: the written folder {folder} does not load back: {e}") from e
    bad = nonfinite(back.named_parameters())
    if bad:
        raise ValidationError(f"validation failed: the written checkpoint holds non-finite (NaN/Inf) weights in "
                              f"{len(bad)} tensor(s): {bad[:8]}")
    want, got = probe_logits(model), probe_logits(back)
    diff = float((want - got).abs().max())
    tol = atol * max(1.0, float(want.abs().max()))
    if not diff <= tol:  # also catches NaN
        raise ValidationError(f"validation failed: logits of the reloaded folder differ from the in-memory model's "
                              f"by max |Δ| = {diff:.3g} > tolerance {tol:.3g} (fp32 noise) on the "
                              f"{PROBE_SHAPE[0]}x{PROBE_SHAPE[1]} probe: the written weights or config are not "
                              "the model's")
    return diff, tol


def folder_files(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*")
                  if p.is_file() and not p.name.startswith("."))


@contextlib.contextmanager
def _folder(out: str | Path | None, keep: bool) -> Iterator[Path]:
    if out is not None:
        yield Path(out)
        return
    tmp = Path(tempfile.mkdtemp(prefix="zoo-publish-"))
    ok = False
    try:
        yield tmp / "model"
        ok = True
    finally:
        if not (keep and ok):
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- publish
def publish(source: str | ZooForCausalLM, repo_id: str, *, swap: dict[str, Any] | list[str] | None = None,
            to: str = "zoo", out: str | Path | None = None, dry_run: bool = False, revision: str | None = None,
            private: bool | None = None, commit_message: str | None = None,
            max_shard_size: int | str | None = DEFAULT_MAX_SHARD_SIZE, dtype: str | torch.dtype | None = None,
            license: str = "apache-2.0", datasets: list[str] | None = None, base_model: str | None = None,
            results: list[str | Path] | None = None, tags: list[str] | None = None, random_init: bool = False,
            atol: float = 1e-5, token: str | None = None, api: Any = None) -> PublishResult:
    """Load, convert, validate, render the card and upload (see the module docstring). ``source``: a directory, hub
    id, preset name, or an in-memory model. ``out``: where to write the folder (default: a temporary directory,
    kept for a dry run). Returns a :class:`PublishResult`; raises :class:`ValidationError` (nothing uploaded)."""
    if "/" not in repo_id or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo_id {repo_id!r} must look like 'namespace/name'")
    if to != "zoo":
        get_format(to)  # unknown formats fail before loading
    swap = parse_swap(swap)
    model = source if isinstance(source, ZooForCausalLM) else load_source(source, random_init=random_init)
    model.eval()
    if swap:
        for selector in swap:
            parse_layer_selector(selector, model.config.n_layers)
        swap_layers(model, swap)
        src = getattr(model, "source", None)
        if src is not None:
            src.swap = {**(src.swap or {}), **swap}
    if dtype is not None:
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
            dtype = DTYPES[dtype]
        model.to(dtype=dtype)
    bad = nonfinite(model.named_parameters())
    if bad:
        raise ValidationError(f"refusing to publish: the model holds non-finite (NaN/Inf) weights in {len(bad)} "
                              f"tensor(s): {bad[:8]}")
    src = getattr(model, "source", None)
    tokenizer = src.path if src is not None and src.path and Path(src.path).is_dir() else None
    commit_message = commit_message or f"Upload {model.config.name or model.config.family or 'zoo'} model with zoo"
    with _folder(out, keep=dry_run) as folder:
        write_folder(model, folder, to=to, max_shard_size=max_shard_size, tokenizer=tokenizer)
        diff, tol = validate_folder(model, folder, atol=atol)
        from zoo.checkpoint import render_model_card

        card = render_model_card(model, license=license, datasets=datasets, base_model=base_model, results=results,
                                 tags=tags or (), repo_id=repo_id, export_format=None if to == "zoo" else to)
        card.save(str(folder / CARD_NAME))
        result = PublishResult(repo_id=repo_id, folder=folder, files=folder_files(folder), max_abs_diff=diff,
                               tolerance=tol, revision=revision, private=private, commit_message=commit_message,
                               model=model)
        if dry_run:
            if out is None:
                result.notes.append("(the folder is kept for inspection; delete it when done)")
            return result
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        kwargs = {"revision": revision} if revision else {}
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                                 repo_type="model", **kwargs)
        result.uploaded = True
        result.commit_url = str(getattr(info, "commit_url", info))
        return result
