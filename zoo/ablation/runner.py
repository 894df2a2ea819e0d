"""Running an ablation: every (variant, evaluation) cell once, appended to ``results.jsonl`` as it finishes.

Resumable: a cell is identified by ``variant/evaluation`` and a fingerprint of everything it depends on (base,
seed, data, the variant's swap / init / fine-tuning, the evaluation's parameters); on a rerun the cells already
in ``results.jsonl`` with the same fingerprint are skipped, so a killed run continues where it stopped (a line cut
short by the kill is dropped). Fine-tuned variant models are saved under ``models/`` and reused by a rerun.
Each line records the seed, the versions, the device, the thread count and the load average.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import zoo
from zoo.ablation.evaluations import EvalContext, get_evaluation
from zoo.ablation.spec import AblationSpec, Variant, parse_spec

RESULTS = "results.jsonl"


@dataclass
class AblationRun:
    out_dir: Path
    records: list[dict]  # the current spec's cells, in spec order
    ran: list[str]  # cells computed by this call
    skipped: list[str]  # cells found finished in results.jsonl
    report: dict[str, Path]  # written files: markdown, csv, plots


# ---------------------------------------------------------------------------------------------- results file
def read_results(path: Path) -> list[dict]:
    """The complete lines of ``results.jsonl``; a torn last line (the run was killed while writing) is cut off."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        raw = raw[: raw.rfind(b"\n") + 1]
        path.write_bytes(raw)
    out = []
    for line in raw.decode().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def append_result(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, default=_jsonable) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def machine_meta() -> dict[str, Any]:
    from zoo.bench.machine import cpu_model

    return {"zoo": zoo.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "device": "cuda" if torch.cuda.is_available() else "cpu",
            "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}


# ---------------------------------------------------------------------------------------------- models
class ModelBuilder:
    """The base model (loaded once) and each variant's model (swap, optional fine-tuning; cached on disk)."""

    def __init__(self, spec: AblationSpec, out_dir: Path, base_model: Any = None, progress: bool = True,
                 print_fn: Callable[[str], None] = print) -> None:
        self.spec, self.out_dir, self.progress, self.print = spec, out_dir, progress, print_fn
        self._base = base_model
        self._docs: dict[tuple[str, str], list[torch.Tensor]] = {}
        self._tokenizer = None
        self.info: dict[str, dict] = {}

    def base(self):
        if self._base is None:
            b = self.spec.base
            if b == "default":
                from zoo.assets import default_model

                self._base = default_model()
            else:
                self._base = zoo.from_pretrained(b)
        return self._base

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from zoo.tokenizers import ByteTokenizer, load_tokenizer

            t = self.spec.tokenizer
            self._tokenizer = ByteTokenizer() if t == "bytes" else load_tokenizer(
                self.spec.base if t == "auto" else t)
        return self._tokenizer

    def train_length(self) -> int | None:
        if self.spec.train_length is not None:
            return self.spec.train_length
        return self.base().config.extra.get("train_length")

    def docs(self, source: str, split: str) -> list[torch.Tensor]:
        from zoo.eval.corpus import load_corpus

        key = (source, split)
        if key not in self._docs:
            self._docs[key] = load_corpus(source, split).token_documents(self.tokenizer)
        return self._docs[key]

    def variant(self, v: Variant):
        fp = self.spec.fingerprint(v.to_dict())
        ckpt = self.out_dir / "models" / f"{v.name}-{fp}"
        if v.finetune and (ckpt / "config.json").is_file():
            self.info[v.name] = json.loads((ckpt / "finetune.json").read_text())
            return zoo.from_pretrained(ckpt)
        torch.manual_seed(self.spec.seed)  # fresh initialisations are reproducible
        model = copy.deepcopy(self.base())
        info: dict[str, Any] = {"swap": v.swap, "init": v.init, "trainable": v.trainable, "swapped_layers": []}
        if v.swap:
            before = model.config
            zoo.swap_layers(model, v.swap, init=v.init, trainable=v.trainable)
            info["swapped_layers"] = [i for i, (a, b) in enumerate(zip(before.layers, model.config.layers))
                                      if a != b]
        if v.finetune:
            info["finetune"] = self.finetune(model, v)
            model.eval()
            for p in model.parameters():
                p.requires_grad_(True)
            model.save_pretrained(ckpt)
            (ckpt / "finetune.json").write_text(json.dumps(info, indent=1))
        self.info[v.name] = info
        return model.eval()

    def finetune(self, model, v: Variant) -> dict[str, Any]:
        from zoo.eval.corpus import pack_documents
        from zoo.eval.passkey import TextPasskey, passkey_batches
        from zoo.registry import get_mixer
        from zoo.train import TrainConfig, Trainer, concat_batches, packed_batches

        ft, data = v.finetune, self.spec.data
        T = ft["seq_len"] or self.train_length()
        if T is None:
            raise ValueError(f"variant {v.name!r}: fine-tuning needs finetune.seq_len or the spec's train_length")
        g = torch.Generator().manual_seed(self.spec.seed)
        stream, doc_ids = pack_documents(self.docs(data["corpus"], "train"), self.tokenizer.eos_token_id)
        packing = all(get_mixer(ls.mixer).packing_supported(model.config.mixer_kwargs(i))
                      for i, ls in enumerate(model.config.layers))
        n_pk = min(int(data["passkey_rows"]), ft["batch_size"])
        sources = []
        if ft["batch_size"] - n_pk > 0:
            sources.append(packed_batches(stream, doc_ids, T, ft["batch_size"] - n_pk, generator=g,
                                          use_seq_idx=packing))
        if n_pk:
            sources.append(passkey_batches(TextPasskey(self.tokenizer), T, n_pk, generator=g,
                                           answer_weight=data["passkey_answer_weight"]))
        cfg = TrainConfig(steps=ft["steps"], lr=ft["lr"], warmup_steps=ft["warmup_steps"],
                          min_lr_ratio=ft["min_lr_ratio"], weight_decay=ft["weight_decay"],
                          grad_clip=ft["grad_clip"], grad_accum=ft["grad_accum"])
        torch.manual_seed(self.spec.seed)
        res = Trainer(model, config=cfg).fit(concat_batches(*sources), progress=self.progress,
                                             desc=f"fine-tune {v.name}")
        n = max(1, len(res.losses) // 10)
        return {"steps": res.steps, "seq_len": T, "tokens": res.tokens, "seconds": round(res.seconds, 1),
                "loss_first": sum(res.losses[:n]) / n, "loss_last": sum(res.losses[-n:]) / n}


# ---------------------------------------------------------------------------------------------- the run
def run_ablation(spec: AblationSpec | dict, out_dir: str | Path, *, base_model: Any = None, progress: bool = True,
                 threads: int | None = None, print_fn: Callable[[str], None] = print,
                 write_report: bool = True) -> AblationRun:
    """Run the spec's cells that ``out_dir/results.jsonl`` does not hold yet, then write the report.

    ``base_model``: use this model object as the base (``spec.base`` is then only recorded, e.g. a description
    of how an experiment trained it). ``threads``: torch intra-op threads during the run (default: the spec's
    ``threads``, else unchanged)."""
    spec = parse_spec(spec)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec.to_dict(), indent=1, default=str) + "\n")
    results_path = out / RESULTS
    previous_threads = torch.get_num_threads()
    n_threads = threads or spec.threads
    if n_threads:
        torch.set_num_threads(n_threads)
    try:
        done = {(r.get("cell"), r.get("fingerprint")): r for r in read_results(results_path)}
        builder = ModelBuilder(spec, out, base_model, progress, print_fn)
        cells = [(v, e, spec.fingerprint(v.to_dict(), e.to_dict())) for v in spec.variants for e in spec.evaluations]
        pending = [c for c in cells if (f"{c[0].name}/{c[1].name}", c[2]) not in done]
        skipped = [f"{v.name}/{e.name}" for v, e, fp in cells if (f"{v.name}/{e.name}", fp) in done]
        if skipped:
            print_fn(f"{len(skipped)} of {len(cells)} cells already in {results_path} (skipped): {', '.join(skipped)}")
        ran = []
        models: dict[str, Any] = {}
        bar = tqdm(pending, desc=f"ablation {spec.name}", unit="cell", disable=not progress, dynamic_ncols=True)
        for v, e, fp in bar:
            cell = f"{v.name}/{e.name}"
            bar.set_postfix_str(cell, refresh=True)
            remaining = [c for c in pending[pending.index((v, e, fp)) + 1:] if c[0].name == v.name]

            def model(v=v):
                if v.name not in models:
                    models[v.name] = builder.variant(v)
                return models[v.name]

            ctx = EvalContext(spec=spec, variant=v, model=model, tokenizer=builder.tokenizer,
                              train_length=builder.train_length(),
                              corpus=lambda split: builder.docs(spec.data["corpus"], split), progress=progress,
                              extras={"load_docs": builder.docs})
            load0, t0 = os.getloadavg()[0], time.perf_counter()
            result = get_evaluation(e.kind)(ctx, **e.params)
            seconds = time.perf_counter() - t0
            record = {"cell": cell, "variant": v.name, "evaluation": e.name, "kind": e.kind, "fingerprint": fp,
                      "rows": result["rows"], "summary": result["summary"], "params": e.params,
                      "variant_info": builder.info.get(v.name, {"swap": v.swap, "init": v.init,
                                                                 "trainable": v.trainable}),
                      "meta": {**machine_meta(), "seed": spec.seed, "seconds": round(seconds, 2),
                               "load_average": [load0, os.getloadavg()[0]],
                               "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}}
            append_result(results_path, record)
            done[(cell, fp)] = record
            ran.append(cell)
            if not remaining:
                models.pop(v.name, None)  # free the variant's model
        bar.close()
    finally:
        torch.set_num_threads(previous_threads)
    records = [done[(f"{v.name}/{e.name}", fp)] for v, e, fp in cells]
    report: dict[str, Path] = {}
    if write_report:
        from zoo.ablation.report import write_report as _write

        report = _write(spec, records, out)
    return AblationRun(out, records, ran, skipped, report)
