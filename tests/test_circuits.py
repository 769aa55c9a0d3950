"""Edge attribution against independent computations: path patching written with
TransformerLens hooks through the corrupted run's recorded coefficients (frozen map),
autograd through hand-written per-reader hooks (attribution patching, EAP-IG), and
TransformerLens' own ``attribution_patch``."""

import contextlib
import random

import pytest
import torch
from conftest import HOOKED, cached_tiny, leg_specific, rel, tiny_pairs

from lens_linear.circuits import (
    EdgeAttribution,
    Node,
    circuit_faithfulness,
    edge_attribution,
    grow_circuit,
)
from lens_linear.patching import activation_patching, predicted_patching, prompt_pairs
from lens_linear.reference import full_precision


def tl_has_edges():
    try:
        from transformer_lens.tools.analysis.attribution_patching import faithfulness  # noqa: F401
    except ImportError:
        return False
    return True


# TransformerLens' edge sweep and faithfulness exist from 4.3 on (3.9 has node attribution only)
with_tl_edges = leg_specific(not tl_has_edges(), "TransformerLens < 4.3 has no edge attribution")


def one_pair(model):
    return prompt_pairs(model, "Hello there, friend!", "Hello where, friend!", "a", "c")


def metric_of(pairs):
    a, b = int(pairs.answers[0]), int(pairs.wrong[0])
    return lambda logits: (logits[:, -1, a] - logits[:, -1, b]).mean()


def recorded_coefficients(model, tokens):
    """Hooks that put the run of ``tokens``'s norm scales, patterns and MLP gates back (a
    gated MLP's pre-activation; a plain one's activation as the ratio ``post / pre``), for any
    batch of copies: the frozen map, written on TransformerLens' hook points."""
    names = [
        n
        for n in model.hook_dict
        if n.endswith(("hook_scale", "attn.hook_pattern", "mlp.hook_pre", "mlp.hook_post"))
    ]
    with torch.no_grad(), full_precision():
        _, rec = model.run_with_cache(tokens, names_filter=names)
    pre = {}

    def put_back(value, hook, name):  # (a bridge's hook.name can be another alias)
        block = name.rsplit(".", 1)[0]
        gated = block + ".hook_pre_linear" in model.hook_dict
        if name.endswith("mlp.hook_pre") and not gated:
            pre[block] = value
            return value
        if name.endswith("mlp.hook_post"):
            if gated:
                return value
            return (pre[block] * (rec[name] / rec[block + ".hook_pre"])).contiguous()
        return rec[name].expand_as(value).contiguous()

    return [(n, lambda v, hook, n=n: put_back(v, hook, n)) for n in names]


def run_metric(model, tokens, hooks, metric, precise=False):
    """The metric of the first copy (``precise``: no float32 rounding inside the float64
    model's softmax and norms, as in the frozen map, whose coefficients are float64)."""
    with full_precision() if precise else contextlib.nullcontext():
        return metric(model.run_with_hooks(tokens, fwd_hooks=hooks)[:1])


def writer_delta(model, pairs, writer, freeze, clean, corrupt):
    """The writer's clean − corrupted change into the residual stream at its position: the
    embedding's or an MLP's from the two runs, a head's by running two copies of the corrupted
    prompt, the second with that head's clean output, and reading the block's attention output."""
    p = writer.position
    if writer.kind == "embed":
        name = "blocks.0.hook_resid_pre"
        return clean[name][0, p] - corrupt[name][0, p]
    if writer.kind == "mlp_out":
        name = f"blocks.{writer.layer}.hook_mlp_out"
        return clean[name][0, p] - corrupt[name][0, p]
    z, out = f"blocks.{writer.layer}.attn.hook_z", f"blocks.{writer.layer}.hook_attn_out"
    seen = {}

    def put(value, hook):
        value = value.clone()
        value[1, p, writer.head] = clean[z][0, p, writer.head]
        return value

    def read(value, hook):
        seen["out"] = value[1, p] - value[0, p]

    with torch.no_grad():
        model.run_with_hooks(
            pairs.corrupted.repeat(2, 1), fwd_hooks=freeze + [(z, put), (out, read)]
        )
    return seen["out"]


def reader_points(model, reader):
    """Where a reader's own copy of the stream enters (hook, index) and leaves (hook)."""
    b = f"blocks.{reader.layer}"
    if reader.kind in ("q_input", "k_input", "v_input"):
        return f"{b}.hook_resid_pre", f"{b}.attn.hook_{reader.kind[0]}"
    if reader.kind == "mlp_in":
        mid = f"{b}.hook_resid_mid"
        return (mid if mid in model.hook_dict else f"{b}.hook_resid_pre"), f"{b}.hook_mlp_out"
    return f"{b}.hook_resid_post", None


def reader_hooks(model, reader, shift):
    """Two copies: the reader's input gets ``shift`` in the second copy only, and the first
    copy takes the reader's output from the second (so only this reader sees the shift)."""
    into, out = reader_points(model, reader)
    p = reader.position
    if out is None:  # the logits read the final residual: shift it in the first copy

        def final(value, hook):
            value = value.clone()
            value[0, p] = value[0, p] + shift
            return value

        return [(into, final)]

    def add(value, hook):
        value = value.clone()
        value[1, p] = value[1, p] + shift
        return value

    def take(value, hook):
        value = value.clone()
        if reader.head is None:
            value[0, p] = value[1, p]
        else:
            value[0, p, reader.head] = value[1, p, reader.head]
        return value

    return [(into, add), (out, take)]


def sample_edges(result, k_top=10, k_random=10, seed=0):
    edges = [e for e, _ in sorted(result.edge_scores.items(), key=lambda kv: -abs(kv[1]))]
    rng = random.Random(seed)
    return edges[:k_top] + rng.sample(edges[k_top:], k_random)


@pytest.mark.filterwarnings("ignore:.*hook_scale/hook_normalized")  # the reference edits norms
@pytest.mark.parametrize(
    "backend, arch",
    [("bridge", "gpt2"), ("bridge", "llama"), ("bridge", "gemma3")]
    + ([("hooked", "gpt2"), ("hooked", "llama")] if HOOKED else []),
)
def test_frozen_edges_equal_path_patching_through_the_frozen_map(backend, arch):
    """Each edge's score is the metric change of patching that edge alone through the
    corrupted run's frozen map, the writer's clean change reaching this reader and no other.
    GQA (llama, gemma3) and norms after the head sum (gemma3) included. Float64."""
    model = cached_tiny(backend, arch, torch.float64)
    pairs = one_pair(model)
    metric = metric_of(pairs)
    ours = edge_attribution(model, pairs, metric=metric, detached=True, progress=False)
    assert isinstance(ours, EdgeAttribution) and ours.method == "frozen-map edges"
    freeze = recorded_coefficients(model, pairs.corrupted)
    with torch.no_grad():
        _, clean = model.run_with_cache(pairs.clean)
        _, corrupt = model.run_with_cache(pairs.corrupted)
        base = run_metric(model, pairs.corrupted.repeat(2, 1), freeze, metric, precise=True)
    truth, got = [], []
    for writer, reader in sample_edges(ours):
        delta = writer_delta(model, pairs, writer, freeze, clean, corrupt)
        with torch.no_grad():
            hooks = freeze + reader_hooks(model, reader, delta)
            truth.append(
                float(run_metric(model, pairs.corrupted.repeat(2, 1), hooks, metric, True) - base)
            )
        got.append(ours.edge_scores[(writer, reader)])
    truth, got = torch.tensor(truth, dtype=torch.float64), torch.tensor(got, dtype=torch.float64)
    # measured 3e-14 (gpt2), 3e-8 (llama), 2.3e-7 (gemma3): the model's own float32 casts (rotary)
    assert float((got - truth).abs().max()) <= 1e-6 * float(truth.abs().max())
    assert float(truth.abs().max()) > 1e-4  # the sample holds real effects
    # query and key edges are zero in the frozen map (the patterns are constants)
    qk = [s for (w, r), s in ours.edge_scores.items() if r.kind in ("q_input", "k_input")]
    assert qk and max(abs(s) for s in qk) == 0.0


def ordinary_reader_gradient(model, pairs, reader, metric, alpha, clean):
    """Autograd of the metric with respect to a shift of one reader's own input, the input
    embeddings moved ``alpha`` of the way from the corrupted to the clean prompt."""
    shift = torch.zeros(model.cfg.d_model, dtype=torch.float64, requires_grad=True)
    start = clean["blocks.0.hook_resid_pre"]

    def interpolate(value, hook):
        return value + alpha * (start - value.detach())

    hooks = [("blocks.0.hook_resid_pre", interpolate)] + reader_hooks(model, reader, shift)
    value = run_metric(model, pairs.corrupted.repeat(2, 1), hooks, metric)
    return torch.autograd.grad(value, shift)[0]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("ig_steps", [1, 3])
def test_attribution_and_eap_ig_equal_hand_written_gradients(arch, ig_steps):
    """``detached=False``: edge = writer change · reader gradient, the gradient averaged over
    ``ig_steps`` interpolated inputs (EAP-IG; one step is attribution patching)."""
    model = cached_tiny("bridge", arch, torch.float64)
    pairs = one_pair(model)
    metric = metric_of(pairs)
    ours = edge_attribution(
        model, pairs, metric=metric, detached=False, ig_steps=ig_steps, progress=False
    )
    assert ours.method == ("EAP-IG" if ig_steps > 1 else "attribution patching")
    with torch.no_grad():
        _, clean = model.run_with_cache(pairs.clean)
        _, corrupt = model.run_with_cache(pairs.corrupted)
    truth, got = [], []
    for writer, reader in sample_edges(ours, 8, 8):
        delta = writer_delta(model, pairs, writer, [], clean, corrupt)  # pre-norm: z W_O
        alphas = [j / max(1, ig_steps - 1) for j in range(ig_steps)]  # the trapezoidal rule
        weights = [0.5 if j in (0, ig_steps - 1) else 1.0 for j in range(ig_steps)]
        weights = [1.0] if ig_steps == 1 else [w / (ig_steps - 1) for w in weights]
        grads = [
            w * ordinary_reader_gradient(model, pairs, reader, metric, a, clean)
            for a, w in zip(alphas, weights)
        ]
        truth.append(float(delta @ torch.stack(grads).sum(0)))
        got.append(ours.edge_scores[(writer, reader)])
    truth, got = torch.tensor(truth, dtype=torch.float64), torch.tensor(got, dtype=torch.float64)
    assert float((got - truth).abs().max()) <= 1e-9 * float(truth.abs().max())
    if ig_steps > 1:
        one = edge_attribution(model, pairs, metric=metric, detached=False, progress=False)
        assert rel(ours.scores, one.scores) > 1e-3  # the path matters


def test_eap_ig_over_two_pairs_is_the_mean_of_each_pairs():
    """EAP-IG's integration points run as copies of the pairs in one batch: over two pairs
    with a mean metric, every edge is the mean of the two one-pair sweeps (each checked by
    hand above), whether the pairs share a batch or go one at a time (each seeing the other's
    logits as constants)."""
    model = cached_tiny("bridge", "llama", torch.float64)
    texts = [
        ("Hello there, friend!", "Hello where, friend!"),
        ("Hallo there, fiend!!", "Hallo where, fiend!!"),
    ]
    single = [prompt_pairs(model, clean, corrupted, "a", "c") for clean, corrupted in texts]
    both = prompt_pairs(model, *map(list, zip(*texts)), ["a", "a"], ["c", "c"])
    run = lambda pairs, **kw: (
        edge_attribution(  # noqa: E731
            model, pairs, metric=metric_of(pairs), detached=False, ig_steps=3, progress=False, **kw
        ).scores
    )
    mean = (run(single[0]) + run(single[1])) / 2
    assert rel(run(both), mean) <= 1e-9
    assert rel(run(both, max_memory=1), mean) <= 1e-9  # one pair per chunk


@with_tl_edges
def test_attribution_edges_equal_transformer_lens():
    """``detached=False`` reproduces TransformerLens' edge sweep, every edge and node, on the
    model family it supports (multi-head, pre-norm): same keys, same order."""
    from transformer_lens.tools.analysis.attribution_patching import (
        EdgeAttributionConfig,
        attribution_patch,
    )

    model = cached_tiny("bridge", "gpt2")
    pairs = prompt_pairs(
        model,
        ["Hello there, friend!", "Howdy where, enemy!!"],  # equal lengths: TL reads position -1
        ["Hello where, friend!", "Howdy there, enemy!!"],
        ["a", "a"],
        ["c", "c"],
    )
    metric = metric_of(pairs)
    ours = edge_attribution(model, pairs, metric=metric, detached=False, progress=False)
    theirs = attribution_patch(
        model, pairs.clean, pairs.corrupted, metric, EdgeAttributionConfig(granularity="edge")
    )
    assert list(ours.edge_scores) == list(theirs.edge_scores)
    big = max(abs(v) for v in theirs.edge_scores.values())
    assert max(abs(ours.edge_scores[e] - v) for e, v in theirs.edge_scores.items()) <= 1e-4 * big
    assert max(abs(ours.node_scores[n] - v) for n, v in theirs.node_scores.items()) <= 1e-4 * big
    # where TransformerLens refuses (grouped-query attention), ours answers
    llama = cached_tiny("bridge", "llama")
    with pytest.raises(ValueError, match="GQA"):
        attribution_patch(
            llama,
            pairs.clean[:1],
            pairs.corrupted[:1],
            metric,
            EdgeAttributionConfig(granularity="edge"),
        )


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt_neox"])
def test_a_writers_edges_add_up_to_its_node_score(arch):
    """Each writer's edges sum to its node score of the frozen-map patching prediction (head
    by position, MLP output, input embedding): consistency of the two."""
    model = cached_tiny("bridge", arch, torch.float64)
    pairs = tiny_pairs(model)
    edges = edge_attribution(model, pairs, detached=True, progress=False)
    heads = predicted_patching(model, pairs, "head_by_pos", detached=True, progress=False)
    mlps = predicted_patching(model, pairs, "mlp_out", detached=True, progress=False)
    inputs = predicted_patching(
        model, pairs, "resid_pre", detached=True, layers=[0], progress=False
    )
    for node, score in edges.node_scores.items():
        if node.kind == "attn_head_out":
            want = heads.raw[node.layer, node.position, node.head] - heads.corrupted
        elif node.kind == "mlp_out":
            want = mlps.raw[node.layer, node.position] - mlps.corrupted
        else:
            want = inputs.raw[0, node.position] - inputs.corrupted
        assert abs(score - float(want)) <= 1e-9 * max(1.0, abs(float(want)))
    assert sum(edges.node_scores.values()) != 0.0


def test_bad_input_is_refused():
    model = cached_tiny("bridge", "gpt2")
    pairs = one_pair(model)
    with pytest.raises(ValueError, match="ig_steps"):
        edge_attribution(model, pairs, ig_steps=0, progress=False)
    with pytest.raises(ValueError, match="detached=False"):
        edge_attribution(model, pairs, detached=True, ig_steps=4, progress=False)
    assert Node(kind="logits", position=0, layer=1).kind == "logits"
    assert edge_attribution(model, pairs, progress=False).method == "EAP-IG"  # the default


def gapped_pairs(model):
    """Pairs (of equal lengths) whose logit-difference gap is large enough for ratios."""
    return prompt_pairs(model, "Hello there, friend!", "Hello where, friend!", "f", "x")


@with_tl_edges
@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_faithfulness_equals_transformer_lens(arch):
    """The recovered fraction, its per-class breakdown and the counts equal TransformerLens'
    ``faithfulness`` (corrupted and mean ablation), for circuits of the top 0 … all edges."""
    from transformer_lens.tools.analysis.attribution_patching import (
        FaithfulnessConfig,
        faithfulness,
    )

    model = cached_tiny("bridge", arch, torch.float64)
    pairs = gapped_pairs(model)
    metric = metric_of(pairs)
    scores = edge_attribution(model, pairs, metric=metric, detached=False, progress=False)
    gen = torch.Generator().manual_seed(0)
    mean_tokens = torch.randint(4, 100, (3, pairs.clean.shape[1]), generator=gen)
    for k in [0, 10, 100, len(scores.edge_scores)]:
        circuit = scores.top_edges(k)
        for ablation, extra in [("corrupt", {}), ("mean", {"mean_tokens": mean_tokens})]:
            ours = circuit_faithfulness(
                model, pairs, circuit, metric=metric, ablation=ablation, **extra
            )
            theirs = faithfulness(
                model,
                pairs.clean,
                pairs.corrupted,
                metric,
                circuit,
                FaithfulnessConfig(ablation),
                **extra,
            )
            assert abs(ours.recovered - theirs.recovered) <= 1e-5
            assert (
                ours.circuit_size == theirs.circuit_size and ours.total_edges == theirs.total_edges
            )
            assert ours.edge_class_counts == theirs.edge_class_counts
            for c, v in theirs.edge_class_recovered.items():
                assert abs(ours.edge_class_recovered[c] - v) <= 1e-5


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
def test_the_whole_circuit_recovers_the_clean_run_and_none_the_corrupted(arch):
    """Every edge kept: each reader sees the clean run (1); none: the corrupted run (0).
    Grouped-query attention (llama) and a parallel block (gpt_neox) included; through the
    frozen map an empty circuit is the corrupted run too."""
    model = cached_tiny("bridge", arch, torch.float64)
    pairs = gapped_pairs(model)
    scores = edge_attribution(model, pairs, progress=False)
    every = scores.top_edges(len(scores.edge_scores))
    assert abs(circuit_faithfulness(model, pairs, every, by_class=False).recovered - 1) <= 1e-9
    assert abs(circuit_faithfulness(model, pairs, [], by_class=False).recovered) <= 1e-9
    frozen = circuit_faithfulness(model, pairs, [], detached=True, by_class=False)
    assert abs(frozen.recovered) <= 1e-5  # the real run's float32 casts: 1.4e-6 (llama)
    curve = grow_circuit(model, pairs, scores, target=0.8, progress=False)
    assert curve.circuit is not None and len(curve.circuit) in curve.sizes
    assert curve.recovered[curve.sizes.index(len(curve.circuit))] >= 0.8


def test_faithfulness_refuses_heads_that_do_not_add_up_and_stale_edges():
    model = cached_tiny("bridge", "gemma3")  # a norm after the head sum
    pairs = gapped_pairs(model)
    with pytest.raises(ValueError, match="not the sum of its heads"):
        circuit_faithfulness(model, pairs, [])
    gpt2 = cached_tiny("bridge", "gpt2")
    pairs = gapped_pairs(gpt2)
    bad = (
        Node(kind="mlp_out", position=1, layer=1),
        Node(kind="q_input", position=1, layer=0, head=0),
    )
    with pytest.raises(ValueError, match="not in this model's graph"):
        circuit_faithfulness(gpt2, pairs, [bad])


def plain_detach(model):
    """Detach hooks written on TransformerLens' hook points: norm scales, patterns and a
    plain MLP's activation (as the ratio ``post / pre``) frozen at the run's own values."""
    pre = {}

    def keep(value, hook, name):
        pre[name] = value

    def ratio(value, hook, name):
        p = pre[name]
        return value.detach() + (p - p.detach()) * (value / p).detach()

    hooks = [
        (n, lambda v, hook: v.detach())
        for n in model.hook_dict
        if n.endswith(("hook_scale", "attn.hook_pattern"))
    ]
    for n in model.hook_dict:
        if n.endswith("mlp.hook_pre"):
            hooks.append((n, lambda v, hook, n=n: keep(v, hook, n)))
            hooks.append(
                (n.replace("hook_pre", "hook_post"), lambda v, hook, n=n: ratio(v, hook, n))
            )
    return hooks


@pytest.mark.filterwarnings("ignore:.*hook_scale/hook_normalized")
@pytest.mark.parametrize("detached", [True, False])
def test_integrated_gradient_predictions_equal_a_hand_written_integral(detached):
    """``predicted_patching(ig_steps=3)``: the gradient at ``mlp_out`` integrated (trapezoidal
    rule) over inputs moved 0, 1/2 and all of the way to the clean prompt (through each point's own frozen map where
    ``detached``), times the clean − corrupted change."""
    model = cached_tiny("bridge", "gpt2", torch.float64)
    pairs = prompt_pairs(  # two pairs: the points run as copies of both in one batch
        model,
        ["Hello there, friend!", "Hallo there, fiend!!"],
        ["Hello where, friend!", "Hallo where, fiend!!"],
        ["f", "f"],
        ["x", "x"],
    )
    metric = metric_of(pairs)
    ours = predicted_patching(
        model, pairs, "mlp_out", metric=metric, detached=detached, ig_steps=3, progress=False
    )
    with torch.no_grad():
        _, clean = model.run_with_cache(pairs.clean)
        _, corrupt = model.run_with_cache(pairs.corrupted)
    names = [f"blocks.{l}.hook_mlp_out" for l in range(model.cfg.n_layers)]
    grads = []
    for j, weight in zip(range(3), [0.25, 0.5, 0.25]):  # the trapezoidal rule at 0, 1/2, 1
        leaves = {}

        def attach(value, hook, name):
            leaves[name] = torch.zeros_like(value, requires_grad=True)
            return value + leaves[name]

        def move(value, hook, alpha=j / 2):
            return value + alpha * (clean["blocks.0.hook_resid_pre"] - value.detach())

        hooks = [("blocks.0.hook_resid_pre", move)] + (plain_detach(model) if detached else [])
        hooks += [(n, lambda v, hook, n=n: attach(v, hook, n)) for n in names]
        value = metric(model.run_with_hooks(pairs.corrupted, fwd_hooks=hooks))
        grads.append([weight * g for g in torch.autograd.grad(value, [leaves[n] for n in names])])
    want = torch.stack(
        [
            ((sum(g[i] for g in grads) * (clean[n] - corrupt[n])).sum(-1) * pairs.mask).sum(0)
            for i, n in enumerate(names)
        ]
    )
    assert rel(ours.raw - ours.corrupted, want) <= 1e-9
    assert "integrated over 3 points" in ours.method
    # the clean metric (without ``detached``, read from the last point's copy): the model's own
    with torch.no_grad():
        assert abs(ours.clean - float(metric(model(pairs.clean)))) <= 1e-9


def test_certified_entries_are_real_patching():
    """``certify=k``: the k largest predicted entries are replaced by real patched runs and
    marked; the rest are the prediction's."""
    model = cached_tiny("bridge", "llama", torch.float64)
    pairs = gapped_pairs(model)
    plain = predicted_patching(model, pairs, "resid_pre", detached=True, progress=False)
    certified = predicted_patching(
        model, pairs, "resid_pre", detached=True, certify=5, progress=False
    )
    real = activation_patching(model, pairs, "resid_pre", progress=False)
    mask = certified.certified
    assert int(mask.sum()) == 5 and "top 5 certified" in certified.method
    assert float((certified.raw[mask] - real.raw[mask]).abs().max()) <= 1e-9
    assert torch.equal(certified.raw[~mask], plain.raw[~mask])
    largest = torch.topk((plain.raw - plain.corrupted).abs().flatten(), 5).indices
    assert set(largest.tolist()) == set(mask.flatten().nonzero().flatten().tolist())


def test_certification_rounds_continue_while_the_checked_predictions_miss():
    """``certify_tolerance``: rounds of twice as many entries follow while the estimated
    unchecked error (from how far each round's predictions missed real patching) exceeds
    it. At tolerance 0 the table ends as real patching (entries left unchecked are those
    predicted to change nothing, which real patching confirms here); at a tolerance above any
    estimate, one round is done; in between, the rounds stop exactly where the estimate,
    computed here by hand from the real table, first falls to the tolerance."""
    model = cached_tiny("bridge", "llama", torch.float64)
    pairs = gapped_pairs(model)
    real = activation_patching(model, pairs, "resid_pre", progress=False)
    plain = predicted_patching(model, pairs, "resid_pre", detached=True, progress=False)

    def rounds(tolerance: float):
        return predicted_patching(
            model,
            pairs,
            "resid_pre",
            detached=True,
            certify=2,
            certify_tolerance=tolerance,
            progress=False,
        )

    every = rounds(0.0)
    assert float((every.raw - real.raw)[every.certified].abs().max()) <= 1e-9
    assert bool((every.certified | (plain.raw == plain.corrupted)).all())
    # (real patching of a position both prompts share, BOS, moves the metric by ~1e-8)
    assert float((every.raw - real.raw).abs().max()) <= 1e-6
    assert int(rounds(1e9).certified.sum()) == 2
    # by hand: rounds of 2, 4, 8, ... of the largest predictions, the estimate after each
    # m² Σ (unchecked − corrupted)² / Σ (table − mean)²
    pred, truth, corrupted = plain.raw.flatten(), real.raw.flatten(), plain.corrupted
    order = torch.argsort((pred - corrupted).abs(), descending=True)
    table, size, done, estimates = pred.clone(), 2, 0, []
    while done < len(order):
        idx = order[done : done + size]
        miss = (pred[idx] - truth[idx]).norm() / (truth[idx] - corrupted).norm()
        table[idx] = truth[idx]
        done += len(idx)
        spread = (table - table.mean()).pow(2).sum()
        estimates.append(
            (done, float(miss**2 * (table[order[done:]] - corrupted).pow(2).sum() / spread))
        )
        size *= 2
    assert estimates[0][1] > 0
    stop = next(
        i for i in range(1, len(estimates)) if estimates[i][1] < min(e for _, e in estimates[:i])
    )
    tolerance = (estimates[stop][1] + min(e for _, e in estimates[:stop])) / 2
    mid = rounds(tolerance)
    assert int(mid.certified.sum()) == estimates[stop][0]
    assert float((mid.raw.flatten() - table).abs().max()) > 0 or stop == len(estimates) - 1
    assert float((mid.raw[mid.certified] - real.raw[mid.certified]).abs().max()) <= 1e-9
