"""The wheel carries what the package reads at run time (model-card templates): a non-editable install saves a
checkpoint with its family's card."""

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
"""


def test_wheel_install_saves_with_the_familys_card(tmp_path):
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), str(ROOT)], capture_output=True, text=True, cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("*.whl"))
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what pip install puts into site-packages
    assert sorted(p.name for p in (site / "zoo" / "models" / "cards").iterdir()) == sorted(
        p.name for p in (ROOT / "zoo" / "models" / "cards").iterdir())
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(site), str(tmp_path / "ckpt")], capture_output=True,
                         text=True, cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr[-2000:]
    card = (tmp_path / "ckpt" / "README.md").read_text()
    assert "A Mistral-architecture model" in card and "`sliding_window(window=8)`" in card
