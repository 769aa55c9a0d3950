import functools
import os

import pytest
import torch

if os.environ.get(
    "PYTEST_XDIST_WORKER_COUNT"
):  # pytest -n N: split the cores, do not oversubscribe them
    torch.set_num_threads(
        max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    )

from lens_linear.models import tl_has_hooked_transformer
from lens_linear.tiny import tiny_architectures, tiny_model

HOOKED = tl_has_hooked_transformer()
PROMPT = "Hello there, friend!"
CASES = [("bridge", a) for a in tiny_architectures("bridge")]
if HOOKED:
    CASES += [("hooked", a) for a in tiny_architectures("hooked")]
CASE_IDS = [f"{b}-{a}" for b, a in CASES]
# heavy SmolLM2 checks that test no version-specific code path run in CI's newest-TL leg only
newest_tl_only = pytest.mark.skipif(
    HOOKED, reason="heavy SmolLM2 check: run with the newest TransformerLens only"
)


@functools.lru_cache(maxsize=None)
def cached_tiny(backend: str, arch: str, dtype: torch.dtype = torch.float32):
    return tiny_model(arch, backend=backend, dtype=dtype)


@pytest.fixture(params=CASES, ids=CASE_IDS)
def tiny(request):
    backend, arch = request.param
    return cached_tiny(backend, arch)


@pytest.fixture(scope="session")
def smollm2():
    from lens_linear import load_model

    return load_model()


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def hooks_left(model):
    """Hook points carrying a non-permanent hook (the bridge wires some permanent ones itself)."""
    return [
        n
        for n, hp in model.hook_dict.items()
        if any(not getattr(h, "is_permanent", False) for h in [*hp.fwd_hooks, *hp.bwd_hooks])
    ]
