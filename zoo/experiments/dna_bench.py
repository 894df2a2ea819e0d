"""DNA benchmarks: the vectorised 6-mer tokenizer against a straightforward per-k-mer Python implementation (same
run, same sequences, ids checked equal), and GENERator-style generation throughput with a small random model.

* tokenizer: bp/s of ``DNAKmerTokenizer.encode`` (list of ids, as transformers' ``encode`` returns) and of
  ``encode_array`` (numpy) vs :func:`naive_encode` (the reference's per-piece loop: special-literal match, else
  ``[A-Z]{6}|[A-Z]+``, else one character; a dict lookup per piece) and vs :func:`slice_encode` (a slice and a dict
  lookup per k-mer, bases-only input); clean DNA and DNA with N runs; decode.
* generation: new 6-mer tokens/s (and bp/s) of ``zoo.genomics.generate`` (special tokens blocked, left-padded
  batches, cached per-layer states) with a random GENERator-shaped model (vocab 4128) at small dims.

Every case records the load average (``os.getloadavg()``) before and after it: the box is shared.
"""

from __future__ import annotations

import csv
import functools
import itertools
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from zoo.tokenizers.dna import CURRENT_SPECIAL_TOKENS, DNAKmerTokenizer


@functools.lru_cache(maxsize=4)
def _naive_tables(specials: tuple[str, ...], k: int) -> tuple[dict[str, int], re.Pattern, re.Pattern]:
    kmers = ["".join(p) for p in itertools.product("ATCG", repeat=k)]
    vocab = {t: i for i, t in enumerate(list(specials) + kmers)}
    return vocab, re.compile("|".join(re.escape(t) for t in specials)), re.compile(f"[A-Z]{{{k}}}|[A-Z]+")


def naive_encode(text: str, specials: tuple[str, ...] = CURRENT_SPECIAL_TOKENS, k: int = 6) -> list[int]:
    """The straightforward implementation: one Python iteration and one dict lookup per piece (k-mer)."""
    vocab, special_re, dna_re = _naive_tables(specials, k)
    out, pos, n = [], 0, len(text)
    while pos < n:
        m = special_re.match(text, pos) or dna_re.match(text, pos)
        piece = m.group() if m else text[pos]
        out.append(vocab.get(piece, 0))
        pos += len(piece)
    return out


def slice_encode(seq: str, k: int = 6) -> list[int]:
    """The shortest plain-Python version for a string of bases only (no special-token literals): a slice and a dict
    lookup per k-mer. Same ids as the reference for such strings (N-holding and short pieces miss the vocabulary)."""
    vocab = _naive_tables(CURRENT_SPECIAL_TOKENS, k)[0]
    return [vocab.get(seq[i:i + k], 0) for i in range(0, len(seq), k)]


@dataclass
class Setup:
    lengths: list[int] = field(default_factory=lambda: [98_304, 1_000_000])
    naive_repeats: int = 3
    fast_repeats: int = 30
    gen_d_model: int = 256
    gen_layers: int = 4
    gen_batches: list[int] = field(default_factory=lambda: [1, 8])
    gen_prompt_bp: int = 6 * 128
    gen_new_tokens: int = 64
    gen_repeats: int = 3
    seed: int = 0


def _best(fn, repeats: int) -> tuple[float, float, Any]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), float(np.median(times)), out


def _load() -> float:
    return os.getloadavg()[0]


def bench_tokenizer(s: Setup) -> list[dict[str, Any]]:
    tok = DNAKmerTokenizer()
    rng = np.random.default_rng(s.seed)
    rows = []
    cases = [(n, kind) for n in s.lengths for kind in ("clean", "N runs")]
    for n, kind in tqdm(cases, desc="tokenizer"):
        seq = "".join(rng.choice(list("ACGT"), n))
        if kind == "N runs":  # 1% N in runs of 100 (assembly gaps are runs of N)
            arr = np.frombuffer(seq.encode(), dtype=np.uint8).copy()
            for start in rng.choice(max(1, n - 100), max(1, n // 10_000), replace=False):
                arr[start:start + 100] = ord("N")
            seq = arr.tobytes().decode()
        load0 = _load()
        naive_best, naive_med, ref = _best(functools.partial(naive_encode, seq), s.naive_repeats)
        slice_best, _, sliced = _best(functools.partial(slice_encode, seq), s.naive_repeats)
        list_best, list_med, ids = _best(functools.partial(tok.encode, seq, add_special_tokens=False),
                                         s.fast_repeats)
        arr_best, arr_med, arr_ids = _best(functools.partial(tok.encode_array, seq, add_special_tokens=False),
                                             s.fast_repeats)
        if ids != ref or arr_ids.tolist() != ref or sliced != ref:
            raise AssertionError(f"vectorised ids differ from the per-k-mer implementation at n={n} ({kind})")
        dec_best, _, text = _best(functools.partial(tok.decode, arr_ids), s.fast_repeats)
        if n % 6 == 0 and kind == "clean" and text != seq:
            raise AssertionError("decode(encode(x)) != x")
        rows.append({
            "case": "tokenizer", "bp": n, "input": kind, "tokens": len(ref),
            "naive_ms": naive_best * 1e3, "naive_median_ms": naive_med * 1e3, "slice_ms": slice_best * 1e3,
            "encode_ms": list_best * 1e3, "encode_median_ms": list_med * 1e3,
            "encode_array_ms": arr_best * 1e3, "encode_array_median_ms": arr_med * 1e3,
            "decode_ms": dec_best * 1e3,
            "naive_bp_per_s": n / naive_best, "slice_bp_per_s": n / slice_best, "encode_bp_per_s": n / list_best,
            "encode_array_bp_per_s": n / arr_best,
            "speedup_encode": naive_best / list_best, "speedup_encode_array": naive_best / arr_best,
            "speedup_array_vs_slice": slice_best / arr_best,
            "load_start": load0, "load_end": _load(),
        })
    return rows


def small_generator(s: Setup):
    import zoo

    heads = max(4, s.gen_d_model // 64)
    cfg = zoo.ZooConfig.from_dict({
        "vocab_size": 4128, "d_model": s.gen_d_model, "n_layers": s.gen_layers, "mixers": "attention",
        "mlp": {"intermediate_size": int(s.gen_d_model * 2.75)}, "norm": "rmsnorm", "norm_eps": 1e-5,
        "mixer_defaults": {"attention": {"num_heads": heads, "num_kv_heads": max(1, heads // 8)}},  # 8:1 as 32:4
        "rope_theta": 500000.0, "max_position_embeddings": 16384, "bos_token_id": 1, "eos_token_id": 2,
        "family": "generator"})
    torch.manual_seed(s.seed)
    return zoo.create_model(cfg).eval()


def bench_generation(s: Setup) -> list[dict[str, Any]]:
    from zoo import genomics

    model, tok = small_generator(s), DNAKmerTokenizer()
    rng = np.random.default_rng(s.seed + 1)
    rows = []
    for batch in tqdm(s.gen_batches, desc="generation"):
        prompts = ["".join(rng.choice(list("ACGT"), s.gen_prompt_bp)) for _ in range(batch)]
        run = functools.partial(genomics.generate, model, tok, prompts, max_new_tokens=s.gen_new_tokens, seed=0,
                                batch_size=batch)
        run()  # warm-up
        load0 = _load()
        best, med, outs = _best(run, s.gen_repeats)
        assert all(len(o) == 6 * s.gen_new_tokens for o in outs)
        rows.append({
            "case": "generation", "batch": batch, "d_model": s.gen_d_model, "layers": s.gen_layers,
            "params": model.num_parameters(), "prompt_tokens": s.gen_prompt_bp // 6 + 1,
            "new_tokens": s.gen_new_tokens, "seconds": best, "median_seconds": med,
            "tokens_per_s": batch * s.gen_new_tokens / best, "bp_per_s": 6 * batch * s.gen_new_tokens / best,
            "load_start": load0, "load_end": _load(),
        })
    return rows


def write_report(s: Setup, tok_rows: list[dict], gen_rows: list[dict], info: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("tokenizer.csv", tok_rows), ("generation.csv", gen_rows)):
        with open(out / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.2))
    labels = [f"{r['bp']:,} bp\n{r['input']}" for r in tok_rows]
    x = np.arange(len(tok_rows))
    for j, (key, lab) in enumerate((("naive_bp_per_s", "per-k-mer loop"), ("slice_bp_per_s", "slice + dict"),
                                    ("encode_bp_per_s", "encode (list)"),
                                    ("encode_array_bp_per_s", "encode_array (numpy)"))):
        ax[0].bar(x + (j - 1.5) * 0.2, [r[key] for r in tok_rows], 0.2, label=lab)
    ax[0].set(xticks=x, xticklabels=labels, yscale="log", ylabel="bp / s", title="6-mer tokenizer throughput")
    ax[0].legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=4)
    ax[1].bar([str(r["batch"]) for r in gen_rows], [r["tokens_per_s"] for r in gen_rows])
    ax[1].set(xlabel="batch", ylabel="new tokens / s", title=f"generation, random {s.gen_layers}-layer "
                                                              f"d{s.gen_d_model} model (vocab 4128)")
    fig.tight_layout()
    fig.savefig(out / "dna_bench.png", dpi=110)
    plt.close(fig)
    lines = ["# DNA tokenizer and generation benchmark", "",
             f"Machine: {info['cpu_model']}, {info['affinity_cores']} cores available, torch {info['torch']} "
             f"({info['torch_threads']} threads). Load average at start {info['load_average_start'][0]:.2f}; "
             "per case below (the box is shared: treat the numbers as preliminary when the load is high).", "",
             "Produced by `python scripts/bench_dna.py`; raw numbers in `tokenizer.csv`, `generation.csv`; plot "
             "`dna_bench.png`. Times are the best of the repeats (median in the CSV).", "",
             "## Tokenizer (ids checked equal across all implementations in the same run)", "",
             "Baselines: **per-k-mer loop** = the reference's `_tokenize` written plainly (at each position: special "
             "literal, else `[A-Z]{6}|[A-Z]+`, else one character; a dict lookup per piece); **slice** = "
             "`[vocab.get(s[i:i+6], 0) for i in range(0, len(s), 6)]`, the shortest Python for bases-only input "
             "(no specials, no validation). `encode` returns a Python list (as transformers); `encode_array` numpy "
             "(what `tok(..., return_tensors='pt')` uses).", "",
             "| sequence | tokens | per-k-mer loop | slice | encode (list) | encode_array | vs loop (list / array) "
             "| vs slice (array) | decode | load |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in tok_rows:
        lines.append(f"| {r['bp']:,} bp, {r['input']} | {r['tokens']:,} | {r['naive_ms']:.1f} ms | "
                     f"{r['slice_ms']:.1f} ms | {r['encode_ms']:.2f} ms | {r['encode_array_ms']:.2f} ms | "
                     f"{r['speedup_encode']:.0f}x / {r['speedup_encode_array']:.0f}x | "
                     f"{r['speedup_array_vs_slice']:.0f}x | {r['decode_ms']:.2f} ms | "
                     f"{r['load_start']:.1f} -> {r['load_end']:.1f} |")
    lines += ["", "## Generation (`zoo.genomics.generate`: sampling, special tokens blocked)", "",
              "| batch | model | prompt tokens | new tokens | time | tokens/s | bp/s | load |",
              "|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in gen_rows:
        lines.append(f"| {r['batch']} | {r['layers']} x d{r['d_model']} ({r['params'] / 1e6:.1f}M) | "
                     f"{r['prompt_tokens']} | {r['new_tokens']} | {r['seconds']:.2f} s | {r['tokens_per_s']:.0f} | "
                     f"{r['bp_per_s']:.0f} | {r['load_start']:.1f} -> {r['load_end']:.1f} |")
    lines += ["", "## Machine", "", "```", *(f"{k}: {v}" for k, v in info.items()), "```", ""]
    (out / "results.md").write_text("\n".join(lines))


def run(s: Setup, out: str | Path) -> Path:
    from zoo.bench.machine import machine_info

    out = Path(out)
    info = machine_info(torch.device("cpu"))
    tok_rows = bench_tokenizer(s)
    gen_rows = bench_generation(s)
    info["load_average_end"] = list(os.getloadavg())
    write_report(s, tok_rows, gen_rows, info, out)
    return out
