"""The default model, SmolLM2-135M-Instruct (offline, from the PyPI wheel): the seed paper's numbers."""

import json

import pytest
import torch

import lens_linear as ll
from lens_linear.cli import main
from lens_linear.hooks import detach_hooks

from conftest import hooks_left

PROMPTS = ["The bridge out of Marin is the", "The capital of France is", "Once upon a time, there was a",
           "def fibonacci(n):"]


def test_detach_hooks_keep_logits(smollm2):
    """Within 1e-5 of the logits' scale. An edited hook_scale sends the bridge's RMSNorm down
    its python path (x / scale, not x * rsqrt), which differs at float32 rounding: measured
    4.2e-5 absolute on logits of magnitude ~20 over 30 layers."""
    tokens = smollm2.to_tokens(PROMPTS[0])
    with torch.no_grad():
        plain = smollm2(tokens)
        diff = (smollm2.run_with_hooks(tokens, fwd_hooks=detach_hooks(smollm2)) - plain).abs().max()
    assert diff <= 1e-5 * plain.abs().max(), float(diff)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_detached_reconstructs_plain_does_not(smollm2, prompt):
    lc = ll.run_with_linear_cache(smollm2, prompt)
    assert lc.reconstruction_error() <= 1e-5
    assert lc.reconstruction_error(plain=True) >= 1e-2
    assert float(lc.bias_term.abs().max()) == 0.0  # Llama architecture: no biases
    assert not hooks_left(smollm2)


def test_top_prediction(smollm2):
    lc = ll.run_with_linear_cache(smollm2, PROMPTS[0], check=False)
    assert lc.str_tokens == ["The", " bridge", " out", " of", " Marin", " is", " the"]
    assert lc.top_predictions(1)[0].token == " only"


def test_hooked_backend_matches_bridge(smollm2):
    if not ll.models.tl_has_hooked_transformer():
        pytest.skip("HookedTransformer needs TransformerLens < 4")
    hooked = ll.load_model(backend="hooked")
    tokens = smollm2.to_tokens(PROMPTS[0])
    assert (hooked(tokens) - smollm2(tokens)).abs().max() <= 1e-3
    lc = ll.run_with_linear_cache(hooked, PROMPTS[0])
    assert lc.reconstruction_error() <= 1e-5 and lc.top_predictions(1)[0].token == " only"


def test_cli_analyze_json(capsys):
    assert main(["analyze", PROMPTS[0], "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["top"][0]["token"] == " only"
    assert result["reconstruction_error"]["detached"] <= 1e-5
    assert result["reconstruction_error"]["plain"] >= 1e-2
    assert len(result["contribution_norms"]) == 7


def test_cli_text_and_errors(capsys):
    assert main(["analyze", "", "--pos", "0"]) == 2
    assert "empty prompt" in capsys.readouterr().err
    assert main(["analyze", "The bridge", "--pos", "9"]) == 2
    assert "out of range" in capsys.readouterr().err
