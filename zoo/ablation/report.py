"""The report of an ablation: ``results.md`` (summary + one table per evaluation), ``results.csv`` (every row),
``loss_vs_position.png``, ``accuracy_vs_length.png`` and ``efficiency.png`` (when those evaluations ran)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from zoo.ablation.spec import AblationSpec

ACCURACY_KINDS = ("passkey", "mqar")


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _by_eval(records: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in records:
        out.setdefault(r["evaluation"], []).append(r)
    return out


def summary_columns(records: list[dict]) -> list[tuple[str, str, str]]:
    """``(evaluation, summary key, column title)`` for the summary table."""
    cols = []
    for name, recs in _by_eval(records).items():
        kind = recs[0]["kind"]
        s = recs[0]["summary"]
        T = s.get("train_length")
        if kind == "efficiency":
            L = s.get("length")
            cols += [(name, "forward_tokens_per_s", f"fwd tok/s @{L}"),
                     (name, "decode_ms_per_token", f"decode ms @{L}"), (name, "state_bytes", f"state KiB @{L}")]
        elif "in_distribution" in s:
            what = "loss" if kind == "loss" else kind
            inside = f"{what} ≤{T}" if T else f"{what} (train length)"
            beyond = f"{what} >{T}" if T else f"{what} (longer)"
            cols += [(name, "in_distribution", inside), (name, "extrapolated", beyond)]
        else:
            cols += [(name, k, f"{name} {k}") for k, v in s.items() if isinstance(v, (int, float))][:4]
    return cols


def summary_legend(records: list[dict]) -> list[str]:
    """One line per summary column pair saying what was measured."""
    out = []
    for name, recs in _by_eval(records).items():
        kind, s = recs[0]["kind"], recs[0]["summary"]
        T = s.get("train_length")
        if "in_distribution" not in s or not T:
            continue
        if kind == "loss":
            out.append(f"{name}: mean next-token loss (nats per token) at positions before the training length {T} "
                       f"(in distribution) and from {T} to {s.get('length', '?')}.")
        elif kind in ACCURACY_KINDS:
            longer = sorted({r["length"] for r in recs[0]["rows"] if r["length"] > T})
            out.append(f"{name}: accuracy at lengths ≤{T}, the training length (in distribution), "
                       f"and its mean over the longer lengths {', '.join(map(str, longer))}.")
    return out


def markdown(spec: AblationSpec, records: list[dict], files: dict[str, Path]) -> str:
    variants = [v.name for v in spec.variants]
    cell = {(r["variant"], r["evaluation"]): r for r in records}
    meta = records[0]["meta"] if records else {}
    lines = [f"# Ablation: {spec.name}", ""]
    if spec.description:
        lines += [spec.description, ""]
    lines += [f"Base: `{spec.base}`; seed {spec.seed}; zoo {meta.get('zoo')}, torch {meta.get('torch')}, "
              f"Python {meta.get('python')}; {meta.get('device')} ({meta.get('cpu_model')}, "
              f"{meta.get('torch_threads')} torch threads).", ""]
    lines += ["| variant | swap | fine-tune |", "|---|---|---|"]
    for v in spec.variants:
        info = next((r["variant_info"] for r in records if r["variant"] == v.name and r["variant_info"]), {})
        ft = info.get("finetune")
        ft_s = (f"{ft['steps']} steps, loss {ft['loss_first']:.2f} → {ft['loss_last']:.2f}" if ft else "–")
        swap = f"`{v.swap}`" + (f" (init {v.init})" if v.init != "reuse" else "") if v.swap else "– (base)"
        if v.trainable != "all":
            swap += f", trainable: {v.trainable}"
        lines.append(f"| {v.name} | {swap} | {ft_s} |")
    cols = summary_columns(records)
    lines += ["", "## Summary", "", "| variant | " + " | ".join(c[2] for c in cols) + " |",
              "|---|" + "---:|" * len(cols)]
    for v in variants:
        vals = []
        for e, key, _ in cols:
            x = cell.get((v, e), {}).get("summary", {}).get(key)
            if key == "state_bytes" and x is not None:
                x = x / 1024
            vals.append(_fmt(x, 1 if key in ("forward_tokens_per_s", "state_bytes") else 3))
        lines.append(f"| {v} | " + " | ".join(vals) + " |")
    legend = summary_legend(records)
    if legend:
        lines += [""] + legend
    for name, recs in _by_eval(records).items():
        lines += ["", f"## {name} ({recs[0]['kind']})", ""] + detail_table(recs, variants)
        load = [r["meta"].get("load_average") for r in recs]
        lines += ["", "Load average (1 min) at start/end of each cell: "
                  + ", ".join(f"{r['variant']} {a[0]:.1f}/{a[1]:.1f}" for r, a in zip(recs, load) if a)]
    if files:
        lines += ["", "Files: " + ", ".join(f"`{p.name}`" for p in files.values())]
    return "\n".join(lines) + "\n"


def detail_table(recs: list[dict], variants: list[str]) -> list[str]:
    kind = recs[0]["kind"]
    by_v = {r["variant"]: r for r in recs}
    if kind == "loss":
        rows0 = recs[0]["rows"]
        step = max(1, len(rows0) // 8)
        show = list(range(0, len(rows0), step))
        if show[-1] != len(rows0) - 1:
            show.append(len(rows0) - 1)
        head = ["| variant | " + " | ".join(f"@{rows0[i]['position']}" for i in show) + " |",
                "|---|" + "---:|" * len(show)]
        body = [f"| {v} | " + " | ".join(_fmt(by_v[v]["rows"][i]["loss"]) for i in show) + " |"
                for v in variants if v in by_v]
        T = recs[0]["summary"].get("train_length")
        note = [f"Mean next-token loss (nats per token) by position bucket; training length {T}."] if T else []
        return note + [""] + head + body if note else head + body
    if kind in ACCURACY_KINDS:
        keys = sorted({(r.get("d_model"), r["length"]) for r in recs[0]["rows"]}, key=lambda k: (k[0] or 0, k[1]))
        multi_d = len({k[0] for k in keys}) > 1
        head = ["| variant | " + " | ".join(f"{L}" + (f" (d={d})" if multi_d else "") for d, L in keys) + " |",
                "|---|" + "---:|" * len(keys)]
        body = []
        for v in variants:
            if v not in by_v:
                continue
            acc: dict[tuple, list[float]] = {}
            for r in by_v[v]["rows"]:
                acc.setdefault((r.get("d_model"), r["length"]), []).append(r["accuracy"])
            body.append(f"| {v} | " + " | ".join(_fmt(sum(acc[k]) / len(acc[k]), 2) if k in acc else "–"
                                                 for k in keys) + " |")
        T = recs[0]["summary"].get("train_length")
        note = ["Accuracy by length" + (f" (training length {T})" if T else "")
                + (", averaged over needle depths" if kind == "passkey" else "") + ".", ""]
        if kind == "mqar":
            note[0] += (" Each variant is trained from scratch on the task: the MQAR base model (attention) with "
                        "the swap " + "; ".join(f"{v} " + (f"`{by_v[v]['summary']['swap']}`" if by_v[v]["summary"]
                                                            .get("swap") else "none") for v in variants if v in by_v)
                        + ".")
        return note + head + body
    if kind == "efficiency":
        lengths = [r["length"] for r in recs[0]["rows"]]
        head = ["| variant | " + " | ".join(f"{L}: tok/s, ms/tok, KiB" for L in lengths) + " |",
                "|---|" + "---:|" * len(lengths)]
        body = [f"| {v} | " + " | ".join(f"{r['forward_tokens_per_s']:.0f}, {r['decode_ms_per_token']:.2f}, "
                                          f"{r['state_bytes'] / 1024:.0f}" for r in by_v[v]["rows"]) + " |"
                for v in variants if v in by_v]
        return ["Forward tokens/s, decode ms/token after that context, state KiB (shared machine: indicative).",
                ""] + head + body
    keys = [k for k, x in recs[0]["summary"].items() if isinstance(x, (int, float))]
    return (["| variant | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
            + [f"| {v} | " + " | ".join(_fmt(by_v[v]["summary"].get(k)) for k in keys) + " |"
               for v in variants if v in by_v])


def write_csv(records: list[dict], path: Path) -> Path:
    rows = [{"variant": r["variant"], "evaluation": r["evaluation"], "kind": r["kind"], **row}
            for r in records for row in r["rows"]]
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return path


def plots(spec: AblationSpec, records: list[dict], out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files: dict[str, Path] = {}
    by_eval = _by_eval(records)
    loss = [(n, r) for n, r in by_eval.items() if r[0]["kind"] == "loss"]
    if loss:
        fig, axes = plt.subplots(1, len(loss), figsize=(6.5 * len(loss), 4.2), squeeze=False)
        for ax, (name, recs) in zip(axes[0], loss):
            for r in recs:
                xs = [(row["position"] + row["position_end"]) / 2 for row in r["rows"]]
                ax.plot(xs, [row["loss"] for row in r["rows"]], label=r["variant"])
            T = recs[0]["summary"].get("train_length")
            if T:
                ax.axvline(T, color="gray", ls="--", lw=1, label=f"training length {T}")
            ax.set(xlabel="token position", ylabel="loss (nats/token)", title=f"{name}: loss vs position")
            ax.legend(fontsize=8)
        fig.tight_layout()
        files["loss_plot"] = out / "loss_vs_position.png"
        fig.savefig(files["loss_plot"], dpi=110)
        plt.close(fig)
    acc = [(n, r) for n, r in by_eval.items() if r[0]["kind"] in ACCURACY_KINDS]
    if acc:
        fig, axes = plt.subplots(1, len(acc), figsize=(6 * len(acc), 4.2), squeeze=False)
        for ax, (name, recs) in zip(axes[0], acc):
            for r in recs:
                series: dict[Any, dict[int, list[float]]] = {}
                for row in r["rows"]:
                    series.setdefault(row.get("d_model"), {}).setdefault(row["length"], []).append(row["accuracy"])
                for d, pts in series.items():
                    Ls = sorted(pts)
                    label = r["variant"] + (f" d={d}" if len(series) > 1 else "")
                    ax.plot(Ls, [sum(pts[L]) / len(pts[L]) for L in Ls], marker="o", label=label)
            T = recs[0]["summary"].get("train_length")
            if T:
                ax.axvline(T, color="gray", ls="--", lw=1)
            ax.set_xscale("log", base=2)
            ax.set(xlabel="sequence length", ylabel="accuracy", ylim=(-0.05, 1.05),
                   title=f"{name}: accuracy vs length")
            ax.legend(fontsize=8)
        fig.tight_layout()
        files["accuracy_plot"] = out / "accuracy_vs_length.png"
        fig.savefig(files["accuracy_plot"], dpi=110)
        plt.close(fig)
    eff = [(n, r) for n, r in by_eval.items() if r[0]["kind"] == "efficiency"]
    if eff:
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
        for _, recs in eff[:1]:
            for r in recs:
                Ls = [row["length"] for row in r["rows"]]
                axes[0].plot(Ls, [row["forward_tokens_per_s"] for row in r["rows"]], marker="o", label=r["variant"])
                axes[1].plot(Ls, [row["decode_ms_per_token"] for row in r["rows"]], marker="o", label=r["variant"])
                axes[2].plot(Ls, [row["state_bytes"] / 1024 for row in r["rows"]], marker="o", label=r["variant"])
        for ax, title in zip(axes, ("forward tokens/s", "decode ms/token", "state KiB")):
            ax.set_xscale("log", base=2)
            ax.set(xlabel="context length", title=title)
            ax.legend(fontsize=8)
        fig.tight_layout()
        files["efficiency_plot"] = out / "efficiency.png"
        fig.savefig(files["efficiency_plot"], dpi=110)
        plt.close(fig)
    return files


def write_report(spec: AblationSpec, records: list[dict], out: Path) -> dict[str, Path]:
    files = {"csv": write_csv(records, out / "results.csv")}
    try:
        files.update(plots(spec, records, out))
    except ImportError:  # matplotlib is optional (extra 'bench'): tables still get written
        pass
    md = out / "results.md"
    md.write_text(markdown(spec, records, {k: v for k, v in files.items() if k != "csv"} | {"csv": files["csv"]}))
    files["markdown"] = md
    return files
