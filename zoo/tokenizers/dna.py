"""GENERator's 6-mer DNA tokenizer (``DNAKmerTokenizer``), id for id, without running remote code.

Vocabulary (``32 + 4**k`` = 4128 for k = 6)::

    0 <oov> (unk)   1 <s> (bos)   2 </s> (eos)   3 <pad>   4 <mask>   5-10 <bog> <eog> <bok> <eok> <+> <->
    11-31           annotation tokens; their order differs by revision (CURRENT_SPECIAL_TOKENS / EARLY_SPECIAL_TOKENS)
    32 + 4**k - 1   k-mers in itertools.product("ATCG", repeat=k) order:
                    id = 32 + sum_p digit(b_p) * 4**(k-1-p),  digit: A=0, T=1, C=2, G=3  (A, T, C, G - not ACGT)

Splitting, as the reference's ``_tokenize``: special-token literals first; then each run of ``[A-Z]`` is cut into
k-mers from the start of the run, the last 1..k-1 letters of a run forming one piece; any other character is a
piece of its own. A piece that is not in the vocabulary -> ``<oov>`` (0): a k-mer holding ``N`` or another
non-ACGT letter, a run's short remainder (a length not divisible by k gets one ``<oov>`` appended), a lone
character. Matching is case-sensitive: lowercase DNA is not DNA to the reference (one ``<oov>`` per letter).

``add_special_tokens=True`` prepends ``<s>`` and appends nothing (the current ``tokenizer_config``:
``add_bos_token=True``, ``add_eos_token=False``). The authors' scripts pass ``add_special_tokens=False`` and
write ``'<s>'`` into the text themselves; doing both gives a double BOS, as with the reference.

Encoding is vectorised: the text becomes a code array, a lookup table gives base digits, k-mer ids come from
array arithmetic (no Python loop per k-mer). By default input that is not DNA (anything but upper-case IUPAC
nucleotide letters and special-token literals) raises ``ValueError``; ``unknown="oov"`` maps it as the
reference does. ``save_pretrained`` writes the reference's ``vocab.txt``, ``special_tokens_map.json`` and
``tokenizer_config.json``; ``from_pretrained`` reads them (so the early revision's special-token order is kept).
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

CURRENT_SPECIAL_TOKENS: tuple[str, ...] = (
    "<oov>", "<s>", "</s>", "<pad>", "<mask>", "<bog>", "<eog>", "<bok>", "<eok>", "<+>", "<->",
    "<cds>", "<pseudo>", "<tRNA>", "<rRNA>", "<ncRNA>", "<miscRNA>", "<mam>", "<vrt>", "<inv>", "<pln>", "<fng>",
    "<prt>", "<arc>", "<bct>", "<mit>", "<plt>", "<plm>", "<vir>", "<sp0>", "<sp1>", "<sp2>",
)
EARLY_SPECIAL_TOKENS: tuple[str, ...] = CURRENT_SPECIAL_TOKENS[:11] + (
    "<mam>", "<vrt>", "<inv>", "<pln>", "<fng>", "<prt>", "<cds>", "<pseudo>", "<tRNA>", "<rRNA>", "<ncRNA>",
    "<misc_RNA>", *(f"<sp{i}>" for i in range(9)),
)
BASES = "ATCG"  # digit order of the k-mer ids
IUPAC_DNA = "ACGTNRYSWKMBDHV"  # letters accepted as DNA by default (non-ACGT ones become <oov> k-mers)
# transformers' special tokens of the reference config (skipped by decode(skip_special_tokens=True))
NAMED_SPECIALS = {"unk_token": "<oov>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                  "mask_token": "<mask>"}
MODEL_MAX_LENGTH = int(1e30)  # transformers' "no limit" sentinel, as in the reference config

# Character classes: 0..3 the digits of A, T, C, G; 4 another IUPAC letter (N, R, ...); 5 another upper-case letter
# (still a letter to the reference's [A-Z] runs, but not DNA); 6 anything else. DNA <=> every code <= 4.
_IUPAC_LETTER, _FOREIGN_LETTER, _NOT_LETTER = 4, 5, 6
_CLASS = np.full(128, _NOT_LETTER, dtype=np.uint8)
_CLASS[ord("A"):ord("Z") + 1] = _FOREIGN_LETTER
_CLASS[[ord(c) for c in IUPAC_DNA]] = _IUPAC_LETTER
for _d, _b in enumerate(BASES):
    _CLASS[ord(_b)] = _d
_CLASS_TABLE = bytes(_CLASS.tolist()) + bytes([_NOT_LETTER] * 128)  # for bytes.translate (C speed, no fancy index)


class DNAKmerTokenizer:
    """Id-for-id GENERator ``DNAKmerTokenizer``; transformers-like ``__call__`` / ``encode`` / ``decode``."""

    vocab_files = ("vocab.txt", "special_tokens_map.json", "tokenizer_config.json")

    def __init__(self, k: int = 6, *, special_tokens: Sequence[str] = CURRENT_SPECIAL_TOKENS,
                 add_bos_token: bool = True, add_eos_token: bool = False, padding_side: str = "right",
                 truncation_side: str = "right", model_max_length: int = MODEL_MAX_LENGTH,
                 unknown: str = "error") -> None:
        if not isinstance(k, int) or not 1 <= k <= 12:
            raise ValueError(f"k={k!r} must be an int in [1, 12]")
        special_tokens = tuple(special_tokens)
        missing = [t for t in NAMED_SPECIALS.values() if t not in special_tokens]
        if missing or len(set(special_tokens)) != len(special_tokens):
            raise ValueError(f"special_tokens must be distinct and hold {list(NAMED_SPECIALS.values())}; "
                             f"missing {missing}")
        if any(re.fullmatch(r"[A-Z]+", t) for t in special_tokens):
            raise ValueError("special tokens must not be plain upper-case letters (they would shadow k-mers)")
        for name, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
            if side not in ("left", "right"):
                raise ValueError(f"{name}={side!r} must be 'left' or 'right'")
        if unknown not in ("error", "oov"):
            raise ValueError(f"unknown={unknown!r} must be 'error' (reject non-DNA input) or 'oov' (map it as the "
                             "reference does)")
        self.k = k
        self.special_tokens = list(special_tokens)  # as the reference's attribute: every id below the k-mers
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        self.padding_side, self.truncation_side = padding_side, truncation_side
        self.model_max_length = model_max_length
        self.unknown = unknown
        self.n_special = len(special_tokens)
        self.kmers = ["".join(p) for p in itertools.product(BASES, repeat=k)]
        self._pieces = self.special_tokens + self.kmers
        self._vocab = {t: i for i, t in enumerate(self._pieces)}
        ids = {name: self._vocab[tok] for name, tok in NAMED_SPECIALS.items()}
        self.unk_token_id, self.bos_token_id, self.eos_token_id = ids["unk_token"], ids["bos_token"], ids["eos_token"]
        self.pad_token_id, self.mask_token_id = ids["pad_token"], ids["mask_token"]
        self.all_special_ids = sorted(ids.values())
        # the reference tries the literals in vocabulary order at each position
        self._special_re = re.compile("|".join(re.escape(t) for t in self.special_tokens))
        # [4**k, k] bytes of each k-mer, for decoding k-mer ids without a Python loop
        digits = (np.arange(4 ** k)[:, None] >> (2 * np.arange(k - 1, -1, -1))[None]) & 3
        self._kmer_bytes = np.frombuffer(BASES.encode(), dtype=np.uint8)[digits]
        self._piece_array = np.array(self._pieces, dtype=object)
        self._skip = np.zeros(len(self._pieces), dtype=bool)
        self._skip[self.all_special_ids] = True

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    def __len__(self) -> int:
        return len(self._pieces)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    @property
    def special_token_ids(self) -> list[int]:
        """Every id that is not a k-mer (the ids GENERator's evaluation blocks during generation)."""
        return list(range(self.n_special))

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self._vocab.get(tokens, self.unk_token_id)
        return [self._vocab.get(t, self.unk_token_id) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | list[str]:
        if isinstance(ids, (int, np.integer)):
            return self._pieces[self._check_ids(np.array([ids]))[0]]
        return [self._pieces[i] for i in self._check_ids(np.asarray(ids, dtype=np.int64)).tolist()]

    def first_base_ids(self) -> dict[str, np.ndarray]:
        """Token ids grouped by the first character of their piece, for A, C, G, T (special tokens start with '<'
        and so fall in no group), as GENERator's variant-effect script groups the vocabulary."""
        return {b: np.array([i for i, p in enumerate(self._pieces) if p[0] == b], dtype=np.int64) for b in "ACGT"}

    # ------------------------------------------------------------------ encoding
    def _codes(self, text: str) -> np.ndarray:
        """``text`` -> class codes ``[n]`` uint8, one per character (see ``_CLASS``)."""
        if text.isascii():
            return np.frombuffer(text.encode("ascii").translate(_CLASS_TABLE), dtype=np.uint8)
        cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        return np.where(cp < 128, _CLASS[np.minimum(cp, 127)], _NOT_LETTER).astype(np.uint8)

    def _reject(self, text: str, codes: np.ndarray, start: int) -> None:
        """``ValueError`` naming the first character of ``codes`` (a stretch of ``text`` from ``start``) that is
        not accepted as DNA."""
        pos = start + int(np.flatnonzero(codes > _IUPAC_LETTER)[0])
        ch = text[pos]
        hint = ("lower-case bases: pass text.upper() (the reference matches [A-Z] only and would give one <oov> "
                "per lower-case letter)" if ch.lower() in "acgtn" and ch.islower() else
                "white space: strip line breaks and spaces (e.g. from FASTA lines) first" if ch.isspace() else
                "accepted: upper-case IUPAC letters " + IUPAC_DNA + " and the special tokens "
                "(unknown='oov' maps any text as the reference does)")
        raise ValueError(f"not a DNA sequence: {ch!r} at position {pos}; {hint}")

    def _kmer_ids(self, rows: np.ndarray) -> np.ndarray:
        """``rows [m, k]`` of digits -> ``[m]`` ids (base-4 number in A,T,C,G order, after the specials)."""
        acc = rows[:, 0].astype(np.int32)  # 2 bits per base: k <= 12 fits in int32
        for j in range(1, self.k):
            acc <<= 2
            acc |= rows[:, j]
        out = np.empty(acc.shape, dtype=np.int64)
        return np.add(acc, self.n_special, out=out)

    def _encode_run_codes(self, d: np.ndarray) -> np.ndarray:
        """Ids of a stretch of text without special-token literals, from its class codes ``d [n]``."""
        n, k = d.size, self.k
        if n == 0:
            return np.zeros(0, dtype=np.int64)
        top = int(d.max())
        if top < _NOT_LETTER:  # letters only: one run, whole k-mers from its start + maybe one remainder piece
            m = n // k
            ids = self._kmer_ids(d[: m * k].reshape(m, k))
            if top >= _IUPAC_LETTER:  # a k-mer holding N (or another non-ACGT letter) is not in the vocabulary
                ids[np.flatnonzero(d[: m * k] >= _IUPAC_LETTER) // k] = self.unk_token_id
            return np.append(ids, self.unk_token_id) if n % k else ids
        # several runs (only with unknown="oov": other characters are pieces of their own)
        idx = np.arange(n)
        letter = d < _NOT_LETTER
        run_first = letter.copy()
        run_first[1:] &= ~letter[:-1]
        run_last = letter.copy()
        run_last[:-1] &= ~letter[1:]
        run_start = np.maximum.accumulate(np.where(run_first, idx, 0))
        run_end = np.minimum.accumulate(np.where(run_last, idx, n)[::-1])[::-1] + 1  # exclusive end of i's run
        starts = np.flatnonzero(~letter | ((idx - run_start) % k == 0))  # one piece starts at each of these
        not_acgt = np.concatenate(([0], np.cumsum(d >= _IUPAC_LETTER)))
        whole = letter[starts] & (run_end[starts] - starts >= k)
        ends = np.minimum(starts + k, n)
        ok = whole & (not_acgt[ends] == not_acgt[starts])
        ids = np.full(starts.size, self.unk_token_id, dtype=np.int64)
        if ok.any():
            s = starts[ok]
            ids[ok] = self._kmer_ids(d[s[:, None] + np.arange(k)[None]])
        return ids

    def encode_array(self, text: str, *, add_special_tokens: bool = True) -> np.ndarray:
        """``text`` -> ``[n] int64`` token ids (the fast path under ``encode`` and ``__call__``)."""
        if not isinstance(text, str):
            raise TypeError(f"expected a str, got {type(text).__name__}")
        codes = self._codes(text)
        check = self.unknown == "error"
        if "<" in text:
            parts: list[np.ndarray] = []
            pos = 0
            for m in self._special_re.finditer(text):
                parts.append(self._encode_stretch(text, codes, pos, m.start(), check))
                parts.append(np.array([self._vocab[m.group()]], dtype=np.int64))
                pos = m.end()
            parts.append(self._encode_stretch(text, codes, pos, len(text), check))
            ids = np.concatenate(parts)
        else:
            ids = self._encode_stretch(text, codes, 0, len(text), check)
        return self._add_specials(ids) if add_special_tokens else ids

    def _encode_stretch(self, text: str, codes: np.ndarray, start: int, end: int, check: bool) -> np.ndarray:
        d = codes[start:end]
        if check and d.size and int(d.max()) > _IUPAC_LETTER:
            self._reject(text, d, start)
        return self._encode_run_codes(d)

    def _add_specials(self, ids: np.ndarray) -> np.ndarray:
        head = [self.bos_token_id] if self.add_bos_token else []
        tail = [self.eos_token_id] if self.add_eos_token else []
        if not head and not tail:
            return ids
        return np.concatenate((np.array(head, dtype=np.int64), ids, np.array(tail, dtype=np.int64)))

    def num_special_tokens_to_add(self) -> int:
        return int(self.add_bos_token) + int(self.add_eos_token)

    def tokenize(self, text: str) -> list[str]:
        """The pieces of ``text`` (vocabulary pieces; out-of-vocabulary pieces as ``<oov>``)."""
        return self.convert_ids_to_tokens(self.encode_array(text, add_special_tokens=False))

    def _encode_one(self, text: str, add_special_tokens: bool, truncation: bool, max_length: int | None,
                    truncation_side: str) -> np.ndarray:
        ids = self.encode_array(text, add_special_tokens=False)
        if truncation:
            limit = (max_length if max_length is not None else self.model_max_length)
            limit -= self.num_special_tokens_to_add() if add_special_tokens else 0
            if limit < 0:
                raise ValueError(f"max_length={max_length} leaves no room for the special tokens")
            if ids.size > limit:
                ids = ids[ids.size - limit:] if truncation_side == "left" else ids[:limit]
        return self._add_specials(ids) if add_special_tokens else ids

    def encode(self, text: str, *, add_special_tokens: bool = True, truncation: bool = False,
               max_length: int | None = None) -> list[int]:
        return self._encode_one(text, add_special_tokens, truncation, max_length, self.truncation_side).tolist()

    def __call__(self, text: str | Sequence[str], *, add_special_tokens: bool = True,
                 padding: bool | str = False, truncation: bool = False, max_length: int | None = None,
                 padding_side: str | None = None, truncation_side: str | None = None,
                 return_tensors: str | None = None, return_attention_mask: bool = True) -> dict[str, Any]:
        """transformers-style batch encoding: ``{"input_ids", "attention_mask"}``.

        ``padding``: False, True / "longest", or "max_length"; ``padding_side`` / ``truncation_side`` default
        to the tokenizer's ("right", as the reference config; GENERator's scripts set left padding).
        ``return_tensors``: None (lists), "np" or "pt".
        """
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a str or a sequence of str")
        pside = padding_side or self.padding_side
        tside = truncation_side or self.truncation_side
        for name, side in (("padding_side", pside), ("truncation_side", tside)):
            if side not in ("left", "right"):
                raise ValueError(f"{name}={side!r} must be 'left' or 'right'")
        if padding not in (False, True, "longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding={padding!r} must be False, True, 'longest' or 'max_length'")
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs max_length")
        rows = [self._encode_one(t, add_special_tokens, truncation, max_length, tside) for t in texts]
        lengths = [r.size for r in rows]
        if padding in (True, "longest", "max_length"):
            width = max(lengths, default=0) if padding != "max_length" else max(max_length, max(lengths, default=0))
            ids = np.full((len(rows), width), self.pad_token_id, dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=np.int64)
            for i, r in enumerate(rows):
                sl = slice(width - r.size, width) if pside == "left" else slice(0, r.size)
                ids[i, sl] = r
                mask[i, sl] = 1
            out = {"input_ids": ids, "attention_mask": mask}
        else:
            if return_tensors is not None and len(set(lengths)) > 1:
                raise ValueError("sequences of different lengths need padding=True to be returned as tensors")
            if return_tensors is not None:
                ids = np.stack(rows) if rows else np.zeros((0, 0), dtype=np.int64)
                out = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            else:
                out = {"input_ids": rows, "attention_mask": [np.ones_like(r) for r in rows]}
        if return_tensors == "pt":
            out = {key: torch.from_numpy(v) for key, v in out.items()}
        elif return_tensors is None:
            out = {key: (v.tolist() if isinstance(v, np.ndarray) else [r.tolist() for r in v])
                   for key, v in out.items()}
            if single:
                out = {key: v[0] for key, v in out.items()}
        elif return_tensors != "np":
            raise ValueError(f"return_tensors={return_tensors!r} must be None, 'np' or 'pt'")
        if not return_attention_mask:
            out.pop("attention_mask")
        return out

    # ------------------------------------------------------------------ decoding
    def _check_ids(self, ids: np.ndarray) -> np.ndarray:
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= len(self._pieces)):
            bad = ids[(ids < 0) | (ids >= len(self._pieces))]
            raise ValueError(f"token ids out of range [0, {len(self._pieces)}): {bad[:8].tolist()}")
        return ids

    def decode(self, ids: Sequence[int] | np.ndarray | torch.Tensor, *, skip_special_tokens: bool = False) -> str:
        """Concatenated pieces. ``skip_special_tokens`` drops transformers' special tokens (``<oov> <s> </s> <pad>
        <mask>``, ids 0-4) as the reference does; the annotation tokens (ids 5-31) stay as text."""
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        ids = self._check_ids(np.asarray(ids, dtype=np.int64).reshape(-1))
        if skip_special_tokens:
            ids = ids[~self._skip[ids]]
        if ids.size and int(ids.min()) >= self.n_special:  # k-mers only: bytes straight from the table
            return self._kmer_bytes[ids - self.n_special].tobytes().decode("ascii")
        return "".join(self._piece_array[ids].tolist())

    def batch_decode(self, sequences: Sequence[Sequence[int]] | np.ndarray | torch.Tensor, *,
                     skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    # ------------------------------------------------------------------ files
    def tokenizer_config(self) -> dict[str, Any]:
        """The reference's ``tokenizer_config.json`` content (plus the sides and length when changed)."""
        cfg: dict[str, Any] = {
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "added_tokens_decoder": {
                str(self._vocab[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                      "single_word": False, "special": True}
                for t in sorted(NAMED_SPECIALS.values(), key=self._vocab.__getitem__)
            },
            "auto_map": {"AutoTokenizer": ["tokenizer.DNAKmerTokenizer", None]},
            "clean_up_tokenization_spaces": False,
            "extra_special_tokens": {},
            "k": self.k,
            "model_max_length": self.model_max_length,
            "tokenizer_class": "DNAKmerTokenizer",
            **NAMED_SPECIALS,
        }
        if self.padding_side != "right":
            cfg["padding_side"] = self.padding_side
        if self.truncation_side != "right":
            cfg["truncation_side"] = self.truncation_side
        return dict(sorted(cfg.items()))

    def save_pretrained(self, directory: str | os.PathLike) -> list[Path]:
        """Write ``vocab.txt`` (``piece id`` lines), ``special_tokens_map.json`` and ``tokenizer_config.json`` in
        the reference's format. The reference's ``tokenizer.py`` (remote code) is not written: transformers users
        load these files with GENERator's own ``tokenizer.py`` next to them (``trust_remote_code=True``)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        files = [d / name for name in self.vocab_files]
        files[0].write_text("".join(f"{p} {i}\n" for i, p in enumerate(self._pieces)), encoding="utf-8")
        files[1].write_text(json.dumps(dict(sorted(NAMED_SPECIALS.items())), indent=2) + "\n", encoding="utf-8")
        files[2].write_text(json.dumps(self.tokenizer_config(), indent=2) + "\n", encoding="utf-8")
        return files

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, revision: str | None = None,
                        **overrides: Any) -> DNAKmerTokenizer:
        """Read a directory (or hub repo id) holding GENERator's tokenizer files. ``vocab.txt``, when present,
        fixes the special tokens (early and current revisions differ at ids 11-31); its k-mers must be in the
        reference's order. Keyword ``overrides`` win over the files (e.g. ``padding_side="left"``)."""
        p = Path(path).expanduser()
        if not p.is_dir():
            from zoo.hub import resolve

            p = resolve(path, revision=revision)
        kwargs: dict[str, Any] = {}
        cfg_file = p / "tokenizer_config.json"
        if cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
            cls_name = cfg.get("tokenizer_class")
            if cls_name not in (None, "DNAKmerTokenizer"):
                raise ValueError(f"{cfg_file} is for tokenizer_class {cls_name!r}, not DNAKmerTokenizer")
            for key in ("k", "add_bos_token", "add_eos_token", "padding_side", "truncation_side", "model_max_length"):
                if key in cfg:
                    kwargs[key] = int(cfg[key]) if key == "model_max_length" else cfg[key]
        vocab_file = p / "vocab.txt"
        if vocab_file.is_file():
            kwargs["special_tokens"] = _read_vocab(vocab_file, kwargs.get("k", 6))
        elif not cfg_file.is_file():
            raise FileNotFoundError(f"{p} holds no DNAKmerTokenizer files ({', '.join(cls.vocab_files)})")
        kwargs.update(overrides)
        return cls(**kwargs)


def _read_vocab(file: Path, k: int) -> list[str]:
    """Special tokens from a ``vocab.txt`` of ``piece id`` (or bare ``piece``) lines; checks the k-mer layout."""
    pieces = []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        piece, _, idx = line.rpartition(" ")
        if not piece:  # a bare "piece" line
            piece, idx = idx, str(len(pieces))
        if not idx.isdigit() or int(idx) != len(pieces):
            raise ValueError(f"{file}:{n + 1}: expected 'piece {len(pieces)}', got {line!r}")
        pieces.append(piece)
    kmers = ["".join(p) for p in itertools.product(BASES, repeat=k)]
    n_special = len(pieces) - len(kmers)
    if n_special < 1 or pieces[n_special:] != kmers:
        raise ValueError(f"{file}: the last {len(kmers)} entries must be the {k}-mers in "
                         f"itertools.product('ATCG', repeat={k}) order (GENERator's layout)")
    return pieces[:n_special]
