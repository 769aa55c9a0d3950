"""One memory model for every chunked computation.

Batched backward rows, forward replay directions, patched runs and Lanczos products all
keep one forward graph's activations alive per item. :func:`sequence_bytes` estimates that
from the model's shape and the compute dtype; :func:`chunk_size` fits items into
``max_memory``.
"""

from __future__ import annotations

from typing import Any

import torch

DEFAULT_MEMORY = 128 << 20  # bytes of intermediates per chunk
MAX_ROWS = 128  # beyond this a chunk only costs memory: measured on 2 CPU cores, SmolLM2
# at 128 tokens, 24-row chunks ran in 69 s and 64-row chunks in 77 s; at 32 tokens 48 or 144
# rows took 17 s and one 576-row batch 27 s.


def sequence_bytes(cfg: Any, n_pos: int, dtype: torch.dtype, batch: int = 1) -> int:
    """Bytes one pass over ``batch`` sequences of ``n_pos`` tokens keeps alive, roughly:
    per token, about 8 residual-width and 4 MLP-width values, and one attention row per
    head (scores and pattern)."""
    width = 8 * cfg.d_model + 4 * (getattr(cfg, "d_mlp", None) or 4 * cfg.d_model) + 4 * cfg.n_heads * n_pos
    return batch * n_pos * width * dtype.itemsize


def chunk_size(n_items: int, item_bytes: int, max_memory: int = DEFAULT_MEMORY, cap: int = MAX_ROWS) -> int:
    """How many items of ``item_bytes`` each fit in ``max_memory``: at least 1, at most ``cap``."""
    return max(1, min(n_items, cap, max_memory // max(1, item_bytes)))
