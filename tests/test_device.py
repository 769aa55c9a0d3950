"""Device and dtype: every tensor the library creates follows the model, half precision is
verified in float32, and the model comes back bit for bit.

On a CPU machine the public API runs on a CPU model while torch's default device is
``meta``: a tensor created without a device lands on ``meta`` and fails loudly, the bug a
CUDA user would hit. With ``LENS_LINEAR_TEST_DEVICE=cuda`` (``make gpu-check``) the same
calls run on the GPU and are compared with the CPU's numbers.
"""

import contextlib
import os

import pytest
import torch
from conftest import HOOKED, PROMPT, cached_tiny, rel, tiny_pairs

import lens_linear as ll
from lens_linear.circuits import circuit_faithfulness, edge_attribution
from lens_linear.hooks.contexts import computing_in
from lens_linear.patching import activation_patching, predicted_patching, prompt_pairs, steer
from lens_linear.stats import dataset_sensitivity, sensitivity
from lens_linear.tiny import tiny_model

DEVICE = os.environ.get("LENS_LINEAR_TEST_DEVICE", "cpu")
ARCHS = [("bridge", a) for a in ("llama", "gpt2", "gemma3")] + (
    [("hooked", "llama")] if HOOKED else []
)


@contextlib.contextmanager
def strict_device(model):
    """On CPU, make any device-less tensor a meta tensor (the model and its tensors stay on CPU).
    TransformerLens' own ``to_tokens`` creates tensors without a device too (its bug, not
    ours: ``torch.set_default_device("meta"); model.to_tokens("hi")`` fails), so it runs on CPU."""
    if DEVICE != "cpu":
        yield
        return
    real = model.to_tokens

    def to_tokens(*args, **kwargs):
        with torch.device("cpu"):
            return real(*args, **kwargs)

    model.to_tokens = to_tokens
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)
        del model.to_tokens


def public_calls(model, tmp_path):
    """Every public computation once; returns the numbers to compare across devices."""
    out = {}
    lc = ll.run_with_linear_cache(model, model.to_tokens(PROMPT), progress=False)
    out["jacobian"] = lc.jacobian()
    out["ordinary"] = lc.jacobian(detached=False)
    out["bias"] = lc.bias_term()
    out["forward"] = lc.jacobians(
        ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"], method="forward"
    )["blocks.1.hook_resid_post"]
    out["layerwise"] = lc.layerwise_jacobian(1)
    out["svd"] = lc.svd(n_triplets=3).S
    out["matfree"] = lc.svd_matrix_free(n_triplets=2).S
    out["decode"] = lc.decode(n_triplets=1)[0].value
    out["stable_rank"] = lc.stable_rank()
    out["components"] = lc.contributions(by="component")["bias"]
    out["attention"] = lc.attention_jacobian(1, 5, 2, include_norm=True).AB
    out["qk"] = lc.attention.qk_term(1, 5, 2)
    out["copying"] = lc.attention.copying_score(lc.attention_jacobian(1, 5, 2))
    out["induction"] = ll.induction_heads(model, seq_len=8, n_top_heads=1).scores
    pairs = tiny_pairs(model)
    for sweep in ("resid_pre", "head"):
        out[f"patch {sweep}"] = activation_patching(model, pairs, sweep, progress=False).raw
        out[f"frozen {sweep}"] = activation_patching(
            model, pairs, sweep, detached=True, progress=False
        ).raw
        out[f"predicted {sweep}"] = predicted_patching(model, pairs, sweep).raw
    edges = edge_attribution(model, pairs, progress=False)
    out["edges"] = edges.scores
    out["frozen edges"] = edge_attribution(model, pairs, detached=True, progress=False).scores
    if model.cfg.model_name != "tiny-gemma3":  # a norm after the head sum: refused
        kept = edges.top_edges(20)
        recovered = circuit_faithfulness(model, pairs, kept).recovered
        out["faithfulness"] = torch.tensor(recovered, device="cpu")
    out["steer"] = steer(
        model, "Hello", "Hi there", layer=1, lam=0.5, max_new_tokens=2
    ).first_logits
    out["sensitivity"] = sensitivity(model, ["Hello there", "abc"]).values
    out["hutchinson"] = sensitivity(model, "Hello", method="hutchinson", probes=4).values
    acc = dataset_sensitivity(
        model,
        ["ab", "abc", "abcd"],
        max_len=6,
        batch_size=2,
        checkpoint=str(tmp_path / "c.pt"),
        progress=False,
    )
    out["dataset"] = acc.mean
    try:
        from lens_linear import render  # the report's data: figures from the cache's own numbers
    except ImportError:  # a GPU machine without plotly/circuitsvis: the figures are checked on CPU
        return out
    lc.jacobians(sum(render.layer_hooks(model).values(), []))
    out["figure"] = torch.tensor(render.stable_rank_figure(lc).data[0].y, device="cpu")
    return out


@pytest.mark.parametrize("case", ARCHS, ids=[f"{b}-{a}" for b, a in ARCHS])
def test_public_api_creates_no_tensor_off_the_model_device(case, tmp_path):
    model = tiny_model(case[1], backend=case[0]).to(DEVICE)
    with strict_device(model):
        got = public_calls(model, tmp_path)
    for name, value in got.items():
        if isinstance(value, torch.Tensor):
            assert value.device.type in (DEVICE, "cpu"), name
    if DEVICE != "cpu":  # the same numbers as on the CPU
        (tmp_path / "cpu").mkdir()
        ref = public_calls(cached_tiny(*case), tmp_path / "cpu")
        off = {}
        for name, value in got.items():  # relative to the scale, absolute for rounding-level values
            a, b = torch.as_tensor(value).cpu().double(), torch.as_tensor(ref[name]).double()
            if float((a - b).norm()) > 1e-3 * float(b.norm()) + 1e-5:
                off[name] = float((a - b).norm() / b.norm().clamp_min(1e-12))
        assert not off, off


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_is_verified_in_float32(dtype):
    """A real nonlinearity that nothing freezes is refused in every dtype, although half
    precision's own rounding is as large as its effect."""
    model = tiny_model("llama", dtype=dtype).to(DEVICE)
    lc = ll.run_with_linear_cache(model, PROMPT, progress=False)
    assert lc.reconstruction_error() <= 2e-2
    squash = (
        "blocks.1.hook_mlp_out",
        lambda v, hook: torch.tanh(100 * v) / 100,
    )  # same scale, nonlinear
    lenient = ll.run_with_linear_cache(
        model, PROMPT, fwd_hooks=[squash], check=False, progress=False
    )
    assert (
        lenient.reconstruction_error() <= 2e-2
    )  # half precision's tolerance alone would let it through
    with pytest.raises(ll.LinearizationError, match=r"float32.*blocks\.1"):
        ll.run_with_linear_cache(model, PROMPT, fwd_hooks=[squash], progress=False)
    with pytest.raises(ll.LinearizationError):  # and float32 refuses it as well
        ll.run_with_linear_cache(model.float(), PROMPT, fwd_hooks=[squash], progress=False)
    model.to(dtype)
    dense = lc.jacobian().float()
    mf = lc.svd_matrix_free(n_triplets=3)  # products in float32
    s = torch.linalg.svdvals(dense.permute(1, 0, 2).reshape(dense.shape[1], -1).double())[:3]
    assert mf.converged and mf.S.dtype == torch.float32
    # float32 products against the half-precision dense Jacobian: measured 7.7e-5 (bf16), 3.9e-5 (fp16)
    assert rel(mf.S.cpu(), s.cpu()) <= 1e-3
    fm = lc.attention_jacobian(1, 5, 2)  # eigenvalues upcast: no half-precision kernel needed
    lam = torch.linalg.eigvals(
        model.W_E.double() @ (fm.A.double() @ fm.B.double()).T @ model.W_U.double()
    )
    assert lc.attention.copying_score(fm) == pytest.approx(
        float((lam.sum() / lam.abs().sum()).real), abs=1e-6
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_a_half_model_linearized_in_float32(dtype):
    """dtype=float32: coefficients recorded in half precision, the frozen map computed in
    float32: it reconstructs its own output exactly to float32 (≤ 1e-5), the model untouched.
    An independent reference (the same weights in float32, coefficients computed in float32)
    agrees to the coefficients' own half-precision rounding, within one ``eps`` of the dtype:
    measured 1.2e-3 (bf16, eps 7.8e-3) and 1.0e-4 (fp16, eps 9.8e-4) on a CPU."""
    from lens_linear.reference import hf_frozen
    from lens_linear.tiny import tiny_hf_model

    model = tiny_model("llama", dtype=dtype).to(DEVICE)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    lc = ll.run_with_linear_cache(model, PROMPT, dtype=torch.float32, progress=False)
    assert lc.jacobian().dtype == torch.float32 and lc.reconstruction_error() <= 1e-5
    assert 1e-5 < lc.model_rounding() <= 2e-2  # the model's own rounding, reported apart
    assert lc.reconstruction_error("blocks.0.hook_resid_post") <= 1e-5
    mf = lc.svd_matrix_free(n_triplets=2)
    assert mf.converged and float(mf.residuals.max()) <= 1e-4
    assert all(
        torch.equal(before[n], t) and t.dtype == dtype for n, t in model.state_dict().items()
    )
    # independent: the same half-precision weights in float32, frozen at coefficients it computes in
    # float32; ours are the model's own, rounded to half precision: they differ by that rounding
    hf = tiny_hf_model("llama").to(DEVICE)
    with torch.no_grad():
        for p, q in zip(hf.parameters(), model.parameters()):
            p.copy_(q.float())
    ref = torch.autograd.functional.jacobian(lambda x: hf_frozen(hf, x)[lc.pos], lc.x)
    assert rel(ref.transpose(0, 1), lc.jacobian()) <= torch.finfo(dtype).eps


def test_float32_computation_restores_the_model_bit_for_bit():
    model = tiny_model("llama", dtype=torch.bfloat16)
    before = {n: (t.data_ptr(), t.clone()) for n, t in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="inside"):
        with computing_in(model, torch.float32):
            assert all(p.dtype == torch.float32 for p in model.parameters())
            raise RuntimeError("boom inside")
    after = model.state_dict()
    assert model.cfg.dtype == torch.bfloat16
    for name, (ptr, value) in before.items():
        assert (
            after[name].data_ptr() == ptr
            and after[name].dtype == value.dtype
            and torch.equal(after[name], value)
        )


def accelerate_state(model):
    """Every module's accelerate hook and instance ``forward``, by object identity."""
    return {
        n: (id(vars(m).get("forward")), id(getattr(m, "_hf_hook", None)))
        for n, m in model.named_modules()
    }


@pytest.mark.parametrize("offload", ["cpu", "disk"])
def test_offloaded_models_give_the_plain_numbers_and_keep_their_hooks(offload, tmp_path):
    import accelerate

    plain, model = tiny_model("llama"), tiny_model("llama")
    if offload == "cpu":
        accelerate.cpu_offload(model.original_model, execution_device="cpu")
    else:
        accelerate.disk_offload(model.original_model, str(tmp_path), execution_device="cpu")
    state = accelerate_state(model)
    assert any(p.device.type == "meta" for p in model.parameters())  # really offloaded
    tokens = plain.to_tokens(PROMPT)
    ours, ref = (ll.run_with_linear_cache(m, tokens, progress=False) for m in (model, plain))
    assert rel(ours.jacobian(), ref.jacobian()) <= 1e-5 and ours.reconstruction_error() <= 1e-5
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert all(rel(ours.jacobians(hooks)[h], ref.jacobians(hooks)[h]) <= 1e-5 for h in hooks)
    assert rel(ours.svd_matrix_free(n_triplets=2).S, ref.svd_matrix_free(n_triplets=2).S) <= 1e-5
    pairs = [
        prompt_pairs(m, "Hello there, friend!", "Hello where, friend!", "a", "c")
        for m in (model, plain)
    ]
    assert (
        rel(
            activation_patching(model, pairs[0], progress=False).raw,
            activation_patching(plain, pairs[1], progress=False).raw,
        )
        <= 1e-5
    )
    assert (
        rel(
            steer(model, "Hello", "Hi there", layer=1, max_new_tokens=1).first_logits,
            steer(plain, "Hello", "Hi there", layer=1, max_new_tokens=1).first_logits,
        )
        <= 1e-5
    )

    def explode(value, hook):
        raise RuntimeError("boom inside")

    with pytest.raises(RuntimeError, match="boom inside"):
        ll.run_with_linear_cache(
            model, tokens, fwd_hooks=[("blocks.1.hook_resid_pre", explode)], progress=False
        )
    assert accelerate_state(model) == state
    assert all(
        p.device.type == "meta" for p in model.original_model.model.norm.parameters()
    )  # offloaded again


def test_offloaded_biases_are_refused_where_they_would_be_zeroed(monkeypatch):
    """An offloaded bias (on ``meta``, reloaded by accelerate before each use) cannot be zeroed."""
    import lens_linear.hooks.contexts as contexts

    model = tiny_model("gpt2")
    real = contexts.bias_tensors(model)
    name = next(iter(real))
    monkeypatch.setattr(
        contexts,
        "bias_tensors",
        lambda m: {**real, name: torch.empty(real[name].shape, device="meta")},
    )
    with pytest.raises(ll.LinearizationError, match="offloaded by accelerate"):
        with contexts.biases_zeroed(model):
            pass
