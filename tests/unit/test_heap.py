"""The daemon's malloc policy (jobworker.server.heap), checked in a process of its own."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import ctypes, sys
from jobworker.server import heap

class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2
if sys.argv[1] == "tuned":
    assert heap.map_large_blocks()
big = bytearray(1 << 20)  # mapped on its own; its free raises glibc's dynamic threshold
del big
before = libc.mallinfo2().hblkhd
block = bytearray(256 * 1024)
print(libc.mallinfo2().hblkhd - before)
"""


def mapped_after_a_large_free(mode: str) -> int:
    """Bytes newly mapped for a 256 KiB block allocated after a 1 MiB one was freed."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout)


def test_large_blocks_stay_mapped_once_the_threshold_is_fixed() -> None:
    if not hasattr(__import__("ctypes").CDLL(None), "mallinfo2"):
        pytest.skip("not glibc 2.33 or later")
    # glibc's own behaviour, which fragmented the daemon's heap: the block comes from the heap.
    assert mapped_after_a_large_free("default") == 0
    assert mapped_after_a_large_free("tuned") >= 256 * 1024
