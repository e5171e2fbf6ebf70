"""Giving the memory a pull freed back to the system.

A layer is inflated and extracted in worker threads in blocks of a megabyte or more. glibc
serves each thread from a malloc arena of its own and, once the first such block has been
freed, raises its mmap threshold, so later blocks come from the arenas' heaps, where they
stay once freed. Measured over ten cold pulls of a 50 MB image (bench.cri_bench, and a
daemon polled after each pull), the daemon's RSS went from 57 MiB to 60-95 MiB, depending
on which arena a block had landed in:

- ``malloc_trim`` after each pull alone: still 61-94 MiB (the thread arenas kept theirs);
- one arena alone: 72-93 MiB (its heap's free middle stays resident);
- one arena and ``malloc_trim`` after each pull: 57 MiB after every pull;
- a fixed low mmap threshold (``MALLOC_MMAP_THRESHOLD_``): 57 MiB, but the pull took twice
  as long in page faults.

So the daemon runs with one arena (``use_one_arena`` at start, before any thread) and trims
after each pull. Its threads run Python under one GIL, so they had little to gain from
arenas of their own. Both are glibc's; elsewhere they do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)

M_ARENA_MAX = -8  # glibc's mallopt parameter


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def use_one_arena() -> bool:
    """Every thread allocates from the main arena from now on; True if glibc took it."""
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_ARENA_MAX, 1))


def return_freed_memory() -> None:
    """Release the free pages of every malloc arena (blocking: run it in a thread)."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is None:
        return
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)
