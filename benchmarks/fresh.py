"""Peak memory as the high-water mark of a fresh process, one process per measurement.

A sampled resident size misses short peaks (the long-prompt benchmark sampled 3.23 GB every
10 ms where the process's high-water mark read 4.18 GB), and memory a process once touched
colours every later measurement in it. :func:`in_fresh_process` runs one function in a new
interpreter (``spawn``) and returns its result, its seconds and the child's high-water mark:
the peak of everything it did, model loading included; :func:`peak_of` returns that peak
alone, without sending the function's result back.

The high-water mark is the kernel's ``VmHWM`` of this process's own address space. Linux's
``ru_maxrss`` is the larger of that and a peak carried over an ``exec``: a child that
``spawn`` starts (fork, then exec) reports at least its parent's peak (measured: 1,515 MB in
a child that used 15 MB, under a parent that had touched 1.5 GB), so ``ru_maxrss`` serves
only where ``/proc`` is missing.
"""

from __future__ import annotations

import multiprocessing
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable


def high_water_mark() -> int:
    """This process's peak resident memory in bytes, since it started or since the last
    :func:`reset_high_water_mark` (``VmHWM``; ``ru_maxrss`` where ``/proc`` is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def reset_high_water_mark() -> None:
    """Lower this process's high-water mark to its present resident size (Linux >= 4.0), so
    that the next :func:`high_water_mark` is the peak of one stage, what is held at its start
    included."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _timed(fn: Callable[..., Any], args: tuple) -> tuple[Any, float, int]:
    t0 = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - t0, high_water_mark()


def _discarded(fn: Callable[..., Any], *args: Any) -> None:
    fn(*args)  # the result is dropped here, in the child, and never pickled


def in_fresh_process(fn: Callable[..., Any], *args: Any) -> tuple[Any, float, int]:
    """``fn(*args)`` in a new process: ``(result, seconds, peak bytes of that process)``.
    ``fn`` must be importable (a module-level function) and its result picklable; the
    seconds are ``fn``'s own, the peak is the whole process's."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(_timed, fn, args).result()


def peak_of(fn: Callable[..., Any], *args: Any) -> int:
    """The high-water mark, in bytes, of a fresh process that runs ``fn(*args)`` (a
    module-level function): the interpreter, the imports, whatever ``fn`` loads and its
    result, held until it returns."""
    return in_fresh_process(_discarded, fn, *args)[2]
