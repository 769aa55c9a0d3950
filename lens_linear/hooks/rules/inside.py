"""The rule for coefficients computed inside a wrapped module by functions TransformerLens has
no hook point for, frozen as they are computed (in the order the module computes them, the
same in every run):

* an attention bridged without ``hook_pattern`` (a hybrid that wraps every layer as a mixer,
  as NemotronH's bridge does; DeepSeek-V4's attention): every softmax (the pattern, and a
  compressor's pooling weights over a window of keys) and every top-k choice (a sparse
  indexer's) inside it, so the layer is linear in its input;
* a hyper-connection (DeepSeek-V4's ``attn_hc``, ``ffn_hc``, ``hc_head``): its ``pre``,
  ``post`` (sigmoids) and ``comb`` (softmax, then Sinkhorn steps on that constant) weights, so
  collapsing, expanding and mixing the residual streams is linear in them;
* RWKV's time mixing: the WKV recurrence's exponential weights (every ``exp``) and the
  receptance gate (``sigmoid``), so the recurrence's numerator is linear in the values and its
  denominator a constant; RWKV's channel mixing: ``relu`` and ``square`` as their ratios, the
  receptance gate a constant;
* an RG-LRU (recurrent Gemma): its input and recurrence gates (sigmoids), so the decay, the
  input's multiplier and the recurrence are constants and the unit linear in its input;
* a router that groups tokens by expert (JetMoE's): its top-k values and choices, so the
  grouping and the gates computed from them are constants;
* a gated MLP with a ``limit`` (DeepSeek-V4's shared experts, ``act(min(gate, limit)) ·
  clamp(up, ±limit)``): each clamp as its ratio ``clamp(t) / t``, frozen, so the MLP is
  linear in ``up`` once its gate is frozen (a ``gate`` site).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from lens_linear._validation import LinearizationError
from lens_linear.hooks.modules import ModuleHook, mode_while_running
from lens_linear.hooks.sites import Site, site_module
from lens_linear.hooks.values import frozen_linear, input_ratio, replayed, scaled

FROZEN = {
    "softmax": ("softmax", "topk"),
    "hyper": ("sigmoid", "softmax"),
    "clamp": ("clamp",),
    "wkv": ("exp", "sigmoid"),
    "channel": ("relu", "square", "sigmoid"),
    "rglru": ("sigmoid",),
    "choice": ("topk",),
}
# functions frozen as their ratio ``f(t) / t`` (the value where ``t`` is zero: ``f'(0)``)
RATIOS = {"clamp": 1.0, "relu": 0.0, "square": 0.0}


class _FrozenInside(TorchFunctionMode):
    """Inside one module's forward: the outputs of ``functions`` recorded (record) or the
    recorded values substituted (replay). The first under the site's name, the others under
    ``name#i``."""

    def __init__(
        self,
        key: str,
        functions: tuple[str, ...],
        store: dict[str, torch.Tensor],
        mode: str,
        factor: torch.Tensor | None,
    ):
        super().__init__()
        self.key, self.functions, self.store = key, functions, store
        self.mode, self.factor, self.calls = mode, factor, 0

    def _value(self, out: torch.Tensor, scale: bool = True) -> torch.Tensor:
        tag = self.key if self.calls == 0 else f"{self.key}#{self.calls}"
        self.calls += 1
        if self.mode == "record":
            self.store[tag] = out.detach()
            return scaled(self.store[tag], self.factor if scale else None)
        return replayed(self.store[tag], out, self.factor if scale else None).to(out.dtype)

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", None)
        if name not in self.functions:
            return out
        if name == "topk":  # a choice: values and indices as recorded (a factor scales values)
            return torch.return_types.topk((self._value(out[0]), self._value(out[1], False)))
        if name in RATIOS:  # f(t) = t · f(t)/t, the ratio frozen
            t = args[0]
            if self.mode == "replay":
                return t * self._value(t)
            ratio = self._value(input_ratio(out, t, RATIOS[name]), scale=False)
            return frozen_linear(out, t, ratio, self.factor)
        return self._value(out)


def inside_hooks(
    model: Any,
    site: Site,
    store: dict[str, torch.Tensor],
    mode: str,
    factor: torch.Tensor | None = None,
) -> list[ModuleHook]:
    """Freeze what :data:`FROZEN` names for ``site.kind`` inside the module ``site.source``
    (see :class:`_FrozenInside`). An attention must compute at least one softmax (a fused
    kernel such as SDPA has none: refused); a replay must meet the recorded calls."""

    def done(frozen: _FrozenInside) -> None:
        if site.kind == "softmax" and not frozen.calls:
            raise LinearizationError(
                f"{site.source} computes its attention without a softmax, so its pattern cannot "
                f"be frozen (a fused kernel such as SDPA has none): load the model with "
                f"attn_implementation='eager'.",
                layer=site.layer,
            )
        if mode == "replay" and f"{site.name}#{frozen.calls}" in store:
            raise LinearizationError(
                f"{site.source} computed fewer frozen values in this replay ({frozen.calls}) than "
                f"when recorded: its frozen values cannot be matched to this run.",
                layer=site.layer,
            )

    return mode_while_running(
        site_module(model, site.source),
        lambda: _FrozenInside(site.name, FROZEN[site.kind], store, mode, factor),
        done,
    )


def cuttable(site: Site, store: dict[str, torch.Tensor]) -> bool:
    """Whether a replay of the last positions alone can use this site's recorded values cut to
    them: not where an attention computed more than one softmax or a choice (a compressor
    pools windows of keys whose boundaries a shorter run would move), nor for a recurrence
    computed one position at a time (its values are per step, not per position)."""
    if site.kind in ("wkv", "rglru", "choice"):  # (an RG-LRU resets at a run's first position;
        return False  # a router's choices are over flattened tokens)
    return site.kind != "softmax" or f"{site.name}#1" not in store
