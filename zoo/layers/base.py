"""The mixer interface shared by every sequence-mixing layer in the zoo.

A mixer maps hidden states ``x: [B, T, D] -> y: [B, T, D]``. With ``state=None`` it runs the parallel
(training) form over the whole sequence; with a state it continues from it (a prefill chunk of any length
or a single decode token) and returns the updated state. Chunked prefill and token-by-token decode must
reproduce the parallel forward ("three modes agree").

Conventions every mixer follows:

* ``positions: [B, T]`` absolute positions (from the attention mask for left-padded batches).
* ``attention_mask: [B, T]`` 1 for real tokens, 0 for padding, for the tokens of *this call*; a padded
  token is a no-op for the state (never attended to, never written into a recurrent state).
* ``seq_idx: [B, T]`` document ids of packed sequences; nothing crosses a document boundary.

The model owns time: it computes ``positions`` and the valid-token mask once per call and hands them to every
mixer. A mixer state keeps at most one count of the tokens it has absorbed (used when a mixer runs standalone
with ``positions=None``), and the one-token decode step makes no host synchronisation (no ``.item()``,
``.tolist()`` or data-dependent Python branch on tensor values).

A mixer describes itself with class attributes (see "Adding a mixer" in the README), so that the contract
suite (``zoo.testing.check_mixer``), the benchmarks and the demo iterate over the registry and never branch on
a mixer's name: ``example_args``, ``demo_args``, ``supports_packing``, ``dtypes``, ``state_growth``,
``boundaries``, ``flops``, ``bench_cases`` and ``citations``.

Sequence parallelism (:mod:`zoo.distributed.sequence_parallel`): a mixer class that sets
``sequence_parallel = True`` implements :meth:`Mixer.forward_sequence_parallel`, the parallel forward of one rank's
slice of the sequence that equals (forward and backward) the matching slice of the one-rank forward. The flag is
read from the class's own namespace, not inherited: a subclass that changes the computation declares it again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from zoo.config import mixer_parameters


class State:
    """Base class of the per-layer inference states (subclasses are dataclasses of tensors)."""

    def _tensors(self) -> list[Tensor]:
        out = []
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                out.append(v)
        return out

    @property
    def nbytes(self) -> int:
        """Bytes held by this state's tensors."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    def keep_rows(self, keep: Tensor, previous: State) -> None:
        """Rows where ``keep [B]`` is True take back their values from ``previous`` (a shallow copy taken before
        the call; the state's tensors must have been replaced, not written in place): a call in which a row was
        all padding then leaves that row's state as it was, without a host synchronisation."""
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            new, old = getattr(self, f.name), getattr(previous, f.name)
            if isinstance(new, Tensor) and new.dim() > 0 and new is not old:
                setattr(self, f.name, torch.where(keep.view(-1, *[1] * (new.dim() - 1)), old, new))

    def reorder(self, batch_indices: Tensor) -> None:
        """Select / reorder batch rows in place (beam search)."""
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if isinstance(v, Tensor) and v.dim() > 0:
                setattr(self, f.name, v.index_select(0, batch_indices.to(v.device)))


@dataclass(frozen=True)
class BenchCase:
    """What ``zoo bench`` times: arguments per size, and the reference the zoo implementation is compared with.

    ``kind="mixer"`` (declared in a mixer's ``bench_cases``): ``args`` = ``{"full": {...}, "quick": {...}}``, each
    holding ``d_model`` and the mixer's keyword arguments. ``kind="model"`` (declared in a family's
    ``bench_cases``): each size is a ``ZooConfig`` dict. ``reference``: the name of a reference registered in
    :mod:`zoo.bench.references` (built from the zoo implementation with the *same weights*; ``"mixer:<name>"`` is
    any registered mixer), or ``None``. ``gpu_kernels``: kernel-level references timed on CUDA only. ``name``:
    the subject's name (default: the mixer's registry name, or the family's).
    """

    args: dict[str, dict[str, Any]]
    reference: str | None = None
    gpu_kernels: tuple[str, ...] = ()
    phases: tuple[str, ...] = ("forward", "forward_backward", "prefill", "decode")
    name: str = ""
    description: str = ""
    lengths: tuple[int, ...] = field(default=())  # default: the harness's sequence lengths
    kind: str = "mixer"  # "mixer" | "model"

    def __post_init__(self) -> None:
        if self.kind not in ("mixer", "model"):
            raise ValueError(f"BenchCase.kind={self.kind!r} must be 'mixer' or 'model'")
        if set(self.args) != {"full", "quick"}:
            raise ValueError(f"BenchCase.args must have the sizes 'full' and 'quick', got {sorted(self.args)}")


class Mixer(nn.Module):
    """Base class: ``forward(x, *, positions, state, attention_mask, seq_idx) -> (y, state)``."""

    mixer_name: ClassVar[str] = ""
    # Groups of ``ZooConfig.mixer_defaults`` this mixer reads its defaults from.
    arg_groups: ClassVar[tuple[str, ...]] = ()

    # ---- self-description: what the contract suite, the benchmarks and the demo need to know
    # Small argument sets for the contract suite (``tests/contract/`` runs ``check_mixer`` on each; the
    # model around it has d_model=32 and ``mixer_defaults`` giving attention-like mixers 4 heads / 2 KV heads).
    example_args: ClassVar[tuple[dict[str, Any], ...]] = ({},)
    # Arguments for ``zoo demo`` (d_model 64), or None to leave the mixer out of the demo.
    demo_args: ClassVar[dict[str, Any] | None] = None
    # True when the parallel forward honours ``seq_idx`` (packed documents); otherwise it must raise ValueError.
    supports_packing: ClassVar[bool] = False
    # Parameter dtypes in which outputs and gradients are promised finite (fp32 is always checked).
    dtypes: ClassVar[tuple[str, ...]] = ("float32",)
    # How ``State.nbytes`` grows with the tokens absorbed: "constant" (bounded state) or "linear" (a KV cache).
    state_growth: ClassVar[str] = "constant"
    # Benchmark cases (``zoo bench --mixers NAME``).
    bench_cases: ClassVar[tuple[BenchCase, ...]] = ()
    # BibTeX entries of the papers behind the mixer (model cards list them for every mixer a model uses).
    citations: ClassVar[tuple[str, ...]] = ()
    # Implements forward_sequence_parallel (declared per class: see the module docstring).
    sequence_parallel: ClassVar[bool] = False

    @classmethod
    def resolved_args(cls, args: dict[str, Any]) -> dict[str, Any]:
        """``args`` completed with the constructor's defaults (what an instance built from ``args`` uses)."""
        defaults = {k: p.default for k, p in mixer_parameters(cls).items() if p.default is not p.empty}
        return {**defaults, **args}

    @classmethod
    def packing_supported(cls, args: dict[str, Any]) -> bool:
        """Whether these arguments support ``seq_idx`` (default: ``supports_packing``); when False the parallel
        forward must refuse ``seq_idx`` with ``ValueError``."""
        return cls.supports_packing

    @classmethod
    def boundaries(cls, args: dict[str, Any]) -> list[int]:
        """Token periods of the mixer's internal structure (chunk, window, block, stride) for these arguments;
        the contract checker picks sequence lengths and prefill chunk sizes that cross them."""
        names = ("chunk_size", "window", "block_size", "kernel_size", "kernel_stride", "window_size")
        return sorted({v for k, v in args.items() if k in names and isinstance(v, int) and v > 0})

    @classmethod
    def flops(cls, d_model: int, args: dict[str, Any], *, T: int, context: int = 0, batch: int = 1) -> int:
        """Analytic forward FLOPs (multiply-add = 2; matmul-like work only, as :mod:`zoo.bench.flops` counts) of
        ``T`` new tokens after ``context`` absorbed ones (decode: ``T=1``); ``args``: the mixer's arguments."""
        raise NotImplementedError(f"mixer {cls.mixer_name!r} declares no FLOP count")

    def __init__(self, d_model: int, layer_idx: int = 0) -> None:
        super().__init__()
        self.d_model = d_model
        self.layer_idx = layer_idx

    @classmethod
    def check_args(cls, d_model: int, kwargs: dict[str, Any]) -> None:
        """Raise ``ValueError`` for inconsistent sizes at config time (override per mixer)."""

    def derive_from(self, old: nn.Module) -> bool:
        """Initialise this mixer's weights from ``old``, the mixer it replaces in ``zoo.swap_layers(...,
        init="derive")`` (after the name-and-shape reuse). Return False when there is no derivation from that kind
        of mixer (the default); raise ``ValueError`` when there is one but these sizes do not allow it."""
        return False

    def forward(
        self,
        x: Tensor,
        *,
        positions: Tensor | None = None,
        state: State | None = None,
        attention_mask: Tensor | None = None,
        seq_idx: Tensor | None = None,
    ) -> tuple[Tensor, State | None]:
        raise NotImplementedError

    def init_state(
        self, batch_size: int, *, dtype: torch.dtype, device: torch.device | str, max_length: int | None = None
    ) -> State:
        raise NotImplementedError

    # ------------------------------------------------------------------ sequence parallelism
    def check_sequence_parallel(self, size: int) -> None:
        """Raise ``ValueError`` unless this mixer, with its arguments, runs sequence-parallel over ``size`` ranks.
        Subclasses add their own conditions (head counts, unsupported options) after ``super()``'s check."""
        if not type(self).__dict__.get("sequence_parallel", False):
            raise ValueError(f"mixer {self.mixer_name or type(self).__name__!r} does not implement sequence "
                             "parallelism (forward_sequence_parallel)")

    def forward_sequence_parallel(self, x: Tensor, *, positions: Tensor, attention_mask: Tensor | None,
                                  seq_idx: Tensor | None, comm: Any) -> Tensor:
        """The parallel forward of this rank's slice ``x [B, T/R, D]`` of a sequence split over ``R`` ranks
        (``comm``: a :class:`zoo.distributed.sequence_parallel.SequenceComm`); ``positions``, ``attention_mask``
        and ``seq_idx`` are this slice's columns of the global ones. Returns ``y [B, T/R, D]``."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}"


def default_positions(x: Tensor, offset: int = 0) -> Tensor:
    """``[B, T]`` positions ``offset .. offset+T-1`` for an unpadded batch."""
    B, T = x.shape[:2]
    return torch.arange(offset, offset + T, device=x.device).unsqueeze(0).expand(B, T)


def document_positions(seq_idx: Tensor) -> Tensor:
    """``seq_idx [B, T]`` (document ids of packed rows) -> each token's index inside its document (restarts at
    every document start)."""
    T = seq_idx.shape[1]
    t = torch.arange(T, device=seq_idx.device).expand_as(seq_idx)
    start = torch.ones_like(seq_idx, dtype=torch.bool)
    start[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return t - torch.where(start, t, torch.zeros_like(t)).cummax(1).values


def check_int(name: str, value: Any, minimum: int = 1) -> None:
    """``ValueError`` unless the mixer argument ``name`` is an int (not a bool) ``>= minimum``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an int >= {minimum}")


def check_power_of_two(name: str, value: Any) -> None:
    """``ValueError`` unless the mixer argument ``name`` is a positive power-of-two int (block-sparse kernel tiles)."""
    check_int(name, value)
    if value & (value - 1):
        raise ValueError(f"{name}={value!r} must be a power of two (block-sparse kernel tiles)")
