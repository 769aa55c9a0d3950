"""Freezing rules for coefficients computed inside a wrapped Hugging Face module, one module
per kind of site: :mod:`~lens_linear.hooks.rules.moe` (a mixture of experts' router and
expert gates), :mod:`~lens_linear.hooks.rules.state_space` (a selective state-space mixer or
gated delta rule), :mod:`~lens_linear.hooks.rules.inside` (an attention bridged without a
pattern hook, a hyper-connection's weights). Attention's rule, its pattern kept as queries and keys, is
:mod:`lens_linear.hooks.patterns`; the rules on TransformerLens' own hook points are in
:mod:`lens_linear.hooks.freeze`."""
