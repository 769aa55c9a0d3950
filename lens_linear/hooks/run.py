"""Running a model with hooks: attach for a duration, inject a value, capture others, stop early.

Every computation in this package is one of these runs: a recording, a replay of the frozen
map, a Jacobian's forward, a patched run. :func:`run_to` is the one place where a value is
injected at one hook, others are captured, and the forward stops once it has them.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from functools import partial
from typing import Any, Callable, Iterator, Sequence

import torch
from jaxtyping import Float, Int
from torch.func import functional_call

from lens_linear._validation import hook_key, require_hook
from lens_linear.hooks.contexts import (
    embeddings_tied,
    experts_eager,
    float64_throughout,
    offloaded_norms_loaded,
    patterns_inside,
    substitutes,
    weightless_norms_completed,
)
from lens_linear.hooks.guard import forward_running
from lens_linear.hooks.modules import ModuleHook, scan
from lens_linear.hooks.sites import INPUT_HOOK, hook_points

NameFilter = str | Callable[[str], bool]


Hook = tuple[NameFilter, Callable[..., Any]] | ModuleHook
_LEVELS = itertools.count(
    1 << 40
)  # hook context levels of our own, apart from TransformerLens' small ones


@contextlib.contextmanager
def quiet_bridge() -> Iterator[None]:
    """Silence the bridge's notices about edited hook values: that an edited ``hook_scale``
    takes its python norm path, and that a post-hoc ``hook_pattern`` edit is discarded (the
    latter is detected and reported by ``OperatingPoint.ignored_sites``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*hook_scale/hook_normalized.*")
        warnings.filterwarnings("ignore", message=r".*hook_pattern returned a modified tensor.*")
        yield


def resolve_hooks(
    hook_dict: dict[str, Any], hooks: Sequence[Hook]
) -> list[tuple[Any, Callable[..., Any]]]:
    """``(hook point, fn)`` for each hook; a callable name filter (as in ``run_with_hooks``)
    selects every matching hook point once, however many aliases a bridge lists it under."""
    points = []
    for name, fn in hooks:
        if callable(name):
            seen: set[int] = set()
            for key, point in hook_dict.items():
                if id(point) not in seen and name(key):
                    seen.add(id(point))
                    points.append((point, fn))
        elif hook_key(hook_dict, name) in hook_dict:
            points.append((hook_dict[hook_key(hook_dict, name)], fn))
        else:
            raise KeyError(name)
    return points


@contextlib.contextmanager
def hooks_on(model: Any, hooks: Sequence[Hook]) -> Iterator[None]:
    """Add forward hooks for the duration; removes exactly these hooks, even on error.

    The hook points are looked up in one read of ``hook_dict`` and the hooks attached at a
    context level of our own, so removal touches nothing else. (``model.hooks()`` reads
    ``hook_dict`` once per hook, and a TransformerLens 3.9 bridge rebuilds its aliases on
    every read: replaying 200 hooks spent most of its time there.)
    """
    with forward_running(model):  # a lens_linear call from a hook in here is refused
        yield from _hooks_on(model, hooks)


@contextlib.contextmanager
def model_contexts(model: Any, freezing: bool) -> Iterator[None]:
    """What a run needs of the model (see :mod:`lens_linear.hooks.contexts`): every run, the
    contexts that change no value (offloaded norms loaded, weight-free norms completed, a
    softmax computed inside the wrapped module passed through ``hook_pattern``, a layer's
    second read of the embeddings tied to the first layer's input), so a user's
    hook edits the same values in every run; a run that freezes coefficients (``freezing``),
    also the eager experts loop and float64 throughout. A run that freezes nothing (the
    ordinary Jacobian, real patching) computes what the model alone computes."""
    found = scan(model)
    with (
        offloaded_norms_loaded(model, found),
        weightless_norms_completed(model, found),
        patterns_inside(model, found),
        embeddings_tied(model, found),
        contextlib.ExitStack() as frozen,
    ):
        if freezing:
            frozen.enter_context(quiet_bridge())
            frozen.enter_context(experts_eager(model, found))
            frozen.enter_context(float64_throughout(model))
        yield


def _hooks_on(model: Any, hooks: Sequence[Hook]) -> Iterator[None]:
    level = next(_LEVELS)
    hook_dict = hook_points(model)
    on_modules = [h for h in hooks if isinstance(h, ModuleHook)]
    hooks = [h for h in hooks if not isinstance(h, ModuleHook)]
    missing = [
        name
        for name, _ in hooks
        if not callable(name) and hook_key(hook_dict, name) not in hook_dict
    ]
    if missing:
        require_hook(model, *missing)  # raises, naming close matches
    points = []
    try:
        with contextlib.ExitStack() as attached:
            freezing = bool(on_modules) or any(getattr(fn, "freezes", False) for _, fn in hooks)
            attached.enter_context(model_contexts(model, freezing))

            for point, fn in resolve_hooks(hook_dict, hooks):
                point.add_hook(fn, dir="fwd", level=level)
                points.append(point)
            for h in on_modules:
                attached.enter_context(h.attached())
            yield
    finally:
        for point in points:
            point.remove_hooks("fwd", level=level)


def forward(model: Any, tokens: torch.Tensor, hooks: Sequence[Hook] = ()) -> torch.Tensor:
    """The model's output on ``tokens`` with ``hooks`` on for this call only."""
    with hooks_on(model, hooks):
        swapped = substitutes(model)
        if swapped:  # biases_zeroed: zeros in place of the model's biases, for this forward only
            return functional_call(model, swapped, (tokens,), tie_weights=False, strict=False)
        return model(tokens)


class _Stop(Exception):
    """Ends a forward once every requested activation is captured."""


def run_to(
    model: Any,
    tokens: torch.Tensor,
    hooks: Sequence[Hook] = (),
    *,
    inject: tuple[str, torch.Tensor] | None = None,
    capture: Sequence[str] = (),
    pos: int | None = None,
    detach: bool = False,
) -> dict[str, torch.Tensor]:
    """Run ``model`` on ``tokens`` with ``hooks``, replace the value of hook ``inject[0]`` by
    ``inject[1]`` (same shape; cast to the hook's dtype) and return the values of ``capture``
    (at position ``pos`` only, where given; detached if ``detach``). The forward stops once
    every captured value is in: later layers and the unembedding never run."""
    out: dict[str, torch.Tensor] = {}
    wanted = set(capture)

    def put(value: torch.Tensor, hook: Any, new: torch.Tensor) -> torch.Tensor:
        if value.shape != new.shape:
            raise ValueError(
                f"the value injected at {inject[0]} must have shape {tuple(value.shape)}, "
                f"got {tuple(new.shape)}"
            )
        return new.to(value.dtype)

    def take(value: torch.Tensor, hook: Any, name: str) -> None:
        value = value if pos is None else value[:, pos]
        out[name] = value.detach() if detach else value
        if wanted.issubset(out):
            raise _Stop

    extra = [] if inject is None else [(inject[0], partial(put, new=inject[1]))]
    try:
        forward(model, tokens, [*hooks, *extra, *[(n, partial(take, name=n)) for n in wanted]])
    except _Stop:
        pass
    missing = wanted - set(out)
    if missing:
        raise RuntimeError(f"these hooks never fired during the forward pass: {sorted(missing)}")
    return out


def input_embeddings(
    model: Any, tokens: Int[torch.Tensor, "1 pos"]
) -> Float[torch.Tensor, "pos d_model"]:
    """The input variable ``x`` (``blocks.0.hook_resid_pre``) of ``tokens``; the forward stops there."""
    with torch.no_grad():
        return run_to(model, tokens, capture=[INPUT_HOOK], detach=True)[INPUT_HOOK][0]
