"""One memory budget for every chunk, store and batch.

Every public call takes ``max_memory``: the bytes lens_linear may hold at once for one
computation, beyond the model's weights and the activations of the forward it runs. One
default per device (:func:`default_memory`): 256 MB on a CPU, a quarter of the free memory
on a CUDA device. Everything lens_linear sizes is a share of it, so no other number decides
memory:

* :func:`patterns_fit` — attention patterns are stored whole while every layer's pattern
  together takes at most the whole budget; beyond, they are kept as their queries and keys;
* :func:`chunk_size` — a chunk of batched products (backward rows, replay directions,
  patched runs, Lanczos vectors) takes at most half of it: each keeps one forward graph's
  activations alive (:func:`sequence_bytes`), next to the store;
* :func:`row_block` — a block of attention-pattern rows recomputed from queries and keys
  takes at most a quarter.

Chunks also stop at a row count beyond which they are no faster (:data:`MAX_ROWS` on a CPU,
:data:`GPU_MAX_ROWS` on a GPU): a speed setting, which only ever lowers memory. Measured
on 2 CPU cores, SmolLM2: at 128 tokens, 24-row chunks ran in 69 s and 64-row chunks in
77 s; at 32 tokens 48 or 144 rows took 17 s and one 576-row batch 27 s. On an H200 the full
Jacobian of a 30-layer model at 32 tokens took 0.30 s in 128-row chunks of 128 MB, where
one 576-row batch took 0.13 s: hence the large default on a GPU.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from lens_linear.tokens import model_device, model_dtype

CPU_MEMORY = 256 << 20  # the default budget on a CPU, bytes
GPU_SHARE = 4  # on CUDA, the default budget is 1/GPU_SHARE of the memory free when it is read
MAX_ROWS = 128  # rows per chunk on a CPU, at most (speed, not memory: see above)
GPU_MAX_ROWS = 4096


def default_memory(device: torch.device | str | None = None) -> int:
    """The budget when the caller gives none: 256 MB on a CPU, a quarter of the free memory
    on a CUDA device."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // GPU_SHARE
    return CPU_MEMORY


def budget(max_memory: int | None, device: torch.device | str | None = None) -> int:
    """``max_memory``, or the default of ``device``; refuses a budget that is not positive."""
    if max_memory is None:
        return default_memory(device)
    if not isinstance(max_memory, int) or isinstance(max_memory, bool) or max_memory <= 0:
        raise ValueError(f"max_memory must be a positive number of bytes, got {max_memory!r}")
    return max_memory


def sequence_bytes(cfg: Any, n_pos: int, dtype: torch.dtype, batch: int = 1) -> int:
    """Bytes one pass over ``batch`` sequences of ``n_pos`` tokens keeps alive, roughly:
    per token, about 8 residual-width and 4 MLP-width values, and one attention row per
    head (scores and pattern)."""
    d_mlp = getattr(cfg, "d_mlp", None) or 4 * cfg.d_model
    width = 8 * cfg.d_model + 4 * d_mlp + 4 * cfg.n_heads * n_pos
    return batch * n_pos * width * dtype.itemsize


def chunk_size(
    n_items: int,
    item_bytes: int,
    max_memory: int | None = None,
    cap: int | None = None,
    device: torch.device | str | None = None,
) -> int:
    """How many items of ``item_bytes`` each fit in half of the budget: at least 1, at most
    ``cap`` (default :data:`MAX_ROWS` on a CPU, :data:`GPU_MAX_ROWS` on a GPU)."""
    on_gpu = torch.device(device or "cpu").type == "cuda"
    cap = (GPU_MAX_ROWS if on_gpu else MAX_ROWS) if cap is None else cap
    return max(1, min(n_items, cap, budget(max_memory, device) // 2 // max(1, item_bytes)))


def pattern_bytes(cfg: Any, n_pos: int, dtype: torch.dtype, batch: int = 1) -> int:
    """Bytes of every layer's attention pattern for ``batch`` prompts of ``n_pos`` tokens."""
    return batch * cfg.n_layers * cfg.n_heads * n_pos * n_pos * dtype.itemsize


def patterns_fit(model: Any, n_pos: int, batch: int = 1, max_memory: int | None = None) -> bool:
    """Whether every layer's pattern for ``batch`` prompts of ``n_pos`` tokens (the model's
    dtype) fits in the whole budget: the default for storing them whole (beyond, they are
    kept as queries and keys)."""
    dtype = model_dtype(model) or torch.float32
    return pattern_bytes(model.cfg, n_pos, dtype, batch) <= budget(max_memory, model_device(model))


def row_block(
    n_heads: int,
    n_keys: int,
    max_memory: int | None = None,
    device: torch.device | str | None = None,
) -> int:
    """Query rows of a pattern (every head, float32) recomputed at once: a quarter of the
    budget, between 1 and 256 rows (beyond 256 a block is no faster)."""
    return max(1, min(256, budget(max_memory, device) // 4 // (n_heads * n_keys * 4)))


_LIBC: Any = None  # glibc, once looked up (False: not glibc)


def release_freed_memory() -> None:
    """Hand the C heap's free pages back to the operating system (glibc's ``malloc_trim``;
    nothing elsewhere). glibc keeps memory a long computation freed resident, fragmented
    between the tensors still alive, and the next computation's peak stacks on top of it:
    at 2,048 tokens on SmolLM2, a verified recording leaves 2.4-2.6 GB resident, and the top-3
    matrix-free SVD after it peaked at 3.9-4.1 GB; trimmed in between, at 3.35 GB (the same
    results). Called after long-prompt work only (each call walks the heap: milliseconds)."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):  # not glibc (macOS, Windows, musl)
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)
