"""Dataset statistics: sensitivity vs an independent brute force (autograd over
``lens_linear.reference``, or over hand-detached TransformerLens hook points), Hutchinson,
Welford (merge, resume, distributed)."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import PROMPT, cached_tiny, newest_tl_only, rel

import lens_linear as ll
from lens_linear.reference import hf_frozen
from lens_linear.stats import Welford, dataset_sensitivity, sensitivity
from lens_linear.tiny import tiny_hf_model

SHORT = "Hello there"
PROMPTS = ["Hello there", "abc", "The fox", "Hi", "jumps over", "ok then"]
MAX = 12


def unhooked(hf, x):
    """The Hugging Face model's own forward, ``x`` placed at its first decoder layer (TL's
    ``blocks.0.hook_resid_pre``), to the final norm: nothing detached, nothing recomputed, its
    own precision casts kept."""
    layers = next(
        m
        for m in hf.base_model.modules()
        if isinstance(m, torch.nn.ModuleList) and len(m) == hf.config.num_hidden_layers
    )

    def inject(module, args, kwargs):
        return (
            ((x[None], *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x[None]})
        )

    handle = layers[0].register_forward_pre_hook(inject, with_kwargs=True)
    try:
        return hf.base_model(inputs_embeds=torch.zeros_like(x)[None], use_cache=False)[0][0]
    finally:
        handle.remove()


def reference_sensitivity(arch, tokens, frozen=True, dtype=torch.float32):
    """``S[i, j] = ‖∂y_i/∂x_j‖²_F`` by brute-force autograd over the tiny model's Hugging Face
    twin run by itself: ``reference.hf_frozen`` (its coefficients detached by the reference's own
    hooks), or, ``frozen=False``, the unhooked model; the input from its own embeddings. Nothing
    of it is lens_linear's code."""
    hf = tiny_hf_model(arch, dtype=dtype)
    hf.set_attn_implementation("eager")  # as TransformerBridge runs it (softmax in float32)
    t = tokens[0]
    x = hf.get_input_embeddings()(t)
    if arch == "gpt2":  # learned positions: blocks.0.hook_resid_pre = wte + wpe
        x = x + hf.transformer.wpe(torch.arange(len(t)))
    fn = (lambda v: hf_frozen(hf, v)) if frozen else (lambda v: unhooked(hf, v))
    with torch.no_grad():
        assert rel(hf(t[None]).logits[0], hf.lm_head(fn(x))) <= 1e-6
    jac = torch.autograd.functional.jacobian(fn, x.detach(), vectorize=True)  # [pos, d, pos, d]
    return jac.double().pow(2).sum((1, 3))


def hook_point_sensitivity(model, tokens, hook="unembed.hook_in"):
    """The same brute force for a gated (Llama-style) model written on TransformerLens' hook
    points alone: every norm scale, attention pattern and gated MLP's ``hook_pre`` detached by
    a hand-written hook (each must fire), the input injected at ``blocks.0.hook_resid_pre``,
    the output read at ``hook`` (default: the final norm's output, the unembedding's input)."""
    names = [
        n
        for n in model.hook_dict
        if n.endswith(("hook_scale", "attn.hook_pattern"))
        or (n.endswith("mlp.hook_pre") and n + "_linear" in model.hook_dict)
    ]
    fired = set()

    def detach(value, hook):
        fired.add(hook.name)
        return value.detach()

    _, cache = model.run_with_cache(tokens, names_filter=["blocks.0.hook_resid_pre"])

    def fn(x):
        out = {}
        hooks = [("blocks.0.hook_resid_pre", lambda v, hook: x[None])]
        hooks += [(n, detach) for n in names]
        hooks += [(hook, lambda v, hook: out.setdefault("y", v))]
        with model.hooks(fwd_hooks=hooks):
            model(tokens)
        return out["y"][0]

    x0 = cache["blocks.0.hook_resid_pre"][0].detach()
    jac = torch.autograd.functional.jacobian(fn, x0, vectorize=True)
    assert len(fired) == len(names), sorted(set(names) - fired)
    return jac.double().pow(2).sum((1, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("plain", [False, True])
def test_exact_sensitivity_equals_an_independent_brute_force(plain, arch, dtype):
    """Measured: ≤ 1.5e-7 in float32, ≤ 4.4e-16 in float64 (llama and gpt2, both maps)."""
    model = cached_tiny("bridge", arch, dtype)
    tokens = model.to_tokens(SHORT)
    exact = sensitivity(model, tokens, detached=not plain).values
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert rel(exact, reference_sensitivity(arch, tokens, not plain, dtype)) <= tol
    assert float(exact.triu(1).abs().max()) == 0.0  # causal: nothing flows backwards


def test_the_two_references_agree():
    """The hook-point brute force (SmolLM2's reference) against the Hugging Face one, on the
    tiny Llama: measured 1.0e-7 in float32."""
    model = cached_tiny("bridge", "llama")
    tokens = model.to_tokens(SHORT)
    assert (
        rel(hook_point_sensitivity(model, tokens), reference_sensitivity("llama", tokens)) <= 1e-5
    )


def test_hutchinson_is_unbiased_and_the_constant_cotangent_shortcut_is_not_a_norm():
    model = cached_tiny("bridge", "gpt2")
    exact = sensitivity(model, PROMPT).values
    est = sensitivity(model, PROMPT, method="hutchinson", probes=64)
    causal = torch.ones_like(exact, dtype=torch.bool).tril()
    z = ((est.values - exact) / est.stderr.clamp_min(1e-30))[causal]
    assert float(z.abs().mean()) <= 3.0
    # one VJP with the constant cotangent 1/sqrt(d) per output position: ‖(1/√d)ᵀ J_ij‖², not ‖J_ij‖²_F
    lc = ll.run_with_linear_cache(model, PROMPT, check=False)
    d = model.cfg.d_model
    v = torch.full((d,), d**-0.5)
    shortcut = torch.stack(
        [
            torch.einsum("o,poi->pi", v, lc.jacobian(pos=i)).double().pow(2).sum(-1)
            for i in range(lc.n_pos)
        ]
    )
    assert rel(shortcut * d, exact) >= 0.1 and rel(shortcut, exact) >= 0.1


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rows_and_patterns_as_queries_and_keys_give_the_brute_force_values(arch, monkeypatch):
    """``positions`` computes only the rows asked for (the rest NaN, outside ``mask``), and a
    long prompt's path (patterns kept as queries and keys, cut to each prefix) gives the brute
    force's values; the spy proves that path ran."""
    from lens_linear.hooks import patterns

    model = cached_tiny("bridge", arch)
    full = reference_sensitivity(arch, model.to_tokens(PROMPT))
    n = full.shape[0]
    calls, attend = [], patterns.attend
    monkeypatch.setattr(patterns, "attend", lambda v, a: calls.append(a.q.shape[0]) or attend(v, a))
    rows = sensitivity(model, PROMPT, positions=[-1, 2], store_patterns=False, progress=True)
    assert calls and max(calls) == n and min(calls) == 3  # the prefixes of outputs 2 and n - 1
    assert rel(rows.values[[2, n - 1]], full[[2, n - 1]]) <= 1e-5
    others = [i for i in range(n) if i not in (2, n - 1)]
    assert bool(rows.values[others].isnan().all()) and int(rows.mask.sum()) == 2 * n
    est = sensitivity(
        model,
        PROMPT,
        positions=[-1],
        method="hutchinson",
        probes=64,
        store_patterns=False,
        max_memory=1,
    )  # one probe per backward pass: the estimate is the same in chunks
    z = (est.values[-1] - full[-1]) / est.stderr[-1].clamp_min(1e-30)
    assert float(z.abs().mean()) <= 3.0 and bool(est.stderr[0].isnan().all())
    with pytest.raises(IndexError, match="out of range"):  # the project's position error
        sensitivity(model, PROMPT, positions=[n])


def test_welford_equals_two_pass_and_merges_exactly():
    torch.manual_seed(0)
    samples = torch.randn(50, 4, 4, dtype=torch.float64) * 3 + 1
    masks = torch.rand(50, 4, 4) > 0.3
    acc = Welford((4, 4))
    for s, m in zip(samples, masks):
        acc.update(s, m)
    counts = masks.sum(0)
    mean = (samples * masks).sum(0) / counts
    var = (((samples - mean) ** 2) * masks).sum(0) / (counts - 1)
    assert torch.equal(acc.count, counts.double())
    assert rel(acc.mean, mean) <= 1e-12 and rel(acc.var, var) <= 1e-12
    a, b = Welford((4, 4)), Welford((4, 4))
    for k, (s, m) in enumerate(zip(samples, masks)):
        (a if k < 20 else b).update(s, m)
    merged = a.merge(b)
    assert rel(merged.mean, acc.mean) <= 1e-12 and rel(merged.var, acc.var) <= 1e-12


def test_batched_prompts_equal_one_prompt_at_a_time(tiny):
    """Right padding changes nothing: each prompt's block of a batch is its own sensitivity."""
    batch = sensitivity(tiny, PROMPTS[:4])
    assert batch.values.shape[0] == 4 and batch.lengths.tolist() == [
        len(tiny.to_tokens(p)[0]) for p in PROMPTS[:4]
    ]
    for k, p in enumerate(PROMPTS[:4]):
        n = int(batch.lengths[k])
        alone = sensitivity(tiny, p).values
        assert rel(batch.values[k, :n, :n], alone) <= 1e-5
        assert batch.mask[k].sum() == n * n
    est = sensitivity(tiny, PROMPTS[:4], method="hutchinson", probes=16)
    assert est.stderr.shape == batch.values.shape and torch.equal(est.mask, batch.mask)
    z = ((est.values - batch.values) / est.stderr.clamp_min(1e-30))[batch.mask]
    assert float(z.abs().mean()) <= 3.0  # the batched estimate is unbiased, padding apart


def test_dataset_sensitivity_resumes_without_losing_or_repeating(tmp_path, monkeypatch):
    model = cached_tiny("bridge", "gpt2")
    path = str(tmp_path / "run.pt")
    whole = dataset_sensitivity(
        model, PROMPTS, max_len=MAX, batch_size=2, checkpoint=path, progress=False
    )
    assert torch.load(path, weights_only=True)["done"] == len(PROMPTS)
    # a run killed in its second batch: its checkpoint holds the first batch; the rerun does the rest
    import lens_linear.stats as stats

    real, calls = stats.sensitivity, []

    def dies_in_batch_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    killed = str(tmp_path / "killed.pt")
    monkeypatch.setattr(stats, "sensitivity", dies_in_batch_two)
    with pytest.raises(KeyboardInterrupt):
        dataset_sensitivity(
            model, PROMPTS, max_len=MAX, batch_size=2, checkpoint=killed, progress=False
        )
    assert torch.load(killed, weights_only=True)["done"] == 2 and not os.path.exists(
        killed + ".tmp"
    )
    monkeypatch.setattr(stats, "sensitivity", real)
    resumed = dataset_sensitivity(
        model, PROMPTS, max_len=MAX, batch_size=2, checkpoint=killed, progress=False
    )
    assert torch.equal(resumed.count, whole.count)
    assert rel(resumed.mean, whole.mean) <= 1e-12 and rel(resumed.m2, whole.m2) <= 1e-12
    lengths = [model.to_tokens(p).shape[-1] for p in PROMPTS]
    assert float(whole.count[0, 0]) == 6 and float(whole.count[MAX - 1, MAX - 1]) == sum(
        n >= MAX for n in lengths
    )
    short = min(lengths)  # an entry only the longer prompts have: padding is not counted as zeros
    assert float(whole.count[short, short]) == sum(n > short for n in lengths)
    # Welford over batches = a two-pass mean and variance over every prompt's own sensitivity
    k = short - 1  # an entry every prompt has
    column = torch.cat(
        [
            sensitivity(model, PROMPTS[b : b + 2], max_len=MAX).values[:, k, 0]
            for b in range(0, 6, 2)
        ]
    )
    assert (
        rel(whole.mean[k, 0], column.mean()) <= 1e-6 and rel(whole.var[k, 0], column.var()) <= 1e-6
    )
    with pytest.raises(ValueError, match="belongs to another run"):
        dataset_sensitivity(model, PROMPTS[:2], max_len=MAX, checkpoint=killed, progress=False)


def test_bad_input_gets_clear_errors():
    model = cached_tiny("bridge", "gpt2")
    with pytest.raises(ValueError, match="data set is empty"):
        dataset_sensitivity(model, [], progress=False)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        dataset_sensitivity(model, PROMPTS, max_len=model.cfg.n_ctx + 1, progress=False)
    with pytest.raises(ValueError, match="more than the model.s context of 64; pass max_len"):
        sensitivity(model, "word " * (model.cfg.n_ctx + 5))
    with pytest.raises(ValueError, match="probes must be at least 1"):
        sensitivity(model, SHORT, method="hutchinson", probes=0)
    with pytest.raises(ValueError, match="method must be"):
        sensitivity(model, SHORT, method="fast")


@newest_tl_only
def test_smollm2_exact_sensitivity_equals_brute_force(smollm2):
    """SmolLM2 has no Hugging Face twin here (it is loaded from GGUF): the reference is the
    brute force written on TransformerLens' hook points with hand-placed detaches."""
    tokens = smollm2.to_tokens("The bridge out of")
    assert rel(sensitivity(smollm2, tokens).values, hook_point_sensitivity(smollm2, tokens)) <= 1e-5


WORKER = """
import os, sys, torch, torch.distributed as dist
sys.path.insert(0, {root!r})
from lens_linear.stats import Welford
dist.init_process_group("gloo", init_method="file://" + {store!r}, rank=int(sys.argv[1]), world_size=2)
torch.manual_seed(0)
samples = torch.randn(40, 3, 3, dtype=torch.float64)
acc = Welford((3, 3))
for s in samples[int(sys.argv[1])::2]:
    acc.update(s)
acc.all_reduce()
if dist.get_rank() == 0:
    torch.save(acc.state_dict(), {out!r})
dist.destroy_process_group()
"""


def test_two_process_gloo_run_equals_one_process(tmp_path):
    script = tmp_path / "worker.py"
    out = str(tmp_path / "state.pt")
    script.write_text(
        WORKER.format(
            root=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            store=str(tmp_path / "store"),
            out=out,
        )
    )
    procs = [subprocess.Popen([sys.executable, str(script), str(rank)]) for rank in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    torch.manual_seed(0)
    samples = torch.randn(40, 3, 3, dtype=torch.float64)
    one = Welford((3, 3))
    for s in samples:
        one.update(s)
    two = Welford.from_state_dict(torch.load(out))
    assert torch.equal(two.count, one.count)
    assert rel(two.mean, one.mean) <= 1e-6 and rel(two.var, one.var) <= 1e-6


def principal_angle(a, b):
    """Largest principal angle between the column spaces of a and b (radians)."""
    qa, qb = torch.linalg.qr(a.double()).Q, torch.linalg.qr(b.double()).Q
    return float(torch.arccos(torch.linalg.svdvals(qa.T @ qb).min().clamp(max=1.0)))


@pytest.mark.parametrize("position", ["all", 3])
def test_matrix_free_svd_matches_the_full_svd(tiny, position):
    """Every architecture: J v comes from a backward through the backward, which needs every
    op on the frozen map's path to have a derivative of its derivative."""
    lc = ll.run_with_linear_cache(tiny, PROMPT, progress=False)
    jac = lc.jacobian()  # [pos, d_out, d_in]
    full = jac.permute(1, 0, 2).reshape(jac.shape[1], -1) if position == "all" else jac[position]
    u, s, vh = torch.linalg.svd(full.double())
    mf = lc.svd_matrix_free(input_pos=position, n_triplets=3)
    assert mf.converged and float(mf.residuals.max()) <= 1e-4
    assert rel(mf.S, s[:3]) <= 1e-4
    assert principal_angle(mf.U, u[:, :3]) <= 1e-2 and principal_angle(mf.V, vh[:3].T) <= 1e-2
    mU, mS, mV = (
        t.double() for t in mf
    )  # its residuals, measured from its own products, against the full Jacobian's
    direct = (
        (full.double() @ mV - mU * mS).norm(dim=0) ** 2
        + (full.double().T @ mU - mV * mS).norm(dim=0) ** 2
    ).sqrt()
    assert (direct / mS - mf.residuals.double()).abs().max() <= 1e-5
    one_at_a_time = lc.svd_matrix_free(
        input_pos=position, n_triplets=3, chunk=1
    )  # the default for long prompts
    assert rel(one_at_a_time.S, mf.S) <= 1e-5 and one_at_a_time.products == mf.products
    with pytest.raises(ValueError, match="n_triplets=0 must be between 1"):
        lc.svd_matrix_free(n_triplets=0)
    for bad in [dict(block=None), dict(block=0), dict(chunk=0)]:
        with pytest.raises(ValueError, match="must be an integer of at least 1"):
            lc.svd_matrix_free(**bad)


@newest_tl_only
def test_smollm2_matrix_free_svd(smollm2):
    text = " ".join(["The bridge out of Marin is the longest in the region"] * 4)
    lc = ll.run_with_linear_cache(smollm2, smollm2.to_tokens(text)[:, :32], check=False)
    jac = lc.jacobian()
    u, s, vh = torch.linalg.svd(
        jac.permute(1, 0, 2).reshape(jac.shape[1], -1).double(), full_matrices=False
    )
    mf = lc.svd_matrix_free(n_triplets=3)
    assert mf.converged and rel(mf.S, s[:3]) <= 1e-3
    assert principal_angle(mf.U, u[:, :3]) <= 1e-2 and principal_angle(mf.V, vh[:3].T) <= 1e-2
    assert mf.products <= 150  # the full Jacobian takes 576 products (one per output row)


def spectrum_matrix(singular_values, d_out=120, width=400):
    gen = torch.Generator().manual_seed(1)
    u = torch.linalg.qr(
        torch.randn(d_out, len(singular_values), generator=gen, dtype=torch.float64)
    ).Q
    v = torch.linalg.qr(
        torch.randn(width, len(singular_values), generator=gen, dtype=torch.float64)
    ).Q
    return u @ torch.diag(torch.tensor(singular_values, dtype=torch.float64)) @ v.T


def test_block_lanczos_finds_a_repeated_singular_value_that_one_vector_misses():
    """σ = 10, 5, 5, 4.9, ...: the top-3 subspace is well defined, but Krylov spaces of one
    start vector hold only one direction of the double value 5. One vector at a time then
    returns 4.9, a true singular value with a tiny residual, as σ₃: wrong, and silently so.
    A block of k vectors gets it right; hence the default block = k."""
    from lens_linear.matfree import golub_kahan_lanczos

    values = [10.0, 5.0, 5.0, 4.9] + torch.linspace(4.0, 0.1, 30).tolist()
    a = spectrum_matrix(values)
    u_ref, s_ref, vh_ref = torch.linalg.svd(a)
    run = lambda block: golub_kahan_lanczos(
        lambda v: a @ v,
        lambda u: a.T @ u,
        *a.shape,
        k=3,
        block=block,
        tol=1e-10,
        max_iter=100,
        dtype=torch.float64,
    )
    u, s, v, residuals, steps, products = run(3)
    assert rel(s, s_ref[:3]) <= 1e-10 and products < 2 * a.shape[0]
    assert (
        principal_angle(u, u_ref[:, :3]) <= 1e-6 and principal_angle(v, vh_ref[:3].T) <= 1e-6
    )  # arccos: ~1e-8 floor
    direct = ((a @ v - u * s).norm(dim=0) ** 2 + (a.T @ u - v * s).norm(dim=0) ** 2).sqrt() / s
    assert (
        direct.max() <= 1e-9 and (residuals - direct).abs().max() <= 1e-12
    )  # measured from the stored products
    _, s_one, _, _, _, _ = run(1)
    assert abs(float(s_one[2]) - 4.9) <= 1e-8  # the trap, measured


@newest_tl_only
def test_smollm2_float64_reconstructs_to_1e_10():
    model = ll.load_model(dtype=torch.float64)
    lc = ll.run_with_linear_cache(model, "The bridge out of Marin is the")
    assert lc.reconstruction_error() <= 1e-10
