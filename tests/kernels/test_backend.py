"""ZOO_BACKEND: one reader (zoo.kernels.backend), validated, obeyed the same way by every kernel dispatcher; the
references import and run without triton installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zoo.kernels.backend import BACKENDS, backend, triton_module, use_triton
from zoo.kernels.block_sparse_attention import block_sparse_attention, block_sparse_attention_ref
from zoo.kernels.gated_rmsnorm import gated_rmsnorm
from zoo.kernels.gated_rmsnorm.reference import gated_rmsnorm_inference
from zoo.kernels.ssd import ssd_chunk_scan, ssd_chunk_scan_ref
from zoo.layers.masks import sliding_window_layout


def _ssd_args():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 20, 2, 4, generator=g)
    dt = torch.rand(1, 20, 2, generator=g) * 0.5
    A = -torch.rand(2, generator=g) - 0.5
    B, C = torch.randn(1, 20, 1, 8, generator=g), torch.randn(1, 20, 1, 8, generator=g)
    return (x, dt, A, B, C), dict(chunk_size=16, D=torch.ones(2))


def _rms_args():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(3, 16, generator=g), torch.rand(16, generator=g) + 0.5, torch.randn(3, 16, generator=g)), \
        dict(group_size=8)


def _bsa_args():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g) for _ in range(3))
    return (q, k, v), dict(block_mask=sliding_window_layout(3, 3, 16, 20), block_size=16, window=20)


# (dispatcher, reference, Triton module, kernel name, inputs)
OPS = {
    "ssd": (ssd_chunk_scan, ssd_chunk_scan_ref, "zoo.kernels.ssd.triton", "ssd_chunk_scan_triton", _ssd_args),
    # inputs without autograd: the torch path is the reference's in-place inference variant (pinned to
    # gated_rmsnorm_ref in tests/kernels/test_gated_rmsnorm.py)
    "gated_rmsnorm": (gated_rmsnorm, gated_rmsnorm_inference, "zoo.kernels.gated_rmsnorm.triton",
                      "gated_rmsnorm_triton", _rms_args),
    "block_sparse_attention": (block_sparse_attention, block_sparse_attention_ref,
                               "zoo.kernels.block_sparse_attention.triton", "block_sparse_attention_triton", _bsa_args),
}


@pytest.mark.parametrize("value,want", [(None, "auto"), ("", "auto"), ("auto", "auto"), (" Torch ", "torch"),
                                        ("TRITON", "triton")])
def test_backend_values(monkeypatch, value, want):
    if value is None:
        monkeypatch.delenv("ZOO_BACKEND", raising=False)
    else:
        monkeypatch.setenv("ZOO_BACKEND", value)
    assert backend() == want


def test_use_triton_follows_backend_and_device(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("ZOO_BACKEND", raising=False)
    assert not use_triton(cpu) and not use_triton(cpu, None)
    monkeypatch.setenv("ZOO_BACKEND", "torch")
    assert not use_triton(cpu)
    monkeypatch.setenv("ZOO_BACKEND", "triton")
    assert use_triton(cpu)


@pytest.mark.parametrize("op", list(OPS))
def test_invalid_backend_is_a_value_error_naming_the_choices(monkeypatch, op):
    fn, _, _, _, make = OPS[op]
    args, kw = make()
    monkeypatch.setenv("ZOO_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"ZOO_BACKEND='cuda' is not one of \['auto', 'torch', 'triton'\]"):
        backend()
    with pytest.raises(ValueError, match=r"is not one of \['auto', 'torch', 'triton'\]"):
        fn(*args, **kw)
    assert BACKENDS == ("auto", "torch", "triton")


@pytest.mark.parametrize("op", list(OPS))
def test_every_dispatcher_obeys_the_backend(monkeypatch, op):
    """auto on CPU tensors and ``torch``: the reference, bit for bit; ``triton``: the kernel (a stand-in here). The
    native CPU kernels (``ZOO_NATIVE``; tested against the references in their own files) are off here."""
    pytest.importorskip("triton")
    monkeypatch.setenv("ZOO_NATIVE", "off")
    fn, ref, module, name, make = OPS[op]
    args, kw = make()
    calls = []
    monkeypatch.setattr(triton_module(module), name, lambda *a, **k: calls.append(k) or "kernel")
    want = ref(*args, **kw)
    for value in ("auto", "torch"):
        monkeypatch.setenv("ZOO_BACKEND", value)
        got = fn(*args, **kw)
        for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            assert torch.equal(a, b), (op, value)
    assert not calls
    monkeypatch.setenv("ZOO_BACKEND", "triton")
    assert fn(*args, **kw) == "kernel" and len(calls) == 1


def test_ssd_mitigation_arguments_fall_back_to_the_reference(monkeypatch):
    """The SSD kernel does not take the mitigation arguments: set, they run the reference even under
    ZOO_BACKEND=triton; left at None, they are not passed to the kernel."""
    pytest.importorskip("triton")
    _, _, module, name, make = OPS["ssd"]
    args, kw = make()
    calls = []
    monkeypatch.setattr(triton_module(module), name, lambda *a, **k: calls.append(k) or "kernel")
    monkeypatch.setenv("ZOO_BACKEND", "triton")
    off = torch.full(args[1].shape, -0.1)
    y, s = ssd_chunk_scan(*args, **kw, dA_offset=off)
    y_ref, s_ref = ssd_chunk_scan_ref(*args, **kw, dA_offset=off)
    assert torch.equal(y, y_ref) and torch.equal(s, s_ref) and not calls
    assert ssd_chunk_scan(*args, **kw, dA_offset=None, state_norm_threshold=None) == "kernel"
    assert set(calls[0]) == {"chunk_size", "D"}


def test_a_broken_kernel_module_is_not_hidden():
    with pytest.raises(ModuleNotFoundError, match="zoo.kernels.no_such_op"):
        triton_module("zoo.kernels.no_such_op.triton")


_NO_TRITON = r"""
import sys
sys.modules["triton"] = None  # as if triton were not installed
import os
import torch
import zoo
import zoo.kernels.ssd, zoo.kernels.gated_rmsnorm, zoo.kernels.block_sparse_attention
from zoo.kernels.backend import triton_module
from zoo.kernels.ssd import ssd_chunk_scan

x = torch.randn(1, 20, 2, 4)
args = (x, torch.rand(1, 20, 2), -torch.ones(2), torch.randn(1, 20, 1, 8), torch.randn(1, 20, 1, 8))
y, s = ssd_chunk_scan(*args, chunk_size=16)
assert y.shape == x.shape and s.shape == (1, 2, 4, 8)
assert triton_module("zoo.kernels.ssd.triton") is None  # auto: the dispatcher falls back to the reference
os.environ["ZOO_BACKEND"] = "triton"
try:
    ssd_chunk_scan(*args, chunk_size=16)
except RuntimeError as e:
    assert "ZOO_BACKEND=triton" in str(e) and "triton" in str(e), e
else:
    raise AssertionError("ZOO_BACKEND=triton without triton must raise")
print("ok")
"""


def test_references_import_and_run_without_triton():
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("ZOO_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", _NO_TRITON], env=env, cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
