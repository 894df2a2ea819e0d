"""ZooConfig: JSON round trip, short forms, presets, and clear errors at construction."""

import pytest

import zoo
from zoo.config import ZooConfig, parse_layer_selector, parse_mixer_spec


def test_short_forms_expand_and_round_trip(tmp_path):
    cfg = ZooConfig.from_dict({
        "d_model": 64, "n_layers": 6, "vocab_size": 100,
        "mixers": {"default": "attention", "0-1,4": "attention(num_heads=2)"},
        "mlp": {"intermediate_size": 128},
        "mixer_defaults": {"attention": {"num_heads": 4}},
    })
    assert [ls.mixer_args.get("num_heads") for ls in cfg.layers] == [2, 2, None, None, 2, None]
    assert cfg.mixer_kwargs(0)["num_heads"] == 2 and cfg.mixer_kwargs(2)["num_heads"] == 4
    cfg.save(tmp_path / "c.json")
    assert ZooConfig.load(tmp_path / "c.json") == cfg
    assert ZooConfig.from_json(cfg.to_json()) == cfg


def test_parsers():
    assert parse_mixer_spec("sliding_window(window=1024, num_sink_tokens=4)") == (
        "sliding_window", {"window": 1024, "num_sink_tokens": 4})
    assert parse_mixer_spec("attention") == ("attention", {})
    assert parse_layer_selector("0-2,5,-1", 8) == [0, 1, 2, 5, 7]
    with pytest.raises(ValueError, match="out of range"):
        parse_layer_selector("3-9", 8)
    with pytest.raises(ValueError, match="cannot parse"):
        parse_mixer_spec("attention(num_heads=)")


def test_presets():
    assert "llama-3.2-1b" in zoo.list_presets()
    cfg = ZooConfig.from_preset("llama-3.2-1b")
    assert cfg.d_model == 2048 and cfg.n_layers == 16 and cfg.tie_embeddings
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        ZooConfig.from_preset("nope")


@pytest.mark.parametrize("changes,match", [
    ({"mixers": "flash_mamba"}, r"unknown mixer 'flash_mamba'; registered mixers: \["),
    ({"mixers": "attention(heads=4)"}, r"mixer 'attention' has no argument 'heads'; allowed: \["),
    ({"mixers": "attention(num_heads='four')"}, r"num_heads='four' of mixer 'attention' should be int"),
    ({"mixers": "attention(num_heads=6)"}, r"d_model=64 is not divisible by num_heads=6"),
    ({"mixers": "attention(num_heads=8, num_kv_heads=3)"},
     r"num_heads=8 must be a positive multiple of num_kv_heads=3"),
    ({"norm": "batchnorm"}, r"ZooConfig.norm='batchnorm' is not one of \['rmsnorm', 'layernorm'\]"),
    ({"d_model": -1}, r"ZooConfig.d_model must be a positive int, got -1"),
    ({"mlp": {"intermediate_size": 64, "act": "silu"}}, r"unknown MLP field 'act'"),
    ({"colour": "blue"}, r"unknown ZooConfig field\(s\) \['colour'\]"),
])
def test_bad_config_raises_clear_error(changes, match):
    base = {"d_model": 64, "n_layers": 2, "vocab_size": 50, "mixers": "attention"}
    with pytest.raises(ValueError, match=match):
        ZooConfig.from_dict({**base, **changes})


def test_registry_rejects_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        zoo.register_mixer("attention")(type("Dup", (), {}))
    assert "attention" in zoo.list_mixers() and "llama" in zoo.list_families()


def test_replace_resizes_uniform_configs_only():
    cfg = ZooConfig.from_preset("zoo-tiny-attention", n_layers=2, d_model=64)
    assert cfg.n_layers == 2 and len(cfg.layers) == 2 and cfg.d_model == 64
    mixed = cfg.with_mixers({"0": "attention(num_heads=2)"})
    with pytest.raises(ValueError, match="cannot change n_layers 2 -> 3 of a config whose layers differ"):
        mixed.replace(n_layers=3)
    assert mixed.replace(n_layers=3, mixers="attention").n_layers == 3


@pytest.mark.parametrize("defaults,match", [
    ({"atention": {"num_heads": 4}}, r"mixer_defaults has an unknown group 'atention'; groups of the registered"),
    ({"attention": {"num_head": 4}}, r"mixer_defaults\['attention'\] has an unknown argument 'num_head'; allowed"),
    ({"attention": {"num_heads": "four"}}, r"mixer_defaults\['attention'\]: num_heads='four' should be int"),
    ({"attention": 4}, r"mixer_defaults\['attention'\] must be a dict"),
    ({"mamba2": {"window": 8}}, r"mixer_defaults\['mamba2'\] has an unknown argument 'window'"),
])
def test_bad_mixer_defaults_raise_clear_errors(defaults, match):
    base = {"d_model": 64, "n_layers": 2, "vocab_size": 50, "mixers": "attention"}
    with pytest.raises(ValueError, match=match):
        ZooConfig.from_dict({**base, "mixer_defaults": defaults})


def test_mixer_defaults_of_a_group_reach_every_member():
    cfg = ZooConfig.from_dict({"d_model": 64, "n_layers": 2, "vocab_size": 50,
                               "mixers": {"0": "attention", "1": "sliding_window(window=8)"},
                               "mixer_defaults": {"attention": {"num_heads": 2, "num_kv_heads": 1}}})
    assert cfg.mixer_kwargs(0)["num_heads"] == cfg.mixer_kwargs(1)["num_heads"] == 2
