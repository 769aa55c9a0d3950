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
from jaxtyping import Bool, Float
from tqdm.auto import tqdm

from lens_linear.hooks.operating_point import eval_mode


class Welford:
    """Running mean and variance of a tensor-valued sample, entry by entry, with a mask."""

    def __init__(self, shape: Sequence[int], dtype: torch.dtype = torch.float64, device: Any = "cpu"):
        self.count = torch.zeros(tuple(shape), dtype=dtype, device=device)
        self.mean = torch.zeros_like(self.count)
        self.m2 = torch.zeros_like(self.count)

    def update(self, value: Float[torch.Tensor, "*shape"], mask: Bool[torch.Tensor, "*shape"] | None = None) -> None:
        """Add one sample; entries outside ``mask`` are not observed (not zeros)."""
        value = value.to(self.mean)
        seen = torch.ones_like(self.count, dtype=torch.bool) if mask is None else mask.to(self.count.device)
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
        self.m2 = self.m2 + other.m2 + delta ** 2 * self.count * other.count / safe
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
    """``values[i, j] = ‖∂y_i/∂x_j‖²_F`` (zero for ``j > i``); ``stderr`` for estimates."""

    values: Float[torch.Tensor, "pos pos"]
    stderr: Float[torch.Tensor, "pos pos"] | None = None


def sensitivity(model: Any, tokens: Any, hook: str | None = None, plain: bool = False,
                method: str = "exact", probes: int = 16, seed: int = 0) -> Sensitivity:
    """Position-to-position sensitivity of ``hook`` (default: the output embedding) for one prompt.

    ``"exact"``: every output position's full Jacobian by batched VJPs (d_out rows each),
    then Frobenius norms. ``"hutchinson"``: ``probes`` Rademacher cotangents per output
    position, ``E‖vᵀ J_ij‖² = ‖J_ij‖²_F``; unbiased, with the standard error of the mean.
    """
    from lens_linear.cache import run_with_linear_cache

    if method not in ("exact", "hutchinson"):
        raise ValueError(f"method must be 'exact' or 'hutchinson', got {method!r}")
    lc = run_with_linear_cache(model, tokens, check=False)
    n = lc.n_pos
    values = torch.zeros(n, n, dtype=torch.float64)
    if method == "exact":
        for i in range(n):
            jac = lc.plain_jacobian(hook, i) if plain else lc.jacobian(hook, i)
            values[i] = jac.double().pow(2).sum((1, 2))
            lc._jacobians.clear()  # one position at a time: memory stays one Jacobian
        return Sensitivity(values)
    stderr = torch.zeros_like(values)
    gen = torch.Generator().manual_seed(seed)
    name = lc._resolve(hook, 0)[0]
    fn = lc._plain_fn(name, slice(None)) if plain else (lambda x: lc.point.replay(x, [name])[name][0])
    x = lc.x.detach().clone().requires_grad_(True)
    with eval_mode(model), torch.enable_grad():
        y = fn(x).reshape(n, -1)
        for i in range(n):
            cot = torch.zeros(probes, *y.shape, dtype=y.dtype)
            cot[:, i] = torch.randint(0, 2, (probes, y.shape[-1]), generator=gen).to(y.dtype) * 2 - 1
            (grad,) = torch.autograd.grad(y, x, grad_outputs=cot.to(y.device), retain_graph=i < n - 1,
                                          is_grads_batched=True)
            est = grad.double().pow(2).sum(-1)  # [probes, pos_in]
            values[i] = est.mean(0)
            stderr[i] = est.std(0) / probes ** 0.5
    return Sensitivity(values, stderr)


def dataset_sensitivity(model: Any, prompts: Sequence[str], hook: str | None = None, plain: bool = False,
                        method: str = "exact", max_len: int = 64, checkpoint: str | None = None,
                        progress: bool = True, **kwargs: Any) -> Welford:
    """Welford statistics of :func:`sensitivity` over prompts (each truncated to ``max_len``
    tokens; shorter prompts add only their own entries). With ``checkpoint`` the
    accumulator and the number of prompts done are saved after every prompt, and a rerun
    resumes from there: nothing is lost or counted twice."""
    acc, done = Welford((max_len, max_len)), 0
    if checkpoint and os.path.exists(checkpoint):
        state = torch.load(checkpoint)
        if state["prompts"] != list(prompts) or state["max_len"] != max_len:
            raise ValueError(f"{checkpoint} belongs to another run (different prompts or max_len); "
                             f"delete it or pass another path")
        acc, done = Welford.from_state_dict(state["welford"]), state["done"]
    for k in tqdm(range(done, len(prompts)), desc="sensitivity", disable=not progress, leave=False):
        tokens = model.to_tokens(prompts[k])[:, :max_len]
        n = tokens.shape[-1]
        value = torch.zeros(max_len, max_len, dtype=torch.float64)
        value[:n, :n] = sensitivity(model, tokens, hook, plain, method, **kwargs).values
        mask = torch.zeros(max_len, max_len, dtype=torch.bool)
        mask[:n, :n] = True
        acc.update(value, mask)
        if checkpoint:
            tmp = checkpoint + ".tmp"
            torch.save({"welford": acc.state_dict(), "done": k + 1, "prompts": list(prompts),
                        "max_len": max_len}, tmp)
            os.replace(tmp, checkpoint)  # atomic: a kill leaves the previous checkpoint whole
    return acc
