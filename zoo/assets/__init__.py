"""Files shipped inside the package (package data): the default model and the demo's ablation spec.

* ``default_model/``: a 4-layer byte-level attention LM (d_model 128, ~0.8M parameters, safetensors) trained on the
  Python standard library's source (train split) plus passkey samples at 256 tokens (held-out loss 1.21 nats/byte;
  passkey retrieval not learned in this budget: 0.00), by
  ``python scripts/train_default_model.py`` (reproducible: seed, data and settings are in its ``config.json``
  under ``extra``).
* ``demo.yaml``: the ablation that ``zoo demo`` runs on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
DEFAULT_MODEL = ROOT / "default_model"
DEMO_SPEC = ROOT / "demo.yaml"


def default_model_path() -> Path:
    if not (DEFAULT_MODEL / "config.json").is_file():
        raise FileNotFoundError(f"the default model is missing from the installed package ({DEFAULT_MODEL}); "
                                "train it with `python scripts/train_default_model.py`")
    return DEFAULT_MODEL


def default_model(**kwargs: Any):
    """The embedded default model (``zoo.from_pretrained`` on the packaged checkpoint), in eval mode."""
    from zoo.hub import from_pretrained

    return from_pretrained(default_model_path(), **kwargs)
