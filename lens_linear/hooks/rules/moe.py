"""The mixture-of-experts rule: router outputs and each selected expert's gate, frozen inside
the wrapped Hugging Face block, where TransformerLens has no hook point.

The router's outputs (weights and choices) are recorded whole, so a replay routes every token
as recorded; each selected expert's gate pre-activation is recorded as the per-expert loop
visits it (:func:`lens_linear.hooks.contexts.experts_eager` makes Hugging Face run that loop),
so ``act(gate)`` is a constant and ``act(gate) · up`` linear; a clamped SwiGLU computed inline
(gpt-oss: ``glu(gate) · (clamp(up) + 1)``) has its ``glu`` and its clamp's ratio frozen, the
``+ 1`` a constant of the projection's bias; non-gated experts ``act(up x)`` (NemotronH) have
the activation's ratio ``act(z)/z`` frozen instead. A shared expert's scalar gate and the
activation of a gated shared expert TransformerLens does not bridge are constants too (a
non-gated one's ratio is frozen).
"""

from __future__ import annotations

from typing import Any

import torch

from lens_linear._compat import original_component
from lens_linear._validation import LinearizationError, tolerance
from lens_linear.hooks.contexts import bias_zeroed
from lens_linear.hooks.modules import ModuleHook
from lens_linear.hooks.sites import is_sorting_router, slope_at_zero, wrapped
from lens_linear.hooks.values import fit_positions, frozen_linear, input_ratio, scaled

ROUTERS = ("gate", "router")  # the HF child that computes routing weights and choices
SHARED_GATES = ("shared_expert_gate",)  # a scalar gate on the shared expert: sigmoid(linear(x))
SHARED_EXPERTS = ("shared_expert", "shared_experts", "shared_mlp")


def moe_hooks(
    model: Any,
    layer: int,
    key: str,
    store: dict[str, torch.Tensor],
    mode: str,
    factor: torch.Tensor | None = None,
    component: str | None = None,
) -> list[ModuleHook]:
    """Freeze one mixture-of-experts block: the router's outputs (weights and choices, so the
    replay routes every token as recorded), each selected expert's gate pre-activation (so
    ``act(gate)`` is a constant and ``act(gate) · up`` linear), and a shared expert's scalar
    gate. ``mode="record"`` stores them under ``key`` (detached); ``"replay"`` substitutes
    them for any batch, or for the last positions alone. Shared experts that TransformerLens
    bridges as gated MLPs are ``gate`` sites of their own; the load-balancing path is untouched.
    ``component``: the block's path where it is not ``blocks.{layer}.mlp`` (a hybrid layer's
    ``moe``)."""
    block = wrapped(model.get_submodule(component) if component else model.blocks[layer].mlp)
    router = next(
        (
            wrapped(getattr(block, n))
            for n in ROUTERS
            if isinstance(getattr(block, n, None), torch.nn.Module)
        ),
        None,
    )
    if router is not None and is_sorting_router(router):
        return _sorted_experts_hooks(block, router, layer, key, store, mode, factor)
    experts = wrapped(getattr(block, "experts", None))
    act = getattr(experts, "act_fn", None)
    inline = clamped_swiglu(experts)
    if router is None or not (callable(act) or inline):
        raise LinearizationError(
            f"blocks.{layer}.mlp is a mixture of experts without a router module ({', '.join(ROUTERS)}) or "
            f"an expert activation (an experts.act_fn module, or a clamped SwiGLU computed inline "
            f"by experts._apply_gate): no freezing rule for its gates.",
            layer=layer,
        )
    live: dict[str, Any] = {}
    # the projection bias the inline unit's ``+ 1`` belongs to, as held outside the forward
    # (inside a bias-free one the module's attribute is the substituted zero)
    own_bias = getattr(experts, "gate_up_proj_bias", None)

    def block_pre(module: Any, args: tuple) -> None:
        live["n_pos"] = args[0].shape[-2] if args else None

    def constant(name: str) -> Any:  # a whole module output, frozen (tuple outputs element-wise)
        def hook(module: Any, args: tuple, output: Any) -> Any:
            outs = output if isinstance(output, tuple) else (output,)
            if mode == "record":
                for j, o in enumerate(outs):
                    if torch.is_tensor(o):
                        store[f"{key}#{name}{j}"] = o.detach()
                frozen = tuple(
                    scaled(store[f"{key}#{name}{j}"], factor) if torch.is_tensor(o) else o
                    for j, o in enumerate(outs)
                )
            else:
                frozen = tuple(
                    scaled(fit_positions(store[f"{key}#{name}{j}"], o, live["n_pos"]), factor)
                    if torch.is_tensor(o)
                    else o
                    for j, o in enumerate(outs)
                )
            return frozen if isinstance(output, tuple) else frozen[0]

        return hook

    def experts_pre(
        module: Any, args: tuple
    ) -> None:  # the rows of each expert call, as the loop visits them
        if len(args) < 2:  # every expert on every (router-scaled) token at once: no loop
            live["rows"] = None
            return
        index = args[1]
        mask = torch.nn.functional.one_hot(index, num_classes=module.num_experts + 1).permute(
            2, 1, 0
        )
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        live["rows"] = [torch.where(mask[e[0]]) for e in hit if e[0] != module.num_experts]
        live["call"], live["top_k"] = 0, index.shape[-1]

    def gate_pre(module: Any, args: tuple) -> tuple:
        if live.get("rows") is None:
            return dense_gate(args[0])
        slot, token = live["rows"][live["call"]]
        live["call"] += 1
        gate = args[0]
        if mode == "record":
            if live["call"] == 1:
                store[key] = gate.new_zeros(live["n_pos"], live["top_k"], gate.shape[-1])
            store[key][token, slot] = gate.detach()
            return (scaled(gate.detach(), factor),)
        recorded = store[key]
        n_pos = live["n_pos"]
        return (scaled(recorded[recorded.shape[0] - n_pos + token % n_pos, slot], factor),)

    def dense_gate(gate: torch.Tensor) -> tuple:
        """Experts run as one batched product over ``[expert, token, ·]`` (Llama 4: each token
        scaled by its router score, zero for experts not chosen): the whole gate frozen, tokens
        batch-major, so a replay takes the last positions' rows for each prompt."""
        if mode == "record":
            store[key] = gate.detach()
            return (scaled(store[key], factor),)
        recorded, n_pos = store[key], live["n_pos"]
        rows = recorded[:, recorded.shape[1] - n_pos :]
        return (scaled(rows.repeat(1, gate.shape[1] // n_pos, 1), factor),)

    def gated_unit(module: Any, args: tuple, original: Any) -> torch.Tensor:
        """``glu(gate) · (clamp(up) + shift)`` frozen: ``glu`` a constant, the clamp as its
        ratio ``clamp(up) / up`` (1 inside the limit), gpt-oss's ``+ 1`` a constant of the
        projection's bias (gone where that bias is zeroed): linear in ``up``, and the model's
        value at ``x*``."""
        slot, token = live["rows"][live["call"]]
        live["call"] += 1
        (gate_up,) = args
        if mode == "record":
            out = original(gate_up)
            glu, up, ratio, expected = inline(gate_up)
            with torch.no_grad():
                err = float((expected - out).abs().max() / out.abs().max().clamp_min(1e-30))
            if err > tolerance(out.dtype):
                raise LinearizationError(
                    f"blocks.{layer}.mlp.experts._apply_gate is not the clamped SwiGLU "
                    f"glu(gate) · (clamp(up) + {inline.shift:g}) (max relative difference {err:.2e}): its "
                    f"freezing rule would hide a nonlinearity, so it is refused.",
                    layer=layer,
                    error=err,
                )
            if live["call"] == 1:
                store[key] = gate_up.new_zeros(live["n_pos"], live["top_k"], gate_up.shape[-1])
            store[key][token, slot] = torch.cat([glu, ratio], -1).detach()
            linear = glu.detach() * ratio.detach() * up
            return frozen_linear(out, linear, factor=factor)
        recorded = store[key]
        frozen = recorded[recorded.shape[0] - live["n_pos"] + token % live["n_pos"], slot]
        glu, ratio = scaled(frozen, factor).chunk(2, -1)
        up = inline.up(gate_up)  # (a replay needs no unit, no clamp)
        shift = 0.0 if own_bias is None or bias_zeroed(model, own_bias) else inline.shift
        return glu * (ratio * up + shift)

    def plain_unit(module: Any, args: tuple, original: Any) -> torch.Tensor:
        """A non-gated expert ``down(act(up x))`` (NemotronH): ``act(z) = z · act(z)/z`` with
        the ratio frozen (``act'(0)`` where ``z`` is zero), as a plain MLP's is."""
        if live.get("rows") is None:
            raise LinearizationError(
                f"blocks.{layer}: non-gated experts run as one batched product: no freezing "
                f"rule for their activation.",
                layer=layer,
            )
        slot, token = live["rows"][live["call"]]
        live["call"] += 1
        (z,) = args
        if mode == "replay":
            recorded = store[key]
            ratio = recorded[recorded.shape[0] - live["n_pos"] + token % live["n_pos"], slot]
            return z * scaled(ratio, factor)
        out = original(z)
        ratio = _ratio(out, z, original)
        if live["call"] == 1:
            store[key] = z.new_zeros(live["n_pos"], live["top_k"], z.shape[-1])
        store[key][token, slot] = ratio
        return frozen_linear(out, z, ratio, factor)

    if inline:
        gates = ModuleHook(experts, gated_unit, attribute="_apply_gate", around=True)
    elif not gated_experts(experts):
        gates = ModuleHook(experts, plain_unit, attribute="act_fn", around=True)
    elif isinstance(act, torch.nn.Module):
        gates = ModuleHook(act, gate_pre, pre=True)
    else:
        gates = ModuleHook(experts, gate_pre, attribute="act_fn")
    hooks = [
        ModuleHook(block, block_pre, pre=True),
        ModuleHook(router, constant("router")),
        ModuleHook(experts, experts_pre, pre=True),
        gates,
    ]
    for name in SHARED_GATES:
        if isinstance(getattr(block, name, None), torch.nn.Module):
            hooks.append(ModuleHook(wrapped(getattr(block, name)), constant(name)))
    for name in SHARED_EXPERTS:  # a shared expert TransformerLens does not bridge: its activation
        shared = getattr(block, name, None)
        shared_act = getattr(shared, "act_fn", None)
        if original_component(shared) is None and isinstance(shared_act, torch.nn.Module):
            if "gate_proj" in dict(shared.named_children()):  # act(gate x) · up x: act constant
                hooks.append(
                    ModuleHook(
                        shared_act,
                        _constant_input(f"{key}#{name}", store, mode, factor, live),
                        pre=True,
                    )
                )
            else:  # down(act(up x)): the activation's ratio frozen
                hooks.append(
                    ModuleHook(
                        shared_act, _ratio_output(f"{key}#{name}", store, mode, factor, live)
                    )
                )
    return hooks


def gated_experts(experts: Any) -> bool:
    """Whether the experts are gated units ``act(gate x) · up x`` (a parameter named for the
    gate, ``gate_up_proj`` or ``gate_proj``) rather than ``act(up x)`` (NemotronH's); experts
    held as modules of their own count as gated, as before."""
    names = [n for n, _ in experts.named_parameters(recurse=False)]
    return not names or any("gate" in n for n in names)


def _ratio(out: torch.Tensor, z: torch.Tensor, act: Any) -> torch.Tensor:
    """``act(z) / z``, with ``act'(0)`` where ``z`` is zero (detached)."""
    return input_ratio(out, z, slope_at_zero(act, z) if bool((z == 0).any()) else 0.0)


def _ratio_output(
    key: str,
    store: dict[str, torch.Tensor],
    mode: str,
    factor: torch.Tensor | None,
    live: dict[str, Any],
) -> Any:
    """A non-gated shared expert's activation as ``z · act(z)/z``, the ratio frozen."""

    def hook(module: Any, args: tuple, out: torch.Tensor) -> torch.Tensor:
        z = args[0]
        if mode == "replay":
            return z * scaled(fit_positions(store[key], z, live["n_pos"]), factor)
        # the module's own forward, not the module: calling it would run this hook again
        store[key] = _ratio(out, z, lambda t: type(module).forward(module, t))
        return frozen_linear(out, z, store[key], factor)

    return hook


def clamped_swiglu(experts: Any) -> Any:
    """The parts of a clamped SwiGLU that ``experts._apply_gate`` computes inline, found by
    inspection, in one of two forms: gpt-oss's (``gate, up`` interleaved in ``gate_up``,
    ``glu = g · σ(α g)`` with ``g = min(gate, limit)``, output ``glu · (clamp(up, ±limit) + 1)``)
    or DeepSeek-V4's (``gate, up`` its halves, ``glu = act(min(gate, limit))``, output
    ``glu · clamp(up, ±limit)``). Returns ``gate_up ↦ (glu, up, clamp(up) / up, output)`` with
    the form's constant shift (1 or 0), or ``None`` for any other experts module; the
    recording checks the output against the module's own."""
    alpha, limit = getattr(experts, "alpha", None), getattr(experts, "limit", None)
    if not (callable(getattr(experts, "_apply_gate", None)) and limit):
        return None
    act = getattr(experts, "act_fn", None)
    if alpha is not None and hasattr(experts, "gate_up_proj_bias"):
        shift = 1.0

        def halves(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return gate_up[..., ::2], gate_up[..., 1::2]

        def glu(g: torch.Tensor) -> torch.Tensor:
            return g * torch.sigmoid(g * alpha)

    elif alpha is None and callable(act):
        shift = 0.0

        def halves(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            gate, up = gate_up.chunk(2, dim=-1)
            return gate, up

        glu = act
    else:
        return None

    def parts(gate_up: torch.Tensor) -> tuple[torch.Tensor, ...]:
        gate, up = halves(gate_up)
        unit = glu(gate.clamp(max=limit))
        clamped = up.clamp(-limit, limit)
        return unit, up, input_ratio(clamped, up, 1.0), unit * (clamped + shift)

    parts.shift = shift  # type: ignore[attr-defined]
    parts.up = lambda gate_up: halves(gate_up)[1]  # type: ignore[attr-defined]
    return parts


def _constant_input(
    key: str,
    store: dict[str, torch.Tensor],
    mode: str,
    factor: torch.Tensor | None,
    live: dict[str, Any],
) -> Any:
    def hook(module: Any, args: tuple) -> tuple:
        if mode == "record":
            store[key] = args[0].detach()
            return (scaled(store[key], factor),)
        return (scaled(fit_positions(store[key], args[0], live["n_pos"]), factor),)

    return hook


def _sorted_experts_hooks(
    block: Any,
    router: Any,
    layer: int,
    key: str,
    store: dict[str, torch.Tensor],
    mode: str,
    factor: torch.Tensor | None,
) -> list[ModuleHook]:
    """Experts run on tokens grouped by expert (JetMoE): ``act(g) · u`` per row, its rows in the
    router's order (``index_sorted_experts``, indices into the flattened ``[token, slot]``).
    ``act(g)`` is frozen in ``[token, slot]`` order, so a replay of any batch (whole prompts:
    the router's choices make such a map uncuttable) reads each row's own value."""
    act = getattr(block, "activation", None)
    if not isinstance(act, torch.nn.Module):
        raise LinearizationError(
            f"blocks.{layer}.mlp groups its tokens by expert without an activation module: no "
            f"freezing rule for its gates.",
            layer=layer,
        )
    live: dict[str, torch.Tensor] = {}

    def order(module: Any, args: tuple, output: Any) -> None:
        live["order"] = output[0]

    def gate(module: Any, args: tuple, out: torch.Tensor) -> torch.Tensor:
        rows = live["order"]
        if mode == "record":
            frozen = out.new_zeros(rows.numel(), out.shape[-1])
            frozen[rows] = out.detach()
            store[key] = frozen
            return scaled(frozen[rows], factor)
        recorded = store[key]
        return scaled(recorded[rows % recorded.shape[0]], factor)

    return [ModuleHook(router, order), ModuleHook(act, gate)]
