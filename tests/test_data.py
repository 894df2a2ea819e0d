"""Token files (npy / bin / safetensors, lazily indexed, document ids from EOS or stored) and resumable batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from zoo.data import ResumableBatches, load_token_file

TOKENS = np.array([5, 6, 1, 7, 8, 9, 1, 2, 1, 3], dtype=np.uint16)  # EOS = 1 ends documents 0, 1, 2; doc 3 open
DOCS = [0, 0, 0, 1, 1, 1, 1, 2, 2, 3]


@pytest.mark.parametrize("kind", ["npy", "bin", "safetensors"])
def test_token_files_index_like_tensors(tmp_path, kind: str) -> None:
    path = tmp_path / f"tokens.{kind}"
    if kind == "npy":
        np.save(path, TOKENS)
    elif kind == "bin":
        TOKENS.tofile(path)
    else:
        save_file({"tokens": TOKENS.astype(np.int32)}, str(path))
    stream, docs = load_token_file(path, eos_token_id=1)
    assert stream.numel() == len(TOKENS)
    idx = torch.tensor([[0, 1, 2], [7, 8, 9]])
    got = stream[idx]
    assert got.dtype == torch.int64 and got.tolist() == TOKENS[idx.numpy()].tolist()
    assert docs[idx].tolist() == np.array(DOCS)[idx.numpy()].tolist()
    assert docs[torch.arange(len(TOKENS))].tolist() == DOCS
    _, none = load_token_file(path)
    assert none is None


def test_stored_document_ids_and_bad_files(tmp_path) -> None:
    path = tmp_path / "t.safetensors"
    save_file({"input_ids": TOKENS.astype(np.int64), "doc_ids": np.array(DOCS, dtype=np.int64)}, str(path))
    _, docs = load_token_file(path, eos_token_id=5)  # stored ids win over the EOS rule
    assert docs[torch.arange(len(DOCS))].tolist() == DOCS
    save_file({"x": TOKENS.astype(np.int64)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="expected a 'tokens'"):
        load_token_file(tmp_path / "bad.safetensors")
    (tmp_path / "odd.bin").write_bytes(b"\x00\x01\x02")
    with pytest.raises(ValueError, match="not a whole number of uint16 tokens"):
        load_token_file(tmp_path / "odd.bin")
    with pytest.raises(ValueError, match="unknown token file type '.txt'"):
        (tmp_path / "a.txt").write_text("x")
        load_token_file(tmp_path / "a.txt")
    with pytest.raises(ValueError, match="must be an integer type"):
        load_token_file(tmp_path / "odd.bin", dtype="float32")
    with pytest.raises(FileNotFoundError):
        load_token_file(tmp_path / "missing.npy")


def _windows(generator: torch.Generator):
    while True:
        yield torch.randint(0, 100, (2, 4), generator=generator)


def test_resumable_batches_continue_where_they_stopped() -> None:
    data = ResumableBatches(_windows, seed=3)
    first = [next(data) for _ in range(3)]
    state = data.state_dict()
    rest = [next(data) for _ in range(3)]
    again = ResumableBatches(_windows, seed=99)
    again.load_state_dict(state)
    assert again.drawn == 3
    for a, b in zip(rest, [next(again) for _ in range(3)]):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], rest[0])
