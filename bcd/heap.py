"""Freed CPU memory handed back to the operating system while a block trains.

On Linux with glibc, what autograd frees in small pieces (a layer's saved activations, a few MB
each at LLM shapes, under glibc's mmap threshold) stays in the process's heap: resident, counted
in its RSS, reusable only by later small allocations. The block's gradients and its step's
tensors (chunks' scratch, 8-bit moments) are large, mmapped, not carved from that heap, so the
freed activations and those tensors would be resident at once. ``malloc_trim(0)`` returns every
whole free page of the heap to the system (inside the heap too, since glibc 2.8). bcd calls it
when backward reaches the active block (its first gradient: the activations above it are freed,
its gradients still to come) and before the solver steps (:mod:`bcd.activation`); the figures are
in docs/benchmarks.md, "Scale". It changes no value. Elsewhere (another C library, or no CPU
tensor in the block) nothing is done.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Iterable

import torch


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl, Windows)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release(tensors: Iterable[torch.Tensor]) -> bool:
    """Give the heap's free pages back to the system if any of ``tensors`` is on the CPU.

    Returns:
        Whether the trim ran (a CPU tensor, and glibc's ``malloc_trim`` available).
    """
    trim = _malloc_trim()
    if trim is None or not any(t.device.type == "cpu" for t in tensors):
        return False
    trim(0)
    return True
