"""A whole decode step of a pure Mamba-2 model in one native call (CPU, fp32): :func:`stack_step`.

::

    h_0 = embed(ids) * embedding_scale                                 (torch, in ZooForCausalLM.step)
    h_{l+1} = h_l + out_proj_l(step_l(in_proj_l(rmsnorm_l(h_l))))      } kernels/ssd/decode_cpu.cpp:
    logits = lm_head(rmsnorm_f(h_N))                                   } mamba2_stack_decode
    logits = logits * logit_scale                                      (torch)

The per-layer step (:func:`zoo.layers.mamba2_ops.decode_step_`) already fuses what lies between a layer's two GEMVs.
In a model, what a token costs beyond streaming the weights is then the Python and dispatch around ~10 calls per
block (measured on the 2-core CPU, 24 blocks of d_model 768: 33.5 ms per token of which the GEMVs took 26, the
interpreter and torch's dispatch ~4, the step kernel ~3 on one thread while the other waited). Here the blocks run in
one call: the GEMVs on torch's OpenMP threads (weight rows split between them; the residual add folded into the
out_proj rows), the SSM state split by (batch row, head), the norms and the conv on the first thread; no Python
between them. The mixer math is the per-layer kernel's (the same functions in the same file).

It applies (else :func:`stack_step` returns None and the caller runs its blocks) without autograd, in fp32 on the
CPU, for at most :data:`MAX_BATCH` rows, when every block is a Mamba-2 mixer whose per-layer step is the fused one
(:func:`zoo.layers.mamba2_ops.native_step`) behind an RMSNorm, with no MLP and a residual scale of 1, the final norm
is an RMSNorm and the head has no bias; ``ZOO_NATIVE`` not ``off`` and the kernel built with ``-fopenmp``. Its GEMV
reads each weight row once for all rows of the batch, each row's products in turn: measured faster than the blocks one
by one up to 16 rows (111 against 127 ms per token), slower at 32 (185 against 159), where torch's GEMM wins.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import zoo.kernels.ssd as ssd_kernels
from zoo.kernels import native
from zoo.layers.mamba2 import Mamba2
from zoo.layers.mamba2_ops import Mamba2Params, decode_plan, native_step, state_views
from zoo.layers.norm import RMSNorm

MAX_BATCH = 16

_ptr = ctypes.c_void_p


class Mamba2Block(ctypes.Structure):
    """One block and its state as ``mamba2_stack_decode`` reads them (``decode_cpu.cpp``'s ``Mamba2Block``)."""

    _fields_ = [("mixer", Mamba2Params), ("norm_w", _ptr), ("norm_eps", ctypes.c_float),
                *((n, _ptr) for n in ("in_w", "in_b", "out_w", "out_b", "window", "ssm", "seen"))]


class _Stack:
    __slots__ = ("key", "blocks", "keep")


def _function() -> Any:
    lib = native.library(Path(ssd_kernels.__file__).with_name("decode_cpu.cpp"), openmp=True)
    if lib is None:
        return None
    fn = lib.mamba2_stack_decode
    i64 = ctypes.c_int64
    fn.argtypes = [i64, ctypes.POINTER(Mamba2Block), i64, i64, _ptr, _ptr, ctypes.c_float, _ptr, i64, _ptr,
                   ctypes.c_int32]
    fn.restype = None
    return fn


def _block_parts(model: Any, states: Any) -> list[tuple] | None:
    """Per block ``(mixer parameters, norm, in_proj weight and bias, out_proj, window, ssm, seen)`` for this step, or
    None where a block does not qualify. Every plan is looked up (a parameter changed in place makes a new one)."""
    parts = []
    for block, state in zip(model.layers, states.layers):
        mods = block._modules
        m, norm = mods["mixer"], mods["norm"]
        if (type(m) is not Mamba2 or block.mlp is not None or block.residual_scale != 1.0 or m.state_window
                or type(norm) is not RMSNorm or norm.weight.dtype != torch.float32):
            return None
        ssm, cs = state.ssm_state, state.conv_state
        if ssm.dtype != torch.float32 or cs.dtype != torch.float32 or not ssm.is_contiguous():
            return None
        plan = decode_plan(m, cs.dtype, ssm.dtype, torch.float32)
        if plan.native is None:
            plan.native = native_step(m, plan)
        window = state_views(m, state)[3]
        seen = state.seen
        if not plan.native or window is None or seen.dtype != torch.int64 or not seen.is_contiguous():
            return None
        out_proj = m._modules["out_proj"]._parameters
        parts.append((plan.native[1], norm.weight, norm.eps, m._modules["in_proj"].weight, plan.in_bias,
                      out_proj["weight"], out_proj["bias"], window, ssm, seen))
    return parts


def stack_step(model: Any, h: Tensor, states: Any) -> Tensor | None:
    """The logits ``[B, vocab]`` of one decode step of ``model`` (a ``ZooForCausalLM``) from its embedded tokens
    ``h [B, 1, d_model]`` (overwritten), ``states`` updated in place as the blocks would; None where the fused step
    does not apply (module docstring), before anything is touched."""
    B = h.shape[0]
    if (B > MAX_BATCH or h.dtype != torch.float32 or h.device.type != "cpu" or torch.is_grad_enabled()
            or native.mode() == "off" or type(model.norm_f) is not RMSNorm or model.lm_head.bias is not None
            or not h.is_contiguous()):
        return None
    parts = _block_parts(model, states)
    if parts is None:
        return None
    head = model.lm_head.weight
    if head.dtype != torch.float32 or not all(t is None or t.is_contiguous() for p in parts for t in p[3:7]):
        return None
    fn = model.__dict__.get("_stack_fn")
    if fn is None:
        fn = model.__dict__["_stack_fn"] = _function() or False
    if not fn:
        return None
    key = tuple((id(p[0]), *(t.data_ptr() if isinstance(t, Tensor) else t for t in p[1:])) for p in parts)
    stack = model.__dict__.get("_stack_decode")
    if stack is None or stack.key != key:  # built once per set of plans, weights and state tensors
        stack = _Stack()
        stack.key = key
        stack.keep = parts  # the tensors the pointers point into
        stack.blocks = (Mamba2Block * len(parts))(*(
            Mamba2Block(params, norm_w.data_ptr(), eps, in_w.data_ptr(), in_b.data_ptr(), out_w.data_ptr(),
                        None if out_b is None else out_b.data_ptr(), window.data_ptr(), ssm.data_ptr(),
                        seen.data_ptr())
            for params, norm_w, eps, in_w, in_b, out_w, out_b, window, ssm, seen in parts))
        model.__dict__["_stack_decode"] = stack
    logits = torch.empty(B, head.shape[0], dtype=torch.float32)
    fn(len(parts), stack.blocks, B, h.shape[-1], h.data_ptr(), model.norm_f.weight.data_ptr(), model.norm_f.eps,
       head.data_ptr(), head.shape[0], logits.data_ptr(), torch.get_num_threads())
    return logits
