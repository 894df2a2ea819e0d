"""The GENERator family (GenerTeam): a plain Llama decoder over GENERator's 6-mer DNA vocabulary (4128 ids).

Checkpoints are stock transformers Llama checkpoints (``model_type: "llama"``, stock key names, fp32
``model.safetensors``): the key table and the config maps are the Llama family's. What differs:

* detection: newer hub revisions name the class ``GENERatorForCausalLM`` (``architectures``, and ``auto_map`` ->
  ``modeling_generator.GENERatorForCausalLM``, remote code that subclasses ``LlamaForCausalLM``); the Feb-2025
  release is a plain ``LlamaForCausalLM`` over the 4128-id vocabulary. Both load here without remote code.
  Export writes a plain ``LlamaForCausalLM`` config (no ``auto_map``), loadable by stock transformers.
* the tokenizer: :class:`zoo.tokenizers.DNAKmerTokenizer` (saved next to the weights, see ``zoo.genomics``).
* context: trained at 16,384 tokens = 98,304 bp. Long-context hybrids (:func:`long_context`) swap attention for
  sliding-window / Mamba-2 layers (and InfLLM-V2 once that mixer exists) to go past it.
"""

from __future__ import annotations

from typing import Any, TypeVar

from zoo.config import ZooConfig
from zoo.models import llama
from zoo.models.family import Family, Preset
from zoo.models.lm import ZooForCausalLM, swap_layers

CUSTOM_CLASS = "GENERatorForCausalLM"
VOCAB_SIZE = 4128  # 32 special tokens + 4**6 k-mers
KMER = 6
TRAINED_TOKENS = 16384  # max_position_embeddings of the released models
TRAINED_BP = TRAINED_TOKENS * KMER  # 98,304 bp

M = TypeVar("M", ZooForCausalLM, ZooConfig)


def detect(cfg: dict[str, Any]) -> bool:
    if cfg.get("model_type") != "llama":
        return False
    archs = cfg.get("architectures")
    if isinstance(archs, list) and CUSTOM_CLASS in archs:
        return True
    if "modeling_generator" in str(cfg.get("auto_map") or ""):
        return True
    return cfg.get("vocab_size") == VOCAB_SIZE  # the Feb-2025 release: a plain Llama over the DNA vocabulary


def config_from_reference(cfg: dict[str, Any]) -> ZooConfig:
    # auto_map names GENERator's remote code, which is never run (the model is a stock Llama); it is read for detection
    return llama.reference_config(cfg, "generator", "attention", llama.FIELDS | {"auto_map"})


def config_to_reference(config: ZooConfig) -> dict[str, Any]:
    """A plain ``LlamaForCausalLM`` config (the Feb-2025 format): stock transformers loads it without remote code."""
    return llama.config_to_reference(config, "generator")


CITATION = """@article{wu2025generator,
  title={{GENERator}: A Long-Context Generative Genomic Foundation Model},
  author={Wu, Wei and Li, Qiuyi and Li, Mingyang and others},
  journal={arXiv preprint arXiv:2502.07272},
  year={2025}
}"""


# ------------------------------------------------------------------------------------------ long context
def _sliding_window(n_layers: int, *, window: int = TRAINED_TOKENS, num_sink_tokens: int = 0) -> dict[str, str]:
    """Every layer attends to the last ``window`` tokens (GENERator's own ``sliding_window`` long-context mode,
    window 16384): relative distances stay within the trained range; no new weights; constant decode memory."""
    return {"all": f"sliding_window(window={window}, num_sink_tokens={num_sink_tokens})"}


def _mamba2_hybrid(n_layers: int, *, window: int = TRAINED_TOKENS, every: int = 2, d_state: int = 128,
                   headdim: int = 64, chunk_size: int = 256) -> dict[str, str]:
    """Samba-style interleave: every ``every``-th layer (0, every, 2*every, ...) becomes Mamba-2 (new weights:
    fine-tune on long DNA), the others sliding-window attention. Unbounded context, constant decode memory."""
    if every < 2:
        raise ValueError(f"every={every} must be >= 2 (some attention layers keep the pretrained weights)")
    ssm = [str(i) for i in range(0, n_layers, every)]
    att = [str(i) for i in range(n_layers) if i % every]
    return {",".join(ssm): f"mamba2(d_state={d_state}, headdim={headdim}, chunk_size={chunk_size})",
            ",".join(att): f"sliding_window(window={window})"}


def _infllmv2(n_layers: int, **mixer_args: Any) -> dict[str, str]:
    """InfLLM-V2 dense/sparse switchable attention in every layer (no new weights: it reads the attention
    weights): dense up to ``dense_len`` tokens, above it each query attends to the initial block, its local window
    and its top-k blocks (defaults: MiniCPM4's sparse_config, blocks of 64 tokens = 384 bp)."""
    args = ", ".join(f"{k}={v!r}" for k, v in mixer_args.items())
    return {"all": f"infllmv2({args})" if args else "infllmv2"}


RECIPES = {"sliding_window": _sliding_window, "mamba2_hybrid": _mamba2_hybrid, "infllmv2": _infllmv2}


def long_context(model_or_config: M, recipe: str = "sliding_window", **kwargs: Any) -> M:
    """A GENERator model (weights reused via ``zoo.swap_layers``) or config (``ZooConfig.with_mixers``) whose
    attention layers are swapped for a long-context recipe: ``"sliding_window"`` (no new weights),
    ``"mamba2_hybrid"`` (Mamba-2 in every other layer: fine-tune before use), ``"infllmv2"`` (no new weights)."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown long-context recipe {recipe!r}; available: {sorted(RECIPES)}")
    config = model_or_config.config if isinstance(model_or_config, ZooForCausalLM) else model_or_config
    spec = RECIPES[recipe](config.n_layers, **kwargs)
    if isinstance(model_or_config, ZooForCausalLM):
        return swap_layers(model_or_config, spec)
    return model_or_config.with_mixers(spec)


# ------------------------------------------------------------------------------------------ presets
def _generator(d: int, n: int, inter: int) -> dict[str, Any]:
    base = llama._llama(d, n, 32, 4, inter, VOCAB_SIZE, norm_eps=1e-5, rope_theta=500000.0,
                        max_position_embeddings=TRAINED_TOKENS, bos_token_id=1, eos_token_id=2)
    return {**base, "family": "generator"}


_BASES = {
    # name: (d_model, layers, intermediate, hub id, pinned revision (config.json checked by third-party pins))
    "generator-eukaryote-1.2b-base": (2048, 26, 5632, "GenerTeam/GENERator-eukaryote-1.2b-base",
                                      "5e872c94264891f9adf59d8ea64e426bb68badb5"),
    "generator-eukaryote-3b-base": (3072, 30, 8448, "GenerTeam/GENERator-eukaryote-3b-base",
                                    "7515b17659f092997335226c3fb6aafd06c0add9"),
}
PRESETS: dict[str, Preset] = {}
for _name, (_d, _n, _inter, _hub, _rev) in _BASES.items():
    _size = _name.split("-")[2]
    PRESETS[_name] = Preset(_generator(_d, _n, _inter), hub_id=_hub, revision=_rev,
                            description=f"GENERator eukaryote {_size} (Llama, GQA 32:4, 6-mer DNA vocabulary 4128, "
                                        f"98,304 bp context)")
    for _recipe, _suffix, _what in (("sliding_window", "swa", "every layer sliding-window 16384 tokens: no new "
                                                               "weights, any length at constant memory"),
                                    ("mamba2_hybrid", "mamba2", "Mamba-2 in even layers (NEW weights: fine-tune "
                                                                "first), sliding window 16384 in odd layers"),
                                    ("infllmv2", "infllmv2", "InfLLM-V2 sparse attention in every layer (no new "
                                                             "weights): dense to 8192 tokens, top-64 blocks above")):
        _swap = RECIPES[_recipe](_n)
        PRESETS[f"{_name}-{_suffix}"] = Preset(
            {**_generator(_d, _n, _inter), "mixers": _swap}, hub_id=_hub, revision=_rev, swap=_swap,
            description=f"GENERator eukaryote {_size}, long-context hybrid: {_what}")

FAMILY = Family(
    name="generator",
    detect=detect,
    config_from_reference=config_from_reference,
    config_to_reference=config_to_reference,
    key_table=llama.KEY_TABLE,
    presets=PRESETS,
    model_card="generator",
    specializes="llama",
    citations=(llama.CITATION, CITATION),
    positions_past_max="warn",  # trained at 16,384 tokens; RoPE extrapolates, warned once per model
)
