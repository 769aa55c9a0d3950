"""The ``lens-linear`` command."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

from lens_linear._validation import LinearizationError, ModelUnavailableError, parse_dtype


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lens-linear", description="Exact linear views of a transformer for one input."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("analyze", help="detached Jacobian of the next-token prediction of PROMPT")
    a.add_argument("prompt")
    a.add_argument(
        "--model",
        default="smollm2",
        help="'smollm2' (the offline default), 'gemma3-270m' (also offline), a local .gguf "
        "file or save_pretrained folder, or a TransformerLens model name",
    )
    a.add_argument("--backend", default="auto", choices=["auto", "bridge", "hooked"])
    a.add_argument("--pos", type=int, default=-1, help="output position (default: last)")
    a.add_argument(
        "--dtype", default="float32", help="float32 (default), float64, bfloat16 or float16"
    )
    a.add_argument(
        "--no-layers",
        dest="layers",
        action="store_false",
        help="skip the per-layer table (it needs every layer's Jacobian)",
    )
    a.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    a.add_argument(
        "--report",
        metavar="FILE.html",
        help="also write a self-contained HTML report (figures, "
        "attention patterns, token views; opens with no network)",
    )
    return parser


def analyze(args: argparse.Namespace) -> dict:
    from lens_linear.cache import run_with_linear_cache
    from lens_linear.models import load_model

    dtype = parse_dtype(args.dtype)
    t0 = time.perf_counter()
    model = load_model(args.model, backend=args.backend, dtype=dtype)
    t1 = time.perf_counter()
    lcache = run_with_linear_cache(model, args.prompt, pos=args.pos, progress=not args.json)
    t2 = time.perf_counter()
    contrib = lcache.contributions().norm(dim=-1)
    per_token = []
    for i, tok in enumerate(lcache.str_tokens):
        top = lcache.decode(input_pos=i, n_triplets=1, n_tokens=3)[0]
        per_token.append(
            {
                "token": tok,
                "sigma": top.value,
                "stable_rank": lcache.stable_rank(input_pos=i),
                "U": top.output.tokens,
                "V": top.input.tokens,
            }
        )
    layers = []
    if args.layers:
        hooks = [f"blocks.{l}.hook_resid_post" for l in range(model.cfg.n_layers)]
        lcache.jacobians(hooks)
        for layer, hook in enumerate(hooks):
            top = lcache.decode(hook, n_triplets=1, n_tokens=3)[0]
            layers.append(
                {
                    "layer": layer,
                    "sigma": top.value,
                    "stable_rank": lcache.stable_rank(hook),
                    "U": top.output.tokens,
                    "V": top.input.tokens,
                    "V_input_pos": top.input_pos,
                }
            )
    if args.report:
        from lens_linear.render import report

        report(lcache, args.report, layers=args.layers)
    t3 = time.perf_counter()
    return {
        "model": model.cfg.model_name,
        "backend": type(model).__name__,
        "dtype": str(dtype).removeprefix("torch."),
        "tokens": lcache.str_tokens,
        "pos": lcache.pos,
        "top": [{"token": p.token, "prob": p.prob} for p in lcache.top_predictions(5)],
        "reconstruction_error": {
            "detached": lcache.reconstruction_error(),
            "ordinary": lcache.reconstruction_error(detached=False),
        },
        "bias_term_norm": float(lcache.bias_term().norm()),
        "contribution_norms": [float(c) for c in contrib],
        "per_token": per_token,
        "layers": layers,
        "report": args.report,
        "seconds": {
            "load": round(t1 - t0, 2),
            "linearize": round(t2 - t1, 2),
            "analyses": round(t3 - t2, 2),
        },
    }


def _print_text(r: dict) -> None:
    print(f"model     {r['model']} ({r['backend']}, {r['dtype']})")
    print(f"tokens    {' | '.join(repr(t) for t in r['tokens'])}")
    print(f"output    final-normed residual at position {r['pos']} ({r['tokens'][r['pos']]!r})")
    print("\nnext token            prob")
    for p in r["top"]:
        print(f"  {p['token']!r:<18} {p['prob']:.4f}")
    e = r["reconstruction_error"]
    print("\nreconstruction error  std(Σ J_i x_i + bias − y) / std(y)")
    print(f"  detached Jacobian   {e['detached']:.2e}")
    print(f"  ordinary Jacobian   {e['ordinary']:.2e}")
    print(f"  bias term norm      {r['bias_term_norm']:.3g}")
    print("\ncontribution ‖J_i x_i‖ per input token")
    top = max(r["contribution_norms"]) or 1.0
    for tok, c in zip(r["tokens"], r["contribution_norms"]):
        print(f"  {tok!r:<18} {c:9.3f}  {'█' * round(30 * c / top)}")
    print(
        "\nper input token: leading singular triplet of J_i (U read as output tokens, V as input tokens)"
    )
    print(f"  {'token':<14} {'σ1':>7} {'s.rank':>6}  {'U (output)':<36} V (input)")
    for t in r["per_token"]:
        print(
            f"  {t['token']!r:<14} {t['sigma']:7.3g} {t['stable_rank']:6.2f}  {_toks(t['U']):<36} {_toks(t['V'])}"
        )
    if r["layers"]:
        print(
            "\nper layer: leading singular triplet of the residual stream's Jacobian (all positions),"
        )
        print("U read through the frozen final norm and the unembedding")
        print(f"  {'layer':>5} {'σ1':>7} {'s.rank':>6}  {'U (output)':<36} V (input, at token)")
        for l in r["layers"]:
            where = r["tokens"][l["V_input_pos"]]
            print(
                f"  {l['layer']:>5} {l['sigma']:7.3g} {l['stable_rank']:6.2f}  {_toks(l['U']):<36} "
                f"{_toks(l['V'])}  @{where!r}"
            )
    if r["report"]:
        print(f"\nreport    {r['report']}")
    s = r["seconds"]
    print(f"\n(load {s['load']} s, linearize {s['linearize']} s, analyses {s['analyses']} s)")


def _toks(tokens: list[str]) -> str:
    return " ".join(repr(t) for t in tokens)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        result = analyze(args)
    except (
        LinearizationError,
        ModelUnavailableError,
        ValueError,
        TypeError,
        IndexError,
        KeyError,
    ) as exc:
        print(f"lens-linear: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_text(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
