"""lens_linear: any TransformerLens model, for one input, as an exactly equivalent linear system.

Entry points:

* :func:`load_model` — the offline default (SmolLM2-135M-Instruct) or any TL model name.
* :func:`tiny_model` — small random models of many architectures, for tests.
* :func:`detach_hooks` / :func:`detached` — freeze norm scales, attention patterns and MLP
  gates: the output is unchanged and the gradient is linear.
* :class:`OperatingPoint` — the frozen coefficients of one forward pass, and their replay.
* :func:`run_with_linear_cache` → :class:`LinearCache` — detached Jacobians, bias terms,
  per-token contributions and reconstruction checks.
* ``lcache.attention`` (:class:`AttentionCircuits`) and :func:`induction_heads` — frozen
  patterns, token-to-token attention Jacobians as ``FactoredMatrix``, their QK term.
* :func:`fit_jacobian_lens` — TransformerLens' ``JacobianLens`` fitted by batched products,
  ordinary or through each prompt's frozen map (``detached=True``).
"""

from lens_linear._validation import LinearizationError, ModelInUseError, ModelUnavailableError
from lens_linear.attention import AttentionCircuits, induction_heads
from lens_linear.cache import LinearCache, run_with_linear_cache
from lens_linear.hooks import OperatingPoint, detach_hooks, detached
from lens_linear.jacobian_lens import fit_jacobian_lens
from lens_linear.models import load_model
from lens_linear.tiny import tiny_architectures, tiny_model

__version__ = "0.2.0"
__all__ = [
    "AttentionCircuits",
    "LinearCache",
    "LinearizationError",
    "ModelInUseError",
    "ModelUnavailableError",
    "OperatingPoint",
    "detach_hooks",
    "detached",
    "fit_jacobian_lens",
    "induction_heads",
    "load_model",
    "run_with_linear_cache",
    "tiny_architectures",
    "tiny_model",
]
