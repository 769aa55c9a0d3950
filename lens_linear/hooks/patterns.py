"""Frozen attention patterns kept as their queries and keys: O(n·d) memory instead of O(n²).

A softmax attention's pattern is a function of its (rotated) queries and keys alone:
``P = softmax(scale · q kᵀ + causal mask)``. Recording ``q``, ``k`` and ``scale`` freezes
``P`` as surely as recording ``P``, for ``heads · n · d`` values per layer instead of
``heads · n²`` (4.5 GB at 2,048 tokens on SmolLM2, 72 GB at 8,192). The replay then computes
``z = P v`` itself (as torch's fused attention kernel on a CPU or a CUDA GPU, elsewhere a
block of query rows at a time) and recomputes ``P`` in the backward pass instead of keeping it: no replay,
forward or backward, ever holds more than one block of one layer's pattern.

The recipe is verified at recording, per layer, against the model's own ``hook_pattern``
and ``hook_z`` (a head's attention-sink logit, as gpt-oss has, is read off the first row and
joins every row's normalizer; a sliding window shorter than the prompt is read off the last
row's mask, and such a layer is computed a block of rows at a time); a layer where it does not
hold (softcapping, an output gate before ``hook_z``, a user hook on the pattern)
keeps its stored pattern. A suffix replay (positions ``start..``) reads rows ``start..`` of
the *full* pattern, normalised over every key, so it is exact as stored patterns are.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float

from lens_linear._compat import Kernel, fused_attention
from lens_linear._validation import tolerance
from lens_linear.memory import row_block

# P v and Pᵀ g run as torch's fused attention kernel where one verifies for the device and
# dtype (on a CPU 2.6x and 4.8x faster than blocks of rows at 2,048 tokens, SmolLM2's shapes);
# False: blocks of rows everywhere
FUSED = True


@dataclass
class FrozenAttention:
    """One layer's frozen pattern as ``softmax(scale · q kᵀ + causal mask)``."""

    q: Float[torch.Tensor, "pos head d_head"]
    k: Float[torch.Tensor, "pos kv_head d_head"]
    scale: float
    max_memory: int | None = None  # the call's budget: sizes the blocks of pattern rows
    # each head's attention-sink logit (gpt-oss): one more term in every row's normalizer,
    # whose probability is dropped, so the rows sum to less than one
    sink: Float[torch.Tensor, "head"] | None = None  # noqa: F821
    # a sliding window (Gemma 2/3, gpt-oss, Mistral): query i sees keys i - window < j <= i
    window: int | None = None

    def to(self, dtype: torch.dtype) -> "FrozenAttention":
        sink = None if self.sink is None else self.sink.to(dtype)
        return dataclasses.replace(self, q=self.q.to(dtype), k=self.k.to(dtype), sink=sink)

    def _blocks(self, start: int) -> list[slice]:
        """Query rows ``start..n`` in blocks of at most a quarter of the budget
        (:func:`lens_linear.memory.row_block`; a block computes keys up to its own last row
        only, so small blocks skip most of the masked upper triangle)."""
        n, heads = self.q.shape[0], self.q.shape[1]
        size = row_block(heads, n, self.max_memory, self.q.device)
        return [slice(r, min(r + size, n)) for r in range(start, n, size)]

    @functools.cached_property
    def _keys(self) -> torch.Tensor:  # [head, d_head, pos], float32 or wider, shared by every block
        k = self.k.repeat_interleave(self.q.shape[1] // self.k.shape[1], dim=1)
        return k.to(torch.promote_types(k.dtype, torch.float32)).permute(1, 2, 0).contiguous()

    def rows(self, rows: slice, start: int = 0) -> Float[torch.Tensor, "head rows keys"]:
        """Rows ``rows`` of the pattern (every head), keys ``start..rows.stop`` (the later ones
        are masked) of the softmax over every key."""
        keys = self._keys[..., : rows.stop]
        scores = (self.q[rows].to(keys.dtype).transpose(0, 1) @ keys) * self.scale
        size = rows.stop - rows.start
        diagonal = torch.ones(size, size, dtype=torch.bool, device=keys.device).triu(1)
        scores[..., rows.start :].masked_fill_(diagonal, float("-inf"))
        if self.window is not None:  # keys at or before i - window
            i = torch.arange(rows.start, rows.stop, device=keys.device)[:, None]
            j = torch.arange(rows.stop, device=keys.device)[None]
            scores.masked_fill_(j <= i - self.window, float("-inf"))
        if self.sink is not None:  # the sink's column joins the softmax, then is dropped
            sink = self.sink.to(scores)[:, None, None].expand(-1, size, 1)
            return torch.cat([scores, sink], -1).softmax(-1)[..., :-1].to(self.q.dtype)[..., start:]
        return scores.softmax(-1).to(self.q.dtype)[..., start:]

    def pattern(self) -> Float[torch.Tensor, "head query key"]:
        n = self.q.shape[0]
        return torch.cat(
            [F.pad(self.rows(block), (0, n - block.stop)) for block in self._blocks(0)], dim=1
        )

    def prefix(self, end: int) -> "FrozenAttention":
        """The first ``end`` positions' pattern (causal: the same rows, cut). The fused path's
        rows' log-normalizers are computed once here and shared by every prefix."""
        cut = dataclasses.replace(self, q=self.q[:end], k=self.k[:end])
        if self.fused:
            cut._lse = self._lse[:, :end]
        return cut

    @property
    def _kernel(self) -> Kernel | None:
        if not FUSED or self.window is not None:  # the kernels' mask is causal only
            return None
        wide = torch.promote_types(self.q.dtype, torch.float32)
        return fused_attention(self.q.device.type, wide)

    @property
    def fused(self) -> bool:
        """Whether :meth:`apply` and :meth:`apply_t` run as torch's fused attention kernel
        (``FUSED``, where one verifies for this device and dtype:
        :func:`lens_linear._compat.fused_attention`); elsewhere a block of pattern rows at a time."""
        return self._kernel is not None

    @functools.cached_property
    def _lse(self) -> Float[torch.Tensor, "head pos"]:
        """Each row's log-normalizer ``L_i = log Σ_j exp(scores_ij)``, so that
        ``P_ij = exp(scores_ij − L_i)``: what a suffix or the transpose needs of the full rows."""
        q, k = self._heads_first()
        lse = self._kernel(q[None], k[None], q[None], self.scale)[1][0]
        return lse if self.sink is None else torch.logaddexp(lse, self.sink.to(lse)[:, None])

    def _heads_first(self, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``q`` and ``k`` (every query head) from ``start``, ``[head, pos, d]``, float32 or wider."""
        wide = torch.promote_types(self.q.dtype, torch.float32)
        k = self.k[start:].repeat_interleave(self.q.shape[1] // self.k.shape[1], dim=1)
        return self.q[start:].to(wide).transpose(0, 1), k.to(wide).transpose(0, 1)

    def _apply_fused(self, v: torch.Tensor, start: int) -> torch.Tensor:
        """``P v`` on rows and keys ``start..``: the kernel's softmax over those keys, rescaled
        by ``exp(L'_i − L_i)`` to the full rows' normalizer."""
        q, k = self._heads_first(start)
        batch = v.shape[0]
        out, lse = self._kernel(
            q.expand(batch, -1, -1, -1), k.expand(batch, -1, -1, -1), v.to(q), self.scale
        )
        if start or self.sink is not None:
            out = out * (lse - self._lse[:, start:]).exp()[..., None]
        else:  # the full rows' log-normalizers come with the output: keep them (same q, k in every batch entry)
            self.__dict__.setdefault("_lse", lse[0])
        return out.to(v.dtype)

    def _apply_t_fused(self, g: torch.Tensor, start: int) -> torch.Tensor:
        """``Pᵀ g`` as an attention from keys to queries: ``(Pᵀ g)_j = Σ_{i ≥ j} exp(s_ij − L_i) g_i``
        is a softmax over ``i`` of the scores ``s_ij − L_i`` (a bias folded into one more
        dimension of ``q`` and ``k``), times its normalizer; reversing the positions turns
        ``i ≥ j`` into the kernel's causal mask."""
        q, k = self._heads_first(start)
        bias = (-self._lse[:, start:] / self.scale)[..., None].to(q)
        queries = torch.cat([k, torch.ones_like(bias)], -1).flip(1)
        keys = torch.cat([q, bias], -1).flip(1)
        batch = g.shape[0]
        values = F.pad(g.to(q), (0, 1)).flip(2)
        out, lse = self._kernel(
            queries.expand(batch, -1, -1, -1), keys.expand(batch, -1, -1, -1), values, self.scale
        )
        return (out[..., :-1] * lse.exp()[..., None]).flip(2).to(g.dtype)

    def apply(
        self, v: Float[torch.Tensor, "batch m kv_head d_head"]
    ) -> Float[torch.Tensor, "batch m head d_head"]:
        """``z = P v`` for the last ``m`` positions (a suffix replay: rows and columns ``n − m..``)."""
        n, m, heads = self.q.shape[0], v.shape[1], self.q.shape[1]
        start = n - m
        v = v.repeat_interleave(heads // v.shape[2], dim=2).transpose(1, 2)  # [batch, head, m, d]
        if self.fused:
            return self._apply_fused(v, start).transpose(1, 2)
        return torch.cat(
            [
                (self.rows(block, start).to(v) @ _part(v, 2, 0, block.stop - start)).transpose(1, 2)
                for block in self._blocks(start)
            ],
            dim=1,
        )

    def apply_t(
        self, g: Float[torch.Tensor, "batch m head d_head"]
    ) -> Float[torch.Tensor, "batch m kv_head d_head"]:
        """``Pᵀ g``, summed over the heads sharing a key/value head: the backward of :meth:`apply`."""
        n, m, heads, kv_heads = self.q.shape[0], g.shape[1], self.q.shape[1], self.k.shape[1]
        start = n - m
        g = g.transpose(1, 2)  # [batch, head, m, d]
        if self.fused:
            out = self._apply_t_fused(g, start).transpose(1, 2)
            return out.reshape(*out.shape[:2], kv_heads, heads // kv_heads, out.shape[-1]).sum(3)
        out = None
        for block in self._blocks(start):
            part = _part(g, 2, block.start - start, block.stop - block.start)
            term = F.pad(
                self.rows(block, start).to(g).transpose(-1, -2) @ part, (0, 0, 0, n - block.stop)
            )
            out = term if out is None else out + term
        out = out.transpose(1, 2)
        return out.reshape(*out.shape[:2], kv_heads, heads // kv_heads, out.shape[-1]).sum(3)


def _part(t: torch.Tensor, dim: int, start: int, length: int) -> torch.Tensor:
    """``t.narrow(dim, start, length)``, or ``t`` itself where that is all of it (vmap, which
    runs the backward of a batched Jacobian, has no rule for the alias a full slice makes)."""
    return t if start == 0 and length == t.shape[dim] else t.narrow(dim, start, length)


class _Attend(torch.autograd.Function):
    """``P v`` (or ``Pᵀ g`` with ``transposed``) with ``P`` frozen and recomputed where needed,
    never saved. Each direction's backward is the other direction through this same function,
    so a graph built through a backward (``create_graph``, as the matrix-free SVD builds one)
    saves no pattern either."""

    @staticmethod
    def forward(x: torch.Tensor, attention: FrozenAttention, transposed: bool) -> torch.Tensor:
        return attention.apply_t(x) if transposed else attention.apply(x)

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple, x: torch.Tensor, attention: FrozenAttention, transposed: bool
    ) -> tuple[torch.Tensor, int]:
        """Batched (``is_grads_batched``, ``vmap``): the vmapped dimension joins the batch."""
        x = x.movedim(in_dims[0], 0)
        out = _Attend.apply(x.flatten(0, 1), attention, transposed)
        return out.unflatten(0, x.shape[:2]), 0

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
        ctx.attention, ctx.transposed = inputs[1], inputs[2]

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _Attend.apply(g, ctx.attention, not ctx.transposed), None, None

    @staticmethod
    def jvp(ctx: Any, x_t: torch.Tensor, *_: Any) -> torch.Tensor:
        return _Attend.forward(x_t, ctx.attention, ctx.transposed)


def attend(v: torch.Tensor, attention: FrozenAttention) -> torch.Tensor:
    """``P v`` through the frozen pattern, differentiable in ``v`` (reverse and forward mode)."""
    return _Attend.apply(v, attention, False)


def recipe_tolerance(dtype: torch.dtype) -> float:
    """How far a recomputed pattern (entries in [0, 1]) or ``z`` (relative) may be from the
    model's: rounding, 64 units in the last place, and never more than the dtype's tolerance.
    Tight on purpose: a near-miss of the recipe (softcapping's ``tanh`` on small scores) is
    below a looser bound, and would then be frozen approximately."""
    return min(tolerance(dtype), 64 * torch.finfo(dtype).eps)


def fit_recipe(
    q: torch.Tensor,
    k: torch.Tensor,
    scores: torch.Tensor,
    pattern: torch.Tensor,
    tol: float,
    max_memory: int | None = None,
) -> FrozenAttention | None:
    """The recipe for one layer from its recorded ``q``, ``k`` ([pos, heads, d]), scores and
    pattern ([heads, pos, pos]), or ``None`` where its first or last row differs from the
    model's by more than ``tol`` (absolute: entries lie in [0, 1])."""
    n = q.shape[0]
    if k.shape[0] != n or pattern.shape[-1] != n or q.shape[1] % k.shape[1]:
        return None
    last = torch.einsum(
        "hd,khd->hk", q[-1].double(), k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    )
    row = scores[:, -1].double()
    seen = row.abs() < 1e30  # the last row's visible keys: all, or the last ``window`` of them
    window = None
    if not bool(seen.all()):
        first = int(seen[0].float().argmax())
        window = n - first
        if not (bool(seen[:, first:].all()) and not bool(seen[:, :first].any())):
            return None  # masked keys that are not a sliding window
    if not float(last[:, seen[0]].norm()):
        return None
    row, last = row[:, seen[0]], last[:, seen[0]]
    scale = float((row * last).sum() / (last * last).sum())
    first_last = (
        slice(0, 1),
        slice(n - 1, n),
    )  # the others are checked through z = P v (see attention_hooks)
    for sink in (None, _sinks(scores, pattern)):
        attention = FrozenAttention(q, k, scale, max_memory, sink, window)
        if all(
            float((attention.rows(rows) - pattern[:, rows, : rows.stop]).abs().max()) <= tol
            for rows in first_last
        ):
            return attention
    return None


def _sinks(scores: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor | None:
    """Each head's sink logit, read off the first row (one key): ``P₀₀ = 1 / (1 + e^(sink − s₀₀))``;
    ``None`` where the first row sums to one (no sink)."""
    p = pattern[:, 0, 0].double()
    if not bool(((p > 0) & (p < 1 - 1e-6)).all()):
        return None
    return (scores[:, 0, 0].double() + torch.log1p(-p) - torch.log(p)).to(scores.dtype)


def attention_hooks(
    model: Any,
    site_name: str,
    store: dict[str, torch.Tensor],
    frozen: dict[str, FrozenAttention],
    mode: str,
    factor: torch.Tensor | None,
    tol: float,
    max_memory: int | None = None,
) -> list[tuple[str, Any]] | None:
    """Hooks that freeze one attention's pattern through its queries and keys (see the module
    docstring), or ``None`` where the layer lacks the hook points the recipe needs.

    ``mode="record"``: keep ``q``, ``k``, the scores and ``v``; at ``hook_pattern`` fit the
    recipe's scale and check its first and last rows (else store the pattern); at ``hook_z``
    verify ``z = P v`` at every position (else store the model's pattern). A pattern that
    differs from the recipe in a row changes that row of ``z`` unless the difference is
    orthogonal to all ``d_head`` columns of ``v``, so every row is checked for the price of one
    attention instead of a second pass over ``n²`` entries. ``mode="replay"``: for a layer in
    ``frozen``, replace ``hook_z`` by :func:`attend` of the live ``v``, times ``factor``."""
    prefix = site_name[: -len("hook_pattern")]
    names = model.hook_dict
    q_name = prefix + "hook_rot_q" if prefix + "hook_rot_q" in names else prefix + "hook_q"
    k_name = prefix + "hook_rot_k" if prefix + "hook_rot_k" in names else prefix + "hook_k"
    needed = [q_name, k_name, prefix + "hook_attn_scores", prefix + "hook_v", prefix + "hook_z"]
    if any(name not in names for name in needed):
        return None
    live: dict[str, torch.Tensor] = {}

    def keep(key: str, detach: bool, pass_on: bool = False):
        def hook(value: torch.Tensor, hook: Any) -> torch.Tensor | None:
            live[key] = value.detach() if detach else value
            return live[key] if pass_on else None  # queries and keys reach the output only through

        return hook  # the frozen pattern: passed on detached, no tangent or gradient is spent on scores

    if mode == "replay":

        def replace_z(value: torch.Tensor, hook: Any) -> torch.Tensor:
            z = attend(live.pop("v"), frozen[site_name]).reshape(value.shape)
            return z if factor is None else z * factor.reshape(-1, *[1] * (z.ndim - 1)).expand_as(z)

        return [(prefix + "hook_v", keep("v", False)), (prefix + "hook_z", replace_z)]

    def record_pattern(value: torch.Tensor, hook: Any) -> torch.Tensor:
        pattern, fitted = value.detach(), None
        q, k, scores = live.pop("q", None), live.pop("k", None), live.pop("scores", None)
        if pattern.shape[0] == 1 and all(
            t is not None and t.ndim == 4 for t in (q, k, scores)
        ):  # all fired
            fitted = fit_recipe(q[0], k[0], scores[0], pattern[0], tol, max_memory)
        if fitted is None:
            store[site_name] = pattern
        else:
            frozen[site_name], live["pattern"] = fitted, pattern  # the pattern itself until hook_z
        return pattern

    def check_z(value: torch.Tensor, hook: Any) -> None:
        pattern = live.pop("pattern", None)
        if site_name not in frozen or pattern is None:
            return
        z = attend(live.pop("v"), frozen[site_name])
        if z.numel() != value.numel() or float(
            (z.reshape(value.shape) - value).abs().max()
        ) > tol * max(float(value.abs().max()), 1e-30):
            store[site_name] = pattern  # the recipe or z = P v does not hold here: keep P itself
            del frozen[site_name]

    return [
        (q_name, keep("q", True, True)),
        (k_name, keep("k", True, True)),
        (prefix + "hook_attn_scores", keep("scores", True)),
        (prefix + "hook_v", keep("v", True)),
        (site_name, record_pattern),
        (prefix + "hook_z", check_z),
    ]
