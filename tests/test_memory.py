"""One memory budget: ``max_memory`` decides the pattern store (all of it), chunks of
batched products (half) and blocks of pattern rows (a quarter), and nothing else does."""

import pytest
import torch
from conftest import cached_tiny, rel

import lens_linear as ll
from lens_linear.memory import budget, chunk_size, patterns_fit, row_block


def test_the_budget_splits_into_its_shares():
    assert chunk_size(1000, 1 << 10, max_memory=64 << 10, cap=1000) == 32  # half of 64 KiB
    assert row_block(n_heads=4, n_keys=100, max_memory=4 * 4 * 100 * 4 * 10) == 10  # a quarter
    assert row_block(n_heads=4, n_keys=100, max_memory=1) == 1 and row_block(4, 100, 1 << 40) == 256
    assert budget(None) == 256 << 20  # the CPU default
    for bad in (0, -5, 1.5, True):
        with pytest.raises(ValueError, match="max_memory must be a positive number of bytes"):
            budget(bad)


def test_max_memory_decides_how_patterns_are_kept_and_the_map_is_the_same():
    model = cached_tiny("bridge", "llama", torch.float64)
    prompt = "Hello there, my friend!"
    n = model.to_tokens(prompt).shape[1]
    pattern_bytes = model.cfg.n_layers * model.cfg.n_heads * n * n * 8
    assert patterns_fit(model, n, max_memory=pattern_bytes)
    assert not patterns_fit(model, n, max_memory=pattern_bytes - 1)
    whole = ll.run_with_linear_cache(model, prompt, max_memory=pattern_bytes)
    small = pattern_bytes - 1
    kept = ll.run_with_linear_cache(model, prompt, max_memory=small)
    assert not whole.point.frozen_attention
    attention = kept.point.frozen_attention
    assert len(attention) == model.cfg.n_layers
    assert all(a.max_memory == small for a in attention.values())  # carried from the recording on
    assert rel(kept.jacobian(), whole.jacobian()) <= 1e-12
