"""Families beyond the tiny eight, each against the independent reference.

Attention computed inside the wrapped Hugging Face module (GPT-J, GPT-Neo, OPT, XGLM),
weight-free norms (OLMo 1, NanoChat), Bloom's activation, mixtures of experts (router
and expert gates frozen inside the module), selective state-space mixers and gated delta
rules (step sizes or decays, B/C or q/k, β, the output gate frozen inside the module; the
reference recomputes them with a sequential scan or recurrence of its own). Both sides compute float64 without Hugging Face's float32 casts
(``full_precision``), so float64 agreement is not cut off at float32 rounding. The reference (``lens_linear.reference.hf_frozen``)
runs the Hugging Face model itself with its coefficients detached by kind and imports no
lens_linear code; routers are made constant by detaching their outputs.
"""

import pytest
import torch
from conftest import LEG, hooks_left, not_applicable, rel, skip_leg

import lens_linear as ll
from lens_linear.models import wrap_bridge
from lens_linear.reference import full_precision, hf_frozen
from lens_linear.tiny import char_tokenizer

if LEG != "newest":
    skip_leg("architecture probes run in the newest TransformerLens' leg")
from lens_linear.coverage import tiny_hf  # noqa: E402

PROMPT = "Hello world"
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
DENSE = [
    "GPTJForCausalLM",
    "GPTNeoForCausalLM",
    "OPTForCausalLM",
    "XGLMForCausalLM",
    "OlmoForCausalLM",
    "BloomForCausalLM",
    "NanoChatForCausalLM",
    "FalconForCausalLM",
    "Gemma4ForCausalLM",  # norms bridged without hook_scale, a per-layer input gate
    "ModernBertDecoderForCausalLM",  # a GLU inside one projection, a prediction head
    "BitNetForCausalLM",  # RMS norms inside attention and MLP that the bridge does not wrap
]
MOE = [
    "MixtralForCausalLM",
    "OlmoeForCausalLM",
    "Qwen2MoeForCausalLM",
    "Qwen3MoeForCausalLM",
    "PhiMoEForCausalLM",
    "GraniteMoeForCausalLM",
    "DeepseekV3ForCausalLM",
    "Glm4MoeForCausalLM",
    "GptOssForCausalLM",  # a clamped SwiGLU computed inline, a router with bias, attention sinks
    "Llama4ForCausalLM",  # every expert on every router-scaled token in one batched product
    "AfmoeForCausalLM",  # attention output gate sigmoid(W x), computed inline
    "LagunaForCausalLM",  # attention output gate softplus(W x), computed inline
    "GraniteMoeHybridForCausalLM",  # a hybrid layer's moe and shared_mlp beside a scan
    "NemotronHForCausalLM",  # every layer a mixer: scan, non-gated experts, attention, MLP
    "DeepseekV4ForCausalLM",  # hyper-connections, compressed sparse attention, hash routing
    "JetMoeForCausalLM",  # attention experts; experts on tokens grouped by expert
]
STATE_SPACE = [
    "MambaForCausalLM",
    "Mamba2ForCausalLM",
    "FalconMambaForCausalLM",
    "JambaForCausalLM",
    "BambaForCausalLM",
    "FalconH1ForCausalLM",
    "Qwen3NextForCausalLM",
    "Qwen3_5ForCausalLM",
    "OlmoHybridForCausalLM",
    "RwkvForCausalLM",  # a WKV recurrence's exponential weights, receptance gates
    "RecurrentGemmaForCausalLM",  # blocks bridged whole: RG-LRU, norms, attention, gated MLP
    "Zamba2ForCausalLM",  # hybrid layers bridged whole, reading the embeddings a second time
]  # gated delta rules
FLOAT32_INSIDE = [
    "MptForCausalLM",
    "DeepseekV2ForCausalLM",
]  # HF casts float64 down to float32 inside
NO_FLOAT64 = {
    "XGLMForCausalLM"
}  # the Hugging Face model itself fails in float64 (a float32 mask fill)


def bridge(arch, dtype=torch.float32):
    return wrap_bridge(tiny_hf(arch, dtype=dtype), char_tokenizer(), f"tiny-{arch}", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("arch", DENSE + MOE + STATE_SPACE + FLOAT32_INSIDE)
def test_jacobian_matches_reference(arch, dtype):
    if dtype == torch.float64 and arch in NO_FLOAT64:
        not_applicable("the Hugging Face model does not run in float64")
    model, hf = bridge(arch, dtype), tiny_hf(arch, dtype=dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = model.to_tokens(PROMPT)[0]  # for hash routing (DeepSeek-V4)
    with full_precision():
        lc = ll.run_with_linear_cache(model, PROMPT, progress=False)
        ours, value = lc.jacobian(), lc.activation()
        jac = torch.autograd.functional.jacobian(
            lambda x: hf_frozen(hf, x, tokens=tokens)[-1], lc.x
        ).transpose(0, 1)
    with torch.no_grad():
        errors = (
            rel(hf_frozen(hf, lc.x, tokens=tokens)[-1], value),
            rel(jac, ours),
            lc.reconstruction_error(),
        )
    print(
        f"\n{arch} {dtype}: value {errors[0]:.1e}, jacobian {errors[1]:.1e}, reconstruction {errors[2]:.1e}"
    )
    assert max(errors) <= TOL[dtype], errors
    u = torch.randn(value.shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    _, plain = torch.autograd.functional.vjp(
        lambda x: hf_frozen(hf, x, frozen=False, tokens=tokens)[-1], lc.x, u
    )
    assert rel(plain, torch.einsum("o,pod->pd", u, jac)) > 1e-3  # the reference's detaches did act
    assert not hooks_left(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_gpt_oss_experts_with_both_clamps_biting(dtype):
    """gpt-oss's experts compute ``glu(min(gate, limit)) · (clamp(up, ±limit) + 1)`` inline.
    With a limit small enough that both clamps bite, the detached Jacobian equals the
    reference's (its own rule: ``glu`` and the clamp's slope ``clip(u) / u`` detached); the
    ``+ 1`` is a constant of the experts' projection bias, so the bias terms, split per bias,
    add up to the frozen map's constant and the map reconstructs the output."""
    model, hf = bridge("GptOssForCausalLM", dtype), tiny_hf("GptOssForCausalLM", dtype=dtype)
    inputs = []
    for m in [*model.original_model.modules(), *hf.modules()]:
        if hasattr(m, "_apply_gate"):
            m.limit = 0.05
    experts = next(m for m in hf.modules() if hasattr(m, "_apply_gate"))
    own = type(experts)._apply_gate
    vars(experts)["_apply_gate"] = lambda gate_up: inputs.append(gate_up) or own(experts, gate_up)
    with torch.no_grad():
        hf(model.to_tokens(PROMPT))
    del vars(experts)["_apply_gate"]
    gate_up = torch.cat(inputs)
    assert (gate_up[..., ::2] > 0.05).any() and (gate_up[..., 1::2].abs() > 0.05).any()
    assert (gate_up[..., 1::2].abs() < 0.05).any()
    with full_precision():
        lc = ll.run_with_linear_cache(model, PROMPT, progress=False)
        jac = torch.autograd.functional.jacobian(lambda x: hf_frozen(hf, x)[-1], lc.x).transpose(
            0, 1
        )
        parts = lc.bias_contributions()
        errors = rel(jac, lc.jacobian()), lc.reconstruction_error()
        constant = rel(sum(parts.values()), lc.bias_term())
        unexplained = float(parts["(other)"].norm() / lc.bias_term().norm())
    print(f"\ngpt-oss clamps {dtype}: jacobian {errors[0]:.1e}, reconstruction {errors[1]:.1e}")
    assert max(errors) <= TOL[dtype] and constant <= TOL[dtype] and unexplained <= TOL[dtype]
    experts_bias = [k for k in parts if k.endswith("gate_up_proj_bias")]
    assert experts_bias and all(float(parts[k].norm()) > 0 for k in experts_bias)


def test_gpt_oss_attention_sinks_on_the_long_prompt_path():
    """gpt-oss's attention sinks (one more logit per head in every row's softmax): its
    patterns are kept as queries and keys with the sink read off the first row, and that map
    equals the reference's."""
    model, hf = (
        bridge("GptOssForCausalLM", torch.float64),
        tiny_hf("GptOssForCausalLM", dtype=torch.float64),
    )
    with full_precision():
        kept = ll.run_with_linear_cache(model, PROMPT, progress=False, store_patterns=False)
        jac = torch.autograd.functional.jacobian(lambda x: hf_frozen(hf, x)[-1], kept.x).transpose(
            0, 1
        )
        err = rel(kept.jacobian(), jac)
    assert len(kept.point.frozen_attention) == model.cfg.n_layers
    assert all(a.sink is not None for a in kept.point.frozen_attention.values())
    assert err <= 1e-10, err


@pytest.mark.parametrize("arch", ["Gemma3ForCausalLM", "GptOssForCausalLM"])
def test_sliding_windows_shorter_than_the_prompt_on_the_long_prompt_path(arch):
    """A 4-token sliding window on an 11-token prompt: its layers' patterns are kept as queries
    and keys (the window read off the mask) and the map equals the reference's in float64."""
    hfs = [tiny_hf(arch, dtype=torch.float64) for _ in range(2)]
    for hf in hfs:
        hf.config.sliding_window = 4
        for m in hf.modules():
            if getattr(m, "sliding_window", None):
                m.sliding_window = 4
    model = wrap_bridge(hfs[0], char_tokenizer(), f"tiny-{arch}", torch.float64)
    with full_precision():
        kept = ll.run_with_linear_cache(model, PROMPT, progress=False, store_patterns=False)
        jac = torch.autograd.functional.jacobian(
            lambda x: hf_frozen(hfs[1], x)[-1], kept.x
        ).transpose(0, 1)
        err = rel(kept.jacobian(), jac)
    windows = [a.window for a in kept.point.frozen_attention.values()]
    print(f"\n{arch}: windows {windows}, Jacobian vs reference {err:.1e}")
    assert 4 in windows and len(windows) == model.cfg.n_layers
    assert err <= 1e-10, err


def _expert_choices(model, layer):
    """A list the top-k expert choices the experts of block ``layer`` receive get appended to."""
    block = model.blocks[layer].mlp.original_component
    experts = getattr(block.experts, "original_component", block.experts)
    seen = []
    return seen, experts.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))


@pytest.mark.parametrize("arch", MOE[:3])
def test_moe_freezing_keeps_the_output_and_replays_the_recorded_routing(arch):
    model = bridge(arch)
    tokens = model.to_tokens(PROMPT)
    with torch.no_grad():
        plain = model(tokens)
        with ll.detached(model):
            frozen = model(tokens)
    assert rel(frozen, plain) <= 1e-5
    lc = ll.run_with_linear_cache(model, PROMPT, progress=False)
    layer = lc.point.sites[[s.kind for s in lc.point.sites].index("moe")].layer
    seen, handle = _expert_choices(model, layer)
    try:
        with torch.no_grad():
            model(tokens)  # the recorded routing
            lc.point.replay(
                torch.randn_like(lc.x) * lc.x.std(), [lc.output]
            )  # another input, frozen routing
            model(model.to_tokens("Other words!"[: len(PROMPT)]))  # the same length, live routing
    finally:
        handle.remove()
    recorded, replayed, other = seen
    assert torch.equal(replayed, recorded)  # top-k expert choices as recorded
    assert not torch.equal(other, recorded)  # (they do depend on the input)
    assert not hooks_left(model)


@pytest.mark.parametrize("arch", ["MambaForCausalLM", "Mamba2ForCausalLM"])
def test_float64_models_compute_in_float64_throughout(arch):
    """Without the reference's context: Hugging Face casts float64 down to float32 on these
    models' linear path (the scan; Mamba's float32 residual), so their frozen map would be
    linear only to float32 rounding and refused (3.4e-8 > 1e-10 measured without the rule);
    our runs keep float64, and the casts work again afterwards."""
    model = bridge(arch, torch.float64)
    lc = ll.run_with_linear_cache(model, PROMPT, progress=False)
    assert lc.reconstruction_error() <= 1e-10
    assert torch.ones(2, dtype=torch.float64).float().dtype == torch.float32
    assert torch._C._len_torch_function_stack() == 0 and not hooks_left(model)


def unhooked(hf, x):
    """The Hugging Face model's own forward from ``x`` at its first decoder layer (TL's
    ``blocks.0.hook_resid_pre``) to the final norm: nothing detached, nothing recomputed."""
    layers = next(
        m
        for m in hf.base_model.modules()
        if isinstance(m, torch.nn.ModuleList) and len(m) == hf.config.num_hidden_layers
    )

    def inject(module, args, kwargs):
        if args:
            return (x[None], *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": x[None]}

    handle = layers[0].register_forward_pre_hook(inject, with_kwargs=True)
    try:
        return hf.base_model(inputs_embeds=torch.zeros_like(x)[None], use_cache=False)[0][0]
    finally:
        handle.remove()


@pytest.mark.parametrize("arch", ["MixtralForCausalLM", "GPTJForCausalLM", "MambaForCausalLM"])
def test_the_ordinary_jacobian_is_the_unhooked_models(arch):
    """``detached=False`` runs the model's own code path (none of the contexts a frozen run
    needs: no eager experts, no softmax routed through ``hook_pattern``, Hugging Face's
    float32 casts kept): float64, against autograd over the Hugging Face model itself."""
    model, hf = bridge(arch, torch.float64), tiny_hf(arch, dtype=torch.float64)
    lc = ll.run_with_linear_cache(model, PROMPT, progress=False)
    ours = lc.jacobian(detached=False)
    theirs = torch.autograd.functional.jacobian(lambda x: unhooked(hf, x)[-1], lc.x)
    theirs = theirs.transpose(0, 1)
    print(f"\n{arch}: ordinary Jacobian vs the unhooked model {rel(ours, theirs):.1e}")
    assert rel(ours, theirs) <= 1e-12
    assert rel(ours, lc.jacobian()) > 1e-3  # and it is not the frozen map's


@pytest.mark.parametrize("arch", ["GPTJForCausalLM", "MixtralForCausalLM"])
def test_predicted_patching_freezes_sites_inside_the_wrapped_module(arch):
    """Softmax inside the wrapped attention (GPT-J) and expert gates (Mixtral) are frozen by
    module sites, which ``run_with_hooks`` cannot carry: the prediction runs them through our
    own forward, and equals patched runs through the frozen map (float64)."""
    from lens_linear.patching import activation_patching, predicted_patching, prompt_pairs

    model = bridge(arch, torch.float64)
    pairs = prompt_pairs(model, "Hello there, friend!", "Hello where, friend!", "a", "c")
    frozen = activation_patching(model, pairs, detached=True, progress=False)
    predicted = predicted_patching(model, pairs, detached=True, progress=False)
    assert rel(predicted.raw - predicted.corrupted, frozen.raw - frozen.corrupted) <= 1e-10


LONG_PROMPT = "Hello world, hello there friend"  # 32 tokens: compressor windows, indexer choices


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_deepseek_v4_with_clamps_biting_and_compressed_windows(dtype):
    """DeepSeek-V4 on a prompt long enough for compressed key windows (rate 4) and the
    indexer's top-k choices, with a limit small enough that every clamp of the experts' and
    the shared experts' SwiGLU bites: the detached Jacobian equals the reference's (its own
    rules: the clamps' slopes, every softmax and the hyper-connections' weights detached). The
    forward engine's replays of the last positions (the input zero before them: compressor
    windows cannot be cut) agree with the reverse engine's Jacobians of every block output."""
    arch = "DeepseekV4ForCausalLM"
    model, hf = bridge(arch, dtype), tiny_hf(arch, dtype=dtype)
    limits = [m for m in [*model.original_model.modules(), *hf.modules()] if hasattr(m, "limit")]
    assert len(limits) >= 8  # experts and shared experts of two layers, in both models
    for m in limits:
        m.limit = 0.05
    tokens = model.to_tokens(LONG_PROMPT)[0]
    with full_precision():
        lc = ll.run_with_linear_cache(model, LONG_PROMPT, progress=False)
        jac = torch.autograd.functional.jacobian(
            lambda x: hf_frozen(hf, x, tokens=tokens)[-1], lc.x
        ).transpose(0, 1)
        errors = rel(jac, lc.jacobian()), lc.reconstruction_error()
        forward = lc.jacobians(method="forward")
        fresh = ll.run_with_linear_cache(model, LONG_PROMPT, progress=False)  # nothing cached
        reverse = fresh.jacobians(method="reverse")
    engines = max(rel(forward[h], reverse[h]) for h in reverse)
    print(
        f"\nDeepSeek-V4 clamps {dtype}: jacobian {errors[0]:.1e}, reconstruction {errors[1]:.1e}, engines {engines:.1e}"
    )
    assert max(errors) <= TOL[dtype] and engines <= TOL[dtype]
    assert sorted(reverse) == ["blocks.0.hook_out", "blocks.1.hook_out"]
    # the clamps bit: the reference's own slopes are not all 1
    u = torch.randn(lc.activation().shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    for m in limits:
        m.limit = 10.0
    _, wide = torch.autograd.functional.vjp(lambda x: hf_frozen(hf, x, tokens=tokens)[-1], lc.x, u)
    assert rel(wide, torch.einsum("o,pod->pd", u, jac)) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("arch", ["RwkvForCausalLM", "JetMoeForCausalLM"])
def test_engines_agree_where_frozen_values_cannot_be_cut(arch, dtype):
    """RWKV's WKV recurrence is frozen one step at a time, JetMoE's routers choose over the
    flattened tokens: a replay of the last positions runs the whole prompt with the input zero
    before them, and the forward engine's Jacobians of every block output (batches of
    directions) equal the reverse engine's; the output's equals the reference's."""
    model, hf = bridge(arch, dtype), tiny_hf(arch, dtype=dtype)
    with full_precision():
        lc = ll.run_with_linear_cache(model, LONG_PROMPT, progress=False)
        forward = lc.jacobians(method="forward")
        fresh = ll.run_with_linear_cache(model, LONG_PROMPT, progress=False)  # nothing cached
        reverse = fresh.jacobians(method="reverse")
        jac = torch.autograd.functional.jacobian(lambda x: hf_frozen(hf, x)[-1], lc.x)
    errors = (
        max(rel(forward[h], reverse[h]) for h in reverse),
        rel(jac.transpose(0, 1), lc.jacobian()),
    )
    print(f"\n{arch} {dtype}: engines {errors[0]:.1e}, jacobian {errors[1]:.1e}")
    assert max(errors) <= TOL[dtype]


def zamba2_two_hybrid_layers(dtype):
    """Zamba2 with a Mamba layer and two hybrid layers (each concatenates the embeddings to
    its input before its transformer block, whose weights the layers share)."""
    import transformers

    from lens_linear._compat import set_attn_implementation
    from lens_linear.coverage import perturb_, tiny_config

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = tiny_config("Zamba2ForCausalLM")
        config.num_hidden_layers, config.hybrid_layer_ids = 3, [1, 2]
        config.layers_block_type = ["linear_attention", "hybrid", "hybrid"]
        set_attn_implementation(config, "eager")
        hf = transformers.Zamba2ForCausalLM(config)
    config.architectures = ["Zamba2ForCausalLM"]
    return perturb_(hf, seed=0).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_zamba2_reads_the_input_in_every_hybrid_layer(dtype):
    """Zamba2's hybrid layers read the embeddings a second time: that read is tied to the
    input ``x`` in every run, so both the detached and the ordinary Jacobian equal the
    reference's (which feeds ``x`` to both reads) with two hybrid layers."""
    hf = zamba2_two_hybrid_layers(dtype)
    model = wrap_bridge(zamba2_two_hybrid_layers(dtype), char_tokenizer(), "tiny-zamba2", dtype)
    with full_precision():
        lc = ll.run_with_linear_cache(model, PROMPT, progress=False)
        frozen = torch.autograd.functional.jacobian(lambda x: hf_frozen(hf, x)[-1], lc.x)
        plain = torch.autograd.functional.jacobian(
            lambda x: hf_frozen(hf, x, frozen=False)[-1], lc.x
        )
        errors = (
            rel(frozen.transpose(0, 1), lc.jacobian()),
            rel(plain.transpose(0, 1), lc.jacobian(detached=False)),
            lc.reconstruction_error(),
        )
    print(f"\nZamba2 two hybrid layers {dtype}: detached {errors[0]:.1e}, ordinary {errors[1]:.1e}")
    assert max(errors) <= TOL[dtype]
    assert not hooks_left(model)
