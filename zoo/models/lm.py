"""``ZooForCausalLM``: embedding -> N blocks (pre-norm mixer + optional MLP) -> final norm -> LM head.

Per-family details are config fields, not subclasses::

    h_0 = embed(ids) * embedding_scale
    h_{l+1} = h_l + residual_scale * mixer_l(norm_l(h_l))            (kept in fp32 if residual_in_fp32)
    h_{l+1} = h_{l+1} + residual_scale * mlp_l(mlp_norm_l(h_{l+1}))  (blocks with an MLP)
    logits = lm_head(norm_f(h_N)) * logit_scale                      (lm_head tied to embed if tie_embeddings)

Parameter names: ``embedding``, ``layers.{i}.{norm,mixer,mlp_norm,mlp}``, ``norm_f``, ``lm_head``.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from zoo import checkpoint, generation
from zoo.config import ZooConfig
from zoo.layers.base import State, document_positions
from zoo.layers.mlp import MLP
from zoo.layers.norm import make_norm
from zoo.layers.rope import rope_type
from zoo.limits import check_fits_memory
from zoo.models.fused_decode import stack_step
from zoo.registry import get_family, get_mixer, list_families
from zoo.swaps import SwapSpec, swap_config


@dataclass
class ModelState:
    """Per-layer mixer states plus the model's time: ``offset`` token slots absorbed (padding included, as
    mamba_ssm's ``seqlen_offset``) and ``next_position [B]``, the position of each row's next real token."""

    layers: list[State]
    next_position: Tensor
    offset: int = 0

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.layers)

    def reorder(self, batch_indices: Tensor) -> None:
        for s in self.layers:
            s.reorder(batch_indices)
        self.next_position = self.next_position.index_select(0, batch_indices.to(self.next_position.device))


@dataclass
class CausalLMOutput:
    logits: Tensor
    loss: Tensor | None = None
    states: ModelState | None = None


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """The model's initialisation of one module (use with ``module.apply``): normal(0, std) linear and embedding
    weights, zero biases, and a mixer's own ``reset_mixer_parameters`` (e.g. Mamba-2's dt and A)."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=std)
    if hasattr(module, "reset_mixer_parameters"):
        module.reset_mixer_parameters()


def positions_policy(config: ZooConfig) -> str:
    """The model's choice for positions past ``max_position_embeddings`` (see :meth:`ZooForCausalLM.check_positions`):
    ``"allow"`` when no layer applies RoPE or the RoPE scaling is ``dynamic`` (NTK-rescaled for exactly those
    positions), else its family's ``positions_past_max`` (``"warn"`` for zoo-native)."""
    uses_rope = any(get_mixer(ls.mixer).resolved_args(config.mixer_kwargs(i)).get("rope", False)
                    for i, ls in enumerate(config.layers))
    if not uses_rope or rope_type(config.rope_scaling) == "dynamic":  # dynamic NTK rescales exactly past the limit
        return "allow"
    if config.family and config.family in list_families():
        return get_family(config.family).positions_past_max
    return "warn"


def token_positions(B: int, T: int, attention_mask: Tensor | None = None, *, start: Tensor | None = None,
                    seq_idx: Tensor | None = None, device: torch.device | str | None = None) -> Tensor:
    """The positions ``[B, T]`` the model hands to every mixer: ``start + arange(T)`` for unpadded rows; with a
    mask, transformers' ``cumsum(mask) - 1`` (padded slots clamp to the row's next position); for packed rows
    (``seq_idx``), the index inside each document. ``start [B]``: each row's next position (from the states)."""
    if seq_idx is not None:
        return document_positions(seq_idx)
    if start is None:
        start = torch.zeros(B, dtype=torch.long, device=device)
    if attention_mask is None:
        return start[:, None] + torch.arange(T, device=start.device)[None]
    return start[:, None] + (attention_mask.long().cumsum(1) - 1).clamp(min=0)


class Block(nn.Module):
    def __init__(self, config: ZooConfig, layer_idx: int) -> None:
        super().__init__()
        spec = config.layers[layer_idx]
        self.residual_scale = config.residual_scale
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = make_norm(config.norm, config.d_model, config.norm_eps)
        self.mixer = build_mixer(config, layer_idx)
        if spec.mlp is not None:
            self.mlp_norm = make_norm(config.norm, config.d_model, config.norm_eps)
            self.mlp = MLP(config.d_model, **spec.mlp)
        else:
            self.mlp = None

    def forward(self, h: Tensor, positions: Tensor | None, state: State | None, attention_mask: Tensor | None,
                seq_idx: Tensor | None) -> tuple[Tensor, State | None]:
        dtype = self.norm.weight.dtype
        if self.residual_in_fp32 and h.dtype != torch.float32 and h.dtype != torch.float64:  # fp32 at least
            h = h.float()
        n = self.norm(h)
        y, state = self.mixer(n if n.dtype == dtype else n.to(dtype), positions=positions, state=state,
                              attention_mask=attention_mask, seq_idx=seq_idx)
        h = h + y * self.residual_scale if self.residual_scale != 1.0 else h + y
        if self.mlp is not None:
            y = self.mlp(self.mlp_norm(h).to(dtype))
            h = h + y * self.residual_scale if self.residual_scale != 1.0 else h + y
        return h, state


def build_mixer(config: ZooConfig, layer_idx: int) -> nn.Module:
    cls = get_mixer(config.layers[layer_idx].mixer)
    return cls(config.d_model, layer_idx, **config.mixer_kwargs(layer_idx))


class ZooForCausalLM(nn.Module):
    def __init__(self, config: ZooConfig) -> None:
        super().__init__()
        if torch.get_default_device().type != "meta":  # sizes bounded before anything is allocated
            check_fits_memory(config)
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm_f = make_norm(config.norm, config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self._warned_positions = False
        self.apply(self._init_module)
        if config.tie_embeddings:
            self.lm_head.weight = self.embedding.weight

    def _init_module(self, module: nn.Module) -> None:
        init_weights(module, self.config.initializer_range)

    # ------------------------------------------------------------------ utilities
    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding.weight.dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights counted once

    def gradient_checkpointing_enable(self) -> None:
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.gradient_checkpointing = False

    def init_states(self, batch_size: int, *, max_length: int | None = None) -> ModelState:
        layers = [blk.mixer.init_state(batch_size, dtype=self.dtype, device=self.device, max_length=max_length)
                  for blk in self.layers]
        return ModelState(layers, torch.zeros(batch_size, dtype=torch.long, device=self.device))

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: Tensor,
        *,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        positions: Tensor | None = None,
        states: ModelState | None = None,
        seq_idx: Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> CausalLMOutput:
        """``input_ids [B, T]``; ``attention_mask [B, T]`` (or ``[B, offset + T]``, transformers-style) 1 = token.

        With ``states`` the call continues from them and updates them in place (prefill chunk or decode step).
        ``logits_to_keep > 0`` computes logits for the last positions only (generation). The inputs are checked
        here; :meth:`step` is the unchecked one-token path that ``generate`` uses after the prompt.
        """
        attention_mask = self.check_inputs(input_ids, attention_mask, states=states, seq_idx=seq_idx)
        logits = self._forward(input_ids, attention_mask, positions, states, seq_idx, logits_to_keep)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(logits=logits, loss=loss, states=states)

    def step(self, input_ids: Tensor, states: ModelState) -> Tensor:
        """One decode step: ``input_ids [B, 1]`` (a real token in every row) continuing ``states`` -> logits
        ``[B, vocab]``. No input checks and no host synchronisation: the caller checked its inputs once.

        :meth:`_forward` for one unpadded token, with its per-token bookkeeping cut to the minimum: the positions
        are each row's next position (a view), the LM head reads the one hidden state. A pure Mamba-2 model in fp32
        on the CPU runs its blocks and head as one native call (:func:`zoo.models.fused_decode.stack_step`)."""
        start = states.next_position
        positions = start[:, None]  # [B, 1]
        states.next_position = start + 1
        states.offset += 1
        h = self.embedding(input_ids)
        if self.config.embedding_scale != 1.0:
            h = h * self.config.embedding_scale
        logits = stack_step(self, h, states)  # all blocks and the head in one native call, where it applies
        if logits is None:
            layers = states.layers
            for i, block in enumerate(self.layers):
                h, layers[i] = block(h, positions, layers[i], None, None)
            h = self.norm_f(h[:, -1])
            logits = self.lm_head(h if h.dtype == self.dtype else h.to(self.dtype))
        if self.config.logit_scale != 1.0:
            logits = logits * self.config.logit_scale
        return logits

    def check_inputs(self, input_ids: Tensor, attention_mask: Tensor | None, *, states: ModelState | None = None,
                     seq_idx: Tensor | None = None) -> Tensor | None:
        """Validate a call's inputs (once per call, one host synchronisation; never in :meth:`step`); returns the
        mask of this call's tokens as bool ``[B, T]``, or None when every token is real (the mixers then take their
        unmasked paths). ``ValueError`` naming what is wrong:

        * ``input_ids``: a non-empty 2-D int64/int32 tensor with every id in ``[0, vocab_size)``;
        * ``states``: a :class:`ModelState` of this model, built for the same batch size;
        * ``attention_mask``: ``[B, T]`` (or ``[B, offset + T]``) of 0/1 values. Without states (a parallel
          forward) every row has a real token and its real tokens are contiguous (left or right padding). With
          states (a prefill chunk or decode) padding goes on the LEFT: a row's chunk is all padding, or padding
          followed by tokens before the row has absorbed any real token, or all tokens after that.
        * positions past ``max_position_embeddings``: the family's choice (:meth:`check_positions`).
        """
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a [B, T] tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
        if input_ids.dtype not in (torch.long, torch.int32):
            raise ValueError(f"input_ids must be an integer tensor (int64 or int32) of token ids, "
                             f"got {input_ids.dtype}")
        B, T = input_ids.shape
        if B == 0 or T == 0:
            raise ValueError(f"input_ids is empty (shape {(B, T)}): give at least one token per row")
        offset = 0
        if states is not None:
            if not isinstance(states, ModelState) or len(states.layers) != len(self.layers):
                raise ValueError("states must be this model's ModelState (from model.init_states(batch_size))")
            if states.next_position.shape[0] != B:
                raise ValueError(f"states were built for batch size {states.next_position.shape[0]}, but input_ids "
                                 f"has {B} rows; use model.init_states({B}) (or State.reorder to select rows)")
            offset = states.offset
        if seq_idx is not None and (states is not None or not isinstance(seq_idx, Tensor)
                                    or tuple(seq_idx.shape) != (B, T) or seq_idx.is_floating_point()):
            raise ValueError(f"seq_idx (packed documents) must be an integer [B, T]=[{B}, {T}] tensor and is for the "
                             f"parallel forward only (no states); got {getattr(seq_idx, 'shape', seq_idx)!r}"
                             + (" with states" if states is not None else ""))
        mask = None
        if attention_mask is not None:
            if not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2 or attention_mask.shape[0] != B \
                    or attention_mask.shape[1] not in {T, offset + T}:
                also = f" or [B, offset + T]=[{B}, {offset + T}]" if offset else ""
                raise ValueError(f"attention_mask must be [B, T]=[{B}, {T}]{also} like input_ids, "
                                 f"got {tuple(getattr(attention_mask, 'shape', ())) or attention_mask!r}")
            mask = attention_mask[:, -T:]
        # one host synchronisation for every value check of the call
        ids_lo, ids_hi = input_ids.min(), input_ids.max()
        zero = torch.zeros((), dtype=torch.long, device=input_ids.device)
        bad_values = bad_layout = zero
        real = None
        if mask is not None:
            bad_values = ((mask != 0) & (mask != 1)).sum() if mask.dtype != torch.bool else zero
            real = mask.bool()
            bad_layout = self._padding_errors(real, states).sum()
        n_row = real.sum(1) if real is not None else torch.full((B,), T, device=input_ids.device)
        last = (n_row + states.next_position if states is not None else n_row).max()  # the longest row's length
        lo, hi, n_bad_values, n_bad_layout, last, n_real = torch.stack([
            ids_lo.long(), ids_hi.long(), bad_values, bad_layout, last.long(),
            real.sum() if real is not None else zero + B * T]).tolist()
        V = self.config.vocab_size
        if lo < 0 or hi >= V:
            raise ValueError(f"input_ids out of range: token ids must be in [0, {V}) (vocab_size), got min {lo}, "
                             f"max {hi}")
        if n_bad_values:
            vals = torch.unique(mask[(mask != 0) & (mask != 1)])[:8].tolist()
            raise ValueError(f"attention_mask must hold only 0 (padding) and 1 (token), found {vals}")
        if n_bad_layout:
            rows = self._padding_errors(real, states).nonzero().flatten().tolist()[:8]
            if states is None:
                raise ValueError(f"attention_mask rows {rows} have no real token, or padding between real tokens: "
                                 "every row needs a token, and its tokens must be contiguous (pad on the left)")
            raise ValueError(f"attention_mask rows {rows} put padding after real tokens, which a continued call "
                             "(states: chunked prefill / decode) cannot undo; pad on the LEFT (e.g. "
                             "tokenizer.padding_side = 'left'), so that a row is all padding until its first token")
        self.check_positions(last)
        return None if real is None or n_real == B * T else real

    def _padding_errors(self, real: Tensor, states: ModelState | None) -> Tensor:
        """``[B]``: rows of this call's mask ``real`` whose padding layout is refused (see :meth:`check_inputs`)."""
        starts = (real[:, 1:] & ~real[:, :-1]).sum(1)  # 0 -> 1 transitions
        if states is None:  # parallel: a token in every row, one contiguous run of tokens
            return ~real.any(1) | (starts + real[:, 0].long() > 1)
        ends = (~real[:, 1:] & real[:, :-1]).any(1)  # a pad after a token in this chunk
        seen = states.next_position > 0  # the row absorbed real tokens before
        return ends | (seen & real.any(1) & ~real.all(1))

    def check_positions(self, length: int) -> None:
        """What happens when a row's sequence reaches ``length`` tokens, past ``max_position_embeddings``: each
        family documents its choice (``Family.positions_past_max``): ``"warn"`` - RoPE extrapolates, with a warning
        once per model; ``"error"`` - ``ValueError``; ``"allow"`` - the model has no position limit (no layer uses
        RoPE, or a family without positional encoding, e.g. Mamba-2). Zoo-native models warn when a layer uses RoPE."""
        limit = self.config.max_position_embeddings
        if length <= limit:
            return
        policy = positions_policy(self.config)
        if policy == "error":
            raise ValueError(f"the sequence reaches {length} tokens, past max_position_embeddings={limit} of this "
                             f"{self.config.family or 'zoo'} model, which refuses to extrapolate its positions")
        if policy == "warn" and not self._warned_positions:
            self._warned_positions = True
            warnings.warn(f"the sequence reaches {length} tokens, past max_position_embeddings={limit}: RoPE "
                          "extrapolates beyond the trained context and quality may degrade (warned once per model)",
                          stacklevel=3)

    def _forward(self, input_ids: Tensor, attention_mask: Tensor | None, positions: Tensor | None,
                 states: ModelState | None, seq_idx: Tensor | None, logits_to_keep: int) -> Tensor:
        """The model's time is computed here, once per call, and handed to every mixer: ``positions [B, T]``, the
        valid-token mask (None = all real), and the state's offset / next positions."""
        B, T = input_ids.shape
        if positions is None:
            start = states.next_position if states is not None else None
            positions = token_positions(B, T, attention_mask, start=start, seq_idx=seq_idx, device=self.device)
        if states is not None:
            states.next_position = states.next_position + (T if attention_mask is None else attention_mask.sum(1))
            states.offset += T
        h = self.embedding(input_ids)
        if self.config.embedding_scale != 1.0:
            h = h * self.config.embedding_scale
        for i, block in enumerate(self.layers):
            state = states.layers[i] if states is not None else None
            if self.gradient_checkpointing and self.training and states is None:
                h, _ = activation_checkpoint(block, h, positions, None, attention_mask, seq_idx, use_reentrant=False)
            else:
                h, new_state = block(h, positions, state, attention_mask, seq_idx)
                if states is not None:
                    states.layers[i] = new_state
        h = self.norm_f(h).to(self.dtype)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        if self.config.logit_scale != 1.0:
            logits = logits * self.config.logit_scale
        return logits

    # ------------------------------------------------------------------ API sugar
    def generate(self, input_ids: Tensor, **kwargs: Any) -> Tensor:
        return generation.generate(self, input_ids, **kwargs)

    def save_pretrained(self, path: str | os.PathLike, **kwargs: Any) -> Path:
        return checkpoint.save_pretrained(self, path, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        return checkpoint.push_to_hub(self, repo_id, **kwargs)


def create_model(config: ZooConfig | str | dict, **overrides: Any) -> ZooForCausalLM:
    """A randomly initialised model from a config, a preset name or a config dict."""
    if isinstance(config, str):
        config = ZooConfig.from_preset(config, **overrides)
    elif isinstance(config, dict):
        config = ZooConfig.from_dict({**config, **overrides})
    elif overrides:
        config = config.replace(**overrides)
    return ZooForCausalLM(config)


@torch.no_grad()
def state_bytes_per_token(config: ZooConfig, lengths: tuple[int, int] = (64, 128),
                          dtype: torch.dtype = torch.float32) -> list[float]:
    """Per layer, how many state bytes one more token of context costs (0 for fixed-size states).

    Measured, not modelled: each distinct mixer is built alone (so a large model need not be materialised)
    and fed ``lengths[0]`` then ``lengths[1]`` tokens through its state.
    """
    cache: dict[str, float] = {}
    out = []
    for i, layer in enumerate(config.layers):
        key = f"{layer.mixer}:{sorted(config.mixer_kwargs(i).items())}"
        if key not in cache:
            mixer = build_mixer(config, i).to(dtype)
            sizes = []
            for n in lengths:
                state = mixer.init_state(1, dtype=dtype, device="cpu", max_length=n)
                _, state = mixer(torch.randn(1, n, config.d_model, dtype=dtype), state=state)
                sizes.append(state.nbytes)
            cache[key] = (sizes[1] - sizes[0]) / (lengths[1] - lengths[0])
        out.append(cache[key])
    return out


SWAP_INITS = ("reuse", "fresh", "derive")
SWAP_TRAINABLE = ("all", "swapped", "swapped_blocks")


@torch.no_grad()
def swap_layers(model: ZooForCausalLM, spec: str | dict | SwapSpec, *, init: str = "reuse",
                trainable: str = "all") -> ZooForCausalLM:
    """Replace the mixers of the selected layers: ``swap_layers(model, "0-11: sliding_window(window=1024)")``.

    ``spec``: a swap spec (:mod:`zoo.swaps`: a string such as ``"every 3rd from 1: attention"`` or
    ``"longgen"``, the dict form ``{"0-11": "sliding_window(window=1024)"}``, or a parsed ``SwapSpec``).
    ``init``: ``"reuse"`` (default) initialises the new mixers as in a new model, then copies every weight of the
    old mixer whose name and shape match (attention variants share all of them); ``"fresh"`` copies nothing;
    ``"derive"`` also lets the new mixer derive its weights from the old one where it knows how
    (``Mixer.derive_from``; Mamba-2 from attention: C from q, B from k, x from v, out from o, as in "The Mamba in
    the Llama"), and fails if no swapped layer could. ``trainable``: ``"all"`` (default), ``"swapped"`` (every
    other parameter gets ``requires_grad=False``: fine-tune only the new mixers) or ``"swapped_blocks"`` (the
    swapped layers' norms and MLPs train too). ``model.config`` is updated, so a save/load round-trips the
    swapped model.
    """
    if init not in SWAP_INITS:
        raise ValueError(f"swap_layers: init={init!r} is not one of {list(SWAP_INITS)}")
    if trainable not in SWAP_TRAINABLE:
        raise ValueError(f"swap_layers: trainable={trainable!r} is not one of {list(SWAP_TRAINABLE)}")
    new_config, changed = swap_config(model.config, spec)
    derived = []
    for i in changed:
        old = model.layers[i].mixer
        new = build_mixer(new_config, i)
        new.apply(model._init_module)
        if init != "fresh":
            old_sd, new_sd = old.state_dict(), new.state_dict()
            reuse = {k: v for k, v in old_sd.items() if k in new_sd and new_sd[k].shape == v.shape}
            new.load_state_dict(reuse, strict=False)
        if init == "derive" and hasattr(new, "derive_from") and new.derive_from(old):
            derived.append(i)
        model.layers[i].mixer = new.to(device=model.device, dtype=model.dtype)
    if init == "derive" and changed and not derived:
        kinds = sorted({f"{model.config.layers[i].mixer} -> {new_config.layers[i].mixer}" for i in changed})
        raise ValueError(f"swap_layers(init='derive'): none of the swapped mixers ({kinds}) knows how to derive "
                         "its weights from the mixer it replaces; use init='reuse'")
    model.config = new_config
    if trainable != "all":
        for p in model.parameters():
            p.requires_grad_(False)
        for i in changed:
            part = model.layers[i] if trainable == "swapped_blocks" else model.layers[i].mixer
            for p in part.parameters():
                p.requires_grad_(True)
    return model
