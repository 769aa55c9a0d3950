"""The public API's conventions, each against an independent computation: TransformerLens
shorthand and name filters, parts, loading, metrics, steering's equation 16, TransformerLens'
own attribution patching, the command line's --dtype and --backend."""

import json
import math

import pytest
import torch
from conftest import HOOKED, PROMPT, cached_tiny, hooks_left, leg_specific, rel, tiny_pairs
from test_patching import naive
from test_stats import hook_point_sensitivity

import lens_linear as ll
from lens_linear.hooks import find_sites
from lens_linear.patching import activation_patching, predicted_patching, prompt_pairs, steer
from lens_linear.reference import llama
from lens_linear.stats import dataset_sensitivity, sensitivity
from lens_linear.tiny import char_tokenizer, tiny_hf_model


def test_names_filter_as_run_with_cache():
    model = cached_tiny("bridge", "gpt2")
    for names_filter in [
        "blocks.0.hook_resid_post",
        ["blocks.0.hook_resid_post"],
        lambda n: n.endswith("resid_post"),
    ]:
        lc = ll.run_with_linear_cache(model, PROMPT, names_filter=names_filter, progress=False)
        assert (
            "blocks.0.hook_resid_post" in lc.activations
            and "blocks.0.hook_mlp_out" not in lc.activations
        )
        _, cache = model.run_with_cache(lc.tokens)
        assert torch.equal(
            lc.activations["blocks.0.hook_resid_post"], cache["blocks.0.hook_resid_post"]
        )
        assert (
            lc.activation("blocks.0.hook_mlp_out").numel() == 64
        )  # outside the filter: recorded on demand


def test_shorthand_keys_and_callable_hook_filters():
    model = cached_tiny("bridge", "llama")
    lc = ll.run_with_linear_cache(model, PROMPT, progress=False)
    assert lc["resid_post", -1] is lc.jacobian("blocks.1.hook_resid_post")
    frozen_scale = lc.jacobian(("scale", 1, "ln2"))  # a frozen coefficient: no path from the input
    assert frozen_scale.shape[1] == 1 and not frozen_scale.any()
    with pytest.raises(KeyError, match="unknown hook name"):
        lc.jacobian(("resid_psot", 0))
    # a callable name filter in fwd_hooks selects the same hook points a list of names does
    double = lambda v, hook: 2 * v  # noqa: E731
    by_name = ll.run_with_linear_cache(
        model, PROMPT, fwd_hooks=[("blocks.0.hook_attn_out", double)], progress=False
    )
    by_filter = ll.run_with_linear_cache(
        model, PROMPT, fwd_hooks=[(lambda n: n == "blocks.0.hook_attn_out", double)], progress=False
    )
    with model.hooks(fwd_hooks=[("blocks.0.hook_attn_out", double)]):
        logits = model(lc.tokens)
    assert (
        torch.equal(by_filter.logits, by_name.logits) and rel(by_filter.logits, logits[0]) <= 1e-6
    )
    assert rel(by_filter.jacobian(), by_name.jacobian()) <= 1e-6 and not hooks_left(model)


def test_parts_freeze_only_what_they_name():
    model = cached_tiny("bridge", "gpt2")
    kinds = lambda parts: {s.kind for s in find_sites(model, parts)}  # noqa: E731
    assert (
        kinds(("norm",)) == {"norm"}
        and kinds(("attn",)) == {"attn"}
        and kinds(("mlp",)) == {"ratio"}
    )
    names = {n for n, _ in ll.detach_hooks(model, parts=("attn",))}
    assert names and all(n.endswith("hook_pattern") for n in names)
    partial = ll.run_with_linear_cache(
        model, PROMPT, parts=("norm", "attn"), check=False, progress=False
    )
    assert partial.reconstruction_error() > 1e-3  # GELU left live: not a linear map
    with pytest.raises(ll.LinearizationError):
        ll.run_with_linear_cache(model, PROMPT, parts=("norm", "attn"), progress=False)


def test_load_model_honours_device_and_dtype(tmp_path):
    hf = tiny_hf_model("llama")
    hf.save_pretrained(tmp_path)
    char_tokenizer().save_pretrained(tmp_path)
    model = ll.load_model(str(tmp_path), backend="bridge", device="cpu", dtype=torch.float64)
    params = list(model.parameters())
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in params)
    tokens = model.to_tokens("Hello")
    assert (
        rel(model(tokens), hf.double()(tokens).logits) <= 1e-6
    )  # both rotate in float32 (HF rotary)
    with pytest.raises(ValueError, match="without device"):
        ll.load_model(str(tmp_path), device="cpu", device_map="auto")
    if not HOOKED:  # TransformerLens 4 places layers with accelerate
        placed = ll.load_model(str(tmp_path), backend="bridge", device_map={"": "cpu"})
        assert all(p.device.type == "cpu" for p in placed.parameters())
        lc = ll.run_with_linear_cache(placed, tokens, progress=False)
        assert (
            rel(
                lc.jacobian(),
                ll.run_with_linear_cache(model.float(), tokens, progress=False).jacobian(),
            )
            <= 1e-5
        )


def test_sensitivity_at_an_intermediate_hook():
    model = cached_tiny("bridge", "llama")
    hook = "blocks.0.hook_resid_post"
    ours = sensitivity(model, "Hello there", hook=hook).values
    reference = hook_point_sensitivity(model, model.to_tokens("Hello there"), hook)
    assert rel(ours, reference) <= 1e-5
    assert rel(ours, sensitivity(model, "Hello there").values) > 1e-2  # not the output's


def test_hutchinson_dataset_statistics_of_the_ordinary_jacobian():
    model = cached_tiny("bridge", "gpt2")
    prompts = ["Hello there", "abc", "The fox"]
    exact = dataset_sensitivity(model, prompts, detached=False, max_len=8, progress=False)
    est = dataset_sensitivity(
        model, prompts, detached=False, method="hutchinson", probes=64, max_len=8, progress=False
    )
    assert torch.equal(est.count, exact.count)
    seen = exact.count > 0
    assert (
        rel(est.mean[seen], exact.mean[seen]) <= 0.15
    )  # 64 probes: ~1/sqrt(32) per entry, averaged
    frozen = dataset_sensitivity(model, prompts, max_len=8, progress=False)
    assert rel(frozen.mean[seen], exact.mean[seen]) > 1e-2


def test_metric_is_a_function_of_the_final_logits_and_a_zero_gap_is_refused():
    model = cached_tiny("bridge", "llama")
    pairs = tiny_pairs(model)
    logprob = lambda logits: logits[:, -1].log_softmax(-1)[torch.arange(2), pairs.answers].mean()

    def loop_metric(logits):  # the same metric on full logits, as TransformerLens passes them
        final = logits[torch.arange(2), pairs.last]
        return float(final.log_softmax(-1)[torch.arange(2), pairs.answers].mean())

    ours = activation_patching(model, pairs, "resid_pre", metric=logprob, progress=False)
    assert (ours.raw - naive(model, pairs, "resid_pre", metric=loop_metric)).abs().max() <= 1e-5
    attr = predicted_patching(model, pairs, "resid_pre", metric=logprob, detached=False)
    assert attr.corrupted == pytest.approx(ours.corrupted, abs=1e-6)
    same = prompt_pairs(model, "Hello", "Hello", "a", "c")
    with pytest.raises(ValueError, match="no gap"):
        activation_patching(model, same, progress=False)
    with pytest.raises(ValueError, match="no gap"):
        predicted_patching(model, same)


@pytest.mark.parametrize("concept,prompt", [("The Golden Gate", "Hi"), ("Hi", "Hello there")])
def test_steering_is_equation_16(concept, prompt):
    """lam · f(x_new) + (1 − lam) · J⁺_concept x_new at the last block, with J⁺ from a hand-written
    frozen forward (autograd, no lens_linear code), positions matched from the end."""
    model, hf, lam = cached_tiny("bridge", "llama"), tiny_hf_model("llama"), 0.3
    c_tokens, p_tokens = model.to_tokens(concept), model.to_tokens(prompt)
    _, c_cache = model.run_with_cache(c_tokens)
    x_c = c_cache["blocks.0.hook_resid_pre"][0]
    J = torch.autograd.functional.jacobian(
        lambda x: llama(hf, x, final_norm=False), x_c
    )  # [c, d, c, d]
    _, p_cache = model.run_with_cache(p_tokens)
    x_p = p_cache["blocks.0.hook_resid_pre"][0]
    c, m = x_c.shape[0], x_p.shape[0]
    k = min(c, m)
    term = torch.stack(
        [sum(J[c - k + j, :, c - k + i] @ x_p[m - k + i] for i in range(j + 1)) for j in range(k)]
    )
    mixed = p_cache["blocks.1.hook_resid_post"].clone()
    mixed[0, -k:] = lam * mixed[0, -k:] + (1 - lam) * term

    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", lambda v, hook: mixed)]):
        expected = model(p_tokens)[0, -1]
    steered = steer(model, concept, prompt, layer=1, lam=lam, max_new_tokens=1)
    assert rel(steered.first_logits, expected) <= 1e-5
    assert (
        rel(steered.first_logits, model(p_tokens)[0, -1]) > 1e-3
    )  # lam < 1 changes the prediction


@leg_specific(
    HOOKED, "transformer_lens.tools.analysis.attribution_patching ships with TransformerLens 4"
)
def test_ordinary_prediction_is_transformer_lens_attribution_patching():
    from transformer_lens.tools.analysis.attribution_patching import Node, attribution_patch

    model = cached_tiny("bridge", "gpt2")
    pairs = prompt_pairs(model, "Hello there, friend!", "Hello where, friend!", "a", "c")
    theirs = attribution_patch(
        model,
        pairs.clean,
        pairs.corrupted,
        lambda logits: logits[0, -1, pairs.answers[0]] - logits[0, -1, pairs.wrong[0]],
    ).node_scores
    mlp = predicted_patching(model, pairs, "mlp_out", detached=False)
    heads = predicted_patching(model, pairs, "head_by_pos", detached=False)
    n = pairs.clean.shape[1]
    compared = 0
    for layer in range(model.cfg.n_layers):
        for p in range(1, n):  # position 0 is BOS, a special token our patches leave alone
            assert mlp.raw[layer, p] - mlp.corrupted == pytest.approx(
                theirs[Node("mlp_out", p, layer)], abs=1e-5
            )
            for h in range(model.cfg.n_heads):
                ours = heads.raw[layer, p, h] - heads.corrupted
                assert ours == pytest.approx(theirs[Node("attn_head_out", p, layer, h)], abs=1e-5)
                compared += 1
    assert compared == model.cfg.n_layers * (n - 1) * model.cfg.n_heads


def test_cli_dtype_and_backend(tmp_path, capsys):
    from lens_linear.cli import main

    tiny_hf_model("gpt2").save_pretrained(tmp_path)
    char_tokenizer().save_pretrained(tmp_path)
    args = ["analyze", "Hello there", "--model", str(tmp_path), "--no-layers", "--json"]
    assert main([*args, "--dtype", "float64", "--backend", "bridge"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dtype"] == "float64" and result["backend"] == "TransformerBridge"
    assert (
        result["reconstruction_error"]["detached"]
        <= 1e-10
        < result["reconstruction_error"]["ordinary"]
    )
    assert main([*args, "--dtype", "float65"]) == 2
    assert "unknown dtype 'float65'" in capsys.readouterr().err
    code, err = main([*args, "--backend", "hooked"]), capsys.readouterr().err
    if HOOKED:  # a saved folder loads as a bridge only, and the refusal says so
        assert code == 2 and "a local model loads as a TransformerBridge" in err
    else:
        assert code == 2 and "removed (TL 4.0)" in err
    assert math.isfinite(result["bias_term_norm"])


def test_ordinary_reconstruction_is_one_jvp_equal_to_the_full_jacobians():
    """Without forming the ordinary Jacobian, ``reconstruction(detached=False)`` is ``J x* + c``
    from one product; checked against forward-mode autograd over TransformerLens' own forward
    (``run_with_hooks`` with the input substituted at ``hook_resid_pre``), and against the matrix."""
    model = cached_tiny("bridge", "llama")
    lc = ll.run_with_linear_cache(model, PROMPT, progress=False)
    cheap = lc.reconstruction(detached=False)
    assert not lc.is_computed(detached=False)
    tokens = lc.tokens

    def plain(x):
        out = {}
        model.run_with_hooks(
            tokens,
            fwd_hooks=[
                ("blocks.0.hook_resid_pre", lambda v, hook: x[None]),
                (lc.output, lambda v, hook: out.setdefault("y", v)),
            ],
        )
        return out["y"][0, lc.pos]

    _, jx = torch.autograd.functional.jvp(plain, lc.x.detach(), lc.x.detach())
    assert rel(cheap - lc.bias_term(), jx) <= 1e-5
    full = torch.einsum("pod,pd->o", lc.jacobian(detached=False), lc.x) + lc.bias_term()
    assert rel(cheap, full) <= 1e-5 and lc.reconstruction_error(detached=False) >= 1e-2
