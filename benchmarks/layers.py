"""Jacobians of every ``hook_resid_post`` at the last position, SmolLM2: ours vs a per-layer loop.

Baseline: the seed paper code's method, one ``torch.autograd.functional.jacobian(vectorize=True)``
call per layer on the detached function (each call runs the full model forward).

Cost model used to choose the engine (n positions, d = d_model, L layers, token-layer passes):
* reverse, one batched-VJP Jacobian per layer: n · d · Σ_l (l + 1) ≈ L² · n · d / 2;
* forward replay products, one pass per input direction, all layers read off it, a
  direction at position i run on positions i.. only: d · L · n(n + 1)/2 ≈ L · n² · d / 2.
Forward wins when n < L (short prompts, deep models), reverse for long prompts; a forward
token-layer pass costs ~1.8 backward rows here, which moves the break-even to n ≈ L / 1.8.
Times: one run per method in this process, after a warm-up pass that both methods would
otherwise pay for unequally. Memory is measured apart from them: peak MB (process high-water
mark, model included) is that of one fresh process per method and length (:mod:`fresh`),
which loads the model and runs the method once, with no warm-up. Both hold their results
at their peak: all-layer Jacobians are 30 · n · d² floats (318 MB at 8 tokens, 1.27 GB at 32).

Usage: python benchmarks/layers.py [--lengths 8 32]
"""

from __future__ import annotations

import argparse

import torch
from fresh import peak_of
from jacobian import TEXT, measure

import lens_linear as ll
from lens_linear.hooks import detached_function


def ours(model, tokens, hooks):
    return ll.run_with_linear_cache(model, tokens, check=False, progress=False).jacobians(hooks)


def loop(model, tokens, hooks, x):
    """The baseline: one ``torch.autograd.functional.jacobian`` per layer, at the input ``x``."""
    return {
        h: torch.autograd.functional.jacobian(
            detached_function(model, tokens, h), x, vectorize=True
        )
        for h in hooks
    }


def fresh_run(method: str, n: int) -> None:
    """What a fresh process runs for ``method``'s peak at ``n`` tokens: the model loaded, then
    ``ours`` or ``loop`` (its input ``x`` recorded first, as in the timed run) over every layer."""
    model = ll.load_model()
    hooks = [f"blocks.{l}.hook_resid_post" for l in range(model.cfg.n_layers)]
    tokens = model.to_tokens(TEXT)[:, :n]
    if method == "ours":
        ours(model, tokens, hooks)
    else:
        x = ll.run_with_linear_cache(model, tokens, check=False, progress=False).x
        loop(model, tokens, hooks, x)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[8, 32])
    args = parser.parse_args()
    model = ll.load_model()
    hooks = [f"blocks.{l}.hook_resid_post" for l in range(model.cfg.n_layers)]
    all_tokens = model.to_tokens(TEXT)
    # warm-up: the first forward/backward of a process allocates ~0.5 GB that stays (thread
    # pools, allocator arenas); without it, whichever method runs first is charged for it
    ll.run_with_linear_cache(model, all_tokens[:, :2], check=False, progress=False).jacobians(
        hooks[:2]
    )
    print(
        "seconds: one run in this process; peak MB (process high-water mark, model included): "
        "one fresh process per method"
    )
    print(
        f"{'tokens':>6} {'method':<30} {'seconds':>8} {'peak MB':>8} {'t / ours':>8} {'mem / ours':>10} {'max rel ΔJ':>10}"
    )
    for n in args.lengths:
        tokens = all_tokens[:, :n]
        t_ours, mine = measure(lambda: ours(model, tokens, hooks))
        engine = ll.run_with_linear_cache(model, tokens, check=False, progress=False).engine(hooks)
        x = ll.run_with_linear_cache(model, tokens, check=False, progress=False).x
        t_base, base = measure(lambda: loop(model, tokens, hooks, x))
        err = max(float((base[h].transpose(0, 1) - mine[h]).norm() / base[h].norm()) for h in hooks)
        del mine, base
        m_ours, m_base = peak_of(fresh_run, "ours", n), peak_of(fresh_run, "loop", n)
        print(
            f"{n:>6} {'lens_linear (' + engine + ')':<30} {t_ours:8.1f} {m_ours / 2**20:8.0f} {1:8.2f} {1:10.2f} {0:10.1e}"
        )
        print(
            f"{n:>6} {'per-layer vectorize=True loop':<30} {t_base:8.1f} {m_base / 2**20:8.0f} "
            f"{t_base / t_ours:8.2f} {m_base / m_ours:10.2f} {err:10.1e}",
            flush=True,
        )


if __name__ == "__main__":
    main()
