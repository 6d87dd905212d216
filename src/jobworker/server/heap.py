"""The daemon's malloc policy: large blocks always come from ``mmap`` (glibc only).

glibc serves a request of ``M_MMAP_THRESHOLD`` bytes or more (128 KiB at start) with its own
``mmap``, given back to the kernel by ``free``. But the threshold is dynamic: each time such a
block is freed, it rises to that block's size (up to 32 MiB). The daemon's tables of retained
jobs — its dicts and sorted lists of 10 000 ended jobs, and the retention index — are a few
hundred KiB each and are reallocated over and over as jobs come and go. After the first free,
every later copy comes from the heap instead, where the small, long-lived objects of the jobs
retained meanwhile pin it: the heap's free-but-unreturnable part grew by about 1 MiB per 4000
jobs churned, for ever (a library-level churn with 10 000 retained: RSS +3776 KiB from 12 000 to
32 000 jobs; with the threshold fixed at 128 KiB, 256 KiB less). Setting the threshold once turns
the adjustment off (mallopt(3)).

A process-wide choice, so the daemon's entry point makes it, not the library.
"""

from __future__ import annotations

import ctypes

M_MMAP_THRESHOLD = -3
"""From glibc's <malloc.h>."""
MMAP_THRESHOLD = 128 * 1024
"""glibc's own starting value: blocks this large and larger are mapped on their own."""


def map_large_blocks(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes for this process. False where there is
    no ``mallopt`` (another C library) or it refused."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))
