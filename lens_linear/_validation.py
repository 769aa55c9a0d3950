"""Shared errors and early input checks (run before any forward pass)."""

from __future__ import annotations

import difflib
from typing import Any, Iterable

import torch


class LinearizationError(RuntimeError):
    """The frozen map does not reproduce the model: some nonlinearity is not frozen.

    Raised instead of returning a wrong linearization. ``layer`` is the first block whose
    output breaks linearity (``None`` when it could not be located) and ``error`` the
    measured relative error there.
    """

    def __init__(self, message: str, layer: int | None = None, error: float | None = None):
        super().__init__(message)
        self.layer = layer
        self.error = error


class ModelUnavailableError(RuntimeError):
    """A model file cannot be fetched; the message says how to supply it by hand."""


class ModelInUseError(RuntimeError):
    """A lens_linear call on a model another call is using (another thread, or a user hook
    calling back in during that call's forward); the message names the call in progress."""


def is_transformer_lens_model(model: Any) -> bool:
    """A TransformerLens model: a module with ``cfg`` and ``hook_dict``, looked up without
    evaluating it (a bridge's ``hook_dict`` is a property that rebuilds every alias)."""
    return (
        isinstance(model, torch.nn.Module)
        and hasattr(model, "cfg")
        and ("hook_dict" in vars(model) or hasattr(type(model), "hook_dict"))
    )


def require_tl_model(model: Any) -> None:
    if not is_transformer_lens_model(model):
        raise TypeError(
            f"expected a TransformerLens model (TransformerBridge or HookedTransformer), "
            f"got {type(model).__name__}. Load one with lens_linear.load_model(...) or wrap a "
            f"Hugging Face model with TransformerBridge.boot_transformers(name, hf_model=...)."
        )


def hook_name(model: Any, key: str | tuple) -> str:
    """A full hook name from a name or an ``ActivationCache`` shorthand: ``"resid_post", 3``,
    ``("scale", 2, "ln1")``, ``"embed"`` (``transformer_lens.utils.get_act_name``); negative
    layers count from the end. Raises naming close matches when nothing fits."""
    try:
        from transformer_lens.utilities import get_act_name  # TransformerLens 4
    except ImportError:
        from transformer_lens.utils import get_act_name  # TransformerLens 3

    hook_dict = _hook_points(model)
    if isinstance(key, str) and key in hook_dict:
        return key
    if isinstance(key, tuple):
        if len(key) > 1 and isinstance(key[1], int) and not isinstance(key[1], bool):
            key = (key[0], normalize_index(key[1], model.cfg.n_layers), *key[2:])
        name = get_act_name(*key)
    elif isinstance(key, str):
        name = get_act_name(key)
    else:
        raise TypeError(
            f"a hook is a name or an ActivationCache shorthand like ('resid_post', 3), got {key!r}"
        )
    require_hook(model, name)
    return name


# the map's input where a model has no residual stream before its first block: DeepSeek-V4's
# first block reads ``hc_mult`` copies of the embeddings (hyper-connection streams), so the
# input variable is the embeddings themselves
INPUT_FALLBACK = {"blocks.0.hook_resid_pre": "hook_embed"}


def hook_key(hook_dict: Any, name: str) -> str:
    """``name``, or the hook standing for it where the model lacks it (:data:`INPUT_FALLBACK`)."""
    if name in hook_dict:
        return name
    return INPUT_FALLBACK.get(name, name)


def _hook_points(model: Any) -> Any:
    """``model.hook_dict``, read once per call that holds the model
    (:func:`lens_linear.hooks.sites.hook_points`; imported here, at first use, because the
    hooks package imports this module)."""
    from lens_linear.hooks.sites import hook_points

    return hook_points(model)


def require_hook(model: Any, *names: str) -> None:
    """Every name must be a hook point (``hook_dict`` is read once: a TL 3.9 bridge rebuilds
    its aliases on every access)."""
    hook_dict = _hook_points(model)
    for name in names:
        if hook_key(hook_dict, name) not in hook_dict:
            close = difflib.get_close_matches(name, list(hook_dict), n=5, cutoff=0.6)
            hint = f" Close matches: {', '.join(close)}." if close else ""
            raise KeyError(f"unknown hook name {name!r} for this model.{hint}")


def normalize_position(pos: int, n_pos: int, what: str = "pos") -> int:
    """Resolve a possibly negative position; raise naming the valid range."""
    if isinstance(pos, bool) or not isinstance(pos, int):
        raise TypeError(f"{what} must be an int, got {type(pos).__name__}")
    if not -n_pos <= pos < n_pos:
        raise IndexError(
            f"{what}={pos} is out of range for a sequence of {n_pos} tokens "
            f"(valid: {-n_pos}..{n_pos - 1})."
        )
    return pos % n_pos


def normalize_index(value: int, size: int, what: str = "layer", unit: str = "layers") -> int:
    """Resolve a possibly negative layer or head index; raise naming the valid range."""
    if isinstance(value, bool) or not isinstance(value, int) or not -size <= value < size:
        raise IndexError(
            f"{what}={value} is out of range for a model with {size} {unit} "
            f"(valid: {-size}..{size - 1})"
        )
    return value % size


def check_dtype(dtype: torch.dtype, allowed: Iterable[torch.dtype] | None = None) -> torch.dtype:
    allowed = tuple(allowed or (torch.float16, torch.bfloat16, torch.float32, torch.float64))
    if not isinstance(dtype, torch.dtype) or dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"unsupported dtype {dtype!r}; use one of: {names}")
    return dtype


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, str):
        value = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(value, torch.dtype):
            raise TypeError(f"unknown dtype {dtype!r}; use float32, float64, float16 or bfloat16")
        dtype = value
    return check_dtype(dtype)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``std(a − b) / std(b)``: the seed paper's reconstruction error."""
    a, b = a.double(), b.double()
    return float((a - b).std() / b.std().clamp_min(1e-300))


def tolerance(dtype: torch.dtype) -> float:
    """Largest relative reconstruction error we accept as exact for a dtype."""
    return {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 2e-2)
