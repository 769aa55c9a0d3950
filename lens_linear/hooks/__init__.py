"""Detach hooks, the operating point and its replay (one mechanism, every architecture)."""

from lens_linear.hooks.detach import detach_hooks, detached, detached_function
from lens_linear.hooks.operating_point import OperatingPoint
from lens_linear.hooks.run import Hook, forward, hooks_on, run_to
from lens_linear.hooks.sites import INPUT_HOOK, PARTS, Site, find_sites, output_hook

__all__ = [
    "detach_hooks",
    "detached",
    "detached_function",
    "OperatingPoint",
    "INPUT_HOOK",
    "output_hook",
    "PARTS",
    "Site",
    "find_sites",
    "Hook",
    "forward",
    "hooks_on",
    "run_to",
]
