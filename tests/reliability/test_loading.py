"""Hostile checkpoints: loading never reads outside the checkpoint directory and never trusts its contents blindly.

Every case builds a small valid checkpoint, breaks one thing, and asserts the exact refusal (type and message); the
cases that must be refused before any weight is read also assert that no weight file was opened."""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import zoo
import zoo.checkpoint
from tests.helpers import make_hf_llama
from zoo.checkpoint import load_weights

pytestmark = [pytest.mark.reliability("hostile checkpoint files"), pytest.mark.usefixtures("single_thread")]

CONFIG = {"vocab_size": 64, "d_model": 32, "n_layers": 2, "mixers": "attention",
          "mlp": {"intermediate_size": 64}, "mixer_defaults": {"attention": {"num_heads": 4, "num_kv_heads": 2}},
          "max_position_embeddings": 256}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return zoo.create_model(CONFIG).eval()


@pytest.fixture()
def ckpt(model, tmp_path):
    model.save_pretrained(tmp_path / "m", card=False)
    return tmp_path / "m"


def logits(model):
    ids = torch.arange(12).view(2, 6)
    with torch.no_grad():
        return model(ids).logits


def shard(path: Path, n: int = 2, index_name: str = "model.safetensors.index.json") -> dict[str, str]:
    """Split ``model.safetensors`` into ``n`` shards with a transformers-style index; returns the weight map."""
    sd = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    names = sorted(sd)
    weight_map = {}
    for i in range(n):
        file = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = {k: sd[k] for k in names[i::n]}
        save_file(part, path / file)
        weight_map.update({k: file for k in part})
    write_index(path, weight_map, index_name)
    return weight_map


def write_index(path: Path, weight_map: dict, name: str = "model.safetensors.index.json") -> None:
    (path / name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def no_weight_reads(monkeypatch):
    """Make any read of tensor data fail the test (refusals must come from headers and config alone)."""
    def boom(*a, **k):
        raise AssertionError("a weight file was read")
    monkeypatch.setattr(zoo.checkpoint, "_load_safetensors", boom)
    monkeypatch.setattr(zoo.checkpoint, "_load_bin", boom)


# ------------------------------------------------------------------------------------------- shard indexes
def test_sharded_checkpoint_loads_exactly(model, ckpt):
    shard(ckpt, 3)
    assert torch.equal(logits(zoo.from_pretrained(ckpt)), logits(model))


@pytest.mark.parametrize("entry", [
    "../elsewhere.safetensors", "ABSOLUTE", "sub/model-1.safetensors", "..", ".", "", "sub\\model.safetensors",
    "C:model.safetensors", 7, None, "model.safetensors\x00.txt",
])
def test_index_entries_that_are_not_plain_file_names_are_refused(ckpt, entry, monkeypatch):
    weight_map = shard(ckpt, 2)
    # a complete, valid checkpoint outside the directory: reading it would "work"
    outside = ckpt.parent / "elsewhere.safetensors"
    save_file({k: load_file(ckpt / f)[k] for k, f in weight_map.items()}, outside)
    if entry == "ABSOLUTE":
        entry = str(outside)
    victim = sorted(weight_map)[0]
    write_index(ckpt, {**weight_map, victim: entry})
    opened = []
    real_safe_open = zoo.checkpoint.safe_open
    monkeypatch.setattr(zoo.checkpoint, "safe_open", lambda f, **k: opened.append(f) or real_safe_open(f, **k))
    with pytest.raises(ValueError, match=r"names shard .* which is not a plain file name inside .*refusing to read "
                                         r"anything outside the checkpoint directory"):
        zoo.from_pretrained(ckpt)
    with pytest.raises(ValueError, match="not a plain file name"):
        load_weights(ckpt)
    assert all(Path(f).parent == ckpt for f in opened), opened


def test_bin_index_with_a_path_outside_is_refused(ckpt):
    sd = load_file(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    torch.save(sd, ckpt.parent / "outside.bin")
    write_index(ckpt, {k: "../outside.bin" for k in sd}, "pytorch_model.bin.index.json")
    with pytest.raises(ValueError, match=r"pytorch_model.bin.index.json names shard '../outside.bin'"):
        zoo.from_pretrained(ckpt)


@pytest.mark.parametrize("content,match", [
    ("{not json", r"model.safetensors.index.json is not valid JSON"),
    ("[]", r"must hold a JSON object with a non-empty 'weight_map'"),
    ('{"weight_map": []}', r"must hold a JSON object with a non-empty 'weight_map'"),
    ('{"weight_map": {}}', r"must hold a JSON object with a non-empty 'weight_map'"),
])
def test_malformed_index_is_refused(ckpt, content, match):
    shard(ckpt, 2)
    (ckpt / "model.safetensors.index.json").write_text(content)
    with pytest.raises(ValueError, match=match):
        zoo.from_pretrained(ckpt)


def test_tensor_in_two_shards_is_an_error_naming_both(ckpt):
    weight_map = shard(ckpt, 2)
    first, second = sorted(set(weight_map.values()))
    key = next(k for k, f in weight_map.items() if f == first)
    sd2 = load_file(ckpt / second)
    sd2[key] = torch.zeros_like(load_file(ckpt / first)[key])  # a second copy, with other values
    save_file(sd2, ckpt / second)
    msg = rf"tensor '{key}' is in two weight files, {first} and {second}; refusing to pick one"
    with pytest.raises(ValueError, match=msg):
        zoo.from_pretrained(ckpt)
    with pytest.raises(ValueError, match=msg):
        load_weights(ckpt)


def test_shard_tensor_the_index_does_not_list_is_an_error_naming_both(ckpt):
    weight_map = shard(ckpt, 2)
    key = sorted(weight_map)[0]
    write_index(ckpt, {k: v for k, v in weight_map.items() if k != key})
    with pytest.raises(ValueError, match=rf"shard {weight_map[key]} holds tensor '{key}' but the index "
                                         r"model.safetensors.index.json does not list it"):
        zoo.from_pretrained(ckpt)


def test_index_assigning_a_tensor_to_another_shard_is_refused(ckpt):
    weight_map = shard(ckpt, 2)
    files = sorted(set(weight_map.values()))
    key = next(k for k, f in weight_map.items() if f == files[0])
    write_index(ckpt, {**weight_map, key: files[1]})
    with pytest.raises(ValueError, match=rf"shard {files[0]} holds tensor '{key}' but the index "
                                         rf"model.safetensors.index.json lists it in {files[1]}"):
        zoo.from_pretrained(ckpt)


def test_index_listing_a_tensor_in_no_shard_is_refused(ckpt):
    weight_map = shard(ckpt, 2)
    write_index(ckpt, {**weight_map, "layers.9.mixer.q_proj.weight": sorted(set(weight_map.values()))[0]})
    with pytest.raises(ValueError, match=r"lists tensors that are in none of its shards: "
                                         r"\['layers.9.mixer.q_proj.weight'\]"):
        zoo.from_pretrained(ckpt)


def test_bin_shards_with_a_duplicate_tensor_are_refused(ckpt):
    sd = load_file(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    names = sorted(sd)
    torch.save({k: sd[k] for k in names[::2]}, ckpt / "a.bin")
    torch.save({k: sd[k] for k in names[1::2] + [names[0]]}, ckpt / "b.bin")
    write_index(ckpt, {**{k: "a.bin" for k in names[::2]}, **{k: "b.bin" for k in names[1::2]}},
                "pytorch_model.bin.index.json")
    with pytest.raises(ValueError, match=rf"tensor '{names[0]}' is in two weight files, a.bin and b.bin"):
        zoo.from_pretrained(ckpt)


# ------------------------------------------------------------------------------------------- weights' values
def edit(path: Path, fn) -> None:
    sd = load_file(path / "model.safetensors")
    fn(sd)
    save_file(sd, path / "model.safetensors")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_reported_by_name(ckpt, bad):
    def poison(sd):
        sd["layers.1.mixer.v_proj.weight"][3, 4] = bad
    edit(ckpt, poison)
    with pytest.warns(UserWarning, match=r"non-finite values \(NaN or Inf\) in 1 tensor\(s\): "
                                         r"\['layers.1.mixer.v_proj.weight'\]"):
        zoo.from_pretrained(ckpt)
    with pytest.raises(ValueError, match=r"non-finite values .* \['layers.1.mixer.v_proj.weight'\]"):
        zoo.from_pretrained(ckpt, strict_finite=True)


def test_finite_checkpoint_loads_without_warnings(ckpt):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        zoo.from_pretrained(ckpt, strict_finite=True)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool])
def test_integer_tensors_where_floats_are_expected_are_refused(ckpt, dtype):
    edit(ckpt, lambda sd: sd.__setitem__("norm_f.weight", torch.ones(32, dtype=dtype)))
    with pytest.raises(ValueError, match=rf"dtype kinds differ, refusing to cast \(1\): \['norm_f.weight: checkpoint "
                                         rf"{dtype} vs model torch.float32'\]"):
        zoo.from_pretrained(ckpt)


def test_reference_checkpoint_with_integer_weights_is_refused(tmp_path):
    make_hf_llama(tmp_path)
    sd = load_file(tmp_path / "model.safetensors")
    sd["model.norm.weight"] = sd["model.norm.weight"].round().to(torch.int64)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"norm_f.weight: checkpoint torch.int64 vs model torch.float32"):
        zoo.from_pretrained(tmp_path)


# ------------------------------------------------------------------------------------------- configs in files
def edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes,match", [
    ({"norm_eps": {"__float__": "NaN"}}, r"ZooConfig.norm_eps must be a positive finite float, got nan"),
    ({"norm_eps": -1e-5}, r"ZooConfig.norm_eps must be a positive finite float, got -1e-05"),
    ({"rope_theta": 0}, r"ZooConfig.rope_theta must be a positive finite float, got 0"),
    ({"rope_theta": -10000.0}, r"ZooConfig.rope_theta must be a positive finite float"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 0.0}}, r"rope_scaling: factor must be a positive number"),
    ({"rope_scaling": {"rope_type": "linear"}}, r"rope_scaling: factor must be a positive number for rope_type "
                                                r"'linear', got nothing"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, r"rope_scaling: low_freq_factor must be"),
    ({"rope_scaling": {"rope_type": "su", "factor": 4.0}}, r"rope_scaling: rope_type 'su' is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "beta_fast": -1}}, r"rope_scaling: beta_fast must be a "
                                                                              r"positive number for rope_type 'yarn'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "alpha": 1}}, r"rope_scaling: fields \['alpha'\] are not "
                                                                         r"used by rope_type 'yarn'"),
    ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0]}}, r"long_factor must be a non-empty list of "
                                                                         r"positive numbers"),
    ({"rope_scaling": {"rope_type": "dynamic"}}, r"factor must be a positive number for rope_type 'dynamic', got "
                                                 r"nothing"),
    ({"bos_token_id": 1.5}, r"ZooConfig.bos_token_id must be null or an int in \[0, vocab_size=64\), got 1.5"),
    ({"eos_token_id": "2"}, r"ZooConfig.eos_token_id must be null or an int or a non-empty list of ints"),
    ({"pad_token_id": 64}, r"ZooConfig.pad_token_id must be null or an int in \[0, vocab_size=64\), got 64"),
    ({"eos_token_id": [1, -1]}, r"ZooConfig.eos_token_id must be"),
    ({"layers": [1, 2]}, r"ZooConfig.layers\[0\] must be a dict like"),
    ({"layers": [{"mixer": "attention", "mixer_args": [], "mlp": None}] * 2}, r"ZooConfig.layers\[0\].mixer_args must "
                                                                              r"be a dict"),
    ({"layers": [{"mixer": "attention", "kind": "x"}] * 2}, r"ZooConfig.layers\[0\] has unknown field\(s\) \['kind'\]"),
    ({"mixer_defaults": []}, r"ZooConfig.mixer_defaults must be a dict of dicts, got \[\]"),
    ({"tie_embeddings": "yes"}, r"ZooConfig.tie_embeddings must be true or false, got 'yes'"),
    ({"residual_in_fp32": 1}, r"ZooConfig.residual_in_fp32 must be true or false, got 1"),
    ({"n_layers": "2"}, r"ZooConfig.n_layers must be a positive int"),
    ({"vocab_size": 64.0}, r"ZooConfig.vocab_size must be a positive int, got 64.0"),
    ({"logit_scale": {"__float__": "Infinity"}}, r"ZooConfig.logit_scale must be a finite float, got inf"),
    ({"extra": []}, r"ZooConfig.extra must be a dict"),
    ({"family": 3}, r"ZooConfig.family must be a string or null, got 3"),
])
def test_zoo_config_values_are_validated_before_loading(ckpt, changes, match, monkeypatch):
    edit_config(ckpt, **changes)
    no_weight_reads(monkeypatch)
    with pytest.raises(ValueError, match=match):
        zoo.from_pretrained(ckpt)


@pytest.mark.parametrize("text,match", [
    ("[1, 2]", r"must hold a JSON object, got list"),
    ("{'single': 'quotes'}", r"is not valid JSON"),
    ("\xff\xfe garbage", r"is not valid JSON"),
    ("[" * 100000, r"is not valid JSON"),
])
def test_config_json_that_is_not_a_json_object_is_refused(ckpt, text, match):
    (ckpt / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=match):
        zoo.from_pretrained(ckpt)


def test_huge_config_json_is_not_read(ckpt):
    with open(ckpt / "config.json", "r+b") as f:
        f.truncate(zoo.checkpoint.MAX_CONFIG_BYTES + 1)
    with pytest.raises(ValueError, match=r"a config.json is at most .* refusing to read it"):
        zoo.from_pretrained(ckpt)


# ------------------------------------------------------------------------------------------- sizes before allocation
def test_huge_vocab_fails_before_reading_or_allocating(ckpt, monkeypatch):
    edit_config(ckpt, vocab_size=10**12)
    no_weight_reads(monkeypatch)
    with pytest.raises(ValueError, match=r"implies 64,000,000,\d{3},\d{3} parameters \(vocab_size=1,000,000,000,000, "
                                         r"d_model=32, n_layers=2\) but the checkpoint's tensors hold only [\d,]+ "
                                         r"values.*refusing before allocating the model"):
        zoo.from_pretrained(ckpt)


def test_huge_vocab_model_is_refused_before_allocation():
    with pytest.raises(MemoryError, match=r"building this model needs .* for 64,000,000,\d{3},\d{3} parameters "
                                            r"\(vocab_size=1,000,000,000,000, d_model=32, n_layers=2\) but only .* "
                                            r"of memory is available"):
        zoo.create_model({**CONFIG, "vocab_size": 10**12})


def test_hundred_thousand_layers_fail_without_building_them(ckpt, monkeypatch):
    """A config of 10**5 layers over a 2-layer checkpoint: refused from the headers, building one block (on the meta
    device, to count its parameters), not 10**5."""
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["n_layers"] = 100_000
    cfg["layers"] = [cfg["layers"][0]] * 100_000
    (ckpt / "config.json").write_text(json.dumps(cfg))
    no_weight_reads(monkeypatch)
    built = []
    original = zoo.models.lm.Block.__init__
    monkeypatch.setattr(zoo.models.lm.Block, "__init__", lambda self, *a: built.append(1) or original(self, *a))
    with pytest.raises(ValueError, match=r"implies [\d,]+ parameters \(vocab_size=64, d_model=32, n_layers=100,000\)"):
        zoo.from_pretrained(ckpt)
    assert len(built) == 1


def test_model_larger_than_memory_is_refused_before_reading(ckpt, monkeypatch):
    monkeypatch.setattr("zoo.limits.available_memory", lambda: 1024)
    no_weight_reads(monkeypatch)
    with pytest.raises(MemoryError, match=r"loading '.*' needs .* for [\d,]+ parameters .* but only 1.0 KB of "
                                            r"memory is available"):
        zoo.from_pretrained(ckpt)


def test_parameter_count_matches_the_model(model):
    assert zoo.limits.parameter_count(model.config) == model.num_parameters()
    untied = zoo.create_model({**CONFIG, "tie_embeddings": False, "mixers": {"0": "mamba2(d_state=8, headdim=8)",
                                                                             "1": "sliding_window(window=4)"}})
    assert zoo.limits.parameter_count(untied.config) == untied.num_parameters()


# ------------------------------------------------------------------------------------------- ids that are directories
def test_directory_like_ids_do_not_list_the_directory(tmp_path, monkeypatch):
    (tmp_path / "secret-file-name.txt").write_text("x")
    (tmp_path / "inner").mkdir()
    monkeypatch.chdir(tmp_path / "inner")
    for target in (str(tmp_path), "..", "/etc", str(tmp_path) + "/"):
        with pytest.raises(FileNotFoundError, match=r"is not a checkpoint directory: it has no config.json") as e:
            zoo.from_pretrained(target)
        assert "secret-file-name" not in str(e.value) and "passwd" not in str(e.value)
    with pytest.raises(ValueError, match="the model id is empty"):
        zoo.from_pretrained("")
    with pytest.raises(ValueError, match="the model id is empty"):
        zoo.from_pretrained("   ")


def test_missing_weights_error_does_not_list_the_directory(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "secret-file-name.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no weights in") as e:
        zoo.from_pretrained(ckpt)
    assert "secret-file-name" not in str(e.value)


# ------------------------------------------------------------------------------------------- reference formats
def llama_dir(tmp_path: Path) -> Path:
    make_hf_llama(tmp_path / "llama")
    return tmp_path / "llama"


@pytest.mark.parametrize("changes,match", [
    ({"num_attention_heads": "8"}, r"llama config: num_attention_heads='8' must be an int >= 1"),
    ({"hidden_size": None}, r"llama config: required field 'hidden_size' is missing"),
    ({"rms_norm_eps": {"__float__": "NaN"}}, r"llama config: rms_norm_eps=nan must be a positive finite number"),
    ({"rms_norm_eps": -1e-6}, r"llama config: rms_norm_eps=-1e-06 must be a positive finite number"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 0}}, r"rope_theta=0 must be a positive finite"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, r"rope_scaling: factor must be a positive "
                                                                      r"number for rope_type 'linear', got nothing"),
    ({"rope_parameters": {"rope_type": "linear", "factor": -2.0, "rope_theta": 1e4}}, r"factor must be a positive"),
    ({"rope_parameters": {"rope_type": "ntk", "factor": 2.0, "rope_theta": 1e4}}, r"rope_type 'ntk' is not supported"),
    ({"tie_word_embeddings": "yes"}, r"llama config: tie_word_embeddings='yes' must be true or false"),
    ({"eos_token_id": "2"}, r"llama config: eos_token_id='2' must be a non-negative int or a list of them"),
    ({"bos_token_id": 1.0}, r"llama config: bos_token_id=1.0 must be a non-negative int"),
    ({"bos_token_id": 5000}, r"ZooConfig.bos_token_id must be null or an int in \[0, vocab_size=1001\)"),
    ({"num_key_value_heads": 3}, r"num_heads=8 must be a positive multiple of num_kv_heads=3"),
    ({"hidden_act": "swiglu"}, r"llama config: hidden_act='swiglu' is not supported"),
    ({"vocab_size": 10**12}, r"implies [\d,]+ parameters \(vocab_size=1,000,000,000,000"),
    ({"num_hidden_layers": 100_000}, r"implies [\d,]+ parameters \(vocab_size=1,001, d_model=64, n_layers=100,000\)"),
    ({"attn_logit_softcapping": 50.0}, r"llama config.json has fields the zoo's llama reader does not implement: "
                                       r"\['attn_logit_softcapping'\]"),
    ({"quantization_config": {"quant_method": "bitsandbytes"}}, r"does not implement: \['quantization_config'\]"),
])
def test_reference_llama_config_values_are_validated(tmp_path, changes, match, monkeypatch):
    path = llama_dir(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (path / "config.json").write_text(json.dumps(cfg))
    no_weight_reads(monkeypatch)
    with pytest.raises(ValueError, match=match):
        zoo.from_pretrained(path)


SSM_CFG = {"d_model": 32, "d_intermediate": 0, "n_layer": 3, "vocab_size": 50,
           "ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 8, "chunk_size": 8},
           "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
           "pad_vocab_size_multiple": 8, "tie_embeddings": True}
ATTN = {"num_heads": 4, "num_heads_kv": 2, "head_dim": 8, "causal": True, "rotary_emb_dim": 8}


@pytest.mark.parametrize("changes,match", [
    ({"attn_layer_idx": [5], "attn_cfg": ATTN}, r"mamba_ssm config: attn_layer_idx has entries out of range "
                                                r"\[0, n_layer=3\) or repeated: \[5\]"),
    ({"attn_layer_idx": [-1], "attn_cfg": ATTN}, r"out of range \[0, n_layer=3\) or repeated: \[-1\]"),
    ({"attn_layer_idx": [1, 1], "attn_cfg": ATTN}, r"or repeated: \[1\]"),
    ({"attn_layer_idx": ["1"], "attn_cfg": ATTN}, r"attn_layer_idx=\['1'\] must be a list of layer indices"),
    ({"attn_layer_idx": [1], "attn_cfg": {**ATTN, "num_heads": "4"}},
     r"mamba_ssm config: attn_cfg.num_heads='4' must be an int >= 1"),
    ({"attn_layer_idx": [1], "attn_cfg": {**ATTN, "window_size": 64}}, r"does not implement: \['window_size'\]"),
    ({"ssm_cfg": []}, r"mamba_ssm config: ssm_cfg=\[\] must be a JSON object"),
    ({"ssm_cfg": {"layer": "Mamba2", "d_state": "8"}}, r"ssm_cfg: argument d_state='8' of mixer 'mamba2' should be "
                                                       r"int"),
    ({"ssm_cfg": {"layer": "Mamba2", "dt_max": {"__float__": "NaN"}}}, r"ssm_cfg: argument dt_max=nan of mixer "
                                                                       r"'mamba2' should be float"),
    ({"d_model": "32"}, r"mamba_ssm config: d_model='32' must be an int >= 1"),
    ({"tie_embeddings": "true"}, r"mamba_ssm config: tie_embeddings='true' must be true or false"),
    ({"norm_epsilon": 0.0}, r"mamba_ssm config: norm_epsilon=0.0 must be a positive finite number"),
    ({"ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 8, "chunk_size": 8, "d_ssm": 1}},
     r"mamba2: d_ssm=1 .* is not divisible by headdim=8"),
])
def test_reference_mamba_ssm_config_values_are_validated(tmp_path, changes, match, monkeypatch):
    good = zoo.models.mamba2.config_from_reference(SSM_CFG)
    zoo.models.mamba2.save_mamba_ssm(zoo.create_model(good), tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**SSM_CFG, **changes}))
    no_weight_reads(monkeypatch)
    with pytest.raises(ValueError, match=match):
        zoo.from_pretrained(tmp_path)


def test_mamba_ssm_bin_with_a_huge_config_is_refused_before_building(tmp_path, monkeypatch):
    """.bin files are read (bounded by their size) before the check; the model is still never built."""
    zoo.models.mamba2.save_mamba_ssm(zoo.create_model(zoo.models.mamba2.config_from_reference(SSM_CFG)), tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**SSM_CFG, "n_layer": 100_000}))
    monkeypatch.setattr(zoo.models.lm.ZooForCausalLM, "__init__", lambda *a: pytest.fail("model built"))
    with pytest.raises(ValueError, match=r"implies [\d,]+ parameters \(vocab_size=56, d_model=32, n_layers=100,000\)"):
        zoo.from_pretrained(tmp_path)


def hf_mamba2_config(**changes) -> dict:
    from transformers import Mamba2Config

    cfg = Mamba2Config(vocab_size=64, hidden_size=32, num_heads=8, head_dim=8, state_size=8, n_groups=1, expand=2,
                       chunk_size=8, num_hidden_layers=2).to_dict()
    cfg.update(changes)
    return {k: v for k, v in cfg.items() if not (isinstance(v, float) and math.isinf(v))}


def test_flash_linear_attention_mamba2_config_is_refused_naming_its_fields(tmp_path):
    """fla's Mamba2Config says ``model_type: mamba2`` too, but its ``norm_eps``, ``dt_limit``, ``D_has_hdim`` (...)
    replace transformers' fields and change the math: refused, not loaded with them ignored."""
    fla = {"model_type": "mamba2", "architectures": ["Mamba2ForCausalLM"], "vocab_size": 64, "hidden_size": 32,
           "state_size": 8, "num_hidden_layers": 2, "head_dim": 8, "num_heads": 8, "expand": 2, "conv_kernel": 4,
           "n_groups": 1, "use_bias": False, "use_conv_bias": True, "hidden_act": "silu", "residual_in_fp32": True,
           "chunk_size": 8, "tie_word_embeddings": False, "norm_eps": 1e-6, "conv_init": None,
           "A_init_range": [1, 16], "D_has_hdim": True, "dt_min": 0.001, "dt_max": 0.1, "dt_init_floor": 1e-4,
           "dt_limit": [0.0, 0.5], "rescale_prenorm_residual": True, "rmsnorm": True, "norm_before_gate": False,
           "fuse_norm": True, "fuse_cross_entropy": True, "fuse_linear_cross_entropy": False, "use_l2warp": False}
    (tmp_path / "config.json").write_text(json.dumps(fla))
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"transformers mamba2 config.json has fields the zoo's transformers mamba2 "
                                         r"reader does not implement: \['D_has_hdim', 'dt_limit', 'norm_before_gate', "
                                         r"'norm_eps', 'rmsnorm'\]"):
        zoo.from_pretrained(tmp_path)


@pytest.mark.parametrize("changes,match", [
    ({"num_heads": "8"}, r"transformers mamba2 config: num_heads='8' must be an int >= 1"),
    ({"time_step_limit": [0.0]}, r"time_step_limit=\[0.0\] must be a pair \[low, high\]"),
    ({"time_step_limit": [0.0, "inf"]}, r"time_step_limit\[1\]='inf' must be a positive number"),
    ({"layer_norm_epsilon": {"__float__": "NaN"}}, r"layer_norm_epsilon=nan must be a positive finite number"),
    ({"state_size": 0}, r"state_size=0 must be an int >= 1"),
])
def test_reference_transformers_mamba2_config_values_are_validated(tmp_path, changes, match):
    (tmp_path / "config.json").write_text(json.dumps(hf_mamba2_config(**changes)))
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=match):
        zoo.from_pretrained(tmp_path)


MINICPM = {"architectures": ["MiniCPMForCausalLM"], "model_type": "minicpm", "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
           "rms_norm_eps": 1e-5, "vocab_size": 64, "max_position_embeddings": 128, "rope_theta": 10000.0,
           "scale_emb": 12, "dim_model_base": 32, "scale_depth": 1.4, "bos_token_id": 1, "eos_token_id": [2, 3]}


@pytest.mark.parametrize("changes,match", [
    ({"num_attention_heads": "4"}, r"minicpm config: num_attention_heads='4' must be an int >= 1"),
    ({"scale_emb": {"__float__": "NaN"}}, r"minicpm config: scale_emb=nan must be a positive finite number"),
    ({"scale_depth": -1.4}, r"minicpm config: scale_depth=-1.4 must be a positive finite number"),
    ({"tie_word_embeddings": "false"}, r"minicpm config: tie_word_embeddings='false' must be true or false"),
    ({"eos_token_id": [2, 640]}, r"ZooConfig.eos_token_id must be null or an int or a non-empty list"),
    ({"rope_scaling": {"rope_type": "longrope", "long_factor": [1.0] * 4, "short_factor": [1.0] * 4}},
     r"minicpm config: required field 'rope_scaling.original_max_position_embeddings' is missing"),
    ({"sparse_config": []}, r"minicpm config: sparse_config=\[\] must be a JSON object"),
    ({"qk_layernorm": True}, r"minicpm config.json has fields the zoo's minicpm reader does not implement: "
                             r"\['qk_layernorm'\]"),
])
def test_reference_minicpm_config_values_are_validated(tmp_path, changes, match, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps({**MINICPM, **changes}))
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    no_weight_reads(monkeypatch)
    with pytest.raises(ValueError, match=match):
        zoo.from_pretrained(tmp_path)


LACT = {"model_type": "lact_swiglu", "hidden_size": 32, "num_hidden_layers": 2, "num_attn_heads": 4,
        "num_lact_heads": 2, "lact_chunk_size": 8, "window_size": 8, "vocab_size": 64, "max_position_embeddings": 128}


@pytest.mark.parametrize("changes,match", [
    ({"hidden_size": "32"}, r"lact_swiglu config: hidden_size='32' must be an int >= 1"),
    ({"norm_eps": 0}, r"lact_swiglu config: norm_eps=0 must be a positive finite number"),
    ({"rope_theta": {"__float__": "Infinity"}}, r"lact_swiglu config: rope_theta=inf must be a positive finite"),
    ({"use_short_conv": True}, r"lact_swiglu config.json has fields the zoo's lact_swiglu reader does not implement: "
                               r"\['use_short_conv'\]"),
    ({"lact_chunk_size": "8"}, r"lact_swiglu config: lact_chunk_size='8' should be int"),
    ({"use_muon": "yes"}, r"lact_swiglu config: use_muon='yes' should be bool"),
])
def test_reference_lact_config_values_are_validated(tmp_path, changes, match, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps({**LACT, **changes}))
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    no_weight_reads(monkeypatch)
    with pytest.raises(ValueError, match=match):
        zoo.from_pretrained(tmp_path)


S4_LAYER = {"_name_": "s4", "d_state": 8, "l_max": 32, "n_ssm": 1, "final_act": "glu", "dropout": 0.0}
S4_FFN = {"_name_": "ffn", "expand": 4, "activation": "gelu", "dropout": 0.0}


def s4_config(model=None, layers=None, **top) -> dict:
    """A state-spaces/s4 backbone config.json (the Hydra config as JSON), with ``model`` / layer fields replaced."""
    layer = [{**S4_LAYER, **(layers or {}).get(0, {})}, S4_LAYER, {**S4_FFN, **(layers or {}).get(2, {})}]
    return {"model": {"_name_": "model", "d_model": 16, "n_layers": 2, "prenorm": True, "norm": "layer",
                      "residual": "R", "layer": layer, **(model or {})}, "vocab_size": 50, **top}


@pytest.mark.parametrize("cfg,match", [
    (s4_config(model={"n_layers": "2"}), r"s4 config: model.n_layers='2' must be an int >= 1"),
    (s4_config(model={"d_model": 16.0}), r"s4 config: model.d_model=16.0 must be an int >= 1"),
    (s4_config(model={"n_layers": 10**6}), r"model.n_layers=1000000 x 3 layers is absurd"),
    (s4_config(vocab_size=None), r"s4 config: required field 'vocab_size' is missing"),
    (s4_config(tie_embeddings="yes"), r"s4 config: tie_embeddings='yes' must be true or false"),
    (s4_config(model={"prenorm": "yes"}), r"s4 config: model.prenorm='yes' must be true or false"),
    (s4_config(layers={2: {"expand": "4"}}), r"s4 config: model.layer\[2\].expand='4' must be a positive finite"),
    (s4_config(layers={2: {"expand": float("nan")}}), r"model.layer\[2\].expand=nan must be a positive finite"),
    (s4_config(layers={2: {"expand": 1 / 3}}), r"model.layer\[2\].expand=0.333.* must be a multiple of 1/d_model"),
    (s4_config(layers={2: {"activation": ["gelu"]}}), r"model.layer\[2\].activation=\['gelu'\] must be a string"),
    (s4_config(layers={2: {"d_output": 8}}), r"model.layer\[2\].d_output=8 must be null or d_model=16"),
    (s4_config(layers={2: {"glu": True}}), r"s4 config.json model.layer\[2\] \(ffn\) has fields the zoo's s4 "
                                           r"reader does not implement: \['glu'\]"),
    (s4_config(model={"max_position_embeddings": 64}), r"s4 config.json model has fields the zoo's s4 reader does "
                                                       r"not implement: \['max_position_embeddings'\]"),
    (s4_config(model={"norm": {"_name_": "layer", "momentum": 0.1}}), r"s4 config.json model.norm has fields .* "
                                                                      r"\['momentum'\]"),
    (s4_config(model={"bidirectional": True}), r"model.bidirectional / model.pool have no counterpart"),
    (s4_config(layers={0: {"d_state": "8"}}), r"argument d_state='8' of mixer 's4' should be int"),
    (s4_config(layers={0: {"bidirectional": True}}), r"layer 0 sets bidirectional=True, which the causal zoo s4"),
])
def test_reference_s4_config_values_are_validated(tmp_path, cfg, match, monkeypatch):
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    no_weight_reads(monkeypatch)
    with pytest.raises(ValueError, match=match):
        zoo.from_pretrained(tmp_path)


def test_s4_layer_norm_eps_is_read_not_ignored():
    from zoo.models import s4 as fam

    assert fam.config_from_reference(s4_config()).norm_eps == 1e-5
    assert fam.config_from_reference(s4_config(model={"norm": {"_name_": "layer", "eps": 1e-3}})).norm_eps == 1e-3


def test_mistral_sliding_window_must_be_an_int(tmp_path):
    path = llama_dir(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(model_type="mistral", sliding_window="4096")
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"mistral config: sliding_window='4096' must be an int >= 1"):
        zoo.from_pretrained(path)


def test_valid_reference_checkpoints_still_load(tmp_path):
    """The checks refuse nothing a real transformers checkpoint writes (config.json as save_pretrained writes it)."""
    hf = make_hf_llama(tmp_path / "a")
    ids = torch.arange(10).view(1, 10)
    with torch.no_grad():
        assert (zoo.from_pretrained(tmp_path / "a")(ids).logits - hf(ids).logits).abs().max() < 1e-4
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    cfg.update({"torch_dtype": "float32", "_name_or_path": "x", "use_cache": True, "pretraining_tp": 1,
                "attention_dropout": 0.0, "max_length": 20, "top_k": 50})  # 4.x-era neutral fields
    (tmp_path / "b" / "config.json").write_text(json.dumps(cfg))
    zoo.from_pretrained(tmp_path / "b")
    assert os.listdir(tmp_path / "b")
