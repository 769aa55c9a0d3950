"""A frozen value recorded in one run, fitted to a later one.

A value is recorded for one prompt (batch 1) at every position. A replay may run a batch, the
last positions alone (a suffix), or perturb a site by a per-batch-element factor; some models
flatten batch and positions (and heads) into one leading dimension inside a block. Batch and
positions are the only dimensions a replay changes: these functions fit a recorded value to
them.
"""

from __future__ import annotations

import torch

from lens_linear.hooks.sites import Site


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


def broadcast(stored: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A recorded value (batch 1) for a batch: expand, or tile where batch and positions are
    flattened into one leading dimension (as some models do inside their MLP)."""
    return fit_to(stored, like, max(like.shape[0] // stored.shape[0], 1))


def fit_positions(stored: torch.Tensor, like: torch.Tensor, n_pos: int) -> torch.Tensor:
    """A value recorded for one prompt, for a run of ``like``'s shape over the last ``n_pos``
    positions: tokens flattened first (``[pos, ...]`` → ``[batch·pos, ...]``) or batch first."""
    return fit_to(stored, like, max(like.shape[0] // n_pos, 1))


def spread(factor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-batch-element factor for a value whose leading dim may be batch × positions."""
    if factor.ndim == 0:
        return factor
    if factor.shape[0] != like.shape[0]:
        factor = factor.repeat_interleave(like.shape[0] // factor.shape[0], dim=0)
    return factor.expand_as(like)


def replayed(stored: torch.Tensor, like: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
    """A recorded coefficient for a replay of ``like``'s shape (:func:`broadcast`), times the
    per-batch-element ``factor`` where one is given (:func:`spread`)."""
    value = broadcast(stored, like)
    return value if factor is None else value * spread(factor, like)


def scaled(value: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
    """``value · factor`` for a floating-point value (``factor`` broadcast over it); ``value``
    itself without a factor or for an integer value (an expert's index)."""
    return value if factor is None or not value.is_floating_point() else value * factor


def cut_positions(site: Site, value: torch.Tensor, keep: slice, batch: int, n: int) -> torch.Tensor:
    """A frozen value of ``batch`` prompts of ``n`` positions cut to positions ``keep``:
    patterns on both query and key axes; values whose leading dimension flattens batch and
    positions (as some MLPs have) are cut per prompt."""
    if site.kind in ("attn", "softmax"):
        return value[:, :, keep, keep]
    if value.shape[0] == batch * n != batch:
        return value.reshape(batch, n, *value.shape[1:])[:, keep].flatten(0, 1)
    return value[:, keep]


def input_ratio(out: torch.Tensor, t: torch.Tensor, at_zero: float | torch.Tensor) -> torch.Tensor:
    """``out / t`` (a nonlinearity's ratio to its input), ``at_zero`` where ``t`` is zero;
    detached."""
    with torch.no_grad():
        return torch.where(t != 0, out / torch.where(t != 0, t, 1), at_zero)


def frozen_linear(
    out: torch.Tensor,
    t: torch.Tensor,
    coefficient: torch.Tensor | float | None = None,
    factor: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out`` in value, ``coefficient · t`` in gradient (``t`` alone without a coefficient):
    a coefficient frozen at recording. With a ``factor`` (value 1, a site's in a recording
    that is checked), the value is ``out · factor``: the gradient with respect to the factor
    is ``out``, and the path from ``t`` carries no extra product."""
    value = out.detach() if factor is None else out.detach() * factor
    linear = t - t.detach()
    return value + (linear if coefficient is None else linear * coefficient)
