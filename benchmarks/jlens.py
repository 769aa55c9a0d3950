"""Fitting a Jacobian lens on SmolLM2: TransformerLens' ``JacobianLens.fit`` against ours.

Three fits of the same prompts (every block but the last as a source, the first 16 positions
and the last left out, as by default):
* ``JacobianLens.fit`` (TransformerLens): each prompt replicated ``dim_batch = 8`` times, then
  ``d_model / 8`` backward passes of 8 one-hot rows;
* ``fit_jacobian_lens`` (lens_linear, ordinary): one forward per prompt from the first source
  layer on, then batched backward passes (``is_grads_batched``) of as many rows as the memory
  budget allows; the same estimator, so its matrices must equal TransformerLens' (~1e-7);
* ``fit_jacobian_lens(detached=True)``: the lens of each prompt's frozen map (norm scales,
  patterns and gates frozen, verified per prompt), another estimator: its difference to
  TransformerLens' matrices is printed as information, not as an error.

Each fit runs in a fresh process (:mod:`fresh`): the time is that of the fit call alone (after
loading the model and one warm-up forward), the peak is the process's high-water mark
(``VmHWM``), the model included. The matrices go through a temporary file to this process,
which compares them layer by layer (``|a - b| / |b|``, the largest over layers).

Both fits do the same backward arithmetic: ``d_model`` rows through every position of every
block above the first source layer, about 2 FLOPs per block parameter per row and position
(weights only: attention scores and the forward are left out). That floor is printed with
the GFLOP/s it implies for each fit: near the machine's matmul rate, a fit is bound by
arithmetic and batching cannot speed it up; well below it, the overhead is elsewhere. The
detached lens does less than that floor: with patterns and gates frozen, its backward skips
the query, key and gate projections (3/8 of a SmolLM2 block's parameters), so its figure
overstates its rate by 8/5.

Prompts are deterministic varied English text, a different rotation of the same sentences
for each prompt, cut to exactly T tokens by ``max_seq_len`` (``JacobianLens.fit`` takes
strings only, and tokenizes them with ``model.to_tokens``, as ours does).

``--threads 1`` runs every fit on one thread: on a machine shared with other work, a fit on
every core slows down badly whenever another process takes one of them (each parallel region
waits for its slowest thread), while single-threaded fits keep comparable times.

Usage: python benchmarks/jlens.py [--prompts 4 --tokens 64 --prompts 1 --tokens 128] [--threads 1]
       python benchmarks/jlens.py --configs 8x64,2x128
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from fresh import in_fresh_process

import lens_linear as ll

SENTENCES = [
    "The bridge out of Marin is the most photographed bridge in the world.",
    "On foggy mornings its towers rise above the clouds while ferries cross the bay below.",
    "My grandmother kept bees behind the orchard and sold the honey at the Saturday market.",
    "In 1869 the first transcontinental railroad joined the two coasts at Promontory Summit.",
    "Photosynthesis turns sunlight, water and carbon dioxide into sugar and oxygen.",
    "The committee postponed its vote until the auditors had finished reviewing the accounts.",
    "She tuned the old violin, closed her eyes and played a slow waltz for the empty hall.",
    "To reset the router, hold the small button on the back for ten seconds.",
    "Glaciers carved the valley over thousands of years, leaving lakes in every hollow.",
    "The recipe calls for two cups of flour, a pinch of salt and three eggs beaten until pale.",
    "Despite the rain, thousands of runners finished the marathon before noon.",
    "A prime number has exactly two divisors: one and itself.",
]
METHODS = ("TransformerLens", "ours", "ours, detached")


def make_prompts(n: int) -> list[str]:
    """``n`` different prompts, each every sentence once from a different start (twice over:
    over 400 tokens, more than any configuration here takes)."""
    return [" ".join((SENTENCES[i:] + SENTENCES[:i]) * 2) for i in range(n)]


def fit(
    method: str, n: int, tokens: int, path: str, threads: int | None
) -> tuple[float, int, int, int]:
    """One fit in this (fresh) process, its matrices saved to ``path``: ``(seconds, parameters
    per block, d_model, n_layers)``."""
    from transformer_lens.tools.analysis import JacobianLens

    from lens_linear.jacobian_lens import fit_jacobian_lens

    if threads:
        torch.set_num_threads(threads)
    model = ll.load_model()
    prompts = make_prompts(n)
    assert all(model.to_tokens(p).shape[1] >= tokens for p in prompts), "prompts too short"
    with torch.no_grad():
        model(model.to_tokens(prompts[0])[:, :8])  # warm-up
    t0 = time.perf_counter()
    if method == "TransformerLens":
        lens = JacobianLens.fit(
            model, prompts, corpus="bench", max_seq_len=tokens, show_progress=False
        )
    else:
        detached = method.endswith("detached")
        lens = fit_jacobian_lens(
            model, prompts, detached=detached, max_seq_len=tokens, progress=False
        )
    seconds = time.perf_counter() - t0
    torch.save(lens.jacobians, path)
    params = sum(p.numel() for p in model.blocks[1].parameters())
    return seconds, params, model.cfg.d_model, model.cfg.n_layers


def parse_configs(args: argparse.Namespace) -> list[tuple[int, int]]:
    if args.configs:
        return [tuple(int(x) for x in c.split("x")) for c in args.configs.split(",")]
    if args.prompts or args.tokens:
        if len(args.prompts or []) != len(args.tokens or []):
            raise SystemExit("give --prompts and --tokens the same number of times")
        return list(zip(args.prompts, args.tokens))
    return [(4, 64), (1, 128)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, action="append", help="prompts of a configuration")
    parser.add_argument("--tokens", type=int, action="append", help="tokens of each prompt")
    parser.add_argument("--configs", help="NxT,... e.g. 8x64,2x128 (instead of the flags)")
    parser.add_argument("--threads", type=int, help="torch threads of each fit (default: torch's)")
    args = parser.parse_args()
    configs = parse_configs(args)
    threads = args.threads or torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads; one fresh process per fit")
    rows, floors = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for n, t in configs:
            done = {}
            for i, method in enumerate(METHODS):
                path = os.path.join(tmp, f"{n}x{t}-{i}.pt")
                (seconds, params, d_model, n_layers), _, peak = in_fresh_process(
                    fit, method, n, t, path, args.threads
                )
                done[method] = seconds, peak, torch.load(path)
                print(f"  {n}x{t} {method}: {seconds:.1f} s, {peak / 2**20:.0f} MB", flush=True)
            flops = d_model * n * t * (n_layers - 1) * 2 * params  # every block above layer 0
            floors.append(f"{flops / 1e9:,.0f} GFLOP for {n} x {t}")
            tl_s, tl_peak, tl_j = done[METHODS[0]]
            for method, (seconds, peak, jac) in done.items():
                err = max(float((jac[k] - tl_j[k]).norm() / tl_j[k].norm()) for k in tl_j)
                shown = "-" if method == METHODS[0] else f"{err:.1e}"
                if method.endswith("detached"):
                    shown = f"({err:.2f}, other estimator)"
                rows.append(
                    f"| {n} x {t} | {method} | {seconds:.1f} | {peak / 2**20:.0f} | "
                    f"{tl_s / seconds:.2f} | {tl_peak / peak:.2f} | {shown} | "
                    f"{flops / seconds / 1e9:.1f} |"
                )
    print()
    print(
        "| config | method | time s | peak MB | speed vs TL (TL/it) | memory vs TL (TL/it) | max rel err vs TL | GFLOP/s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    print(
        f"\nArithmetic floor (backward, weights only): {d_model} rows x positions x "
        f"{n_layers - 1} blocks above the first source layer x 2 x {params / 1e6:.2f} M "
        f"parameters per block = {'; '.join(floors)}. GFLOP/s = floor / time."
    )


if __name__ == "__main__":
    main()
