"""One lens_linear call per model at a time.

A call attaches hooks to the model's shared hook points and, while it runs, may swap what
some tensors hold (see :mod:`lens_linear.hooks.contexts`). A second call on the same model,
from another thread or from a user hook that calls back in during a forward, would run
under the first call's hooks (or add its own to the first call's forward) and fail deep
inside or return a wrong number. :func:`exclusive` turns that into a clear error naming the
call in progress. Calls nest freely in the thread that holds the model, outside its
forwards: that is how one call builds on another.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator
from weakref import WeakKeyDictionary

import torch

from lens_linear._validation import ModelInUseError


@dataclass
class _Call:
    name: str  # the outermost lens_linear function of the call
    thread: int
    depth: int = 0  # nested exclusive() contexts of this call
    forwards: int = 0  # forwards of the model running under this call
    memo: dict = field(default_factory=dict)  # what :func:`held` computed once for this call


_LOCK = threading.Lock()
_CALLS: WeakKeyDictionary[torch.nn.Module, _Call] = WeakKeyDictionary()


def _call_name() -> str:
    """The outermost ``lens_linear`` function on this thread's stack (cheap: a frame walk,
    once per call)."""
    name, frame = "lens_linear", inspect.currentframe()
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith("lens_linear"):
            code = frame.f_code
            name = f"{frame.f_globals['__name__']}.{getattr(code, 'co_qualname', code.co_name)}"
        frame = frame.f_back
    return name


def _refuse(call: _Call, why: str) -> ModelInUseError:
    return ModelInUseError(
        f"this model is in use by {call.name} ({why}): lens_linear attaches hooks to the "
        f"model's shared hook points, so two calls at once would act on each other's forwards. "
        f"Run one lens_linear call per model at a time (wait for the other thread, or call "
        f"lens_linear after the forward whose hook tried to call back in)."
    )


@contextlib.contextmanager
def exclusive(model: torch.nn.Module) -> Iterator[None]:
    """Hold ``model`` for this thread's call; raise :class:`ModelInUseError` if another
    thread holds it, or if this thread is inside one of its forwards (a hook calling back in)."""
    me = threading.get_ident()
    with _LOCK:
        call = _CALLS.get(model)
        if call is None:
            call = _CALLS[model] = _Call(_call_name(), me)
        elif call.thread != me:
            raise _refuse(call, "in another thread")
        elif call.forwards:
            raise _refuse(call, "called from inside its forward, or inside `detached(model)`")
        call.depth += 1
    try:
        yield
    finally:
        with _LOCK:
            call.depth -= 1
            if not call.depth:
                del _CALLS[model]


@contextlib.contextmanager
def forward_running(model: torch.nn.Module) -> Iterator[None]:
    """Mark a forward of ``model`` under the current call: user hooks run in it, and a
    lens_linear call from one of them is refused."""
    with exclusive(model):
        call = _CALLS[model]
        call.forwards += 1
        try:
            yield
        finally:
            call.forwards -= 1


def held(model: torch.nn.Module, key: str, compute: Callable[[], Any]) -> Any:
    """``compute()``, once per call that holds ``model`` (:func:`exclusive`): while a call holds
    it, no other thread runs it and our own code changes none of its modules, so what depends
    on its structure alone (its hook points, the coefficient sites, its biases) is read once
    per call instead of at every use. Outside a call, computed each time."""
    call = _CALLS.get(model)
    if call is None or call.thread != threading.get_ident():
        return compute()
    if key not in call.memo:
        call.memo[key] = compute()
    return call.memo[key]
