"""Swap specs (zoo.swaps): the grammar round-trips, bad specs are refused naming the bad part, placements resolve as
documented, and zoo.swap_layers applies them (weights reused, derived or fresh; freezing)."""

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import zoo
from zoo.swaps import SwapSpec, parse_swap_spec, select_layers, swap_config

SMALL = {"vocab_size": 64, "d_model": 32, "mlp": {"intermediate_size": 64},
         "mixer_defaults": {"attention": {"num_heads": 4, "num_kv_heads": 2}}}


def cfg(n_layers: int = 6, mixers="attention") -> zoo.ZooConfig:
    return zoo.ZooConfig.from_dict({**SMALL, "n_layers": n_layers, "mixers": mixers})


# ---------------------------------------------------------------------------------------------- grammar
EXAMPLES = [
    ("0-11: sliding_window(window=1024)", "0-11: sliding_window(window=1024)"),
    ("every 3rd from 1: attention", "every 3rd from 1: attention"),
    ("middle third: attention; rest: mamba2(d_state=64)", "middle third: attention; rest: mamba2(d_state=64)"),
    ("longgen", "longgen"),
    ("masformer(block_size=128)", "masformer(block_size=128)"),
    ("  Bottom 1/3 :attention ;TOP  2: block_diagonal(block_size=8)",
     "first third: attention; last 2: block_diagonal(block_size=8)"),
    ("every 2 from -1: attention", "every 2nd from -1: attention"),
    ("mamba2", "all: mamba2"),
    ("*: attention(rope_scaling={'type': 'linear', 'factor': 2.0})",
     "all: attention(rope_scaling={'type': 'linear', 'factor': 2.0})"),
    ({"0-2": "sliding_window(window=8)", "rest": {"mixer": "attention", "mixer_args": {"qk_norm": True}}},
     "0-2: sliding_window(window=8); rest: attention(qk_norm=True)"),
]


@pytest.mark.parametrize("text,canonical", EXAMPLES)
def test_examples_parse_to_their_canonical_form_and_round_trip(text, canonical):
    spec = parse_swap_spec(text)
    assert spec.to_string() == canonical
    assert parse_swap_spec(canonical) == spec
    assert parse_swap_spec(canonical).to_string() == canonical


_selectors = st.one_of(
    st.just("all"), st.just("rest"),
    st.tuples(st.integers(0, 9), st.integers(0, 9)).map(lambda t: f"{min(t)}-{max(t)}"),
    st.lists(st.integers(-5, 9), min_size=1, max_size=3).map(lambda xs: ", ".join(map(str, xs))),
    st.tuples(st.integers(1, 12), st.integers(-3, 9)).map(lambda t: f"every {t[0]} from {t[1]}"),
    st.tuples(st.sampled_from(["first", "middle", "last", "bottom", "top"]),
              st.sampled_from(["half", "third", "quarter", "sixth", "2/3", "3/4", "1/1"])).map(" ".join),
    st.tuples(st.sampled_from(["first", "last"]), st.integers(1, 9)).map(lambda t: f"{t[0]} {t[1]}"),
)
_mixers = st.sampled_from(["attention", "attention(num_heads=2)", "sliding_window(window=16, num_sink_tokens=2)",
                           "mamba2(d_state=8, headdim=8, decay_scale=0.5)", "block_diagonal(block_size=4)"])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_selectors, _mixers), min_size=1, max_size=4))
def test_round_trip_property(clauses):
    text = ";".join(f"{s}:{m}" for s, m in clauses)
    spec = parse_swap_spec(text)
    again = parse_swap_spec(spec.to_string())
    assert again == spec and again.to_string() == spec.to_string()
    assert parse_swap_spec({c.selector: c.mixer_spec for c in spec.clauses}) == SwapSpec(
        list({c.selector: c for c in spec.clauses}.values()))


BAD = [
    ("0-11: sliding_windw(window=1024)", "unknown mixer 'sliding_windw'"),
    ("0-3: mamba2(d_stat=4)", "mixer 'mamba2' has no argument 'd_stat'"),
    ("0-3: mamba2(d_state='x')", "d_state='x' of mixer 'mamba2' should be int"),
    ("every 0th: attention", "'every 0th': the step of 'every N' must be >= 1"),
    ("middle 3: attention", "'middle' takes a fraction"),
    ("first 5/4: attention", "the fraction must be in (0, 1]"),
    ("0-x: attention", "'0-x' is not a layer index or range"),
    ("0-3: attention(", "cannot parse mixer spec 'attention('"),
    ("0-3: attention(window=)", "cannot parse the arguments"),
    ("0-3", "'0-3' selects layers but names no mixer"),
    ("0-3: attention;; 4: mamba2", "clause 2 '': empty clause"),
    ("longgen(windw=3)", "recipe 'longgen' has no argument 'windw'"),
    ("longgen; 0: attention", "'longgen' is a recipe, which is a whole spec on its own"),
    ("0: longgen", "'longgen' is a recipe"),
    ("", "empty swap spec"),
    ({"0": 5}, "must be a mixer spec string"),
]


@pytest.mark.parametrize("spec,message", BAD)
def test_bad_specs_are_refused_naming_the_problem(spec, message):
    with pytest.raises(ValueError) as e:
        parse_swap_spec(spec)
    assert message in str(e.value)


RESOLVE_BAD = [
    ("0-3: attention; 2: sliding_window(window=8)", "swap clauses '0-3: attention' and '2: sliding_window(window=8)' "
                                                    "both select layer(s) [2]"),
    ("7: attention", "swap clause '7: attention': selector '7' is out of range for a 6-layer model"),
    ("every 2nd from 6: attention", "'from 6' is out of range for 6 layers"),
    ("first 7: attention", "asks for 7 layers of a 6-layer model"),
    ("rest: attention; rest: mamba2", "'rest' appears twice"),
    ("all: mamba2(headdim=7)", "swap clause 'all: mamba2(headdim=7)' on layer 0: mamba2: d_ssm=64"),
    ("longgen(sparse='dense')", "longgen(sparse='dense')\": longgen: sparse='dense' is not one of"),
]


@pytest.mark.parametrize("spec,message", RESOLVE_BAD)
def test_specs_that_do_not_fit_the_model_are_refused_naming_the_clause(spec, message):
    with pytest.raises(ValueError) as e:
        swap_config(cfg(6), spec)
    assert message in str(e.value)


def test_selectors_resolve_as_documented():
    assert select_layers("every 3rd from 1", 8) == [1, 4, 7]
    assert select_layers("every 2nd from -1", 6) == [5]
    assert select_layers("middle third", 32) == list(range(10, 21))  # LongGen's placement
    assert select_layers("first sixth", 24) == [0, 1, 2, 3]  # MASFormer's
    assert select_layers("last quarter", 8) == [6, 7]
    assert select_layers("first 2/3", 6) == [0, 1, 2, 3]
    assert select_layers("top 2", 6) == [4, 5]
    assert select_layers("0-2,-1", 6) == [0, 1, 2, 5]
    plan = parse_swap_spec("middle third: attention; rest: mamba2(d_state=8, headdim=8)").resolve(6)
    assert [plan[i].mixer for i in range(6)] == ["mamba2", "mamba2", "attention", "attention", "mamba2", "mamba2"]


def test_recipes_are_the_hybrid_functions():
    c = cfg(9)
    for recipe, fn in (("longgen(window=8, num_sink_tokens=2)", lambda x: zoo.longgen(x, window=8,
                                                                                     num_sink_tokens=2)),
                       ("masformer(block_size=4)", lambda x: zoo.masformer(x, block_size=4))):
        via_spec, _ = swap_config(c, recipe)
        assert [ls.to_dict() for ls in via_spec.layers] == [ls.to_dict() for ls in fn(c).layers]
    assert [ls.mixer for ls in swap_config(c, "longgen")[0].layers] == ["sliding_window"] * 3 + ["attention"] * 3 + [
        "sliding_window"] * 3


def test_arguments_carry_over_within_an_argument_group():
    c = swap_config(cfg(2), "0: attention(num_heads=2, qk_norm=True)")[0]
    c = swap_config(c, "all: sliding_window(window=8)")[0]
    assert c.layers[0].mixer_args == {"num_heads": 2, "qk_norm": True, "window": 8}
    assert c.layers[1].mixer_args == {"window": 8}
    c = swap_config(cfg(1, "mamba2(d_state=8, headdim=8)"), "all: mamba2(decay_scale=0.9)")[0]
    assert c.layers[0].mixer_args == {"d_state": 8, "headdim": 8, "decay_scale": 0.9}
    c = swap_config(cfg(1, "mamba2(d_state=8, headdim=8)"), "all: attention")[0]  # other group: nothing carried
    assert c.layers[0].mixer_args == {}


# ---------------------------------------------------------------------------------------------- swap_layers
def test_dict_form_of_swap_layers_still_works_and_matches_the_string_form():
    torch.manual_seed(0)
    a = zoo.create_model(cfg(4))
    b = zoo.create_model(cfg(4))
    b.load_state_dict(a.state_dict())
    zoo.swap_layers(a, {"0-1": "sliding_window(window=4)"})
    zoo.swap_layers(b, "0-1: sliding_window(window=4)")
    assert [ls.to_dict() for ls in a.config.layers] == [ls.to_dict() for ls in b.config.layers]
    ids = torch.randint(0, 64, (1, 12))
    assert torch.equal(a(ids).logits, b(ids).logits)


def test_attention_to_sliding_window_with_window_at_least_T_leaves_logits_unchanged():
    torch.manual_seed(0)
    model = zoo.create_model(cfg(3)).eval()
    ids = torch.randint(0, 64, (2, 24))
    with torch.no_grad():
        ref = model(ids).logits
        for window in (24, 100):
            zoo.swap_layers(model, f"all: sliding_window(window={window})")
            torch.testing.assert_close(model(ids).logits, ref, atol=1e-5, rtol=0)
        zoo.swap_layers(model, "all: sliding_window(window=8)")
        assert (model(ids).logits - ref).abs().max() > 1e-3  # a window shorter than T does change them


def test_init_modes_and_trainable():
    torch.manual_seed(0)
    model = zoo.create_model(cfg(4))
    old = {k: v.clone() for k, v in model.state_dict().items()}
    zoo.swap_layers(model, "every 2nd from 1: sliding_window(window=4)", trainable="swapped")
    assert all(torch.equal(v, old[k]) for k, v in model.state_dict().items())  # all names and shapes match
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("layers.1.mixer.", "layers.3.mixer.")) for n in trainable)
    zoo.swap_layers(model, "1: attention", trainable="swapped_blocks")
    assert {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad} == {"1"}
    assert any(p.requires_grad for n, p in model.named_parameters() if n.startswith("layers.1.mlp."))
    zoo.swap_layers(model, "0: attention", init="fresh")
    assert not torch.equal(model.layers[0].mixer.q_proj.weight, old["layers.0.mixer.q_proj.weight"])
    with pytest.raises(ValueError, match="none of the swapped mixers"):
        zoo.swap_layers(model, "0: sliding_window(window=4)", init="derive")
    with pytest.raises(ValueError, match="init='copy' is not one of"):
        zoo.swap_layers(model, "0: attention", init="copy")
    with pytest.raises(ValueError, match="needs headdim=8 and nheads=4"):
        zoo.swap_layers(model, "0: mamba2(d_state=8)", init="derive")


def test_mamba2_derived_from_attention_is_linear_attention():
    """With the derived init, x, B, C are silu(v), silu(k), silu(q) per head, and the scan with the decay switched off
    (A -> 0, constant dt) is causal linear attention; out_proj is W_o and D = 0."""
    torch.manual_seed(0)
    model = zoo.create_model(cfg(1)).double()
    attn = model.layers[0].mixer
    zoo.swap_layers(model, "0: mamba2(expand=1, headdim=8, d_state=8, ngroups=4)", init="derive")
    m = model.layers[0].mixer
    with torch.no_grad():
        m.A_log.fill_(-60.0)  # A = -exp(-60): no decay
        m.dt_bias.fill_(30.0)  # softplus(30 + 0) = 30 (up to 1e-13): dt constant
        m.in_proj.weight[-m.nheads:].zero_()
    x = torch.randn(1, 10, 32, dtype=torch.float64)
    q = torch.nn.functional.silu(attn.q_proj(x)).view(1, 10, 4, 8)
    k = torch.nn.functional.silu(attn.k_proj(x)).view(1, 10, 2, 8).repeat_interleave(2, 2)
    v = torch.nn.functional.silu(attn.v_proj(x)).view(1, 10, 2, 8).repeat_interleave(2, 2)
    scores = torch.einsum("bthd,bshd->bhts", q, k).tril()
    expect = 30.0 * torch.einsum("bhts,bshd->bthd", scores, v)  # dt = 30 scales every write
    zxbcdt = m.in_proj(x)
    _, _, _, xBC, dt = zxbcdt.split([m.d_mlp, m.d_mlp, m.d_ssm, m.conv_dim, m.nheads], dim=-1)
    xBC = m._conv(xBC, None, None)  # silu(conv(xBC))
    xs, Bm, Cm = xBC.split([m.d_ssm, 32, 32], dim=-1)
    assert torch.allclose(xs.view(1, 10, 4, 8), v) and torch.allclose(Bm.view(1, 10, 4, 8), k)
    assert torch.allclose(Cm.view(1, 10, 4, 8), q)
    from zoo.kernels.ssd import ssd_chunk_scan

    dtv = torch.nn.functional.softplus(dt + m.dt_bias)
    y, _ = ssd_chunk_scan(xs.view(1, 10, 4, 8), dtv, -torch.exp(m.A_log), Bm.view(1, 10, 4, 8),
                          Cm.view(1, 10, 4, 8), chunk_size=m.chunk_size, D=m.D)
    torch.testing.assert_close(y, expect, rtol=1e-9, atol=1e-9)
    assert torch.equal(m.out_proj.weight, attn.o_proj.weight) and not m.D.any()
    with torch.no_grad():
        assert math.isfinite(float(model(torch.randint(0, 64, (1, 5))).logits.sum()))


def test_mamba2_derived_from_attention_learns_the_layer_faster_than_a_random_init():
    """The measured claim behind init='derive' ("The Mamba in the Llama": the Mamba-2 layer starts from the attention
    weights, then learns to reproduce the attention layer's outputs, layer by layer). A tiny attention LM is trained
    on a copy task (so its attention does something specific), then its layer 1 is replaced by Mamba-2, derived or
    freshly initialised with the same seed, and each is trained for the same few steps to match the attention
    layer's outputs on the same inputs. The derived layer ends with the lower held-out error, for every seed."""
    torch.manual_seed(0)
    model = zoo.create_model(cfg(2))
    g = torch.Generator().manual_seed(0)

    def copy_batch(batch: int = 16, half: int = 12) -> torch.Tensor:
        a = torch.randint(1, 64, (batch, half), generator=g)
        return torch.cat([a, a], 1)

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(120):
        ids = copy_batch()
        labels = ids.clone()
        labels[:, :12] = -100
        loss = model(ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    teacher = model.layers[1].mixer
    inputs = []
    hook = teacher.register_forward_hook(lambda mod, args, out: inputs.append(args[0].detach()))
    with torch.no_grad():
        for _ in range(5):
            model(copy_batch())
    hook.remove()
    with torch.no_grad():
        targets = [teacher(x)[0] for x in inputs]
    for seed in (0, 1):
        errors = {}
        for init in ("derive", "fresh"):
            student = copy.deepcopy(model)
            torch.manual_seed(100 + seed)
            zoo.swap_layers(student, "1: mamba2(expand=1, headdim=8, d_state=8, ngroups=4)", init=init)
            mixer = student.layers[1].mixer
            opt = torch.optim.Adam(mixer.parameters(), lr=3e-3)

            def error(i: int, mixer=mixer) -> torch.Tensor:
                return ((mixer(inputs[i])[0] - targets[i]) ** 2).mean() / (targets[i] ** 2).mean()

            for step in range(40):
                loss = error(step % 4)
                opt.zero_grad()
                loss.backward()
                opt.step()
            with torch.no_grad():
                errors[init] = float(error(4))
        assert errors["derive"] < errors["fresh"], errors
