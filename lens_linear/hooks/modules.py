"""Sites on modules: PyTorch hooks inside the wrapped model, and one scan of a model's modules.

Where TransformerLens has no hook point in time (a router, an expert's gate, a state-space
mixer's step sizes), a coefficient is frozen by a :class:`ModuleHook` on the module that
computes it. :func:`scan` finds, once per model, the modules that the run contexts
(:mod:`lens_linear.hooks.contexts`) act on.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from lens_linear._compat import has_experts_implementation, is_experts_module, original_component
from lens_linear.hooks.guard import held


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
    around: bool = False  # with ``attribute``: ``fn(module, args, original)`` computes the result
    # acts only while this module's forward runs: a module shared by several blocks (Zamba2's
    # shared transformer) has one site per block, each for its own block's call
    within: torch.nn.Module | None = None

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        """Register for the duration; removed (the attribute put back as it was) on exit, even on error."""
        if self.within is not None:
            inside = [False]

            def flag(value: bool) -> Callable[..., None]:
                def hook(*_: Any) -> None:
                    inside[0] = value

                return hook

            fn = self.fn
            guarded = ModuleHook(
                self.module,
                lambda *args: fn(*args) if inside[0] else None,
                self.pre,
                self.attribute,
                self.always,
                self.around,
            )
            handles = [
                self.within.register_forward_pre_hook(flag(True)),
                self.within.register_forward_hook(flag(False), always_call=True),
            ]
            try:
                with guarded.attached():
                    yield
            finally:
                for handle in handles:
                    handle.remove()
            return
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
        if self.around:
            vars(self.module)[self.attribute] = lambda *args: self.fn(self.module, args, original)
        else:
            vars(self.module)[self.attribute] = lambda *args: original(*self.fn(self.module, args))
        try:
            yield
        finally:
            if own is None:
                vars(self.module).pop(self.attribute, None)
            else:
                vars(self.module)[self.attribute] = own


def mode_while_running(
    module: torch.nn.Module,
    make: Callable[[], Any],
    done: Callable[[Any], None] | None = None,
) -> list[ModuleHook]:
    """Hooks that keep a fresh ``make()`` (a TorchFunctionMode freezing values as the module
    computes them) active while ``module``'s forward runs; ``done(mode)`` checks what it saw
    after a forward that returned (not one that raised)."""
    active: list[Any] = []

    def enter(module: Any, args: Any) -> None:
        active.append(make())
        active[-1].__enter__()

    def leave(module: Any, args: Any, output: Any) -> None:
        mode = active.pop()
        mode.__exit__(None, None, None)
        if output is not None and done is not None:
            done(mode)

    return [ModuleHook(module, enter, pre=True), ModuleHook(module, leave, always=True)]


@dataclass(frozen=True)
class ModelScan:
    """What the run contexts act on, found once per model: every run enters them, and asking a
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
    # layers that read the embeddings besides their input (Zamba2's ``original_hidden_states``)
    embedding_readers: list[torch.nn.Module]


_SCANS: "weakref.WeakKeyDictionary[torch.nn.Module, ModelScan]" = weakref.WeakKeyDictionary()


def module_list(model: torch.nn.Module) -> list[torch.nn.Module]:
    """``model.modules()``, walked once per call that holds the model
    (:func:`~lens_linear.hooks.guard.held`)."""
    return held(model, "modules", lambda: list(model.modules()))


def structure(model: torch.nn.Module) -> tuple[int, ...]:
    """The ids of ``model``'s modules, in order: what caches of its structure are keyed by
    (read once per call that holds the model, :func:`~lens_linear.hooks.guard.held`)."""
    return held(model, "structure", lambda: tuple(map(id, module_list(model))))


def scan(model: torch.nn.Module) -> ModelScan:
    """The model's modules that the run contexts act on, cached until its structure changes."""
    found = _SCANS.get(model)
    if found is not None and found.structure == structure(model):
        return found
    modules = module_list(model)
    attentions, weightless, configs = [], [], {}
    for m in modules:
        inner = original_component(m)
        if inner is not None and hasattr(m, "hook_pattern"):
            attentions.append((m, inner))
        if inner is not None and hasattr(m, "hook_scale") and not hasattr(m, "weight"):
            weightless.append(m)
        if is_experts_module(m) and has_experts_implementation(getattr(m, "config", None)):
            configs[id(m.config)] = m.config
    norms = [m for m in modules if "Norm" in type(m).__name__]
    readers = [m for m in modules if EMBEDDINGS_ARGUMENT in _parameters(m)]
    _SCANS[model] = ModelScan(
        tuple(map(id, modules)), attentions, weightless, list(configs.values()), norms, readers
    )
    return _SCANS[model]


EMBEDDINGS_ARGUMENT = "original_hidden_states"  # a layer's second input: the embeddings (Zamba2)


def _parameters(module: torch.nn.Module) -> tuple[str, ...]:
    """The names of ``module``'s forward parameters (its class's, read once per class)."""
    return _forward_parameters(type(module))


@functools.lru_cache(maxsize=None)
def _forward_parameters(cls: type) -> tuple[str, ...]:
    try:
        return tuple(inspect.signature(cls.forward).parameters)
    except (TypeError, ValueError):
        return ()


def embeddings_position(module: torch.nn.Module) -> int:
    """The index of :data:`EMBEDDINGS_ARGUMENT` among ``module``'s positional arguments."""
    return _parameters(module).index(EMBEDDINGS_ARGUMENT) - 1  # less ``self``
