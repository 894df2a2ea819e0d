"""transformers adapter (``pip install "long-context-zoo[hf]"``): zoo models as transformers models.

``import zoo.hf`` registers the model type ``"zoo"`` (a type of our own: transformers' types are never touched)
with ``AutoConfig`` and ``AutoModelForCausalLM``, so that a zoo checkpoint (``config.json`` with
``"model_type": "zoo"``) loads with ``AutoModelForCausalLM.from_pretrained(path_or_hub_id)`` and then works with
transformers' ``generate()``, ``Trainer`` and ``save_pretrained``::

    import zoo.hf  # noqa: F401
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("me/my-hybrid")       # same logits as zoo.from_pretrained
    out = model.generate(ids, attention_mask=mask, max_new_tokens=20)  # through the zoo's per-layer states

* :class:`ZooConfigHF` (a ``PretrainedConfig``) holds the zoo config as one JSON-safe dict ``zoo`` (its per-layer
  mixers never meet transformers' reserved ``layer_types``) and mirrors the standard fields (``vocab_size``,
  ``hidden_size``, ``num_hidden_layers``, ``tie_word_embeddings``, token ids); it reads the flat ``config.json`` of
  zoo checkpoints, and ``save_pretrained`` writes that format back.
* :class:`ZooForCausalLMHF` (``PreTrainedModel`` + ``GenerationMixin``) wraps a ``ZooForCausalLM`` as ``.model``;
  checkpoint keys get the ``model.`` prefix on load (a registered ``PrefixChange``); the tied head is declared
  in transformers 5's dict form (``_tied_weights_keys``, effective when ``tie_word_embeddings``).
  ``save_pretrained`` writes a zoo checkpoint (``zoo.from_pretrained`` reads it; ``max_shard_size`` shards).
* :class:`ZooCache` (a transformers ``Cache``) carries the zoo's :class:`~zoo.models.lm.ModelState` (one state per
  mixer: KV caches, SSM states, ...) through ``generate``; beam search and ``num_return_sequences`` reorder or
  repeat its rows. A left-padded batch generates exactly like ``zoo``'s own ``generate``.
* Packed training batches without an attention mask (position ids restarting at 0, as transformers'
  ``DataCollatorWithFlattening`` writes them) become the zoo's ``seq_idx`` (nothing crosses a document).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

try:
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
    from transformers.cache_utils import Cache
    from transformers.modeling_outputs import CausalLMOutputWithPast
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("zoo.hf needs transformers: pip install 'long-context-zoo[hf]'") from e

from zoo import checkpoint
from zoo.config import MODEL_TYPE, ZooConfig, json_restore, json_safe
from zoo.layers.norm import GatedRMSNorm, RMSNorm
from zoo.models.lm import ModelState, ZooForCausalLM

__all__ = ["ZooConfigHF", "ZooForCausalLMHF", "ZooCache", "from_zoo"]

# transformers name -> zoo config field, kept equal (the zoo config is the source of truth at construction)
MIRRORED = {"vocab_size": "vocab_size", "hidden_size": "d_model", "num_hidden_layers": "n_layers",
            "tie_word_embeddings": "tie_embeddings", "max_position_embeddings": "max_position_embeddings",
            "pad_token_id": "pad_token_id", "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id"}
ZOO_FIELDS = set(ZooConfig.__dataclass_fields__) | {"mixers", "mlp"}


class ZooConfigHF(PretrainedConfig):
    """A zoo config seen by transformers: ``zoo`` (the ``ZooConfig`` as a JSON-safe dict) + mirrored standard
    fields. Accepts the flat fields of a zoo ``config.json`` or a ``zoo=`` dict (or a ``ZooConfig``)."""

    model_type = MODEL_TYPE

    def __init__(self, zoo: dict[str, Any] | ZooConfig | None = None, zoo_version: str | None = None,
                 use_cache: bool = True, **kwargs: Any) -> None:
        flat = {k: kwargs.pop(k) for k in list(kwargs) if k in ZOO_FIELDS}
        mirrored = {MIRRORED[k]: kwargs.pop(k) for k in list(kwargs) if k in MIRRORED}
        if isinstance(zoo, ZooConfig):
            zoo = zoo.to_dict()
        base = json_restore(dict(zoo)) if zoo else {}
        if not base and not flat:
            base = {"vocab_size": 32000, "d_model": 64, "n_layers": 2}  # transformers builds default configs
        config = ZooConfig.from_dict({**base, **flat, **mirrored})
        self.zoo = json_safe(config.to_dict())
        self.use_cache = use_cache
        for hf_name, zoo_name in MIRRORED.items():
            kwargs[hf_name] = getattr(config, zoo_name)
        super().__init__(**kwargs)

    @property
    def zoo_config(self) -> ZooConfig:
        """The ``ZooConfig``, with the mirrored standard fields as they are now (e.g. after a vocabulary resize)."""
        return ZooConfig.from_dict({**json_restore(self.zoo),
                                    **{z: getattr(self, h) for h, z in MIRRORED.items()}})

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> None:
        """Writes the zoo ``config.json`` (flat fields, ``zoo_version``, ``model_type: "zoo"``)."""
        if push_to_hub:
            raise ValueError("ZooConfigHF.save_pretrained(push_to_hub=True) is not supported; use zoo publish / "
                             "model.push_to_hub")
        path = checkpoint.checkpoint_dir(save_directory)
        with checkpoint.staged_files(path) as stage:
            self.zoo_config.save(stage(checkpoint.CONFIG_NAME))


class ZooCache(Cache):
    """The zoo's per-layer states (:class:`~zoo.models.lm.ModelState`) as a transformers ``Cache``.

    Created empty by ``generate``; the first forward allocates the states for its batch (capacity ``max_length``).
    Not croppable (recurrent states cannot be rolled back), not compileable; ``get_seq_length`` is the number of
    token slots absorbed, padding included (what ``generate`` slices continued prompts with)."""

    def __init__(self, states: ModelState | None = None, max_length: int | None = None) -> None:
        super().__init__(layers=[])
        self.states = states
        self.max_length = max_length

    # ---- what generate() and the model read
    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return self.states is not None

    @property
    def is_linear(self) -> list[bool]:
        return [False]  # generate then slices a continued prompt by get_seq_length

    @property
    def is_sliding(self) -> list[bool]:
        return [False]

    @property
    def batch_size(self) -> int:
        return -1 if self.states is None else int(self.states.next_position.shape[0])

    def __len__(self) -> int:
        return 0 if self.states is None else len(self.states.layers)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0 if self.states is None else self.states.offset

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        return self.get_seq_length() > 0

    # ---- batch surgery (beam search, num_return_sequences, contrastive search)
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.states is not None:
            self.states.reorder(beam_idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.states is not None:
            B = self.batch_size
            self.reorder_cache(torch.arange(B, device=self.states.next_position.device).repeat_interleave(repeats))

    def reset(self) -> None:
        self.states = None

    # ---- what a zoo state cannot do
    def update(self, *args: Any, **kwargs: Any):
        raise NotImplementedError("ZooCache holds the zoo mixers' own states; transformers layers cannot write to it")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("the zoo's recurrent states cannot be rolled back (ZooCache is not croppable)")

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        raise NotImplementedError("zoo mixers build their own masks")

    def activate_past_recording(self) -> None:
        raise NotImplementedError("the zoo's recurrent states cannot record their past for rollback")


class ZooForCausalLMHF(PreTrainedModel, GenerationMixin):
    """``ZooForCausalLM`` (as ``self.model``) behind transformers' model API."""

    config_class = ZooConfigHF
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _tied_weights_keys = {"model.lm_head.weight": "model.embedding.weight"}  # only when tie_word_embeddings
    _no_split_modules = ["Block"]
    supports_gradient_checkpointing = True
    _is_stateful = True  # recurrent states: no assisted decoding (it needs rollbacks)
    _supports_attention_backend = False

    def __init__(self, config: ZooConfigHF, model: ZooForCausalLM | None = None) -> None:
        super().__init__(config)
        self._wrapping = model is not None  # an existing model's weights are kept as they are
        self.model = model if model is not None else ZooForCausalLM(config.zoo_config)
        self.post_init()
        self._wrapping = False

    # ------------------------------------------------------------------ transformers plumbing
    def _init_weights(self, module: nn.Module) -> None:
        """The zoo's initialisation, for what a checkpoint did not fill (transformers' flag-aware ``init`` functions
        skip loaded tensors) and the non-persistent buffers (RoPE frequencies)."""
        if getattr(self, "_wrapping", False):
            return
        from transformers import initialization as init

        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
        loaded = any(getattr(p, "_is_hf_initialized", False) for p in module.parameters(recurse=False))
        std = self.config.zoo.get("initializer_range", 0.02)
        if isinstance(module, (RMSNorm, GatedRMSNorm, nn.LayerNorm)):
            if getattr(module, "weight", None) is not None:
                init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv1d):
            if not loaded:
                module.reset_parameters()
        elif hasattr(module, "reset_mixer_parameters") and not loaded:  # e.g. Mamba-2's dt / A / D
            module.reset_mixer_parameters()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embedding

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embedding = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.model.lm_head = value

    def resize_token_embeddings(self, *args: Any, **kwargs: Any) -> nn.Embedding:
        """transformers' resize; the zoo model's own config follows (its input checks read the vocabulary size)."""
        out = super().resize_token_embeddings(*args, **kwargs)
        self.model.config = self.config.zoo_config
        return out

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func: Any = None) -> None:
        self.model.gradient_checkpointing = enable

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        self.model.gradient_checkpointing_enable()

    def gradient_checkpointing_disable(self) -> None:
        self.model.gradient_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.model.gradient_checkpointing

    def _prepare_cache_for_generation(self, generation_config: Any, model_kwargs: dict, generation_mode: Any,
                                      batch_size: int, max_cache_length: int) -> None:
        """generate() gets a :class:`ZooCache` (states allocated at the first forward, sized to the generation)."""
        cache = model_kwargs.get("cache")
        if cache is not None:
            if not isinstance(cache, ZooCache):
                raise ValueError(f"zoo models generate with a ZooCache, got {type(cache).__name__}")
            cache._is_user_defined = True
            return
        if generation_config.use_cache is False:
            return
        model_kwargs["cache"] = ZooCache(max_length=max_cache_length + 1)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                cache: ZooCache | None = None, labels: Tensor | None = None, use_cache: bool | None = None,
                logits_to_keep: int = 0, inputs_embeds: Tensor | None = None, return_dict: bool | None = None,
                **kwargs: Any) -> CausalLMOutputWithPast:
        """``input_ids [B, T]``; ``attention_mask [B, T]`` or ``[B, past + T]`` (1 = token; left padding);
        ``cache``: a :class:`ZooCache` to continue (updated in place); ``labels`` as transformers (shifted inside,
        -100 ignored; ``num_items_in_batch`` honoured). Without ``cache`` or ``use_cache=True`` the parallel form
        runs (bit-identical to ``zoo``'s forward); with them, the states continue / are returned in the output.
        ``position_ids`` are not needed (the model derives positions); without a mask, position ids that restart at
        0 mark packed documents."""
        if inputs_embeds is not None:
            raise ValueError("zoo models take input_ids, not inputs_embeds")
        if input_ids is None:
            raise ValueError("input_ids is required")
        for flag in ("output_attentions", "output_hidden_states"):
            if kwargs.pop(flag, None):
                raise ValueError(f"{flag}=True is not supported by zoo models")
        position_ids = kwargs.pop("position_ids", None)
        if use_cache is None:  # a plain call runs the parallel form (generate() asks for the cache explicitly)
            use_cache = cache is not None
        states = None
        if use_cache:
            if cache is None:
                cache = ZooCache()
            if cache.states is None:
                B, T = input_ids.shape
                cache.states = self.model.init_states(B, max_length=cache.max_length or T)
            states = cache.states
        seq_idx = None
        if position_ids is not None and attention_mask is None and states is None:
            seq_idx = packed_documents(position_ids)
        out = self.model(input_ids, attention_mask=attention_mask, states=states, seq_idx=seq_idx,
                         logits_to_keep=logits_to_keep)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=out.logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=out.logits, cache=cache if use_cache else None)

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, save_directory: str | os.PathLike, is_main_process: bool = True,
                        state_dict: dict[str, Tensor] | None = None, push_to_hub: bool = False,
                        max_shard_size: int | str | None = None, **kwargs: Any) -> None:
        """A zoo checkpoint (zoo ``config.json`` with ``model_type: "zoo"``, safetensors weights, model card), which
        both ``zoo.from_pretrained`` and ``AutoModelForCausalLM.from_pretrained`` read. ``state_dict`` (e.g. from
        ``Trainer``): this model's keys, ``model.`` prefixed. Other transformers options are ignored."""
        if push_to_hub:
            raise ValueError("save_pretrained(push_to_hub=True) is not supported for zoo models; use "
                             "model.push_to_hub(repo_id) or `zoo publish`")
        if not is_main_process:
            return
        if state_dict is not None:
            prefix = self.base_model_prefix + "."
            state_dict = {k.removeprefix(prefix): v for k, v in state_dict.items()}
        self.model.config = self.config.zoo_config
        checkpoint.save_pretrained(self.model, save_directory, max_shard_size=max_shard_size, state_dict=state_dict)


def packed_documents(position_ids: Tensor) -> Tensor | None:
    """``seq_idx [B, T]`` from position ids that restart at 0 at each packed document (None when every row is one
    sequence, so that mixers without packing support still run)."""
    starts = position_ids == 0
    if not bool(starts[:, 1:].any()):
        return None
    return starts.long().cumsum(1) - starts[:, :1].long()


def from_zoo(model: ZooForCausalLM) -> ZooForCausalLMHF:
    """A transformers view of an in-memory zoo model (the same modules and parameters, nothing copied)."""
    config = ZooConfigHF(zoo=model.config)
    hf = ZooForCausalLMHF(config, model=model)
    return hf.to(model.device)


def _register() -> None:
    """Register the ``zoo`` model type with the Auto classes and the ``model.`` key prefix for its checkpoints.
    Idempotent for our own classes; a ``zoo`` type registered by anyone else is an error, never overridden."""
    from transformers.conversion_mapping import register_checkpoint_conversion_mapping
    from transformers.core_model_loading import PrefixChange
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if MODEL_TYPE in CONFIG_MAPPING:
        existing = CONFIG_MAPPING[MODEL_TYPE]
        if existing.__module__ == __name__ and existing.__qualname__ == ZooConfigHF.__qualname__:
            return  # already registered (e.g. the module was imported under another name or reloaded)
        raise RuntimeError(f"model type {MODEL_TYPE!r} is already registered with transformers by "
                           f"{existing.__module__}.{existing.__qualname__}; zoo.hf does not override it")
    AutoConfig.register(MODEL_TYPE, ZooConfigHF)
    AutoModelForCausalLM.register(ZooConfigHF, ZooForCausalLMHF)
    register_checkpoint_conversion_mapping(MODEL_TYPE, [PrefixChange(prefix_to_add="model")])


_register()
