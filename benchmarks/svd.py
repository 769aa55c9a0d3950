"""Matrix-free top-3 singular triplets vs the full Jacobian + ``torch.linalg.svd`` on SmolLM2.

The matrix is the detached Jacobian of the output embedding at the last position w.r.t.
the input embeddings of all positions side by side (``d_model × positions·d_model``).
Baseline: ``LinearCache.jacobian()`` (chunked batched VJPs, d_model rows) then a dense
SVD. Ours: Golub–Kahan–Lanczos (one vector a step) from replay products only
(``LinearCache.svd_matrix_free``), never forming the matrix. Each method is measured whole
(recording the ``LinearCache`` included) and from the recorded cache on ("method"), since
the cache is shared state a user already holds: at 512 tokens it alone keeps ~470 MB
(frozen patterns, gates, logits).

Times: one run per method in this process, after a warm-up. Memory is measured apart from
them, in one fresh process per method and length (:mod:`fresh`) that loads the model,
records the cache and runs the method once, with no warm-up: peak MB (process high-water
mark, model included) is that process's peak; method MB is its high-water mark while the
method runs, lowered to the resident size once the cache is recorded (so it holds the model
and the cache, not the recording's own transient peak).

Usage: python benchmarks/svd.py [--lengths 32 128 512]
"""

from __future__ import annotations

import argparse

import torch
from fresh import high_water_mark, in_fresh_process, reset_high_water_mark
from jacobian import TEXT, measure

import lens_linear as ll

TEXT_LONG = " ".join([TEXT] * 64)


def principal_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest principal angle between the column spaces of a and b (radians)."""
    qa, qb = torch.linalg.qr(a.double()).Q, torch.linalg.qr(b.double()).Q
    return float(torch.arccos(torch.linalg.svdvals(qa.T @ qb).min().clamp(max=1.0)))


def record(model, tokens):
    return ll.run_with_linear_cache(model, tokens, check=False, progress=False)


def matrix_free(lc):
    return lc.svd_matrix_free(n_triplets=3)


def full(lc):
    """The baseline: the full Jacobian, then a dense SVD; its top-3 triplets."""
    jac = lc.jacobian()
    u, s, vh = torch.linalg.svd(jac.permute(1, 0, 2).reshape(jac.shape[1], -1), full_matrices=False)
    return u[:, :3].clone(), s[:3].clone(), vh[:3].T.clone()


def fresh_peaks(method: str, n: int) -> tuple[int, int]:
    """What a fresh process runs for ``method``'s peaks at ``n`` tokens: the model loaded, the
    cache recorded, the method run. Returns ``(the process's high-water mark, the method
    stage's)``, the mark lowered between them to the resident size (model and cache)."""
    model = ll.load_model()
    lc = record(model, model.to_tokens(TEXT_LONG)[:, :n])
    recorded = high_water_mark()
    reset_high_water_mark()
    {"matrix-free": matrix_free, "full": full}[method](lc)
    stage = high_water_mark()
    return max(recorded, stage), stage


def main() -> list[dict]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 128, 512])
    args = parser.parse_args()
    model = ll.load_model()
    ll.run_with_linear_cache(
        model, model.to_tokens(TEXT_LONG)[:, :4], check=False, progress=False
    ).svd_matrix_free(n_triplets=3)  # warm-up
    print(
        "seconds: one run in this process; peak MB (process high-water mark, model included): "
        "one fresh process per method; method MB: its high-water mark from the recorded cache on"
    )
    print(
        f"{'tokens':>6} {'method':<28} {'seconds':>8} {'peak MB':>8} {'t / ours':>8} {'mem / ours':>10} "
        f"{'method s':>8} {'method MB':>9} {'max rel ΔS':>10} {'angle U':>8} {'angle V':>8} {'steps':>5} "
        f"{'products':>8}"
    )
    rows = []
    for n in args.lengths:
        tokens = model.to_tokens(TEXT_LONG)[:, :n]
        t_ours, mf, ts_ours = measure(matrix_free, lambda: record(model, tokens))
        t_full, (u, s, v), ts_full = measure(full, lambda: record(model, tokens))
        m_ours, ms_ours = in_fresh_process(fresh_peaks, "matrix-free", n)[0]
        m_full, ms_full = in_fresh_process(fresh_peaks, "full", n)[0]
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
