"""The Jacobian lens against independent computations: TransformerLens' ``JacobianLens.fit``
(plain, and under detach hooks written here), and brute-force autograd over the model's own
forward through TransformerLens hooks; checkpoints, resumption and a two-process fit."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import HOOKED, leg_specific, newest_tl_only, rel

import lens_linear as ll
from lens_linear.jacobian_lens import CompatibleJacobianLens, fit_jacobian_lens

HAS_TL_LENS = True
try:
    from transformer_lens.tools.analysis import JacobianLens
except ImportError:  # TransformerLens before 3.9
    HAS_TL_LENS = False
needs_tl_lens = leg_specific(not HAS_TL_LENS, "TransformerLens' JacobianLens (TL >= 3.9)")

PROMPTS = [
    "the quick brown fox jumps over the lazy dog",
    "abcdefghijklmnopqrstuvwxyz and more letters",
    "Hello there, friend! How are you today?",
]
SKIP = 4
sys.path.insert(0, str(Path(__file__).parent))
from distributed_fit import PROMPTS as RANK_PROMPTS  # noqa: E402


def brute_force(model, prompts, layer, skip=SKIP, hooks=()):
    """``mean_prompts (1/|V|) Σ_t ∂(Σ_t' h_last,t')/∂h_layer,t`` by ``autograd.functional.jacobian``
    of the model's own forward, the source injected and the target read by TransformerLens
    hooks (``hooks``: extra ones, e.g. detaching)."""
    last = model.cfg.n_layers - 1
    total = 0
    for prompt in prompts:
        tokens = model.to_tokens(prompt)
        with model.hooks(fwd_hooks=list(hooks)):  # the operating point the hooks make
            _, cache = model.run_with_cache(tokens)
        h = cache[f"blocks.{layer}.hook_resid_post"][0].detach()
        valid = list(range(skip, tokens.shape[-1] - 1))
        seen = {}

        def f(x):
            def put(value, hook):
                return x[None]

            def read(value, hook):
                seen["y"] = value

            model.run_with_hooks(
                tokens,
                fwd_hooks=[
                    (f"blocks.{layer}.hook_resid_post", put),
                    *hooks,
                    (f"blocks.{last}.hook_resid_post", read),
                ],
            )
            return seen["y"][0][valid].sum(0)  # Σ over valid targets t'

        jac = torch.autograd.functional.jacobian(f, h)  # [d_out, t, d_in]
        total = total + jac[:, valid].double().sum(1) / len(valid)
    return total / len(prompts)


def plain_detach_hooks():
    """Norm scales and patterns detached; an MLP's activation frozen, gated (detach its
    input) or not (value kept, gradient through the ratio ``post / pre``)."""
    pre = {}

    def detach(value, hook):
        return value.detach()

    def keep_pre(value, hook):
        pre[hook.name.rsplit(".", 2)[0]] = value

    def ratio(value, hook):
        p = pre[hook.name.rsplit(".", 2)[0]]
        return value.detach() + (p - p.detach()) * (value / p).detach()

    return {
        "scale": (lambda name: name.endswith("hook_scale"), detach),
        "pattern": (lambda name: name.endswith("attn.hook_pattern"), detach),
        "gate": (lambda name: name.endswith("mlp.hook_pre"), detach),
        "pre": (lambda name: name.endswith("mlp.hook_pre"), keep_pre),
        "ratio": (lambda name: name.endswith("mlp.hook_post"), ratio),
    }


def test_ordinary_lens_equals_brute_force_autograd():
    """Both backends where available, every source layer (TL's convention: all but the last)."""
    models = [ll.tiny_model("llama", n_layers=4), ll.tiny_model("gpt2", n_layers=4)]
    if HOOKED:
        models.append(ll.tiny_model("gpt2", backend="hooked", n_layers=4))
    for model in models:
        lens = fit_jacobian_lens(model, PROMPTS, skip_first_positions=SKIP, progress=False)
        assert lens.source_layers == [0, 1, 2] and lens.n_prompts == 3
        for layer in lens.source_layers:
            ref = brute_force(model, PROMPTS, layer)
            assert rel(lens.jacobians[layer], ref) <= 1e-5, (model.cfg.model_name, layer)
        assert lens.metadata["estimator"] == "jacobian_lens"


@needs_tl_lens
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3", "qwen3", "gpt_neox", "olmo2", "phi3"])
def test_ordinary_lens_equals_transformer_lens_fit(arch):
    model = ll.tiny_model(arch, n_layers=4)
    theirs = JacobianLens.fit(
        model, PROMPTS, corpus="t", skip_first_positions=SKIP, show_progress=False
    )
    ours = fit_jacobian_lens(model, PROMPTS, corpus="t", skip_first_positions=SKIP, progress=False)
    assert isinstance(ours, JacobianLens) and ours.n_prompts == theirs.n_prompts
    for layer in theirs.source_layers:
        assert rel(ours.jacobians[layer], theirs.jacobians[layer]) <= 1e-5, layer
    # the lens reads out through TransformerLens' own readout
    read = ours.readout(model, PROMPTS[0], top_k=3)
    assert set(read.lens_topk_indices) == {0, 1, 2, 3}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_detached_lens_equals_a_fit_under_plain_detach_hooks(arch):
    """The frozen-map lens against the fit of the same model with detach hooks written here:
    TransformerLens' own fit where it has one, brute-force autograd otherwise."""
    model = ll.tiny_model(arch, n_layers=4)
    hooks = plain_detach_hooks()
    keys = ["scale", "pattern", "gate"] if arch == "llama" else ["scale", "pattern", "pre", "ratio"]
    detach = [hooks[k] for k in keys]
    ours = fit_jacobian_lens(
        model, PROMPTS, detached=True, skip_first_positions=SKIP, progress=False
    )
    ordinary = fit_jacobian_lens(model, PROMPTS, skip_first_positions=SKIP, progress=False)
    assert ours.metadata["estimator"] == "detached_jacobian_lens"
    if HAS_TL_LENS:
        with model.hooks(fwd_hooks=detach):
            theirs = JacobianLens.fit(
                model, PROMPTS, corpus="t", skip_first_positions=SKIP, show_progress=False
            ).jacobians
    else:
        theirs = {layer: brute_force(model, PROMPTS, layer, hooks=detach) for layer in (0, 1, 2)}
    for layer in (0, 1, 2):
        assert rel(ours.jacobians[layer], theirs[layer]) <= 1e-5, layer
        assert rel(ordinary.jacobians[layer], theirs[layer]) > 1e-3  # a different lens


def test_detached_lens_of_a_mixture_of_experts_and_a_state_space_model():
    """Families whose coefficients TransformerLens' hook points cannot freeze (expert gates and
    routing inside the wrapped block, a selective scan): the per-prompt verification passes and
    the lens equals brute-force autograd with lens_linear's own freezing on (``detached``, the
    autograd view, against the fit's replay view)."""
    from test_architectures import bridge

    for arch in ["MixtralForCausalLM", "MambaForCausalLM"]:
        model = bridge(arch)
        lens = fit_jacobian_lens(
            model, PROMPTS[:2], detached=True, skip_first_positions=SKIP, progress=False
        )
        with ll.detached(model):
            ref = brute_force(model, PROMPTS[:2], 0)
        plain = brute_force(model, PROMPTS[:2], 0)
        assert rel(lens.jacobians[0], ref) <= 1e-5, arch
        assert rel(lens.jacobians[0], plain) > 1e-4, arch


def test_checkpoint_resumes_to_the_uninterrupted_fit(tmp_path):
    model = ll.tiny_model("llama", n_layers=3)
    whole = fit_jacobian_lens(model, PROMPTS, skip_first_positions=SKIP, progress=False)

    class Interrupted(list):
        def __getitem__(self, i):
            if i == 2:
                raise KeyboardInterrupt
            return super().__getitem__(i)

    path = tmp_path / "fit.pt"
    with pytest.raises(KeyboardInterrupt):
        fit_jacobian_lens(
            model, Interrupted(PROMPTS), skip_first_positions=SKIP, progress=False, checkpoint=path
        )
    saved = torch.load(path, weights_only=True)
    assert saved["n_done"] == 2 and saved["next_idx"] == 2
    resumed = fit_jacobian_lens(
        model, PROMPTS, skip_first_positions=SKIP, progress=False, checkpoint=path
    )
    for layer in whole.source_layers:
        assert torch.equal(resumed.jacobians[layer], whole.jacobians[layer])
    # the checkpoint loads as a lens (TransformerLens' class reads the same schema)
    loaded = (JacobianLens if HAS_TL_LENS else CompatibleJacobianLens).load(str(path))
    assert rel(loaded.jacobians[0], whole.jacobians[0]) <= 1e-6 and loaded.n_prompts == 3
    # other prompts, or other options, are refused rather than mixed in
    with pytest.raises(ValueError, match="other prompts"):
        fit_jacobian_lens(
            model, PROMPTS[::-1], skip_first_positions=SKIP, progress=False, checkpoint=path
        )
    with pytest.raises(ValueError, match="another fit"):
        fit_jacobian_lens(model, PROMPTS, skip_first_positions=3, progress=False, checkpoint=path)


def test_two_processes_fit_the_one_process_lens(tmp_path):
    """Two gloo ranks, each fitting every other prompt, all-reduce to the single-process lens."""
    model = ll.tiny_model("llama", n_layers=3)
    single = fit_jacobian_lens(model, RANK_PROMPTS, skip_first_positions=SKIP, progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "lens"
    script = Path(__file__).parent / "distributed_fit.py"
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script), str(out)],
            env={
                **os.environ,
                "RANK": str(r),
                "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),  # loopback
            },
        )
        for r in range(2)
    ]
    assert [p.wait(timeout=300) for p in ranks] == [0, 0]
    for r in range(2):
        got = torch.load(f"{out}.rank{r}", weights_only=True)
        assert got["n"] == len(RANK_PROMPTS)
        for layer in single.source_layers:
            assert rel(got["J"][layer], single.jacobians[layer]) <= 1e-6


def test_short_prompts_are_skipped_and_bad_options_refused():
    model = ll.tiny_model("llama", n_layers=3)
    with pytest.warns(UserWarning, match="skipped"):
        lens = fit_jacobian_lens(
            model, ["ab", PROMPTS[0]], skip_first_positions=SKIP, progress=False
        )
    assert lens.n_prompts == 1
    with pytest.raises(ValueError, match="too short"):
        with pytest.warns(UserWarning):
            fit_jacobian_lens(model, ["ab"], skip_first_positions=SKIP, progress=False)
    with pytest.raises(ValueError, match="below the last block"):
        fit_jacobian_lens(model, PROMPTS, source_layers=[2], progress=False)
    with pytest.raises(ValueError, match="skip_first_positions"):
        fit_jacobian_lens(model, PROMPTS, skip_first_positions=-1, progress=False)


def test_compatible_lens_saves_loads_merges_and_reads_out(tmp_path):
    """The class for HookedTransformer and TransformerLens before 3.9: its artifact format, merge by prompt count,
    and a readout equal to the model's own final norm and unembedding of ``J h``."""
    model = ll.tiny_model("gpt2", n_layers=3)
    a = fit_jacobian_lens(model, PROMPTS[:1], skip_first_positions=SKIP, progress=False)
    b = fit_jacobian_lens(model, PROMPTS[1:], skip_first_positions=SKIP, progress=False)
    both = fit_jacobian_lens(model, PROMPTS, skip_first_positions=SKIP, progress=False)
    lenses = [
        CompatibleJacobianLens(
            x.jacobians,
            n_prompts=x.n_prompts,
            d_model=64,
            metadata={k: v for k, v in x.metadata.items() if k != "n_prompts"},
        )
        for x in (a, b)
    ]
    merged = CompatibleJacobianLens.merge(lenses)
    assert merged.n_prompts == 3 and rel(merged.jacobians[1], both.jacobians[1]) <= 1e-6
    path = tmp_path / "lens.pt"
    merged.save(str(path), dtype=torch.float32)
    loaded = CompatibleJacobianLens.load(str(path))
    assert torch.equal(loaded.jacobians[0], merged.jacobians[0])
    read = loaded.readout(model, PROMPTS[0], top_k=4)
    tokens = model.to_tokens(PROMPTS[0])
    _, cache = model.run_with_cache(tokens)
    h = cache["blocks.1.hook_resid_post"][0].double()
    x = h @ loaded.jacobians[1].double().T
    ln = model.ln_final  # the model's own final LayerNorm, by hand
    xc = x - x.mean(-1, keepdim=True)
    normed = xc / (xc.pow(2).mean(-1, keepdim=True) + model.cfg.eps).sqrt()
    w, bias = (
        model.original_model.transformer.ln_f.weight,
        model.original_model.transformer.ln_f.bias,
    )
    logits = (normed * w.double() + bias.double()) @ model.original_model.lm_head.weight.double().T
    assert torch.equal(read.lens_topk_indices[1], logits.topk(4).indices)
    del ln


def test_an_inputs_own_transport_and_its_readout_decomposed():
    """``lcache.transport`` against brute-force autograd under the detach hooks written here;
    the readout's parts (components and input positions) against the model's own final norm
    and unembedding of the transported residual."""
    model = ll.tiny_model("gpt2", n_layers=4)
    prompt = PROMPTS[0]
    lc = ll.run_with_linear_cache(model, prompt, progress=False)
    hooks = plain_detach_hooks()
    detach = [hooks[k] for k in ["scale", "pattern", "pre", "ratio"]]
    own = lc.transport(1, skip_first_positions=SKIP)
    assert rel(own, brute_force(model, [prompt], 1, hooks=detach)) <= 1e-5
    corpus = fit_jacobian_lens(model, PROMPTS, skip_first_positions=SKIP, progress=False)
    token = 7
    h = lc.activations["blocks.1.hook_resid_post"][0, -1].double()
    with torch.no_grad():
        x = (corpus.jacobians[1].double() @ h).float()
        expected = float(model.unembed(model.ln_final(x[None, None]))[0, 0, token])
    parts = lc.lens_contributions(1, token, lens=corpus)
    heads = {f"L{k}H{h}" for k in (0, 1) for h in range(4)}
    biases = {"blocks.0.attn.b_O", "blocks.1.attn.b_O"}
    assert set(parts) == {"embed", "blocks.0.mlp", "blocks.1.mlp", "readout bias"} | heads | biases
    assert abs(sum(parts.values()) - expected) <= 1e-5 * max(1.0, abs(expected))
    by_position = lc.lens_contributions(1, token, lens=corpus, by="position")
    assert by_position.shape == (lc.n_pos + 1,)
    assert abs(float(by_position.sum()) - expected) <= 1e-5 * max(1.0, abs(expected))
    fraction = lc.transport_fraction(corpus, skip_first_positions=SKIP)
    assert set(fraction) == {0, 1, 2} and all(f < 1 for f in fraction.values())
    one = fit_jacobian_lens(
        model, [prompt], detached=True, skip_first_positions=SKIP, progress=False
    )
    assert lc.transport_fraction(one, skip_first_positions=SKIP)[1] >= 1 - 1e-10
    with pytest.raises(ValueError, match="below the last block"):
        lc.transport(-1)


@newest_tl_only
@needs_tl_lens
def test_smollm2_lens_equals_transformer_lens_fit(smollm2):
    """The default model: TransformerLens' fit and ours on one 24-token prompt, three source
    layers (the backward runs from layer 0 either way)."""
    prompt = "The bridge out of Marin is the most beautiful sight in the whole bay area, and"
    layers = [0, 14, 28]
    theirs = JacobianLens.fit(
        smollm2,
        [prompt],
        corpus="t",
        source_layers=layers,
        skip_first_positions=SKIP,
        max_seq_len=24,
        show_progress=False,
    )
    ours = fit_jacobian_lens(
        smollm2,
        [prompt],
        source_layers=layers,
        skip_first_positions=SKIP,
        max_seq_len=24,
        progress=False,
    )
    for layer in layers:
        assert rel(ours.jacobians[layer], theirs.jacobians[layer]) <= 1e-5, layer


def test_a_transport_through_a_map_that_is_not_linear_is_refused():
    """A user hook that squashes an MLP's output (a nonlinearity no freezing rule knows) makes
    the frozen map nonlinear: the transport's own check refuses it, naming the map."""
    model = ll.tiny_model("llama", n_layers=4)
    squash = ("blocks.1.hook_mlp_out", lambda v, hook: torch.tanh(30 * v) / 30)
    lc = ll.run_with_linear_cache(
        model, PROMPTS[0], fwd_hooks=[squash], check=False, progress=False
    )
    with pytest.raises(ll.LinearizationError, match="blocks.0.hook_resid_post"):
        lc.transport(0)
    assert (
        rel(
            lc.transport(2),
            brute_force(
                model,
                [PROMPTS[0]],
                2,
                skip=0,
                hooks=[squash, *[plain_detach_hooks()[k] for k in ("scale", "pattern", "gate")]],
            ),
        )
        <= 1e-5
    )
