"""What has no freezing rule ends in a clear LinearizationError naming where, never in a wrong result.

Found by probing TransformerLens' bridge with tiny random models (``lens_linear.coverage``):
a mixture of experts whose experts compute their gate inline in a form the rule does not
know, a mixture of attention experts (JetMoE), each rule removed, and a user's own
nonlinearity inside an MoE block or a state-space mixer.
"""

import pytest
import torch
from conftest import LEG, hooks_left, skip_leg

import lens_linear as ll
from lens_linear.models import wrap_bridge
from lens_linear.tiny import char_tokenizer

if LEG != "newest":
    skip_leg("architecture probes run in the newest TransformerLens' leg")
from lens_linear.coverage import tiny_hf  # noqa: E402

TRAPS = {
    "HrmTextForCausalLM": (r"no single stack of blocks", None),  # two block stacks, in cycles
}


def bridge(arch):
    return wrap_bridge(tiny_hf(arch), char_tokenizer(), f"tiny-{arch}", torch.float32)


def without_sites(monkeypatch, drop):
    """The sites ``drop(site)`` names left out of every recording: their rule removed."""
    from lens_linear.hooks import operating_point, sites

    original = sites.find_sites
    monkeypatch.setattr(
        operating_point,
        "find_sites",
        lambda *a, **k: [s for s in original(*a, **k) if not drop(s)],
    )


@pytest.mark.parametrize("arch", sorted(TRAPS))
def test_trap_ends_in_linearization_error(arch):
    message, layer = TRAPS[arch]
    model = bridge(arch)
    with pytest.raises(ll.LinearizationError, match=message) as info:
        ll.run_with_linear_cache(model, "Hello world", progress=False)
    assert info.value.layer == layer
    assert not hooks_left(model)


def test_gpt_oss_without_its_rule_or_with_another_gate_is_refused(monkeypatch):
    """gpt-oss's inline clamped SwiGLU: its rule removed, the experts are refused (no activation
    module); an ``_apply_gate`` of another form (tanh in place of the sigmoid) is refused by the
    recording's check of the rule's output against the module's own, naming the layer."""
    from lens_linear.hooks.rules import moe

    model = bridge("GptOssForCausalLM")
    with monkeypatch.context() as patch:
        patch.setattr(moe, "clamped_swiglu", lambda experts: None)
        with pytest.raises(ll.LinearizationError, match=r"experts\.act_fn") as info:
            ll.run_with_linear_cache(model, "Hello world", progress=False)
    assert info.value.layer == 0
    experts = [m for m in model.original_model.modules() if hasattr(m, "_apply_gate")]
    for m in experts:
        gate_up = type(m)._apply_gate
        vars(m)["_apply_gate"] = lambda x, m=m, f=gate_up: (
            f(m, x) * (1 + 0.1 * torch.tanh(x[..., ::2]))
        )
    try:
        with pytest.raises(ll.LinearizationError, match=r"not the clamped SwiGLU") as info:
            ll.run_with_linear_cache(model, "Hello world", progress=False)
    finally:
        for m in experts:
            del vars(m)["_apply_gate"]
    assert info.value.layer == 0
    assert not hooks_left(model)
    assert (
        ll.run_with_linear_cache(model, "Hello world", progress=False).reconstruction_error()
        <= 1e-5
    )


@pytest.mark.parametrize("rule", ["norms", "per-layer gate", "another norm"])
def test_gemma4_without_its_rules_is_refused(rule, monkeypatch):
    """Gemma 4's norms, bridged without ``hook_scale``, and its per-layer input gate each need
    their rule: either removed, linearity breaks and the model is refused; a norm module of
    another form than ``x · (mean(x²) + ε)^-½ · g`` is refused by the recording's check."""
    from lens_linear.hooks import sites

    model = bridge("Gemma4ForCausalLM")
    if rule == "norms":
        monkeypatch.setattr(sites, "unscaled_rms_norm", lambda model, name, names: False)
    elif rule == "per-layer gate":
        without_sites(monkeypatch, lambda s: s.kind == "act")
    else:
        norm = model.blocks[1].original_component.pre_feedforward_layernorm.original_component
        own = type(norm).forward
        vars(norm)["forward"] = lambda x: own(norm, x) + 0.1 * x.mean(-1, keepdim=True)
    try:
        with pytest.raises(ll.LinearizationError, match=r"blocks\.[01]\b|blocks\.1\.ln2") as info:
            ll.run_with_linear_cache(model, "Hello world", progress=False)
    finally:
        if rule == "another norm":
            del vars(norm)["forward"]
    if rule == "another norm":
        assert "not an RMS norm" in str(info.value) and info.value.layer == 1
    assert not hooks_left(model)


@pytest.mark.parametrize(
    "arch, rule",
    [
        ("BitNetForCausalLM", "rmsmodule"),
        ("AfmoeForCausalLM", "gate"),
        ("LagunaForCausalLM", "gate"),
    ],
)
def test_module_norms_and_attention_output_gates_are_needed(arch, rule, monkeypatch):
    """BitNet's sub-norms (RMS norms the bridge does not wrap) and AFMoE's and Laguna's inline
    attention output gates: without their sites, linearity breaks and the model is refused."""
    without_sites(monkeypatch, lambda s: s.kind == rule and (rule != "gate" or ".attn." in s.name))
    model = bridge(arch)
    with pytest.raises(ll.LinearizationError, match=r"blocks\.[01]"):
        ll.run_with_linear_cache(model, "Hello world", progress=False)
    assert not hooks_left(model)


@pytest.mark.parametrize("kind, layer", [("moe", 1), ("softmax", 2), ("act", 3)])
def test_nemotron_h_mixers_need_their_rules(kind, layer, monkeypatch):
    """NemotronH's bridge wraps every layer as a mixer: without the rule for what a mixer
    computes (non-gated experts, an attention's softmax, a plain MLP) linearity breaks at that
    layer and the model is refused."""
    from lens_linear.hooks import sites

    original = sites.mixer_kind
    monkeypatch.setattr(sites, "mixer_kind", lambda m: None if original(m) == kind else original(m))
    model = bridge("NemotronHForCausalLM")
    with pytest.raises(ll.LinearizationError, match=rf"breaks at blocks\.{layer}") as info:
        ll.run_with_linear_cache(model, "Hello world", progress=False)
    assert info.value.layer == layer
    assert not hooks_left(model)


def test_nemotron_h_experts_rule_checks_for_a_gate(monkeypatch):
    """Non-gated experts ``act(up x)`` have their activation's ratio frozen; taken for gated
    ones (``act`` a constant), the experts' output would be a constant: the map stays affine
    and reconstructs the output, but adds a constant no bias explains, and is refused."""
    from lens_linear.hooks.rules import moe

    monkeypatch.setattr(moe, "gated_experts", lambda experts: True)
    model = bridge("NemotronHForCausalLM")
    with pytest.raises(ll.LinearizationError, match="a constant to unembed.hook_in that no bias"):
        ll.run_with_linear_cache(model, "Hello world", progress=False)
    assert not hooks_left(model)


def test_nemotron_h_attention_without_a_softmax_is_refused():
    """An attention bridged as a mixer run by a fused kernel (SDPA, switched on after the
    bridge booted it eager) computes no softmax to freeze: refused, naming the layer and the
    fix."""
    model = bridge("NemotronHForCausalLM")
    model.original_model.set_attn_implementation("sdpa")  # the bridge boots it eager
    with pytest.raises(ll.LinearizationError, match="attn_implementation='eager'") as info:
        ll.run_with_linear_cache(model, "Hello world", progress=False)
    assert info.value.layer == 2
    assert not hooks_left(model)


@pytest.mark.parametrize("rule", ["softmax", "hyper", "clamp", "experts' clamped SwiGLU"])
def test_deepseek_v4_without_each_rule_is_refused(rule, monkeypatch):
    """DeepSeek-V4 (32 tokens: compressor windows and indexer choices; a limit at which every
    clamp bites): without the freezing rule for its attention's softmaxes and choices, its
    hyper-connections' weights, its shared experts' clamps or its experts' clamped SwiGLU,
    the model is refused, never linearized wrongly."""
    from lens_linear.hooks.rules import moe

    if rule == "experts' clamped SwiGLU":
        monkeypatch.setattr(moe, "clamped_swiglu", lambda experts: None)
    else:  # (the indexer's norms matter only through the choices the softmax rule freezes)
        without_sites(
            monkeypatch,
            lambda s: s.kind == rule or (rule == "softmax" and ".indexer." in s.name),
        )
    model = bridge("DeepseekV4ForCausalLM")
    for m in model.original_model.modules():
        if hasattr(m, "limit"):
            m.limit = 0.05
    with pytest.raises(
        ll.LinearizationError, match=r"does not reconstruct.*breaks at blocks\.[01]"
    ):
        ll.run_with_linear_cache(model, "Hello world, hello there friend", progress=False)
    assert not hooks_left(model)


@pytest.mark.parametrize("rule", ["wkv", "channel"])
def test_rwkv_without_its_rules_is_refused(rule, monkeypatch):
    """RWKV's time mixing (a WKV recurrence) and channel mixing: without their freezing rules,
    linearity breaks in the first block and the model is refused naming the component."""
    without_sites(monkeypatch, lambda s: s.kind == rule)
    model = bridge("RwkvForCausalLM")
    mixer = {"wkv": "time_mix", "channel": "channel_mix"}[rule]
    with pytest.raises(ll.LinearizationError, match=rf"blocks\.0's .*{mixer}") as info:
        ll.run_with_linear_cache(model, "Hello world", progress=False)
    assert info.value.layer == 0
    assert not hooks_left(model)


@pytest.mark.parametrize("kind", ["rglru", "actgate", "softmax", "rmsmodule"])
def test_recurrent_gemma_without_each_module_rule_is_refused(kind, monkeypatch):
    """Recurrent Gemma's blocks are bridged whole: without the rule for its RG-LRU gates, its
    gated branches, its attention's softmax or its norms, the model is refused."""
    without_sites(monkeypatch, lambda s: s.kind == kind)
    model = bridge("RecurrentGemmaForCausalLM")
    with pytest.raises(ll.LinearizationError, match=r"blocks\.[01]|no bias explains"):
        ll.run_with_linear_cache(model, "Hello world", progress=False)
    assert not hooks_left(model)


@pytest.mark.parametrize("rule", ["choice", "moe"])
def test_jetmoe_without_its_router_or_expert_rule_is_refused(rule, monkeypatch):
    """JetMoE's routers (its MLP's and its mixture of attention heads') choose over tokens
    grouped by expert; without the rule freezing their choices, or the one freezing its
    experts' gates in token order, the model is refused."""
    without_sites(monkeypatch, lambda s: s.kind == rule)
    model = bridge("JetMoeForCausalLM")
    with pytest.raises(ll.LinearizationError, match=r"blocks\.[01]"):
        ll.run_with_linear_cache(model, "Hello world", progress=False)
    assert not hooks_left(model)


def test_zamba2_without_the_embeddings_tie_is_refused(monkeypatch):
    """Zamba2's hybrid layers read the embeddings a second time; untied from the input, that
    read is a constant of the map that no bias explains: refused."""
    import contextlib

    from lens_linear.hooks import run

    monkeypatch.setattr(run, "embeddings_tied", lambda *a: contextlib.nullcontext())
    model = bridge("Zamba2ForCausalLM")
    with pytest.raises(ll.LinearizationError, match="no bias explains"):
        ll.run_with_linear_cache(model, "Hello world", progress=False)
    assert not hooks_left(model)
    # the check's bias gradients see that constant too: the same size as the bias-free replay's
    lc = ll.run_with_linear_cache(model, "Hello world", progress=False, check=False)
    stray = lc.point.unexplained_constant(lc.output)
    y = lc.activations[lc.output][0]
    estimate = lc.point.check_sites(y).unexplained
    size = float(stray.norm() / y.norm())
    assert size > 1e-5 and estimate is not None and size / 10 < estimate < size * 10


def test_modernbert_decoder_rules_check_their_forms():
    """ModernBERT-decoder's GLU inside one projection (``act(a) · b`` from ``[a, b]``) and its
    prediction head's LayerNorm are frozen only where their form is what the rule assumes: an
    MLP computing ``act(b) · a`` instead, or a head norm of another form, is refused by name."""
    model = bridge("ModernBertDecoderForCausalLM")
    mlp = model.blocks[1].mlp.original_component
    vars(mlp)["forward"] = lambda h: mlp.Wo(
        mlp.act(mlp.Wi(h).chunk(2, -1)[1]) * mlp.Wi(h).chunk(2, -1)[0]
    )
    try:
        with pytest.raises(ll.LinearizationError, match=r"is not act\(") as info:
            ll.run_with_linear_cache(model, "Hello world", progress=False)
        assert info.value.layer == 1
    finally:
        del vars(mlp)["forward"]
    norm = model.prediction_head.original_component.norm
    vars(norm)["forward"] = lambda x: torch.nn.functional.layer_norm(x, x.shape[-1:]) * 1.5
    try:
        with pytest.raises(ll.LinearizationError, match=r"not a LayerNorm"):
            ll.run_with_linear_cache(model, "Hello world", progress=False)
    finally:
        del vars(norm)["forward"]
    assert not hooks_left(model)
    assert (
        ll.run_with_linear_cache(model, "Hello world", progress=False).reconstruction_error()
        <= 1e-5
    )


@pytest.mark.parametrize(
    "arch, hook",
    [
        ("MixtralForCausalLM", "blocks.1.mlp.hook_out"),
        ("MambaForCausalLM", "blocks.1.mixer.hook_out"),
    ],
    ids=["experts", "scan"],
)
def test_nonlinearity_inside_an_expert_block_or_mixer_is_refused_naming_its_layer(arch, hook):
    model = bridge(arch)
    squash = (hook, lambda v, hook: torch.tanh(3 * v))
    with pytest.raises(ll.LinearizationError, match=r"blocks\.1\b") as info:
        ll.run_with_linear_cache(model, "Hello world", fwd_hooks=[squash], progress=False)
    assert info.value.layer == 1
    assert not hooks_left(model)


def test_an_error_inside_a_state_space_mixer_leaves_no_freezing_mode_behind():
    model = bridge("MambaForCausalLM")

    def fail(value, hook):
        raise RuntimeError("user hook failed")

    with pytest.raises(Exception, match="user hook failed"):
        ll.run_with_linear_cache(
            model,
            "Hello world",
            fwd_hooks=[("blocks.0.mixer.x_proj.hook_out", fail)],
            progress=False,
        )
    assert torch._C._len_torch_function_stack() == 0  # the mode entered inside the mixer was left
    assert not hooks_left(model)
    lc = ll.run_with_linear_cache(model, "Hello world", progress=False)  # and the model still works
    assert lc.reconstruction_error() <= 1e-5


def test_a_state_space_mixer_run_by_a_fused_kernel_is_refused(monkeypatch):
    """A kernel computes the gate without a PyTorch ``silu`` call the rule can see (here: the
    Hugging Face scan replaced by one that gates with ``z · sigmoid(z)``): refused by name."""
    from transformers.models.mamba import modeling_mamba

    scan = modeling_mamba.mamba_selective_scan

    def fused(hidden_states, dt, A, B, C, D=None, z=None, **kwargs):
        result, gate = scan(hidden_states, dt, A, B, C, D=D, z=None, **kwargs), z * torch.sigmoid(z)
        return (result[0] * gate, *result[1:]) if isinstance(result, tuple) else result * gate

    model = bridge("MambaForCausalLM")
    monkeypatch.setattr(modeling_mamba, "mamba_selective_scan", fused)
    with pytest.raises(ll.LinearizationError, match=r"blocks\.0\.mixer .*fused kernel") as info:
        ll.run_with_linear_cache(model, "Hello world", progress=False)
    assert info.value.layer == 0
    assert torch._C._len_torch_function_stack() == 0 and not hooks_left(model)
