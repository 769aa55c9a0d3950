"""Architectures where a freezing hook cannot take effect end in a clear LinearizationError.

Found by probing TransformerLens' bridge with tiny random models: on GPT-J, GPT-Neo, OPT and
XGLM it fires hook_pattern after the attention has used the pattern; MoE blocks have router and expert gates with no
freezing rule. None of these may return a wrong linearization.
"""

import pytest
import torch
import transformers as tf

import lens_linear as ll
from lens_linear.models import wrap_bridge
from lens_linear.tiny import char_tokenizer, perturb_

from conftest import hooks_left

SMALL = dict(vocab_size=128, max_position_embeddings=64)
TRAPS = {
    "gptj": (lambda: tf.GPTJConfig(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, rotary_dim=8),
             "hook_pattern"),
    "gpt_neo": (lambda: tf.GPTNeoConfig(hidden_size=64, num_layers=2, num_heads=4,
                                        attention_types=[[["global", "local"], 1]], **SMALL), "hook_pattern"),
    "opt": (lambda: tf.OPTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                                 word_embed_proj_dim=64, **SMALL), "hook_pattern"),
    "xglm": (lambda: tf.XGLMConfig(vocab_size=128, d_model=64, num_layers=2, attention_heads=4, ffn_dim=128,
                                   max_position_embeddings=64), "hook_pattern"),
    "mixtral": (lambda: tf.MixtralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                         num_experts_per_tok=2, **SMALL), "mixture-of-experts"),
}


@pytest.mark.parametrize("arch", sorted(TRAPS))
def test_trap_ends_in_linearization_error(arch):
    make, message = TRAPS[arch]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = make()
        hf = tf.AutoModelForCausalLM.from_config(config)
    config.architectures = [type(hf).__name__]
    model = wrap_bridge(perturb_(hf).eval(), char_tokenizer(), f"tiny-{arch}", torch.float32)
    with pytest.raises(ll.LinearizationError, match=message) as info:
        ll.run_with_linear_cache(model, "Hello world")
    if message == "hook_pattern":
        assert info.value.layer == 0
    assert not hooks_left(model)
