"""Attention circuits: token-to-token Jacobians as FactoredMatrix, the QK term, induction heads."""

import pytest
import torch
from conftest import HOOKED, PROMPT, cached_tiny, newest_tl_only, rel

import lens_linear as ll
from lens_linear.attention import attention_input, induction_heads

PAIRS = [(5, 5), (5, 0), (7, 3), (0, 0)]  # (query, key): the diagonal, the first position, neither
FROZEN = ("attn.hook_pattern", "ln1.hook_scale", "ln1_post.hook_scale")
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*hook_scale/hook_normalized"
)  # the reference edits norms


def reference(model, lc, layer, q, k, detach=FROZEN, source=None):
    """Autograd Jacobian ``[d_out, d_in]`` of ``hook_attn_out[q]`` w.r.t. ``source[k]``, written
    directly on the model's hooks: only the listed values are detached."""
    source = source or attention_input(model, layer)
    x0 = lc.activations[source][0].detach()
    names = [f"blocks.{layer}.{d}" for d in detach if f"blocks.{layer}.{d}" in model.hook_dict]

    def f(xk):
        x = torch.cat([x0[:k], xk[None], x0[k + 1 :]])
        out = {}
        hooks = (
            [(source, lambda v, hook: x[None].to(v.dtype))]
            + [(n, lambda v, hook: v.detach()) for n in names]
            + [(f"blocks.{layer}.hook_attn_out", lambda v, hook: out.__setitem__("y", v))]
        )
        with model.hooks(fwd_hooks=hooks):
            model(lc.tokens)
        return out["y"][0, q]

    return torch.autograd.functional.jacobian(f, x0[k], vectorize=True)


def test_attention_jacobian_equals_autograd_with_the_pattern_detached(tiny):
    lc = ll.run_with_linear_cache(tiny, PROMPT)
    for q, k in PAIRS:
        fm = lc.attention_jacobian(1, q, k)
        assert rel(fm.AB, reference(tiny, lc, 1, q, k)) <= 1e-5, (q, k)
        heads = sum(lc.attention_jacobian(1, q, k, head=h).AB for h in range(tiny.cfg.n_heads))
        assert rel(heads, fm.AB) <= 1e-6
    from_resid = lc.attention_jacobian(1, 6, 2, include_norm=True)
    expected = reference(tiny, lc, 1, 6, 2, source="blocks.1.hook_resid_pre")
    assert rel(from_resid.AB, expected) <= 1e-5


@pytest.mark.parametrize("backend", ["bridge", "hooked"] if HOOKED else ["bridge"])
def test_analytic_qk_term_completes_the_plain_jacobian(backend):
    """Standard attention (GPT-2, no rotary): OV term + analytic QK term = plain autograd.
    In float64, since the autograd QK term is a difference of two larger matrices."""
    model = cached_tiny(backend, "gpt2", torch.float64)
    lc = ll.run_with_linear_cache(model, PROMPT)
    for q, k in PAIRS:
        analytic = lc.attention.qk_term(1, q, k, method="analytic")
        plain = reference(model, lc, 1, q, k, detach=())
        by_autograd = lc.attention.qk_term(1, q, k, method="autograd")
        assert float((analytic - by_autograd).norm() / plain.norm()) <= 1e-12, (q, k)
        assert rel(lc.attention_jacobian(1, q, k).AB + analytic, plain) <= 1e-12, (q, k)
        if q > 0:  # with one visible key the pattern is 1 whatever the scores: no QK term
            assert rel(lc.attention_jacobian(1, q, k).AB, plain) >= 1e-3
    one_head = lc.attention.qk_term(1, 5, 2, head=1, method="analytic")
    assert rel(one_head, lc.attention.qk_term(1, 5, 2, head=1, method="autograd")) <= 1e-10


def test_rotary_qk_term_by_autograd():
    model = cached_tiny("bridge", "llama")
    lc = ll.run_with_linear_cache(model, PROMPT)
    with pytest.raises(ValueError, match="method='autograd'"):  # rotary scores: not q·k / scale
        lc.attention.qk_term(1, 5, 2, method="analytic")
    total = lc.attention_jacobian(1, 5, 2).AB + lc.attention.qk_term(1, 5, 2)
    assert rel(total, reference(model, lc, 1, 5, 2, detach=("ln1.hook_scale",))) <= 1e-5


def test_factored_matrix_operations_and_circuits():
    model = cached_tiny(
        "bridge", "llama"
    )  # grouped-query attention: 4 query heads, 2 key/value heads
    lc = ll.run_with_linear_cache(model, PROMPT)
    fm = lc.attention_jacobian(1, 6, 2)
    dense = fm.AB
    v = torch.randn(model.cfg.d_model)
    assert rel(fm @ v, dense @ v) <= 1e-5 and rel(v @ fm, v @ dense) <= 1e-5
    assert rel((fm @ fm).AB, dense @ dense) <= 1e-5
    u, s, vh = fm.svd()
    assert rel(u @ torch.diag(s) @ vh.T, dense) <= 1e-5
    assert rel(s, torch.linalg.svdvals(dense)[: len(s)]) <= 1e-5
    eig = fm.eigenvalues
    dense_eig = torch.linalg.eigvals(dense)
    big = dense_eig[dense_eig.abs() > 1e-4 * dense_eig.abs().max()]
    assert rel(eig.abs().sort().values[-len(big) :], big.abs().sort().values) <= 1e-4

    w = lc.attention.weights(1)
    ov = lc.attention.ov_circuit(1)
    assert ov.AB.shape == (4, 64, 64)
    assert (
        rel(ov.AB[3], (model.blocks[1].attn.W_V[1] @ model.blocks[1].attn.W_O[3]).detach()) <= 1e-6
    )  # head 3 reads kv head 1
    pattern = lc.attention.pattern(1)
    assert torch.allclose(pattern.sum(-1), torch.ones_like(pattern[..., 0]), atol=1e-5)
    weighted = torch.einsum("h,hio->io", pattern[:, 6, 2], ov.AB)  # circuits: row convention
    assert rel(weighted.T, dense) <= 1e-6  # Jacobians: column convention
    assert (
        rel(
            lc.attention.ov_circuit(1, head=2, key_pos=2).AB,
            lc.attention.norm_map(1, pos=2) @ ov.AB[2],
        )
        <= 1e-6
    )
    with pytest.warns(UserWarning, match="rotary"):
        qk = lc.attention.qk_circuit(1, head=0, query_pos=6, key_pos=2)
    expected = (
        lc.attention.norm_map(1, pos=6)
        @ w["W_Q"][0]
        @ w["W_K"][0].T
        @ lc.attention.norm_map(1, pos=2).T
    )
    assert rel(qk.AB, expected) <= 1e-5

    full = model.W_E @ dense.T @ model.W_U
    lam = torch.linalg.eigvals(full)
    assert lc.attention.copying_score(fm) == pytest.approx(
        float((lam.sum() / lam.abs().sum()).real), abs=1e-4
    )


def test_bad_attention_input():
    model = cached_tiny("bridge", "gpt2")
    lc = ll.run_with_linear_cache(model, PROMPT)
    with pytest.raises(IndexError, match="layer=2 is out of range"):
        lc.attention_jacobian(2, 3, 1)
    with pytest.raises(IndexError, match="head=4 is out of range"):
        lc.attention_jacobian(1, 3, 1, head=4)
    with pytest.raises(IndexError, match="query_pos=99 is out of range"):
        lc.attention_jacobian(1, 99, 1)
    with pytest.warns(UserWarning, match="causal attention cannot see it"):
        zero = lc.attention_jacobian(1, 2, 5)
    assert float(zero.AB.abs().max()) == 0.0
    with pytest.raises(ValueError, match="method must be"):
        lc.attention.qk_term(1, 3, 1, method="exact")


def hand_induction_scores(model, tokens, seq_len):
    """Each head's mean attention from every second-half token to the token after its first
    occurrence, read off the plain model's ``run_with_cache`` patterns: ``[layer, head]``."""
    first = tokens.shape[-1] - 2 * seq_len
    assert torch.equal(tokens[0, first : first + seq_len], tokens[0, first + seq_len :])
    queries = torch.arange(first + seq_len, first + 2 * seq_len)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    return torch.stack(
        [
            cache[f"blocks.{layer}.attn.hook_pattern"][0][:, queries, queries - seq_len + 1]
            .double()
            .mean(-1)
            for layer in range(model.cfg.n_layers)
        ]
    )


def transformer_lens_induction_scores(model, tokens, seq_len):
    """``transformer_lens.head_detector.detect_head(..., "induction_head")`` called here on the
    text of ``tokens``, on our scale: its ratio divides by every query row (all ``n`` of them sum
    to 1), ours by the ``seq_len`` second-half queries, so its score × ``n / seq_len``."""
    from transformer_lens.head_detector import detect_head

    first = tokens.shape[-1] - 2 * seq_len
    text = model.tokenizer.decode(tokens[0, first:].tolist())
    assert torch.equal(model.to_tokens(text).cpu(), tokens.cpu())  # the detector sees these tokens
    return detect_head(model, text, "induction_head").double() * tokens.shape[-1] / seq_len


@pytest.mark.parametrize("backend", ["bridge", "hooked"] if HOOKED else ["bridge"])
def test_induction_scores_match_head_detector(backend):
    """Scores against a hand computation from ``run_with_cache`` patterns and against
    TransformerLens' own head detector, called here (measured: both ≤ 4.1e-9; SmolLM2 ≤ 3e-7)."""
    model = cached_tiny(backend, "gpt2")
    report = induction_heads(model, seq_len=20, n_top_heads=3)
    assert report.tokens.shape[-1] == 41  # BOS + 2 × 20
    hand = hand_induction_scores(model, report.tokens, 20)
    theirs = transformer_lens_induction_scores(model, report.tokens, 20)
    assert float((report.scores.double() - hand).abs().max()) <= 1e-6
    assert float((report.scores.double() - theirs).abs().max()) <= 1e-6
    # a random model attends almost uniformly, yet its heads differ by 1e-3 and a key off by
    # one position moves the scores by 7e-4: far above the tolerance
    assert float(hand.max() - hand.min()) >= 1e-4
    assert float((report.detector_scores - theirs).abs().max()) <= 1e-12  # what it reports
    assert [h.score for h in report.top] == sorted(report.scores.flatten().tolist(), reverse=True)[
        :3
    ]
    # copying scores: eigenvalues of W_E Jᵀ W_U of the dense Jacobians, over the same 8 query positions
    lc = ll.run_with_linear_cache(model, report.tokens, check=False)
    queries = torch.linspace(21, 40, 8).round().long()  # second-half positions after BOS
    for h in report.top:
        dense = [
            lc.attention_jacobian(h.layer, int(q), int(q) - 19, head=h.head, include_norm=True).AB
            for q in queries
        ]
        lam = [
            torch.linalg.eigvals(model.W_E.double() @ j.T.double() @ model.W_U.double())
            for j in dense
        ]
        expected = sum(float((e.sum() / e.abs().sum()).real) for e in lam) / len(lam)
        assert h.copying_score == pytest.approx(expected, abs=1e-6)
    assert set(report.to_dict()) == {"scores", "top", "detector_scores"}
    assert "induction" in repr(report)


def test_smollm2_attention_jacobian_and_qk_term(smollm2):
    """Grouped-query attention with rotary embeddings: OV term exact, QK term by autograd."""
    lc = ll.run_with_linear_cache(smollm2, "The bridge out of Marin is the", check=False)
    for q, k in [(6, 6), (6, 0), (4, 2)]:
        fm = lc.attention_jacobian(5, q, k)
        assert rel(fm.AB, reference(smollm2, lc, 5, q, k)) <= 1e-5, (q, k)
        plain = reference(smollm2, lc, 5, q, k, detach=())
        assert rel(fm.AB + lc.attention.qk_term(5, q, k), plain) <= 1e-5, (q, k)


@newest_tl_only
def test_smollm2_induction_heads(smollm2):
    report = induction_heads(smollm2, seq_len=50)
    assert report.tokens.shape[-1] == 100  # SmolLM2 prepends no BOS
    assert report.top[0].score > 0.3
    assert (
        float(
            (report.scores.double() - hand_induction_scores(smollm2, report.tokens, 50)).abs().max()
        )
        <= 1e-5
    )
    theirs = transformer_lens_induction_scores(smollm2, report.tokens, 50)
    assert float((report.scores.double() - theirs).abs().max()) <= 1e-5
    assert (
        max(h.copying_score for h in report.top) > 0.5
    )  # some induction head copies what it attends to
