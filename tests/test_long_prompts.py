"""Long-prompt machinery on tiny models: patterns kept as queries and keys, and verification
in forward mode, against the independent reference and the stored-pattern map."""

import pytest
import torch
from conftest import PROMPT, hooks_left, rel

import lens_linear as ll
from lens_linear.hooks import patterns
from lens_linear.hooks.patterns import FrozenAttention, attend
from lens_linear.reference import FORWARDS
from lens_linear.tiny import tiny_hf_model

LONG = "The bridge out of Marin is the most photographed bridge"


@pytest.mark.parametrize("arch", sorted(FORWARDS))
def test_patterns_as_queries_and_keys_match_the_reference(arch):
    """No pattern stored, the Jacobian still equals a hand-written forward's with explicit detaches."""
    hf = tiny_hf_model(arch)
    model = ll.models.wrap_bridge(hf, ll.tiny.char_tokenizer(), f"tiny-{arch}", torch.float32)
    lc = ll.run_with_linear_cache(model, PROMPT, store_patterns=False)
    kept = lc.point.frozen_attention
    if arch == "gpt_neox":  # its joint-QKV bridge never fires hook_rot_q/k: every pattern is stored
        assert (
            not kept
            and sum(name.endswith("hook_pattern") for name in lc.point.values) == model.cfg.n_layers
        )
    else:
        assert kept and not any(name.endswith("hook_pattern") for name in lc.point.values)
        assert all(a.q.shape[0] == lc.n_pos for a in kept.values())  # O(n·d) per layer, not O(n²)
    jac = torch.autograd.functional.jacobian(lambda x: FORWARDS[arch](hf, x)[-1], lc.x)
    assert rel(jac.transpose(0, 1), lc.jacobian()) <= 1e-5
    assert not hooks_left(model)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3"])
def test_queries_and_keys_give_the_stored_map(arch):
    """Full and suffix replays (the forward engine runs one per input position), patterns read
    by the attention analyses, and products agree with the stored-pattern map."""
    model = ll.tiny_model(arch)
    stored = ll.run_with_linear_cache(model, LONG, store_patterns=True, progress=False)
    kept = ll.run_with_linear_cache(model, LONG, store_patterns=False, progress=False)
    assert kept.point.frozen_attention and not stored.point.frozen_attention
    assert rel(kept.jacobian(), stored.jacobian()) <= 1e-6
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    forward_kept, forward_stored = (
        kept.jacobians(hooks, method="forward"),
        stored.jacobians(hooks, method="forward"),
    )
    assert all(rel(forward_kept[h], forward_stored[h]) <= 1e-6 for h in hooks)
    for layer in range(model.cfg.n_layers):
        assert rel(kept.attention.pattern(layer), stored.attention.pattern(layer)) <= 1e-6
    s_kept, s_stored = kept.svd_matrix_free(n_triplets=2).S, stored.svd_matrix_free(n_triplets=2).S
    assert rel(s_kept, s_stored) <= 1e-5
    assert kept.point.ignored_sites() == []


@pytest.mark.parametrize("window", [None, 4], ids=["", "window"])
@pytest.mark.parametrize("sink", [False, True], ids=["", "sink"])
@pytest.mark.parametrize("fused", [True, False])
def test_attend_against_a_dense_pattern(fused, sink, window, monkeypatch):
    """``P v``, its backward (also batched, as the Jacobian engine runs it), its forward-mode
    derivative and a suffix with its backward, against the dense pattern with grouped
    key/value heads: fused (torch's CPU attention kernel) and by blocks of rows; with an
    attention sink per head (gpt-oss: one more logit in each row's softmax, then dropped);
    with a sliding window (query i sees keys i - 4 < j <= i; by blocks of rows, small ones)."""
    monkeypatch.setattr(patterns, "FUSED", fused)
    gen = torch.Generator().manual_seed(0)
    n, heads, kv, d = 11, 4, 2, 3
    sinks = torch.randn(heads, generator=gen) if sink else None
    attention = FrozenAttention(
        torch.randn(n, heads, d, generator=gen),
        torch.randn(n, kv, d, generator=gen),
        0.7,
        max_memory=4 * heads * n * 4 * 3 if window else None,  # blocks of 3 rows
        sink=sinks,
        window=window,
    )
    i, j = torch.arange(n)[:, None], torch.arange(n)[None]
    masked = (j > i) | ((j <= i - window) if window else torch.zeros(n, n, dtype=torch.bool))
    scores = (
        torch.einsum("qhd,khd->hqk", attention.q, attention.k.repeat_interleave(2, dim=1)) * 0.7
    ).masked_fill(masked, float("-inf"))
    if sink:  # written out: the sink's column in the softmax, then dropped
        column = sinks[:, None, None].expand(heads, n, 1)
        dense = torch.cat([scores, column], -1).softmax(-1)[..., :n]
        assert float(dense.sum(-1).max()) < 1
    else:
        dense = scores.softmax(-1)
    assert rel(attention.pattern(), dense) <= 1e-6
    v = torch.randn(1, n, kv, d, generator=gen, requires_grad=True)
    reference = lambda v: torch.einsum("hqk,bkhd->bqhd", dense, v.repeat_interleave(2, dim=2))  # noqa: E731
    assert rel(attend(v, attention).detach(), reference(v).detach()) <= 1e-6
    g = torch.randn(5, 1, n, heads, d, generator=gen)
    (batched,) = torch.autograd.grad(attend(v, attention), v, g, is_grads_batched=True)
    (dense_grad,) = torch.autograd.grad(reference(v), v, g, is_grads_batched=True)
    assert rel(batched, dense_grad) <= 1e-6
    jvp = torch.func.jvp(lambda v: attend(v, attention), (v.detach(),), (v.detach(),))[1]
    assert rel(jvp, reference(v.detach())) <= 1e-6
    assert attention.fused == (fused and not window)
    suffix = v.detach()[:, 4:].requires_grad_(True)
    suffix_reference = torch.einsum(
        "hqk,bkhd->bqhd", dense[:, 4:, 4:], suffix.repeat_interleave(2, dim=2)
    )
    assert rel(attend(suffix, attention).detach(), suffix_reference.detach()) <= 1e-6
    (suffix_grad,) = torch.autograd.grad(attend(suffix, attention), suffix, g[0, :, 4:])
    assert rel(suffix_grad, torch.autograd.grad(suffix_reference, suffix, g[0, :, 4:])[0]) <= 1e-6


def test_a_pattern_the_recipe_does_not_give_is_stored():
    """A user hook that edits one layer's pattern: that layer keeps its (edited) pattern whole,
    the others their queries and keys, and the map is still verified."""
    model = ll.tiny_model("llama")

    def halve_head_0(pattern, hook):
        pattern = pattern.clone()
        pattern[:, 0] *= 0.5
        return pattern

    lc = ll.run_with_linear_cache(
        model,
        PROMPT,
        store_patterns=False,
        fwd_hooks=[("blocks.1.attn.hook_pattern", halve_head_0)],
    )
    assert "blocks.1.attn.hook_pattern" in lc.point.values
    assert "blocks.0.attn.hook_pattern" in lc.point.frozen_attention
    assert lc.reconstruction_error() <= 1e-5


@pytest.mark.parametrize("store_patterns", [True, False])
def test_forward_mode_check_refuses_an_unfrozen_tanh(store_patterns):
    model = ll.tiny_model("llama")
    with pytest.raises(ll.LinearizationError, match="blocks.1"):
        ll.run_with_linear_cache(
            model,
            PROMPT,
            store_patterns=store_patterns,
            fwd_hooks=[("blocks.1.hook_mlp_out", lambda v, hook: torch.tanh(50 * v))],
        )
    assert not hooks_left(model)


def test_contribution_norms_estimate_is_unbiased():
    """Per-position ``‖J_i x_i‖²`` from a few VJPs agrees with the exact values (from the full
    Jacobian) within its standard error, at every position."""
    lc = ll.run_with_linear_cache(
        ll.tiny_model("llama"), LONG, store_patterns=False, progress=False
    )
    exact = lc.contribution_norms().values
    assert torch.allclose(
        exact, torch.einsum("pod,pd->po", lc.jacobian(), lc.x).double().pow(2).sum(-1)
    )
    estimate = lc.contribution_norms(probes=256)
    z = (estimate.values - exact) / estimate.stderr
    assert float(z.abs().max()) < 5, z
    assert float((estimate.stderr / exact).median()) < 0.2  # informative, not just wide error bars


def test_fused_kernels_are_checked_before_use():
    """The CUDA kernel's wrapper (head sizes padded to a multiple of 8, the log-normalizers'
    padding to 32 cut) run over an efficient-attention stand-in built from the CPU kernel that
    refuses unaligned head sizes as the CUDA one may: it agrees with the explicit softmax on
    the self-check's inputs (odd head sizes, the transpose's bias dimension). A kernel that
    disagrees is never used."""
    from lens_linear import _compat

    cpu = _compat.flash_attention_cpu()

    def efficient(q, k, v, bias, compute_lse, dropout, causal, *, scale):
        assert bias is None and compute_lse and dropout == 0.0 and causal
        assert q.shape[-1] % 8 == 0 and v.shape[-1] % 8 == 0, "unaligned head size"
        out, lse = cpu(q, k, v, 0.0, True, scale=scale)[:2]
        return out, torch.nn.functional.pad(lse, (0, -lse.shape[-1] % 32)), None, None

    assert _compat.kernel_agrees(_compat.cuda_kernel(efficient), "cpu", torch.float32)
    assert _compat.kernel_agrees(_compat.cpu_kernel(cpu), "cpu", torch.float64)

    def off_by_a_bit(q, k, v, scale):
        out, lse = _compat.cpu_kernel(cpu)(q, k, v, scale)
        return out, lse + 1e-3

    assert not _compat.kernel_agrees(off_by_a_bit, "cpu", torch.float32)
    assert _compat.fused_attention("meta", torch.float32) is None
