"""Text for training and evaluation, offline on every machine.

The default corpus is the Python standard library's own source (``*.py`` under ``sysconfig``'s ``stdlib`` path,
without tests, site-packages and the codec tables): about 10 MB of real, long, structured text that every Python
installation carries. Files are split into train / held-out by a hash of their path relative to the stdlib
(``crc32 % 10 == 0`` -> held-out, about 10%), so the split is the same on every machine with the same Python
version (which is recorded with the results). Any text file or directory of text files is accepted instead: a
directory is split by the same file hash; a single file by position (its last 10% are held out).
"""

from __future__ import annotations

import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

SPLITS = ("train", "heldout")
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test",
                           "encodings", "turtledemo", "ensurepip"})
HELDOUT_EVERY = 10


@dataclass
class Corpus:
    """Documents (texts) of one split of a source. ``name`` says where they came from."""

    name: str
    split: str
    documents: list[str]

    @property
    def n_chars(self) -> int:
        return sum(len(d) for d in self.documents)

    def token_documents(self, tokenizer) -> list[torch.Tensor]:
        """Each document as a 1-D LongTensor of ``tokenizer.encode(text, add_bos=False)`` ids (byte-level by
        default), empty documents dropped."""
        out = []
        for d in self.documents:
            ids = _encode(tokenizer, d)
            if len(ids):
                out.append(torch.tensor(ids, dtype=torch.long))
        return out


def _encode(tokenizer, text: str) -> list[int]:
    try:
        return tokenizer.encode(text, add_bos=False)
    except TypeError:  # a transformers tokenizer
        return tokenizer.encode(text, add_special_tokens=False)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(relative_path: str) -> bool:
    return zlib.crc32(relative_path.encode()) % HELDOUT_EVERY == 0


def _files(root: Path, pattern: str) -> list[Path]:
    return sorted(f for f in root.rglob(pattern)
                  if f.is_file() and not EXCLUDED_DIRS & set(f.relative_to(root).parts[:-1]))


def load_corpus(source: str | Path | None = None, split: str = "train", *, max_chars: int | None = None) -> Corpus:
    """``source``: ``None`` or ``"stdlib"`` (the default corpus), a text file, or a directory (its ``*.py``,
    ``*.txt`` and ``*.md`` files). ``max_chars``: stop after this many characters (whole documents, in order)."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {list(SPLITS)}")
    if source is None or str(source) == "stdlib":
        root, files, name = stdlib_root(), None, "python-stdlib"
        files = _files(root, "*.py")
        if len(files) < 20:
            raise ValueError(f"the Python standard library sources were not found under {root} (found "
                             f"{len(files)} .py files); pass a text file or directory as the corpus instead")
    else:
        path = Path(source)
        if path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace")
            cut = int(len(text) * (1 - 1 / HELDOUT_EVERY))
            doc = text[:cut] if split == "train" else text[cut:]
            return Corpus(str(path), split, [doc[:max_chars] if max_chars else doc])
        if not path.is_dir():
            raise ValueError(f"corpus {str(source)!r} is neither 'stdlib', a text file nor a directory")
        root, name = path, str(path)
        files = sorted({*_files(root, "*.py"), *_files(root, "*.txt"), *_files(root, "*.md")})
    docs, total = [], 0
    for f in files:
        if is_heldout(f.relative_to(root).as_posix()) != (split == "heldout"):
            continue
        text = f.read_text(encoding="utf-8", errors="replace")
        docs.append(text)
        total += len(text)
        if max_chars is not None and total >= max_chars:
            break
    if not docs:
        raise ValueError(f"corpus {name!r} has no documents in the {split!r} split")
    return Corpus(name, split, docs)


def pack_documents(docs: list[torch.Tensor], eos_token_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One stream ``[N]`` of all documents (each followed by ``eos_token_id`` when given) and its document ids."""
    parts, ids = [], []
    for i, d in enumerate(docs):
        if eos_token_id is not None:
            d = torch.cat([d, torch.tensor([eos_token_id])])
        parts.append(d)
        ids.append(torch.full((len(d),), i, dtype=torch.long))
    return torch.cat(parts), torch.cat(ids)
