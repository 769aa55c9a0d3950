"""LinearCache analyses on tiny models: Jacobians anywhere, both engines, decompositions, SVD."""

import pytest
import torch
from conftest import PROMPT, cached_tiny, rel

import lens_linear as ll
from lens_linear.tiny import tiny_hf_model


def component_hooks(model):
    names = [
        f"blocks.{l}.{h}"
        for l in range(model.cfg.n_layers)
        for h in (
            "hook_resid_pre",
            "hook_resid_mid",
            "hook_resid_post",
            "hook_attn_out",
            "hook_mlp_out",
        )
    ]
    return [n for n in names if n in model.hook_dict]  # parallel blocks have no resid_mid


def test_every_hook_reconstructs_and_engines_agree(tiny):
    hooks = component_hooks(tiny)
    fwd = ll.run_with_linear_cache(tiny, PROMPT).jacobians(hooks, method="forward")
    lc = ll.run_with_linear_cache(tiny, PROMPT)
    rev = lc.jacobians(hooks, method="reverse")
    for h in hooks:
        assert lc.reconstruction_error(h) <= 1e-5, h
        assert rel(fwd[h], rev[h]) <= 1e-5, h
    assert lc.reconstruction_error(pos=3) <= 1e-5  # another output position
    assert lc["resid_post", -1] is lc.jacobian(
        f"blocks.{tiny.cfg.n_layers - 1}.hook_resid_post"
    )  # TL shorthand


def dead_names(model, lc, hooks):
    dead = lc.point.dead_linears(hooks)
    return {
        n.replace("._original_component", "")
        for n, m in model.named_modules()
        if any(m is d for d in dead)
    }


def test_forward_engine_skips_only_dead_projections():
    """Query, key and gate projections feed only frozen coefficients: skipped, and only them."""
    model = cached_tiny("bridge", "llama")
    lc = ll.run_with_linear_cache(model, PROMPT)
    dead = dead_names(model, lc, ["blocks.1.hook_resid_post"])
    assert sorted({n.split(".", 2)[2] for n in dead}) == [
        "mlp.gate_proj",
        "self_attn.k_proj",
        "self_attn.q_proj",
    ]
    assert len(dead) == 3 * model.cfg.n_layers
    q_hook = "blocks.1.attn.q.hook_out"  # asked for, the query projection is live
    assert "blocks.1.self_attn.q_proj" not in dead_names(model, lc, [q_hook])
    hooks = [q_hook, "blocks.1.hook_resid_post"]
    fwd = lc.jacobians(hooks, method="forward")
    rev = ll.run_with_linear_cache(model, PROMPT).jacobians(hooks, method="reverse")
    assert all(rel(fwd[h], rev[h]) <= 1e-5 for h in hooks)
    assert not [
        n for n, m in model.named_modules() if "forward" in vars(m)
    ]  # the model is as it was


def test_contributions_sum_to_the_activation(tiny):
    lc = ll.run_with_linear_cache(tiny, PROMPT)
    for hook in [None, "blocks.1.hook_resid_mid", "blocks.0.hook_resid_post"]:
        if hook and hook not in tiny.hook_dict:
            continue
        y = lc.activation(hook)
        by_pos = lc.contributions(hook)
        assert rel(by_pos.sum(0) + lc.bias_term(hook), y) <= 1e-5
    by_comp = lc.contributions("blocks.0.hook_resid_post", by="component")
    assert set(by_comp) == {"embed", "blocks.0.attn", "blocks.0.mlp", "bias"}
    with pytest.raises(ValueError, match="residual-stream hook"):
        lc.contributions("blocks.0.hook_attn_out", by="component")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_component_shares_are_read_through_the_recorded_final_norm(arch):
    """Each component's share of the output is its own residual output through the final norm
    with the recorded scale: written here by hand from the Hugging Face norm's weights."""
    model, hf = cached_tiny("bridge", arch), tiny_hf_model(arch)
    norm = hf.transformer.ln_f if arch == "gpt2" else hf.model.norm
    lc = ll.run_with_linear_cache(model, PROMPT)
    parts = lc.contributions(by="component")
    resid = lc.activations["blocks.1.hook_resid_post"][0, lc.pos].double()
    eps = getattr(norm, "eps", None) or norm.variance_epsilon
    if arch == "gpt2":
        read = lambda v: (
            (v - v.mean()) / (resid.var(unbiased=False) + eps).sqrt() * norm.weight.double()
        )  # noqa: E731
    else:
        read = lambda v: v / (resid.pow(2).mean() + eps).sqrt() * norm.weight.double()  # noqa: E731
    for label, hook in [
        ("embed", "blocks.0.hook_resid_pre"),
        ("blocks.0.attn", "blocks.0.hook_attn_out"),
        ("blocks.1.mlp", "blocks.1.hook_mlp_out"),
    ]:
        assert rel(parts[label], read(lc.activations[hook][0, lc.pos].double())) <= 1e-5, label
    expected_bias = (
        norm.bias.double()
        if arch == "gpt2"
        else torch.zeros(model.cfg.d_model, dtype=torch.float64)
    )
    assert float((parts["bias"].double() - expected_bias).abs().max()) <= 1e-5


def test_layerwise_maps_compose():
    model = cached_tiny("bridge", "llama")
    lc = ll.run_with_linear_cache(model, "H", prepend_bos=False)
    prod = lc.layerwise_jacobian(1)[0] @ lc.layerwise_jacobian(0)[0]
    assert rel(prod, lc.layerwise_jacobian(1, cumulative=True)[0]) <= 1e-5
    lc2 = ll.run_with_linear_cache(
        model, PROMPT
    )  # several tokens: block map reconstructs its output
    step = lc2.layerwise_jacobian(1)
    resid_pre = lc2.activations["blocks.1.hook_resid_pre"][0]
    recon = (
        torch.einsum("pod,pd->o", step, resid_pre)
        + lc2.point.bias_term(
            "blocks.1.hook_resid_post", input_hook="blocks.1.hook_resid_pre", like=resid_pre
        )[lc2.pos]
    )
    assert rel(recon, lc2.activation("blocks.1.hook_resid_post")) <= 1e-5
    with pytest.raises(IndexError, match="layer=2 is out of range"):
        lc2.layerwise_jacobian(2)


def test_svd_matches_dense_and_sign_convention(tiny):
    lc = ll.run_with_linear_cache(tiny, PROMPT)
    jac = lc.jacobian()
    for position in ["all", 2]:
        res = lc.svd(input_pos=position, n_triplets=4)
        mat = jac.permute(1, 0, 2).reshape(jac.shape[1], -1) if position == "all" else jac[2]
        assert rel(res.S, torch.linalg.svdvals(mat)[:4]) <= 1e-5
        recon = res.U @ torch.diag(res.S) @ res.V.reshape(-1, 4).T
        top4 = torch.linalg.svd(mat)
        assert rel(recon, top4.U[:, :4] @ torch.diag(top4.S[:4]) @ top4.Vh[:4]) <= 1e-4
        assert (res.U.T @ lc.activation() >= 0).all()
        s = torch.linalg.svdvals(mat).double()
        assert rel(res.spectrum, s) <= 1e-6  # the whole spectrum (wide: from J Jᵀ)
        assert rel(res.V.reshape(-1, 4).T @ res.V.reshape(-1, 4), torch.eye(4)) <= 1e-5
        assert abs(res.stable_rank - float((s**2).sum() / s[0] ** 2)) <= 1e-6 * res.stable_rank
    assert "stable_rank" in repr(res) and res.to_dict()["S"] == res.S.tolist()


def test_decode_of_a_jacobian_larger_than_the_budget_is_matrix_free():
    """Where the dense Jacobian would not fit ``max_memory``, decode's triplets come from the
    matrix-free SVD (no Jacobian formed), read as tokens exactly as the dense SVD's are: the
    same values, vectors, signs and tokens, against ``torch.linalg.svd`` of autograd's
    Jacobian of the frozen map."""
    model = cached_tiny("bridge", "gpt2")
    small = ll.run_with_linear_cache(model, PROMPT, max_memory=1 << 12, progress=False)
    dirs = small.decode(n_triplets=2, n_tokens=3)
    assert not small.is_computed()  # no Jacobian was formed
    dense = ll.run_with_linear_cache(model, PROMPT, progress=False)
    assert [d.output.tokens for d in dirs] == [
        d.output.tokens for d in dense.decode(n_triplets=2, n_tokens=3)
    ]
    jac = torch.autograd.functional.jacobian(
        lambda x: dense.point.replay(x, [dense.output])[dense.output][0, -1], dense.x
    )  # [d_out, pos, d_in]
    U, S, Vh = torch.linalg.svd(jac.reshape(jac.shape[0], -1).double())
    assert [d.value for d in dirs] == pytest.approx(S[:2].tolist(), rel=1e-5)
    explains = dense.activation().double()
    for j, d in enumerate(dirs):
        u = U[:, j] * torch.sign(explains @ U[:, j])
        assert d.output.tokens[0] == model.tokenizer.decode([int((u.float() @ model.W_U).argmax())])


def test_decode_reads_tokens():
    model = cached_tiny("bridge", "gpt2")
    lc = ll.run_with_linear_cache(model, PROMPT)
    dirs = lc.decode(n_triplets=2, n_tokens=3)
    assert len(dirs) == 2 and len(dirs[0].output.tokens) == 3 and len(dirs[0].input.tokens) == 3
    u, _, _ = lc.svd(n_triplets=1)
    u = u[:, 0]
    assert dirs[0].output.tokens[0] == model.tokenizer.decode([int((u @ model.W_U).argmax())])
    rows = lc.top_rows(input_pos=1, n_rows=2)
    norms = lc.jacobian()[1].norm(dim=1)
    assert rows[0].value == pytest.approx(float(norms.max()))
    assert lc.top_columns(input_pos=1, n_cols=1)[0].value == pytest.approx(
        float(lc.jacobian()[1].norm(dim=0).max())
    )
    spectra = lc.spectra(["blocks.0.hook_attn_out", "blocks.0.hook_mlp_out"])
    assert all(float(s[0]) == 1.0 and (s[:-1] >= s[1:]).all() for s in spectra.values())
    align = lc.alignment(n_triplets=2)
    assert align.shape == (2, 2) and torch.allclose(align[-1], torch.ones(2), atol=1e-5)
    # both come from J Jᵀ's top eigenpairs: the same numbers as the SVD of the wide matrix
    hooks = [f"blocks.{l}.hook_resid_post" for l in range(model.cfg.n_layers)]
    by_svd = torch.stack(
        [
            (lc.svd(h, n_triplets=2).U * lc.svd(hooks[-1], n_triplets=2).U).sum(0).abs()
            for h in hooks
        ]
    )
    assert float((align - by_svd).abs().max()) <= 1e-5
    for position in ("all", 1):
        assert lc.stable_rank(input_pos=position) == pytest.approx(
            lc.svd(input_pos=position, n_triplets=1).stable_rank, rel=1e-6
        )


def test_analysis_errors():
    model = cached_tiny("bridge", "gpt2")
    lc = ll.run_with_linear_cache(model, "abcd")
    with pytest.raises(
        ValueError, match=r"n_triplets=65 must be between 1 and the matrix rank bound 64"
    ):
        lc.svd(input_pos=0, n_triplets=65)
    with pytest.raises(IndexError, match="input_pos=7 is out of range"):
        lc.svd(input_pos=7)
    with pytest.raises(ValueError, match="cannot be read through the unembedding"):
        ll.decode.check_output_space(model, 256, "blocks.0.mlp.hook_post")
    with pytest.raises(ValueError, match="method must be"):
        lc.jacobians(method="sideways")
    tokenizer, model.tokenizer = model.tokenizer, None
    try:
        with pytest.raises(ValueError, match="decoding needs a tokenizer"):
            lc.decode(n_triplets=1)
    finally:
        model.tokenizer = tokenizer
