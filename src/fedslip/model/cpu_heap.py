"""Keep freed tensor memory in the process on CPU, so that training does not page-fault on every step.

glibc hands each large allocation (a batch's activations: megabytes) its own fresh mmap and returns it to
the kernel when freed, so every training step touches thousands of new pages, which the kernel zeroes.
Measured on MiniLM's bf16 step (batch 32 × 56 tokens, 2 cores): about 10,000 page faults a step and a
quarter of its throughput. Serving large blocks from the heap and never trimming it removes both; the
process's resident memory then stays at its peak, which a training run reaches anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
_STATE: dict[str, str] = {}


def keep_freed_memory() -> str:
    """Set glibc's malloc to keep large freed blocks (once per process); say what was done."""
    if "heap" not in _STATE:
        _STATE["heap"] = _configure()
    return _STATE["heap"]


def _configure() -> str:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return "default (no glibc mallopt)"
    ok = mallopt(M_MMAP_THRESHOLD, 1 << 30) or mallopt(M_MMAP_THRESHOLD, 32 << 20)
    ok = ok and mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    return "kept (glibc mallopt: large blocks from the heap, never trimmed)" if ok else "default (mallopt refused)"
