"""Per-call overhead on tiny models, where arithmetic is negligible and Python and hooks are all
that costs (issue: the user path at least as fast as vectorized autograd; a verified recording
at most 3 plain forwards).

For each tiny family (2 layers, d_model 64, 16 tokens), medians of ``--repeats`` runs taken in
turn in one process after a warm-up:

* a plain forward (``model(tokens)`` under ``no_grad``): the unit;
* a recording alone (``run_with_linear_cache(check=False)``) and a verified one (default), in
  plain forwards;
* the user path (verified recording + ``lcache.jacobian()``) against
  ``torch.autograd.functional.jacobian(vectorize=True)`` over the same detached function (the
  seed paper's method): the ratio is autograd's time over ours (≥ 1: ours is faster).

Usage: python benchmarks/overhead.py [--repeats 15] [--archs llama gpt2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lens_linear as ll
from lens_linear.hooks import detached_function


def medians(methods: dict, repeats: int) -> dict:
    runs: dict = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in runs.items()}


def table(archs: list[str], repeats: int, device: str = "cpu") -> None:
    print(
        f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, medians of {repeats}"
    )
    print(
        "| family | forward ms | recording (fwd) | verified recording (fwd) | user path ms | vectorized autograd ms | ratio (autograd / ours) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    cuda = device.startswith("cuda")
    for arch in archs:
        model = ll.tiny_model(arch).to(device)
        tokens = model.to_tokens("Hello there, friend! How are")[:, :16].to(device)
        x = ll.run_with_linear_cache(model, tokens, check=False, progress=False).x
        frozen = detached_function(model, tokens)

        def forward():
            with torch.no_grad():
                model(tokens)

        methods = {
            "forward": forward,
            "recording": lambda: ll.run_with_linear_cache(
                model, tokens, check=False, progress=False
            ),
            "verified": lambda: ll.run_with_linear_cache(model, tokens, progress=False),
            "user": lambda: ll.run_with_linear_cache(model, tokens, progress=False).jacobian(),
            "autograd": lambda: torch.autograd.functional.jacobian(frozen, x, vectorize=True),
        }
        if cuda:  # time the work, not the launch
            methods = {k: (lambda f=f: (f(), torch.cuda.synchronize())) for k, f in methods.items()}
        medians(methods, 2)  # warm-up
        t = medians(methods, repeats)
        f = t["forward"]
        print(
            f"| {arch} | {1e3 * f:.2f} | {t['recording'] / f:.1f} | {t['verified'] / f:.1f} | "
            f"{1e3 * t['user']:.2f} | {1e3 * t['autograd']:.2f} | {t['autograd'] / t['user']:.2f} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--archs", nargs="+", default=["llama", "gpt2", "gemma3", "qwen3"])
    args = parser.parse_args()
    table(args.archs, args.repeats)


if __name__ == "__main__":
    main()
