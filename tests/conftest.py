import functools
import importlib.metadata
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

HOOKED = tl_has_hooked_transformer()  # what this TransformerLens has: HookedTransformer (TL < 4)
PROMPT = "Hello there, friend!"
CASES = [("bridge", a) for a in tiny_architectures("bridge")]
if HOOKED:
    CASES += [("hooked", a) for a in tiny_architectures("hooked")]
CASE_IDS = [f"{b}-{a}" for b, a in CASES]

# CI's two legs (.ci/run): the newest TransformerLens, and TransformerLens 3.9. .ci/run names the
# leg in LENS_LINEAR_CI_LEG; without it (a local run) the installed version decides.
LEGS = ("newest", "tl39")
TL_VERSION = importlib.metadata.version("transformer-lens")


def _leg() -> str:
    leg = os.environ.get("LENS_LINEAR_CI_LEG")
    if not leg:
        return "tl39" if int(TL_VERSION.split(".")[0]) < 4 else "newest"
    if leg not in LEGS:
        raise pytest.UsageError(f"LENS_LINEAR_CI_LEG={leg!r}: choose one of {LEGS}")
    if not (TL_VERSION.startswith("3.9.") if leg == "tl39" else int(TL_VERSION.split(".")[0]) >= 4):
        raise pytest.UsageError(
            f"LENS_LINEAR_CI_LEG={leg} but transformer-lens {TL_VERSION} is installed"
        )
    return leg


LEG = _leg()

# Skips CI expects, by their reason's first words; under CI (env CI set) any other skip of a test
# fails the run (pytest_runtest_makereport below), so a broken fixture or a missing dependency
# cannot turn a core test into a silent skip.
LEG_SPECIFIC, NOT_APPLICABLE = "leg-specific", "not applicable"
EXPECTED_SKIPS = (LEG_SPECIFIC, NOT_APPLICABLE)


def leg_specific(condition: bool, why: str):
    """A skip mark for a test that belongs to some legs only (a TransformerLens version's API, or
    a heavy check one leg runs for both)."""
    return pytest.mark.skipif(condition, reason=f"{LEG_SPECIFIC}: {why}")


def skip_leg(why: str) -> None:
    """Skip here (a test or, at import, a module) as a leg-specific skip."""
    pytest.skip(f"{LEG_SPECIFIC}: {why}", allow_module_level=True)


def not_applicable(why: str) -> None:
    """Skip a parametrized case the check does not apply to (say, no ratio gate in a gated MLP)."""
    pytest.skip(f"{NOT_APPLICABLE}: {why}")


# heavy SmolLM2 checks that test no version-specific code path run in CI's newest-TL leg only
newest_tl_only = leg_specific(
    LEG != "newest", "heavy SmolLM2 check: run in the newest TransformerLens' leg only"
)


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return reason.removeprefix("Skipped: ")


def _fail_unexpected_skip(report) -> None:
    if os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report)
        if not reason.startswith(EXPECTED_SKIPS):
            report.outcome = "failed"
            report.longrepr = (
                f"unexpected skip under CI ({LEG} leg): {reason!r}. Fix its cause, or mark the "
                f"skip as expected (conftest.leg_specific / skip_leg / not_applicable)."
            )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_unexpected_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A whole module skipped at import (``pytest.skip(..., allow_module_level=True)``)."""
    outcome = yield
    _fail_unexpected_skip(outcome.get_result())


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


def tiny_pairs(model):
    """Two pairs of different lengths (right-padded), one with a BOS: padding and special
    tokens must stay out of every patch."""
    from lens_linear.patching import prompt_pairs

    return prompt_pairs(
        model,
        ["Hello there, friend!", "abcdefgh"],
        ["Hello where, friend!", "abcxefgh"],
        ["a", "b"],
        ["c", "d"],
    )
