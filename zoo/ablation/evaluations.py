"""The evaluations an ablation runs, by name: ``loss``, ``passkey``, ``mqar``, ``efficiency``.

Each is ``fn(ctx: EvalContext, **params) -> {"rows": [...], "summary": {...}}``; register more with
:func:`register_evaluation`. ``ctx.model()`` builds the variant's model lazily (so an evaluation that trains its
own models, like MQAR, never triggers the variant's fine-tuning). Every summary reports the in-distribution score
(at the training length) next to the extrapolated one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from zoo.ablation.spec import AblationSpec, Variant

_EVALUATIONS: dict[str, Callable[..., dict]] = {}


def register_evaluation(name: str) -> Callable[[Callable[..., dict]], Callable[..., dict]]:
    def wrap(fn: Callable[..., dict]) -> Callable[..., dict]:
        _EVALUATIONS[name] = fn
        return fn

    return wrap


def get_evaluation(name: str) -> Callable[..., dict]:
    try:
        return _EVALUATIONS[name]
    except KeyError:
        raise ValueError(f"unknown evaluation {name!r}; available: {list_evaluations()}") from None


def list_evaluations() -> list[str]:
    return sorted(_EVALUATIONS)


@dataclass
class EvalContext:
    spec: AblationSpec
    variant: Variant
    model: Callable[[], Any]  # the variant's model (built, swapped, fine-tuned on first call)
    tokenizer: Any
    train_length: int | None
    corpus: Callable[[str], Any]  # split -> list of token documents
    progress: bool = True
    extras: dict[str, Any] = field(default_factory=dict)


def _params(cls: type, params: dict[str, Any], where: str) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    bad = sorted(set(params) - names)
    if bad:
        raise ValueError(f"{where}: unknown parameter(s) {bad}; allowed: {sorted(names)}")
    return params


def _lengths(ctx: EvalContext, lengths: list[int] | None, factors: tuple[int, ...]) -> list[int]:
    if lengths:
        return [int(x) for x in lengths]
    if ctx.train_length is None:
        raise ValueError("give 'lengths' (the spec has no train_length and the base model records none)")
    return [ctx.train_length * f for f in factors]


def passkey_task(task: dict[str, Any] | str | None, tokenizer: Any):
    from zoo.eval.passkey import SyntheticPasskey, TextPasskey

    task = {"kind": task} if isinstance(task, str) else dict(task or {"kind": "text"})
    kind = task.pop("kind", "text")
    if kind == "text":
        return TextPasskey(tokenizer, **task)
    if kind == "synthetic":
        return SyntheticPasskey(**task)
    raise ValueError(f"passkey task kind {kind!r} is not one of ['text', 'synthetic']")


@register_evaluation("loss")
def eval_loss(ctx: EvalContext, *, length: int | None = None, windows: int = 8, bucket: int | None = None,
              batch_size: int = 2, corpus: str | None = None, filler: dict | str | None = None) -> dict:
    """Loss by position, ``length`` tokens (default 4x the training length), on held-out text of the spec's
    corpus (or ``corpus``), or on the filler of a passkey task (``filler``: a task like the passkey evaluation's
    ``task``; for models trained on a synthetic vocabulary)."""
    import torch

    from zoo.eval.corpus import pack_documents
    from zoo.eval.loss import eval_windows, loss_by_position

    L = length or _lengths(ctx, None, (4,))[0]
    if filler is not None:
        task = passkey_task(filler, ctx.tokenizer)
        g = torch.Generator().manual_seed(ctx.spec.seed)
        win = torch.stack([task.filler(L, g) for _ in range(windows)])
    else:
        docs = ctx.corpus("heldout") if corpus is None else ctx.extras["load_docs"](corpus, "heldout")
        win = eval_windows(docs, L, windows, pack_documents(docs)[0])
    res = loss_by_position(ctx.model(), win, train_length=ctx.train_length, bucket=bucket, batch_size=batch_size,
                           progress=ctx.progress)
    return {"rows": res.rows, "summary": res.summary}


@register_evaluation("passkey")
def eval_passkey(ctx: EvalContext, *, lengths: list[int] | None = None,
                 depths: list[float] = (0.1, 0.3, 0.5, 0.7, 0.9), samples: int = 4, batch_size: int = 8,
                 task: dict | str | None = None) -> dict:
    """Passkey retrieval at ``lengths`` (default 1x, 2x, 4x the training length) x ``depths``."""
    from zoo.eval.passkey import evaluate_passkey

    res = evaluate_passkey(ctx.model(), passkey_task(task, ctx.tokenizer), lengths=_lengths(ctx, lengths, (1, 2, 4)),
                           depths=list(depths), samples=samples, train_length=ctx.train_length,
                           seed=ctx.spec.seed, batch_size=batch_size, progress=ctx.progress)
    return {"rows": res.rows, "summary": res.summary}


@register_evaluation("mqar")
def eval_mqar(ctx: EvalContext, *, swaps: dict[str, str | None] | None = None, **params: Any) -> dict:
    """MQAR trained from scratch with the variant's swap spec on the MQAR base model (``MQARSetup`` fields).
    ``swaps``: variant name -> the swap spec to use here instead of the variant's own (the MQAR base is smaller
    than the ablation's base, so sizes such as windows or head counts may need scaling; ``None`` = the MQAR base
    as it is)."""
    from zoo.eval.mqar import MQARSetup, run_mqar

    names = {v.name for v in ctx.spec.variants}
    bad = sorted(set(swaps or {}) - names)
    if bad:
        raise ValueError(f"mqar: swaps names unknown variant(s) {bad}; variants: {sorted(names)}")
    swap = (swaps or {}).get(ctx.variant.name, ctx.variant.swap)
    setup = MQARSetup(**{"seed": ctx.spec.seed, **_params(MQARSetup, params, "mqar")})
    out = run_mqar({ctx.variant.name: swap}, setup, progress=ctx.progress)
    out["summary"]["swap"] = swap  # the architecture trained here, for the report
    return out


@register_evaluation("efficiency")
def eval_efficiency(ctx: EvalContext, *, lengths: list[int] | None = None, decode_tokens: int = 16,
                    repeats: int = 3, batch_size: int = 1) -> dict:
    """Forward tokens/s, decode ms/token and state bytes at ``lengths`` (default 1x, 4x, 16x training length)."""
    from zoo.eval.efficiency import measure_efficiency

    return measure_efficiency(ctx.model(), _lengths(ctx, lengths, (1, 4, 16)), batch_size=batch_size,
                              decode_tokens=decode_tokens, repeats=repeats, seed=ctx.spec.seed,
                              progress=ctx.progress)
