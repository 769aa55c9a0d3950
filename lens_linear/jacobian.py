"""Jacobian engines: full Jacobians by batched vector-Jacobian products.

A full Jacobian of one output position needs ``d_out`` VJPs. They share one forward
graph and run as batched backward passes (``is_grads_batched``: one vmapped backward per
chunk of output rows), with chunks sized to a memory bound.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import torch
from jaxtyping import Float
from tqdm.auto import tqdm

DEFAULT_MEMORY = 128 << 20  # bytes of backward intermediates per chunk
MAX_ROWS = 128  # beyond this a chunk only costs memory: measured on 2 CPU cores, SmolLM2
# at 128 tokens, 24-row chunks ran in 69 s and 64-row chunks in 77 s; at 32 tokens 48 or 144
# rows took 17 s and one 576-row batch 27 s.


def chunk_rows(d_out: int, row_bytes: int, max_memory: int = DEFAULT_MEMORY, cap: int = MAX_ROWS) -> int:
    """How many rows (cotangents, or input directions) fit in ``max_memory``, at most ``cap``."""
    return max(1, min(d_out, cap, max_memory // max(1, row_bytes)))


def batched_vjp_jacobian(
    output: Float[torch.Tensor, "d_out"],
    inputs: Float[torch.Tensor, "*in_shape"],
    chunk_size: int,
    progress: bool = False,
) -> Float[torch.Tensor, "d_out *in_shape"]:
    """Rows ``∂output[i]/∂inputs`` for every ``i``, by chunked batched backward passes.

    ``output`` must be attached to a graph that contains ``inputs``; the graph is kept
    until the last chunk. Falls back to one backward per row (with a warning) where an op
    in the graph has no batching rule.
    """
    d_out = output.shape[0]
    eye = torch.eye(d_out, dtype=output.dtype, device=output.device)
    rows = []
    n_chunks = math.ceil(d_out / chunk_size)
    batched = True
    for k in tqdm(range(n_chunks), desc="Jacobian", disable=not progress, leave=False):
        cot = eye[k * chunk_size:(k + 1) * chunk_size]
        last = k == n_chunks - 1
        if batched:
            try:
                (grad,) = torch.autograd.grad(output, inputs, grad_outputs=cot, retain_graph=not last,
                                              is_grads_batched=True)
                rows.append(grad)
                continue
            except RuntimeError as exc:  # an op without a vmap rule
                warnings.warn(f"batched backward unavailable ({exc}); using one backward per row")
                batched = False
        rows.extend(torch.autograd.grad(output, inputs, grad_outputs=c, retain_graph=True)[0].unsqueeze(0)
                    for c in cot)
    return torch.cat(rows)


def jacobian_of(
    fn: Callable[[torch.Tensor], Float[torch.Tensor, "d_out"]],
    x: torch.Tensor,
    chunk_size: int,
    progress: bool = False,
) -> torch.Tensor:
    """Jacobian of ``fn`` at ``x`` from one forward pass and chunked batched VJPs."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        y = fn(x)
        return batched_vjp_jacobian(y, x, chunk_size, progress)


def forward_jacobians(
    apply: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    x: Float[torch.Tensor, "pos d_in"],
    chunk_size: int,
    progress: bool = False,
) -> dict[str, Float[torch.Tensor, "pos_in d_out d_in"]]:
    """Jacobians of an affine map at many outputs at once, one input direction at a time.

    ``apply`` maps a batch of inputs ``[batch, pos, d_in]`` to ``{name: [batch, d_out]}`` and
    must be affine (a replay of the frozen map). ``J e = (F(s e) − F(0)) / s`` for each basis
    direction ``e``: one batched forward gives a column of every requested Jacobian. The
    scale ``s`` (the inputs' typical norm) keeps cancellation against large biases small.
    """
    n_pos, d_in = x.shape
    n_dir = n_pos * d_in
    scale = float(x.norm(dim=-1).mean().clamp_min(1.0))
    with torch.no_grad():
        base = apply(torch.zeros_like(x)[None])
        cols: dict[str, list[torch.Tensor]] = {name: [] for name in base}
        for start in tqdm(range(0, n_dir, chunk_size), desc="Jacobians (forward)", disable=not progress, leave=False):
            idx = torch.arange(start, min(start + chunk_size, n_dir), device=x.device)
            basis = torch.zeros(len(idx), n_dir, dtype=x.dtype, device=x.device)
            basis[torch.arange(len(idx)), idx] = scale
            out = apply(basis.view(len(idx), n_pos, d_in))
            for name, value in out.items():
                cols[name].append((value - base[name]) / scale)
    return {name: torch.cat(c).view(n_pos, d_in, -1).transpose(1, 2).contiguous() for name, c in cols.items()}
