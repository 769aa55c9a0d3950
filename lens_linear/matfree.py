"""Top singular triplets of a detached Jacobian without forming it.

Only two products are needed: ``Jᵀ u`` (a backward through one retained replay graph of the
frozen map, biases zeroed) and ``J v`` (a backward through that backward: ``Jᵀ w`` is linear
in ``w``, so its gradient w.r.t. ``w`` along ``v`` is ``J v``). The second graph holds the
frozen map's linear ops alone; a replay forward would also recompute every attention score
and softmax only to replace them by the frozen pattern (measured at 512 tokens on SmolLM2:
3.4 s / 391 MB for three vectors by replay, 2.6 s / 110 MB through the backward).

Golub–Kahan–Lanczos bidiagonalization with full reorthogonalization builds orthonormal
bases ``U`` (outputs) and ``V`` (inputs) with ``J V = U B`` for a small matrix ``B``; the
SVD of ``B`` gives the Ritz triplets. Every product is kept, so each triplet's residual is
measured by linearity from products already taken: no product is spent on checking. Every
product stays in the Krylov space, so far fewer are needed than by subspace iteration: on
SmolLM2 at 128 tokens 69 products (block 3) reach residuals of 1e-5, where randomized subspace
iteration with 13 vectors spent ~240 to reach angles of 1e-3.

The block size is a trade. One vector at a time (the default) needs the fewest products:
31 for the top 3 at 2,048 tokens on SmolLM2, where a block of 3 took 69. But a Krylov space of one start
vector holds one direction of each singular subspace, so where a singular value is *exactly*
repeated (multiplicity > 1: an exact symmetry, which trained weights and real prompts do not
have) it returns that value once and the next lower one, with a small residual, in place of
its copy (see the tests). A block of ``k`` vectors finds a value repeated up to ``k`` times.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from lens_linear._validation import normalize_position
from lens_linear.hooks.contexts import HALF, analysis_mode, linears_skipped
from lens_linear.hooks.operating_point import OperatingPoint
from lens_linear.memory import chunk_size, release_freed_memory, sequence_bytes

Product = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class MatrixFreeSVD:
    U: Float[torch.Tensor, "d_out k"]
    S: Float[torch.Tensor, "k"]  # noqa: F821
    V: Float[torch.Tensor, "d_in k"]  # d_in = positions · d_model for position="all"
    iterations: int  # Lanczos steps, each one J v and one Jᵀ u product of `block` vectors
    products: int  # vectors multiplied by J or Jᵀ in all (the residuals reuse them)
    converged: bool  # every measured residual <= tol
    residuals: Float[torch.Tensor, "k"]  # measured: √(‖J v − s u‖² + ‖Jᵀ u − s v‖²) / s  # noqa: F821

    def __iter__(self) -> Iterator[torch.Tensor]:
        """``U, S, V = result``, as with ``torch.svd``."""
        return iter((self.U, self.S, self.V))

    def __repr__(self) -> str:
        state = "converged" if self.converged else "NOT converged"
        return (
            f"MatrixFreeSVD(S={[round(float(s), 5) for s in self.S]}, {state} after {self.iterations} "
            f"iterations ({self.products} products), max residual {float(self.residuals.max()):.1e})"
        )


def _project_out(x: torch.Tensor, blocks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` minus its part in the span of orthonormal ``blocks``, twice over (one pass loses
    orthogonality); returns the remainder and the coefficients removed. The basis stays a
    list of blocks: concatenating it every step would copy all of it (tens of MB at 512 tokens)."""
    x, coef = x.clone(), x.new_zeros(sum(b.shape[1] for b in blocks), x.shape[1])
    for _ in range(2):
        c = torch.cat([b.to(x.dtype).T @ x for b in blocks]) if blocks else coef
        for b, part in zip(blocks, c.split([b.shape[1] for b in blocks])):
            x.addmm_(b.to(x.dtype), part, alpha=-1)  # in place: no new 300k-long vector per block
        coef = coef + c
    return x, coef


def _next_block(
    blocks: list[torch.Tensor], x: torch.Tensor, floor: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Orthonormal ``Q`` for ``x``'s part outside span(blocks): ``x = [blocks] C + Q R``.

    A column of ``x`` with nothing left outside the basis (the Krylov space is invariant,
    e.g. the matrix's rank is reached) gets a random direction with a zero row in ``R``:
    QR of rounding noise would give a column that is not orthogonal to the basis."""
    rest, coef = _project_out(x, blocks)
    q, r = torch.linalg.qr(rest)
    lost = r.diagonal().abs() <= floor
    for i in torch.nonzero(lost).flatten().tolist():
        fresh = torch.randn(x.shape[0], 1, generator=gen, dtype=x.dtype, device="cpu").to(x.device)
        fresh, _ = _project_out(fresh, blocks + [q[:, ~lost]])
        q[:, i : i + 1], r[i], lost[i] = fresh / fresh.norm(), 0, False
    return q, coef, r


class _Blocks(list):
    """The input-side basis: blocks stored in the products' precision (float32 halves 85 MB at
    512 tokens; projections still run in float64), in slabs of ``per_slab`` blocks allocated
    up front: a block allocated alone between two products' short-lived buffers pins the heap
    and the freed memory around it stays resident."""

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, per_slab: int = 8):
        super().__init__()
        self.shape, self.dtype, self.per_slab, self.slab = shape, dtype, per_slab, None

    def add(self, block: torch.Tensor) -> torch.Tensor:
        """Store ``block``; returns it as stored (rounded to the storage precision)."""
        if len(self) % self.per_slab == 0:
            self.slab = block.new_empty(self.per_slab, *self.shape, dtype=self.dtype)
        self.append(self.slab[len(self) % self.per_slab].copy_(block))
        return self[-1].to(block.dtype)


def golub_kahan_lanczos(
    jv: Product,
    jtu: Product,
    d_out: int,
    width: int,
    k: int,
    block: int,
    tol: float,
    max_iter: int,
    dtype: torch.dtype,
    seed: int = 0,
    progress: bool = False,
    device: torch.device | str = "cpu",
):
    """Top-``k`` triplets of ``J`` (``d_out × width``) given ``jv: [width, b] → [d_out, b]`` and
    ``jtu: [d_out, b] → [width, b]`` on float64 tensors, computed in ``dtype``. Inner products
    and projections run in float64 whatever the products' precision: in float32, sums over
    300k-long vectors (512 tokens × d_model) lose ~1e-4 and with it the residual estimates.
    Every tensor lives on ``device`` (the products'); the random start comes from a seeded
    CPU generator, so every device starts from the same vectors.

    Each step's products are kept (``Jᵀ U_j`` in the products' precision, beside ``V``; the
    ``J V_j`` are ``d_out`` long), so every Ritz triplet's residual is *measured*, not estimated:
    ``J v = Σ_j (J V_j) c_j`` and ``Jᵀ u = Σ_j (Jᵀ U_j) c_j`` hold by linearity, without one more
    product. The loop stops on that measurement.
    Returns ``(U, S, V, residuals, steps, products)`` in float64."""
    eps = torch.finfo(dtype).eps
    p = block
    gen = torch.Generator(device="cpu").manual_seed(seed)
    start = torch.randn(d_out, p, generator=gen, dtype=torch.float64, device="cpu").to(device)
    U = [torch.linalg.qr(start).Q]  # start on the small side
    V, JtU = (
        _Blocks((width, p), dtype),
        _Blocks((width, p), dtype),
    )  # Jᵀ U_j: float products, stored exactly
    JV: list[torch.Tensor] = []
    B = torch.zeros(
        p, 0, dtype=torch.float64, device=device
    )  # [U]ᵀ J [V] = B (block lower bidiagonal)
    steps = min(max_iter, min(d_out, width) // p - 1)  # U gets one block more than V
    products, step, scale, found = 0, 0, 0.0, None
    bar = tqdm(total=steps, desc="Lanczos SVD", disable=not progress, leave=False)
    for step in range(1, steps + 1):
        w = JtU.add(jtu(U[-1]))
        products, scale = products + p, max(scale, float(w.norm(dim=0).max()))
        if B.shape[1] >= k:  # Ritz triplets of B, measured through the products taken so far
            found = _ritz(B, U, V, JV, JtU, k, p)
            bar.set_postfix(residual=f"{float(found[3].max()):.1e}")
            if float(found[3].max()) <= tol or step == steps:
                break
        bar.update()
        if step == steps:
            break
        V_next, _, _ = _next_block(V, w, 100 * eps * scale, gen)  # Jᵀ U_j = [V] (…) + V_next R
        z = jv(V.add(V_next))  # the product of the block as stored keeps J [V] = [U] B exact
        JV.append(z)
        products, scale = products + p, max(scale, float(z.norm(dim=0).max()))
        U_next, C, L = _next_block(U, z, 100 * eps * scale, gen)  # J V_j = [U] C + U_next L
        B = torch.cat([torch.cat([B, B.new_zeros(p, B.shape[1])]), torch.cat([C, L])], 1)
        U.append(U_next)
    bar.close()
    if found is None:
        raise ValueError(
            f"a {d_out} × {width} Jacobian is too small for {k} triplets by block {p}: "
            f"form it (lcache.jacobian()) and use torch.linalg.svd"
        )
    return (*found, step, products)


def _ritz(
    B: torch.Tensor,
    U: list[torch.Tensor],
    V: list[torch.Tensor],
    JV: list[torch.Tensor],
    JtU: list[torch.Tensor],
    k: int,
    p: int,
) -> tuple[torch.Tensor, ...]:
    """Top-``k`` Ritz triplets ``(u, s, v)`` of ``B`` and their measured residuals
    ``√(‖J v − s u‖² + ‖Jᵀ u − s v‖²) / s``, with ``J v`` and ``Jᵀ u`` combined from the stored
    products (``B`` is ``[U]ᵀ J [V]``: one block row more than columns, every ``Jᵀ U_j`` taken)."""
    ub, s, vbt = torch.linalg.svd(B, full_matrices=False)
    s = s[:k]

    def combine(blocks: list[torch.Tensor], coef: torch.Tensor) -> torch.Tensor:
        return sum(b.double() @ c for b, c in zip(blocks, coef[:, :k].split(p)))

    u, v = combine(U, ub), combine(V, vbt.T)
    residuals = (
        (combine(JV, vbt.T) - u * s).norm(dim=0) ** 2 + (combine(JtU, ub) - v * s).norm(dim=0) ** 2
    ).sqrt() / s.clamp_min(1e-300)
    return u, s, v, residuals


def matrix_free_svd(
    point: OperatingPoint,
    hook: str,
    *,
    pos: int,
    input_pos: int | str = "all",
    n_triplets: int = 3,
    tol: float = 1e-4,
    block: int = 1,
    max_iter: int = 200,
    seed: int = 0,
    chunk: int | None = None,
    max_memory: int | None = None,
    progress: bool = False,
) -> MatrixFreeSVD:
    """Top ``n_triplets`` SVD of the detached Jacobian of ``hook`` at output position ``pos``
    w.r.t. the input at ``input_pos`` (or all positions side by side), from replay products only.

    Stops once every triplet's residual, measured from the products taken (no extra ones), is
    below ``tol`` (relative to its singular value). ``block`` vectors enter each step: one by
    default, which finds every *distinct* singular value in the fewest products; pass
    ``block=n_triplets`` where a singular value may be exactly repeated (see the module
    docstring). They are multiplied ``chunk`` at a time (default: as many as ``max_memory``
    holds: the whole block for short prompts, one vector at 512 tokens).
    A half-precision model's frozen map is multiplied in float32 (its weights copied to float32
    meanwhile), and the result is float32."""
    if (
        point.x_star.dtype in HALF
    ):  # Lanczos needs products accurate well below 1e-2: the frozen map
        point = point.in_dtype(
            torch.float32
        )  # runs in float32 (point.computing() copies the weights)
    model, x_star = point.model, point.x_star
    if point.frozen_attention:  # a long prompt: what earlier work freed goes back first
        release_freed_memory()
    n, d_in = x_star.shape
    k = n_triplets
    cols = slice(None) if input_pos == "all" else normalize_position(input_pos, n, "input_pos")
    width = (n if input_pos == "all" else 1) * d_in
    dtype, device = x_star.dtype, x_star.device
    for name, value in {"block": block, **({} if chunk is None else {"chunk": chunk})}.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"{name}={value!r} must be an integer of at least 1 (block: 1 by default, "
                f"n_triplets to find exactly repeated singular values)"
            )
    if (
        chunk is None
    ):  # as many vectors as max_memory holds. Each costs ~3 backward rows of resident
        # memory (at 512 tokens on SmolLM2, 185 MB more peak RSS per vector; one vector at a time
        # 59.6 s / 789 MB, three 55.3 s / 1159 MB); short prompts take the whole block at once
        chunk = chunk_size(
            block, 3 * sequence_bytes(model.cfg, n, dtype), max_memory, device=device
        )

    def place(v: torch.Tensor) -> torch.Tensor:  # [width, b] → inputs [b, n, d_in]
        x = torch.zeros(v.shape[1], n, d_in, dtype=dtype, device=v.device)
        x[:, cols] = v.T.reshape(v.shape[1], -1, d_in) if input_pos == "all" else v.T
        return x

    # no bias is zeroed: the products are gradients of the affine map, blind to its constant
    with point.computing(), analysis_mode(model), torch.enable_grad():
        x = torch.zeros(n, d_in, dtype=dtype, device=device, requires_grad=True)
        with linears_skipped(point.dead_linears([hook])):  # q, k: no scores graph to build and drop
            y = point.replay(x, [hook], pos=pos)[hook][0].reshape(-1)
        d_out = y.numel()
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(width, d_out):
            raise ValueError(
                f"n_triplets={k} must be between 1 and the Jacobian's rank bound {min(width, d_out)}"
            )
        block = min(block, d_out, width)
        # Jᵀ w for a symbolic w: linear in w, so its gradient w.r.t. w along v is J v. This
        # graph holds the frozen map's linear ops alone: no scores or softmax are recomputed
        # (a replay forward would compute them and then discard them for the frozen pattern)
        w = torch.zeros_like(y, requires_grad=True)
        (jtw,) = torch.autograd.grad(y, x, grad_outputs=w, create_graph=True)

        def jv(v: torch.Tensor) -> torch.Tensor:  # [width, b] → [d_out, b], float64 in and out
            return torch.cat(
                [
                    torch.autograd.grad(
                        jtw,
                        w,
                        grad_outputs=place(part.to(dtype)),
                        retain_graph=True,
                        is_grads_batched=True,
                    )[0]
                    for part in v.split(chunk, 1)
                ]
            ).T.double()

        def jtu(u: torch.Tensor) -> torch.Tensor:  # [d_out, b] → [width, b], float64 in and out
            return torch.cat(
                [
                    torch.autograd.grad(
                        y,
                        x,
                        grad_outputs=part.T.to(dtype).contiguous(),
                        retain_graph=True,
                        is_grads_batched=True,
                    )[0][:, cols].reshape(part.shape[1], -1)
                    for part in u.split(chunk, 1)
                ]
            ).T.double()

        u, s, v, residuals, steps, products = golub_kahan_lanczos(
            jv, jtu, d_out, width, k, block, tol, max_iter, dtype, seed, progress, device
        )
    return MatrixFreeSVD(
        u.to(dtype),
        s.to(dtype),
        v.to(dtype),
        steps,
        products,
        bool(residuals.max() <= tol),
        residuals.to(dtype),
    )
