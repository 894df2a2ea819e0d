"""Kernels: one package per op, ``zoo/kernels/<op>/``:

* ``reference.py``: plain torch, importable without triton: the CPU path and the test oracle;
* ``triton.py``: the fused Triton kernel(s) (forward and backward), imported lazily by the dispatcher only;
* ``__init__.py``: the public function, which picks one of the two through :mod:`zoo.kernels.backend` (the one
  reader of ``ZOO_BACKEND``: Triton on CUDA tensors, the reference otherwise; ``torch`` / ``triton`` force one).

Ops: ``ssd`` (Mamba-2's chunked scan), ``gated_rmsnorm``, ``block_sparse_attention``.
"""

from zoo.kernels.ssd import ssd_chunk_scan, ssd_chunk_scan_ref

__all__ = ["ssd_chunk_scan", "ssd_chunk_scan_ref"]
