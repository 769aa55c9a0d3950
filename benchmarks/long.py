"""Long prompts on SmolLM2: verified recording, then the top-3 matrix-free SVD.

Ours: ``run_with_linear_cache`` (patterns kept as queries and keys beyond ``max_memory``, 256 MB; the check in
forward mode, carried by the recording), then ``svd_matrix_free(n_triplets=3)``. Anchor
(``--anchor``, the previous default, measured in the same process): every pattern stored
whole (``store_patterns=True``), recorded with ``check=False`` and verified by 8 projected
vector-Jacobian products (``projected_reconstruction_error``), then the same SVD. Each path
runs in a fresh process (:mod:`fresh`); each step prints its seconds and the process's
high-water mark (``VmHWM``, :func:`fresh.high_water_mark`) once the step is done: the peak of
everything so far, the model's loading included.

With ``--patching``: ``predicted_patching`` (``resid_pre``, every layer and position) of one
pair made long (the IOI pair after a document): ours (the pair recorded with patterns as
queries and keys, then replayed with the gradient on) against the detach-hook backward,
which keeps every layer's pattern for the backward (``--anchor``).

Usage: python benchmarks/long.py [--lengths 2048] [--anchor] [--no-svd] [--block 1] [--progress] [--patching]
"""

from __future__ import annotations

import argparse

import torch
from fresh import high_water_mark, in_fresh_process
from jacobian import TEXT

import lens_linear as ll


def _model_and_text():
    model = ll.load_model()
    text = " ".join([TEXT] * 256)
    ll.run_with_linear_cache(model, model.to_tokens(text)[:, :8], progress=False)  # warm-up
    return model, text


def path_steps(
    n: int, anchor: bool, svd: bool, block: int = 1, progress: bool = False
) -> list[tuple[str, float, int, str]]:
    """One path in this (fresh) process: ``(step, seconds, high-water mark after it, detail)``."""
    import time

    model, text = _model_and_text()
    tokens = model.to_tokens(text)[:, :n]
    t0 = time.perf_counter()
    if anchor:  # stored patterns, projected check
        lc = ll.run_with_linear_cache(
            model, tokens, check=False, progress=False, store_patterns=True
        )
        err = lc.projected_reconstruction_error()
    else:  # one call, verified on return; the error it accepted is read again below, untimed
        lc, err = ll.run_with_linear_cache(model, tokens, progress=False), None
    t = time.perf_counter() - t0
    peak = high_water_mark()
    err = lc.check() if err is None else err
    kept = len(lc.point.frozen_attention)
    steps = [("verified recording", t, peak, f"error {err:.1e}, {kept} layers as q/k")]
    if svd:
        t0 = time.perf_counter()
        result = lc.svd_matrix_free(n_triplets=3, block=block, progress=progress)
        t = time.perf_counter() - t0
        s = ", ".join(f"{float(v):.3g}" for v in result.S)
        detail = (
            f"S = [{s}], {result.products} products, converged {result.converged}, "
            f"residuals {float(result.residuals.max()):.1e}, block {block}"
        )
        steps.append(("top-3 matrix-free SVD", t, high_water_mark(), detail))
    return steps


def patching_path(n: int, anchor: bool) -> tuple[int, float, int, float]:
    """Predicted patching of one long pair in this (fresh) process: ``(tokens, seconds, peak,
    max |entry|)``. The anchor's budget holds every pattern whole."""
    import time

    from lens_linear.patching import predicted_patching, prompt_pairs

    model, text = _model_and_text()
    tail = " After John and Mary went to the store, {} gave a bottle of milk to"
    head = model.to_str_tokens(text)[1 : n - len(model.to_tokens(tail.format("Mary"))[0]) + 1]
    pairs = prompt_pairs(
        model,
        "".join(head) + tail.format("Mary"),
        "".join(head) + tail.format("John"),
        " John",
        " Mary",
    )
    t0 = time.perf_counter()
    result = predicted_patching(
        model,
        pairs,
        "resid_pre",
        detached=True,
        max_memory=1 << 62 if anchor else None,
        progress=False,
    )
    t = time.perf_counter() - t0
    return (
        pairs.clean.shape[1],
        t,
        high_water_mark(),
        float(result.raw.sub(result.corrupted).abs().max()),
    )


def main() -> list[dict]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048])
    parser.add_argument("--anchor", action="store_true", help="also run the stored-pattern path")
    parser.add_argument("--no-svd", action="store_true")
    parser.add_argument("--block", type=int, default=1, help="Lanczos block size")
    parser.add_argument("--progress", action="store_true", help="progress bars for the SVD's steps")
    parser.add_argument(
        "--patching", action="store_true", help="predicted patching of a long pair instead"
    )
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; one fresh process per path"
    )
    print(f"{'tokens':>6} {'path':<8} {'step':<22} {'seconds':>8} {'peak GB':>8}  detail")
    paths = [("ours", False)] + ([("anchor", True)] if args.anchor else [])
    rows = []
    if args.patching:
        for n in args.lengths:
            for path, anchor in paths:
                (tokens, t, peak, entry), _, _ = in_fresh_process(patching_path, n, anchor)
                print(
                    f"{tokens:>6} {path:<8} {'predicted patching':<22} {t:8.1f} {peak / 2**30:8.2f}  "
                    f"max |entry| {entry:.3f}",
                    flush=True,
                )
        return rows
    for n in args.lengths:
        results = {}
        for path, anchor in paths:
            steps, _, _ = in_fresh_process(
                path_steps, n, anchor, not args.no_svd, args.block, args.progress
            )
            results[path] = steps
            for name, t, peak, detail in steps:
                print(
                    f"{n:>6} {path:<8} {name:<22} {t:8.1f} {peak / 2**30:8.2f}  {detail}",
                    flush=True,
                )
            total = sum(t for _, t, _, _ in steps)
            peak = max(p for _, _, p, _ in steps)
            print(f"{n:>6} {path:<8} {'total':<22} {total:8.1f} {peak / 2**30:8.2f}")
            if not anchor and n == 2048 and not args.no_svd:
                verdict = "within" if peak <= 4 << 30 else "OVER"
                print(f"{'':>6} {path:<8} 2,048 tokens: peak {verdict} the 4 GB target")
        ours_t = sum(t for _, t, _, _ in results["ours"])
        ours_m = max(p for _, _, p, _ in results["ours"])
        anchor_steps = results.get("anchor")
        rows.append(
            dict(
                benchmark="long prompt",
                size=f"{n} tok",
                anchor="stored patterns" if anchor_steps else "(none)",
                ours_s=ours_t,
                anchor_s=sum(t for _, t, _, _ in anchor_steps) if anchor_steps else ours_t,
                ours_mb=ours_m / 2**20,
                anchor_mb=max(p for _, _, p, _ in anchor_steps) / 2**20
                if anchor_steps
                else ours_m / 2**20,
            )
        )
    return rows


if __name__ == "__main__":
    main()
