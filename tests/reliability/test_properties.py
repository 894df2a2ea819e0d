"""Property tests over random model compositions (hypothesis; bounded example counts, derandomized for CI).

Any sequence of registered mixers, each with one of its ``example_args`` (drawn from the registry, never by name),
with or without MLPs, tied or untied, composes into a model whose forward and backward are finite, whose save/load
round trip is exact, whose three modes agree (parallel == chunked prefill with random chunk sizes == token by
token, through ``zoo.testing.run_chunks``), and whose left-padded batched generation gives each row its unpadded
tokens. Random invalid configs are refused at construction with a ``ValueError`` naming the field; every family's
reader, given its own reference config.json with one field replaced by a value of the wrong type or range, returns a
config or raises ``ValueError`` (never another exception, never allocates for absurd sizes)."""

from __future__ import annotations

import copy
import functools
import json
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zoo
from zoo.config import NORMS, ROPE_SCALING, mixer_parameters
from zoo.registry import get_family, get_mixer, list_families, list_mixers
from zoo.testing import GROUP_DEFAULTS, run_chunks

pytestmark = [pytest.mark.usefixtures("single_thread")]

V, D, T = 53, 32, 19
CI = settings(deadline=None, derandomize=True, database=None, print_blob=True,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@st.composite
def compositions(draw) -> zoo.ZooConfig:
    n = draw(st.integers(1, 3))
    layers = []
    for _ in range(n):
        name = draw(st.sampled_from(list_mixers()))
        args = draw(st.sampled_from(get_mixer(name).example_args or ({},)))
        mlp = draw(st.sampled_from([None, {"intermediate_size": 48}, {"intermediate_size": 40, "gated": False,
                                                                       "activation": "gelu"}]))
        layers.append(zoo.LayerSpec(name, dict(args), mlp))
    groups = {g for ls in layers for g in get_mixer(ls.mixer).arg_groups}
    return zoo.ZooConfig(
        vocab_size=V, d_model=D, n_layers=n, layers=layers,
        mixer_defaults={g: a for g, a in GROUP_DEFAULTS.items() if g in groups},
        norm=draw(st.sampled_from(NORMS)), tie_embeddings=draw(st.booleans()),
        residual_in_fp32=draw(st.booleans()), embedding_scale=draw(st.sampled_from([1.0, 2.0])),
        residual_scale=draw(st.sampled_from([1.0, 0.7])), logit_scale=draw(st.sampled_from([1.0, 0.5])),
        max_position_embeddings=4096)


def chunks(draw, total: int) -> list[int]:
    out = []
    while sum(out) < total:
        out.append(min(draw(st.integers(1, 9)), total - sum(out)))
    return out


@pytest.mark.reliability("random compositions")
@settings(CI, max_examples=16)
@given(config=compositions(), data=st.data())
def test_random_compositions_hold(config, data, cases):
    cases.add()
    torch.manual_seed(0)
    model = zoo.create_model(config).double()
    x = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))

    # forward + backward: finite, every parameter reached
    out = model(x, labels=x)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    model.eval()

    with torch.no_grad():
        ref = model(x).logits
        # three modes: parallel == random chunks == token by token (the model's own chunk runner)
        scale = max(1.0, ref.abs().max().item())
        for schedule in (chunks(data.draw, T), [1] * T):
            got, _ = run_chunks(model, x, schedule)
            assert (got - ref).abs().max().item() <= 1e-9 * scale, schedule

        # save / load round trip: exact
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp, card=False)
            back = zoo.from_pretrained(tmp, dtype=torch.float64)
            assert torch.equal(back(x).logits, ref)

    # left-padded batched generation: the padded row generates its unpadded tokens
    pad = data.draw(st.integers(1, 6))
    prompt = torch.cat([torch.zeros(1, pad, dtype=torch.long), x[:1, :12]], 1)
    batch = torch.cat([prompt, x[1:, : 12 + pad]])
    mask = torch.ones_like(batch)
    mask[0, :pad] = 0
    new = model.generate(batch, attention_mask=mask, max_new_tokens=4, eos_token_id=[])[:, -4:]
    alone = model.generate(x[:1, :12], max_new_tokens=4, eos_token_id=[])[:, -4:]
    assert torch.equal(new[:1], alone)


# ------------------------------------------------------------------------------------------- invalid configs
NAN, INF = float("nan"), float("inf")
not_int = st.one_of(st.floats(allow_nan=True), st.text(max_size=3), st.booleans(), st.none(), st.lists(st.integers(),
                                                                                                         max_size=2))
bad_positive_int = st.one_of(st.integers(max_value=0), not_int)
bad_positive_float = st.one_of(st.floats(max_value=0.0), st.sampled_from([NAN, INF, -INF]), st.text(max_size=3),
                               st.booleans(), st.none())
bad_bool = st.one_of(st.integers(), st.text(max_size=3), st.floats(), st.none())
bad_finite = st.one_of(st.sampled_from([NAN, INF, -INF]), st.text(max_size=3), st.booleans(), st.none())
bad_token = st.one_of(st.integers(max_value=-1), st.integers(min_value=V), st.floats(), st.text(max_size=2),
                      st.booleans())
BAD_FIELDS = {
    "vocab_size": bad_positive_int, "d_model": bad_positive_int, "n_layers": bad_positive_int,
    "max_position_embeddings": bad_positive_int, "norm_eps": bad_positive_float, "rope_theta": bad_positive_float,
    "tie_embeddings": bad_bool, "residual_in_fp32": bad_bool, "embedding_scale": bad_finite,
    "residual_scale": bad_finite, "logit_scale": bad_finite,
    "initializer_range": st.one_of(st.floats(max_value=-1e-9), bad_finite),
    "norm": st.text(max_size=6).filter(lambda s: s not in NORMS),
    "pad_token_id": bad_token, "bos_token_id": bad_token, "eos_token_id": st.one_of(bad_token, st.just([]),
                                                                                    st.lists(bad_token, min_size=1)),
    "rope_scaling": st.one_of(
        st.integers(), st.text(max_size=3), st.lists(st.integers(), max_size=2),
        st.fixed_dictionaries({"rope_type": st.sampled_from(["linear", "llama3"]), "factor": bad_positive_float}),
        st.fixed_dictionaries({"rope_type": st.text(max_size=5).filter(lambda s: s not in ROPE_SCALING)})),
    "mixer_defaults": st.one_of(st.lists(st.integers(), max_size=2), st.text(max_size=3), st.integers(),
                                st.dictionaries(st.sampled_from(["attention", "mamba2"]), st.integers(), min_size=1),
                                st.dictionaries(st.text(min_size=1, max_size=5).filter(lambda s: s not in (
                                    "attention", "mamba2")), st.just({}), min_size=1)),
    "layers": st.one_of(st.lists(st.one_of(st.integers(), st.text(max_size=3), st.none()), min_size=2, max_size=2),
                        st.lists(st.fixed_dictionaries({"mixer": st.integers()}), min_size=2, max_size=2),
                        st.lists(st.fixed_dictionaries({"mixer": st.just("attention"),
                                                        "mixer_args": st.lists(st.integers())}), min_size=2,
                                 max_size=2)),
    "extra": st.one_of(st.lists(st.integers(), max_size=2), st.integers(), st.text(max_size=3)),
    "family": st.one_of(st.integers(), st.lists(st.text(max_size=2), max_size=1)),
}
BASE = {"vocab_size": V, "d_model": D, "n_layers": 2, "mixer_defaults": {"attention": {"num_heads": 4}}}


@pytest.mark.reliability("random invalid configs")
@settings(CI, max_examples=150)
@given(data=st.data())
def test_random_invalid_configs_are_refused_naming_the_field(data, cases):
    cases.add()
    field = data.draw(st.sampled_from(sorted(BAD_FIELDS)))
    value = data.draw(BAD_FIELDS[field])
    d = {**BASE, field: value}
    if field not in ("layers", "mixer_defaults"):
        d["mixers"] = "attention"
    if field == "mixer_defaults":
        d["mixers"] = "attention"
    with pytest.raises(ValueError) as e:
        zoo.ZooConfig.from_dict(d)
    assert field in str(e.value), (field, value, str(e.value))


@st.composite
def bad_mixer_argument(draw):
    name = draw(st.sampled_from(list_mixers()))
    params = mixer_parameters(get_mixer(name))
    arg = draw(st.sampled_from(sorted(params)))
    ann = params[arg].annotation
    kinds = {"int": st.one_of(st.text(min_size=1, max_size=3), st.floats(allow_nan=False), st.lists(st.integers(),
                                                                                                    max_size=1)),
             "float": st.one_of(st.text(min_size=1, max_size=3), st.just(NAN), st.lists(st.floats(), max_size=1)),
             "bool": st.one_of(st.text(min_size=1, max_size=3), st.floats(), st.lists(st.booleans(), max_size=1))}
    key = next((k for k in ("bool", "float", "int") if k in str(ann) or getattr(ann, "__name__", "") == k), None)
    if key is None:
        return None
    if key == "float" and "None" in str(ann):  # float | None etc. (lists of floats may be accepted)
        return name, arg, draw(st.one_of(st.text(min_size=1, max_size=3), st.just(NAN)))
    return name, arg, draw(kinds[key])


@pytest.mark.reliability("random invalid configs")
@settings(CI, max_examples=60)
@given(case=bad_mixer_argument())
def test_random_ill_typed_mixer_arguments_are_refused_naming_them(case, cases):
    if case is None:
        return
    cases.add()
    name, arg, value = case
    with pytest.raises(ValueError) as e:
        zoo.ZooConfig.from_dict({**BASE, "mixers": {"mixer": name, "mixer_args": {arg: value}}})
    msg = str(e.value)
    assert arg in msg and "layers[0]" in msg, msg


def test_nan_is_refused_for_float_arguments():
    with pytest.raises(ValueError, match=r"argument softmax_scale=nan of mixer 'attention' should be float"):
        zoo.ZooConfig.from_dict({**BASE, "layers": [{"mixer": "attention", "mixer_args": {"softmax_scale": NAN}}] * 2})
    with pytest.raises(ValueError, match=r"dt_limit=\[0.5\] of mixer 'mamba2' should be tuple\[float, float\]"):
        zoo.ZooConfig.from_dict({**BASE, "mixers": {"mixer": "mamba2", "mixer_args": {"dt_limit": [0.5]}}})


def test_rope_scaling_validation_covers_every_implemented_variant():
    from zoo.layers.rope import ROPE_TYPES

    assert set(ROPE_SCALING) == set(ROPE_TYPES)


# ------------------------------------------------------------------------------------------- reference readers
HOSTILE_VALUES = ("x", "1e3", [], [1, "a"], {}, {"__float__": "NaN"}, -1, 0, 1.5, NAN, INF, True, None, 10**12,
                  -10**12)


def _fields(obj, at=()):
    """Every path into a JSON-like config (the first 3 entries of lists: layer patterns repeat)."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj[:3]) if isinstance(obj, list) else ()
    for k, v in items:
        yield at + (k,)
        yield from _fields(v, at + (k,))


@functools.cache
def reference_configs() -> tuple[tuple[str, dict, tuple], ...]:
    """(family, reference config.json written by the family or one of its export formats, its field paths) for the
    first preset of every registered family (drawn from the registry)."""
    out = []
    for name in list_families():
        fam = get_family(name)
        if not fam.presets:
            continue
        config = zoo.ZooConfig.from_dict(copy.deepcopy(next(iter(fam.presets.values())).config))
        for fmt in (fam, *fam.export_formats.values()):
            cfg = json.loads(json.dumps(fmt.config_to_reference(config)))
            assert fam.detect(cfg) and fam.config_from_reference(cfg).n_layers == config.n_layers, name  # intact
            out.append((name, cfg, tuple(_fields(cfg))))
    return tuple(out)


@pytest.mark.reliability("random invalid configs")
def test_reference_readers_refuse_hostile_fields_with_value_errors(cases):
    """Every field path x every hostile value (cheap: readers refuse or validate without allocating)."""
    broke = []
    for family, cfg0, paths in reference_configs():
        for path in paths:
            for value in HOSTILE_VALUES:
                cases.add()
                cfg = copy.deepcopy(cfg0)
                node = cfg
                for k in path[:-1]:
                    node = node[k]
                node[path[-1]] = value
                try:
                    for name in list_families():
                        if get_family(name).detect(cfg):  # detectors never raise; every claiming reader checks it
                            try:
                                get_family(name).config_from_reference(cfg)
                            except ValueError:
                                pass
                except Exception as e:  # noqa: BLE001 - what the test looks for
                    broke.append(f"{family} {path}={value!r}: {type(e).__name__}: {e}")
    assert not broke, "\n".join(broke[:20])
