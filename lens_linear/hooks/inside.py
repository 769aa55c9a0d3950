"""Coefficients that TransformerLens' hook points cannot reach in time, made reachable.

A freezing hook only works where the model uses the hooked value. Some bridges run the
wrapped Hugging Face module whole and fire a hook afterwards, on a value already used; some
components have no hook at all. The rules here stay per kind of operation, never per model:

* an attention that computes its softmax inside the wrapped module (GPT-J, GPT-Neo, OPT,
  XGLM, ...): the softmax's output is passed through the bridge's ``hook_pattern`` at the
  moment it is computed, so the pattern site freezes the weights the module really uses;
* a state-space mixer (Mamba, Mamba-2, the hybrids built on them, gated delta rules) computes
  its step sizes or decays, input and output matrices (or keys and queries) and output gate
  from its input inside the wrapped module: they are frozen there as they are computed
  (:func:`scan_hooks`);
* a weight-free norm (OLMo 1): an edited scale makes the bridge multiply by a ``weight`` the
  norm does not have; it is given the weight 1 meanwhile.

Each is a context manager that :func:`lens_linear.hooks.run.hooks_on` enters for every run,
so everything is removed on exit, also after an exception.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode

from lens_linear._validation import LinearizationError
from lens_linear.hooks.sites import layer_of, wrapped


@dataclass(frozen=True)
class ModuleHook:
    """A PyTorch forward hook (``pre``: forward pre-hook) on a module inside the wrapped model:
    a coefficient site where TransformerLens has no hook point (a router, an expert's gate)."""

    module: torch.nn.Module
    fn: Callable[..., Any]
    pre: bool = False
    attribute: str | None = (
        None  # a plain function the module calls (``self.act_fn = F.silu``): a pre-hook on it
    )
    always: bool = (
        False  # a forward hook that runs also when the forward raises (to leave a mode it entered)
    )

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        """Register for the duration; removed (the attribute put back as it was) on exit, even on error."""
        if self.attribute is None:
            if self.pre:
                handle = self.module.register_forward_pre_hook(self.fn)
            else:
                handle = self.module.register_forward_hook(self.fn, always_call=self.always)
            try:
                yield
            finally:
                handle.remove()
            return
        own = vars(self.module).get(self.attribute)
        original = getattr(self.module, self.attribute)
        vars(self.module)[self.attribute] = lambda *args: original(*self.fn(self.module, args))
        try:
            yield
        finally:
            if own is None:
                vars(self.module).pop(self.attribute, None)
            else:
                vars(self.module)[self.attribute] = own


class _PatternThroughHook(TorchFunctionMode):
    """Inside one attention module's forward: every softmax output goes through ``hook_pattern``."""

    def __init__(self, bridge: Any, n_heads: int):
        super().__init__()
        self.bridge, self.n_heads, self.calls = bridge, n_heads, 0

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", None) == "softmax":  # F.softmax, torch.softmax, Tensor.softmax
            self.calls += 1
            shape = out.shape
            heads = (
                out.reshape(-1, self.n_heads, *shape[1:]) if out.ndim == 3 else out
            )  # [batch·heads, q, k]
            out = self.bridge.hook_pattern(heads).reshape(shape)
        return out


@dataclass(frozen=True)
class ModelScan:
    """What the contexts below act on, found once per model: every run enters them, and asking a
    bridge component for an attribute goes through its delegation (~40 ms a scan on SmolLM2)."""

    structure: tuple[int, ...]  # ids of the modules it was made from: a changed model is rescanned
    attentions: list[
        tuple[torch.nn.Module, torch.nn.Module]
    ]  # (bridge with hook_pattern, wrapped module)
    weightless_norms: list[torch.nn.Module]  # norm bridges whose norm has no weight
    experts_configs: list[Any]  # configs of Hugging Face experts modules
    norms: list[
        torch.nn.Module
    ]  # modules whose class is a norm (accelerate may offload their weights)


_SCANS: "weakref.WeakKeyDictionary[torch.nn.Module, ModelScan]" = weakref.WeakKeyDictionary()


def scan(model: torch.nn.Module) -> ModelScan:
    """The model's modules that the run contexts act on, cached until its structure changes."""
    modules = list(model.modules())
    structure = tuple(map(id, modules))
    found = _SCANS.get(model)
    if found is not None and found.structure == structure:
        return found
    attentions, weightless, configs = [], [], {}
    for m in modules:
        inner = m._modules.get("_original_component")
        if inner is not None and hasattr(m, "hook_pattern"):
            attentions.append((m, inner))
        if inner is not None and hasattr(m, "hook_scale") and not hasattr(m, "weight"):
            weightless.append(m)
        if hasattr(type(m), "_apply_gate") and hasattr(
            getattr(m, "config", None), "_experts_implementation"
        ):
            configs[id(m.config)] = m.config
    norms = [m for m in modules if "Norm" in type(m).__name__]
    _SCANS[model] = ModelScan(structure, attentions, weightless, list(configs.values()), norms)
    return _SCANS[model]


@contextlib.contextmanager
def patterns_inside(model: Any, found: "ModelScan | None" = None) -> Iterator[None]:
    """For every attention bridge that calls its wrapped module's forward, route the softmax
    computed there through ``hook_pattern`` while that forward runs. Bridges that compute
    attention themselves never call it: for them nothing changes. One softmax per call is
    required; an attention without one (a fused kernel such as SDPA) is refused."""
    handles, active = [], []

    def enter(bridge: Any) -> Any:
        def pre(module: torch.nn.Module, args: Any) -> None:
            mode = _PatternThroughHook(bridge, model.cfg.n_heads)
            mode.__enter__()
            active.append(mode)

        return pre

    def leave(bridge: Any) -> Any:
        def post(module: torch.nn.Module, args: Any, output: Any) -> None:
            mode = active.pop()
            mode.__exit__(None, None, None)
            if mode.calls != 1:
                name = next((n for n, m in model.named_modules() if m is bridge), "attention")
                raise LinearizationError(
                    f"{name} computes its attention inside the wrapped module with {mode.calls} softmax "
                    f"calls (one expected), so its pattern cannot be frozen (a fused kernel such as "
                    f"SDPA has none): load the model with attn_implementation='eager'.",
                    layer=layer_of(name),
                )

        return post

    try:
        for module, inner in (found or scan(model)).attentions:
            handles.append(inner.register_forward_pre_hook(enter(module)))
            handles.append(inner.register_forward_hook(leave(module)))
        yield
    finally:
        for handle in handles:
            handle.remove()
        while active:  # a forward that raised inside an attention module
            active.pop().__exit__(None, None, None)


@contextlib.contextmanager
def weightless_norms_completed(model: Any, found: "ModelScan | None" = None) -> Iterator[None]:
    """Give a weight-free norm's bridge (OLMo 1's LayerNorm) the weight 1 for the duration.
    Once its scale is edited, TransformerLens' bridge computes the norm itself and multiplies
    by ``self.weight``, which such a norm does not have (an AttributeError inside the
    forward). The attribute is removed on exit, even on error."""
    completed = []
    try:
        for module in (found or scan(model)).weightless_norms:
            if "weight" not in vars(module):  # (an enclosing run may have completed it already)
                vars(module)["weight"] = 1.0
                completed.append(module)
        yield
    finally:
        for module in completed:
            vars(module).pop("weight", None)


class _NoFloat32(TorchFunctionMode):
    """Casts of float64 tensors down to float32 (``.float()``, ``.to(torch.float32)``, a
    softmax's ``dtype=torch.float32``) leave them in float64."""

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", None)
        if (
            name in ("float", "to", "softmax", "log_softmax")
            and args
            and torch.is_tensor(args[0])
            and args[0].dtype == torch.float64
        ):
            if name == "float":
                return args[0]
            if name == "to" and torch.float32 in (kwargs.get("dtype"), *args[1:]):
                args = tuple(a for a in args if a is not torch.float32)
                kwargs = {k: v for k, v in kwargs.items() if k != "dtype"}
            elif kwargs.get("dtype") == torch.float32:
                kwargs = {**kwargs, "dtype": None}
        return func(*args, **kwargs)


@contextlib.contextmanager
def float64_throughout(model: Any) -> Iterator[None]:
    """A float64 model computes in float64 everywhere. Hugging Face computes norms, softmaxes,
    rotary angles and state-space scans in float32 "for precision" (some families keep the
    residual stream in float32), which in a float64 model is a downcast: the frozen map would
    be linear only to float32 rounding, and float64 verification would refuse it."""
    parameter = next(model.parameters(), None)
    if parameter is None or parameter.dtype != torch.float64:
        yield
        return
    with _NoFloat32():
        yield


# ---- mixtures of experts ---------------------------------------------------------------------

ROUTERS = ("gate", "router")  # the HF child that computes routing weights and choices
SHARED_GATES = ("shared_expert_gate",)  # a scalar gate on the shared expert: sigmoid(linear(x))
SHARED_EXPERTS = ("shared_expert", "shared_experts", "shared_mlp")


def fit_to(stored: torch.Tensor, like: torch.Tensor, batch: int = 1) -> torch.Tensor:
    """A value recorded for one prompt (batch 1), for a run of ``like``'s shape: the batch
    expanded, and the positions cut to the last ones where ``like`` has fewer (a replay of a
    suffix). Batch and positions are the only dimensions a replay changes; a leading dimension
    that flattens batch, positions (and heads) is cut per prompt and tiled ``batch`` times."""
    if stored.shape[0] not in (1, like.shape[0]):
        rows = like.shape[0] // batch
        stored = stored[stored.shape[0] - rows :].repeat(batch, *([1] * (stored.ndim - 1)))
    index = tuple(
        slice(s - n, None) if d and s != n else slice(None)
        for d, (s, n) in enumerate(zip(stored.shape, like.shape))
    )
    return stored[index].expand(like.shape)


def _fit(stored: torch.Tensor, like: torch.Tensor, n_pos: int) -> torch.Tensor:
    """A value recorded for one prompt, for a run of ``like``'s shape over the last ``n_pos``
    positions: tokens flattened first (``[pos, ...]`` → ``[batch·pos, ...]``) or batch first."""
    return fit_to(stored, like, max(like.shape[0] // n_pos, 1))


def _scaled(value: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
    return value if factor is None or not value.is_floating_point() else value * factor


@contextlib.contextmanager
def experts_eager(model: Any, found: "ModelScan | None" = None) -> Iterator[None]:
    """Hugging Face experts modules computed by their per-expert loop for the duration (the
    loop calls the expert activation once per selected expert, where the expert gates are
    frozen); the configured implementation is put back on exit, even on error."""
    saved = [(c, c._experts_implementation) for c in (found or scan(model)).experts_configs]
    try:
        for config, _ in saved:
            config._experts_implementation = "eager"
        yield
    finally:
        for config, implementation in saved:
            config._experts_implementation = implementation


def moe_hooks(
    model: Any,
    layer: int,
    key: str,
    store: dict[str, torch.Tensor],
    mode: str,
    factor: torch.Tensor | None = None,
) -> list[ModuleHook]:
    """Freeze one mixture-of-experts block: the router's outputs (weights and choices, so the
    replay routes every token as recorded), each selected expert's gate pre-activation (so
    ``act(gate)`` is a constant and ``act(gate) · up`` linear), and a shared expert's scalar
    gate. ``mode="record"`` stores them under ``key`` (detached); ``"replay"`` substitutes
    them for any batch, or for the last positions alone. Shared experts that TransformerLens
    bridges as gated MLPs are ``gate`` sites of their own; the load-balancing path is untouched."""
    block = wrapped(model.blocks[layer].mlp)
    router = next(
        (
            wrapped(getattr(block, n))
            for n in ROUTERS
            if isinstance(getattr(block, n, None), torch.nn.Module)
        ),
        None,
    )
    experts = wrapped(getattr(block, "experts", None))
    act = getattr(experts, "act_fn", None)
    if router is None or not callable(act):
        raise LinearizationError(
            f"blocks.{layer}.mlp is a mixture of experts without a router module ({', '.join(ROUTERS)}) or "
            f"an expert activation module (experts.act_fn): no freezing rule for its gates.",
            layer=layer,
        )
    live: dict[str, Any] = {}

    def block_pre(module: Any, args: tuple) -> None:
        live["n_pos"] = args[0].shape[-2] if args else None

    def constant(name: str) -> Any:  # a whole module output, frozen (tuple outputs element-wise)
        def hook(module: Any, args: tuple, output: Any) -> Any:
            outs = output if isinstance(output, tuple) else (output,)
            if mode == "record":
                for j, o in enumerate(outs):
                    if torch.is_tensor(o):
                        store[f"{key}#{name}{j}"] = o.detach()
                frozen = tuple(store.get(f"{key}#{name}{j}", o) for j, o in enumerate(outs))
            else:
                frozen = tuple(
                    _scaled(_fit(store[f"{key}#{name}{j}"], o, live["n_pos"]), factor)
                    if torch.is_tensor(o)
                    else o
                    for j, o in enumerate(outs)
                )
            return frozen if isinstance(output, tuple) else frozen[0]

        return hook

    def experts_pre(
        module: Any, args: tuple
    ) -> None:  # the rows of each expert call, as the loop visits them
        index = args[1]
        mask = torch.nn.functional.one_hot(index, num_classes=module.num_experts + 1).permute(
            2, 1, 0
        )
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        live["rows"] = [torch.where(mask[e[0]]) for e in hit if e[0] != module.num_experts]
        live["call"], live["top_k"] = 0, index.shape[-1]

    def gate_pre(module: Any, args: tuple) -> tuple:
        slot, token = live["rows"][live["call"]]
        live["call"] += 1
        gate = args[0]
        if mode == "record":
            if live["call"] == 1:
                store[key] = gate.new_zeros(live["n_pos"], live["top_k"], gate.shape[-1])
            store[key][token, slot] = gate.detach()
            return (gate.detach(),)
        recorded = store[key]
        n_pos = live["n_pos"]
        return (_scaled(recorded[recorded.shape[0] - n_pos + token % n_pos, slot], factor),)

    hooks = [
        ModuleHook(block, block_pre, pre=True),
        ModuleHook(router, constant("router")),
        ModuleHook(experts, experts_pre, pre=True),
        ModuleHook(act, gate_pre, pre=True)
        if isinstance(act, torch.nn.Module)
        else ModuleHook(experts, gate_pre, attribute="act_fn"),
    ]
    for name in SHARED_GATES:
        if isinstance(getattr(block, name, None), torch.nn.Module):
            hooks.append(ModuleHook(wrapped(getattr(block, name)), constant(name)))
    for name in SHARED_EXPERTS:  # a shared expert TransformerLens does not bridge: its activation
        shared = getattr(block, name, None)
        shared_act = getattr(shared, "act_fn", None)
        if "_original_component" not in getattr(shared, "_modules", {}) and isinstance(
            shared_act, torch.nn.Module
        ):
            hooks.append(
                ModuleHook(
                    shared_act,
                    _constant_input(f"{key}#{name}", store, mode, factor, live),
                    pre=True,
                )
            )
    return hooks


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
            return (store[key],)
        return (_scaled(_fit(store[key], args[0], live["n_pos"]), factor),)

    return hook


# ---- selective state-space mixers ------------------------------------------------------------


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

    def _value(self, out: torch.Tensor, computed: torch.Tensor) -> torch.Tensor:
        """``computed`` recorded (record) or the recorded value substituted (replay)."""
        tag = f"{self.key}#{self.frozen}"
        self.frozen += 1
        if self.mode == "record":
            self.store[tag] = computed.detach()
            self.store.setdefault(self.key, self.store[tag])
            return self.store[tag]
        return _scaled(fit_to(self.store[tag], out, self.batch), self.factor)

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
            ratio = self._value(out, torch.where(x == 0, 0.5, out / x))
            return out.detach() + (x - x.detach()) * ratio if self.mode == "record" else x * ratio
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
) -> list[ModuleHook]:
    """Freeze the selective state-space mixer whose bridge owns hook ``name``: a mode active
    only while the wrapped module's forward runs (see :class:`_ScanFrozen`). A mixer that does
    not compute these steps as PyTorch functions (a fused kernel) is refused."""
    bridge = model.get_submodule(name.rsplit(".", 1)[0])
    delta = "D" not in wrapped(bridge)._parameters  # a gated delta rule: [q, k, v], the values last
    component = (
        bridge if delta else wrapped(bridge)
    )  # (TransformerLens reimplements the delta rule)
    active: list[_ScanFrozen] = []

    def enter(module: Any, args: tuple) -> None:
        active.append(_ScanFrozen(name, store, mode, factor, live=-1 if delta else 0))
        active[-1].__enter__()

    def leave(module: Any, args: tuple, output: Any) -> None:
        frozen = active.pop()
        frozen.__exit__(None, None, None)
        if output is not None and (frozen.acts, frozen.splits, min(frozen.steps, 1)) != (2, 1, 1):
            raise LinearizationError(
                f"{name.rsplit('.', 1)[0]} is a selective state-space mixer whose forward ran {frozen.acts} "
                f"activations, {frozen.splits} B/C splits and {frozen.steps} softplus steps (2, 1 and at least 1 "
                f"expected): a fused kernel (mamba-ssm, causal-conv1d or a Hub kernel) computes it out of reach "
                f"of the freezing rule. Load the model without those kernels.",
                layer=layer_of(name),
            )

    return [ModuleHook(component, enter, pre=True), ModuleHook(component, leave, always=True)]
