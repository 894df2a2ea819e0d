"""The case registry: subject (a mixer or a model) x phase x sequence length x dtype x device.

A :class:`Case` is plain data (it crosses process boundaries for the memory measurement). Its subject, a
:class:`Subject` registered in :data:`SUBJECTS`, knows how to build every implementation of the case:

* ``zoo``: the zoo's own mixer (``zoo.get_mixer(name)``) or model (``zoo.create_model``);
* a layer-level reference with the *same weights*: ``transformers`` (``LlamaAttention`` with SDPA,
  ``Mamba2Mixer`` on its pure-torch path off-GPU, ``LlamaForCausalLM``), or ``dense_sdpa`` for the sparse
  attention patterns (the zoo ``attention`` mixer, i.e. dense causal SDPA, with the pattern's weights);
* on CUDA only, kernel-level references timed on the case's shapes: ``sdpa_flash`` (SDPA forced to the
  flash backend) and ``mamba_ssm`` (``mamba_chunk_scan_combined``).

Every implementation is wrapped in an :class:`Adapter` with one interface (``forward``, ``new_state``, ``step``),
so the four phases are written once (:func:`phase_callables`):

* ``forward``: parallel forward over ``T`` tokens, no grad;
* ``forward_backward``: the same with grad, then ``y.sum().backward()``;
* ``prefill``: ``T`` tokens into a fresh state;
* ``decode``: the state is prefilled with ``T`` tokens (untimed), then single-token steps are timed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from zoo.bench import flops as F

PHASES = ("forward", "forward_backward", "prefill", "decode")
UNAVAILABLE = "skipped: mixer not available"


@dataclass
class Case:
    subject: str
    phase: str
    T: int
    dtype: str
    device: str
    size: str = "full"  # "full" or "quick" (tiny dimensions for the CI smoke run)
    batch: int = 1
    impls: tuple[str, ...] = ()
    reference: str | None = None  # the implementation the zoo one is compared with (speedup = ref / zoo)

    @property
    def id(self) -> str:
        return f"{self.subject}/{self.phase}/T={self.T}/{self.dtype}/{self.device}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["impls"] = list(self.impls)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Case:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: (tuple(v) if k == "impls" else v) for k, v in d.items() if k in fields})


# ---------------------------------------------------------------------------------------------- adapters
class Adapter:
    """One implementation of a case behind one interface. ``scope`` is "layer" or "kernel" (core op only)."""

    scope = "layer"
    module: nn.Module | None = None

    def forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def new_state(self, max_length: int) -> Any:
        raise NotImplementedError

    def step(self, x: Tensor, state: Any) -> Tensor:
        raise NotImplementedError

    def parameters(self) -> list[Tensor]:
        return list(self.module.parameters()) if self.module is not None else []

    def supports(self, phase: str) -> bool:
        return True


class ZooMixerAdapter(Adapter):
    def __init__(self, mixer: nn.Module, batch: int) -> None:
        self.module, self.batch = mixer, batch

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x)[0]

    def new_state(self, max_length: int) -> Any:
        p = next(self.module.parameters())
        return self.module.init_state(self.batch, dtype=p.dtype, device=p.device, max_length=max_length)

    def step(self, x: Tensor, state: Any) -> Tensor:
        return self.module(x, state=state)[0]


class ZooModelAdapter(Adapter):
    def __init__(self, model: nn.Module, batch: int) -> None:
        self.module, self.batch = model, batch

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x).logits

    def new_state(self, max_length: int) -> Any:
        return self.module.init_states(self.batch, max_length=max_length)

    def step(self, x: Tensor, state: Any) -> Tensor:
        return self.module(x, states=state).logits


class HFLlamaAttentionAdapter(Adapter):
    """transformers ``LlamaAttention`` (SDPA) with its rotary embedding computed inside the timed call."""

    def __init__(self, attn: nn.Module, rotary: nn.Module, config: Any) -> None:
        self.module, self.rotary, self.config = attn, rotary, config

    def _run(self, x: Tensor, start: int, cache: Any) -> Tensor:
        pos = torch.arange(start, start + x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
        kwargs = {"cache": cache} if cache is not None else {}
        return self.module(x, position_embeddings=self.rotary(x, pos), attention_mask=None, **kwargs)[0]

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x, 0, None)

    def new_state(self, max_length: int) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.config)

    def step(self, x: Tensor, state: Any) -> Tensor:
        return self._run(x, state.get_seq_length(), state)


class HFMamba2Adapter(Adapter):
    def __init__(self, mixer: nn.Module, config: Any) -> None:
        self.module, self.config = mixer, config

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x)

    def new_state(self, max_length: int) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.config)

    def step(self, x: Tensor, state: Any) -> Tensor:
        return self.module(x, cache=state)


class HFCausalLMAdapter(Adapter):
    def __init__(self, model: nn.Module, config: Any) -> None:
        self.module, self.config = model, config

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x, use_cache=False).logits

    def new_state(self, max_length: int) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.config)

    def step(self, x: Tensor, state: Any) -> Tensor:
        return self.module(x, cache=state, use_cache=True).logits


class KernelAdapter(Adapter):
    """A core kernel timed on the case's shapes (forward phases only): ``fn(x) -> y``, no weights of the layer."""

    scope = "kernel"

    def __init__(self, fn: Callable[[Tensor], Tensor], params: list[Tensor]) -> None:
        self.fn, self.params = fn, params

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def parameters(self) -> list[Tensor]:
        return self.params

    def supports(self, phase: str) -> bool:
        return phase in ("forward", "forward_backward")


# ---------------------------------------------------------------------------------------------- subjects
@dataclass
class Subject:
    """A mixer or model benchmarked against its references."""

    name: str
    kind: str  # "mixer" | "model"
    zoo_mixers: tuple[str, ...]  # mixers the zoo implementation needs registered
    references: tuple[str, ...]  # layer-level references, the first is the speedup baseline
    gpu_kernels: tuple[str, ...] = ()
    phases: tuple[str, ...] = PHASES
    args: Callable[[str], dict[str, Any]] = field(default=lambda size: {})
    description: str = ""

    def requirements(self, impl: str) -> tuple[str, ...]:
        if impl == "zoo":
            return self.zoo_mixers
        if impl == "dense_sdpa":
            return ("attention",)
        return ()


def _attention_args(size: str) -> dict[str, Any]:
    if size == "quick":
        return {"d_model": 64, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16}
    return {"d_model": 768, "num_heads": 12, "num_kv_heads": 4, "head_dim": 64}


def _mamba2_args(size: str) -> dict[str, Any]:
    if size == "quick":
        return {"d_model": 64, "d_state": 16, "d_conv": 4, "expand": 2, "headdim": 16, "ngroups": 1, "chunk_size": 16}
    return {"d_model": 768, "d_state": 128, "d_conv": 4, "expand": 2, "headdim": 64, "ngroups": 1, "chunk_size": 256}


def _pattern_args(name: str) -> Callable[[str], dict[str, Any]]:
    def args(size: str) -> dict[str, Any]:
        quick = size == "quick"
        pattern = {
            # the targets: window 1024; LongGen-style strided blocks; MASFormer-style 1024 blocks
            "sliding_window": {"window": 16 if quick else 1024, "num_sink_tokens": 4 if quick else 0},
            "block_sparse": {"block_size": 8 if quick else 64, "local_blocks": 2 if quick else 16,
                             "vertical_stride": 4 if quick else 8, "homo_head": False},
            "block_diagonal": {"block_size": 16 if quick else 1024},
        }[name]
        return {**_attention_args(size), **pattern}

    return args


def _model_args(size: str) -> dict[str, Any]:
    if size == "quick":
        return {"vocab_size": 256, "n_layers": 2, "intermediate_size": 128, **_attention_args(size)}
    return {"vocab_size": 4096, "n_layers": 2, "intermediate_size": 2048, **_attention_args(size)}


def _hybrid_args(size: str) -> dict[str, Any]:
    return {**_model_args(size), "mamba2": _mamba2_args(size)}


SUBJECTS: dict[str, Subject] = {s.name: s for s in [
    Subject("attention", "mixer", ("attention",), ("transformers",), ("sdpa_flash",), args=_attention_args,
            description="zoo attention vs transformers LlamaAttention (sdpa), same weights"),
    Subject("mamba2", "mixer", ("mamba2",), ("transformers",), ("mamba_ssm",), args=_mamba2_args,
            description="zoo mamba2 vs transformers Mamba2Mixer (torch path off-GPU), same weights"),
    Subject("sliding_window", "mixer", ("sliding_window",), ("dense_sdpa",), args=_pattern_args("sliding_window"),
            description="sliding window + sinks vs dense causal SDPA attention, same weights"),
    Subject("block_sparse", "mixer", ("block_sparse",), ("dense_sdpa",), args=_pattern_args("block_sparse"),
            description="strided block-sparse (local + vertical) vs dense causal SDPA attention, same weights"),
    Subject("block_diagonal", "mixer", ("block_diagonal",), ("dense_sdpa",), args=_pattern_args("block_diagonal"),
            description="block-diagonal causal attention vs dense causal SDPA attention, same weights"),
    Subject("llama_model", "model", ("attention",), ("transformers",), args=_model_args,
            description="ZooForCausalLM (llama family) vs transformers LlamaForCausalLM, same weights"),
    Subject("hybrid_model", "model", ("mamba2", "attention"), (), args=_hybrid_args,
            description="ZooForCausalLM with [mamba2, attention+MLP] blocks (no reference)"),
]}


def gpu_kernels_available(device: str) -> bool:
    return device.startswith("cuda") and torch.cuda.is_available()


def make_cases(subjects: list[str], phases: list[str], Ts: list[int], *, dtype: str, device: str, size: str,
               batch: int = 1) -> list[Case]:
    """Every (subject, phase, T) the subject supports, ordered by subject, phase, then increasing T."""
    cases = []
    for name in subjects:
        subject = SUBJECTS[name]
        impls = ("zoo", *subject.references)
        if gpu_kernels_available(device):
            impls = (*impls, *subject.gpu_kernels)
        for phase in (p for p in phases if p in subject.phases):
            for T in sorted(Ts):
                cases.append(Case(name, phase, T, dtype, device, size, batch, impls,
                                  subject.references[0] if subject.references else None))
    return cases


# ---------------------------------------------------------------------------------------------- building
def _llama_config(a: dict[str, Any], max_len: int, n_layers: int = 1, vocab: int = 256, inter: int = 64) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=a["d_model"], num_attention_heads=a["num_heads"],
                       num_key_value_heads=a["num_kv_heads"], head_dim=a["head_dim"], intermediate_size=inter,
                       num_hidden_layers=n_layers, vocab_size=vocab, max_position_embeddings=max(max_len, 2048),
                       attn_implementation="sdpa")


def _attn_kwargs(a: dict[str, Any]) -> dict[str, Any]:
    return {k: a[k] for k in ("num_heads", "num_kv_heads", "head_dim")}


def _load_same_weights(dst: nn.Module, src: nn.Module) -> None:
    """Copy ``src``'s weights into ``dst`` by name; every ``src`` key must land (``dst`` may have extra ones)."""
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    if unexpected:
        raise ValueError(f"weights of {type(src).__name__} do not fit {type(dst).__name__}: {unexpected[:8]}")


def build(case: Case, impls: list[str], seed: int = 0) -> dict[str, Adapter]:
    """Adapters for ``impls`` of ``case`` (fp params cast to the case dtype, on its device, in eval mode).
    References are built first; the zoo implementation then loads their weights, so all compute the same function."""
    import zoo

    torch.manual_seed(seed)
    subject = SUBJECTS[case.subject]
    a = subject.args(case.size)
    d, B = a.get("d_model"), case.batch
    max_len = case.T + 64
    out: dict[str, Adapter] = {}
    ref_module: nn.Module | None = None  # the module whose weights the zoo implementation takes
    # Alone (the memory worker builds one implementation per process) the zoo implementation keeps its own init.
    shared = len(impls) > 1

    if case.subject == "attention":
        if "transformers" in impls or shared:
            from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

            cfg = _llama_config(a, max_len)
            attn = LlamaAttention(cfg, 0)
            ref_module = attn
            if "transformers" in impls:
                out["transformers"] = HFLlamaAttentionAdapter(attn, LlamaRotaryEmbedding(cfg), cfg)
        if "zoo" in impls:
            m = zoo.get_mixer("attention")(d, 0, **_attn_kwargs(a))
            if ref_module is not None:
                _load_same_weights(m, ref_module)
            out["zoo"] = ZooMixerAdapter(m, B)
        if "sdpa_flash" in impls:
            out["sdpa_flash"] = _sdpa_flash_kernel(case, a)

    elif case.subject == "mamba2":
        if "transformers" in impls or shared:
            from transformers import Mamba2Config
            from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

            cfg = Mamba2Config(hidden_size=d, num_heads=a["expand"] * d // a["headdim"], head_dim=a["headdim"],
                               state_size=a["d_state"], n_groups=a["ngroups"], expand=a["expand"],
                               chunk_size=a["chunk_size"], conv_kernel=a["d_conv"], num_hidden_layers=1,
                               vocab_size=256)
            ref = Mamba2Mixer(cfg, 0)
            ref_module = ref
            if "transformers" in impls:
                out["transformers"] = HFMamba2Adapter(ref, cfg)
        if "zoo" in impls:
            m = zoo.get_mixer("mamba2")(d, 0, **{k: v for k, v in a.items() if k != "d_model"})
            if ref_module is not None:
                _load_same_weights(m, ref_module)
            out["zoo"] = ZooMixerAdapter(m, B)
        if "mamba_ssm" in impls:
            out["mamba_ssm"] = _mamba_ssm_kernel(case, a)

    elif subject.kind == "mixer":  # the sparse attention patterns
        need_dense = "dense_sdpa" in impls or (shared and "attention" in zoo.list_mixers())
        dense = zoo.get_mixer("attention")(d, 0, **_attn_kwargs(a)) if need_dense else None
        if "dense_sdpa" in impls:
            out["dense_sdpa"] = ZooMixerAdapter(dense, B)
        if "zoo" in impls:
            pattern = {k: v for k, v in a.items() if k != "d_model"}
            m = zoo.get_mixer(case.subject)(d, 0, **pattern)
            if dense is not None:
                _load_same_weights(m, dense)
            out["zoo"] = ZooMixerAdapter(m, B)

    elif case.subject == "llama_model":
        from transformers import LlamaForCausalLM

        from zoo.models import llama
        from zoo.models.family import rename_keys

        cfg = _llama_config(a, max_len, a["n_layers"], a["vocab_size"], a["intermediate_size"])
        ref = LlamaForCausalLM(cfg) if "transformers" in impls or shared else None
        if "transformers" in impls:
            out["transformers"] = HFCausalLMAdapter(ref, cfg)
        if "zoo" in impls:
            model = zoo.create_model(llama.config_from_reference(cfg.to_dict()))
            if ref is not None:
                model.load_state_dict(rename_keys(ref.state_dict(), llama.KEY_TABLE, source="llama"), strict=True)
            out["zoo"] = ZooModelAdapter(model, B)

    elif case.subject == "hybrid_model":
        m2 = {k: v for k, v in a["mamba2"].items() if k != "d_model"}
        config = zoo.ZooConfig.from_dict({
            "vocab_size": a["vocab_size"], "d_model": d, "n_layers": 2,
            "layers": [{"mixer": "mamba2", "mixer_args": m2, "mlp": None},
                       {"mixer": "attention", "mixer_args": _attn_kwargs(a),
                        "mlp": {"intermediate_size": a["intermediate_size"]}}],
        })
        out["zoo"] = ZooModelAdapter(zoo.create_model(config), B)
    else:
        raise ValueError(f"no builder for subject {case.subject!r}")

    for ad in out.values():
        if ad.module is not None:
            ad.module.to(device=case.device, dtype=case.torch_dtype).eval()
    return out


def _sdpa_flash_kernel(case: Case, a: dict[str, Any]) -> KernelAdapter:
    """SDPA forced to the flash backend on the case's q, k, v shapes (GQA expanded), CUDA only."""
    import torch.nn.functional as nnf
    from torch.nn.attention import SDPBackend, sdpa_kernel

    H, Hkv, D, B = a["num_heads"], a["num_kv_heads"], a["head_dim"], case.batch
    kv = torch.randn(2, B, Hkv, case.T, D, device=case.device, dtype=case.torch_dtype)
    k, v = (t.repeat_interleave(H // Hkv, dim=1).requires_grad_() for t in kv)

    def fn(x: Tensor) -> Tensor:
        q = x.view(B, -1, H, D).transpose(1, 2)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return nnf.scaled_dot_product_attention(q, k, v, is_causal=True)

    return KernelAdapter(fn, [k, v])


def _mamba_ssm_kernel(case: Case, a: dict[str, Any]) -> KernelAdapter:
    """mamba_ssm's ``mamba_chunk_scan_combined`` (the SSD scan alone) on the case's shapes, CUDA only."""
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    d, B, T = a["d_model"], case.batch, case.T
    H, P, N, G = a["expand"] * d // a["headdim"], a["headdim"], a["d_state"], a["ngroups"]
    dev, dt_ = case.device, case.torch_dtype
    dt = torch.rand(B, T, H, device=dev, dtype=dt_).requires_grad_()
    A = -torch.rand(H, device=dev, dtype=torch.float32).requires_grad_()
    Bm, Cm = (torch.randn(B, T, G, N, device=dev, dtype=dt_).requires_grad_() for _ in range(2))
    Dp = torch.randn(H, device=dev, dtype=torch.float32).requires_grad_()

    def fn(x: Tensor) -> Tensor:
        return mamba_chunk_scan_combined(x.view(B, T, H, P), dt, A, Bm, Cm, a["chunk_size"], D=Dp)

    return KernelAdapter(fn, [dt, A, Bm, Cm, Dp])


def make_input(case: Case, impl: str, decode_steps: int, seed: int = 1) -> Tensor:
    """Hidden states ``[B, T + decode_steps, width]`` (or token ids for models); ``width`` is the input of the impl."""
    g = torch.Generator().manual_seed(seed)
    a = SUBJECTS[case.subject].args(case.size)
    n = case.T + decode_steps
    if SUBJECTS[case.subject].kind == "model":
        return torch.randint(0, a["vocab_size"], (case.batch, n), generator=g).to(case.device)
    width = a["d_model"]
    if impl == "sdpa_flash":
        width = a["num_heads"] * a["head_dim"]
    elif impl == "mamba_ssm":
        width = a["expand"] * a["d_model"]
    return torch.randn(case.batch, n, width, generator=g).to(device=case.device, dtype=case.torch_dtype)


# ---------------------------------------------------------------------------------------------- phases
def phase_callables(case: Case, ad: Adapter, x: Tensor, decode_steps: int
                    ) -> tuple[Callable[[Any], Any], Callable[[], Any] | None]:
    """``(step, setup)`` for :func:`zoo.bench.timing.time_calls`; ``decode_steps`` bounds the decode calls."""
    T = case.T
    if case.phase == "forward":
        xs = x[:, :T]

        def forward(_: Any) -> Tensor:
            with torch.no_grad():
                return ad.forward(xs)

        return forward, None
    if case.phase == "forward_backward":
        xs = x[:, :T].detach().clone()
        if xs.is_floating_point():
            xs.requires_grad_()
        params = [p for p in ad.parameters() if p.requires_grad]

        def zero_grads() -> None:
            xs.grad = None
            for p in params:
                p.grad = None

        def forward_backward(_: Any) -> Tensor:
            y = ad.forward(xs)
            y.float().sum().backward()
            return y.detach()

        return forward_backward, zero_grads
    if case.phase == "prefill":
        xs = x[:, :T]

        def prefill(state: Any) -> Tensor:
            with torch.no_grad():
                return ad.step(xs, state)

        return prefill, lambda: ad.new_state(T + decode_steps)
    if case.phase == "decode":
        state = ad.new_state(T + decode_steps)
        with torch.no_grad():
            ad.step(x[:, :T], state)
        position = [T]

        def decode(_: Any) -> Tensor:
            i = position[0]
            if i >= x.shape[1]:
                raise RuntimeError(f"decode ran past its {decode_steps} prepared tokens")
            position[0] += 1
            with torch.no_grad():
                return ad.step(x[:, i:i + 1], state)

        return decode, None
    raise ValueError(f"unknown phase {case.phase!r}; phases: {PHASES}")


# ---------------------------------------------------------------------------------------------- FLOPs
def case_flops(case: Case, impl: str) -> int:
    """Analytic FLOPs of one timed call (see :mod:`zoo.bench.flops`); decode: one token at context ``T``."""
    subject = SUBJECTS[case.subject]
    a = subject.args(case.size)
    B, T = case.batch, case.T
    decode = case.phase == "decode"
    tokens = B * (1 if decode else T)

    def attention(pairs: Callable[[int], int], summed_over_heads: bool = False) -> int:
        p = pairs(T + 1) - pairs(T) if decode else pairs(T)
        heads = 1 if summed_over_heads else a["num_heads"]
        core = F.attention_core(B, heads, a["head_dim"], p)
        if impl in ("sdpa_flash",):
            return core
        return F.attention_projections(tokens, a["d_model"], a["num_heads"], a["num_kv_heads"], a["head_dim"]) + core

    def mamba2(m: dict[str, Any]) -> int:
        kw = {k: v for k, v in m.items() if k != "d_model"}
        if impl == "mamba_ssm":
            H, P, N, G, Q = m["expand"] * m["d_model"] // m["headdim"], m["headdim"], m["d_state"], m["ngroups"], \
                m["chunk_size"]
            return 2 * tokens * (Q * G * N + Q * H * P + 2 * H * P * N)
        return F.mamba2_layer(tokens, m["d_model"], decode=decode, **kw)

    if case.subject in ("attention",) or impl == "dense_sdpa":
        total = attention(F.pairs_causal)
    elif case.subject == "sliding_window":
        total = attention(lambda n: F.pairs_sliding_window(n, a["window"], a["num_sink_tokens"]))
    elif case.subject == "block_sparse":
        total = attention(lambda n: F.pairs_block_sparse(n, a["num_heads"], a["block_size"], a["local_blocks"],
                                                         a["vertical_stride"], a["homo_head"]),
                          summed_over_heads=True)
    elif case.subject == "block_diagonal":
        total = attention(lambda n: F.pairs_block_diagonal(n, a["block_size"]))
    elif case.subject == "mamba2":
        total = mamba2(a)
    elif subject.kind == "model":
        mlp = F.gated_mlp(tokens, a["d_model"], a["intermediate_size"])
        attn_layer = attention(F.pairs_causal) + mlp
        if case.subject == "hybrid_model":
            layers = attn_layer + mamba2(a["mamba2"])
        else:
            layers = a["n_layers"] * attn_layer
        total = layers + F.linear(tokens, a["d_model"], a["vocab_size"])
    else:
        raise ValueError(f"no FLOP formula for subject {case.subject!r}")
    return F.with_backward(total) if case.phase == "forward_backward" else total


def n_decode_steps(warmup: int, repeats: int) -> int:
    return warmup + repeats + 1
