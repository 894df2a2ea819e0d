"""The Llama family: transformers ``LlamaForCausalLM`` checkpoints (``model_type: "llama"``).

Also the base of GENERator, MASFormer and LongGen (a Llama with other mixers in some layers).
Keys: ``model.layers.{i}.self_attn.*`` are the attention mixer's own names, so the table is prefix renames.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from zoo.bench.adapters import Adapter, KernelAdapter, load_same_weights
from zoo.bench.references import register_reference
from zoo.config import ZooConfig, check_rope_scaling
from zoo.layers.attention import Attention
from zoo.layers.base import BenchCase
from zoo.models.family import Family, Preset, RefConfig, check_reference_fields, refuse_layers

CITATION = """@article{touvron2023llama,
  title={{LLaMA}: Open and Efficient Foundation Language Models},
  author={Touvron, Hugo and Lavril, Thibaut and Izacard, Gautier and others},
  journal={arXiv preprint arXiv:2302.13971},
  year={2023}
}"""

KEY_TABLE = [
    ("model.embed_tokens.", "embedding."),
    ("model.layers.{i}.self_attn.", "layers.{i}.mixer."),
    ("model.layers.{i}.input_layernorm.", "layers.{i}.norm."),
    ("model.layers.{i}.post_attention_layernorm.", "layers.{i}.mlp_norm."),
    ("model.layers.{i}.mlp.", "layers.{i}.mlp."),
    ("model.norm.", "norm_f."),
    ("lm_head.", "lm_head."),
]

HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def detect(cfg: dict[str, Any]) -> bool:
    return cfg.get("model_type") == "llama"


# config.json fields the Llama reader uses (anything else but transformers' neutral fields is refused)
FIELDS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "attention_bias", "mlp_bias", "rms_norm_eps",
    "tie_word_embeddings", "rope_theta", "rope_scaling", "rope_parameters", "max_position_embeddings",
    "initializer_range", "pad_token_id", "bos_token_id", "eos_token_id", "pretraining_tp",
})


def rope_from_reference(cfg: dict[str, Any], fmt: str = "llama") -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) from transformers 4.x (``rope_theta``, ``rope_scaling``) or 5.x (``rope_parameters``)."""
    ref = RefConfig(cfg, fmt)
    params = dict(ref.dict("rope_parameters", {}))
    theta = RefConfig(params, fmt, "rope_parameters.").float("rope_theta", None)
    params.pop("rope_theta", None)
    if theta is None:
        theta = ref.float("rope_theta", 10000.0)
    scaling = params or ref.dict("rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    check_rope_scaling(scaling, f"{fmt} config: rope_scaling")
    return theta, scaling


def config_from_reference(cfg: dict[str, Any]) -> ZooConfig:
    return reference_config(cfg, "llama", "attention", FIELDS)


def reference_config(cfg: dict[str, Any], fmt: str, mixers: Any, fields: frozenset[str]) -> ZooConfig:
    """A transformers Llama-layout ``config.json`` (Llama, Mistral, GENERator) -> ZooConfig with ``mixers`` in every
    layer; every field is type- and range-checked here, naming the reference field."""
    check_reference_fields(cfg, fields, fmt)
    ref = RefConfig(cfg, fmt)
    d, H = ref.int("hidden_size"), ref.int("num_attention_heads")
    head_dim = ref.int("head_dim", None)
    if head_dim is None and d % H:
        raise ValueError(f"{fmt} config: hidden_size={d} is not divisible by num_attention_heads={H} and head_dim is "
                         "not given")
    theta, scaling = rope_from_reference(cfg, fmt)
    act = ref.str("hidden_act", "silu")
    if act not in HF_ACTIVATIONS:
        raise ValueError(f"{fmt} config: hidden_act={act!r} is not supported; supported: {sorted(HF_ACTIVATIONS)}")
    ref.int("pretraining_tp", 1)  # tensor-parallel slicing of the same matmuls: no change to the math
    attention = {
        "num_heads": H,
        "num_kv_heads": ref.int("num_key_value_heads", H),
        "head_dim": head_dim or d // H,
        "qkv_bias": ref.bool("attention_bias", False),
        "o_bias": ref.bool("attention_bias", False),
    }
    mlp = {"intermediate_size": ref.int("intermediate_size"), "activation": HF_ACTIVATIONS[act],
           "bias": ref.bool("mlp_bias", False)}
    n_layers = ref.int("num_hidden_layers")
    try:
        return ZooConfig.from_dict({
            "vocab_size": ref.int("vocab_size"),
            "d_model": d,
            "n_layers": n_layers,
            "mixers": mixers,
            "mlp": mlp,
            "mixer_defaults": {"attention": attention},
            "norm": "rmsnorm",
            "norm_eps": ref.float("rms_norm_eps", 1e-6),
            "tie_embeddings": ref.bool("tie_word_embeddings", False),
            "rope_theta": theta,
            "rope_scaling": scaling,
            "max_position_embeddings": ref.int("max_position_embeddings", 2048),
            "initializer_range": ref.float("initializer_range", 0.02, positive=False),
            "pad_token_id": ref.token_id("pad_token_id"),
            "bos_token_id": ref.token_id("bos_token_id"),
            "eos_token_id": ref.token_id("eos_token_id", many=True),
            "family": fmt,
        })
    except ValueError as e:
        raise ValueError(f"{fmt} config: {e}") from None


def config_to_reference(config: ZooConfig, fmt: str = "llama") -> dict[str, Any]:
    """transformers ``LlamaConfig`` dict; ``fmt`` names the format in errors (Mistral and GENERator reuse this)."""
    bad = [i for i, ls in enumerate(config.layers) if ls.mixer != "attention" or ls.mixer_args or ls.mlp is None]
    refuse_layers(fmt, config, bad, "full-attention + MLP blocks that share one set of attention arguments")
    att = config.mixer_kwargs(0)
    mlp = config.layers[0].mlp
    if any(ls.mlp != mlp for ls in config.layers):
        refuse_layers(fmt, config, [i for i, ls in enumerate(config.layers) if ls.mlp != mlp],
                      f"one MLP shape for every layer (layer 0: {mlp})")
    inv = {v: k for k, v in HF_ACTIVATIONS.items() if k != "swish"}
    if att.get("qkv_bias", False) != att.get("o_bias", False) or att.get("qk_norm", False):
        raise ValueError(f"cannot export to the {fmt} format: it has one attention_bias flag and no QK-norm")
    if not mlp.get("gated", True):
        raise ValueError(f"cannot export to the {fmt} format: its MLP is gated (SwiGLU-style), the model's is not")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": mlp["intermediate_size"],
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": att["num_heads"],
        "num_key_value_heads": att.get("num_kv_heads") or att["num_heads"],
        "head_dim": att.get("head_dim") or config.d_model // att["num_heads"],
        "hidden_act": inv[mlp.get("activation", "silu")],
        "attention_bias": att.get("qkv_bias", False),
        "mlp_bias": mlp.get("bias", False),
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "rope_theta": config.rope_theta,
        **({"rope_scaling": config.rope_scaling} if config.rope_scaling else {}),  # None: transformers 5 warns
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": config.initializer_range,
        "pad_token_id": config.pad_token_id,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
    }


def _llama(d: int, n: int, heads: int, kv: int, inter: int, vocab: int, **kw: Any) -> dict[str, Any]:
    return {"vocab_size": vocab, "d_model": d, "n_layers": n, "mixers": "attention", "family": "llama",
            "mlp": {"intermediate_size": inter}, "norm": "rmsnorm",
            "mixer_defaults": {"attention": {"num_heads": heads, "num_kv_heads": kv}}, **kw}


PRESETS = {
    "llama-3.2-1b": Preset(
        _llama(2048, 16, 32, 8, 8192, 128256, norm_eps=1e-5, tie_embeddings=True, rope_theta=500000.0,
               max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001,
               rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192}),
        hub_id="meta-llama/Llama-3.2-1B", description="Llama 3.2 1B (GQA 32:8, tied head, llama3 RoPE scaling)"),
    "tinyllama-1.1b": Preset(
        _llama(2048, 22, 32, 4, 5632, 32000, norm_eps=1e-5, max_position_embeddings=2048,
               bos_token_id=1, eos_token_id=2),
        hub_id="TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", description="TinyLlama 1.1B (GQA 32:4)"),
}


# ------------------------------------------------------------------------------------------------ benchmarks
# References for ``zoo bench``, built from the zoo module with the same weights (transformers imported lazily).
_TRANSFORMERS_LLAMA = ("transformers", "transformers.modeling_utils", "transformers.cache_utils",
                       "transformers.models.llama.modeling_llama")


class _HFCacheAdapter(Adapter):
    """A transformers module continued through a ``DynamicCache``."""

    config: Any

    def new_state(self, max_length: int) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.config)


class HFLlamaAttentionAdapter(_HFCacheAdapter):
    """transformers ``LlamaAttention`` (SDPA) with its rotary embedding computed inside the timed call."""

    def __init__(self, attn: nn.Module, rotary: nn.Module, config: Any) -> None:
        self.module, self.rotary, self.config = attn, rotary, config

    def _run(self, x: Tensor, start: int, cache: Any) -> Tensor:
        pos = torch.arange(start, start + x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
        kwargs = {"cache": cache} if cache is not None else {}
        return self.module(x, position_embeddings=self.rotary(x, pos), attention_mask=None, **kwargs)[0]

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x, 0, None)

    def step(self, x: Tensor, state: Any) -> Tensor:
        return self._run(x, state.get_seq_length(), state)


class HFCausalLMAdapter(_HFCacheAdapter):
    def __init__(self, model: nn.Module, config: Any) -> None:
        self.module, self.config = model, config

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x, use_cache=False).logits

    def step(self, x: Tensor, state: Any) -> Tensor:  # the next-token logits, as the zoo model's step
        return self.module(x, cache=state, use_cache=True, logits_to_keep=1).logits[:, -1]


def _one_layer_config(attn: nn.Module) -> ZooConfig:
    """A one-block llama config holding the attention module's own arguments (what transformers can mirror)."""
    args = {"num_heads": attn.num_heads, "num_kv_heads": attn.num_kv_heads, "head_dim": attn.head_dim,
            "qkv_bias": attn.q_proj.bias is not None, "o_bias": attn.o_proj.bias is not None,
            "qk_norm": attn.qk_norm}
    rotary = attn.rotary
    if rotary is None or rotary.dim != attn.head_dim:
        raise ValueError("transformers LlamaAttention rotates every channel of every head: needs rope=True and "
                         "rotary_dim=head_dim")
    return ZooConfig.from_dict({"vocab_size": 256, "d_model": attn.d_model, "n_layers": 1, "mixers": "attention",
                                "mlp": {"intermediate_size": 64}, "mixer_defaults": {"attention": args},
                                "rope_theta": rotary.theta, "rope_scaling": rotary.scaling, "family": "llama"})


def _transformers_config(config: ZooConfig) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**config_to_reference(config), attn_implementation="sdpa")


@register_reference("transformers_llama_attention", preload=_TRANSFORMERS_LLAMA)
def bench_llama_attention(zoo_module: nn.Module, args: dict[str, Any], batch: int) -> Adapter:
    """transformers LlamaAttention (sdpa) with the zoo attention's weights; RoPE inside the timed call."""
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    cfg = _transformers_config(_one_layer_config(zoo_module))
    attn = LlamaAttention(cfg, 0)
    load_same_weights(attn, zoo_module.state_dict(), what="transformers LlamaAttention")
    return HFLlamaAttentionAdapter(attn, LlamaRotaryEmbedding(cfg), cfg)


@register_reference("transformers_llama", preload=_TRANSFORMERS_LLAMA)
def bench_llama_model(zoo_model: nn.Module, args: dict[str, Any], batch: int) -> Adapter:
    """transformers LlamaForCausalLM with the zoo model's weights (through the llama key table)."""
    from transformers import LlamaForCausalLM

    cfg = _transformers_config(zoo_model.config)
    ref = LlamaForCausalLM(cfg)
    sd = FAMILY.state_dict_to_reference(zoo_model.state_dict(), zoo_model.config)
    load_same_weights(ref, sd, what="transformers LlamaForCausalLM")
    return HFCausalLMAdapter(ref, cfg)


@register_reference("sdpa_flash", scope="kernel", gpu_only=True)
def bench_sdpa_flash(zoo_module: nn.Module, args: dict[str, Any], batch: int) -> Adapter:
    """SDPA forced to the flash backend on the attention's q, k, v shapes (GQA expanded), causal, CUDA only."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    H, D = zoo_module.num_heads, zoo_module.head_dim

    def kv(x: Tensor) -> list[Tensor]:  # x [B, T, H*D] (the queries): keys and values of the same shape
        B, T = x.shape[:2]
        return [torch.randn(B, H, T, D, device=x.device, dtype=x.dtype).requires_grad_() for _ in range(2)]

    def fn(x: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q = x.view(x.shape[0], x.shape[1], H, D).transpose(1, 2)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    # QK^T and PV: 4 D per causal (query, key) pair of each head
    return KernelAdapter(fn, width=H * D, inputs=kv, flops=lambda T, B: 4 * B * H * D * (T * (T + 1) // 2))


_HEADS = Attention.bench_cases[0].args  # the attention case's head sizes, per size


def _bench_model(size: str, vocab: int, inter: int) -> dict[str, Any]:
    heads = {k: v for k, v in _HEADS[size].items() if k != "d_model"}
    return {"vocab_size": vocab, "d_model": _HEADS[size]["d_model"], "n_layers": 2, "mixers": "attention",
            "mlp": {"intermediate_size": inter}, "mixer_defaults": {"attention": heads}, "family": "llama"}


FAMILY = Family(
    name="llama",
    detect=detect,
    config_from_reference=config_from_reference,
    config_to_reference=config_to_reference,
    key_table=KEY_TABLE,
    presets=PRESETS,
    model_card="llama",
    bench_cases=(BenchCase(
        kind="model", name="llama_model", reference="transformers_llama",
        args={"full": _bench_model("full", 4096, 2048), "quick": _bench_model("quick", 256, 128)},
        description="ZooForCausalLM (llama family) vs transformers LlamaForCausalLM, same weights"),),
    citations=(CITATION,),
    positions_past_max="warn",  # RoPE extrapolates, as in transformers; warned once per model
)
