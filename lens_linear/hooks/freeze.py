"""The freezing hooks: one set per site, recording or replaying its coefficient.

``mode="record"`` detaches each coefficient at its value (the detached Jacobian: the output is
unchanged, the gradient linear) and stores it; ``mode="replay"`` substitutes the stored value
whatever the input (the frozen map). On TransformerLens' hook points the rules are here, per
kind of site (:mod:`lens_linear.hooks.sites`): a norm's scale and a gated MLP's gate are
replaced whole, a doubly gated convolution's gates are a slice of one projection, a plain
MLP's activation is ``pre · gate`` with the ratio ``gate = act(pre) / pre`` frozen. Attention
kept as queries and keys (:mod:`lens_linear.hooks.patterns`), mixtures of experts,
state-space mixers, attention without a pattern hook and hyper-connections
(:mod:`lens_linear.hooks.rules`) have rules of their own.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from typing import Any, Sequence

import torch

from lens_linear._validation import LinearizationError, tolerance
from lens_linear.hooks.modules import ModuleHook
from lens_linear.hooks.patterns import FrozenAttention, attention_hooks, recipe_tolerance
from lens_linear.hooks.rules.inside import FROZEN, inside_hooks
from lens_linear.hooks.rules.moe import moe_hooks
from lens_linear.hooks.rules.state_space import scan_hooks
from lens_linear.hooks.run import Hook
from lens_linear.hooks.sites import Site, activation_fn, site_module, slope_at_zero, wrapped
from lens_linear.hooks.values import frozen_linear, input_ratio, replayed, scaled
from lens_linear.tokens import model_dtype


def site_hooks(
    model: Any,
    sites: Sequence[Site],
    store: dict[str, torch.Tensor],
    mode: str,
    factors: dict[str, torch.Tensor] | None = None,
    frozen: dict[str, FrozenAttention] | None = None,
    max_memory: int | None = None,
) -> list[Hook]:
    """Hook functions that freeze every site.

    ``mode="record"``: detach each coefficient at its current value (the detached
    Jacobian) and store it. ``mode="replay"``: substitute the stored value, whatever the
    input; ``factors`` (site name → per-batch-element multiplier) perturbs chosen sites, to
    prove that each substitution reaches the output. The output value is unchanged in
    record mode. ``frozen`` (attention patterns kept as queries and keys,
    :mod:`lens_linear.hooks.patterns`): given in record mode, each pattern goes there where its
    recipe verifies instead of into ``store``; in replay mode, those layers attend through it.
    """
    factors = factors or {}
    hooks: list[Hook] = []
    for site in sites:
        special, before = None, len(hooks)
        if site.kind == "attn" and frozen is not None and (mode == "record" or site.name in frozen):
            special = attention_hooks(
                model,
                site.name,
                store,
                frozen,
                mode,
                factors.get(site.name),
                recipe_tolerance(model_dtype(model) or torch.float32),
                max_memory,  # sizes the blocks of pattern rows, from the recording on
            )
        if special is not None:
            hooks += special
        elif site.kind == "ratio":
            hooks += _ratio_hooks(model, site, store, mode, factors.get(site.name))
        elif site.kind == "norm" and site.source is not None:
            hooks += _rms_hooks(model, site, store, mode, factors.get(site.name))
        elif site.kind in ("act", "actgate", "layernorm", "rmsmodule"):
            module = site_module(model, site.source)
            rule = {
                "act": _act_ratio,
                "actgate": _act_constant,
                "layernorm": _layernorm_scale,
                "rmsmodule": _rms_scale,
            }[site.kind]
            fn = partial(rule, site=site, store=store, mode=mode, factor=factors.get(site.name))
            hooks.append(ModuleHook(module, fn))
        elif site.kind == "moe":
            hooks += moe_hooks(
                model, site.layer, site.name, store, mode, factors.get(site.name), site.source
            )
        elif site.kind in FROZEN:
            hooks += inside_hooks(model, site, store, mode, factors.get(site.name))
        elif site.kind == "scan":
            hooks += scan_hooks(model, site.name, store, mode, factors.get(site.name), site.source)
        elif site.kind == "slice":
            hooks.append(
                (
                    site.name,
                    partial(
                        _slice_hook,
                        site=site,
                        store=store,
                        mode=mode,
                        factor=factors.get(site.name),
                    ),
                )
            )
        else:
            hooks.append(
                (
                    site.name,
                    partial(
                        _whole_hook,
                        key=site.name,
                        store=store,
                        mode=mode,
                        factor=factors.get(site.name),
                    ),
                )
            )
        hooks[before:] = _within_block(model, site, hooks[before:])
    for hook in hooks:
        if not isinstance(hook, ModuleHook):
            hook[1].freezes = True  # such a run needs the model contexts (run.hooks_on)
    return hooks


def _within_block(model: Any, site: Site, hooks: list[Hook]) -> list[Hook]:
    """A module site inside a block bridged whole acts only while that block runs: a module
    the blocks share (Zamba2's shared transformer) has one site per block, each its own call."""
    if site.source is None or ":" not in site.source or site.layer is None:
        return hooks
    block = wrapped(model.blocks[site.layer])
    return [
        replace(h, within=block) if isinstance(h, ModuleHook) and h.within is None else h
        for h in hooks
    ]


def _whole_hook(
    value: torch.Tensor,
    hook: Any,
    key: str,
    store: dict[str, torch.Tensor],
    mode: str,
    factor: torch.Tensor | None,
) -> torch.Tensor:
    """A hook point's whole value frozen (a norm's scale, a pattern, a gate)."""
    if mode == "record":
        store[key] = value.detach()
        return scaled(store[key], factor)
    return replayed(store[key], value, factor)


def _slice_hook(
    value: torch.Tensor,
    hook: Any,
    site: Site,
    store: dict[str, torch.Tensor],
    mode: str,
    factor: torch.Tensor | None,
) -> torch.Tensor:
    """Freeze thirds ``site.frozen`` of the last dimension, keep the rest live."""
    third = value.shape[-1] // 3
    part = slice(site.frozen[0] * third, site.frozen[1] * third)
    if mode == "record":
        store[site.name] = value.detach()[..., part]
        frozen = scaled(store[site.name], factor)
    else:
        frozen = replayed(store[site.name], value[..., part], factor)
    return torch.cat([value[..., : part.start], frozen, value[..., part.stop :]], dim=-1)


def _act_ratio(
    module: Any,
    args: tuple,
    out: torch.Tensor,
    site: Site,
    store: dict[str, torch.Tensor],
    mode: str,
    factor: torch.Tensor | None,
) -> torch.Tensor:
    """An activation module's output ``act(z)`` as ``z · gate`` with ``gate = act(z) / z`` frozen
    (``act'(0)`` where ``z`` is zero)."""
    z = args[0]
    if mode == "replay":
        return z * replayed(store[site.name], z, factor)
    # the module's own forward, not the module: calling it would run this hook again
    slope = (
        slope_at_zero(lambda t: type(module).forward(module, t), z) if bool((z == 0).any()) else 0.0
    )
    store[site.name] = input_ratio(out, z, slope)
    return frozen_linear(out, z, store[site.name], factor)


def _act_constant(
    module: Any,
    args: tuple,
    out: torch.Tensor,
    site: Site,
    store: dict[str, torch.Tensor],
    mode: str,
    factor: torch.Tensor | None,
) -> torch.Tensor:
    """An activation module whose output gates another branch (``act(g) · u``): its output a
    constant, so the product is linear in ``u``."""
    if mode == "replay":
        return replayed(store[site.name], out, factor)
    store[site.name] = out.detach()
    return scaled(store[site.name], factor)


def _layernorm_scale(
    module: torch.nn.LayerNorm,
    args: tuple,
    out: torch.Tensor,
    site: Site,
    store: dict[str, torch.Tensor],
    mode: str,
    factor: torch.Tensor | None,
) -> torch.Tensor:
    """A LayerNorm module's ``(x − mean) · s · w + b`` with the row scale ``s`` frozen (the
    weight and bias read at each call: a bias-free replay sees its zeroed bias); the form is
    checked against the module's output."""
    x = args[0]
    centred = x - x.mean(-1, keepdim=True)
    w = 1 if module.weight is None else module.weight
    b = 0 if module.bias is None else module.bias
    if mode == "replay":
        return centred * replayed(store[site.name], x, factor) * w + b
    with torch.no_grad():
        scale = (centred.pow(2).mean(-1, keepdim=True) + module.eps).rsqrt()
        err = float((centred * scale * w + b - out).abs().max() / out.abs().max().clamp_min(1e-30))
    if err > tolerance(out.dtype):
        raise LinearizationError(
            f"{site.source} is not a LayerNorm (x − mean) · (var + ε)^-½ · w + b of its input (max "
            f"relative difference {err:.2e}): freezing its scale would hide a nonlinearity.",
            layer=site.layer,
            error=err,
        )
    store[site.name] = scale
    return frozen_linear(out, centred * scale * w, factor=factor)  # gradient: the frozen scale


def _rms_scale(
    module: Any,
    args: tuple,
    out: torch.Tensor,
    site: Site,
    store: dict[str, torch.Tensor],
    mode: str,
    factor: torch.Tensor | None,
) -> torch.Tensor:
    """An RMS norm module the bridge does not wrap, frozen on the module itself (see
    :func:`_rms_frozen`)."""
    return _rms_frozen(module, args[0], out, site, store, mode, factor)


def _rms_frozen(
    module: Any,
    x: torch.Tensor,
    out: torch.Tensor,
    site: Site,
    store: dict[str, torch.Tensor],
    mode: str,
    factor: torch.Tensor | None,
) -> torch.Tensor:
    """``x · s · g`` with the row scale ``s = (mean(x²) + ε)^-½`` frozen, the gain ``g`` read off
    the module (its weight, Gemma's ``1 + weight``, or none) as the one that reproduces its
    output: else refused."""
    if mode == "replay":
        return x * replayed(store[site.name], x, factor)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    weight = getattr(module, "weight", None)
    with torch.no_grad():
        if eps is None:
            raise LinearizationError(
                f"{site.name}: an RMS norm without an epsilon attribute (variance_epsilon, "
                f"eps): its scale cannot be recomputed to be frozen.",
                layer=site.layer,
            )
        wide = x.to(torch.promote_types(x.dtype, torch.float32))  # never a downcast
        scale = (wide.pow(2).mean(-1, keepdim=True) + eps).rsqrt()
        gains = [torch.ones((), dtype=wide.dtype, device=x.device)]
        if weight is not None:
            gains = [weight.to(wide), 1 + weight.to(wide)]
        errors = [float((wide * scale * g - out.to(wide)).abs().max()) for g in gains]
        best = min(range(len(gains)), key=errors.__getitem__)
        err = errors[best] / max(float(out.abs().max()), 1e-30)
        if err > tolerance(out.dtype):
            raise LinearizationError(
                f"{site.name} is not an RMS norm x · (mean(x²) + ε)^-½ · g of its input "
                f"(max relative difference {err:.2e}): freezing its scale would hide a "
                f"nonlinearity, so it is refused.",
                layer=site.layer,
                error=err,
            )
        coef = (scale * gains[best]).to(out.dtype)
    store[site.name] = coef
    return frozen_linear(out, x, coef, factor)


def _rms_hooks(
    model: Any,
    site: Site,
    store: dict[str, torch.Tensor],
    mode: str,
    factor: torch.Tensor | None = None,
) -> list[Hook]:
    """An RMS norm bridged without ``hook_scale``: its scale frozen between the component's
    ``hook_in`` and ``hook_out`` (:func:`_rms_frozen`)."""
    module = wrapped(model.get_submodule(site.name[: -len(".hook_out")]))
    live: dict[str, torch.Tensor] = {}

    def keep_in(value: torch.Tensor, hook: Any) -> None:
        live["x"] = value

    def freeze(out: torch.Tensor, hook: Any) -> torch.Tensor:
        return _rms_frozen(module, live.pop("x"), out, site, store, mode, factor)

    return [(site.source, keep_in), (site.name, freeze)]


def _ratio_hooks(
    model: Any,
    site: Site,
    store: dict[str, torch.Tensor],
    mode: str,
    factor: torch.Tensor | None = None,
) -> list[Hook]:
    act = activation_fn(model, site.layer) if site.layer is not None else None
    live: dict[str, torch.Tensor] = {}

    def keep_pre(value: torch.Tensor, hook: Any) -> None:
        live["pre"] = value

    def gate_post(post: torch.Tensor, hook: Any) -> torch.Tensor:
        pre = live.pop("pre", None)
        if (
            pre is not None
            and pre.shape[:-1] == post.shape[:-1]
            and pre.shape[-1] == 2 * post.shape[-1]
        ):
            return glu_split(pre, post)
        if mode == "replay":
            return pre * replayed(store[site.name], pre, factor)
        if pre is None or pre.shape != post.shape:
            raise LinearizationError(
                f"{site.name} is not an elementwise activation of {site.source} "
                f"(shapes {None if pre is None else tuple(pre.shape)} vs {tuple(post.shape)}); "
                f"this MLP (e.g. a mixture of experts) has no frozen-gate rule.",
                layer=site.layer,
            )
        if act is None:
            raise LinearizationError(
                f"cannot verify the activation of blocks.{site.layer}.mlp: no act_fn found on the "
                f"module (a mixture-of-experts block, say, whose router and expert gates have no "
                f"freezing rule), so freezing {site.name} as a gate could hide a nonlinearity.",
                layer=site.layer,
            )
        with torch.no_grad():
            expected = act(pre)
            err = float((expected - post).abs().max() / post.abs().max().clamp_min(1e-30))
            if err > tolerance(post.dtype):
                raise LinearizationError(
                    f"{site.name} is not act_fn({site.source}) (max relative difference {err:.2e}); "
                    f"the gate rule would hide a nonlinearity, so it is refused.",
                    layer=site.layer,
                    error=err,
                )
        store[site.name] = input_ratio(post, pre, slope_at_zero(act, pre))
        return frozen_linear(post, pre, store[site.name], factor)

    def glu_split(pre: torch.Tensor, post: torch.Tensor) -> torch.Tensor:
        """A GLU inside one projection (ModernBERT-decoder): ``pre = [a, b]``,
        ``post = act(a) · b``: ``act(a)`` frozen (as a gated MLP's gate is), linear in ``b``."""
        a, b = pre.chunk(2, dim=-1)
        if mode == "replay":
            return b * replayed(store[site.name], b, factor)
        if act is None:
            raise LinearizationError(
                f"cannot verify the activation of blocks.{site.layer}.mlp: no act_fn found on the "
                f"module, so freezing {site.name} as a GLU could hide a nonlinearity.",
                layer=site.layer,
            )
        with torch.no_grad():
            gate = act(a)
            err = float((gate * b - post).abs().max() / post.abs().max().clamp_min(1e-30))
        if err > tolerance(post.dtype):
            raise LinearizationError(
                f"{site.name} is not act({site.source}[:half]) · {site.source}[half:] (max "
                f"relative difference {err:.2e}); the GLU rule would hide a nonlinearity, so it "
                f"is refused.",
                layer=site.layer,
                error=err,
            )
        store[site.name] = gate
        return frozen_linear(post, b, gate, factor)

    return [(site.source, keep_pre), (site.name, gate_post)]
