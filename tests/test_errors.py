"""Bad input gets a clear error naming the problem and the fix."""

import pytest
import torch
from conftest import cached_tiny, hooks_left, leg_specific

import lens_linear as ll
from lens_linear.models import tl_has_hooked_transformer


@pytest.fixture
def gpt2():
    return cached_tiny("bridge", "gpt2")


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt(gpt2, prompt):
    with pytest.raises(ValueError, match="empty prompt"):
        ll.run_with_linear_cache(gpt2, prompt)


def test_empty_token_tensor(gpt2):
    with pytest.raises(ValueError, match="empty prompt"):
        ll.run_with_linear_cache(gpt2, torch.zeros(1, 0, dtype=torch.long))


def test_position_out_of_range(gpt2):
    with pytest.raises(IndexError, match=r"pos=12 is out of range .* 5 tokens \(valid: -5\.\.4\)"):
        ll.run_with_linear_cache(gpt2, "abcd", pos=12)
    lc = ll.run_with_linear_cache(gpt2, "abcd")
    with pytest.raises(IndexError, match="out of range"):
        lc.jacobian(pos=-6)


def test_not_a_transformer_lens_model():
    with pytest.raises(TypeError, match="expected a TransformerLens model .* got Linear"):
        ll.run_with_linear_cache(torch.nn.Linear(2, 2), "hi")
    with pytest.raises(TypeError, match="TransformerLens model"):
        ll.detach_hooks("gpt2")


def test_unknown_hook_name_lists_close_matches(gpt2):
    lc = ll.run_with_linear_cache(gpt2, "abcd")
    with pytest.raises(
        KeyError,
        match=r"unknown hook name 'blocks\.1\.hook_resid_psot'.*blocks\.1\.hook_resid_post",
    ):
        lc.jacobian("blocks.1.hook_resid_psot")


def test_batched_or_float_tokens(gpt2):
    with pytest.raises(ValueError, match="one sequence"):
        ll.run_with_linear_cache(gpt2, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="integer tensor"):
        ll.run_with_linear_cache(gpt2, torch.zeros(1, 3))


def test_prompt_longer_than_context(gpt2):
    with pytest.raises(ValueError, match="more than the model's context of 64"):
        ll.run_with_linear_cache(gpt2, "x" * 80)


def test_unknown_parts(gpt2):
    with pytest.raises(ValueError, match="unknown parts"):
        ll.detach_hooks(gpt2, parts=("norm", "softmax"))


def test_wrong_dtype():
    with pytest.raises(TypeError, match="unsupported dtype"):
        ll.load_model(dtype=torch.int32)


def test_bad_model_name_and_backend():
    with pytest.raises(ValueError, match="non-empty string"):
        ll.load_model("")
    with pytest.raises(ValueError, match="backend must be"):
        ll.load_model(backend="jax")
    with pytest.raises(ValueError, match="unknown tiny architecture 'bert'"):
        ll.tiny_model("bert")


@leg_specific(tl_has_hooked_transformer(), "TransformerLens < 4 has HookedTransformer")
def test_hooked_backend_on_tl4_explains():
    with pytest.raises(
        ValueError, match=r"removed \(TL 4\.0\).*backend='bridge'.*transformer-lens<4"
    ):
        ll.load_model(backend="hooked")
    with pytest.raises(ValueError, match="removed"):
        ll.tiny_model("gpt2", backend="hooked")


def test_errors_leave_no_hooks(gpt2):
    for bad in [
        lambda: ll.run_with_linear_cache(gpt2, "abcd", pos=99),
        lambda: ll.run_with_linear_cache(gpt2, "abcd").jacobian("nope"),
    ]:
        with pytest.raises((IndexError, KeyError)):
            bad()
    assert not hooks_left(gpt2)
