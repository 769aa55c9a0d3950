"""How faithful is each patching prediction to real activation patching? SmolLM2, four tasks.

For each task and node family, every method's table is compared with real activation
patching of the same sweep (the ground truth every method approximates): Pearson r over the
entries, the overlap of the ten largest entries (by magnitude of the change), and the time.

Methods (all ``lens_linear.patching.predicted_patching``):
* frozen map — the exact gradient of the corrupted run's frozen map (``detached=True``);
* attribution — the ordinary gradient (``detached=False``; TransformerLens' attribution patching);
* ``+IG4`` — the gradient averaged over 4 points from the corrupted to the clean input;
* ``+cert`` — the largest 5% of predicted entries rerun as real patches (exact, marked);
* default — what ``predicted_patching`` does when none of these is named (the ordinary
  gradient, ``+IG4`` on residual and MLP sweeps, ``+cert`` and further rounds of
  certification while the checked predictions say the rest are off by more than 1% of the
  table's variance: ``certify_tolerance=0.01``).

Families: ``resid_pre``, ``attn_out``, ``mlp_out`` (every layer × position), ``head`` (every
layer × head) and ``head_by_pos`` (every third layer × position × head, to bound the real
sweep's time on a CPU).

Circuits (``--circuits``, on by default): each task's edges scored by EAP-IG (the default),
attribution patching and the frozen map, timed, and a circuit grown from each ranking until it
recovers 80% of the gap under ablate-outside faithfulness (TransformerLens' definition): the
curve of recovered fraction against circuit size. TransformerLens' own edge sweep is tried on
the same model (it refuses grouped-query attention, which SmolLM2 has).

Usage: python benchmarks/faithfulness.py [--tasks ioi,capital,pronoun] [--families ...] [--no-circuits]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import lens_linear as ll
from lens_linear.circuits import edge_attribution, grow_circuit
from lens_linear.patching import activation_patching, predicted_patching, prompt_pairs

TASKS = {
    "ioi": (  # names outside the library's IOI list
        [
            "After Alice and Bob went to the park, Bob gave a ball to",
            "After Kate and Mark went to the shop, Mark handed a book to",
        ],
        [
            "After Alice and Bob went to the park, Alice gave a ball to",
            "After Kate and Mark went to the shop, Kate handed a book to",
        ],
        [" Alice", " Kate"],
        [" Bob", " Mark"],
    ),
    "capital": (
        ["The capital of France is the city of", "The capital of Japan is the city of"],
        ["The capital of Italy is the city of", "The capital of Germany is the city of"],
        [" Paris", " Tokyo"],
        [" Rome", " Berlin"],
    ),
    "ioi_long": (  # 38 tokens: how the time ratio falls as real patching grows with positions
        [
            "After the long meeting at the office ended late on a rainy Friday evening, Alice and "
            "Bob walked together to the quiet park near the old river, and there Bob gave a small "
            "red ball to"
        ],
        [
            "After the long meeting at the office ended late on a rainy Friday evening, Alice and "
            "Bob walked together to the quiet park near the old river, and there Alice gave a "
            "small red ball to"
        ],
        [" Alice"],
        [" Bob"],
    ),
    "pronoun": (
        ["John went to the store because"],
        ["Mary went to the store because"],
        [" he"],
        [" she"],
    ),
}
METHODS = {
    "default": {},  # patching.DEFAULT_PREDICTION: what predicted_patching does unasked
    "frozen map": dict(detached=True),
    "attribution": dict(detached=False),
    "frozen map +IG4": dict(detached=True, ig_steps=4),
    "attribution +IG4": dict(detached=False, ig_steps=4),
    "attribution +IG8": dict(detached=False, ig_steps=8),
    "frozen map +cert": dict(detached=True, certify=0.05),
    "attribution +cert": dict(detached=False, certify=0.05),
    "attribution +IG4 +cert": dict(detached=False, ig_steps=4, certify=0.05),
    "attribution +IG3 +rounds": dict(
        detached=False, ig_steps=3, certify=0.05, certify_tolerance=0.01
    ),
    "attribution +IG4 +rounds": dict(
        detached=False, ig_steps=4, certify=0.05, certify_tolerance=0.01
    ),
}
FAMILIES = ["resid_pre", "attn_out", "mlp_out", "head", "head_by_pos"]


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-300))


def top_overlap(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> float:
    ta = set(torch.topk(a.flatten().abs(), k).indices.tolist())
    tb = set(torch.topk(b.flatten().abs(), k).indices.tolist())
    return len(ta & tb) / k


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--json", default=None, help="write every row to this file")
    parser.add_argument("--no-circuits", action="store_true", help="node families only")
    parser.add_argument("--methods", default=",".join(METHODS), help="a subset of METHODS")
    args = parser.parse_args()
    model = ll.load_model()
    rows = []
    print(
        f"{'task':<8} {'family':<12} {'method':<24} {'r':>7} {'top-10':>7} {'s':>7} {'× real':>7}"
    )
    for task in args.tasks.split(","):
        pairs = prompt_pairs(model, *TASKS[task])
        for family in args.families.split(","):
            layers = list(range(0, model.cfg.n_layers, 3)) if family == "head_by_pos" else None
            start = time.perf_counter()
            real = activation_patching(model, pairs, family, layers=layers, progress=False)
            t_real = time.perf_counter() - start
            truth = real.values
            print(
                f"{task:<8} {family:<12} {'activation patching':<24} {1:7.3f} {1:7.2f} {t_real:7.1f} {1:7.3f}"
            )
            for name in args.methods.split(","):
                options = METHODS[name]
                start = time.perf_counter()
                table = predicted_patching(
                    model, pairs, family, layers=layers, progress=False, **options
                )
                took = time.perf_counter() - start
                r, top = pearson(table.values, truth), top_overlap(table.values, truth)
                rows.append(
                    dict(
                        task=task,
                        family=family,
                        method=name,
                        r=r,
                        top10=top,
                        seconds=took,
                        real_seconds=t_real,
                    )
                )
                print(
                    f"{task:<8} {family:<12} {name:<24} {r:7.3f} {top:7.2f} {took:7.1f} {took / t_real:7.3f}"
                )
    if not args.no_circuits:
        rows += circuits(model, args.tasks.split(","))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print("\nworst r per method over every task and family:")
    for name in args.methods.split(","):
        mine = [row for row in rows if row["method"] == name and "r" in row]
        worst = min(mine, key=lambda row: row["r"])
        print(
            f"  {name:<24} {worst['r']:.3f} ({worst['task']}, {worst['family']}); mean {sum(r['r'] for r in mine) / len(mine):.3f}"
        )


EDGE_METHODS = {
    "EAP-IG (default)": {},
    "attribution (EAP)": dict(detached=False),
    "frozen-map edges": dict(detached=True),
}


def circuits(model, tasks: list[str]) -> list[dict]:
    """Edge sweeps timed, and circuits grown from each ranking to 80% of the gap."""
    from transformer_lens.tools.analysis import attribution_patching as tl

    rows = []
    print("\ncircuits: edges needed to recover 80% of the gap (ablate-outside, corrupted writes)")
    for task in tasks:
        pairs = prompt_pairs(model, *TASKS[task])
        try:
            a, b = int(pairs.answers[0]), int(pairs.wrong[0])
            start = time.perf_counter()
            tl.attribution_patch(
                model,
                pairs.clean[:1],
                pairs.corrupted[:1],
                lambda logits: logits[0, -1, a] - logits[0, -1, b],
                tl.EdgeAttributionConfig(granularity="edge"),
            )
            print(f"{task}: TransformerLens' edge sweep took {time.perf_counter() - start:.1f} s")
        except (ValueError, NotImplementedError) as exc:
            print(f"{task}: TransformerLens' edge sweep refuses this model: {str(exc)[:110]}…")
        for name, options in EDGE_METHODS.items():
            start = time.perf_counter()
            scores = edge_attribution(model, pairs, progress=False, **options)
            took = time.perf_counter() - start
            start = time.perf_counter()
            curve = grow_circuit(model, pairs, scores, target=0.8, progress=False)
            grown = time.perf_counter() - start
            size = len(curve.circuit) if curve.circuit is not None else None
            points = ", ".join(
                f"{k}: {r:.2f}"
                for k, r in zip(curve.sizes, curve.recovered)
                if k <= (size or 10**9)
            )
            print(
                f"{task:<8} {name:<18} {len(scores.edge_scores):>8} edges in {took:5.1f} s; "
                f"80% with {size if size is not None else 'none short of all'} edges ({grown:.0f} s): {points}"
            )
            rows.append(
                dict(
                    task=task,
                    method=name,
                    edges=len(scores.edge_scores),
                    seconds=took,
                    circuit_80=size,
                    curve=list(zip(curve.sizes, curve.recovered)),
                )
            )
    return rows


if __name__ == "__main__":
    main()
