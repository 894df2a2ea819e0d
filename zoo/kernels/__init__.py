"""Kernels: one package per op, ``zoo/kernels/<op>/``:

* ``reference.py``: plain torch, importable without triton: the CPU path and the test oracle;
* ``triton.py``: the fused Triton kernel(s) (forward and backward), imported lazily by the dispatcher only;
* ``__init__.py``: the public function, which picks one of the two through :mod:`zoo.kernels.backend` (the one
  reader of ``ZOO_BACKEND``: Triton on CUDA tensors, the reference otherwise; ``torch`` / ``triton`` force one).

A CPU path may also have a native kernel: a small C++ file beside its torch version, compiled on first use by
:mod:`zoo.kernels.native` (``ZOO_NATIVE=auto|off|on``; the torch version runs where no compiler builds it).

Ops: ``ssd`` (Mamba-2's chunked scan; its CPU forward ``cpu.cpp``; the fused CPU decode step of a layer and of a
whole Mamba-2 stack ``decode_cpu.cpp``), ``gated_rmsnorm``,
``block_sparse_attention``, ``infllmv2`` (CPU prefill, both stages: ``cpu.cpp``), ``lact``, ``s4``. Beside them the
native sliding-window prefill ``sliding_window_cpu.cpp``; ``simd.h`` (vector types, ``exp``) and ``flash_tile.h`` (one
online-softmax tile) are shared by the native kernels.
"""

from zoo.kernels.ssd import ssd_chunk_scan, ssd_chunk_scan_ref

__all__ = ["ssd_chunk_scan", "ssd_chunk_scan_ref"]
