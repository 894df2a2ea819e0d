"""The wheel carries what the package reads at run time (model-card templates, the default model, the demo's
ablation spec, the native kernels' C++ sources): a non-editable install saves a checkpoint with its family's card and
loads the default model."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys, zoo
assert zoo.__file__.startswith(sys.argv[1]), zoo.__file__  # the installed copy, not the source tree
cfg = zoo.ZooConfig.from_dict({"vocab_size": 64, "d_model": 32, "n_layers": 2, "family": "mistral",
                               "mixers": "sliding_window(window=8)", "mixer_defaults": {"attention": {"num_heads": 4}}})
zoo.create_model(cfg).save_pretrained(sys.argv[2])
import torch
from zoo.assets import DEMO_SPEC, default_model
from zoo.ablation import load_spec
model = default_model()
assert model.config.extra["train_length"] > 0
model(torch.zeros(1, 4, dtype=torch.long))
load_spec(DEMO_SPEC)
"""


def test_wheel_install_has_the_cards_the_default_model_and_the_demo_spec(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("*.whl"))
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what pip install puts into site-packages
    assert sorted(p.name for p in (site / "zoo" / "models" / "cards").iterdir()) == sorted(
        p.name for p in (ROOT / "zoo" / "models" / "cards").iterdir())
    assets = site / "zoo" / "assets"
    assert (assets / "demo.yaml").is_file()
    assert sorted(p.name for p in (assets / "default_model").iterdir()) == sorted(
        p.name for p in (ROOT / "zoo" / "assets" / "default_model").iterdir())
    sources = sorted(str(p.relative_to(ROOT)) for ext in ("*.cpp", "*.h") for p in (ROOT / "zoo").rglob(ext))
    assert sources and all((site / s).is_file() for s in sources), sources
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(site), str(tmp_path / "ckpt")], capture_output=True,
                         text=True, cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-2000:]
    card = (tmp_path / "ckpt" / "README.md").read_text()
    assert "A Mistral-architecture model" in card and "`sliding_window(window=8)`" in card
