"""The scale benchmarks in one run, one summary table of ratios against their anchors.

Runs ``stats.py`` (dataset sensitivity: 64 prompts x 16 tokens vs a per-sample loop of
single VJPs) and ``svd.py`` (matrix-free top-3 SVD vs full Jacobian + SVD at 32, 128 and
512 tokens) in this process, each printing its own table first.

Usage: cd benchmarks && python run.py [--quick]   (--quick: small sizes, a smoke test)
"""

from __future__ import annotations

import sys

import long
import stats
import svd


def run(module, argv: list[str]) -> list[dict]:
    print(f"\n== {module.__name__}.py {' '.join(argv)}", flush=True)
    sys.argv = [module.__name__, *argv]
    return module.main()


def main() -> None:
    quick = "--quick" in sys.argv
    rows = run(
        stats,
        [
            "--prompts",
            "4",
            "--tokens",
            "6",
            "--probes",
            "2",
            "--exact-prompts",
            "1",
            "--anchor-vjps",
            "20",
        ]
        if quick
        else [],
    )
    rows += run(svd, ["--lengths", "16"] if quick else [])
    rows += run(long, ["--lengths", "64", "--anchor"] if quick else ["--anchor"])
    print(
        f"\n{'benchmark':<20} {'size':<10} {'anchor':<34} {'ours s':>8} {'anchor s':>9} {'speed-up':>8} "
        f"{'ours MB':>8} {'anchor MB':>9} {'memory ratio':>12}"
    )
    for r in rows:
        print(
            f"{r['benchmark']:<20} {r['size']:<10} {r['anchor']:<34} {r['ours_s']:8.1f} {r['anchor_s']:9.1f} "
            f"{r['anchor_s'] / r['ours_s']:8.2f} {r['ours_mb']:8.0f} {r['anchor_mb']:9.0f} "
            f"{r['anchor_mb'] / max(r['ours_mb'], 1):12.2f}"
        )


if __name__ == "__main__":
    main()
