"""LaCT test-time training ops. Only the torch reference exists: the TTT update is a few large batched GEMMs per
chunk (``18 dh dH`` FLOPs per token and head, plus Newton-Schulz), which the reference already hands to the BLAS
in one call each; no fused kernel has been written (no GPU profile was available to show where one pays)."""

from zoo.kernels.lact.reference import (
    NS_COEFFS,
    document_index,
    fast_weight_step,
    from_heads,
    lact_chunked,
    masked_chunk_update,
    newton_schulz5,
    ragged_layout,
    row_norms,
    swiglu_apply,
    swiglu_descent,
    to_heads,
)

__all__ = ["NS_COEFFS", "document_index", "fast_weight_step", "from_heads", "lact_chunked", "masked_chunk_update",
           "newton_schulz5", "ragged_layout", "row_norms", "swiglu_apply", "swiglu_descent", "to_heads"]
