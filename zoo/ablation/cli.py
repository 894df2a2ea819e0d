"""``zoo swap``, ``zoo eval {loss, passkey, mqar, efficiency}`` and ``zoo ablate`` (added to the ``zoo`` command)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def load_model(name: str):
    """``"default"`` (the embedded model), a checkpoint directory, a hub id or a preset with a checkpoint."""
    from zoo.cli import _load

    return _load(name)


def _train_length(model, given: int | None) -> int | None:
    return given if given is not None else model.config.extra.get("train_length")


def _tokenizer(name: str):
    from zoo.tokenizers import load_tokenizer

    return load_tokenizer(None if name == "default" else name)


def _print_table(rows: list[dict], keys: list[str]) -> None:
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys))


# ---------------------------------------------------------------------------------------------- commands
def cmd_swap(args: argparse.Namespace) -> int:
    import zoo
    from zoo.swaps import describe

    model = load_model(args.src)
    for line in describe(args.spec, model.config):
        print(line)
    if args.dry_run:
        return 0
    zoo.swap_layers(model, args.spec, init=args.init)
    model.save_pretrained(args.dst)
    print(f"wrote {args.dst}")
    return 0


def cmd_eval_loss(args: argparse.Namespace) -> int:
    from zoo.eval.corpus import load_corpus, pack_documents
    from zoo.eval.loss import eval_windows, loss_by_position

    model = load_model(args.model)
    T = _train_length(model, args.train_length)
    docs = load_corpus(args.corpus, "heldout").token_documents(_tokenizer(args.model))
    L = args.length or (4 * T if T else 1024)
    res = loss_by_position(model, eval_windows(docs, L, args.windows, pack_documents(docs)[0]), train_length=T,
                           bucket=args.bucket)
    _print_table(res.rows, ["position", "position_end", "loss"])
    print(json.dumps(res.summary))
    return 0


def cmd_eval_passkey(args: argparse.Namespace) -> int:
    from zoo.eval.passkey import TextPasskey, evaluate_passkey

    model = load_model(args.model)
    T = _train_length(model, args.train_length)
    lengths = args.lengths or ([T, 2 * T, 4 * T] if T else [256, 512, 1024])
    res = evaluate_passkey(model, TextPasskey(_tokenizer(args.model), n_digits=args.digits), lengths=lengths,
                           depths=args.depths, samples=args.samples, train_length=T, seed=args.seed)
    _print_table(res.rows, ["length", "depth", "accuracy", "n"])
    print(json.dumps(res.summary))
    return 0


def cmd_eval_mqar(args: argparse.Namespace) -> int:
    from zoo.eval.mqar import MQARSetup, run_mqar

    mixers = dict(_name_spec(x) for x in (args.mixer or ["attention="]))
    given = {"steps": args.steps, "n_pairs": args.pairs, "vocab_size": args.vocab_size,
             "train_lengths": (args.train_length,) if args.train_length else None,
             "eval_lengths": tuple(args.eval_lengths) if args.eval_lengths else None}
    setup = MQARSetup(d_models=tuple(args.d_models), seed=args.seed, **{k: v for k, v in given.items() if v})
    res = run_mqar(mixers, setup)
    _print_table(res["rows"], ["variant", "d_model", "length", "accuracy", "state_bytes", "in_distribution"])
    return 0


def cmd_eval_efficiency(args: argparse.Namespace) -> int:
    from zoo.eval.efficiency import measure_efficiency

    res = measure_efficiency(load_model(args.model), args.lengths, decode_tokens=args.decode_tokens,
                             repeats=args.repeats)
    _print_table(res["rows"], ["length", "forward_tokens_per_s", "decode_ms_per_token", "state_bytes",
                               "load_average"])
    return 0


def _name_spec(text: str) -> tuple[str, str | None]:
    if "=" not in text:
        raise ValueError(f"expected NAME=SWAP_SPEC (an empty spec = the base as it is), got {text!r}")
    name, spec = text.split("=", 1)
    return name.strip(), (spec.strip() or None)


def spec_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The spec file (if given) with the command-line flags on top."""
    raw: dict[str, Any] = {}
    if args.spec:
        from zoo.ablation.spec import read_spec_file

        raw = dict(read_spec_file(args.spec))
    if args.base:
        raw["base"] = args.base
    if args.name:
        raw["name"] = args.name
    if args.seed is not None:
        raw["seed"] = args.seed
    if args.train_length:
        raw["train_length"] = args.train_length
    if args.variant:
        raw["variants"] = [{"name": n, "swap": s, "init": args.init, "finetune": bool(args.finetune_steps)}
                           for n, s in map(_name_spec, args.variant)]
    if args.finetune_steps:
        raw["finetune"] = {**(raw.get("finetune") or {}), "steps": args.finetune_steps}
    if args.eval:
        evals = []
        for e in args.eval:
            kind, _, params = e.partition(":")
            evals.append({"kind": kind, **(json.loads(params) if params else {})})
        raw["evaluations"] = evals
    return raw


def cmd_ablate(args: argparse.Namespace) -> int:
    from zoo.ablation import run_ablation

    raw = spec_from_args(args)
    out = args.out or str(Path("ablations") / str(raw.get("name", "ablation")))
    run = run_ablation(raw, out, threads=args.threads, progress=not args.no_progress)
    print(run.report["markdown"].read_text())
    print(f"ran {len(run.ran)} cells, skipped {len(run.skipped)} finished ones; results in {out}/: "
          + ", ".join(p.name for p in run.report.values()))
    return 0


# ---------------------------------------------------------------------------------------------- parsers
def add_ablation_commands(sub: Any) -> None:
    s = sub.add_parser("swap", help="swap layers of a model by a swap spec and save it")
    s.add_argument("src", help="'default', a checkpoint directory, a hub id or a preset")
    s.add_argument("dst")
    s.add_argument("spec", help="swap spec, e.g. 'every 2nd from 1: sliding_window(window=64)' or 'longgen'")
    s.add_argument("--init", default="reuse", choices=["reuse", "fresh", "derive"])
    s.add_argument("--dry-run", action="store_true", help="print the layer plan only")
    s.set_defaults(fn=cmd_swap)

    ev = sub.add_parser("eval", help="one evaluation: loss by position, passkey, MQAR, efficiency")
    esub = ev.add_subparsers(dest="eval_command", required=True)
    p = esub.add_parser("loss", help="loss by position on long held-out text")
    p.add_argument("model")
    p.add_argument("--corpus", default="stdlib", help="'stdlib' (default), a text file or a directory")
    p.add_argument("--length", type=int, default=None, help="tokens per window (default 4x the training length)")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--bucket", type=int, default=None)
    p.add_argument("--train-length", type=int, default=None)
    p.set_defaults(fn=cmd_eval_loss)
    p = esub.add_parser("passkey", help="passkey retrieval over lengths x depths")
    p.add_argument("model")
    p.add_argument("--lengths", type=int, nargs="+", default=None)
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--digits", type=int, default=5)
    p.add_argument("--train-length", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_eval_passkey)
    p = esub.add_parser("mqar", help="multi-query associative recall, trained from scratch")
    p.add_argument("--mixer", action="append", help="NAME=SWAP_SPEC on the attention base (repeatable); "
                   "default: attention=")
    p.add_argument("--d-models", type=int, nargs="+", default=[64])
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--train-length", type=int, default=None)
    p.add_argument("--eval-lengths", type=int, nargs="+", default=None)
    p.add_argument("--pairs", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_eval_mqar)
    p = esub.add_parser("efficiency", help="forward tokens/s, decode ms/token, state bytes per length")
    p.add_argument("model")
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(fn=cmd_eval_efficiency)

    a = sub.add_parser("ablate", help="base model x swap variants x evaluations -> tables, CSV, plots (resumable)")
    a.add_argument("spec", nargs="?", help="YAML or JSON spec file (flags below override or replace parts)")
    a.add_argument("--out", default=None, help="results directory (default ablations/<name>)")
    a.add_argument("--base", default=None, help="'default', a checkpoint directory or hub id")
    a.add_argument("--name", default=None)
    a.add_argument("--variant", action="append", help="NAME=SWAP_SPEC (repeatable; empty spec = the base)")
    a.add_argument("--init", default="reuse", choices=["reuse", "fresh", "derive"], help="for --variant")
    a.add_argument("--finetune-steps", type=int, default=0, help="fine-tune each --variant this many steps")
    a.add_argument("--eval", action="append", help="KIND or KIND:{json params} (repeatable)")
    a.add_argument("--train-length", type=int, default=None)
    a.add_argument("--seed", type=int, default=None)
    a.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    a.add_argument("--no-progress", action="store_true")
    a.set_defaults(fn=cmd_ablate)

