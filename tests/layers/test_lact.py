"""LaCT mixer, what is specific to it: parity with an independent float64 reference written from the equations
(outputs and fast weights, Muon/momentum/prenorm variants, T past several chunks and not a multiple of the chunk),
per-row chunk phases under padded decode steps, padding inside packed rows, the reference's leak on request, the
no-sync decode step with masks across chunk boundaries, the reference's key names, the FLOP count. Three modes,
left padding, packing, reorder, nbytes, save/reload and swap: the contract suite (tests/contract)."""

from __future__ import annotations

import pytest
import torch

from tests.layers.lact_reference import lact_layer
from zoo.layers.lact import LaCT

pytestmark = pytest.mark.usefixtures("single_thread")

D = 32
SMALL = {"num_attn_heads": 4, "num_lact_heads": 2}


def build(dtype=torch.float64, seed=0, **kw):
    """A mixer with weights large enough that every branch matters (the LM init makes TTT start near 0)."""
    torch.manual_seed(seed)
    args = {**SMALL, "chunk_size": 8, "window_size": 6, **kw}
    m = LaCT(D, **args)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias") or "proj" in name or name.startswith("qkv"):
                p.normal_(0, 0.3)
            elif name in ("qk_scale", "qk_offset", "ttt_norm.weight") or "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return m.to(dtype), args


def ref_cfg(args):
    """zoo arguments -> the reference layer's argument names (chunk_size is lact_chunk_size)."""
    cfg = {k: v for k, v in args.items() if k != "chunk_size"}
    cfg["lact_chunk_size"] = args["chunk_size"]
    cfg.setdefault("rope_theta", 10000.0)
    for k, v in {"use_momentum": True, "learnable_ttt_scale": True}.items():
        cfg.setdefault(k, v)  # the zoo defaults (LaCTSWIGLUConfig's)
    return cfg


VARIANTS = {
    "plain": {"use_momentum": False},
    "momentum": {},
    "muon": {"use_momentum": False, "use_muon": True},
    "momentum+muon": {"use_muon": True},
    "lowrank+qknorm+muon": {"use_muon": True, "w0_w2_low_rank": 3, "attn_qk_norm": True, "qkv_bias": True},
    "prenorm+nope+novsilu": {"ttt_prenorm": True, "ttt_nope": True, "no_v_silu": True, "inter_multi": 1.5},
    "fused-kernel-muon": {"use_muon": True, "use_fused_kernel": True},
    "chunk>window": {"chunk_size": 5, "window_size": 12, "learnable_ttt_scale": False},
}


@pytest.mark.parametrize("T", [29, 32])  # 3 chunks + 5 (not a multiple); exactly 4 chunks
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_independent_reference(variant, T):
    m, args = build(**VARIANTS[variant])
    x = torch.randn(2, T, D, dtype=torch.float64)
    expected, finals = lact_layer(m.state_dict(), ref_cfg(args), x)
    y, _ = m(x)
    torch.testing.assert_close(y, expected, atol=1e-10, rtol=1e-10)
    # the state after a prefill holds the fast weights after every full chunk (and the momenta)
    state = m.init_state(2, dtype=torch.float64, device="cpu")
    y2, state = m(x, state=state)
    torch.testing.assert_close(y2, expected, atol=1e-10, rtol=1e-10)
    for b in range(2):
        for h in range(args["num_lact_heads"]):
            W, M = finals[b, h]
            for i in range(3):
                torch.testing.assert_close(getattr(state, f"w{i}")[b, h], W[i], atol=1e-10, rtol=1e-10)
                if state.mom0 is not None:
                    torch.testing.assert_close(getattr(state, f"mom{i}")[b, h], M[i], atol=1e-10, rtol=1e-10)
    assert state.count.tolist() == [T, T]


def test_fast_weights_really_change():
    """Guards the parity test: past the first chunk the outputs differ from a static SwiGLU (T <= C never
    updates), and Muon differs from plain gradient steps."""
    x = torch.randn(1, 29, D, dtype=torch.float64)
    m, _ = build()
    y_ttt = m(x)[0]
    m_static, _ = build(chunk_size=64)
    y_static = m_static(x)[0]
    torch.testing.assert_close(y_ttt[:, :8], y_static[:, :8], atol=1e-12, rtol=0)  # first chunk: W_init
    assert (y_ttt[:, 8:] - y_static[:, 8:]).abs().max() > 1e-3
    m_muon, _ = build(use_muon=True)
    assert (m_muon(x)[0][:, 8:] - y_ttt[:, 8:]).abs().max() > 1e-3


def test_padding_steps_during_decode_change_nothing():
    """Rows skip (padded) decode steps at different times: each row still equals its own unpadded run, and the
    host-side hint of chunk phases stays a superset of the rows' phases."""
    m, _ = build(use_muon=True)
    T = 30
    x = torch.randn(2, T, D, dtype=torch.float64)
    expected = m(x)[0]
    state = m.init_state(2, dtype=torch.float64, device="cpu")
    got = [[], []]
    ptr = [0, 0]
    with torch.no_grad():
        for step in range(T + 15):
            live = [ptr[b] < T and not (b == 0 and step % 4 == 1) and not (b == 1 and 10 <= step < 15)
                    for b in range(2)]
            tok = torch.stack([x[b, min(ptr[b], T - 1)] for b in range(2)])[:, None]
            mask = torch.tensor(live, dtype=torch.long)[:, None]
            y, state = m(tok, state=state, attention_mask=mask)
            for b in range(2):
                if live[b]:
                    got[b].append(y[b, 0])
                    ptr[b] += 1
            assert set((state.count % 8).tolist()) <= state.phases
    torch.testing.assert_close(torch.stack([torch.stack(g) for g in got]), expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("variant", ["momentum", "momentum+muon"])
def test_padding_inside_packed_rows(variant):
    """Packed documents crossing chunk boundaries, with padding in the same row: each document equals its own run
    (positions restart per document and count real tokens only; padding never enters a chunk)."""
    m, _ = build(**VARIANTS[variant])
    lens = [11, 17, 4]
    docs = [torch.randn(1, n, D, dtype=torch.float64) for n in lens]
    x = torch.cat([torch.randn(1, 3, D, dtype=torch.float64), *docs], 1)
    seq_idx = torch.cat([torch.zeros(3, dtype=torch.long)] + [torch.full((n,), i) for i, n in enumerate(lens)])[None]
    mask = torch.ones_like(seq_idx)
    mask[0, :3] = 0
    mask[0, 3 + 11 + 5] = 0  # a hole inside document 1
    y = m(x, seq_idx=seq_idx, attention_mask=mask)[0]
    torch.testing.assert_close(y[:, 3:14], m(docs[0])[0], atol=1e-10, rtol=0)
    keep = torch.ones(17, dtype=torch.bool)
    keep[5] = False
    torch.testing.assert_close(y[:, 14:31][:, keep], m(docs[1][:, keep])[0], atol=1e-10, rtol=0)
    torch.testing.assert_close(y[:, 31:], m(docs[2])[0], atol=1e-10, rtol=0)


def test_reference_leak_is_reproducible_on_request():
    """``ttt_respect_masks=False``: the TTT branch runs over document boundaries as the reference does (the
    attention branch still honours them)."""
    m, _ = build(ttt_respect_masks=False)
    x = torch.randn(1, 24, D, dtype=torch.float64)
    seq_idx = torch.cat([torch.zeros(12, dtype=torch.long), torch.ones(12, dtype=torch.long)])[None]
    y = m(x, seq_idx=seq_idx)[0]
    separate = torch.cat([m(x[:, :12])[0], m(x[:, 12:])[0]], 1)
    assert (y[:, 16:] - separate[:, 16:]).abs().max() > 1e-3  # fast weights leaked into document 2
    torch.testing.assert_close(y[:, :12], separate[:, :12], atol=1e-10, rtol=0)
    m.ttt_respect_masks = True
    torch.testing.assert_close(m(x, seq_idx=seq_idx)[0], separate, atol=1e-10, rtol=0)


def test_decode_step_makes_no_host_sync(monkeypatch):
    m, _ = build(torch.float32, use_muon=True)
    x = torch.randn(2, 20, D)
    with torch.no_grad():
        _, state = m(x[:, :7], state=m.init_state(2, dtype=torch.float32, device="cpu"))

        def boom(*a, **k):
            raise AssertionError("host synchronisation in the decode step")

        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero"):
            monkeypatch.setattr(torch.Tensor, name, boom)
        for t in range(7, 20):  # crosses the chunk boundary at 8 and 16, with and without a mask
            mask = torch.tensor([[1], [t % 3 != 0]], dtype=torch.long) if t % 2 else None
            _, state = m(x[:, t:t + 1], state=state, attention_mask=mask)


REFERENCE_KEYS = {  # LaCTSWIGLULayer parameters (sheet §1.2) for hidden d, H heads, nh lact heads, low rank r
    "qkv.weight": lambda d, nh, r: (3 * d, d), "o_proj.weight": lambda d, nh, r: (d, d),
    "w0.w_left": lambda d, nh, r: (nh, d // nh, r), "w0.w_right": lambda d, nh, r: (nh, r, d // nh),
    "w2.w_left": lambda d, nh, r: (nh, d // nh, r), "w2.w_right": lambda d, nh, r: (nh, r, d // nh),
    "w1": lambda d, nh, r: (nh, d // nh, d // nh), "lr_proj.weight": lambda d, nh, r: (3 * nh, d),
    "lr_proj.bias": lambda d, nh, r: (3 * nh,), "qk_scale": lambda d, nh, r: (d, 2),
    "qk_offset": lambda d, nh, r: (d, 2), "ttt_scale_proj.weight": lambda d, nh, r: (nh, d),
    "ttt_scale_proj.bias": lambda d, nh, r: (nh,), "ttt_norm.weight": lambda d, nh, r: (d // nh,),
    "momentum_proj.0.weight": lambda d, nh, r: (nh, d), "momentum_proj.0.bias": lambda d, nh, r: (nh,),
}


def test_reference_state_dict_loads_strictly():
    d, H, nh, r = 64, 8, 4, 6
    sd = {k: torch.randn(shape(d, nh, r)) for k, shape in REFERENCE_KEYS.items()}
    m = LaCT(d, num_attn_heads=H, num_lact_heads=nh, w0_w2_low_rank=r, chunk_size=16, window_size=16)
    m.load_state_dict(sd, strict=True)
    dense = {k: v for k, v in sd.items() if not k.startswith(("w0.", "w2."))}
    dense.update(w0=torch.randn(nh, d // nh, d // nh), w2=torch.randn(nh, d // nh, d // nh))
    LaCT(d, num_attn_heads=H, num_lact_heads=nh, chunk_size=16, window_size=16).load_state_dict(dense, strict=True)


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="num_lact_heads"):
        LaCT(32, num_attn_heads=4, num_lact_heads=3)
    with pytest.raises(ValueError, match="lr_dim"):
        LaCT(32, num_attn_heads=4, num_lact_heads=2, lr_dim=2)
    for name, bad in (("window_size", 0), ("chunk_size", True), ("num_attn_heads", 4.0)):
        with pytest.raises(ValueError, match=f"lact: {name}={bad!r} must be an int >= 1"):
            LaCT(32, **{"num_attn_heads": 4, "num_lact_heads": 2, name: bad})
    with pytest.raises(ValueError, match="seq_idx"):
        m, _ = build()
        m(torch.randn(1, 4, D, dtype=torch.float64), state=m.init_state(1, dtype=torch.float64, device="cpu"),
          seq_idx=torch.zeros(1, 4, dtype=torch.long))


def test_flops_count_matches_a_brute_force_enumeration():
    """The attention term against an explicit count of visible keys; the TTT term against counted updates."""
    args = {**SMALL, "chunk_size": 8, "window_size": 6, "use_momentum": False, "learnable_ttt_scale": False}
    d, nh, dh = D, 2, 16
    for T, ctx in ((29, 0), (1, 16), (1, 15), (5, 30)):
        keys = sum(1 for i in range(ctx, ctx + T) for j in range(i + 1) if i - j < 6)
        updates = sum(1 for t in range(ctx, ctx + T) if (t % 8 == 7)) if ctx else (T - 1) // 8
        expected = 2 * T * d * (4 * d + 3 * nh) + 4 * d * keys + nh * (6 * T * dh * dh + updates * 12 * 8 * dh * dh)
        assert LaCT.flops(d, args, T=T, context=ctx) == expected, (T, ctx)
