"""Swap specs: which layers of a model become which mixer, written as one short string.

Grammar (case-insensitive keywords; clauses separated by ``;``)::

    spec     := recipe | clause (";" clause)*
    clause   := selector ":" mixer | mixer                  a bare mixer means "all: mixer"
    mixer    := NAME | NAME "(" key=literal, ... ")"       a registered mixer (zoo.list_mixers())
    recipe   := NAME | NAME "(" key=literal, ... ")"       a registered recipe (list_recipes(): longgen, masformer)
    selector := "all" | "rest"                              rest (or default) = the layers no other clause selects
              | indices                                     "0-11", "0,3,5", "-1" (negative = from the end)
              | "every" N[st|nd|rd|th] ["from" K]           "every 3rd from 1" -> 1, 4, 7, ...
              | ("first" | "middle" | "last") fraction      "middle third", "first 2/3" ("bottom"/"top" = first/last)
              | ("first" | "last") N                        "first 4"
    fraction := "half" | "third" | "quarter" | "fifth" | "sixth" | "eighth" | N "/" D

A fraction of ``L`` layers selects ``max(1, round(L * N / D))`` contiguous layers at the start, the middle
(starting at ``(L - n) // 2``) or the end: LongGen's "middle third" and MASFormer's "first sixth" are these.

Examples: ``"0-11: sliding_window(window=1024)"``, ``"every 3rd from 1: attention"``,
``"middle third: attention; rest: mamba2(d_state=64)"``, ``"longgen(window=64, num_sink_tokens=4)"``.
The dict form ``{"0-11": "sliding_window(window=1024)"}`` (selector -> mixer spec string or
``{"mixer": ..., "mixer_args": {...}}``) means the same as the string form.

Everything is checked when the spec is parsed (syntax, mixer and recipe names, argument names and types) and
when it is resolved against a model (layer ranges, overlapping clauses, sizes): a ``ValueError`` that quotes the
offending clause. :func:`swap_config` applies a spec to a :class:`~zoo.config.ZooConfig`;
``zoo.swap_layers`` applies it to a model (weights reused, derived or freshly initialised).
"""

from __future__ import annotations

import copy
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from zoo.config import (
    LayerSpec,
    ZooConfig,
    _type_name,
    _type_ok,
    mixer_parameters,
    parse_layer_selector,
    parse_mixer_spec,
)
from zoo.registry import get_mixer, list_mixers

FRACTIONS = {"half": Fraction(1, 2), "third": Fraction(1, 3), "quarter": Fraction(1, 4), "fifth": Fraction(1, 5),
             "sixth": Fraction(1, 6), "eighth": Fraction(1, 8)}
_FRACTION_NAMES = {v: k for k, v in FRACTIONS.items()}
_WHERE = {"first": "first", "bottom": "first", "middle": "middle", "last": "last", "top": "last"}

_RECIPES: dict[str, Callable[..., Any]] = {}


# ---------------------------------------------------------------------------------------------- recipes
def register_recipe(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn(n_layers, **args) -> SwapSpec | str | dict``: a named placement (e.g. LongGen) usable as a whole spec."""
    if name in _RECIPES and _RECIPES[name] is not fn:
        raise ValueError(f"swap recipe {name!r} is already registered")
    if name in list_mixers():
        raise ValueError(f"swap recipe {name!r} would shadow the mixer of that name")
    _RECIPES[name] = fn
    return fn


def list_recipes() -> list[str]:
    return sorted(_RECIPES)


# ---------------------------------------------------------------------------------------------- selectors
def ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def canonical_selector(selector: str) -> str:
    """The canonical spelling of a selector (``"bottom 1/3"`` -> ``"first third"``); ``ValueError`` if invalid."""
    s = " ".join(str(selector).lower().split())
    if s in ("all", "*"):
        return "all"
    if s in ("rest", "default"):  # "default": the config short form's word for the layers no other entry names
        return "rest"
    m = re.fullmatch(r"every (\d+)(st|nd|rd|th)?(?: from (-?\d+))?", s)
    if m:
        step, start = int(m.group(1)), int(m.group(3) or 0)
        if step < 1:
            raise ValueError(f"selector {selector!r}: the step of 'every N' must be >= 1")
        return f"every {ordinal(step)}" + (f" from {start}" if start else "")
    m = re.fullmatch(r"(first|middle|last|bottom|top) (half|third|quarter|fifth|sixth|eighth|(\d+)/(\d+)|\d+)", s)
    if m:
        where = _WHERE[m.group(1)]
        what = m.group(2)
        if what.isdigit():
            if where == "middle":
                raise ValueError(f"selector {selector!r}: 'middle' takes a fraction (e.g. 'middle third'), "
                                 "not a count")
            if int(what) < 1:
                raise ValueError(f"selector {selector!r}: the count must be >= 1")
            return f"{where} {int(what)}"
        if m.group(3) is not None:
            num, den = int(m.group(3)), int(m.group(4))
            if den == 0 or not 0 < num <= den:
                raise ValueError(f"selector {selector!r}: the fraction must be in (0, 1], like 1/3 or 2/3")
            frac = Fraction(num, den)
        else:
            frac = FRACTIONS[what]
        name = _FRACTION_NAMES.get(frac, f"{frac.numerator}/{frac.denominator}")
        return f"{where} {name}"
    parts = [p.strip() for p in s.split(",")]
    for p in parts:
        if not re.fullmatch(r"-?\d+(?:\s*-\s*-?\d+)?", p):
            raise ValueError(
                f"selector {selector!r}: {p!r} is not a layer index or range ('0-11', '0,3,5', '-1'), nor one of "
                "'all', 'rest', 'every Nth [from K]', 'first|middle|last <fraction>', 'first|last N'")
    return ",".join(re.sub(r"\s+", "", p) for p in parts)


def fraction_layers(n_layers: int, where: str, frac: Fraction) -> list[int]:
    """``max(1, round(n_layers * frac))`` contiguous layers at the start / middle / end (banker's rounding)."""
    n = min(n_layers, max(1, round(n_layers * Fraction(frac))))
    start = {"first": 0, "middle": (n_layers - n) // 2, "last": n_layers - n}[_WHERE[where]]
    return list(range(start, start + n))


def select_layers(selector: str, n_layers: int) -> list[int]:
    """The layers a selector picks in an ``n_layers`` model (``"rest"`` is resolved by :meth:`SwapSpec.resolve`)."""
    s = canonical_selector(selector)
    if s == "all":
        return list(range(n_layers))
    if s == "rest":
        raise ValueError("'rest' depends on the other clauses of a spec; resolve the whole SwapSpec")
    m = re.fullmatch(r"every (\d+)\w\w(?: from (-?\d+))?", s)
    if m:
        step, start = int(m.group(1)), int(m.group(2) or 0)
        start = start + n_layers if start < 0 else start
        if not 0 <= start < n_layers:
            raise ValueError(f"selector {selector!r}: 'from {m.group(2)}' is out of range for {n_layers} layers")
        return list(range(start, n_layers, step))
    m = re.fullmatch(r"(first|middle|last) (\S+)", s)
    if m:
        where, what = m.groups()
        if what.isdigit():
            n = int(what)
            if n > n_layers:
                raise ValueError(f"selector {selector!r} asks for {n} layers of a {n_layers}-layer model")
            return list(range(n)) if where == "first" else list(range(n_layers - n, n_layers))
        frac = FRACTIONS.get(what) or Fraction(what)
        return fraction_layers(n_layers, where, frac)
    try:
        return parse_layer_selector(s, n_layers)
    except ValueError:
        raise ValueError(f"selector {selector!r} is out of range for a {n_layers}-layer model "
                         f"(layers 0-{n_layers - 1}, negative indices count from the end)") from None


# ---------------------------------------------------------------------------------------------- specs
def _format_args(args: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in args.items())


@dataclass
class Clause:
    """``selector: mixer(args)`` with a canonical selector."""

    selector: str
    mixer: str
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def mixer_spec(self) -> str:
        return f"{self.mixer}({_format_args(self.args)})" if self.args else self.mixer

    def __str__(self) -> str:
        return f"{self.selector}: {self.mixer_spec}"


@dataclass
class SwapSpec:
    """A parsed swap spec: clauses, or one recipe (name + arguments) that expands into clauses per model size."""

    clauses: list[Clause] = field(default_factory=list)
    recipe: str | None = None
    recipe_args: dict[str, Any] = field(default_factory=dict)

    def to_string(self) -> str:
        """Canonical text; ``parse_swap_spec(s.to_string()) == s``."""
        if self.recipe is not None:
            return f"{self.recipe}({_format_args(self.recipe_args)})" if self.recipe_args else self.recipe
        return "; ".join(str(c) for c in self.clauses)

    __str__ = to_string

    def expand(self, n_layers: int) -> SwapSpec:
        """The clauses of a recipe for an ``n_layers`` model (a clause spec is returned as it is)."""
        if self.recipe is None:
            return self
        try:
            out = _RECIPES[self.recipe](n_layers, **self.recipe_args)
        except (TypeError, ValueError) as e:
            raise ValueError(f"swap recipe {self.to_string()!r}: {e}") from None
        spec = parse_swap_spec(out)
        if spec.recipe is not None:
            raise ValueError(f"swap recipe {self.recipe!r} expanded into another recipe {spec.to_string()!r}")
        return spec

    def resolve(self, n_layers: int) -> dict[int, Clause]:
        """Layer index -> the clause that swaps it. Errors name the clause (out of range, selects nothing,
        overlaps another clause)."""
        spec = self.expand(n_layers)
        out: dict[int, Clause] = {}
        rest: Clause | None = None
        for clause in spec.clauses:
            if clause.selector == "rest":
                if rest is not None:
                    raise ValueError(f"swap spec {spec.to_string()!r}: 'rest' appears twice")
                rest = clause
                continue
            try:
                layers = select_layers(clause.selector, n_layers)
            except ValueError as e:
                raise ValueError(f"swap clause {str(clause)!r}: {e}") from None
            if not layers:
                raise ValueError(f"swap clause {str(clause)!r} selects no layer of a {n_layers}-layer model")
            taken = [i for i in layers if i in out]
            if taken:
                other = out[taken[0]]
                raise ValueError(f"swap clauses {str(other)!r} and {str(clause)!r} both select layer(s) {taken}; "
                                 "each layer may be swapped once")
            out.update(dict.fromkeys(layers, clause))
        if rest is not None:
            out.update({i: rest for i in range(n_layers) if i not in out})  # may be empty: nothing is left
        return dict(sorted(out.items()))


def _parse_clause(text: str, where: str) -> Clause | tuple[str, dict[str, Any]]:
    head, sep, tail = text.partition(":")
    if sep and "(" not in head:
        selector, mixer_text = head.strip(), tail.strip()
        if not mixer_text:
            raise ValueError(f"{where}: no mixer after the selector {selector!r}")
    else:
        selector, mixer_text = None, text.strip()
        if re.fullmatch(r"[\d\s,\-]+", mixer_text):
            raise ValueError(f"{where}: {mixer_text!r} selects layers but names no mixer (write "
                             f"'{mixer_text}: <mixer>')")
    try:
        name, args = parse_mixer_spec(mixer_text)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if selector is None and name in _RECIPES:
        return name, args
    return _make_clause(selector if selector is not None else "all", name, args, where)


def _make_clause(selector: str, name: str, args: dict[str, Any], where: str) -> Clause:
    try:
        sel = canonical_selector(selector)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if name in _RECIPES:
        raise ValueError(f"{where}: {name!r} is a recipe, which is a whole spec on its own (write "
                         f"{name!r} alone, or spell its clauses out to combine it with others)")
    if name not in list_mixers():
        recipes = f"; recipes (a whole spec): {list_recipes()}" if _RECIPES else ""
        raise ValueError(f"{where}: unknown mixer {name!r}; registered mixers: {list_mixers()}{recipes}")
    params = mixer_parameters(get_mixer(name))
    for key, value in args.items():
        if key not in params:
            raise ValueError(f"{where}: mixer {name!r} has no argument {key!r}; allowed: {sorted(params)}")
        if not _type_ok(value, params[key].annotation):
            raise ValueError(f"{where}: argument {key}={value!r} of mixer {name!r} should be "
                             f"{_type_name(params[key].annotation)}")
    return Clause(sel, name, dict(args))


def _check_recipe_args(name: str, args: dict[str, Any], where: str) -> None:
    params = dict(list(inspect.signature(_RECIPES[name]).parameters.items())[1:])  # after n_layers
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    for key in args:
        if key not in params:
            raise ValueError(f"{where}: recipe {name!r} has no argument {key!r}; allowed: {sorted(params)}")


def _split_clauses(text: str) -> list[str]:
    """Split at ``;`` outside parentheses, brackets and quotes."""
    parts, depth, quote, cur = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == ";" and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur))
    return parts


def parse_swap_spec(spec: str | dict | SwapSpec) -> SwapSpec:
    """Parse (and validate) a spec string, the dict form, or pass a :class:`SwapSpec` through."""
    if isinstance(spec, SwapSpec):
        return spec
    if isinstance(spec, dict):
        if not spec:
            raise ValueError("empty swap spec {}; give at least one 'selector: mixer'")
        clauses = []
        for selector, mixer_spec in spec.items():
            where = f"swap spec entry {selector!r}: {mixer_spec!r}"
            if isinstance(mixer_spec, dict) and "mixer" not in mixer_spec:
                raise ValueError(f"{where}: a dict value needs 'mixer' (and optionally 'mixer_args')")
            if not isinstance(mixer_spec, (str, dict)):
                raise ValueError(f"{where}: the value must be a mixer spec string or a dict with 'mixer'")
            try:
                name, args = parse_mixer_spec(mixer_spec)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            clauses.append(_make_clause(str(selector), name, args, where))
        return SwapSpec(clauses)
    if not isinstance(spec, str):
        raise ValueError(f"a swap spec is a string, a dict or a SwapSpec, got {type(spec).__name__}")
    texts = _split_clauses(spec)
    if not spec.strip():
        raise ValueError("empty swap spec; write e.g. '0-11: sliding_window(window=1024)'")
    clauses = []
    for k, text in enumerate(texts):
        where = f"swap spec {spec!r}, clause {k + 1} {text.strip()!r}" if len(texts) > 1 else f"swap spec {spec!r}"
        if not text.strip():
            raise ValueError(f"{where}: empty clause (a stray ';'?)")
        parsed = _parse_clause(text, where)
        if isinstance(parsed, tuple):
            if len(texts) > 1:
                raise ValueError(f"{where}: {parsed[0]!r} is a recipe, which is a whole spec on its own (write "
                                 f"{parsed[0]!r} alone, or spell its clauses out to combine it with others)")
            _check_recipe_args(parsed[0], parsed[1], where)
            return SwapSpec(recipe=parsed[0], recipe_args=parsed[1])
        clauses.append(parsed)
    return SwapSpec(clauses)


# ---------------------------------------------------------------------------------------------- configs
def swap_config(config: ZooConfig, spec: str | dict | SwapSpec) -> tuple[ZooConfig, list[int]]:
    """``config`` with the spec's layers swapped (MLPs kept) and the swapped layer indices.

    Between mixers of one argument group (e.g. attention -> sliding window), the old layer's own arguments that
    the new mixer accepts are kept and the clause's arguments override them (so ``"all: mamba2(decay_scale=0.9)"``
    on Mamba-2 layers changes only ``decay_scale``); otherwise the layer takes the clause's arguments alone."""
    parsed = parse_swap_spec(spec)
    plan = parsed.resolve(config.n_layers)
    new = copy.deepcopy(config)
    for i, clause in plan.items():
        old = config.layers[i]
        cls = get_mixer(clause.mixer)
        args = {}
        if set(get_mixer(old.mixer).arg_groups) & set(cls.arg_groups):
            params = mixer_parameters(cls)
            args = {k: copy.deepcopy(v) for k, v in old.mixer_args.items() if k in params}
        args.update(copy.deepcopy(clause.args))
        new.layers[i] = LayerSpec(clause.mixer, args, copy.deepcopy(old.mlp))
    for i, clause in plan.items():  # errors name the clause, not just the layer
        try:
            cls = get_mixer(clause.mixer)
            cls.check_args(new.d_model, new.mixer_kwargs(i))
        except (ValueError, TypeError) as e:
            raise ValueError(f"swap clause {str(clause)!r} on layer {i}: {e}") from None
    new.validate()
    return new, list(plan)


def describe(spec: str | dict | SwapSpec, config: ZooConfig) -> list[str]:
    """One line per layer: ``"  3: attention -> sliding_window(window=64)"`` (unchanged layers say so)."""
    new, changed = swap_config(config, spec)
    return [f"{i:3d}: {old.spec_string}" + (f" -> {nl.spec_string}" if i in changed else "")
            for i, (old, nl) in enumerate(zip(config.layers, new.layers))]
