"""Matrix-free top-3 singular triplets vs the full Jacobian + ``torch.linalg.svd`` on SmolLM2.

The matrix is the detached Jacobian of the output embedding at the last position w.r.t.
the input embeddings of all positions side by side (``d_model × positions·d_model``).
Baseline: ``LinearCache.jacobian()`` (chunked batched VJPs, d_model rows) then a dense
SVD. Ours: Golub–Kahan–Lanczos (one vector a step) from replay products only
(``LinearCache.svd_matrix_free``), never forming the matrix. Peak memory: resident-set
growth per method (one process, after a warm-up). Each method is measured whole (recording
the ``LinearCache`` included) and from the recorded cache on ("method"), since the cache is
shared state a user already holds: at 512 tokens it alone keeps ~470 MB (frozen patterns,
gates, logits).

Usage: python benchmarks/svd.py [--lengths 32 128 512]
"""

from __future__ import annotations

import argparse

import torch
from jacobian import TEXT, measure

import lens_linear as ll


def principal_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest principal angle between the column spaces of a and b (radians)."""
    qa, qb = torch.linalg.qr(a.double()).Q, torch.linalg.qr(b.double()).Q
    return float(torch.arccos(torch.linalg.svdvals(qa.T @ qb).min().clamp(max=1.0)))


def main() -> list[dict]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 128, 512])
    args = parser.parse_args()
    model = ll.load_model()
    text = " ".join([TEXT] * 64)
    ll.run_with_linear_cache(
        model, model.to_tokens(text)[:, :4], check=False, progress=False
    ).svd_matrix_free(n_triplets=3)  # warm-up
    print(
        f"{'tokens':>6} {'method':<28} {'seconds':>8} {'peak MB':>8} {'t / ours':>8} {'mem / ours':>10} "
        f"{'method s':>8} {'method MB':>9} {'max rel ΔS':>10} {'angle U':>8} {'angle V':>8} {'steps':>5} "
        f"{'products':>8}"
    )
    rows = []
    record = lambda: ll.run_with_linear_cache(model, tokens, check=False, progress=False)  # noqa: E731

    def full(lc):
        jac = lc.jacobian()
        u, s, vh = torch.linalg.svd(
            jac.permute(1, 0, 2).reshape(jac.shape[1], -1), full_matrices=False
        )
        return u[:, :3].clone(), s[:3].clone(), vh[:3].T.clone()

    for n in args.lengths:
        tokens = model.to_tokens(text)[:, :n]
        t_ours, m_ours, mf, (ts_ours, ms_ours) = measure(
            lambda lc: lc.svd_matrix_free(n_triplets=3), record
        )
        t_full, m_full, (u, s, v), (ts_full, ms_full) = measure(full, record)
        err = float(((mf.S - s).abs() / s).max())
        print(
            f"{n:>6} {'matrix-free (replay products)':<28} {t_ours:8.1f} {m_ours / 2**20:8.0f} {1:8.2f} {1:10.2f} "
            f"{ts_ours:8.1f} {ms_ours / 2**20:9.0f} {err:10.1e} {principal_angle(mf.U, u):8.1e} "
            f"{principal_angle(mf.V, v):8.1e} {mf.iterations:>5} {mf.products:>8}"
        )
        print(
            f"{n:>6} {'full Jacobian + svd':<28} {t_full:8.1f} {m_full / 2**20:8.0f} {t_full / t_ours:8.2f} "
            f"{m_full / m_ours:10.2f} {ts_full:8.1f} {ms_full / 2**20:9.0f}",
            flush=True,
        )
        rows.append(
            dict(
                benchmark="top-3 SVD",
                size=f"{n} tokens",
                ours_s=t_ours,
                anchor_s=t_full,
                ours_mb=m_ours / 2**20,
                anchor_mb=m_full / 2**20,
                anchor="full Jacobian + torch.linalg.svd",
            )
        )
        rows.append(
            dict(
                benchmark="  same, after record",
                size=f"{n} tokens",
                ours_s=ts_ours,
                anchor_s=ts_full,
                ours_mb=ms_ours / 2**20,
                anchor_mb=ms_full / 2**20,
                anchor="(the LinearCache both start from)",
            )
        )
    return rows


if __name__ == "__main__":
    main()
