"""Every use of another package's private names, in one place.

TransformerLens, Hugging Face transformers, accelerate and torch keep some state this package
must read or set under private names (a wrapped module, an implementation switch, a hook
table). Each access is one named function here, with the versions it was checked on, and
either a documented fallback where the name is normally absent (an older version, a model
without accelerate) or a ``RuntimeError`` naming the package, the attribute and the installed
version where a required name has disappeared. No other module reads a private name of
another package.

Checked on: torch 2.13.0, TransformerLens 4.3.0 and 3.9.0, transformers 5.25.0 (and 4.51.0
where noted), accelerate 1.16.0.
"""

from __future__ import annotations

import functools
from importlib import metadata
from typing import Any, Callable

import torch
import torch.nn.functional as F


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _missing(package: str, attribute: str, what: str) -> RuntimeError:
    return RuntimeError(
        f"{package} {_version(package)} no longer has {attribute} ({what}); lens_linear reads it "
        f"(see lens_linear/_compat.py for the versions it was checked on). Install a version "
        f"that has it, or report this incompatibility."
    )


# ---- torch ---------------------------------------------------------------------------------


def _child_modules(module: torch.nn.Module) -> dict[str, Any]:
    """``module._modules``: its registered children by name, read without going through a
    module's ``__getattr__`` (a bridge component delegates that to its wrapped module).
    torch 2.1 to 2.13: every ``nn.Module`` has it. Required."""
    children = vars(module).get("_modules")
    if children is None:
        raise _missing("torch", "nn.Module._modules", "a module's children by name")
    return children


def module_hook_count(module: torch.nn.Module) -> int:
    """How many forward hooks and forward pre-hooks ``module`` holds (``_forward_hooks``,
    ``_forward_pre_hooks``; torch has no public listing). torch 2.1 to 2.13. Required."""
    try:
        return len(module._forward_hooks) + len(module._forward_pre_hooks)
    except AttributeError:
        raise _missing(
            "torch", "nn.Module._forward_hooks/_forward_pre_hooks", "a module's forward hooks"
        ) from None


@functools.cache
def flash_attention_cpu() -> Callable[..., Any] | None:
    """torch's fused CPU attention kernel ``aten._scaled_dot_product_flash_attention_for_cpu``
    (returns ``(out, logsumexp, ...)``; a ``scale`` keyword from torch 2.3 on; checked on 2.13),
    which gives each row's log-normalizer that the public ``scaled_dot_product_attention``
    does not return. ``None`` before torch 2.3 or where the op is gone: the fallback is
    computing a block of pattern rows at a time (:mod:`lens_linear.hooks.patterns`)."""
    version = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    if version < (2, 3):
        return None
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


Kernel = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]
]


def cpu_kernel(op: Callable[..., Any]) -> Kernel:
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
        out, lse = op(q, k, v, 0.0, True, scale=scale)[:2]
        return out, lse

    return attend


def cuda_kernel(op: Callable[..., Any]) -> Kernel:
    """``aten._scaled_dot_product_efficient_attention`` (CUDA; returns ``(out, logsumexp,
    seed, offset)`` with ``compute_log_sumexp=True``, the rows' log-normalizers padded to a
    multiple of 32): head dimensions zero-padded to a multiple of 8 (zeros change no dot
    product), the padding cut off the output and the log-normalizers."""

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
        width, d_v = -q.shape[-1] % 8, v.shape[-1]
        q, k = F.pad(q, (0, width)), F.pad(k, (0, width))
        v = F.pad(v, (0, -d_v % 8))
        out, lse = op(q, k, v, None, True, 0.0, True, scale=scale)[:2]
        return out[..., :d_v], lse[..., : q.shape[-2]]

    return attend


@functools.cache
def fused_attention(device_type: str, dtype: torch.dtype) -> Kernel | None:
    """torch's fused causal attention that also returns each row's log-normalizer, for
    tensors ``[batch, head, pos, d]`` of ``dtype`` on ``device_type``: the CPU flash kernel
    (:func:`flash_attention_cpu`) or, on CUDA, the memory-efficient kernel. Each is checked
    once per process on small inputs (odd head sizes, a bias dimension as the transpose uses)
    against the softmax computed explicitly, and used only where it agrees: a kernel that is
    missing, refuses the inputs or disagrees gives ``None`` (blocks of pattern rows instead),
    never a wrong product."""
    if device_type == "cpu":
        op = flash_attention_cpu()
        kernel = None if op is None else cpu_kernel(op)
    elif device_type == "cuda":
        op = getattr(torch.ops.aten, "_scaled_dot_product_efficient_attention", None)
        kernel = None if op is None else cuda_kernel(op)
    else:
        kernel = None
    if kernel is None:
        return None
    try:
        agrees = kernel_agrees(kernel, device_type, dtype)
    except Exception:  # noqa: BLE001 - a kernel that refuses these inputs is not used
        agrees = False
    return kernel if agrees else None


def kernel_agrees(kernel: Kernel, device_type: str, dtype: torch.dtype) -> bool:
    gen = torch.Generator().manual_seed(0)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for n, d in ((5, 3), (37, 7), (70, 65)):
        q, k, v = (torch.randn(2, 3, n, d, generator=gen, dtype=torch.float64) for _ in range(3))
        scores = (q @ k.transpose(-1, -2) * 0.6).masked_fill(
            torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf")
        )
        out, lse = kernel(*(t.to(device_type, dtype) for t in (q, k, v)), 0.6)
        expected = (scores.softmax(-1) @ v, scores.logsumexp(-1))
        for got, want in zip((out, lse), expected):
            if got.shape != want.shape or float((got.double().cpu() - want).abs().max()) > tol * (
                1 + float(want.abs().max())
            ):
                return False
    return True


# ---- TransformerLens ---------------------------------------------------------------------------


@functools.cache
def _bridge_keeps_original_component() -> bool:
    """Whether a TransformerBridge component still registers its wrapped module as the child
    ``_original_component`` (TransformerLens 3.9.0 and 4.3.0: ``set_original_component`` does
    ``add_module("_original_component", ...)``). ``True`` where TransformerLens has no bridge."""
    try:
        from transformer_lens.model_bridge.generalized_components.base import (
            GeneralizedComponent,
        )
    except ImportError:
        return True
    probe = GeneralizedComponent("probe")
    probe.set_original_component(torch.nn.Identity())
    return "_original_component" in _child_modules(probe)


def original_component(module: Any) -> torch.nn.Module | None:
    """The Hugging Face module a TransformerBridge component wraps (its child
    ``_original_component``), or ``None`` for anything else (a Hugging Face module, a
    HookedTransformer component, ``None``): absence is normal. Read from the children directly,
    not through the public ``original_component`` property, which some components override to
    return another module (LLaDA's attention returns its owning block) and which costs a
    bridge's attribute delegation on other modules. TransformerLens 3.9.0 and 4.3.0; raises
    ``RuntimeError`` where a bridge no longer registers it so."""
    if not isinstance(module, torch.nn.Module):
        return None
    inner = _child_modules(module).get("_original_component")
    if inner is None and not _bridge_keeps_original_component():
        raise _missing(
            "transformer-lens",
            "GeneralizedComponent._original_component",
            "the Hugging Face module a bridge component wraps",
        )
    return inner


# ---- Hugging Face transformers -------------------------------------------------------------


def attn_implementation(config: Any) -> str | None:
    """A Hugging Face config's attention implementation (``config._attn_implementation``:
    ``"eager"``, ``"sdpa"``, ...). transformers 4.51.0 and 5.25.0. Required."""
    if not hasattr(config, "_attn_implementation"):
        raise _missing("transformers", "PretrainedConfig._attn_implementation", "attention kernel")
    return config._attn_implementation


def set_attn_implementation(config: Any, implementation: str) -> None:
    """Set a config's attention implementation before a model is built from it (a built model
    has the public ``set_attn_implementation``). transformers 4.51.0 and 5.25.0. Required."""
    attn_implementation(config)  # raises where the attribute is gone
    config._attn_implementation = implementation


def experts_implementation(config: Any) -> str | None:
    """A config's mixture-of-experts implementation (``config._experts_implementation``:
    ``"eager"`` is the per-expert loop), or ``None`` where the config has none: transformers
    before 5 (4.51.0 has no such switch: its experts always loop). Checked on 5.25.0."""
    return getattr(config, "_experts_implementation", None)


def has_experts_implementation(config: Any) -> bool:
    """Whether ``config`` has the experts implementation switch (see
    :func:`experts_implementation`)."""
    return hasattr(config, "_experts_implementation")


def set_experts_implementation(config: Any, implementation: str | None) -> None:
    """Set a config's mixture-of-experts implementation where it has the switch (transformers
    5.25.0); nothing where it has none (before transformers 5, the loop is the only one)."""
    if has_experts_implementation(config):
        config._experts_implementation = implementation


def is_experts_module(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a Hugging Face experts module whose implementation the config
    chooses: ``use_experts_implementation`` gives such classes the method ``_apply_gate``
    (transformers 5.25.0). ``False`` before transformers 5 (4.51.0 has no such classes)."""
    return hasattr(type(module), "_apply_gate")


# ---- accelerate ----------------------------------------------------------------------------


def accelerate_hooks(module: torch.nn.Module) -> list[Any]:
    """The accelerate hooks on ``module`` (``module._hf_hook``, a ``SequentialHook``'s
    ``hooks`` flattened), each with ``pre_forward``/``post_forward`` and, for offloading,
    ``offload`` and ``weights_map``. Empty where accelerate has put none there (no accelerate,
    or a module not dispatched): absence is normal. Read as an attribute, so a bridge component
    answers with its wrapped module's hooks. accelerate 1.16.0."""
    top = getattr(module, "_hf_hook", None)
    if top is None:
        return []
    return list(getattr(top, "hooks", None) or [top])


# ---- Hugging Face ---------------------------------------------------------------------------


def model_revision(model: Any) -> str | None:
    """The Hugging Face commit a bridge's model was loaded at (``config._commit_hash``, as
    TransformerLens' Jacobian lens records it); ``None`` for a local or hooked model."""
    config = getattr(getattr(model, "original_model", None), "config", None)
    revision = getattr(config, "_commit_hash", None)
    return revision if isinstance(revision, str) and revision else None
