"""Genomic tasks on GENERator-family models (6-mer DNA tokens), as GENERator's own evaluation scripts define them.

* :func:`generate` - sampling per 6-mer token with every special token blocked (ids 0-31: the model only ever
  emits k-mers), prompts left-truncated to whole 6-mers and prefixed with ``<s>``; returns the new bases.
* :func:`recover` - sequence recovery (``sequence_recovery.py``): context = ``'<s>' + seq[-(min(len, 6144) // 6
  * 6):]`` (left-truncated to whole 6-mers), left padding, greedy decoding of 5 tokens (30 bp) with the special
  tokens suppressed; accuracy = #{i < 30 : pred[i] == label[i]} / 30 per sequence.
* :func:`score_variants` - zero-shot variant effect (``variant_effect_prediction.py``): the upstream context
  (8192 bp, leading N stripped, left-trimmed to whole 6-mers, ``'<s>'`` prepended), softmax of the last
  position's logits, p(b) = the probability mass of the tokens whose piece starts with base b (the next 6-mer
  marginalised to its first base = the variant position); score = ``log(p_ref / (p_alt + 1e-10))``.
* :func:`embed` - sequence embeddings for downstream classifiers (``sequence_understanding.py``): ``'<s>' + seq +
  '<s>'``, truncated to 16384 tokens, the final-norm hidden state of the last token (what
  ``LlamaForSequenceClassification`` pools).

Everything goes through the public API (``zoo.from_pretrained``, ``model.generate`` with an attention mask and
left padding, ``model(...)``); ``add_dna_commands`` wires ``zoo dna generate | recover | score | embed``.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from zoo.models.lm import ZooForCausalLM
from zoo.tokenizers.dna import DNAKmerTokenizer

RECOVERY_CONTEXT_BP = 6144
RECOVERY_TOKENS = 5
VARIANT_CONTEXT_BP = 8192
EMBED_MAX_TOKENS = 16384
SCORE_EPS = 1e-10  # as the reference: log(p_ref / (p_alt + 1e-10))


# ------------------------------------------------------------------------------------------ loading
def load_tokenizer(name: str | Path, *, revision: str | None = None) -> DNAKmerTokenizer:
    """The tokenizer saved with a checkpoint (directory, hub id or preset name); the current reference
    tokenizer when the checkpoint ships none."""
    from zoo.hub import resolve
    from zoo.registry import get_preset_entry, is_preset

    target = str(name)
    if is_preset(target) and not Path(target).exists():
        preset = get_preset_entry(target)[1]
        target, revision = preset.hub_id or target, revision or preset.revision
    path = Path(target) if Path(target).is_dir() else resolve(target, revision=revision)
    if (path / "vocab.txt").is_file() or (path / "tokenizer_config.json").is_file():
        return DNAKmerTokenizer.from_pretrained(path)
    return DNAKmerTokenizer()


def load(name: str | Path, *, revision: str | None = None, dtype: torch.dtype | None = None,
         device: torch.device | str | None = None) -> tuple[ZooForCausalLM, DNAKmerTokenizer]:
    """``(model, tokenizer)`` of a GENERator-family checkpoint (zoo or reference format, hub id, preset name)."""
    import zoo

    model = zoo.from_pretrained(name, revision=revision, dtype=dtype, device=device)
    tok = load_tokenizer(name, revision=revision)
    check_pair(model, tok)
    return model, tok


def check_pair(model: ZooForCausalLM, tok: DNAKmerTokenizer) -> None:
    if model.config.vocab_size != tok.vocab_size:
        raise ValueError(f"the model's vocabulary ({model.config.vocab_size}) is not the DNA tokenizer's "
                         f"({tok.vocab_size} = {tok.n_special} special tokens + 4^{tok.k} k-mers)")


# ------------------------------------------------------------------------------------------ helpers
def whole_kmers(seq: str, k: int = 6, *, max_bp: int | None = None, align: str = "truncate") -> str:
    """``seq`` cut to at most ``max_bp`` bases from the left and to a multiple of ``k``: ``align="truncate"``
    drops the first ``len % k`` bases, ``"pad"`` left-pads with 'A' (the two fixes GENERator's README gives)."""
    if max_bp is not None:
        seq = seq[max(0, len(seq) - max_bp):]
    if align not in ("truncate", "pad"):
        raise ValueError(f"align={align!r} must be 'truncate' or 'pad'")
    r = len(seq) % k
    pad = (k - r) % k
    if align == "pad" and (max_bp is None or len(seq) + pad <= max_bp):
        return "A" * pad + seq
    return seq[r:]


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    for i in range(0, n, batch_size):
        yield slice(i, min(n, i + batch_size))


def _encode_left(tok: DNAKmerTokenizer, texts: Sequence[str], device: torch.device, *,
                 max_tokens: int | None = None) -> tuple[Tensor, Tensor]:
    enc = tok(list(texts), add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt",
              truncation=max_tokens is not None, max_length=max_tokens, truncation_side="right")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def _as_list(x: str | Sequence[str], what: str) -> list[str]:
    out = [x] if isinstance(x, str) else list(x)
    if not all(isinstance(s, str) for s in out):
        raise TypeError(f"{what} must be a str or a sequence of str")
    return out


# ------------------------------------------------------------------------------------------ tasks
@torch.no_grad()
def generate(model: ZooForCausalLM, tok: DNAKmerTokenizer, prompts: str | Sequence[str], *,
             max_new_tokens: int = 16, do_sample: bool = True, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None, batch_size: int = 8,
             prompt_bp: int | None = None, align: str = "truncate") -> list[str]:
    """New bases (``6 * max_new_tokens`` per prompt) sampled one 6-mer token at a time; special tokens blocked."""
    check_pair(model, tok)
    prompts = _as_list(prompts, "prompts")
    texts = ["<s>" + whole_kmers(p, tok.k, max_bp=prompt_bp, align=align) for p in prompts]
    gen = torch.Generator(device=model.device).manual_seed(seed) if seed is not None else None
    out: list[str] = []
    for sl in _batches(len(texts), batch_size):
        ids, mask = _encode_left(tok, texts[sl], model.device)
        seqs = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                              temperature=temperature, top_k=top_k, top_p=top_p, generator=gen,
                              eos_token_id=[], pad_token_id=tok.pad_token_id, suppress_tokens=tok.special_token_ids)
        out.extend(tok.batch_decode(seqs[:, ids.shape[1]:]))
    return out


@dataclass
class Recovery:
    predictions: list[str]
    labels: list[str]
    accuracy: list[float]  # per sequence, matches over the first gen_tokens * k bases / (gen_tokens * k)

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracy)) if self.accuracy else float("nan")


@torch.no_grad()
def recover(model: ZooForCausalLM, tok: DNAKmerTokenizer, sequences: str | Sequence[str],
            labels: str | Sequence[str] | None = None, *, context_bp: int = RECOVERY_CONTEXT_BP,
            gen_tokens: int = RECOVERY_TOKENS, batch_size: int = 8) -> Recovery:
    """GENERator's sequence recovery. With ``labels=None`` the last ``gen_tokens * 6`` bases of each sequence are
    held out as its label and the rest is the context."""
    check_pair(model, tok)
    sequences = _as_list(sequences, "sequences")
    n_bp = gen_tokens * tok.k
    if labels is None:
        short = [i for i, s in enumerate(sequences) if len(s) < n_bp]
        if short:
            raise ValueError(f"sequences {short[:8]} are shorter than the {n_bp} bases held out as labels")
        contexts, labels = [s[: len(s) - n_bp] for s in sequences], [s[len(s) - n_bp:] for s in sequences]
    else:
        contexts, labels = sequences, _as_list(labels, "labels")
        if len(labels) != len(contexts):
            raise ValueError(f"{len(contexts)} sequences but {len(labels)} labels")
    preds: list[str] = []
    for sl in _batches(len(contexts), batch_size):
        texts = ["<s>" + whole_kmers(c, tok.k, max_bp=context_bp) for c in contexts[sl]]
        ids, mask = _encode_left(tok, texts, model.device)
        seqs = model.generate(ids, attention_mask=mask, max_new_tokens=gen_tokens, do_sample=False,
                              eos_token_id=[], pad_token_id=tok.pad_token_id, suppress_tokens=tok.special_token_ids)
        preds.extend(tok.batch_decode(seqs[:, ids.shape[1]:], skip_special_tokens=True))
    acc = [sum(p[i] == lab[i] for i in range(min(len(p), len(lab), n_bp))) / n_bp for p, lab in zip(preds, labels)]
    return Recovery(preds, list(labels), acc)


def variant_context(sequence: str, position: int, context_bp: int = VARIANT_CONTEXT_BP) -> tuple[str, str]:
    """``(upstream context, reference base)`` of a variant at 0-based ``position`` of ``sequence``."""
    if not 0 <= position < len(sequence):
        raise ValueError(f"position {position} is outside the sequence (length {len(sequence)})")
    return sequence[max(0, position - context_bp):position], sequence[position]


@dataclass
class VariantScores:
    score: np.ndarray  # log(p_ref / (p_alt + 1e-10)); higher = the reference base is more likely (benign-like)
    p_ref: np.ndarray
    p_alt: np.ndarray


@torch.no_grad()
def base_probabilities(model: ZooForCausalLM, tok: DNAKmerTokenizer, contexts: str | Sequence[str], *,
                       context_bp: int = VARIANT_CONTEXT_BP, batch_size: int = 8) -> dict[str, np.ndarray]:
    """Per context, the next-token distribution marginalised to the first base: ``{"A": [N], "C": ..., ...}``."""
    check_pair(model, tok)
    contexts = _as_list(contexts, "contexts")
    groups = {b: torch.as_tensor(ids, device=model.device) for b, ids in tok.first_base_ids().items()}
    out: dict[str, list[np.ndarray]] = {b: [] for b in groups}
    for sl in _batches(len(contexts), batch_size):
        texts = ["<s>" + whole_kmers(c[max(0, len(c) - context_bp):].lstrip("N"), tok.k) for c in contexts[sl]]
        ids, mask = _encode_left(tok, texts, model.device)
        probs = model(ids, attention_mask=mask, logits_to_keep=1).logits[:, -1].float().softmax(-1)
        for b, g in groups.items():
            out[b].append(probs[:, g].sum(-1).double().cpu().numpy())
    return {b: np.concatenate(v) if v else np.zeros(0) for b, v in out.items()}


def score_variants(model: ZooForCausalLM, tok: DNAKmerTokenizer, contexts: str | Sequence[str],
                   refs: str | Sequence[str], alts: str | Sequence[str], *, context_bp: int = VARIANT_CONTEXT_BP,
                   batch_size: int = 8) -> VariantScores:
    """Zero-shot variant-effect scores from the upstream ``contexts`` (bases before the variant)."""
    contexts, refs, alts = _as_list(contexts, "contexts"), _as_list(refs, "refs"), _as_list(alts, "alts")
    if not len(contexts) == len(refs) == len(alts):
        raise ValueError(f"{len(contexts)} contexts, {len(refs)} refs and {len(alts)} alts must match")
    bases = ("A", "C", "G", "T")
    bad = [(i, r, a) for i, (r, a) in enumerate(zip(refs, alts)) if r not in bases or a not in bases]
    if bad:
        raise ValueError(f"ref and alt must each be one of A, C, G, T; got (index, ref, alt) {bad[:5]}")
    p = base_probabilities(model, tok, contexts, context_bp=context_bp, batch_size=batch_size)
    table = np.stack([p[b] for b in bases], 1)  # [N, 4]
    idx = np.arange(len(refs))
    p_ref = table[idx, [bases.index(r) for r in refs]]
    p_alt = table[idx, [bases.index(a) for a in alts]]
    return VariantScores(np.log(p_ref / (p_alt + SCORE_EPS)), p_ref, p_alt)


@torch.no_grad()
def embed(model: ZooForCausalLM, tok: DNAKmerTokenizer, sequences: str | Sequence[str], *,
          max_tokens: int = EMBED_MAX_TOKENS, batch_size: int = 8, separators: bool = True) -> Tensor:
    """``[N, d_model]`` (fp32): the final-norm hidden state of the last token of ``'<s>' + seq + '<s>'``
    (``separators=False``: ``'<s>' + seq``), truncated on the right to ``max_tokens``."""
    check_pair(model, tok)
    sequences = _as_list(sequences, "sequences")
    texts = ["<s>" + s + ("<s>" if separators else "") for s in sequences]
    captured: list[Tensor] = []
    hook = model.norm_f.register_forward_hook(lambda mod, args, out: captured.append(out[:, -1].float()))
    try:
        for sl in _batches(len(texts), batch_size):
            ids, mask = _encode_left(tok, texts[sl], model.device, max_tokens=max_tokens)
            model(ids, attention_mask=mask, logits_to_keep=1)
    finally:
        hook.remove()
    return torch.cat(captured) if captured else torch.zeros(0, model.config.d_model)


# ------------------------------------------------------------------------------------------ command line
def read_records(path: str | Path) -> list[list[str]]:
    """Records of a FASTA file (one sequence each), or of a text file: one record per line, tab-separated fields.
    Sequences are upper-cased (soft-masked genomes are lower-case in repeats; the authors' data is upper-case)."""
    text = Path(path).read_text()
    if text.lstrip().startswith(">"):
        records, cur = [], None
        for line in text.splitlines():
            if line.startswith(">"):
                cur = []
                records.append(cur)
            elif cur is not None:
                cur.append(line.strip())
        return [["".join(r).upper()] for r in records]
    return [[f.strip().upper() for f in line.split("\t")] for line in text.splitlines() if line.strip()]


def _inputs(args: argparse.Namespace, n_fields: int, what: str) -> list[list[str]]:
    rows = [[s.upper()] for s in args.sequence or []]
    if args.input:
        rows += read_records(args.input)
    if not rows:
        raise ValueError(f"give {what} with --sequence or --input FILE")
    bad = [i for i, r in enumerate(rows) if len(r) < n_fields]
    if bad:
        raise ValueError(f"records {bad[:8]} have fewer than {n_fields} tab-separated fields ({what})")
    return rows


def _cmd_generate(args: argparse.Namespace) -> int:
    model, tok = load(args.model)
    prompts = [r[0] for r in _inputs(args, 1, "prompts")] if (args.sequence or args.input) else [""]
    outs = generate(model, tok, prompts, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                    temperature=max(args.temperature, 1e-6), top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                    batch_size=args.batch_size)
    for i, s in enumerate(outs):
        print(f">generated_{i}\n{s}")
    return 0


def _cmd_recover(args: argparse.Namespace) -> int:
    model, tok = load(args.model)
    rows = _inputs(args, 1, "sequences")
    labels = [r[1] for r in rows] if all(len(r) > 1 for r in rows) else None
    res = recover(model, tok, [r[0] for r in rows], labels, context_bp=args.context_bp, gen_tokens=args.gen_tokens,
                  batch_size=args.batch_size)
    print("accuracy\tprediction\tlabel")
    for a, p, lab in zip(res.accuracy, res.predictions, res.labels):
        print(f"{a:.4f}\t{p}\t{lab}")
    print(f"mean accuracy {res.mean:.4f} over {len(res.accuracy)} sequences")
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    model, tok = load(args.model)
    if args.position is not None:
        if not args.sequence or len(args.sequence) != 1 or args.alt is None:
            raise ValueError("--position needs exactly one --sequence and --alt")
        ctx, ref = variant_context(args.sequence[0].upper(), args.position, args.context_bp)
        rows = [[ctx, ref, args.alt.upper()]]
    else:
        rows = _inputs(args, 3, "context<TAB>ref<TAB>alt records")
    res = score_variants(model, tok, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                         context_bp=args.context_bp, batch_size=args.batch_size)
    print("score\tp_ref\tp_alt\tref\talt")
    for s, pr, pa, r in zip(res.score, res.p_ref, res.p_alt, rows):
        print(f"{s:.6f}\t{pr:.6g}\t{pa:.6g}\t{r[1]}\t{r[2]}")
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    model, tok = load(args.model)
    rows = _inputs(args, 1, "sequences")
    emb = embed(model, tok, [r[0] for r in rows], max_tokens=args.max_tokens, batch_size=args.batch_size)
    np.save(args.output, emb.numpy())
    print(f"wrote {args.output}: {tuple(emb.shape)} float32 (last-token embeddings)")
    return 0


def add_dna_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``dna {generate, recover, score, embed}`` to an argparse sub-parser set (the ``zoo`` command's)."""
    dna = subparsers.add_parser("dna", help="GENERator genomic tasks: generate, recover, score, embed")
    sub = dna.add_subparsers(dest="dna_command", required=True)

    def common(p: argparse.ArgumentParser, seq_help: str) -> None:
        p.add_argument("model", help="GENERator checkpoint: preset name, directory or hub id")
        p.add_argument("--sequence", action="append", help=seq_help + " (repeatable)")
        p.add_argument("--input", help="FASTA file, or a text file with one tab-separated record per line")
        p.add_argument("--batch-size", type=int, default=8)

    p = sub.add_parser("generate", help="sample DNA one 6-mer at a time (special tokens blocked)")
    common(p, "prompt bases (none: unconditional, from <s>)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="6-mer tokens to generate per prompt")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(fn=_cmd_generate)
    p = sub.add_parser("recover", help="sequence recovery (greedy 6-mers after a whole-6-mer context)")
    common(p, "sequence whose last gen_tokens*6 bases are held out; a record 'context<TAB>label' gives the label")
    p.add_argument("--context-bp", type=int, default=RECOVERY_CONTEXT_BP)
    p.add_argument("--gen-tokens", type=int, default=RECOVERY_TOKENS)
    p.set_defaults(fn=_cmd_recover)
    p = sub.add_parser("score", help="zero-shot variant effect: log p(ref) / p(alt) of the next base")
    common(p, "with --position: the sequence holding the variant")
    p.add_argument("--position", type=int, default=None, help="0-based variant position in --sequence")
    p.add_argument("--alt", default=None, help="alternative base (with --position)")
    p.add_argument("--context-bp", type=int, default=VARIANT_CONTEXT_BP)
    p.set_defaults(fn=_cmd_score)
    p = sub.add_parser("embed", help="last-token sequence embeddings, saved as .npy")
    common(p, "sequence")
    p.add_argument("--output", required=True, help="output .npy file")
    p.add_argument("--max-tokens", type=int, default=EMBED_MAX_TOKENS)
    p.set_defaults(fn=_cmd_embed)
    return dna


__all__ = ["load", "load_tokenizer", "generate", "recover", "Recovery", "score_variants", "VariantScores",
           "base_probabilities", "variant_context", "embed", "whole_kmers", "add_dna_commands"]
