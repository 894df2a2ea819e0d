"""LaCT test-time training in plain torch: the SwiGLU fast weight, its negative dot-product gradient, the
Newton-Schulz (Muon) orthogonalisation and the large-chunk "apply then update" loop.

Shapes (``N`` = rows x fast-weight heads, ``dh`` = fast-weight head dim, ``dH`` = its hidden width)::

    w0, w2  [N, dH, dh]   ("gate", "up";  paper W1, W3)
    w1      [N, dh, dH]   ("down";        paper W2)
    f_W(x) = w1 (silu(w0 x) * (w2 x))                      x [N, L, dh] -> [N, L, dh]

Inner loss of a chunk of keys/values (released LM code, paper Eq. 7): ``L = -sum_t lr_t <v_t, f_W(k_t)>`` with
one learning rate per token and matrix (``lr0, lr1, lr2`` for ``w0, w1, w2``). The update is a descent step
``dW = -dL/dW``::

    g = w0 k,  u = w2 k,  a = silu(g),  h = a * u,  dh_ = w1^T v                 [N, C, dH] (row-major per token)
    dw1 = sum_t lr1_t v_t h_t^T
    dw0 = sum_t lr0_t (dh_ * u * silu'(g))_t k_t^T,     dw2 = sum_t lr2_t (dh_ * a)_t k_t^T

then, per chunk: momentum ``dW += mean_t(m_t) M; M = dW`` (before Muon), Muon ``dW = NS5(dW)`` (each matrix;
``joint_muon``: ``[dw0; dw2]`` stacked, as the released fused Triton path), ``W = W + dW`` and the per-row norm
restore ``W = W / (||W||_row + 1e-5) * ||W_init||_row``. ``prenorm``: the sum runs on an unnormalised copy
``W_main`` and the applied weight is its normalisation.

Everything here runs in the dtype of its inputs (fp32 or fp64 in the zoo; the reference code computes the matmuls
and Newton-Schulz in bf16 under CUDA autocast).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Newton-Schulz schedule of the released code (per iteration; the paper quotes the classic 3.4445/-4.7750/2.0315)
NS_COEFFS = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)

FastWeights = tuple[Tensor, Tensor, Tensor]  # w0, w1, w2


def swiglu_apply(w0: Tensor, w1: Tensor, w2: Tensor, x: Tensor) -> Tensor:
    """``f_W(x) = w1 (silu(w0 x) * (w2 x))`` for ``x [N, L, dh]`` -> ``[N, L, dh]``."""
    return torch.bmm(F.silu(torch.bmm(x, w0.transpose(1, 2))) * torch.bmm(x, w2.transpose(1, 2)), w1.transpose(1, 2))


def swiglu_descent(w0: Tensor, w1: Tensor, w2: Tensor, k: Tensor, v: Tensor, lr0: Tensor, lr1: Tensor,
                   lr2: Tensor) -> FastWeights:
    """``(dw0, dw1, dw2) = -grad`` of ``-sum_t lr_t <v_t, f_W(k_t)>``; ``k, v [N, C, dh]``, ``lr* [N, C, 1]``."""
    g, u = torch.bmm(k, w0.transpose(1, 2)), torch.bmm(k, w2.transpose(1, 2))  # [N, C, dH]
    sg = torch.sigmoid(g)
    a = g * sg  # silu(g)
    dhid = torch.bmm(v, w1)  # [N, C, dH] = (w1^T v_t)_t
    dw1 = torch.bmm(v.transpose(1, 2), a * u * lr1)  # [N, dh, dH]
    dg = dhid * u * torch.addcmul(sg, a, 1 - sg)  # silu'(g) = sg (1 + g (1 - sg)) = sg + silu(g) (1 - sg)
    dw0 = torch.bmm(dg.transpose(1, 2), k * lr0)  # [N, dH, dh]
    dw2 = torch.bmm((dhid * a).transpose(1, 2), k * lr2)
    return dw0, dw1, dw2


def newton_schulz5(g: Tensor) -> Tensor:
    """Approximate orthogonalisation ``U V^T`` of ``g [N, m, n]`` (released Muon schedule, 5 iterations)."""
    tall = g.shape[-2] > g.shape[-1]
    x = g.transpose(-2, -1) if tall else g
    x = x / (torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True) + 1e-7)
    for a, b, c in NS_COEFFS:
        A = x @ x.transpose(-2, -1)
        x = a * x + (b * A + c * (A @ A)) @ x
    return x.transpose(-2, -1) if tall else x


def row_norms(ws: FastWeights) -> FastWeights:
    """``||W||`` along the input dimension (one value per output row) of each matrix: the restore targets."""
    return tuple(w.norm(dim=2, keepdim=True) for w in ws)  # type: ignore[return-value]


def fast_weight_step(ws: FastWeights, mains: FastWeights | None, moms: FastWeights | None, dws: FastWeights,
                     mbar: Tensor | None, norms: FastWeights, *, use_muon: bool, joint_muon: bool = False
                     ) -> tuple[FastWeights, FastWeights | None, FastWeights | None]:
    """One chunk's update: momentum (``mbar [N, 1, 1]`` = the chunk's mean momentum), Muon, add, norm restore.
    Returns the new ``(weights, prenorm mains or None, momenta or None)``."""
    if moms is not None:
        dws = tuple(dw + mbar * m for dw, m in zip(dws, moms))  # type: ignore[assignment]
        moms = dws
    if use_muon:
        dw0, dw1, dw2 = dws
        if joint_muon:
            dH = dw0.shape[1]
            dw02 = newton_schulz5(torch.cat([dw0, dw2], 1))
            dws = (dw02[:, :dH], newton_schulz5(dw1), dw02[:, dH:])
        else:
            dws = (newton_schulz5(dw0), newton_schulz5(dw1), newton_schulz5(dw2))
    base = mains if mains is not None else ws
    summed = tuple(b + dw for b, dw in zip(base, dws))
    new = tuple(s / (s.norm(dim=2, keepdim=True) + 1e-5) * n for s, n in zip(summed, norms))
    return new, (summed if mains is not None else None), moms  # type: ignore[return-value]


def _select(full: Tensor, new: FastWeights | None, old: FastWeights | None) -> FastWeights | None:
    if new is None or old is None:
        return new
    f = full.view(-1, 1, 1)
    return tuple(torch.where(f, a, b) for a, b in zip(new, old))  # type: ignore[return-value]


def masked_chunk_update(ws: FastWeights, mains: FastWeights | None, moms: FastWeights | None, k: Tensor, v: Tensor,
                        lr: Tensor, m: Tensor | None, full: Tensor | None, norms: FastWeights, *, chunk_size: int,
                        use_muon: bool, joint_muon: bool = False
                        ) -> tuple[FastWeights, FastWeights | None, FastWeights | None]:
    """The update by one chunk (``k, v [N, C, dh]``, ``lr [N, C, 3]``, ``m [N, C, 1]`` or None), kept only for
    the rows where ``full [N]`` (all rows when None)."""
    dws = swiglu_descent(*ws, k, v, lr[..., 0:1], lr[..., 1:2], lr[..., 2:3])
    mbar = m.sum(1, keepdim=True) / chunk_size if moms is not None else None  # the chunk's mean momentum gate
    new, new_mains, new_moms = fast_weight_step(ws, mains, moms, dws, mbar, norms, use_muon=use_muon,
                                                joint_muon=joint_muon)
    if full is None:
        return new, new_mains, new_moms
    return _select(full, new, ws), _select(full, new_mains, mains), _select(full, new_moms, moms)  # type: ignore


def lact_chunked(ws: FastWeights, q: Tensor, k: Tensor, v: Tensor, lr: Tensor, m: Tensor | None, *, chunk_size: int,
                 use_muon: bool, joint_muon: bool = False, norms: FastWeights, mains: FastWeights | None = None,
                 moms: FastWeights | None = None, lengths: Tensor | None = None, final_update: bool = True
                 ) -> tuple[Tensor, FastWeights, FastWeights | None, FastWeights | None]:
    """Apply-then-update over chunk-aligned rows: ``q, k, v [N, L, dh]``, ``lr [N, L, 3]`` (lr0, lr1, lr2),
    ``m [N, L, 1]`` (momentum gates, or None), ``L`` a multiple of ``chunk_size`` unless ``lengths`` is None.

    Chunk ``c`` of each row is read with the weights updated by chunks ``< c``; it updates them when it is full
    (``lengths [N]`` valid tokens per row, default ``L``). ``final_update=False`` skips the update of the last
    chunk (the parallel forward needs no weights after it, as the reference). Returns the outputs ``[N, L, dh]``
    and the final ``(weights, prenorm mains, momenta)``."""
    N, L, _ = q.shape
    C = chunk_size
    nC = -(-L // C)
    outs = []
    for c in range(nC):
        sl = slice(c * C, (c + 1) * C)
        outs.append(swiglu_apply(*ws, q[:, sl]))
        if c == nC - 1 and not final_update:
            break
        if k.shape[1] < (c + 1) * C and lengths is None:
            break  # a trailing partial chunk never updates
        full = None if lengths is None else lengths >= (c + 1) * C
        ws, mains, moms = masked_chunk_update(ws, mains, moms, k[:, sl], v[:, sl], lr[:, sl],
                                              None if m is None else m[:, sl], full, norms, chunk_size=C,
                                              use_muon=use_muon, joint_muon=joint_muon)
    return torch.cat(outs, 1), ws, mains, moms


def to_heads(x: Tensor, nh: int) -> Tensor:
    """``[R, L, nh * f] -> [R * nh, L, f]`` (heads h-major, as the reference's ``(n_h d)``)."""
    R, L, _ = x.shape
    return x.view(R, L, nh, -1).transpose(1, 2).reshape(R * nh, L, -1)


def from_heads(x: Tensor, nh: int) -> Tensor:
    """``[R * nh, L, f] -> [R, L, nh * f]``."""
    RN, L, f = x.shape
    return x.view(RN // nh, nh, L, f).transpose(1, 2).reshape(RN // nh, L, nh * f)


def document_index(real: Tensor | None, seq_idx: Tensor | None, shape: tuple[int, int] | None = None
                   ) -> tuple[Tensor, Tensor]:
    """Real tokens before each slot in its document, and where documents start (``[B, T]`` each); ``real`` None:
    no padding; ``seq_idx`` None: one document per row (``shape`` needed when both are None)."""
    ref = real if real is not None else seq_idx
    B, T = ref.shape if ref is not None else shape  # type: ignore[misc]
    dev = ref.device if ref is not None else None
    real = torch.ones(B, T, dtype=torch.bool, device=dev) if real is None else real
    start = torch.zeros(B, T, dtype=torch.bool, device=dev)
    start[:, 0] = True
    if seq_idx is not None:
        start[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    before = real.long().cumsum(1) - real.long()
    return before - torch.where(start, before, torch.zeros_like(before)).cummax(1).values, start


def ragged_layout(real: Tensor, seq_idx: Tensor | None, offset: Tensor | None, chunk_size: int
                  ) -> tuple[Tensor, Tensor, int, int, Tensor]:
    """Place the real tokens of ``[B, T]`` rows into chunk-aligned rows, one per document.

    ``real [B, T]`` bool; ``seq_idx [B, T]`` document ids (a new document where the id changes) or None (one
    document per row); ``offset [B]`` tokens of the row's current chunk already absorbed (a state; only without
    ``seq_idx``). Returns ``(src, dst, D, L, lengths)``: token ``src[i]`` of the flattened ``[B * T]`` goes to
    slot ``dst[i]`` of the flattened ``[D * L]`` layout (``L`` a multiple of ``chunk_size``), and ``lengths [D]``
    counts each document's tokens including the offset. Reads sizes on the host (prefill only)."""
    idx, start = document_index(real, seq_idx)
    doc = start.flatten().long().cumsum(0).view_as(idx) - 1  # global document id of every slot
    D = int(doc[-1, -1]) + 1
    lengths = torch.zeros(D, dtype=torch.long, device=real.device).index_add_(0, doc.flatten(), real.flatten().long())
    if offset is not None:
        idx = idx + offset[:, None]
        lengths = lengths + offset
    L = max(1, -(-int(lengths.max()) // chunk_size)) * chunk_size
    src = real.flatten().nonzero().squeeze(1)
    dst = doc.flatten()[src] * L + idx.flatten()[src]
    return src, dst, D, L, lengths
