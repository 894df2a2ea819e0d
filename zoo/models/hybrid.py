"""Hybrid presets: full attention in a few layers, sparse attention elsewhere (MASFormer, LongGen).

Both methods add no parameters: any attention checkpoint (e.g. a Llama loaded with ``zoo.from_pretrained``)
becomes a hybrid by swapping the mixers of the sparse layers (``zoo.swap_layers``; weights reused as they are).

* MASFormer (Zhang et al., 2023): full attention at a small number of layers, at the **bottom** by default
  (``full_layers=None`` -> the first ``max(1, round(L / 6))`` layers, the paper's "l = 4 of 24" ratio);
  local attention elsewhere: ``block_diagonal(block_size)`` (the paper's block attention) or
  ``sliding_window(window)``.
* LongGen (Ge et al., ICLR 2025): 1/3 full attention, by default the **middle** third
  (``round(L / 3)`` contiguous layers starting at ``(L - n) // 2``; for L = 32: 10..20), 2/3 "KV-reduced":
  ``sparse="sink_window"`` (AttnSink: sinks + window, default 64 + 1984 = a 2K-token budget) or
  ``sparse="strided"`` (dkernel local + vertical stride, default the Phi-3-small values 64 / 16 / 8).

``full_layers`` takes an explicit list of layer indices (or a selector string like ``"0-3,8"``), so any
placement can be ablated.
"""

from __future__ import annotations

from typing import Any, TypeVar

from zoo.config import ZooConfig, parse_layer_selector
from zoo.models.lm import ZooForCausalLM, swap_layers
from zoo.registry import get_mixer

M = TypeVar("M", ZooForCausalLM, ZooConfig)


def _spec(name: str, **args: Any) -> str:
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in args.items())})"


def _full_layers(full_layers: list[int] | str | None, n_layers: int, default: list[int]) -> list[int]:
    if full_layers is None:
        return default
    if isinstance(full_layers, str):
        return parse_layer_selector(full_layers, n_layers)
    out = sorted({int(i) + n_layers if int(i) < 0 else int(i) for i in full_layers})
    bad = [i for i in out if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"full_layers={list(full_layers)} has indices out of range for n_layers={n_layers}: {bad}")
    return out


def apply_hybrid(model_or_config: M, full_layers: list[int], sparse_spec: str, *, allow_reinit: bool = False) -> M:
    """Every layer not in ``full_layers`` gets ``sparse_spec``; the full layers become plain ``attention``.

    Both recipes are parameter-free only on attention layers. A layer of another kind (e.g. Mamba-2 in a hybrid)
    would be replaced by freshly initialised attention: refused unless ``allow_reinit=True``."""
    config = model_or_config.config if isinstance(model_or_config, ZooForCausalLM) else model_or_config
    n = config.n_layers
    other = [f"{i}: {ls.mixer}" for i, ls in enumerate(config.layers)
             if "attention" not in get_mixer(ls.mixer).arg_groups]
    if other and not allow_reinit:
        raise ValueError(f"this recipe turns every layer into attention, but layers {other} are not attention "
                         "layers: their weights would be replaced by a fresh initialisation. Pass "
                         "allow_reinit=True to do it anyway, or swap only the attention layers with zoo.swap_layers")
    sparse = [i for i in range(n) if i not in set(full_layers)]
    spec: dict[str, str] = {}
    if sparse:
        spec[",".join(map(str, sparse))] = sparse_spec
    if full_layers:
        spec[",".join(map(str, full_layers))] = "attention"
    if isinstance(model_or_config, ZooForCausalLM):
        return swap_layers(model_or_config, spec)
    return model_or_config.with_mixers(spec)


def masformer_layers(n_layers: int) -> list[int]:
    return list(range(max(1, round(n_layers / 6))))


def longgen_layers(n_layers: int) -> list[int]:
    n_full = max(1, round(n_layers / 3))
    start = (n_layers - n_full) // 2
    return list(range(start, start + n_full))


def masformer(model_or_config: M, full_layers: list[int] | str | None = None, *, block_size: int = 1024,
              local: str = "block_diagonal", window: int | None = None, allow_reinit: bool = False) -> M:
    """MASFormer: full attention at ``full_layers`` (default: the bottom sixth), local attention elsewhere.

    ``local="block_diagonal"``: each query attends within its block of ``block_size``;
    ``local="sliding_window"``: the previous ``window`` tokens (default ``block_size``).
    """
    config = model_or_config.config if isinstance(model_or_config, ZooForCausalLM) else model_or_config
    full = _full_layers(full_layers, config.n_layers, masformer_layers(config.n_layers))
    if local == "block_diagonal":
        spec = _spec("block_diagonal", block_size=block_size)
    elif local == "sliding_window":
        spec = _spec("sliding_window", window=window or block_size)
    else:
        raise ValueError(f"masformer: local={local!r} is not one of ['block_diagonal', 'sliding_window']")
    return apply_hybrid(model_or_config, full, spec, allow_reinit=allow_reinit)


def longgen(model_or_config: M, full_layers: list[int] | str | None = None, *, sparse: str = "sink_window",
            window: int = 1984, num_sink_tokens: int = 64, block_size: int = 64, local_blocks: int = 16,
            vertical_stride: int = 8, homo_head: bool = False, head_sliding_offset: int = 0,
            allow_reinit: bool = False) -> M:
    """LongGen: full attention at ``full_layers`` (default: the middle third), KV-reduced attention elsewhere.

    ``sparse="sink_window"``: ``num_sink_tokens`` sinks + a ``window``-token sliding window (AttnSink);
    ``sparse="strided"``: dkernel local + vertical-stride block-sparse attention (BlockSparse).
    """
    config = model_or_config.config if isinstance(model_or_config, ZooForCausalLM) else model_or_config
    full = _full_layers(full_layers, config.n_layers, longgen_layers(config.n_layers))
    if sparse == "sink_window":
        spec = _spec("sliding_window", window=window, num_sink_tokens=num_sink_tokens)
    elif sparse == "strided":
        spec = _spec("block_sparse", block_size=block_size, local_blocks=local_blocks,
                     vertical_stride=vertical_stride, homo_head=homo_head, head_sliding_offset=head_sliding_offset)
    else:
        raise ValueError(f"longgen: sparse={sparse!r} is not one of ['sink_window', 'strided']")
    return apply_hybrid(model_or_config, full, spec, allow_reinit=allow_reinit)
