"""A model family is data: presets, a detector for its reference ``config.json``, config maps both ways,
and a key table (ordered prefix renames with ``{i}`` for the layer index) plus a few named transforms."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from zoo.config import ZooConfig
from zoo.layers.base import BenchCase

StateDict = dict[str, Tensor]

# Fields of a reference config.json that never change a causal LM's forward pass: transformers' bookkeeping, the
# generation defaults transformers 4.x wrote into config.json, settings of training / initialisation / fused kernels
# only. Every other field a family does not read is refused (see :func:`check_reference_fields`).
NEUTRAL_FIELDS = frozenset({
    "_name_or_path", "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "output_attentions", "output_hidden_states", "return_dict", "use_return_dict", "torchscript", "is_encoder_decoder",
    "is_decoder", "add_cross_attention", "tie_encoder_decoder", "cross_attention_hidden_size",
    "chunk_size_feed_forward",
    "id2label", "label2id", "num_labels", "problem_type", "finetuning_task", "tokenizer_class", "prefix",
    "task_specific_params", "pruned_heads", "sep_token_id", "decoder_start_token_id", "tf_legacy_loss",
    "use_bfloat16", "initializer_range", "attention_dropout", "hidden_dropout", "embd_pdrop", "resid_pdrop",
    # generation defaults (old transformers configs)
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    # initialisation, training and fused-kernel switches of Mamba-2 implementations
    "rescale_prenorm_residual", "time_step_rank", "conv_init", "A_init_range", "dt_min", "dt_max", "dt_init_floor",
    "fuse_norm", "fuse_cross_entropy", "fuse_linear_cross_entropy", "fused_add_norm", "use_l2warp",
})


def check_reference_fields(cfg: dict[str, Any], known: Iterable[str], fmt: str, where: str = "config.json") -> None:
    """Refuse a reference config.json carrying fields the family neither reads nor knows to be neutral: such a field
    may change the model's math (e.g. a flash-linear-attention Mamba-2 config's ``dt_limit``, ``norm_eps``,
    ``D_has_hdim`` under ``model_type: mamba2``), and loading with it ignored would compute something else."""
    unknown = sorted(set(cfg) - set(known) - NEUTRAL_FIELDS)
    if unknown:
        raise ValueError(
            f"{fmt} {where} has fields the zoo's {fmt} reader does not implement: {unknown}. They may change the "
            "model's math, and loading with them ignored would silently compute something else; refusing. (If you "
            "know them to be neutral for this checkpoint, remove them from config.json.)")


_REQUIRED = object()


class RefConfig:
    """Typed access to a reference ``config.json``: a missing required field, a wrong type or an out-of-range value
    is a ``ValueError`` naming the format and the field (never a ``KeyError`` / ``TypeError`` from deep inside)."""

    def __init__(self, cfg: Any, fmt: str, prefix: str = "") -> None:
        if not isinstance(cfg, dict):
            raise ValueError(f"{fmt} config: {prefix.rstrip('.') or 'the config'} must be a JSON object, "
                             f"got {type(cfg).__name__}")
        self.cfg, self.fmt, self.prefix = cfg, fmt, prefix  # prefix: where a nested object sits ("attn_cfg.")

    def __contains__(self, name: str) -> bool:
        return name in self.cfg

    def _get(self, name: str, default: Any) -> tuple[Any, bool]:
        if name in self.cfg and self.cfg[name] is not None:
            return self.cfg[name], True
        if default is _REQUIRED:
            raise ValueError(f"{self.fmt} config: required field {self.prefix + name!r} is missing")
        return default, False

    def fail(self, name: str, value: Any, what: str) -> ValueError:
        return ValueError(f"{self.fmt} config: {self.prefix}{name}={value!r} must be {what}")

    def int(self, name: str, default: Any = _REQUIRED, *, minimum: int = 1, maximum: int | None = None) -> Any:
        """``maximum``: bound sizes that are iterated over before the config is validated (layer counts)."""
        v, given = self._get(name, default)
        if given and (not isinstance(v, int) or isinstance(v, bool) or v < minimum or (maximum and v > maximum)):
            raise self.fail(name, v, f"an int >= {minimum}" + (f" and <= {maximum:,}" if maximum else ""))
        return v

    def float(self, name: str, default: Any = _REQUIRED, *, positive: bool = True, finite: bool = True) -> Any:
        v, given = self._get(name, default)
        if given:
            if isinstance(v, dict) and set(v) == {"__float__"}:  # transformers 5's form of non-finite floats
                v = float(v["__float__"])
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)
            if not ok or (finite and math.isinf(v)) or (positive and not v > 0):
                what = ("a positive" if positive else "a") + (" finite" if finite else "") + " number"
                raise self.fail(name, v, what)
            v = float(v)
        return v

    def bool(self, name: str, default: Any = _REQUIRED) -> Any:
        v, given = self._get(name, default)
        if given and not isinstance(v, bool):
            raise self.fail(name, v, "true or false")
        return v

    def str(self, name: str, default: Any = _REQUIRED) -> Any:
        v, given = self._get(name, default)
        if given and not isinstance(v, str):
            raise self.fail(name, v, "a string")
        return v

    def dict(self, name: str, default: Any = _REQUIRED) -> Any:
        v, given = self._get(name, default)
        if given and not isinstance(v, dict):
            raise self.fail(name, v, "a JSON object")
        return v

    def token_id(self, name: str, *, many: bool = False) -> Any:
        """``None``, a non-negative int, or (``many``) a list of them (the vocabulary range is ZooConfig's check)."""
        v, given = self._get(name, None)
        ok = (isinstance(v, int) and not isinstance(v, bool) and v >= 0) or (
            many and isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v))
        if given and not ok:
            raise self.fail(name, v, "a non-negative int" + (" or a list of them" if many else ""))
        return v


@dataclass
class Preset:
    config: dict[str, Any]  # ZooConfig.from_dict input
    hub_id: str | None = None
    revision: str | None = None
    description: str = ""
    # Layers to swap (``zoo.swap_layers`` spec) after loading ``hub_id``: a hybrid built from a published checkpoint.
    swap: dict[str, str] | None = None


@dataclass
class Family:
    name: str
    detect: Callable[[dict[str, Any]], bool]
    config_from_reference: Callable[[dict[str, Any]], ZooConfig]
    config_to_reference: Callable[[ZooConfig], dict[str, Any]]
    key_table: list[tuple[str, str]]  # (reference prefix, zoo prefix)
    presets: dict[str, Preset] = field(default_factory=dict)
    # transforms applied after renaming (reference -> zoo) and before renaming back (zoo -> reference)
    from_reference: Callable[[StateDict, ZooConfig], StateDict] | None = None
    to_reference: Callable[[StateDict, ZooConfig], StateDict] | None = None
    reference_weights_name: str = "model.safetensors"
    model_card: str = "default"
    # The family whose reference format this one refines (same model_type, e.g. GENERator is a Llama): when both
    # detect a config.json, the refining family wins.
    specializes: str | None = None
    # Model-level benchmark cases (``BenchCase(kind="model")``, args per size = a ZooConfig dict): ``zoo bench``.
    bench_cases: tuple[BenchCase, ...] = ()
    # Further reference formats this family writes (``zoo convert --to NAME``), e.g. Mamba-2's transformers layout
    # next to its own mamba_ssm one: name -> a Family-like object (config_to_reference, key table, weights name).
    export_formats: dict[str, Family] = field(default_factory=dict)
    # Whether the reference loaders of this format read sharded weights (``<stem>-00001-of-0000N`` + index).
    shardable: bool = True
    # BibTeX entries of the papers behind the family's architecture / checkpoints (model cards list them).
    citations: tuple[str, ...] = ()
    # Positions past ``max_position_embeddings`` in a model with RoPE layers (the family's documented choice):
    # "warn" (RoPE extrapolates; a warning once per model), "error" (ValueError) or "allow" (no position limit).
    positions_past_max: str = "warn"

    def __post_init__(self) -> None:
        if self.positions_past_max not in ("warn", "error", "allow"):
            raise ValueError(f"Family {self.name!r}: positions_past_max={self.positions_past_max!r} must be one of "
                             "'warn', 'error', 'allow'")

    def state_dict_from_reference(self, sd: StateDict, config: ZooConfig) -> StateDict:
        out = rename_keys(sd, self.key_table, source="reference")
        return self.from_reference(out, config) if self.from_reference else out

    def state_dict_to_reference(self, sd: StateDict, config: ZooConfig) -> StateDict:
        sd = self.to_reference(dict(sd), config) if self.to_reference else dict(sd)
        return rename_keys(sd, [(b, a) for a, b in self.key_table], source="zoo")


def refuse_layers(fmt: str, config: ZooConfig, bad: list[int], holds: str) -> None:
    """``ValueError`` naming the layers (index, mixer spec, MLP) of ``config`` that the reference format ``fmt``
    cannot hold; ``holds``: what the format holds, e.g. "plain attention + MLP blocks". No-op when ``bad`` is empty."""
    if not bad:
        return
    shown = [f"{i}: {config.layers[i].spec_string}" + ("" if config.layers[i].mlp else " without MLP") for i in bad]
    more = f" and {len(bad) - 12} more" if len(bad) > 12 else ""
    raise ValueError(f"cannot export to the {fmt} format, which holds only {holds}: layer(s) "
                     f"{'; '.join(shown[:12])}{more} do not fit (convert to 'zoo', or swap them first)")


def _prefix_regex(prefix: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(prefix).replace(re.escape("{i}"), r"(?P<i>\d+)"))


def rename_keys(sd: StateDict, table: list[tuple[str, str]], *, source: str) -> StateDict:
    """Rename every key by the first matching ``(from_prefix, to_prefix)`` row; unmatched keys are an error."""
    compiled = [(_prefix_regex(a), b) for a, b in table]
    out: StateDict = {}
    unmatched = []
    for key, value in sd.items():
        for rx, target in compiled:
            m = rx.match(key)
            if m:
                new = target.replace("{i}", m.group("i")) if "i" in rx.groupindex else target
                out[new + key[m.end():]] = value
                break
        else:
            unmatched.append(key)
    if unmatched:
        raise KeyError(f"{len(unmatched)} {source} checkpoint key(s) match no row of the key table: {unmatched[:10]}")
    return out
