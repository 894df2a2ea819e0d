"""Passkey retrieval: a needle (a random k-digit key) hidden in filler at a chosen depth, asked for at the end.

The protocol of the Stuffed Mamba (arXiv 2410.07145) and LongGen (arXiv 2410.01485) papers, after Mohtashami &
Jaggi (2023)::

    <filler ...> The pass key is 71432. Remember it. 71432 is the pass key. <filler ...>
    What is the pass key? The pass key is 71432

with the filler "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
repeated. A sample of length ``L`` (tokens, answer included) puts the needle at ``depth`` in (0, 1) of the
filler. Scoring is exact match of all key tokens by argmax with teacher forcing, which equals greedy decoding of
the answer (every earlier key token is then correct too): one parallel forward per sample.

:class:`TextPasskey` builds this from any tokenizer (byte-level by default); :class:`SyntheticPasskey` is the same
task over a small token vocabulary (random filler "sentences", ``KEY d1..dk KEY`` needle, ``QUERY d1..dk``) for
models trained from scratch. :func:`passkey_batches` yields training batches (answer tokens weighted) for the
same task, so that a model can learn it at its training length before it is evaluated beyond.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from zoo.train import Batch

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


class PasskeyTask:
    """How samples are spelled. Subclasses give the digit tokens and the three pieces around the key."""

    n_digits: int = 5
    digit_tokens: Tensor  # [10] token id of each digit

    def filler(self, n: int, generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    def boundaries(self, filler: Tensor) -> Tensor | None:
        """Positions in the filler where the needle may start (sentence starts), or None for anywhere."""
        return None

    def needle(self, key: Tensor) -> Tensor:
        raise NotImplementedError

    def question(self) -> Tensor:
        raise NotImplementedError

    def sample(self, length: int, depth: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``ids [length]`` and ``answer_pos [k]``: the positions of the key's tokens at the end."""
        digits = torch.randint(0, 10, (self.n_digits,), generator=generator)
        key = self.digit_tokens[digits]
        needle, question = self.needle(key), self.question()
        n_fill = length - len(needle) - len(question) - len(key)
        if n_fill < 0:
            raise ValueError(f"passkey length {length} is shorter than the needle + question + answer "
                             f"({length - n_fill} tokens)")
        filler = self.filler(n_fill, generator)
        at = int(round(depth * n_fill))
        starts = self.boundaries(filler)
        if starts is not None and len(starts):
            at = int(starts[(starts - at).abs().argmin()])
        ids = torch.cat([filler[:at], needle, filler[at:], question, key])
        return ids, torch.arange(length - len(key), length)


class TextPasskey(PasskeyTask):
    """The text protocol through a tokenizer (``encode(text, add_bos=False)``; default: UTF-8 bytes)."""

    def __init__(self, tokenizer=None, n_digits: int = 5, filler: str = FILLER) -> None:
        if tokenizer is None:
            from zoo.tokenizers import ByteTokenizer

            tokenizer = ByteTokenizer()
        self.tokenizer, self.n_digits = tokenizer, n_digits
        enc = self._encode
        self.digit_tokens = torch.tensor([enc(str(d))[0] for d in range(10)])
        if any(len(enc(str(d))) != 1 for d in range(10)):
            raise ValueError("TextPasskey needs a tokenizer that spells each digit as one token")
        self._unit = torch.tensor(enc(filler))
        sentence_starts = [0] + [i + 2 for i in range(len(filler) - 2) if filler[i:i + 2] == ". "]
        self._unit_starts = torch.tensor(sorted({len(enc(filler[:i])) for i in sentence_starts}))
        self._pieces = (torch.tensor(enc("The pass key is ")), torch.tensor(enc(". Remember it. ")),
                        torch.tensor(enc(" is the pass key. ")))
        self._question = torch.tensor(enc("What is the pass key? The pass key is "))

    def _encode(self, text: str) -> list[int]:
        try:
            return list(self.tokenizer.encode(text, add_bos=False))
        except TypeError:
            return list(self.tokenizer.encode(text, add_special_tokens=False))

    def filler(self, n: int, generator: torch.Generator) -> Tensor:
        reps = -(-n // len(self._unit)) if n else 0
        return self._unit.repeat(reps)[:n]

    def boundaries(self, filler: Tensor) -> Tensor:
        u = len(self._unit)
        starts = (torch.arange(0, len(filler) + 1, u)[:, None] + self._unit_starts[None]).flatten()
        return starts[starts <= len(filler)]

    def needle(self, key: Tensor) -> Tensor:
        a, b, c = self._pieces
        return torch.cat([a, key, b, key, c])

    def question(self) -> Tensor:
        return self._question


class SyntheticPasskey(PasskeyTask):
    """Token-level passkey for small vocabularies: digits are ids 1-10, ``KEY`` = 11, ``QUERY`` = 12, filler
    words 13..vocab-1 grouped in ``n_sentences`` fixed random "sentences" of ``sentence_len`` words, drawn in
    random order. Needle ``KEY d1..dk KEY``, question ``QUERY``, answer ``d1..dk``."""

    KEY, QUERY, FILLER0 = 11, 12, 13

    def __init__(self, vocab_size: int = 64, n_digits: int = 2, n_sentences: int = 8, sentence_len: int = 6,
                 language_seed: int = 1234) -> None:
        if vocab_size <= self.FILLER0 + 1:
            raise ValueError(f"SyntheticPasskey needs vocab_size > {self.FILLER0 + 1}, got {vocab_size}")
        self.n_digits, self.sentence_len = n_digits, sentence_len
        self.digit_tokens = torch.arange(1, 11)
        g = torch.Generator().manual_seed(language_seed)  # the filler "language" is fixed
        self.sentences = torch.randint(self.FILLER0, vocab_size, (n_sentences, sentence_len), generator=g)

    def filler(self, n: int, generator: torch.Generator) -> Tensor:
        k = -(-n // self.sentence_len)
        order = torch.randint(0, len(self.sentences), (k,), generator=generator)
        return self.sentences[order].flatten()[:n]

    def boundaries(self, filler: Tensor) -> Tensor:
        return torch.arange(0, len(filler) + 1, self.sentence_len)

    def needle(self, key: Tensor) -> Tensor:
        return torch.cat([torch.tensor([self.KEY]), key, torch.tensor([self.KEY])])

    def question(self) -> Tensor:
        return torch.tensor([self.QUERY])


# ---------------------------------------------------------------------------------------------- training data
def passkey_batches(task: PasskeyTask, length: int | Callable[[], int], batch_size: int, *,
                    generator: torch.Generator | None = None, answer_weight: float = 10.0) -> Iterator[Batch]:
    """Endless training batches at uniformly random depths; the answer tokens' loss is weighted by
    ``answer_weight`` (the rest of the sequence is ordinary language-model loss). ``length`` may be a callable
    (a curriculum)."""
    g = generator or torch.Generator().manual_seed(0)
    while True:
        L = length() if callable(length) else length
        rows, weights = [], []
        for _ in range(batch_size):
            ids, ans = task.sample(L, float(torch.rand((), generator=g)), g)
            w = torch.ones(L)
            w[ans] = answer_weight
            rows.append(ids)
            weights.append(w)
        yield Batch(torch.stack(rows), loss_weight=torch.stack(weights))


# ---------------------------------------------------------------------------------------------- evaluation
@dataclass
class PasskeyResult:
    rows: list[dict]  # {"length", "depth", "accuracy", "n"}
    summary: dict


@torch.no_grad()
def evaluate_passkey(model, task: PasskeyTask | None = None, *, lengths: Sequence[int] = (256, 512, 1024),
                     depths: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9), samples: int = 4,
                     train_length: int | None = None, seed: int = 0, batch_size: int = 8,
                     progress: bool = True) -> PasskeyResult:
    """Accuracy (all key tokens argmax-correct) per (length, depth) over ``samples`` keys each; the same samples
    for every model (``seed``). ``summary``: accuracy per length, the in-distribution accuracy (lengths <=
    ``train_length``) and the extrapolated one (longer)."""
    task = task or TextPasskey()
    model.eval()
    rows = []
    bar = tqdm(total=len(lengths) * len(depths), desc="passkey", unit="cell", disable=not progress, leave=False)
    for L in lengths:
        for depth in depths:
            g = torch.Generator().manual_seed(seed * 1_000_003 + L * 101 + int(round(depth * 1000)))
            samples_ = [task.sample(L, depth, g) for _ in range(samples)]
            correct = 0
            for b0 in range(0, samples, batch_size):
                chunk = samples_[b0:b0 + batch_size]
                ids = torch.stack([s[0] for s in chunk]).to(model.device)
                ans = torch.stack([s[1] for s in chunk]).to(model.device)
                logits = model(ids).logits
                pred = logits.gather(1, (ans - 1)[..., None].expand(-1, -1, logits.shape[-1])).argmax(-1)
                correct += int((pred == ids.gather(1, ans)).all(1).sum())
            rows.append({"length": L, "depth": depth, "accuracy": correct / samples, "n": samples})
            bar.update(1)
            bar.set_postfix(L=L, depth=depth, acc=f"{correct / samples:.2f}", refresh=False)
    bar.close()
    return PasskeyResult(rows, summarize(rows, train_length))


def summarize(rows: list[dict], train_length: int | None, key: str = "accuracy") -> dict:
    by_length: dict[int, list[float]] = {}
    for r in rows:
        by_length.setdefault(r["length"], []).append(r[key])
    summary = {f"{key}@{L}": sum(v) / len(v) for L, v in by_length.items()}
    if train_length is not None:
        inside = [x for L, v in by_length.items() if L <= train_length for x in v]
        beyond = [x for L, v in by_length.items() if L > train_length for x in v]
        summary["in_distribution"] = sum(inside) / len(inside) if inside else None
        summary["extrapolated"] = sum(beyond) / len(beyond) if beyond else None
        summary["train_length"] = train_length
    return summary
