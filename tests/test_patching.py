"""Patching: batched sweeps vs one forward per patch and TransformerLens' patching module;
Jacobian-predicted patching vs the frozen map; steering."""

import pytest
import torch
from conftest import HOOKED, cached_tiny, newest_tl_only, not_applicable, rel, tiny_pairs

import lens_linear as ll
from lens_linear.patching import (
    SWEEPS,
    activation_patching,
    ioi_pairs,
    predicted_patching,
    prompt_pairs,
    steer,
)
from lens_linear.tiny import tiny_architectures

IOI_CLEAN = "After John and Mary went to the store, Mary gave a bottle of milk to"
IOI_CORRUPT = "After John and Mary went to the store, John gave a bottle of milk to"
BACKENDS = ["bridge", "hooked"] if HOOKED else ["bridge"]


def naive(model, pairs, sweep, scale=1.0, metric=None):
    """One forward per patch, written directly on the model's hooks (``metric`` of full logits)."""
    leaf, kind = SWEEPS[sweep]
    _, clean = model.run_with_cache(pairs.clean)
    _, corrupt = model.run_with_cache(pairs.corrupted)
    n_layers, n_pos, n_heads = model.cfg.n_layers, pairs.clean.shape[1], model.cfg.n_heads

    def logit_diff(logits):
        rows = torch.arange(len(pairs.answers))
        final = logits[rows, pairs.last]
        return float((final[rows, pairs.answers] - final[rows, pairs.wrong]).mean())

    metric = metric or logit_diff

    def run(layer, pos, head):
        name = f"blocks.{layer}.{leaf}"
        target = corrupt[name] + scale * (clean[name] - corrupt[name])

        def hook(value, hook):
            value = value.clone()
            for i in range(len(pairs.answers)):
                for p in [pos] if pos is not None else range(n_pos):
                    if pairs.mask[i, p]:
                        if head is None:
                            value[i, p] = target[i, p]
                        else:
                            value[i, p, head] = target[i, p, head]
            return value

        with torch.no_grad():
            return metric(model.run_with_hooks(pairs.corrupted, fwd_hooks=[(name, hook)]))

    grid = {
        "pos": [[run(l, p, None) for p in range(n_pos)] for l in range(n_layers)],
        "head": [[run(l, None, h) for h in range(n_heads)] for l in range(n_layers)],
        "pos_head": [
            [[run(l, p, h) for h in range(n_heads)] for p in range(n_pos)] for l in range(n_layers)
        ],
    }[kind]
    return torch.tensor(grid)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox", "gemma3", "phi3", "qwen3"])
def test_batched_sweeps_equal_one_forward_per_patch(backend, arch):
    """Every sweep of two right-padded pairs equals one forward per patch, with each patch's
    copy joining the batch at its block (the first block sees the two pairs alone)."""
    if arch not in tiny_architectures(backend):
        not_applicable(f"no tiny {arch} for the {backend} backend")
    model = cached_tiny(backend, arch)
    pairs = tiny_pairs(model)
    assert not pairs.mask[1, 9:].any() and bool(pairs.mask[0, 1])
    assert bool(pairs.mask[0, 0]) is (
        model.tokenizer.bos_token_id is None or not model.cfg.default_prepend_bos
    )
    # the batch the first block receives: the two pairs alone, each patch's copy joining at
    # its block's input (a bridge's attention mask and position embeddings widened to it), not
    # full batches of copies
    batches = []

    def first_block(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        batches.append(hidden.shape[0])

    handle = model.blocks[0].register_forward_pre_hook(first_block, with_kwargs=True)
    try:
        for sweep in [
            "resid_pre",
            "resid_mid",
            "resid_post",
            "attn_out",
            "mlp_out",
            "head",
            "head_by_pos",
        ]:
            if f"blocks.0.hook_{sweep}" not in model.hook_dict and sweep == "resid_mid":
                continue  # a parallel block (GPT-NeoX) has no resid_mid
            batches.clear()
            ours = activation_patching(
                model, pairs, sweep, progress=False, max_memory=1 << 20
            )  # many small chunks
            assert set(batches) == {2}, (sweep, batches)
            handle.remove()
            assert (ours.raw - naive(model, pairs, sweep)).abs().max() <= 1e-4, sweep
            handle = model.blocks[0].register_forward_pre_hook(first_block, with_kwargs=True)
    finally:
        handle.remove()


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_transformer_lens_patching(backend):
    import transformer_lens.patching as tlp

    model = cached_tiny(backend, "gpt2")
    pairs = prompt_pairs(model, "Hello there, friend!", "Hello where, friend!", "a", "c")
    _, cache = model.run_with_cache(pairs.clean)
    metric = lambda logits: logits[0, -1, pairs.answers[0]] - logits[0, -1, pairs.wrong[0]]  # noqa: E731
    theirs = {
        "resid_pre": tlp.get_act_patch_resid_pre,
        "mlp_out": tlp.get_act_patch_mlp_out,
        "head": tlp.get_act_patch_attn_head_out_all_pos,
    }
    for sweep, fn in theirs.items():
        reference = fn(model, pairs.corrupted, cache, metric)
        ours = activation_patching(model, pairs, sweep, progress=False)
        if sweep != "head":  # TransformerLens patches BOS too; ours keeps special tokens out
            reference = reference[:, 1:]
            ours.raw = ours.raw[:, 1:]
        assert (ours.raw - reference).abs().max() <= 1e-4, sweep


def test_predicted_patching_is_exact_for_the_frozen_map():
    """float64, so that the check is sharp: detached prediction = replay through the
    corrupted run's operating point; the plain gradient is a first-order estimate."""
    model = cached_tiny("bridge", "llama", torch.float64)
    pairs = tiny_pairs(model)
    for sweep in ["resid_pre", "attn_out", "head", "head_by_pos"]:
        frozen = activation_patching(model, pairs, sweep, detached=True, progress=False)
        predicted = predicted_patching(model, pairs, sweep, detached=True)
        assert rel(predicted.raw - predicted.corrupted, frozen.raw - frozen.corrupted) <= 1e-10, (
            sweep
        )
        small = activation_patching(model, pairs, sweep, scale=1e-3, progress=False)
        plain = predicted_patching(model, pairs, sweep, scale=1e-3, detached=False)
        assert rel(plain.raw - plain.corrupted, small.raw - small.corrupted) <= 1e-2, sweep


def test_ioi_pairs_and_bad_input():
    model = cached_tiny("bridge", "gpt2")  # a character tokenizer: no name is one token
    with pytest.raises(ValueError, match="single tokens"):
        ioi_pairs(model)
    with pytest.raises(
        ValueError, match="pair 0: the clean prompt has 6 tokens and the corrupted one 7"
    ):
        prompt_pairs(model, "Hello", "Hellos", "a", "b")
    with pytest.raises(ValueError, match="'ab' is 2 tokens"):
        prompt_pairs(model, "Hello", "Jello", "ab", "b")
    pairs = prompt_pairs(model, "Hello", "Jello", "a", "b")
    with pytest.raises(ValueError, match="unknown sweep"):
        activation_patching(model, pairs, "resid")
    with pytest.raises(IndexError, match="layer=5 is out of range"):
        steer(model, "Hello", "Hi", layer=5)


def test_steering_with_lam_one_is_greedy_generation():
    model = cached_tiny("bridge", "llama")
    tokens = model.to_tokens("Hello")
    with torch.no_grad():
        for _ in range(6):
            tokens = torch.cat([tokens, model(tokens)[0, -1].argmax().reshape(1, 1)], dim=1)
    steered = steer(model, "The Golden Gate", "Hello", layer=1, lam=1.0, max_new_tokens=6)
    assert torch.equal(steered.tokens, tokens)
    long_concept = steer(
        model, "Hi", "Hello there", layer=0, lam=0.3, max_new_tokens=2
    )  # concept shorter
    assert long_concept.tokens.shape[-1] == model.to_tokens("Hello there").shape[-1] + 2


@newest_tl_only
def test_smollm2_ioi_patching(smollm2):
    import pandas as pd
    import transformer_lens.patching as tlp

    pairs = prompt_pairs(smollm2, IOI_CLEAN, IOI_CORRUPT, " John", " Mary")
    result = activation_patching(smollm2, pairs, "resid_pre", progress=False)
    assert result.clean > 0 > result.corrupted
    changed = pairs.str_tokens.index(" Mary", 5)  # the second "Mary", replaced by "John"
    assert result.values[0, changed] == pytest.approx(1.0, abs=1e-4)  # all the information is there
    post = activation_patching(smollm2, pairs, "resid_post", layers=[-1], progress=False)
    assert post.layers == [29] and post.values[0, -1] == pytest.approx(1.0, abs=1e-4)
    frozen = activation_patching(
        smollm2, pairs, "resid_pre", detached=True, layers=[0, 12, 24], progress=False
    )
    predicted = predicted_patching(smollm2, pairs, "resid_pre", detached=True, layers=[0, 12, 24])
    assert rel(predicted.raw - predicted.corrupted, frozen.raw - frozen.corrupted) <= 1e-5

    ioi = ioi_pairs(smollm2, n_pairs=4)  # names that are one token with a leading space
    assert ioi.clean.shape == ioi.corrupted.shape == (4, pairs.clean.shape[1]) and bool(
        ioi.mask.all()
    )
    assert (ioi.clean != ioi.corrupted).sum(1).tolist() == [
        1,
        1,
        1,
        1,
    ]  # only the repeated subject differs
    assert torch.equal(ioi.answers[::2], ioi.wrong[1::2]) and not bool(
        (ioi.answers == ioi.wrong).any()
    )

    _, cache = smollm2.run_with_cache(pairs.clean)
    metric = lambda logits: pairs.logit_diff(logits[:, -1]).mean()  # noqa: E731
    layers = [0, 15, 29]
    index = pd.DataFrame(
        [(l, p) for l in layers for p in range(pairs.clean.shape[1])], columns=["layer", "pos"]
    )
    reference = tlp.generic_activation_patch(
        smollm2,
        pairs.corrupted,
        cache,
        metric,
        tlp.layer_pos_patch_setter,
        "resid_pre",
        index_df=index,
    )
    assert (result.raw[layers].flatten() - reference).abs().max() <= 1e-4


def test_smollm2_steering_raises_the_concept(smollm2):
    concept = ll.run_with_linear_cache(smollm2, "The Golden Gate", check=False)
    bridge = concept.top_predictions(1)[0]
    assert bridge.token == " Bridge"
    plain = steer(
        smollm2, "The Golden Gate", "Here is a painting of the", layer=15, lam=1.0, max_new_tokens=1
    )
    steered = steer(
        smollm2, "The Golden Gate", "Here is a painting of the", layer=15, lam=0.5, max_new_tokens=1
    )
    rank = lambda logits: int((logits > logits[bridge.token_id]).sum())  # noqa: E731
    assert rank(steered.first_logits) < rank(plain.first_logits)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_predicted_patching_of_long_prompts_keeps_no_pattern(family, backend, monkeypatch):
    """Past the pattern budget (``max_memory``), each pair is recorded with its patterns as
    queries and keys and replayed with the gradient on: the table still equals real patched
    runs through the frozen corrupted run (float64: 1e-10), and no attention pattern is kept."""
    import lens_linear.hooks.patterns as patterns

    model = cached_tiny(backend, family, torch.float64)
    pairs = tiny_pairs(model)
    truth = {
        sweep: activation_patching(model, pairs, sweep, detached=True, progress=False)
        for sweep in ["resid_pre", "head_by_pos"]
    }
    applied = []
    original = patterns.FrozenAttention.apply
    monkeypatch.setattr(
        patterns.FrozenAttention,
        "apply",
        lambda self, v: applied.append(v.shape) or original(self, v),
    )
    tiny = 1024  # bytes: every prompt is "long"
    for sweep, frozen in truth.items():
        predicted = predicted_patching(
            model, pairs, sweep, detached=True, max_memory=tiny, progress=False
        )
        assert rel(predicted.raw - predicted.corrupted, frozen.raw - frozen.corrupted) <= 1e-10, (
            sweep
        )
        assert abs(predicted.corrupted - frozen.corrupted) <= 1e-10
    one = pairs.pair(1)  # a single pair: no other pairs' logits to hold constant
    predicted = predicted_patching(
        model, one, "resid_pre", detached=True, max_memory=tiny, progress=False
    )
    frozen = activation_patching(model, one, "resid_pre", detached=True, progress=False)
    assert rel(predicted.raw - predicted.corrupted, frozen.raw - frozen.corrupted) <= 1e-10
    assert abs(predicted.corrupted - frozen.corrupted) <= 1e-10
    assert applied and all(
        shape[0] == 1 for shape in applied
    )  # one pair at a time, through q and k


@pytest.mark.parametrize("sweep", ["resid_pre", "head"])
def test_a_transformer_lens_metric_gives_the_default_table(sweep):
    """A metric written for ``transformer_lens.patching`` (logits ``[batch, pos, d_vocab]``,
    read at ``[:, -1]``) runs unchanged in both functions and gives the default's table; on
    right-padded pairs it reads each pair's last real token, as the naive loop's metric does."""
    model = cached_tiny("bridge", "llama")
    one = prompt_pairs(model, "Hello there, friend!", "Hello where, friend!", "a", "c")
    a, b = int(one.answers[0]), int(one.wrong[0])
    tl_metric = lambda logits: (logits[:, -1, a] - logits[:, -1, b]).mean()  # noqa: E731
    pairs = tiny_pairs(model)  # two pairs of different lengths: right padding
    rows = torch.arange(2)
    per_pair = lambda logits: (  # noqa: E731
        logits[rows, -1, pairs.answers] - logits[rows, -1, pairs.wrong]
    ).mean()
    for table_pairs, metric in [(one, tl_metric), (pairs, per_pair)]:
        for fn in (activation_patching, predicted_patching):
            default = fn(model, table_pairs, sweep, progress=False)
            theirs = fn(model, table_pairs, sweep, metric=metric, progress=False)
            assert (theirs.raw - default.raw).abs().max() <= 1e-4, (fn.__name__, sweep)
            assert theirs.method == default.method
    assert activation_patching(model, one, sweep, progress=False).method == "activation patching"
    # the ground truth of the padded pairs: one forward per patch, metric of the full logits
    truth = naive(model, pairs, sweep)
    assert (
        activation_patching(model, pairs, sweep, metric=per_pair, progress=False).raw - truth
    ).abs().max() <= 1e-4


def frozen_patching_by_hand(model, pairs, sweep, layers):
    """The frozen patching table written on TransformerLens' hook points, sharing no code with
    lens_linear: the corrupted run's norm scales, attention patterns and gated MLPs'
    pre-activations are recorded with ``run_with_cache``; each patch then reruns the corrupted
    prompt with hooks that put those recorded values back (the gradient-free meaning of
    "frozen") and patch the clean run's activation in. The coefficients are recorded in the
    reference's full precision (the model's own float64 run rounds its softmax and RMS norms
    through float32; a frozen map has no such rounding). Returns the table and the frozen
    corrupted run's metric (the mean logit difference)."""
    from lens_linear.reference import full_precision

    names = [
        n
        for n in model.hook_dict
        if n.endswith(("hook_scale", "attn.hook_pattern"))
        or (n.endswith("mlp.hook_pre") and n + "_linear" in model.hook_dict)
    ]
    leaf, kind = SWEEPS[sweep]
    with torch.no_grad():
        _, clean = model.run_with_cache(pairs.clean)  # the model's own clean activations
        with full_precision():
            _, corrupt = model.run_with_cache(pairs.corrupted)
    fired = set()

    def put_back(value, hook, name):
        fired.add(name)
        return corrupt[name]

    freeze = [(n, lambda v, hook, n=n: put_back(v, hook, n)) for n in names]
    rows = torch.arange(len(pairs.answers))

    def metric(logits):
        final = logits[rows, pairs.last]
        return float((final[rows, pairs.answers] - final[rows, pairs.wrong]).mean())

    def run(layer, pos, head):
        name = f"blocks.{layer}.{leaf}"

        def patch(value, hook):
            value = value.clone()
            for i in range(len(pairs.answers)):
                for p in range(value.shape[1]) if pos is None else [pos]:
                    if pairs.mask[i, p]:
                        where = (i, p) if head is None else (i, p, head)
                        value[where] = clean[name][where]
            return value

        with torch.no_grad():
            return metric(model.run_with_hooks(pairs.corrupted, fwd_hooks=freeze + [(name, patch)]))

    n_pos, heads = pairs.clean.shape[1], range(model.cfg.n_heads)
    grid = {
        "pos": lambda: [[run(l, p, None) for p in range(n_pos)] for l in layers],
        "head": lambda: [[run(l, None, h) for h in heads] for l in layers],
        "pos_head": lambda: [[[run(l, p, h) for h in heads] for p in range(n_pos)] for l in layers],
    }[kind]()
    assert fired == set(names)  # every recorded value was put back
    with torch.no_grad():
        corrupted = metric(model.run_with_hooks(pairs.corrupted, fwd_hooks=freeze))
    return torch.tensor(grid, dtype=torch.float64), corrupted


@pytest.mark.filterwarnings("ignore:.*hook_scale/hook_normalized")  # the reference edits norms
@pytest.mark.parametrize(
    "sweep, layers",
    [("resid_pre", [0, 1]), ("head", [0, 1]), ("head_by_pos", [1])],
)
def test_predicted_patching_equals_hand_written_frozen_patching(sweep, layers):
    """An independent ground truth for ``predicted_patching(detached=True)``: real patched runs
    with the corrupted run's coefficients put back by hand (float64). Measured: entries agree to
    2.2e-16, their changes from the corrupted run to 9.8e-15 (relative); ordinary patching
    differs from this table by 0.27-0.62."""
    model = cached_tiny("bridge", "llama", torch.float64)
    pairs = tiny_pairs(model)
    truth, corrupted = frozen_patching_by_hand(model, pairs, sweep, layers)
    predicted = predicted_patching(
        model, pairs, sweep, detached=True, layers=layers, progress=False
    )
    assert abs(predicted.corrupted - corrupted) <= 1e-12
    assert float((predicted.raw - truth).abs().max()) <= 1e-12
    assert rel(predicted.raw - predicted.corrupted, truth - corrupted) <= 1e-10
    plain = activation_patching(model, pairs, sweep, layers=layers, progress=False)
    assert rel(plain.raw - plain.corrupted, truth - corrupted) >= 0.1  # freezing is seen
