"""What has no freezing rule ends in a clear LinearizationError naming where, never in a wrong result.

Found by probing TransformerLens' bridge with tiny random models (``lens_linear.coverage``):
a mixture of experts whose experts compute their gate without an activation module (gpt-oss's
clamped GLU), state-space mixers (Mamba), and a user's own nonlinearity inside an MoE block.
"""

import pytest
import torch

import lens_linear as ll
from lens_linear.models import tl_has_hooked_transformer, wrap_bridge
from lens_linear.tiny import char_tokenizer

from conftest import hooks_left

if tl_has_hooked_transformer():
    pytest.skip("architecture probes run with the newest TransformerLens", allow_module_level=True)
from lens_linear.coverage import tiny_hf  # noqa: E402

TRAPS = {
    "GptOssForCausalLM": (r"experts\.act_fn", 0),
    "MambaForCausalLM": (r"blocks\.0's mixer", 0),
}


def bridge(arch):
    return wrap_bridge(tiny_hf(arch), char_tokenizer(), f"tiny-{arch}", torch.float32)


@pytest.mark.parametrize("arch", sorted(TRAPS))
def test_trap_ends_in_linearization_error(arch):
    message, layer = TRAPS[arch]
    model = bridge(arch)
    with pytest.raises(ll.LinearizationError, match=message) as info:
        ll.run_with_linear_cache(model, "Hello world", progress=False)
    assert info.value.layer == layer
    assert not hooks_left(model)


def test_nonlinearity_inside_an_expert_block_is_refused_naming_its_layer():
    model = bridge("MixtralForCausalLM")
    squash = ("blocks.1.mlp.hook_out", lambda v, hook: torch.tanh(3 * v))
    with pytest.raises(ll.LinearizationError, match=r"blocks\.1\b") as info:
        ll.run_with_linear_cache(model, "Hello world", fwd_hooks=[squash], progress=False)
    assert info.value.layer == 1
    assert not hooks_left(model)
