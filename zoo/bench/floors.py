"""The machine's floors for a case, measured or computed in the same run, shown beside the ratios.

* **GEMM floor** (``forward``, ``prefill``, ``forward_backward``; also ``decode``): the time of the zoo
  implementation's ``nn.Linear`` layers alone -- its projections (and a model's MLPs and LM head) -- on inputs of the
  case's shape (``[B, T, in]``, one token for a decode step), with their backward for ``forward_backward``. Found
  generically from the module (no mixer is named), timed in turns with the implementations.
* **Weight-streaming floor** (``decode``): the bytes of the parameters a decode step reads (an ``nn.Embedding``'s
  table counts only where a linear layer shares it, e.g. a tied LM head: a lookup reads one row) divided by the
  read bandwidth measured at the start of the run (:func:`zoo.bench.machine.measure_memory_bandwidth`). With the
  weights in cache a step can beat it; streamed from memory it cannot.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.bench.adapters import Adapter


class GemmFloorAdapter(Adapter):
    """The ``nn.Linear`` layers of ``module``, each on its own input ``[B, n, in_features]`` (``n`` = the case's
    token count). Built with the case's dtype and device from the module's own weights (no copy)."""

    scope = "floor"

    def __init__(self, module: nn.Module, batch: int) -> None:
        self.module = module
        self.batch = batch
        self.linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
        self.inputs: list[Tensor] = []

    def prepare(self, x: Tensor) -> None:
        self.prepare_tokens(x.shape[1])

    def prepare_tokens(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.inputs = [torch.randn(self.batch, n, lin.in_features, generator=g).to(lin.weight)
                       for lin in self.linears]

    def forward(self, x: Tensor) -> Tensor | None:
        out = None
        for lin, inp in zip(self.linears, self.inputs):
            out = F.linear(inp, lin.weight, lin.bias)
        return out

    def forward_backward(self) -> None:
        for lin, inp in zip(self.linears, self.inputs):
            F.linear(inp.requires_grad_(), lin.weight, lin.bias).sum().backward()

    def parameters(self) -> list[Tensor]:
        return [p for lin in self.linears for p in lin.parameters()] + self.inputs


def gemm_floor_callables(adapter: GemmFloorAdapter, phase: str, T: int) -> tuple[Any, Any]:
    """``(step, setup)`` timing the floor of ``phase`` at ``T`` (see :func:`zoo.bench.timing.time_interleaved`)."""
    adapter.prepare_tokens(1 if phase == "decode" else T)
    if phase == "forward_backward":
        params = adapter.parameters()

        def zero() -> None:
            for p in params:
                p.grad = None

        def fwd_bwd(_: Any) -> None:
            adapter.forward_backward()

        return fwd_bwd, zero

    def fwd(_: Any) -> None:
        with torch.no_grad():
            adapter.forward(None)

    return fwd, None


def streamed_parameter_bytes(module: nn.Module) -> int:
    """Bytes of the parameters (and floating-point buffers) a forward reads in full: every parameter once (tied
    ones once), except the tables of ``nn.Embedding`` layers that no ``nn.Linear`` shares (a lookup reads rows)."""
    linear_ptrs = {m.weight.data_ptr() for m in module.modules() if isinstance(m, nn.Linear)}
    lookup = {m.weight.data_ptr() for m in module.modules() if isinstance(m, nn.Embedding)} - linear_ptrs
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *(b for b in module.buffers() if b.is_floating_point())]:
        ptr = t.data_ptr()
        if ptr in seen or ptr in lookup:
            continue
        seen.add(ptr)
        total += t.numel() * t.element_size()
    return total
