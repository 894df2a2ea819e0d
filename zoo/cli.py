"""The ``zoo`` command: list, info, generate, convert, publish, swap, eval, ablate, demo, bench, dna, train,
consolidate."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import zoo
from zoo.ablation.cli import add_ablation_commands
from zoo.genomics import add_dna_commands
from zoo.models.lm import state_bytes_per_token
from zoo.registry import list_formats
from zoo.tokenizers import load_tokenizer
from zoo.train_run import add_train_commands


def _load(name: str, *, meta: bool = False) -> zoo.ZooForCausalLM:
    """``meta``: a preset's architecture on the meta device (nothing materialised); otherwise weights are loaded:
    a checkpoint directory, a hub id, a preset name (its published checkpoint), or "default" (the embedded model)."""
    if name == "default" and not Path(name).exists():
        return zoo.default_model()
    if meta and name in zoo.list_presets() and not Path(name).exists():
        with torch.device("meta"):
            return zoo.create_model(name)
    return zoo.from_pretrained(name)


def cmd_list(args: argparse.Namespace) -> int:
    print("mixers:   " + ", ".join(zoo.list_mixers()))
    print("families: " + ", ".join(zoo.list_families()))
    print("presets:  " + ", ".join(zoo.list_presets()))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    model = _load(args.model, meta=True)
    cfg = model.config
    print(f"{cfg.name or args.model}: family={cfg.family}, {cfg.n_layers} layers, d_model={cfg.d_model}, "
          f"vocab={cfg.vocab_size}, parameters={model.num_parameters():,}")
    per_token = state_bytes_per_token(cfg)
    for i, (layer, bpt) in enumerate(zip(cfg.layers, per_token)):
        mlp = f"mlp {layer.mlp['intermediate_size']}" if layer.mlp else "no mlp"
        print(f"  {i:3d}  {layer.spec_string:<48} {mlp:<12} state bytes/token {bpt:,.0f}")
    print(f"state bytes per token of context (fp32, all layers): {sum(per_token):,.0f}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    model = _load(args.model)
    source = getattr(model, "source", None)
    tok = load_tokenizer(source.path if source is not None else None)
    ids = torch.tensor([tok.encode(args.prompt)])
    if int(ids.max()) >= model.config.vocab_size:
        print(f"error: the tokenizer produced ids >= vocab_size {model.config.vocab_size}", file=sys.stderr)
        return 2
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                         temperature=max(args.temperature, 1e-6), top_k=args.top_k, top_p=args.top_p)
    print(tok.decode(out[0, ids.shape[1]:]))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from zoo.checkpoint import save_pretrained, save_reference, tokenizer_files

    model = zoo.from_pretrained(args.src)
    source = model.source.path
    tokenizer = source if tokenizer_files(source) else None  # tokenizer files travel with the checkpoint
    if args.to == "zoo":
        save_pretrained(model, args.dst, tokenizer=tokenizer, max_shard_size=args.max_shard_size)
    else:
        save_reference(model, args.dst, args.to, tokenizer=tokenizer, max_shard_size=args.max_shard_size)
    copied = f", tokenizer files copied: {len(tokenizer_files(source))}" if tokenizer else ""
    print(f"wrote {args.dst} ({args.to} format{copied})")
    return 0


def cmd_publish(args: argparse.Namespace) -> int:
    from zoo.publish import publish

    result = publish(
        args.src, args.repo_id, swap=args.swap, to=args.to, out=args.out, dry_run=args.dry_run,
        revision=args.revision, private=args.private, commit_message=args.commit_message,
        max_shard_size=args.max_shard_size, dtype=args.dtype, license=args.license, datasets=args.dataset,
        base_model=args.base_model, results=args.results, tags=args.tag, random_init=args.random_init,
        atol=args.atol)
    print(result.summary())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from zoo.demo import demo_spec, run_demo

    run_demo(args.out, spec=demo_spec(args.spec) if args.spec else None, threads=args.threads,
             progress=not args.no_progress)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    try:
        from zoo.bench.cli import main as bench_main
    except ImportError as e:
        print(f"error: the benchmark harness is not available: {e}", file=sys.stderr)
        return 2
    return bench_main(args.bench_args, prog="zoo bench")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zoo", description=zoo.__doc__)
    p.add_argument("--version", action="version", version=f"zoo {zoo.__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="registered mixers, families and presets").set_defaults(fn=cmd_list)
    s = sub.add_parser("info", help="layers, parameter count, state bytes per token")
    s.add_argument("model", help="preset name, checkpoint directory or hub id")
    s.set_defaults(fn=cmd_info)
    s = sub.add_parser("generate", help="generate text from a prompt")
    s.add_argument("model")
    s.add_argument("--prompt", required=True)
    s.add_argument("--max-new-tokens", type=int, default=32)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--top-p", type=float, default=None)
    s.set_defaults(fn=cmd_generate)
    s = sub.add_parser("convert", help="reference format -> zoo format (default) or zoo -> a reference format")
    s.add_argument("src", help="checkpoint directory, hub id or preset name")
    s.add_argument("dst", help="output directory (only the checkpoint's own files are written there)")
    s.add_argument("--to", default="zoo", help="'zoo' or a reference format: " + ", ".join(list_formats()))
    s.add_argument("--max-shard-size", default=None,
                   help="split the weights into shards of at most this size (e.g. 5GB) with an index file")
    s.set_defaults(fn=cmd_convert)
    s = sub.add_parser("publish", help="convert, validate (reload + logits), render the card, upload to the Hub")
    s.add_argument("src", help="zoo or reference-format checkpoint directory, hub id or preset name")
    s.add_argument("repo_id", help="target Hub repo, 'namespace/name'")
    s.add_argument("--swap", action="append", default=[], metavar="LAYERS=MIXER",
                   help="swap layers before publishing, e.g. '0-3=sliding_window(window=1024)' (repeatable; or a "
                        "JSON object of the zoo.swap_layers form)")
    s.add_argument("--to", default="zoo", help="format of the published files: 'zoo' (default) or one of "
                                               + ", ".join(list_formats()))
    s.add_argument("--out", default=None, help="write the folder here (kept); default: a temporary directory")
    s.add_argument("--dry-run", action="store_true", help="write and validate the folder, print what would be "
                                                          "uploaded, upload nothing")
    s.add_argument("--revision", default=None, help="branch to commit to (created if missing; default main)")
    s.add_argument("--private", action="store_true", default=None, help="create the repo as private")
    s.add_argument("--commit-message", default=None)
    s.add_argument("--max-shard-size", default="5GB", help="largest weight file before sharding (default 5GB)")
    s.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="cast the weights before writing")
    s.add_argument("--license", default="apache-2.0")
    s.add_argument("--dataset", action="append", default=None, help="training dataset id for the card (repeatable)")
    s.add_argument("--base-model", default=None, help="card metadata base_model (default: the source hub repo "
                                                      "when converted or swapped)")
    s.add_argument("--results", action="append", default=None, metavar="PATH",
                   help="evaluation results for the card: a zoo bench report JSON, or a table as JSON / JSON Lines "
                        "(see zoo.cards); repeatable")
    s.add_argument("--tag", action="append", default=None, help="extra card tag (repeatable)")
    s.add_argument("--random-init", action="store_true",
                   help="allow a preset without a published checkpoint (publishes random weights)")
    s.add_argument("--atol", type=float, default=1e-5, help="validation tolerance (x max(1, max|logits|))")
    s.set_defaults(fn=cmd_publish)
    s = sub.add_parser("demo", help="offline CPU demo: a layer-swap ablation of the embedded default model")
    s.add_argument("--out", default="zoo-demo", help="results directory (default ./zoo-demo; reruns resume)")
    s.add_argument("--spec", default=None, help="another ablation spec file (default: the packaged demo.yaml)")
    s.add_argument("--threads", type=int, default=1,
                   help="intra-op threads (default 1: the model is small; more threads only add stalls)")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(fn=cmd_demo)
    # Every argument after "bench" (options included, -h too) goes to zoo.bench.cli, imported only when run.
    s = sub.add_parser("bench", help="benchmarks against the references (zoo bench -h)", add_help=False)
    s.set_defaults(fn=cmd_bench, bench_args=[])
    add_dna_commands(sub)
    add_ablation_commands(sub)
    add_train_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.fn(args)
    except (ValueError, OSError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
