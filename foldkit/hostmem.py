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
The cost: up to ``threshold`` bytes of freed memory stay with the process instead of going back to the
system. Elsewhere than glibc (macOS, musl) this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

#: glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
#: keep blocks up to this size in the heap and this much freed memory at its top: a 224 px float
#: batch of 256 is 154 MB
THRESHOLD = 1 << 30

_applied: bool | None = None


def reuse_freed_memory(threshold: int = THRESHOLD) -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once); whether they are raised."""
    global _applied
    if _applied is None:
        _applied = False
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                _applied = bool(libc.mallopt(M_MMAP_THRESHOLD, threshold)) and bool(
                    libc.mallopt(M_TRIM_THRESHOLD, threshold)
                )
            except (OSError, AttributeError):  # no loadable libc or no mallopt: leave malloc as it is
                _applied = False
    return _applied
