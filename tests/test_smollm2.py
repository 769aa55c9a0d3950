"""The default model, SmolLM2-135M-Instruct (offline, from the PyPI wheel): the seed paper's numbers."""

import json

import pytest
import torch
from conftest import hooks_left, newest_tl_only, rel, skip_leg

import lens_linear as ll
from lens_linear.cli import main
from lens_linear.hooks import detach_hooks

PROMPTS = [
    "The bridge out of Marin is the",
    "The capital of France is",
    "Once upon a time, there was a",
    "def fibonacci(n):",
]


def test_detach_hooks_keep_logits(smollm2):
    """Within 1e-5 of the logits' scale. An edited hook_scale sends the bridge's RMSNorm down
    its python path (x / scale, not x * rsqrt), which differs at float32 rounding: measured
    4.2e-5 absolute on logits of magnitude ~20 over 30 layers."""
    tokens = smollm2.to_tokens(PROMPTS[0])
    with torch.no_grad():
        plain = smollm2(tokens)
        diff = (smollm2.run_with_hooks(tokens, fwd_hooks=detach_hooks(smollm2)) - plain).abs().max()
    assert diff <= 1e-5 * plain.abs().max(), float(diff)


@newest_tl_only
@pytest.mark.parametrize("prompt", PROMPTS)
def test_detached_reconstructs_plain_does_not(smollm2, prompt):
    lc = ll.run_with_linear_cache(smollm2, prompt)
    assert lc.reconstruction_error() <= 1e-5
    assert lc.reconstruction_error(detached=False) >= 1e-2
    assert float(lc.bias_term().abs().max()) == 0.0  # Llama architecture: no biases
    assert not hooks_left(smollm2)


def test_top_prediction(smollm2):
    lc = ll.run_with_linear_cache(smollm2, PROMPTS[0], check=False)
    assert lc.str_tokens == ["The", " bridge", " out", " of", " Marin", " is", " the"]
    assert lc.top_predictions(1)[0].token == " only"


def test_hooked_backend_matches_bridge(smollm2):
    if not ll.models.tl_has_hooked_transformer():
        skip_leg("HookedTransformer needs TransformerLens < 4")
    hooked = ll.load_model(backend="hooked")
    tokens = smollm2.to_tokens(PROMPTS[0])
    assert (hooked(tokens) - smollm2(tokens)).abs().max() <= 1e-3
    lc = ll.run_with_linear_cache(hooked, PROMPTS[0])
    assert lc.reconstruction_error() <= 1e-5 and lc.top_predictions(1)[0].token == " only"


@newest_tl_only
def test_cli_analyze_json(capsys, marin):
    """The JSON's numbers recomputed by hand from the Jacobians: ``‖J_i x_i‖``, and each
    ``J_i``'s top singular value and stable rank ``Σσ² / σ₁²`` from ``torch.linalg.svdvals``."""
    assert main(["analyze", PROMPTS[0], "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["top"][0]["token"] == " only"
    assert result["reconstruction_error"]["detached"] <= 1e-5
    assert result["reconstruction_error"]["ordinary"] >= 1e-2
    jac, x = marin.jacobian().double(), marin.x.double()
    norms = torch.einsum("pod,pd->po", jac, x).norm(dim=-1)
    assert rel(torch.tensor(result["contribution_norms"]), norms) <= 1e-5
    assert [t["token"] for t in result["per_token"]] == result["tokens"]
    for i, entry in enumerate(result["per_token"]):
        s = torch.linalg.svdvals(jac[i])
        assert entry["sigma"] == pytest.approx(float(s[0]), rel=1e-5)
        assert entry["stable_rank"] == pytest.approx(float((s**2).sum() / s[0] ** 2), rel=1e-5)
    assert len(result["layers"]) == 30
    last = marin.jacobian("blocks.29.hook_resid_post").double()  # [pos, d_out, d_in]
    s = torch.linalg.svdvals(last.permute(1, 0, 2).reshape(last.shape[1], -1))
    assert result["layers"][-1]["sigma"] == pytest.approx(float(s[0]), rel=1e-5)
    stable_rank = float((s**2).sum() / s[0] ** 2)
    assert result["layers"][-1]["stable_rank"] == pytest.approx(stable_rank, rel=1e-5)


@newest_tl_only
def test_cli_text_and_errors(capsys):
    assert main(["analyze", "", "--pos", "0"]) == 2
    assert "empty prompt" in capsys.readouterr().err
    assert main(["analyze", "The bridge", "--pos", "9"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["analyze", "The bridge", "--no-layers"]) == 0
    text = capsys.readouterr().out
    assert "detached Jacobian" in text and "per input token" in text and "per layer" not in text


@pytest.fixture(scope="module")
def marin(smollm2):
    return ll.run_with_linear_cache(smollm2, PROMPTS[0])


@newest_tl_only
def test_every_layer_and_component_reconstructs(smollm2, marin):
    hooks = [
        f"blocks.{l}.{h}"
        for l in range(smollm2.cfg.n_layers)
        for h in ("hook_resid_post", "hook_attn_out", "hook_mlp_out")
    ]
    marin.jacobians(hooks)  # one set of forward replay passes for all 90
    errors = {h: marin.reconstruction_error(h) for h in hooks}
    assert max(errors.values()) <= 1e-5, max(errors.items(), key=lambda kv: kv[1])


def test_contributions_sum(marin):
    y = marin.activation()
    assert torch.linalg.norm(
        marin.contributions().sum(0) + marin.bias_term() - y
    ) <= 1e-5 * torch.linalg.norm(y)
    assert len(marin.contributions(by="component")) == 2 + 2 * 30


@newest_tl_only
def test_one_token_cumulative_map_is_the_product_of_layer_maps(smollm2):
    lc = ll.run_with_linear_cache(smollm2, torch.tensor([[504]]))  # "The"
    assert lc.n_pos == 1
    prod = torch.eye(smollm2.cfg.d_model)
    for layer in range(smollm2.cfg.n_layers):
        prod = lc.layerwise_jacobian(layer)[0] @ prod
    cumulative = lc.layerwise_jacobian(smollm2.cfg.n_layers - 1, cumulative=True)[0]
    assert torch.linalg.norm(prod - cumulative) <= 1e-4 * torch.linalg.norm(cumulative)


def _same(a, b):
    return a.strip().lower() == b.strip().lower()


def test_singular_vectors_decode_as_the_paper_reports(marin):
    """Right vectors of each token's Jacobian point at that token (>= 5 of 7); the leading
    left vector of the all-positions matrix reads as the model's prediction (top 5)."""
    hits = [
        any(_same(t, tok) for t in marin.decode(input_pos=i, n_triplets=1)[0].input.tokens)
        for i, tok in enumerate(marin.str_tokens)
    ]
    assert sum(hits) >= 5, hits
    assert (
        marin.top_predictions(1)[0].token in marin.decode(n_triplets=1, n_tokens=5)[0].output.tokens
    )


@newest_tl_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_smollm2_half_precision_linearized_in_float32(dtype):
    """Coefficients recorded in half precision, the frozen map computed in float32: exact to
    float32, the model's own rounding reported apart, an unfrozen tanh refused, the matrix-free
    SVD converged against the dense one, the model bit for bit as it was. (Computing in half
    precision itself is checked on tiny models and on the GPU: on these CPUs a bfloat16
    Jacobian of SmolLM2 takes minutes.)"""
    model = ll.load_model(dtype=dtype)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    lc = ll.run_with_linear_cache(model, PROMPTS[0], dtype=torch.float32)
    assert lc.reconstruction_error() <= 1e-5 and 1e-4 < lc.model_rounding() <= 3e-2
    squash = ("blocks.3.hook_mlp_out", lambda v, hook: torch.tanh(v))
    with pytest.raises(ll.LinearizationError):
        ll.run_with_linear_cache(model, PROMPTS[0], fwd_hooks=[squash], dtype=torch.float32)
    mf = lc.svd_matrix_free(n_triplets=3)
    jac = lc.jacobian()
    s = torch.linalg.svdvals(jac.permute(1, 0, 2).reshape(jac.shape[1], -1).double())[:3]
    assert mf.converged and float(mf.residuals.max()) <= 1e-4
    assert float(((mf.S.double() - s).abs() / s).max()) <= 1e-3
    assert all(
        torch.equal(before[n], t) and t.dtype == before[n].dtype
        for n, t in model.state_dict().items()
    )


@newest_tl_only
def test_long_prompt_path_agrees_with_stored_patterns(smollm2):
    """At 320 tokens: every layer as queries and keys, verified in forward mode, and the frozen
    map's products (a VJP, a JVP, the carried J⁺x* against a forward-mode replay of the stored
    map) and one recomputed pattern equal the stored-pattern map's."""
    text = " ".join(["The bridge out of Marin is the most photographed bridge in the world."] * 24)
    tokens = smollm2.to_tokens(text)[:, :320]
    kept = ll.run_with_linear_cache(smollm2, tokens, progress=False, store_patterns=False)
    stored = ll.run_with_linear_cache(
        smollm2, tokens, progress=False, store_patterns=True, check=False
    )
    assert (
        len(kept.point.frozen_attention) == smollm2.cfg.n_layers
        and not stored.point.frozen_attention
    )
    assert kept.check() <= 1e-5
    out, gen = kept.output, torch.Generator().manual_seed(0)
    u = torch.randn(kept.activation().shape, generator=gen)
    v = torch.randn(kept.x.shape, generator=gen)
    assert rel(kept.point.vjp(u, out, pos=kept.pos), stored.point.vjp(u, out, pos=kept.pos)) <= 1e-5
    assert rel(kept.point.jvp(v, out), stored.point.jvp(v, out)) <= 1e-5
    assert rel(kept.point.directional(out), stored.point.directional(out)) <= 1e-5
    assert rel(kept.attention.pattern(7), stored.attention.pattern(7)) <= 1e-6
