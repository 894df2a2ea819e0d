"""Hybrid recipes: full attention in a few layers, sparse attention elsewhere (MASFormer, LongGen).

Both methods add no parameters: any attention checkpoint (e.g. a Llama loaded with ``zoo.from_pretrained``)
becomes a hybrid by swapping the mixers of the sparse layers (``zoo.swap_layers``; weights reused as they are).
Each recipe is a swap spec (:mod:`zoo.swaps`) and is registered there by name, so ``"longgen"`` or
``"masformer(block_size=128)"`` is a whole swap spec for ``zoo.swap_layers``, ``zoo ablate`` and the scripts.

* MASFormer (Zhang et al., 2023): full attention at a small number of layers, at the **bottom** by default
  (``full_layers=None`` -> ``"first sixth"``: the first ``max(1, round(L / 6))`` layers, the paper's "l = 4 of
  24" ratio); local attention elsewhere: ``block_diagonal(block_size)`` (the paper's block attention) or
  ``sliding_window(window)``.
* LongGen (Ge et al., ICLR 2025): 1/3 full attention, by default the **middle** third (``"middle third"``:
  ``round(L / 3)`` contiguous layers starting at ``(L - n) // 2``; for L = 32: 10..20), 2/3 "KV-reduced":
  ``sparse="sink_window"`` (AttnSink: sinks + window, default 64 + 1984 = a 2K-token budget) or
  ``sparse="strided"`` (dkernel local + vertical stride, default the Phi-3-small values 64 / 16 / 8).

``full_layers`` takes an explicit list of layer indices or any selector of the swap-spec grammar (``"0-3,8"``,
``"every 4th from 3"``), so any placement can be ablated.
"""

from __future__ import annotations

from typing import Any, TypeVar

from zoo.config import ZooConfig
from zoo.models.lm import ZooForCausalLM, swap_layers
from zoo.registry import get_mixer
from zoo.swaps import Clause, SwapSpec, canonical_selector, register_recipe, select_layers, swap_config

M = TypeVar("M", ZooForCausalLM, ZooConfig)


def _full_selector(full_layers: list[int] | str | None, n_layers: int, default: str) -> str:
    if full_layers is None:
        return default
    if isinstance(full_layers, str):
        sel = full_layers
    else:
        idx = [int(i) for i in full_layers]
        bad = [i for i in idx if not -n_layers <= i < n_layers]
        if bad:
            raise ValueError(f"full_layers={list(full_layers)} has indices out of range for n_layers={n_layers}: "
                             f"{bad}")
        sel = ",".join(str(i + n_layers if i < 0 else i) for i in sorted(set(idx)))
    try:
        select_layers(sel, n_layers)
    except ValueError as e:
        raise ValueError(f"full_layers={full_layers!r}: {e}") from None
    return canonical_selector(sel)


def hybrid_spec(full: str, sparse_mixer: str, sparse_args: dict[str, Any]) -> SwapSpec:
    """``"<full>: attention; rest: <sparse mixer>"``."""
    return SwapSpec([Clause(full, "attention"), Clause("rest", sparse_mixer, sparse_args)])


def apply_hybrid(model_or_config: M, spec: SwapSpec, *, allow_reinit: bool = False) -> M:
    """Apply a hybrid recipe's spec. Both recipes are parameter-free only on attention layers: a layer of another
    kind (e.g. Mamba-2 in a hybrid) would be replaced by freshly initialised attention: refused unless
    ``allow_reinit=True``."""
    config = model_or_config.config if isinstance(model_or_config, ZooForCausalLM) else model_or_config
    other = [f"{i}: {ls.mixer}" for i, ls in enumerate(config.layers)
             if "attention" not in get_mixer(ls.mixer).arg_groups]
    if other and not allow_reinit:
        raise ValueError(f"this recipe turns every layer into attention, but layers {other} are not attention "
                         "layers: their weights would be replaced by a fresh initialisation. Pass "
                         "allow_reinit=True to do it anyway, or swap only the attention layers with zoo.swap_layers")
    if isinstance(model_or_config, ZooForCausalLM):
        return swap_layers(model_or_config, spec)
    return swap_config(model_or_config, spec)[0]


def masformer_layers(n_layers: int) -> list[int]:
    return select_layers("first sixth", n_layers)


def longgen_layers(n_layers: int) -> list[int]:
    return select_layers("middle third", n_layers)


def masformer_spec(n_layers: int, full_layers: list[int] | str | None = None, *, block_size: int = 1024,
                   local: str = "block_diagonal", window: int | None = None) -> SwapSpec:
    """The MASFormer swap spec for an ``n_layers`` model (registered as the swap recipe ``"masformer"``)."""
    full = _full_selector(full_layers, n_layers, "first sixth")
    if local == "block_diagonal":
        return hybrid_spec(full, "block_diagonal", {"block_size": block_size})
    if local == "sliding_window":
        return hybrid_spec(full, "sliding_window", {"window": window or block_size})
    raise ValueError(f"masformer: local={local!r} is not one of ['block_diagonal', 'sliding_window']")


def longgen_spec(n_layers: int, full_layers: list[int] | str | None = None, *, sparse: str = "sink_window",
                 window: int = 1984, num_sink_tokens: int = 64, block_size: int = 64, local_blocks: int = 16,
                 vertical_stride: int = 8, homo_head: bool = False, head_sliding_offset: int = 0) -> SwapSpec:
    """The LongGen swap spec for an ``n_layers`` model (registered as the swap recipe ``"longgen"``)."""
    full = _full_selector(full_layers, n_layers, "middle third")
    if sparse == "sink_window":
        return hybrid_spec(full, "sliding_window", {"window": window, "num_sink_tokens": num_sink_tokens})
    if sparse == "strided":
        return hybrid_spec(full, "block_sparse", {
            "block_size": block_size, "local_blocks": local_blocks, "vertical_stride": vertical_stride,
            "homo_head": homo_head, "head_sliding_offset": head_sliding_offset})
    raise ValueError(f"longgen: sparse={sparse!r} is not one of ['sink_window', 'strided']")


register_recipe("masformer", masformer_spec)
register_recipe("longgen", longgen_spec)


def masformer(model_or_config: M, full_layers: list[int] | str | None = None, *, block_size: int = 1024,
              local: str = "block_diagonal", window: int | None = None, allow_reinit: bool = False) -> M:
    """MASFormer: full attention at ``full_layers`` (default: the bottom sixth), local attention elsewhere.

    ``local="block_diagonal"``: each query attends within its block of ``block_size``;
    ``local="sliding_window"``: the previous ``window`` tokens (default ``block_size``).
    """
    config = model_or_config.config if isinstance(model_or_config, ZooForCausalLM) else model_or_config
    spec = masformer_spec(config.n_layers, full_layers, block_size=block_size, local=local, window=window)
    return apply_hybrid(model_or_config, spec, allow_reinit=allow_reinit)


def longgen(model_or_config: M, full_layers: list[int] | str | None = None, *, sparse: str = "sink_window",
            window: int = 1984, num_sink_tokens: int = 64, block_size: int = 64, local_blocks: int = 16,
            vertical_stride: int = 8, homo_head: bool = False, head_sliding_offset: int = 0,
            allow_reinit: bool = False) -> M:
    """LongGen: full attention at ``full_layers`` (default: the middle third), KV-reduced attention elsewhere.

    ``sparse="sink_window"``: ``num_sink_tokens`` sinks + a ``window``-token sliding window (AttnSink);
    ``sparse="strided"``: dkernel local + vertical-stride block-sparse attention (BlockSparse).
    """
    config = model_or_config.config if isinstance(model_or_config, ZooForCausalLM) else model_or_config
    spec = longgen_spec(config.n_layers, full_layers, sparse=sparse, window=window, num_sink_tokens=num_sink_tokens,
                        block_size=block_size, local_blocks=local_blocks, vertical_stride=vertical_stride,
                        homo_head=homo_head, head_sliding_offset=head_sliding_offset)
    return apply_hybrid(model_or_config, spec, allow_reinit=allow_reinit)
