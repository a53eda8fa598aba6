"""Giving freed memory back to the operating system, so a daemon that runs for weeks stays its size.

glibc's malloc keeps freed memory in per-thread arenas, and every acquisition
starts threads of its own (the run, its frame writer, ome-writers'): measured
on the demo, the daemon grew 2 MB per short run and about 0.6 MB per minute of
acquisition although Python's own heap stayed flat. `malloc_trim(0)` hands the
free pages back (0.19 MB per run after it). Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import time

TRIM_EVERY_S = 60.0

_libc = None
_last_trim_s = 0.0


def release_free_memory(now_s: float | None = None, every_s: float = 0.0, *, collect_garbage: bool = False) -> None:
    """malloc_trim(0) (glibc), at most once per `every_s` seconds.

    `collect_garbage`: a full collection of cyclic garbage first (gc.collect, 0.1 s or so: at the end of a
    run, not on the data path). A run's report figure keeps its 6.6 MB canvas in reference cycles until the
    next full collection, which comes every few runs: 8 MB more RSS after one run than after the next.
    """
    global _libc, _last_trim_s
    now_s = time.monotonic() if now_s is None else now_s
    if now_s - _last_trim_s < every_s:
        return
    _last_trim_s = now_s
    if collect_garbage:
        gc.collect()
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim  # noqa: B018 - glibc only
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


def forget_iterated_plans() -> None:
    """useq caches every MDASequence it iterates, each axis built whole (functools.cache, unbounded): a daemon
    that runs for weeks would keep every plan ever checked or run (fuzzing: about 1 MB a plan). The caches
    only save recomputation, so clearing them at any time is safe."""
    from useq import _iter_sequence

    for name in ("_iter_axis", "_sizes", "_used_axes"):
        cached = getattr(_iter_sequence, name, None)
        if hasattr(cached, "cache_clear"):
            cached.cache_clear()
