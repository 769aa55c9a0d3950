"""Jacobian engines: full Jacobians by batched vector-Jacobian products.

A full Jacobian of one output position needs ``d_out`` VJPs. They share one forward
graph and run as batched backward passes (``is_grads_batched``: one vmapped backward per
chunk of output rows), with chunks sized to a memory bound.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Sequence

import torch
from jaxtyping import Float
from tqdm.auto import tqdm

FORWARD_PASS_COST = 1.8  # forward token-layer pass vs backward row: measured on 2 CPU cores, a
# batched forward ran at 17k token-layers/s and a batched backward row at 30k/s


def cheaper_engine(
    depths: dict[str, int], widths: dict[str, int], n_pos: int, d_in: int, pos: int
) -> str:
    """``"forward"`` or ``"reverse"``, by counted token-layer passes (n positions, output at ``pos``).

    * reverse: one batched-VJP Jacobian per hook, each row a backward through the hook's
      depth over all positions: ``n · Σ_hooks depth · d_out`` (layers² · n · d for every layer).
    * forward: one replay per input direction, every hook read off the same pass; a direction
      at position ``i`` runs on positions ``i..`` only: ``d_in · Σ_{i≤pos} (n − i) · depth_max``.
    """
    reverse = sum(depths[h] * widths[h] for h in depths) * n_pos
    forward = (
        FORWARD_PASS_COST * d_in * sum(n_pos - i for i in range(pos + 1)) * max(depths.values())
    )
    return "forward" if forward < reverse else "reverse"


def batched_vjp_jacobian(
    output: Float[torch.Tensor, "d_out"],  # noqa: F821
    inputs: Float[torch.Tensor, "pos_in *rest"],  # noqa: F821
    chunk_size: int,
    progress: bool = False,
    cotangents: Float[torch.Tensor, "rows d_out"] | None = None,
) -> Float[torch.Tensor, "pos_in rows *rest"]:
    """Rows ``∂output[i]/∂inputs`` for every ``i``, by chunked batched backward passes
    (or, given ``cotangents``, the products ``uᵀ ∂output/∂inputs`` for each row ``u``).

    ``output`` must be attached to a graph that contains ``inputs``; the graph is kept
    until the last chunk. Each chunk is written straight into its place in the result
    (laid out per input position), so no list of chunks or transposed copy is ever held.
    Falls back to one backward per row (with a warning) where an op in the graph has no
    batching rule.
    """
    eye = (
        torch.eye(output.shape[0], dtype=output.dtype, device=output.device)
        if cotangents is None
        else cotangents.to(output)
    )
    d_out = eye.shape[0]
    if not output.requires_grad:  # a frozen coefficient (or a value the input cannot reach)
        return inputs.new_zeros(inputs.shape[0], d_out, *inputs.shape[1:])
    jac = inputs.new_empty(inputs.shape[0], d_out, *inputs.shape[1:])

    def take(rows: slice, grads: Sequence[torch.Tensor]) -> None:
        jac[:, rows] = grads[0].transpose(0, 1)

    pullback_rows(output, [inputs], lambda rows: eye[rows], d_out, chunk_size, take, progress)
    return jac


def pullback_rows(
    output: torch.Tensor | Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    cotangent: Callable[[slice], torch.Tensor | Sequence[torch.Tensor]],
    n_rows: int,
    chunk: int,
    take: Callable[[slice, Sequence[torch.Tensor]], None],
    progress: bool = False,
    keep_graph: bool = False,
) -> None:
    """Pull ``n_rows`` cotangents of ``output`` back to every tensor of ``inputs``, ``chunk``
    rows per batched backward pass; ``take(rows, grads)`` consumes each chunk's gradients
    (``[rows, *input.shape]`` each) before the next is made. Falls back to one backward per
    row, with a warning, where an op in the graph has no batching rule. ``output`` may be
    several tensors, ``cotangent`` then giving one batch of rows for each; ``keep_graph`` keeps
    the graph for later pullbacks."""
    n_chunks = math.ceil(n_rows / chunk)
    batched = True
    for k in tqdm(range(n_chunks), desc="Jacobian", disable=not progress, leave=False):
        rows = slice(k * chunk, min((k + 1) * chunk, n_rows))
        last = k == n_chunks - 1
        if batched:
            try:
                grads = torch.autograd.grad(
                    output,
                    list(inputs),
                    grad_outputs=cotangent(rows),
                    retain_graph=keep_graph
                    or not last
                    or k == 0,  # kept after a first try: it may fail
                    is_grads_batched=True,
                )
                take(rows, grads)
                continue
            except RuntimeError as exc:
                warnings.warn(f"batched backward unavailable ({exc}); using one backward per row")
                batched = False
        for row in range(rows.start, rows.stop):
            one = cotangent(slice(row, row + 1))
            one = one[0] if isinstance(one, torch.Tensor) else [c[0] for c in one]
            grads = torch.autograd.grad(output, list(inputs), grad_outputs=one, retain_graph=True)
            take(slice(row, row + 1), [g[None] for g in grads])


def forward_jacobians(
    apply: Callable[[int, torch.Tensor], dict[str, torch.Tensor]],
    n_pos: int,
    d_in: int,
    pos: int,
    chunk_size: int,
    like: torch.Tensor,
    progress: bool = False,
) -> dict[str, Float[torch.Tensor, "pos_in d_out d_in"]]:
    """Jacobians of a frozen causal map at many outputs at once, one input direction each.

    ``apply(start, x)`` runs the map on the suffix of the sequence that begins at position
    ``start`` (inputs ``[batch, n_pos - start, d_in]``) and returns ``{name: [batch, d_out]}``
    at output position ``pos``. A direction at input position ``i`` cannot reach positions
    before ``i`` (causal attention), and once the patterns are frozen nothing depends on
    absolute position, so it is run on positions ``i..`` only: half the work of full-length
    passes. Each batch carries one zero input, subtracted from the others (``J e = F(e) − F(0)``).
    """
    jacs: dict[str, torch.Tensor] = {}  # filled in place: no list of chunks, no final copy
    steps = [(i, k) for i in range(pos + 1) for k in range(0, d_in, chunk_size)]
    with torch.no_grad():
        for i, k in tqdm(steps, desc="Jacobians (forward)", disable=not progress, leave=False):
            dims = torch.arange(k, min(k + chunk_size, d_in), device=like.device)
            x = torch.zeros(len(dims) + 1, n_pos - i, d_in, dtype=like.dtype, device=like.device)
            x[torch.arange(len(dims), device=like.device), 0, dims] = 1.0
            for name, value in apply(i, x).items():
                if name not in jacs:  # inputs after pos do not reach it: those stay zero
                    jacs[name] = torch.zeros(
                        n_pos, value.shape[-1], d_in, dtype=like.dtype, device=like.device
                    )
                jacs[name][i, :, k : k + len(dims)] = (value[:-1] - value[-1:]).T
    return jacs
