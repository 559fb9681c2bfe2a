"""Keep freed host memory in the process, so big per-batch CPU tensors are not page-faulted afresh.

Why: glibc serves an allocation above its mmap threshold (dynamic, at most 32 MiB) with a fresh
``mmap`` and returns it with ``munmap`` when freed, and the kernel zero-fills every page of a fresh
mapping on first touch. On the CPU the device transform makes one float batch per step (38.5 MB for
256 images at 112 px), so converting uint8 to float cost 8-10 ms of page faults for about 1 ms of
work (measured on 2 cores: ``x.to(torch.float32)`` on a (256, 112, 112, 3) uint8 batch, 9.2 ms fresh,
0.9 ms into a reused buffer, 1.0-1.5 ms with the thresholds below), which was most of the eval
pipeline's time (docs/benchmarks.md, "The eval pipeline on the CPU").

PyTorch's CPU tuning guide gets the same from jemalloc or tcmalloc through ``LD_PRELOAD``; that needs
a system package and a launcher around every command, while glibc's own ``mallopt`` needs neither.
The cost: freed memory stays with the process (the heap's top is trimmed only above ``threshold``, and
freed blocks inside the heap are reused rather than returned), so the resident size stays near its
peak. Older glibc releases refuse an mmap threshold above 32 MiB (the check is in the 2.26 to 2.33
sources; 2.36, here, accepts it): then only the trim threshold is raised, which does not help 38 MB
batches. Elsewhere than glibc (macOS, musl) this does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

#: glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
#: keep blocks up to this size in the heap and this much freed memory at its top: a 224 px float
#: batch of 256 is 154 MB (an int for mallopt: below 2**31)
THRESHOLD = 1 << 30

_applied: bool | None = None


def _glibc() -> ctypes.CDLL | None:
    """The running C library when it is glibc (``CS_GNU_LIBC_VERSION`` exists only there), else None."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
        libc = ctypes.CDLL(None)  # the process's own symbols: no ldconfig lookup
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        return libc
    except (ValueError, OSError, AttributeError):  # no such confstr name, no loadable libc, no mallopt
        return None


def reuse_freed_memory(threshold: int = THRESHOLD) -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once); whether the mmap threshold,
    the one that matters for big batches, was raised."""
    global _applied
    if _applied is None:
        if not 0 < threshold < 1 << 31:
            raise ValueError(f"threshold {threshold}: mallopt takes a positive int below 2**31")
        libc = _glibc()
        _applied = False
        if libc is not None:
            _applied = bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
            trimmed = bool(libc.mallopt(M_TRIM_THRESHOLD, threshold))
            if not (_applied and trimmed):
                log.debug("glibc refused mallopt: mmap threshold %s, trim threshold %s", _applied, trimmed)
    return _applied
