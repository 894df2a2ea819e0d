"""The mixer contract checker: ``check_mixer(spec)`` raises ``AssertionError`` naming the first broken property.

Usable on any registered mixer, in this package or outside it (a ``zoo.Mixer`` subclass with keyword-only
constructor arguments, registered with ``@zoo.register_mixer``)::

    from zoo.testing import check_mixer
    check_mixer("sliding_window(window=8, num_sink_tokens=2)")

It builds the mixer at ``d_model=32`` (in float64, so that the modes must agree to rounding, ``atol=1e-9``
relative to the output scale) with positions computed exactly as the model computes them, and checks:

* ``three_modes``: parallel == chunked prefill (chunk sizes 1 and ones crossing the mixer's declared
  ``boundaries``) == token-by-token decode;
* ``backward``: gradients through a chunked prefill equal the parallel ones (input and every parameter);
* ``left_padding``: a left-padded row gives the unpadded row's outputs, in every mode, also for the tokens
  that follow (which read the state); the padded tokens' values do not matter;
* ``padding_step``: a call in which a row is all padding leaves that row's state unchanged;
* ``packing``: where the mixer supports packing (``packing_supported(args)``, by default ``supports_packing``),
  packed documents (``seq_idx``) equal the documents run alone; otherwise ``seq_idx`` is refused (``ValueError``);
* ``reorder``: ``State.reorder`` selects batch rows;
* ``nbytes``: ``State.nbytes`` is constant in the tokens absorbed or grows linearly (``state_growth``);
* ``decode_no_sync``: the one-token step (``state`` given, no mask, no grad) makes no host synchronisation
  (``.item()``, ``.tolist()``, ``bool()``/``int()`` of a tensor, ``.nonzero()``);
* ``save_reload``: a model with the mixer saves and reloads with identical logits;
* ``swap``: ``zoo.swap_layers`` from attention to the mixer reuses every weight whose name and shape match;
* ``dtypes``: finite outputs and gradients in fp32 and in each low-precision dtype the mixer declares.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor

from zoo.config import LayerSpec, ZooConfig, parse_mixer_spec
from zoo.layers.base import Mixer, document_positions
from zoo.models.lm import ZooForCausalLM, init_weights, swap_layers, token_positions
from zoo.registry import get_mixer

PROPERTIES = ("three_modes", "backward", "left_padding", "padding_step", "packing", "reorder", "nbytes",
              "decode_no_sync", "save_reload", "swap", "dtypes")
# the arguments a contract model gives each argument group (only groups the mixer reads are used)
GROUP_DEFAULTS = {"attention": {"num_heads": 4, "num_kv_heads": 2}}


@dataclass
class ContractReport:
    spec: str
    seq_len: int
    schedules: dict[str, list[int]]
    passed: list[str] = field(default_factory=list)


class _Checker:
    def __init__(self, spec: str | dict, d_model: int, mixer_defaults: dict | None, seq_len: int | None,
                 atol: float, seed: int) -> None:
        name, args = parse_mixer_spec(spec)
        self.cls: type[Mixer] = get_mixer(name)
        defaults = mixer_defaults if mixer_defaults is not None else {
            g: a for g, a in GROUP_DEFAULTS.items() if g in self.cls.arg_groups}
        self.config = ZooConfig(vocab_size=64, d_model=d_model, n_layers=1, layers=[LayerSpec(name, args, None)],
                                mixer_defaults=defaults, max_position_embeddings=4096)
        self.spec = self.config.layers[0].spec_string
        self.kwargs = self.config.mixer_kwargs(0)
        self.d_model, self.atol, self.seed = d_model, atol, seed
        periods = self.cls.boundaries(self.kwargs) or [4]
        self.T = seq_len or max(24, 3 * max(periods) + 2)
        self.schedules = self._schedules(periods)
        self.gen = torch.Generator().manual_seed(seed)

    # ------------------------------------------------------------------ helpers
    def _schedules(self, periods: list[int]) -> dict[str, list[int]]:
        def fill(pattern: list[int]) -> list[int]:
            pattern = [n for n in pattern if n > 0]
            return _cut(pattern * self.T, self.T)

        schedules = {"token": [1] * self.T, "mixed": fill([3, 1, 7, 2, 1, 5])}
        for p in periods:
            schedules[f"around {p}"] = fill([p - 1, 1, p + 1])
            schedules[f"over {p}"] = fill([2 * p + 1, 1])
        return schedules

    def mixer(self, dtype: torch.dtype = torch.float64) -> Mixer:
        torch.manual_seed(self.seed)
        m = self.cls(self.d_model, 0, **self.kwargs)
        m.apply(partial(init_weights, std=self.config.initializer_range))
        with torch.no_grad():  # off the init's zeros and ones, so a dropped bias or norm cannot pass unnoticed
            for p in m.parameters():
                if p.is_floating_point():
                    p.add_(0.02 * torch.randn(p.shape, generator=self.gen, dtype=p.dtype))
        return m.to(dtype)

    def randn(self, *shape: int, dtype: torch.dtype = torch.float64) -> Tensor:
        return torch.randn(*shape, generator=self.gen, dtype=torch.float64).to(dtype)

    def close(self, what: str, got: Tensor, want: Tensor, atol: float | None = None) -> None:
        atol = self.atol if atol is None else atol
        if got.shape != want.shape:
            raise AssertionError(f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}")
        diff = (got.double() - want.double()).abs()
        scale = max(1.0, want.double().abs().max().item()) if want.numel() else 1.0
        if not bool(torch.isfinite(got).all()):
            raise AssertionError(f"{what}: non-finite values")
        if diff.numel() and diff.max().item() > atol * scale:
            idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
            raise AssertionError(f"{what}: max |difference| {diff.max().item():.3g} at index {idx} "
                                 f"(allowed {atol * scale:.3g})")

    def run(self, m: Mixer, x: Tensor, schedule: list[int], mask: Tensor | None = None,
            state: Any = None, start: Tensor | None = None) -> tuple[Tensor, Any, Tensor]:
        """:func:`run_chunks`, plus each row's next position."""
        y, state = run_chunks(m, x, schedule, attention_mask=mask, state=state, start=start)
        start = torch.zeros(x.shape[0], dtype=torch.long) if start is None else start
        return y, state, start + (x.shape[1] if mask is None else mask.long().sum(1))

    # ------------------------------------------------------------------ properties
    def three_modes(self) -> None:
        m = self.mixer()
        x = self.randn(2, self.T, self.d_model)
        with torch.no_grad():
            y, st = m(x, positions=token_positions(2, self.T))
            if st is not None:
                raise AssertionError("the parallel form (state=None) must return (y, None)")
            for name, schedule in self.schedules.items():
                y_s, _, _ = self.run(m, x, schedule)
                self.close(f"chunked prefill, chunks {name} {schedule[:8]}... vs parallel", y_s, y)

    def backward(self) -> None:
        m = self.mixer()
        x = self.randn(2, self.T, self.d_model).requires_grad_()
        w = self.randn(2, self.T, self.d_model)
        grads = []
        for run in (lambda: m(x, positions=token_positions(2, self.T))[0],
                    lambda: self.run(m, x, self.schedules["mixed"])[0]):
            m.zero_grad(set_to_none=True)
            x.grad = None
            (run() * w).sum().backward()
            grads.append({"input": x.grad.clone(), **{n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                                                        for n, p in m.named_parameters()}})
        for name, g in grads[1].items():
            self.close(f"gradient of {name}, chunked prefill vs parallel", g, grads[0][name])

    def left_padding(self) -> None:
        m = self.mixer()
        pad, T = 5, self.T
        real = self.randn(2, T, self.d_model)
        junk = 100 * self.randn(1, pad, self.d_model)  # large: a leak cannot hide in rounding
        x = torch.cat([torch.cat([junk, real[:1]], 1), torch.cat([self.randn(1, pad, self.d_model), real[1:]], 1)])
        mask = torch.ones(2, pad + T, dtype=torch.bool)
        mask[0, :pad] = False
        with torch.no_grad():
            alone = [m(real[i:i + 1], positions=token_positions(1, T))[0] for i in range(2)]
            y, _ = m(x, positions=token_positions(2, pad + T, mask), attention_mask=mask)
            self.close("parallel: padded row vs the row alone", y[:1, pad:], alone[0])
            self.close("parallel: unpadded row beside a padded one vs alone", y[1:, pad:], m(
                x[1:], positions=token_positions(1, pad + T))[0][:, pad:])
            for name in ("token", "mixed"):
                schedule = [pad + 2] + [1] * 3 + self.schedules[name]
                schedule = _cut(schedule, pad + T)
                y_s, _, _ = self.run(m, x, schedule, mask)
                self.close(f"chunked ({name}): padded row vs the row alone", y_s[:1, pad:], alone[0])

    def padding_step(self) -> None:
        m = self.mixer()
        T = self.T
        x = self.randn(2, T, self.d_model)
        cut = T // 2
        with torch.no_grad():
            ref, _, _ = self.run(m, x, [cut] + [1] * (T - cut))
            for n_pad in (1, 3):
                st = m.init_state(2, dtype=x.dtype, device=x.device, max_length=T + n_pad)
                y1, st, start = self.run(m, x[:, :cut], [cut], state=st)
                # row 0 gets n_pad all-padding tokens (junk values); row 1 gets real tokens
                step = torch.cat([1000 * self.randn(1, n_pad, self.d_model), self.randn(1, n_pad, self.d_model)])
                step_mask = torch.tensor([[False] * n_pad, [True] * n_pad])
                _, st, start = self.run(m, step, [n_pad], step_mask, state=st, start=start)
                y2, _, _ = self.run(m, x[:1, cut:], [1] * (T - cut), state=_select(st, [0]), start=start[:1])
                self.close(f"row 0 after an all-padding call of {n_pad} token(s) vs without it", y2,
                           ref[:1, cut:])

    def packing(self) -> None:
        m = self.mixer()
        p = max(self.cls.boundaries(self.kwargs) or [4])
        lengths = [p + 1, 2, 1, p - 1 if p > 1 else 1, self.T]
        docs = [self.randn(1, n, self.d_model) for n in lengths]
        x = torch.cat(docs, 1)
        seq_idx = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], 1)
        with torch.no_grad():
            if not self.cls.packing_supported(self.kwargs):
                try:
                    m(x, positions=document_positions(seq_idx), seq_idx=seq_idx)
                except ValueError:
                    return
                raise AssertionError("packing is not supported for these arguments (packing_supported), but "
                                     "seq_idx was accepted instead of refused with ValueError")
            y, _ = m(x, positions=document_positions(seq_idx), seq_idx=seq_idx)
            ref = torch.cat([m(d, positions=token_positions(1, d.shape[1]))[0] for d in docs], 1)
            self.close("packed documents vs each document alone", y, ref)

    def reorder(self) -> None:
        m = self.mixer()
        T = self.T
        x = self.randn(3, T + 4, self.d_model)
        rows = [2, 0]
        with torch.no_grad():
            _, st, start = self.run(m, x[:, :T], [T // 2, T - T // 2])
            st.reorder(torch.tensor(rows))
            y, _, _ = self.run(m, x[rows, T:], [1] * 4, state=st, start=start[rows])
            ref, _, _ = self.run(m, x[rows], [T // 2, T - T // 2] + [1] * 4)
            self.close("State.reorder([2, 0]) then decoding vs the rows run alone", y, ref[:, T:])

    def nbytes(self) -> None:
        m = self.mixer(torch.float32)
        n = self.T
        sizes = []
        with torch.no_grad():
            for k in (1, 2, 3):
                x = self.randn(1, k * n, self.d_model, dtype=torch.float32)
                _, st, _ = self.run(m, x, [k * n])
                sizes.append(st.nbytes)
        growth = self.cls.state_growth
        if growth == "constant":
            if len(set(sizes)) != 1:
                raise AssertionError(f"state_growth='constant' but nbytes after {n}, {2 * n}, {3 * n} tokens: {sizes}")
        elif growth == "linear":
            d1, d2 = sizes[1] - sizes[0], sizes[2] - sizes[1]
            if not (d1 > 0 and d2 > 0 and 0.5 <= d2 / d1 <= 2):
                raise AssertionError(f"state_growth='linear' but nbytes after {n}, {2 * n}, {3 * n} tokens: {sizes}")
        else:
            raise AssertionError(f"state_growth must be 'constant' or 'linear', got {growth!r}")

    def decode_no_sync(self) -> None:
        m = self.mixer(torch.float32)
        x = self.randn(2, self.T + 3, self.d_model, dtype=torch.float32)
        with torch.no_grad():
            _, st, start = self.run(m, x[:, :self.T], [self.T])
            for t in range(self.T, self.T + 3):
                pos = start[:, None]
                with no_host_sync():
                    _, st = m(x[:, t:t + 1], positions=pos, state=st)
                start = start + 1

    def save_reload(self) -> None:
        config = self.model_config(n_layers=2)
        torch.manual_seed(self.seed)
        model = ZooForCausalLM(config).eval()
        ids = torch.randint(0, config.vocab_size, (2, self.T), generator=self.gen)
        from zoo.hub import from_pretrained

        with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
            model.save_pretrained(tmp)
            back = from_pretrained(tmp)
            if not torch.equal(back(ids).logits, model(ids).logits):
                raise AssertionError("reloaded model's logits differ from the saved model's")

    def swap(self) -> None:
        base = self.model_config(n_layers=2, mixer="attention")
        torch.manual_seed(self.seed)
        model = ZooForCausalLM(base).eval()
        old = [blk.mixer.state_dict() for blk in model.layers]
        swap_layers(model, {"0,1": {"mixer": self.config.layers[0].mixer,
                                    "mixer_args": self.config.layers[0].mixer_args}})
        for i, blk in enumerate(model.layers):
            for key, value in blk.mixer.state_dict().items():
                prev = old[i].get(key)
                if prev is not None and prev.shape == value.shape and not torch.equal(prev, value):
                    raise AssertionError(f"swap_layers did not reuse layer {i}'s {key!r} (same name and shape)")
        with torch.no_grad():
            out = model(torch.randint(0, base.vocab_size, (1, self.T), generator=self.gen)).logits
        if not bool(torch.isfinite(out).all()):
            raise AssertionError("the swapped model gives non-finite logits")

    def dtypes(self) -> None:
        for name in ("float32", *self.cls.dtypes):
            dtype = getattr(torch, name)
            m = self.mixer(dtype)
            x = self.randn(2, self.T, self.d_model, dtype=dtype).requires_grad_()
            for label in ("parallel", "chunked"):
                if label == "parallel":
                    y = m(x, positions=token_positions(2, self.T))[0]
                else:
                    y = self.run(m, x, self.schedules["mixed"])[0]
                y.float().square().mean().backward()
                bad = [n for n, p in m.named_parameters() if p.grad is not None and not bool(p.grad.isfinite().all())]
                if not bool(y.isfinite().all()) or not bool(x.grad.isfinite().all()) or bad:
                    raise AssertionError(f"{name} {label}: non-finite outputs or gradients {bad}")
                m.zero_grad(set_to_none=True)
                x.grad = None

    def model_config(self, n_layers: int, mixer: str | None = None) -> ZooConfig:
        layer = self.config.layers[0]
        spec = LayerSpec(mixer or layer.mixer, {} if mixer else layer.mixer_args, {"intermediate_size": 64})
        groups = set(self.cls.arg_groups) | ({"attention"} if mixer == "attention" else set())
        defaults = {**{g: a for g, a in GROUP_DEFAULTS.items() if g in groups}, **self.config.mixer_defaults}
        return ZooConfig(vocab_size=64, d_model=self.d_model, n_layers=n_layers, layers=[spec] * n_layers,
                         mixer_defaults=defaults, max_position_embeddings=4096)


def run_chunks(mixer: Mixer | ZooForCausalLM, x: Tensor, sizes: list[int], *, attention_mask: Tensor | None = None,
               state: Any = None, start: Tensor | None = None) -> tuple[Tensor, Any]:
    """Feed ``x [B, T, D]`` through ``mixer`` in chunks of ``sizes`` tokens, continuing ``state`` (a new one, sized
    for ``T``, if None), with the positions the model would compute (``start [B]``: each row's next position).
    Returns the concatenated outputs and the final state.

    Also runs a whole model: with a :class:`ZooForCausalLM`, ``x`` is ``input_ids [B, T]``, ``state`` its
    ``ModelState`` (the model computes positions itself; ``start`` is unused) and the outputs are the logits."""
    B, T = x.shape[:2]
    if sum(sizes) != T:
        raise ValueError(f"chunk sizes {sizes} sum to {sum(sizes)}, not T={T}")
    is_model = isinstance(mixer, ZooForCausalLM)
    if state is None:
        state = mixer.init_states(B, max_length=T) if is_model else \
            mixer.init_state(B, dtype=x.dtype, device=x.device, max_length=T)
    start = torch.zeros(B, dtype=torch.long, device=x.device) if start is None else start
    ys, t = [], 0
    for n in sizes:
        mask = None if attention_mask is None else attention_mask[:, t:t + n].bool()
        mask = None if mask is not None and bool(mask.all()) else mask
        if is_model:
            ys.append(mixer(x[:, t:t + n], attention_mask=mask, states=state).logits)
        else:
            y, state = mixer(x[:, t:t + n], positions=token_positions(B, n, mask, start=start), state=state,
                             attention_mask=mask)
            ys.append(y)
        start = start + (n if mask is None else mask.long().sum(1))
        t += n
    return torch.cat(ys, 1), state


def _cut(schedule: list[int], total: int) -> list[int]:
    out, t = [], 0
    for n in schedule:
        n = min(n, total - t)
        if n <= 0:
            break
        out.append(n)
        t += n
    if t < total:
        out.append(total - t)
    return out


def _select(state: Any, rows: list[int]) -> Any:
    st = copy.copy(state)
    st.reorder(torch.tensor(rows))
    return st


@contextlib.contextmanager
def no_host_sync() -> Iterator[None]:
    """Within the block, any host synchronisation on a tensor (``.item()``, ``.tolist()``, ``bool()``, ``int()``,
    ``float()``, ``.nonzero()``) raises ``AssertionError``: catches per-token syncs on the CPU too."""
    names = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__", "nonzero")
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def refuse(name: str) -> Callable[..., Any]:
        def method(self: Tensor, *args: Any, **kwargs: Any) -> Any:
            raise AssertionError(f"host synchronisation: Tensor.{name}() in the decode step")
        return method

    try:
        for n in names:
            setattr(torch.Tensor, n, refuse(n))
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.Tensor, n, fn)


def check_mixer(spec: str | dict, *, d_model: int = 32, mixer_defaults: dict | None = None,
                seq_len: int | None = None, atol: float = 1e-9, seed: int = 0,
                properties: tuple[str, ...] | list[str] | None = None) -> ContractReport:
    """Check the mixer contract for ``spec`` (``"name(arg=value, ...)"`` or ``{"mixer": ..., "mixer_args": ...}``).

    Raises ``AssertionError("check_mixer(<spec>): <property>: <what broke>")`` at the first broken property.
    ``properties`` selects a subset of :data:`PROPERTIES`; ``mixer_defaults`` overrides the argument-group
    defaults (4 heads, 2 KV heads for attention-like mixers); ``seq_len`` defaults to ``max(24, 3 * the largest
    boundary + 2)``. Returns a report of what was checked."""
    checker = _Checker(spec, d_model, mixer_defaults, seq_len, atol, seed)
    selected = list(properties) if properties is not None else list(PROPERTIES)
    unknown = sorted(set(selected) - set(PROPERTIES))
    if unknown:
        raise ValueError(f"unknown contract properties {unknown}; known: {list(PROPERTIES)}")
    report = ContractReport(checker.spec, checker.T, checker.schedules)
    for prop in selected:
        try:
            getattr(checker, prop)()
        except AssertionError as e:
            raise AssertionError(f"check_mixer({checker.spec!r}): {prop}: {e}") from None
        except Exception as e:  # a crash inside the mixer is a broken property too
            where = traceback.extract_tb(e.__traceback__)[-1]
            raise AssertionError(f"check_mixer({checker.spec!r}): {prop}: {type(e).__name__}: {e} "
                                 f"(at {where.filename}:{where.lineno})") from e
        report.passed.append(prop)
    return report


__all__ = ["check_mixer", "run_chunks", "no_host_sync", "PROPERTIES", "ContractReport"]
