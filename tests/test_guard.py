"""One lens_linear call per model at a time: a second call from another thread, or from a
user hook calling back in, gets a clear error naming the call in progress; the first call's
result stays exact and the model comes back as it was."""

import threading

import pytest
import torch
from conftest import cached_tiny, hooks_left

import lens_linear as ll
from lens_linear.patching import predicted_patching, prompt_pairs


def model_state(model):
    return (
        {n: (t.dtype, t.device, t.clone()) for n, t in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        [m.training for m in model.modules()],
        hooks_left(model),
    )


def same_state(a, b):
    tensors_a, *rest_a = a
    tensors_b, *rest_b = b
    return rest_a == rest_b and all(
        tensors_a[n][:2] == tensors_b[n][:2] and torch.equal(tensors_a[n][2], tensors_b[n][2])
        for n in tensors_a
    )


def test_a_second_thread_is_refused_and_the_first_stays_exact():
    model = cached_tiny("bridge", "llama")
    before = model_state(model)
    inside, tried = threading.Event(), threading.Event()
    errors = []

    def wait_for_the_other(value, hook):  # a user hook of the first call: hold its forward
        inside.set()
        tried.wait(timeout=60)

    def second():
        inside.wait(timeout=60)
        try:
            ll.run_with_linear_cache(model, "Hello there", progress=False)
        except ll.ModelInUseError as e:
            errors.append(str(e))
        finally:
            tried.set()

    other = threading.Thread(target=second)
    other.start()
    first = ll.run_with_linear_cache(
        model, "Hi you", fwd_hooks=[("blocks.0.hook_resid_post", wait_for_the_other)]
    )
    other.join(timeout=60)
    assert len(errors) == 1 and "run_with_linear_cache (in another thread)" in errors[0]
    assert first.reconstruction_error() <= 1e-5  # the first call was not disturbed
    assert same_state(model_state(model), before)
    again = ll.run_with_linear_cache(model, "Hello there")  # free again once the call is over
    assert again.reconstruction_error() <= 1e-5


def test_a_hook_calling_back_in_is_refused_and_the_model_comes_back():
    model = cached_tiny("bridge", "llama")
    before = model_state(model)

    def calls_back_in(value, hook):
        ll.run_with_linear_cache(model, "Hello there")

    with pytest.raises(ll.ModelInUseError, match="called from inside its forward"):
        ll.run_with_linear_cache(
            model, "Hi you", fwd_hooks=[("blocks.0.hook_resid_post", calls_back_in)]
        )
    assert same_state(model_state(model), before)
    pairs = prompt_pairs(model, "Hello there, friend!", "Hello where, friend!", "a", "c")
    lc = ll.run_with_linear_cache(model, "Hi you")

    def patches_meanwhile(logits):  # a metric runs outside any forward: nesting is fine there
        lc.jacobian()
        return pairs.mean_logit_diff(logits)

    predicted_patching(model, pairs, metric=patches_meanwhile, progress=False)
    assert same_state(model_state(model), before)


def test_bias_free_replays_never_write_the_users_tensors():
    """The bias decomposition replays the frozen map with biases zero, many times; the zeros
    are substituted in each forward, so the user's bias tensors hold their values throughout
    (a hook of the user's, active in every replay, reads them) and the parts add up to F(0)."""
    from lens_linear.hooks.contexts import bias_tensors

    model = cached_tiny("bridge", "gpt2")
    biases = [b for b in bias_tensors(model).values() if bool(b.abs().sum() > 0)]
    assert len(biases) >= 4  # the tiny models' biases are perturbed
    seen = []

    def read_biases(value, hook):
        seen.append(min(float(b.abs().sum()) for b in biases))

    lc = ll.run_with_linear_cache(
        model, "Hi you", fwd_hooks=[("blocks.0.hook_resid_post", read_biases)]
    )
    before = model_state(model)
    seen.clear()
    parts = lc.bias_contributions()
    assert len(seen) >= len(parts) and min(seen) > 0  # never zero while a replay ran
    total = sum(parts.values())
    assert float((total - lc.bias_term()).norm() / lc.bias_term().norm()) <= 1e-5
    assert same_state(model_state(model), before)


def test_bias_decomposition_of_a_half_model_computed_in_float32():
    """The zeros a bias-free replay substitutes are made at each forward, in the dtype the
    weights then have (float32 copies of a bfloat16 model's)."""
    model = ll.tiny_model("gpt2", dtype=torch.bfloat16)
    before = model_state(model)
    lc = ll.run_with_linear_cache(model, "Hi you there", dtype=torch.float32)
    parts = lc.bias_contributions()
    total = sum(parts.values())
    assert float((total - lc.bias_term()).norm() / lc.bias_term().norm()) <= 1e-5
    assert same_state(model_state(model), before)
