"""Detach hooks for ``run_with_hooks`` workflows.

With these hooks on, the forward output is unchanged and the gradient with respect to the
input embeddings follows a purely linear path: its Jacobian is the detached Jacobian J⁺.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch

from lens_linear._validation import require_tl_model
from lens_linear.hooks.freeze import site_hooks
from lens_linear.hooks.modules import ModuleHook
from lens_linear.hooks.run import Hook, hooks_on, run_to
from lens_linear.hooks.sites import INPUT_HOOK, PARTS, find_sites, output_hook


def detach_hooks(model: Any, parts: Sequence[str] = PARTS) -> list[Hook]:
    """``[(hook_name, fn)]`` that freeze norm scales, attention patterns and MLP gates.

    Pass them to ``model.run_with_hooks(tokens, fwd_hooks=...)`` after your own hooks: a
    hook you place on the same point runs first, and the frozen value is yours.

    Example:
        >>> logits = model.run_with_hooks(tokens, fwd_hooks=detach_hooks(model))
    """
    require_tl_model(model)
    hooks = site_hooks(model, find_sites(model, parts), {}, "record")
    inside = [h for h in hooks if isinstance(h, ModuleHook)]
    whole = [
        n
        for n, m in model.named_modules()
        if hasattr(m, "hook_pattern") and type(m).__name__ == "AttentionBridge"
    ]
    if inside or whole:
        raise ValueError(
            f"this model has coefficients TransformerLens' hook points do not reach in time "
            f"({'a mixture of experts' if inside else f'attention computed inside the wrapped module, {whole[0]}'}): "
            f"run_with_hooks cannot freeze them. Use `with lens_linear.detached(model): ...` instead."
        )
    return hooks


@contextlib.contextmanager
def detached(model: Any, parts: Sequence[str] = PARTS) -> Iterator[Any]:
    """Context manager: every forward inside runs with the detach hooks on.

    The hooks are removed on exit, also when an exception is raised inside.

    Example:
        >>> with detached(model):
        ...     logits = model(tokens)  # same values; gradients are those of J⁺
    """
    require_tl_model(model)
    hooks = site_hooks(model, find_sites(model, parts), {}, "record")
    with hooks_on(model, hooks):
        yield model


def detached_function(
    model: Any,
    tokens: torch.Tensor,
    hook: str | None = None,
    *,
    pos: int = -1,
    parts: Sequence[str] = PARTS,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x ↦ y``: the activation at ``hook[pos]`` as a function of the input variable
    (``blocks.0.hook_resid_pre``, shape ``[pos, d_model]``), with the detach hooks on.

    Hand it to any autograd tool (``torch.autograd.functional.jacobian``, ``torch.func``):
    its Jacobian at the model's own input is J⁺.
    """
    require_tl_model(model)
    hook = hook or output_hook(model)

    def fn(x: torch.Tensor) -> torch.Tensor:
        hooks = site_hooks(model, find_sites(model, parts), {}, "record")
        return run_to(model, tokens, hooks, inject=(INPUT_HOOK, x[None]), capture=[hook], pos=pos)[
            hook
        ][0].reshape(-1)

    return fn
