"""GPU check: the benchmarks' ratios measured on CUDA, and half precision's numbers.

The default model's weights cannot reach an offline GPU machine, so a random model of
SmolLM2-135M's shape stands in (Llama, 30 layers, d_model 576, 9 heads / 3 KV heads, d_mlp
1536; a 128-token character vocabulary): timings depend on the shape, not the weights.
Each line prints ours vs an anchor measured in the same process.

Usage: python benchmarks/gpu_check.py [--quick]   (make gpu-check runs it after the device tests)
"""

from __future__ import annotations

import os
import sys
import time

import torch
import transformers as tf

import lens_linear as ll
from lens_linear import _compat
from lens_linear.hooks import detached_function
from lens_linear.hooks.contexts import computing_in
from lens_linear.models import wrap_bridge
from lens_linear.patching import activation_patching, predicted_patching, prompt_pairs
from lens_linear.stats import dataset_sensitivity, sensitivity
from lens_linear.tiny import char_tokenizer, perturb_

DEVICE = os.environ.get("LENS_LINEAR_TEST_DEVICE", "cuda")  # "cpu": a smoke test of this script
QUICK = "--quick" in sys.argv


def smollm2_shaped(dtype: torch.dtype) -> torch.nn.Module:
    cfg = tf.LlamaConfig(
        vocab_size=128,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf = tf.AutoModelForCausalLM.from_config(cfg)
    cfg.architectures = [type(hf).__name__]
    return wrap_bridge(
        perturb_(hf).to(dtype).eval(), char_tokenizer(), "smollm2-shaped", dtype, DEVICE
    ).eval()


def timed(fn):
    cuda = DEVICE.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = fn()
    if cuda:
        torch.cuda.synchronize()
    return (
        time.perf_counter() - start,
        torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0,
        out,
    )


def row(name, ours, anchor, anchor_name):
    (t_o, m_o, _), (t_a, m_a, _) = ours, anchor
    print(
        f"{name:<34} ours {t_o:7.2f} s {m_o:8.0f} MB | {anchor_name:<34} {t_a:7.2f} s {m_a:8.0f} MB | "
        f"speed-up {t_a / t_o:6.2f}  memory ratio {m_a / max(m_o, 1):5.2f}",
        flush=True,
    )


def tokens(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(4, 100, (1, n), generator=gen, device="cpu").to(DEVICE)


def main() -> None:
    print(
        torch.cuda.get_device_name() if DEVICE.startswith("cuda") else DEVICE,
        "torch",
        torch.__version__,
        flush=True,
    )
    model = smollm2_shaped(torch.float32)
    n = 16 if QUICK else 32
    t = tokens(n)
    ll.run_with_linear_cache(
        model, t[:, :4], progress=False
    ).jacobian()  # warm-up (kernels, allocator)

    ours = timed(lambda: ll.run_with_linear_cache(model, t, check=False, progress=False).jacobian())
    x = ll.run_with_linear_cache(model, t, check=False, progress=False).x
    base = timed(
        lambda: torch.autograd.functional.jacobian(detached_function(model, t), x, vectorize=True)
    )
    err = float((base[2].transpose(0, 1).reshape(ours[2].shape) - ours[2]).norm() / ours[2].norm())
    row(f"full Jacobian, {n} tokens", ours, base, "autograd.functional (vectorize)")
    print(f"    max rel difference {err:.1e}")

    lc = ll.run_with_linear_cache(model, t, progress=False)
    print(f"    reconstruction error {lc.reconstruction_error():.1e} (float32, CUDA)")
    hooks = [f"blocks.{l}.hook_resid_post" for l in range(model.cfg.n_layers)]
    ours = timed(
        lambda: ll.run_with_linear_cache(model, t, check=False, progress=False).jacobians(hooks)
    )
    loop = timed(
        lambda: {
            h: torch.autograd.functional.jacobian(detached_function(model, t, h), x, vectorize=True)
            for h in hooks[:: (6 if QUICK else 1)]
        }
    )
    row(
        f"all {len(hooks)} layers, {n} tokens ({lc.engine(hooks)})",
        ours,
        loop,
        "per-layer vectorize loop" + (" (1/6 of it)" if QUICK else ""),
    )

    pairs = prompt_pairs(
        model,
        ["abcdefghijklmnopqrstuvwx", "The quick brown fox jumps"],
        ["abcdefghijkXmnopqrstuvwx", "The quick brown cat jumps"],
        ["y", " "],
        ["z", "o"],
    )
    ours = timed(lambda: activation_patching(model, pairs, "resid_pre", progress=False))

    def naive():
        _, clean = model.run_with_cache(pairs.clean)
        out = []
        for layer in range(0, model.cfg.n_layers, 3 if QUICK else 1):
            name = f"blocks.{layer}.hook_resid_pre"
            for p in range(pairs.clean.shape[1]):

                def hook(v, hook, p=p, name=name):
                    v = v.clone()
                    v[:, p] = torch.where(pairs.mask[:, p, None], clean[name][:, p], v[:, p])
                    return v

                with torch.no_grad():
                    out.append(model.run_with_hooks(pairs.corrupted, fwd_hooks=[(name, hook)]))
        return out

    row(
        "patching sweep resid_pre",
        ours,
        timed(naive),
        "one forward per patch" + (" (1/3)" if QUICK else ""),
    )
    frozen = activation_patching(model, pairs, "resid_pre", detached=True, progress=False)
    pred = predicted_patching(model, pairs, "resid_pre", detached=True)
    print(
        f"    predicted vs frozen patching: max |Δ| {float((pred.raw - frozen.raw).abs().max()):.1e}"
    )

    for length in [128] if QUICK else [128, 512]:
        tl = tokens(length, 1)
        rec = lambda: ll.run_with_linear_cache(model, tl, check=False, progress=False)  # noqa: E731
        ours = timed(lambda: rec().svd_matrix_free(n_triplets=3))

        def full():
            jac = rec().jacobian()
            return torch.linalg.svd(
                jac.permute(1, 0, 2).reshape(jac.shape[1], -1), full_matrices=False
            )

        anchor = timed(full)
        row(f"top-3 SVD, {length} tokens", ours, anchor, "full Jacobian + linalg.svd")
        mf, dense = ours[2], anchor[2]
        print(
            f"    S {mf.S.tolist()} vs {dense.S[:3].tolist()}; residuals {mf.residuals.max():.1e}, "
            f"{mf.products} products, converged {mf.converged}"
        )

    prompts = [f"prompt number {i} about things" for i in range(16 if QUICK else 64)]
    ours = timed(
        lambda: dataset_sensitivity(model, prompts, max_len=16, batch_size=16, progress=False)
    )
    anchor = timed(lambda: [sensitivity(model, p, max_len=16) for p in prompts])
    row(f"sensitivity stats, {len(prompts)}x16", ours, anchor, "one prompt at a time")

    jacobian_lens_rows(model)
    long_prompt_rows(model)
    overhead_rows()

    print("\nhalf precision (the same model in bfloat16 and float16)")
    for dtype in (torch.bfloat16, torch.float16):
        half = smollm2_shaped(dtype)
        lc = ll.run_with_linear_cache(half, t, progress=False)
        wide = lc.point.in_dtype(torch.float32)
        with computing_in(half, torch.float32), torch.no_grad():
            y32 = wide.replay(wide.x_star, [lc.output], pos=lc.pos)[lc.output][0].reshape(-1)
        y = lc.activation().float()
        gap = float((y - y32).std() / y32.std())
        squash = ("blocks.3.hook_mlp_out", lambda v, hook: torch.tanh(100 * v) / 100)
        try:
            ll.run_with_linear_cache(half, t, fwd_hooks=[squash], progress=False)
            refused = "ACCEPTED (wrong)"
        except ll.LinearizationError:
            refused = "refused"
        mf = lc.svd_matrix_free(n_triplets=3)
        jac = ll.run_with_linear_cache(model, t, progress=False).jacobian()
        s32 = torch.linalg.svdvals(jac.permute(1, 0, 2).reshape(jac.shape[1], -1).double())[:3]
        print(
            f"{str(dtype):<15} reconstruction {lc.reconstruction_error():.1e} in {dtype}; model rounding "
            f"(its output vs the frozen map in float32) {gap:.1e}; tanh hook {refused}; matrix-free S "
            f"{[round(v, 3) for v in mf.S.tolist()]} (float32 model {[round(v, 3) for v in s32.tolist()]}), "
            f"residual {mf.residuals.max():.1e}, converged {mf.converged}",
            flush=True,
        )


def long_prompt_rows(model: torch.nn.Module) -> None:
    """Patterns kept as queries and keys: which kernel computes ``P v`` and ``Pᵀ g`` here (the
    fused one is used only where its self-check against the explicit softmax passed), their
    time against blocks of rows on a 2,048-token layer with their difference, then a verified
    recording and a top-3 matrix-free SVD at 2,048 and 8,192 tokens."""
    from lens_linear.hooks import patterns

    kernel = _compat.fused_attention(torch.device(DEVICE).type, torch.float32)
    print(
        f"\nlong prompts: fused attention kernel {'in use' if kernel else 'NOT in use (blocks of rows)'}"
    )
    gen = torch.Generator(device="cpu").manual_seed(0)
    n = 2048
    attention = patterns.FrozenAttention(
        torch.randn(n, 9, 64, generator=gen).to(DEVICE),
        torch.randn(n, 3, 64, generator=gen).to(DEVICE),
        0.125,
    )
    v = torch.randn(4, n, 3, 64, generator=gen).to(DEVICE)
    g = torch.randn(4, n, 9, 64, generator=gen).to(DEVICE)
    both = lambda: (attention.apply(v), attention.apply_t(g))  # noqa: E731
    both()
    fused = timed(both)
    patterns.FUSED = False
    try:
        blocks = timed(both)
    finally:
        patterns.FUSED = True
    row(f"P v and Pᵀ g, {n} tokens, batch 4", fused, blocks, "blocks of rows")
    diff = max(float((a - b).norm() / b.norm()) for a, b in zip(fused[2], blocks[2]))
    print(f"    max rel difference {diff:.1e}")
    for length in [2048] if QUICK else [2048, 8192]:
        t = tokens(length, 2)
        rec = timed(
            lambda: ll.run_with_linear_cache(model, t, store_patterns=False, progress=False)
        )
        svd = timed(lambda: rec[2].svd_matrix_free(n_triplets=3))
        mf = svd[2]
        print(
            f"{length} tokens: verified recording {rec[0]:.1f} s {rec[1]:.0f} MB; top-3 matrix-free "
            f"SVD {svd[0]:.1f} s {svd[1]:.0f} MB ({mf.products} products, converged {mf.converged}, "
            f"residual {float(mf.residuals.max()):.1e})",
            flush=True,
        )


def overhead_rows() -> None:
    """The tiny models' per-call overhead (``benchmarks/overhead.py``) on this device."""
    import overhead

    print()
    overhead.table(["llama", "gpt2"], repeats=7, device=DEVICE)


def jacobian_lens_rows(model: torch.nn.Module) -> None:
    """Jacobian lens: ours (every backward row batched up to GPU_MAX_ROWS) vs TransformerLens'
    ``JacobianLens.fit`` (``dim_batch=8``: ``d_model / 8`` backward passes per prompt)."""
    try:
        from transformer_lens.tools.analysis import JacobianLens
    except ImportError:
        print("Jacobian lens: this TransformerLens has no JacobianLens")
        return
    from lens_linear.jacobian_lens import fit_jacobian_lens

    for n_prompts, length in [(2, 64)] if QUICK else [(2, 64), (2, 128), (1, 512)]:
        prompts = [
            "".join(chr(97 + (7 * i + 3 * k) % 26) for k in range(length)) for i in range(n_prompts)
        ]
        ours = timed(lambda: fit_jacobian_lens(model, prompts, max_seq_len=length, progress=False))
        theirs = timed(
            lambda: JacobianLens.fit(
                model, prompts, corpus="gpu-check", max_seq_len=length, show_progress=False
            )
        )
        err = max(
            float(
                (ours[2].jacobians[k] - theirs[2].jacobians[k]).norm()
                / theirs[2].jacobians[k].norm()
            )
            for k in theirs[2].source_layers
        )
        row(f"Jacobian lens, {n_prompts}x{length}", ours, theirs, "JacobianLens.fit (dim_batch 8)")
        detached = timed(
            lambda: fit_jacobian_lens(
                model, prompts, detached=True, max_seq_len=length, progress=False
            )
        )
        row(f"detached Jacobian lens, {n_prompts}x{length}", detached, theirs, "JacobianLens.fit")
        print(f"    ordinary lens vs TransformerLens' max rel difference per layer {err:.1e}")


if __name__ == "__main__":
    main()
