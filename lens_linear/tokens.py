"""Token helpers shared by every module: one sequence in, names out.

A linearization is of one input, so :func:`to_tokens` takes one prompt (text or ids) and
refuses batches; tokens land on the model's device (``cfg.device``).
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Int


def model_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating-point parameter."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def model_device(model: Any) -> torch.device:
    """Where the model's inputs go: ``cfg.device`` where set, else its first parameter's device."""
    device = getattr(model.cfg, "device", None)
    if device is not None:
        return torch.device(device)
    return next(model.parameters()).device


def to_tokens(
    model: Any,
    input: str | torch.Tensor,
    prepend_bos: bool | None = None,
    max_len: int | None = None,
) -> Int[torch.Tensor, "1 pos"]:
    """One sequence as ``[1, pos]`` token ids (cut to ``max_len``); rejects empty or batched input."""
    if isinstance(input, str):
        if not input.strip():
            raise ValueError("empty prompt: give at least one token of text")
        if model.tokenizer is None:
            raise ValueError(
                "this model has no tokenizer: pass token ids as a tensor instead of text"
            )
        tokens = model.to_tokens(input, prepend_bos=prepend_bos, truncate=False)
    elif isinstance(input, torch.Tensor):
        tokens = input.unsqueeze(0) if input.ndim == 1 else input
        if tokens.ndim != 2 or tokens.shape[0] != 1:
            raise ValueError(
                f"expected one sequence of token ids [pos] or [1, pos], got shape {tuple(input.shape)}; "
                f"a linearization is for one input, so loop over a batch"
            )
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"token ids must be an integer tensor, got {tokens.dtype}")
    else:
        raise TypeError(
            f"input must be a string or a tensor of token ids, got {type(input).__name__}"
        )
    tokens = tokens[:, :max_len]
    if tokens.shape[-1] == 0:
        raise ValueError("empty prompt: give at least one token")
    n_ctx = getattr(model.cfg, "n_ctx", None)
    if n_ctx and tokens.shape[-1] > n_ctx:
        raise ValueError(
            f"prompt has {tokens.shape[-1]} tokens, more than the model's context of {n_ctx}"
            + ("; pass max_len to cut prompts" if max_len is None else "")
        )
    return tokens.to(model_device(model))


def single_token(model: Any, text: str) -> int:
    """The id of ``text`` if it is exactly one token (no BOS); else a clear error."""
    if model.tokenizer is None:
        raise ValueError("this model has no tokenizer: give token ids instead of text")
    ids = model.to_tokens(text, prepend_bos=False)[0]
    if len(ids) != 1:
        pieces = [model.tokenizer.decode([int(i)]) for i in ids]
        raise ValueError(
            f"{text!r} is {len(ids)} tokens ({pieces}); it must be a single token "
            f"(a leading space usually makes a word one token)"
        )
    return int(ids[0])


def token_strings(model: Any, ids: torch.Tensor | list[int]) -> list[str]:
    """Each id decoded alone (the id itself as text where the model has no tokenizer)."""
    ids = [int(i) for i in ids]
    if model.tokenizer is None:
        return [str(i) for i in ids]
    return [model.tokenizer.decode([i]) for i in ids]
