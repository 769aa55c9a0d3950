"""The softmax rule: an attention that TransformerLens bridges without ``hook_pattern`` (a
hybrid that wraps every layer as a mixer, as NemotronH's bridge does) computes its pattern
inside the wrapped module; the softmax is frozen there as it is computed, so the layer is
``P · V`` with ``P`` a constant: linear in its input.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from lens_linear._validation import LinearizationError
from lens_linear.hooks.modules import ModuleHook
from lens_linear.hooks.sites import Site, wrapped
from lens_linear.hooks.values import replayed


class _SoftmaxFrozen(TorchFunctionMode):
    """Inside one attention module's forward: its softmax output recorded (record) or the
    recorded pattern substituted (replay)."""

    def __init__(
        self, key: str, store: dict[str, torch.Tensor], mode: str, factor: torch.Tensor | None
    ):
        super().__init__()
        self.key, self.store, self.mode, self.factor, self.calls = key, store, mode, factor, 0

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", None) != "softmax":  # F.softmax, torch.softmax, Tensor.softmax
            return out
        self.calls += 1
        if self.mode == "record":
            self.store[self.key] = out.detach()
            return self.store[self.key]
        return replayed(self.store[self.key], out, self.factor).to(out.dtype)


def softmax_hooks(
    model: Any,
    site: Site,
    store: dict[str, torch.Tensor],
    mode: str,
    factor: torch.Tensor | None = None,
) -> list[ModuleHook]:
    """Freeze the softmax of the attention module ``site.source`` (see :class:`_SoftmaxFrozen`).
    One softmax per call is required: an attention without one (a fused kernel such as SDPA)
    is refused."""
    module = wrapped(model.get_submodule(site.source))
    active: list[_SoftmaxFrozen] = []

    def enter(module: Any, args: Any) -> None:
        active.append(_SoftmaxFrozen(site.name, store, mode, factor))
        active[-1].__enter__()

    def leave(module: Any, args: Any, output: Any) -> None:
        frozen = active.pop()
        frozen.__exit__(None, None, None)
        if output is not None and frozen.calls != 1:
            raise LinearizationError(
                f"{site.source} computes its attention with {frozen.calls} softmax calls (one "
                f"expected), so its pattern cannot be frozen (a fused kernel such as SDPA has "
                f"none): load the model with attn_implementation='eager'.",
                layer=site.layer,
            )

    return [ModuleHook(module, enter, pre=True), ModuleHook(module, leave, always=True)]
