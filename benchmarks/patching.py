"""Residual-stream patching sweep of the IOI pair on SmolLM2: ours vs TransformerLens vs a loop.

All three compute the same table (``resid_pre``, every layer × position, logit difference):
* ``transformer_lens.patching.get_act_patch_resid_pre``: one forward per patch;
* a naive loop: one ``run_with_hooks`` per patch;
* ``lens_linear.patching.activation_patching``: patched runs batched (up to 64 per forward),
  the layers before a batch's first patch run once before the batch is expanded, and only
  the answer position is unembedded.
Also timed: ``predicted_patching`` (one forward + one backward, exact for the frozen map).

Usage: python benchmarks/patching.py
"""

from __future__ import annotations

import time

import torch

import lens_linear as ll
from lens_linear.patching import activation_patching, predicted_patching, prompt_pairs

CLEAN = "After John and Mary went to the store, Mary gave a bottle of milk to"
CORRUPT = "After John and Mary went to the store, John gave a bottle of milk to"


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    import transformer_lens.patching as tlp

    model = ll.load_model()
    pairs = prompt_pairs(model, CLEAN, CORRUPT, " John", " Mary")
    with torch.no_grad():
        model(pairs.corrupted)  # warm up
        _, clean = model.run_with_cache(pairs.clean)
        _, corrupt = model.run_with_cache(pairs.corrupted)
    metric = lambda logits: pairs.logit_diff(logits[:, -1]).mean()  # noqa: E731

    def loop():
        out = torch.zeros(model.cfg.n_layers, pairs.clean.shape[1])
        for layer in range(model.cfg.n_layers):
            name = f"blocks.{layer}.hook_resid_pre"
            for pos in range(pairs.clean.shape[1]):

                def hook(value, hook, pos=pos, name=name):
                    value = value.clone()
                    value[:, pos] = clean[name][:, pos]
                    return value

                with torch.no_grad():
                    out[layer, pos] = metric(
                        model.run_with_hooks(pairs.corrupted, fwd_hooks=[(name, hook)])
                    )
        return out

    t_ours, ours = timed(lambda: activation_patching(model, pairs, "resid_pre", progress=False))
    t_pred, _ = timed(lambda: predicted_patching(model, pairs, "resid_pre"))
    t_tl, tl = timed(lambda: tlp.get_act_patch_resid_pre(model, pairs.corrupted, clean, metric))
    t_loop, naive = timed(loop)
    n = ours.raw.numel()
    print(
        f"IOI resid_pre sweep on SmolLM2: {n} patches ({model.cfg.n_layers} layers × {pairs.clean.shape[1]} positions)"
    )
    print(f"{'method':<36} {'seconds':>8} {'× ours':>8} {'max |Δ| vs ours':>16}")
    print(f"{'lens_linear activation_patching':<36} {t_ours:8.1f} {1:8.2f} {0:16.1e}")
    print(
        f"{'transformer_lens.patching':<36} {t_tl:8.1f} {t_tl / t_ours:8.2f} {float((tl - ours.raw).abs().max()):16.1e}"
    )
    print(
        f"{'one run_with_hooks per patch':<36} {t_loop:8.1f} {t_loop / t_ours:8.2f} {float((naive - ours.raw).abs().max()):16.1e}"
    )
    print(
        f"{'lens_linear predicted_patching':<36} {t_pred:8.1f} {t_pred / t_ours:8.2f} {'(prediction)':>16}"
    )


if __name__ == "__main__":
    main()
