"""UTF-8 byte tokenizer: ids 0-255 are bytes, then ``<bos>``, ``<eos>``, ``<pad>``. Lossless, no vocabulary file."""

from __future__ import annotations

import torch


class ByteTokenizer:
    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 258
    vocab_size = 259

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        return ([self.bos_token_id] if add_bos else []) + list(text.encode("utf-8"))

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def __call__(self, texts: list[str], *, add_bos: bool = True) -> dict[str, torch.Tensor]:
        """Left-padded batch: ``{"input_ids": [B, T], "attention_mask": [B, T]}``."""
        rows = [self.encode(t, add_bos=add_bos) for t in texts]
        T = max(map(len, rows))
        ids = torch.full((len(rows), T), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, T - len(r):] = torch.tensor(r)
            mask[i, T - len(r):] = 1
        return {"input_ids": ids, "attention_mask": mask}
