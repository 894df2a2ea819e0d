r"""InfLLM-v2 prefill on the CPU: stage 2 (attention over per-query selected blocks, computed block-stationary) and
stage 1 (block scores and top-k in query chunks).

The native half, ``cpu.cpp`` (built by :mod:`zoo.kernels.native` where a C++ compiler is found; fp32 math, head dim
and block size multiples of 16): stage 2 without gradient in the same block-stationary order, one fused pass per
(query, block) pair with no gathered copies; stage 1 (scores, pooling and the top-k) in one pass per query. The torch
code below is its fallback, the differentiable path and the fp64 path.

Same result as :func:`~zoo.kernels.infllmv2.reference.sparse_attention_ref` (the oracle), a different schedule.
The reference gathers, for every query, the ``W`` selected blocks of K and V (``2 W bs D`` values per query, 2 MB at
``W = 64``, ``bs = 64``, ``D = 64``). Here the (query, block) *pairs* are sorted by block and cut into chunks of
``chunk`` queries that selected the same block; a chunk gathers its queries (``G`` heads each: the GQA group is the
M dimension, ``chunk * G`` rows) and reads ONE block of K and V::

    S = (q * scale)[chunk*G, D] @ K_b^T [D, bs]          (-inf at keys after the query: diagonal chunks only)
    P = exp(max(S - M, FLOOR));  l += rowsum(P);  o += P @ V_b                          [chunk*G, D]
    o_i = o / l                                                                  (online softmax per (query, head))

``M`` is each (query, head)'s running maximum over the pairs seen so far: when a batch of chunks raises it, the
accumulators of the rows it raised are rescaled by ``exp(M_old - M_new)`` first (flash-attention's online softmax,
with the pairs of one query spread over many batches). The diagonal chunks run first and set ``M``; the later
batches shift by it without a max pass while their exponents stay below ``CEIL = 50`` (``e^50`` cannot overflow
the sums, and a positive exponent loses no precision), and a batch that reaches ``CEIL`` is redone exactly. Per
pair this moves ``G D`` values of q and of the output instead of ``2 bs D`` values of K and V, and every matmul has
``chunk * G`` rows. ``FLOOR = -60`` keeps ``exp`` and the second matmul out of denormal numbers (torch's vectorised
``exp`` is ~100x slower below -87, and denormal products stall the matmul); the terms it changes are below ``e^-60``
of the row maximum, far under fp32 and fp64 resolution (their gradient becomes 0).

Queries are processed in segments of about ``seg_pairs`` (query, block) pairs (a segment's accumulators are
``G D`` values per query; more pairs per segment = fuller chunks). Without gradient, segments run on
``torch.get_num_threads()`` Python threads with intra-op parallelism 1 (torch ops release the GIL): many medium-sized
ops, each a 2-thread OpenMP region, cost a scheduler time slice per op when other processes load the cores;
independent segments do not. The thread count is restored afterwards. With gradient (training) the segments run one
after another, differentiably (the partial softmaxes of a segment are materialised and merged, no in-place
accumulation). Prefill only: building the chunks needs host synchronisation (decode uses the reference's per-query
path).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from zoo.kernels.infllmv2.cpu_native import attend_native, native_kernel, stage1_native
from zoo.kernels.infllmv2.reference import _blocks_view, forced_blocks
from zoo.kernels.native import run_threaded, transposed_blocks

__all__ = ["sparse_attention_cpu", "select_cpu", "block_scores_cpu", "select_blocks_cpu", "run_threaded", "FLOOR"]

FLOOR = -60.0
CEIL = 50.0


def sparse_attention_cpu(q: Tensor, k: Tensor, v: Tensor, qpos: Tensor, idx: Tensor, *, block_size: int,
                         scale: float | None = None, chunk: int = 16, seg_pairs: int = 1 << 15,
                         batch_rows: int = 1 << 13, threads: int | None = None, native: bool | None = None) -> Tensor:
    """Attention of ``q [B, H, Tq, D]`` (positions ``qpos [B, Tq]``) over the keys ``t <= qpos`` of the selected blocks
    ``idx [B, Hkv, Tq, W]`` (-1 padded) of ``k, v [B, Hkv, N, D]`` -> ``[B, H, Tq, D]`` in q.dtype (fp32 math for half
    inputs, fp64 stays fp64). A query without a visible key returns zeros. ``chunk``: queries per matmul (its rows are
    ``chunk * G``); ``seg_pairs``: (query, block) pairs per segment; ``batch_rows``: matmul rows per op (L2-sized);
    ``threads``: Python worker threads without gradient (default ``torch.get_num_threads()``).

    ``native``: without gradient, below fp64, with ``D`` and ``block_size`` multiples of 16, the fused C++ kernel
    (``cpu.cpp``, :mod:`zoo.kernels.native`) runs instead of the torch schedule when it builds (``None``: as
    ``ZOO_NATIVE`` says; ``True``: required; ``False``: the torch schedule)."""
    B, H, Tq, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    if H % Hkv:
        raise ValueError(f"sparse_attention_cpu: {H} query heads are not a multiple of {Hkv} KV heads")
    G, W, bs = H // Hkv, idx.shape[-1], block_size
    nb = -(-N // bs)
    scale = D**-0.5 if scale is None else scale
    cdt = torch.promote_types(q.dtype, torch.float32)
    dev = q.device
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if native is not False:
        fits = not grad and dev.type == "cpu"
        lib = native_kernel(D, bs, cdt, required=bool(native)) if fits else None
        if lib is not None:
            return attend_native(lib, q, k, v, qpos, idx, bs, scale, threads)
        if native and not fits:
            raise ValueError("sparse_attention_cpu: native=True needs CPU tensors and no gradient")
    R = B * Hkv * Tq  # query rows (b, h, t); row R is a zero query for the chunks' padding slots
    kb, vb = _blocks_view(k.to(cdt), bs), _blocks_view(v.to(cdt), bs)  # [B*Hkv*nb, bs, D]
    qr = (q.to(cdt) * scale).view(B, Hkv, G, Tq, D).transpose(2, 3).reshape(R, G * D)
    qr = torch.cat([qr, qr.new_zeros(1, G * D)])
    blk = idx.long()
    qp = qpos[:, None, :, None]
    valid = ((blk >= 0) & (blk * bs <= qp)).reshape(R, W)  # pairs with a visible key
    diag = ((blk + 1) * bs - 1 > qp).reshape(R, W)  # pairs whose block ends after the query: masked chunks
    base = (torch.arange(B, device=dev)[:, None] * Hkv + torch.arange(Hkv, device=dev)) * nb  # [B, Hkv]
    nrows = B * Hkv * nb
    # chunk order: the diagonal (masked) chunks first, then the blocks from the latest down; a query's running max is
    # then mostly set by its first chunks (its own block, its recent blocks), so few accumulators need rescaling
    key = (nrows - 1 - (base[:, :, None, None] + blk.clamp(min=0)).reshape(R, W)) + (~diag) * nrows
    qposr = torch.cat([qpos[:, None, :].expand(B, Hkv, Tq).reshape(R), qpos.new_full((1,), -1)])
    per_q = valid.sum(-1)
    cum = per_q.cumsum(0)
    total = int(cum[-1]) if R else 0
    cuts = torch.searchsorted(cum, torch.arange(seg_pairs, max(total, seg_pairs), seg_pairs, device=dev),
                              right=True).tolist()
    starts = sorted({0, *[c for c in cuts if c < R]})
    segs = list(zip(starts, starts[1:] + [R]))
    ctx = _Ctx(qr, kb, vb, qposr, G, D, bs, nb, chunk, cdt)

    def chunks(r0: int, r1: int) -> tuple[Tensor, Tensor, int, list[int]]:
        """The segment's chunks: query rows ``cq [nC, chunk]`` (R = padding), block rows ``cblk [nC]``, the count of
        masked chunks (they come first) and the batch bounds (a batch never mixes the two kinds)."""
        keys = key[r0:r1].reshape(-1)[valid[r0:r1].reshape(-1)]
        qq = torch.arange(r0, r1, device=dev).repeat_interleave(per_q[r0:r1])
        keys, order = torch.sort(keys, stable=True)
        qq = qq[order]
        gkey, counts = torch.unique_consecutive(keys, return_counts=True)
        nch = (counts + chunk - 1) // chunk  # chunks of each (block, masked) group
        gid = torch.repeat_interleave(torch.arange(gkey.numel(), device=dev), counts)
        rank = torch.arange(keys.numel(), device=dev) - (counts.cumsum(0) - counts)[gid]
        slot = ((nch.cumsum(0) - nch)[gid] + torch.div(rank, chunk, rounding_mode="floor")) * chunk + rank % chunk
        nC = int(nch.sum())
        cq = torch.full((nC * chunk,), R, dtype=torch.long, device=dev).index_put_((slot,), qq).view(nC, chunk)
        ckey = torch.repeat_interleave(gkey, nch)
        n_masked = int((ckey < nrows).sum())
        step = max(1, batch_rows // (chunk * G))
        bounds = sorted({*range(0, n_masked, step), *range(n_masked, nC, step), nC})
        return cq, nrows - 1 - ckey % nrows, n_masked, bounds

    def segment(r0: int, r1: int) -> Tensor:  # output rows [r1 - r0, G * D]
        cq, cblk, n_masked, bounds = chunks(r0, r1)
        return (_merged if grad else _online)(ctx, cq, cblk, n_masked, bounds, r0, r1 - r0)

    if grad:
        outs = [segment(r0, r1) for r0, r1 in segs]
        o = torch.cat(outs) if len(outs) > 1 else outs[0]
    else:
        o = torch.empty(R, G * D, dtype=cdt, device=dev)

        def run(s: tuple[int, int]) -> None:
            o[s[0]: s[1]] = segment(*s)

        run_threaded(run, segs, threads)
    return o.view(B, Hkv, Tq, G, D).transpose(2, 3).reshape(B, H, Tq, D).to(q.dtype)


class _Ctx:
    def __init__(self, qr: Tensor, kb: Tensor, vb: Tensor, qposr: Tensor, G: int, D: int, bs: int, nb: int,
                 chunk: int, cdt: torch.dtype) -> None:
        self.qr, self.kb, self.vb, self.qposr = qr, kb, vb, qposr
        self.G, self.D, self.bs, self.nb, self.chunk, self.cdt = G, D, bs, nb, chunk, cdt
        self.kbT = kb.transpose(1, 2).contiguous()  # [rows, D, bs]: K^T blocks read row by row


def _scores(c: _Ctx, cq: Tensor, cblk: Tensor, masked: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """Scores ``S [n, chunk*G, bs]`` of a batch of chunks, their V blocks and the mask of keys after the query."""
    n = cq.shape[0]
    Qg = c.qr.index_select(0, cq.reshape(-1)).view(n, c.chunk * c.G, c.D)
    S = torch.bmm(Qg, c.kbT.index_select(0, cblk))
    hide = None
    if masked:  # keys after each slot's query (every key of a padding slot, position -1)
        kpos = (cblk[:, None] % c.nb) * c.bs + torch.arange(c.bs, device=cblk.device)  # [n, bs]
        hide = kpos[:, None, None, :] > c.qposr[cq][:, :, None, None]
        hide = hide.expand(n, c.chunk, c.G, c.bs).reshape(n, c.chunk * c.G, c.bs)
    return S, c.vb.index_select(0, cblk), hide


def _online(c: _Ctx, cq: Tensor, cblk: Tensor, n_masked: int, bounds: list[int], r0: int, nq: int) -> Tensor:
    """No-gradient path: online softmax over the batches, accumulated per (query, head) of the segment: outputs
    ``o [nq, G, D]`` and row sums ``l [nq, G]``.

    The masked (diagonal) batches come first and set every query's running max ``M`` exactly. The other batches
    shift by the ``M`` they find (no max pass): their exponents ``S - M`` may be positive, which is still exact
    while they stay below ``CEIL`` (no overflow; the older terms keep their relative precision). A batch where some
    row reaches ``CEIL`` (its sum reaches ``e^CEIL``), or meets a query with no max yet, is redone with the max."""
    G, D, dev = c.G, c.D, cq.device
    qi_all = (cq - r0).clamp_(max=nq)  # [nC, chunk] segment query of each slot (padding -> nq)
    qh_all = (qi_all[..., None] * G + torch.arange(G, device=dev)).view(cq.shape[0], -1)  # [nC, chunk*G]
    M = torch.full(((nq + 1) * G,), -math.inf, dtype=c.cdt, device=dev)  # running max per (query, head); +1: padding
    o = torch.zeros(nq + 1, G * D, dtype=c.cdt, device=dev)
    L = torch.zeros((nq + 1) * G, dtype=c.cdt, device=dev)
    pad = torch.arange(nq * G, (nq + 1) * G, device=dev)
    shift = M.index_fill(0, pad, 0.0)  # fast-path shifts: -inf (a query with no max yet) makes the batch exact
    big = math.exp(CEIL)
    for c0, c1 in zip(bounds[:-1], bounds[1:]):
        qh, qi = qh_all[c0:c1].reshape(-1), qi_all[c0:c1].reshape(-1)
        n, rows = c1 - c0, c.chunk * G
        if c0 >= n_masked:  # shift by the current max, no max pass
            S, V, _ = _scores(c, cq[c0:c1], cblk[c0:c1], False)
            S = S.sub_(shift[qh].view(n, rows, 1)).clamp_(FLOOR, CEIL).exp_()
            sums = S.sum(-1).view(-1)
            if bool((sums < big).all()):  # (NaN: redone, and NaN again)
                L.index_add_(0, qh, sums)
                o.index_add_(0, qi, torch.bmm(S, V).view(-1, G * D))
                continue
        S, V, hide = _scores(c, cq[c0:c1], cblk[c0:c1], c0 < n_masked)
        if hide is not None:
            S.masked_fill_(hide, -math.inf)
        m = S.amax(-1)  # [n, chunk*G]
        M_new = M.scatter_reduce(0, qh, m.view(-1), "amax")
        raised = torch.nonzero((M_new > M) & (M > -math.inf)).squeeze(1)  # accumulators to rescale
        if raised.numel():  # rescale; a drop below FLOOR flushes to 0 (no denormal accumulators)
            drop = M[raised] - M_new[raised]
            alpha = torch.exp(drop.clamp(min=FLOOR)).masked_fill_(drop < FLOOR, 0.0)
            o2 = o.view(-1, D)
            o2.index_copy_(0, raised, o2.index_select(0, raised).mul_(alpha[:, None]))
            L.index_copy_(0, raised, L.index_select(0, raised).mul_(alpha))
        M = M_new
        shift = M.index_fill(0, pad, 0.0)
        # exp of -inf or < -87 is slow: masked keys are zeroed after it
        S.sub_(M.masked_fill(M == -math.inf, 0.0)[qh].view_as(m)[..., None]).clamp_(min=FLOOR)
        S.exp_()
        if hide is not None:
            S.masked_fill_(hide, 0.0)
        L.index_add_(0, qh, S.sum(-1).view(-1))
        o.index_add_(0, qi, torch.bmm(S, V).view(-1, G * D))
    L = L[: nq * G].view(nq, G, 1)
    return (o[:nq].view(nq, G, D) / torch.where(L > 0, L, 1.0)).view(nq, G * D)


def _merged(c: _Ctx, cq: Tensor, cblk: Tensor, n_masked: int, bounds: list[int], r0: int, nq: int) -> Tensor:
    """Differentiable path: a partial softmax per chunk row (local max ``m``, sum ``l``, output ``P @ V``), merged per
    (query, head) with the weights ``exp(m - max m)``; no in-place update of anything autograd saved."""
    G, D, dev = c.G, c.D, cq.device
    parts = []
    for c0, c1 in zip(bounds[:-1], bounds[1:]):
        S, Vg, hide = _scores(c, cq[c0:c1], cblk[c0:c1], c0 < n_masked)
        if hide is not None:
            S = S.masked_fill(hide, -math.inf)
        m = S.detach().amax(-1, keepdim=True)
        m = m.masked_fill(m == -math.inf, 0.0)
        P = torch.clamp(S - m, min=FLOOR)
        P = torch.exp(P if hide is None else P.masked_fill(hide, -math.inf))
        parts.append((m, P.sum(-1), torch.bmm(P, Vg)))
    m = torch.cat([p[0] for p in parts]).reshape(-1)
    lf = torch.cat([p[1] for p in parts]).reshape(-1)
    Op = torch.cat([p[2] for p in parts])
    qi = (cq - r0).clamp_(max=nq).reshape(-1)
    qh = (qi[:, None] * G + torch.arange(G, device=dev)).reshape(-1)
    mf = torch.where(lf.detach() > 0, m, -math.inf)
    M = torch.full(((nq + 1) * G,), -math.inf, dtype=c.cdt, device=dev).scatter_reduce_(0, qh, mf, "amax")
    M = M.masked_fill_(M == -math.inf, 0.0)
    w = torch.exp(torch.clamp(mf - M[qh], min=FLOOR)).masked_fill_(mf == -math.inf, 0.0)
    Opw = (Op.reshape(-1, G, D) * w.view(-1, G, 1)).reshape(-1, G * D)
    acc = torch.zeros(nq + 1, G * D, dtype=c.cdt, device=dev).index_add(0, qi, Opw)
    L = torch.zeros((nq + 1) * G, dtype=c.cdt, device=dev).index_add(0, qh, lf * w)[: nq * G]
    return (acc[:nq].view(nq, G, D) / torch.where(L > 0, L, 1.0).view(nq, G, 1)).view(nq, G * D)


def _exp_floor(x: Tensor) -> Tensor:
    """``exp(x)`` in place, with the terms below ``e^FLOOR`` set to 0 (not computed: torch's ``exp`` takes a ~100x
    slower path for inputs below -87, and the CUDA kernel's fast-math ``exp`` flushes such denormals to 0 anyway):
    ``exp(max(x, FLOOR)) - e^FLOOR``, exact for those terms, off by ``e^FLOOR`` (8.7e-27) for the others."""
    return x.clamp_(min=FLOOR).exp_().sub_(math.exp(FLOOR))


def block_scores_cpu(q: Tensor, c1: Tensor, c2: Tensor | None, v1: Tensor, e1: Tensor, v2: Tensor | None, *,
                     block_size: int, kernel_stride: int, num_blocks: int, scale: float,
                     score_dtype: torch.dtype | None = None) -> Tensor:
    """:func:`~zoo.kernels.infllmv2.reference.block_scores_ref` with fewer passes: q scaled before the matmuls,
    the normaliser subtracted in place, masks applied only to the columns some query of the call cannot see
    (``[min count, max count)``), compressed keys beyond every query's count skipped, max pooling on a
    ``[.., num_blocks, st]`` view. Same values, except terms ``exp(.) < e^FLOOR`` of the sums, which count as 0
    (:func:`_exp_floor`): a block score changes by at most ``G e^FLOOR`` (1e-25), which can only reorder blocks whose
    scores are that small for every head (they then tie at 0: lower block first). Prefill-sized calls (host
    synchronisations for the counts)."""
    B, H, Tq, D = q.shape
    Hkv = c1.shape[1]
    G = H // Hkv
    st = block_size // kernel_stride
    cdt = torch.promote_types(q.dtype, torch.float32)
    dev = q.device
    n1 = min(c1.shape[2], int(e1.max()) if e1.numel() else 0)  # entries no query can have are -inf anyway
    qg = (q.to(cdt) * scale).reshape(B * Hkv, G * Tq, D)  # rows (g, t), scaled

    def tail_fill(x: Tensor, count: Tensor, value: float) -> Tensor:  # x [B*Hkv, G?*Tq, n]: value at j >= count
        lo = int(count.min()) if count.numel() else 0
        if lo < x.shape[-1]:
            j = torch.arange(lo, x.shape[-1], device=dev)
            rows = x.shape[1] // Tq
            hide = (j >= count[:, None, None, :, None]).expand(B, Hkv, rows, Tq, j.numel())
            x.view(B, Hkv, rows, Tq, -1)[..., lo:].masked_fill_(hide, value)
        return x

    if c2 is None:
        cn, vn = c1[:, :, :n1], v1
    else:
        assert v2 is not None
        cn, vn = c2[:, :, : min(c2.shape[2], int(v2.max()) if v2.numel() else 0)], v2
    if cn.shape[2]:  # lse [B*Hkv, G*Tq, 1]
        ln = torch.bmm(qg, cn.to(cdt).reshape(B * Hkv, cn.shape[2], D).transpose(1, 2))
        top = tail_fill(ln, vn, -math.inf).amax(-1, keepdim=True)
        top = top.masked_fill_(top == -math.inf, 0.0)
        lse = tail_fill(_exp_floor(ln.sub_(top)), vn, 0.0).sum(-1, keepdim=True).log_().add_(top)
        del ln
    else:
        lse = qg.new_full((B * Hkv, G * Tq, 1), -math.inf)
    c1t = c1[:, :, :n1].to(cdt).reshape(B * Hkv, n1, D).transpose(1, 2)
    p = torch.bmm(qg, c1t).sub_(lse)  # q . C1 * scale - lse
    p = tail_fill(_exp_floor(p), v1, 0.0)  # lse = -inf: the row is +inf (no NaN)
    S = p.view(B, Hkv, G, Tq, n1).sum(2)  # [B, Hkv, Tq, n1]
    del p
    S = tail_fill(S.view(B * Hkv, Tq, n1), e1, -math.inf).view(B, Hkv, Tq, n1)
    if score_dtype is not None and torch.finfo(score_dtype).bits < 32:
        S = S.to(score_dtype)
    S = S.float()
    L = num_blocks * st
    S = torch.nn.functional.pad(S, (0, L - n1), value=-math.inf) if L > n1 else S[..., :L]
    S = S.view(B, Hkv, Tq, num_blocks, st)
    pooled = S.amax(-1)
    prev = torch.nn.functional.pad(S[..., :-1, st - 1], (1, 0), value=-math.inf)  # S[b*st - 1]
    return torch.maximum(pooled, prev)


def select_blocks_cpu(bs: Tensor, qpos: Tensor, *, block_size: int, init_blocks: int, local_blocks: int, budget: int,
                      width: int | None = None, dense: Tensor | None = None) -> Tensor:
    """:func:`~zoo.kernels.infllmv2.reference.select_blocks` (same indices) with one ``topk`` instead of a stable
    sort over all blocks: the ranking key is made unique by packing the score's order-preserving integer image and
    the block index (lower block first on ties) into one int64."""
    B, Hkv, Tq, nB = bs.shape
    W = width or budget
    b, bq, forced = forced_blocks(qpos, nB, block_size=block_size, init_blocks=init_blocks,
                                  local_blocks=local_blocks, dense=dense)
    fin = torch.finfo(torch.float32)
    key = torch.clamp(bs.float(), min=fin.min, max=fin.max).add_(0.0)  # -0.0 -> 0.0 (they tie in the reference)
    key = key.masked_fill_(forced, math.inf).masked_fill_(b > bq, -math.inf)
    bits = key.view(torch.int32)
    order = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).long()  # monotone in the float value
    packed = (order << 32) | (nB - 1 - b)  # ties: lower block first
    k = min(W, nB)
    top = torch.topk(packed, k, dim=-1, sorted=True).values
    blk = nB - 1 - (top & 0xFFFFFFFF)
    ok = (top >> 32) > int(torch.tensor(-math.inf).view(torch.int32) ^ 0x7FFFFFFF)  # not a future block
    if W > budget:
        rank = torch.arange(k, device=bs.device)
        ok = ok & ((rank < budget) if dense is None else ((rank < budget) | dense[:, None, :, None]))
    else:
        ok = ok & (torch.arange(k, device=bs.device) < budget)
    idx = torch.where(ok, blk, nB + W).sort(dim=-1).values
    idx = torch.where(idx < nB + W, idx, -1).to(torch.int32)
    if k < W:
        idx = torch.nn.functional.pad(idx, (0, W - k), value=-1)
    return idx


def select_cpu(qs: Tensor, qpos: Tensor, c1: Tensor, c2: Tensor | None, v1: Tensor, e1: Tensor, v2: Tensor | None,
               *, block_size: int, kernel_stride: int, num_blocks: int, scale: float, init_blocks: int,
               local_blocks: int, budget: int, width: int, score_dtype: torch.dtype | None = None,
               dense: Tensor | None = None, rows: int = 1 << 20, threads: int | None = None) -> Tensor:
    """Stage 1 for a prefill on the CPU: block scores (:func:`block_scores_cpu`) and selection
    (:func:`select_blocks_cpu`) -> ``[B, Hkv, Tq, width]``, in query chunks whose score matrix (``G * chunk *``
    visible compressed keys) holds about ``rows`` values (4 MB: fewer, larger ops, as every op holds the GIL a
    moment; each chunk reads only the compressed keys its queries can see), on :func:`run_threaded` threads without
    gradient. The compressed keys are copied once to a ``[.., D, N]`` layout: the score matmuls then read ``K^T`` as
    rows (~35% faster than a transposed view).

    Where the native kernel applies (:func:`native_kernel`), it computes each chunk's scores and selection in one call
    (the pooled scores only, when ``score_dtype`` rounds them first), in chunks of equal work, 16 per thread."""
    B, H, Tq, D = qs.shape
    Hkv = c1.shape[1]
    G = H // Hkv
    out = torch.empty(B, Hkv, Tq, width, dtype=torch.int32, device=qs.device)
    cdt = torch.promote_types(qs.dtype, torch.float32)
    lib = native_kernel(D, block_size, cdt) if qs.device.type == "cpu" else None
    rounded = score_dtype is not None and torch.finfo(score_dtype).bits < 32  # scores rounded before the selection
    if lib is not None:
        c1T, c2T = transposed_blocks(c1, 64), None if c2 is None else transposed_blocks(c2, 64)
    else:  # the same [.., N, D] views over a [.., D, N] layout
        c1 = c1.transpose(-1, -2).contiguous().transpose(-1, -2)
        c2 = None if c2 is None else c2.transpose(-1, -2).contiguous().transpose(-1, -2)
    n_all = max(1, c1.shape[2] + (0 if c2 is None else c2.shape[2]))
    # chunk bounds from the counts (host side): more queries per chunk where they see fewer keys
    e1_max = e1.amax(0).tolist() if Tq else []
    bounds, t0 = [0], 0
    if lib is not None:  # no score matrix to bound: chunks of equal work (compressed keys seen), 16 per thread
        work = torch.tensor(e1_max, dtype=torch.float64).add_(1).cumsum(0)
        parts = 16 * max(1, torch.get_num_threads() if threads is None else threads)
        cuts = torch.searchsorted(work, work[-1] * torch.arange(1, parts, dtype=torch.float64) / parts) if Tq else []
        bounds = sorted({0, Tq, *(int(c) for c in cuts if 0 < c < Tq)})
    while t0 < Tq and lib is None:
        n = max(1, min(e1_max[min(Tq - 1, t0 + 255)], n_all) + 1)
        t0 = min(Tq, t0 + max(1, rows // (G * n)))
        bounds.append(t0)

    def run(span: tuple[int, int]) -> None:
        a, z = span
        sl = slice(a, z)
        if lib is not None:
            native_args = (lib, qs[:, :, sl], c1T, c2T, v1[:, sl], e1[:, sl], None if v2 is None else v2[:, sl])
            native_kw = dict(st=block_size // kernel_stride, num_blocks=num_blocks, scale=scale)
            if not rounded:  # scores and selection in the kernel
                out[:, :, sl] = stage1_native(*native_args, **native_kw, select=dict(
                    qpos=qpos[:, sl], dense=None if dense is None else dense[:, sl], block_size=block_size,
                    init_blocks=init_blocks, local_blocks=local_blocks, budget=budget, width=width))
                return
            sc = stage1_native(*native_args, **native_kw).to(score_dtype).float()  # rounding commutes with max
        else:
            k1 = c1[:, :, : int(e1[:, sl].max())]
            k2 = None if c2 is None else c2[:, :, : int(v2[:, sl].max())]
            sc = block_scores_cpu(qs[:, :, sl], k1, k2, v1[:, sl], e1[:, sl], None if v2 is None else v2[:, sl],
                                  block_size=block_size, kernel_stride=kernel_stride, num_blocks=num_blocks,
                                  scale=scale, score_dtype=score_dtype)
        out[:, :, sl] = select_blocks_cpu(sc, qpos[:, sl], block_size=block_size, init_blocks=init_blocks,
                                          local_blocks=local_blocks, budget=budget, width=width,
                                          dense=None if dense is None else dense[:, sl])

    run_threaded(run, list(zip(bounds[:-1], bounds[1:])), threads)
    return out
