"""The verification maths: random projections that test a frozen map with a few products.

``uᵀ(J⁺x + c) = uᵀ y`` for a few random ``u`` tests a Jacobian with a few VJPs: a wrong one
passes with probability zero. Projections are seeded on the CPU (the same numbers on every
device; the user's RNG untouched) and centred, so they measure the relative error as ``std()``
does. The checks themselves are :meth:`OperatingPoint.check_sites` and the checks of
:class:`lens_linear.LinearCache`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from jaxtyping import Float


@dataclass(frozen=True)
class SiteCheck:
    """What :meth:`OperatingPoint.check_sites` found: the sites whose value never reaches the
    output; on a whole-prompt replay, the projected reconstruction error and (asked for) the
    replay's graph, the output at every position and the input leaf it was computed from."""

    ignored: list[str]
    error: float | None = None
    graph: tuple[Float[torch.Tensor, "pos d_out"], Float[torch.Tensor, "pos d_in"]] | None = None
    # the constant no bias explains, relative to the output, projected like ``error``: from the
    # same backward, with respect to every bias (None: not computed)
    unexplained: float | None = None


def batched_grad(
    y: torch.Tensor, inputs: list[torch.Tensor], u: torch.Tensor, retain_graph: bool = False
) -> list[torch.Tensor | None]:
    """``uₖᵀ ∂y/∂input`` for every row ``k`` of ``u`` and every input (``None``: no path), as one
    batched backward, or one backward per row where an op in the graph has no batching rule."""
    try:
        return list(
            torch.autograd.grad(
                y,
                inputs,
                grad_outputs=u,
                retain_graph=True if retain_graph else None,
                is_grads_batched=True,
                allow_unused=True,
            )
        )
    except RuntimeError:
        rows = [
            torch.autograd.grad(y, inputs, grad_outputs=row, retain_graph=True, allow_unused=True)
            for row in u
        ]
        return [
            None if any(g is None for g in column) else torch.stack(column)
            for column in map(list, zip(*rows))
        ]


def centred_projections(
    n: int, shape: Sequence[int], like: torch.Tensor, seed: int
) -> torch.Tensor:
    """``n`` seeded Gaussian rows of ``shape``, each centred: ``u · t`` then projects
    ``t − mean(t)``, as the relative error's ``std()`` measures."""
    u = seeded_randn((n, *shape), like, seed)
    return u - u.flatten(1).mean(1).reshape(-1, *[1] * len(shape))


def projected_error(
    u: torch.Tensor,
    pulled_x: Float[torch.Tensor, "rows"],  # noqa: F821
    constant: torch.Tensor | None,
    target: torch.Tensor,
) -> float:
    """``‖U(J⁺x + c − t)‖ / ‖U t‖`` from ``pulled_x = (Uᵀ J⁺) · x`` (one value per row of ``U``),
    the constant ``c`` (``None``: none) and the target ``t``, in float64."""
    rows = u.double().flatten(1)
    reconstructed = pulled_x.double() + (
        0 if constant is None else rows @ constant.double().reshape(-1)
    )
    expected = rows @ target.double().reshape(-1)
    return float((reconstructed - expected).norm() / expected.norm().clamp_min(1e-300))


def seeded_randn(shape: Sequence[int], like: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Standard normal values from a seeded CPU generator (the same numbers on every device;
    the user's RNG untouched), placed like ``like``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float64, device="cpu").to(like)
