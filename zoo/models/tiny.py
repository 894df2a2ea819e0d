"""Small zoo-native presets (no reference checkpoint): the demo model and tiny configs for quick experiments."""

from __future__ import annotations

from zoo.models.family import Preset


def _tiny(mixers: dict | str, **kw) -> dict:
    return {
        "vocab_size": 512, "d_model": 128, "n_layers": 4, "mixers": mixers,
        "mlp": {"intermediate_size": 256},
        "mixer_defaults": {"attention": {"num_heads": 4, "num_kv_heads": 2}},
        "max_position_embeddings": 2048, "tie_embeddings": True, **kw,
    }


PRESETS = {
    "zoo-tiny-attention": Preset(_tiny("attention"), description="4-layer GQA transformer, d_model 128"),
}
