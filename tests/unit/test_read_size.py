"""A Logs message of a full read stays below workerd's mmap threshold: the read's bytes, the
message and its serialized form then come from glibc's heap and are reused, instead of each
being a fresh mapping faulted in page by page (and unmapped) for every message."""

from __future__ import annotations

import sys

from jobworker.api import convert
from jobworker.outlog import Chunk, Stream
from jobworker.outread import READ_CHUNK
from jobworker.server.heap import MMAP_THRESHOLD

MALLOC_HEADER = 16
"""glibc's chunk overhead, rounded up."""


def test_a_full_read_and_its_serialized_message_fit_below_the_mmap_threshold() -> None:
    data = bytes(READ_CHUNK)
    # The largest offset and time a message may carry: their varints are the longest.
    chunk = Chunk((1 << 63) - 1, data, Stream.STDERR, (1 << 62) - 1)
    wire = convert.chunk_to_pb(chunk).SerializeToString()
    assert len(wire) > READ_CHUNK
    assert sys.getsizeof(data) + MALLOC_HEADER < MMAP_THRESHOLD
    assert sys.getsizeof(wire) + MALLOC_HEADER < MMAP_THRESHOLD
