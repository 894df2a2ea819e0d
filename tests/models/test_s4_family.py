"""The S4 family: the WikiText-103-shaped preset, the training framework's backbone layout (key names and shapes
from the spec sheet), the standalone S4Block / minimal S4D / V3 conversions, strict loading and parity."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.hub import from_pretrained, save_reference
from zoo.layers.s4 import S4
from zoo.models import s4 as fam

pytestmark = pytest.mark.usefixtures("single_thread")

D, N, V = 16, 8, 50
S4_LAYER = {"_name_": "s4", "d_state": N, "l_max": 32, "n_ssm": 1, "final_act": "glu", "dt_transform": "softplus",
            "lr": {"dt": 0.001, "A": 0.001, "B": 0.001}, "dropout": 0.0, "gate": None, "gate_act": "id",
            "mode": "nplr", "measure": None, "postact": None, "verbose": True}
FFN_LAYER = {"_name_": "ffn", "expand": 4, "activation": "gelu", "dropout": 0.0}
REF_CONFIG = {"model": {"_name_": "model", "d_model": D, "n_layers": 2, "prenorm": True, "norm": "layer",
                        "residual": "R", "layer": [S4_LAYER, S4_LAYER, FFN_LAYER]}, "vocab_size": V}


def s4_block_sd(g: torch.Generator, prefix: str, H: int = D, C: int = 1, S: int = 1, r: int = 1) -> dict:
    """A standalone ``S4Block``'s keys and shapes (sheet section 4), random values."""
    n = N // 2
    return {
        f"{prefix}layer.D": torch.randn(C, H, generator=g),
        f"{prefix}layer.kernel.inv_dt": torch.empty(H, 1).uniform_(-4, -1, generator=g),
        f"{prefix}layer.kernel.C": torch.randn(C, H, n, 2, generator=g),
        f"{prefix}layer.kernel.B": torch.randn(1, S, n, 2, generator=g),
        f"{prefix}layer.kernel.A_real": torch.empty(S, n).uniform_(-1.5, 0.5, generator=g),
        f"{prefix}layer.kernel.A_imag": torch.empty(S, n).uniform_(0, 6, generator=g),
        f"{prefix}layer.kernel.P": 0.5 * torch.randn(r, S, n, 2, generator=g),
        f"{prefix}layer.kernel.l_kernel": torch.tensor(32),
        f"{prefix}output_linear.0.weight": torch.randn(2 * H, C * H, generator=g) / 4,
        f"{prefix}output_linear.0.bias": torch.randn(2 * H, generator=g) / 4,
    }


def reference_backbone(seed: int = 0) -> dict:
    """Training-framework layout (sheet section 7): ``model.layers.{i}.{layer,norm}...``, ``model.norm``."""
    g = torch.Generator().manual_seed(seed)
    sd = {"embedding.weight": torch.randn(V, D, generator=g)}
    for i, kind in enumerate(["s4", "s4", "ffn"] * 2):
        p = f"model.layers.{i}."
        sd[p + "norm.norm.weight"] = 1 + 0.1 * torch.randn(D, generator=g)
        sd[p + "norm.norm.bias"] = 0.1 * torch.randn(D, generator=g)
        if kind == "s4":
            sd.update(s4_block_sd(g, p + "layer."))
        else:
            sd[p + "layer.ff.0.0.weight"] = torch.randn(4 * D, D, generator=g) / 4
            sd[p + "layer.ff.0.0.bias"] = torch.randn(4 * D, generator=g) / 4
            sd[p + "layer.ff.2.weight"] = torch.randn(D, 4 * D, generator=g) / 8
            sd[p + "layer.ff.2.bias"] = torch.randn(D, generator=g) / 4
    sd["model.norm.norm.weight"] = 1 + 0.1 * torch.randn(D, generator=g)
    sd["model.norm.norm.bias"] = 0.1 * torch.randn(D, generator=g)
    return sd


def reference_logits(sd: dict, ids: torch.Tensor) -> torch.Tensor:
    """The backbone written out block by block (each S4 block a zoo mixer loaded from its S4Block keys)."""
    h = sd["embedding.weight"][ids]
    for i, kind in enumerate(["s4", "s4", "ffn"] * 2):
        p = f"model.layers.{i}."
        y = F.layer_norm(h, (D,), sd[p + "norm.norm.weight"], sd[p + "norm.norm.bias"])
        if kind == "s4":
            m = S4(D, d_state=N, n_ssm=1, dt_transform="softplus")
            block = {k[len(p + "layer."):]: v for k, v in sd.items() if k.startswith(p + "layer.")}
            m.load_state_dict(fam.mixer_from_s4block(block), strict=True)
            y = m(y)[0]
        else:
            y = F.linear(F.gelu(F.linear(y, sd[p + "layer.ff.0.0.weight"], sd[p + "layer.ff.0.0.bias"])),
                         sd[p + "layer.ff.2.weight"], sd[p + "layer.ff.2.bias"])
        h = h + y
    h = F.layer_norm(h, (D,), sd["model.norm.norm.weight"], sd["model.norm.norm.bias"])
    return h @ sd["embedding.weight"].T


def test_wt103_preset_shape():
    cfg = zoo.ZooConfig.from_preset("s4-wt103")
    assert cfg.n_layers == 32 and cfg.d_model == 1024 and cfg.norm == "layernorm"
    assert [ls.mlp is not None for ls in cfg.layers] == [False, True] * 16
    a = cfg.mixer_kwargs(1)
    assert (a["l_max"], a["n_ssm"], a["d_state"], a["dt_transform"], a["final_act"]) == (8192, 1, 64, "softplus", "glu")
    with torch.device("meta"):
        model = zoo.create_model(cfg)
    # sheet section 4 shapes per S4 layer (H=1024, N/2=32, S=1) + output linear + LayerNorm; the FFN 4x with bias
    s4 = 1024 + 1024 + 1024 * 64 + 64 + 32 + 32 + 64 + (2048 * 1024 + 2048) + 2 * 1024
    ffn = (4096 * 1024 + 4096) + (1024 * 4096 + 1024) + 2 * 1024
    assert model.num_parameters() - 267735 * 1024 == 32 * s4 + 16 * ffn + 2 * 1024
    assert zoo.ZooConfig.from_preset("s4d-wt103").mixer_kwargs(0)["mode"] == "diag"


def test_backbone_loads_strictly_with_parity(tmp_path):
    sd = reference_backbone()
    (tmp_path / "config.json").write_text(json.dumps(REF_CONFIG))
    torch.save(sd, tmp_path / "pytorch_model.bin")
    model = from_pretrained(tmp_path)  # detected as the s4 family, loaded strictly
    assert model.config.family == "s4" and model.config.n_layers == 4
    assert int(model.layers[3].mixer.kernel.l_kernel) == 32
    ids = torch.randint(0, V, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference_logits(sd, ids), rtol=1e-5, atol=1e-5)
    # export back: the same keys and tensors
    save_reference(model, tmp_path / "out")
    back = torch.load(tmp_path / "out" / "pytorch_model.bin", weights_only=True)
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert [ly["_name_"] for ly in cfg["model"]["layer"]] == ["s4", "s4", "ffn"] * 2


def test_adaptive_softmax_and_unplaceable_layers_are_refused():
    cfg = fam.config_from_reference(REF_CONFIG)
    sd = reference_backbone()
    sd["encoder.0.emb_layers.0.weight"] = torch.zeros(V, D)
    with pytest.raises(ValueError, match="adaptive input"):
        fam.FAMILY.state_dict_from_reference(sd, cfg)
    bad = json.loads(json.dumps(REF_CONFIG))
    bad["model"]["layer"] = [FFN_LAYER, S4_LAYER]
    with pytest.raises(ValueError, match="cannot be placed"):
        fam.config_from_reference(bad)
    bad["model"]["layer"] = [{**S4_LAYER, "bidirectional": True}]
    with pytest.raises(ValueError, match="bidirectional"):
        fam.config_from_reference(bad)


def test_minimal_s4d_conversion_matches_its_definition():
    """``models/s4/s4d.py``: ``A = -exp(log_A_real) + i A_imag`` (A_imag stored positive), no B, ZOH,
    ``K = 2 Re sum C (exp(dt A) - 1)/A exp(dt A l)``, FFT conv + D, GELU, Conv1d(k=1) + GLU over channels."""
    g = torch.Generator().manual_seed(5)
    n = N // 2
    sd = {"D": torch.randn(D, generator=g), "kernel.C": torch.randn(D, n, 2, generator=g),
          "kernel.log_dt": torch.empty(D).uniform_(-4, -1, generator=g),
          "kernel.log_A_real": torch.log(0.5 * torch.ones(D, n)),
          "kernel.A_imag": torch.pi * torch.arange(n).repeat(D, 1).float(),
          "output_linear.0.weight": torch.randn(2 * D, D, 1, generator=g) / 4,
          "output_linear.0.bias": torch.randn(2 * D, generator=g) / 4}
    zsd, args = fam.mixer_from_s4d(sd)
    m = S4(D, **args)
    m.load_state_dict(zsd, strict=True)
    L = 37
    u = torch.randn(2, D, L, generator=g, dtype=torch.float64)  # s4d.py is channels-first
    dt = torch.exp(sd["kernel.log_dt"].double())[:, None]
    A = -torch.exp(sd["kernel.log_A_real"].double()) + 1j * sd["kernel.A_imag"].double()
    C = torch.view_as_complex(sd["kernel.C"].double()) * (torch.exp(dt * A) - 1) / A
    K = 2 * torch.einsum("hn,hnl->hl", C, torch.exp(dt[..., None] * A[..., None] * torch.arange(L))).real
    y = torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * torch.fft.rfft(K, n=2 * L), n=2 * L)[..., :L]
    y = F.gelu(y + u * sd["D"].double()[:, None])
    y = F.glu(F.conv1d(y, sd["output_linear.0.weight"].double(), sd["output_linear.0.bias"].double()), dim=-2)
    out, _ = m(u.transpose(1, 2).float())
    assert (out.double() - y.transpose(1, 2)).abs().max().item() < 1e-4


def test_v3_names_convert_to_v4():
    g = torch.Generator().manual_seed(7)
    v4 = s4_block_sd(g, "model.layers.0.layer.")
    v3 = {}
    for k, v in v4.items():
        k3 = k.replace("layer.layer.kernel.", "layer.kernel.kernel.").replace("layer.layer.D", "layer.D")
        k3 = k3.replace("inv_dt", "log_dt").replace("A_real", "log_w_real").replace("A_imag", "w_imag")
        k3 = k3.replace("l_kernel", "L")
        v3[k3] = v[:, 0] if k.endswith("inv_dt") else (-v if k.endswith("A_imag") else v)
    assert "model.layers.0.layer.kernel.kernel.L" in v3 and v3["model.layers.0.layer.kernel.kernel.log_dt"].dim() == 1
    out = fam.v3_to_v4(v3)
    assert set(out) == set(v4)
    assert all(torch.equal(out[k], v4[k]) for k in v4)


def test_card_and_export_refusal(tmp_path):
    model = from_pretrained_tiny()
    model.save_pretrained(tmp_path / "zoo")
    card = (tmp_path / "zoo" / "README.md").read_text()
    assert "C tilde" in card and "gu2022efficiently" in card and "gu2022parameterization" in card
    hybrid = zoo.swap_layers(model, {"1": "attention(num_heads=4)"})
    with pytest.raises(ValueError, match=r"layer\(s\) 1: attention"):
        fam.config_to_reference(hybrid.config)


def from_pretrained_tiny() -> zoo.ZooForCausalLM:
    cfg = fam.config_from_reference(REF_CONFIG)
    model = zoo.create_model(cfg)
    model.load_state_dict(fam.FAMILY.state_dict_from_reference(reference_backbone(), cfg), strict=False)
    return model

