"""The cases: subject (a mixer or a model) x phase x sequence length x dtype x device, read from the registries.

Subjects are declared by the code that owns them, never listed here:

* every registered mixer's ``bench_cases`` (:class:`zoo.layers.base.BenchCase`, ``kind="mixer"``: ``args`` per
  size hold ``d_model`` and the mixer's keyword arguments);
* every registered family's ``bench_cases`` (``kind="model"``: ``args`` per size are a ``ZooConfig`` dict).

A subject is named ``BenchCase.name``, else after its mixer (or family). Its implementations are ``zoo`` (the
zoo mixer or ``ZooForCausalLM``), its ``reference`` (a layer-level reference of :mod:`zoo.bench.references`, the
speedup baseline) and, on CUDA, its ``gpu_kernels`` (kernel-level references). The zoo implementation is built
first; every reference is built from it with the same weights.

A :class:`Case` is plain data (it crosses process boundaries for the memory measurement). Every implementation
is an :class:`~zoo.bench.adapters.Adapter`, so the four phases are written once (:func:`phase_callables`):

* ``forward``: parallel forward over ``T`` tokens, no grad;
* ``forward_backward``: the same with grad, then ``y.sum().backward()``;
* ``prefill``: ``T`` tokens into a fresh state;
* ``decode``: the state is prefilled with ``T`` tokens (untimed), then single-token steps are timed.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from zoo.bench import flops as F
from zoo.bench.adapters import Adapter, ZooMixerAdapter, ZooModelAdapter
from zoo.bench.references import get_reference, required_mixers
from zoo.layers.base import BenchCase

PHASES = ("forward", "forward_backward", "prefill", "decode")
UNAVAILABLE = "skipped: mixer not available"


@dataclass
class Case:
    subject: str
    phase: str
    T: int
    dtype: str
    device: str
    size: str = "full"  # "full" or "quick" (tiny dimensions for the CI smoke run)
    batch: int = 1
    impls: tuple[str, ...] = ()
    reference: str | None = None  # the implementation the zoo one is compared with (speedup = ref / zoo)
    modules: tuple[str, ...] = ()  # modules defining the subject's mixers and references (for fresh processes)

    @property
    def id(self) -> str:
        return f"{self.subject}/{self.phase}/T={self.T}/{self.dtype}/{self.device}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["impls"], d["modules"] = list(self.impls), list(self.modules)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Case:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if k in ("impls", "modules") else v) for k, v in d.items() if k in fields})


# ---------------------------------------------------------------------------------------------- subjects
@dataclass(frozen=True)
class Subject:
    """A registered mixer's or family's bench case."""

    name: str
    kind: str  # "mixer" | "model"
    owner: str  # the mixer's registry name, or the family's
    case: BenchCase

    @property
    def reference(self) -> str | None:
        return self.case.reference

    @property
    def phases(self) -> tuple[str, ...]:
        return self.case.phases

    @property
    def description(self) -> str:
        return self.case.description

    def args(self, size: str) -> dict[str, Any]:
        if size not in self.case.args:
            raise ValueError(f"bench subject {self.name!r} declares no {size!r} arguments")
        return copy.deepcopy(self.case.args[size])

    def mixers(self, size: str) -> tuple[str, ...]:
        """Mixers the zoo implementation needs registered."""
        if self.kind == "mixer":
            return (self.owner,)
        from zoo.config import LayerSpec, ZooConfig, expand_layers

        a = self.args(size)  # the layers as ZooConfig.from_dict reads them, without validating (needs the mixers)
        if a.get("layers"):
            layers = a["layers"]
        elif a.get("mixers") is not None or a.get("mlp") is not None:
            layers = expand_layers(a.get("n_layers", ZooConfig.n_layers), a.get("mixers") or LayerSpec.mixer,
                                   a.get("mlp"))
        else:
            layers = [LayerSpec()]
        return tuple(sorted({ls["mixer"] if isinstance(ls, dict) else ls.mixer for ls in layers}))

    def requirements(self, impl: str, size: str) -> tuple[str, ...]:
        """Mixers an implementation needs registered (a reference is built from the zoo implementation)."""
        zoo_needs = self.mixers(size)
        return zoo_needs if impl == "zoo" else tuple(sorted({*zoo_needs, *required_mixers(impl)}))

    def config(self, size: str) -> Any:
        from zoo.config import ZooConfig

        return ZooConfig.from_dict(self.args(size))

    def build_zoo(self, size: str) -> nn.Module:
        """The zoo implementation at ``size``, in the current default device / dtype."""
        import zoo

        if self.kind == "model":
            return zoo.create_model(self.config(size))
        a = self.args(size)
        return zoo.get_mixer(self.owner)(a.pop("d_model"), 0, **a)

    def flops(self, size: str, *, T: int, context: int, batch: int) -> int:
        """Analytic forward FLOPs of the zoo implementation (the mixer's own count, or the model's sum)."""
        import zoo

        if self.kind == "model":
            return F.model_flops(self.config(size), T=T, context=context, batch=batch)
        a = self.args(size)
        return zoo.get_mixer(self.owner).flops(a.pop("d_model"), a, T=T, context=context, batch=batch)

    def input_width(self, size: str) -> int | None:
        """Hidden-state width (mixers), ``None`` for a model (token ids)."""
        return None if self.kind == "model" else self.args(size)["d_model"]

    def vocab_size(self, size: str) -> int:
        return self.config(size).vocab_size

    def modules(self, size: str, impls: tuple[str, ...]) -> tuple[str, ...]:
        """Modules a fresh process imports to build these implementations (mixers / references defined outside
        the package register themselves when their module is imported)."""
        import zoo

        mods = [zoo.get_mixer(m).__module__ for m in self.mixers(size) if m in zoo.list_mixers()]
        for impl in impls:
            if impl != "zoo":
                try:
                    mods.append(get_reference(impl).module)
                except ValueError:
                    pass
        return tuple(dict.fromkeys(m for m in mods if m and m != "__main__" and not m.startswith("zoo.")))


def subjects() -> dict[str, Subject]:
    """Every bench subject declared by the registered mixers and families, by name."""
    import zoo
    from zoo.registry import families

    out: dict[str, Subject] = {}

    def add(case: BenchCase, kind: str, owner: str, where: str) -> None:
        if case.kind != kind:
            raise ValueError(f"{where} declares a bench case of kind {case.kind!r}; expected {kind!r}")
        name = case.name or owner
        if name in out:
            raise ValueError(f"bench subject {name!r} is declared twice ({where} and {out[name].owner}); "
                             "give the cases distinct BenchCase.name")
        out[name] = Subject(name, kind, owner, case)

    for mixer in zoo.list_mixers():
        for case in zoo.get_mixer(mixer).bench_cases:
            add(case, "mixer", mixer, f"mixer {mixer!r}")
    for family_name, family in sorted(families().items()):
        for case in getattr(family, "bench_cases", ()):
            add(case, "model", family_name, f"family {family_name!r}")
    return out


def gpu_kernels_available(device: str) -> bool:
    return device.startswith("cuda") and torch.cuda.is_available()


def make_cases(names: list[str], phases: list[str], Ts: list[int], *, dtype: str, device: str, size: str,
               batch: int = 1, plan: list[tuple[list[str] | None, list[int] | None]] | None = None
               ) -> list[Case]:
    """Every (subject, phase, T) the subject supports, ordered by subject, phase, then increasing T. ``plan[i] =
    (phases, Ts)`` overrides the run's phases / lengths for the entry ``names[i]`` (None: keep the run's); a subject
    may have several entries (each (subject, phase, T) runs once)."""
    registry = subjects()
    cases, seen = [], set()
    for i, name in enumerate(names):
        subject = registry[name]
        refs = [subject.reference] if subject.reference else []
        if gpu_kernels_available(device):
            refs += list(subject.case.gpu_kernels)
        else:
            refs = [r for r in refs if not _gpu_only(r)]
        impls = ("zoo", *dict.fromkeys(refs))
        modules = subject.modules(size, impls)
        own_phases, own_Ts = plan[i] if plan else (None, None)
        lengths = sorted(own_Ts or Ts)
        if subject.case.lengths and size == "full" and not own_Ts:  # its own lengths, up to the run's largest T
            lengths = [T for T in sorted(subject.case.lengths) if T <= max(Ts)]
        for phase in (p for p in (own_phases or phases) if p in subject.phases):
            for T in lengths:
                if (name, phase, T) in seen:
                    continue
                seen.add((name, phase, T))
                cases.append(Case(name, phase, T, dtype, device, size, batch, impls,
                                  subject.reference if subject.reference in impls else None, modules))
    return cases


def _gpu_only(name: str) -> bool:
    try:
        return get_reference(name).gpu_only
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------- building
def build(case: Case, impls: list[str], seed: int = 0) -> dict[str, Adapter]:
    """Adapters for ``impls`` of ``case`` (fp params cast to the case dtype, on its device, in eval mode).

    The zoo implementation is built first (seeded); each reference is built from it with the same weights. Alone
    (the memory probe builds one implementation per process) a reference gets the zoo implementation on the
    meta device: its own weights are then left as initialised (memory does not depend on their values)."""
    subject = subjects()[case.subject]
    args = subject.args(case.size)
    torch.manual_seed(seed)
    if "zoo" in impls:
        zoo_module = subject.build_zoo(case.size)
    else:
        with torch.device("meta"):
            zoo_module = subject.build_zoo(case.size)
    wrap = ZooModelAdapter if subject.kind == "model" else ZooMixerAdapter
    out: dict[str, Adapter] = {}
    for impl in impls:
        if impl == "zoo":
            out[impl] = wrap(zoo_module, case.batch)
        else:
            out[impl] = get_reference(impl).build(zoo_module, copy.deepcopy(args), case.batch)
    for ad in out.values():
        if ad.module is not None:
            ad.module.to(device=case.device, dtype=case.torch_dtype).eval()
    return out


def make_input(case: Case, ad: Adapter, decode_steps: int, seed: int = 1) -> Tensor:
    """Hidden states ``[B, T + decode_steps, width]`` (``width``: the adapter's, else the subject's) or, for a
    model, token ids ``[B, T + decode_steps]``."""
    subject = subjects()[case.subject]
    g = torch.Generator().manual_seed(seed)
    n = case.T + decode_steps
    width = ad.width or subject.input_width(case.size)
    if width is None:
        return torch.randint(0, subject.vocab_size(case.size), (case.batch, n), generator=g).to(case.device)
    return torch.randn(case.batch, n, width, generator=g).to(device=case.device, dtype=case.torch_dtype)


# ---------------------------------------------------------------------------------------------- phases
def phase_callables(case: Case, ad: Adapter, x: Tensor, decode_steps: int
                    ) -> tuple[Callable[[Any], Any], Callable[[], Any] | None]:
    """``(step, setup)`` for :func:`zoo.bench.timing.time_calls`; ``decode_steps`` bounds the decode calls."""
    T = case.T
    ad.prepare(x[:, :T])
    if case.phase == "forward":
        xs = x[:, :T]

        def forward(_: Any) -> Tensor:
            with torch.no_grad():
                return ad.forward(xs)

        return forward, None
    if case.phase == "forward_backward":
        xs = x[:, :T].detach().clone()
        if xs.is_floating_point():
            xs.requires_grad_()
        params = [p for p in ad.parameters() if p.requires_grad]

        def zero_grads() -> None:
            xs.grad = None
            for p in params:
                p.grad = None

        def forward_backward(_: Any) -> Tensor:
            y = ad.forward(xs)
            y.float().sum().backward()
            return y.detach()

        return forward_backward, zero_grads
    if case.phase == "prefill":
        xs = x[:, :T]

        def prefill(state: Any) -> Tensor:
            with torch.no_grad():
                return ad.step(xs, state)

        return prefill, lambda: ad.new_state(T + decode_steps)
    if case.phase == "decode":
        state = ad.new_state(T + decode_steps)
        with torch.no_grad():
            ad.step(x[:, :T], state)
        position = [T]

        def decode(_: Any) -> Tensor:
            i = position[0]
            if i >= x.shape[1]:
                raise RuntimeError(f"decode ran past its {decode_steps} prepared tokens")
            position[0] += 1
            with torch.no_grad():
                return ad.step(x[:, i:i + 1], state)

        return decode, None
    raise ValueError(f"unknown phase {case.phase!r}; phases: {PHASES}")


# ---------------------------------------------------------------------------------------------- FLOPs
def case_flops(case: Case, ad: Adapter | None = None) -> int:
    """Analytic FLOPs of one timed call: the adapter's own count (kernel references) or the subject's
    (:meth:`zoo.layers.base.Mixer.flops`, :func:`zoo.bench.flops.model_flops`); decode: one token at context
    ``T``; ``forward_backward``: 3 x forward."""
    T, context = (1, case.T) if case.phase == "decode" else (case.T, 0)
    own = ad.flops(T, context, case.batch) if ad is not None else None
    fwd = own if own is not None else subjects()[case.subject].flops(case.size, T=T, context=context,
                                                                     batch=case.batch)
    return F.with_backward(fwd) if case.phase == "forward_backward" else fwd


def n_decode_steps(warmup: int, repeats: int) -> int:
    return warmup + repeats + 1
