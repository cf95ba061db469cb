"""Giving the memory an edit step freed back to the operating system.

A step allocates and frees several hundred MB of temporaries (the d_in x d_in float64 matrices of the solve,
the activations of the target optimisation). glibc keeps the freed pages of blocks it placed on its heap
(its mmap threshold rises past these sizes after the first frees), so a long-running daemon's resident
memory grew by 50-120 MB per step, 8.8 GB after 75 steps, with the live tensors flat at ~0.8 GB
(docs/benchmarks.md, "Memory over a long history"). ``malloc_trim`` after each step hands those pages back.
Elsewhere than glibc (musl, macOS) it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> bool:
    """Return the heap's free pages to the OS (glibc ``malloc_trim(0)``); whether it could."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
