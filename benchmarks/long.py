"""Long prompts on SmolLM2: verified recording, then the top-3 matrix-free SVD.

Ours: ``run_with_linear_cache`` (patterns kept as queries and keys beyond 256 MB; the check in
forward mode, carried by the recording), then ``svd_matrix_free(n_triplets=3)``. Anchor
(``--anchor``, the previous default, measured in the same process): every pattern stored
whole (``store_patterns=True``), recorded with ``check=False`` and verified by 8 projected
vector-Jacobian products (``projected_reconstruction_error``), then the same SVD. Each step:
seconds, peak resident memory of the whole process (the model included), products.

With ``--patching``: ``predicted_patching`` (``resid_pre``, every layer and position) of one
pair made long (the IOI pair after a document): ours (the pair recorded with patterns as
queries and keys, then replayed with the gradient on) against the detach-hook backward,
which keeps every layer's pattern for the backward (``--anchor``).

Usage: python benchmarks/long.py [--lengths 2048] [--anchor] [--no-svd] [--block 1] [--progress] [--patching]
"""

from __future__ import annotations

import argparse
import resource
import threading
import time

import torch
from jacobian import TEXT

import lens_linear as ll


class Peak:
    """Peak resident memory of this process while a block runs (sampled every 10 ms)."""

    def __enter__(self) -> "Peak":
        self.peak, self._done = 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.is_set():
            with open("/proc/self/statm") as f:
                self.peak = max(self.peak, int(f.read().split()[1]) * resource.getpagesize())
            time.sleep(0.01)

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()


def timed(fn):
    with Peak() as peak:
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0
    return result, seconds, peak.peak


def run(
    model, tokens, store_patterns: bool | None, svd: bool, block: int = 1, progress: bool = False
) -> list[tuple[str, float, int, str]]:
    if store_patterns:  # the anchor: stored patterns, projected check

        def record():
            lc = ll.run_with_linear_cache(
                model, tokens, check=False, progress=False, store_patterns=True
            )
            return lc, lc.projected_reconstruction_error()
    else:  # one call, verified on return; the error it accepted is read again below, untimed

        def record():
            return ll.run_with_linear_cache(model, tokens, progress=False), None

    (lc, err), t, peak = timed(record)
    err = lc.check() if err is None else err
    kept = len(lc.point.frozen_attention)
    steps = [("verified recording", t, peak, f"error {err:.1e}, {kept} layers as q/k")]
    if svd:
        result, t, peak = timed(
            lambda: lc.svd_matrix_free(n_triplets=3, block=block, progress=progress)
        )
        s = ", ".join(f"{float(v):.3g}" for v in result.S)
        steps.append(
            (
                "top-3 matrix-free SVD",
                t,
                peak,
                f"S = [{s}], {result.products} products, "
                f"converged {result.converged}, residuals "
                f"{float(result.residuals.max()):.1e}, block {block}",
            )
        )
    return steps


def patching(model, n: int, anchor: bool) -> None:
    import lens_linear.hooks.operating_point as op
    from lens_linear.patching import predicted_patching, prompt_pairs

    tail = " After John and Mary went to the store, {} gave a bottle of milk to"
    head = model.to_str_tokens(" ".join([TEXT] * 256))[
        1 : n - len(model.to_tokens(tail.format("Mary"))[0]) + 1
    ]
    pairs = prompt_pairs(
        model,
        "".join(head) + tail.format("Mary"),
        "".join(head) + tail.format("John"),
        " John",
        " Mary",
    )
    paths = [("ours", op.PATTERN_BUDGET)] + ([("anchor", 1 << 62)] if anchor else [])
    for path, budget in paths:
        saved, op.PATTERN_BUDGET = op.PATTERN_BUDGET, budget
        try:
            result, t, peak = timed(
                lambda: predicted_patching(model, pairs, "resid_pre", progress=False)
            )
        finally:
            op.PATTERN_BUDGET = saved
        print(
            f"{pairs.clean.shape[1]:>6} {path:<8} {'predicted patching':<22} {t:8.1f} {peak / 2**30:8.2f}  "
            f"max |entry| {float(result.raw.sub(result.corrupted).abs().max()):.3f}",
            flush=True,
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
    model = ll.load_model()
    text = " ".join([TEXT] * 256)
    ll.run_with_linear_cache(model, model.to_tokens(text)[:, :8], progress=False)  # warm-up
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'tokens':>6} {'path':<8} {'step':<22} {'seconds':>8} {'peak GB':>8}  detail")
    rows = []
    if args.patching:
        for n in args.lengths:
            patching(model, n, args.anchor)
        return rows
    for n in args.lengths:
        tokens = model.to_tokens(text)[:, :n]
        results = {}
        for path, store in [("ours", None)] + ([("anchor", True)] if args.anchor else []):
            steps = run(model, tokens, store, not args.no_svd, args.block, args.progress)
            results[path] = steps
            for name, t, peak, detail in steps:
                print(
                    f"{n:>6} {path:<8} {name:<22} {t:8.1f} {peak / 2**30:8.2f}  {detail}",
                    flush=True,
                )
            total = sum(t for _, t, _, _ in steps)
            print(
                f"{n:>6} {path:<8} {'total':<22} {total:8.1f} {max(p for _, _, p, _ in steps) / 2**30:8.2f}"
            )
        ours_t = sum(t for _, t, _, _ in results["ours"])
        ours_m = max(p for _, _, p, _ in results["ours"])
        anchor = results.get("anchor")
        rows.append(
            dict(
                benchmark="long prompt",
                size=f"{n} tok",
                anchor="stored patterns" if anchor else "(none)",
                ours_s=ours_t,
                anchor_s=sum(t for _, t, _, _ in anchor) if anchor else ours_t,
                ours_mb=ours_m / 2**20,
                anchor_mb=max(p for _, _, p, _ in anchor) / 2**20 if anchor else ours_m / 2**20,
            )
        )
    return rows


if __name__ == "__main__":
    main()
