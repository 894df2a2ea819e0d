"""Model cards: YAML metadata (``huggingface_hub.ModelCardData``) and a Markdown body rendered from the templates
that ship as package data in ``zoo/models/cards/``.

The body is the frame ``base.md`` (title, the family's text, architecture with the layer table, usage, source and
conversion, evaluation, citations) into which the family's own template (``Family.model_card`` ->
``cards/<name>.md``, else ``default.md``) is rendered as ``intro``. A family template that starts with ``---`` is
taken as a whole card template instead (the older layout), rendered with the same variables.

Citations are data: every mixer class declares ``citations`` (BibTeX) and every family ``Family.citations``; the
card lists those of the family and of each mixer the model uses, once each.

Evaluation results (``results=`` here, ``zoo publish --results PATH``) are read by :func:`load_results`:

* a ``zoo bench`` report (``<stem>.json``, ``"schema": "zoo-bench/1"``): its cases for this model's mixers;
* a simple table, until ``zoo ablate`` settles its own format: a JSON object
  ``{"title": str, "description": str, "columns": [str, ...], "rows": [{column: value, ...}, ...]}``
  (``title``, ``description`` and ``columns`` optional; columns default to the keys of the rows in first-seen
  order), a JSON list of row objects, or JSON Lines with one row object per line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from zoo.config import CONTEXT_FIELDS
from zoo.registry import get_family, get_mixer, list_families
from zoo.version import __version__

CARD_TEMPLATES = Path(__file__).resolve().parent / "models" / "cards"
FRAME = "base.md"


def card_template(family: str | None) -> Path:
    """The family's Markdown template (``Family.model_card``, package data in ``zoo/models/cards/``), or the default
    one for zoo-native models and families without their own."""
    name = "default"
    if family and family in list_families():
        name = get_family(family).model_card
    template = CARD_TEMPLATES / f"{name}.md"
    if not template.is_file():
        raise FileNotFoundError(f"model-card template {template} is missing (family {family!r}); it ships with the "
                                "package as zoo/models/cards/*.md")
    return template


# ---------------------------------------------------------------------------------------------- results
def _cell(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_cell(x) for x in v)
    if isinstance(v, dict):
        v = json.dumps(v, sort_keys=True)
    return str(v).replace("|", "\\|").replace("\n", " ")


def _table(title: str, rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None,
           description: str = "") -> dict[str, Any]:
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    return {"title": title, "description": description, "columns": list(columns),
            "rows": [[_cell(r.get(c)) for c in columns] for r in rows]}


def _bench_table(report: dict[str, Any], mixers: Iterable[str], name: str) -> dict[str, Any]:
    mixers = set(mixers)
    rows = []
    for case in report.get("cases", []):
        if case.get("subject") not in mixers:
            continue
        ref_name = case.get("reference")
        zoo_t = case.get("impls", {}).get("zoo", {}).get("time_s", {}).get("median")
        ref_t = case.get("impls", {}).get(ref_name or "", {}).get("time_s", {}).get("median")
        rows.append({"mixer": case["subject"], "phase": case.get("phase"), "T": case.get("T"),
                     "dtype": case.get("dtype"), "device": case.get("device"),
                     "zoo ms": None if zoo_t is None else zoo_t * 1e3, "reference": ref_name,
                     "reference ms": None if ref_t is None else ref_t * 1e3, "speedup": case.get("speedup"),
                     "status": case.get("status")})
    if not rows:
        subjects = sorted({c.get("subject") for c in report.get("cases", [])})
        raise ValueError(f"{name}: the bench report has no case for this model's mixers {sorted(mixers)} "
                         f"(its subjects: {subjects})")
    m = report.get("machine", {})
    load = m.get("load_average_start")
    desc = (f"`zoo bench` ({report.get('mode')}, {report.get('created')}) on {m.get('gpu_name') or m.get('cpu_model')}"
            + (f", load average {'/'.join(f'{x:.1f}' for x in load)} at the start" if load else "")
            + ". Times: median of one call (decode: one token at context T); speedup = reference / zoo.")
    return _table(f"Speed: {name}", rows, description=desc)


def load_results(path: str | os.PathLike, *, mixers: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Tables (``{"title", "description", "columns", "rows"}``) from a results file: a ``zoo bench`` report (only
    the cases of ``mixers``), or the simple table format described in this module's docstring."""
    path = Path(path)
    text = path.read_text()
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: neither JSON nor JSON Lines ({e})") from None
    if isinstance(data, dict) and str(data.get("schema", "")).startswith("zoo-bench/"):
        return [_bench_table(data, mixers, path.name)]
    if isinstance(data, dict) and isinstance(data.get("rows"), list):
        rows, title = data["rows"], data.get("title") or path.stem
        columns, description = data.get("columns"), data.get("description", "")
    elif isinstance(data, list):
        rows, title, columns, description = data, path.stem, None, ""
    else:
        rows = None
    if rows is None or not rows or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: expected a zoo bench report, or a results table: a JSON object with 'rows' (a "
                         "list of objects, one per row; optional 'title', 'description', 'columns'), a JSON list of "
                         "row objects, or JSON Lines with one row object per line")
    return [_table(title, rows, columns, description)]


# ---------------------------------------------------------------------------------------------- the card
def citations(config: Any) -> list[str]:
    """BibTeX entries of the family and of every mixer of ``config`` (in layer order), each once."""
    out: list[str] = []
    if config.family and config.family in list_families():
        out += list(get_family(config.family).citations)
    for ls in config.layers:
        out += list(getattr(get_mixer(ls.mixer), "citations", ()))
    return list(dict.fromkeys(c.strip() for c in out))


def _args(config: Any, i: int) -> str:
    kwargs = {k: v for k, v in config.mixer_kwargs(i).items() if k not in CONTEXT_FIELDS}
    return ", ".join(f"{k}={v!r}" for k, v in sorted(kwargs.items())).replace("|", "\\|") or "–"


def _source_lines(source: Any, export_format: str | None) -> list[str]:
    lines = []
    if source is None:
        lines.append("Built with `zoo.create_model` (no source checkpoint).")
    else:
        where = (f"[`{source.hub_id}`](https://huggingface.co/{source.hub_id})" if source.hub_id
                 else "a local checkpoint")
        rev = f" at revision `{source.revision}`" if source.revision else ""
        if source.format == "zoo":
            lines.append(f"Loaded from the zoo checkpoint {where}{rev}.")
        else:
            lines.append(f"Converted from the `{source.format}`-format checkpoint {where}{rev} by `zoo.from_pretrained`"
                         " (the family's key table and config map; strict: every tensor used, every parameter filled).")
        if source.swap:
            spec = ", ".join(f'"{k}": "{v}"' for k, v in source.swap.items())
            lines.append(f"Then `zoo.swap_layers(model, {{{spec}}})`: parameters whose names and shapes match are "
                         "reused; those of new mixers without a counterpart are freshly initialised (fine-tune "
                         "before use).")
    if export_format:
        lines.append(f"Written in the `{export_format}` reference format (`zoo convert --to {export_format}`).")
    return lines


def render_model_card(model: nn.Module, *, license: str = "apache-2.0", tags: Sequence[str] = (),
                      base_model: str | list[str] | None = None, datasets: Sequence[str] | None = None,
                      results: Sequence[str | os.PathLike] | str | os.PathLike | None = None,
                      export_format: str | None = None, repo_id: str | None = None, source: Any = None,
                      **metadata: Any):
    """The ``README.md`` card of ``model``: YAML metadata (``library_name``, ``pipeline_tag``, ``license``,
    ``tags`` with every mixer, ``base_model`` when converted or swapped, ``datasets``) + the Markdown body.
    ``results``: result files for the evaluation section (:func:`load_results`). ``source``: a
    ``CheckpointSource`` (default ``model.source``, set by ``zoo.from_pretrained``). Extra keyword arguments go
    into the metadata as they are (e.g. ``language``)."""
    import jinja2
    from huggingface_hub import ModelCard, ModelCardData

    from zoo.models.lm import state_bytes_per_token

    config = model.config
    family = config.family or "zoo"
    source = source if source is not None else getattr(model, "source", None)
    mixers = sorted({ls.mixer for ls in config.layers})
    if base_model is None and source is not None and source.hub_id and (source.format != "zoo" or source.swap):
        base_model = source.hub_id
    data = ModelCardData(
        library_name="zoo", pipeline_tag="text-generation", license=license,
        tags=list(dict.fromkeys(["zoo", "long-context", *mixers, *([family] if config.family else []), *tags])),
        base_model=base_model, datasets=list(datasets) if datasets else None, **metadata,
    )
    per_token = state_bytes_per_token(config)
    layers = [{"index": i, "mixer": ls.spec_string, "mlp": ls.mlp["intermediate_size"] if ls.mlp else "-",
               "args": _args(config, i), "state_bytes": f"{b:,.0f}"}
              for i, (ls, b) in enumerate(zip(config.layers, per_token))]
    if results is not None and isinstance(results, (str, os.PathLike)):
        results = [results]
    tables = [t for r in (results or []) for t in load_results(r, mixers=mixers)]
    n_params = model.num_parameters() if hasattr(model, "num_parameters") else sum(
        p.numel() for p in model.parameters())
    variables = dict(
        model_name=config.name or (repo_id.split("/")[-1] if repo_id else family), family=family,
        repo_id=repo_id or "<this repo>", n_params=f"{n_params:,}", d_model=config.d_model,
        n_layers=config.n_layers, vocab_size=config.vocab_size, tied=config.tie_embeddings, layers=layers,
        mixers=mixers, state_bytes_total=f"{sum(per_token):,.0f}", zoo_version=__version__,
        export_format=export_format, source_lines=_source_lines(source, export_format), evaluation=tables,
        citations=citations(config),
    )
    own = card_template(config.family).read_text()
    if own.startswith("---"):  # a whole card template (the older layout)
        template = own
    else:
        variables["intro"] = jinja2.Template(own).render(**variables).strip()
        template = (CARD_TEMPLATES / FRAME).read_text()
    return ModelCard.from_template(data, template_str=template, **variables)
