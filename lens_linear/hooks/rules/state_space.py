"""The state-space rule: a selective state-space mixer (Mamba, Mamba-2, the hybrids built on
them) or a gated delta rule (Qwen3-Next, Qwen3.5) computes its step sizes or decays, input and
output matrices (or keys and queries) and output gate from its input inside the wrapped module:
they are frozen there as they are computed, so the scan is linear in its input.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from lens_linear._validation import LinearizationError
from lens_linear.hooks.modules import ModuleHook, mode_while_running
from lens_linear.hooks.sites import layer_of, own_parameters, site_module, wrapped
from lens_linear.hooks.values import fit_to, frozen_linear, input_ratio, scaled


class _ScanFrozen(TorchFunctionMode):
    """Inside one selective state-space mixer's forward: ``y = out(scan_{Δ,B,C}(u) · act(z))``
    with ``u = act(conv(x))``. The scan is linear in ``u`` once its step sizes ``Δ``
    (``softplus``) and matrices ``B``, ``C`` (all parts but the first of the split that follows
    the convolution's activation) are constants; the convolution's activation is frozen as a
    ratio, like an MLP's (``u = conv · act(conv)/conv``); the output gate ``act(z)`` (the second
    activation) and the scale of a norm after it (``rsqrt``) are constants. Values are taken in
    the order the mixer computes them, the same in every run.

    A gated delta rule (Qwen3-Next, Qwen3.5) has the same steps: its split is ``[q, k, v]`` with
    the values last (``live=-1``), ``β = sigmoid(b)`` and the decay ``softplus`` are constants,
    and so is every ``rsqrt`` after that (q/k normalisation, the gated norm's scale): the state
    recurrence is then linear in ``v``."""

    def __init__(
        self,
        key: str,
        store: dict[str, torch.Tensor],
        mode: str,
        factor: torch.Tensor | None,
        live: int = 0,
    ):
        super().__init__()
        self.key, self.store, self.mode, self.factor, self.live = key, store, mode, factor, live
        self.acts = self.splits = self.steps = self.frozen = 0
        self.batch = 1

    def _value(self, out: torch.Tensor, computed: torch.Tensor, scale: bool = True) -> torch.Tensor:
        """``computed`` recorded (record) or the recorded value substituted (replay), times
        the factor (``scale``; in record mode the caller scales what it builds from it)."""
        tag = f"{self.key}#{self.frozen}"
        self.frozen += 1
        if self.mode == "record":
            self.store[tag] = computed.detach()
            self.store.setdefault(self.key, self.store[tag])
            return scaled(self.store[tag], self.factor) if scale else self.store[tag]
        return scaled(fit_to(self.store[tag], out, self.batch), self.factor)

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", None)
        if name == "silu":
            self.acts += 1
            if self.acts > 1:  # the output gate
                return self._value(out, out)
            x = args[0]
            self.batch = x.shape[0]  # the convolution's input, batch first
            if self.mode == "replay":  # (a replay reads the ratio recorded, computes none)
                return x * self._value(out, out)
            ratio = self._value(out, input_ratio(out, x, 0.5), scale=False)
            return frozen_linear(out, x, ratio, self.factor)
        if (
            name == "split" and self.acts == 1 and not self.splits
        ):  # [x or Δ's input, B, C] or [q, k, v]
            self.splits += 1
            live = self.live % len(out)
            return type(out)([o if j == live else self._value(o, o) for j, o in enumerate(out)])
        if name in ("softplus", "sigmoid") or (
            name == "rsqrt" and self.steps
        ):  # Δ or g, β; norm scales after
            self.steps += name == "softplus"
            return self._value(out, out)
        return out


def scan_hooks(
    model: Any,
    name: str,
    store: dict[str, torch.Tensor],
    mode: str,
    factor: torch.Tensor | None = None,
    source: str | None = None,
) -> list[ModuleHook]:
    """Freeze the selective state-space mixer whose bridge owns hook ``name`` (or, inside a
    block bridged whole, the module ``source``): a mode active only while the mixer's forward
    runs (see :class:`_ScanFrozen`). A mixer that does not compute these steps as PyTorch
    functions (a fused kernel) is refused."""
    bridge = site_module(model, source) if source else model.get_submodule(name.rsplit(".", 1)[0])
    delta = "D" not in own_parameters(
        wrapped(bridge)
    )  # a gated delta rule: [q, k, v], the values last
    component = (
        bridge if delta else wrapped(bridge)
    )  # (TransformerLens reimplements the delta rule)

    def done(frozen: _ScanFrozen) -> None:
        if (frozen.acts, frozen.splits, min(frozen.steps, 1)) != (2, 1, 1):
            raise LinearizationError(
                f"{source or name.rsplit('.', 1)[0]} is a selective state-space mixer whose forward ran {frozen.acts} "
                f"activations, {frozen.splits} B/C splits and {frozen.steps} softplus steps (2, 1 and at least 1 "
                f"expected): a fused kernel (mamba-ssm, causal-conv1d or a Hub kernel) computes it out of reach "
                f"of the freezing rule. Load the model without those kernels.",
                layer=layer_of(name),
            )

    return mode_while_running(
        component, lambda: _ScanFrozen(name, store, mode, factor, live=-1 if delta else 0), done
    )
