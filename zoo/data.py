"""Training data on disk: token files read lazily, and batch streams whose position is checkpointable.

Token files (one flat stream of token ids, documents one after the other):

* ``.npy``: a 1-D integer array (memory-mapped);
* ``.bin``: raw little-endian integers, ``dtype`` given (default ``uint16``, the nanoGPT convention);
* ``.safetensors``: a 1-D integer tensor ``"tokens"`` (or ``"input_ids"``), optionally ``"doc_ids"`` (one
  non-decreasing document id per token).

Document boundaries come from ``doc_ids`` when the file has them, else from ``eos_token_id`` (a document ends with
each EOS token), else the stream is one document. :class:`TokenStream` and :class:`DocumentIds` index like
tensors (``t[idx]`` with a LongTensor of positions gives int64 tensors, ``t.numel()``), so the window samplers of
:mod:`zoo.train` read a corpus far larger than memory without loading it.

:class:`ResumableBatches` wraps any batch iterator that draws its randomness from one ``torch.Generator``: its
``state_dict`` is the generator's state and the count of batches drawn, so a restored stream yields exactly the
batches the interrupted run would have drawn next (the data position of a distributed checkpoint).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["TokenStream", "DocumentIds", "load_token_file", "ResumableBatches", "TOKEN_FILE_SUFFIXES"]

TOKEN_FILE_SUFFIXES = (".npy", ".bin", ".safetensors")


class TokenStream:
    """A 1-D array of token ids (numpy, possibly memory-mapped) indexed like a tensor: ``stream[idx]`` -> int64."""

    def __init__(self, array: np.ndarray) -> None:
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            raise ValueError(f"a token stream must be a 1-D integer array, got shape {array.shape} {array.dtype}")
        self.array = array

    def numel(self) -> int:
        return int(self.array.shape[0])

    def __len__(self) -> int:
        return self.numel()

    def __getitem__(self, idx: Tensor | slice | int) -> Tensor:
        if isinstance(idx, Tensor):
            idx = idx.cpu().numpy()
        return torch.from_numpy(np.asarray(self.array[idx], dtype=np.int64))

    def max(self) -> int:
        """The largest id (reads the whole file once)."""
        return int(self.array.max()) if self.numel() else -1


class DocumentIds:
    """Document id of every position of a stream whose documents end at ``ends`` (sorted positions of the last
    token of each document, e.g. the EOS tokens), computed on demand: ``ids[idx]`` -> int64."""

    def __init__(self, ends: np.ndarray, n: int) -> None:
        self.ends, self.n = np.asarray(ends, dtype=np.int64), n

    def numel(self) -> int:
        return self.n

    def __getitem__(self, idx: Tensor | slice | int) -> Tensor:
        if isinstance(idx, Tensor):
            idx = idx.cpu().numpy()
        pos = np.arange(self.n)[idx] if isinstance(idx, slice) else np.asarray(idx)
        return torch.from_numpy(np.searchsorted(self.ends, pos, side="left").astype(np.int64))


def load_token_file(path: str | os.PathLike, *, dtype: str = "uint16", eos_token_id: int | None = None
                    ) -> tuple[TokenStream, Tensor | DocumentIds | None]:
    """``(stream, doc_ids)`` of a token file (module docstring); ``doc_ids`` None: one document."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"token file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    doc_ids: Tensor | DocumentIds | None = None
    if suffix == ".npy":
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    elif suffix == ".bin":
        try:
            np_dtype = np.dtype(dtype)
        except TypeError:
            raise ValueError(f"token file dtype {dtype!r} is not a numpy dtype (e.g. uint16, uint32, int32)") from None
        if not np.issubdtype(np_dtype, np.integer):
            raise ValueError(f"token file dtype {dtype!r} must be an integer type")
        if path.stat().st_size % np_dtype.itemsize:
            raise ValueError(f"{path} has {path.stat().st_size} bytes, not a whole number of {dtype} tokens")
        array = np.memmap(path, dtype=np_dtype.newbyteorder("<"), mode="r")
    elif suffix == ".safetensors":
        from safetensors.numpy import load_file

        tensors = load_file(str(path))
        key = next((k for k in ("tokens", "input_ids") if k in tensors), None)
        if key is None:
            raise ValueError(f"{path} holds {sorted(tensors)}; expected a 'tokens' (or 'input_ids') tensor")
        array = tensors[key]
        if "doc_ids" in tensors:
            ids = tensors["doc_ids"]
            if ids.shape != array.shape:
                raise ValueError(f"{path}: doc_ids has shape {ids.shape}, tokens {array.shape}")
            doc_ids = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    else:
        raise ValueError(f"unknown token file type {suffix!r} ({path}); use one of {list(TOKEN_FILE_SUFFIXES)}")
    stream = TokenStream(array)
    if doc_ids is None and eos_token_id is not None:
        doc_ids = DocumentIds(np.flatnonzero(np.asarray(array) == eos_token_id), stream.numel())
    return stream, doc_ids


class ResumableBatches:
    """``make(generator)`` -> an endless iterator of batches drawing all its randomness from ``generator`` (and
    nothing ahead of the batch it yields); this object iterates over it and checkpoints its position."""

    def __init__(self, make: Callable[[torch.Generator], Iterator[Any]], seed: int) -> None:
        self.make = make
        self.generator = torch.Generator().manual_seed(seed)
        self.drawn = 0
        self._it: Iterator[Any] | None = None

    def __iter__(self) -> ResumableBatches:
        return self

    def __next__(self) -> Any:
        if self._it is None:
            self._it = self.make(self.generator)
        batch = next(self._it)
        self.drawn += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "drawn": self.drawn}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.generator.set_state(sd["generator"])
        self.drawn = int(sd["drawn"])
        self._it = None
