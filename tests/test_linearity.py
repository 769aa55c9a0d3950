"""Exactness of the frozen map on every tiny architecture, both backends (numbers, not asserts of faith)."""

import pytest
import torch
from conftest import CASE_IDS, CASES, PROMPT, cached_tiny, hooks_left, not_applicable, rel, skip_leg

import lens_linear as ll
from lens_linear.hooks import detach_hooks, detached_function, find_sites, operating_point
from lens_linear.reference import FORWARDS
from lens_linear.tiny import tiny_hf_model


def test_detach_hooks_keep_logits(tiny):
    tokens = tiny.to_tokens(PROMPT)
    plain = tiny(tokens)
    frozen = tiny.run_with_hooks(tokens, fwd_hooks=detach_hooks(tiny))
    assert (frozen - plain).abs().max() <= 1e-5
    assert not hooks_left(tiny)


@pytest.mark.parametrize(
    "dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)], ids=["f32", "f64"]
)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_reconstruction_and_bias_split(case, dtype, tol):
    model = cached_tiny(*case, dtype=dtype)
    lc = ll.run_with_linear_cache(model, PROMPT)
    y = lc.activation()
    recon = lc.contributions().sum(0) + lc.bias_term()
    assert rel(recon, y) <= tol, rel(recon, y)
    assert lc.reconstruction_error() <= tol
    parts = lc.bias_contributions()
    assert rel(sum(parts.values()), lc.bias_term()) <= max(
        tol, 1e-12 if dtype == torch.float64 else 1e-5
    )
    if case[0] == "bridge" and case[1] == "gpt2":  # GPT-2 has real biases: the split is not trivial
        assert lc.bias_term().norm() > 0.1 * y.norm()
        assert sum(1 for v in parts.values() if v.norm() > 0) > 5


def test_replay_reproduces_forward_and_jvp(tiny):
    lc = ll.run_with_linear_cache(tiny, PROMPT)
    out = lc.output
    recorded = lc.activation()
    assert torch.equal(
        lc.activations[out][0, lc.pos], recorded
    )  # the full cache, filled later, agrees
    assert "blocks.0.hook_resid_pre" in lc.activations
    replayed = lc.point.replay(lc.x, [out])[out][0]
    assert rel(replayed, lc.activations[out][0]) <= 1e-6
    v = torch.randn(lc.x.shape, generator=torch.Generator().manual_seed(1))
    jvp = lc.point.jvp(v, out)[lc.pos]
    autograd = torch.einsum("pod,pd->o", lc.jacobian(), v)
    assert rel(jvp, autograd) <= 1e-5
    u = torch.randn(lc.activation().shape, generator=torch.Generator().manual_seed(2))
    assert (
        rel(lc.point.vjp(u, out, pos=lc.pos), torch.einsum("o,pod->pd", u, lc.jacobian())) <= 1e-5
    )


def test_detached_autograd_equals_replay(tiny):
    """Two views of one map: autograd through the detach hooks at x*, and replay."""
    lc = ll.run_with_linear_cache(tiny, PROMPT)
    through_detach_hooks = detached_function(tiny, lc.tokens)
    jac = torch.autograd.functional.jacobian(
        through_detach_hooks, lc.x, vectorize=False
    )  # [d_out, pos, d_in]
    assert rel(jac.transpose(0, 1), lc.jacobian()) <= 1e-5


@pytest.mark.parametrize("arch", sorted(FORWARDS))
def test_jacobian_matches_independent_reference(arch):
    """A hand-written forward with explicit detaches, on the same HF weights."""
    hf = tiny_hf_model(arch)
    model = ll.models.wrap_bridge(hf, ll.tiny.char_tokenizer(), f"tiny-{arch}", torch.float32)
    lc = ll.run_with_linear_cache(model, PROMPT)
    ref = FORWARDS[arch]
    assert rel(ref(hf, lc.x)[-1], lc.activation()) <= 1e-5  # same function value
    jac = torch.autograd.functional.jacobian(lambda x: ref(hf, x)[-1], lc.x)  # [d_out, pos, d_in]
    err = rel(jac.transpose(0, 1), lc.jacobian())
    assert err <= 1e-5, err
    plain = lc.jacobian(detached=False)
    assert (
        rel(plain, lc.jacobian()) > 1e-3
    )  # freezing matters: the reference is not the plain Jacobian


def test_user_hook_composes_with_detach(tiny):
    """A user's ablation on hook_pattern takes effect; the frozen pattern is the ablated one."""

    def ablate(pattern, hook):
        pattern = pattern.clone()
        pattern[:, 0] = 0.0
        return pattern

    tokens = tiny.to_tokens(PROMPT)
    name = "blocks.0.attn.hook_pattern"
    ablated = tiny.run_with_hooks(tokens, fwd_hooks=[(name, ablate)])
    assert (ablated - tiny(tokens)).abs().max() > 1e-4
    both = tiny.run_with_hooks(tokens, fwd_hooks=[(name, ablate)] + detach_hooks(tiny))
    assert (both - ablated).abs().max() <= 1e-5
    lc = ll.run_with_linear_cache(tiny, tokens, fwd_hooks=[(name, ablate)])
    assert lc.reconstruction_error() <= 1e-5
    assert (lc.logits - ablated[0]).abs().max() <= 1e-5
    assert torch.equal(lc.point.values[name][0, 0], torch.zeros_like(lc.point.values[name][0, 0]))


def test_solu_gate_sits_on_hook_mid():
    if not ll.models.tl_has_hooked_transformer():
        skip_leg("HookedTransformer (TL < 4) only")
    model = cached_tiny("hooked", "solu")
    kinds = {s.name: s for s in find_sites(model)}
    assert kinds["blocks.0.mlp.hook_mid"].kind == "ratio"
    assert "blocks.0.mlp.ln.hook_scale" in kinds and "blocks.0.mlp.hook_post" not in kinds


def test_ratio_gate_refuses_a_non_activation(tiny):
    """The ratio rule would make any same-shape map look linear: it checks act_fn(pre) first."""
    ratio = [s for s in find_sites(tiny) if s.kind == "ratio"]
    if not ratio:
        not_applicable("gated MLP: no ratio gate")
    squash = (ratio[0].name, lambda post, hook: torch.tanh(post))
    with pytest.raises(ll.LinearizationError, match="is not act_fn"):
        ll.run_with_linear_cache(tiny, PROMPT, fwd_hooks=[squash])
    assert not hooks_left(tiny)


def test_unfrozen_nonlinearity_names_its_layer(tiny):
    squash = ("blocks.1.hook_attn_out", lambda x, hook: torch.tanh(10 * x))  # strongly nonlinear
    with pytest.raises(ll.LinearizationError, match=r"blocks\.1\b") as info:
        ll.run_with_linear_cache(tiny, PROMPT, fwd_hooks=[squash])
    assert info.value.layer == 1 and info.value.error > 1e-5
    assert not hooks_left(tiny)


def test_model_is_returned_as_it_was(tiny):
    tiny.train()
    frozen_by_user = next(tiny.parameters()).requires_grad_(False)  # Jacobians unfreeze nothing
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    flags = {n: p.requires_grad for n, p in tiny.named_parameters()}
    with ll.detached(tiny):
        assert hooks_left(tiny)
        tiny(tiny.to_tokens(PROMPT))
    assert not hooks_left(tiny)
    with pytest.raises(RuntimeError, match="boom"):
        with ll.detached(tiny):
            raise RuntimeError("boom")
    assert not hooks_left(tiny)

    def explode(x, hook):
        raise RuntimeError("boom inside forward")

    with pytest.raises(RuntimeError, match="boom inside forward"):
        ll.run_with_linear_cache(tiny, PROMPT, fwd_hooks=[("blocks.1.hook_resid_pre", explode)])
    ll.run_with_linear_cache(tiny, PROMPT).svd_matrix_free(
        n_triplets=2
    )  # analysis_mode freezes, then restores
    assert not hooks_left(tiny)
    assert tiny.training and all(m.training for m in tiny.modules())
    assert all(torch.equal(v, state[k]) for k, v in tiny.state_dict().items())
    assert (
        flags == {n: p.requires_grad for n, p in tiny.named_parameters()}
        and not frozen_by_user.requires_grad
    )
    frozen_by_user.requires_grad_(True)
    tiny.eval()


@pytest.mark.parametrize("whole", [True, False], ids=["probe", "forward-mode"])
@pytest.mark.parametrize("kind", ["attn", "norm", "gate", "ratio"])
def test_cheap_check_catches_a_site_left_out(tiny, kind, whole, monkeypatch):
    """A deliberately wrong frozen map (one site left live) is refused by both routes of the
    check (a short prompt's whole-prompt site check, a long one's forward-mode replay), and the
    projected errors track the full reconstruction error within a factor of 5."""
    monkeypatch.setattr(operating_point, "WHOLE_CHECK_POSITIONS", 1 << 20 if whole else 0)
    lc = ll.run_with_linear_cache(tiny, PROMPT, check=False)
    sites = [s for s in lc.point.sites if s.kind == kind and s.layer == 0]
    if not sites:
        not_applicable(f"no {kind} site in block 0")
    y = lc.activations[lc.output][0]
    exact, probed_exact = lc.projected_reconstruction_error(), lc.point.check_sites(y).error
    lc.point.sites = [s for s in lc.point.sites if s != sites[0]]  # that coefficient now runs live
    with pytest.raises(ll.LinearizationError, match="does not reconstruct"):
        lc.check()
    wrong, full = lc.projected_reconstruction_error(), lc.reconstruction_error()
    assert full / 5 <= wrong <= 5 * full and full > 1e3 * max(exact, 1e-9)
    assert lc.directional_error() == pytest.approx(full, rel=1e-3)  # forward mode: the error itself
    if (
        whole
    ):  # the site check covers every position: at least as large as the last position's error
        probed = lc.point.check_sites(y).error
        assert (
            probed >= full / 5 and probed > 1e3 * max(probed_exact, 1e-9) and probed_exact <= 1e-5
        )
    else:
        assert lc.point.check_sites(y).error is None
    assert not hooks_left(tiny)


def test_directional_check_is_the_reconstruction(tiny, monkeypatch):
    """``J⁺x*`` carried by the recording (forward mode, as on a long prompt), from a
    forward-mode replay, and from the full Jacobian agree; the check is the full
    reconstruction error, not an estimate."""
    monkeypatch.setattr(operating_point, "WHOLE_CHECK_POSITIONS", 0)
    lc = ll.run_with_linear_cache(tiny, PROMPT)
    assert lc.output in lc.point.tangents
    carried = lc.point.directional(lc.output, pos=lc.pos)
    lc.point.tangents.clear()
    replayed = lc.point.directional(lc.output, pos=lc.pos)
    full = torch.einsum("pod,pd->o", lc.jacobian(), lc.x)
    assert (carried - full).abs().max() <= 1e-5 * full.abs().max()
    assert (replayed - full).abs().max() <= 1e-5 * full.abs().max()
    assert lc.directional_error() <= 1e-5 and lc.reconstruction_error() <= 1e-5


def test_short_prompt_check_needs_no_tangent(tiny):
    """On a short prompt the recording runs without forward mode: the site check replays the
    whole prompt and checks the reconstruction from its backward."""
    lc = ll.run_with_linear_cache(tiny, PROMPT)
    assert not lc.point.tangents
    sites = lc.point.check_sites(lc.activations[lc.output][0])
    assert sites.ignored == [] and sites.error <= 1e-5
    calls = []  # forwards of the last block, seen by a plain PyTorch hook on the module
    handle = tiny.blocks[-1].register_forward_hook(lambda m, args, out: calls.append(1))
    try:
        jac = lc.jacobian()  # from the check's kept replay graph: no forward of its own
        assert calls == []
        lc.jacobian(pos=0)  # the graph serves one Jacobian: another one replays
        assert len(calls) == 1
    finally:
        handle.remove()
    reference = ll.run_with_linear_cache(tiny, PROMPT, check=False).jacobian()
    assert (jac - reference).abs().max() <= 1e-5 * reference.abs().max()


@pytest.mark.parametrize("recorded", [True, False], ids=["recorded-graph", "replay"])
def test_bias_gradients_explain_the_constant_without_a_replay(tiny, recorded, monkeypatch):
    """The check's backward takes every bias's gradient too (a bridge's per-projection views of
    a joint QKV bias included): ``Σ_b ⟨Uᵀ∂F/∂b, b⟩`` is ``U F(0)`` where the biases explain the
    constant, so no bias-free replay runs. Checked against that replay's verdict: the constant
    it finds is zero."""
    lc = ll.run_with_linear_cache(tiny, PROMPT, check=False)
    stray = lc.point.unexplained_constant(lc.output)  # the bias-free replay: the reference
    biased = lc.point.may_add_constant()

    def no_replay(*args, **kwargs):
        raise AssertionError("the bias-free replay ran")

    monkeypatch.setattr(operating_point.OperatingPoint, "unexplained_constant", no_replay)
    if recorded:
        lc = ll.run_with_linear_cache(tiny, PROMPT)  # the recording's graph serves the check
    else:
        lc.check()  # a replay with autograd serves it
    sites = lc.point.check_sites(lc.activations[lc.output][0])
    if biased:
        assert stray is not None and float(stray.norm()) <= 1e-5 * float(lc.activation().norm())
        assert sites.unexplained is not None and sites.unexplained <= 1e-5
    else:
        assert sites.unexplained is None
    assert not hooks_left(tiny)


def test_projected_error_estimates_the_full_one(tiny):
    lc = ll.run_with_linear_cache(tiny, PROMPT)
    estimate, full = lc.projected_reconstruction_error(), lc.reconstruction_error()
    assert estimate <= 1e-5 and full <= 1e-5
    assert lc.check() == full  # with the full Jacobian computed, the check reads it


def test_constant_operand_tangents_match_torch_forward_mode():
    """Inside ``constant_operand_tangents`` each product with one dual operand gives the values
    and tangents of PyTorch's own forward-mode rule (float64: equal to rounding), from one
    product per tangent; products of two dual operands fall back to PyTorch's rule."""
    import torch.autograd.forward_ad as fwAD
    import torch.nn.functional as F

    from lens_linear.hooks.tangents import constant_operand_tangents

    gen = torch.Generator().manual_seed(0)
    a, t = (torch.randn(2, 5, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    w, b = (
        torch.randn(3, 4, generator=gen, dtype=torch.float64),
        torch.randn(3, generator=gen, dtype=torch.float64),
    )
    cases = {
        "linear": lambda x: F.linear(x, w, b),
        "linear kw": lambda x: F.linear(x, w, bias=b),
        "matmul": lambda x: x @ w.T,
        "matmul left": lambda x: w @ x.transpose(1, 2),
        "einsum": lambda x: torch.einsum("bpd,od->bpo", x, w),
        "bmm": lambda x: torch.bmm(x, x.transpose(1, 2)),
        "mm": lambda x: torch.mm(x[0], w.T),
    }
    with torch.no_grad(), fwAD.dual_level():
        x = fwAD.make_dual(a, t)
        for name, fn in cases.items():
            expected = fwAD.unpack_dual(fn(x))
            with constant_operand_tangents():
                got = fwAD.unpack_dual(fn(x))
            assert (got.primal - expected.primal).abs().max() <= 1e-12, name
            assert (got.tangent - expected.tangent).abs().max() <= 1e-12, name
        with constant_operand_tangents():
            assert fwAD.unpack_dual(F.linear(a, w, b)).tangent is None  # nothing dual: untouched
