"""lens_linear's detached Jacobian against references that share none of its code.

Bridge models: the Hugging Face model itself, run with its coefficients detached by hooks
chosen per kind of operation (``reference.hf_frozen``). Hooked models: a forward written from
the HookedTransformer's weights and config (``reference.hooked_frozen``).
"""

import pytest
import torch
from conftest import HOOKED, PROMPT, cached_tiny, rel

import lens_linear as ll
from lens_linear.reference import full_precision_softmax, hf_frozen, hooked_frozen
from lens_linear.tiny import tiny_architectures, tiny_hf_model

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
CASES = [("bridge", a) for a in tiny_architectures("bridge")]
CASES += [("hooked", a) for a in tiny_architectures("hooked")] if HOOKED else []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("backend, arch", CASES, ids=[f"{b}-{a}" for b, a in CASES])
def test_jacobian_matches_reference(backend, arch, dtype):
    model = cached_tiny(backend, arch, dtype)
    if backend == "bridge":
        hf = tiny_hf_model(arch, dtype=dtype)  # an independent copy: the bridge wraps its own
        ref = lambda x, frozen=True: hf_frozen(hf, x, frozen)[-1]
    else:
        ref = lambda x: hooked_frozen(model, x)[-1]
    # TL's bridge computes attention softmax in float32 as HF does; in float64 that rounds the
    # patterns to ~4e-8, so both sides run with the softmax in the input's precision (a no-op in float32)
    with full_precision_softmax():
        lc = ll.run_with_linear_cache(model, PROMPT)
        ours, value = lc.jacobian(), lc.activation()
    jac = torch.autograd.functional.jacobian(ref, lc.x, vectorize=True).transpose(
        0, 1
    )  # [pos, d_out, d_in]
    with torch.no_grad():
        errors = rel(ref(lc.x), value), rel(jac, ours)
    print(f"\n{backend}-{arch} {dtype}: value {errors[0]:.1e}, jacobian {errors[1]:.1e}")
    assert max(errors) <= TOL[dtype], errors
    if backend == "bridge":  # the reference's hooks did fire: the plain model's gradient differs
        u = torch.randn(value.shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
        _, plain = torch.autograd.functional.vjp(lambda x: ref(x, frozen=False), lc.x, u)
        assert rel(plain, torch.einsum("o,pod->pd", u, jac)) > 1e-3
