"""Where a model's nonlinear coefficients live, found from its hook names alone.

Every nonlinearity is written ``A(x) · x``; a *site* is the hook point that carries a
coefficient ``A``. One rule per kind serves every architecture:

* ``norm``  — every ``*.hook_scale`` (LayerNorm/RMSNorm scale, incl. q/k norms, ``ln_final``);
  an RMS norm bridged without one (Gemma 4) has its scale frozen between its component's
  ``hook_in`` and ``hook_out``.
* ``attn``  — every ``*.hook_pattern`` (the softmax output).
* ``gate``  — a gated MLP (it has ``mlp.hook_pre_linear``; a mixture's shared experts
  too): ``mlp.hook_pre``, the gate's pre-activation, so ``act(hook_pre)`` becomes a constant;
  likewise a gated attention's output gate (``attn.hook_q_gate``, Qwen3-Next).
* ``slice`` — a token mixer's gates inside one projection: a doubly gated short convolution
  ``C · conv(B · x)`` (LFM2; its ``conv.hook_in_proj`` holds ``[B, C, x]``): ``B`` and ``C``
  frozen, so the convolution is linear in ``x``.
* ``scan``  — a state-space mixer (a module with the decay ``A_log`` and the skip ``D`` of a
  Mamba scan or the ``dt_bias`` of a gated delta rule; the site is its bridge's
  ``hook_ssm_state``, or ``hook_in`` where the bridge has no other): step sizes,
  input/output matrices, output gate and the convolution's activation ratio, frozen inside
  the wrapped module (:mod:`lens_linear.hooks.rules.state_space`), so the scan is linear in
  its input.
* ``moe``   — a mixture of experts (it has ``mlp.hook_router_scores``): the router's outputs
  (weights and choices) and each selected expert's gate, frozen inside the wrapped module
  (:mod:`lens_linear.hooks.rules.moe`), where TransformerLens has no hook point.
* ``act``   — an activation module the block calls itself, outside its MLP (Gemma 4's per-layer
  input gate ``act(W x) · p``, ``p`` the layer's per-layer input): frozen as its ratio
  ``act(z) / z`` inside the wrapped block, so the branch is linear in ``x``.
  A prediction head between the final norm and the unembedding (ModernBERT-decoder's dense,
  activation, LayerNorm) has its activation frozen so, and its ``layernorm`` the scale.
* ``rmsmodule`` — an RMS norm inside attention or an MLP that the bridge does not wrap
  (BitNet's sub-norms): its scale frozen on the module (norms on queries and keys are left to
  the frozen pattern). An attention output gate computed inline from a bridged projection
  (``gate_proj``/``g_proj``: AFMoE, Laguna) is a ``gate`` site on that projection's output.
* ``softmax`` — an attention bridged without ``hook_pattern``: as a hybrid's mixer (NemotronH;
  its mixture-of-experts and MLP layers are ``moe`` and ``act`` sites on the mixer too) or with
  compressed keys chosen by an indexer (DeepSeek-V4): every softmax and top-k choice computed
  inside the wrapped module frozen there (:mod:`lens_linear.hooks.rules.inside`).
* ``clamp`` — a gated MLP with a ``limit`` (DeepSeek-V4's shared experts clamp gate and up):
  each clamp's ratio frozen inside the module (:mod:`lens_linear.hooks.rules.inside`).
* module sites in a block the bridge wraps whole (no hook point inside: recurrent Gemma,
  Zamba2's hybrid layers): ``softmax`` on an attention, ``scan`` on a Mamba mixer, ``rglru``
  on an RG-LRU (its gates frozen), ``rmsmodule`` on an
  RMS norm, ``actgate`` on an activation whose output gates another branch (a gated MLP's,
  Griffin's recurrent block's: the output frozen), ``act`` on any other activation (ratio).
* ``wkv``, ``channel`` — RWKV's time mixing (a module with ``time_decay`` and
  ``time_first``) and channel mixing (``time_mix_key`` alone): the recurrence's exponential
  weights and the receptance gates frozen, ``relu`` and ``square`` as ratios.
* ``choice`` — a router that groups tokens by expert (JetMoE's, in its MLP and its mixture of
  attention heads): its top-k frozen inside it.
* ``hyper`` — a hyper-connection (a module with ``hc_mult`` residual streams, DeepSeek-V4): its
  stream weights (sigmoids, a softmax and Sinkhorn steps) frozen inside the module.
* ``ratio`` — a non-gated MLP: the activation output (``mlp.hook_mid`` where the MLP has
  its own norm after the activation, as SoLU does, else ``mlp.hook_post``) is replaced by
  ``pre · gate`` with ``gate = act(pre) / pre`` frozen. Only valid where the output really
  is ``act_fn(pre)``; that is checked on every forward.

The map's input and output are hook names too: :data:`INPUT_HOOK` (the input embeddings at
every position) and :func:`output_hook` (the final-normed residual).
"""

from __future__ import annotations

import inspect
import re
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from lens_linear._compat import original_component
from lens_linear._validation import LinearizationError
from lens_linear.hooks.guard import held
from lens_linear.hooks.modules import structure

INPUT_HOOK = "blocks.0.hook_resid_pre"
PARTS = ("norm", "attn", "mlp", "mixer")
_LAYER = re.compile(r"^blocks\.(\d+)\.")
# an MLP's pre-activation: ``mlp``, a shared expert inside it, a hybrid layer's ``moe`` and
# ``shared_mlp`` (GraniteMoE-hybrid)
MLP_HOOK = re.compile(r"(\.mlp\..*|\.moe\.|\.shared_mlp\.)hook_pre$")


@dataclass(frozen=True)
class Site:
    """One frozen coefficient: the hook it lives on, its kind and block index."""

    name: str
    kind: str  # norm layernorm rmsmodule attn softmax hyper clamp wkv channel rglru choice gate ratio act actgate moe slice scan
    layer: int | None
    # ratio sites, unscaled norms: the hook holding the input; act and layernorm sites: the
    # module, as "component:attribute" of the wrapped module
    source: str | None = None
    frozen: tuple[int, int] | None = None  # slice sites: the frozen part of the last dim, in thirds


def output_hook(model: Any) -> str:
    """The final-normed residual: the unembedding's input (the predicted output embedding)."""
    for name in ("unembed.hook_in", "ln_final.hook_normalized"):
        if name in hook_points(model):
            return name
    return f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"


def block_outputs(model: Any) -> list[str]:
    """Each block's output: its ``hook_resid_post``, or its ``hook_out`` where it has no
    residual stream of its own (DeepSeek-V4's blocks output ``hc_mult`` streams)."""
    names = hook_points(model)
    return [
        f"blocks.{layer}.hook_resid_post"
        if f"blocks.{layer}.hook_resid_post" in names
        else f"blocks.{layer}.hook_out"
        for layer in range(model.cfg.n_layers)
    ]


def layer_of(name: str) -> int | None:
    match = _LAYER.match(name)
    return int(match.group(1)) if match else None


def hook_points(model: Any) -> dict[str, Any]:
    """``model.hook_dict``, read once per call that holds the model (a bridge rebuilds its
    aliases at every read)."""
    return held(model, "hook_dict", lambda: model.hook_dict)


_SITES: "weakref.WeakKeyDictionary[Any, dict[tuple, list[Site]]]" = weakref.WeakKeyDictionary()


def find_sites(model: Any, parts: Sequence[str] = PARTS) -> list[Site]:
    """All coefficient sites of ``model`` for the requested parts, in forward order; found
    once per model and set of parts, again once its structure changes (a module added,
    replaced or removed)."""
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    key = (structure(model), tuple(parts))
    cached = _SITES.get(model)
    if cached is None or key not in cached:
        cached = _SITES[model] = {key: _find_sites(model, parts)}  # an old structure's go
    return list(cached[key])


def _find_sites(model: Any, parts: Sequence[str]) -> list[Site]:
    if not isinstance(getattr(model, "blocks", None), torch.nn.ModuleList):
        stacks = [n for n, m in model.named_children() if isinstance(m, torch.nn.ModuleList)]
        raise LinearizationError(
            f"this model has no single stack of blocks (`blocks`; its bridge has "
            f"{', '.join(stacks) or 'none'}): the map's input, block outputs and sites are "
            f"defined per block of one stack, so a model run as several stacks (HRM's two, "
            f"iterated in cycles) is refused."
        )
    names = hook_points(model)
    seen: set[int] = set()
    sites: list[Site] = []

    def add_module_site(site: Site) -> None:
        if site.name not in {s.name for s in sites}:
            sites.append(site)

    def add(
        name: str, kind: str, source: str | None = None, frozen: tuple[int, int] | None = None
    ) -> None:
        if id(names[name]) not in seen:  # a bridge lists one hook point under several aliases
            seen.add(id(names[name]))
            sites.append(Site(name, kind, layer_of(name), source, frozen))

    for name in names:
        if (
            "mixer" in parts
            and name.endswith("conv.hook_in_proj")
            and name[: -len("in_proj")] + "gated" in names
        ):
            add(
                name, "slice", frozen=(0, 2)
            )  # a doubly gated convolution C·conv(B·x): B, C = thirds 1-2
        elif (
            "mixer" in parts
            and name.endswith((".hook_ssm_state", ".hook_in"))
            and is_state_space(model, name)
        ):
            prefix = name.rsplit(".", 1)[
                0
            ]  # one site per mixer, on hook_ssm_state where the bridge has it
            add(prefix + ".hook_ssm_state" if prefix + ".hook_ssm_state" in names else name, "scan")
        elif "norm" in parts and name.endswith("hook_scale"):
            if not wraps_identity(
                model, name
            ):  # a norm slot the layer leaves empty (ModernBERT's first)
                add(name, "norm")
        elif (
            "norm" in parts and name.endswith(".hook_out") and unscaled_rms_norm(model, name, names)
        ):
            add(name, "norm", source=name[: -len("hook_out")] + "hook_in")
        elif "attn" in parts and name.endswith("hook_pattern"):
            add(name, "attn")
        elif "attn" in parts and name.endswith(
            "attn.hook_q_gate"
        ):  # a gated attention's output gate
            add(name, "gate")
        elif "mlp" in parts and MLP_HOOK.search(name):
            prefix = name[: -len("hook_pre")]
            if prefix + "hook_pre_linear" in names:  # a gated MLP, shared experts' included
                add(name, "gate")
                component = prefix[:-1]
                inner = wrapped(model.get_submodule(component))
                if getattr(inner, "limit", None) and not hasattr(inner, "alpha"):
                    add(prefix + "hook_out", "clamp", source=component)  # its clamps' ratios
            elif not name.endswith(("mlp.hook_pre", ".moe.hook_pre")):
                continue  # inside an MLP: only a gated shared expert is a site of its own
            elif (
                prefix + "hook_router_scores" in names
            ):  # a mixture of experts: router and expert gates (a hybrid layer's ``moe`` too)
                add(prefix + "hook_router_scores", "moe", source=prefix[:-1])
            else:
                out = prefix + "hook_mid" if prefix + "hook_mid" in names else prefix + "hook_post"
                if out in names:
                    add(out, "ratio", source=name)
    if "mlp" in parts:  # an activation the block itself calls, outside its MLP (Gemma 4)
        for layer, block in enumerate(model.blocks):
            name = f"blocks.{layer}.per_layer_input_gate.hook_out"
            if name in names and isinstance(
                getattr(wrapped(block), "act_fn", None), torch.nn.Module
            ):
                add(name, "act", source=f"blocks.{layer}:act_fn")
    for layer, block in enumerate(model.blocks):
        # a hybrid that bridges every layer as a mixer (NemotronH): a layer that is not a scan
        # is a mixture of experts, a plain MLP or an attention, by what its module holds
        name = f"blocks.{layer}.mixer.hook_out"
        kind = mixer_kind(getattr(block, "mixer", None)) if name in names else None
        if kind == "moe" and "mlp" in parts:
            add(name, "moe", source=f"blocks.{layer}.mixer")
        elif kind == "act" and "mlp" in parts:
            add(name, "act", source=f"blocks.{layer}.mixer:act_fn")
        elif kind == "softmax" and "attn" in parts:
            add(name, "softmax", source=f"blocks.{layer}.mixer")
        # an attention bridged without hook_pattern (DeepSeek-V4's): its softmax frozen inside
        name = f"blocks.{layer}.attn.hook_out"
        if (
            "attn" in parts
            and name in names
            and f"blocks.{layer}.attn.hook_pattern" not in names
            and is_attention(getattr(block, "attn", None))
        ):
            add(name, "softmax", source=f"blocks.{layer}.attn")
        for child_name, child in block.named_children():
            name, source = f"blocks.{layer}.{child_name}.hook_out", f"blocks.{layer}.{child_name}"
            inner = wrapped(child)
            if name not in names or not isinstance(inner, torch.nn.Module):
                continue
            own = own_parameters(inner)
            if "mlp" in parts and hasattr(inner, "hc_mult"):  # a hyper-connection's weights
                add(name, "hyper", source=source)
            elif "mixer" in parts and {"time_decay", "time_first"} <= own:  # RWKV time mixing
                add(name, "wkv", source=source)
            elif "mlp" in parts and "time_mix_key" in own:  # RWKV channel mixing
                add(name, "channel", source=source)
    for layer, block in enumerate(model.blocks):
        for part, component in (("norm", "attn"), ("norm", "mlp"), ("attn", "attn")):
            inner = wrapped(getattr(block, component, None))
            if part not in parts or not isinstance(inner, torch.nn.Module):
                continue
            for child_name, child in inner.named_children():
                if (
                    part == "norm"
                    and is_plain_rms_norm(child)
                    and original_component(child) is None
                    and not child_name.startswith(QK_NORMS)
                ):
                    # an RMS norm the bridge does not wrap (BitNet's sub-norms): frozen on the module
                    sites.append(
                        Site(
                            f"blocks.{layer}.{component}.{child_name}",
                            "rmsmodule",
                            layer,
                            f"blocks.{layer}.{component}:{child_name}",
                        )
                    )
                elif (
                    part == "attn"
                    and child_name in OUTPUT_GATES
                    and original_component(child) is not None
                ):
                    # an attention output gate act(W x) · z computed inline: W x frozen
                    hook = getattr(child, "hook_out", None)
                    if hook is not None and getattr(hook, "name", None) in names:
                        add(hook.name, "gate")
    inside = {  # blocks with a component of their own (a hook point inside them)
        layer_of(n) for n in names if n.startswith("blocks.") and n.count(".") > 2
    }
    for layer, block in enumerate(model.blocks):
        if layer not in inside:  # bridged whole: rules on the modules inside
            for site in module_sites(block, layer, parts):
                add_module_site(site)
    for name in names:  # a router grouping tokens by expert (JetMoE's, in its MLP and attention)
        if "mlp" in parts and name.endswith(("router.hook_out", "gate.hook_out")):
            component = name[: -len(".hook_out")]
            if is_sorting_router(wrapped(model.get_submodule(component))):
                add(name, "choice", source=component)
    if "mlp" in parts and "hc_head.hook_out" in names:  # the final collapse of hyper-connections
        add("hc_head.hook_out", "hyper", source="hc_head")
    head = wrapped(getattr(model, "prediction_head", None))  # after the final norm (ModernBERT)
    if "prediction_head.hook_in" in names and isinstance(
        getattr(head, "norm", None), torch.nn.LayerNorm
    ):
        if "mlp" in parts and isinstance(getattr(head, "act", None), torch.nn.Module):
            add("prediction_head.hook_in", "act", source="prediction_head:act")
        if "norm" in parts:
            add("prediction_head.hook_out", "layernorm", source="prediction_head:norm")
    order = {name: i for i, name in enumerate(names)}

    def position(site: Site) -> int:  # a module site sits where its component's output does
        if site.name in order:
            return order[site.name]
        return order.get(site.source.split(":")[0] + ".hook_out", len(order))

    return sorted(sites, key=lambda s: (s.layer if s.layer is not None else 1 << 30, position(s)))


RECURRENCES = ("rg_lru",)  # a unit whose output an activation's branch gates (Griffin's)


def module_sites(block: Any, layer: int, parts: Sequence[str]) -> list[Site]:
    """Sites on the Hugging Face modules inside a block bridged whole, found by what each
    module is: an attention (its softmax frozen inside), a state-space scan (its rule), an
    RG-LRU (its gates), an RMS norm
    (its scale), an activation module (its output where it gates another branch, a gated MLP's
    or Griffin's recurrent block's, else its ratio). Modules inside an attention or a
    recurrence are left to its rule."""
    found: list[Site] = []
    claimed: list[str] = []
    for path, module in wrapped(block).named_modules():
        if not path or any(path.startswith(c + ".") for c in claimed):
            continue
        source, name = f"blocks.{layer}:{path}", f"blocks.{layer}.{path}"
        children = dict(module.named_children())
        if is_attention(module) and "attn" in parts:
            found.append(Site(name, "softmax", layer, source))
            claimed.append(path)
        elif "A_log" in own_parameters(module) and "mixer" in parts:  # a Mamba scan
            found.append(Site(name, "scan", layer, source))
            claimed.append(path)
        elif "recurrent_param" in own_parameters(module) and "mixer" in parts:  # an RG-LRU
            found.append(Site(name, "rglru", layer, source))
            claimed.append(path)
        elif is_plain_rms_norm(module) and "norm" in parts:
            found.append(Site(name, "rmsmodule", layer, source))
        act = children.get("act_fn")
        if isinstance(act, torch.nn.Module) and "mlp" in parts and not is_attention(module):
            gated = bool({"gate_proj", "gate_up_proj", *RECURRENCES} & set(children))
            kind = "actgate" if gated else "act"
            found.append(Site(f"{name}.act_fn", kind, layer, f"{source}.act_fn"))
    return found


def is_sorting_router(module: Any) -> bool:
    """A router that picks each token's top-k experts and returns the tokens grouped by expert
    (JetMoE's ``JetMoeTopKGating``: a top-k, a linear ``layer``): a ``choice`` site; its
    mixture's gates follow its grouping (:mod:`lens_linear.hooks.rules.moe`)."""
    return isinstance(getattr(module, "top_k", None), int) and isinstance(
        getattr(module, "layer", None), torch.nn.Linear
    )


def site_module(model: Any, source: str) -> Any:
    """The module a module site lives on: ``"component"`` (the Hugging Face module the bridge
    component wraps) or ``"component:path"`` (a module inside it)."""
    component, _, path = source.partition(":")
    module = wrapped(model.get_submodule(component))
    return module.get_submodule(path) if path else module


def mixer_kind(mixer: Any) -> str | None:
    """What a layer bridged as a mixer computes, where it is not a state-space scan: ``"moe"``
    (it holds ``experts``), ``"act"`` (a plain MLP: an activation module and no gate
    projection), ``"softmax"`` (an attention: query and key projections), else ``None``."""
    inner = wrapped(mixer)
    if not isinstance(inner, torch.nn.Module):
        return None
    children = dict(inner.named_children())
    if "A_log" in own_parameters(inner):
        return None  # a scan: found by its hook names
    if "experts" in children:
        return "moe"
    if isinstance(children.get("act_fn"), torch.nn.Module) and "gate_proj" not in children:
        return "act"
    return "softmax" if is_attention(inner) else None


def is_attention(component: Any) -> bool:
    """Whether a component wraps an attention module (by its class name, or query and key
    projections)."""
    inner = wrapped(component)
    if not isinstance(inner, torch.nn.Module):
        return False
    children = set(dict(inner.named_children()))
    return type(inner).__name__.endswith("Attention") or {"q_proj", "k_proj"} <= children


def wraps_identity(model: Any, name: str) -> bool:
    """Whether hook ``name``'s component wraps ``nn.Identity``: a bridge's norm where the layer
    has none, whose scale hook fires but never reaches the output."""
    try:
        module = model.get_submodule(name.rsplit(".", 1)[0])
    except AttributeError:
        return False
    return isinstance(wrapped(module), torch.nn.Identity)


OUTPUT_GATES = ("gate_proj", "g_proj")  # an attention's output-gate projection (AFMoE, Laguna)
# norms on queries and keys: they reach the output only through the frozen pattern (and one
# module may serve both, called twice a forward, as Llama 4's does)
QK_NORMS = ("q_", "k_", "qk_")


def is_plain_rms_norm(module: Any) -> bool:
    """An RMS norm module of one input (a gated one, ``(x, gate)``, sits inside a mixer with its
    own rule)."""
    if not isinstance(module, torch.nn.Module) or "RMSNorm" not in type(module).__name__:
        return False
    try:
        return len(inspect.signature(module.forward).parameters) == 1
    except (TypeError, ValueError):
        return False


def unscaled_rms_norm(model: Any, name: str, names: Any) -> bool:
    """Whether ``name`` (a component's ``hook_out``) is an RMS norm that TransformerLens bridges
    without a ``hook_scale`` (Gemma 4's every norm): its scale is frozen between the
    component's ``hook_in`` and ``hook_out`` instead."""
    prefix = name[: -len("hook_out")]
    if (
        prefix + "hook_scale" in names or prefix + "hook_in" not in names
    ):  # names: hook_dict, read once
        return False
    try:
        module = wrapped(model.get_submodule(prefix[:-1]))
    except AttributeError:  # a hook alias whose prefix names no module
        return False
    return is_plain_rms_norm(module)


def wrapped(module: Any) -> Any:
    """The Hugging Face module behind a bridge component (the module itself where it wraps none)."""
    inner = original_component(module)
    return module if inner is None else inner


def is_state_space(model: Any, name: str) -> bool:
    """Whether hook ``name`` belongs to a state-space mixer: a module with the decay ``A_log``
    and either the skip ``D`` of a Mamba scan or the step bias ``dt_bias`` of a gated delta rule
    (hybrid bridges name every block's mixer alike, experts included)."""
    try:
        module = wrapped(model.get_submodule(name.rsplit(".", 1)[0]))
    except AttributeError:  # a hook alias whose prefix names no module
        return False
    params = own_parameters(module)
    return "A_log" in params and bool(params & {"D", "dt_bias"})


def own_parameters(module: torch.nn.Module) -> set[str]:
    """The names of ``module``'s own parameters (not its children's)."""
    return {name for name, _ in module.named_parameters(recurse=False)}


def activation_fn(model: Any, layer: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The elementwise activation of block ``layer``'s MLP, read off the module itself."""
    mlp = getattr(model.blocks[layer], "mlp", None)
    for module in (mlp, getattr(mlp, "original_component", None)):
        for attr in ("act_fn", "act", "activation_fn", "activation", "gelu_impl"):
            fn = getattr(module, attr, None) if module is not None else None
            if callable(fn):
                return fn
    return None


def slope_at_zero(act: Callable[[torch.Tensor], torch.Tensor], like: torch.Tensor) -> float:
    """``act'(0)``: the gate used where the pre-activation is exactly zero."""
    x = torch.zeros((), dtype=torch.float64, device="cpu", requires_grad=True)
    try:
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(act(x), x)
        return float(grad)
    except (RuntimeError, TypeError):
        return 0.0


def components_without_sites(model: Any, layer: int, sites: Sequence[Site]) -> list[str]:
    """Components of block ``layer`` (``blocks.{layer}.<component>.hook_*``) that hold no
    coefficient site: where an operator without a freezing rule (a state-space mixer, a gated
    convolution, a recurrence) is to be looked for when linearity breaks in that block."""
    prefix = f"blocks.{layer}."
    parts = {
        n[len(prefix) :].split(".")[0]
        for n in model.hook_dict
        if n.startswith(prefix) and n[len(prefix) :].count(".") >= 1
    }
    covered = {s.name[len(prefix) :].split(".")[0] for s in sites if s.name.startswith(prefix)}
    return sorted(parts - covered)


def feeds_frozen_only(site: Site, sites: Sequence[Site]) -> bool:
    """A norm that matters only through other frozen values: inside attention (q/k norms, once
    the pattern is frozen; a sparse indexer's, once its choices are), inside a state-space
    mixer (on the step sizes' input, once the step sizes are frozen) or inside a
    hyper-connection (on its weights' input). It cannot reach the output, and may run live on
    a suffix replay."""
    if site.kind != "norm":
        return False
    if ".attn." in site.name and any(s.kind == "attn" for s in sites):
        return True
    for owner in sites:
        prefix = owner.name.rsplit(".", 1)[0] if owner.kind == "scan" else owner.source
        if owner.kind not in ("scan", "hyper", "softmax") or not site.name.startswith(f"{prefix}."):
            continue
        inner = site.name[len(prefix) + 1 :]
        return owner.kind != "softmax" or ".indexer." in f".{inner}" or inner.startswith(QK_NORMS)
    return False
