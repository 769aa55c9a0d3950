"""Peak memory as the high-water mark of a fresh process, one process per measurement.

A sampled resident size misses short peaks (the long-prompt benchmark sampled 3.23 GB every
10 ms where the process's high-water mark read 4.18 GB), and memory a process once touched
colours every later measurement in it. :func:`in_fresh_process` runs one function in a new
interpreter (``spawn``) and returns its result, its seconds and the child's ``ru_maxrss``:
the peak of everything it did, model loading included.
"""

from __future__ import annotations

import multiprocessing
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable


def high_water_mark() -> int:
    """This process's peak resident memory so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _timed(fn: Callable[..., Any], args: tuple) -> tuple[Any, float, int]:
    t0 = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - t0, high_water_mark()


def in_fresh_process(fn: Callable[..., Any], *args: Any) -> tuple[Any, float, int]:
    """``fn(*args)`` in a new process: ``(result, seconds, peak bytes of that process)``.
    ``fn`` must be importable (a module-level function) and its result picklable; the
    seconds are ``fn``'s own, the peak is the whole process's."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(_timed, fn, args).result()
