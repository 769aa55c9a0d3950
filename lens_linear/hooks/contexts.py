"""Every context that temporarily changes the model, and puts it back on exit, even on error.

Entered by :func:`lens_linear.hooks.run.hooks_on`. Every run enters the first three, which
change no value (the model's output is the same with or without them), so that a user's
hook that edits a norm scale or a pattern acts alike in ordinary and frozen runs; only runs
that freeze a coefficient enter the last two, so an ordinary run computes what the model
alone computes:

* :func:`offloaded_norms_loaded` — accelerate-offloaded norm weights loaded for the duration;
* :func:`weightless_norms_completed` — a weight-free norm (OLMo 1) given the weight 1: an
  edited scale makes the bridge multiply by a ``weight`` the norm does not have;
* :func:`patterns_inside` — an attention that computes its softmax inside the wrapped module
  (GPT-J, GPT-Neo, OPT, XGLM, ...) passes the softmax's output through the bridge's
  ``hook_pattern`` as it is computed, so the pattern site freezes the weights the module uses;
* :func:`experts_eager` — Hugging Face experts modules run their per-expert loop;
* :func:`float64_throughout` — a float64 model's float32 casts skipped.

Entered by the analyses: :func:`analysis_mode` (eval mode, no weight gradients),
:func:`biases_zeroed` (the bias decomposition, the forward engines), :func:`linears_skipped`
(dead projections of a replay return zeros), :func:`computing_in` (a half-precision model's
weights in float32) and :func:`bias_leaves` (the biases requiring grad for a check's backward).
The last three act on the model's own tensors and module attributes, and
hold it (:func:`~lens_linear.hooks.guard.exclusive`); :func:`biases_zeroed` writes nothing: its
zeros are substituted in each of the call's forwards.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Any, Iterator, Sequence
from weakref import WeakKeyDictionary

import torch
from torch.overrides import TorchFunctionMode

from lens_linear._compat import (
    accelerate_hooks,
    experts_implementation,
    original_component,
    set_experts_implementation,
)
from lens_linear._validation import LinearizationError
from lens_linear.hooks.guard import exclusive, held
from lens_linear.hooks.modules import (
    EMBEDDINGS_ARGUMENT,
    ModelScan,
    embeddings_position,
    module_list,
    scan,
    structure,
)
from lens_linear.hooks.sites import layer_of
from lens_linear.tokens import model_dtype

HALF = (torch.float16, torch.bfloat16)


# ---- entered for every run -------------------------------------------------------------------


@contextlib.contextmanager
def offloaded_norms_loaded(model: Any, found: ModelScan | None = None) -> Iterator[None]:
    """Load the weights of norm modules that accelerate offloads (``cpu_offload``,
    ``disk_offload``, ``dispatch_model`` with offloaded layers) for the duration, and put them
    back on ``meta`` after, even on error. Once a norm's scale is edited, TransformerLens'
    bridge computes the norm itself and reads ``module.weight`` directly, bypassing the
    module's forward, where accelerate would have loaded it. Costs the norms' weights only."""
    loaded = []
    try:
        for module in (found or scan(model)).norms:
            for hook in accelerate_hooks(module):
                if getattr(hook, "offload", False):
                    hook.pre_forward(module)
                    loaded.append((module, hook))
        yield
    finally:
        for module, hook in loaded:
            hook.post_forward(module, None)


class _PatternThroughHook(TorchFunctionMode):
    """Inside one attention module's forward: every softmax output goes through ``hook_pattern``."""

    def __init__(self, bridge: Any, n_heads: int):
        super().__init__()
        self.bridge, self.n_heads, self.calls = bridge, n_heads, 0

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        if (
            getattr(func, "__name__", None) == "softmax"  # F.softmax, torch.softmax, Tensor.softmax
            and out.ndim >= 3  # a pattern; not a router's [token, k] weights (JetMoE's MoA)
        ):
            self.calls += 1
            shape = out.shape
            heads = (
                out.reshape(-1, self.n_heads, *shape[1:]) if out.ndim == 3 else out
            )  # [batch·heads, q, k]
            out = self.bridge.hook_pattern(heads).reshape(shape)
        return out


@contextlib.contextmanager
def patterns_inside(model: Any, found: ModelScan | None = None) -> Iterator[None]:
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
def embeddings_tied(model: Any, found: ModelScan | None = None) -> Iterator[None]:
    """A layer that reads the embeddings besides its input (Zamba2's hybrid layers concatenate
    ``original_hidden_states`` to theirs) reads the first layer's input of this run instead of
    the embedding module's output: the same value in a plain run, and the injected ``x``
    (``blocks.0.hook_resid_pre``) where a run replaces it, so every path from ``x`` counts."""
    readers = (found or scan(model)).embedding_readers
    if not readers:
        yield
        return
    first = original_component(model.blocks[0]) or model.blocks[0]
    seen: dict[str, torch.Tensor] = {}

    def keep(module: Any, args: tuple, kwargs: dict) -> None:
        seen["x"] = args[0] if args else kwargs["hidden_states"]

    def tie(module: Any, args: tuple, kwargs: dict) -> Any:
        if "x" not in seen:
            return None
        if EMBEDDINGS_ARGUMENT in kwargs:
            return args, {**kwargs, EMBEDDINGS_ARGUMENT: seen["x"]}
        at = embeddings_position(module)  # its place among the positional arguments
        if len(args) > at:
            return (*args[:at], seen["x"], *args[at + 1 :]), kwargs
        return None

    handles = [first.register_forward_pre_hook(keep, with_kwargs=True)]
    handles += [m.register_forward_pre_hook(tie, with_kwargs=True) for m in readers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def weightless_norms_completed(model: Any, found: ModelScan | None = None) -> Iterator[None]:
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


@contextlib.contextmanager
def experts_eager(model: Any, found: ModelScan | None = None) -> Iterator[None]:
    """Hugging Face experts modules computed by their per-expert loop for the duration (the
    loop calls the expert activation once per selected expert, where the expert gates are
    frozen); the configured implementation is put back on exit, even on error."""
    saved = [(c, experts_implementation(c)) for c in (found or scan(model)).experts_configs]
    try:
        for config, _ in saved:
            set_experts_implementation(config, "eager")
        yield
    finally:
        for config, implementation in saved:
            set_experts_implementation(config, implementation)


class _NoFloat32(TorchFunctionMode):
    """Casts of float64 tensors down to float32 (``.float()``, ``.to(torch.float32)``,
    ``.type(torch.float32)``, a softmax's ``dtype=torch.float32``) leave them in float64."""

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", None)
        if (
            name in ("float", "to", "type", "softmax", "log_softmax")
            and args
            and torch.is_tensor(args[0])
            and args[0].dtype == torch.float64
        ):
            if name == "float" or (name == "type" and torch.float32 in args[1:]):
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


# ---- entered by the analyses -----------------------------------------------------------------


@contextlib.contextmanager
def analysis_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no parameter requiring grad: the Jacobians we take are
    w.r.t. activations, so a graph built here saves no layer inputs for weight gradients
    (less memory, faster). Every module's flag and parameter's ``requires_grad`` are
    restored on exit, even on error. Holds the model for this call
    (:func:`~lens_linear.hooks.guard.exclusive`): a call from another thread is refused."""
    with exclusive(model):
        if _IN_ANALYSIS.get(model):  # an outer call of this thread set it up: nothing to do
            _IN_ANALYSIS[model] += 1
            try:
                yield
            finally:
                _IN_ANALYSIS[model] -= 1
            return
        _IN_ANALYSIS[model] = 1
        try:
            yield from _analysis_mode(model)
        finally:
            del _IN_ANALYSIS[model]


_IN_ANALYSIS: WeakKeyDictionary[torch.nn.Module, int] = WeakKeyDictionary()  # nesting depth


def _analysis_mode(model: torch.nn.Module) -> Iterator[None]:
    # the modules and parameter slots as found once per call (structure) and per structure
    # (slots); each slot's tensor is read now, so a parameter put in another's place is seen
    training = [m for m in module_list(model) if m.training]
    params = list(
        {
            id(p): p
            for _, owner, leaf in _slots(model)
            if isinstance(p := getattr(owner, leaf, None), torch.nn.Parameter) and p.requires_grad
        }.values()
    )
    for module in training:  # the flag itself: ``model.eval()`` on a bridge costs ~0.1 s
        module.training = False
    try:
        for param in params:
            param.requires_grad_(False)
        yield
    finally:
        for module in training:
            module.training = True
        for param in params:
            param.requires_grad_(True)


def _is_bias(name: str) -> bool:
    """A bias by its name: ``bias``, TransformerLens' ``b``/``b_*``, and the stacked experts'
    projection biases (``gate_up_proj_bias``, ``down_proj_bias``); not a router's or a step
    size's (``e_score_correction_bias``, ``dt_bias``), which feed frozen coefficients only."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf in ("bias", "b") or leaf.startswith("b_") or leaf.endswith("proj_bias")


def _memory_key(t: torch.Tensor) -> int:
    """The memory block ``t`` lives in (an offloaded tensor, on meta, has none: it is its own)."""
    return id(t) if t.device.type == "meta" else t.untyped_storage().data_ptr()


def bias_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every bias parameter or buffer, one per memory block (found once per call that holds
    the model).

    A bridge can expose one bias twice (a joint QKV bias and per-projection views of it):
    of tensors sharing storage only the largest is kept, so no share is counted twice.
    """
    return held(model, "biases", lambda: _bias_tensors(model))


@contextlib.contextmanager
def bias_leaves(model: torch.nn.Module) -> Iterator[list[torch.Tensor] | None]:
    """Every bias of :func:`bias_tensors` requiring grad meanwhile, so a graph built inside
    gives ``uᵀ ∂F/∂b`` for each: the frozen map is jointly linear in its input and its
    biases, so ``Σ_b ⟨∂F/∂b, b⟩`` is the constant the biases explain, with no replay. Yields
    the tensors, or ``None`` where that does not hold for all of them (a bias offloaded by
    accelerate, or one that is not a leaf); every flag is restored on exit. Inside
    :func:`analysis_mode` (the model held); gradients are only ever taken with
    ``torch.autograd.grad``, so no ``.grad`` of the user's is written.

    Every leaf tensor sharing a bias's memory, not just the one :func:`bias_tensors` names: a
    bridge's per-projection views of a joint QKV bias are parameters of their own, and the
    forward reads those. Each tensor's gradient covers its own reads, so none is counted twice;
    a read through a tensor that is not a leaf reaches its base."""
    named = bias_tensors(model).values()
    if any(t.device.type == "meta" for t in named):
        yield None
        return
    groups = _attributes_by_memory(model)
    unique = {
        id(t): t
        for key in {_memory_key(t) for t in named}
        for _, module, leaf in groups[key]
        if isinstance(t := getattr(module, leaf, None), torch.Tensor)
        and t.is_leaf
        and t.is_floating_point()
    }
    biases = list(unique.values())
    flags = [t.requires_grad for t in biases]
    try:
        for t in biases:
            t.requires_grad_(True)
        yield biases
    finally:
        for t, flag in zip(biases, flags):
            t.requires_grad_(flag)


Attribute = tuple[str, torch.nn.Module, str]  # a tensor's name, its owning module, attribute


# per model: every (module, attribute) holding a parameter or buffer, found once per structure
_SLOTS: WeakKeyDictionary[torch.nn.Module, tuple[tuple, list[Attribute]]] = WeakKeyDictionary()


def _slots(model: torch.nn.Module) -> list[Attribute]:
    """Every (module, attribute) holding a parameter or buffer, once each, named by its first
    path (a bridge reaches each Hugging Face module by two); found once per structure:
    resolving each owner module is most of the cost. Read the tensors from it, so a tensor
    put in another's place is the one seen."""
    found = _SLOTS.get(model)
    if found is None or found[0] != structure(model):
        slots, seen = [], set()
        for name, _ in [
            *model.named_parameters(remove_duplicate=False),
            *model.named_buffers(remove_duplicate=False),
        ]:
            path, _, leaf = name.rpartition(".")
            owner = model.get_submodule(path)
            if (id(owner), leaf) not in seen:
                seen.add((id(owner), leaf))
                slots.append((name, owner, leaf))
        found = _SLOTS[model] = (structure(model), slots)
    return found[1]


def _bias_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each tensor under its first name, where that name is a bias's and the tensor floating
    point (a boolean buffer named ``bias`` is a causal mask, GPT-Neo's and GPTBigCode's)."""
    seen: set[int] = set()
    best: dict[int, tuple[str, torch.Tensor]] = {}
    for name, module, leaf in _slots(model):
        t = getattr(module, leaf, None)
        if not isinstance(t, torch.Tensor) or id(t) in seen:
            continue
        seen.add(id(t))
        if _is_bias(name) and t.is_floating_point():
            key = _memory_key(t)
            if key not in best or t.numel() > best[key][1].numel():
                best[key] = (name, t)
    return dict(best.values())


# per model, the attributes :func:`biases_zeroed` substitutes: (name, owning module, attribute)
_ZEROED: WeakKeyDictionary[torch.nn.Module, list[tuple[str, torch.nn.Module, str]]] = (
    WeakKeyDictionary()
)
_ZEROED_BLOCKS: WeakKeyDictionary[torch.nn.Module, set[int]] = WeakKeyDictionary()


def bias_zeroed(model: torch.nn.Module, tensor: torch.Tensor) -> bool:
    """Whether :func:`biases_zeroed` now substitutes zeros for ``tensor`` (one of ``model``'s own,
    as held outside the forward): a freezing rule whose frozen form adds a constant of its own
    ties it to a bias this way, so that a bias-free replay is linear."""
    return _memory_key(tensor) in _ZEROED_BLOCKS.get(model, ())


def substitutes(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Tensors that :func:`lens_linear.hooks.run.forward` passes to the model's forwards in
    place of its own (``torch.func.functional_call``): zeros for the biases
    :func:`biases_zeroed` names, made at each forward from the tensors then in place (a half
    model computing in float32 gets float32 zeros)."""
    return {
        name: _zero_like(getattr(module, leaf)) for name, module, leaf in _ZEROED.get(model, ())
    }


_GROUPS: WeakKeyDictionary[torch.nn.Module, tuple[tuple, dict[int, list[Attribute]]]] = (
    WeakKeyDictionary()
)


def _attributes_by_memory(model: torch.nn.Module) -> dict[int, list[Attribute]]:
    """Every parameter and buffer by memory block (a joint QKV bias and the per-projection
    views a bridge makes of it share one), one entry per (module, attribute): a bridge reaches
    each Hugging Face module by two paths. Cached per model until a tensor or its memory
    changes (:func:`_slots`)."""
    tensors = [(slot, getattr(slot[1], slot[2], None)) for slot in _slots(model)]
    key = tuple((id(t), _memory_key(t)) for _, t in tensors if isinstance(t, torch.Tensor))
    cached = _GROUPS.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    groups: dict[int, list[Attribute]] = {}
    for slot, t in tensors:
        if isinstance(t, torch.Tensor):
            groups.setdefault(_memory_key(t), []).append(slot)
    _GROUPS[model] = (key, groups)
    return groups


def _zero_like(t: torch.Tensor) -> torch.Tensor:
    """Zeros in ``t``'s place, a parameter where ``t`` is one (accelerate rebuilds a module's
    tensors by their type)."""
    zero = torch.zeros_like(t)
    return (
        torch.nn.Parameter(zero, requires_grad=False) if isinstance(t, torch.nn.Parameter) else zero
    )


@contextlib.contextmanager
def biases_zeroed(
    model: torch.nn.Module, keep: str | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Every forward inside runs with every bias (but ``keep``, a name of
    :func:`bias_tensors`) zero: the user's tensors are never written. Zeros are substituted by
    ``torch.func.functional_call`` in each forward (:func:`substitutes`), once per module
    attribute: a TransformerBridge reaches each Hugging Face module by two paths, and
    ``functional_call``'s tied-weight handling (its default) then restores the substitute
    instead of the original (torch 2.13; see the project's notes), so ties are given by hand.
    """
    biases = bias_tensors(model)
    offloaded = [
        n for n, t in biases.items() if t.device.type == "meta" and _offloaded_nonzero(model, n)
    ]
    if (
        offloaded
    ):  # accelerate reloads them from its weights map before every use: a zero would not stick
        raise LinearizationError(
            f"{len(offloaded)} bias(es) of this model are offloaded by accelerate (first {offloaded[0]}), so they "
            f"cannot be zeroed for the bias decomposition, the forward Jacobian engine or "
            f"steering. Load the model without offloading its biased layers, or use lcache.jacobians(..., "
            f"method='reverse')."
        )
    groups = _attributes_by_memory(model)
    zeroed = [  # an offloaded bias (on meta) is zero (else refused above): accelerate loads it
        attribute
        for name, t in biases.items()
        if name != keep and t.device.type != "meta"
        for attribute in groups[_memory_key(t)]
    ]
    with exclusive(model):  # the setting is the model's: no other thread's forward may see it
        previous = _ZEROED.get(model), _ZEROED_BLOCKS.get(model)
        _ZEROED[model] = zeroed
        _ZEROED_BLOCKS[model] = {
            _memory_key(t) for name, t in biases.items() if name != keep and t.device.type != "meta"
        }
        try:
            yield biases
        finally:
            if previous[0] is None:
                del _ZEROED[model], _ZEROED_BLOCKS[model]
            else:
                _ZEROED[model], _ZEROED_BLOCKS[model] = previous


def _offloaded_nonzero(model: torch.nn.Module, name: str) -> bool:
    """Whether an accelerate-offloaded tensor holds anything but zeros (unknown: ``True``)."""
    path, _, leaf = name.rpartition(".")
    for hook in accelerate_hooks(model.get_submodule(path)):
        store = getattr(hook, "weights_map", None)
        if store is not None and leaf in store:
            return bool(torch.count_nonzero(store[leaf]))
    return True


@contextlib.contextmanager
def linears_skipped(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Let these linear layers return zeros instead of computing (see
    :meth:`OperatingPoint.dead_linears`); their own ``forward`` is back on exit, even on error."""

    def zeros(module: torch.nn.Linear, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], module.out_features)

    saved = [
        (module, vars(module).get("forward")) for module in modules
    ]  # accelerate wraps forward here
    try:
        for module in modules:
            module.forward = partial(zeros, module)
        yield
    finally:
        for module, own in saved:
            if own is None:
                vars(module).pop("forward", None)
            else:
                module.forward = own


@contextlib.contextmanager
def computing_in(model: torch.nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Run the model's floating-point parameters and buffers in ``dtype`` for the duration.

    The original tensors are put back on exit (the same storage: bit for bit), even on
    error. Costs one copy of the weights in ``dtype`` while it lasts (for a bfloat16 model in
    float32: twice the model's size)."""
    own = model_dtype(model) or dtype
    if own == dtype:  # already there (or nested inside another computing_in): nothing to do
        yield
        return
    with exclusive(model):  # the weights are the model's: no other thread may run meanwhile
        yield from _computing_in(model, dtype, own)


def _computing_in(model: torch.nn.Module, dtype: torch.dtype, own: torch.dtype) -> Iterator[None]:
    if any(p.device.type == "meta" for p in model.parameters()):
        raise LinearizationError(
            f"this model's weights are offloaded by accelerate: they cannot be copied to "
            f"{dtype} for the computation. Compute in the model's own dtype ({own})."
        )
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    cfg = getattr(model, "cfg", None)
    cfg_dtype = getattr(cfg, "dtype", None)
    try:
        for t in [*model.parameters(), *model.buffers()]:
            if (
                t.dtype == own
            ):  # buffers kept in another precision (rotary frequencies) stay as they are
                saved.append((t, t.data))
                t.data = t.data.to(dtype)
        if cfg_dtype is not None:
            cfg.dtype = dtype
        yield
    finally:
        for t, data in saved:
            t.data = data
        if cfg_dtype is not None:
            cfg.dtype = cfg_dtype
