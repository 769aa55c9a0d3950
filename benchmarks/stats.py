"""Dataset sensitivity statistics on SmolLM2: batched prompts vs a per-sample loop of single VJPs.

Both compute Welford statistics of ``‖∂y_i/∂x_j‖²_F`` (``y`` the output embedding) over the
same prompts, through the same frozen maps (``stats.frozen_batch_map``):

* ours: ``dataset_sensitivity`` — a right-padded batch of prompts per graph, and every
  cotangent of an output position (Hutchinson probes, or one-hot rows for the exact norm)
  in one batched backward (``is_grads_batched``) for every prompt at once;
* anchor: for each prompt its own graph, then one ``torch.autograd.grad`` per cotangent.

Hutchinson (``--probes`` per output position) runs on the whole data set for both. The exact
estimator needs ``d_model`` VJPs per output position (9216 per 16-token prompt): ours runs
on ``--exact-prompts`` prompts, and the anchor's time for them is extrapolated from
``--anchor-vjps`` timed single VJPs (labelled as such; the exact values are checked against
brute force in the tests). Agreement of the two Hutchinson runs (independent probes): the
mean |z| of their difference over entries.

Times: one run per method in this process, after a warm-up. Memory is measured apart from
them: peak MB (process high-water mark, model included) is that of one fresh process per
measured method (:mod:`fresh`), which loads the model and runs the method once on the same
prompts, with no warm-up; the extrapolated anchor has none (0).

Usage: python benchmarks/stats.py [--prompts 64] [--tokens 16] [--probes 8] [--batch 16]
"""

from __future__ import annotations

import argparse
import time

import torch
from fresh import peak_of
from jacobian import TEXT, measure

import lens_linear as ll
from lens_linear.hooks.contexts import analysis_mode
from lens_linear.hooks.sites import output_hook
from lens_linear.stats import Welford, dataset_sensitivity, frozen_batch_map, right_padded


def per_sample_loop(model, prompts, tokens_per_prompt, method, probes, max_vjps=None):
    """The anchor: one graph per prompt, one VJP per cotangent. Returns (Welford, VJPs done)."""
    acc, gen, done = (
        Welford((tokens_per_prompt, tokens_per_prompt)),
        torch.Generator().manual_seed(1),
        0,
    )
    hook = output_hook(model)
    for prompt in prompts:
        tokens, _ = right_padded(model, [prompt], tokens_per_prompt)
        with analysis_mode(model):
            apply, x_star = frozen_batch_map(model, tokens, hook)
            x = x_star.clone().requires_grad_(True)
            with torch.enable_grad():
                y = apply(x)[0]
                n, d = y.shape
                values = torch.zeros(n, n, dtype=torch.float64)
                for i in range(n):
                    for r in range(d if method == "exact" else probes):
                        cot = torch.zeros_like(y)
                        if method == "exact":
                            cot[i, r] = 1
                        else:
                            cot[i] = (torch.randint(0, 2, (d,), generator=gen) * 2 - 1).to(y.dtype)
                        (grad,) = torch.autograd.grad(y, x, cot, retain_graph=True)
                        values[i] += grad[0].double().pow(2).sum(-1) / (
                            1 if method == "exact" else probes
                        )
                        done += 1
                        if max_vjps and done >= max_vjps:
                            return acc, done
        acc.update(values)
    return acc, done


def make_prompts(n_prompts: int, tokens: int) -> list[str]:
    words = TEXT.split()
    return [" ".join(words[3 * k : 3 * k + 2 * tokens]) for k in range(n_prompts)]


def fresh_run(method: str, n_prompts: int, tokens: int, probes: int, batch: int) -> None:
    """What a fresh process runs for ``method``'s peak: the model loaded, then ``ours`` or
    ``anchor`` (the per-sample loop) with the Hutchinson estimator on ``n_prompts`` prompts, or
    ``ours exact`` on them (as ``main`` runs each)."""
    model = ll.load_model()
    prompts = make_prompts(n_prompts, tokens)
    kw = dict(max_len=tokens, progress=False)
    if method == "ours":
        dataset_sensitivity(
            model, prompts, batch_size=batch, method="hutchinson", probes=probes, **kw
        )
    elif method == "anchor":
        per_sample_loop(model, prompts, tokens, "hutchinson", probes)
    else:
        dataset_sensitivity(model, prompts, batch_size=batch, **kw)


def main() -> list[dict]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--probes", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--exact-prompts", type=int, default=2)
    parser.add_argument("--anchor-vjps", type=int, default=200)
    args = parser.parse_args()
    model = ll.load_model()
    prompts = make_prompts(args.prompts, args.tokens)
    L = args.tokens
    dataset_sensitivity(
        model, prompts[:2], max_len=4, method="hutchinson", probes=2, progress=False
    )  # warm-up
    rows = []
    print(
        "seconds: one run in this process; peak MB (process high-water mark, model included): "
        "one fresh process per method"
    )
    print(
        f"{'estimator':<11} {'prompts':>7} {'method':<34} {'seconds':>8} {'peak MB':>8} {'t / ours':>8} "
        f"{'mem / ours':>10} {'agreement':>22}"
    )

    def row(estimator, n, method, t, m, t0, m0, agree=""):
        print(
            f"{estimator:<11} {n:>7} {method:<34} {t:8.1f} {m / 2**20:8.0f} {t / t0:8.2f} {m / max(m0, 1):10.2f} "
            f"{agree:>22}",
            flush=True,
        )

    # Hutchinson on the whole data set, both measured
    kw = dict(max_len=L, method="hutchinson", probes=args.probes, progress=False)
    t_h, ours_h = measure(lambda: dataset_sensitivity(model, prompts, batch_size=args.batch, **kw))
    t_a, (anchor_h, _) = measure(
        lambda: per_sample_loop(model, prompts, L, "hutchinson", args.probes)
    )
    m_h = peak_of(fresh_run, "ours", args.prompts, L, args.probes, args.batch)
    m_a = peak_of(fresh_run, "anchor", args.prompts, L, args.probes, args.batch)
    se = (
        (ours_h.var + anchor_h.var) / args.prompts
    ).sqrt()  # std. error of the difference of two means
    z = float(((ours_h.mean - anchor_h.mean).abs() / se)[se > 0].mean())
    row("hutchinson", args.prompts, f"ours (batches of {args.batch})", t_h, m_h, t_h, m_h)
    row(
        "hutchinson",
        args.prompts,
        "per-sample loop of single VJPs",
        t_a,
        m_a,
        t_h,
        m_h,
        f"mean |z| {z:.2f}",
    )
    rows.append(
        dict(
            benchmark="stats (hutchinson)",
            size=f"{args.prompts}x{L}",
            ours_s=t_h,
            anchor_s=t_a,
            ours_mb=m_h / 2**20,
            anchor_mb=m_a / 2**20,
            anchor="per-sample single VJPs",
        )
    )

    # exact: ours measured, the anchor extrapolated from timed single VJPs
    few = prompts[: args.exact_prompts]
    t_e, ours_e = measure(
        lambda: dataset_sensitivity(model, few, max_len=L, batch_size=args.batch, progress=False)
    )
    m_e = peak_of(fresh_run, "ours exact", len(few), L, args.probes, args.batch)
    start = time.perf_counter()
    _, done = per_sample_loop(model, few[:1], L, "exact", 0, max_vjps=args.anchor_vjps)
    per_vjp = (time.perf_counter() - start) / done
    d = model.cfg.d_model
    t_ae = per_vjp * len(few) * L * d
    row("exact", len(few), f"ours (batches of {args.batch})", t_e, m_e, t_e, m_e)
    row("exact", len(few), f"single VJPs ({done} timed, extrapolated)", t_ae, 0, t_e, m_e)
    rows.append(
        dict(
            benchmark="stats (exact)",
            size=f"{len(few)}x{L}",
            ours_s=t_e,
            anchor_s=t_ae,
            ours_mb=m_e / 2**20,
            anchor_mb=float("nan"),
            anchor="single VJPs, extrapolated",
        )
    )
    return rows


if __name__ == "__main__":
    main()
