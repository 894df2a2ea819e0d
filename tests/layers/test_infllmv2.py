"""InfLLM-v2: an independent brute-force reference (per query: build the visible key set from the algorithm's
definition with Python loops, then softmax), equality with full attention when every block is selected, the
reference prefill's quirks and the gradient. Three modes, padding, reorder, ... are the contract suite's
(tests/contract, zoo.testing.check_mixer over InfLLMv2.example_args)."""

import math

import pytest
import torch

from tests.helpers import needs_compiler
from zoo.kernels.infllmv2 import block_scores_ref
from zoo.layers.attention import Attention
from zoo.layers.infllmv2 import InfLLMv2

D_MODEL = 32
HEADS = dict(num_heads=4, num_kv_heads=2)
BASE = dict(kernel_size=4, kernel_stride=2, block_size=8, init_blocks=1, window_size=8, topk=3, dense_len=16)


def make(dtype=torch.float64, seed=0, heads=HEADS, **args):
    torch.manual_seed(seed)
    return InfLLMv2(D_MODEL, 0, **heads, **args).to(dtype)


# ---------------------------------------------------------------------------------------------- brute force
def rope(x, pos, theta=10000.0):
    """Rotate-half RoPE; angles, cos and sin in fp32 (as transformers and the zoo), applied in x's dtype."""
    D = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    ang = pos[:, None].float() * inv
    cos, sin = (torch.cat([a, a], -1).to(x.dtype) for a in (ang.cos(), ang.sin()))
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def brute_force(m: InfLLMv2, x: torch.Tensor, lengths=None) -> torch.Tensor:
    """The mixer's output from its definition: one query at a time, the selected blocks as a Python set.
    ``lengths``: real tokens per row, right-aligned (left padding); padded outputs are left at 0."""
    B, T, _ = x.shape
    H, Hkv, D = m.num_heads, m.num_kv_heads, m.head_dim
    G, bsz, s, ks = H // Hkv, m.block_size, m.kernel_stride, m.kernel_size
    st, scale, local = bsz // s, D**-0.5, m.window_size // bsz
    budget = m.topk + (local if m.variant == "v2" else 0)
    W = {n: p.detach().double() for n, p in m.named_parameters()}
    out = torch.zeros(B, T, H * D, dtype=torch.float64)
    for b in range(B):
        L = T if lengths is None else int(lengths[b])
        xb = x[b, T - L:].double()
        pos = torch.arange(L)
        q0 = (xb @ W["q_proj.weight"].T).view(L, H, D)
        k0 = (xb @ W["k_proj.weight"].T).view(L, Hkv, D)
        v = (xb @ W["v_proj.weight"].T).view(L, Hkv, D)
        q, k = rope(q0.transpose(0, 1), pos), rope(k0.transpose(0, 1), pos)  # [H, L, D], [Hkv, L, D]
        qsel, ksel = (q0.transpose(0, 1), k0.transpose(0, 1)) if m.use_nope else (q, k)

        def windows(h, size, stride, L=L, ksel=ksel):
            n = (L - size) // stride + 1 if L >= size else 0
            return [ksel[h, j * stride: j * stride + size].mean(0) for j in range(n)], n

        def n_visible(p, size, stride, n, L=L):
            if m.reference_prefill:  # the stage-1 kernel's mask, C++ integer division
                return max(0, min(n, (p + 1) // stride - 1 + n - int((L - stride + 1) / stride)))
            return max(0, (p + 1 - size) // stride + 1)

        for h in range(Hkv):
            C1, n1 = windows(h, ks, s)
            C2, n2 = windows(h, 4 * ks, 4 * s)
            for p in range(L):
                bq = p // bsz
                dense = (L < m.dense_len) if m.reference_prefill else (p + 1 < m.dense_len)
                if dense:
                    sel = set(range(bq + 1))
                else:
                    v1 = n_visible(p, ks, s, n1)
                    exist = n1 if m.reference_prefill else v1
                    S = []
                    for j in range(exist):
                        if j >= v1:
                            S.append(0.0)
                            continue
                        tot = 0.0
                        for g in range(G):
                            qg = qsel[h * G + g, p]
                            if m.variant == "v2":
                                norm = [float(qg @ C2[i]) * scale for i in range(n_visible(p, 4 * ks, 4 * s, n2))]
                            else:
                                norm = [float(qg @ C1[i]) * scale for i in range(v1)]
                            lse = torch.logsumexp(torch.tensor(norm), 0).item() if norm else -math.inf
                            tot += math.exp(float(qg @ C1[j]) * scale - lse) if lse > -math.inf else math.inf
                        S.append(tot)
                    score = {c: max([S[j] for j in range(max(0, c * st - 1), c * st + st) if j < len(S)],
                                    default=-math.inf) for c in range(bq + 1)}
                    forced = {c for c in range(bq + 1) if c < m.init_blocks or c >= bq - local}
                    rest = sorted((c for c in range(bq + 1) if c not in forced), key=lambda c: (-score[c], c))
                    sel = forced | set(rest[: budget - len(forced)])
                keys = [t for t in range(p + 1) if t // bsz in sel]
                for g in range(G):
                    att = torch.softmax(q[h * G + g, p] @ k[h, keys].T * scale, 0)
                    out[b, T - L + p, (h * G + g) * D: (h * G + g + 1) * D] = att @ v[keys, h]
    y = out @ W["o_proj.weight"].T
    return y


CASES = {
    "v2": dict(BASE),
    "v2_more_blocks": dict(kernel_size=8, kernel_stride=4, block_size=8, init_blocks=2, window_size=0, topk=3,
                           dense_len=0),
    "v1_nope": dict(kernel_size=4, kernel_stride=4, block_size=8, init_blocks=0, window_size=0, topk=2,
                    dense_len=-1, variant="v1", use_nope=True),
    "v2_big_kernel": dict(kernel_size=16, kernel_stride=4, block_size=4, init_blocks=1, window_size=4, topk=2,
                          dense_len=-1),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_brute_force(name):
    m = make(**CASES[name])
    x = torch.randn(2, 43, D_MODEL, dtype=torch.float64)
    y = m(x)[0]
    torch.testing.assert_close(y, brute_force(m, x), atol=1e-10, rtol=0)


def test_matches_brute_force_group_of_16_and_left_padding():
    m = make(heads=dict(num_heads=16, num_kv_heads=1, head_dim=8), **CASES["v2_more_blocks"])
    x = torch.randn(2, 37, D_MODEL, dtype=torch.float64)
    mask = torch.ones(2, 37, dtype=torch.long)
    mask[1, :6] = 0
    y = m(x, attention_mask=mask)[0]
    ref = brute_force(m, x, lengths=mask.sum(1))
    torch.testing.assert_close(y[mask.bool()], ref[mask.bool()], atol=1e-10, rtol=0)


@pytest.mark.parametrize("T", [45, 47])  # 47 % 2 == 1 and 47 % 8 == 7: both visibility quirks fire
def test_reference_prefill_quirks_match_brute_force(T):
    m = make(reference_prefill=True, **{**BASE, "dense_len": -1})
    x = torch.randn(1, T, D_MODEL, dtype=torch.float64)
    torch.testing.assert_close(m(x)[0], brute_force(m, x), atol=1e-10, rtol=0)


def test_visibility_quirk_changes_outputs_only_at_its_lengths():
    # no local window: the hidden newest windows pool into blocks that are chosen by score, not forced
    args = dict(kernel_size=4, kernel_stride=2, block_size=4, init_blocks=0, window_size=0, topk=3, dense_len=-1)
    clean, quirk = make(**args), make(reference_prefill=True, **args)
    x = torch.randn(1, 48, D_MODEL, dtype=torch.float64)
    assert torch.equal(clean(x[:, :46])[0], quirk(x[:, :46])[0])  # 46 % 2 == 0, 46 % 8 == 6: no quirk
    assert (clean(x[:, :47])[0] - quirk(x[:, :47])[0]).abs().max() > 1e-6  # one fewer window for every query


def test_sequence_level_dense_switch_of_the_reference_prefill():
    """dense_len = 40 > budget * block_size = 3 * 8: a 45-token prefill is sparse for every query in the hub;
    here queries p < 39 stay dense (decode semantics); below dense_len both are dense."""
    args = {**BASE, "dense_len": 40}
    clean, quirk = make(**args), make(reference_prefill=True, **args)
    x = torch.randn(1, 45, D_MODEL, dtype=torch.float64)
    yc, yq = clean(x)[0], quirk(x)[0]
    assert (yc[:, :39] - yq[:, :39]).abs().max() > 1e-6
    dense = Attention(D_MODEL, 0, **HEADS).double()
    dense.load_state_dict(clean.state_dict())
    torch.testing.assert_close(yc[:, :39], dense(x)[0][:, :39], atol=1e-12, rtol=0)
    torch.testing.assert_close(quirk(x[:, :39])[0], dense(x[:, :39])[0], atol=0, rtol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_every_block_selected_equals_full_attention(name):
    args = dict(CASES[name], topk=64)
    m = make(**args)
    dense = Attention(D_MODEL, 0, **HEADS).double()
    dense.load_state_dict(m.state_dict())
    x = torch.randn(2, 43, D_MODEL, dtype=torch.float64)
    torch.testing.assert_close(m(x)[0], dense(x)[0], atol=1e-12, rtol=0)
    m32, d32 = m.float(), dense.float()
    torch.testing.assert_close(m32(x.float())[0], d32(x.float())[0], atol=1e-6, rtol=0)


def test_below_dense_len_is_exactly_dense_attention():
    m = make(dtype=torch.float32, **{**BASE, "dense_len": 64})
    dense = Attention(D_MODEL, 0, **HEADS)
    dense.load_state_dict(m.state_dict())
    x = torch.randn(2, 40, D_MODEL)
    assert torch.equal(m(x)[0], dense(x)[0])


def test_no_gradient_through_the_selection():
    """The gradient equals that of exact attention over the (held fixed) selected key sets."""
    m = make(**BASE)
    x = torch.randn(1, 40, D_MODEL, dtype=torch.float64, requires_grad=True)
    m(x)[0].square().sum().backward()
    g = x.grad.clone()
    x.grad = None
    with torch.no_grad():
        ref_keys = selected_masks(m, x)
    q, k, v, _, _ = m._project(x, torch.arange(40)[None])
    att = torch.softmax((q @ k.repeat_interleave(2, 1).transpose(-1, -2) * m.scale).masked_fill(~ref_keys, -math.inf),
                        -1) @ v.repeat_interleave(2, 1)
    m.o_proj(att.transpose(1, 2).reshape(1, 40, -1)).square().sum().backward()
    torch.testing.assert_close(x.grad, g, atol=1e-10, rtol=0)


def selected_masks(m, x):
    """[1, H, T, T] visible-key mask of the mixer's own selection (from its block indices)."""
    T = x.shape[1]
    pos = torch.arange(T)[None]
    q, k, v, qs, ks = m._project(x, pos)
    d = max(0, m.dense_len - 1)
    mask = torch.ones(1, m.num_kv_heads, T, T, dtype=torch.bool).tril()
    c1, c2 = m._compressed(ks)
    idx = m._select(qs[:, :, d:], pos[:, d:], c1, c2, num_blocks=-(-T // m.block_size), width=m.budget)
    blk = torch.zeros(1, m.num_kv_heads, T - d, -(-T // m.block_size) + 1, dtype=torch.bool)
    blk.scatter_(-1, torch.where(idx >= 0, idx.long(), blk.shape[-1] - 1), True)
    mask[:, :, d:] &= blk[..., torch.arange(T) // m.block_size]
    return mask.repeat_interleave(m.num_heads // m.num_kv_heads, 1)


def test_nan_scores_become_zero_and_unnormalised_keys_score_inf():
    """A query that sees C1 windows but no C2 window yet: lse = -inf, visible entries +inf, masked ones 0."""
    q = torch.randn(1, 2, 1, 4, dtype=torch.float64)
    c1, c2 = torch.randn(1, 1, 6, 4, dtype=torch.float64), torch.randn(1, 1, 1, 4, dtype=torch.float64)
    one = torch.ones(1, 1, dtype=torch.long)
    bs = block_scores_ref(q, c1, c2, 2 * one, 5 * one, 0 * one, block_size=2, kernel_stride=1, num_blocks=4,
                          scale=0.5)
    assert not bs.isnan().any()
    # st = 2, block b pools entries [2b - 1, 2b + 2): 0,1 (visible: inf) | 1,2,3 (1 visible: inf) | 3,4,5 (3,4
    # exist but are masked: 0; 5 does not exist) | 5,6,7 (none: -inf)
    assert bs[0, 0, 0].tolist() == [math.inf, math.inf, 0.0, -math.inf]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="kernel_stride"):
        make(**{**BASE, "kernel_stride": 3})
    with pytest.raises(ValueError, match="always selected"):
        make(**{**BASE, "topk": 1, "init_blocks": 1})
    with pytest.raises(ValueError, match="variant"):
        make(**{**BASE, "variant": "v3"})
    for name, bad in (("topk", 0), ("window_size", -1), ("block_size", True), ("kernel_size", 32.0)):
        with pytest.raises(ValueError, match=f"infllmv2: {name}={bad!r} must be an int >= "):
            make(**{**BASE, name: bad})
    with pytest.raises(ValueError, match="packed"):
        make(**BASE)(torch.randn(1, 4, D_MODEL, dtype=torch.float64), seq_idx=torch.zeros(1, 4, dtype=torch.long))


@needs_compiler
@pytest.mark.parametrize("variant", ["v2", "v1"])
def test_fp32_prefill_through_the_native_kernels_matches_brute_force_and_decode(variant):
    """fp32, head dim and blocks of 16: the prefill runs both stages in cpu.cpp (tests/kernels/test_infllmv2_cpu.py
    pins them to the oracles). Here the layer: the fp64 brute force, a chunked prefill, and token-by-token decode
    (the reference's per-query path) agree with it to fp32 rounding."""
    args = dict(kernel_size=8, kernel_stride=4, block_size=16, init_blocks=1, window_size=16, topk=4, dense_len=-1,
                variant=variant)
    m = make(torch.float32, heads=dict(num_heads=8, num_kv_heads=2, head_dim=16), **args)
    x = torch.randn(2, 100, D_MODEL)
    with torch.no_grad():
        y = m(x)[0]
        state = m.init_state(2, dtype=torch.float32, device="cpu", max_length=100)
        chunked = torch.cat([m(x[:, a:b], state=state)[0] for a, b in ((0, 37), (37, 100))], 1)
        state = m.init_state(2, dtype=torch.float32, device="cpu", max_length=100)
        decoded = torch.cat([m(x[:, t: t + 1], state=state)[0] for t in range(100)], 1)
    torch.testing.assert_close(y.double(), brute_force(m, x), atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked, y, atol=1e-5, rtol=0)
    torch.testing.assert_close(decoded, y, atol=1e-5, rtol=0)
