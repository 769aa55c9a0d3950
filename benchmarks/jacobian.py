"""The user path on SmolLM2 (record + verify + full detached Jacobian of the last position)
against the autograd baselines, and verification's cost against the full Jacobian's.

Baselines (the same frozen function, so all three compute the same matrix):
* ``torch.autograd.functional.jacobian(vectorize=True)`` — the seed paper code's method;
* ``torch.autograd.functional.jacobian(vectorize=False)`` — one backward per output row.
lens_linear: ``run_with_linear_cache`` (recording and the default verification: ignored
sites and a projected reconstruction check), then ``lcache.jacobian()``: one replay
forward, then batched backward passes (``is_grads_batched``) in chunks sized to a memory
bound. Verification alone (``lcache.check()``) is also timed against ``lcache.jacobian()``.

Times are medians of ``--repeats`` runs (default 5) up to 32 tokens, single runs beyond (and
for the unvectorized baseline), in this one process after a warm-up; the methods take turns,
run by run. Memory is measured apart from them: peak MB (process high-water mark, model
included) is that of one fresh process per method and length (:mod:`fresh`), which loads
the model, prepares that method's inputs and runs it once, with no warm-up.

Usage: python benchmarks/jacobian.py [--lengths 8 16 32 128] [--skip-unvectorized-above 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import time

import torch
from fresh import peak_of

import lens_linear as ll
from lens_linear.hooks import detached_function

TEXT = (
    "The bridge out of Marin is the most photographed bridge in the world, and on foggy "
    "mornings its towers rise above the clouds while ferries cross the bay below. "
) * 20


def measure(fn, prepare=None):
    """``(seconds, result)`` of ``fn()``; with ``prepare``, ``(seconds, result, stage seconds)``
    of ``fn(prepare())``, the stage being ``fn`` alone (after a step both methods share, such
    as recording). Times only: memory is measured in fresh processes (:mod:`fresh`)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # every run starts from the same allocator state
    t0 = t1 = time.perf_counter()
    if prepare is None:
        result = fn()
    else:
        prepared = prepare()
        t1 = time.perf_counter()
        result = fn(prepared)
    end = time.perf_counter()
    return (end - t0, result) if prepare is None else (end - t0, result, end - t1)


def interleaved(methods: dict, repeats: dict) -> dict:
    """``{name: (median seconds, last result)}`` of ``repeats[name]`` runs of
    each method, taken in turn (ours, theirs, ours, ...): single runs of a few seconds vary by
    ±10% on a loaded 2-core machine, and drift would favour whichever ran in the quieter spell."""
    runs: dict = {name: [] for name in methods}
    for round_ in range(max(repeats.values())):
        for name, fn in methods.items():
            if round_ < repeats[name]:
                runs[name].append(measure(fn))
                if round_ < repeats[name] - 1:
                    runs[name][-1] = (runs[name][-1][0], None)  # keep only the last result alive
    return {name: (sorted(t for t, _ in r)[len(r) // 2], r[-1][1]) for name, r in runs.items()}


def fresh_run(name: str, n: int) -> None:
    """What a fresh process runs for ``name``'s peak at ``n`` tokens: the model loaded, the
    method's inputs prepared (the baselines' detached function and input), the method run."""
    model = ll.load_model()
    tokens = model.to_tokens(TEXT)[:, :n]
    if name == "lens_linear":
        ll.run_with_linear_cache(model, tokens, progress=False).jacobian()
        return
    frozen = detached_function(model, tokens)
    x = ll.run_with_linear_cache(model, tokens, check=False, progress=False).x
    torch.autograd.functional.jacobian(frozen, x, vectorize=name == "autograd vectorize=True")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", type=int, nargs="+", default=[8, 16, 32, 128])
    parser.add_argument("--skip-unvectorized-above", type=int, default=1 << 30)
    parser.add_argument(
        "--repeats", type=int, default=5, help="runs per method up to 32 tokens (median)"
    )
    args = parser.parse_args()
    model = ll.load_model()
    all_tokens = model.to_tokens(TEXT)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {model.cfg.model_name}"
    )
    print(
        "seconds: medians in this process; peak MB (process high-water mark, model included): "
        "one fresh process per method"
    )
    print(
        f"{'tokens':>6} {'method':<24} {'seconds':>8} {'peak MB':>8} {'t / ours':>8} {'mem / ours':>10} {'max |ΔJ|':>9}"
    )
    verification = []
    warm = all_tokens[
        :, :4
    ]  # first calls pay one-time setup (forward-mode and vmap dispatch): not timed
    ll.run_with_linear_cache(model, warm, progress=False).jacobian()
    torch.autograd.functional.jacobian(
        detached_function(model, warm),
        ll.run_with_linear_cache(model, warm, check=False, progress=False).x,
        vectorize=True,
    )
    for n in args.lengths:
        tokens = all_tokens[:, :n]

        def ours():
            return ll.run_with_linear_cache(model, tokens, progress=False).jacobian()

        frozen = detached_function(model, tokens)

        x = ll.run_with_linear_cache(model, tokens, check=False, progress=False).x
        repeats = args.repeats if n <= 32 else 1
        methods = {
            "lens_linear": ours,
            "autograd vectorize=True": lambda: torch.autograd.functional.jacobian(
                frozen, x, vectorize=True
            ),
        }
        if n <= args.skip_unvectorized_above:
            methods["autograd vectorize=False"] = lambda: torch.autograd.functional.jacobian(
                frozen, x
            )
        results = interleaved(
            methods, {name: 1 if "False" in name else repeats for name in methods}
        )
        t_ours, j_ours = results.pop("lens_linear")
        peaks = {name: peak_of(fresh_run, name, n) for name in methods}
        m_ours = peaks["lens_linear"]
        rows = [("lens_linear", t_ours, m_ours, 0.0)]
        for name, (t, j) in results.items():
            rows.append((name, t, peaks[name], float((j.transpose(0, 1) - j_ours).abs().max())))
        del results
        for name, t, m, diff in rows:
            print(
                f"{n:>6} {name:<24} {t:8.2f} {m / 2**20:8.0f} {t / t_ours:8.2f} {m / m_ours:10.2f} {diff:9.1e}"
            )
        del j_ours
        record = lambda: ll.run_with_linear_cache(model, tokens, check=False, progress=False)  # noqa: E731
        _, _, t_check_only = measure(lambda lc: lc.check(), record)
        _, _, t_jac_only = measure(lambda lc: lc.jacobian(), record)
        verification.append((n, t_check_only, t_jac_only))
    print(f"\n{'tokens':>6} {'verify s':>9} {'Jacobian s':>10} {'verify / Jacobian':>17}")
    for n, t_check, t_jac in verification:
        print(f"{n:>6} {t_check:9.2f} {t_jac:10.2f} {t_check / t_jac:17.1%}")


if __name__ == "__main__":
    main()
