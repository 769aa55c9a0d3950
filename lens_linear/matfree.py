"""Top singular triplets of a detached Jacobian without forming it.

Only two products are needed: ``J v`` (one replay forward of the frozen map, biases zeroed,
a batch of directions) and ``uᵀ J`` (batched VJPs through one replay graph). Randomized
subspace iteration (Halko, Martinsson & Tropp) on ``k + oversample`` vectors, with QR
re-orthonormalization every half-step, stops when the top ``k`` singular values move less
than ``tol`` (relative) between iterations; the report gives each triplet's residual
``‖J v − s u‖ / s``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float

from lens_linear._validation import normalize_position
from lens_linear.hooks.operating_point import biases_zeroed, eval_mode, linears_skipped

if TYPE_CHECKING:
    from lens_linear.cache import LinearCache


@dataclass
class MatrixFreeSVD:
    U: Float[torch.Tensor, "d_out k"]
    S: Float[torch.Tensor, "k"]
    V: Float[torch.Tensor, "d_in k"]  # d_in = positions · d_model for position="all"
    iterations: int
    converged: bool
    residuals: Float[torch.Tensor, "k"]  # ‖J v_i − s_i u_i‖ / s_i

    def __repr__(self) -> str:
        state = "converged" if self.converged else "NOT converged"
        return (f"MatrixFreeSVD(S={[round(float(s), 5) for s in self.S]}, {state} after {self.iterations} "
                f"iterations, max residual {float(self.residuals.max()):.1e})")


def matrix_free_svd(lcache: "LinearCache", hook: str | None = None, pos: int | None = None,
                    position: int | str = "all", k: int = 3, oversample: int = 10, tol: float = 1e-5,
                    max_iter: int = 30, seed: int = 0) -> MatrixFreeSVD:
    """Top-``k`` SVD of the detached Jacobian of ``hook`` at output ``pos`` w.r.t. the input at
    ``position`` (or all positions side by side), from replay products only."""
    hook, pos = lcache._resolve(hook, pos)
    n, d_in = lcache.x.shape
    cols = slice(None) if position == "all" else normalize_position(position, n, "position")
    width = (n if position == "all" else 1) * d_in
    model, point, dtype = lcache.model, lcache.point, lcache.x.dtype
    if not 1 <= k <= min(width, lcache._width(hook, pos)):
        raise ValueError(f"k={k} must be between 1 and the Jacobian's rank bound {min(width, lcache._width(hook, pos))}")
    b = min(k + oversample, width)

    def place(v: torch.Tensor) -> torch.Tensor:  # [b, width] → inputs [b, n, d_in]
        x = torch.zeros(v.shape[0], n, d_in, dtype=dtype, device=v.device)
        x[:, cols] = v.reshape(v.shape[0], -1, d_in) if position == "all" else v
        return x

    with eval_mode(model), biases_zeroed(model):
        dead = point.dead_linears([hook])  # projections that feed only frozen coefficients

        def jv(v: torch.Tensor) -> torch.Tensor:  # [b, width] → [b, d_out]
            with torch.no_grad(), linears_skipped(dead):
                return point.replay(place(v), [hook], at=pos)[hook].reshape(v.shape[0], -1)

        x = torch.zeros(n, d_in, dtype=dtype, requires_grad=True)
        with torch.enable_grad():
            y = point.replay(x, [hook], at=pos)[hook][0].reshape(-1)

            def ujt(u: torch.Tensor) -> torch.Tensor:  # [b, d_out] → [b, width]
                (g,) = torch.autograd.grad(y, x, grad_outputs=u, retain_graph=True, is_grads_batched=True)
                return g[:, cols].reshape(u.shape[0], -1)

            gen = torch.Generator().manual_seed(seed)
            q = torch.linalg.qr(jv(torch.randn(b, width, generator=gen, dtype=dtype)).T).Q  # [d_out, b]
            prev, converged, it = None, False, 0
            for it in range(1, max_iter + 1):
                w = torch.linalg.qr(ujt(q.T).T).Q  # [width, b]: range of Jᵀ
                z = jv(w.T).T  # [d_out, b] = J W
                q, r = torch.linalg.qr(z)
                s = torch.linalg.svdvals(r)[:k]
                if prev is not None and float(((s - prev).abs() / s.clamp_min(1e-300)).max()) < tol:
                    converged = True
                    break
                prev = s
            ub, s_all, vbt = torch.linalg.svd(r)  # J W = Q R = (Q Ub) S Vbᵀ, J ≈ (Q Ub) S (W Vb)ᵀ
            u, s, v = q @ ub[:, :k], s_all[:k], w @ vbt.T[:, :k]
            residuals = (jv(v.T).T - u * s).norm(dim=0) / s.clamp_min(1e-300)
    return MatrixFreeSVD(u.detach(), s.detach(), v.detach(), it, converged, residuals.detach())
