"""Kernels: each op has a plain-torch reference (the CPU path and the test oracle), an optional Triton kernel,
and a dispatch function (Triton on CUDA tensors, the reference otherwise; ``ZOO_BACKEND=torch|triton``)."""

from zoo.kernels.ssd import ssd_chunk_scan, ssd_chunk_scan_ref

__all__ = ["ssd_chunk_scan", "ssd_chunk_scan_ref"]
