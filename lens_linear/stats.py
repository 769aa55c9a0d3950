"""Dataset-scale Jacobian statistics: position-to-position sensitivity, aggregated exactly.

``S[i, j] = ‖∂y_i/∂x_j‖²_F`` for one prompt (``y`` a hook's activation, ``x`` the input
embeddings), detached (frozen map) or plain. Over a data set, :class:`Welford` keeps the
mean and variance of every entry with its own count, so prompts of different lengths add
only the entries they have (padding is never counted as zeros), and two accumulators
merge exactly (Chan et al.'s parallel formula): halves of a data set, resumed runs, or
processes of a ``torch.distributed`` job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from jaxtyping import Bool, Float, Int
from tqdm.auto import tqdm

from lens_linear._validation import hook_name, normalize_position, require_tl_model
from lens_linear.hooks.contexts import analysis_mode, linears_skipped
from lens_linear.hooks.freeze import site_hooks
from lens_linear.hooks.operating_point import OperatingPoint
from lens_linear.hooks.patterns import FrozenAttention
from lens_linear.hooks.run import forward, run_to
from lens_linear.hooks.sites import INPUT_HOOK, feeds_frozen_only, find_sites, output_hook
from lens_linear.hooks.values import cut_positions
from lens_linear.memory import chunk_size, patterns_fit, sequence_bytes
from lens_linear.tokens import model_device, to_tokens


class Welford:
    """Running mean and variance of a tensor-valued sample, entry by entry, with a mask."""

    def __init__(
        self, shape: Sequence[int], dtype: torch.dtype = torch.float64, device: Any = "cpu"
    ):
        """``device``: where the statistics live (the model's device lets ``all_reduce`` use NCCL)."""
        self.count = torch.zeros(tuple(shape), dtype=dtype, device=device)
        self.mean = torch.zeros_like(self.count)
        self.m2 = torch.zeros_like(self.count)

    def update(
        self, value: Float[torch.Tensor, "*shape"], mask: Bool[torch.Tensor, "*shape"] | None = None
    ) -> None:
        """Add one sample; entries outside ``mask`` are not observed (not zeros)."""
        value = value.to(self.mean)
        seen = (
            torch.ones_like(self.count, dtype=torch.bool)
            if mask is None
            else mask.to(self.count.device)
        )
        self.count += seen
        delta = torch.where(seen, value - self.mean, 0)
        self.mean += torch.where(seen, delta / self.count.clamp_min(1), 0)
        self.m2 += torch.where(seen, delta * (value - self.mean), 0)

    def merge(self, other: "Welford") -> "Welford":
        """Combine with another accumulator in place (exact: Chan et al.)."""
        n = self.count + other.count
        delta = other.mean - self.mean
        safe = n.clamp_min(1)
        self.mean = self.mean + delta * other.count / safe
        self.m2 = self.m2 + other.m2 + delta**2 * self.count * other.count / safe
        self.count = n
        return self

    @property
    def var(self) -> torch.Tensor:
        """Sample variance (``n − 1``); NaN where fewer than two samples were seen."""
        return torch.where(self.count > 1, self.m2 / (self.count - 1).clamp_min(1), torch.nan)

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "Welford":
        acc = cls(state["count"].shape, state["count"].dtype, state["count"].device)
        acc.count, acc.mean, acc.m2 = (state[k].clone() for k in ("count", "mean", "m2"))
        return acc

    def all_reduce(self) -> "Welford":
        """Merge the accumulators of every process of a ``torch.distributed`` group in place
        (sums of count, count·mean and the m2 terms; works with gloo and NCCL)."""
        import torch.distributed as dist

        total = self.count.clone()
        dist.all_reduce(total)
        weighted = self.count * self.mean
        dist.all_reduce(weighted)
        mean = weighted / total.clamp_min(1)
        m2 = self.m2 + self.count * (self.mean - mean) ** 2
        dist.all_reduce(m2)
        self.count, self.mean, self.m2 = total, mean, m2
        return self


@dataclass
class Sensitivity:
    """``values[..., i, j] = ‖∂y_i/∂x_j‖²_F`` (zero for ``j > i``); ``stderr`` for estimates.

    One prompt: ``[pos, pos]``. A batch: ``[batch, pos, pos]`` with ``lengths``; entries past
    a prompt's length are padding, not zeros, and rows not asked for are NaN (``mask``)."""

    values: Float[torch.Tensor, "*batch pos pos"]
    stderr: Float[torch.Tensor, "*batch pos pos"] | None = None
    lengths: Int[torch.Tensor, "batch"] | None = None  # noqa: F821

    @property
    def mask(self) -> Bool[torch.Tensor, "*batch pos pos"]:
        """Entries that were computed: not padding, and in a row that was asked for."""
        n, device = self.values.shape[-1], self.values.device
        computed = ~self.values.isnan()
        if self.lengths is None:
            return computed
        real = torch.arange(n, device=device)[None] < self.lengths.to(device)[:, None]
        return real[:, :, None] & real[:, None, :] & computed


def right_padded(
    model: Any, prompts: Sequence[str] | str | torch.Tensor, max_len: int | None = None
) -> tuple[Int[torch.Tensor, "batch pos"], Int[torch.Tensor, "batch"]]:  # noqa: F821
    """Tokenize prompts (BOS as the model adds it), cut to ``max_len``, right-pad to one length.

    Right padding needs no attention mask: under causal attention no real token sees a later
    one, so each prompt's Jacobian blocks are those of the prompt alone."""
    require_tl_model(model)
    n_ctx = model.cfg.n_ctx
    if max_len is not None and max_len > n_ctx:
        raise ValueError(
            f"max_len={max_len} exceeds the model's context of {n_ctx} tokens; use max_len <= {n_ctx}"
        )
    if isinstance(prompts, torch.Tensor):
        prompts = list(prompts.reshape(-1, prompts.shape[-1]))
    elif isinstance(prompts, str):
        prompts = [prompts]
    if len(prompts) == 0:
        raise ValueError("no prompts: the data set is empty")
    rows = [to_tokens(model, p, max_len=max_len)[0] for p in prompts]
    n = max(len(r) for r in rows)
    tokens = torch.stack([torch.cat([r, r.new_zeros(n - len(r))]) for r in rows])
    return tokens, torch.tensor([len(r) for r in rows], device="cpu")


def frozen_batch_map(
    model: Any,
    tokens: Int[torch.Tensor, "batch pos"],
    hook: str,
    detached: bool = True,
    store_patterns: bool | None = None,
    max_memory: int | None = None,
):
    """``x ↦`` activation of ``hook`` for a batch of prompts, each frozen at its own operating
    point (``detached=False``: nothing frozen), and the inputs ``x*`` ``[batch, pos, d_model]``.

    The map takes ``[m · batch, end, d_model]``: ``m`` copies of the batch (copy-major), so
    many cotangents or directions run through one graph for every prompt at once, on the
    first ``end`` positions (a prefix: under causal attention its frozen values are the full
    run's, cut). One recording serves every prefix. ``store_patterns`` as in
    :meth:`OperatingPoint.record`: for one prompt whose patterns do not fit (:func:`patterns_fit`)
    they are kept as queries and keys (a prefix's are the first ``end`` of them), so memory
    grows as ``n · d``, not ``n²``."""
    sites = find_sites(model) if detached else []
    store: dict[str, torch.Tensor] = {}
    seen: dict[str, torch.Tensor] = {}
    batch, n = tokens.shape
    if store_patterns is None:
        store_patterns = patterns_fit(model, n, batch, max_memory)
    frozen: dict[str, FrozenAttention] | None = None if store_patterns or batch > 1 else {}
    grab = (INPUT_HOOK, lambda value, hook: seen.__setitem__("x", value.detach()))
    with torch.no_grad():
        hooks = site_hooks(model, sites, store, "record", frozen=frozen, max_memory=max_memory)
        forward(model, tokens, hooks + [grab])
    x_star = seen["x"]

    def apply(x: Float[torch.Tensor, "mb end d_in"]) -> torch.Tensor:
        end = x.shape[1]
        live, cut, attention = sites, store, frozen
        if end < n:  # q/k norms feed only the frozen pattern: they may run live on a prefix
            live = [s for s in sites if not feeds_frozen_only(s, sites)]
            cut = {
                s.name: cut_positions(s, store[s.name], slice(None, end), batch, n)
                for s in live
                if s.name in store
            }
            attention = {k: a.prefix(end) for k, a in (frozen or {}).items()}
        y = run_to(
            model,
            tokens[:, :end].repeat(x.shape[0] // batch, 1),
            site_hooks(model, live, cut, "replay", frozen=attention),
            inject=(INPUT_HOOK, x),
            capture=[hook],
        )[hook]
        return y.reshape(x.shape[0], end, -1)

    return apply, x_star


def _dead_projections(
    model: Any, tokens: Int[torch.Tensor, "1 pos"], hook: str
) -> list[torch.nn.Module]:
    """Projections that feed only frozen coefficients (query, key, gate), found and confirmed
    on one (short) prompt's operating point: which modules those are is a property of the model."""
    point = OperatingPoint.record(model, tokens, names_filter=[])[0]
    return point.dead_linears([hook])


def sensitivity(
    model: Any,
    prompts: Any,
    hook: str | None = None,
    *,
    detached: bool = True,
    method: str = "exact",
    probes: int = 16,
    seed: int = 0,
    max_len: int | None = None,
    positions: Sequence[int] | None = None,
    store_patterns: bool | None = None,
    max_memory: int | None = None,
    progress: bool = False,
) -> Sensitivity:
    """Position-to-position sensitivity of ``hook`` (default: the output embedding), of the
    frozen map (``detached``, default) or of the model itself.

    ``prompts``: one prompt (values ``[pos, pos]``) or a list run as one right-padded batch
    (``[batch, pos, pos]``, with ``lengths``). ``"exact"``: for each output position, batched
    VJPs with one-hot cotangents (``d_out`` rows, every prompt at once) through a graph of
    that position's prefix, then squared norms.
    ``"hutchinson"``: ``probes`` Rademacher cotangents per output position,
    ``E‖vᵀ J_ij‖² = ‖J_ij‖²_F``; unbiased, with the standard error of the mean.
    Values are float64, on the model's device.

    Long prompts: the work is one prefix graph per output position (about ``n²/2`` token
    passes in all, times ``d_out`` rows or ``probes``), so ``positions`` (output positions,
    negative from the end) computes only those rows (the others are NaN, outside ``mask``):
    one row of a 2,048-token prompt costs one backward pass per cotangent. Memory stays
    bounded: cotangents run in chunks sized by ``max_memory``, and one prompt's attention
    patterns are kept as queries and keys once they would not fit whole (``store_patterns``,
    as in :func:`lens_linear.run_with_linear_cache`).
    """
    if method not in ("exact", "hutchinson"):
        raise ValueError(f"method must be 'exact' or 'hutchinson', got {method!r}")
    if method == "hutchinson" and probes < 1:
        raise ValueError(
            f"probes must be at least 1 (2 or more for a standard error), got {probes}"
        )
    single = isinstance(prompts, str) or (
        isinstance(prompts, torch.Tensor) and (prompts.ndim == 1 or prompts.shape[0] == 1)
    )
    tokens, lengths = right_padded(model, prompts, max_len)
    hook = output_hook(model) if hook is None else hook_name(model, hook)
    batch, n = tokens.shape
    device = tokens.device
    rows = (
        range(n)
        if positions is None
        else sorted({normalize_position(p, n, "positions") for p in positions})
    )
    values = torch.zeros(batch, n, n, dtype=torch.float64, device=device)
    if positions is not None:
        values[:, sorted(set(range(n)) - set(rows))] = torch.nan
    stderr = values.clone() if method == "hutchinson" else None
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with analysis_mode(model):
        apply, x_star = frozen_batch_map(model, tokens, hook, detached, store_patterns, max_memory)
        dead = (
            _dead_projections(model, tokens[:1, : min(int(lengths[0]), 16)], hook)
            if detached
            else []
        )
        for i in tqdm(rows, desc="sensitivity", unit="position", disable=not progress, leave=False):
            # output i sees inputs 0..i only (causal): its graph is built on that prefix alone,
            # which halves the work of one full-length graph for every output position
            x = x_star[:, : i + 1].clone().requires_grad_(True)
            with torch.enable_grad(), linears_skipped(dead):
                y = apply(x)[:, i]  # [batch, d_out]
                d_out = y.shape[-1]
                if method == "exact":
                    cot = torch.eye(d_out, dtype=y.dtype, device=device)[:, None].expand(
                        -1, batch, -1
                    )
                else:
                    signs = torch.randint(0, 2, (probes, batch, d_out), generator=gen, device="cpu")
                    cot = signs.to(device, y.dtype) * 2 - 1
                chunk = chunk_size(
                    len(cot),
                    sequence_bytes(model.cfg, i + 1, x.dtype, batch),
                    max_memory,
                    device=device,
                )
                est = torch.cat(
                    [
                        torch.autograd.grad(
                            y,
                            x,
                            grad_outputs=cot[k : k + chunk],
                            is_grads_batched=True,
                            retain_graph=k + chunk < len(cot),
                        )[0]
                        .double()
                        .pow(2)
                        .sum(-1)
                        for k in range(0, len(cot), chunk)
                    ]
                )  # [rows, batch, i + 1]
            if method == "exact":
                values[:, i, : i + 1] = est.sum(0)
            else:
                values[:, i, : i + 1] = est.mean(0)
                stderr[:, i, : i + 1] = est.std(0) / probes**0.5 if probes > 1 else torch.nan
    if single:
        return Sensitivity(values[0], None if stderr is None else stderr[0])
    return Sensitivity(values, stderr, lengths.to(device))


def dataset_sensitivity(
    model: Any,
    prompts: Sequence[str],
    hook: str | None = None,
    *,
    detached: bool = True,
    method: str = "exact",
    max_len: int = 64,
    batch_size: int = 16,
    checkpoint: str | None = None,
    progress: bool = True,
    **kwargs: Any,
) -> Welford:
    """Welford statistics of :func:`sensitivity` over prompts, ``batch_size`` prompts per
    right-padded batch (each cut to ``max_len`` tokens; shorter prompts add only their own
    entries: padding is never counted). With ``checkpoint`` the accumulator and the number of
    prompts done are saved atomically after every batch, and a rerun resumes from there:
    nothing is lost or counted twice. The statistics live on the model's device."""
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts: the data set is empty")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    right_padded(model, prompts[:1], max_len)  # bad max_len or tokens fail before any work
    device = model_device(model)
    acc, done = Welford((max_len, max_len), device=device), 0
    if checkpoint and os.path.exists(checkpoint):
        state = torch.load(checkpoint, weights_only=True)  # tensors, strings and ints only
        if state["prompts"] != prompts or state["max_len"] != max_len:
            raise ValueError(
                f"{checkpoint} belongs to another run (different prompts or max_len); "
                f"delete it or pass another path"
            )
        acc, done = (
            Welford.from_state_dict({k: v.to(device) for k, v in state["welford"].items()}),
            state["done"],
        )
    starts = range(done, len(prompts), batch_size)
    for start in tqdm(starts, desc="sensitivity", unit="batch", disable=not progress, leave=False):
        chunk = prompts[start : start + batch_size]
        found = sensitivity(
            model, chunk, hook, detached=detached, method=method, max_len=max_len, **kwargs
        )
        n = found.values.shape[-1]
        for value, mask in zip(found.values, found.mask):
            padded = torch.zeros(max_len, max_len, dtype=torch.float64, device=device)
            padded[:n, :n] = value
            seen = torch.zeros(max_len, max_len, dtype=torch.bool, device=device)
            seen[:n, :n] = mask
            acc.update(padded, seen)
        if checkpoint:
            tmp = checkpoint + ".tmp"
            state = {k: v.cpu() for k, v in acc.state_dict().items()}  # loads on any machine
            torch.save(
                {
                    "welford": state,
                    "done": start + len(chunk),
                    "prompts": prompts,
                    "max_len": max_len,
                },
                tmp,
            )
            os.replace(tmp, checkpoint)  # atomic: a kill leaves the previous checkpoint whole
    return acc
